"""The fused small-network step (csrc/small.c) against the plan's general walk, bitwise.

Networks of Linear layers with at most 256 weights each train through one fused kernel per
step when batch x the widest layer's weights stays within the GEMM's direct path. It claims the
general walk's exact arithmetic, so every test here trains the same model twice, once with the
kernel turned off (``_core._set_small_step(False)``), and requires identical bits: weights,
gradients, optimizer state and the loss history. Shapes cover one and several vectors per row
on every ISA (VL is 2-16 lanes), ragged rows, short last batches and batch sizes either side of
the direct-path limit.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastbp
from fastbp import _core

from .conftest import build_mlp, switched, using_threads


def small_step(on: bool):
    return switched(_core._set_small_step, on)


build = build_mlp


def make_optimizer(name: str, model: fastbp.Sequential):
    params = model.parameters()
    if name == "sgd":
        return fastbp.optim.SGD(params, lr=0.05)
    if name == "sgd-nesterov":
        return fastbp.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    if name == "sgd-dampening":
        return fastbp.optim.SGD(params, lr=0.05, momentum=0.8, dampening=0.3)
    if name == "adam":
        return fastbp.optim.Adam(params, lr=0.02, weight_decay=1e-3)
    if name == "adamw":
        return fastbp.optim.AdamW(params, lr=0.02)
    raise ValueError(name)


def data(sizes, n, loss, dtype, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, sizes[0])).astype(dtype)
    if loss == "cross_entropy":
        return X, rng.integers(0, sizes[-1], size=n)
    return X, rng.normal(size=(n, sizes[-1])).astype(dtype)


def train(on, sizes, acts, dtype, loss, opt_name, batch_size, n, bias=True, epochs=3, shuffle=True):
    """Weights, gradients, optimizer state and losses after a seeded fit (shuffled: batches
    gathered into the workspace; in order: rows and targets read in place)."""
    model = build(sizes, acts, dtype, bias=bias)
    opt = make_optimizer(opt_name, model)
    X, y = data(sizes, n, loss, dtype)
    with small_step(on):
        history = model.fit(
            X, y, loss=loss, optimizer=opt, epochs=epochs, batch_size=batch_size, seed=7,
            shuffle=shuffle,
        )  # fmt: skip
        used = model._plan.small_step_applies(min(batch_size, n))
    state = {k: v.copy() for k, v in model.state_dict().items()}
    grads = [p.grad.copy() for p in model.parameters()]
    return state, grads, _leaves(opt.state_dict()), history.history["loss"], used


def _leaves(tree) -> list:
    """The arrays and numbers of a nested optimizer state_dict, in order."""
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree, key=str) for leaf in _leaves(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [np.array(tree, copy=True)]


def assert_same(a, b):
    state_a, grads_a, opt_a, loss_a, _ = a
    state_b, grads_b, opt_b, loss_b, _ = b
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=key, strict=True)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        np.testing.assert_array_equal(ga, gb, strict=True)
    for sa, sb in zip(opt_a, opt_b, strict=True):
        np.testing.assert_array_equal(sa, sb, strict=True)
    assert loss_a == loss_b  # float equality of every epoch's loss, not a tolerance


# (sizes, activations cycled over the hidden layers)
NETS = [
    ((1, 2, 5, 1), ["sigmoid"]),  # W2
    ((2, 1), ["identity"]),  # W1
    ((3, 7, 2), ["relu"]),
    ((9, 16, 16, 3), ["tanh", "relu"]),  # whole AVX-512 vectors
    ((4, 17, 9, 2), ["sigmoid", "tanh"]),  # 17 wide: more than one vector on every ISA, ragged
    ((1, 1, 1), ["relu"]),
    ((8, 32, 5), ["sigmoid"]),  # 256 weights: the largest layer allowed
    ((6, 1, 4, 1), ["sigmoid", "tanh"]),  # one-column layers with and without an activation
    # nine layers, each one vector wide: too deep for the batch-of-one register path
    ((2, 3, 3, 3, 3, 3, 3, 3, 3, 2), ["tanh", "sigmoid", "relu"]),
]


CASES = [
    pytest.param(sizes, acts, loss, id=f"{loss}-{'-'.join(map(str, sizes))}")
    for sizes, acts in NETS
    for loss in ("mse", "cross_entropy")
    if loss == "mse" or sizes[-1] > 1  # cross-entropy needs two classes
]


@pytest.mark.parametrize("sizes,acts,loss", CASES)
def test_fused_step_matches_the_general_walk(isa, dtype, sizes, acts, loss):
    # 1, 7, 10 and 19 rows: a one-column layer fills part of a vector, whole ones, a ragged tail;
    # a batch of one with layers at most a vector wide passes them on in registers (small.c)
    batches = (
        ("adam", 1, 23),
        ("sgd-nesterov", 1, 9),
        ("sgd-nesterov", 7, 40),
        ("sgd", 10, 33),
        ("sgd", 19, 45),
    )
    for opt_name, batch_size, n in batches:
        fused = train(True, sizes, acts, dtype, loss, opt_name, batch_size, n)
        walk = train(False, sizes, acts, dtype, loss, opt_name, batch_size, n)
        assert fused[4], "the fused kernel did not apply: the comparison would be vacuous"
        assert not walk[4]
        assert_same(fused, walk)


@pytest.mark.parametrize("sizes,acts,loss", CASES)
def test_batches_read_in_place_match_the_general_walk(isa, dtype, sizes, acts, loss):
    """Without shuffling the fused step reads each batch's rows and targets in place (the
    general walk copies the targets); ragged last batches of 5 and 1 rows."""
    for opt_name, batch_size, n in (("sgd-nesterov", 7, 40), ("adam", 10, 31)):
        fused = train(True, sizes, acts, dtype, loss, opt_name, batch_size, n, shuffle=False)
        walk = train(False, sizes, acts, dtype, loss, opt_name, batch_size, n, shuffle=False)
        assert fused[4] and not walk[4]
        assert_same(fused, walk)


@pytest.mark.parametrize("sizes,acts,loss", CASES)
def test_fit_in_order_equals_train_step_on_each_batch(dtype, sizes, acts, loss):
    """fit without shuffling (rows and targets read in place by fit's C loop) against
    train_step on the same batches (each copied by its own call): the same weights and each
    epoch's mean loss, bitwise."""
    X, y = data(sizes, 31, loss, dtype)
    results = []
    for use_fit in (True, False):
        model = build(sizes, acts, dtype)
        opt = make_optimizer("adam", model)
        if use_fit:
            losses = model.fit(X, y, loss=loss, optimizer=opt, epochs=2, batch_size=10,
                               shuffle=False).history["loss"]  # fmt: skip
        else:
            loss_fn = fastbp.MSELoss() if loss == "mse" else fastbp.CrossEntropyLoss()
            losses = []
            for _ in range(2):
                total = 0.0
                for start in range(0, 31, 10):
                    rows = slice(start, start + 10)
                    total += model.train_step(X[rows], y[rows], loss_fn, opt) * len(X[rows])
                losses.append(total / 31)
        assert model._plan.small_step_applies(10)
        results.append((model.state_dict(), losses))
    (sa, la), (sb, lb) = results
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key, strict=True)
    assert la == lb


