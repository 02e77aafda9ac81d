"""fastbp's kernels against NumPy and torch on the same work, in the same run.

Every pytest-benchmark *group* is one workload and holds its contenders side by side:

* ``fastbp``: :mod:`fastbp.ops`, writing into a preallocated ``out=`` wherever the API has one;
* ``numpy``: NumPy's BLAS (``np.matmul``) and ufuncs, writing into preallocated outputs;
* ``torch``: ``torch.mm`` / ``torch.sigmoid`` / ... with ``out=``, on tensors made with
  ``torch.from_numpy`` (they share the NumPy arrays' memory: same inputs, no copies);
* for the optimizer steps, ``torch.optim`` in three flavours (see :data:`OPTIM_CONTENDERS`).

Before a contender is timed its result is checked once, outside the timed region, against a
float64 reference within an error bound justified next to each check, so that a fast wrong
answer fails the test instead of winning the group. Outputs start as NaN, so a contender that
writes somewhere else (a reallocated ``out``) fails as well.
"""

from __future__ import annotations

import functools
import itertools
import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fastbp import ops

CONTENDERS = ("fastbp", "numpy", "torch")
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)


# ---- helpers -------------------------------------------------------------------------------------


def _rng(name: str) -> np.random.Generator:
    """A generator seeded by the workload's name: the same data in every run and contender."""
    return np.random.default_rng(zlib.crc32(name.encode()))


def _params(cases: Iterable, contenders: Iterable[str] = CONTENDERS) -> list:
    """(case, contender) pairs, grouped by case so a group's contenders run back to back."""
    return [pytest.param(c, who, id=f"{c.name}-{who}") for c in cases for who in contenders]


def gamma(k: int, dtype: np.dtype) -> float:
    """Higham's gamma_k = k u / (1 - k u), u = eps / 2 the unit roundoff of ``dtype``."""
    u = float(np.finfo(dtype).eps) / 2
    return k * u / (1 - k * u)


def dot_error_bound(abs_a: np.ndarray, abs_b: np.ndarray, k: int, dtype: np.dtype) -> np.ndarray:
    """Elementwise bound on |computed(A @ B) - reference| for sums of ``k`` products.

    Higham (Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.1 eq. 3.5; eq. 3.13 for
    matrix products): a dot product of length k summed in any order in precision u satisfies
    |fl(a.b) - a.b| <= gamma_k |a|.|b|
    (an FMA only tightens it; blocking and threading only change the order). The reference is
    itself computed in float64 from the same (already rounded) inputs, so the two errors add.
    ``abs_a`` / ``abs_b`` are float64 absolute values, shaped as the product's operands.
    """
    return (gamma(k, dtype) + gamma(k, F64)) * (abs_a @ abs_b)


def assert_within(got: np.ndarray, ref: np.ndarray, bound: np.ndarray | float, what: str) -> None:
    """Fail unless ``|got - ref| <= bound`` everywhere (NaN fails)."""
    err = np.abs(np.asarray(got, dtype=F64) - ref)
    ok = err <= bound
    if not ok.all():
        excess = np.where(ok, 0.0, err / np.maximum(bound, np.finfo(F64).tiny))
        raise AssertionError(
            f"{what}: {np.count_nonzero(~ok)} of {ok.size} elements outside the error bound; "
            f"worst |err| / bound = {np.nanmax(excess):.3g} (NaN: {np.isnan(err).sum()})"
        )


# ---- GEMM ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gemm:
    """``C[m,n] = op(A) @ op(B)``; A is stored ``(k, m)`` when ``trans_a``, B ``(n, k)`` when
    ``trans_b`` (a transposed view for NumPy / torch, a flag for fastbp)."""

    name: str
    group: str
    m: int
    n: int
    k: int
    trans_a: bool = False
    trans_b: bool = False
    dtype: str = "float32"
    rounds: int | None = None  # None: pytest-benchmark calibrates; int: pedantic rounds

    @property
    def a_shape(self) -> tuple[int, int]:
        return (self.k, self.m) if self.trans_a else (self.m, self.k)

    @property
    def b_shape(self) -> tuple[int, int]:
        return (self.n, self.k) if self.trans_b else (self.k, self.n)

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k

    @property
    def shape(self) -> str:
        a = f"A{self.a_shape[0]}x{self.a_shape[1]}" + ("^T" if self.trans_a else "")
        b = f"B{self.b_shape[0]}x{self.b_shape[1]}" + ("^T" if self.trans_b else "")
        return f"m={self.m} n={self.n} k={self.k} ({a} @ {b})"


