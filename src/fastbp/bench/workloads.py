"""The training workloads of WORKLOADS.md (W1-W4) and the contenders that run them.

One implementation for both front ends: ``python -m fastbp.bench`` (the report runner, which
works from an installed package) and the pytest-benchmark suite in the repository's ``bench/``.

A :class:`Workload` is a fixed problem (net, loss, optimizer, batch size, epochs, data);
:func:`make_problem` turns it into a :class:`Problem`: the data **already in batch order**
(each epoch's permutation is applied up front, so no contender shuffles inside the timed
region and all of them see the same batches in the same order) and one set of initial weights
(fastbp's torch-style init, copied into every contender). Contenders:

* ``fastbp``: ``model.fit(X, y, ..., shuffle=False)``, whole epochs in C;
* ``fastbp-step``: ``model.train_step(xb, yb, loss_fn, opt)`` in a Python loop over batches;
* ``numpy``: a hand-written NumPy MLP: forward, backward, SGD/Adam (torch's update rules);
* ``torch``: the tutorials' way: ``nn.Sequential``, ``torch.optim``, a loss module and a Python
  loop of ``zero_grad(); loss = loss_fn(model(xb), yb); loss.backward(); opt.step()``,
  ``loss.item()`` accumulated as a running loss;
* ``sklearn``: ``MLPClassifier`` with the same net, optimizer, learning rate and batch size for
  one epoch (classification workloads only). It draws its own initial weights and shuffles
  itself, so only its loss is compared, not its weights.

:func:`prepare` builds a contender's model and optimizer (not timed) and returns the training
call to time; :func:`check` compares its :class:`Result` with fastbp's (final parameters and
the final loss on an evaluation set, in float64) within the workload's :class:`Bounds`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import fastbp

__all__ = [
    "CONTENDERS",
    "FULL",
    "QUICK",
    "SCALES",
    "WORKLOADS",
    "Bounds",
    "Problem",
    "Result",
    "Unavailable",
    "Workload",
    "WrongResult",
    "check",
    "evaluate_loss",
    "load_fashion_mnist",
    "make_problem",
    "prepare",
    "profile_fit",
    "scaled",
    "step_flops",
    "unavailable_reason",
]

#: Contender names, in the order they run (the first is the reference the others are checked
#: against, and the denominator of every ratio).
CONTENDERS = ("fastbp", "fastbp-step", "numpy", "torch", "sklearn")

#: Sizes a workload can be run at: the real work, the CI size (``--benchmark-disable``: every
#: benchmark runs once, so the big ones shrink) and the smoke size (a few steps each).
SCALES = ("full", "ci", "smoke")

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"


class Unavailable(Exception):
    """A contender cannot run a workload here (library missing, or not the same net)."""


class WrongResult(AssertionError):
    """A contender's result differs from fastbp's by more than the workload's bounds."""


@dataclass(frozen=True)
class Bounds:
    """How far a contender's float32 result may be from fastbp's (justified in WORKLOADS below).

    ``param_max``: the largest |difference| of any parameter element; ``param_p99``: the 99th
    percentile of those differences (None: not checked); ``loss_rel``: relative difference of
    the final float64 evaluation loss. ``sklearn_factor``: sklearn's final loss must lie
    within this factor of fastbp's (different initial weights and batch order).
    """

    param_max: float
    param_p99: float | None
    loss_rel: float
    sklearn_factor: float = 2.5


