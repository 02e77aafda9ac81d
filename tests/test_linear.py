"""The linear layer: ops.linear_forward, ops.activation_backward and ops.linear_backward.

Two independent references:
  * float64 NumPy, with random normal data and rigorous elementwise bounds (gamma_k |A||B| for
    every product, gamma_3 for dy * act'(y), the activations' few-ulp evaluation error);
  * torch autograd (F.linear + activation, .backward()) run in float64. Its data are dyadic
    (k/16, biases odd/512) so every product and sum is exact in float32: the pre-activations are
    exact on both sides, relu masks agree exactly, and identity/relu layers must match torch
    bit for bit. Only sigmoid/tanh leave rounding, bounded as for NumPy.
"""

from __future__ import annotations

import math
import os
import re
import zlib

import numpy as np
import pytest
import torch

from fastbp import ops
from tests.conftest import (
    assert_within,
    dot_error_bound,
    eps,
    os_threads_after,
    using_threads,
)

ACTIVATIONS = ["identity", "sigmoid", "relu", "tanh"]
ACT_ULPS = {"identity": 0, "relu": 0, "sigmoid": 4, "tanh": 4}  # kernel: measured <= 2.4 ulp
REF_ACT_ULPS = 4  # numpy/torch float64 sigmoid and tanh: ~1 ulp
KC_MIN = 256  # smallest KC block of any ISA: ceil(k / KC_MIN) bounds the K blocks
TORCH_ACT = {
    "identity": lambda z: z,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "tanh": torch.tanh,
}

# (batch, in_features, out_features): batch 1/7/33/257 x features 1/3/33/130, then the MLP
SHAPES = [
    (1, 1, 1),
    (1, 130, 33),
    (7, 3, 33),
    (7, 33, 1),
    (33, 130, 3),
    (33, 1, 130),
    (257, 33, 130),
    (257, 130, 3),
]
MLP = [(128, 784, 256), (128, 256, 128), (128, 128, 10)]


# ---- helpers -----------------------------------------------------------------------------------


