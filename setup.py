"""Build: the package, its C++ sources as package data, and (when torch is importable at
build time) the kernels ahead of time as zo_opt._C.

    pip install --no-build-isolation .   # torch in the env: compile now
    pip install .                        # isolated build without torch: compile on first use
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CPU_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]  # as zo_opt/_extension.py


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package as zo_opt/_csrc for the first-use build."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "zo_opt" / "_csrc"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CSRC, target, ignore=shutil.ignore_patterns("*.o", "__pycache__"))


def extensions():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    sources = sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cpu").glob("*.cpp"))
    ext = CppExtension("zo_opt._C", sources + ["csrc/module.cpp"],
                       extra_compile_args=CPU_FLAGS, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, ext_cmds = extensions()
setup(
    package_dir={"zo_opt": "python/zo_opt", "zo_kernels": "zo_kernels"},
    packages=["zo_opt", "zo_opt.backends", "zo_kernels"],
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithSources, **ext_cmds},
    zip_safe=False,
)
