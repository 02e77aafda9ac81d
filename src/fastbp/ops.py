"""The kernels, checked: every argument is validated here before C runs.

Conventions follow torch: a linear layer's weight is ``(out_features, in_features)`` and
``linear_forward(x, w, b) = act(x @ w.T + b)``. float32 and float64 are supported; all array
arguments of one call share a dtype. Input arrays may have any strides (transposed,
Fortran-ordered, negatively strided, read-only); arrays fastbp writes into (``out=``, parameters,
optimizer state) must be writeable and C-contiguous. The GIL is released inside every kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from . import _core

__all__ = [
    "ACTIVATIONS",
    "activation_backward",
    "adam_step",
    "gemm",
    "linear_backward",
    "linear_forward",
    "mse",
    "relu",
    "sgd_step",
    "sigmoid",
    "softmax_cross_entropy",
    "tanh",
]

ACTIVATIONS = {"identity": 0, "sigmoid": 1, "relu": 2, "tanh": 3}
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# The activation arguments gemm's fast path takes as they are (anything else: the full check).
_PLAIN_ACTIVATIONS = {None: 0, **ACTIVATIONS}


# ---- validation helpers -------------------------------------------------------------------


def _activation_code(activation: str | None) -> int:
    if activation is None:
        return 0
    if not isinstance(activation, str) or activation.lower() not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation.lower()]


def _as_float_array(x: object, name: str, dtype: np.dtype | None = None) -> np.ndarray:
    """An ndarray view of x (array-likes are converted) with a float32/float64 dtype."""
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.dtype not in _DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {arr.dtype}")
    if dtype is not None and arr.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (like the other arrays), got {arr.dtype}")
    # Strides that are not whole elements (fields of record arrays) cannot be passed as element
    # strides: copy. A C-contiguous array never has them, so the common case skips the loop.
    if not arr.flags.c_contiguous and any(s % arr.itemsize for s in arr.strides):
        arr = np.ascontiguousarray(arr)
    return arr


def _matrix(x: object, name: str, dtype: np.dtype | None = None) -> np.ndarray:
    arr = _as_float_array(x, name, dtype)
    if arr.ndim != 2:
        hint = " (use x.reshape(1, -1) for a single sample)" if arr.ndim == 1 else ""
        raise ValueError(f"{name} must be 2-D, got shape {arr.shape}{hint}")
    return arr


def _contiguous(x: np.ndarray) -> np.ndarray:
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _check_out(
    out: object, shape: tuple[int, ...], dtype: np.dtype, name: str = "out"
) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {out.shape}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only; fastbp must write into it")
    return out


def _check_rows_out(out: object, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """An out= matrix: rows may be padded, but each row must be contiguous."""
    out = _check_out(out, shape, dtype)
    item = out.itemsize
    m, n = shape
    if m * n and (
        (n > 1 and out.strides[1] != item)
        or (m > 1 and (out.strides[0] < max(n, 1) * item or out.strides[0] % item))
    ):
        raise ValueError(
            f"out must have contiguous rows (strides ({max(n, 1) * item}+, {item})), "
            f"got strides {out.strides}; pass a C-contiguous array"
        )
    return out


def _check_no_overlap(out: np.ndarray, **inputs: np.ndarray | None) -> None:
    for name, arr in inputs.items():
        if arr is not None and np.may_share_memory(out, arr):
            raise ValueError(f"out must not overlap {name}")


def _scalar(value: object, name: str, *, low: float | None = None) -> float:
    if type(value) is float and math.isfinite(value) and (low is None or value >= low):
        return value  # the common case, checked without the isinstance chain
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _bias_vector(bias: object, n: int, dtype: np.dtype) -> np.ndarray | None:
    if bias is None:
        return None
    arr = _as_float_array(bias, "bias", dtype)
    if arr.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {arr.shape}")
    return _contiguous(arr)


# ---- GEMM and the linear layer --------------------------------------------------------------


def gemm(
    a: np.ndarray,
    b: np.ndarray,
    *,
    trans_a: bool = False,
    trans_b: bool = False,
    alpha: float = 1.0,
    beta: float = 0.0,
    out: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    activation: str | None = None,
) -> np.ndarray:
    """``out = act(alpha * op(a) @ op(b) + beta * out + bias)``, op = transpose if requested.

    ``bias`` (shape ``(n,)``) and ``activation`` are the fused epilogue, applied as each tile of
    ``out`` is stored. With ``beta != 0``, ``out`` must be given and is read. Returns ``out``.
    """
    # Plain arguments (ndarrays of one float dtype, Python-float scalars, an out that overlaps
    # nothing) are validated in C in one pass; anything the fast path declines is checked, and
    # explained when wrong, below. Both run the same kernel with the same strides.
    act = (
        _PLAIN_ACTIVATIONS.get(activation, -1)
        if activation is None or type(activation) is str
        else -1
    )
    if act >= 0:
        if out is not None:
            if _core.gemm_fast(out, a, b, bias, trans_a, trans_b, alpha, beta, act):
                return out
        elif (
            type(beta) is float
            and beta == 0
            and type(a) is np.ndarray
            and type(b) is np.ndarray
            and a.ndim == 2
            and b.ndim == 2
            and a.dtype in _DTYPES
        ):
            fresh = np.empty(
                (a.shape[1] if trans_a else a.shape[0], b.shape[0] if trans_b else b.shape[1]),
                dtype=a.dtype,
            )
            if _core.gemm_fast(fresh, a, b, bias, trans_a, trans_b, alpha, beta, act):
                return fresh
    a = _matrix(a, "a")
    b = _matrix(b, "b", a.dtype)
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    k2, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != k2:
        raise ValueError(
            f"gemm: inner dimensions differ: op(a) is {(m, k)} and op(b) is {(k2, n)} "
            f"(a.shape={a.shape}, trans_a={trans_a}; b.shape={b.shape}, trans_b={trans_b})"
        )
    alpha = _scalar(alpha, "alpha")
    beta = _scalar(beta, "beta")
    act = _activation_code(activation)
    bias_arr = _bias_vector(bias, n, a.dtype)
    if out is None:
        if beta != 0:
            raise ValueError("gemm: beta != 0 needs out= (the C it scales)")
        out = np.empty((m, n), dtype=a.dtype)
    else:
        out = _check_rows_out(out, (m, n), a.dtype)
        _check_no_overlap(out, a=a, b=b, bias=bias_arr)
    _core.gemm(out, a, b, bias_arr, bool(trans_a), bool(trans_b), alpha, beta, act)
    return out


def linear_forward(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    activation: str | None = "identity",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``act(x @ weight.T + bias)`` in one GEMM call; weight is ``(out_features, in_features)``."""
    x = _matrix(x, "x")
    weight = _matrix(weight, "weight", x.dtype)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_forward: x has {x.shape[1]} features but weight expects "
            f"{weight.shape[1]} (x.shape={x.shape}, weight.shape={weight.shape})"
        )
    return gemm(x, weight, trans_b=True, bias=bias, activation=activation, out=out)


