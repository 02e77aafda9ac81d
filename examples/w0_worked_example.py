"""W0: the worked backpropagation example (a 2-2-2 sigmoid network, one SGD step), in float64.

Prints the output, loss, gradients and the parameters after one SGD step with lr 0.5; they match
WORKLOADS.md's table to 4 decimals. Run: ``python examples/w0_worked_example.py``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

import fastbp

X = np.array([[0.05, 0.10]])
TARGET = np.array([[0.01, 0.99]])
W1 = np.array([[0.15, 0.20], [0.25, 0.30]])
B1 = np.array([0.35, 0.35])
W2 = np.array([[0.40, 0.45], [0.50, 0.55]])
B2 = np.array([0.60, 0.60])


def main(argv: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Run the example; returns every printed number by name."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.5, help="SGD step size (default: 0.5)")
    args = parser.parse_args(argv)

    model = fastbp.Sequential(
        fastbp.Linear(2, 2, dtype=np.float64),
        fastbp.Sigmoid(),
        fastbp.Linear(2, 2, dtype=np.float64),
        fastbp.Sigmoid(),
    )
    for layer, w, b in ((model[0], W1, B1), (model[2], W2, B2)):
        layer.weight.data[...] = w  # parameters are views into one buffer: set in place
        layer.bias.data[...] = b
    opt = fastbp.optim.SGD(model.parameters(), lr=args.lr)

    out = model(X)
    loss = float(np.sum((out - TARGET) ** 2) / 2)  # dL/dout = out - t
    opt.zero_grad()
    model.backward(out - TARGET)
    result = {
        "output": out.copy(),
        "loss": np.array(loss),
        "grad_W1": model[0].weight.grad.copy(),
        "grad_W2": model[2].weight.grad.copy(),
    }
    opt.step()
    result.update({name: value.copy() for name, value in model.state_dict().items()})

    def fmt(a: np.ndarray) -> str:
        text = np.array2string(np.asarray(a), precision=4, floatmode="fixed", separator=", ")
        return " ".join(text.split())

    print(f"output    {fmt(result['output'])}")
    print(f"loss      {loss:.4f}")
    print(f"grad W1   {fmt(result['grad_W1'])}")
    print(f"grad W2   {fmt(result['grad_W2'])}")
    print(f"after one SGD step (lr {args.lr:g}):")
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        print(f"  {name:<9}{fmt(result[name])}")
    return result


if __name__ == "__main__":
    main()
