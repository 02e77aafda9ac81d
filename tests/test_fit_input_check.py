"""fit's NaN/inf check of X inside its first epoch (``_FitUndo``).

For an X much larger than the model's state, fit does not scan X before training: each batch's
rows are checked as the first epoch reads them, and a bad row undoes the steps already taken.
The promise is the one the up-front scan kept: a NaN or infinity anywhere in X raises
``ValueError("X contains NaN or infinity")`` and leaves model and optimizer bitwise as they
were (parameters, gradients, BatchNorm statistics and counts, optimizer state and step,
dropout's stream, train/eval modes), so that the next fit gives the same bits as if the failed
one had never been called.

The size thresholds are lowered here (``deferred`` fixture) so that small, fast models take the
deferred path; two tests check the real ones (a 4 MiB X; a 25 MB X with SGD and with Adam).
predict and evaluate check X in their forwards too, with nothing to undo (the last section).
"""

from __future__ import annotations

import numpy as np
import pytest

import fastbp
from fastbp import _model, optim
from tests.conftest import using_threads


@pytest.fixture
def scans(monkeypatch):
    """The arrays fit's up-front NaN/inf scan read (by id)."""
    seen: list[int] = []
    real = _model._all_finite

    def spy(arr):
        seen.append(id(arr))
        return real(arr)

    monkeypatch.setattr(_model, "_all_finite", spy)
    return seen


@pytest.fixture
def deferred(monkeypatch, scans):
    """Every fit in the test defers its X check into the first epoch, whatever X's size."""
    monkeypatch.setattr(_model, "_DEFER_CHECK_MIN_BYTES", 0)
    monkeypatch.setattr(_model, "_DEFER_CHECK_STATE_RATIO", 0)
    return scans


def make_model(dtype=np.float32) -> fastbp.Sequential:
    """BatchNorm (running statistics, batch counts) and Dropout (its stream) next to Linears:
    every kind of state a fit changes."""
    fastbp.manual_seed(0)
    return fastbp.Sequential(
        fastbp.Linear(8, 16, dtype=dtype),
        fastbp.BatchNorm1d(16, dtype=dtype),
        fastbp.ReLU(),
        fastbp.Dropout(0.25),
        fastbp.Linear(16, 3, dtype=dtype),
    )


def make_optimizer(kind: str, model):
    if kind == "default":
        return None
    if kind == "sgd":
        return optim.SGD(model.parameters(), lr=0.05)
    if kind == "momentum":
        return optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    return optim.Adam(model.parameters(), lr=0.01)


def data(n=100, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 8)).astype(dtype)
    y = (X @ rng.standard_normal((8, 3))).argmax(axis=1).astype(np.int64)
    return X, y


def snapshot(model, opt) -> dict[str, object]:
    """Everything a fit may change, as bytes and plain values."""
    state = _model._flat_state(opt if opt is not None else model._fit_optimizer, model)
    return {
        "params": model._params.tobytes(),
        "grads": model._grads.tobytes(),
        "buffers": model._buffers.tobytes(),
        "optimizer": [None if a is None else a.tobytes() for a in state.arrays],
        "step": state.step,
        "dropout": model._plan.dropout_state(),
        "bn_batches": {op: model._plan.batchnorm_batches(op) for op in model._bn_ops.values()},
        "modes": (model.training, [layer.training for layer in model._layers]),
        "fit_optimizer": id(model._fit_optimizer),
    }


def fit_kwargs(path: str, X, y) -> dict[str, object]:
    """``fast``: several short epochs per call into C; ``per-epoch``: one epoch per turn of
    fit's Python loop (validation data forces it)."""
    kw: dict[str, object] = {"loss": "cross_entropy", "epochs": 3, "batch_size": 16}
    if path == "per-epoch":
        kw["validation_data"] = (X[:10], y[:10])
    return kw


