"""fastbp.ops.sgd_step and fastbp.ops.adam_step: step-by-step agreement with torch.optim (SGD,
Adam, AdamW; foreach=False) and with independent float64 NumPy references, torch's first-step
semantics, closed-form workloads, thread independence and the error contract.

Tolerance model (used throughout; see StepChecker). One update performs a handful (<= 5) of
roundings per element; torch and fastbp differ in operation order and in FMA contraction, so
after one step they may differ by ~2 u per operation on the scale S of the operands, i.e.
<= 4 eps S (eps = 2u). S is the running maximum of the magnitudes entering the array's update
(the array itself and, where they can cancel against it, the gradient or the velocity). An
earlier difference is carried forward with a factor <= 1 (the moment buffers decay by beta < 1;
parameters and SGD's velocity are multiplied by (1 - lr * wd) <= 1 and momentum < 1, plus lr < 1
times the velocity's difference, itself within the same bound), so after k steps the difference
is at most k * 4 * eps * S. For float64 that is 80 * 2.2e-16 = 1.8e-14 relative to S after 20
steps, well inside "1e-13 relative to max|param|"; for float32 80 * 1.2e-7 = 9.5e-6.
"""

from __future__ import annotations

import contextlib
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import fastbp
from fastbp import ops
from tests.conftest import eps, using_threads

STEP_EPS = 4  # eps per step on the array's scale (see the module docstring)
STEPS = 20
SHAPES = [1, 7, 33]

SGD_LR = 0.05
SGD_CONFIGS = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "dampening": {"momentum": 0.9, "dampening": 0.1},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "wd": {"weight_decay": 1e-2},
    "momentum-wd": {"momentum": 0.9, "weight_decay": 1e-2},
    "dampening-wd": {"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2},
    "nesterov-wd": {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
}
ADAM_CONFIGS = {  # (kwargs for fastbp; torch class decided by decoupled_weight_decay)
    "adam": {},
    "adam-wd": {"weight_decay": 1e-2},
    "adamw-wd": {"weight_decay": 1e-2, "decoupled_weight_decay": True},
    "betas-eps-lr": {"betas": (0.8, 0.99), "eps": 1e-6, "lr": 1e-2},
    "adamw-all": {
        "betas": (0.8, 0.99),
        "eps": 1e-6,
        "lr": 1e-2,
        "weight_decay": 1e-2,
        "decoupled_weight_decay": True,
    },
}


class StepChecker:
    """Checks arrays after step k against a reference: |got - want| <= k * STEP_EPS * eps * S.

    S is the running maximum, over the steps so far, of the magnitudes that enter the array's
    updates (the array itself and any `operands`, e.g. the gradient). A running maximum, because
    a value that later cancels towards 0 still carries the rounding errors made while it (or its
    operands) was large; the current max|want| alone would understate them.
    """

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.scale: dict[str, float] = {}

    def __call__(self, name: str, got: np.ndarray, want, k: int, *operands) -> None:
        want = np.asarray(want, dtype=np.float64)
        mags = [float(np.abs(np.asarray(a, dtype=np.float64)).max()) for a in (want, *operands)]
        scale = self.scale[name] = max(self.scale.get(name, 0.0), *mags)
        e = eps(self.dtype)
        tol = k * STEP_EPS * e * scale
        err = float(np.abs(got.astype(np.float64) - want).max())
        assert err <= tol, (
            f"{name} after step {k}: max |diff| {err:.3g} = {err / (e * scale):.1f} eps * "
            f"scale {scale:.3g} (allowed {k * STEP_EPS})"
        )


def torch_param(p0: np.ndarray) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.from_numpy(p0.copy()))


def random_problem(dtype, shape, steps, seed):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(shape).astype(dtype)
    grads = [rng.standard_normal(shape).astype(dtype) for _ in range(steps)]
    return p0, grads


def adam_kwargs(cfg: dict) -> dict:
    return {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0} | {
        k: v for k, v in cfg.items() if k != "decoupled_weight_decay"
    }


def make_torch_adam(tp, cfg):
    cls = torch.optim.AdamW if cfg.get("decoupled_weight_decay") else torch.optim.Adam
    return cls([tp], foreach=False, **adam_kwargs(cfg))


# ---- SGD vs torch -----------------------------------------------------------------------------


def run_sgd_vs_torch(dtype, shape, steps, cfg, seed=0):
    p0, grads = random_problem(dtype, shape, steps, seed)
    momentum = cfg.get("momentum", 0.0)
    p = p0.copy()
    buf = np.zeros_like(p) if momentum else None
    tp = torch_param(p0)
    opt = torch.optim.SGD([tp], lr=SGD_LR, foreach=False, **cfg)
    check = StepChecker(dtype)
    for k, g in enumerate(grads, 1):
        ops.sgd_step(p, g, buf, lr=SGD_LR, first_step=k == 1, **cfg)
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        # SGD's operands: p, g and the velocity (lr < 1 scales the velocity's share down)
        want_buf = opt.state[tp]["momentum_buffer"] if momentum else g
        check("param", p, tp.detach().numpy(), k, g, want_buf)
        if momentum:
            check("momentum_buffer", buf, want_buf, k, g, tp.detach().numpy())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", list(SGD_CONFIGS))
