"""The reference backend: plain torch on any device and float dtype, z materialized per
tensor from zo_opt.noise. Slow, simple, and what the fast backends are held against."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import exact, noise
from .runner import exact_list_runner, list_runner


class TorchBackend:
    name = "torch"

    def unavailable_reason(self) -> str | None:
        return None

    def supports(self, tensor: torch.Tensor) -> bool:
        return tensor.is_floating_point()

    def noise_axpby_(self, params: Sequence[torch.Tensor], offsets: Sequence[int],
                     seeds: Sequence[int], scales: torch.Tensor, distribution: str) -> None:
        for p, o in zip(params, offsets):
            if p.numel() == 0:
                continue
            idx = torch.arange(p.numel(), device=p.device, dtype=torch.int64) + o
            acc = torch.zeros(p.numel(), device=p.device, dtype=torch.float32)
            for i, seed in enumerate(seeds):
                acc += scales[1 + i] * noise.noise_at(idx, seed, distribution).to(torch.float32)
            math_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            out = scales[0].to(math_dtype) * p.reshape(-1).to(math_dtype) + acc.to(math_dtype)
            p.copy_(out.view_as(p))

    def prepare(self, params, offsets):
        return list_runner(self, params, offsets)

    def prepare_exact(self, params, offsets):
        return exact_list_runner(exact.exact_pass_, params, offsets)

    count_special_ = staticmethod(exact.count_special_)
    fill_special_ = staticmethod(exact.fill_special_)


BACKEND = TorchBackend()
