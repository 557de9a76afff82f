"""Build: the package, its C++ sources as package data, and (when torch is importable at
build time) the kernels ahead of time as zo_opt._C.

    pip install --no-build-isolation .   # torch in the env: compile now
    pip install .                        # isolated build without torch: compile on first use
"""
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CPU_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]  # as zo_opt/_extension.py
CUDA_FLAGS = ["-O3", "-std=c++17"]  # no fast math: NOISE.md needs precise logf/sincospif


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package as zo_opt/_csrc for the first-use build."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "zo_opt" / "_csrc"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CSRC, target, ignore=shutil.ignore_patterns("*.o", "__pycache__"))

    def get_source_files(self):
        """csrc/ too: the sdist takes these, and a wheel built from the sdist (`python -m build`)
        ships only what the sdist has, where setuptools alone would leave out every header."""
        return super().get_source_files() + [
            p.relative_to(ROOT).as_posix() for p in sorted(CSRC.rglob("*"))
            if p.is_file() and p.suffix != ".o" and "__pycache__" not in p.parts]


def cuda_arch_list():
    """TORCH_CUDA_ARCH_LIST if set, else the local GPUs' architectures, else 8.0 and 9.0."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    return "8.0;9.0"


def extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    def rel(folder, pattern):
        return sorted(str(p.relative_to(ROOT)) for p in (CSRC / folder).glob(pattern))

    cmds = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    sources = rel("cpu", "*.cpp") + ["csrc/module.cpp"]
    if torch.version.cuda is None or CUDA_HOME is None:  # no CUDA torch or no nvcc: CPU only
        ext = CppExtension("zo_opt._C", sources,
                           extra_compile_args=CPU_FLAGS, extra_link_args=["-fopenmp"])
        return [ext], cmds
    # torch reads the list from the environment; without it, it would build for every arch
    # torch supports (slow) when no GPU is visible.
    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    cuda_sources = rel("cuda", "*.cu") + rel("cuda", "*.cpp")
    ext = CUDAExtension("zo_opt._C", sources + cuda_sources,
                        extra_compile_args={"cxx": CPU_FLAGS, "nvcc": CUDA_FLAGS},
                        extra_link_args=["-fopenmp"])
    return [ext], cmds


ext_modules, ext_cmds = extensions()
setup(
    package_dir={"zo_opt": "python/zo_opt", "zo_kernels": "zo_kernels"},
    packages=["zo_opt", "zo_opt.backends", "zo_opt.train", "zo_opt.fed", "zo_kernels"],
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithSources, **ext_cmds},
    zip_safe=False,
)