# Rounds for the square GEMMs, about 0.2-2 s of timed calls each at one thread (~70-95 GFLOP/s).
_SQUARE_ROUNDS = {256: 400, 512: 100, 1024: 20, 2048: 7}

SQUARE_CASES = [
    Gemm(f"gemm-f32-{s}", f"gemm f32 square {s}", s, s, s, rounds=r)
    for s, r in _SQUARE_ROUNDS.items()
] + [Gemm("gemm-f64-1024", "gemm f64 square 1024", 1024, 1024, 1024, dtype="float64", rounds=12)]


def _mlp_cases(batch: int = 128, sizes: tuple[int, ...] = (784, 256, 128, 10)) -> list[Gemm]:
    """The GEMMs of one training step of a ``784-256-128-10`` MLP at batch 128.

    Layer i maps H(i-1) (batch x fan_in; H0 = X) with W_i (fan_out x fan_in). Forward
    ``Z = H @ W^T``; backward ``dW = dZ^T @ H`` and ``dX = dZ @ W`` (dZ is batch x fan_out).
    """
    cases = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
        h = "X" if i == 1 else f"H{i - 1}"
        cases += [
            Gemm(
                f"mlp-L{i}-fwd",
                f"mlp L{i} fwd {h}@W{i}^T ({batch}x{fan_in})@({fan_out}x{fan_in})^T",
                batch, fan_out, fan_in, trans_b=True,
            ),
            Gemm(
                f"mlp-L{i}-dW",
                f"mlp L{i} dW dZ{i}^T@{h} ({batch}x{fan_out})^T@({batch}x{fan_in})",
                fan_out, fan_in, batch, trans_a=True,
            ),
            Gemm(
                f"mlp-L{i}-dX",
                f"mlp L{i} dX dZ{i}@W{i} ({batch}x{fan_out})@({fan_out}x{fan_in})",
                batch, fan_in, fan_out,
            ),
        ]  # fmt: skip
    return cases


MLP_CASES = _mlp_cases()


