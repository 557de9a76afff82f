"""The plain `pip install .` route: an isolated build has no torch, so the wheel carries the
C++ sources and the kernels compile on first use."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FIRST_USE = """
import torch, zo_opt
from zo_opt import noise
from zo_opt.functional import perturb_
assert zo_opt.__file__.startswith({site!r}), zo_opt.__file__
assert "cpu" in zo_opt.available_backends(), zo_opt.unavailable_backends()
p = [torch.zeros(1000), torch.zeros(3)]
perturb_(p, 2**64 - 1, 1.0, backend="cpu")
for got, want in zip(p, noise.direction([1000, 3], 2**64 - 1)):
    assert (got - want).abs().max() < 2e-5
print("first-use build ok")
"""


@pytest.mark.slow
def test_isolated_wheel_compiles_the_kernels_on_first_use(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True, text=True)
    wheel = next(tmp_path.glob("zo_opt-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "zo_opt/_csrc/zo_noise.h" in names
    assert not any(n.startswith("zo_opt/_C") and n.endswith(".so") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # FORCE_JIT: an editable install's import hook would otherwise hand over its own _C
    env = {"PYTHONPATH": str(site), "ZO_OPT_FORCE_JIT": "1", "ZO_OPT_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", FIRST_USE.format(site=str(site))], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "compiling the C++ CPU kernels" in run.stderr  # the one-line notice
    assert "first-use build ok" in run.stdout
