"""W4: a GEMM-bound MLP, 784-1024-1024-10 ReLU, batch 256, SGD, one epoch.

A training step costs about 6 × batch × Σ(in × out) floating-point operations (forward 2, backward
4), so the achieved GFLOP/s says how close training runs to the machine's limit. As that limit
the example measures fastbp's own 1024³ float32 GEMM on the same threads. Data: Fashion-MNIST
when it is installed (``$FASHION_MNIST_DIR`` or Debian's ``dataset-fashion-mnist``), else, or
with ``--random``, random data of the same shape.
Run: ``python examples/w4_gemm_bound.py [--samples N] [--random] [--threads N]``.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence

import numpy as np

import fastbp
from fastbp import datasets, ops

SIZES = [784, 1024, 1024, 10]


def gemm_gflops(n: int = 1024, repeats: int = 3) -> float:
    """Best-of-``repeats`` rate of an n³ float32 GEMM (fastbp.ops.gemm), in GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = ops.gemm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        ops.gemm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the example; returns seconds, samples/s, GFLOP/s and the GEMM reference rate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=None, help="default: all 60,000")
    parser.add_argument("--random", action="store_true", help="random data, not Fashion-MNIST")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD step size (default: 0.01)")
    parser.add_argument("--threads", type=int, default=None, help="OpenMP threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.threads is not None:
        fastbp.set_num_threads(args.threads)
    source = "random"
    if not args.random:
        try:
            images, y = datasets.load_fashion_mnist(kind="train")
            X, source = datasets.scale_and_flatten(images[: args.samples]), "Fashion-MNIST"
            y = y[: args.samples]
        except FileNotFoundError:
            print("Fashion-MNIST is not installed: using random data of the same shape")
    if source == "random":
        rng = np.random.default_rng(args.seed)
        n = args.samples or 60_000
        X = rng.random((n, 784), dtype=np.float32)
        y = rng.integers(0, 10, n)

    model = fastbp.MLP(SIZES, seed=args.seed)
    opt = fastbp.optim.SGD(model.parameters(), lr=args.lr)
    history = model.fit(
        X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=256, seed=args.seed
    )
    seconds = history["time"][0]
    flops = 6 * len(X) * sum(a * b for a, b in itertools.pairwise(SIZES))
    gflops = flops / seconds / 1e9
    reference = gemm_gflops()
    print(
        f"one epoch of {len(X):,} {source} samples, MLP {'-'.join(map(str, SIZES))}, batch 256, "
        f"{fastbp.get_num_threads()} threads ({fastbp.get_config()['isa']}): {seconds:.2f} s, "
        f"{len(X) / seconds:,.0f} samples/s, loss {history['loss'][0]:.4f}"
    )
    print(
        f"{gflops:.1f} GFLOP/s of training ({flops / 1e9:.1f} GFLOP); a 1024^3 GEMM runs at "
        f"{reference:.1f} GFLOP/s here, so training reaches {gflops / reference:.0%} of it"
    )
    return {
        "seconds": seconds,
        "samples_per_sec": len(X) / seconds,
        "gflops": gflops,
        "gemm_gflops": reference,
        "loss": history["loss"][0],
    }


if __name__ == "__main__":
    main()
