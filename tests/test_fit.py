"""Whole-epoch training: ``fit`` (history, determinism across seeds and thread counts, batch
order, argument errors, non-finite losses, callbacks, lr schedulers, the default optimizer,
interrupts), ``predict``, ``evaluate``, ``train_step`` and the optimizers' two paths and state
dicts.

Bitwise comparisons (``np.array_equal``) are used wherever the library promises determinism or
two routes run the same C code on the same data; numeric tolerances are derived where used.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch

import fastbp
from fastbp import CrossEntropyLoss, MSELoss, Parameter, _core, ops, optim
from fastbp._random import derive_seed
from fastbp.optim import lr_scheduler
from tests.conftest import using_threads


def classification_data(n=96, d=8, classes=3, seed=0, dtype=np.float32):
    """Linearly separable-ish labels from a random projection: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = (X @ rng.standard_normal((d, classes))).argmax(axis=1)
    return X.astype(dtype), y.astype(np.int64)


def regression_data(n=64, d=4, out=2, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    Y = np.tanh(X @ rng.standard_normal((d, out)))
    return X.astype(dtype), Y.astype(dtype)


def flat_weights(model) -> np.ndarray:
    return model._params.copy()


# ---- History ---------------------------------------------------------------------------------


def test_history_has_per_epoch_metrics():
    X, y = classification_data()
    Xv, yv = classification_data(40, seed=1)
    model = fastbp.MLP([8, 16, 3], seed=0)
    opt = optim.Adam(model.parameters(), lr=0.02)
    hist = model.fit(
        X, y, loss="cross_entropy", optimizer=opt, epochs=4, batch_size=16, seed=1,
        validation_data=(Xv, yv),
    )  # fmt: skip
    assert isinstance(hist, fastbp.History)
    assert hist.epoch == [0, 1, 2, 3]
    assert set(hist.history) == {
        "loss", "time", "samples_per_sec", "lr", "val_loss", "val_accuracy"
    }  # fmt: skip
    assert all(len(v) == 4 for v in hist.history.values())
    assert hist["lr"] == [0.02] * 4
    assert all(t > 0 for t in hist["time"])
    for t, sps in zip(hist["time"], hist["samples_per_sec"], strict=True):
        assert sps * t == pytest.approx(len(X), rel=1e-9)
    assert all(0 <= a <= 1 for a in hist["val_accuracy"])
    assert hist["loss"][-1] < 0.7 * hist["loss"][0]  # it learns
    # the last validation entry is the final model's evaluation
    final = model.evaluate(Xv, yv)
    assert hist["val_loss"][-1] == final["loss"]
    assert hist["val_accuracy"][-1] == final["accuracy"]
    assert "epochs=4" in repr(hist)


def test_history_without_validation_and_regression_validation():
    X, Y = regression_data()
    model = fastbp.MLP([4, 8, 2], seed=0)
    hist = model.fit(X, Y, epochs=2, batch_size=16, seed=0)
    assert set(hist.history) == {"loss", "time", "samples_per_sec", "lr"}
    hist = model.fit(X, Y, epochs=1, batch_size=16, seed=0, validation_data=(X[:10], Y[:10]))
    assert set(hist.history) == {"loss", "time", "samples_per_sec", "lr", "val_loss"}
    with pytest.raises(ValueError, match="validation_data"):
        model.fit(X, Y, validation_data=(X,))
    with pytest.raises(ValueError, match="validation"):
        model.fit(X, Y, validation_data=(X[:, :3], Y))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_epoch_loss_is_the_mean_over_samples(loss):
    """With lr = 0 the weights never move, so each epoch's loss must equal the loss of the whole
    data set: the row-weighted mean of the batch losses (100 rows in batches of 32: the last
    batch has 4 rows, so an unweighted mean of batch means would differ by far more than the
    float64 rounding of ~100 terms, <= 1e-13 relative)."""
    if loss == "mse":
        X, y = regression_data(100, dtype=np.float64)
        model = fastbp.MLP([4, 8, 2], dtype=np.float64, seed=0)
    else:
        X, y = classification_data(100, dtype=np.float64)
        model = fastbp.MLP([8, 8, 3], dtype=np.float64, seed=0)
    w0 = flat_weights(model)
    opt = optim.SGD(model.parameters(), lr=0.0)
    hist = model.fit(X, y, loss=loss, optimizer=opt, epochs=2, batch_size=32, seed=0)
    assert np.array_equal(model._params, w0)
    expected = model.evaluate(X, y, loss=loss)["loss"]
    assert hist["loss"] == pytest.approx([expected, expected], rel=1e-12)


# ---- determinism ---------------------------------------------------------------------------------


def test_same_seed_gives_bitwise_identical_weights():
    X, y = classification_data(200)
    runs = []
    for _ in range(2):
        model = fastbp.MLP([8, 32, 16, 3], dropout=0.3, seed=0)
        hist = model.fit(X, y, loss="cross_entropy", epochs=3, batch_size=16, seed=42)
        runs.append((flat_weights(model), hist["loss"]))
    assert np.array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_different_seeds_give_different_weights():
    X, y = classification_data(200)
    weights = []
    for seed in (1, 2):
        model = fastbp.MLP([8, 32, 3], seed=0)
        model.fit(X, y, loss="cross_entropy", epochs=1, batch_size=16, seed=seed)
        weights.append(flat_weights(model))
    assert not np.array_equal(weights[0], weights[1])


def test_hyperparameters_edited_between_fits_are_checked_and_used():
    """fit pushes param_groups to C once per epoch and skips the checks when nothing changed:
    an edit, in value or in type, or inside a betas list, is still checked and used."""
    X, y = classification_data(64)
    model = fastbp.MLP([8, 16, 3], seed=0)
    opt = fastbp.optim.SGD(model.parameters(), lr=0.1)
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=16, seed=1)
    for bad, error in ((True, TypeError), (float("nan"), ValueError), (-1.0, ValueError)):
        opt.param_groups[0]["lr"] = bad
        with pytest.raises(error, match="lr"):
            model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=16)
    opt.param_groups[0]["lr"] = 0.0  # a valid edit takes effect: nothing moves
    before = flat_weights(model)
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=16, seed=1)
    np.testing.assert_array_equal(flat_weights(model), before)
    adam_model = fastbp.MLP([8, 16, 3], seed=0)
    adam = fastbp.optim.Adam(adam_model.parameters(), lr=0.01, betas=[0.9, 0.999])
    betas = [0.9, 0.99]
    adam.param_groups[0]["betas"] = betas
    adam_model.fit(X, y, loss="cross_entropy", optimizer=adam, epochs=1, batch_size=16, seed=1)
    betas[1] = 1.5  # the same list, edited in place
    with pytest.raises(ValueError, match="betas"):
        adam_model.fit(X, y, loss="cross_entropy", optimizer=adam, epochs=1, batch_size=16)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_short_epochs_in_one_c_call_equal_one_call_per_epoch(shuffle, opt_name):
    """Without callbacks, validation, scheduler or printing, short epochs run several per call
    into C: the same weights, bitwise, and the same History (losses equal, the same keys) as the
    general loop, which a no-op callback selects. 200 epochs: the calls double from one epoch
    to 73 (past train_epochs' 64 on-stack slots)."""
    X, y = classification_data(50)  # 50 rows, batch 8: a short last batch every epoch
    runs = []
    for callbacks in (None, [lambda epoch, logs: None]):
        model = fastbp.MLP([8, 16, 3], dropout=0.2, seed=0, dtype=np.float64)
        opt = (
            optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            if opt_name == "sgd"
            else optim.Adam(model.parameters(), lr=0.01)
        )
        hist = model.fit(
            X, y, loss="cross_entropy", optimizer=opt, epochs=200, batch_size=8,
            shuffle=shuffle, seed=3, callbacks=callbacks,
        )  # fmt: skip
        runs.append((flat_weights(model), hist))
    (w_fast, h_fast), (w_loop, h_loop) = runs
    np.testing.assert_array_equal(w_fast, w_loop)
    assert h_fast["loss"] == h_loop["loss"] and len(h_fast["loss"]) == 200
    assert h_fast.epoch == h_loop.epoch == list(range(200))
    assert set(h_fast.history) == set(h_loop.history)
    assert all(t > 0 for t in h_fast["time"])


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_epoch_loss_does_not_depend_on_how_the_epoch_is_split_into_c_calls(
    monkeypatch, skip_nonfinite
):
    """fit calls into C in chunks of batches sized by how long the last call took, so where the
    chunks end depends on the machine's speed at the moment. The epoch's loss must not: it is one
    running sum over the batches, in order, across chunks (it was a sum of per-chunk sums, whose
    last bits changed with the chunking: seen as a rare failure on a loaded machine). With
    skip_nonfinite, a batch whose loss overflows ends a chunk early and is left out."""
    from fastbp import _model

    monkeypatch.setattr(_model, "_CHUNK_SECONDS", 0.0)  # chunks keep their first size
    if skip_nonfinite:
        X, T = regression_data(200, dtype=np.float64)
        T[13] = 1e300  # its batch's squared error overflows
        loss, sizes, dtype = "mse", [4, 32, 2], np.float64
    else:
        X, T = classification_data(200)
        loss, sizes, dtype = "cross_entropy", [8, 32, 3], np.float32
    histories = []
    for chunk in (1, 3, 29):  # batches per call into C (29: the whole epoch)
        monkeypatch.setattr(_model.Sequential, "_first_chunk", lambda self, *a, c=chunk: c)
        model = fastbp.MLP(sizes, seed=0, dtype=dtype)
        opt = optim.SGD(model.parameters(), lr=0.01)
        hist = model.fit(
            X, T, loss=loss, optimizer=opt, epochs=3, batch_size=7, seed=1,
            callbacks=[lambda epoch, logs: None], stop_on_nonfinite=not skip_nonfinite,
        )  # fmt: skip
        assert all(math.isfinite(v) for v in hist["loss"])
        assert hist.history.get("skipped_batches", [0] * 3) == [int(skip_nonfinite)] * 3
        histories.append(hist["loss"])
    assert histories[0] == histories[1] == histories[2]


