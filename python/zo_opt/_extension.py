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
import sys
from pathlib import Path

import torch

_PACKAGE = Path(__file__).resolve().parent
FORCE_JIT_ENV = "ZO_OPT_FORCE_JIT"  # "1": skip the ahead-of-time module (tests use it)
CACHE_ENV = "ZO_OPT_CACHE"  # where first-use builds go (default ~/.cache/zo_opt)

CPU_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
CUDA_FLAGS = ["-O3", "-std=c++17"]  # no fast math: NOISE.md needs precise logf/sincospif


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


def _build_on_first_use() -> None:
    from torch.utils import cpp_extension

    root = source_root()
    sources = cpu_sources(root)
    cuda = cuda_sources(root)
    kind = "cuda" if cuda else "cpu"
    cache = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "zo_opt"))
    build_dir = cache / f"{kind}-{_digest(root, kind)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob("*.so")):
        print(f"zo_opt: compiling the C++ {kind.upper()} kernels into {build_dir} (once, minutes)",
              file=sys.stderr, flush=True)
    cpp_extension.load(name=f"zo_opt_{kind}", sources=[str(s) for s in sources + cuda],
                       extra_cflags=CPU_FLAGS, extra_cuda_cflags=CUDA_FLAGS,
                       extra_ldflags=["-fopenmp"], build_directory=str(build_dir),
                       is_python_module=False)


@functools.lru_cache(maxsize=None)
def load() -> str | None:
    """Registers ``torch.ops.zo_opt``; returns None on success, else why it failed."""
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
    except Exception as e:  # a compiler error, a missing toolchain: report, do not crash
        errors.append(f"first-use build failed ({type(e).__name__}: {str(e).strip()[:300]})")
    return "; ".join(errors)
