"""Property-based tests (hypothesis) of every kernel in fastbp.ops against NumPy references in
float64 (long double not needed: the tolerances below are derived error bounds, far above the
reference's own error), over random shapes (including 0 and 1), strides (row/column steps,
negative steps, Fortran order, transposes), ISAs, dtypes and values.

Bounds. GEMM: the classical dot-product bound gamma_k * |A||B| (conftest.dot_error_bound), plus
one rounding of the result and of the bias and activation. Elementwise kernels: 4 ulp (the
documented accuracy) expressed as a relative bound 8 eps + an absolute floor for subnormal
outputs. Losses and optimizers: a handful of roundings per element, bounded by 64 eps times
the magnitude of the terms. ~2,500 examples in total, ~30-60 s on 2 loaded cores.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fastbp import ops
from tests.conftest import ISAS, dot_error_bound, eps, using_isa

SETTINGS = settings(
    max_examples=400,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the repo; CI runs are fresh anyway
    derandomize=True,  # the same examples every run: CI must not flake on a new draw
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = st.sampled_from([np.float32, np.float64])
ACTS = st.sampled_from(["identity", "sigmoid", "relu", "tanh"])
REF_ACT = {
    "identity": lambda z: z,
    # the stable form: 1 / (1 + exp(-z)) underflows to 0 where the true value is subnormal
    "sigmoid": lambda z: np.where(
        z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z)))
    ),
    "relu": lambda z: np.maximum(z, 0.0),
    "tanh": np.tanh,
}


@st.composite
def layouts(draw, shape, dtype, low=-4.0, high=4.0):
    """An array of `shape` with values in [low, high] laid out as a view: C or Fortran order,
    a row/column step of 1-3, possibly reversed along each axis."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    steps = [draw(st.sampled_from([1, 2, 3, -1, -2])) for _ in shape]
    base_shape = tuple(max(abs(s) * n, 1) for s, n in zip(steps, shape, strict=True))
    order = draw(st.sampled_from("CF"))
    base = np.asarray(rng.uniform(low, high, base_shape), dtype=dtype, order=order)
    view = base[tuple(slice(None, None, s) for s in steps)]
    view = view[tuple(slice(0, n) for n in shape)]
    assert view.shape == tuple(shape)
    return view


dims = st.integers(0, 40)


@SETTINGS
@given(
    data=st.data(),
    m=dims,
    n=dims,
    k=dims,
    dtype=DTYPES,
    isa=st.sampled_from(ISAS),
    trans_a=st.booleans(),
    trans_b=st.booleans(),
    act=ACTS,
    use_bias=st.booleans(),
    alpha=st.sampled_from([1.0, -0.5, 2.0]),
    beta=st.sampled_from([0.0, 1.0, -0.75]),
)
def test_gemm_matches_numpy(
    data, m, n, k, dtype, isa, trans_a, trans_b, act, use_bias, alpha, beta
):
    """gemm = act(alpha * op(a) @ op(b) + beta * c + bias) within the dot-product error bound,
    for any strides/transposes and every ISA."""
    a = data.draw(layouts((k, m) if trans_a else (m, k), dtype))
    b = data.draw(layouts((n, k) if trans_b else (k, n), dtype))
    c0 = data.draw(layouts((m, n), dtype))
    bias = data.draw(layouts((n,), dtype)) if use_bias else None
    c0 = c0.copy()  # the reference needs c0 after out is overwritten
    out = np.array(c0, order="C", copy=True)
    with using_isa(isa):
        got = ops.gemm(
            a,
            b,
            trans_a=trans_a,
            trans_b=trans_b,
            alpha=alpha,
            beta=beta,
            out=out,
            bias=bias,
            activation=act,
        )
    assert got is out
    A = (a.T if trans_a else a).astype(np.float64)
    B = (b.T if trans_b else b).astype(np.float64)
    z = alpha * (A @ B) + beta * c0.astype(np.float64)
    if bias is not None:
        z = z + bias
    bound = abs(alpha) * dot_error_bound(np.abs(A), np.abs(B), k, dtype)
    bound = bound + 4 * eps(dtype) * (
        np.abs(z) + abs(beta) * np.abs(c0) + (np.abs(bias) if use_bias else 0)
    )
    ref = REF_ACT[act](z)
    # every activation here has |f'| <= 1, so an input error e moves the output by <= e
    tol = bound + 8 * eps(dtype) * np.abs(ref) + np.finfo(dtype).tiny
    assert np.all(np.abs(got - ref) <= tol), np.max(np.abs(got - ref) - tol)


