"""Plain SGD's update in each weight-gradient product's epilogue (``fbp_gemm_sgd``) against the
product followed by one update pass over the flat buffer, bitwise.

The fused epilogue claims the unfused arithmetic exactly: each weight takes
``w -= lr * (dW + weight_decay * w)`` with the update kernel's own per-element code and
floating-point mode, once dW is final, and the parameters it does not cover (biases, BatchNorm's)
are updated by the kernel as before. Every test trains the same model twice, once with the
fusion turned off (``_core._set_update_fusion(False)``), and requires identical weights,
gradients and losses. Shapes cross the GEMM's direct path, its packed path on one and two
threads (row and column splits), several K blocks (the update must wait for the last), several
MC blocks and NC panels, and ragged edge tiles.

The first step of a fit, and the first after the batch size, thread count or ISA changes, runs
unfused (its products size every thread's scratch, so that no fused step can fail halfway); the
rest are fused. Making the fused update skip one column of each block's last row fails every
case here but the stateful optimizers' (which never fuse); updating on every K block instead of
the last fails the two-K-blocks cases.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastbp
from fastbp import _core

from .conftest import assert_same_training, build_mlp, switched, training_result, using_threads


def update_fusion(on: bool):
    return switched(_core._set_update_fusion, on)


def fit_state(on, model_fn, dtype, batch_size, n, *, weight_decay=0.0, threads=1, epochs=2):
    """Weights, gradients and losses after a seeded, shuffled plain-SGD fit."""
    model = model_fn(dtype)
    in_features, classes = model_fn.sizes[0], model_fn.sizes[-1]
    rng = np.random.default_rng(1)
    X = rng.normal(size=(n, in_features)).astype(dtype)
    y = rng.integers(0, classes, size=n)
    opt = fastbp.optim.SGD(model.parameters(), lr=0.05, weight_decay=weight_decay)
    with update_fusion(on), using_threads(threads):
        history = model.fit(
            X, y, loss="cross_entropy", optimizer=opt, epochs=epochs, batch_size=batch_size, seed=3
        )
    return training_result(model, history.history["loss"])


def mlp(sizes, act="relu", bias=True):
    def build(dtype):
        return build_mlp(sizes, [act], dtype, bias=bias)

    build.sizes = sizes
    return build


# (model, batch size, rows). Layer i's weight gradient is sizes[i+1] x sizes[i] over k = batch.
# Every net has a layer of more than 256 weights: smaller nets take the fused small step.
NETS = [
    pytest.param(mlp((40, 30, 6, 3)), 4, 30, id="direct-path"),  # 30 x 40 x 4: under 24^3
    pytest.param(mlp((33, 64, 48, 10)), 33, 99, id="packed-ragged"),
    pytest.param(mlp((20, 257, 65, 7), "tanh"), 37, 74, id="odd-widths"),
    pytest.param(mlp((16, 40, 24, 5)), 520, 1040, id="two-K-blocks"),  # k = 520 > KC
    pytest.param(mlp((8, 500, 6)), 16, 48, id="two-MC-blocks"),  # m = 500 > MC
    pytest.param(mlp((1100, 24, 4)), 8, 24, id="two-NC-panels"),  # n = 1100 > NC
    pytest.param(mlp((12, 30, 20, 4), bias=False), 16, 48, id="no-biases"),
]


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize(("model_fn", "batch_size", "n"), NETS)
def test_fused_update_matches_the_update_pass(isa, dtype, model_fn, batch_size, n, weight_decay):
    fused = fit_state(True, model_fn, dtype, batch_size, n, weight_decay=weight_decay)
    plain = fit_state(False, model_fn, dtype, batch_size, n, weight_decay=weight_decay)
    assert_same_training(fused, plain)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads(dtype, threads):
    """Two threads split the weight-gradient products by rows or columns, and each updates the
    block it computed: the same bits as one thread and as the update pass. Layer 0's product
    (256 x 64 x 128: 22 row slivers, 2 column slivers) balances equally either way, a tie the
    SGD epilogue breaks towards rows; layer 1's (128 x 256) splits by columns."""
    model_fn, batch_size, n = mlp((64, 256, 128, 10)), 128, 384  # W3's shape, scaled down
    fused = fit_state(True, model_fn, dtype, batch_size, n, threads=threads)
    assert_same_training(fused, fit_state(False, model_fn, dtype, batch_size, n, threads=threads))
    if threads == 2:
        assert_same_training(fused, fit_state(True, model_fn, dtype, batch_size, n))


