"""Smoke test of the report runner: ``python -m fastbp.bench --quick --smoke`` in a subprocess
(every workload shrunk to a few steps) writes the markdown table, the chart and the JSON."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from fastbp.bench.workloads import CONTENDERS, QUICK


def test_quick_report_writes_table_and_chart(tmp_path: pathlib.Path) -> None:
    """Every quick workload gets a row with fastbp's time, the checks pass (exit status 0),
    and report.png is a PNG (or, without matplotlib, the run says so instead of failing)."""
    out = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastbp.bench",
            "--quick",
            "--smoke",
            "--threads",
            "1",
            "--repeat",
            "2",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "machine:" in proc.stdout
    table = (out / "report.md").read_text(encoding="utf-8")
    header = next(line for line in table.splitlines() if line.startswith("| benchmark |"))
    assert "fastbp (fit)" in header and "numpy / fastbp" in header
    rows = [line for line in table.splitlines() if line.startswith("| W")]
    for key in QUICK:
        row = next((r for r in rows if r.startswith(f"| {key}, 1 thread |")), None)
        assert row is not None, f"no row for {key}:\n{table}"
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1].endswith("s"), row  # fastbp's median time, e.g. "1.2 ms"
        assert "FAILED" not in row, row
    # one more, profiled, fit per workload: per-op times for the big networks, whole fused
    # steps for the tiny ones
    assert "## Where fastbp's step goes" in table
    assert "| W3-sgd, 1 thread | Linear(784, 256) + ReLU |" in table
    # the measured multiply-add peak, and each rate as a share of it
    assert "multiply-add peak of fastbp's" in table and "GFLOP/s at 1 thread" in table
    assert "| of FMA peak |" in table
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    peak = results["fma_peak_gflops"]["1"]
    assert peak > 0
    assert {r["workload"] for r in results["rows"]} == set(QUICK)
    for row in results["rows"]:
        assert set(row["runs"]) == set(CONTENDERS)
        fit = row["runs"]["fastbp"]
        assert fit["of_fma_peak"] == pytest.approx(fit["gflops"] / peak)
        assert len(row["runs"]["fastbp"]["times"]) == 2
        assert row["runs"]["fastbp"]["time_vs_fastbp"] == pytest.approx(1.0)
        profile = row["profile"]
        assert profile["steps"] == row["steps"], row["workload"]
        if row["workload"].startswith("W3"):
            names = [op["name"] for op in profile["ops"]]
            assert names == [
                "Linear(784, 256) + ReLU",
                "Linear(256, 128) + ReLU",
                "Linear(128, 10)",
            ]
            assert all(op["forward_us"] > 0 and op["grad_weights_us"] > 0 for op in profile["ops"])
        else:  # W1, W2: the fused small-network step
            assert profile["fused_step_us"] > 0 and profile["ops"][0]["forward_us"] is None
        # the step's matrix products alone: W3's (W1's and W2's are too small to time)
        products = row["products"]
        if not row["workload"].startswith("W3"):
            assert products is None, row["workload"]
            continue
        assert products["network"] == "784-256-128-10, batch 128"
        assert [p["name"] for p in products["products"]] == [
            "L1 forward", "L1 weight gradient", "L2 forward", "L2 weight gradient",
            "L2 input gradient", "L3 forward", "L3 weight gradient", "L3 input gradient",
        ]  # fmt: skip
        assert "fastbp" in products["contenders"]
        for p in products["products"]:
            assert set(p["us"]) == set(products["contenders"]) and min(p["us"].values()) > 0
            assert p["us"][p["fastest"]] == min(p["us"].values())
        best = products["best_workload_seconds"]
        assert 0 < best <= min(products["workload_seconds"].values())
        assert products["fit_over_best"] == pytest.approx(row["runs"]["fastbp"]["median"] / best)
    assert "## Matrix products alone" in table
    assert "| 784-256-128-10, batch 128, 1 thread | L1 forward | 128x256x784 |" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in proc.stdout
    else:
        assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_reported(tmp_path: pathlib.Path) -> None:
    """A bad --threads value is an argparse error (status 2, a message, no traceback)."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastbp.bench", "--threads", "0", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--threads must be >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "threads,min_flops,expected",
    [(2, 0.0, "every run"), (1, 0.0, "none"), (2, float("inf"), "none")],
)
def test_parallel_runs_wait_for_idle_thread_pools(monkeypatch, threads, min_flops, expected):
    """Before each timed run of a parallel workload (threads > 1, enough flops), and before the
    profiled fit after them, the runner waits for the previous contender's spinning thread
    pools; on one thread, or for a tiny workload, it does not wait."""
    from fastbp.bench import report

    calls = []
    monkeypatch.setattr(report, "_settle", lambda: calls.append(1))
    monkeypatch.setattr(report, "_SETTLE_MIN_FLOPS", min_flops)
    row = report._run_workload("W1", threads, 1, "smoke", lambda *_: None)
    timed = sum(len(run.times) for run in row.runs.values())
    assert timed >= 2  # fastbp and at least one peer ran
    assert row.profile is not None
    assert len(calls) == (timed + 1 if expected == "every run" else 0)


