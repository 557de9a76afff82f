"""pytest-benchmark setup for the CPU suites: the machine description saved in the JSON.

Collected only when ``benchmarks`` is named on the command line (pyproject's testpaths is
``tests``), so ``make test`` never runs these.
"""
import os
import platform

import torch

import zo_opt

from .workloads import backend_skip_reason


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["zo_opt"] = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": [b for b in ("cpu", "triton", "cuda", "torch") if not backend_skip_reason(b, "cpu")],
        "skipped_backends": {b: r for b in ("cpu", "triton", "cuda", "torch")
                             if (r := backend_skip_reason(b, "cpu"))},
        "zo_opt": zo_opt.__version__,
    }
