"""Loads the compiled kernels (the ops under ``torch.ops.zo_opt``).

Two routes to the same sources in csrc/:
* ahead of time: ``pip install --no-build-isolation .`` builds ``zo_opt._C`` against the
  installed torch; importing it registers the ops;
* on first use: a plain ``pip install .`` (whose isolated build env has no torch) ships the
  sources as package data, and they are compiled here with ``torch.utils.cpp_extension.load``
  into a cache keyed by the torch version and the sources' hash.

Either failure is kept as a reason string so that ``zo_opt.backends`` can say why a backend
is missing; importing zo_opt never fails because of it.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch

_PACKAGE = Path(__file__).resolve().parent
FORCE_JIT_ENV = "ZO_OPT_FORCE_JIT"  # "1": skip the ahead-of-time module (tests use it)
CACHE_ENV = "ZO_OPT_CACHE"

CPU_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
CUDA_FLAGS = ["-O3", "-std=c++17"]  # no fast math: NOISE.md needs precise logf/sincospif
FIX = ("install a C++17 compiler with OpenMP (e.g. apt-get install g++) or point CXX at one, "
       "then start Python again; backend='torch' runs without it, about 10x slower")


def cache_root() -> Path:
    """zo_opt's cache (first-use builds, the trainer's tokenized blocks): $ZO_OPT_CACHE, else
    ~/.cache/zo_opt."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "zo_opt")


def source_root() -> Path:
    """csrc/ as shipped in the package (installed) or beside it (a source checkout)."""
    for root in (_PACKAGE / "_csrc", _PACKAGE.parents[1] / "csrc"):
        if (root / "zo_noise.h").is_file():
            return root
    raise FileNotFoundError(f"zo_opt's C++ sources are missing (looked in {_PACKAGE / '_csrc'})")


def cpu_sources(root: Path) -> list[Path]:
    return sorted((root / "cpu").glob("*.cpp"))


def cuda_sources(root: Path) -> list[Path]:
    """The CUDA kernels and their binding when torch has CUDA and nvcc is found, else []."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return []
    return sorted((root / "cuda").glob("*.cu")) + sorted((root / "cuda").glob("*.cpp"))


def _digest(root: Path, kind: str) -> str:
    """Cache key: torch's version, the flags and every source and header under csrc/."""
    h = hashlib.sha256(f"{torch.__version__} {kind} {CPU_FLAGS} {CUDA_FLAGS}".encode())
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


class BuildError(RuntimeError):
    """A first-use build that cannot start; the message says what to do."""


def _compiler_error(e: Exception) -> str:
    """The compiler's own complaint, where torch's message leads with pages of command lines."""
    said = [line.strip() for line in str(e).splitlines()
            if line.strip() and not re.match(r"Error building extension|\[\d+/\d+\]|FAILED:|ninja: ", line)
            and not re.search(r" -(o|c|MMD|isystem) ", line)]
    errors = [line for line in said if "error" in line.lower()] or said[-3:]
    return f"{type(e).__name__}: {'; '.join(dict.fromkeys(errors))[:300]}"


def _build_on_first_use() -> None:
    import fcntl

    from torch.utils import cpp_extension

    root = source_root()
    sources = cpu_sources(root)
    cuda = cuda_sources(root)
    kind = "cuda" if cuda else "cpu"
    compiler = os.environ.get("CXX", "c++")  # what torch's build runs (a command: "ccache g++" too)
    if shutil.which((compiler.split() or ["c++"])[0]) is None:
        raise BuildError(f"no C++ compiler: {compiler!r} is not on PATH (CXX names another); "
                         f"to fix: {FIX}")
    build_dir = cache_root() / f"{kind}-{_digest(root, kind)}"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"cannot create the build cache {build_dir} ({e.strerror}); to fix: "
                         f"set {CACHE_ENV} to a writable folder") from e
    # torch's own lock is a file that a killed build leaves behind, and every later load waits
    # on it forever; an flock is released when its holder dies, so whoever holds ours may
    # remove theirs.
    with open(build_dir / "zo_opt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        if not any(build_dir.glob("*.so")):
            print(f"zo_opt: compiling the C++ {kind.upper()} kernels into {build_dir} (once, minutes)",
                  file=sys.stderr, flush=True)
        cpp_extension.load(name=f"zo_opt_{kind}", sources=[str(s) for s in sources + cuda],
                           extra_cflags=CPU_FLAGS, extra_cuda_cflags=CUDA_FLAGS,
                           extra_ldflags=["-fopenmp"], build_directory=str(build_dir),
                           is_python_module=False)


@functools.lru_cache(maxsize=None)
def load() -> str | None:
    """Registers ``torch.ops.zo_opt``; returns None on success, else why it failed (and warns
    once, since backend='auto' then falls back without a word)."""
    errors = []
    if os.environ.get(FORCE_JIT_ENV) != "1":
        try:
            import zo_opt._C  # noqa: F401  (registers the ops)
            return None
        except ImportError as e:
            errors.append(f"no ahead-of-time build ({e})")
    try:
        _build_on_first_use()
        return None
    except BuildError as e:
        errors.append(f"first-use build failed ({e})")
    except Exception as e:  # a compiler error, a missing toolchain: report, do not crash
        errors.append(f"first-use build failed ({_compiler_error(e)}); to fix: {FIX}")
    reason = "; ".join(errors)
    warnings.warn(f"zo_opt: no C++ kernels, the 'cpu' and 'cuda' backends are unavailable and "
                  f"backend='auto' uses 'triton' or 'torch': {reason}", RuntimeWarning, stacklevel=2)
    return reason
