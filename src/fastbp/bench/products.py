"""The matrix products of one training step, each timed alone: a floor under the training time.

A training step of an MLP is its Linear layers' products (forward ``Z = H @ W.T``, weight
gradient ``dW = dZ.T @ H``, input gradient ``dX = dZ @ W`` for every layer but the first) plus
work that is linear in the batch or in the parameters (activations, loss, update). Timing each
product alone, on 64-byte aligned operands that stay in cache between calls, with every GEMM
installed (fastbp's, NumPy's BLAS, torch's MKL) and keeping the fastest for each shape, gives
what one epoch's products cost at the best speed any of them reaches on this machine. A target
for the whole epoch below that time asks for a faster matrix product than any library here has,
before anything else in the step runs.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .. import ops
from ..nn import _aligned_zeros

__all__ = ["Product", "ProductTimes", "step_products", "time_products"]

#: The contenders whose GEMM is timed, when installed (fastbp first: the reference result).
GEMM_CONTENDERS = ("fastbp", "numpy", "torch")


@dataclass(frozen=True)
class Product:
    """``C (m x n) = op(A) @ op(B)`` with inner dimension ``k``; ``trans_a`` / ``trans_b``: the
    operand is stored transposed (A as k x m, B as n x k), as a layer's W.T and dZ.T are."""

    name: str
    m: int
    n: int
    k: int
    trans_a: bool = False
    trans_b: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k

    @property
    def shape(self) -> str:
        return f"{self.m}x{self.n}x{self.k}"


def step_products(sizes: Sequence[int], batch: int) -> list[Product]:
    """The products of one training step of a ``sizes`` MLP on ``batch`` rows, in torch's weight
    layout (``out x in``): per layer its forward and weight gradient, and its input gradient
    for every layer but the first. Their flops add up to :func:`workloads.step_flops`."""
    if len(sizes) < 2 or batch < 1 or min(sizes) < 1:
        raise ValueError(f"need >= 2 positive sizes and batch >= 1, got {sizes}, {batch}")
    out = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
        out.append(Product(f"L{i} forward", batch, fan_out, fan_in, trans_b=True))
        out.append(Product(f"L{i} weight gradient", fan_out, fan_in, batch, trans_a=True))
        if i > 1:
            out.append(Product(f"L{i} input gradient", batch, fan_in, fan_out))
    return out


@dataclass
class ProductTimes:
    """Median seconds per call of each product, per contender (None: not installed)."""

    products: list[Product]
    seconds: dict[str, list[float] | None]

    def per_step(self, contender: str) -> float | None:
        """One step's products with ``contender``'s GEMM."""
        times = self.seconds.get(contender)
        return sum(times) if times is not None else None

    def best_per_step(self) -> float:
        """One step's products, each with the fastest GEMM for its shape."""
        timed = [t for t in self.seconds.values() if t is not None]
        return sum(min(ts) for ts in zip(*timed, strict=True))

    def fastest(self, index: int) -> str:
        """The contender with the fastest GEMM for product ``index``."""
        timed = {c: t[index] for c, t in self.seconds.items() if t is not None}
        return min(timed, key=timed.__getitem__)


def _operands(p: Product, dtype: np.dtype, rng: np.random.Generator):
    def aligned(shape: tuple[int, int]) -> np.ndarray:
        arr = _aligned_zeros(shape[0] * shape[1], dtype).reshape(shape)
        arr[...] = rng.uniform(-1, 1, shape)
        return arr

    a = aligned((p.k, p.m) if p.trans_a else (p.m, p.k))
    b = aligned((p.n, p.k) if p.trans_b else (p.k, p.n))
    return a, b, aligned((p.m, p.n))


def _gemm_calls(p: Product, a: np.ndarray, b: np.ndarray, c: np.ndarray):
    """contender -> a call that writes op(a) @ op(b) into c, for each installed contender."""
    calls: dict[str, Callable[[], object] | None] = {
        "fastbp": lambda: ops.gemm(a, b, trans_a=p.trans_a, trans_b=p.trans_b, out=c),
        "numpy": lambda: np.matmul(a.T if p.trans_a else a, b.T if p.trans_b else b, out=c),
    }
    try:
        import torch
    except ImportError:
        calls["torch"] = None
    else:
        ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
        ta, tb = (ta.t() if p.trans_a else ta), (tb.t() if p.trans_b else tb)
        calls["torch"] = lambda: torch.mm(ta, tb, out=tc)
    return calls


