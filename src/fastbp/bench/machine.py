"""The machine a benchmark runs on: CPU load from /proc/stat, the CPU model, thread limits.

Shared by the report runner (``python -m fastbp.bench``) and the pytest benchmarks in the
repository's ``bench/`` folder (its ``conftest.py`` imports :func:`cpu_sample` and
:func:`cpu_load` from here).
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass

import fastbp

__all__ = [
    "DISTURBED_FOREIGN_FRAC",
    "CpuSample",
    "cpu_load",
    "cpu_model",
    "cpu_sample",
    "fma_peak",
    "machine_summary",
    "thread_limits",
]

#: Share of the machine's CPU time used by *other* processes (or stolen by the hypervisor)
#: above which a benchmark is reported as disturbed.
DISTURBED_FOREIGN_FRAC = 0.10

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU time counters, all in clock ticks (``USER_HZ``)."""

    total: int  # all CPUs, every state (guest time is already inside user)
    idle: int  # idle + iowait
    steal: int  # time the hypervisor gave our virtual CPUs to someone else
    own: float  # user + system time of this process, all its threads


def cpu_sample() -> CpuSample | None:
    """Read the aggregate ``cpu`` line of /proc/stat and this process's CPU time (None if n/a)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice]
    fields += [0] * (8 - len(fields))
    times = os.times()
    return CpuSample(
        total=sum(fields[:8]),
        idle=fields[3] + fields[4],
        steal=fields[7],
        own=(times.user + times.system) * _CLK_TCK,
    )


def cpu_load(before: CpuSample | None, after: CpuSample | None) -> dict[str, float | None]:
    """Fractions of the machine's CPU time between two samples.

    ``cpu_busy_frac``: busy (not idle) time of all CPUs, this process included.
    ``foreign_busy_frac``: busy time *not* spent by this process (other processes, plus steal),
    the number that says whether a run was disturbed. ``steal_frac``: stolen by the hypervisor.
    All are None when /proc/stat is unreadable or the interval is under one clock tick.
    """
    keys = ("cpu_busy_frac", "foreign_busy_frac", "steal_frac", "load_window_s")
    if before is None or after is None or after.total <= before.total:
        return dict.fromkeys(keys)
    total = after.total - before.total
    busy = total - (after.idle - before.idle)
    own = after.own - before.own
    ncpu = os.cpu_count() or 1
    return {
        "cpu_busy_frac": round(busy / total, 3),
        "foreign_busy_frac": round(min(max(busy - own, 0.0) / total, 1.0), 3),
        "steal_frac": round((after.steal - before.steal) / total, 3),
        "load_window_s": round(total / ncpu / _CLK_TCK, 2),
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def fma_peak(
    threads: int = 1, float64: bool = False, seconds: float = 0.05, rounds: int = 5
) -> float:
    """The multiply-add peak of fastbp's active kernels on ``threads`` threads at once, in
    GFLOP/s: the GEMM micro-kernel's accumulator chains with no loads
    (``fastbp._core.fma_probe``), the best of ``rounds`` calls of about ``seconds`` each (the
    best, since nothing makes the arithmetic faster than it is; a disturbed call only lowers
    it). Measured, not taken from a data sheet: turbo, a virtual machine's share of its cores and
    the FMA units per core all vary, and the report's "of FMA peak" needs this machine's."""
    from fastbp import _core

    if threads < 1 or rounds < 1 or not seconds > 0:
        raise ValueError(
            f"need threads >= 1, rounds >= 1, seconds > 0; got {threads}, {rounds}, {seconds}"
        )
    iters = 10_000
    while True:  # size one call from a short one, warming the core up as it goes
        t0 = time.perf_counter()
        _core.fma_probe(float64, iters, threads)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds / 4:
            break
        iters *= 4
    iters = max(1, round(iters * seconds / elapsed))
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        flops = _core.fma_probe(float64, iters, threads)
        best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


def machine_summary() -> dict[str, object]:
    """CPU model, logical cores (and those this process may use), fastbp's ISA and version."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    config = fastbp.get_config()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 1,
        "usable_cores": usable,
        "fastbp": fastbp.__version__,
        "isa": config["isa"],
        "python": platform.python_version(),
    }


@contextlib.contextmanager
def thread_limits(n: int) -> Iterator[dict[str, object]]:
    """Run every contender on ``n`` threads: fastbp, torch (if installed) and NumPy's BLAS
    (through threadpoolctl, if installed). Yields the settings actually in effect; restores
    the previous ones on exit."""
    try:
        import torch
    except ImportError:
        torch = None
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        threadpool_info = threadpool_limits = None
    torch_before = torch.get_num_threads() if torch is not None else None
    fastbp.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)
    limiter = (
        threadpool_limits(limits=n, user_api="blas")
        if threadpool_limits is not None
        else contextlib.nullcontext()
    )
    try:
        with limiter:
            effective: dict[str, object] = {"fastbp": fastbp.get_num_threads()}
            if torch is not None:
                effective["torch"] = torch.get_num_threads()
            effective["numpy_blas"] = (
                [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
                if threadpool_info is not None
                else "not limited (threadpoolctl is not installed)"
            )
            yield effective
    finally:
        fastbp.set_num_threads(None)
        if torch is not None:
            torch.set_num_threads(torch_before)