BAD_ROWS = {"first": 0, "middle": 50, "last": 99}  # batch 0, batch 3, the last (partial) batch


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opt_kind", ["default", "sgd", "momentum", "adam"])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("path", ["fast", "per-epoch"])
def test_bad_row_undoes_the_first_epoch(deferred, dtype, opt_kind, shuffle, path):
    X, y = data(dtype=dtype)
    for where, row in BAD_ROWS.items():
        for value in (np.nan, np.inf, -np.inf):
            model = make_model(dtype)
            opt = make_optimizer(opt_kind, model)
            # some history first: nonzero optimizer state, gradients, counts, a used stream
            model.fit(X, y, loss="cross_entropy", optimizer=opt, batch_size=16, shuffle=False)
            model.eval()
            model[3].train()  # a layer whose mode differs from the model's
            before = snapshot(model, opt)
            twin = make_model(dtype)
            twin_opt = make_optimizer(opt_kind, twin)
            twin.fit(X, y, loss="cross_entropy", optimizer=twin_opt, batch_size=16, shuffle=False)
            twin.eval()
            twin[3].train()

            bad = X.copy()
            bad[row, 5] = value
            deferred.clear()
            kw = fit_kwargs(path, X, y)
            with model.profile() as prof, pytest.raises(ValueError, match="X contains NaN"):
                model.fit(bad, y, optimizer=opt, shuffle=shuffle, seed=7, **kw)
            assert id(bad) not in deferred, "fit scanned X up front: nothing was deferred"
            if not shuffle:  # in order: the batches before the bad row's were trained on
                trained = prof.forwards + prof.fused_step_count
                assert trained == row // 16, (where, trained)
            assert snapshot(model, opt) == before, (where, value)

            # nothing lingers: the next fit matches the twin's bitwise (the dropout stream and
            # the optimizer's step included: no seed, so the stream carries on)
            model.train()
            twin.train()
            model.fit(X, y, optimizer=opt, shuffle=False, **fit_kwargs(path, X, y))
            twin.fit(X, y, optimizer=twin_opt, shuffle=False, **fit_kwargs(path, X, y))
            assert model._params.tobytes() == twin._params.tobytes(), (where, value)
            assert model._buffers.tobytes() == twin._buffers.tobytes(), (where, value)


def test_a_default_optimizer_created_by_the_failed_fit_is_dropped(deferred):
    X, y = data()
    model = make_model()
    bad = X.copy()
    bad[60, 0] = np.nan
    with pytest.raises(ValueError, match="X contains NaN"):
        model.fit(bad, y, loss="cross_entropy", batch_size=16)
    assert model._fit_optimizer is None
    assert id(bad) not in deferred


def test_finite_x_trains_exactly_as_with_the_up_front_scan(monkeypatch, scans):
    """The deferred check changes no result: same bits as the up-front scan, 1 and 2 threads,
    both epoch loops, in order and shuffled."""
    X, y = data(200)
    for path in ("fast", "per-epoch"):
        for shuffle in (False, True):
            results = []
            for defer in (False, True):
                for threads in (1, 2):
                    monkeypatch.setattr(_model, "_DEFER_CHECK_MIN_BYTES", 0 if defer else 1 << 62)
                    monkeypatch.setattr(_model, "_DEFER_CHECK_STATE_RATIO", 0)
                    model = make_model()
                    opt = optim.Adam(model.parameters(), lr=0.01)
                    scans.clear()
                    with using_threads(threads):
                        model.fit(X, y, optimizer=opt, shuffle=shuffle, seed=3,
                                  **fit_kwargs(path, X, y))  # fmt: skip
                    assert (id(X) in scans) == (not defer)
                    results.append((model._params.tobytes(), model._buffers.tobytes()))
            assert all(r == results[0] for r in results), (path, shuffle)


def test_nan_loss_before_the_bad_row_still_reports_the_bad_x(deferred):
    """A loss that overflows in batch 0 stops fit (NonFiniteLossError) before the first epoch
    has read a NaN further on: the up-front check would have raised ValueError for that X and
    changed nothing, so fit scans the rest of X before reporting the loss."""
    X, y = data()
    model = fastbp.MLP([8, 16, 3], seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05)
    overflowing = X.copy()
    overflowing[2, :] = 3e38  # finite, but the products overflow and the loss is NaN
    for path in ("fast", "per-epoch"):
        with pytest.raises(fastbp.NonFiniteLossError, match=r"epoch 1, batch [1-5] "):
            model.fit(overflowing, y, optimizer=opt, shuffle=False, **fit_kwargs(path, X, y))
    model = fastbp.MLP([8, 16, 3], seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05)
    before = snapshot(model, opt)
    bad = overflowing.copy()
    bad[70, 1] = np.nan
    for path in ("fast", "per-epoch"):
        deferred.clear()
        with pytest.raises(ValueError, match="X contains NaN"):
            model.fit(bad, y, optimizer=opt, shuffle=False, **fit_kwargs(path, X, y))
        assert deferred.count(id(bad)) == 1  # the scan after the loss, not one up front
        assert snapshot(model, opt) == before


def test_skipped_nonfinite_losses_keep_checking_x(deferred):
    """stop_on_nonfinite=False skips a bad-loss batch and carries on: the rows after it are
    still checked."""
    X, y = data()
    model = fastbp.MLP([8, 16, 3], seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05)
    before = snapshot(model, opt)
    bad = X.copy()
    bad[2, :] = 3e38
    bad[70, 1] = np.inf
    with model.profile() as prof, pytest.raises(ValueError, match="X contains NaN"):
        model.fit(bad, y, optimizer=opt, shuffle=False, stop_on_nonfinite=False,
                  **fit_kwargs("per-epoch", X, y))  # fmt: skip
    assert prof.losses + prof.fused_step_count >= 4  # batch 0 skipped, batches 1-3 trained
    assert id(bad) not in deferred
    assert snapshot(model, opt) == before