@functools.lru_cache(maxsize=1)  # the tests of one case run back to back
def _gemm_data(case: Gemm) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stored A and B (uniform in [-1, 1)), the float64 reference op(A) @ op(B) and its bound."""
    rng = _rng(case.name)
    a = rng.uniform(-1, 1, case.a_shape).astype(case.dtype)
    b = rng.uniform(-1, 1, case.b_shape).astype(case.dtype)
    a64 = (a.T if case.trans_a else a).astype(F64)
    b64 = (b.T if case.trans_b else b).astype(F64)
    bound = dot_error_bound(np.abs(a64), np.abs(b64), case.k, np.dtype(case.dtype))
    return a, b, a64 @ b64, bound


def _gemm_call(contender: str, case: Gemm, a: np.ndarray, b: np.ndarray, out: np.ndarray):
    if contender == "fastbp":
        return functools.partial(
            ops.gemm, a, b, trans_a=case.trans_a, trans_b=case.trans_b, out=out
        )
    if contender == "numpy":
        return functools.partial(
            np.matmul, a.T if case.trans_a else a, b.T if case.trans_b else b, out=out
        )
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return functools.partial(
        torch.mm, ta.t() if case.trans_a else ta, tb.t() if case.trans_b else tb,
        out=torch.from_numpy(out),
    )  # fmt: skip


@pytest.mark.parametrize(("case", "contender"), _params(SQUARE_CASES + MLP_CASES))
def test_gemm(run_benchmark, case: Gemm, contender: str) -> None:
    """``C = op(A) @ op(B)`` into a preallocated C; GFLOP/s = 2 m n k / median time."""
    a, b, ref, bound = _gemm_data(case)
    out = np.full((case.m, case.n), np.nan, dtype=case.dtype)
    call = _gemm_call(contender, case, a, b, out)
    call()
    assert_within(out, ref, bound, f"{contender} {case.name}")
    run_benchmark(
        call, group=case.group, contender=contender, dtype=case.dtype, shape=case.shape,
        flops=case.flops, rounds=case.rounds,
    )  # fmt: skip


# ---- elementwise activations ---------------------------------------------------------------------


@dataclass(frozen=True)
class Activation:
    """``y = act(x)`` on ``n`` float32 values, x ~ 3 * N(0, 1) (|x| stays below ~20)."""

    act: str
    n: int

    @property
    def name(self) -> str:
        return f"{self.act}-1e{round(math.log10(self.n))}"

    @property
    def group(self) -> str:
        return f"{self.act} f32 n=1e{round(math.log10(self.n))}"


ACTIVATION_CASES = [Activation(a, n) for a in ("sigmoid", "tanh", "relu") for n in (10**6, 10**7)]

#: Allowed error in float32 ulps of the exact result. relu is exact. sigmoid and tanh: fastbp
#: documents "a few ulp", glibc/SLEEF/NumPy's SIMD exp and tanh are within ~1-4 ulp and NumPy's
#: 4-pass sigmoid adds two more roundings; measured worst cases are 0.5-3.3 ulp, so 8 ulp
#: (5e-7 relative) has 2x headroom while a genuinely cheaper approximation (a short
#: polynomial, a half-precision path) misses by orders of magnitude.
ULP_TOLERANCE = {"sigmoid": 8.0, "tanh": 8.0, "relu": 0.0}


@functools.lru_cache(maxsize=1)
def _activation_data(case: Activation) -> tuple[np.ndarray, np.ndarray]:
    x = _rng(case.name).standard_normal(case.n, dtype=np.float32) * np.float32(3)
    x64 = x.astype(F64)
    if case.act == "sigmoid":
        ref = 1 / (1 + np.exp(-x64))
    elif case.act == "tanh":
        ref = np.tanh(x64)
    else:
        ref = np.maximum(x64, 0)
    return x, ref


def _numpy_sigmoid(x: np.ndarray, y: np.ndarray) -> None:
    """1 / (1 + exp(-x)) in four in-place passes over y, no temporaries."""
    np.negative(x, out=y)
    np.exp(y, out=y)
    np.add(y, 1, out=y)
    np.reciprocal(y, out=y)


def _activation_call(contender: str, act: str, x: np.ndarray, y: np.ndarray):
    if contender == "fastbp":
        return functools.partial(getattr(ops, act), x, out=y)
    if contender == "numpy":
        if act == "sigmoid":
            return functools.partial(_numpy_sigmoid, x, y)
        if act == "tanh":
            return functools.partial(np.tanh, x, out=y)
        return functools.partial(np.maximum, x, np.float32(0), out=y)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    if act == "relu":  # torch.relu has no out=; clamp_min is the same op (NaN stays NaN)
        return functools.partial(torch.clamp_min, tx, 0.0, out=ty)
    return functools.partial(getattr(torch, act), tx, out=ty)


@pytest.mark.parametrize(("case", "contender"), _params(ACTIVATION_CASES))
def test_activation(run_benchmark, case: Activation, contender: str) -> None:
    """``y = act(x)`` into a preallocated y; GB/s counts x read once and y written once."""
    x, ref = _activation_data(case)
    y = np.full_like(x, np.nan)
    call = _activation_call(contender, case.act, x, y)
    call()
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(F64)
    assert_within(y, ref, ULP_TOLERANCE[case.act] * ulp, f"{contender} {case.name}")
    run_benchmark(
        call, group=case.group, contender=contender, dtype="float32", shape=f"({case.n},)",
        nbytes=2 * x.nbytes,
    )  # fmt: skip


# ---- the fused linear layer ----------------------------------------------------------------------

BATCH, IN_FEATURES, OUT_FEATURES = 128, 784, 256
LINEAR_SHAPE = f"x {BATCH}x{IN_FEATURES}, W {OUT_FEATURES}x{IN_FEATURES}, b {OUT_FEATURES}"
LINEAR_FLOPS = 2 * BATCH * OUT_FEATURES * IN_FEATURES  # one GEMM; bias and relu not counted


@functools.lru_cache(maxsize=1)
def _linear_data() -> dict[str, np.ndarray]:
    """x, W (fan-in scaled), b, dy, and y = relu(x W^T + b) rounded to float32 (~half > 0)."""
    rng = _rng("linear")
    x = rng.standard_normal((BATCH, IN_FEATURES), dtype=np.float32)
    w = rng.standard_normal((OUT_FEATURES, IN_FEATURES), dtype=np.float32)
    w *= np.float32(1 / math.sqrt(IN_FEATURES))
    b = rng.standard_normal(OUT_FEATURES, dtype=np.float32) * np.float32(0.1)
    dy = rng.standard_normal((BATCH, OUT_FEATURES), dtype=np.float32)
    x64, w64, b64 = x.astype(F64), w.astype(F64), b.astype(F64)
    z64 = x64 @ w64.T + b64
    return {
        "x": x, "w": w, "b": b, "dy": dy,
        "y": np.maximum(z64, 0).astype(np.float32),
        "y_ref": np.maximum(z64, 0),
        # k + 1 terms per element (bias included); relu is 1-Lipschitz, so the bound carries.
        "y_bound": (gamma(IN_FEATURES + 1, F32) + gamma(IN_FEATURES + 1, F64))
        * (np.abs(x64) @ np.abs(w64).T + np.abs(b64)),
    }  # fmt: skip


def _linear_forward_call(contender: str, d: dict[str, np.ndarray], out: np.ndarray):
    x, w, b = d["x"], d["w"], d["b"]
    if contender == "fastbp":
        return functools.partial(ops.linear_forward, x, w, b, activation="relu", out=out)
    if contender == "numpy":

        def numpy_linear() -> None:
            np.matmul(x, w.T, out=out)
            np.add(out, b, out=out)
            np.maximum(out, 0, out=out)

        return numpy_linear
    tx, tw, tb, tout = (torch.from_numpy(v) for v in (x, w, b, out))

    def torch_linear() -> None:
        torch.addmm(tb, tx, tw.t(), out=tout)
        torch.relu_(tout)

    return torch_linear


@pytest.mark.parametrize("contender", CONTENDERS)
def test_linear_forward(run_benchmark, contender: str) -> None:
    """``y = relu(x @ W^T + b)``, 128x784 -> 256: fastbp's fused epilogue vs GEMM + 2 passes."""
    d = _linear_data()
    out = np.full((BATCH, OUT_FEATURES), np.nan, dtype=np.float32)
    call = _linear_forward_call(contender, d, out)
    call()
    assert_within(out, d["y_ref"], d["y_bound"], f"{contender} linear_forward")
    run_benchmark(
        call, group=f"linear_forward relu f32 {BATCH}x{IN_FEATURES}->{OUT_FEATURES}",
        contender=contender, dtype="float32", shape=LINEAR_SHAPE, flops=LINEAR_FLOPS,
    )  # fmt: skip


