"""The training workloads W1-W4 of WORKLOADS.md: fastbp against NumPy, torch and scikit-learn.

The workloads, their data and every contender live in :mod:`fastbp.bench.workloads` (shared
with the report runner ``python -m fastbp.bench``); this module is their pytest-benchmark front
end. One *group* per workload (``train W3-sgd``, ...) holds its contenders side by side, each
run on the same thread count (``--threads``, set in ``conftest.py``):

* ``fastbp``: ``model.fit(..., shuffle=False)`` over the pre-shuffled epochs;
* ``fastbp-step``: ``model.train_step`` in a Python loop over the same batches;
* ``numpy``: a hand-written NumPy MLP (forward, backward, SGD/Adam with torch's rules);
* ``torch``: ``nn.Sequential`` + ``torch.optim`` + a Python loop, as its tutorials write it;
* ``sklearn``: ``MLPClassifier`` with the same net, optimizer and batch size (W3, W4 only).

Every round trains a fresh model from the same initial weights (built untimed); the training
call (all epochs) is timed. Its result is then checked against fastbp's reference run of the
same problem (:func:`fastbp.bench.workloads.check`: final parameters and final float64 loss
within the bounds documented there; sklearn, with its own initial weights and shuffling, only
by its loss's range), so a fast wrong answer fails instead of winning.

With ``--benchmark-disable`` (CI) every benchmark runs once at the ``ci`` size (W2: 20 epochs;
W3: 2,048 samples; W4: 1,024 samples), which keeps the suite to seconds; timed runs do the full
work.
"""

from __future__ import annotations

import pytest

from fastbp.bench.workloads import (
    CONTENDERS,
    WORKLOADS,
    Problem,
    Result,
    check,
    make_problem,
    prepare,
    scaled,
    unavailable_reason,
)

#: Timed rounds per workload (no warm-up round except W1's, which takes milliseconds): the
#: big ones take seconds to a minute per round, so three rounds and their median.
ROUNDS = {"W1": 20, "W2": 3, "W3-sgd": 3, "W3-adam": 3, "W4": 3}
WARMUP = {"W1": 1}

_cache: dict[tuple[str, str], tuple[Problem, Result]] = {}


def _problem_and_reference(key: str, scale: str) -> tuple[Problem, Result]:
    """The problem and fastbp's reference result (untimed), kept for one workload at a time:
    the parameters below run a workload's contenders back to back."""
    if (key, scale) not in _cache:
        _cache.clear()  # W3/W4 data is ~190 MB: hold one workload's
        problem = make_problem(scaled(WORKLOADS[key], scale))
        _cache[(key, scale)] = (problem, prepare("fastbp", problem)())
    return _cache[(key, scale)]


@pytest.mark.parametrize(
    ("key", "contender"),
    [pytest.param(k, c, id=f"{k}-{c}") for k in WORKLOADS for c in CONTENDERS],
)
def test_workload(
    run_benchmark, benchmark, request: pytest.FixtureRequest, key: str, contender: str
) -> None:
    """Train workload ``key`` with ``contender``: timed, then checked against fastbp's run."""
    scale = "ci" if request.config.getoption("benchmark_disable") else "full"
    workload = scaled(WORKLOADS[key], scale)
    reason = unavailable_reason(contender, workload)
    if reason is not None:
        pytest.skip(reason)
    problem, reference = _problem_and_reference(key, scale)
    result = run_benchmark(
        None,
        group=f"train {key}",
        contender=contender,
        dtype="float32",
        shape="-".join(map(str, workload.sizes)) + f" batch {workload.batch_size}",
        flops=workload.flops,
        rounds=ROUNDS[key],
        warmup_rounds=WARMUP.get(key, 0),
        setup=lambda: prepare(contender, problem),
        scale=scale,
        steps=workload.steps,
        samples=workload.samples,
        data=problem.data_source,
    )
    assert isinstance(result, Result)
    deviations = check(problem, reference, result, contender)  # raises WrongResult
    info = benchmark.extra_info
    info.update({f"check_{k}": v for k, v in deviations.items()})
    if benchmark.stats is not None:  # timed mode
        median = benchmark.stats.stats.median
        info["us_per_step"] = round(median / workload.steps * 1e6, 3)
        info["samples_per_s"] = round(workload.samples / median, 1)