@dataclass(frozen=True)
class Workload:
    """One benchmark problem: net ``sizes`` with ``activation`` between the Linear layers
    (None: a single Linear), ``loss`` (``"mse"`` mean over elements, or ``"cross_entropy"``
    on integer labels), ``optimizer`` (``"sgd"`` without momentum, or ``"adam"`` with torch's
    defaults) at ``lr``, ``batch_size``, ``epochs`` over ``n_samples`` of ``data``
    (``"w1"``, ``"w2"``, ``"fashion"``), each epoch ``shuffled`` or in sample order."""

    key: str
    description: str
    sizes: tuple[int, ...]
    activation: str | None
    loss: str
    optimizer: str
    lr: float
    batch_size: int
    epochs: int
    n_samples: int
    data: str
    shuffled: bool
    bounds: Bounds
    short_bounds: Bounds | None = None  # at the ci and smoke sizes (None: ``bounds``)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch (the last batch may be short)."""
        return math.ceil(self.n_samples / self.batch_size)

    @property
    def steps(self) -> int:
        """Optimizer steps in the whole workload."""
        return self.epochs * self.steps_per_epoch

    @property
    def samples(self) -> int:
        """Samples processed in the whole workload (epochs x n_samples)."""
        return self.epochs * self.n_samples

    @property
    def flops(self) -> float:
        """Floating-point operations of the whole workload (see :func:`step_flops`)."""
        return self.epochs * step_flops(self.sizes, self.n_samples)


def step_flops(sizes: tuple[int, ...] | list[int], batch: int) -> float:
    """FLOPs of one training step on ``batch`` rows: a Linear(in, out) costs 2·B·in·out forward
    and 4·B·in·out backward (weight and input gradients), and the first layer skips its input
    gradient: 6·B·Σ(in·out) − 2·B·in₀·out₀. Activations, loss and update are not counted
    (O(B·width) and O(parameters), well under 1% for W3/W4). Linear in B, so a whole epoch is
    ``step_flops(sizes, n_samples)`` whatever the batch size."""
    pairs = list(itertools.pairwise(sizes))
    return float(6 * batch * sum(a * b for a, b in pairs) - 2 * batch * pairs[0][0] * pairs[0][1])


# ---- the workloads ----------------------------------------------------------------------------