@pytest.mark.parametrize("opt_name", ["sgd", "sgd-dampening", "adam", "adamw"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "sizes,batch_size",
    [((5, 12, 6, 3), 4), ((3, 2, 1), 1)],  # the second: a batch of one in registers (small.c)
    ids=["5-12-6-3-batch-4", "3-2-1-batch-1"],
)
def test_every_optimizer_and_no_bias(isa, dtype, opt_name, bias, sizes, batch_size):
    acts = ["tanh"]
    fused = train(True, sizes, acts, dtype, "mse", opt_name, batch_size, 30, bias=bias)
    walk = train(False, sizes, acts, dtype, "mse", opt_name, batch_size, 30, bias=bias)
    assert fused[4]
    assert_same(fused, walk)


def test_mse_sum_through_train_step(isa, dtype):
    """train_step (the step API, loss "sum") takes the fused kernel too."""
    results = []
    for on in (True, False):
        model = build((3, 6, 2), ["sigmoid"], dtype)
        opt = make_optimizer("adam", model)
        X, y = data((3, 6, 2), 12, "mse", dtype)
        losses = []
        with small_step(on):
            for step in range(6):
                rows = slice(2 * step, 2 * step + 2)
                losses.append(model.train_step(X[rows], y[rows], fastbp.MSELoss("sum"), opt))
        results.append((model.state_dict(), [p.grad.copy() for p in model.parameters()], losses))
    (sa, ga, la), (sb, gb, lb) = results
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], strict=True)
    for a, b in zip(ga, gb, strict=True):
        np.testing.assert_array_equal(a, b, strict=True)
    assert la == lb


