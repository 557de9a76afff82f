"""zo-opt: fused zeroth-order (MeZO/SPSA) optimization for PyTorch."""
from . import functional, noise
from .backends import available_backends, unavailable_backends
from .optimizer import StepRecord, ZOOptimizer

__all__ = ["ZOOptimizer", "StepRecord", "available_backends", "unavailable_backends",
           "functional", "noise"]
__version__ = "0.1.0"
