"""Layers and models with torch's surface (``Sequential``, ``Linear``, ``state_dict`` keys).

A :class:`Sequential` owns one contiguous, 64-byte aligned buffer for all its parameters, one for
their gradients and one for non-trained state (BatchNorm's running statistics). Every
``Parameter.data``/``.grad`` is a view into them, so ``model[0].weight.data[...] = w`` writes the
model's weight in place, ``zero_grad`` is one memset and an optimizer step is one pass. The
model is compiled into a plan that C walks forward and backward (csrc/train.c): ``forward``,
``backward``, ``train_step`` and ``fit`` all run that one implementation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from ._random import default_generator

__all__ = [
    "MLP",
    "BatchNorm1d",
    "Dropout",
    "Identity",
    "Linear",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_ACTIVATION_CODES = {"identity": 0, "sigmoid": 1, "relu": 2, "tanh": 3}


def _check_dtype(dtype: object) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _aligned_zeros(n: int, dtype: np.dtype) -> np.ndarray:
    """A zeroed 1-D array whose data starts on a 64-byte boundary (cache lines, AVX-512 loads)."""
    raw = np.zeros(n * dtype.itemsize + 64, dtype=np.uint8)
    offset = (-raw.ctypes.data) % 64
    return raw[offset : offset + n * dtype.itemsize].view(dtype)


class Parameter:
    """A trainable array: ``data`` (the values) and ``grad`` (same shape, filled by backward).

    ``Parameter(np.array(...))`` wraps a user's own float array for the optimizers (the array
    is used in place, not copied, when it is a C-contiguous float32/float64 ndarray).
    """

    __slots__ = ("_grad", "data", "owner")

    def __init__(self, data: object) -> None:
        arr = data if isinstance(data, np.ndarray) else np.asarray(data, dtype=np.float64)
        if arr.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"Parameter data must be float32 or float64, got {arr.dtype}")
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        self.data: np.ndarray = arr
        self._grad: np.ndarray = np.zeros_like(arr)
        self.owner: Sequential | None = None

    @property
    def grad(self) -> np.ndarray:
        return self._grad

    @grad.setter
    def grad(self, value: object) -> None:
        arr = np.asarray(value, dtype=self.data.dtype)
        if arr.shape != self.data.shape:
            raise ValueError(f"grad must have shape {self.data.shape}, got {arr.shape}")
        self._grad[...] = arr  # stays a view into the model's gradient buffer

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def numel(self) -> int:
        """Number of elements."""
        return self.data.size

    def zero_grad(self) -> None:
        """Set the gradient to zero, in place."""
        self._grad.fill(0)

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        return self.data if dtype is None else self.data.astype(dtype)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


class Module:
    """Base class: train/eval mode, parameters, state_dict. Subclasses define the layer."""

    training: bool = True

    def parameters(self) -> Iterator[Parameter]:
        """The trainable Parameters, in torch's order."""
        for _, p in self.named_parameters():
            yield p

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """(name, Parameter) pairs with torch's names, e.g. ``'0.weight'``."""
        for name in self._param_names():
            p = getattr(self, name)
            if p is not None:
                yield prefix + name, p

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) pairs of non-trained state (BatchNorm's running statistics)."""
        return iter(())

    def _param_names(self) -> tuple[str, ...]:
        return ()

    def train(self, mode: bool = True) -> Module:
        """Training mode (dropout active, batch statistics); returns self."""
        self.training = bool(mode)
        return self

    def eval(self) -> Module:
        """Evaluation mode (dropout off, running statistics); returns self."""
        return self.train(False)

    def zero_grad(self) -> None:
        """Set every parameter's gradient to zero."""
        for p in self.parameters():
            p.zero_grad()

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters and buffers under torch's names."""
        out = {name: p.data.copy() for name, p in self.named_parameters()}
        out.update({name: np.array(b, copy=True) for name, b in self.named_buffers()})
        return out

    def __call__(self, x: object) -> np.ndarray:
        return self.forward(x)

    def forward(self, x: object) -> np.ndarray:
        """The layer's output for a (batch, features) input."""
        raise NotImplementedError

    def _spec(self) -> dict[str, object]:
        """The constructor arguments, for save/load."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        """The constructor arguments shown in ``repr``."""
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class Linear(Module):
    """``y = x @ weight.T + bias`` with weight ``(out_features, in_features)``.

    Initialised like torch: weight and bias uniform in ``±1/sqrt(in_features)``, drawn from
    ``rng`` (a ``numpy.random.Generator``) or fastbp's global generator (see
    :func:`fastbp.manual_seed`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: object = np.float32,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        dt = _check_dtype(dtype)
        gen = rng if rng is not None else default_generator()
        bound = 1.0 / math.sqrt(self.in_features)
        w = gen.uniform(-bound, bound, size=(self.out_features, self.in_features))
        self.weight = Parameter(w.astype(dt))
        self.bias = (
            Parameter(gen.uniform(-bound, bound, size=self.out_features).astype(dt))
            if bias
            else None
        )

    def _param_names(self) -> tuple[str, ...]:
        return ("weight", "bias")

    @property
    def dtype(self) -> np.dtype:
        return self.weight.data.dtype

    def forward(self, x: object) -> np.ndarray:
        from . import ops

        return ops.linear_forward(
            _input_matrix(x, self.dtype),
            self.weight.data,
            None if self.bias is None else self.bias.data,
        )

    def _spec(self) -> dict[str, object]:
        return {
            "type": "Linear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _Activation(Module):
    name = "identity"

    def forward(self, x: object) -> np.ndarray:
        from . import ops

        arr = _input_array(x)
        if self.name == "identity":
            return arr.copy()
        return ops._elementwise(arr, None, _ACTIVATION_CODES[self.name], self.name)

    def _spec(self) -> dict[str, object]:
        return {"type": type(self).__name__}


class Identity(_Activation):
    """Returns its input (a copy)."""

    name = "identity"


class Sigmoid(_Activation):
    """Logistic sigmoid, fused into the preceding Linear's GEMM epilogue inside a model."""

    name = "sigmoid"


class ReLU(_Activation):
    """max(x, 0), fused into the preceding Linear's GEMM epilogue inside a model."""

    name = "relu"


class Tanh(_Activation):
    """Hyperbolic tangent, fused into the preceding Linear's GEMM epilogue inside a model."""

    name = "tanh"


class Dropout(Module):
    """Zeroes each element with probability ``p`` in training and scales the rest by 1/(1-p).

    The identity in eval mode. Masks come from a counter-based generator seeded per model
    (``fit(seed=...)`` or :meth:`Sequential.seed`), so they do not depend on the thread count.
    """

    def __init__(self, p: float = 0.5) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: object) -> np.ndarray:
        if self.training and self.p > 0:
            raise RuntimeError(
                "a Dropout layer trains inside a fastbp.Sequential; alone it only runs in eval mode"
            )
        return _input_array(x).copy()

    def _spec(self) -> dict[str, object]:
        return {"type": "Dropout", "p": self.p}

    def extra_repr(self) -> str:
        return f"p={self.p}"


class BatchNorm1d(Module):
    """torch's BatchNorm1d on (batch, features): batch statistics in training (and running
    averages with ``momentum``), the running statistics in eval mode."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        dtype: object = np.float32,
    ) -> None:
        self.num_features = _positive_int(num_features, "num_features")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        dt = _check_dtype(dtype)
        self.eps, self.momentum, self.affine = float(eps), float(momentum), bool(affine)
        self.weight = Parameter(np.ones(self.num_features, dtype=dt)) if affine else None
        self.bias = Parameter(np.zeros(self.num_features, dtype=dt)) if affine else None
        self.running_mean = np.zeros(self.num_features, dtype=dt)
        self.running_var = np.ones(self.num_features, dtype=dt)
        self.num_batches_tracked = 0

    @property
    def dtype(self) -> np.dtype:
        return self.running_mean.dtype

    def _param_names(self) -> tuple[str, ...]:
        return ("weight", "bias")

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        yield prefix + "running_mean", self.running_mean
        yield prefix + "running_var", self.running_var
        yield prefix + "num_batches_tracked", np.array(self.num_batches_tracked, dtype=np.int64)

    def forward(self, x: object) -> np.ndarray:
        if self.training:
            raise RuntimeError(
                "a BatchNorm1d layer trains inside a fastbp.Sequential; alone it only runs in eval mode"
            )
        arr = _input_matrix(x, self.dtype)
        out = (arr - self.running_mean) / np.sqrt(self.running_var + self.eps)
        if self.affine:
            out = out * self.weight.data + self.bias.data
        return out.astype(self.dtype, copy=False)

    def _spec(self) -> dict[str, object]:
        return {
            "type": "BatchNorm1d",
            "num_features": self.num_features,
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
        }

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        )


def _input_array(x: object) -> np.ndarray:
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must have dtype float32 or float64, got {arr.dtype}")
    return arr


def _input_matrix(x: object, dtype: np.dtype, name: str = "x") -> np.ndarray:
    """A C-contiguous (batch, features) array of exactly `dtype` (torch-style: no casting)."""
    arr = x if isinstance(x, np.ndarray) else np.asarray(x, dtype=dtype)
    if arr.dtype != dtype:
        if arr.dtype in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} has dtype {arr.dtype} but the model is {dtype}; use {name}.astype(np.{dtype})"
            )
        raise TypeError(f"{name} must have dtype {dtype}, got {arr.dtype}")
    if arr.ndim != 2:
        hint = f"; for a single sample use {name}.reshape(1, -1)" if arr.ndim == 1 else ""
        raise ValueError(f"{name} must be 2-D (batch, features), got shape {arr.shape}{hint}")
    return np.ascontiguousarray(arr)


from ._model import MLP, Sequential  # noqa: E402  (Sequential builds on the layers above)