# Bounds on float32 differences from fastbp's result. fastbp, NumPy's BLAS and torch's kernels
# round differently (FMA or not, summation order and blocking, exp implementations), so equal
# algorithms give results that differ in the last bits after one step, and training amplifies
# that. Each bound is ~10x the largest deviation measured (1 thread, AVX2 kernels, real
# Fashion-MNIST; numpy and torch against fastbp), and far below what an error in the algorithm
# produces at that size (a wrong learning rate, a missing bias correction, a skipped, repeated
# or reordered batch, a mishandled short last batch: percent on the loss, >= lr x gradient on
# most parameters). ``short`` bounds apply at the ci and smoke sizes, where fewer steps leave
# less room to amplify rounding, so the check can be tighter.
#
# W1: 300 SGD steps of a 3-parameter least-squares fit, a contraction: rounding does not grow.
#   Measured: parameters 4.8e-7 (of ~4), loss 3.7e-6 relative (the loss sits at the noise
#   floor, ~1e-4, so it is sensitive to the last digits of the weights). Bounds 5e-6, 5e-5.
# W2: 20,000 batch-1 Adam steps through sigmoids; Adam normalises every gradient by its own
#   size, so float32 rounding is amplified ~5e3x (as in tests/test_torch_parity.py). Measured:
#   parameters 6.3e-4 (of ~0.1-5), loss 2.9e-4 relative. Bounds 5e-3 and 1e-2. Short (2,000
#   steps): measured 2.4e-6 and 3.8e-6; bounds 5e-5 and 5e-5.
# W3 and W4, two effects: (1) a ReLU whose pre-activation is within rounding of 0 on some
#   sample can switch sides in one library and not the other, changing that unit's gradient by
#   O(1) on one row: a few weights then differ by ~lr x gradient while the rest stay within
#   rounding, hence a loose bound on the largest deviation and a tight one on the 99th
#   percentile. (2) W3 with Adam on the real data is chaotic in float32: after 100-200 steps
#   the trajectories of all three libraries separate (numpy vs torch differ as much as either
#   does from fastbp; at 100 steps all agree to 3e-6), so the full-size bounds can only say
#   "the same training run": measured pairwise up to 0.089 max, 0.013 p99, 8e-3 loss relative;
#   bounds 0.5, 0.05, 3e-2. The short run (16 steps) is checked tightly: measured 1.3e-5 max,
#   1.1e-8 p99, 7e-9 loss; bounds 1e-3, 1e-6, 1e-6.
#   W3-sgd measured 3.3e-7 max, 3.4e-8 p99, 3e-8 loss: bounds 1e-5, 1e-6, 1e-6 (any size).
#   W4 (SGD lr 0.01) measured below 1e-4 max, 1.0e-6 p99: bounds 3e-4, 1e-5, 1e-4.
# sklearn: its own initial weights (Glorot) and batch order; its final loss must lie within a
#   factor 2.5 of fastbp's (measured: up to 1.87 after 16 W3 steps and after a W4 epoch,
#   where its init trains faster early on). Only "the same range": an untrained W3 net
#   (ln 10 = 2.3 vs 0.53) is outside it.
W1 = Workload(
    key="W1",
    description="linear regression, Linear(2,1), MSE, SGD lr 0.015, batch 10, 1000 samples, "
    "3 shuffled epochs",
    sizes=(2, 1),
    activation=None,
    loss="mse",
    # W1's loss is (yhat - y)^2 / 2 with lr 0.03; "mse" (mean of (yhat - y)^2) has twice the
    # gradient, so lr 0.015 is the same algorithm (the factor 2 is exact in binary).
    optimizer="sgd",
    lr=0.015,
    batch_size=10,
    epochs=3,
    n_samples=1000,
    data="w1",
    shuffled=True,
    bounds=Bounds(param_max=5e-6, param_p99=None, loss_rel=5e-5),
)
W2 = Workload(
    key="W2",
    description="1-2-5-1 sigmoid regression, MSE, Adam lr 0.02, batch 1, 100 samples in "
    "order, 200 epochs (20,000 steps)",
    sizes=(1, 2, 5, 1),
    activation="sigmoid",
    loss="mse",
    optimizer="adam",
    lr=0.02,
    batch_size=1,
    epochs=200,
    n_samples=100,
    data="w2",
    shuffled=False,
    bounds=Bounds(param_max=5e-3, param_p99=None, loss_rel=1e-2),
    short_bounds=Bounds(param_max=5e-5, param_p99=None, loss_rel=5e-5),
)
W3_SGD = Workload(
    key="W3-sgd",
    description="Fashion-MNIST 784-256-128-10 ReLU, cross-entropy, SGD lr 0.1, batch 128, "
    "one shuffled epoch",
    sizes=(784, 256, 128, 10),
    activation="relu",
    loss="cross_entropy",
    optimizer="sgd",
    lr=0.1,
    batch_size=128,
    epochs=1,
    n_samples=60_000,
    data="fashion",
    shuffled=True,
    # A whole float32 epoch drifts: a few ReLU units near 0 switch differently under another
    # summation order (torch's 2-thread MKL GEMM) and their weights then differ. Measured
    # between torch at 2 threads and fastbp over 469 steps: max 5.6e-3, 99th percentile 5.1e-4,
    # loss 1.4e-4 relative; these bounds say "the same training run" with ~10x margin. A wrong
    # update (no momentum, wrong lr, missing bias gradient) is off by far more. The short CI run
    # stays tight.
    bounds=Bounds(param_max=5e-2, param_p99=5e-3, loss_rel=1e-2),
    short_bounds=Bounds(param_max=1e-5, param_p99=1e-6, loss_rel=1e-6),
)
W3_ADAM = dataclasses.replace(
    W3_SGD,
    key="W3-adam",
    description=W3_SGD.description.replace("SGD lr 0.1", "Adam lr 1e-3"),
    optimizer="adam",
    lr=1e-3,
    bounds=Bounds(param_max=0.5, param_p99=0.05, loss_rel=3e-2),
    short_bounds=Bounds(param_max=1e-3, param_p99=1e-6, loss_rel=1e-6),
)
W4 = Workload(
    key="W4",
    description="GEMM-bound 784-1024-1024-10 ReLU, cross-entropy, SGD lr 0.01, batch 256, "
    "one shuffled epoch of Fashion-MNIST-shaped data",
    sizes=(784, 1024, 1024, 10),
    activation="relu",
    loss="cross_entropy",
    optimizer="sgd",
    lr=0.01,
    batch_size=256,
    epochs=1,
    n_samples=60_000,
    data="fashion",
    shuffled=True,
    bounds=Bounds(param_max=3e-4, param_p99=1e-5, loss_rel=1e-4),
)

