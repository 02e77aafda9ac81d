"""Shared fixtures: every kernel test runs on every ISA this CPU supports, in both dtypes."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import fastbp
from fastbp import _core

ISAS = fastbp.available_isas()
DTYPES = [np.float32, np.float64]


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