def _reference(p: Product, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """op(a) @ op(b) in float64, and the bound on a correct result's distance from it: a sum of
    k products computed in a's precision errs by at most gamma_k = k u / (1 - k u) times the
    sum of its |terms| (u: the unit roundoff, 2^-24 for float32; Higham's bound for any
    summation order, FMA or not), and the float64 reference by gamma_k for u = 2^-53."""
    a64 = (a.T if p.trans_a else a).astype(np.float64)
    b64 = (b.T if p.trans_b else b).astype(np.float64)

    def gamma(dtype: type) -> float:
        u = float(np.finfo(dtype).eps) / 2
        return p.k * u / (1 - p.k * u)

    bound = (gamma(a.dtype.type) + gamma(np.float64)) * (np.abs(a64) @ np.abs(b64))
    return a64 @ b64, bound


def _check(p: Product, who: str, c: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> None:
    """c must lie within the bound of the float64 reference (see _reference)."""
    ref, bound = reference
    if not np.all(np.abs(c - ref) <= bound):
        raise RuntimeError(f"{who}'s GEMM for {p.name} ({p.shape}) is outside float rounding")


def _calls_per_round(call: Callable[[], object], round_seconds: float) -> int:
    """How many calls fill about round_seconds, from one timed call."""
    t0 = time.perf_counter()
    call()
    return max(1, round(round_seconds / max(time.perf_counter() - t0, 1e-7)))


def _mean_call(call: Callable[[], object], n: int) -> float:
    """Seconds per call over n calls back to back."""
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - t0) / n


def time_products(
    products: Sequence[Product],
    contenders: Sequence[str] = GEMM_CONTENDERS,
    rounds: int = 9,
    round_seconds: float = 2e-3,
    dtype: np.dtype | type = np.float32,
    seed: int = 0,
    settle: Callable[[], None] | None = None,
) -> ProductTimes:
    """Time each of ``products`` with the GEMM of each of ``contenders`` that is installed
    (the caller leaves out one it cannot hold to the thread count: NumPy's BLAS without
    threadpoolctl): ``rounds`` interleaved rounds (contenders in alternating order), each of
    as many back-to-back calls as fill about ``round_seconds``; a contender's time is the
    median over its rounds of the mean call.
    Operands are 64-byte aligned and reused, so they stay in cache: the products as fast as
    they run alone. Each contender's result is checked against a float64 reference first.

    ``settle`` (for more than one thread): called before each contender's rounds of a product,
    which then run back to back instead of interleaved, to let the thread pools of the library
    that ran last (NumPy's BLAS, for the reference too, and torch's spin after each call) go
    idle first: interleaved at two threads, each library's calls ran on cores the previous
    one's pool still spun on, 128 x 256 x 128 products taking milliseconds instead of 30 us."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    unknown = set(contenders) - set(GEMM_CONTENDERS)
    if unknown or not contenders:
        raise ValueError(f"contenders must be some of {GEMM_CONTENDERS}, got {contenders}")
    dt = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    seconds: dict[str, list[float] | None] = {c: [] for c in contenders}
    for p in products:
        a, b, c = _operands(p, dt, rng)
        calls = _gemm_calls(p, a, b, c)
        reference = _reference(p, a, b)
        live = {}
        for who in contenders:
            call = calls[who]
            if call is None:
                seconds[who] = None
                continue
            c[...] = np.nan
            call()  # also warms the operands and the library
            _check(p, who, c, reference)
            live[who] = (call, _calls_per_round(call, round_seconds))
        per_round: dict[str, list[float]] = {who: [] for who in live}
        order = list(live)
        if settle is None:
            for r in range(rounds):
                for who in order if r % 2 == 0 else order[::-1]:
                    per_round[who].append(_mean_call(*live[who]))
        else:
            for who in order:
                settle()
                call = live[who][0]
                n = _calls_per_round(call, round_seconds)  # not sized by a disturbed call
                per_round[who] += [_mean_call(call, n) for _ in range(rounds)]
        for who, times in per_round.items():
            seconds[who].append(statistics.median(times))
    return ProductTimes(list(products), seconds)
