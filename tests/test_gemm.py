"""fastbp.ops.gemm against a float64 NumPy reference, with rigorous rounding-error bounds.

Every comparison uses ``dot_error_bound`` (gamma_k |A||B|, Higham Thm 3.5) for the product,
plus the float64 reference's own error (the same bound in float64), plus one unit roundoff per
extra rounding the fused epilogue performs (counted in ``epilogue_bound``), plus a few ulp for
the vectorised sigmoid/tanh (measured at <= 2.4 ulp over [-120, 120]; we allow 4). No
``atol + rtol * |ref|`` anywhere: a wrong element, a skipped K block or a stale tile is off by
O(|A||B|), far above these bounds.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fastbp import ops
from tests.conftest import (
    assert_within,
    dot_error_bound,
    eps,
    os_threads_after,
    using_threads,
)

TRANS = list(itertools.product([False, True], repeat=2))
ACTIVATIONS = ["identity", "sigmoid", "relu", "tanh"]
# The smallest KC of any ISA and dtype: ceil(k / KC_MIN) bounds the number of K blocks.
KC_MIN = 256
# Evaluation error of the activation itself, in units of eps * |result| (identity/relu exact).
ACT_ULPS = {"identity": 0, "relu": 0, "sigmoid": 4, "tanh": 4}
# The float64 reference activations (np.exp, np.tanh) are accurate to ~1 ulp; allow 4.
REF_ACT_ULPS = 4
# Children import the build this test session already loaded: scikit-build-core's editable
# finder would otherwise rebuild on import when csrc/ changed meanwhile (slow, and a different
# binary from the one under test).


# ---- helpers ---------------------------------------------------------------------------------


def rng_for(*key: object) -> np.random.Generator:
    """A generator seeded from the test's parameters: reproducible, different per case."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def gamma(n: int, dtype) -> float:
    """gamma_n = n u / (1 - n u): the bound on n chained relative roundings (Higham Lemma 3.1)."""
    u = eps(dtype) / 2
    return n * u / (1 - n * u)


def operands(m: int, k: int, n: int, dtype, *key: object) -> tuple[np.ndarray, np.ndarray]:
    """op(a) (m, k) and op(b) (k, n), standard normal, in dtype."""
    rng = rng_for(m, k, n, np.dtype(dtype).name, *key)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    return a, b


def as_arg(mat: np.ndarray, trans: bool) -> np.ndarray:
    """The array to pass so that op(arg) == mat for this transpose flag."""
    return np.ascontiguousarray(mat.T) if trans else mat


def f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def bound_coefficient(k: int, dtype) -> float:
    """dot_error_bound(|A|, |B|, k, dtype) is this scalar times |A||B|, plus the same for the
    float64 reference's own rounding: lets us form |A||B| once per bound."""
    one = np.ones((1, 1))
    return float(
        dot_error_bound(one, one, k, dtype)[0, 0] + dot_error_bound(one, one, k, np.float64)[0, 0]
    )


def product_bound(a: np.ndarray, b: np.ndarray, dtype) -> np.ndarray:
    """|fl(a @ b) - ref| for ref = the float64 NumPy product: both sides' gamma_k bounds."""
    return bound_coefficient(a.shape[1], dtype) * (np.abs(f64(a)) @ np.abs(f64(b)))


def epilogue_bound(a, b, dtype, *, alpha=1.0, beta=0.0, c=None, bias=None) -> np.ndarray:
    """Bound on the pre-activation alpha*a@b + beta*c + bias as gemm computes it.

    Each of the k + 2 terms (alpha a_p b_p, beta c, bias) is rounded at most once per
    multiply/add on its path: k for the blocked dot product (Higham), and per K block one
    alpha-scale and one accumulate into C, plus beta*c's multiply and the bias add. So
    gamma_{k + 2*blocks + 2} times the magnitude sum is rigorous; the float64 reference adds
    the same count in float64.
    """
    k = a.shape[1]
    n_ops = k + 2 * max(1, math.ceil(k / KC_MIN)) + 2
    mag = abs(alpha) * (np.abs(f64(a)) @ np.abs(f64(b)))
    if c is not None and beta != 0:
        mag = mag + abs(beta) * np.abs(f64(c))
    if bias is not None:
        mag = mag + np.abs(f64(bias))
    return (gamma(n_ops, dtype) + gamma(n_ops, np.float64)) * mag


def act_ref(name: str, z: np.ndarray) -> np.ndarray:
    """The activation in float64 (a stable sigmoid: no overflow warning, NaN propagates)."""
    z = f64(z)
    if name == "sigmoid":
        with np.errstate(over="ignore", invalid="ignore"):
            e = np.exp(-np.abs(z))
            return np.where(z >= 0, 1 / (1 + e), e / (1 + e))
    if name == "relu":
        return np.where(z > 0, z, np.where(np.isnan(z), z, 0.0))
    if name == "tanh":
        return np.tanh(z)
    return z