def test_sgd_matches_torch(isa, dtype, config, shape):
    """20 SGD steps track torch.optim.SGD (param and momentum buffer) after every step."""
    run_sgd_vs_torch(dtype, shape, STEPS, SGD_CONFIGS[config])


def test_sgd_matches_torch_large(isa, dtype):
    """A 1000003-element parameter (split between threads, odd tail): 3 nesterov steps with
    weight decay track torch."""
    run_sgd_vs_torch(dtype, 1000003, 3, SGD_CONFIGS["nesterov-wd"], seed=1)


@pytest.mark.parametrize("config", ["dampening-wd", "nesterov"])
def test_sgd_matches_torch_2d(isa, dtype, config):
    """A 2-D (5, 7) parameter is updated elementwise like torch's."""
    run_sgd_vs_torch(dtype, (5, 7), STEPS, SGD_CONFIGS[config], seed=2)


# ---- Adam / AdamW vs torch ----------------------------------------------------------------------


def run_adam_vs_torch(dtype, shape, steps, cfg, *, check_params=True, check_state=False, seed=0):
    p0, grads = random_problem(dtype, shape, steps, seed)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    tp = torch_param(p0)
    opt = make_torch_adam(tp, cfg)
    check = StepChecker(dtype)
    for k, g in enumerate(grads, 1):
        ops.adam_step(p, g, m, v, step=k, **cfg)
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        # operands: the param's update is ~lr, far below |p|; exp_avg mixes m and g (which may
        # cancel); exp_avg_sq sums positive terms, so its own magnitude bounds them
        if check_params:
            check("param", p, tp.detach().numpy(), k)
        if check_state:
            check("exp_avg", m, opt.state[tp]["exp_avg"], k, g)
            check("exp_avg_sq", v, opt.state[tp]["exp_avg_sq"], k)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", list(ADAM_CONFIGS))
def test_adam_params_match_torch(isa, dtype, config, shape):
    """20 Adam/AdamW steps: the parameters track torch.optim.Adam/AdamW after every step."""
    run_adam_vs_torch(dtype, shape, STEPS, ADAM_CONFIGS[config])


@pytest.mark.parametrize("config", list(ADAM_CONFIGS))
def test_adam_state_matches_torch(isa, dtype, config):
    """The moment buffers exp_avg and exp_avg_sq track torch's state after every step."""
    run_adam_vs_torch(dtype, 33, STEPS, ADAM_CONFIGS[config], check_params=False, check_state=True)


def test_adam_matches_torch_large(isa, dtype):
    """A 1000003-element parameter (threaded, odd tail): 3 AdamW steps track torch."""
    run_adam_vs_torch(dtype, 1000003, 3, ADAM_CONFIGS["adamw-all"], seed=1)


@pytest.mark.parametrize("config", ["adam-wd", "adamw-wd"])
def test_adam_matches_torch_2d(isa, dtype, config):
    """A 2-D (5, 7) parameter is updated elementwise like torch's."""
    run_adam_vs_torch(dtype, (5, 7), STEPS, ADAM_CONFIGS[config], seed=2)


# ---- independent float64 references (no torch) ---------------------------------------------------


def sgd_reference(p, grads, *, lr, momentum, dampening, weight_decay, nesterov):
    """torch.optim.SGD's documented algorithm in float64; yields (param, buffer) per step."""
    p = p.astype(np.float64)
    buf = None
    for g in grads:
        d = g.astype(np.float64) + weight_decay * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
        yield p, buf


def adam_reference(p, grads, *, lr, betas, eps, weight_decay, decoupled):
    """Adam (L2 in the gradient) / AdamW (decoupled decay) in float64, from Kingma & Ba with
    torch's placement of eps (after the bias-corrected square root); yields (p, m, v)."""
    b1, b2 = betas
    p = p.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for k, g in enumerate(grads, 1):
        g = g.astype(np.float64)
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**k)
        v_hat = v / (1 - b2**k)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        yield p, m, v