def _linear_backward_call(contender: str, d: dict[str, np.ndarray]):
    """The call and, except for fastbp (which returns them), its (dx, dW, db) outputs."""
    x, w, y, dy = d["x"], d["w"], d["y"], d["dy"]
    if contender == "fastbp":
        return functools.partial(ops.linear_backward, dy, x, w, y, "relu"), None
    dx = np.full_like(x, np.nan)
    dw = np.full_like(w, np.nan)
    db = np.full(OUT_FEATURES, np.nan, dtype=np.float32)
    dz = np.empty_like(dy)
    mask = np.empty(dy.shape, dtype=bool)
    if contender == "numpy":

        def numpy_backward() -> None:
            np.greater(y, 0, out=mask)
            np.multiply(dy, mask, out=dz)
            np.sum(dz, axis=0, out=db)
            np.matmul(dz.T, x, out=dw)
            np.matmul(dz, w, out=dx)

        return numpy_backward, (dx, dw, db)
    tx, tw, ty, tdy, tdx, tdw, tdb, tdz, tmask = (
        torch.from_numpy(v) for v in (x, w, y, dy, dx, dw, db, dz, mask)
    )

    def torch_backward() -> None:
        torch.gt(ty, 0, out=tmask)
        torch.mul(tdy, tmask, out=tdz)
        torch.sum(tdz, 0, out=tdb)
        torch.mm(tdz.t(), tx, out=tdw)
        torch.mm(tdz, tw, out=tdx)

    return torch_backward, (dx, dw, db)


