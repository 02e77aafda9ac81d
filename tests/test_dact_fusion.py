"""A Linear's input gradient with the Linear below's activation backward in its epilogue
(``fbp_gemm_dact``) against the two kernels in turn, bitwise.

The fused epilogue claims the unfused arithmetic exactly: dZ = dY * act'(Y) element by element,
and the bias gradient summed over the rows in order. Every test trains (or differentiates) the
same model twice, once with the fusion turned off (``_core._set_dact_fusion(False)``), and
requires identical bits. Shapes cross the GEMM's direct path, its packed path on one and two
threads (a column split: each thread owns whole columns of the sums), several K blocks, several
MC blocks of rows, ragged edge tiles, and the shallow products (k < 32) that run unfused unless
their dZ is large.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastbp
from fastbp import _core

from .conftest import assert_same_training, build_mlp, switched, training_result, using_threads


def dact_fusion(on: bool):
    return switched(_core._set_dact_fusion, on)


def build(sizes, act, dtype, bias=True, seed=0) -> fastbp.Sequential:
    return build_mlp(sizes, [act], dtype, bias=bias, seed=seed)


def fit_state(on, sizes, act, dtype, batch_size, n, bias=True, threads=1):
    """Weights, gradients and losses after a seeded, shuffled SGD fit."""
    model = build(sizes, act, dtype, bias=bias)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(n, sizes[0])).astype(dtype)
    y = rng.integers(0, sizes[-1], size=n)
    opt = fastbp.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with dact_fusion(on), using_threads(threads):
        history = model.fit(
            X, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=batch_size, seed=3
        )
    return training_result(model, history.history["loss"])


# (sizes, batch size, rows): the dX product of layer i is batch x sizes[i] x sizes[i + 1]
NETS = [
    pytest.param((5, 7, 40, 3), 4, 30, id="direct-path"),  # 4 x 7 x 40: under 24^3
    pytest.param((33, 64, 48, 10), 33, 99, id="packed-ragged"),  # 33 rows, 48/64 wide
    pytest.param((20, 257, 65, 7), 37, 74, id="odd-widths"),
    pytest.param((16, 40, 500, 10), 40, 80, id="two-K-blocks"),  # k = 500 > KC
    pytest.param((8, 96, 64, 5), 520, 1040, id="two-MC-blocks"),  # 520 rows > MC
    pytest.param((12, 30, 20, 4), 16, 48, id="shallow-unfused"),  # k = 20 < 32
    # k = 10 < 32, but dZ (256 x 1024) is over 512 KiB: fused (W4's output layer)
    pytest.param((6, 1024, 10), 256, 512, id="shallow-large-fused"),
]


@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh", "identity"])
@pytest.mark.parametrize(("sizes", "batch_size", "n"), NETS)
def test_fused_epilogue_matches_the_two_kernels(isa, dtype, act, sizes, batch_size, n):
    fused = fit_state(True, sizes, act, dtype, batch_size, n)
    plain = fit_state(False, sizes, act, dtype, batch_size, n)
    assert_same_training(fused, plain)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("sizes", "batch_size", "n"),
    [
        pytest.param((64, 256, 128, 10), 128, 256, id="W3-scaled"),
        pytest.param((6, 1024, 10), 256, 512, id="shallow-large"),  # k = 10, fused
    ],
)
def test_threads_and_bias(dtype, bias, threads, sizes, batch_size, n):
    """Two threads split the product by columns, so each owns its columns' sums: the same
    bits as one thread and as the unfused kernels, with and without biases."""
    fused = fit_state(True, sizes, "relu", dtype, batch_size, n, bias=bias, threads=threads)
    plain = fit_state(False, sizes, "relu", dtype, batch_size, n, bias=bias, threads=threads)
    assert_same_training(fused, plain)
    if threads == 2:
        assert_same_training(fused, fit_state(True, sizes, "relu", dtype, batch_size, n, bias=bias))


def test_accumulating_backward(dtype):
    """backward() adds to the gradients (torch's .grad): the fused bias sums start from the
    gradient already there, as the unfused kernel does."""

    def grads(on):
        model = build((24, 64, 48, 6), "tanh", dtype)
        x = np.random.default_rng(5).normal(size=(50, 24)).astype(dtype)
        dy = np.random.default_rng(6).normal(size=(50, 6)).astype(dtype)
        model.train()
        with dact_fusion(on):
            model.forward(x)
            dx1 = model.backward(dy)
            model.forward(x[::-1].copy())
            dx2 = model.backward(dy[::-1].copy())
        return [p.grad.copy() for p in model.parameters()] + [dx1, dx2]

    for a, b in zip(grads(True), grads(False), strict=True):
        np.testing.assert_array_equal(a, b, strict=True)