def test_short_epochs_stop_at_a_nonfinite_loss_like_the_general_loop():
    X = np.ones((12, 2))
    T = np.zeros((12, 1))
    T[7] = 1e300  # batch 2 of every epoch (batch size 4, no shuffle)
    messages, weights = [], []
    for callbacks in (None, [lambda epoch, logs: None]):
        model = fastbp.MLP([2, 1], dtype=np.float64, seed=0)
        opt = optim.SGD(model.parameters(), lr=0.01)
        with pytest.raises(fastbp.NonFiniteLossError) as info:
            model.fit(X, T, loss="mse", optimizer=opt, epochs=5, batch_size=4, shuffle=False,
                      callbacks=callbacks)  # fmt: skip
        messages.append(str(info.value))
        weights.append(flat_weights(model))
    assert messages[0] == messages[1] and "epoch 1, batch 2 (of 3)" in messages[0]
    np.testing.assert_array_equal(weights[0], weights[1])


def test_no_seed_gives_a_fresh_order_and_dropout_each_fit():
    """seed=None draws a new 63-bit seed from the OS for every fit: two fits from the same
    weights take different paths (shuffled order, dropout masks)."""
    from fastbp._random import fresh_seed

    seeds = {fresh_seed() for _ in range(200)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    X, y = classification_data(200)
    weights = []
    for _ in range(2):
        model = fastbp.MLP([8, 32, 3], dropout=0.2, seed=0)
        model.fit(X, y, loss="cross_entropy", epochs=1, batch_size=16)
        weights.append(flat_weights(model))
    assert not np.array_equal(weights[0], weights[1])


@pytest.mark.parametrize("width", [1, 8, 31, 32, 33, 63, 64, 100])
def test_derived_seeds_are_numpys_seed_sequence(width):
    """derive_seed (the per-epoch shuffle seeds, dropout streams, MLP's init) is computed in C;
    it must stay bitwise numpy's SeedSequence, so every seed keeps meaning what it meant: entropy
    of 1-9 ints of up to `width` bits (words split as numpy splits them, zero as one word)."""
    from fastbp._random import derive_seed

    rng = np.random.default_rng(width)
    cases = [(0,), (0, 0, 0), (2**63 - 1, 0, 5), (np.uint64(5), np.int64(3)), (10**700, 2, 1)]
    for _ in range(300):
        k = int(rng.integers(1, 10))
        cases.append(
            tuple(int.from_bytes(rng.bytes(16), "little") >> (128 - width) for _ in range(k))
        )
    for entropy in cases:
        expected = np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0]
        assert derive_seed(*entropy) == int(expected), entropy


def test_derived_seeds_refuse_what_seed_sequence_refuses():
    from fastbp._random import derive_seed

    for bad in [(-1,), (3, -2), (1.5,), (2.0,)]:
        with pytest.raises((ValueError, TypeError)):
            np.random.SeedSequence(list(bad))
        with pytest.raises((ValueError, TypeError)):
            derive_seed(*bad)


