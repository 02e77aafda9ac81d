"""Configuration of the kernel benchmarks: thread count, thread limits, machine load, summary.

* ``--threads N`` (default 1) sets the thread count of every contender for the whole session:
  ``fastbp.set_num_threads(N)``, ``torch.set_num_threads(N)`` and threadpoolctl's
  ``threadpool_limits(N, user_api="blas")`` for NumPy's BLAS.
* The ``run_benchmark`` fixture wraps pytest-benchmark's ``benchmark``: it sets the group, runs
  the timed calls, reads ``/proc/stat`` before and after, and fills ``extra_info`` (µs per call,
  GFLOP/s or GB/s, threads, dtype, shape, fastbp's ISA, the CPU load during the run).
* At the end of a timed run a compact table per group is printed: median, rate and each peer's
  time divided by fastbp's, plus any benchmark whose run was disturbed by other processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

import fastbp
from fastbp.bench.machine import DISTURBED_FOREIGN_FRAC, cpu_load, cpu_sample

_RESULTS = pytest.StashKey[list]()
_SESSION_CPU = pytest.StashKey[object]()
_THREAD_INFO = pytest.StashKey[dict]()


# ---- options -------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--threads``."""
    group = parser.getgroup("fastbp benchmarks")
    group.addoption(
        "--threads",
        type=int,
        default=1,
        help="threads for every contender (fastbp, torch, NumPy's BLAS); default 1",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Validate ``--threads`` and set up the per-session stores."""
    threads = config.getoption("--threads")
    if threads < 1:
        raise pytest.UsageError(f"--threads must be >= 1, got {threads}")
    config.stash[_RESULTS] = []
    config.stash[_SESSION_CPU] = cpu_sample()
    config.stash[_THREAD_INFO] = {}


# ---- CPU load: /proc/stat, shared with the report runner (fastbp.bench.machine) ----------------


# ---- threads -------------------------------------------------------------------------------------


def _blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


@pytest.fixture(scope="session", autouse=True)
def bench_threads(request: pytest.FixtureRequest) -> int:
    """Set every contender's thread count to ``--threads`` for the whole session."""
    n = request.config.getoption("--threads")
    torch_before = torch.get_num_threads()
    fastbp.set_num_threads(n)
    torch.set_num_threads(n)
    with threadpool_limits(limits=n, user_api="blas"):
        effective = {
            "fastbp": fastbp.get_num_threads(),
            "torch": torch.get_num_threads(),
            "numpy_blas": _blas_threads(),
        }
        if effective["fastbp"] != n or effective["torch"] != n:
            raise RuntimeError(f"could not set {n} threads: {effective}")
        request.config.stash[_THREAD_INFO] = {"threads": n, "effective_threads": effective}
        yield n
    fastbp.set_num_threads(None)
    torch.set_num_threads(torch_before)


# ---- the benchmark wrapper -----------------------------------------------------------------------


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _rates(seconds: float | None, flops: float | None, nbytes: float | None) -> dict[str, Any]:
    if not seconds:
        return {}
    out: dict[str, Any] = {}
    if flops:
        out["gflops"] = round(flops / seconds / 1e9, 2)
    if nbytes:
        out["gbps"] = round(nbytes / seconds / 1e9, 2)
    return out


@pytest.fixture
def run_benchmark(benchmark, bench_threads: int, request: pytest.FixtureRequest) -> Callable:
    """A function that times ``fn`` in one group and records its ``extra_info``.

    ``run(fn, group=..., contender=..., dtype=..., shape=..., flops=None, nbytes=None,
    rounds=None)``: ``rounds=None`` lets pytest-benchmark calibrate (for calls of a few ms or
    less); an int runs ``benchmark.pedantic`` with that many rounds of one call each after one
    warm-up round (for the big GEMMs, so the suite stays short). ``flops`` / ``nbytes`` are the
    work of one call and give GFLOP/s / GB/s from the median time (``*_best`` from the minimum).
    ``setup`` (with ``rounds``): called untimed before every round, it returns the callable to
    time (``fn`` is then ignored): the training workloads build a fresh model per round.
    ``warmup_rounds`` (default 1) applies with ``rounds``.
    With ``--benchmark-disable`` the call runs once and no rates are recorded.
    """
    config = request.config

    def run(
        fn: Callable[[], object],
        *,
        group: str,
        contender: str,
        dtype: str,
        shape: str,
        flops: float | None = None,
        nbytes: float | None = None,
        rounds: int | None = None,
        setup: Callable[[], Callable[[], object]] | None = None,
        warmup_rounds: int = 1,
        **extra: Any,
    ) -> object:
        benchmark.group = group  # must be set before the first timed call
        info = benchmark.extra_info
        info.update(
            contender=contender,
            threads=bench_threads,
            dtype=dtype,
            shape=shape,
            isa=fastbp.get_config()["isa"],
            flops=flops,
            bytes=nbytes,
            **extra,
        )
        before = cpu_sample()
        if rounds is None:
            result = benchmark(fn)
        elif setup is not None:
            result = benchmark.pedantic(
                lambda call: call(),
                setup=lambda: ((setup(),), {}),
                rounds=rounds,
                iterations=1,
                warmup_rounds=warmup_rounds,
            )
        else:
            result = benchmark.pedantic(
                fn, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds
            )
        info.update(cpu_load(before, cpu_sample()))
        if benchmark.stats is not None:  # None with --benchmark-disable
            stats = benchmark.stats.stats
            info["us_median"] = round(stats.median * 1e6, 3)
            info["us_min"] = round(stats.min * 1e6, 3)
            info.update(_rates(stats.median, flops, nbytes))
            info.update({f"{k}_best": v for k, v in _rates(stats.min, flops, nbytes).items()})
            config.stash[_RESULTS].append(
                {
                    "group": group,
                    "contender": contender,
                    "median": stats.median,
                    "rounds": stats.rounds,
                    "gflops": info.get("gflops"),
                    "gbps": info.get("gbps"),
                    "foreign": info.get("foreign_busy_frac"),
                }
            )
        return result

    return run


# ---- pytest-benchmark hooks: machine info and ratios in the saved JSON ---------------------------


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Save fastbp's configuration, the thread settings and the session's CPU load."""
    config_now = fastbp.get_config()
    config_now.pop("num_threads")  # the session's setting is gone by now; see "threads"
    machine_info["fastbp"] = config_now
    machine_info["torch"] = torch.__version__
    machine_info.update(config.stash.get(_THREAD_INFO, {}))
    machine_info["session_load"] = cpu_load(config.stash.get(_SESSION_CPU, None), cpu_sample())


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: list, output_json: dict
) -> None:
    """Add ``time_vs_fastbp`` (median / fastbp's median in the same group) to each benchmark."""
    fastbp_median = {
        b["group"]: b["stats"]["median"]
        for b in output_json.get("benchmarks", [])
        if b.get("extra_info", {}).get("contender") == "fastbp" and b.get("stats")
    }
    for b in output_json.get("benchmarks", []):
        ref = fastbp_median.get(b["group"])
        if ref and b.get("stats"):
            b["extra_info"]["time_vs_fastbp"] = round(b["stats"]["median"] / ref, 3)


# ---- the summary ---------------------------------------------------------------------------------


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Print medians per group with each peer's time / fastbp's, and the load seen."""
    results = config.stash.get(_RESULTS, [])
    if not results:
        return
    tr = terminalreporter
    threads = config.getoption("--threads")
    tr.write_sep("=", f"fastbp benchmarks: medians, {threads} thread(s)")
    tr.write_line("ratio = contender median / fastbp median (> 1: fastbp is faster)")
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    for group, rows in groups.items():
        base = next((r["median"] for r in rows if r["contender"] == "fastbp"), None)
        tr.write_line(group)
        for r in rows:
            rate = (
                f"{r['gflops']:8.2f} GFLOP/s" if r["gflops"] else f"{r['gbps'] or 0:8.2f} GB/s   "
            )
            ratio = f"{r['median'] / base:6.2f}x" if base else "      -"
            foreign = "  n/a" if r["foreign"] is None else f"{r['foreign']:5.2f}"
            tr.write_line(
                f"    {r['contender']:<14} {_fmt_time(r['median']):>10}  {rate}  {ratio}"
                f"  foreign load {foreign}  rounds {r['rounds']}"
            )
    load = cpu_load(config.stash.get(_SESSION_CPU, None), cpu_sample())
    tr.write_line(
        f"session CPU load: busy {load['cpu_busy_frac']}, foreign (other processes + steal) "
        f"{load['foreign_busy_frac']}, steal {load['steal_frac']} over {load['load_window_s']} s"
    )
    disturbed = [
        r for r in results if r["foreign"] is not None and r["foreign"] > DISTURBED_FOREIGN_FRAC
    ]
    if disturbed:
        tr.write_line(
            f"{len(disturbed)} benchmark(s) ran while other processes used more than "
            f"{DISTURBED_FOREIGN_FRAC:.0%} of the machine; repeat them before trusting them:",
            yellow=True,
        )
        for r in disturbed:
            tr.write_line(f"    {r['group']} / {r['contender']}: foreign {r['foreign']:.2f}")
