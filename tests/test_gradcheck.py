"""Central finite-difference checks of every analytic gradient fastbp computes, in float64.

The step API is used throughout: ``forward``, the loss (value and ``backward()``), the model's
``backward`` (which returns dL/dx and accumulates into every ``Parameter.grad``).

Tolerance. For a smooth f the central difference D(h) = (f(t + h) - f(t - h)) / 2h differs from
f'(t) by the truncation term h^2 |f'''| / 6 plus the rounding term delta / h, where delta bounds
the absolute rounding error of one float64 evaluation of f. With h = 1e-6 the truncation term is
<= 1.7e-13 |f'''|, negligible (|f'''| = O(1)-O(10) for these small nets with O(1) weights). Each
loss is a sum of at most ~50 terms, each computed through a few dozen roundings from O(1)
values, so delta <= ~50 * 2.2e-16 * F with F <= ~10 the size of the summed terms, i.e.
delta / h <= ~1e-8 (measured: <= 2e-9). We accept |analytic - numeric| <= 1e-7 * max(1, max|g|)
elementwise, and require every checked gradient to have max|g| >= 1e-3 (unless it is zero by
theory), so an error of 0.01% of the gradient (a dropped term, a wrong scale, a transposed
index) already fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastbp import (
    BatchNorm1d,
    CrossEntropyLoss,
    Dropout,
    Identity,
    Linear,
    MSELoss,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
    ops,
)

H = 1e-6
TOL = 1e-7
RELU_MARGIN = 1e-3  # |pre-activation| of every ReLU input; perturbations move it by < 1e-5


def numeric_grad(f, arr: np.ndarray) -> np.ndarray:
    """Central differences of the scalar f() w.r.t. every element of arr (perturbed in place)."""
    grad = np.empty(arr.shape)
    flat = arr.reshape(-1)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + H
        up = f()
        flat[i] = orig - H
        down = f()
        flat[i] = orig
        grad.reshape(-1)[i] = (up - down) / (2 * H)
    return grad


def assert_grad_close(
    analytic: np.ndarray, numeric: np.ndarray, name: str, zero: bool = False
) -> None:
    """The analytic gradient matches the numeric one; unless the gradient is zero by theory
    (``zero``), it must also be large enough (>= 1e-3, 1e4x the tolerance) to make this a test."""
    assert analytic.shape == numeric.shape, name
    scale = max(1.0, float(np.abs(numeric).max()))
    err = float(np.abs(analytic - numeric).max())
    assert err <= TOL * scale, f"{name}: max error {err:.3g} > {TOL * scale:.3g}"
    if zero:
        assert float(np.abs(analytic).max()) <= TOL, f"{name}: should be zero"
    else:
        assert float(np.abs(numeric).max()) >= 1e-3, f"{name}: gradient too small to be a test"


def analytic_pass(model, x, target, loss_fn, seed=None):
    """zero_grad, (seed,) forward, loss, backward: returns dx and a copy of every .grad."""
    model.zero_grad()
    if seed is not None:
        model.seed(seed)
    out = model.forward(x)
    loss_fn(out, target)
    dx = model.backward(loss_fn.backward())
    return dx, {name: p.grad.copy() for name, p in model.named_parameters()}


def zero_by_theory(model) -> set[str]:
    """Names of the biases of Linear layers followed by a BatchNorm1d: the normalisation
    subtracts the batch mean, so such a bias cannot change the output and its gradient is 0."""
    return {
        f"{i}.bias"
        for i, layer in enumerate(model)
        if isinstance(layer, Linear)
        and layer.bias is not None
        and i + 1 < len(model)
        and isinstance(model[i + 1], BatchNorm1d)
    }


def check_model(model, x, target, loss_fn, seed=None) -> None:
    """Gradients w.r.t. the input and every parameter element against central differences."""
    assert model.dtype == np.float64 and model.training
    dx, grads = analytic_pass(model, x, target, loss_fn, seed)
    xs = x.copy()

    def f():
        if seed is not None:
            model.seed(seed)
        return loss_fn(model.forward(xs), target)

    zero = zero_by_theory(model)
    for name, p in model.named_parameters():
        assert_grad_close(grads[name], numeric_grad(f, p.data), name, zero=name in zero)
    assert_grad_close(dx, numeric_grad(f, xs), "input")
    # the numeric passes restored every value: a second analytic pass agrees bitwise
    dx2, grads2 = analytic_pass(model, x, target, loss_fn, seed)
    assert np.array_equal(dx, dx2)
    assert all(np.array_equal(grads[k], grads2[k]) for k in grads)


def relu_inputs_margin(model, x) -> float:
    """min |input| over every ReLU in the model (float64 numpy forward, no BatchNorm/Dropout
    before the last ReLU)."""
    h = x
    margin = np.inf
    previous = None
    for layer in model:
        if isinstance(layer, Linear):
            h = h @ layer.weight.data.T + (0 if layer.bias is None else layer.bias.data)
        elif isinstance(layer, ReLU):
            if not isinstance(previous, ReLU):  # ReLU(ReLU(z)): exact zeros stay zero
                margin = min(margin, float(np.abs(h).min()))
            h = np.maximum(h, 0)
        elif isinstance(layer, Sigmoid):
            h = 1 / (1 + np.exp(-h))
        elif isinstance(layer, Tanh):
            h = np.tanh(h)
        elif isinstance(layer, Identity):
            pass
        else:  # Dropout/BatchNorm: stop; the test layouts put no ReLU after them
            later = list(model)[list(model).index(layer) :]
            assert not any(isinstance(m, ReLU) for m in later)
            break
        previous = layer
    return margin


def away_from_kinks(model, rows: int, seed: int) -> np.ndarray:
    """An input batch whose ReLU inputs all stay RELU_MARGIN away from 0 (tries seeds in order)."""
    for s in range(seed, seed + 1000):
        x = np.random.default_rng(s).standard_normal((rows, model.in_features))
        if relu_inputs_margin(model, x) > RELU_MARGIN:
            return x
    raise AssertionError("no kink-free input found")


def regression_target(rows, cols, seed=99):
    return np.random.default_rng(seed).standard_normal((rows, cols))


# ---- the losses alone -------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ops_mse_gradient(reduction):
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((5, 3))
    target = rng.standard_normal((5, 3))
    loss, grad = ops.mse(pred, target, reduction)
    assert loss == pytest.approx(
        ((pred - target) ** 2).mean() if reduction == "mean" else ((pred - target) ** 2).sum(),
        rel=1e-14,
    )
    assert_grad_close(grad, numeric_grad(lambda: ops.mse(pred, target, reduction)[0], pred), "mse")


def test_ops_softmax_cross_entropy_gradient():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((6, 4)) * 2
    labels = rng.integers(0, 4, 6)
    _, grad = ops.softmax_cross_entropy(logits, labels)
    numeric = numeric_grad(lambda: ops.softmax_cross_entropy(logits, labels)[0], logits)
    assert_grad_close(grad, numeric, "softmax_cross_entropy")


@pytest.mark.parametrize(
    "loss_fn, shape, one_d_target",
    [
        (MSELoss(), (5, 3), False),
        (MSELoss("sum"), (5, 3), False),
        (MSELoss(), (7, 1), True),
        (CrossEntropyLoss(), (6, 4), False),
    ],
    ids=["mse-mean", "mse-sum", "mse-1d-target", "cross-entropy"],
)
def test_loss_class_backward_is_the_gradient(loss_fn, shape, one_d_target):
    rng = np.random.default_rng(2)
    out = rng.standard_normal(shape)
    if isinstance(loss_fn, CrossEntropyLoss):
        target = rng.integers(0, shape[1], shape[0])
    elif one_d_target:
        target = rng.standard_normal(shape[0])
    else:
        target = rng.standard_normal(shape)
    loss_fn(out, target)
    grad = loss_fn.backward().copy()
    assert grad.shape == out.shape
    assert_grad_close(grad, numeric_grad(lambda: loss_fn(out, target), out), repr(loss_fn))


def test_loss_backward_before_call_raises():
    with pytest.raises(RuntimeError):
        MSELoss().backward()
    with pytest.raises(RuntimeError):
        CrossEntropyLoss().backward()


# ---- one activation per model --------------------------------------------------------------------


@pytest.mark.parametrize("act", [Sigmoid, ReLU, Tanh, Identity])
@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_linear_activation_gradients(act, loss_name):
    """Linear + act (fused into the GEMM epilogue), a second act of the same kind as a
    standalone op (it follows another activation, so it cannot fuse), then a Linear + act."""
    rng = np.random.default_rng(3)
    model = Sequential(
        Linear(4, 6, dtype=np.float64, rng=rng),
        act(),
        act(),
        Linear(6, 3, dtype=np.float64, rng=rng),
        act(),
    )
    for p in model.parameters():  # O(1) weights: activations in their curved range
        p.data[...] = rng.standard_normal(p.shape)
    x = away_from_kinks(model, 5, seed=10)
    if loss_name == "mse":
        check_model(model, x, regression_target(5, 3), MSELoss("sum"))
    else:
        check_model(model, x, np.array([0, 2, 1, 1, 0]), CrossEntropyLoss())


def test_linear_without_bias_gradients():
    rng = np.random.default_rng(4)
    model = Sequential(
        Linear(3, 5, bias=False, dtype=np.float64, rng=rng),
        Tanh(),
        Linear(5, 2, bias=False, dtype=np.float64, rng=rng),
    )
    x = rng.standard_normal((4, 3))
    check_model(model, x, regression_target(4, 2), MSELoss("sum"))


# ---- BatchNorm1d (training mode, batch statistics) -------------------------------------------------


def randomise_affine(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model:
        if isinstance(layer, BatchNorm1d) and layer.affine:
            layer.weight.data[...] = rng.uniform(0.5, 2.0, layer.num_features)
            layer.bias.data[...] = rng.standard_normal(layer.num_features)


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_training_gradients(affine):
    """Batch 8: the normalisation couples the rows, so dL/dx and dL/dgamma/dbeta need the full
    batch-statistics backward (sum_dy and sum_dy_xhat terms)."""
    rng = np.random.default_rng(5)
    model = Sequential(
        Linear(5, 6, dtype=np.float64, rng=rng),
        BatchNorm1d(6, affine=affine, dtype=np.float64),
        Tanh(),
        Linear(6, 3, dtype=np.float64, rng=rng),
    )
    randomise_affine(model, 6)
    x = rng.standard_normal((8, 5))
    check_model(model, x, regression_target(8, 3), MSELoss())
    check_model(model, x, rng.integers(0, 3, 8), CrossEntropyLoss())


def test_batchnorm_first_layer_input_gradient():
    """BatchNorm as the first layer: dx is the batchnorm backward itself; a Sigmoid right after
    a BatchNorm is a standalone activation op."""
    rng = np.random.default_rng(7)
    model = Sequential(
        BatchNorm1d(4, dtype=np.float64),
        Sigmoid(),
        Linear(4, 3, dtype=np.float64, rng=rng),
        BatchNorm1d(3, dtype=np.float64),
    )
    randomise_affine(model, 8)
    x = rng.standard_normal((8, 4)) * 2 + 1
    check_model(model, x, regression_target(8, 3), MSELoss())


# ---- Dropout ---------------------------------------------------------------------------------------


def dropout_model(seed=9):
    rng = np.random.default_rng(seed)
    return Sequential(
        Linear(6, 8, dtype=np.float64, rng=rng),
        Tanh(),
        Dropout(0.5),
        Linear(8, 3, dtype=np.float64, rng=rng),
        Sigmoid(),
    )


def test_seed_resets_the_dropout_stream():
    """The premise of the dropout gradient check: seed(s) makes the next forward's mask a
    function of s alone, while unseeded consecutive forwards draw new masks."""
    model = dropout_model()
    x = np.random.default_rng(0).standard_normal((5, 6))
    model.seed(21)
    first = model.forward(x)
    second = model.forward(x)
    model.seed(21)
    again = model.forward(x)
    assert not np.array_equal(first, second)
    assert np.array_equal(first, again)


@pytest.mark.parametrize("seed", [0, 1])
def test_dropout_gradients_with_fixed_mask(seed):
    model = dropout_model()
    x = np.random.default_rng(11).standard_normal((5, 6))
    check_model(model, x, regression_target(5, 3), MSELoss(), seed=seed)
    # the mask is active: the seeded training output is not the eval-mode output
    model.seed(seed)
    train_out = model.forward(x)
    assert not np.allclose(train_out, model.predict(x))


# ---- a deep net ------------------------------------------------------------------------------------


def test_deep_mixed_network_gradients():
    """Four Linear layers; Tanh, ReLU, Sigmoid fused; Dropout; a standalone Tanh after a
    Sigmoid; a bias-free layer; cross-entropy on top."""
    rng = np.random.default_rng(12)
    model = Sequential(
        Linear(6, 10, dtype=np.float64, rng=rng),
        Tanh(),
        Linear(10, 8, dtype=np.float64, rng=rng),
        ReLU(),
        Dropout(0.3),
        Linear(8, 7, bias=False, dtype=np.float64, rng=rng),
        Sigmoid(),
        Tanh(),
        Linear(7, 4, dtype=np.float64, rng=rng),
    )
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.8
    x = away_from_kinks(model, 6, seed=20)
    check_model(model, x, np.array([0, 1, 2, 3, 1, 2]), CrossEntropyLoss(), seed=5)
    check_model(model, x, regression_target(6, 4), MSELoss(), seed=6)


def test_float32_gradients_agree_with_float64():
    """The float32 instantiation of the same backward: with bitwise-equal inputs and weights,
    float32 gradients differ from float64 ones only by float32 rounding, relative u = 6e-8 per
    operation accumulated over a few dozen operations along each path (and amplified by at
    most the O(1) Lipschitz constants of these layers), so 1e-4 of the gradient scale is a
    bound with a wide margin that a wrong float32 formula would still miss by far."""
    rng = np.random.default_rng(13)

    def build(dtype):
        r = np.random.default_rng(14)
        return Sequential(
            Linear(6, 9, dtype=dtype, rng=r),
            BatchNorm1d(9, dtype=dtype),
            Tanh(),
            Dropout(0.25),
            Linear(9, 5, dtype=dtype, rng=r),
            Sigmoid(),
            Linear(5, 3, dtype=dtype, rng=r),
        )

    m32, m64 = build(np.float32), build(np.float64)
    randomise_affine(m32, 15)
    m64.load_state_dict(m32.state_dict())
    x32 = rng.standard_normal((8, 6)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    dx32, g32 = analytic_pass(m32, x32, y, CrossEntropyLoss(), seed=3)
    dx64, g64 = analytic_pass(m64, x32.astype(np.float64), y, CrossEntropyLoss(), seed=3)
    overall = max(float(np.abs(g).max()) for g in g64.values())
    for name in g64:
        scale = float(np.abs(g64[name]).max())
        if name in zero_by_theory(m64):  # exactly 0 up to rounding in both dtypes
            assert scale < 1e-12 and float(np.abs(g32[name]).max()) < 1e-4 * overall, name
            continue
        assert scale > 1e-3, name
        np.testing.assert_allclose(g32[name], g64[name], rtol=0, atol=1e-4 * scale, err_msg=name)
    np.testing.assert_allclose(dx32, dx64, rtol=0, atol=1e-4 * float(np.abs(dx64).max()))