@pytest.mark.parametrize(
    ("cfg", "size", "seed"),
    [
        ({"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2, "nesterov": False}, 33, 5),
        ({"momentum": 0.9, "dampening": 0.0, "weight_decay": 1e-2, "nesterov": True}, 7, 6),
    ],
    ids=["momentum-dampening-wd", "nesterov-wd"],
)
def test_sgd_matches_float64_reference(isa, dtype, cfg, size, seed):
    """SGD (momentum, dampening, weight decay; and Nesterov) follows the float64 formula for 20
    steps, parameters and momentum buffer alike."""
    p0, grads = random_problem(dtype, size, STEPS, seed=seed)
    p, buf = p0.copy(), np.zeros_like(p0)
    check = StepChecker(dtype)
    for k, (g, (ref_p, ref_buf)) in enumerate(
        zip(grads, sgd_reference(p0, grads, lr=SGD_LR, **cfg), strict=True), 1
    ):
        ops.sgd_step(p, g, buf, lr=SGD_LR, first_step=k == 1, **cfg)
        check("param", p, ref_p, k, g, ref_buf)
        check("momentum_buffer", buf, ref_buf, k, g, ref_p)


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam-l2", "adamw"])
def test_adam_matches_float64_reference(isa, dtype, decoupled):
    """Adam / AdamW (weight decay 1e-2) follow the float64 formula: params and moments."""
    cfg = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}
    p0, grads = random_problem(dtype, 33, STEPS, seed=7)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    ref = adam_reference(p0, grads, decoupled=decoupled, **cfg)
    check = StepChecker(dtype)
    for k, (g, (ref_p, ref_m, ref_v)) in enumerate(zip(grads, ref, strict=True), 1):
        ops.adam_step(p, g, m, v, step=k, decoupled_weight_decay=decoupled, **cfg)
        check("param", p, ref_p, k)
        check("exp_avg", m, ref_m, k, g)
        check("exp_avg_sq", v, ref_v, k)


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.8, 0.99)])
def test_adam_first_step_closed_form(isa, dtype, betas):
    """From p = 0 with zero moments, step 1 moves each parameter by exactly
    -lr * g / (|g| + eps) (m_hat = g, sqrt(v_hat) = |g|): the bias corrections cancel.

    About ten roundings are involved (the betas' and 1 - beta's, the moments, sqrt, two
    divisions, eps, step size), each <= u relative, so the result is within 6 eps (12 u)
    relative of the closed form.
    """
    rng = np.random.default_rng(17)
    g = (rng.standard_normal(33) * 10.0 ** rng.integers(-3, 3, 33)).astype(dtype)
    lr, eps_ = 1e-3, 1e-8
    p, m, v = np.zeros_like(g), np.zeros_like(g), np.zeros_like(g)
    ops.adam_step(p, g, m, v, step=1, lr=lr, betas=betas, eps=eps_)
    g64 = g.astype(np.float64)
    exact_p = -lr * g64 / (np.abs(g64) + eps_)
    rel = np.abs(p.astype(np.float64) - exact_p) / np.abs(exact_p)
    assert rel.max() <= 6 * eps(dtype), f"{rel.max() / eps(dtype):.1f} eps"
    # the moments themselves: m = (1 - b1) g, v = (1 - b2) g^2, to a few roundings (3 eps)
    exact_m = (1 - betas[0]) * g64
    exact_v = (1 - betas[1]) * g64 * g64
    rel_m = np.abs(m - exact_m) / np.abs(exact_m)
    rel_v = np.abs(v - exact_v) / np.abs(exact_v)
    assert rel_m.max() <= 3 * eps(dtype), f"exp_avg: {rel_m.max() / eps(dtype):.1f} eps"
    assert rel_v.max() <= 3 * eps(dtype), f"exp_avg_sq: {rel_v.max() / eps(dtype):.1f} eps"


@pytest.mark.parametrize("beta2", [0.999, 0.99, 0.5])
def test_adam_denominator_is_the_ieee_quotient(isa, dtype, beta2):
    """sqrt(v) / sqrt(1 - beta2^t) is IEEE's correctly rounded quotient on every ISA: the FMA
    builds compute it as a product and one correction (update.h's quotient_by_constant), which
    must give the division's bits. With beta1 = 0, eps = 0 and p = m = v = 0, every other
    operation of the step is a single rounding NumPy repeats exactly (m = g, v = (1 - beta2) g g,
    p = -lr (g / (sqrt(v) / c))), so p is compared bit for bit over 2**15 gradients of every
    magnitude, at 43 bias corrections c; also g = 0 (0 / 0: NaN) and gradients whose square
    overflows (inf / c = inf passes through: p = 0). A buffer of 100 takes the division itself."""
    rng = np.random.default_rng(23)
    span = 15 if dtype == np.float32 else 100
    g = (rng.uniform(1, 2, 2**15) * 10.0 ** rng.uniform(-span, span, 2**15)).astype(dtype)
    g[rng.random(g.size) < 0.5] *= -1
    g[:3] = [0, 10.0 ** (2 * span), -(10.0 ** (2 * span))]
    lr = dtype.type(1e-3)
    w2 = dtype.type(1 - beta2)
    for step in [*range(1, 41), 100, 1000, 5000]:
        p, m, v = np.zeros_like(g), np.zeros_like(g), np.zeros_like(g)
        ops.adam_step(p, g, m, v, step=step, lr=float(lr), betas=(0.0, beta2), eps=0.0)
        # a short buffer divides (update.h's adam_elements): the same bits
        short = [np.zeros(100, dtype) for _ in range(3)]
        ops.adam_step(
            short[0], g[:100], *short[1:], step=step, lr=float(lr), betas=(0.0, beta2), eps=0.0
        )
        np.testing.assert_array_equal(short[0], p[:100])
        c = dtype.type(math.sqrt(1 - beta2**step))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            expected = -lr * (g / (np.sqrt(w2 * g * g) / c)) + dtype.type(0)
        assert expected[1] == 0 and np.isnan(expected[0])
        same = (p == expected) | (np.isnan(p) & np.isnan(expected))
        bad = np.flatnonzero(~same)
        assert bad.size == 0, (
            f"step {step}: g = {g[bad[0]]!r}: {p[bad[0]]!r} vs {expected[bad[0]]!r}"
        )


