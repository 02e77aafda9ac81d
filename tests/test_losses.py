"""fastbp.ops.softmax_cross_entropy and fastbp.ops.mse: values and gradients against exact
references and torch, numerical stability, the error contract, and thread independence.

References are computed in long double from the very same (already rounded) inputs, so they are
exact to far below the tolerances; every tolerance is a forward-error bound of the kernel's
own arithmetic (u = eps/2 of the dtype, u64 that of double), derived where it is used.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastbp import _core, ops
from tests.conftest import eps, using_threads

LD = np.longdouble
EPS64 = float(np.finfo(np.float64).eps)
# classes 7 and 15: one lane short of a float64 / float32 AVX-512 vector (the one-vector path);
# 8 and 16: exactly one vector (the general loop)
SHAPES = [
    (1, 1),
    (1, 10),
    (7, 3),
    (6, 7),
    (4, 8),
    (5, 15),
    (3, 16),
    (128, 10),
    (33, 257),
    (257, 1000),
]
LABEL_KINDS = ["int64", "int32", "uint8", "list"]


def make_labels(rows: int, classes: int, kind: str, rng: np.random.Generator):
    y = rng.integers(0, classes, rows)
    if kind == "list":
        return [int(v) for v in y]
    return y.astype(kind)


def xent_reference(logits: np.ndarray, labels) -> tuple[LD, np.ndarray, np.ndarray]:
    """Exact (long double) mean cross-entropy, its gradient, and the softmax probabilities."""
    x = logits.astype(LD)
    y = np.asarray(labels, dtype=np.int64)
    rows = np.arange(x.shape[0])
    mx = x.max(axis=1, keepdims=True)
    e = np.exp(x - mx)
    s = e.sum(axis=1, keepdims=True)
    losses = np.log(s[:, 0]) + mx[:, 0] - x[rows, y]
    p = e / s
    grad = p.copy()
    grad[rows, y] -= 1
    return losses.mean(), grad / x.shape[0], p


def xent_bounds(logits: np.ndarray, labels, p: np.ndarray) -> tuple[float, np.ndarray]:
    """Forward-error bounds of fastbp's softmax cross-entropy (loss, per-element gradient).

    Per row with C classes, the kernel computes e_j = exp(fl(x_j - m)) (the exp is < 1 ulp; the
    rounded difference perturbs its argument by u|x_j - m|), sums the C positive e_j in the
    dtype (error <= gamma_C * sum, in any order) and takes log(sum) in double. So the row sum's
    relative error is below (C + 4) u + u |x_j - m|, and for e_j = 1 (the max) the last term is
    0; log turns a relative error into the same absolute error, and the rest is double
    arithmetic: u64 |x_label - m| for the subtraction. The loss bound is the mean of the row
    bounds (eps = 2u covers the mean's own double rounding with room to spare).
    Each gradient element scale * e_j / sum - scale [j = label] carries the sum's relative
    error plus the exp's and |x_j - m| u; the cancellation at the label is bounded by the error
    of p_label, i.e. by (C + 4) eps * scale. The smallest subnormal covers e_j that underflow.
    """
    dt = logits.dtype
    e = eps(dt)
    x = logits.astype(np.float64)
    rows, classes = x.shape
    y = np.asarray(labels, dtype=np.int64)
    mx = x.max(axis=1, keepdims=True)
    dist = np.abs(x - mx)
    row_loss_tol = (classes + 4) * e + EPS64 * dist[np.arange(rows), y]
    onehot = np.zeros_like(x)
    onehot[np.arange(rows), y] = 1
    grad_tol = (
        e * ((classes + 8 + dist) * p.astype(np.float64) + (classes + 8) * onehot)
        + 4 * float(np.finfo(dt).smallest_subnormal) * rows
    ) / rows
    return float(row_loss_tol.mean()) * (1 + EPS64 * rows), grad_tol


def assert_xent_matches_reference(logits, labels, loss, dlogits):
    ref_loss, ref_grad, p = xent_reference(logits, labels)
    loss_tol, grad_tol = xent_bounds(logits, labels, p)
    assert isinstance(loss, float)
    assert dlogits.shape == logits.shape and dlogits.dtype == logits.dtype
    assert abs(loss - ref_loss) <= loss_tol, (loss, ref_loss, loss_tol)
    err = np.abs(dlogits.astype(LD) - ref_grad).astype(np.float64)
    assert (err <= grad_tol).all(), float((err / grad_tol).max())


# ---- softmax cross-entropy: values and gradients -------------------------------------------------


@pytest.mark.parametrize("kind", LABEL_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_xent_matches_exact_reference(isa, dtype, shape, kind):
    """Loss and dlogits agree with the exact log-sum-exp reference to the forward-error bound,
    for every label container (int64/int32/uint8 arrays, Python lists)."""
    rng = np.random.default_rng([*shape, LABEL_KINDS.index(kind)])
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    y = make_labels(shape[0], min(shape[1], 256), kind, rng)
    loss, g = ops.softmax_cross_entropy(x, y)
    assert_xent_matches_reference(x, y, loss, g)
    # properties of the exact answer that must survive rounding
    assert loss >= 0
    _, _, p = xent_reference(x, y)
    _, grad_tol = xent_bounds(x, y, p)
    # each exact row sums to 0, so a row sum is bounded by the row's summed element bounds
    row_sums = np.abs(g.astype(LD).sum(axis=1)).astype(np.float64)
    assert (row_sums <= grad_tol.sum(axis=1)).all()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_xent_matches_torch(isa, dtype, shape):
    """Loss and gradient agree with torch.nn.functional.cross_entropy + autograd.

    torch run in the same dtype obeys the same forward-error bound as fastbp (its float32 mean
    over rows adds at most gamma_rows * loss), so the two agree to twice the bound plus that;
    torch in float64 on the same inputs obeys the float64 bound, a much tighter second check
    for float32 inputs.
    """
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    y = rng.integers(0, shape[1], shape[0])
    loss, g = ops.softmax_cross_entropy(x, y)
    ref_loss, _, p = xent_reference(x, y)
    loss_tol, grad_tol = xent_bounds(x, y, p)

    t = torch.from_numpy(x.copy()).requires_grad_()
    t_loss = F.cross_entropy(t, torch.from_numpy(y))
    t_loss.backward()
    assert abs(loss - t_loss.item()) <= 2 * loss_tol + shape[0] * eps(dtype) * float(ref_loss)
    assert (np.abs(g.astype(np.float64) - t.grad.numpy()) <= 2 * grad_tol).all()

    # torch in float64 obeys the float64 instance of the same bound
    x64 = x.astype(np.float64)
    loss_tol64, grad_tol64 = xent_bounds(x64, y, p)
    t64 = torch.from_numpy(x64).requires_grad_()
    t64_loss = F.cross_entropy(t64, torch.from_numpy(y))
    t64_loss.backward()
    assert abs(loss - t64_loss.item()) <= loss_tol + loss_tol64
    assert (np.abs(g.astype(np.float64) - t64.grad.numpy()) <= grad_tol + grad_tol64).all()


@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_xent_huge_logits_are_stable(isa, dtype, scale):
    """Logits of +-1e4 and +-1e30 (finite in both dtypes) give a finite loss and gradients
    matching the reference: no exp overflow, no inf - inf."""
    rng = np.random.default_rng(7)
    rows, classes = 9, 13
    x = (rng.choice([-1.0, 1.0], (rows, classes)) * scale).astype(dtype)
    x[:, 5] = scale  # every row has a maximum
    y = rng.integers(0, classes, rows)
    loss, g = ops.softmax_cross_entropy(x, y)
    assert np.isfinite(loss) and np.isfinite(g).all()
    assert_xent_matches_reference(x, y, loss, g)


def test_xent_float32_extreme_logits(isa):
    """+-FLT_MAX in float32: x - max overflows to -inf in float32, yet the loss, taken in
    double, is the finite exact 2 * FLT_MAX for a label on the minimum and 0 on the maximum."""
    big = float(np.finfo(np.float32).max)
    x = np.array([[big, -big, 0.0], [-big, -big, big]], dtype=np.float32)
    loss, g = ops.softmax_cross_entropy(x, [1, 2])
    assert loss == pytest.approx(big, rel=4 * EPS64)  # mean of 2 * FLT_MAX and 0
    np.testing.assert_array_equal(g, np.array([[0.5, -0.5, 0], [0, 0, 0]], np.float32))


def test_xent_dominant_logit_rows(isa, dtype):
    """Rows where one logit dominates: probabilities one-hot to rounding; the loss is ~0 when
    the label is the dominant class and ~the gap when it is not."""
    classes = 37
    x = np.zeros((4, classes), dtype=dtype)
    x[0, 3] = 50  # label on the dominant class
    x[1, 36] = 50  # dominant in the tail lanes, label elsewhere
    x[2, 0] = 1e4
    x[3, 20] = 800  # exp(-800) underflows even in float64
    y = [3, 0, 0, 5]
    loss, g = ops.softmax_cross_entropy(x, y)
    assert_xent_matches_reference(x, y, loss, g)
    assert (loss * 4 - 50 - 800) == pytest.approx(0, abs=1e-3)


def test_xent_neg_inf_logits(isa, dtype):
    """-inf logits away from the label are probability 0 and leave the loss finite."""
    x = np.zeros((2, 11), dtype=dtype)
    x[0, [1, 4, 10]] = -np.inf
    x[1, :10] = -np.inf
    loss, g = ops.softmax_cross_entropy(x, [0, 10])
    assert loss == pytest.approx(np.log(8) / 2, rel=20 * eps(dtype))
    assert g[0, 1] == 0 and g[0, 10] == 0 and (g[1] == 0).all()


@pytest.mark.parametrize("where", [0, 5, 12, "all"])
def test_xent_nan_propagates(isa, dtype, where):
    """A NaN logit (in a vector body, in the tail, or a whole row) makes the loss NaN without
    crashing; the other rows' gradients are exactly what they are without the NaN."""
    rng = np.random.default_rng(0 if where == "all" else where)
    x = rng.standard_normal((3, 13)).astype(dtype)
    y = np.array([2, 3, 4])
    _, g_clean = ops.softmax_cross_entropy(x, y)
    x[1, slice(None) if where == "all" else where] = np.nan
    loss, g = ops.softmax_cross_entropy(x, y)
    assert np.isnan(loss)
    assert np.isnan(g[1]).all()
    np.testing.assert_array_equal(g[[0, 2]], g_clean[[0, 2]])


# ---- softmax cross-entropy: errors -----------------------------------------------------------


@pytest.mark.parametrize("bad", [10, 11, 255, -1, -7])
def test_xent_label_out_of_range(bad):
    """A label >= classes or < 0 is a ValueError naming the label and the valid range."""
    x = np.zeros((4, 10))
    labels = np.array([0, 3, bad, 9])
    with pytest.raises(ValueError, match=rf"\[0, 10\).*{bad}"):
        ops.softmax_cross_entropy(x, labels)
    with pytest.raises(ValueError, match=rf"\[0, 10\).*{bad}"):
        ops.softmax_cross_entropy(x, [int(v) for v in labels])


@pytest.mark.parametrize(
    "labels",
    [np.array([0.0, 1.0, 2.0]), [0.0, 1.0, 2.0], np.array([True, False, True]), ["0", "1", "2"]],
    ids=["float-array", "float-list", "bool", "str"],
)
def test_xent_non_integer_labels(labels):
    """Float, bool and string labels are a TypeError (no silent truncation)."""
    with pytest.raises(TypeError, match="integer"):
        ops.softmax_cross_entropy(np.zeros((3, 4)), labels)


@pytest.mark.parametrize("labels", [[0, 1], [0, 1, 2, 3], [[0], [1], [2]], 1])
def test_xent_labels_wrong_shape(labels):
    """Labels that are not one per row are a ValueError stating the expected shape."""
    with pytest.raises(ValueError, match=r"\(3,\)"):
        ops.softmax_cross_entropy(np.zeros((3, 4)), np.asarray(labels))


def test_xent_1d_logits():
    """1-D logits are a ValueError whose message suggests reshape(1, -1)."""
    with pytest.raises(ValueError, match=r"2-D.*reshape\(1, -1\)"):
        ops.softmax_cross_entropy(np.zeros(5), [1])


@pytest.mark.parametrize("shape", [(0, 10), (3, 0), (0, 0)])
def test_xent_empty_batch(shape):
    """An empty batch (or zero classes) is a ValueError, not a 0/0 NaN."""
    with pytest.raises(ValueError, match="non-empty"):
        ops.softmax_cross_entropy(np.zeros(shape), np.zeros(shape[0], np.int64))


def test_xent_int_logits():
    """Integer logits are a TypeError naming the supported dtypes."""
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.softmax_cross_entropy(np.zeros((2, 3), np.int64), [0, 1])


def test_xent_does_not_modify_inputs(dtype):
    """Strided / Fortran logits are read, not written; labels are left as given."""
    rng = np.random.default_rng(9)
    base = rng.standard_normal((6, 22)).astype(dtype)
    x = base[:, ::2]
    y = np.array([1, 0, 3, 10, 2, 4], dtype=np.int32)
    snapshot, y_snapshot = base.copy(), y.copy()
    loss, g = ops.softmax_cross_entropy(x, y)
    ref_loss, ref_g = ops.softmax_cross_entropy(np.ascontiguousarray(x), y)
    assert loss == ref_loss
    np.testing.assert_array_equal(g, ref_g)
    loss_f, g_f = ops.softmax_cross_entropy(np.asfortranarray(x), y)
    assert loss_f == ref_loss
    np.testing.assert_array_equal(g_f, ref_g)
    np.testing.assert_array_equal(base, snapshot)
    np.testing.assert_array_equal(y, y_snapshot)


# ---- mse ----------------------------------------------------------------------------------------


def mse_bounds(pred: np.ndarray, target: np.ndarray, ref_total: float, n_scale: int):
    """Forward-error bound of fastbp's mse loss: d = fl(p - t) in the dtype (relative u),
    d*d in double (2u + u^2 + u64), a double sum of n terms (gamma_n in u64) and the scale
    1/n and its product (2 u64). Taking eps = 2u: |loss - exact| <= (eps + (n + 4) eps64) loss.
    """
    n = pred.size
    return (eps(pred.dtype) + (n + 4) * EPS64) * ref_total / n_scale


def mse_reference(pred: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """Exact sum of squares (long double; p - t of float32/64 is exact or nearly so there)
    and the exact difference p - t."""
    d = pred.astype(LD) - target.astype(LD)
    return float((d * d).sum()), d


def ulp_of(ref: np.ndarray, dtype) -> np.ndarray:
    """The ulp of `dtype` at the exact value ref: 2^(e - p) for |ref| in [2^(e-1), 2^e), with
    the subnormal spacing as the floor (np.spacing of ref rounded, except just below a power of
    two, where it is the smaller spacing of ref's own binade)."""
    fi = np.finfo(dtype)
    _, e = np.frexp(np.abs(ref).astype(LD))
    return np.maximum(np.ldexp(LD(1), (e - fi.nmant - 1).astype(np.int32)), fi.smallest_subnormal)


def ulp_error(y: np.ndarray, ref: np.ndarray, dtype) -> np.ndarray:
    """|y - ref| in ulp of `dtype` at the exact value ref."""
    return (np.abs(y.astype(LD) - ref) / ulp_of(ref, dtype)).astype(np.float64)


# dpred = fl(fl(2 * scale) * fl(p - t)): three roundings, |err| <= 3u |dpred| < 3 ulp.
MSE_GRAD_ULP = 3.0
MSE_SHAPES = [(1, 1), (1, 10), (7, 3), (128, 10), (33, 257), (257, 1000), (1,), (7,), (33,),
              (257,), (1000003,), (3, 4, 5)]  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", MSE_SHAPES, ids=str)
def test_mse_matches_exact_reference(isa, dtype, shape, reduction):
    """Loss within its forward-error bound and dpred within 3 ulp of the exact values."""
    rng = np.random.default_rng(sum(shape))
    pred = rng.standard_normal(shape).astype(dtype)
    target = rng.standard_normal(shape).astype(dtype)
    loss, dpred = ops.mse(pred, target, reduction=reduction)
    n = pred.size
    n_scale = n if reduction == "mean" else 1
    total, d = mse_reference(pred, target)
    assert isinstance(loss, float)
    assert abs(loss - total / n_scale) <= mse_bounds(pred, target, total, n_scale)
    assert dpred.shape == shape and dpred.dtype == dtype
    assert ulp_error(dpred, 2 * d / n_scale, dtype).max() <= MSE_GRAD_ULP


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (128, 10), (257, 1000)], ids=str)
def test_mse_matches_torch(isa, dtype, shape, reduction):
    """torch.nn.functional.mse_loss and its autograd gradient agree.

    Loss: torch in float64 on the same inputs is exact to ~n u64, so fastbp's bound (plus that)
    applies; torch in the dtype itself may sum in float32, whose worst case is gamma_n * loss.
    Gradient: torch computes fl(fl(2/n) * fl(p - t)) like fastbp, so each is within 3 ulp of the
    exact value and they differ by at most 6 ulp.
    """
    rng = np.random.default_rng(3)
    pred = rng.standard_normal(shape).astype(dtype)
    target = rng.standard_normal(shape).astype(dtype)
    loss, dpred = ops.mse(pred, target, reduction=reduction)
    n_scale = pred.size if reduction == "mean" else 1
    total, d = mse_reference(pred, target)
    bound = mse_bounds(pred, target, total, n_scale)

    t = torch.from_numpy(pred.copy()).requires_grad_()
    t_loss = F.mse_loss(t, torch.from_numpy(target), reduction=reduction)
    t_loss.backward()
    t64_loss = F.mse_loss(
        torch.from_numpy(pred.astype(np.float64)),
        torch.from_numpy(target.astype(np.float64)),
        reduction=reduction,
    ).item()
    assert abs(loss - t64_loss) <= bound + (pred.size + 2) * EPS64 * total / n_scale
    assert abs(loss - t_loss.item()) <= bound + (pred.size + 2) * eps(dtype) * total / n_scale
    exact = 2 * d / n_scale
    assert ulp_error(dpred, exact, dtype).max() <= MSE_GRAD_ULP
    diff = np.abs(dpred.astype(LD) - t.grad.numpy().astype(LD)) / ulp_of(exact, dtype)
    assert diff.max() <= 2 * MSE_GRAD_ULP


