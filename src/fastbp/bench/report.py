"""The report runner behind ``python -m fastbp.bench``: time every contender on every workload,
check each against fastbp, and write a markdown table and a PNG chart.

Timing: for each thread count and workload the contenders run **interleaved** (fastbp,
fastbp-step, numpy, torch, sklearn, fastbp, fastbp-step, ...) for ``repeat`` rounds, each run a
fresh model from the same initial weights; the median of the rounds is reported, so slow drifts
of a shared machine hit every contender alike and one disturbed round does not count. Model and
optimizer construction are not timed; the training call (all epochs) is. There is no warm-up
round: the median over the rounds absorbs a slow first one. The machine's load during each
workload is read from /proc/stat (:mod:`fastbp.bench.machine`).
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .machine import (
    DISTURBED_FOREIGN_FRAC,
    cpu_load,
    cpu_sample,
    fma_peak,
    machine_summary,
    thread_limits,
)
from .products import GEMM_CONTENDERS, step_products, time_products
from .workloads import (
    CONTENDERS,
    WORKLOADS,
    Unavailable,
    Workload,
    WrongResult,
    check,
    make_problem,
    prepare,
    profile_fit,
    scaled,
    step_flops,
    unavailable_reason,
)

__all__ = ["BenchRow", "Suite", "run_suite", "write_chart", "write_markdown", "write_report"]

REFERENCE = CONTENDERS[0]  # fastbp's fit: the reference result and the ratios' denominator
LABELS = {
    "fastbp": "fastbp (fit)",
    "fastbp-step": "fastbp (train_step loop)",
    "numpy": "NumPy (hand-written)",
    "torch": "torch (tutorial loop)",
    "sklearn": "sklearn MLPClassifier",
}


@dataclass
class ContenderRun:
    """One contender on one workload: its times per round, its check, or why it did not run."""

    times: list[float] = field(default_factory=list)
    check: dict[str, float | None] | None = None
    skipped: str | None = None
    error: str | None = None

    @property
    def median(self) -> float | None:
        """Median seconds over the rounds (None if it never completed one)."""
        return statistics.median(self.times) if self.times and self.error is None else None


@dataclass
class BenchRow:
    """One benchmark: a workload at a thread count, with every contender's run."""

    workload: str
    threads: int
    steps: int
    samples: int
    flops: float
    data_source: str
    description: str
    runs: dict[str, ContenderRun]
    load: dict[str, float | None]
    #: fastbp fit's per-op times from one more, profiled, run (see _profile_row); None when
    #: fastbp did not complete its rounds
    profile: dict[str, object] | None = None
    #: the step's matrix products timed alone (see _products_row); None for a tiny network
    products: dict[str, object] | None = None

    @property
    def name(self) -> str:
        """The row label, e.g. ``W3-sgd, 2 threads``."""
        return f"{self.workload}, {self.threads} thread{'s' if self.threads > 1 else ''}"

    def ratio(self, contender: str) -> float | None:
        """``contender``'s median time / fastbp's (above 1: fastbp is faster)."""
        mine, ref = self.runs[contender].median, self.runs[REFERENCE].median
        return mine / ref if mine is not None and ref else None


