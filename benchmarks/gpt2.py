"""A GPT-2 forward in plain torch, with the parameters of ``shapes.param_shapes`` (same names,
shapes and order as Hugging Face's GPT2LMHeadModel), for the step benchmarks: the model the
old repo trained, without needing transformers. Pre-LayerNorm blocks, causal attention,
tanh GELU, output head tied to the token embedding, no dropout (ZO evaluates in eval mode).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .shapes import SIZES, GPT2Size, param_shapes


class GPT2(nn.Module):
    def __init__(self, size: str | GPT2Size = "20M", dtype=torch.float32, device="cpu", seed: int = 0):
        super().__init__()
        self.config = SIZES[size] if isinstance(size, str) else size
        gen = torch.Generator(device=device).manual_seed(seed)
        self._names = []
        for name, shape in param_shapes(self.config):
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                init = torch.ones(shape, device=device)
            elif name.endswith(".bias"):
                init = torch.zeros(shape, device=device)
            else:
                init = torch.empty(shape, device=device).normal_(0.0, 0.02, generator=gen)
            key = name.replace(".", "__")
            self.register_parameter(key, nn.Parameter(init.to(dtype)))
            self._names.append((name, key))

    def named_parameters_hf(self) -> list[tuple[str, nn.Parameter]]:
        """(Hugging Face name, parameter) pairs, in GPT2LMHeadModel order."""
        return [(name, getattr(self, key)) for name, key in self._names]

    def _p(self, name: str) -> torch.Tensor:
        return getattr(self, name.replace(".", "__"))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits, or the mean next-token cross-entropy when ``targets`` is given."""
        c = self.config
        b, t = idx.shape
        wte = self._p("transformer.wte.weight")
        x = wte[idx] + self._p("transformer.wpe.weight")[:t]
        for i in range(c.n_layer):
            h = f"transformer.h.{i}."
            y = F.layer_norm(x, (c.n_embd,), self._p(h + "ln_1.weight"), self._p(h + "ln_1.bias"))
            qkv = torch.addmm(self._p(h + "attn.c_attn.bias"), y.reshape(b * t, -1),
                              self._p(h + "attn.c_attn.weight")).view(b, t, 3, c.n_head, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).reshape(b * t, c.n_embd)
            x = x + torch.addmm(self._p(h + "attn.c_proj.bias"), y,
                                self._p(h + "attn.c_proj.weight")).view(b, t, -1)
            y = F.layer_norm(x, (c.n_embd,), self._p(h + "ln_2.weight"), self._p(h + "ln_2.bias"))
            y = F.gelu(torch.addmm(self._p(h + "mlp.c_fc.bias"), y.reshape(b * t, -1),
                                   self._p(h + "mlp.c_fc.weight")), approximate="tanh")
            x = x + torch.addmm(self._p(h + "mlp.c_proj.bias"), y,
                                self._p(h + "mlp.c_proj.weight")).view(b, t, -1)
        x = F.layer_norm(x, (c.n_embd,), self._p("transformer.ln_f.weight"), self._p("transformer.ln_f.bias"))
        logits = x @ wte.t()
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().reshape(b * t, -1), targets.reshape(-1))


def batch(size: str | GPT2Size, batch_size: int, seq_len: int, device="cpu", seed: int = 0):
    """A fixed random token batch (inputs, next-token targets)."""
    c = SIZES[size] if isinstance(size, str) else size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.randint(0, c.vocab, (batch_size, seq_len + 1), generator=gen).to(device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
