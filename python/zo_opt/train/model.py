"""GPT-2 models by size (the old script's configs) and the parameter scope to train.

Sizes name the old configs; the printed count is the real one (the "200M" is GPT-2 small,
124M; the token embedding is tied to the output head and counted once).
"""
from __future__ import annotations

import torch

VOCAB = 50257
# size -> (n_embd, n_layer, n_head, n_positions)
CONFIGS = {
    "20M": (256, 6, 4, 512),
    "200M": (768, 12, 12, 1024),
    "500M": (1024, 24, 16, 1024),
    "800M": (1536, 28, 24, 1024),
    "1B": (1600, 32, 25, 1024),
}


def build_model(size="20M", *, model_name_or_path=None, dropout=0.0, seed=0):
    """A GPT2LMHeadModel: fresh from ``CONFIGS[size]`` (seeded init) or loaded from a folder."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if model_name_or_path:
        model = GPT2LMHeadModel.from_pretrained(model_name_or_path, resid_pdrop=dropout,
                                                embd_pdrop=dropout, attn_pdrop=dropout)
        return model.float()
    n_embd, n_layer, n_head, n_pos = CONFIGS[size]
    config = GPT2Config(vocab_size=VOCAB, n_positions=n_pos, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model


def describe(model) -> str:
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return f"GPT-2 {c.n_embd}/{c.n_layer}/{c.n_head}, ctx {c.n_positions}: {n / 1e6:.2f}M parameters"


def select_params(model, scope: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, param) pairs to train; the others get requires_grad=False.

    full: every parameter. reduced: the last block's MLP and ln_2, the final LayerNorm and
    the head (which GPT-2 ties to the token embedding, so that matrix is trained too).
    """
    named = list(model.named_parameters())  # tied weights appear once
    if scope == "full":
        chosen = named
    elif scope == "reduced":
        last = f"transformer.h.{model.config.n_layer - 1}."
        head = {id(model.get_output_embeddings().weight)}
        chosen = [(n, p) for n, p in named
                  if n.startswith(last + "mlp.") or n.startswith(last + "ln_2.")
                  or n.startswith("transformer.ln_f.") or id(p) in head]
    else:
        raise ValueError(f"Invalid scope: {scope!r} (full, reduced)")
    keep = {id(p) for _, p in chosen}
    for _, p in named:
        p.requires_grad_(id(p) in keep)
    return chosen


def no_decay(name: str, p) -> bool:
    """Biases and LayerNorm weights get no weight decay (as MeZO)."""
    return p.ndim < 2 or ".ln_" in name or name.startswith("transformer.ln_f")