def test_step_products_are_the_steps_gemms() -> None:
    """A layer's forward and weight gradient, and its input gradient for all but the first,
    in torch's weight layout; their flops are the step's (workloads.step_flops)."""
    from fastbp.bench.products import Product, step_products
    from fastbp.bench.workloads import step_flops

    got = step_products((784, 256, 10), 128)
    assert got == [
        Product("L1 forward", 128, 256, 784, trans_b=True),
        Product("L1 weight gradient", 256, 784, 128, trans_a=True),
        Product("L2 forward", 128, 10, 256, trans_b=True),
        Product("L2 weight gradient", 10, 256, 128, trans_a=True),
        Product("L2 input gradient", 128, 256, 10),
    ]
    for sizes, batch in [((784, 256, 128, 10), 128), ((784, 1024, 1024, 10), 256), ((3, 1), 7)]:
        assert sum(p.flops for p in step_products(sizes, batch)) == step_flops(sizes, batch)
    for sizes, batch in [((784,), 128), ((784, 10), 0), ((784, 0, 10), 128)]:
        with pytest.raises(ValueError):
            step_products(sizes, batch)


def test_time_products_times_each_gemm_and_keeps_the_fastest() -> None:
    """Every requested contender gets a positive time per product (odd shapes, both
    transposes), the fastest per product is the minimum, and the step's best is their sum."""
    from fastbp.bench.products import Product, time_products

    products = [Product("a", 7, 33, 5, trans_b=True), Product("b", 33, 7, 257, trans_a=True)]
    contenders = ("fastbp", "numpy")
    timed = time_products(products, contenders, rounds=3, round_seconds=1e-4)
    assert set(timed.seconds) == set(contenders)
    for c in contenders:
        assert len(timed.seconds[c]) == 2 and min(timed.seconds[c]) > 0
        assert timed.per_step(c) == pytest.approx(sum(timed.seconds[c]))
    for i in range(2):
        assert timed.seconds[timed.fastest(i)][i] == min(t[i] for t in timed.seconds.values())
    assert timed.best_per_step() == pytest.approx(
        sum(min(t[i] for t in timed.seconds.values()) for i in range(2))
    )
    # with settle (more than one thread): each contender's rounds back to back, after a settle
    settles = []
    timed = time_products(products, contenders, 2, 1e-4, settle=lambda: settles.append(1))
    assert len(settles) == len(products) * len(contenders)
    assert all(min(timed.seconds[c]) > 0 for c in contenders)
    with pytest.raises(ValueError, match="contenders"):
        time_products(products, ("fastbp", "cublas"))
    with pytest.raises(ValueError, match="rounds"):
        time_products(products, rounds=0)


def test_a_contender_not_installed_is_left_out(monkeypatch) -> None:
    """Without torch its GEMM has no times, and the fastest per product is among the rest."""
    import sys

    from fastbp.bench.products import Product, time_products

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    timed = time_products([Product("a", 7, 9, 5)], ("fastbp", "torch"), rounds=1)
    assert timed.seconds["torch"] is None and timed.per_step("torch") is None
    assert timed.fastest(0) == "fastbp"
    assert timed.best_per_step() == timed.per_step("fastbp") > 0


def test_a_wrong_gemm_is_not_timed(monkeypatch) -> None:
    """A contender whose product is off by more than float32 rounding stops the timing."""
    from fastbp.bench import products as prod

    real = prod.ops.gemm

    def slightly_wrong(a, b, **kw):
        out = real(a, b, **kw)
        out[0, 0] += 1e-4  # the bound for k = 3 terms in [-1, 1]: under 3 * 3 * 2^-24 = 5e-7
        return out

    monkeypatch.setattr(prod.ops, "gemm", slightly_wrong)
    with pytest.raises(RuntimeError, match="outside float rounding"):
        prod.time_products([prod.Product("a", 9, 9, 3)], ("fastbp",), rounds=1)


@pytest.mark.parametrize(
    "blas,expected",
    [
        ([2, 2], ("fastbp", "numpy", "torch")),
        ([2, 4], ("fastbp", "torch")),
        ([], ("fastbp", "torch")),
        ("not limited (threadpoolctl is not installed)", ("fastbp", "torch")),
    ],
)
def test_numpy_gemm_is_timed_only_when_held_to_the_thread_count(blas, expected) -> None:
    """NumPy's BLAS would use every core unless threadpoolctl holds it to the row's count."""
    from fastbp.bench import report

    assert report._gemm_contenders({"fastbp": 2, "torch": 2, "numpy_blas": blas}, 2) == expected


def test_suite_keeps_the_higher_fma_peak(monkeypatch) -> None:
    """The suite probes the FMA peak before and after each thread count's workloads and keeps
    the higher (a disturbed probe only lowers it), settling the thread pools first whenever
    the probe runs on more than one thread."""
    from fastbp.bench import report

    probes = iter([100.0, 150.0, 400.0, 300.0])
    events = []
    monkeypatch.setattr(report, "_settle", lambda: events.append("settle"))

    def fake_peak(threads: int) -> float:
        events.append(f"probe {threads}")
        return next(probes)

    monkeypatch.setattr(report, "fma_peak", fake_peak)
    suite = report.run_suite([], [1, 2], 1, scale="smoke", log=lambda *_: None)
    assert suite.fma_peak_gflops == {1: 150.0, 2: 400.0}
    two = int(suite.effective_threads[2]["fastbp"])  # 1 on a one-core machine
    parallel = ["settle", f"probe {two}"] if two > 1 else [f"probe {two}"]
    assert events == ["probe 1", "probe 1", *parallel, *parallel]