@dataclass
class Suite:
    """Everything a report shows: the machine, the settings, the rows."""

    machine: dict[str, object]
    mode: str
    scale: str
    repeat: int
    threads: list[int]
    effective_threads: dict[int, dict[str, object]]
    rows: list[BenchRow]
    versions: dict[str, str]
    load: dict[str, float | None]
    #: thread count -> fastbp's measured float32 multiply-add peak there, GFLOP/s (fma_peak)
    fma_peak_gflops: dict[int, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        """``workload / contender: message`` for every failed check or error."""
        return [
            f"{row.name} / {c}: {run.error}"
            for row in self.rows
            for c, run in row.runs.items()
            if run.error
        ]


def _versions() -> dict[str, str]:
    import fastbp

    out = {"fastbp": fastbp.__version__, "numpy": np.__version__}
    for name, module in (("torch", "torch"), ("sklearn", "sklearn"), ("matplotlib", "matplotlib")):
        try:
            out[name] = __import__(module).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def run_suite(
    keys: Sequence[str],
    threads: Sequence[int],
    repeat: int,
    scale: str = "full",
    mode: str = "custom",
    log: Callable[[str], None] = print,
) -> Suite:
    """Run workloads ``keys`` at every thread count in ``threads``, ``repeat`` interleaved
    rounds each, at ``scale`` (see :func:`fastbp.bench.workloads.scaled`). A contender whose
    result fails its check is reported as failed and dropped from that workload's later
    rounds; one whose library is missing is skipped with the reason."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    suite_before = cpu_sample()
    rows: list[BenchRow] = []
    effective: dict[int, dict[str, object]] = {}
    peaks: dict[int, float] = {}
    for n in threads:
        with thread_limits(n) as eff:
            effective[n] = eff
            peaks[n] = _fma_peak(int(eff["fastbp"]))
            gemms = _gemm_contenders(eff, n)
            products: dict[tuple, dict[str, object]] = {}  # W3's SGD and Adam rows share one
            for key in keys:
                rows.append(_run_workload(key, n, repeat, scale, log, gemms, products))
            peaks[n] = max(peaks[n], _fma_peak(int(eff["fastbp"])))
    return Suite(
        machine=machine_summary(),
        mode=mode,
        scale=scale,
        repeat=repeat,
        threads=list(threads),
        effective_threads=effective,
        rows=rows,
        versions=_versions(),
        load=cpu_load(suite_before, cpu_sample()),
        fma_peak_gflops=peaks,
    )


# Before each timed run of a parallel workload, wait for the previous contender's idle thread
# pools to stop spinning: OpenBLAS's and torch's busy-wait for a while after each call, on the
# cores the next contender needs (W3 at 2 threads: fastbp 304-335 ms measured right after them,
# 228 ms after the wait; torch 511 -> 434 ms). Not for the tiny workloads, which run on one
# thread whatever the setting: there the wait only cooled the caches (W1 197 -> 356 us).
_SETTLE_SECONDS = 0.3
_SETTLE_MIN_FLOPS = 1e9


def _fma_peak(threads: int) -> float:
    """fma_peak at ``threads``, after the last contender's pools stop spinning when more than
    one thread runs. The suite measures it before and after each thread count's workloads and
    keeps the higher (a disturbed probe only lowers it): a single probe, a quarter of a second,
    once gave 347 GFLOP/s for two threads where the run before had 467, and every two-thread
    rate of that report was a share of the low peak (W3 at "95%")."""
    if threads > 1:
        _settle()
    return fma_peak(threads)


def _settle() -> None:
    """Busy-wait _SETTLE_SECONDS on this thread, so that its core stays awake and clocked up
    (a sleep let it drop into an idle state)."""
    end = time.perf_counter() + _SETTLE_SECONDS
    while time.perf_counter() < end:
        pass


# The step's products are timed alone (fastbp.bench.products) for networks whose step is at least
# this many flops (W3: 1.3e8, W4: 2.5e9; W1 and W2, a few hundred, are all overhead), in this
# many rounds per product (the smoke size: a few).
_PRODUCTS_MIN_STEP_FLOPS = 1e7
_PRODUCTS_ROUNDS = {"full": 9, "ci": 5, "smoke": 2}


def _gemm_contenders(effective: dict[str, object], n: int) -> tuple[str, ...]:
    """The GEMMs the products are timed with at ``n`` threads: NumPy's only when its BLAS is
    held to ``n`` threads (threadpoolctl), else it would run on every core."""
    blas = effective.get("numpy_blas")
    numpy_held = isinstance(blas, list) and bool(blas) and all(t == n for t in blas)
    return tuple(c for c in GEMM_CONTENDERS if c != "numpy" or numpy_held)


def _products_row(workload: Workload, threads: int, scale: str, gemms: Sequence[str]):
    """The workload's products alone, for the whole workload (samples / batch steps)."""
    timed = time_products(
        step_products(workload.sizes, workload.batch_size),
        gemms,
        _PRODUCTS_ROUNDS[scale],
        settle=_settle if threads > 1 else None,
    )
    steps = workload.samples / workload.batch_size
    per_step = {c: timed.per_step(c) for c in timed.seconds}
    best = timed.best_per_step()
    return {
        "network": "-".join(map(str, workload.sizes)) + f", batch {workload.batch_size}",
        "contenders": [c for c, t in timed.seconds.items() if t is not None],
        "products": [
            {
                "name": p.name,
                "shape": p.shape,
                "flops": p.flops,
                "us": {c: t[i] * 1e6 for c, t in timed.seconds.items() if t is not None},
                "fastest": timed.fastest(i),
            }
            for i, p in enumerate(timed.products)
        ],
        "per_step_us": {c: v * 1e6 for c, v in per_step.items() if v is not None},
        "best_per_step_us": best * 1e6,
        "workload_seconds": {c: v * steps for c, v in per_step.items() if v is not None},
        "best_workload_seconds": best * steps,
    }


def _run_workload(
    key: str,
    threads: int,
    repeat: int,
    scale: str,
    log,
    gemms: Sequence[str] = ("fastbp", "torch"),
    product_cache: dict[tuple, dict[str, object]] | None = None,
) -> BenchRow:
    workload = scaled(WORKLOADS[key], scale)
    problem = make_problem(workload)
    runs = {c: ContenderRun(skipped=unavailable_reason(c, workload)) for c in CONTENDERS}
    active = [c for c in CONTENDERS if runs[c].skipped is None]
    log(f"{key} at {threads} thread(s): {workload.steps} steps, {', '.join(active)}")
    reference = None
    before = cpu_sample()
    for _ in range(repeat):
        for c in list(active):
            run = runs[c]
            try:
                train = prepare(c, problem)
                if threads > 1 and workload.flops >= _SETTLE_MIN_FLOPS:
                    _settle()
                t0 = time.perf_counter()
                result = train()
                elapsed = time.perf_counter() - t0
                if reference is None:  # fastbp's first round: the reference result
                    reference = result
                run.check = check(problem, reference, result, c)
            except Unavailable as exc:
                run.skipped = str(exc)
            except WrongResult as exc:
                run.error = f"wrong result: {exc}"
            except Exception as exc:  # a contender's crash is reported, not fatal
                run.error = f"{type(exc).__name__}: {exc}"
            else:
                run.times.append(elapsed)
                continue
            active.remove(c)
            if c == REFERENCE:  # nothing to check against: stop this workload
                active.clear()
                break
    profile = None
    if runs[REFERENCE].median is not None:
        try:
            if threads > 1 and workload.flops >= _SETTLE_MIN_FLOPS:
                _settle()  # the last contender's pools spin on the cores (see _SETTLE_SECONDS)
            profile = _profile_row(profile_fit(problem))
        except Exception as exc:  # the report still has the timed rounds
            log(f"    profile failed: {type(exc).__name__}: {exc}")
    products = None
    if len(workload.sizes) > 2 and (
        step_flops(workload.sizes, workload.batch_size) >= _PRODUCTS_MIN_STEP_FLOPS
    ):
        cache_key = (workload.sizes, workload.batch_size, workload.samples, tuple(gemms))
        timed = product_cache.get(cache_key) if product_cache is not None else None
        if timed is None:
            try:
                timed = _products_row(workload, threads, scale, gemms)
            except Exception as exc:  # the report still has the timed rounds
                log(f"    products failed: {type(exc).__name__}: {exc}")
            else:
                if product_cache is not None:
                    product_cache[cache_key] = timed
        if timed is not None:  # against this row's own fit
            fit = runs[REFERENCE].median
            best = timed["best_workload_seconds"]
            products = {**timed, "fit_over_best": fit / best if fit else None}
    row = BenchRow(
        workload=key,
        threads=threads,
        steps=workload.steps,
        samples=workload.samples,
        flops=workload.flops,
        data_source=problem.data_source,
        description=workload.description,
        runs=runs,
        load=cpu_load(before, cpu_sample()),
        profile=profile,
        products=products,
    )
    for c, run in runs.items():
        if run.median is not None:
            ratio = row.ratio(c)
            log(f"    {c:<12} {_fmt_time(run.median):>9}  x{ratio:.2f}" if ratio else c)
        elif run.error or run.skipped:
            log(f"    {c:<12} {run.error or 'skipped: ' + str(run.skipped)}")
    return row


def _profile_row(prof) -> dict[str, object]:
    """A Profile as plain data for the report: microseconds per pass of each op's phases."""

    def us(seconds: float, calls: int) -> float | None:
        return seconds / calls * 1e6 if calls else None

    return {
        "ops": [
            {
                "name": op.name,
                "forward_us": us(op.forward, prof.forwards),
                "grad_input_us": us(op.grad_input, prof.backwards),
                "grad_weights_us": us(op.grad_weights, prof.backwards),
            }
            for op in prof.ops
        ],
        "loss_us": us(prof.loss, prof.losses),
        "update_us": us(prof.update, prof.updates),
        "batch_us": us(prof.batches, prof.batch_count),
        "fused_step_us": us(prof.fused_steps, prof.fused_step_count),
        "steps": prof.updates + prof.fused_step_count,
        "total_s": prof.total,
    }


# ---- output -------------------------------------------------------------------------------------


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _cell(run: ContenderRun) -> str:
    if run.error:
        return "**FAILED**"
    if run.skipped:
        return "skipped"
    return _fmt_time(run.median) if run.median is not None else "-"


def _us(value: float | None) -> str:
    return "-" if not value else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def _frac(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def write_markdown(suite: Suite, path: pathlib.Path) -> None:
    """Write the report's markdown: machine, medians and ratios, rates, checks, notes."""
    contenders = [c for c in CONTENDERS if any(r.runs[c].skipped is None for r in suite.rows)]
    peers = [c for c in contenders if c != REFERENCE]
    m = suite.machine
    lines = [
        "# fastbp training benchmarks",
        "",
        f"- machine: {m['cpu']}, {m['cores']} logical cores ({m['usable_cores']} usable)",
        f"- fastbp {m['fastbp']}, kernels: {m['isa']}; "
        + ", ".join(f"{k} {v}" for k, v in suite.versions.items() if k != "fastbp"),
        f"- mode: {suite.mode} (scale {suite.scale}), median of {suite.repeat} interleaved "
        f"round(s); threads {', '.join(map(str, suite.threads))}",
    ]
    for n, eff in suite.effective_threads.items():
        lines.append(f"- threads in effect at {n}: {eff}")
    if suite.fma_peak_gflops:
        lines.append(
            f"- float32 multiply-add peak of fastbp's {m['isa']} kernels, measured "
            "(`fastbp.bench.machine.fma_peak`: the GEMM micro-kernel's arithmetic without loads, "
            "the higher of a probe before and one after each thread count's workloads): "
            + ", ".join(
                f"{gf:.0f} GFLOP/s at {n} thread{'s' if n > 1 else ''}"
                for n, gf in suite.fma_peak_gflops.items()
            )
        )
    lines += [
        f"- machine load over the run: busy {_frac(suite.load['cpu_busy_frac'])}, foreign "
        f"(other processes + steal) {_frac(suite.load['foreign_busy_frac'])}",
        "",
        "## Median time per workload",
        "",
        "Ratio = peer's median time / fastbp (fit)'s median time: above 1, fastbp is faster.",
        "",
    ]
    head = (
        ["benchmark"]
        + [LABELS[c] for c in contenders]
        + [f"{c} / fastbp" for c in peers]
        + ["foreign load"]
    )
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in suite.rows:
        ratios = [row.ratio(c) for c in peers]
        cells = (
            [row.name]
            + [_cell(row.runs[c]) for c in contenders]
            + [f"{r:.2f}" if r is not None else "-" for r in ratios]
            + [_frac(row.load["foreign_busy_frac"])]
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Rates",
        "",
        "µs per optimizer step, samples per second and GFLOP/s (a step costs "
        "6·B·Σ(in·out) − 2·B·in₀·out₀ flops), from the median time; *of FMA peak*: that "
        "rate over the measured multiply-add peak at the row's thread count (above).",
        "",
        "| benchmark | contender | µs/step | samples/s | GFLOP/s | of FMA peak |",
        "|---|---|---|---|---|---|",
    ]
    for row in suite.rows:
        peak = suite.fma_peak_gflops.get(row.threads)
        for c in contenders:
            med = row.runs[c].median
            if med is None:
                continue
            gflops = row.flops / med / 1e9
            share = f"{gflops / peak:.0%}" if peak else "-"
            lines.append(
                f"| {row.name} | {LABELS[c]} | {med / row.steps * 1e6:.1f} | "
                f"{row.samples / med:,.0f} | {gflops:.2f} | {share} |"
            )
    lines += [
        "",
        "## Checks against fastbp (fit)",
        "",
        "Same initial weights and batches: final parameters (largest and 99th-percentile "
        "|difference|) and the final float64 loss on an evaluation set. sklearn draws its own "
        "initial weights and batch order, so only its loss's range is checked.",
        "",
        "| benchmark | contender | final loss | loss rel. diff | param max | param p99 |",
        "|---|---|---|---|---|---|",
    ]

    def g(v: float | None) -> str:
        return "-" if v is None else f"{v:.3g}"

    for row in suite.rows:
        for c in contenders:
            ch = row.runs[c].check
            if ch is not None and row.runs[c].error is None:
                lines.append(
                    f"| {row.name} | {c} | {ch['loss']:.6g} | {g(ch['loss_rel'])} | "
                    f"{g(ch['param_max'])} | {g(ch['param_p99'])} |"
                )
    profiled = [row for row in suite.rows if row.profile]
    if profiled:
        lines += [
            "",
            "## Where fastbp's step goes",
            "",
            "`Sequential.profile` over one more `fit` of each workload (not a timed round): "
            "µs per pass of each op of the C plan. A Linear's weight gradient includes its "
            "activation backward and, with plain SGD, the update fused into the product; "
            "networks small enough for the fused one-kernel step are timed per step whole.",
            "",
            "| benchmark | op | forward | input gradient | weight gradient |",
            "|---|---|---|---|---|",
        ]
        for row in profiled:
            p = row.profile
            for op in p["ops"]:
                if not (op["forward_us"] or op["grad_input_us"] or op["grad_weights_us"]):
                    continue  # a fused small-network step has no per-op times
                lines.append(
                    f"| {row.name} | {op['name']} | {_us(op['forward_us'])} | "
                    f"{_us(op['grad_input_us'])} | {_us(op['grad_weights_us'])} |"
                )
            rest = [("loss", p["loss_us"]), ("update pass", p["update_us"])]
            rest += [("batch copy", p["batch_us"]), ("fused step", p["fused_step_us"])]
            cells = ", ".join(f"{name} {_us(v)}" for name, v in rest if v)
            lines.append(f"| {row.name} | per call: {cells} | | | |")
    lines += _products_markdown(suite)
    lines += ["", "## Workloads", ""]
    seen = set()
    for row in suite.rows:
        if row.workload not in seen:
            seen.add(row.workload)
            lines.append(
                f"- **{row.workload}**: {row.description}; {row.steps} steps; data: "
                f"{row.data_source}"
            )
    notes = sorted(
        {
            f"{c}: {row.runs[c].skipped}"
            for row in suite.rows
            for c in CONTENDERS
            if row.runs[c].skipped
        }
    )
    disturbed = [
        row.name
        for row in suite.rows
        if (row.load["foreign_busy_frac"] or 0) > DISTURBED_FOREIGN_FRAC
    ]
    if notes or disturbed or suite.failed:
        lines += ["", "## Notes", ""]
        lines += [f"- skipped {n}" for n in notes]
        if disturbed:
            lines.append(
                f"- other processes used more than {DISTURBED_FOREIGN_FRAC:.0%} of the machine "
                f"during: {', '.join(disturbed)}; repeat before trusting those rows"
            )
        lines += [f"- FAILED {f}" for f in suite.failed]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _products_markdown(suite: Suite) -> list[str]:
    """The "Matrix products alone" section: per benchmark, the workload's products at each
    GEMM's speed and at the fastest one's for each shape, against fastbp's fit; then each
    product, once per network shape and thread count."""
    rows = [row for row in suite.rows if row.products]
    if not rows:
        return []
    gemms = [c for c in GEMM_CONTENDERS if any(c in r.products["contenders"] for r in rows)]
    lines = [
        "",
        "## Matrix products alone",
        "",
        "Each GEMM of a training step (every Linear's forward and weight gradient, the input "
        "gradient of all but the first) timed alone, on 64-byte aligned operands that stay in "
        "cache between calls, with each library's GEMM; *fastest* keeps the fastest library "
        "for each shape. Times are for the whole workload (samples / batch steps), like the "
        "first table's: a fit can only take less than *fastest* with a faster matrix product "
        "than any of these libraries has here, before the activations, loss, update and the "
        "batch's trip from memory add theirs.",
        "",
    ]
    head = ["benchmark", "fastbp (fit)"]
    head += [f"{c} GEMMs" for c in gemms] + ["fastest", "fit / fastest"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        p = row.products
        fit = row.runs[REFERENCE].median
        cells = [row.name, _fmt_time(fit) if fit else "-"]
        cells += [
            _fmt_time(p["workload_seconds"][c]) if c in p["workload_seconds"] else "-"
            for c in gemms
        ]
        ratio = p["fit_over_best"]
        cells += [_fmt_time(p["best_workload_seconds"]), f"{ratio:.2f}" if ratio else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "µs per call (GFLOP/s of the fastest):",
        "",
        "| network | product | m x n x k | " + " | ".join(gemms) + " | fastest |",
        "|---|---|---|" + "---|" * len(gemms) + "---|",
    ]
    shown = set()
    for row in rows:
        network = f"{row.products['network']}, {row.threads} thread{'s' if row.threads > 1 else ''}"
        if network in shown:  # W3's SGD and Adam rows: the same products
            continue
        shown.add(network)
        for prod in row.products["products"]:
            us = prod["us"]
            best = us[prod["fastest"]]
            cells = [network, prod["name"], prod["shape"]]
            cells += [f"{us[c]:.1f}" if c in us else "-" for c in gemms]
            cells.append(f"{prod['fastest']} ({prod['flops'] / best / 1e3:.0f})")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_chart(suite: Suite, path: pathlib.Path) -> str | None:
    """Write a bar chart of each peer's time / fastbp's per benchmark (log scale when the
    ratios span more than a factor 20). Returns None, or a message when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart written (pip install matplotlib)"
    peers = [
        c for c in CONTENDERS if c != REFERENCE and any(r.ratio(c) is not None for r in suite.rows)
    ]
    names = [row.name for row in suite.rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(names) + 2), 4.8), layout="constrained")
    width = 0.8 / max(len(peers), 1)
    ratios_seen: list[float] = []
    for i, c in enumerate(peers):
        values = [row.ratio(c) or 0.0 for row in suite.rows]
        ratios_seen += [v for v in values if v > 0]
        xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, values, width, label=LABELS[c])
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    if ratios_seen and max([*ratios_seen, 1.0]) / min([*ratios_seen, 1.0]) > 20:
        ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("time / fastbp (fit) time  (above 1: fastbp faster)")
    ax.set_title(f"fastbp training benchmarks ({suite.machine['cpu']}, {suite.machine['isa']})")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_report(suite: Suite, output: pathlib.Path) -> dict[str, pathlib.Path | str]:
    """Write ``report.md``, ``report.png`` and ``results.json`` into ``output``; return their
    paths (and ``chart_message`` when the chart could not be drawn)."""
    output.mkdir(parents=True, exist_ok=True)
    written: dict[str, pathlib.Path | str] = {"markdown": output / "report.md"}
    write_markdown(suite, output / "report.md")
    message = write_chart(suite, output / "report.png")
    if message is None:
        written["chart"] = output / "report.png"
    else:
        written["chart_message"] = message
    data = asdict(suite)
    data["effective_threads"] = {str(k): v for k, v in suite.effective_threads.items()}
    for row, raw in zip(suite.rows, data["rows"], strict=True):
        for c, run in row.runs.items():
            med = run.median
            raw["runs"][c]["median"] = med
            raw["runs"][c]["time_vs_fastbp"] = row.ratio(c)
            if med:
                raw["runs"][c]["us_per_step"] = med / row.steps * 1e6
                raw["runs"][c]["samples_per_s"] = row.samples / med
                gflops = raw["runs"][c]["gflops"] = row.flops / med / 1e9
                peak = suite.fma_peak_gflops.get(row.threads)
                if peak:
                    raw["runs"][c]["of_fma_peak"] = gflops / peak
    (output / "results.json").write_text(
        json.dumps(data, indent=1, default=_json_default), encoding="utf-8"
    )
    written["json"] = output / "results.json"
    return written


def _json_default(value: object) -> object:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
