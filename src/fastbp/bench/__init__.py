"""fastbp's training benchmarks: W1-W4 of WORKLOADS.md against NumPy, torch and scikit-learn.

``python -m fastbp.bench [--quick | --full] [--threads N] [--output DIR] [--repeat R]`` times
every contender on the same work (same initial weights, same batches in the same order),
checks each result against fastbp's, and writes a markdown table and a PNG chart. The
repository's ``bench/test_bench_workloads.py`` runs the same workloads under pytest-benchmark.

* :mod:`fastbp.bench.workloads`: the workloads, their data, the contenders and the checks;
* :mod:`fastbp.bench.machine`: CPU load from /proc/stat, the CPU model, thread limits;
* :mod:`fastbp.bench.report`: the interleaved timing loop, the table and the chart.
"""

from .machine import cpu_load, cpu_sample, machine_summary, thread_limits
from .workloads import (
    CONTENDERS,
    WORKLOADS,
    Problem,
    Result,
    Unavailable,
    Workload,
    WrongResult,
    check,
    make_problem,
    prepare,
    scaled,
    step_flops,
)

__all__ = [
    "CONTENDERS",
    "WORKLOADS",
    "Problem",
    "Result",
    "Unavailable",
    "Workload",
    "WrongResult",
    "check",
    "cpu_load",
    "cpu_sample",
    "machine_summary",
    "make_problem",
    "prepare",
    "scaled",
    "step_flops",
    "thread_limits",
]
