"""zo-opt benchmarks: baselines, workloads and pytest-benchmark suites (not part of the package)."""