# ---- first_step semantics -------------------------------------------------------------------------


def test_sgd_first_step_initialises_buffer(isa, dtype):
    """first_step=True sets the buffer to the gradient (torch's clone on its first step),
    ignoring the buffer's old contents (even NaN) and the dampening."""
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(37).astype(dtype)
    g = rng.standard_normal(37).astype(dtype)
    p, buf = p0.copy(), np.full(37, np.nan, dtype)
    ops.sgd_step(p, g, buf, lr=0.5, momentum=0.9, dampening=0.5, first_step=True)
    np.testing.assert_array_equal(buf, g)
    np.testing.assert_array_equal(p, p0 - dtype.type(0.5) * g)  # lr = 0.5: exact product


def test_sgd_later_steps_use_dampening(isa, dtype):
    """first_step=False on a zero buffer applies the dampening: buf = (1 - 0.5) g exactly,
    i.e. the flag (not the buffer's zeros) decides torch's first-step behaviour."""
    rng = np.random.default_rng(3)
    g = rng.standard_normal(37).astype(dtype)
    p, buf = np.zeros(37, dtype), np.zeros(37, dtype)
    ops.sgd_step(p, g, buf, lr=1.0, momentum=0.9, dampening=0.5, first_step=False)
    np.testing.assert_array_equal(buf, g / 2)
    np.testing.assert_array_equal(p, -g / 2)


@pytest.mark.parametrize("dampening", [0.5, 0.9, 0.99])
def test_sgd_dampening_precision(isa, dtype, dampening):
    """The dampened gradient (1 - dampening) * g is rounded like torch's, whose factor
    1 - dampening is formed in double and then rounded to the dtype: two roundings, so within
    eps (2u) relative of the exact (1 - dampening) g. Forming it as 1 - fl(dampening) in the
    dtype instead amplifies fl's rounding by dampening / (1 - dampening) (8 eps at 0.99)."""
    rng = np.random.default_rng(4)
    g = rng.standard_normal(37).astype(dtype)
    p, buf = np.zeros(37, dtype), np.zeros(37, dtype)
    ops.sgd_step(p, g, buf, lr=1.0, momentum=0.9, dampening=dampening, first_step=False)
    exact = (Fraction(1) - Fraction(dampening)) * np.array([Fraction(float(v)) for v in g])
    exact = exact.astype(np.float64)
    rel = np.abs(buf.astype(np.float64) - exact) / np.abs(exact)
    assert rel.max() <= eps(dtype), f"{rel.max() / eps(dtype):.1f} eps"


def test_sgd_nesterov_first_step(isa, dtype):
    """Nesterov's first step uses d = g + momentum * g (buffer = g), as torch does."""
    g = np.array([1.0, -2.0, 4.0], dtype)
    p, buf = np.zeros(3, dtype), np.zeros(3, dtype)
    ops.sgd_step(p, g, buf, lr=1.0, momentum=0.5, nesterov=True, first_step=True)
    np.testing.assert_array_equal(buf, g)
    np.testing.assert_array_equal(p, -1.5 * g)


# ---- workloads with closed forms (W5) -------------------------------------------------------------


def sgd_closed_form_bound(dtype, lr: float, factor: float, steps: int) -> float:
    """Relative error bound of `steps` plain SGD steps x <- x - lr * (c x) computed in dtype.

    Each step rounds lr * g (u) and the subtraction (u); the first perturbs the step's factor
    (1 - c lr) by c lr u / (1 - c lr) relative, and fl(lr) adds the same again. So a step is
    within (1 + 2 c lr / (1 - c lr)) u < 1.1 u relative, and `steps` of them (1 + 1.1 u)^steps.
    """
    u = eps(dtype) / 2
    c_lr = factor * lr
    per_step = (1 + 2 * c_lr / (1 - c_lr)) * u
    return (1 + per_step) ** steps - 1 + 2 * steps * u * u


