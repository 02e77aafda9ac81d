"""fit's shuffled batches read through the order (csrc/gemm.c's indexed operands, train.c).

A shuffled batch whose first op is a Linear above the GEMM's direct path is not gathered into
the workspace: that layer's forward and weight gradient pack its rows straight from X through
the epoch's order (fbp_gemm_rows). It claims the gathered path's exact arithmetic, so every
test trains the same model twice, once with the gather forced (``_set_indexed_batches(False)``),
and requires identical bits. The profile's ``indexed_batch_count`` shows the path was taken.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastbp
from fastbp import _core, _model, optim

from .conftest import switched, using_threads


def indexed(on: bool):
    return switched(_core._set_indexed_batches, on)


def make_optimizer(name: str, model: fastbp.Sequential):
    params = model.parameters()
    if name == "sgd":  # the update runs in the weight-gradient products (fbp_gemm_sgd)
        return optim.SGD(params, lr=0.05, weight_decay=1e-3)
    if name == "momentum":  # one update pass after the backward
        return optim.SGD(params, lr=0.05, momentum=0.9)
    return optim.Adam(params, lr=0.01)


# (first-layer widths, hidden activation, dropout, loss): every first layer is above the direct
# path at batch 32 (32 x in x out > 24^3)
NETS = [
    ((64, 48, 10), "relu", 0.0, "cross_entropy"),
    ((40, 96, 3), "tanh", 0.2, "mse"),  # dropout after the first layer; a ragged A and B
    ((33, 257, 7, 2), "sigmoid", 0.0, "cross_entropy"),  # odd widths: ragged slivers
    # few inputs: the weight gradient is computed as its transpose, X's rows gathered first
    ((13, 100, 1), "relu", 0.0, "mse"),
    ((8, 160, 3), "tanh", 0.0, "cross_entropy"),
]


def train(on, sizes, act, dropout, loss, dtype, opt_name, batch_size=32, n=300, epochs=2):
    rng = np.random.default_rng(sum(sizes))
    X = rng.standard_normal((n, sizes[0])).astype(dtype)
    if loss == "cross_entropy":
        y = rng.integers(0, sizes[-1], n)
    else:
        y = rng.standard_normal((n, sizes[-1])).astype(dtype)
    model = fastbp.MLP(list(sizes), activation=act, dropout=dropout, seed=1, dtype=dtype)
    opt = make_optimizer(opt_name, model)
    with indexed(on), model.profile() as prof:
        history = model.fit(
            X, y, loss=loss, optimizer=opt, epochs=epochs, batch_size=batch_size, seed=9
        )
    grads = [p.grad.copy() for p in model.parameters()]
    return model._params.tobytes(), grads, history.history["loss"], prof, model, opt


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("opt_name", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("sizes,act,dropout,loss", NETS)
def test_shuffled_fit_is_the_same_read_through_the_order(
    isa, dtype, threads, opt_name, sizes, act, dropout, loss
):
    with using_threads(threads):
        fast = train(True, sizes, act, dropout, loss, dtype, opt_name)
        gathered = train(False, sizes, act, dropout, loss, dtype, opt_name)
    batches = 2 * -(-300 // 32)
    assert fast[3].indexed_batch_count == batches, "the batches were gathered after all"
    assert gathered[3].indexed_batch_count == 0
    assert fast[0] == gathered[0]
    for a, b in zip(fast[1], gathered[1], strict=True):
        np.testing.assert_array_equal(a, b, strict=True)
    assert fast[2] == gathered[2]  # every epoch's loss, not to a tolerance
    state_a, state_b = fast[5].state_dict()["state"], gathered[5].state_dict()["state"]
    for key in state_a:
        for name in state_a[key]:
            np.testing.assert_array_equal(state_a[key][name], state_b[key][name], strict=True)


def test_what_is_not_read_through_the_order(dtype):
    """In order, a first op other than a Linear, a first layer within the direct path and a
    network small enough for the fused step all keep their own reads (the gather, or X in
    place): no batch counts as indexed."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 64)).astype(dtype)
    y = rng.integers(0, 10, 200)
    cases = [
        (fastbp.MLP([64, 48, 10], seed=0, dtype=dtype), {"shuffle": False}),
        (
            fastbp.Sequential(
                fastbp.Dropout(0.1),
                fastbp.Linear(64, 48, dtype=dtype),
                fastbp.Linear(48, 10, dtype=dtype),
            ),
            {},
        ),
        (fastbp.MLP([64, 3, 10], seed=0, dtype=dtype), {"batch_size": 4}),  # 4 x 64 x 3 MACs
    ]
    for model, kw in cases:
        with model.profile() as prof:
            model.fit(X, y, loss="cross_entropy", epochs=1, **{"batch_size": 32, "seed": 1, **kw})
        assert prof.batch_count > 0 and prof.indexed_batch_count == 0
    tiny = fastbp.MLP([2, 8, 10], seed=0, dtype=dtype)
    with tiny.profile() as prof:
        tiny.fit(X[:, :2].copy(), y, loss="cross_entropy", epochs=1, batch_size=1, seed=1)
    assert prof.fused_step_count > 0 and prof.indexed_batch_count == 0


@pytest.mark.parametrize("row", [0, 137, 299])
def test_the_first_epochs_check_sees_a_bad_row_read_through_the_order(monkeypatch, dtype, row):
    """X's NaN/inf check, deferred into the first epoch (as for an X of 4 MiB and more), runs
    in the first layer's packing of the indexed rows: the bad row stops the fit, which restores
    the model; a finite X trains exactly as with the gather."""
    monkeypatch.setattr(_model, "_DEFER_CHECK_MIN_BYTES", 0)
    monkeypatch.setattr(_model, "_DEFER_CHECK_STATE_RATIO", 0)
    rng = np.random.default_rng(2)
    X = rng.standard_normal((300, 64)).astype(dtype)
    y = rng.integers(0, 10, 300)
    bad = X.copy()
    bad[row, 63] = np.nan
    model = fastbp.MLP([64, 48, 10], seed=0, dtype=dtype)
    opt = optim.SGD(model.parameters(), lr=0.05)
    before = model._params.tobytes()
    with model.profile() as prof, pytest.raises(ValueError, match="X contains NaN"):
        model.fit(bad, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=32, seed=4)
    assert prof.indexed_batch_count > 0
    assert model._params.tobytes() == before
    results = []
    for on in (True, False):
        model = fastbp.MLP([64, 48, 10], seed=0, dtype=dtype)
        opt = optim.SGD(model.parameters(), lr=0.05)
        with indexed(on):
            model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=32, seed=4)
        results.append(model._params.tobytes())
    assert results[0] == results[1]
