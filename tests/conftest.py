"""Test setup: Triton runs on the CPU through its interpreter, which must be chosen before
triton is first imported, so this file sets it before anything else."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

KAT_PATH = Path(__file__).parent / "data" / "noise_kat.json"


@pytest.fixture(scope="session")
def kat():
    """Known answers of the noise contract (a copy of shared/design/noise_kat.json)."""
    return json.loads(KAT_PATH.read_text())


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
