"""Test setup. Without a GPU, Triton runs on the CPU through its interpreter, which must be
chosen before triton is first imported (importing torch does not import it); on a GPU
machine the kernels run compiled unless TRITON_INTERPRET says otherwise."""
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

KAT_PATH = Path(__file__).parent / "data" / "noise_kat.json"


@pytest.fixture(scope="session")
def kat():
    """Known answers of the noise contract (a copy of shared/design/noise_kat.json)."""
    return json.loads(KAT_PATH.read_text())


@pytest.fixture(scope="session")
def compile_reports():
    """``reports(*args)``: the JSON lines of ``python -m zo_kernels.compile_check 90 *args``,
    run in a subprocess without TRITON_INTERPRET (the interpreter replaces the compiler here),
    once per argument list and session (the tests only read them)."""
    @functools.cache
    def reports(*args: str) -> list[dict]:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-m", "zo_kernels.compile_check", "90", *args],
                              env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line) for line in proc.stdout.splitlines()]
    return reports


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same torch RNG state: failures reproduce."""
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