def activation_backward(
    grad_output: np.ndarray,
    output: np.ndarray | None,
    activation: str | None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``dz = grad_output * act'(output)`` and its column sums (the bias gradient).

    ``output`` is what the activation returned in the forward pass (sigmoid' = y(1-y),
    tanh' = 1-y², relu' = y > 0); it may be None for the identity. ``out`` may be
    ``grad_output`` itself to update in place. Returns ``(dz, dbias)``.
    """
    act = _activation_code(activation)
    dy = _matrix(grad_output, "grad_output")
    y = None
    if act != 0:
        if output is None:
            raise ValueError(f"activation_backward: {activation!r} needs the forward output")
        y = _matrix(output, "output", dy.dtype)
        if y.shape != dy.shape:
            raise ValueError(f"output must have the shape of grad_output {dy.shape}, got {y.shape}")
        y = _contiguous(y)
    if out is None:
        out = np.empty(dy.shape, dtype=dy.dtype)
    else:
        out = _check_out(out, dy.shape, dy.dtype)
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        exact_alias = out.ctypes.data == dy.ctypes.data and out.strides == dy.strides
        if not exact_alias:  # in place (out = grad_output) is fine; a shifted overlap is not
            _check_no_overlap(out, grad_output=dy)
        _check_no_overlap(out, output=y)
    dy = _contiguous(dy)
    dbias = np.empty(dy.shape[1], dtype=dy.dtype)
    _core.activation_backward(out, dbias, dy, y, act)
    return out, dbias


def linear_backward(
    grad_output: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray,
    output: np.ndarray | None = None,
    activation: str | None = "identity",
    *,
    need_input_grad: bool = True,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Backward of ``y = act(x @ weight.T + b)``: returns ``(dx, dweight, dbias)``.

    ``output`` is the forward result ``y`` (needed unless the activation is the identity).
    ``dx`` is None when ``need_input_grad`` is False (the first layer needs none).
    """
    x = _matrix(x, "x")
    weight = _matrix(weight, "weight", x.dtype)
    dy = _matrix(grad_output, "grad_output", x.dtype)
    batch, out_features = dy.shape
    if x.shape[0] != batch or weight.shape != (out_features, x.shape[1]):
        raise ValueError(
            "linear_backward: shapes disagree: grad_output "
            f"{dy.shape}, x {x.shape}, weight {weight.shape} (expected weight "
            f"({out_features}, {x.shape[1]}) and x with {batch} rows)"
        )
    dz, dbias = activation_backward(dy, output, activation)
    dweight = gemm(dz, x, trans_a=True)
    dx = gemm(dz, weight) if need_input_grad else None
    return dx, dweight, dbias


# ---- activations ----------------------------------------------------------------------------


def _elementwise(x: object, out: np.ndarray | None, code: int, name: str) -> np.ndarray:
    arr = _contiguous(_as_float_array(x, "x"))
    if out is None:
        out = np.empty(arr.shape, dtype=arr.dtype)
    else:
        out = _check_out(out, arr.shape, arr.dtype)
        if not out.flags.c_contiguous:
            raise ValueError(f"{name}: out must be C-contiguous")
        if out is not x and np.may_share_memory(out, arr) and out.ctypes.data != arr.ctypes.data:
            raise ValueError(f"{name}: out partially overlaps x")
    _core.activation_forward(out.reshape(-1), arr.reshape(-1), code)
    return out


def sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Logistic sigmoid, accurate to a few ulp over the whole float range (``out=x`` ok)."""
    return _elementwise(x, out, ACTIVATIONS["sigmoid"], "sigmoid")


def relu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """max(x, 0); NaN stays NaN, as in torch (``out=x`` ok)."""
    return _elementwise(x, out, ACTIVATIONS["relu"], "relu")


def tanh(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Hyperbolic tangent, accurate to a few ulp (``out=x`` ok)."""
    return _elementwise(x, out, ACTIVATIONS["tanh"], "tanh")


# ---- losses -----------------------------------------------------------------------------------


def _labels(labels: object, rows: int, classes: int) -> np.ndarray:
    arr = labels if isinstance(labels, np.ndarray) else np.asarray(labels)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labels must be an integer array, got dtype {arr.dtype}")
    if arr.shape != (rows,):
        raise ValueError(
            f"labels must have shape ({rows},) (one per row of logits), got {arr.shape}"
        )
    if rows:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"labels must lie in [0, {classes}), found {bad}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy over the batch and its gradient w.r.t. the logits.

    Equals ``torch.nn.functional.cross_entropy(logits, labels)``; stable for any finite logits.
    Returns ``(loss, dlogits)``.
    """
    x = _contiguous(_matrix(logits, "logits"))
    rows, classes = x.shape
    if rows == 0 or classes == 0:
        raise ValueError(f"softmax_cross_entropy needs a non-empty batch, got logits {x.shape}")
    y = _labels(labels, rows, classes)
    dlogits = np.empty_like(x)
    loss = _core.softmax_xent(dlogits, x, y, 1.0 / rows)
    return loss, dlogits


def mse(pred: np.ndarray, target: np.ndarray, reduction: str = "mean") -> tuple[float, np.ndarray]:
    """Mean (or summed) squared error and its gradient w.r.t. ``pred``; torch's MSELoss.

    Returns ``(loss, dpred)``.
    """
    p = _contiguous(_as_float_array(pred, "pred"))
    t = _contiguous(_as_float_array(target, "target", p.dtype))
    if p.shape != t.shape:
        raise ValueError(f"mse: pred {p.shape} and target {t.shape} must have the same shape")
    if p.size == 0:
        raise ValueError("mse needs at least one element")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    scale = 1.0 / p.size if reduction == "mean" else 1.0
    dpred = np.empty_like(p)
    loss = _core.mse(dpred.reshape(-1), p.reshape(-1), t.reshape(-1), scale)
    return loss, dpred


# ---- optimizer updates --------------------------------------------------------------------


def _state(arr: object, name: str, like: np.ndarray) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(arr).__name__}")
    if arr.dtype != like.dtype:
        raise TypeError(f"{name} must have dtype {like.dtype}, got {arr.dtype}")
    if arr.shape != like.shape:
        raise ValueError(f"{name} must have shape {like.shape}, got {arr.shape}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return arr


def _param(param: object) -> np.ndarray:
    p = _as_float_array(param, "param")
    if not isinstance(param, np.ndarray):
        raise TypeError("param must be a numpy.ndarray (it is updated in place)")
    if not p.flags.c_contiguous:
        raise ValueError("param must be C-contiguous (it is updated in place)")
    if not p.flags.writeable:
        raise ValueError("param is read-only; the optimizer must write into it")
    return p


def sgd_step(
    param: np.ndarray,
    grad: np.ndarray,
    momentum_buffer: np.ndarray | None = None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    first_step: bool = False,
) -> None:
    """One ``torch.optim.SGD`` update of ``param`` in place.

    With momentum, ``momentum_buffer`` (same shape) carries the velocity; ``first_step=True``
    initialises it with the gradient, as torch does on its first step.
    """
    p = _param(param)
    g = _contiguous(_as_float_array(grad, "grad", p.dtype))
    if g.shape != p.shape:
        raise ValueError(f"grad must have the shape of param {p.shape}, got {g.shape}")
    lr = _scalar(lr, "lr", low=0.0)
    momentum = _scalar(momentum, "momentum", low=0.0)
    dampening = _scalar(dampening, "dampening")
    weight_decay = _scalar(weight_decay, "weight_decay", low=0.0)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov momentum requires momentum > 0 and dampening == 0")
    buf = None
    if momentum != 0:
        if momentum_buffer is None:
            raise ValueError("momentum != 0 needs a momentum_buffer of the param's shape")
        buf = _state(momentum_buffer, "momentum_buffer", p).reshape(-1)
        if not buf.flags.writeable:
            raise ValueError("momentum_buffer is read-only")
    _core.sgd_step(
        p.reshape(-1),
        buf,
        g.reshape(-1),
        lr,
        momentum,
        dampening,
        weight_decay,
        bool(nesterov),
        bool(first_step),
    )


def adam_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float = 1e-3,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
) -> None:
    """One ``torch.optim.Adam`` (or, with ``decoupled_weight_decay``, AdamW) update in place.

    ``step`` counts from 1 and sets the bias corrections; ``exp_avg``/``exp_avg_sq`` are the
    moment buffers (same shape as param, start at zero).
    """
    p = _param(param)
    g = _contiguous(_as_float_array(grad, "grad", p.dtype))
    if g.shape != p.shape:
        raise ValueError(f"grad must have the shape of param {p.shape}, got {g.shape}")
    m = _state(exp_avg, "exp_avg", p)
    v = _state(exp_avg_sq, "exp_avg_sq", p)
    for arr, name in ((m, "exp_avg"), (v, "exp_avg_sq")):
        if not arr.flags.writeable:
            raise ValueError(f"{name} is read-only")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    lr = _scalar(lr, "lr", low=0.0)
    beta1, beta2 = (_scalar(b, f"betas[{i}]", low=0.0) for i, b in enumerate(betas))
    if beta1 >= 1 or beta2 >= 1:
        raise ValueError(f"betas must lie in [0, 1), got {(beta1, beta2)}")
    eps = _scalar(eps, "eps", low=0.0)
    weight_decay = _scalar(weight_decay, "weight_decay", low=0.0)
    _core.adam_step(
        p.reshape(-1),
        m.reshape(-1),
        v.reshape(-1),
        g.reshape(-1),
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        bool(decoupled_weight_decay),
        int(step),
    )