#: Every workload by key, in report order.
WORKLOADS: dict[str, Workload] = {w.key: w for w in (W1, W2, W3_SGD, W3_ADAM, W4)}
#: The ``--quick`` subset (about a minute per thread count on 2 cores); ``--full`` adds W4.
QUICK = ("W1", "W2", "W3-sgd", "W3-adam")
FULL = tuple(WORKLOADS)

# (epochs, n_samples) overrides per scale; missing keys keep the full values.
_SCALED = {
    "ci": {"W2": (20, 100), "W3-sgd": (1, 2048), "W3-adam": (1, 2048), "W4": (1, 1024)},
    "smoke": {
        "W1": (2, 40),
        "W2": (2, 10),
        "W3-sgd": (1, 384),
        "W3-adam": (1, 384),
        "W4": (1, 512),
    },
}


def scaled(workload: Workload, scale: str) -> Workload:
    """``workload`` at ``scale`` (one of :data:`SCALES`): fewer epochs / samples for ci/smoke."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if scale == "full" or workload.key not in _SCALED[scale]:
        return workload
    epochs, n = _SCALED[scale][workload.key]
    bounds = workload.short_bounds or workload.bounds
    return dataclasses.replace(workload, epochs=epochs, n_samples=n, bounds=bounds)


# ---- data -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, str] | None:
    """Fashion-MNIST's training set via :mod:`fastbp.datasets`: (images uint8 (60000, 784),
    labels, where from), or None when the files are not installed."""
    from fastbp import datasets

    try:
        images, labels = datasets.load_fashion_mnist(kind="train")
    except FileNotFoundError:
        return None
    where = os.environ.get("FASHION_MNIST_DIR") or FASHION_MNIST_DEFAULT_DIR
    return images.reshape(images.shape[0], -1), labels, where


@dataclass
class Problem:
    """A workload made concrete: the batches and the initial weights every contender uses.

    ``schedule`` lists ``(X, y, epochs)``: ``epochs`` passes over consecutive batches of X (X
    already in that epoch's shuffled order). ``init_state``: fastbp's ``state_dict()`` (torch
    keys), copied into every contender. ``X_eval``/``y_eval``: where the final loss is measured.
    """

    workload: Workload
    schedule: list[tuple[np.ndarray, np.ndarray, int]]
    init_state: dict[str, np.ndarray]
    X_eval: np.ndarray
    y_eval: np.ndarray
    data_source: str


def _w1_data(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, size=(n, 2))
    y = X @ np.array([2.0, -3.4]) + 4.2 + rng.normal(0, 0.01, size=n)
    w0 = rng.normal(0, 0.01, size=(1, 2))
    return X.astype(np.float32), y.reshape(-1, 1).astype(np.float32), w0.astype(np.float32)


def _fashion_data(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    rng = np.random.default_rng(3)
    real = load_fashion_mnist()
    if real is not None and n <= real[0].shape[0]:
        images, labels, folder = real
        pick = np.sort(rng.permutation(images.shape[0])[:n])
        X = images[pick].astype(np.float32)
        X *= np.float32(1 / 255)
        return X, labels[pick].astype(np.int64), f"Fashion-MNIST ({folder})"
    X = rng.random((n, 784), dtype=np.float32)
    return X, rng.integers(0, 10, size=n), "random data of Fashion-MNIST's shape"


def build_fastbp(workload: Workload) -> fastbp.Sequential:
    """fastbp's model for ``workload`` (initial weights from torch's init, seed 0)."""
    if workload.activation is None:
        return fastbp.Sequential(fastbp.Linear(*workload.sizes, rng=np.random.default_rng(0)))
    return fastbp.MLP(list(workload.sizes), activation=workload.activation, seed=0)


def make_problem(workload: Workload) -> Problem:
    """The data in batch order and the initial weights of ``workload`` (deterministic)."""
    n = workload.n_samples
    if workload.data == "w1":
        X, y, w0 = _w1_data(n)
        source = "synthetic: y = X·[2, -3.4] + 4.2 + N(0, 0.01²)"
    elif workload.data == "w2":
        x = np.linspace(0, 3, n).reshape(-1, 1)
        X, y, w0 = x.astype(np.float32), (2.3 * x + 4.7).astype(np.float32), None
        source = "synthetic: x = linspace(0, 3), y = 2.3x + 4.7"
    elif workload.data == "fashion":
        X, y, source = _fashion_data(n)
        w0 = None
    else:
        raise ValueError(f"unknown data {workload.data!r}")
    model = build_fastbp(workload)
    if w0 is not None:
        model[0].weight.data[...] = w0
        model[0].bias.data[...] = 0
    init_state = model.state_dict()
    if workload.shuffled:
        rng = np.random.default_rng(1)
        schedule = []
        for _ in range(workload.epochs):
            perm = rng.permutation(n)
            schedule.append((np.ascontiguousarray(X[perm]), np.ascontiguousarray(y[perm]), 1))
    else:
        schedule = [(X, y, workload.epochs)]
    n_eval = min(n, 10_000)
    return Problem(workload, schedule, init_state, X[:n_eval], y[:n_eval], source)


# ---- results and checks -----------------------------------------------------------------------


@dataclass
class Result:
    """What a contender's training call returns: its final parameters under torch's keys and
    its mean training loss over the last epoch (as that library reports it)."""

    state: dict[str, np.ndarray]
    train_loss: float


def _layer_keys(state: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """(weight key, bias key) per Linear, in layer order."""
    idx = sorted({int(k.split(".")[0]) for k in state if k.endswith(".weight")})
    return [(f"{i}.weight", f"{i}.bias") for i in idx]


def _act64(name: str | None, z: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(z, 0)
    if name == "sigmoid":
        return 1 / (1 + np.exp(-z))
    raise ValueError(f"unsupported activation {name!r}")


def evaluate_loss(problem: Problem, state: dict[str, np.ndarray]) -> float:
    """The workload's loss of the parameters ``state`` on the evaluation set, in float64."""
    w = problem.workload
    h = problem.X_eval.astype(np.float64)
    layers = _layer_keys(state)
    for i, (wk, bk) in enumerate(layers):
        h = h @ state[wk].astype(np.float64).T + state[bk].astype(np.float64)
        if i < len(layers) - 1:
            h = _act64(w.activation, h)
    if w.loss == "mse":
        return float(np.mean((h - problem.y_eval.astype(np.float64)) ** 2))
    h = h - h.max(axis=1, keepdims=True)
    logp = h - np.log(np.exp(h).sum(axis=1, keepdims=True))
    return float(-np.mean(logp[np.arange(h.shape[0]), problem.y_eval]))