def rng_for(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def gamma(n: int, dtype) -> float:
    u = eps(dtype) / 2
    return n * u / (1 - n * u)


def bound_coefficient(k: int, dtype) -> float:
    """dot_error_bound(|A|, |B|, k, dtype) is this scalar times |A||B|, plus the same for the
    float64 reference's own rounding: lets us form |A||B| once per bound."""
    one = np.ones((1, 1))
    return float(
        dot_error_bound(one, one, k, dtype)[0, 0] + dot_error_bound(one, one, k, np.float64)[0, 0]
    )


def random_layer(batch, fin, fout, dtype, *key):
    """x, weight (out, in) ~ N(0, 1/in), bias and grad_output, standard normal, in dtype."""
    rng = rng_for(batch, fin, fout, np.dtype(dtype).name, *key)
    x = rng.standard_normal((batch, fin)).astype(dtype)
    w = (rng.standard_normal((fout, fin)) / math.sqrt(fin)).astype(dtype)
    b = rng.standard_normal(fout).astype(dtype)
    dy = rng.standard_normal((batch, fout)).astype(dtype)
    return x, w, b, dy


def dyadic_layer(batch, fin, fout, dtype, *key):
    """Values j/16, |j| <= 8, and biases odd/512: every product and every sum below is exact in
    float32 (|z| <= fin/4 + 1 stays far below 2^24 / 512), and no pre-activation is 0."""
    rng = rng_for("dyadic", batch, fin, fout, np.dtype(dtype).name, *key)
    x = (rng.integers(-8, 9, (batch, fin)) / 16).astype(dtype)
    w = (rng.integers(-8, 9, (fout, fin)) / 16).astype(dtype)
    b = ((2 * rng.integers(-256, 256, fout) + 1) / 512).astype(dtype)
    dy = (rng.integers(-8, 9, (batch, fout)) / 16).astype(dtype)
    return x, w, b, dy


def act_ref(name: str, z) -> np.ndarray:
    z = f64(z)
    if name == "sigmoid":
        e = np.exp(-np.abs(z))
        return np.where(z >= 0, 1 / (1 + e), e / (1 + e))
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "tanh":
        return np.tanh(z)
    return z


def deriv(name: str, y) -> np.ndarray:
    """act'(z) written in terms of the output y = act(z), in float64."""
    y = f64(y)
    return {
        "identity": np.ones_like(y),
        "relu": (y > 0).astype(np.float64),
        "sigmoid": y * (1 - y),
        "tanh": 1 - y * y,
    }[name]


def deriv_rounding(name: str, dy, y, dtype) -> np.ndarray:
    """Bound on |fl(dy * act'(y)) - dy * act'(y)| when evaluated in dtype.

    sigmoid: dy * (y * (1 - y)) is three roundings, relative: gamma_3. tanh: dy * (1 - y*y)
    rounds y*y (absolute u y^2), the difference (u |1 - y^2|) and the product: gamma_3 times
    (y^2 + 2 |1 - y^2|) covers all three. identity and relu are exact (dy or 0).
    """
    dy, y = np.abs(f64(dy)), f64(y)
    if name == "sigmoid":
        return gamma(3, dtype) * dy * np.abs(y * (1 - y))
    if name == "tanh":
        return gamma(3, dtype) * dy * (y * y + 2 * np.abs(1 - y * y))
    return np.zeros_like(dy)


def forward_reference(x, w, b, name, dtype):
    """(y_ref, bound) for act(x @ w.T + b): the pre-activation is bounded by
    gamma_{k + 2 blocks + 2} (|x||w|^T + |b|) on each side (kernel and float64 reference: the
    blocked dot product plus per K block one store/accumulate, plus the bias add); the
    nondecreasing activation maps z +- e to an interval; then the activations' own error."""
    k = x.shape[1]
    n_ops = k + 2 * max(1, math.ceil(k / KC_MIN)) + 2
    z = f64(x) @ f64(w).T + f64(b)
    e = (gamma(n_ops, dtype) + gamma(n_ops, np.float64)) * (
        np.abs(f64(x)) @ np.abs(f64(w)).T + np.abs(f64(b))
    )
    e = e + np.spacing(np.abs(z))  # z +- e rounds in float64
    y, lo, hi = act_ref(name, z), act_ref(name, z - e), act_ref(name, z + e)
    mag = np.maximum(np.abs(lo), np.abs(hi))
    bound = np.maximum(hi - y, y - lo) + REF_ACT_ULPS * eps(np.float64) * mag
    if ACT_ULPS[name]:
        tiny = float(np.finfo(dtype).smallest_subnormal)
        bound = bound + ACT_ULPS[name] * eps(dtype) * mag + 2 * tiny
    return y, bound


def backward_bounds(name, dy, x, w, y_used, y_ref, dtype):
    """Bounds on |d? - d?_ref| for fastbp's backward (given output y_used, evaluated in dtype)
    against a float64 backward computed from y_ref (the same y for NumPy; torch's own y).

    dz differs by |dy (act'(y_used) - act'(y_ref))| (computed) plus each side's rounding
    (deriv_rounding, and the float64 evaluation of the exact-math values here). That error
    passes linearly into dW = dz^T x, dx = dz w and db = sum dz, whose own rounding is
    gamma_batch / gamma_out (dot_error_bound) on each side.
    """
    dz_used, dz_ref = f64(dy) * deriv(name, y_used), f64(dy) * deriv(name, y_ref)
    err_dz = (
        np.abs(dz_used - dz_ref)
        + deriv_rounding(name, dy, y_used, dtype)
        + deriv_rounding(name, dy, y_used, np.float64)
        + 2 * deriv_rounding(name, dy, y_ref, np.float64)
    )
    mag = np.abs(dz_ref) + err_dz
    batch, out_features = dz_ref.shape
    abs_x, abs_w = np.abs(f64(x)), np.abs(f64(w))
    # err_dz^T |x| + dot_error_bound(mag^T, |x|) is linear in the left factor: one product each
    return {
        "dz": err_dz,
        "dbias": err_dz.sum(axis=0) + (gamma(batch, dtype) + gamma(batch, np.float64)) * mag.sum(0),
        "dweight": (err_dz + bound_coefficient(batch, dtype) * mag).T @ abs_x,
        "dx": (err_dz + bound_coefficient(out_features, dtype) * mag) @ abs_w,
    }


def torch_layer(x, w, b, dy, name):
    """torch autograd in float64: (y, dx, dweight, dbias) as numpy arrays."""
    tx, tw, tb = (torch.tensor(f64(v), requires_grad=True) for v in (x, w, b))
    ty = TORCH_ACT[name](torch.nn.functional.linear(tx, tw, tb))
    ty.backward(torch.tensor(f64(dy)))
    return ty.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(), tb.grad.numpy()


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


# ---- against float64 NumPy ------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES + MLP, ids=shape_id)
def test_forward_matches_numpy(isa, dtype, activation, shape):
    """linear_forward = act(x @ weight.T + bias), weight in torch's (out, in) layout."""
    x, w, b, _ = random_layer(*shape, dtype)
    y = ops.linear_forward(x, w, b, activation)
    assert y.dtype == dtype and y.shape == (shape[0], shape[2])
    ref, bound = forward_reference(x, w, b, activation, dtype)
    assert_within(y, ref, bound, f"forward {activation}")
    # without a bias: the same as a zero bias
    y0 = ops.linear_forward(x, w, None, activation)
    ref0, bound0 = forward_reference(x, w, np.zeros_like(b), activation, dtype)
    assert_within(y0, ref0, bound0, f"forward {activation} no bias")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES + MLP, ids=shape_id)
