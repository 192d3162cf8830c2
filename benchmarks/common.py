"""What the benchmark scripts share: timing, the CPU's name, and recording to RESULTS.md.
The scripts run as `python benchmarks/<name>.py`, which puts this folder on the import path."""

from __future__ import annotations

import os
import platform
import statistics
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def measure(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls, after one untimed call (compilation for JAX, allocator
    and kernels for PyTorch)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def report(section: str, record: bool) -> None:
    """Prints a results section and, with `record`, appends it to RESULTS.md."""
    print(section)
    if record:
        with open(RESULTS, "a") as f:
            f.write(section)
