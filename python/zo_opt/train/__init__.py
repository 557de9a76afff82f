"""The GPT-2 reference trainer (``zo-train``): data, models, modes, logging, checkpoints.

Needs the ``train`` extra: ``pip install 'zo-opt[train]'``. Entry point: :func:`main`.
"""


def main(argv=None):
    from .train import main as _main

    return _main(argv)


__all__ = ["main"]
