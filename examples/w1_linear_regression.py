"""W1: linear regression by minibatch SGD recovers w = [2, -3.4] and b = 4.2.

1,000 samples X ~ N(0, 1) with 2 features, y = X w + b + N(0, 0.01²); one Linear(2, 1) with
w ~ N(0, 0.01²), b = 0; loss (ŷ - y)²/2 averaged over shuffled batches of 10; SGD lr 0.03; 3
epochs. ``fit``'s MSE is the mean of (ŷ - y)², twice W1's loss, so lr 0.015 is the same
algorithm. Run: ``python examples/w1_linear_regression.py [--epochs N] [--seed N]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

import fastbp

TRUE_W = np.array([2.0, -3.4])
TRUE_B = 4.2


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Run the example; returns the learned ``w``, ``b`` and the per-epoch losses."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="passes over the data (default: 3)")
    parser.add_argument("--samples", type=int, default=1000, help="data set size (default: 1000)")
    parser.add_argument(
        "--seed", type=int, default=0, help="data, init and batch order (default: 0)"
    )
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    X = rng.standard_normal((args.samples, 2))
    y = (X @ TRUE_W + TRUE_B + rng.normal(0, 0.01, args.samples)).reshape(-1, 1)

    model = fastbp.Sequential(fastbp.Linear(2, 1, dtype=np.float64))
    model[0].weight.data[...] = rng.normal(0, 0.01, (1, 2))
    model[0].bias.data[...] = 0.0
    opt = fastbp.optim.SGD(model.parameters(), lr=0.015)  # = lr 0.03 on (ŷ - y)²/2
    history = model.fit(
        X, y, loss="mse", optimizer=opt, epochs=args.epochs, batch_size=10, seed=args.seed
    )
    for epoch, loss in enumerate(history["loss"], 1):
        print(f"epoch {epoch}: loss (ŷ - y)²/2 = {loss / 2:.3e}")
    w = model[0].weight.data.reshape(-1).copy()
    b = float(model[0].bias.data[0])
    print(
        f"w = {w.round(4).tolist()} (true {TRUE_W.tolist()}), error {np.abs(w - TRUE_W).max():.1e}"
    )
    print(f"b = {b:.4f} (true {TRUE_B}), error {abs(b - TRUE_B):.1e}")
    return {"w": w, "b": b, "losses": [loss / 2 for loss in history["loss"]]}


if __name__ == "__main__":
    main()