def check(
    problem: Problem, reference: Result, result: Result, contender: str
) -> dict[str, float | None]:
    """Compare ``result`` with fastbp's ``reference`` on ``problem``; raise :class:`WrongResult`
    when it is outside the workload's bounds. Returns the measured deviations: ``loss`` and
    ``ref_loss`` (final float64 evaluation losses), ``loss_rel``, and (not for sklearn, whose
    initial weights differ) ``param_max`` and ``param_p99`` (|difference| over all elements)."""
    bounds = problem.workload.bounds
    loss = evaluate_loss(problem, result.state)
    ref_loss = evaluate_loss(problem, reference.state)
    out: dict[str, float | None] = {
        "loss": loss,
        "ref_loss": ref_loss,
        "loss_rel": abs(loss - ref_loss) / abs(ref_loss) if ref_loss else abs(loss),
        "param_max": None,
        "param_p99": None,
    }
    what = f"{problem.workload.key} / {contender}"
    if not math.isfinite(loss):
        raise WrongResult(f"{what}: final loss is {loss}")
    if contender == "sklearn":
        factor = bounds.sklearn_factor
        if not ref_loss / factor <= loss <= ref_loss * factor:
            raise WrongResult(
                f"{what}: final loss {loss:.4g} is not within a factor {factor} of fastbp's "
                f"{ref_loss:.4g}"
            )
        return out
    if set(result.state) != set(reference.state):
        raise WrongResult(f"{what}: keys {sorted(result.state)} != {sorted(reference.state)}")
    diffs = []
    for key, ref in reference.state.items():
        value = result.state[key]
        if value.shape != ref.shape:
            raise WrongResult(f"{what}: {key} has shape {value.shape}, expected {ref.shape}")
        diffs.append(np.abs(value.astype(np.float64) - ref.astype(np.float64)).ravel())
    dev = np.concatenate(diffs)
    out["param_max"] = float(dev.max())
    out["param_p99"] = float(np.quantile(dev, 0.99))
    problems = []
    if not out["param_max"] <= bounds.param_max:
        problems.append(f"max parameter deviation {out['param_max']:.3g} > {bounds.param_max:g}")
    if bounds.param_p99 is not None and not out["param_p99"] <= bounds.param_p99:
        problems.append(
            f"99th-percentile parameter deviation {out['param_p99']:.3g} > {bounds.param_p99:g}"
        )
    if not out["loss_rel"] <= bounds.loss_rel:
        problems.append(
            f"final loss {loss:.7g} vs fastbp's {ref_loss:.7g}: relative difference "
            f"{out['loss_rel']:.3g} > {bounds.loss_rel:g}"
        )
    if problems:
        raise WrongResult(f"{what}: " + "; ".join(problems))
    return out