def test_backward_matches_numpy(isa, dtype, activation, shape):
    """linear_backward's dx = dz @ W, dW = dz^T x, db = sum_rows dz with dz = dy * act'(y), and
    activation_backward's (dz, db), against float64 from the same forward output y."""
    x, w, b, dy = random_layer(*shape, dtype, "bwd")
    y = ops.linear_forward(x, w, b, activation)
    dz_ref = f64(dy) * deriv(activation, y)
    bounds = backward_bounds(activation, dy, x, w, y, y, dtype)

    dz, dbias = ops.activation_backward(dy, y, activation)
    assert dz.dtype == dbias.dtype == dtype
    assert_within(dz, dz_ref, bounds["dz"], "activation_backward dz")
    assert_within(dbias, dz_ref.sum(axis=0), bounds["dbias"], "activation_backward dbias")

    dx, dw, db = ops.linear_backward(dy, x, w, y, activation)
    assert dx.dtype == dw.dtype == db.dtype == dtype
    assert_within(dx, dz_ref @ f64(w), bounds["dx"], "dx")
    assert_within(dw, dz_ref.T @ f64(x), bounds["dweight"], "dweight")
    assert_within(db, dz_ref.sum(axis=0), bounds["dbias"], "dbias")
    np.testing.assert_array_equal(db, dbias)

    none_dx, dw2, db2 = ops.linear_backward(dy, x, w, y, activation, need_input_grad=False)
    assert none_dx is None
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)


def test_identity_backward_needs_no_output(isa, dtype):
    """For the identity, output may be omitted: dz is dy exactly."""
    x, w, _, dy = random_layer(7, 33, 3, dtype)
    dz, dbias = ops.activation_backward(dy, None, "identity")
    np.testing.assert_array_equal(dz, dy)
    dx, dw, db = ops.linear_backward(dy, x, w)  # activation defaults to the identity
    np.testing.assert_array_equal(dx, ops.gemm(dy, w))
    np.testing.assert_array_equal(dw, ops.gemm(dy, x, trans_a=True))
    np.testing.assert_array_equal(db, dbias)


# ---- against torch autograd ---------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES + MLP, ids=shape_id)
def test_matches_torch_autograd(isa, dtype, activation, shape):
    """forward and (dx, dW, db) equal torch's F.linear + activation + .backward(): bit for bit
    for identity/relu (exact data), within the rounding bounds for sigmoid/tanh."""
    x, w, b, dy = dyadic_layer(*shape, dtype)
    z = f64(x) @ f64(w).T + f64(b)
    assert np.array_equal(z.astype(np.float32), z) and (z != 0).all(), "data must be exact"
    y_t, dx_t, dw_t, db_t = torch_layer(x, w, b, dy, activation)
    y = ops.linear_forward(x, w, b, activation)
    dx, dw, db = ops.linear_backward(dy, x, w, y, activation)
    if activation in ("identity", "relu"):
        for got, ref, what in ((y, y_t, "y"), (dx, dx_t, "dx"), (dw, dw_t, "dW"), (db, db_t, "db")):
            assert got.dtype == dtype
            np.testing.assert_array_equal(got, ref.astype(dtype), err_msg=f"{activation} {what}")
        return
    tiny = float(np.finfo(dtype).smallest_subnormal)
    y_bound = (ACT_ULPS[activation] * eps(dtype) + REF_ACT_ULPS * eps(np.float64)) * np.abs(y_t)
    assert_within(y, y_t, y_bound + 2 * tiny, f"{activation} forward vs torch")
    bounds = backward_bounds(activation, dy, x, w, y, y_t, dtype)
    assert_within(dx, dx_t, bounds["dx"], f"{activation} dx vs torch")
    assert_within(dw, dw_t, bounds["dweight"], f"{activation} dW vs torch")
    assert_within(db, db_t, bounds["dbias"], f"{activation} db vs torch")


