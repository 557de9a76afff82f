"""GPT-2 parameter shapes by size, counted by hand from GPT2Config (no model is built).

The names and shapes are those of Hugging Face's ``GPT2LMHeadModel.named_parameters()``:
attention and MLP weights are ``Conv1D`` (in_features, out_features), and the output head is
tied to the token embedding, so it appears once.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

VOCAB = 50257


@dataclass(frozen=True)
class GPT2Size:
    name: str
    n_embd: int
    n_layer: int
    n_head: int
    n_ctx: int
    vocab: int = VOCAB


# The old repo's configs by name (its "200M" is GPT-2 small, 124M; its "1B" is 1.07B).
SIZES = {
    "20M": GPT2Size("20M", 256, 6, 4, 512),
    "124M": GPT2Size("124M", 768, 12, 12, 1024),
    "1.07B": GPT2Size("1.07B", 1600, 32, 25, 1024),
}


def param_shapes(size: str | GPT2Size) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter, in ``named_parameters()`` order."""
    c = SIZES[size] if isinstance(size, str) else size
    d = c.n_embd
    shapes = [("transformer.wte.weight", (c.vocab, d)), ("transformer.wpe.weight", (c.n_ctx, d))]
    for i in range(c.n_layer):
        h = f"transformer.h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)), (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)), (h + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    return shapes


def param_count(size: str | GPT2Size) -> int:
    return sum(prod(shape) for _, shape in param_shapes(size))


def make_params(size: str | GPT2Size, dtype, device="cpu", seed: int = 0) -> list:
    """Fresh tensors of a size's shapes (standard normal * 0.02), for the pass benchmarks."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)  # drawn where they live: fast on a GPU
    out = []
    for _, shape in param_shapes(size):
        t = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=gen)
        out.append(t.to(dtype))
    return out