def test_same_weights_for_one_and_two_threads():
    """784-256-10 on 2048 samples in batches of 256 with dropout: the first layer's GEMMs are
    256 x 784 x 256 = 51M multiply-adds, ~100x the 2^19 per-thread grain of csrc/gemm.c, so
    two threads really split them. Weights (and predictions) must not depend on the count."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2048, 784)).astype(np.float32)
    y = rng.integers(0, 10, 2048)
    weights, preds = [], []
    for threads in (1, 2):
        model = fastbp.MLP([784, 256, 10], dropout=0.2, seed=0)
        with using_threads(threads):
            assert fastbp.get_num_threads() == threads
            model.fit(X, y, loss="cross_entropy", epochs=1, batch_size=256, seed=3)
            preds.append(model.predict(X))
        weights.append(flat_weights(model))
    assert np.array_equal(weights[0], weights[1])
    assert np.array_equal(preds[0], preds[1])


def step_api_epoch(model, X, Y, loss_fn, opt, batch_size, order=None):
    """One epoch with the step API (zero_grad, forward, loss, backward, step) in `order`."""
    order = np.arange(len(X)) if order is None else order
    for start in range(0, len(X), batch_size):
        idx = order[start : start + batch_size]
        opt.zero_grad()
        out = model.forward(X[idx])
        loss_fn(out, Y[idx])
        model.backward(loss_fn.backward())
        opt.step()


def test_shuffle_false_trains_in_sequential_order():
    """fit(shuffle=False) equals the step API over consecutive slices, bitwise (same kernels,
    same data), for any seed; shuffle=True does not."""
    X, Y = regression_data(50)
    ref = fastbp.MLP([4, 8, 2], seed=0)
    opt = optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        step_api_epoch(ref, X, Y, MSELoss(), opt, 10)
    for seed in (0, 1):
        model = fastbp.MLP([4, 8, 2], seed=0)
        opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.fit(X, Y, optimizer=opt, epochs=2, batch_size=10, shuffle=False, seed=seed)
        assert np.array_equal(model._params, ref._params)
    model = fastbp.MLP([4, 8, 2], seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.fit(X, Y, optimizer=opt, epochs=2, batch_size=10, shuffle=True, seed=0)
    assert not np.array_equal(model._params, ref._params)


def test_consecutive_batches_read_in_place_equal_copied_ones():
    """A batch of consecutive rows (shuffle=False) is read straight from X, a shuffled one is
    gathered into a copy: a net above the fused small-step size trains bitwise as the step API
    does on copies in both cases. Once fit returns the plan keeps no reference to X: a backward
    without a forward is refused (Python refuses it after any fit)."""
    X, Y = regression_data(60)
    X = np.ascontiguousarray(np.tile(X, (1, 10)))  # 40 inputs: 1280 weights in the first layer
    for shuffle in (False, True):
        order = np.arange(len(X), dtype=np.int64)
        if shuffle:  # fit's order for seed 3, epoch 0
            _core.shuffle(order, derive_seed(3, 0, 0))
        ref = fastbp.MLP([40, 32, 2], seed=0)
        opt = optim.Adam(ref.parameters(), lr=0.01)
        step_api_epoch(ref, X, Y, MSELoss(), opt, 10, order)
        model = fastbp.MLP([40, 32, 2], seed=0)
        assert not model._plan.small_step_applies(10)
        opt = optim.Adam(model.parameters(), lr=0.01)
        model.fit(X, Y, optimizer=opt, epochs=1, batch_size=10, shuffle=shuffle, seed=3)
        assert np.array_equal(model._params, ref._params)
        if not shuffle:  # the last batch was X's own rows
            with pytest.raises(RuntimeError, match="call forward"):
                model._plan.backward(np.ones((10, 2), np.float32), None)


# ---- argument errors ---------------------------------------------------------------------------------


def test_zero_epochs_is_a_no_op():
    X, y = classification_data()
    model = fastbp.MLP([8, 4, 3], seed=0)
    w0 = flat_weights(model)
    hist = model.fit(X, y, loss="cross_entropy", epochs=0)
    assert hist.history == {} and hist.epoch == []
    assert np.array_equal(model._params, w0)


def test_batch_size_larger_than_data_warns_and_clips():
    X, y = classification_data(40)
    a = fastbp.MLP([8, 4, 3], seed=0)
    with pytest.warns(UserWarning, match="batch_size=100.*40"):
        a.fit(X, y, loss="cross_entropy", epochs=2, batch_size=100, seed=0)
    b = fastbp.MLP([8, 4, 3], seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b.fit(X, y, loss="cross_entropy", epochs=2, batch_size=40, seed=0)
    assert np.array_equal(a._params, b._params)


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"batch_size": 0}, ValueError),
        ({"batch_size": -1}, ValueError),
        ({"batch_size": 2.5}, TypeError),
        ({"epochs": -1}, ValueError),
        ({"epochs": 1.0}, TypeError),
        ({"loss": "hinge"}, ValueError),
        ({"optimizer": "adam"}, TypeError),
    ],
)
def test_bad_fit_arguments(kwargs, exc):
    X, y = classification_data(20)
    model = fastbp.MLP([8, 4, 3], seed=0)
    w0 = flat_weights(model)
    args = {"loss": "cross_entropy", "batch_size": 8} | kwargs
    with pytest.raises(exc):
        model.fit(X, y, **args)
    assert np.array_equal(model._params, w0)


def test_bad_regression_targets_and_inputs():
    X, Y = regression_data(30)
    model = fastbp.MLP([4, 4, 2], seed=0)
    w0 = flat_weights(model)
    with pytest.raises(TypeError, match="real array"):
        model.fit(X, Y > 0, batch_size=8)
    with pytest.raises(ValueError, match=r"shape \(30, 2\)"):
        model.fit(X, Y[:, :1], batch_size=8)
    with pytest.raises(TypeError, match="real array"):
        model.fit(X > 0, Y, batch_size=8)
    with pytest.raises(ValueError, match="no samples"):
        model.fit(X[:0], Y[:0], batch_size=8)
    with pytest.raises(ValueError, match=re.escape("reshape(1, -1)")):
        model.fit(X[0], Y[0], batch_size=8)
    with pytest.raises(ValueError, match="3 features"):
        model.fit(X[:, :3], Y, batch_size=8)
    assert np.array_equal(model._params, w0)
    # fit converts other real dtypes (unlike forward): float64 and int data train a float32 model
    hist = model.fit(X.astype(np.float64), np.round(Y * 3).astype(np.int32), batch_size=8)
    assert math.isfinite(hist["loss"][0])


@pytest.mark.parametrize("bad", [3, -1])
def test_labels_out_of_range_leave_weights_unchanged(bad):
    X, y = classification_data(30)
    y[17] = bad
    model = fastbp.MLP([8, 4, 3], seed=0)
    w0 = flat_weights(model)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        model.fit(X, y, loss="cross_entropy", epochs=1, batch_size=8)
    assert np.array_equal(model._params, w0)
    with pytest.raises(TypeError):
        model.fit(X, y.astype(np.float32), loss="cross_entropy")
    with pytest.raises(ValueError):
        model.fit(X, y[:-1], loss="cross_entropy")
    good = y.copy()
    good[17] = 0
    with pytest.raises(ValueError, match="validation y"):
        model.fit(X, good, loss="cross_entropy", batch_size=8, validation_data=(X, y))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        model.evaluate(X, y)
    assert np.array_equal(model._params, w0)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_data_is_rejected(value):
    X, Y = regression_data(30)
    model = fastbp.MLP([4, 4, 2], seed=0)
    w0 = flat_weights(model)
    bad_X = X.copy()
    bad_X[3, 1] = value
    with pytest.raises(ValueError, match="NaN or infinity"):
        model.fit(bad_X, Y, batch_size=8)
    bad_Y = Y.copy()
    bad_Y[5, 0] = value
    with pytest.raises(ValueError, match="NaN or infinity"):
        model.fit(X, bad_Y, batch_size=8)
    with pytest.raises(ValueError, match="NaN or infinity"):
        model.fit(X, Y, batch_size=8, validation_data=(bad_X, Y))
    assert np.array_equal(model._params, w0)


def test_batchnorm_with_a_last_batch_of_one_is_rejected_up_front():
    X, y = classification_data(33)
    model = fastbp.Sequential(fastbp.Linear(8, 6), fastbp.BatchNorm1d(6), fastbp.Linear(6, 3))
    w0 = flat_weights(model)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        model.fit(X, y, loss="cross_entropy", batch_size=16)
    assert np.array_equal(model._params, w0)
    model.fit(X, y, loss="cross_entropy", batch_size=11)  # 3 batches of 11: fine


# ---- non-finite losses ----------------------------------------------------------------------------


def test_non_finite_loss_raises_naming_epoch_and_batch_with_last_good_weights():
    """lr = 1e30 on a regression blows up within a few steps. The error names the (1-based)
    epoch and batch, and the weights are exactly those after the last finite step, which we
    reproduce with the step API over the batches before the failing one (shuffle=False)."""
    X, Y = regression_data(64)
    model = fastbp.MLP([4, 8, 2], seed=0)
    opt = optim.SGD(model.parameters(), lr=1e30)
    with pytest.raises(fastbp.NonFiniteLossError) as info:
        model.fit(X, Y, optimizer=opt, epochs=3, batch_size=8, shuffle=False)
    assert isinstance(info.value, FloatingPointError)
    match = re.search(r"epoch (\d+), batch (\d+)", str(info.value))
    assert match, str(info.value)
    epoch, batch = int(match[1]), int(match[2])
    assert epoch == 1 and batch >= 2
    assert np.isfinite(model._params).all()

    ref = fastbp.MLP([4, 8, 2], seed=0)
    ref_opt = optim.SGD(ref.parameters(), lr=1e30)
    step_api_epoch(ref, X[: (batch - 1) * 8], Y[: (batch - 1) * 8], MSELoss(), ref_opt, 8)
    assert np.array_equal(model._params, ref._params)
    # the error is recoverable: lower the learning rate and carry on from finite weights
    model.load_state_dict(fastbp.MLP([4, 8, 2], seed=0).state_dict())
    opt.param_groups[0]["lr"] = 0.01
    assert math.isfinite(model.fit(X, Y, optimizer=opt, epochs=1)["loss"][0])


def test_stop_on_nonfinite_false_skips_batches():
    X, Y = regression_data(64)
    model = fastbp.MLP([4, 8, 2], seed=0)
    opt = optim.SGD(model.parameters(), lr=1e30)
    hist = model.fit(X, Y, optimizer=opt, epochs=2, batch_size=8, seed=0, stop_on_nonfinite=False)
    assert "skipped_batches" in hist.history
    skipped = hist["skipped_batches"]
    assert len(skipped) == 2 and all(1 <= s <= 8 for s in skipped)
    assert np.isfinite(model._params).all()
    assert np.isfinite(hist["loss"][0])  # the first batches were finite


def test_an_epoch_whose_batches_were_all_skipped_has_nan_loss():
    """When every batch of an epoch is skipped nothing was trained or measured: the epoch's
    loss must be NaN, not 0.0 (a perfect loss)."""
    X, Y = regression_data(64)
    model = fastbp.MLP([4, 8, 2], seed=0)
    opt = optim.SGD(model.parameters(), lr=1e30)
    hist = model.fit(X, Y, optimizer=opt, epochs=3, batch_size=8, seed=0, stop_on_nonfinite=False)
    assert hist["skipped_batches"][-1] == 8  # the weights are large: every batch overflows
    assert math.isnan(hist["loss"][-1]), hist["loss"]


# ---- callbacks and interrupts ----------------------------------------------------------------------


class Recorder:
    """A callback object: records on_epoch_end and on_batch_end calls."""

    def __init__(self):
        self.epochs: list[tuple[int, dict]] = []
        self.batches: list[tuple[int, int]] = []

    def on_epoch_end(self, epoch, logs):
        self.epochs.append((epoch, dict(logs)))

    def on_batch_end(self, batch, logs):
        self.batches.append((logs["epoch"], batch))
        assert math.isfinite(logs["loss"])


def test_callbacks_are_called_with_the_right_epochs():
    X, y = classification_data(64)
    model = fastbp.MLP([8, 4, 3], seed=0)
    calls = []
    rec = Recorder()
    hist = model.fit(
        X, y, loss="cross_entropy", epochs=3, batch_size=8, seed=0,
        callbacks=[lambda epoch, logs: calls.append((epoch, dict(logs))), rec],
    )  # fmt: skip
    assert [e for e, _ in calls] == [0, 1, 2]
    assert [e for e, _ in rec.epochs] == [0, 1, 2]
    for e, logs in calls:
        assert logs["loss"] == hist["loss"][e]
    assert rec.epochs[1][1]["loss"] == hist["loss"][1]
    # batch callbacks: in order within each epoch, ending on the last batch of each epoch
    for epoch in range(3):
        batches = [b for e, b in rec.batches if e == epoch]
        assert batches and batches == sorted(set(batches)) and batches[-1] == 7


def test_on_batch_end_is_called_for_every_batch():
    """on_batch_end(batch, logs) is called once per batch (batches 0..7 of each epoch), as its
    name and Keras' callback of the same name promise."""
    X, y = classification_data(64)
    model = fastbp.MLP([8, 4, 3], seed=0)
    rec = Recorder()
    model.fit(X, y, loss="cross_entropy", epochs=2, batch_size=8, seed=0, callbacks=[rec])
    assert rec.batches == [(e, b) for e in range(2) for b in range(8)]