def test_the_direct_path_limit(dtype):
    """16 x 16 layers: 256 weights, so batches of up to 54 rows are fused (54 x 256 <= 24^3)
    and 55 are not; fit's short last batch may be fused when full ones are not."""
    model = build((16, 16, 16), ["relu"], dtype)
    plan = model._plan
    assert plan.small_step_applies(1)
    assert plan.small_step_applies(54)
    assert not plan.small_step_applies(55)
    for batch_size, n in ((54, 120), (55, 120), (64, 70)):
        fused = train(True, (16, 16, 16), ["relu"], dtype, "mse", "adam", batch_size, n)
        walk = train(False, (16, 16, 16), ["relu"], dtype, "mse", "adam", batch_size, n)
        assert_same(fused, walk)


def test_networks_the_kernel_does_not_take(dtype):
    wide = build((16, 17, 2), ["relu"], dtype)  # 272 weights in the first layer
    assert not wide._plan.small_step_applies(1)
    dropout = fastbp.Sequential(
        fastbp.Linear(2, 3, dtype=dtype), fastbp.Dropout(0.5), fastbp.Linear(3, 1, dtype=dtype)
    )
    assert not dropout._plan.small_step_applies(1)
    with small_step(False):
        assert not build((2, 3, 1), ["relu"], dtype)._plan.small_step_applies(1)


def test_threads_do_not_change_the_fused_step(dtype):
    sizes, acts = (6, 16, 4), ["sigmoid"]
    with using_threads(1):
        one = train(True, sizes, acts, dtype, "mse", "adam", 5, 40)
    with using_threads(2):
        two = train(True, sizes, acts, dtype, "mse", "adam", 5, 40)
    assert_same(one, two)


def test_nonfinite_loss_stops_at_the_same_batch(isa, dtype):
    """SGD at lr 1e25 on a linear net: the weights grow ~1e25-fold per step until the loss
    overflows; both paths must stop at the same batch, with the same weights."""
    results = []
    for on in (True, False):
        model = build((3, 5, 1), ["identity"], dtype)
        opt = fastbp.optim.SGD(model.parameters(), lr=1e25)
        X, y = data((3, 5, 1), 20, "mse", dtype)
        with small_step(on), pytest.raises(fastbp.NonFiniteLossError) as err:
            model.fit(X, y, loss="mse", optimizer=opt, epochs=20, batch_size=4, shuffle=False)
        results.append((str(err.value), model.state_dict(), [p.grad for p in model.parameters()]))
    (ma, sa, ga), (mb, sb, gb) = results
    assert ma == mb
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], strict=True)
        assert np.isfinite(sa[key]).all()
    for a, b in zip(ga, gb, strict=True):
        np.testing.assert_array_equal(a, b, strict=True)
        assert not a.any()  # a failed step leaves zeroed gradients, as the general walk does