def act_bound(name: str, z: np.ndarray, pre_bound: np.ndarray, dtype) -> np.ndarray:
    """Carry a pre-activation error bound through the activation, then add its evaluation error.

    All four activations are nondecreasing, so act(z_hat) lies in [act(z - e), act(z + e)]
    (e widened by one float64 ulp of z for the rounding of z +- e): tighter than a Lipschitz
    bound, and exact where the activation saturates. On top: ACT_ULPS of the result for the
    kernel's sigmoid/tanh (two subnormal steps for results in the subnormal range) and the
    float64 reference activation's own error.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(z)
        e = np.where(finite, pre_bound + np.spacing(np.abs(np.where(finite, z, 0))), 0.0)
        y, lo, hi = act_ref(name, z), act_ref(name, z - e), act_ref(name, z + e)
        width = np.where(finite, np.maximum(hi - y, y - lo), 0.0)
        mag = np.where(finite, np.maximum(np.abs(lo), np.abs(hi)), np.abs(y))
    bound = width + REF_ACT_ULPS * eps(np.float64) * mag
    if ACT_ULPS[name]:
        tiny = float(np.finfo(dtype).smallest_subnormal)
        bound = bound + ACT_ULPS[name] * eps(dtype) * mag + 2 * tiny
    return bound


def check_gemm(
    a_mat,
    b_mat,
    dtype,
    what,
    *,
    alpha=1.0,
    beta=0.0,
    c=None,
    bias=None,
    activation=None,
    trans_a=False,
    trans_b=False,
    out=None,
):
    """Run gemm with op(a) = a_mat, op(b) = b_mat and compare with the float64 reference."""
    name = activation or "identity"
    z = alpha * (f64(a_mat) @ f64(b_mat))
    if c is not None and beta != 0:
        z = z + beta * f64(c)
    if bias is not None:
        z = z + f64(bias)
    y = act_ref(name, z)
    pre = epilogue_bound(a_mat, b_mat, dtype, alpha=alpha, beta=beta, c=c, bias=bias)
    bound = act_bound(name, z, pre, dtype)
    kwargs = {"alpha": alpha, "beta": beta, "bias": bias, "activation": activation, "out": out}
    got = ops.gemm(
        as_arg(a_mat, trans_a), as_arg(b_mat, trans_b), trans_a=trans_a, trans_b=trans_b, **kwargs
    )
    if out is not None:
        assert got is out, f"{what}: gemm must return the out= array itself"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}"
    assert_within(got, y, bound, what)
    return got


# ---- correctness over the shape grid ----------------------------------------------------------

SMALL = list(itertools.product([1, 7, 33], repeat=3))
BLOCKED = [
    (24, 24, 24),  # the largest direct (unpacked) product ...
    (24, 24, 25),  # ... and the smallest packed one
    (257, 33, 7),
    (7, 257, 33),
    (33, 7, 257),
    (257, 257, 33),
    (33, 300, 33),  # crosses KC = 256
    (7, 513, 17),  # three K blocks
    (150, 40, 37),  # crosses MC: 144 (f32 avx2), 128/72/64 (the others), 12 (avx512: MR)
    (150, 513, 40),  # M and K blocks together
    (3, 5, 4100),  # crosses NC = 4080 (avx2) / 4096 (generic)
    (2, 300, 4100),  # N and K blocks together
    (257, 257, 257),
]


@pytest.mark.parametrize(("m", "k", "n"), SMALL + BLOCKED, ids=lambda v: str(v))
def test_gemm_matches_reference(isa, dtype, m, k, n):
    """Every shape x transpose combination agrees with float64 within gamma_k |A||B|."""
    a, b = operands(m, k, n, dtype)
    ref = f64(a) @ f64(b)
    bound = product_bound(a, b, dtype)
    for trans_a, trans_b in TRANS:
        got = ops.gemm(as_arg(a, trans_a), as_arg(b, trans_b), trans_a=trans_a, trans_b=trans_b)
        assert got.dtype == dtype and got.flags.c_contiguous
        assert_within(got, ref, bound, f"{isa} {dtype} {(m, k, n)} trans={trans_a, trans_b}")


@pytest.mark.parametrize(
    ("m", "k", "n"), [(0, 7, 33), (7, 33, 0), (0, 0, 0), (0, 300, 5), (1, 0, 1), (33, 0, 7)]
)
def test_empty_dimensions(isa, dtype, m, k, n):
    """M or N = 0 returns an empty (m, n) result; K = 0 with beta = 0 gives exact zeros."""
    a, b = operands(m, k, n, dtype)
    for trans_a, trans_b in TRANS:
        got = ops.gemm(as_arg(a, trans_a), as_arg(b, trans_b), trans_a=trans_a, trans_b=trans_b)
        assert got.shape == (m, n) and got.dtype == dtype
        np.testing.assert_array_equal(got, np.zeros((m, n)))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(("m", "n"), [(1, 1), (7, 33), (33, 7)])
def test_k_zero_is_epilogue_only(isa, dtype, activation, m, n):
    """K = 0 computes act(beta * C + bias) (and act(bias) without out=), on every path."""
    rng = rng_for("k0", m, n, dtype.name, activation)
    c = rng.standard_normal((m, n)).astype(dtype)
    bias = rng.standard_normal(n).astype(dtype)
    a, b = np.zeros((m, 0), dtype), np.zeros((0, n), dtype)
    for trans_a, trans_b in TRANS:
        what = f"K=0 {activation} trans={trans_a, trans_b}"
        check_gemm(
            a,
            b,
            dtype,
            what,
            beta=-0.75,
            c=c,
            out=c.copy(),
            bias=bias,
            activation=activation,
            trans_a=trans_a,
            trans_b=trans_b,
        )
        check_gemm(
            a,
            b,
            dtype,
            what + " no out",
            bias=bias,
            activation=activation,
            trans_a=trans_a,
            trans_b=trans_b,
        )
        nan_out = np.full((m, n), np.nan, dtype)
        check_gemm(a, b, dtype, what + " beta=0", out=nan_out, bias=bias, activation=activation)


# ---- alpha, beta, bias and the fused activation ------------------------------------------------

# One output column (a regression head): (33, 7, 1) and (257, 33, 1) take the direct path's
# eight-row passes and the rest in fours and ones, (1030, 100, 1) the direct path above the small
# products' limit (one column, one K block), (300, 300, 1) the packed path (two K blocks)
EPILOGUE_SHAPES = [
    (7, 7, 7),
    (33, 7, 1),
    (257, 33, 1),
    (1030, 100, 1),
    (300, 300, 1),
    (33, 300, 33),
    (150, 513, 40),
    (3, 5, 4100),
]
# (alpha, beta): exactly representable in float32, so the reference needs no rounding of them.
SCALINGS = [(1.0, 0.0), (1.5, 0.0), (-0.75, 0.5), (2.0, -1.25)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(("m", "k", "n"), EPILOGUE_SHAPES, ids=lambda v: str(v))
def test_fused_epilogue(isa, dtype, activation, m, k, n):
    """act(alpha op(a) op(b) + beta C + bias) matches float64 for each activation, with and
    without bias, for the direct path, several K blocks (bias/act only on the last), M blocks
    and N panels; the linear-layer layout x @ w.T (trans_b) is among the combinations."""
    a, b = operands(m, k, n, dtype, "epi")
    rng = rng_for("epi-c", m, k, n, dtype.name)
    c = rng.standard_normal((m, n)).astype(dtype)
    bias = rng.standard_normal(n).astype(dtype)
    # each scaling meets a different transpose combination (all four are covered)
    for (alpha, beta), (trans_a, trans_b) in zip(SCALINGS, TRANS, strict=True):
        for use_bias in (bias, None):
            out = c.copy() if beta != 0 else None
            what = f"{activation} alpha={alpha} beta={beta} bias={use_bias is not None}"
            what += f" trans={trans_a, trans_b}"
            check_gemm(
                a,
                b,
                dtype,
                what,
                alpha=alpha,
                beta=beta,
                c=c,
                out=out,
                bias=use_bias,
                activation=activation,
                trans_a=trans_a,
                trans_b=trans_b,
            )


@pytest.mark.parametrize(("m", "k", "n"), [(7, 9, 5), (33, 300, 33), (150, 513, 40), (3, 5, 4100)])
def test_beta_zero_never_reads_out(isa, dtype, m, k, n):
    """With beta == 0 (also -0.0) the old contents of out (NaN here) must not leak in."""
    a, b = operands(m, k, n, dtype, "nan")
    bias = rng_for("nanb", m, n).standard_normal(n).astype(dtype)
    for beta in (0.0, -0.0):
        for activation in ("identity", "tanh"):
            out = np.full((m, n), np.nan, dtype)
            got = check_gemm(
                a,
                b,
                dtype,
                f"NaN out, beta={beta}",
                alpha=1.5,
                beta=beta,
                out=out,
                bias=bias,
                activation=activation,
            )
            assert not np.isnan(got).any()


def test_beta_reads_out_and_returns_it(isa, dtype):
    """beta != 0 scales the given out (accumulate mode, as a gradient accumulation uses)."""
    a, b = operands(33, 300, 20, dtype, "acc")
    c = rng_for("acc-c").standard_normal((33, 20)).astype(dtype)
    out = c.copy()
    check_gemm(a, b, dtype, "beta=1", beta=1.0, c=c, out=out)
    # beta = 1 twice accumulates twice: out = 2 a@b + c within the bound of that expression
    ops.gemm(a, b, beta=1.0, out=out)
    ref = 2 * (f64(a) @ f64(b)) + f64(c)
    bound = 2 * epilogue_bound(a, b, dtype, alpha=2.0, beta=1.0, c=c) + 2 * eps(dtype) * np.abs(ref)
    assert_within(out, ref, bound, "two accumulations")


# ---- memory layouts -------------------------------------------------------------------------


def make_layout(kind: str, shape: tuple[int, int], dtype, rng) -> np.ndarray:
    """An array of `shape` with the requested memory layout (values standard normal)."""
    r, c = shape
    if kind == "rows_step2":
        return rng.standard_normal((2 * r, c)).astype(dtype)[::2]
    if kind == "cols_step3":
        return rng.standard_normal((r, 3 * c)).astype(dtype)[:, ::3]
    if kind == "fortran":
        return np.asfortranarray(rng.standard_normal((r, c)).astype(dtype))
    if kind == "reversed":
        return rng.standard_normal((r, c)).astype(dtype)[::-1, ::-1]
    if kind == "neg_steps":
        return rng.standard_normal((2 * r, 3 * c)).astype(dtype)[::-2, ::-3]
    if kind == "transposed_view":
        return rng.standard_normal((c, r)).astype(dtype).T
    if kind == "read_only":
        arr = rng.standard_normal((r, c)).astype(dtype)
        arr.flags.writeable = False
        return arr
    if kind == "broadcast":  # stride 0 along the rows, read-only
        return np.broadcast_to(rng.standard_normal((1, c)).astype(dtype), (r, c))
    raise AssertionError(kind)


LAYOUTS = [
    "rows_step2",
    "cols_step3",
    "fortran",
    "reversed",
    "neg_steps",
    "transposed_view",
    "read_only",
    "broadcast",
]


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize(("m", "k", "n"), [(7, 9, 5), (33, 300, 40)])
def test_strided_inputs(isa, dtype, kind, m, k, n):
    """Any input strides (steps, Fortran order, negative, zero, read-only) give the product of
    the logical matrices, on the direct and on the packed path, and inputs stay unchanged."""
    rng = rng_for("layout", kind, m, k, n, dtype.name)
    for trans_a, trans_b in TRANS:
        a = make_layout(kind, (k, m) if trans_a else (m, k), dtype, rng)
        b = make_layout(kind, (n, k) if trans_b else (k, n), dtype, rng)
        a_before, b_before = a.copy(), b.copy()
        a_mat, b_mat = (a.T if trans_a else a), (b.T if trans_b else b)
        got = ops.gemm(a, b, trans_a=trans_a, trans_b=trans_b)
        what = f"{kind} strides a={a.strides} b={b.strides} trans={trans_a, trans_b}"
        assert_within(got, f64(a_mat) @ f64(b_mat), product_bound(a_mat, b_mat, dtype), what)
        np.testing.assert_array_equal(a, a_before)
        np.testing.assert_array_equal(b, b_before)


# n covers every partial row end of both vector widths (AVX2 stores a row's last n % lanes
# elements in pieces of 4, 2 and 1 on some paths): a piece too many lands in the padding.
@pytest.mark.parametrize(
    ("m", "k", "n"),
    [(7, 9, 5), (5, 3, 7), (9, 4, 6), (33, 300, 40), (150, 40, 37), (3, 5, 4100)],
)
def test_out_with_padded_rows(isa, dtype, m, k, n):
    """out may be a slice of a wider array: results land in the slice and the padding (and
    everything outside the slice) keeps its sentinel, also with beta != 0 and an epilogue."""
    a, b = operands(m, k, n, dtype, "pad")
    bias = rng_for("padb", n).standard_normal(n).astype(dtype)
    sentinel = -1234.5
    big = np.full((2 * m + 3, n + 11), sentinel, dtype)
    out = big[1 : 1 + 2 * m : 2, 3 : 3 + n]  # padded rows (step 2) and an offset start
    c = rng_for("padc", m, n).standard_normal((m, n)).astype(dtype)
    out[...] = c
    check_gemm(
        a,
        b,
        dtype,
        "padded out",
        alpha=-0.75,
        beta=0.5,
        c=c,
        out=out,
        bias=bias,
        activation="sigmoid",
        trans_b=True,
    )
    mask = np.ones(big.shape, dtype=bool)
    mask[1 : 1 + 2 * m : 2, 3 : 3 + n] = False
    assert (big[mask] == sentinel).all(), "gemm wrote outside its out= slice"


def test_out_row_stride_not_a_whole_number_of_elements(isa, dtype):
    """out = the float field of a structured array, shape (m, 1): its rows are 10 (float64) or
    6 (float32) bytes apart, not a multiple of the item size. gemm must refuse it or fill it
    correctly; it must never write between the rows (into the neighbouring field)."""
    rec = np.zeros((4, 1), dtype=[("x", dtype), ("pad", np.int16)])
    out = rec["x"]
    assert out.strides[0] % out.itemsize != 0
    a, b = np.arange(1, 5, dtype=dtype).reshape(4, 1), np.full((1, 1), 2, dtype)
    try:
        got = ops.gemm(a, b, out=out)
    except ValueError as exc:
        assert "out" in str(exc)
    else:
        np.testing.assert_array_equal(got, [[2], [4], [6], [8]])
        np.testing.assert_array_equal(rec["x"], [[2], [4], [6], [8]])
    np.testing.assert_array_equal(rec["pad"], np.zeros((4, 1)), err_msg="gemm wrote into 'pad'")


# ---- the kernel's variants agree bitwise ------------------------------------------------------


@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_edge_narrow_and_in_place_variants_give_the_same_bits(isa, dtype, trans_b, activation):
    """Every C element is summed the same way whichever code path computes its tile: a ragged
    last A sliver (rows < MR, its own kernel) or a full one, a tile one vector wide (the
    narrow kernel) or a wide one, A read in place or packed (a row stride that is a multiple of
    4 KiB is packed), B read in place or packed. Rows, columns and strides are varied around
    one product whose first 37 rows and 10 columns every variant computes."""
    rng = np.random.default_rng(21)
    k = 300
    a_big = rng.standard_normal((60, 1024)).astype(dtype)  # row stride 4 KiB (f32): packed
    b_big = rng.standard_normal((k, 70)).astype(dtype)
    bias = rng.standard_normal(70).astype(dtype)

    def product(rows: int, cols: int, a_stride_packed: bool) -> np.ndarray:
        a = a_big[:rows, :k] if a_stride_packed else np.ascontiguousarray(a_big[:rows, :k])
        b = b_big[:, :cols]
        b_arg = np.ascontiguousarray(b.T) if trans_b else np.ascontiguousarray(b)
        return ops.gemm(a, b_arg, trans_b=trans_b, bias=bias[:cols], activation=activation)

    want = product(37, 10, False)  # 37 = 3 x 12 + 1 rows; 10 columns: narrow edge tiles
    for rows in (37, 48, 60):
        for cols in (10, 16, 33, 64, 70):
            for packed in (False, True):
                got = product(rows, cols, packed)[:37, :10]
                assert got.tobytes() == want.tobytes(), (rows, cols, packed)


@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_one_column_row_blocks_give_each_rows_bits(isa, dtype, trans_b, activation):
    """A one-column product (a one-output layer's forward x @ w.T) takes a vector's worth of rows
    at a time through an in-register transpose: each row comes out as the same row computed
    alone (the one-lane kernel) does, with bias and the activation, beta 0 and 1 (a gradient
    added to), and with alpha and beta free (which keep the one-lane kernel); K a multiple of
    the vector, with a tail, shorter than one; rows a multiple, with ragged rows after."""
    rng = rng_for("one-column", np.dtype(dtype).name, trans_b, activation)
    for m, k in [(16, 7), (37, 64), (100, 190), (64, 17)]:  # k within every KC: one K block
        a = rng.standard_normal((m, k)).astype(dtype)
        w = rng.standard_normal((1, k)).astype(dtype)
        b_arg = w if trans_b else np.ascontiguousarray(w.T)
        bias = rng.standard_normal(1).astype(dtype)
        old = rng.standard_normal((m, 1)).astype(dtype)
        for alpha, beta in ((1.0, 0.0), (1.0, 1.0), (1.5, 0.5)):
            kwargs = dict(trans_b=trans_b, alpha=alpha, beta=beta, bias=bias, activation=activation)
            got = ops.gemm(a, b_arg, out=old.copy(), **kwargs)
            for i in range(m):
                alone = ops.gemm(a[i : i + 1], b_arg, out=old[i : i + 1].copy(), **kwargs)
                assert alone.tobytes() == got[i : i + 1].tobytes(), (m, k, alpha, beta, i)
            check_gemm(a, w.T, dtype, f"{m}x1x{k} {alpha} {beta}", c=old, out=old.copy(), **kwargs)


# (m, n, k) for a transposed A (a weight gradient's dZ.T) on AVX-512. A narrow C (at most 3/4 of
# NR columns, at least NR rows) is computed as its transpose (gemm_transposed): 64 x 1, 32 x 4,
# 100 x 13, 64 x 24 (float32's limit); 64 x 25 and 31 x 8 are not. Otherwise A is read in place
# while its row stride in bytes times the B slivers reusing it is at most 2048: in float32 up to
# 64 x 100 and 512 x 32 (exactly at the limit), packed at 300 x 200 (and 512 x 32 in float64).
# Full and ragged A slivers, one B sliver, a full one and several, one to four K blocks.
TRANSPOSED_A_SHAPES = [
    (64, 1, 600),
    (32, 4, 300),
    (100, 13, 512),
    (64, 24, 257),
    (64, 25, 129),
    (31, 8, 512),
    (12, 16, 512),
    (37, 32, 300),
    (64, 100, 257),
    (160, 33, 512),
    (300, 200, 129),
    (512, 32, 300),
]


@pytest.mark.parametrize(("m", "n", "k"), TRANSPOSED_A_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("activation", [None, "relu"])
def test_transposed_a_gives_the_row_major_bits(isa, dtype, activation, m, n, k):
    """A weight gradient's dZ.T, read in place column by column, packed, or with C computed as
    its transpose, sums every element as the same product with A row-major does, on one thread
    and two, with the epilogue and with alpha and beta; and is right against the float64
    reference."""
    a, b = operands(m, k, n, dtype, "transposed-a")
    a_t = np.ascontiguousarray(a.T)  # (k, m): op(a_t) with trans_a is a
    bias = rng_for("transposed-a-bias", n).standard_normal(n).astype(dtype)
    old = rng_for("transposed-a-out", m, n).standard_normal((m, n)).astype(dtype)
    for threads in (1, 2):
        with using_threads(threads):
            got = ops.gemm(a_t, b, trans_a=True, bias=bias, activation=activation)
            want = ops.gemm(a, b, bias=bias, activation=activation)
            scaled = ops.gemm(a_t, b, trans_a=True, alpha=1.5, beta=0.5, out=old.copy())
            scaled_want = ops.gemm(a, b, alpha=1.5, beta=0.5, out=old.copy())
            plain = ops.gemm(a_t, b, trans_a=True)
        assert got.tobytes() == want.tobytes(), threads
        assert scaled.tobytes() == scaled_want.tobytes(), threads
    assert_within(plain, f64(a) @ f64(b), product_bound(a, b, dtype), "transposed A")


# ---- threads and determinism ------------------------------------------------------------------

# (m, k, n, trans_a, trans_b): a square product, the MLP's layer-1 forward x @ w.T, its weight
# gradient dz.T @ x and input gradient dz @ w, and a tall-skinny one that splits M, not N.
THREAD_SHAPES = [
    (300, 300, 300, False, False),
    (128, 784, 256, False, True),
    (256, 128, 784, True, False),
    (128, 256, 784, False, False),
    (2000, 300, 7, False, False),
]


def _gemm_case(m, k, n, trans_a, trans_b, dtype):
    a, b = operands(m, k, n, dtype, "threads")
    return as_arg(a, trans_a), as_arg(b, trans_b)


@pytest.mark.parametrize("shape", THREAD_SHAPES, ids=lambda s: "x".join(map(str, s[:3])))
def test_threads_bitwise_identical(isa, dtype, shape):
    """1 and 2 threads give bitwise identical results (plain and with the full epilogue)."""
    m, k, n, trans_a, trans_b = shape
    a, b = _gemm_case(m, k, n, trans_a, trans_b, dtype)
    bias = rng_for("tb", n).standard_normal(n).astype(dtype)
    c = rng_for("tc", m, n).standard_normal((m, n)).astype(dtype)
    results = []
    for threads in (1, 2):
        with using_threads(threads):
            plain = ops.gemm(a, b, trans_a=trans_a, trans_b=trans_b)
            fused = ops.gemm(
                a,
                b,
                trans_a=trans_a,
                trans_b=trans_b,
                alpha=1.5,
                beta=0.5,
                out=c.copy(),
                bias=bias,
                activation="tanh",
            )
        results.append((plain, fused))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    # and the threaded result is also right, not merely reproducible
    a_mat, b_mat = (a.T if trans_a else a), (b.T if trans_b else b)
    assert_within(
        results[1][0], f64(a_mat) @ f64(b_mat), product_bound(a_mat, b_mat, dtype), "2 threads"
    )


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs")
def test_thread_shapes_really_use_two_threads():
    """The bitwise test is only meaningful if those sizes start a second thread: each one does
    (checked in a fresh process, since libgomp's pool outlives the first parallel region),
    and a tiny product does not."""
    for m, k, n, trans_a, trans_b in THREAD_SHAPES:
        code = (
            f"a = np.ones(({k}, {m}) if {trans_a} else ({m}, {k}), np.float32)\n"
            f"b = np.ones(({n}, {k}) if {trans_b} else ({k}, {n}), np.float32)\n"
            f"ops.gemm(a, b, trans_a={trans_a}, trans_b={trans_b})"
        )
        before, after = os_threads_after(code)
        assert after == before + 1, f"{(m, k, n)} ran on one thread ({before} -> {after})"
    before, after = os_threads_after("ops.gemm(np.ones((20, 20)), np.ones((20, 20)))")
    assert after == before, "a 20x20x20 product should not start a thread"


def test_repeated_calls_identical(isa, dtype):
    """The same call gives the same bits every time, also after other shapes reused (and grew)
    the per-thread scratch buffers in between."""
    a, b = operands(150, 513, 40, dtype, "det")
    first = ops.gemm(a, b)
    for m, k, n in [(3, 5, 4100), (257, 257, 257), (7, 7, 7)]:
        ops.gemm(*operands(m, k, n, dtype, "other"))
        np.testing.assert_array_equal(ops.gemm(a, b), first)


def test_concurrent_calls_from_python_threads(isa, dtype):
    """gemm releases the GIL: called from 4 Python threads at once (each with its own scratch
    buffers and OpenMP team) it gives the same bits as the same calls made one at a time."""
    shapes = [(150, 513, 40), (33, 300, 33), (257, 33, 130), (7, 7, 7)] * 2
    cases = [operands(m, k, n, dtype, "concurrent", i) for i, (m, k, n) in enumerate(shapes)]
    expected = [ops.gemm(a, b) for a, b in cases]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda ab: ops.gemm(*ab), cases))
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        np.testing.assert_array_equal(have, want, err_msg=f"case {i} {shapes[i]}")


# ---- argument validation ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.int64, np.int32, np.float16, np.complex128, object, np.bool_])
def test_unsupported_dtype(bad):
    """Any dtype but float32/float64, for a or b, is a TypeError naming the accepted dtypes."""
    good = np.ones((3, 3), np.float64)
    wrong = np.ones((3, 3), dtype=bad)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.gemm(wrong, good)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.gemm(good, wrong)


def test_mixed_dtypes():
    """float32 with float64 (operands, bias or out) is refused, not silently converted."""
    a32, a64 = np.ones((3, 4), np.float32), np.ones((3, 4), np.float64)
    b32, b64 = np.ones((4, 5), np.float32), np.ones((4, 5), np.float64)
    with pytest.raises(TypeError, match="float32"):
        ops.gemm(a32, b64)
    with pytest.raises(TypeError, match="float64"):
        ops.gemm(a64, b32)
    with pytest.raises(TypeError, match="bias"):
        ops.gemm(a32, b32, bias=np.ones(5, np.float64))
    with pytest.raises(TypeError, match="out"):
        ops.gemm(a32, b32, out=np.ones((3, 5), np.float64))


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4), ()])
def test_not_a_matrix(shape):
    """1-D, 3-D and 0-D operands are ValueErrors naming the shape."""
    arr = np.ones(shape)
    with pytest.raises(ValueError, match=re.escape(f"must be 2-D, got shape {shape}")):
        ops.gemm(arr, np.ones((4, 4)))
    with pytest.raises(ValueError, match="must be 2-D"):
        ops.gemm(np.ones((4, 4)), arr)


def test_inner_dimension_mismatch():
    """The message shows op(a) and op(b) shapes, with and without transposes."""
    a, b = np.ones((5, 3)), np.ones((4, 7))
    with pytest.raises(ValueError, match=re.escape("(5, 3)") + ".*" + re.escape("(4, 7)")):
        ops.gemm(a, b)
    with pytest.raises(ValueError, match=re.escape("op(a) is (3, 5)")):
        ops.gemm(a, b, trans_a=True)


def test_bad_out():
    """out= of the wrong shape, dtype, type or layout, or read-only, is refused."""
    a, b = np.ones((3, 4)), np.ones((4, 5))
    with pytest.raises(ValueError, match=re.escape("out must have shape (3, 5), got (5, 3)")):
        ops.gemm(a, b, out=np.empty((5, 3)))
    with pytest.raises(TypeError, match="out must have dtype float64"):
        ops.gemm(a, b, out=np.empty((3, 5), np.float32))
    with pytest.raises(TypeError, match=r"numpy\.ndarray"):
        ops.gemm(a, b, out=[[0.0] * 5] * 3)
    read_only = np.empty((3, 5))
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        ops.gemm(a, b, out=read_only)
    for bad in (np.empty((5, 3)).T, np.empty((3, 10))[:, ::2], np.empty((3, 5))[::-1]):
        with pytest.raises(ValueError, match="contiguous rows"):
            ops.gemm(a, b, out=bad)


def test_beta_without_out():
    with pytest.raises(ValueError, match="beta != 0 needs out"):
        ops.gemm(np.ones((3, 4)), np.ones((4, 5)), beta=0.5)


def test_out_overlapping_inputs():
    """out may not alias a, b or bias (the kernel reads them while writing out)."""
    sq = np.ones((4, 4))
    with pytest.raises(ValueError, match="overlap a"):
        ops.gemm(sq, np.ones((4, 4)), out=sq)
    with pytest.raises(ValueError, match="overlap b"):
        ops.gemm(np.ones((4, 4)), sq, out=sq)
    big = np.ones((4, 8))
    with pytest.raises(ValueError, match="overlap a"):
        ops.gemm(big[:, 2:6], np.ones((4, 4)), out=big[:, :4])
    buf = np.ones((5, 4))
    with pytest.raises(ValueError, match="overlap bias"):
        ops.gemm(np.ones((4, 4)), np.ones((4, 4)), out=buf[:4], bias=buf[3])


def test_bad_scalars_and_activation():
    a, b = np.ones((3, 4)), np.ones((4, 5))
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.gemm(a, b, activation="gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.gemm(a, b, activation=2)
    with pytest.raises(ValueError, match="alpha must be finite"):
        ops.gemm(a, b, alpha=float("nan"))
    with pytest.raises(ValueError, match="beta must be finite"):
        ops.gemm(a, b, beta=float("inf"), out=np.empty((3, 5)))
    with pytest.raises(TypeError, match="alpha must be a real number"):
        ops.gemm(a, b, alpha=True)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        ops.gemm(a, b, alpha="2")
    # activation names are case-insensitive; None is the identity
    np.testing.assert_array_equal(ops.gemm(a, b, activation="ReLU"), ops.gemm(a, b))
    np.testing.assert_array_equal(ops.gemm(a, b, activation=None), np.full((3, 5), 4.0))


# ---- the fast path: plain arguments validated in C (_core.gemm_fast) ----------------------


def _checked_path_only(monkeypatch):
    """Make ops.gemm decline its fast path, so every call takes the Python checks."""
    monkeypatch.setattr(ops._core, "gemm_fast", lambda *args: False)


@pytest.mark.parametrize(("m", "k", "n"), [(33, 300, 40), (1, 7, 1), (1, 33, 7), (7, 33, 1)])
@pytest.mark.parametrize("kind", ["plain", *LAYOUTS])
def test_fast_path_gives_the_checked_paths_bits(monkeypatch, dtype, kind, m, k, n):
    """Every layout, transpose, epilogue and out= variant gives the same bits whether ops.gemm
    takes its fast path or (declining it) the full Python checks: both reach one kernel with
    the same strides. Single-row and single-column outputs included (their other stride is
    free)."""
    rng = rng_for("fast", kind, dtype.name, m, k, n)
    cases = []
    for trans_a, trans_b in TRANS:
        shape_a, shape_b = ((k, m) if trans_a else (m, k)), ((n, k) if trans_b else (k, n))
        if kind == "plain":
            a = rng.standard_normal(shape_a).astype(dtype)
            b = rng.standard_normal(shape_b).astype(dtype)
        else:
            a, b = make_layout(kind, shape_a, dtype, rng), make_layout(kind, shape_b, dtype, rng)
        bias = rng.standard_normal(n).astype(dtype)
        c0 = rng.standard_normal((m, n + 3)).astype(dtype)  # padded rows
        for kw in (
            {},
            {"bias": bias, "activation": "tanh"},
            {"alpha": 0.5, "beta": -2.0, "activation": "relu"},
        ):
            cases.append((a, b, dict(kw, trans_a=trans_a, trans_b=trans_b), c0))

    def run():
        results = []
        for a, b, kw, c0 in cases:
            results.append(ops.gemm(a, b, **{k: v for k, v in kw.items() if k != "beta"}))
            out = c0.copy()[:, :n]
            results.append(ops.gemm(a, b, out=out, **kw))
        return results

    fast = run()
    with monkeypatch.context() as mp:
        _checked_path_only(mp)
        checked = run()
    for got, want in zip(fast, checked, strict=True):
        np.testing.assert_array_equal(got, want)


def test_plain_calls_take_the_fast_path(monkeypatch):
    """ndarrays, Python floats and an out= that overlaps nothing never reach the memoryview
    binding (the slower route), for ops.gemm and the layer helpers built on it."""

    def refuse(*args):
        raise AssertionError("took the checked path")

    monkeypatch.setattr(ops._core, "gemm", refuse)
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((3, 4))
    w = w.astype(np.float32)
    out = np.empty((5, 3), np.float32)
    ops.gemm(x, w, trans_b=True, out=out, bias=np.ones(3, np.float32), activation="sigmoid")
    ops.gemm(x, w.T, alpha=2.0)
    ops.linear_forward(x, w, activation="relu")
    ops.linear_backward(np.ones((5, 3), np.float32), x, w)


def test_declined_fast_path_writes_nothing():
    """An argument the fast path declines (here out overlapping b) leaves out untouched while
    the checked path raises."""
    buf = np.arange(32.0).reshape(4, 8)
    before = buf.copy()
    with pytest.raises(ValueError, match="overlap b"):
        ops.gemm(np.ones((4, 4)), buf[:, 4:], out=buf[:, :4])
    with pytest.raises(ValueError, match="overlap b"):
        ops.gemm(np.ones((4, 4)), buf[:, 3:7], out=buf[:, :4])
    np.testing.assert_array_equal(buf, before)


@pytest.mark.parametrize("shape", [(4,), (1, 5), (5, 1), (6,)])
def test_bias_wrong_shape(shape):
    with pytest.raises(ValueError, match=re.escape("bias must have shape (5,)")):
        ops.gemm(np.ones((3, 4)), np.ones((4, 5)), bias=np.ones(shape))


# ---- extreme values ---------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(("m", "k", "n"), [(7, 9, 11), (33, 300, 33)])
def test_huge_magnitudes(isa, dtype, activation, m, k, n):
    """Entries of 1e30 (float64) / 1e18 (float32): products near 1e60 / 1e36 stay finite and
    accurate (sum |a||b| is kept below the dtype's max, so any inf or NaN would be spurious);
    sigmoid/tanh of such pre-activations saturate cleanly to 0/1/-1."""
    scale = 1e30 if dtype == np.float64 else 1e18
    rng = rng_for("huge", m, k, n, dtype.name)
    a = (rng.uniform(-1, 1, (m, k)) * scale).astype(dtype)
    b = (rng.uniform(-1, 1, (k, n)) * scale).astype(dtype)
    bias = (rng.uniform(-1, 1, n) * scale * scale).astype(dtype)
    assert (np.abs(f64(a)) @ np.abs(f64(b)) + np.abs(f64(bias)) < np.finfo(dtype).max / 2).all()
    for trans_a, trans_b in TRANS:
        got = check_gemm(
            a,
            b,
            dtype,
            f"huge {activation}",
            bias=bias,
            activation=activation,
            trans_a=trans_a,
            trans_b=trans_b,
        )
        assert np.isfinite(got).all()


@pytest.mark.parametrize(("m", "k", "n"), [(7, 33, 5), (33, 300, 40)])
def test_subnormals_are_not_flushed(isa, dtype, m, k, n):
    """Subnormal inputs and results are exact, not flushed to zero (no -ffast-math FTZ/DAZ,
    neither in the kernels nor process-wide): small integers times 2^-1060 (float64) or
    2^-140 (float32) multiply and add exactly, so gemm must equal the scaled integer product."""
    scale = 2.0**-1060 if dtype == np.float64 else 2.0**-140
    rng = rng_for("subnormal", m, k, n, dtype.name)
    a_int, b_int = rng.integers(-4, 5, (m, k)), rng.integers(-4, 5, (k, n))
    bias_int = rng.integers(-4, 5, n)
    a, b = (a_int * scale).astype(dtype), b_int.astype(dtype)
    assert 0 < np.abs(a[a != 0]).min() < np.finfo(dtype).smallest_normal
    expected = (a_int @ b_int + bias_int) * scale
    for trans_a, trans_b in TRANS:
        got = ops.gemm(
            as_arg(a, trans_a),
            as_arg(b, trans_b),
            trans_a=trans_a,
            trans_b=trans_b,
            bias=(bias_int * scale).astype(dtype),
            activation="relu",
        )
        np.testing.assert_array_equal(got, np.maximum(expected, 0), err_msg=f"{trans_a, trans_b}")
    tiny = np.finfo(dtype).smallest_subnormal
    assert tiny * dtype.type(3) / dtype.type(2) != 0, "subnormal arithmetic flushed process-wide"


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(("m", "k", "n"), [(7, 9, 11), (33, 300, 40), (3, 5, 4100)])
def test_nonfinite_inputs_propagate_like_numpy(isa, dtype, activation, m, k, n):
    """inf and NaN in a or b give exactly NumPy's inf/NaN pattern (inf*0 = NaN, inf-inf = NaN,
    inf+finite = inf), in the last K block and the last N panel too; elements not touched by
    them stay accurate."""
    a, b = operands(m, k, n, dtype, "inf")
    p_late, j_late = k - 1, n - 1  # positions in the last K block / last N panel
    a[1, 2] = np.inf  # row 1 becomes +-inf ...
    b[2, 3] = 0.0  # ... except (1, 3): inf * 0 = NaN
    a[2, p_late] = -np.inf  # row 2: -inf from the last K block
    b[p_late, j_late] = np.nan  # the last column (last N panel): all NaN
    b[0, 4] = np.inf  # column 4: +-inf, and inf - inf = NaN where it meets rows 1 and 2
    ref_z = np.empty((m, n))
    with np.errstate(invalid="ignore", over="ignore"):
        for i in range(m):  # plain IEEE products and sums, no BLAS shortcuts
            ref_z[i] = (f64(a[i])[:, None] * f64(b)).sum(axis=0)
        pre_bound = np.where(np.isfinite(ref_z), epilogue_bound(a, b, dtype), 0.0)
    ref = act_ref(activation, ref_z)
    for trans_a, trans_b in TRANS:
        got = ops.gemm(
            as_arg(a, trans_a),
            as_arg(b, trans_b),
            trans_a=trans_a,
            trans_b=trans_b,
            activation=activation,
        )
        what = f"non-finite {activation} trans={trans_a, trans_b}"
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref), err_msg=what + " NaN mask")
        inf = np.isinf(ref)
        np.testing.assert_array_equal(got[inf], ref[inf], err_msg=what + " infinities")
        finite = np.isfinite(ref)
        assert np.isnan(ref).any() and (inf.any() or activation in ("sigmoid", "tanh"))
        bound = act_bound(activation, ref_z, pre_bound, dtype)
        assert_within(got[finite], ref[finite], bound[finite], what)


@pytest.mark.parametrize("shape", [(24, 64, 40), (30, 70, 40), (5, 3, 2)], ids=str)
def test_negative_zero_products_keep_their_sign(shape):
    """Every partial sum of (-1e-30) * 1e-30 rounds to -0, so C is -0 everywhere: no epilogue may
    add a +0 bias that is not there (full tiles, edge tiles and the direct path alike)."""
    m, n, k = shape
    a = np.full((m, k), -1e-30, dtype=np.float32)
    b = np.full((k, n), 1e-30, dtype=np.float32)
    c = ops.gemm(a, b)
    assert np.all(c == 0) and np.signbit(c).all()