@pytest.mark.parametrize("contender", CONTENDERS)
def test_linear_backward(run_benchmark, contender: str) -> None:
    """Backward of ``relu(x @ W^T + b)``: relu mask, db = column sums, dW = dZ^T x, dx = dZ W.

    fastbp's ``linear_backward`` has no ``out=`` and allocates its three results per call;
    the peers write into preallocated arrays. GFLOP/s counts the two GEMMs only.
    """
    d = _linear_data()
    call, outputs = _linear_backward_call(contender, d)
    result = call()
    dx, dw, db = result if outputs is None else outputs
    # dZ = dy * (y > 0) is exact in float32, so the references are exact up to float64 rounding.
    dz64 = d["dy"].astype(F64) * (d["y"] > 0)
    x64, w64 = d["x"].astype(F64), d["w"].astype(F64)
    adz = np.abs(dz64)
    assert_within(dx, dz64 @ w64, dot_error_bound(adz, np.abs(w64), OUT_FEATURES, F32), "dx")
    assert_within(dw, dz64.T @ x64, dot_error_bound(adz.T, np.abs(x64), BATCH, F32), "dW")
    db_bound = (gamma(BATCH, F32) + gamma(BATCH, F64)) * adz.sum(axis=0)
    assert_within(db, dz64.sum(axis=0), db_bound, "db")
    run_benchmark(
        call, group=f"linear_backward relu f32 {BATCH}x{IN_FEATURES}->{OUT_FEATURES}",
        contender=contender, dtype="float32", shape=LINEAR_SHAPE, flops=2 * LINEAR_FLOPS,
    )  # fmt: skip


# ---- optimizer steps -----------------------------------------------------------------------------

N_PARAMS = 1_000_000
SGD = {"lr": 1e-2, "momentum": 0.9}
ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}

#: fastbp, a hand-written in-place NumPy update, and torch.optim stepping a 1M-element Parameter
#: with a preset .grad: single-tensor loop (foreach=False), the default (which on CPU tensors
#: resolves to the same single-tensor path, so it doubles as an A/A noise check) and fused=True.
OPTIM_CONTENDERS = ("fastbp", "numpy", "torch-forloop", "torch-default", "torch-fused")
_TORCH_OPTIM_KW = {
    "torch-forloop": {"foreach": False},
    "torch-default": {},
    "torch-fused": {"fused": True},
}


@dataclass(frozen=True)
class OptimCase:
    """One optimizer step on ``N_PARAMS`` float32 parameters."""

    name: str
    group: str
    arrays_moved: int  # float32 arrays read + written per step (for GB/s)


OPTIM_CASES = [
    OptimCase("sgd", "sgd momentum=0.9 step, 1M f32 params", 5),  # r: p g buf; w: p buf
    OptimCase("adam", "adam step, 1M f32 params", 7),  # r: p g m v; w: p m v
]