class InterruptAt:
    def __init__(self, epoch, batch):
        self.epoch, self.batch, self.seen = epoch, batch, []

    def on_batch_end(self, batch, logs):
        self.seen.append((logs["epoch"], batch))
        if (logs["epoch"], batch) >= (self.epoch, self.batch):
            raise KeyboardInterrupt


def test_keyboard_interrupt_in_a_callback_stops_fit_cleanly():
    X, y = classification_data(256)
    model = fastbp.MLP([8, 16, 3], dropout=0.1, seed=0)
    w0 = flat_weights(model)
    cb = InterruptAt(1, 3)
    with pytest.raises(KeyboardInterrupt):
        model.fit(X, y, loss="cross_entropy", epochs=5, batch_size=8, seed=0, callbacks=[cb])
    assert cb.seen[-1][0] == 1  # stopped in epoch 1 (0-based), not later
    assert np.isfinite(model._params).all()
    assert not np.array_equal(model._params, w0)  # it had trained
    before = flat_weights(model)
    hist = model.fit(X, y, loss="cross_entropy", epochs=1, batch_size=8, seed=1)
    assert math.isfinite(hist["loss"][0])
    assert not np.array_equal(model._params, before)
    assert model.predict(X[:3]).shape == (3, 3)


# ---- lr schedulers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("StepLR", {"step_size": 2, "gamma": 0.5}),
        ("CosineAnnealingLR", {"T_max": 4, "eta_min": 0.001}),
        ("ExponentialLR", {"gamma": 0.8}),
    ],
)
def test_scheduler_lr_per_epoch_matches_torch(name, kwargs):
    """history['lr'][e] is the lr used in epoch e, as torch's scheduler gives it when stepped
    once per epoch. torch computes the chainable (recursive) form, which drifts from the closed
    form by about one rounding per step: rel 1e-12 over 7 epochs is far below any schedule
    difference (the smallest consecutive lr change here is > 1e-3 relative)."""
    X, y = classification_data(32)
    model = fastbp.MLP([8, 4, 3], seed=0)
    opt = optim.SGD(model.parameters(), lr=0.1)
    sched = getattr(lr_scheduler, name)(opt, **kwargs)
    hist = model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=7, batch_size=8,
                     lr_scheduler=sched, seed=0)  # fmt: skip

    param = torch.nn.Parameter(torch.zeros(1))
    t_opt = torch.optim.SGD([param], lr=0.1)
    t_sched = getattr(torch.optim.lr_scheduler, name)(t_opt, **kwargs)
    expected = []
    for _ in range(7):
        expected.append(t_opt.param_groups[0]["lr"])
        t_opt.step()
        t_sched.step()
    assert hist["lr"] == pytest.approx(expected, rel=1e-12, abs=0)
    assert len(set(hist["lr"])) > 2
    assert opt.param_groups[0]["lr"] == pytest.approx(t_opt.param_groups[0]["lr"], rel=1e-12)


