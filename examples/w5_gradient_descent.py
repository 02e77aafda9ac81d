"""W5: plain gradient descent with fastbp.optim on functions, not layers.

Minimises y = 2x² (gradient 4x) from a random integer start in [-1000, 1000) with SGD lr 1e-2
for 1,000 steps, then f(x, y, z) = x² + y² + z² (gradient 2v) the same way: the optimizer steps
any :class:`fastbp.Parameter` whose ``.grad`` you fill in. Each SGD step multiplies x by
(1 - 4 lr), so the result is compared with the closed form x₀ (1 - 4 lr)^steps.
Run: ``python examples/w5_gradient_descent.py [--steps N] [--optimizer sgd|adam]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

import fastbp


def main(argv: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Run the example; returns the starts and end points of both problems."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    parser.add_argument("--lr", type=float, default=1e-2, help="step size (default: 0.01)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--seed", type=int, default=0, help="picks the starts (default: 0)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    make = fastbp.optim.SGD if args.optimizer == "sgd" else fastbp.optim.Adam

    x0 = rng.integers(-1000, 1000, size=1).astype(np.float64)
    x = fastbp.Parameter(x0.copy())
    opt = make([x], lr=args.lr)
    for _ in range(args.steps):
        x.grad = 4 * x.data  # d(2x²)/dx
        opt.step()
    print(f"y = 2x²:            x {x0[0]:.0f} -> {x.data[0]:.6g} ({args.steps} steps)")

    v0 = rng.integers(-1000, 1000, size=3).astype(np.float64)
    v = fastbp.Parameter(v0.copy())
    opt = make([v], lr=args.lr)
    for _ in range(args.steps):
        v.grad = 2 * v.data  # ∇(x² + y² + z²)
        opt.step()
    print(f"f = x² + y² + z²:   {v0.tolist()} -> {np.array2string(v.data, precision=6)}")
    if args.optimizer == "sgd":
        print(
            f"closed forms x0 (1 - 4 lr)^n = {x0[0] * (1 - 4 * args.lr) ** args.steps:.6g}, "
            f"v0 (1 - 2 lr)^n = {np.array2string(v0 * (1 - 2 * args.lr) ** args.steps, precision=6)}"
        )
    return {"x0": x0, "x": x.data.copy(), "v0": v0, "v": v.data.copy()}


if __name__ == "__main__":
    main()
