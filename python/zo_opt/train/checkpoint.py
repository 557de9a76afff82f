"""Atomic checkpoints: written into a temporary folder, renamed when complete.

Layout of ``--checkpoint_dir``::

    step_00000500/   model (Hugging Face format), tokenizer, trainer_state.pt, run_config.json, COMPLETE
    latest           name of the newest complete checkpoint (replaced atomically)

A save writes ``.tmp-step_N-PID/``, marks it ``COMPLETE`` last, renames it to ``step_N`` and
only then points ``latest`` at it and deletes older checkpoints. A process killed at any
point leaves the previous checkpoint complete and findable; stale temporary folders are
ignored by ``find_checkpoint`` and removed by the next save.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

MARK = "COMPLETE"


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(ckpt_dir, step: int, model, tokenizer, state: dict, config: dict, keep: int = 1,
                    _after_model=None) -> Path:
    """Write checkpoint ``step`` and keep the newest ``keep`` complete ones."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp)
    if _after_model is not None:  # tests: die here, mid-write
        _after_model(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / "trainer_state.pt")
    (tmp / "run_config.json").write_text(json.dumps(config, indent=1))
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    (tmp / MARK).write_text(json.dumps({"step": step}))
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. after a resume): replace it
        old = ckpt_dir / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    pointer = ckpt_dir / f".latest.tmp{os.getpid()}"
    pointer.write_text(final.name)
    os.replace(pointer, ckpt_dir / "latest")
    # Retention counts back from this step: checkpoints past it are another trajectory's (a
    # resume from an older one, or an earlier run of the same name), and ranking them as newer
    # would delete the checkpoint just written while ``latest`` names it.
    complete = sorted(p for p in ckpt_dir.glob("step_*") if (p / MARK).exists() and p.name <= final.name)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob(".tmp-*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def find_checkpoint(path) -> Path:
    """A complete checkpoint: ``path`` itself, or the latest one in a checkpoint_dir or run folder."""
    path = Path(path)
    if (path / MARK).exists():
        return path
    if (path / "checkpoints").is_dir() and not list(path.glob("step_*")):
        path = path / "checkpoints"
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    latest = path / "latest"
    if latest.exists():
        named = path / latest.read_text().strip()
        if (named / MARK).exists():
            return named
    complete = sorted(p for p in path.glob("step_*") if (p / MARK).exists())
    if not complete:
        raise FileNotFoundError(f"no complete checkpoint in {path}")
    return complete[-1]


def checkpoint_step(ckpt) -> int:
    """The step a complete checkpoint was saved at, without loading it."""
    return json.loads((Path(ckpt) / MARK).read_text())["step"]


def load_state(ckpt: Path) -> dict:
    return torch.load(Path(ckpt) / "trainer_state.pt", map_location="cpu", weights_only=False)