def test_scheduled_lr_is_the_lr_training_uses():
    """A StepLR halving every epoch equals three one-epoch fits at lr 0.1, 0.05, 0.025."""
    X, Y = regression_data(40)
    a = fastbp.MLP([4, 6, 2], seed=0)
    opt_a = optim.SGD(a.parameters(), lr=0.1, momentum=0.5)
    sched = lr_scheduler.StepLR(opt_a, step_size=1, gamma=0.5)
    a.fit(X, Y, optimizer=opt_a, epochs=3, batch_size=10, shuffle=False, lr_scheduler=sched)
    b = fastbp.MLP([4, 6, 2], seed=0)
    opt_b = optim.SGD(b.parameters(), lr=0.1, momentum=0.5)
    for lr in (0.1, 0.05, 0.025):
        opt_b.param_groups[0]["lr"] = lr
        b.fit(X, Y, optimizer=opt_b, epochs=1, batch_size=10, shuffle=False)
    assert np.array_equal(a._params, b._params)


@pytest.mark.parametrize(
    "make",
    [
        lambda o: lr_scheduler.StepLR(o, step_size=0),
        lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0),
        lambda o: lr_scheduler.ExponentialLR(o, gamma=-1),
        lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=0),
        lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=2.5),
    ],
)
def test_scheduler_argument_errors(make):
    opt = optim.SGD([Parameter(np.zeros(2))], lr=0.1)
    with pytest.raises(ValueError):
        make(opt)
    assert opt.param_groups[0]["lr"] == 0.1


def test_scheduler_needs_an_optimizer():
    with pytest.raises(TypeError):
        lr_scheduler.StepLR(object(), step_size=1)


# ---- the default optimizer ----------------------------------------------------------------------------


def test_default_optimizer_is_adam_1e3_and_is_reused():
    X, y = classification_data(64)
    a = fastbp.MLP([8, 6, 3], seed=0)
    a.fit(X, y, loss="cross_entropy", epochs=1, batch_size=16, seed=0)
    first = a._fit_optimizer
    assert type(first) is optim.Adam
    assert first.param_groups[0]["lr"] == 1e-3
    assert first.param_groups[0]["betas"] == (0.9, 0.999)
    a.fit(X, y, loss="cross_entropy", epochs=1, batch_size=16, seed=1)
    assert a._fit_optimizer is first
    assert first.state_dict()["state"][0]["step"] == 8  # 2 fits x 4 batches: state carried on

    b = fastbp.MLP([8, 6, 3], seed=0)
    opt = optim.Adam(b.parameters(), lr=1e-3)
    b.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=16, seed=0)
    b.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=16, seed=1)
    assert np.array_equal(a._params, b._params)


def test_fit_rejects_an_optimizer_over_other_parameters():
    X, y = classification_data(16)
    model = fastbp.MLP([8, 4, 3], seed=0)
    other = fastbp.MLP([8, 4, 3], seed=0)
    with pytest.raises(ValueError, match="this model's parameters"):
        model.fit(X, y, loss="cross_entropy", optimizer=optim.SGD(other.parameters(), lr=0.1),
                  batch_size=8)  # fmt: skip
    subset = optim.SGD(list(model.parameters())[:2], lr=0.1)
    with pytest.raises(ValueError, match="this model's parameters"):
        model.fit(X, y, loss="cross_entropy", optimizer=subset, batch_size=8)
    with pytest.raises(ValueError):
        model.train_step(X, y, "cross_entropy", optim.SGD(other.parameters(), lr=0.1))