@pytest.mark.parametrize(
    ("name", "factor", "size"),
    [("2x^2", 4, 1), ("2x^2-many", 4, 37), ("sphere", 2, 3)],
)
def test_sgd_closed_form_workloads(isa, dtype, name, factor, size):
    """W5: minimise 2x^2 (grad 4x) or x^2 + y^2 + z^2 (grad 2v) from random integers in
    [-1000, 1000) with plain SGD, lr 1e-2, 1000 steps. x_k = x0 (1 - factor lr)^k exactly; the
    result matches that within the rounding bound and satisfies |x| < 1e-6 |x0|."""
    rng = np.random.default_rng([factor, size])
    x0 = rng.integers(-1000, 1000, size)
    x0[x0 == 0] = 1
    x = x0.astype(dtype)
    for _ in range(1000):
        ops.sgd_step(x, factor * x, lr=1e-2)
    ratio = Fraction(1) - factor * Fraction(1, 100)
    expected = np.array([float(int(v) * ratio**1000) for v in x0])
    bound = sgd_closed_form_bound(dtype, 1e-2, factor, 1000)
    rel = np.abs(x.astype(np.float64) - expected) / np.abs(expected)
    assert rel.max() <= bound, f"relative error {rel.max():.3g} > bound {bound:.3g}"
    assert (np.abs(x) < 1e-6 * np.abs(x0)).all()


# ---- threads --------------------------------------------------------------------------------------


def test_adam_thread_count_independent(isa, dtype):
    """2**20 parameters: an AdamW step on one and on two threads is bitwise identical
    (parameters and both moments)."""
    rng = np.random.default_rng(4)
    n = 2**20
    p0 = rng.standard_normal(n).astype(dtype)
    m0 = rng.standard_normal(n).astype(dtype) * dtype.type(0.1)
    v0 = np.abs(rng.standard_normal(n)).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    results = []
    for threads in (1, 2):
        p, m, v = p0.copy(), m0.copy(), v0.copy()
        with using_threads(threads):
            ops.adam_step(
                p, g, m, v, step=3, lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True
            )
        results.append((p.tobytes(), m.tobytes(), v.tobytes()))
    assert results[0] == results[1]
    assert results[0][0] != p0.tobytes()  # it did update