# ---- contenders -------------------------------------------------------------------------------


def unavailable_reason(contender: str, workload: Workload) -> str | None:
    """Why ``contender`` cannot run ``workload`` here (None: it can)."""
    if contender not in CONTENDERS:
        raise ValueError(f"unknown contender {contender!r}; choose from {CONTENDERS}")
    if contender == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            return "torch is not installed"
    if contender == "sklearn":
        if workload.loss != "cross_entropy" or workload.activation != "relu":
            return "MLPClassifier cannot run this net (regression)"
        try:
            import sklearn  # noqa: F401
        except ImportError:
            return "scikit-learn is not installed"
    return None


def prepare(contender: str, problem: Problem) -> Callable[[], Result]:
    """Build ``contender``'s model (from ``problem.init_state``) and optimizer, untimed, and
    return the training call to time: it runs the whole workload once and returns a
    :class:`Result`. Each call of :func:`prepare` starts afresh from the initial weights.
    Raises :class:`Unavailable` when the contender cannot run here."""
    reason = unavailable_reason(contender, problem.workload)
    if reason is not None:
        raise Unavailable(reason)
    return _PREPARE[contender](problem)


def _fastbp_setup(problem: Problem):
    w = problem.workload
    model = build_fastbp(w)
    model.load_state_dict(problem.init_state)
    if w.optimizer == "sgd":
        opt = fastbp.optim.SGD(model.parameters(), lr=w.lr)
    else:
        opt = fastbp.optim.Adam(model.parameters(), lr=w.lr)
    return model, opt


def _prepare_fastbp_fit(problem: Problem) -> Callable[[], Result]:
    return _fastbp_fit(problem)[1]


def profile_fit(problem: Problem) -> fastbp.profiling.Profile:
    """fastbp's ``fit`` on the workload once more, from the initial weights, under
    :meth:`fastbp.Sequential.profile`: where its step's time goes (not one of the timed
    rounds, which run unprofiled)."""
    model, train = _fastbp_fit(problem)
    with model.profile() as prof:
        train()
    return prof


def _fastbp_fit(problem: Problem) -> tuple[fastbp.Sequential, Callable[[], Result]]:
    model, opt = _fastbp_setup(problem)
    w = problem.workload

    def train() -> Result:
        loss = float("nan")
        for X, y, epochs in problem.schedule:
            history = model.fit(
                X,
                y,
                loss=w.loss,
                optimizer=opt,
                epochs=epochs,
                batch_size=w.batch_size,
                shuffle=False,
            )
            loss = history["loss"][-1]
        return Result(model.state_dict(), loss)

    return model, train