# ---- predict and evaluate ------------------------------------------------------------------------------


def test_predict_is_eval_mode_and_batch_independent():
    X, _ = classification_data(1000, d=30)
    model = fastbp.Sequential(
        fastbp.Linear(30, 64, rng=np.random.default_rng(0)),
        fastbp.BatchNorm1d(64),
        fastbp.ReLU(),
        fastbp.Dropout(0.5),
        fastbp.Linear(64, 10, rng=np.random.default_rng(1)),
    )
    model.forward(X[:64])  # move the running statistics away from (0, 1)
    buffers = model._buffers.copy()
    tracked = model.state_dict()["1.num_batches_tracked"]
    assert model.training
    big = model.predict(X, batch_size=1024)
    assert np.array_equal(model.predict(X, batch_size=7), big)
    assert np.array_equal(model.predict(X), big)  # no dropout noise: deterministic
    assert model.training  # mode unchanged
    assert np.array_equal(model._buffers, buffers)  # running statistics untouched
    assert model.state_dict()["1.num_batches_tracked"] == tracked
    model.eval()
    assert np.array_equal(model.forward(X[:100]), big[:100])
    with pytest.raises(ValueError, match=re.escape("reshape(1, -1)")):
        model.predict(X[0])
    with pytest.raises(ValueError):
        model.predict(X, batch_size=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_evaluate_classification(dtype):
    """accuracy == (argmax == y).mean() exactly; loss == ops.softmax_cross_entropy on the
    predictions: both compute the same per-row losses in double from the same logits; only the
    summation of 300 row losses differs (in batches of 64 vs all at once), <= 300 eps64 relative."""
    X, y = classification_data(300, dtype=dtype)
    model = fastbp.MLP([8, 12, 3], dtype=dtype, seed=0)
    model.fit(X, y, loss="cross_entropy", epochs=2, batch_size=32, seed=0)
    result = model.evaluate(X, y, batch_size=64)
    assert set(result) == {"loss", "accuracy"}
    pred = model.predict(X)
    assert result["accuracy"] == (pred.argmax(axis=1) == y).mean()
    assert 0.34 < result["accuracy"] < 1  # better than chance, not a degenerate test
    loss, _ = ops.softmax_cross_entropy(pred, y)
    assert result["loss"] == pytest.approx(loss, rel=1e-12)
    assert model.evaluate(X, y) == pytest.approx(result, rel=1e-12)
    assert model.evaluate(X, y, loss=CrossEntropyLoss()) == pytest.approx(result, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_evaluate_regression(dtype):
    """Only the loss: the mean squared error of predict's output, which the kernel forms from the
    same outputs (a float32 difference is exact to 2^-24 relative, its square to 2^-23: rel 1e-6
    in float32, 1e-12 in float64 covers that and the sum)."""
    X, Y = regression_data(200, dtype=dtype)
    model = fastbp.MLP([4, 8, 2], dtype=dtype, seed=0)
    result = model.evaluate(X, Y, batch_size=50)
    assert set(result) == {"loss"}
    pred = model.predict(X).astype(np.float64)
    mse = float(((pred - Y.astype(np.float64)) ** 2).mean())
    assert result["loss"] == pytest.approx(mse, rel=1e-6 if dtype == np.float32 else 1e-12)
    one = fastbp.MLP([4, 3, 1], dtype=dtype, seed=0)  # 1-D target for one output column
    res1 = one.evaluate(X, Y[:, 0])
    mse1 = float(((one.predict(X)[:, 0].astype(np.float64) - Y[:, 0]) ** 2).mean())
    assert res1["loss"] == pytest.approx(mse1, rel=1e-6 if dtype == np.float32 else 1e-12)
    # integer targets for a one-output model mean regression, not classification
    assert set(one.evaluate(X, np.arange(200) % 2)) == {"loss"}


# ---- train_step -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_opt",
    [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9), lambda ps: optim.Adam(ps, lr=0.01)],
    ids=["sgd", "adam"],
)
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_train_step_equals_one_full_batch_fit_step(make_opt, loss):
    if loss == "mse":
        X, y = regression_data(48)
        sizes = [4, 8, 2]
    else:
        X, y = classification_data(48)
        sizes = [8, 8, 3]
    a = fastbp.MLP(sizes, seed=0)
    opt_a = make_opt(a.parameters())
    value = a.train_step(X, y, loss, opt_a)
    assert isinstance(value, float)
    b = fastbp.MLP(sizes, seed=0)
    opt_b = make_opt(b.parameters())
    hist = b.fit(X, y, loss=loss, optimizer=opt_b, epochs=1, batch_size=len(X), shuffle=False)
    assert value == pytest.approx(hist["loss"][0], rel=1e-12)
    assert not np.array_equal(b._params, fastbp.MLP(sizes, seed=0)._params)
    assert np.array_equal(a._params, b._params)


def test_fit_invalidates_the_step_apis_saved_forward():
    """fit reuses the model's workspace, so the activations of an earlier forward() are gone:
    backward() must then raise (as it does after predict/evaluate) instead of silently
    back-propagating through fit's last batch."""
    X, Y = regression_data(64)
    model = fastbp.MLP([4, 8, 2], seed=0)
    model.forward(X[:16])
    model.fit(X, Y, epochs=1, batch_size=16, seed=0)
    with pytest.raises(RuntimeError):
        model.backward(np.ones((16, 2), np.float32))


def test_train_step_after_fit_uses_the_current_lr():
    """train_step with an optimizer whose lr was changed after it was last used by fit/step
    must use the new lr (here: 0, so the weights must not move)."""
    X, Y = regression_data(32)
    model = fastbp.MLP([4, 8, 2], seed=0)
    opt = optim.SGD(model.parameters(), lr=0.1)
    model.fit(X, Y, optimizer=opt, epochs=1, batch_size=8)
    opt.param_groups[0]["lr"] = 0.0
    before = flat_weights(model)
    model.train_step(X, Y, "mse", opt)
    assert np.array_equal(model._params, before)


# ---- optimizers: the per-parameter path -------------------------------------------------------------