def test_other_layers_keep_their_updates(dtype):
    """BatchNorm's weight and bias lie between the Linear weights in the flat buffer: the pass
    over the gaps updates them (and Dropout's masks stay in step) exactly as the whole pass."""

    def build(dt):
        rng = np.random.default_rng(0)
        return fastbp.Sequential(
            fastbp.Linear(12, 40, dtype=dt, rng=rng),
            fastbp.BatchNorm1d(40, dtype=dt),
            fastbp.ReLU(),
            fastbp.Dropout(0.25),
            fastbp.Linear(40, 24, dtype=dt, rng=rng),
            fastbp.Tanh(),
            fastbp.Linear(24, 3, dtype=dt, rng=rng),
        )

    build.sizes = (12, 3)
    fused = fit_state(True, build, dtype, 32, 160, weight_decay=1e-3)
    assert_same_training(fused, fit_state(False, build, dtype, 32, 160, weight_decay=1e-3))
    before = build(dtype).state_dict()
    assert not np.array_equal(fused[0]["1.weight"], before["1.weight"])  # BatchNorm trained


def test_train_step_and_changing_threads(dtype):
    """train_step() takes the same path as fit(). A step after the batch size, the thread count
    or the calling thread changes runs unfused, the next ones fused; the bits never depend on
    which steps fused."""

    def steps(on):
        model = build_mlp((24, 96, 48, 6), ["sigmoid"], dtype)
        opt = fastbp.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3)
        rng = np.random.default_rng(7)
        losses = []
        with update_fusion(on):
            for i in range(12):
                x = rng.normal(size=(40 if i < 5 else 37, 24)).astype(dtype)
                y = rng.integers(0, 6, size=x.shape[0])
                with using_threads(1 if i in (0, 1, 2, 6, 7) else 2):
                    if i in (10, 11):  # from another Python thread
                        with ThreadPoolExecutor(1) as pool:
                            step = pool.submit(model.train_step, x, y, "cross_entropy", opt)
                            losses.append(step.result())
                    else:
                        losses.append(model.train_step(x, y, "cross_entropy", opt))
        return training_result(model, losses)

    assert_same_training(steps(True), steps(False))


@pytest.mark.parametrize(
    "opt_fn",
    [
        pytest.param(lambda p: fastbp.optim.SGD(p, lr=0.05, momentum=0.9), id="momentum"),
        pytest.param(lambda p: fastbp.optim.Adam(p, lr=1e-3), id="adam"),
    ],
)
def test_optimizers_with_state_give_the_same_bits(dtype, opt_fn):
    """Momentum SGD and Adam keep the update pass (their state, streamed between the tiles,
    made W3's 2-thread epoch slower): the switch must not change their bits either."""

    def run(on):
        model = build_mlp((16, 64, 32, 4), ["relu"], dtype)
        rng = np.random.default_rng(2)
        X = rng.normal(size=(96, 16)).astype(dtype)
        y = rng.integers(0, 4, size=96)
        with update_fusion(on):
            model.fit(X, y, loss="cross_entropy", optimizer=opt_fn(model.parameters()), epochs=2,
                      batch_size=32, seed=1)  # fmt: skip
        return model.state_dict()

    fused, plain = run(True), run(False)
    for key in fused:
        np.testing.assert_array_equal(fused[key], plain[key], err_msg=key, strict=True)