def _prepare_fastbp_step(problem: Problem) -> Callable[[], Result]:
    model, opt = _fastbp_setup(problem)
    w = problem.workload
    loss_fn = fastbp.MSELoss() if w.loss == "mse" else fastbp.CrossEntropyLoss()
    bs = w.batch_size

    def train() -> Result:
        total = 0.0
        for X, y, epochs in problem.schedule:
            n = X.shape[0]
            for _ in range(epochs):
                total = 0.0
                for start in range(0, n, bs):
                    xb, yb = X[start : start + bs], y[start : start + bs]
                    total += model.train_step(xb, yb, loss_fn, opt) * xb.shape[0]
        return Result(model.state_dict(), total / problem.schedule[-1][0].shape[0])

    return train


class NumpyMLP:
    """A hand-written NumPy MLP trainer: Linear layers (weight ``(out, in)``, torch's layout)
    with an activation between them, MSE (mean) or softmax cross-entropy (mean over the batch),
    SGD or Adam with torch's update rules, all in the parameters' dtype. Straightforward NumPy:
    BLAS for the matrix products, in-place ufuncs for the updates."""

    def __init__(
        self,
        state: dict[str, np.ndarray],
        activation: str | None,
        loss: str,
        optimizer: str,
        lr: float,
    ) -> None:
        keys = _layer_keys(state)
        self.keys = keys
        self.W = [np.array(state[wk], copy=True) for wk, _ in keys]
        self.b = [np.array(state[bk], copy=True) for _, bk in keys]
        self.activation = activation
        self.loss = loss
        self.optimizer = optimizer
        self.lr = lr
        self.betas, self.eps, self.t = (0.9, 0.999), 1e-8, 0
        params = self.W + self.b
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def _act(self, z: np.ndarray) -> np.ndarray:
        if self.activation == "relu":
            return np.maximum(z, 0, out=z)
        if self.activation == "sigmoid":
            np.negative(z, out=z)
            np.exp(z, out=z)
            z += 1
            return np.reciprocal(z, out=z)
        raise ValueError(f"unsupported activation {self.activation!r}")

    def _act_grad(self, dh: np.ndarray, h: np.ndarray) -> np.ndarray:
        if self.activation == "relu":
            dh *= h > 0
        else:  # sigmoid: y (1 - y) from the stored output
            dh *= h * (1 - h)
        return dh

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One training step on a batch; returns the loss before the update."""
        hs = [x]
        last = len(self.W) - 1
        for i, (W, b) in enumerate(zip(self.W, self.b, strict=True)):
            z = hs[-1] @ W.T
            z += b
            hs.append(self._act(z) if i < last else z)
        out = hs[-1]
        if self.loss == "mse":
            dz = out - y
            loss = float(np.mean(dz * dz))
            dz *= 2 / dz.size
        else:
            rows = np.arange(out.shape[0])
            z = out - out.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            loss = float(-np.mean(np.log(p[rows, y])))
            p[rows, y] -= 1
            p /= out.shape[0]
            dz = p
        grads_w: list[np.ndarray] = [None] * len(self.W)  # type: ignore[list-item]
        grads_b: list[np.ndarray] = [None] * len(self.W)  # type: ignore[list-item]
        for i in range(last, -1, -1):
            grads_w[i] = dz.T @ hs[i]
            grads_b[i] = dz.sum(axis=0)
            if i > 0:
                dz = self._act_grad(dz @ self.W[i], hs[i])
        self._update(self.W + self.b, grads_w + grads_b)
        return loss

    def _update(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        lr = self.lr
        if self.optimizer == "sgd":
            for p, g in zip(params, grads, strict=True):
                g *= lr
                p -= g
            return
        # torch.optim.Adam (single-tensor path): m.lerp_(g, 1 - b1); v = b2 v + (1 - b2) g²;
        # p -= (lr / bc1) · m / (sqrt(v) / sqrt(bc2) + eps)
        b1, b2 = self.betas
        self.t += 1
        step_size = lr / (1 - b1**self.t)
        bc2_sqrt = math.sqrt(1 - b2**self.t)
        for p, g, m, v in zip(params, grads, self.m, self.v, strict=True):
            m += (1 - b1) * (g - m)
            v *= b2
            v += (1 - b2) * (g * g)
            denom = np.sqrt(v)
            denom /= bc2_sqrt
            denom += self.eps
            p -= step_size * (m / denom)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters under torch's keys."""
        out = {}
        for (wk, bk), W, b in zip(self.keys, self.W, self.b, strict=True):
            out[wk], out[bk] = W.copy(), b.copy()
        return out