def quadratic_problem():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((10, 3))
    b = rng.standard_normal(10)
    return A, b


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("SGD", {"lr": 0.01}),
        ("SGD", {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
        ("Adam", {"lr": 0.05}),
        ("AdamW", {"lr": 0.05, "weight_decay": 0.1}),
    ],
    ids=["sgd", "sgd-nesterov-wd", "adam", "adamw"],
)
def test_per_parameter_optimizer_matches_torch_on_least_squares(name, kwargs):
    """W5-style gradient descent on f(w, c) = |A w + c - b|^2 with user Parameters (not from a
    model): 100 steps follow torch's optimizer step for step. Both run the same float64 update
    formulas; their roundings differ by a few ulp per step and this contracting problem does not
    amplify them, so rel 1e-10 is ample while any formula difference shows at 1e-3."""
    A, b = quadratic_problem()
    w = Parameter(np.zeros(3))
    c = Parameter(np.zeros(1))
    opt = getattr(optim, name)([w, c], **kwargs)
    assert opt._flat is None  # the per-parameter path
    tw = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    tc = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    t_opt = getattr(torch.optim, name)([tw, tc], **kwargs)
    At, bt = torch.from_numpy(A), torch.from_numpy(b)
    for _ in range(100):
        r = A @ w.data + c.data - b
        opt.zero_grad()
        w.grad = 2 * A.T @ r
        c.grad = np.array([2 * r.sum()])
        opt.step()
        t_opt.zero_grad()
        ((At @ tw + tc - bt) ** 2).sum().backward()
        t_opt.step()
    np.testing.assert_allclose(w.data, tw.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c.data, tc.detach().numpy(), rtol=1e-10, atol=1e-12)
    # and it actually optimises: at least half the gap to the least-squares optimum is closed
    best = np.linalg.lstsq(np.hstack([A, np.ones((10, 1))]), b, rcond=None)[1][0]
    final = np.sum((A @ w.data + c.data - b) ** 2)
    assert final - best < 0.5 * (np.sum(b**2) - best)


def test_per_parameter_sgd_converges_to_least_squares_solution():
    A, b = quadratic_problem()
    w = Parameter(np.zeros((3,), dtype=np.float32))
    opt = optim.SGD([w], lr=0.02, momentum=0.5)
    for _ in range(500):
        w.grad = (2 * A.T @ (A @ w.data - b)).astype(np.float32)
        opt.step()
    solution = np.linalg.lstsq(A, b, rcond=None)[0]
    np.testing.assert_allclose(w.data, solution, atol=1e-5)
    assert w.data.dtype == np.float32


def test_per_parameter_state_dict_round_trip():
    A, b = quadratic_problem()

    def run(opt, w, steps):
        for _ in range(steps):
            w.grad = 2 * A.T @ (A @ w.data - b)
            opt.step()

    w = Parameter(np.zeros(3))
    opt = optim.Adam([w], lr=0.05)
    run(opt, w, 5)
    saved, w_saved = opt.state_dict(), w.data.copy()
    assert saved["state"][0]["step"] == 5
    run(opt, w, 5)
    w2 = Parameter(w_saved.copy())
    opt2 = optim.Adam([w2], lr=0.05)
    opt2.load_state_dict(saved)
    run(opt2, w2, 5)
    assert np.array_equal(w2.data, w.data)


@pytest.mark.parametrize(
    "make, exc",
    [
        (lambda ps: optim.SGD(ps, lr=-0.1), ValueError),
        (lambda ps: optim.SGD(ps, lr=float("nan")), ValueError),
        (lambda ps: optim.SGD(ps, lr="0.1"), TypeError),
        (lambda ps: optim.SGD(ps, lr=0.1, nesterov=True), ValueError),
        (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError),
        (lambda ps: optim.Adam(ps, betas=(0.9, 1.0)), ValueError),
        (lambda ps: optim.Adam(ps, betas=0.9), TypeError),
        (lambda ps: optim.Adam(ps, eps=-1e-8), ValueError),
        (lambda ps: optim.AdamW(ps, weight_decay=-0.01), ValueError),
        (lambda ps: optim.SGD(ps[0], lr=0.1), TypeError),
        (lambda ps: optim.SGD([], lr=0.1), ValueError),
        (lambda ps: optim.SGD([ps[0], ps[0]], lr=0.1), ValueError),
        (lambda ps: optim.SGD([np.zeros(3)], lr=0.1), TypeError),
    ],
)
def test_optimizer_argument_errors(make, exc):
    with pytest.raises(exc):
        make([Parameter(np.zeros(3)), Parameter(np.zeros(2))])


def test_optimizer_repr_and_defaults():
    ps = [Parameter(np.zeros(3))]
    assert repr(optim.SGD(ps, lr=0.1)).startswith("SGD(lr=0.1, momentum=0.0")
    assert optim.AdamW(ps).param_groups[0]["weight_decay"] == 1e-2
    assert optim.Adam(ps).param_groups[0]["weight_decay"] == 0.0


def test_per_parameter_sgd_state_dict_round_trip_and_shape_check():
    A, b = quadratic_problem()

    def run(opt, w, steps):
        for _ in range(steps):
            w.grad = 2 * A.T @ (A @ w.data - b)
            opt.step()

    w = Parameter(np.zeros(3))
    opt = optim.SGD([w], lr=0.01, momentum=0.9)
    run(opt, w, 3)
    saved, w_saved = opt.state_dict(), w.data.copy()
    assert saved["state"][0]["momentum_buffer"].shape == (3,)
    run(opt, w, 3)
    w2 = Parameter(w_saved.copy())
    opt2 = optim.SGD([w2], lr=0.01, momentum=0.9)
    opt2.load_state_dict(saved)
    run(opt2, w2, 3)
    assert np.array_equal(w2.data, w.data)
    saved["state"][0]["momentum_buffer"] = np.zeros(4)
    with pytest.raises(ValueError, match="shape"):
        optim.SGD([Parameter(np.zeros(3))], lr=0.01, momentum=0.9).load_state_dict(saved)


# ---- optimizers: state dicts on the flat path ---------------------------------------------------------


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: optim.Adam(ps, lr=0.01),
        lambda ps: optim.AdamW(ps, lr=0.01),
        lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9),
    ],
    ids=["adam", "adamw", "sgd-momentum"],
)
def test_flat_optimizer_state_dict_resumes_training_exactly(make_opt):
    """Train 2 epochs, save model + optimizer state, train 1 more; a fresh model and optimizer
    restored from the saved states and trained 1 epoch (same seed) end bitwise equal."""
    X, y = classification_data(96)
    model = fastbp.MLP([8, 16, 3], dropout=0.2, seed=0)
    opt = make_opt(model.parameters())
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=16, seed=1)
    model_state, opt_state = model.state_dict(), opt.state_dict()
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=16, seed=2)

    fresh = fastbp.MLP([8, 16, 3], dropout=0.2, seed=99)
    fresh.load_state_dict(model_state)
    fresh_opt = make_opt(fresh.parameters())
    fresh_opt.load_state_dict(opt_state)
    fresh.fit(X, y, loss="cross_entropy", optimizer=fresh_opt, epochs=1, batch_size=16, seed=2)
    assert np.array_equal(fresh._params, model._params)

    # without the optimizer state the continuation differs (the test can fail)
    cold = fastbp.MLP([8, 16, 3], dropout=0.2, seed=99)
    cold.load_state_dict(model_state)
    cold.fit(X, y, loss="cross_entropy", optimizer=make_opt(cold.parameters()), epochs=1,
             batch_size=16, seed=2)  # fmt: skip
    assert not np.array_equal(cold._params, model._params)


