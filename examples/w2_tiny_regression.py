"""W2: a tiny 1-2-5-1 sigmoid MLP fits the line 2.3x + 4.7, one sample at a time.

x = linspace(0, 3, 100), target 2.3x + 4.7; Linear(1,2), Sigmoid, Linear(2,5), Sigmoid,
Linear(5,1); MSE; Adam lr 0.02; batch 1, samples in order, 200 epochs = 20,000 steps. Then the
model is saved, loaded back and used to predict, and the noisy samples (2.3x + 4.7 + N(0, 1)),
the true line and the prediction are plotted (needs matplotlib; skipped with a message if it is
missing). Run: ``python examples/w2_tiny_regression.py [--epochs N] [--model F] [--plot F]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import fastbp


def plot(x: np.ndarray, noisy: np.ndarray, pred: np.ndarray, path: Path) -> bool:
    """Samples, true line and prediction to ``path``; False (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install 'fastbp[plot]')")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(x, noisy, s=10, alpha=0.5, label="samples 2.3x + 4.7 + N(0, 1)")
    ax.plot(x, 2.3 * x + 4.7, color="black", label="true line 2.3x + 4.7")
    ax.plot(x, pred, color="C3", linestyle="--", label="fastbp 1-2-5-1 MLP")
    ax.set(xlabel="x", ylabel="y", title="W2: tiny MLP regression (20,000 Adam steps)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot written to {path}")
    return True


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Run the example; returns the losses, the predictions and the largest error."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs", type=int, default=200, help="passes of 100 steps (default: 200)"
    )
    parser.add_argument("--seed", type=int, default=0, help="initial weights (default: 0)")
    parser.add_argument(
        "--model", type=Path, default=Path("w2_model.safetensors"), help="saved model"
    )
    parser.add_argument("--plot", type=Path, default=Path("w2_regression.png"), help="the figure")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the figure")
    args = parser.parse_args(argv)

    x = np.linspace(0, 3, 100, dtype=np.float32).reshape(-1, 1)
    y = 2.3 * x + 4.7
    rng = np.random.default_rng(args.seed)
    model = fastbp.Sequential(
        fastbp.Linear(1, 2, rng=rng),
        fastbp.Sigmoid(),
        fastbp.Linear(2, 5, rng=rng),
        fastbp.Sigmoid(),
        fastbp.Linear(5, 1, rng=rng),
    )
    opt = fastbp.optim.Adam(model.parameters(), lr=0.02)
    t0 = time.perf_counter()
    history = model.fit(
        x, y, loss="mse", optimizer=opt, epochs=args.epochs, batch_size=1, shuffle=False
    )
    elapsed = time.perf_counter() - t0
    steps = args.epochs * len(x)
    if steps:
        print(
            f"{steps:,} Adam steps in {elapsed:.3f} s ({elapsed / steps * 1e6:.2f} µs/step), "
            f"final epoch loss {history['loss'][-1]:.4f}"
        )

    fastbp.save(model, args.model)
    loaded = fastbp.load(args.model)
    pred = loaded.predict(x)
    assert np.array_equal(pred, model.predict(x)), "the loaded model predicts differently"
    err = float(np.max(np.abs(pred - y)))
    print(f"saved to {args.model} and loaded back; max |prediction - line| = {err:.3f}")

    plotted = False
    if not args.no_plot:
        noisy = y + rng.standard_normal(y.shape).astype(np.float32)
        plotted = plot(x, noisy, pred, args.plot)
    return {"losses": history["loss"], "pred": pred, "max_error": err, "plotted": plotted}


if __name__ == "__main__":
    main()
