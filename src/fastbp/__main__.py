"""``python -m fastbp``: the configuration, then a quick check that the kernels work here."""

from __future__ import annotations

import time

import numpy as np

import fastbp
from fastbp import ops


def _gemm_gflops(n: int = 512, repeats: int = 5) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = ops.gemm(a, b)
    err = np.abs(out - a.astype(np.float64) @ b).max()
    if not err < 1e-3 * n**0.5:
        raise SystemExit(f"fastbp self-check failed: GEMM error {err:.3g}")
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        ops.gemm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def main() -> None:
    fastbp.show_config()
    print(
        f"{'self-check':>16}: GEMM 512^3 float32 correct, {_gemm_gflops():.1f} GFLOP/s (best of 5)"
    )


if __name__ == "__main__":
    main()