def test_optimizer_state_dict_has_torch_layout():
    model = fastbp.MLP([8, 16, 3], seed=0)
    opt = optim.Adam(model.parameters(), lr=0.01)
    X, y = classification_data(32)
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=8)
    sd = opt.state_dict()

    tmodel = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    t_opt = torch.optim.Adam(tmodel.parameters(), lr=0.01)
    tmodel(torch.zeros(2, 8)).sum().backward()
    t_opt.step()
    t_sd = t_opt.state_dict()

    assert set(sd) == set(t_sd) == {"state", "param_groups"}
    assert len(sd["param_groups"]) == 1
    group = sd["param_groups"][0]
    assert group["params"] == t_sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert set(group) <= set(t_sd["param_groups"][0])
    assert group["lr"] == 0.01 and tuple(group["betas"]) == (0.9, 0.999)
    assert sorted(sd["state"]) == sorted(t_sd["state"]) == [0, 1, 2, 3]
    for i, p in enumerate(model.parameters()):
        assert set(sd["state"][i]) == set(t_sd["state"][i]) == {"step", "exp_avg", "exp_avg_sq"}
        assert sd["state"][i]["exp_avg"].shape == p.shape
        assert int(sd["state"][i]["step"]) == 4
        assert not np.shares_memory(sd["state"][i]["exp_avg"], opt._exp_avg)

    # torch's own state dict (tensors, tensor step) loads into fastbp's optimizer
    fb_opt = optim.Adam(model.parameters(), lr=0.01)
    fb_opt.load_state_dict(t_sd)
    loaded = fb_opt.state_dict()["state"]
    for i in range(4):
        assert int(loaded[i]["step"]) == 1
        assert np.array_equal(loaded[i]["exp_avg"], t_sd["state"][i]["exp_avg"].numpy())
        assert np.array_equal(loaded[i]["exp_avg_sq"], t_sd["state"][i]["exp_avg_sq"].numpy())


def test_concurrent_predict_during_fit_is_refused_or_harmless():
    """One call per model at a time: while fit runs in one thread, predict in another is
    either refused with a clear RuntimeError or runs between fit's C chunks (and then fit's next
    chunk may be refused instead). Never a crash or corruption: a fit that finishes has bitwise
    the weights of an undisturbed fit, and afterwards the model is not left busy."""
    import threading

    X, y = classification_data(4096, d=64, classes=10)
    ref = fastbp.MLP([64, 128, 10], seed=0)
    ref.fit(X, y, loss="cross_entropy", epochs=2, batch_size=32, seed=0)

    model = fastbp.MLP([64, 128, 10], seed=0)
    done = threading.Event()
    errors: list[BaseException] = []

    def train():
        try:
            model.fit(X, y, loss="cross_entropy", epochs=2, batch_size=32, seed=0)
        except BaseException as exc:  # checked below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=train)
    thread.start()
    while not done.is_set():
        try:
            assert np.isfinite(model.predict(X[:5])).all()
        except RuntimeError as exc:
            assert "another thread" in str(exc)
    thread.join()
    if errors:
        assert len(errors) == 1 and isinstance(errors[0], RuntimeError), errors
        assert "another thread" in str(errors[0])
    else:
        assert np.array_equal(model._params, ref._params)
    assert np.isfinite(model._params).all()
    assert model._lock.acquire(blocking=False)  # nothing left holding the model
    model._lock.release()
    model.fit(X[:64], y[:64], loss="cross_entropy", epochs=1, batch_size=32, seed=1)


def test_optimizer_load_state_dict_errors():
    model = fastbp.MLP([4, 3, 2], seed=0)
    opt = optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        opt.load_state_dict({"state": {}})
    other = optim.Adam(fastbp.MLP([4, 2], seed=0).parameters())
    with pytest.raises(ValueError, match="does not match"):
        opt.load_state_dict(other.state_dict())


@pytest.mark.parametrize("sizes", [[4, 2], [4, 16, 2], [4, 64, 64, 2]])
def test_epochs_without_an_order_read_the_rows_in_order(sizes):
    """fit without shuffling passes no order to C (rows in order, read in place): the same bits
    as an explicit identity order, for the fused small-network step and the general walk alike;
    an order is required to shuffle into."""
    X, y = regression_data(70, 4, 2)
    results = []
    for order in (None, np.arange(70, dtype=np.int64)):
        model = fastbp.MLP(sizes, seed=3)
        opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.fit(X[:8], y[:8], loss="mse", optimizer=opt, epochs=1, batch_size=8, shuffle=False)
        state = opt._flat_state_for(model)
        opt._sync(state)
        _, _, sums, _ = model._plan.train_epochs(X, y, order, 16, 3, None, 0, state, False)
        results.append((flat_weights(model), sums))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert len(results[0][1]) == 3 and results[0][1] == results[1][1]
    with pytest.raises(ValueError, match="order array"):
        model._plan.train_epochs(X, y, None, 16, 3, [0, 1, 2], 0, state, False)


def test_shuffle_draws_every_permutation_evenly():
    """fit's shuffle (csrc/train.c: Fisher-Yates over a SplitMix64 stream) on consecutive seeds,
    the hardest case for a seeded generator: all 120 orders of 5 rows appear equally often (a
    chi-square statistic of 119 degrees of freedom: mean 119, sd 15.4; the bound is 5 sd out),
    and the orders of 1000 rows from neighbouring seeds are unrelated."""
    counts = {}
    order = np.empty(5, dtype=np.int64)
    draws = 24_000
    for seed in range(draws):
        _core.shuffle(order, seed)
        key = tuple(order)
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 120 and all(sorted(k) == list(range(5)) for k in counts)
    expected = draws / 120
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 119 + 5 * 15.4, chi2
    a, b = np.empty(1000, dtype=np.int64), np.empty(1000, dtype=np.int64)
    for seed in range(20):
        _core.shuffle(a, seed)
        _core.shuffle(b, seed + 1)
        assert sorted(a) == list(range(1000))
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.15  # sd of r for unrelated orders: ~0.032