@pytest.mark.parametrize("threads", [1, 2])
def test_parallel_gather_checks_every_row(deferred, threads):
    """Rows wide enough that the shuffled gather splits over threads (above 128 KiB a batch):
    a NaN in any thread's share is found."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((256, 1024)).astype(np.float32)
    y = rng.integers(0, 4, 256)
    for row in (0, 100, 255):
        model = fastbp.MLP([1024, 8, 4], seed=0)
        opt = optim.SGD(model.parameters(), lr=0.01)
        before = snapshot(model, opt)
        bad = X.copy()
        bad[row, 1023] = np.nan
        deferred.clear()
        with using_threads(threads), pytest.raises(ValueError, match="X contains NaN"):
            model.fit(bad, y, loss="cross_entropy", optimizer=opt, batch_size=64, seed=0)
        assert id(bad) not in deferred  # found by the gather's check, not by a NaN loss
        assert snapshot(model, opt) == before


def test_up_front_scan_where_the_undo_cannot_help(deferred):
    """Batch callbacks (they would see the steps), epochs=0 (no epoch reads X) and a step-API
    forward awaiting its backward (fit would overwrite its activations) keep the up-front scan:
    nothing runs, the pending backward still works."""
    X, y = data()
    bad = X.copy()
    bad[90, 0] = np.nan

    class BatchHook:
        calls = 0

        def on_batch_end(self, batch, logs):
            BatchHook.calls += 1

    model = make_model()
    with pytest.raises(ValueError, match="X contains NaN"):
        model.fit(bad, y, loss="cross_entropy", batch_size=16, callbacks=[BatchHook()])
    assert BatchHook.calls == 0
    assert id(bad) in deferred

    deferred.clear()
    with pytest.raises(ValueError, match="X contains NaN"):
        model.fit(bad, y, loss="cross_entropy", epochs=0)
    assert id(bad) in deferred

    model = fastbp.MLP([8, 16, 3], seed=0)
    out = model.forward(X[:16])
    deferred.clear()
    with pytest.raises(ValueError, match="X contains NaN"):
        model.fit(bad, y, loss="cross_entropy", batch_size=16)
    assert id(bad) in deferred
    model.backward(np.ones_like(out))  # the forward's activations are intact


def test_default_thresholds_defer_for_a_large_x(scans):
    """At the shipped thresholds a 4 MiB X (8x the model's state and more) is checked in the
    first epoch, and a 1 MiB one up front."""
    rng = np.random.default_rng(0)
    for rows, defer in ((4096, True), (1024, False)):
        X = rng.standard_normal((rows, 256)).astype(np.float32)
        y = rng.integers(0, 4, rows)
        model = fastbp.MLP([256, 16, 4], seed=0)
        scans.clear()
        model.fit(X, y, loss="cross_entropy", batch_size=128)
        assert (id(X) in scans) == (not defer), rows
        bad = X.copy()
        bad[-1, -1] = np.inf
        w0 = model._params.tobytes()
        with pytest.raises(ValueError, match="X contains NaN"):
            model.fit(bad, y, loss="cross_entropy", batch_size=128)
        assert model._params.tobytes() == w0


def test_the_optimizers_state_counts_toward_the_threshold(scans):
    """The undo copies the optimizer's buffers too: a 25 MB X is more than 8x a 256-1024-4 net's
    parameters and gradients (2.1 MB, plain SGD: deferred) but not with Adam's two moments as
    well (4.3 MB: scanned up front)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((24576, 256)).astype(np.float32)
    X[0, 0] = np.nan  # the first batch: a deferred check stops at once
    y = rng.integers(0, 4, 24576)
    for make_opt, deferred in (
        (lambda m: optim.SGD(m.parameters(), lr=0.1), True),
        (lambda m: optim.Adam(m.parameters(), lr=1e-3), False),
    ):
        model = fastbp.MLP([256, 1024, 4], seed=0)
        opt = make_opt(model)
        w0 = model._params.tobytes()
        scans.clear()
        with pytest.raises(ValueError, match="X contains NaN"):
            model.fit(X, y, loss="cross_entropy", optimizer=opt, batch_size=256, shuffle=False)
        assert (id(X) in scans) == (not deferred)
        assert model._params.tobytes() == w0


def test_integer_x_needs_no_scan(scans):
    """Integers convert to finite floats: fit does not scan them."""
    rng = np.random.default_rng(0)
    X = rng.integers(0, 255, (64, 8), dtype=np.uint8)
    y = rng.integers(0, 3, 64)
    model = fastbp.MLP([8, 4, 3], seed=0)
    model.fit(X, y, loss="cross_entropy", batch_size=16)
    assert scans == []
    ref = fastbp.MLP([8, 4, 3], seed=0)
    ref.fit(X.astype(np.float32), y, loss="cross_entropy", batch_size=16, seed=0)
    model2 = fastbp.MLP([8, 4, 3], seed=0)
    model2.fit(X, y, loss="cross_entropy", batch_size=16, seed=0)
    assert model2._params.tobytes() == ref._params.tobytes()


# in_features: a few columns; two and three K blocks (W3's 784); rows 4 KiB apart (A packed, not
# read in place). Batches of 50 leave an edge sliver of 2 rows (MR = 12 on AVX-512, 6 on AVX2).
FIRST_LAYER_SHAPES = [(33, 40), (784, 64), (1024, 300)]


@pytest.mark.parametrize(("in_features", "out_features"), FIRST_LAYER_SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_first_product_finds_every_position(
    deferred, isa, in_features, out_features, threads, dtype
):
    """The first layer's product checks the batch as it reads it: first and last value, a
    later K block, the edge sliver's rows; in place (in order) and gathered (shuffled), on every
    ISA path, and on two threads, where the product splits by columns and one thread checks."""
    rng = np.random.default_rng(in_features)
    n, batch = 200, 50
    X = rng.standard_normal((n, in_features)).astype(dtype)
    y = rng.integers(0, 4, n)
    positions = [(0, 0), (n - 1, in_features - 1), (120, in_features - 2), (149, in_features // 2)]
    for row, col in positions:
        for shuffle in (False, True):
            model = fastbp.MLP([in_features, out_features, 4], dtype=dtype, seed=0)
            opt = optim.SGD(model.parameters(), lr=0.01)
            before = snapshot(model, opt)
            bad = X.copy()
            bad[row, col] = np.nan if (row + col) % 2 else -np.inf
            deferred.clear()
            with using_threads(threads), pytest.raises(ValueError, match="X contains NaN"):
                model.fit(bad, y, loss="cross_entropy", optimizer=opt, batch_size=batch,
                          shuffle=shuffle, seed=0)  # fmt: skip
            assert id(bad) not in deferred, (row, col, shuffle)  # not by a NaN loss and a scan
            assert snapshot(model, opt) == before, (row, col, shuffle)


# ---- predict and evaluate: the same check in their forwards (nothing to undo) ----------------


def eval_models(dtype):
    """A Linear first (the product checks; a packed-size and a direct-size one) and a
    BatchNorm first (a pass of its own, before it runs)."""
    fastbp.manual_seed(1)
    return {
        "linear": fastbp.MLP([300, 64, 4], dtype=dtype, seed=0),
        "tiny-linear": fastbp.MLP([300, 1, 4], dtype=dtype, seed=0),
        "batchnorm-first": fastbp.Sequential(
            fastbp.BatchNorm1d(300, dtype=dtype), fastbp.Linear(300, 4, dtype=dtype)
        ),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_predict_and_evaluate_check_x_in_their_forwards(scans, isa, dtype, threads):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((500, 300)).astype(dtype)
    y = rng.integers(0, 4, 500)
    for name, model in eval_models(dtype).items():
        model.fit(X, y, loss="cross_entropy", batch_size=50, shuffle=False)  # BN statistics
        with using_threads(threads):
            expected = model.predict(X, batch_size=128)
            model.eval()
            assert model.forward(X[:128]).tobytes() == expected[:128].tobytes(), name
            model.train()
        state = (model._params.tobytes(), model._buffers.tobytes(), model.training)
        for row, col in ((0, 0), (250, 150), (499, 299)):
            bad = X.copy()
            bad[row, col] = np.nan if row % 2 else np.inf
            scans.clear()
            with using_threads(threads):
                with pytest.raises(ValueError, match="X contains NaN"):
                    model.predict(bad, batch_size=128)
                with pytest.raises(ValueError, match="X contains NaN"):
                    model.evaluate(bad, y, batch_size=128)
                assert model.predict(X, batch_size=128).tobytes() == expected.tobytes(), name
            assert id(bad) not in scans, name  # checked in C, not scanned up front
            assert (model._params.tobytes(), model._buffers.tobytes(), model.training) == state


def test_predict_scans_up_front_while_a_backward_is_pending(scans):
    """A step-API forward awaiting its backward: predict's forwards would overwrite its
    activations before a bad row stopped them, so X is scanned first and the backward works."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((64, 300)).astype(np.float32)
    model = fastbp.MLP([300, 64, 4], seed=0)
    out = model.forward(X[:16])
    bad = X.copy()
    bad[40, 7] = np.nan
    for call in (lambda: model.predict(bad), lambda: model.evaluate(bad, np.zeros(64, int))):
        with pytest.raises(ValueError, match="X contains NaN"):
            call()
    assert id(bad) in scans
    grad = model.backward(np.ones_like(out))
    assert np.isfinite(grad).all()
