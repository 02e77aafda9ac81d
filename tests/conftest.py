"""Shared fixtures: every kernel test runs on every ISA this CPU supports, in both dtypes."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import fastbp
from fastbp import _core

ISAS = fastbp.available_isas()
DTYPES = [np.float32, np.float64]


ACTIVATION_LAYERS = {
    "sigmoid": fastbp.Sigmoid,
    "relu": fastbp.ReLU,
    "tanh": fastbp.Tanh,
    "identity": None,
}


def build_mlp(sizes, acts, dtype, bias=True, seed=0) -> fastbp.Sequential:
    """Linear layers of the given widths, seeded, with the activations `acts` (names) cycled
    over the hidden layers and none after the last."""
    rng = np.random.default_rng(seed)
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(fastbp.Linear(a, b, bias=bias, dtype=dtype, rng=rng))
        act = ACTIVATION_LAYERS[acts[i % len(acts)]] if i < len(sizes) - 2 else None
        if act is not None:
            layers.append(act())
    return fastbp.Sequential(*layers)


def training_result(model, losses) -> tuple[dict, list, list]:
    """A trained model's weights and gradients (copies) and its losses, for assert_same_training:
    the fused-path tests train the same model with and without a fusion."""
    state = {k: v.copy() for k, v in model.state_dict().items()}
    return state, [p.grad.copy() for p in model.parameters()], list(losses)


def assert_same_training(a, b) -> None:
    """Two training_result()s are bitwise equal: weights, gradients and losses."""
    state_a, grads_a, loss_a = a
    state_b, grads_b, loss_b = b
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=key, strict=True)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        np.testing.assert_array_equal(ga, gb, strict=True)
    assert loss_a == loss_b


@contextlib.contextmanager
def switched(setter, on: bool):
    """Run the block with one of _core's testing switches (``_set_small_step``,
    ``_set_dact_fusion``) set to `on`, turning it back on after."""
    setter(on)
    try:
        yield
    finally:
        setter(True)


@contextlib.contextmanager
def using_isa(name: str):
    """Run the block with the kernels of ISA `name`, restoring the previous choice after."""
    previous = _core.active_isa()
    _core.select_isa(name)
    try:
        yield
    finally:
        _core.select_isa(previous)


@contextlib.contextmanager
def using_threads(n: int):
    previous = fastbp.get_num_threads()
    fastbp.set_num_threads(n)
    try:
        yield
    finally:
        fastbp.set_num_threads(previous)


@pytest.fixture(params=ISAS)
def isa(request):
    """Parametrises a test over every available ISA path and selects it for the test."""
    with using_isa(request.param):
        yield request.param


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request):
    return np.dtype(request.param)


def eps(dtype) -> float:
    return float(np.finfo(dtype).eps)


def dot_error_bound(abs_a: np.ndarray, abs_b: np.ndarray, k: int, dtype) -> np.ndarray:
    """Elementwise bound on the rounding error of C = A @ B summed in `dtype`.

    The classical bound |fl(a.b) - a.b| <= gamma_k * sum |a_i||b_i| with gamma_k = k u / (1 - k u),
    u = eps / 2 (Higham, Accuracy and Stability, Thm 3.5); FMA only tightens it. Inputs are the
    float64 absolute values of the (already rounded) operands, so the reference is exact to
    float64 precision and the bound is a true bound, not a fudge factor.
    """
    u = eps(dtype) / 2
    gamma = k * u / (1 - k * u) if k else 0.0
    return gamma * (abs_a @ abs_b) + np.finfo(np.float64).eps * (abs_a @ abs_b)


# Prepended to scripts run in a fresh interpreter: an editable install would otherwise rebuild
# the extension on import there (slow, and possibly a different binary from the parent's).
CHILD_PRELUDE = (
    "import sys\n"
    "for finder in sys.meta_path:\n"
    "    if hasattr(finder, 'rebuild_flag'):\n"
    "        finder.rebuild_flag = False\n"
)


def os_threads_after(code: str) -> tuple[int, int]:
    """(OS threads before, after) running `code` in a fresh interpreter with fastbp at 2
    threads: libgomp keeps its workers, so a parallel region leaves one more thread behind."""
    script = CHILD_PRELUDE + (
        "import os, numpy as np, fastbp\nfrom fastbp import ops\nfastbp.set_num_threads(2)\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        f"{code}\n"
        "print('THREADS', before, len(os.listdir('/proc/self/task')))\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"^THREADS (\d+) (\d+)$", proc.stdout, re.M)
    assert match, proc.stdout[-3000:]
    return int(match.group(1)), int(match.group(2))


def torch_equivalent(model):
    """The torch nn.Sequential with the same layer types and sizes (default initialisation)."""
    from torch import nn as tnn  # lazily: the sanitizer stage runs without torch

    from fastbp import BatchNorm1d, Dropout, Linear

    layers = []
    for layer in model:
        if isinstance(layer, Linear):
            layers.append(
                tnn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            )
        elif isinstance(layer, BatchNorm1d):
            layers.append(
                tnn.BatchNorm1d(
                    layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine
                )
            )
        elif isinstance(layer, Dropout):
            layers.append(tnn.Dropout(layer.p))
        else:
            layers.append(getattr(tnn, type(layer).__name__)())
    out = tnn.Sequential(*layers)
    return out.double() if model.dtype == np.float64 else out


def assert_within(got, ref, bound, what: str) -> None:
    """Elementwise |got - ref| <= bound (compared in float64), naming the worst offender."""
    got, ref = np.asarray(got), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    if got.size == 0:
        return
    err = np.abs(got.astype(np.float64) - ref)
    ok = err <= bound
    if not ok.all():
        idx = np.unravel_index(np.argmax(np.where(ok, -np.inf, err - bound)), err.shape)
        raise AssertionError(
            f"{what}: {np.count_nonzero(~ok)} of {err.size} outside the bound; worst at {idx}: "
            f"got {got[idx]!r}, ref {ref[idx]!r}, |err| {err[idx]:.3e} > bound {bound[idx]:.3e}"
        )
