"""Sequential.profile: per-op times of the C plan, with the counts they are summed over, and
no change to any result."""

from __future__ import annotations

import time

import numpy as np
import pytest

import fastbp
from fastbp.profiling import Profile

from .conftest import DTYPES, assert_same_training, build_mlp, training_result


def _data(n, n_in, classes, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, n_in)).astype(np.float32), rng.integers(0, classes, n)


def _fit(model, X, y, **kw):
    opt = kw.pop("optimizer", None) or fastbp.optim.SGD(model.parameters(), lr=0.05)
    return model.fit(X, y, loss="cross_entropy", optimizer=opt, shuffle=True, seed=3, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_profiling_changes_no_result(dtype, opt):
    """Same seed, same data: bitwise the same weights, gradients and losses with the clock on."""
    X, y = _data(300, 33, 7)
    X = X.astype(dtype)
    results = []
    for profiled in (False, True):
        model = build_mlp([33, 17, 7], ["relu"], dtype)
        make = fastbp.optim.Adam if opt == "adam" else fastbp.optim.SGD
        kw = {"lr": 1e-2} if opt == "adam" else {"lr": 0.1}
        optimizer = make(model.parameters(), **kw)
        if profiled:
            with model.profile():
                history = _fit(model, X, y, epochs=2, batch_size=32, optimizer=optimizer)
        else:
            history = _fit(model, X, y, epochs=2, batch_size=32, optimizer=optimizer)
        results.append(training_result(model, history["loss"]))
    assert_same_training(*results)


def test_fit_counts_and_times():
    X, y = _data(1000, 64, 10)
    model = fastbp.Sequential(
        fastbp.Linear(64, 48, rng=np.random.default_rng(0)),
        fastbp.ReLU(),
        fastbp.Dropout(0.2),
        fastbp.Linear(48, 32, rng=np.random.default_rng(1)),
        fastbp.Tanh(),
        fastbp.BatchNorm1d(32),
        fastbp.Linear(32, 10, rng=np.random.default_rng(2)),
    )
    steps = 2 * -(-1000 // 128)  # 2 epochs of 8 batches, the last one short
    val_batches = 2  # one forward of the 200 validation rows per epoch (batches of 1024)
    start = time.perf_counter()
    with model.profile() as prof:
        _fit(model, X, y, epochs=2, batch_size=128, validation_data=(X[:200], y[:200]))
    wall = time.perf_counter() - start
    assert isinstance(prof, Profile)
    assert (prof.backwards, prof.losses, prof.updates, prof.batch_count) == (steps,) * 4
    assert prof.forwards == steps + val_batches
    assert prof.fused_step_count == 0 and prof.fused_steps == 0
    names = [op.name for op in prof.ops]
    assert names == [
        "Linear(64, 48) + ReLU",
        "Dropout(0.2)",
        "Linear(48, 32) + Tanh",
        "BatchNorm1d(32)",
        "Linear(32, 10)",
    ]
    assert [op.layers for op in prof.ops] == [(0, 1), (2,), (3, 4), (5,), (6,)]
    for op in prof.ops:
        assert op.forward > 0, op.name
        linear = op.name.startswith("Linear")
        # the first layer has no input gradient; other ops' backward counts as input gradient
        assert (op.grad_input > 0) == (op.name != names[0]), op.name
        assert (op.grad_weights > 0) == linear, op.name
    assert prof.loss > 0 and prof.update > 0 and prof.batches > 0
    assert 0 < prof.total < wall
    table = prof.table()
    for name in names:
        assert name in table
    assert f"{steps + val_batches} forwards, {steps} backwards, {steps} updates" in table
    assert str(prof) == table


def test_step_api_counts():
    """forward / backward / optimizer.step outside fit count one pass each."""
    model = build_mlp([7, 5, 3], ["sigmoid"], np.float64)
    opt = fastbp.optim.SGD(model.parameters(), lr=0.1)
    x = np.random.default_rng(0).standard_normal((4, 7))
    with model.profile() as prof:
        out = model.forward(x)
        model.backward(np.ones_like(out))
        opt.step()
        model.eval()
        model.forward(x)
    assert (prof.forwards, prof.backwards, prof.updates, prof.losses) == (2, 1, 1, 0)
    assert prof.ops[0].forward > 0 and prof.ops[0].grad_weights > 0


def test_small_network_fused_steps():
    """A network for the one-kernel step is timed whole, per step."""
    model = fastbp.MLP([1, 2, 5, 1], activation="sigmoid", seed=0)
    assert model._plan.small_step_applies(1)
    x = np.linspace(0, 3, 50).reshape(-1, 1).astype(np.float32)
    with model.profile() as prof:
        model.fit(
            x,
            2.3 * x + 4.7,
            loss="mse",
            optimizer=fastbp.optim.Adam(model.parameters()),
            epochs=2,
            batch_size=1,
            shuffle=False,
        )
    assert prof.fused_step_count == 100 and prof.fused_steps > 0
    assert prof.backwards == 0 and all(op.forward == 0 for op in prof.ops)
    assert "fused small-network steps" in prof.table()


def test_profile_ends_with_the_block():
    X, y = _data(256, 16, 4)
    model = build_mlp([16, 40, 4], ["relu"], np.float32)  # past the fused small step
    with model.profile() as first:
        assert first.forwards == 0  # filled in when the block ends
        _fit(model, X, y, epochs=1, batch_size=64)
    counts = (first.forwards, first.backwards)
    _fit(model, X, y, epochs=1, batch_size=64)  # not profiled: nothing moves
    assert (first.forwards, first.backwards) == counts == (4, 4)
    with model.profile() as second:  # starts from zero
        _fit(model, X, y, epochs=1, batch_size=128)
    assert (second.forwards, second.backwards) == (2, 2)


def test_profile_filled_when_the_block_raises():
    X, y = _data(64, 16, 4)
    model = build_mlp([16, 40, 4], ["relu"], np.float32)  # past the fused small step
    with pytest.raises(KeyError), model.profile() as prof:
        _fit(model, X, y, epochs=1, batch_size=32)
        raise KeyError("user code")
    assert prof.backwards == 2
    with model.profile():  # profiling was turned off: a new block may start
        pass


def test_profiles_do_not_nest():
    model = build_mlp([4, 3, 2], ["relu"], np.float32)
    with model.profile(), pytest.raises(RuntimeError, match="already being profiled"):
        with model.profile():
            pass


def test_read_profile_checks_the_array_shape():
    model = build_mlp([4, 3, 2], ["relu"], np.float32)
    with pytest.raises(ValueError, match="shape"):
        model._plan.read_profile(np.zeros((1, 3)))
    off = np.full((len(model._op_layers), 3), np.nan)
    assert model._plan.read_profile(off)["forwards"] == 0  # never profiled: zeros
    assert not off.any()