def _prepare_numpy(problem: Problem) -> Callable[[], Result]:
    w = problem.workload
    net = NumpyMLP(problem.init_state, w.activation, w.loss, w.optimizer, w.lr)
    bs = w.batch_size

    def train() -> Result:
        total = 0.0
        for X, y, epochs in problem.schedule:
            n = X.shape[0]
            for _ in range(epochs):
                total = 0.0
                for start in range(0, n, bs):
                    xb, yb = X[start : start + bs], y[start : start + bs]
                    total += net.step(xb, yb) * xb.shape[0]
        return Result(net.state_dict(), total / problem.schedule[-1][0].shape[0])

    return train


def _prepare_torch(problem: Problem) -> Callable[[], Result]:
    import torch
    from torch import nn

    w = problem.workload
    acts = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}
    layers: list[nn.Module] = []
    for i in range(len(w.sizes) - 1):
        layers.append(nn.Linear(w.sizes[i], w.sizes[i + 1]))
        if i < len(w.sizes) - 2:
            layers.append(acts[w.activation]())
    model = nn.Sequential(*layers)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in problem.init_state.items()})
    if w.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=w.lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=w.lr)
    loss_fn = nn.MSELoss() if w.loss == "mse" else nn.CrossEntropyLoss()
    bs = w.batch_size

    def train() -> Result:
        model.train()
        running = 0.0
        for X, y, epochs in problem.schedule:
            inputs, targets = torch.from_numpy(X), torch.from_numpy(y)
            n = X.shape[0]
            for _ in range(epochs):
                running = 0.0
                for start in range(0, n, bs):
                    xb, yb = inputs[start : start + bs], targets[start : start + bs]
                    opt.zero_grad()
                    loss = loss_fn(model(xb), yb)
                    loss.backward()
                    opt.step()
                    running += loss.item() * xb.shape[0]
        state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        return Result(state, running / problem.schedule[-1][0].shape[0])

    return train


def _prepare_sklearn(problem: Problem) -> Callable[[], Result]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    w = problem.workload
    if len(problem.schedule) != 1:  # per-epoch orders: sklearn shuffles by itself
        raise Unavailable("MLPClassifier runs one data set for max_iter epochs")
    X, y = problem.schedule[0][0], problem.schedule[0][1]
    clf = MLPClassifier(
        hidden_layer_sizes=w.sizes[1:-1],
        activation="relu",
        solver=w.optimizer,
        batch_size=w.batch_size,
        max_iter=w.epochs,
        learning_rate_init=w.lr,
        momentum=0,
        nesterovs_momentum=False,
        alpha=0,
        shuffle=True,
        random_state=0,
    )

    def train() -> Result:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X, y)
        state = {}
        for i, (coef, intercept) in enumerate(zip(clf.coefs_, clf.intercepts_, strict=True)):
            state[f"{2 * i}.weight"] = np.ascontiguousarray(coef.T)
            state[f"{2 * i}.bias"] = intercept.copy()
        return Result(state, float(clf.loss_))

    return train


_PREPARE: dict[str, Callable[[Problem], Callable[[], Result]]] = {
    "fastbp": _prepare_fastbp_fit,
    "fastbp-step": _prepare_fastbp_step,
    "numpy": _prepare_numpy,
    "torch": _prepare_torch,
    "sklearn": _prepare_sklearn,
}
