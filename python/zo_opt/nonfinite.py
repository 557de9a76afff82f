"""The non-finite-loss warning of ``ZOOptimizer(nonfinite="skip")``, read on the host without
making a GPU step wait.

A step restores the parameters and masks its update on the device whatever the losses are;
only the warning needs the flag on the host. On a GPU each step copies its flag and losses to
pinned memory behind a non-blocking copy and an event; every later ``step()`` call warns for
the steps whose event has completed, in step order, and never waits for one. On the CPU the
flag is there at once, and the warning comes from the step itself.
"""
from __future__ import annotations

import sys
import warnings
from collections import deque

import torch

MODULES = ("zo_opt", "torch")  # the frames between the caller of step() and the warning


def message(step: int, losses: torch.Tensor) -> str:
    return (f"ZOOptimizer step {step}: non-finite loss ({losses.tolist()}); "
            "parameters restored, update skipped")


def warn_at_caller(text: str) -> None:
    """A RuntimeWarning attributed to the first frame outside zo_opt and torch (the caller of
    ``step()``, whatever wrappers torch.optim puts around it)."""
    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in MODULES:
        frame, level = frame.f_back, level + 1
    warnings.warn(text, RuntimeWarning, stacklevel=level)


class DeferredWarnings:
    """The steps whose finite flag is on its way to the host."""

    def __init__(self):
        self._pending: deque[tuple[int, torch.Tensor, torch.Tensor, torch.cuda.Event | None]] = deque()

    def add(self, step: int, ok: torch.Tensor, losses: torch.Tensor) -> None:
        if ok.device.type == "cuda":
            ok_host = ok.to("cpu", non_blocking=True)  # pinned: the copy does not block
            losses_host = losses.to("cpu", non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(torch.cuda.current_stream(ok.device))  # the copies' stream
        else:  # the CPU: already there (another device: a blocking read)
            ok_host, losses_host, arrived = ok.cpu(), losses.cpu(), None
        self._pending.append((step, ok_host, losses_host, arrived))

    def warn_arrived(self) -> None:
        """Warns for every pending step, oldest first, up to the first whose flag has not
        reached the host yet."""
        while self._pending:
            step, ok, losses, arrived = self._pending[0]
            if arrived is not None and not arrived.query():
                return
            self._pending.popleft()
            if not bool(ok):
                warn_at_caller(message(step, losses))
