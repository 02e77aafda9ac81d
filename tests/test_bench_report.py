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
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert {r["workload"] for r in results["rows"]} == set(QUICK)
    for row in results["rows"]:
        assert set(row["runs"]) == set(CONTENDERS)
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