@SETTINGS
@given(
    data=st.data(),
    shape=st.tuples(st.integers(0, 50), st.integers(0, 30)),
    dtype=DTYPES,
    isa=st.sampled_from(ISAS),
    act=st.sampled_from(["sigmoid", "relu", "tanh"]),
    scale=st.sampled_from([1.0, 30.0, 1e3]),
)
def test_activations_match_numpy(data, shape, dtype, isa, act, scale):
    """sigmoid/relu/tanh on any layout, in place or not, within 4 ulp (relative 8 eps) of
    the float64 NumPy value; the input is not modified."""
    x = data.draw(layouts(shape, dtype, -scale, scale))
    before = x.copy()
    fn = getattr(ops, act)
    with using_isa(isa):
        y = fn(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.array_equal(x, before)
    ref = REF_ACT[act](x.astype(np.float64))
    tol = 8 * eps(dtype) * np.abs(ref) + np.finfo(dtype).smallest_subnormal * 4
    assert np.all(np.abs(y - ref) <= tol)
    inplace = np.ascontiguousarray(x)
    with using_isa(isa):
        assert fn(inplace, out=inplace) is inplace
    assert np.array_equal(inplace, y)


@SETTINGS
@given(
    data=st.data(),
    rows=st.integers(0, 40),
    cols=st.integers(0, 40),
    dtype=DTYPES,
    isa=st.sampled_from(ISAS),
    act=ACTS,
)
def test_activation_backward_matches_numpy(data, rows, cols, dtype, isa, act):
    """dz = dy * act'(y) from the stored output y, and dbias = column sums of dz."""
    dy = data.draw(layouts((rows, cols), dtype))
    lo, hi = {"sigmoid": (0, 1), "tanh": (-1, 1), "relu": (0, 3), "identity": (-3, 3)}[act]
    y = data.draw(layouts((rows, cols), dtype, lo, hi))
    if act == "relu":
        y = np.where(y < 1, 0, y).astype(dtype)
    with using_isa(isa):
        dz, db = ops.activation_backward(dy, y if act != "identity" else None, act)
    Y, DY = y.astype(np.float64), dy.astype(np.float64)
    deriv = {
        "identity": np.ones_like(Y),
        "sigmoid": Y * (1 - Y),
        "tanh": 1 - Y * Y,
        "relu": (Y > 0).astype(np.float64),
    }[act]
    ref = DY * deriv
    assert np.all(np.abs(dz - ref) <= 4 * eps(dtype) * (np.abs(DY) * (1 + np.abs(Y)) ** 2))
    ref_b = ref.sum(axis=0)
    # db sums the dz above, so it inherits their absolute error (the derivative's rounding is
    # absolute: 1 - fl(y*y) is off by up to u*y^2, however small the result) plus the sum's own.
    per_elem = np.abs(ref) + (np.abs(DY) * (1 + np.abs(Y)) ** 2)
    assert np.all(np.abs(db - ref_b) <= (rows + 4) * eps(dtype) * per_elem.sum(axis=0) + 1e-300)


@SETTINGS
@given(
    data=st.data(),
    rows=st.integers(1, 40),
    classes=st.integers(1, 20),
    dtype=DTYPES,
    isa=st.sampled_from(ISAS),
    scale=st.sampled_from([1.0, 20.0, 300.0]),
)
def test_softmax_cross_entropy_matches_numpy(data, rows, classes, dtype, isa, scale):
    """Mean cross-entropy and its gradient (softmax - onehot) / rows against a stable float64
    log-sum-exp, for logits up to +-300 (no overflow)."""
    x = data.draw(layouts((rows, classes), dtype, -scale, scale))
    labels = np.asarray(
        data.draw(st.lists(st.integers(0, classes - 1), min_size=rows, max_size=rows))
    )
    with using_isa(isa):
        loss, grad = ops.softmax_cross_entropy(x, labels)
    X = x.astype(np.float64)
    mx = X.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(X - mx).sum(axis=1))
    ref_loss = np.mean(lse - X[np.arange(rows), labels])
    p = np.exp(X - lse[:, None])
    onehot = np.zeros_like(p)
    onehot[np.arange(rows), labels] = 1
    ref_grad = (p - onehot) / rows
    mag = np.abs(X).max() + 1
    assert abs(loss - ref_loss) <= 64 * classes * eps(dtype) * mag
    assert np.all(np.abs(grad - ref_grad) <= 64 * classes * eps(dtype) * mag / rows + 1e-300)


@SETTINGS
@given(
    data=st.data(),
    shape=st.tuples(st.integers(1, 40), st.integers(1, 20)),
    dtype=DTYPES,
    isa=st.sampled_from(ISAS),
    reduction=st.sampled_from(["mean", "sum"]),
)
def test_mse_matches_numpy(data, shape, dtype, isa, reduction):
    """MSE (mean or sum) and its gradient 2 (p - t) / N against float64 NumPy."""
    p = data.draw(layouts(shape, dtype))
    t = data.draw(layouts(shape, dtype))
    with using_isa(isa):
        loss, grad = ops.mse(p, t, reduction)
    d = p.astype(np.float64) - t.astype(np.float64)
    scale = 1.0 / d.size if reduction == "mean" else 1.0
    assert (
        abs(loss - scale * np.sum(d * d))
        <= (d.size + 4) * eps(dtype) * scale * np.sum(d * d) + 1e-300
    )
    assert np.all(np.abs(grad - 2 * scale * d) <= 4 * eps(dtype) * 2 * scale * np.abs(d) + 1e-300)