def test_mse_sum_mean_relation(isa, dtype):
    """'sum' is the accumulated total and 'mean' that total over n: the losses differ by the
    factor n up to the rounding of 1/n and the product (2 u64); dpred for 'sum' is exactly
    2 (p - t) rounded in the dtype, and 'mean''s is it times fl(2/n)/2 to two roundings."""
    rng = np.random.default_rng(21)
    pred = rng.standard_normal((33, 31)).astype(dtype)
    target = rng.standard_normal((33, 31)).astype(dtype)
    n = pred.size
    loss_sum, d_sum = ops.mse(pred, target, reduction="sum")
    loss_mean, d_mean = ops.mse(pred, target, reduction="mean")
    loss_default, d_default = ops.mse(pred, target)
    assert loss_default == loss_mean
    np.testing.assert_array_equal(d_default, d_mean)
    assert abs(loss_mean - loss_sum / n) <= EPS64 * loss_mean
    np.testing.assert_array_equal(d_sum, 2 * (pred - target))
    assert (np.abs(d_mean - d_sum / n) <= eps(dtype) * np.abs(d_sum / n)).all()


def test_mse_exact_small_case(isa, dtype):
    """A case with exact arithmetic: p - t = (1, -2, 3), loss 14 (sum) exactly and 14/3 (mean)
    up to the rounding of 1/3 and of the product (2 u64)."""
    pred = np.array([1.0, 0.0, 5.0], dtype)
    target = np.array([0.0, 2.0, 2.0], dtype)
    assert ops.mse(pred, target, "sum")[0] == 14.0
    assert abs(ops.mse(pred, target, "mean")[0] - 14 / 3) <= EPS64 * 14 / 3
    np.testing.assert_array_equal(ops.mse(pred, target, "sum")[1], [2.0, -4.0, 6.0])