# ---- activation_backward's in-place and layout forms ---------------------------------------


def layer_output(name: str, shape, dtype, *key) -> tuple[np.ndarray, np.ndarray]:
    """(grad_output, output) with output in the activation's range (relu: exact zeros too)."""
    rng = rng_for("act", name, shape, np.dtype(dtype).name, *key)
    y = act_ref(name, rng.standard_normal(shape) * 2).astype(dtype)
    return rng.standard_normal(shape).astype(dtype), y


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_backward_in_place(isa, dtype, activation):
    """out=grad_output overwrites grad_output with dz, returns that very array, and gives the
    same bits as the out-of-place call (also for a separate preallocated out=)."""
    dy, y = layer_output(activation, (33, 130), dtype)
    dz, dbias = ops.activation_backward(dy, y, activation)
    buf = dy.copy()
    dz2, dbias2 = ops.activation_backward(buf, y, activation, out=buf)
    assert dz2 is buf
    np.testing.assert_array_equal(buf, dz)
    np.testing.assert_array_equal(dbias2, dbias)
    out = np.full_like(dy, np.nan)
    dz3, _ = ops.activation_backward(dy, y, activation, out=out)
    assert dz3 is out
    np.testing.assert_array_equal(out, dz)
    if activation != "identity":
        assert not np.array_equal(dz, dy), "the test data must make dz differ from dy"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_backward_strided_inputs(isa, dtype, activation):
    """Non-contiguous, Fortran-ordered and reversed grad_output/output give the same bits."""
    dy, y = layer_output(activation, (33, 130), dtype, "strided")
    dz, dbias = ops.activation_backward(dy, y, activation)
    wide_dy = np.zeros((33, 260), dtype)
    wide_dy[:, ::2] = dy
    for dy_view, y_view in (
        (wide_dy[:, ::2], np.asfortranarray(y)),
        (np.asfortranarray(dy), y[::-1][::-1]),
        (dy[::-1].copy()[::-1], np.ascontiguousarray(y.T).T),
    ):
        dz2, dbias2 = ops.activation_backward(dy_view, y_view, activation)
        np.testing.assert_array_equal(dz2, dz)
        np.testing.assert_array_equal(dbias2, dbias)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_backward_out_partially_overlapping_grad_output(activation):
    """out= shifted one row into grad_output's memory: activation_backward must refuse it (as
    gemm and the elementwise activations refuse overlapping out=) or compute the right dz and
    dbias anyway; it must never return silently wrong gradients. out overlapping output is
    refused."""
    rows, cols = 6, 8
    buf = rng_for("overlap", activation).standard_normal((rows + 1) * cols)
    dy = buf[: rows * cols].reshape(rows, cols)
    _, y = layer_output(activation, (rows, cols), np.float64, "overlap")
    want_dz, want_db = ops.activation_backward(dy.copy(), y, activation)
    out = buf[cols:].reshape(rows, cols)
    assert np.shares_memory(out, dy) and out is not dy
    try:
        dz, db = ops.activation_backward(dy, y, activation, out=out)
    except ValueError as exc:
        assert "overlap" in str(exc)
    else:
        np.testing.assert_array_equal(dz, want_dz, err_msg="dz silently wrong")
        np.testing.assert_array_equal(db, want_db, err_msg="dbias silently wrong")
    if activation != "identity":
        y_buf = y.copy()
        with pytest.raises(ValueError, match="out must not overlap output"):
            ops.activation_backward(dy, y_buf, activation, out=y_buf)


def test_empty_batch(isa, dtype):
    """A batch of 0 rows: empty outputs, zero weight and bias gradients (as torch gives)."""
    x, w, b, _ = random_layer(0, 5, 3, dtype)
    y = ops.linear_forward(x, w, b, "tanh")
    assert y.shape == (0, 3)
    dx, dw, db = ops.linear_backward(np.zeros((0, 3), dtype), x, w, y, "tanh")
    assert dx.shape == (0, 5)
    np.testing.assert_array_equal(dw, np.zeros((3, 5)))
    np.testing.assert_array_equal(db, np.zeros(3))


# ---- argument validation --------------------------------------------------------------------


def test_missing_output_for_non_identity():
    x, w, _, dy = random_layer(4, 5, 3, np.float64)
    for name in ("sigmoid", "relu", "tanh"):
        with pytest.raises(ValueError, match=f"'{name}' needs the forward output"):
            ops.linear_backward(dy, x, w, None, name)
        with pytest.raises(ValueError, match="needs the forward output"):
            ops.activation_backward(dy, None, name)


