"""Loss functions with torch's names: ``loss = loss_fn(output, target)`` returns a float and
``loss_fn.backward()`` returns dL/doutput for ``model.backward``."""

from __future__ import annotations

import numpy as np

from . import ops

__all__ = ["CrossEntropyLoss", "Loss", "MSELoss", "resolve_loss"]


class Loss:
    """Base class. ``kind`` is the code the C training loop uses for this loss."""

    kind: int = -1

    def __init__(self) -> None:
        self._grad: np.ndarray | None = None

    def backward(self) -> np.ndarray:
        """dL/doutput of the last call."""
        if self._grad is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward() called before the loss was computed"
            )
        return self._grad


class MSELoss(Loss):
    """Mean (or summed) squared error, like ``torch.nn.MSELoss``.

    The target must have the output's shape; a 1-D target is accepted for a one-column output.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self.kind = 0 if reduction == "mean" else 1

    def __call__(self, output: np.ndarray, target: np.ndarray) -> float:
        out = np.asarray(output)
        tgt = np.asarray(target)
        if out.ndim == 2 and out.shape[1] == 1 and tgt.ndim == 1 and tgt.shape[0] == out.shape[0]:
            tgt = tgt.reshape(-1, 1)
        if tgt.dtype != out.dtype and tgt.dtype.kind in "fiu":
            tgt = tgt.astype(out.dtype)
        loss, self._grad = ops.mse(out, tgt, self.reduction)
        return float(loss)

    def __repr__(self) -> str:
        return f"MSELoss(reduction={self.reduction!r})"


class CrossEntropyLoss(Loss):
    """Softmax + negative log-likelihood on integer class labels, mean over the batch
    (``torch.nn.CrossEntropyLoss()``)."""

    kind = 2

    def __call__(self, output: np.ndarray, target: np.ndarray) -> float:
        loss, self._grad = ops.softmax_cross_entropy(output, target)
        return float(loss)

    def __repr__(self) -> str:
        return "CrossEntropyLoss()"


def resolve_loss(loss: object) -> Loss:
    """A Loss object from a Loss or a name ('mse', 'mse_sum', 'cross_entropy')."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        make = _LOSS_NAMES.get(loss.lower())
        if make is not None:
            return make()
    raise ValueError(
        f"loss must be 'mse', 'mse_sum', 'cross_entropy' or a fastbp loss object, got {loss!r}"
    )


_LOSS_NAMES = {
    "mse": MSELoss,
    "mse_sum": lambda: MSELoss("sum"),
    "cross_entropy": CrossEntropyLoss,
    "crossentropy": CrossEntropyLoss,
}