def test_mse_nan_and_inf(isa, dtype):
    """A NaN in pred makes the loss NaN; an inf difference makes it inf (no crash)."""
    pred = np.zeros(9, dtype)
    target = np.ones(9, dtype)
    pred[4] = np.nan
    loss, d = ops.mse(pred, target)
    assert np.isnan(loss) and np.isnan(d[4]) and np.isfinite(np.delete(d, 4)).all()
    pred[4] = np.inf
    loss, d = ops.mse(pred, target)
    assert loss == np.inf and d[4] == np.inf


def test_mse_thread_count_independent(isa, dtype):
    """2**20 elements: loss and gradient bitwise equal on one and on two threads."""
    rng = np.random.default_rng(8)
    pred = rng.standard_normal(2**20).astype(dtype)
    target = rng.standard_normal(2**20).astype(dtype)
    with using_threads(1):
        loss1, d1 = ops.mse(pred, target)
    with using_threads(2):
        loss2, d2 = ops.mse(pred, target)
    assert loss1 == loss2
    assert d1.tobytes() == d2.tobytes()


def test_xent_thread_count_independent(isa, dtype):
    """A 512 x 1000 batch: loss and dlogits bitwise equal on one and on two threads."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((512, 1000)).astype(dtype)
    y = rng.integers(0, 1000, 512)
    with using_threads(1):
        loss1, g1 = ops.softmax_cross_entropy(x, y)
    with using_threads(2):
        loss2, g2 = ops.softmax_cross_entropy(x, y)
    assert loss1 == loss2
    assert g1.tobytes() == g2.tobytes()


@pytest.mark.parametrize("classes", [1, 2, 3, 7, 10, 15])
def test_xent_narrow_batch_matches_row_by_row(isa, dtype, classes):
    """Fewer classes than a vector: whole blocks of rows run one row per lane (csrc/loss.c's
    softmax_xent_lanes) and the rest row by row, with the same arithmetic, so each row of a
    67-row batch gets the bits a one-row call gives it, and the batch's loss is the in-order sum
    of theirs (scale 1). Rows include NaN, -inf, +inf, +-0 and tied maxima."""
    rng = np.random.default_rng(classes)
    rows = 67
    x = (rng.standard_normal((rows, classes)) * 10.0 ** rng.uniform(-2, 2, (rows, 1))).astype(dtype)
    x[1] = np.nan
    x[2] = -np.inf
    x[3, 0] = np.nan
    x[4, -1] = -np.inf
    x[5] = 0.0
    x[6] = -0.0
    x[7] = 3.0
    x[8, 0] = np.inf
    x[9, ::2] = -0.0
    y = rng.integers(0, classes, rows)
    g_batch = np.empty_like(x)
    loss_batch = _core.softmax_xent(g_batch, x, y, 1.0)
    losses = []
    for r in range(rows):
        g_row = np.empty((1, classes), dtype)
        losses.append(_core.softmax_xent(g_row, x[r : r + 1], y[r : r + 1], 1.0))
        assert g_row.tobytes() == g_batch[r : r + 1].tobytes(), f"row {r}: {x[r]}"
    assert np.isnan(loss_batch) and np.isnan(losses[1])
    finite = [r for r in range(rows) if np.isfinite(losses[r])]
    assert len(finite) >= rows - 5
    loss_batch = _core.softmax_xent(
        np.empty((len(finite), classes), dtype), x[finite], y[finite], 1.0
    )
    total = 0.0
    for r in finite:
        total += losses[r]
    assert loss_batch == total


# ---- mse: errors ----------------------------------------------------------------------------------


def test_mse_shape_mismatch():
    """Different shapes are a ValueError showing both shapes (no broadcasting)."""
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)"):
        ops.mse(np.zeros((3, 4)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4,\)"):
        ops.mse(np.zeros((3, 4)), np.zeros(4))


@pytest.mark.parametrize("reduction", ["none", "MEAN", "avg", None])
def test_mse_bad_reduction(reduction):
    """Only 'mean' and 'sum' are accepted."""
    with pytest.raises(ValueError, match="reduction"):
        ops.mse(np.zeros(3), np.ones(3), reduction=reduction)


def test_mse_dtype_mismatch():
    """pred and target of different float dtypes are a TypeError; ints too."""
    with pytest.raises(TypeError, match="float64"):
        ops.mse(np.zeros(3, np.float64), np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="float32"):
        ops.mse(np.zeros(3, np.float32), np.zeros(3, np.float64))
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.mse(np.zeros(3, np.int64), np.zeros(3, np.int64))


def test_mse_empty():
    """No elements is a ValueError, not a 0/0 NaN."""
    with pytest.raises(ValueError, match="at least one"):
        ops.mse(np.zeros((0, 3)), np.zeros((0, 3)))


def test_mse_input_layouts(dtype):
    """Strided, transposed and read-only inputs give the contiguous result, unmodified."""
    rng = np.random.default_rng(13)
    base_p = rng.standard_normal((9, 14)).astype(dtype)
    base_t = rng.standard_normal((14, 9)).astype(dtype)
    base_t.flags.writeable = False
    snapshot = base_p.copy()
    p, t = base_p[:, ::2], base_t.T[:, ::2]
    loss, d = ops.mse(p, t)
    ref_loss, ref_d = ops.mse(np.ascontiguousarray(p), np.ascontiguousarray(t))
    assert loss == ref_loss
    np.testing.assert_array_equal(d, ref_d)
    np.testing.assert_array_equal(base_p, snapshot)
