"""``python -m fastbp``: the configuration, a kernel self-check, and a small training run."""

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


def _demo_data(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Ten Gaussian clusters in 32 dimensions, labels 0-9: learnable, not trivial."""
    centers = rng.standard_normal((10, 32)) * 0.45
    y = rng.integers(0, 10, n)
    X = centers[y] + rng.standard_normal((n, 32))
    return X.astype(np.float32), y


def main() -> None:
    fastbp.show_config()
    print(
        f"{'self-check':>16}: GEMM 512^3 float32 correct, {_gemm_gflops():.1f} GFLOP/s (best of 5)"
    )
    rng = np.random.default_rng(0)
    X, y = _demo_data(24_000, rng)
    X_test, y_test = X[20_000:], y[20_000:]
    model = fastbp.MLP([32, 128, 64, 10], activation="relu", seed=0)
    print(
        f"\ntraining {model.num_parameters():,}-parameter MLP 32-128-64-10 (Adam 1e-3, batch 64):"
    )
    history = model.fit(
        X[:20_000],
        y[:20_000],
        loss="cross_entropy",
        epochs=5,
        batch_size=64,
        seed=0,
        validation_data=(X_test, y_test),
    )
    for epoch, (loss, acc, secs) in enumerate(
        zip(history["loss"], history["val_accuracy"], history["time"], strict=True)
    ):
        print(f"  epoch {epoch + 1}: loss {loss:.4f}  val accuracy {acc:.2%}  {secs * 1e3:.1f} ms")
    print(f"test accuracy: {model.evaluate(X_test, y_test)['accuracy']:.2%}")


if __name__ == "__main__":
    main()
