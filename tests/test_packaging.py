"""The plain `pip install .` route: an isolated build has no torch, so the wheel carries the
C++ sources and the kernels compile on first use."""
import os
import shutil
import subprocess
import sys
import tarfile
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


def test_the_sdist_carries_every_kernel_source(tmp_path):
    """`python -m build` builds the wheel from the sdist: a header left out of it is missing
    from the wheel's _csrc, and the first-use build fails."""
    src = tmp_path / "src"
    keep = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "*.egg-info")
    for name in ("csrc", "python", "zo_kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=keep)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; "
                            f"print(b.build_sdist({str(tmp_path / 'dist')!r}))"],
                           cwd=src, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    with tarfile.open(tmp_path / "dist" / build.stdout.split()[-1]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    wanted = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert wanted - names == set()


@pytest.fixture(scope="module")
def first_use(tmp_path_factory):
    """A wheel built in isolation, unpacked, and its kernels compiled on first use (once for
    the module): ``(run, env, site)`` with ``run`` that first process."""
    tmp_path = tmp_path_factory.mktemp("wheel")
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
    return run, env, site


@pytest.mark.slow
def test_isolated_wheel_compiles_the_kernels_on_first_use(first_use):
    run, _, _ = first_use
    assert run.returncode == 0, run.stdout + run.stderr
    assert "compiling the C++ CPU kernels" in run.stderr  # the one-line notice
    assert "first-use build ok" in run.stdout


@pytest.mark.slow
def test_a_build_killed_midway_leaves_no_lock_that_hangs_the_next_import(first_use):
    run, env, site = first_use
    assert run.returncode == 0, run.stdout + run.stderr
    (build_dir,) = Path(env["ZO_OPT_CACHE"]).iterdir()
    (build_dir / "lock").touch()  # what torch's build leaves when its process is killed
    again = subprocess.run([sys.executable, "-c", FIRST_USE.format(site=str(site))], cwd=site,
                           env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "compiling" not in again.stderr  # the cached build, not a second compile
    assert "first-use build ok" in again.stdout


FAILED_BUILD = """
import torch, zo_opt
from zo_opt import ZOOptimizer
print("REASON", zo_opt.unavailable_backends()["cpu"])
w = torch.zeros(4)
opt = ZOOptimizer([w], lr=0.1, q=1, seed=0)      # backend="auto": the torch reference
opt.step(lambda: ((w - 1) ** 2).sum())
print("auto step ok", float(w.abs().sum()) > 0)
"""


def failed_build(tmp_path, **env):
    """zo_opt from this checkout in a process whose first-use build cannot work."""
    env = {"PYTHONPATH": str(ROOT / "python"), "ZO_OPT_FORCE_JIT": "1",
           "ZO_OPT_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path), **env}
    return subprocess.run([sys.executable, "-c", FAILED_BUILD], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_told_the_fix(run, cause):
    assert run.returncode == 0, run.stdout + run.stderr
    assert "auto step ok True" in run.stdout
    reason = next(line for line in run.stdout.splitlines() if line.startswith("REASON"))
    assert cause in reason, reason
    assert "CXX" in reason and "backend='torch'" in reason, reason  # the fix and the fallback
    assert "Traceback" not in run.stderr and "!! WARNING" not in run.stderr, run.stderr
    assert cause in run.stderr and "'torch'" in run.stderr, run.stderr  # said once, unasked


def test_no_compiler_says_so_and_auto_falls_back(tmp_path):
    bin_dir = tmp_path / "bin"  # ninja alone: no c++ on PATH
    bin_dir.mkdir()
    ninja = shutil.which("ninja", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    (bin_dir / "ninja").symlink_to(ninja)
    assert_told_the_fix(failed_build(tmp_path, PATH=str(bin_dir)), "'c++' is not on PATH")


def test_a_compiler_error_is_quoted_not_the_command_line(tmp_path):
    cxx = tmp_path / "g++"  # a compiler without OpenMP, as Apple's clang is: it compiles nothing
    cxx.write_text('#!/bin/sh\ncase " $* " in *" -c "*) ;; *) exec /usr/bin/g++ "$@";; esac\n'
                   'echo "fatal error: omp.h: No such file or directory" >&2; exit 1\n')
    cxx.chmod(0o755)
    run = failed_build(tmp_path, CXX=str(cxx), PATH=str(Path(sys.executable).parent) + ":/usr/bin:/bin")
    assert_told_the_fix(run, "omp.h: No such file or directory")


def test_an_unwritable_cache_names_the_variable_that_moves_it(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    run = failed_build(tmp_path, ZO_OPT_CACHE=str(blocked),
                       PATH=str(Path(sys.executable).parent) + ":/usr/bin:/bin")
    assert run.returncode == 0, run.stdout + run.stderr
    reason = next(line for line in run.stdout.splitlines() if line.startswith("REASON"))
    assert "set ZO_OPT_CACHE to a writable folder" in reason, reason
    assert "compiler" not in reason, reason  # a compiler is there: installing one fixes nothing