def test_shape_mismatches_name_the_shapes():
    x, w, b, dy = random_layer(4, 5, 3, np.float64)
    with pytest.raises(
        ValueError, match=r"x has 5 features but weight expects 4.*\(4, 5\).*\(3, 4\)"
    ):
        ops.linear_forward(x, np.ones((3, 4)), b)
    with pytest.raises(ValueError, match=re.escape("bias must have shape (3,), got (4,)")):
        ops.linear_forward(x, w, np.ones(4))
    msg = r"shapes disagree: grad_output \(4, 3\), x \(4, 5\), weight \(3, 6\)"
    with pytest.raises(ValueError, match=msg):
        ops.linear_backward(dy, x, np.ones((3, 6)))
    with pytest.raises(ValueError, match=r"grad_output \(5, 3\), x \(4, 5\)"):
        ops.linear_backward(np.ones((5, 3)), x, w)
    with pytest.raises(ValueError, match=r"grad_output \(4, 2\).*weight \(3, 5\)"):
        ops.linear_backward(np.ones((4, 2)), x, w)
    with pytest.raises(ValueError, match=re.escape("shape of grad_output (4, 3), got (3, 4)")):
        ops.activation_backward(dy, np.ones((3, 4)), "tanh")
    with pytest.raises(ValueError, match=re.escape("out must have shape (4, 3), got (4, 4)")):
        ops.activation_backward(dy, dy, "tanh", out=np.empty((4, 4)))
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.activation_backward(dy, dy, "tanh", out=np.empty((3, 4)).T)
    with pytest.raises(ValueError, match=r"must be 2-D.*reshape\(1, -1\)"):
        ops.linear_forward(x[0], w, b)


def test_dtype_errors():
    x, w, b, dy = random_layer(4, 5, 3, np.float32)
    with pytest.raises(TypeError, match="weight must have dtype float32"):
        ops.linear_forward(x, w.astype(np.float64), b)
    with pytest.raises(TypeError, match="bias must have dtype float32"):
        ops.linear_forward(x, w, b.astype(np.float64))
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.linear_forward(x.astype(np.int32), w, b)
    with pytest.raises(TypeError, match="grad_output must have dtype float32"):
        ops.linear_backward(dy.astype(np.float64), x, w)
    with pytest.raises(TypeError, match="output must have dtype float32"):
        ops.activation_backward(dy, dy.astype(np.float64), "relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.linear_forward(x, w, b, "softplus")


# ---- threads ------------------------------------------------------------------------------------

THREAD_LAYERS = [(512, 64, 512), (128, 784, 256)]  # batch 512 x 512 columns, and the MLP's first


@pytest.mark.parametrize("shape", THREAD_LAYERS, ids=shape_id)
def test_threads_bitwise_identical(isa, dtype, shape):
    """Forward, backward and activation_backward give the same bits on 1 and 2 threads."""
    x, w, b, dy = random_layer(*shape, dtype, "threads")
    results = []
    for threads in (1, 2):
        with using_threads(threads):
            run = []
            for name in ACTIVATIONS:
                y = ops.linear_forward(x, w, b, name)
                run.append(y)
                run.extend(ops.activation_backward(dy, y, name))
                if name in ("tanh", "relu"):
                    run.extend(ops.linear_backward(dy, x, w, y, name))
        results.append(run)
    for one, two in zip(*results, strict=True):
        np.testing.assert_array_equal(one, two)


# Children import the build this test session already loaded: scikit-build-core's editable
# finder would otherwise rebuild on import when csrc/ changed meanwhile (slow, and a different
# binary from the one under test).
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_thread_sizes_really_use_two_threads():
    """The bitwise test means something only if these sizes run on 2 threads: each kernel, in
    a fresh process (libgomp's pool outlives the first region), leaves a worker behind."""
    cases = {
        "activation_backward 512x512": "y = np.full((512, 512), 0.5, np.float32)\n"
        "ops.activation_backward(y, y, 'sigmoid')",
        "forward 512x64->512": "x = np.ones((512, 64), np.float32)\n"
        "ops.linear_forward(x, np.ones((512, 64), np.float32))",
        "dweight 512x512 @ 512x64": "dz = np.ones((512, 512), np.float32)\n"
        "ops.gemm(dz, np.ones((512, 64), np.float32), trans_a=True)",
    }
    for what, code in cases.items():
        before, after = os_threads_after(code)
        assert after == before + 1, f"{what} ran on one thread ({before} -> {after})"