@SETTINGS
@given(
    data=st.data(),
    n=st.integers(0, 300),
    dtype=DTYPES,
    isa=st.sampled_from(ISAS),
    lr=st.sampled_from([0.0, 0.01, 0.5]),
    momentum=st.sampled_from([0.0, 0.9]),
    dampening=st.sampled_from([0.0, 0.1]),
    wd=st.sampled_from([0.0, 1e-2]),
    nesterov=st.booleans(),
    first=st.booleans(),
)
def test_sgd_step_matches_torch_rule(
    data, n, dtype, isa, lr, momentum, dampening, wd, nesterov, first
):
    """One SGD update (torch's rule: weight decay, momentum with dampening, Nesterov, the first
    step initialising the buffer) against float64 NumPy, in place on the param."""
    assume(not nesterov or (momentum > 0 and dampening == 0))
    p = np.ascontiguousarray(data.draw(layouts((n,), dtype)))
    g = data.draw(layouts((n,), dtype))
    buf = np.ascontiguousarray(data.draw(layouts((n,), dtype)))
    P, G, Bf = (a.astype(np.float64) for a in (p, g, buf))
    with using_isa(isa):
        ops.sgd_step(
            p,
            g,
            buf if momentum else None,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=wd,
            nesterov=nesterov,
            first_step=first,
        )
    d = G + wd * P
    if momentum:
        Bf = d.copy() if first else momentum * Bf + (1 - dampening) * d
        d = d + momentum * Bf if nesterov else Bf
        assert np.all(np.abs(buf - Bf) <= 8 * eps(dtype) * (np.abs(Bf) + np.abs(d) + 1))
    ref = P - lr * d
    assert np.all(np.abs(p - ref) <= 8 * eps(dtype) * (np.abs(P) + lr * (np.abs(d) + 10)))


@SETTINGS
@given(
    data=st.data(),
    n=st.integers(0, 300),
    dtype=DTYPES,
    isa=st.sampled_from(ISAS),
    step=st.integers(1, 1000),
    b1=st.sampled_from([0.0, 0.9]),
    b2=st.sampled_from([0.5, 0.999]),
    wd=st.sampled_from([0.0, 0.1]),
    decoupled=st.booleans(),
)
def test_adam_step_matches_torch_rule(data, n, dtype, isa, step, b1, b2, wd, decoupled):
    """One Adam/AdamW update (bias-corrected moments, eps outside the sqrt, L2 or decoupled
    weight decay) against float64 NumPy, on all three buffers."""
    lr, eps_ = 1e-2, 1e-8
    p = np.ascontiguousarray(data.draw(layouts((n,), dtype)))
    g = data.draw(layouts((n,), dtype))
    m = np.ascontiguousarray(data.draw(layouts((n,), dtype)))
    v = np.ascontiguousarray(np.abs(data.draw(layouts((n,), dtype))))
    P, G, M, V = (a.astype(np.float64) for a in (p, g, m, v))
    with using_isa(isa):
        ops.adam_step(
            p,
            g,
            m,
            v,
            step=step,
            lr=lr,
            betas=(b1, b2),
            eps=eps_,
            weight_decay=wd,
            decoupled_weight_decay=decoupled,
        )
    if decoupled:
        P = P * (1 - lr * wd)
    else:
        G = G + wd * P
    M = b1 * M + (1 - b1) * G
    V = b2 * V + (1 - b2) * G * G
    denom = np.sqrt(V) / np.sqrt(1 - b2**step) + eps_
    ref = P - lr / (1 - b1**step) * M / denom
    e = 16 * eps(dtype)
    assert np.all(np.abs(m - M) <= e * (np.abs(M) + np.abs(G) + 1))
    assert np.all(np.abs(v - V) <= e * (np.abs(V) + G * G + 1))
    step_size = lr / (1 - b1**step) * (np.abs(M) + e * (np.abs(G) + 1)) / denom
    assert np.all(np.abs(p - ref) <= e * (np.abs(P) + 1) + 4 * e * step_size + 1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_forward_backward_match_numpy(dtype):
    """linear_forward / linear_backward agree with NumPy on a random relu layer (a fixed case
    tying the property-tested pieces together)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((33, 17)).astype(dtype)
    w = rng.standard_normal((9, 17)).astype(dtype)
    b = rng.standard_normal(9).astype(dtype)
    y = ops.linear_forward(x, w, b, activation="relu")
    ref = np.maximum(x.astype(np.float64) @ w.T.astype(np.float64) + b, 0)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 if dtype == np.float32 else 1e-12)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx, dw, db = ops.linear_backward(dy, x, w, y, "relu")
    dz = dy.astype(np.float64) * (y > 0)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-11, "atol": 1e-11}
    np.testing.assert_allclose(dx, dz @ w, **tol)
    np.testing.assert_allclose(dw, dz.T @ x, **tol)
    np.testing.assert_allclose(db, dz.sum(axis=0), **tol)