def test_sgd_thread_count_independent(isa, dtype):
    """2**20 parameters: a nesterov SGD step on one and on two threads is bitwise identical."""
    rng = np.random.default_rng(5)
    n = 2**20 + 3
    p0 = rng.standard_normal(n).astype(dtype)
    b0 = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    results = []
    for threads in (1, 2):
        p, b = p0.copy(), b0.copy()
        with using_threads(threads):
            ops.sgd_step(p, g, b, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
        results.append((p.tobytes(), b.tobytes()))
    assert results[0] == results[1]


# ---- subnormals (fastbp.set_flush_denormal) ------------------------------------------------------


@contextlib.contextmanager
def flushing(mode: bool):
    previous = fastbp.get_flush_denormal()
    fastbp.set_flush_denormal(mode)
    try:
        yield
    finally:
        fastbp.set_flush_denormal(previous)


def _decaying_state(dtype, n: int = 257):
    """Parameters, a zero gradient and moments that are subnormal (or about to become so): a
    weight whose input is never lit, whose moments only decay."""
    info = np.finfo(dtype)
    tiny = dtype.type(info.smallest_normal)
    rng = np.random.default_rng(11)
    p = rng.standard_normal(n).astype(dtype)
    m = (tiny * rng.uniform(0.01, 0.99, n)).astype(dtype)  # subnormal
    m[::3] = tiny * dtype.type(1.05)  # normal now, subnormal after one decay by beta1
    v = np.abs(rng.standard_normal(n)).astype(dtype) * dtype.type(1e-4)
    return p, np.zeros(n, dtype), m, v


def test_flush_denormal_setting():
    assert fastbp.get_flush_denormal() is True  # the default
    with flushing(False):
        assert fastbp.get_flush_denormal() is False
        assert fastbp.get_config()["flush_denormal"] is False
    assert fastbp.get_config()["flush_denormal"] is True
    with pytest.raises(TypeError, match="bool"):
        fastbp.set_flush_denormal("no")


@pytest.mark.parametrize("threads", [1, 2])
def test_updates_flush_subnormal_moments_to_zero(isa, dtype, threads):
    """Flushing on: no subnormal is stored (IEEE keeps them, as torch does): a subnormal moment
    reads as 0, and every stored value is 0 or normal and within the smallest normal number of
    IEEE's. (Without an FMA, a moment just above it may stop decaying: 0.1 * m flushes to 0.)
    The parameter, which such a moment moves by far less than an ulp, is bitwise IEEE's."""
    n = 2**17 + 5 if threads == 2 else 257  # large enough to split between two threads
    results = {}
    for mode in (True, False):
        p, g, m, v = _decaying_state(dtype, n)
        b = m.copy()
        with flushing(mode), using_threads(threads):
            ops.adam_step(p, g, m, v, step=7)
            ops.sgd_step(p, g, b, lr=0.1, momentum=0.9)
        results[mode] = (p, m, v, b)
    tiny = np.finfo(dtype).smallest_normal
    p_ieee, m_ieee, v_ieee, b_ieee = results[False]
    p_ftz, m_ftz, v_ftz, b_ftz = results[True]
    p0, _, m0, _ = _decaying_state(dtype, n)
    for ieee, ftz in ((m_ieee, m_ftz), (b_ieee, b_ftz)):
        assert (ieee != 0).all() and (np.abs(ieee) < tiny).all()  # IEEE: gradual underflow
        assert ((ftz == 0) | (np.abs(ftz) >= tiny)).all()  # flushing: none stored
        assert not ftz[np.abs(m0) < tiny].any()  # a subnormal moment reads as 0
        assert (np.abs(ftz.astype(np.float64) - ieee) < tiny).all()
    # IEEE's decayed moment is beta * m, to an ulp
    assert np.abs(m_ieee.astype(np.float64) - 0.9 * m0.astype(np.float64)).max() <= 2 * (
        np.finfo(dtype).smallest_subnormal
    )
    np.testing.assert_array_equal(v_ftz, v_ieee)  # normal values: the same bits
    np.testing.assert_array_equal(p_ftz, p_ieee)
    np.testing.assert_array_equal(p_ftz, p0)  # the zero gradient moved nothing visible


def test_flushing_leaves_normal_results_unchanged(isa, dtype):
    """Random normal-range data: the update is bitwise the same with and without flushing."""
    rng = np.random.default_rng(12)
    n = 1000
    base = [rng.standard_normal(n).astype(dtype) for _ in range(3)]
    base.append(np.abs(rng.standard_normal(n)).astype(dtype))
    results = []
    for mode in (True, False):
        p, g, m, v = (a.copy() for a in base)
        b = m.copy()
        with flushing(mode):
            ops.adam_step(p, g, m, v, step=5, weight_decay=1e-2)
            ops.sgd_step(p, g, b, lr=0.1, momentum=0.9, nesterov=True)
        results.append(b"".join(a.tobytes() for a in (p, m, v, b)))
    assert results[0] == results[1]


@pytest.mark.parametrize("threads", [1, 2])
def test_flushing_restores_the_callers_fp_mode(threads):
    """After a flushed update, float arithmetic elsewhere (NumPy in this thread, a GEMM on the
    kernels' worker threads) still has gradual underflow."""
    with using_threads(threads):
        p, g, m, v = _decaying_state(np.dtype(np.float32), 2**18)
        ops.adam_step(p, g, m, v, step=1)
        ops.sgd_step(p, g, m, lr=0.1, momentum=0.9)
        tiny = np.float32(np.finfo(np.float32).smallest_normal)
        with np.errstate(under="ignore"):
            assert tiny * np.float32(0.25) != 0  # this thread
        # worker threads: a product whose entries are subnormal, large enough for a team
        a = np.full((256, 256), 2.0**-70, np.float32)
        b = np.full((256, 256), 2.0**-70, np.float32)
        c = ops.gemm(a, b)
        np.testing.assert_array_equal(c, np.full((256, 256), 256 * 2.0**-140, np.float32))


# ---- layouts ----------------------------------------------------------------------------------------


def test_grad_may_be_strided(isa, dtype):
    """A non-contiguous or Fortran-ordered gradient is read correctly (only param and state
    must be C-contiguous)."""
    rng = np.random.default_rng(6)
    p0 = rng.standard_normal((4, 6)).astype(dtype)
    g_full = rng.standard_normal((4, 12)).astype(dtype)
    g = g_full[:, ::2]
    p1, p2 = p0.copy(), p0.copy()
    ops.sgd_step(p1, g, lr=0.1)
    ops.sgd_step(p2, np.ascontiguousarray(g), lr=0.1)
    np.testing.assert_array_equal(p1, p2)
    m1, v1, m2, v2 = (np.zeros_like(p0) for _ in range(4))
    ops.adam_step(p1, np.asfortranarray(g), m1, v1, step=1)
    ops.adam_step(p2, np.ascontiguousarray(g), m2, v2, step=1)
    np.testing.assert_array_equal(p1, p2)


def test_empty_param(dtype):
    """A zero-size parameter is a no-op, not an error."""
    p = np.empty(0, dtype)
    ops.sgd_step(p, np.empty(0, dtype), np.empty(0, dtype), lr=0.1, momentum=0.9)
    ops.adam_step(p, np.empty(0, dtype), np.empty(0, dtype), np.empty(0, dtype), step=1)


# ---- errors: nothing is modified by a rejected call --------------------------------------------


def fresh(dtype=np.float64, n=5):
    rng = np.random.default_rng(0)
    return {
        "param": rng.standard_normal(n).astype(dtype),
        "grad": rng.standard_normal(n).astype(dtype),
        "buf": rng.standard_normal(n).astype(dtype),
        "m": rng.standard_normal(n).astype(dtype),
        "v": np.abs(rng.standard_normal(n)).astype(dtype),
    }


def readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def sgd_call(a, **kw):
    args = {"lr": 0.1, "momentum": 0.9} | kw
    buf = args.pop("buf", a["buf"])
    grad = args.pop("grad", a["grad"])
    param = args.pop("param", a["param"])
    ops.sgd_step(param, grad, buf, **args)


def adam_call(a, **kw):
    args = {"step": 1} | kw
    param = args.pop("param", a["param"])
    grad = args.pop("grad", a["grad"])
    m = args.pop("m", a["m"])
    v = args.pop("v", a["v"])
    ops.adam_step(param, grad, m, v, **args)


SGD_ERRORS = {
    "negative-lr": (ValueError, "lr", lambda a: {"lr": -0.1}),
    "nan-lr": (ValueError, "lr", lambda a: {"lr": float("nan")}),
    "inf-lr": (ValueError, "lr", lambda a: {"lr": float("inf")}),
    "str-lr": (TypeError, "lr", lambda a: {"lr": "0.1"}),
    "negative-momentum": (ValueError, "momentum", lambda a: {"momentum": -0.9}),
    "negative-wd": (ValueError, "weight_decay", lambda a: {"weight_decay": -1e-2}),
    "nesterov-no-momentum": (ValueError, "nesterov", lambda a: {"momentum": 0.0, "nesterov": True}),
    "nesterov-dampening": (ValueError, "nesterov", lambda a: {"nesterov": True, "dampening": 0.1}),
    "no-buffer": (ValueError, "momentum_buffer", lambda a: {"buf": None}),
    "grad-shape": (ValueError, "grad", lambda a: {"grad": np.zeros(6)}),
    "grad-dtype": (TypeError, "grad", lambda a: {"grad": a["grad"].astype(np.float32)}),
    "buffer-dtype": (TypeError, "momentum_buffer", lambda a: {"buf": a["buf"].astype(np.float32)}),
    "buffer-shape": (ValueError, "momentum_buffer", lambda a: {"buf": np.zeros(4)}),
    "buffer-readonly": (ValueError, "momentum_buffer", lambda a: {"buf": readonly(a["buf"])}),
    "buffer-strided": (
        ValueError,
        "momentum_buffer",
        lambda a: {"buf": np.repeat(a["buf"], 2)[::2]},
    ),
    "param-readonly": (ValueError, "read-only", lambda a: {"param": readonly(a["param"])}),
    "param-strided": (ValueError, "contiguous", lambda a: {"param": np.repeat(a["param"], 2)[::2]}),
    "param-list": (TypeError, "ndarray", lambda a: {"param": [0.0] * 5}),
    "param-int": (TypeError, "float32 or float64", lambda a: {"param": np.zeros(5, np.int64)}),
}

ADAM_ERRORS = {
    "negative-lr": (ValueError, "lr", lambda a: {"lr": -1e-3}),
    "nan-lr": (ValueError, "lr", lambda a: {"lr": float("nan")}),
    "beta1-one": (ValueError, "betas", lambda a: {"betas": (1.0, 0.999)}),
    "beta2-one": (ValueError, "betas", lambda a: {"betas": (0.9, 1.0)}),
    "beta2-big": (ValueError, "betas", lambda a: {"betas": (0.9, 1.5)}),
    "beta1-negative": (ValueError, "betas", lambda a: {"betas": (-0.1, 0.999)}),
    "beta-nan": (ValueError, "betas", lambda a: {"betas": (0.9, float("nan"))}),
    "negative-eps": (ValueError, "eps", lambda a: {"eps": -1e-8}),
    "negative-wd": (ValueError, "weight_decay", lambda a: {"weight_decay": -1e-2}),
    "step-0": (ValueError, "step", lambda a: {"step": 0}),
    "step-negative": (ValueError, "step", lambda a: {"step": -3}),
    "step-float": (ValueError, "step", lambda a: {"step": 1.0}),
    "step-bool": (ValueError, "step", lambda a: {"step": True}),
    "grad-shape": (ValueError, "grad", lambda a: {"grad": np.zeros(6)}),
    "grad-dtype": (TypeError, "grad", lambda a: {"grad": a["grad"].astype(np.float32)}),
    "exp_avg-dtype": (TypeError, "exp_avg", lambda a: {"m": a["m"].astype(np.float32)}),
    "exp_avg_sq-dtype": (TypeError, "exp_avg_sq", lambda a: {"v": a["v"].astype(np.float32)}),
    "exp_avg-shape": (ValueError, "exp_avg", lambda a: {"m": np.zeros((5, 1))}),
    "exp_avg-list": (TypeError, "exp_avg", lambda a: {"m": [0.0] * 5}),
    "exp_avg_sq-readonly": (ValueError, "exp_avg_sq", lambda a: {"v": readonly(a["v"])}),
    "param-readonly": (ValueError, "read-only", lambda a: {"param": readonly(a["param"])}),
    "param-strided": (ValueError, "contiguous", lambda a: {"param": np.repeat(a["param"], 2)[::2]}),
    "param-list": (TypeError, "ndarray", lambda a: {"param": [0.0] * 5}),
}


def snapshot(a: dict, kw: dict) -> dict:
    """Copies of every array the call receives (the defaults and the overriding ones)."""
    arrays = {f"default {k}": v for k, v in a.items()}
    arrays |= {f"passed {k}": v for k, v in kw.items() if isinstance(v, np.ndarray)}
    return {k: v.copy() for k, v in arrays.items()}


def assert_untouched(a: dict, kw: dict, before: dict) -> None:
    arrays = {f"default {k}": v for k, v in a.items()}
    arrays |= {f"passed {k}": v for k, v in kw.items() if isinstance(v, np.ndarray)}
    for key, value in arrays.items():
        np.testing.assert_array_equal(value, before[key], err_msg=f"{key} was modified")


@pytest.mark.parametrize("case", list(SGD_ERRORS))
def test_sgd_errors_leave_everything_unchanged(case):
    """Each invalid sgd_step call raises the documented exception naming the culprit, and
    neither the param nor any buffer was written."""
    exc, match, override = SGD_ERRORS[case]
    a = fresh()
    kw = override(a)
    before = snapshot(a, kw)
    with pytest.raises(exc, match=match):
        sgd_call(a, **kw)
    assert_untouched(a, kw, before)


@pytest.mark.parametrize("case", list(ADAM_ERRORS))
def test_adam_errors_leave_everything_unchanged(case):
    """Each invalid adam_step call raises the documented exception naming the culprit, and
    neither the param nor the moments were written."""
    exc, match, override = ADAM_ERRORS[case]
    a = fresh()
    kw = override(a)
    before = snapshot(a, kw)
    with pytest.raises(exc, match=match):
        adam_call(a, **kw)
    assert_untouched(a, kw, before)


def test_valid_calls_do_update():
    """Control for the error tests: the same arrays with valid arguments are updated."""
    a = fresh()
    before = {k: v.copy() for k, v in a.items()}
    sgd_call(a)
    assert not np.array_equal(a["param"], before["param"])
    assert not np.array_equal(a["buf"], before["buf"])
    a = fresh()
    adam_call(a)
    assert not np.array_equal(a["param"], before["param"])
    assert not np.array_equal(a["m"], before["m"])
    assert not np.array_equal(a["v"], before["v"])


@pytest.mark.parametrize("step", [1, 10, 50, 415, 417, 7000, 41_600, 10**6])
def test_adam_bias_correction_at_large_steps_matches_torch(isa, dtype, step):
    """Late steps, where 1 - beta1^step rounds to 1.0 and fastbp skips pow (step >= 416 for
    beta1 = 0.9; 0.9^step underflows from ~7000), and where beta2's correction still matters
    (0.999^41600 ~ 1e-18): one update equals torch's from the same state, to rounding."""
    rng = np.random.default_rng(step)
    n = 33
    p = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    m = (rng.standard_normal(n) * 0.1).astype(dtype)
    v = (np.abs(rng.standard_normal(n)) * 0.01).astype(dtype)
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    tp.grad = torch.from_numpy(g.copy())
    topt = torch.optim.Adam([tp], lr=1e-2, foreach=False)
    topt.state[tp] = {
        "step": torch.tensor(float(step - 1)),
        "exp_avg": torch.from_numpy(m.copy()),
        "exp_avg_sq": torch.from_numpy(v.copy()),
    }
    topt.step()
    ops.adam_step(p, g, m, v, step=step, lr=1e-2)
    scale = np.abs(tp.detach().numpy()).max() + 1e-2
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=0, atol=STEP_EPS * eps(dtype) * scale)
    np.testing.assert_allclose(m, topt.state[tp]["exp_avg"].numpy(), rtol=0,
                               atol=STEP_EPS * eps(dtype) * (np.abs(m).max() + np.abs(g).max()))  # fmt: skip