@functools.lru_cache(maxsize=1)
def _optim_data(kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """p0, g1, g2 (float32), the float64 reference after steps with g1 then g2, the tolerance.

    Each step rounds the new parameter once (<= u |p|, u = eps / 2 of float32) and computes
    the update with a handful of float32 operations whose relative errors add up to well under
    16 u, so a correct implementation is within ``16 u (|p0| + |step1| + |step2|)``.

    ``1 - beta`` must be formed in double and rounded once (as torch does): from a float32 beta
    it would be off by up to ``u beta / (1 - beta)`` (~500 u for beta2 = 0.999), which this
    bound deliberately does not allow.
    A wrong update (no momentum, no bias correction, the wrong step) is off by O(lr |g|),
    still thousands of times the tolerance.
    """
    rng = _rng(kind)
    p0 = rng.standard_normal(N_PARAMS, dtype=np.float32) * np.float32(0.1)
    g1, g2 = (rng.standard_normal(N_PARAMS, dtype=np.float32) for _ in range(2))
    p = p0.astype(F64)
    updates = []
    if kind == "sgd":
        buf = np.zeros_like(p)
        for t, g in enumerate((g1, g2)):
            buf = g.astype(F64) if t == 0 else SGD["momentum"] * buf + g
            updates.append(SGD["lr"] * buf)
    else:
        (b1, b2), m, v = ADAM["betas"], np.zeros_like(p), np.zeros_like(p)
        for t, g in enumerate((g1, g2), start=1):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g.astype(F64) ** 2
            denom = np.sqrt(v / (1 - b2**t)) + ADAM["eps"]
            updates.append(ADAM["lr"] / (1 - b1**t) * m / denom)
    for u in updates:
        p = p - u
    u32 = float(np.finfo(F32).eps) / 2
    steps = sum(np.abs(u) for u in updates)
    tol = 16 * u32 * (np.abs(p0) + steps)
    return p0, g1, g2, p, tol


class Stepper:
    """One contender's optimizer on a private copy of p0: ``step(g)`` for the check, then
    ``timed`` (a call taking no arguments, gradient g2 already in place) for the benchmark."""

    def __init__(self, contender: str, kind: str, p0: np.ndarray) -> None:
        self.param = p0.copy()
        self.kind = kind
        self.contender = contender
        if contender.startswith("torch"):
            self.tparam = torch.nn.Parameter(torch.from_numpy(self.param))  # shares memory
            cls = torch.optim.SGD if kind == "sgd" else torch.optim.Adam
            hyper = SGD if kind == "sgd" else ADAM
            self.opt = cls([self.tparam], **hyper, **_TORCH_OPTIM_KW[contender])
        else:
            self.bufs = [np.zeros_like(self.param) for _ in range(1 if kind == "sgd" else 2)]
            self.tmp = np.empty_like(self.param)
        self.steps = itertools.count(1)

    def step(self, g: np.ndarray) -> None:
        """One optimizer step with gradient ``g``."""
        if self.contender.startswith("torch"):
            self.tparam.grad = torch.from_numpy(g)
            self.opt.step()
            return
        t = next(self.steps)
        if self.contender == "fastbp":
            if self.kind == "sgd":
                ops.sgd_step(self.param, g, self.bufs[0], **SGD, first_step=t == 1)
            else:
                ops.adam_step(self.param, g, *self.bufs, step=t, **ADAM)
        elif self.kind == "sgd":
            self._numpy_sgd(g, t)
        else:
            self._numpy_adam(g, t)

    def timed(self, g: np.ndarray) -> Callable[[], None]:
        """The benchmarked call; torch's .grad is already ``g`` after the check's last step."""
        if self.contender.startswith("torch"):
            return self.opt.step
        if self.contender == "fastbp" and self.kind == "sgd":
            return functools.partial(ops.sgd_step, self.param, g, self.bufs[0], **SGD)
        return functools.partial(self.step, g)

    def _numpy_sgd(self, g: np.ndarray, t: int) -> None:
        p, (buf,), tmp = self.param, self.bufs, self.tmp
        if t == 1:
            np.copyto(buf, g)
        else:
            buf *= np.float32(SGD["momentum"])
            buf += g
        np.multiply(buf, np.float32(-SGD["lr"]), out=tmp)
        p += tmp

    def _numpy_adam(self, g: np.ndarray, t: int) -> None:
        p, (m, v), tmp = self.param, self.bufs, self.tmp
        (b1, b2), lr, eps = ADAM["betas"], ADAM["lr"], ADAM["eps"]
        m *= np.float32(b1)
        np.multiply(g, np.float32(1 - b1), out=tmp)
        m += tmp
        v *= np.float32(b2)
        np.multiply(g, g, out=tmp)
        tmp *= np.float32(1 - b2)
        v += tmp
        np.sqrt(v, out=tmp)
        tmp *= np.float32(1 / math.sqrt(1 - b2**t))
        tmp += np.float32(eps)
        np.divide(m, tmp, out=tmp)
        tmp *= np.float32(-lr / (1 - b1**t))
        p += tmp


@pytest.mark.parametrize(("case", "contender"), _params(OPTIM_CASES, OPTIM_CONTENDERS))
def test_optimizer_step(run_benchmark, case: OptimCase, contender: str) -> None:
    """One SGD-with-momentum or Adam step on 1M float32 parameters, updated in place."""
    p0, g1, g2, ref, tol = _optim_data(case.name)
    stepper = Stepper(contender, case.name, p0)
    stepper.step(g1)
    stepper.step(g2)
    assert_within(stepper.param, ref, tol, f"{contender} {case.name} after two steps")
    run_benchmark(
        stepper.timed(g2), group=case.group, contender=contender, dtype="float32",
        shape=f"({N_PARAMS},)", nbytes=case.arrays_moved * p0.nbytes,
        torch_optim_kwargs=str(_TORCH_OPTIM_KW.get(contender, "n/a")),
    )  # fmt: skip


# ---- optimizer steps with decaying (subnormal) moments ------------------------------------------

#: fastbp with its default subnormal flushing, fastbp with IEEE gradual underflow, torch (IEEE).
DECAY_CONTENDERS = ("fastbp", "fastbp-ieee", "torch-forloop")
DECAY_GROUP = "adam step, 1M f32 params, 10% of first moments subnormal (zero gradient)"


@functools.lru_cache(maxsize=1)
def _decay_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """p, g, m, v and the float64 reference parameters after one Adam step (step 50).

    Every 10th weight has a zero gradient and a first moment below float32's smallest normal
    number: what a rarely lit input pixel's weight looks like after a few epochs (9% of W3's
    first moments by its third epoch). Its parameter moves by less than 1e-30: not at all in
    float32, with or without flushing; the others follow the reference within the bound
    derived for :func:`_optim_data`.
    """
    rng = _rng("decay")
    tiny = np.finfo(F32).smallest_normal
    p = rng.standard_normal(N_PARAMS, dtype=np.float32) * np.float32(0.1)
    g = rng.standard_normal(N_PARAMS, dtype=np.float32)
    m = rng.standard_normal(N_PARAMS, dtype=np.float32) * np.float32(0.1)
    v = np.abs(rng.standard_normal(N_PARAMS, dtype=np.float32)) * np.float32(0.1)
    g[::10] = 0
    m[::10] = (tiny * rng.uniform(0.5, 0.99, m[::10].size)).astype(np.float32)
    (b1, b2), t = ADAM["betas"], 50
    m64 = b1 * m.astype(F64) + (1 - b1) * g
    v64 = b2 * v.astype(F64) + (1 - b2) * g.astype(F64) ** 2
    ref = p - ADAM["lr"] / (1 - b1**t) * m64 / (np.sqrt(v64 / (1 - b2**t)) + ADAM["eps"])
    return p, g, m, v, ref


@pytest.mark.parametrize("contender", DECAY_CONTENDERS)
def test_optimizer_step_subnormal_moments(run_benchmark, contender: str) -> None:
    """One Adam step whose first moments are 10% subnormal, the state reset before each round:
    x86 takes a microcode assist on each multiply with a subnormal operand or result unless
    the update flushes them (fastbp's default, :func:`fastbp.set_flush_denormal`)."""
    import fastbp

    p0, g, m0, v0, ref = _decay_data()
    state = {"p": p0.copy(), "m": m0.copy(), "v": v0.copy()}
    u32 = float(np.finfo(F32).eps) / 2
    tol = 16 * u32 * (np.abs(p0) + np.abs(ref - p0)) + 1e-30

    def reset() -> Callable[[], None]:
        for name, src in (("p", p0), ("m", m0), ("v", v0)):
            np.copyto(state[name], src)
        if contender.startswith("torch"):
            param = torch.nn.Parameter(torch.from_numpy(state["p"]))
            param.grad = torch.from_numpy(g)
            opt = torch.optim.Adam([param], **ADAM, foreach=False)
            opt.state[param] = {
                "step": torch.tensor(49.0),
                "exp_avg": torch.from_numpy(state["m"]),
                "exp_avg_sq": torch.from_numpy(state["v"]),
            }
            return opt.step
        flush = contender == "fastbp"

        def step() -> None:
            previous = fastbp.get_flush_denormal()
            fastbp.set_flush_denormal(flush)
            try:
                ops.adam_step(state["p"], g, state["m"], state["v"], step=50, **ADAM)
            finally:
                fastbp.set_flush_denormal(previous)

        return step

    reset()()
    assert_within(state["p"], ref, tol, f"{contender} adam step with subnormal moments")
    run_benchmark(
        None, group=DECAY_GROUP, contender=contender, dtype="float32", shape=f"({N_PARAMS},)",
        nbytes=7 * p0.nbytes, rounds=40, setup=reset,
    )  # fmt: skip
