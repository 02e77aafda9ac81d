"""Sequential models: the flat buffers, the C plan, and the training entry points."""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from . import _core
from ._random import default_generator, derive_seed, fresh_seed
from .losses import CrossEntropyLoss, Loss, resolve_loss
from .nn import (
    _ACTIVATION_CODES,
    BatchNorm1d,
    Dropout,
    Identity,
    Linear,
    Module,
    Parameter,
    ReLU,
    Sigmoid,
    Tanh,
    _Activation,
    _aligned_zeros,
    _check_dtype,
    _input_matrix,
    _positive_int,
)
from .profiling import OpProfile, Profile

__all__ = ["MLP", "History", "Sequential"]

_SUPPORTED_LAYERS = (Linear, _Activation, Dropout, BatchNorm1d)

_OP_LINEAR, _OP_ACTIVATION, _OP_DROPOUT, _OP_BATCHNORM = 0, 1, 2, 3
# Target chunks of C work between returns to Python (progress, Ctrl-C): long enough that the
# call overhead vanishes, short enough that an interrupt is handled within a batch or so.
_CHUNK_SECONDS = 0.02
# fit checks X for NaN/inf as its first epoch reads each batch (the first Linear's product
# checks the values it loads anyway: fbp_gemm_check_a), instead of in a pass of its own up
# front, when X is at least this large and this many times the state it would have to restore
# on a bad row (_FitUndo). The pass read all of X from memory for nothing the step reused
# (Fashion-MNIST's 188 MB: 12 ms at one thread, 7 at two, 3% of a W3 epoch); the undo's copy
# runs at about the same bytes per second on one thread (15 MB: 1.1 ms), so at 8x it costs at
# most a quarter of the pass it saves (W4 with SGD copies 15 MB, with Adam 30: scanned).
_DEFER_CHECK_MIN_BYTES = 4 << 20
_DEFER_CHECK_STATE_RATIO = 8


# fit's losses named by a string: one instance per name, built once (fit reads only a loss's
# kind and type, and never hands it out; an instance per call cost ~1 us of each fit)
_NAMED_LOSSES: dict[str, Loss] = {}


def _fit_loss(loss: object) -> Loss:
    if type(loss) is str:
        named = _NAMED_LOSSES.get(loss)
        if named is None:
            named = _NAMED_LOSSES[loss] = resolve_loss(loss)
        return named
    return resolve_loss(loss)


def _contiguous(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``np.ascontiguousarray(arr, dtype=dtype)``, without the call when arr already is that:
    a plain C-contiguous ndarray of dtype (the common case, ~1 us of a tiny network's fit)."""
    if type(arr) is np.ndarray and arr.dtype == dtype and arr.flags.c_contiguous:
        return arr
    return np.ascontiguousarray(arr, dtype=dtype)


def _all_finite(arr: np.ndarray) -> bool:
    """No NaN or infinity in arr: one read-only pass in C for C-contiguous float32/float64 arrays
    (numpy's ``isfinite(arr).all()`` allocates an array-sized bool temporary), numpy otherwise."""
    ok = _core.all_finite(arr)
    if ok is not None:
        return ok
    if arr.dtype.kind in "iub":
        return True
    return bool(np.isfinite(arr).all())


class _ExclusiveLock:
    """``with``: a non-blocking acquire of a model's re-entrant lock, RuntimeError when another
    thread holds it (a class: a generator context manager cost ~0.7 us of every fit)."""

    __slots__ = ("_lock",)

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                "this model is already running a call in another thread; use one model per thread"
            )

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class History:
    """What :meth:`Sequential.fit` returns: per-epoch metrics in ``history`` (a dict of lists:
    loss, val_loss, val_accuracy, time, samples_per_sec, lr)."""

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []

    def _append(self, epoch: int, logs: Mapping[str, float]) -> None:
        self.epoch.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)

    def _extend_trained(
        self, first: int, loss_sums: list[float], seconds: list[float], rows: int, lr: float
    ) -> None:
        """Epochs first, first + 1, ... of a fit's in-C loop (every row trained, no batch
        skipped, one learning rate): the entries _append(e, _epoch_logs(...)) would add, a list
        at a time, in plain floats (per epoch, the dicts and numpy scalars cost ~2 us of a tiny
        network's ~15 us epoch, several times that with cold caches)."""
        self.epoch.extend(range(first, first + len(seconds)))
        h = self.history
        h.setdefault("loss", []).extend([s / rows for s in loss_sums])
        h.setdefault("time", []).extend(seconds)
        h.setdefault("samples_per_sec", []).extend(
            [rows / t if t > 0 else float("inf") for t in seconds]
        )
        h.setdefault("lr", []).extend([lr] * len(seconds))

    def __getitem__(self, key: str) -> list[float]:
        return self.history[key]

    def __repr__(self) -> str:
        return f"History(epochs={len(self.epoch)}, keys={sorted(self.history)})"


class Sequential(Module):
    """Layers applied in order, trained as one C plan over one flat parameter buffer.

    ``model[i]`` is the i-th layer; ``state_dict()`` keys follow torch's ``nn.Sequential``
    (``"0.weight"``, ``"0.bias"``, ...). All layers share one dtype (float32 or float64). A layer
    belongs to at most one model, since its parameters become views into the model's buffer.
    """

    def __init__(self, *layers: Module, seed: int | None = None) -> None:
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        for i, layer in enumerate(layers):
            if isinstance(layer, Sequential):
                raise TypeError(
                    f"layer {i}: nested Sequential models are not supported; pass the layers"
                )
            if not isinstance(layer, _SUPPORTED_LAYERS):
                raise TypeError(
                    f"layer {i}: unsupported layer type {type(layer).__name__}; fastbp models are "
                    "built from Linear, Sigmoid, ReLU, Tanh, Identity, Dropout and BatchNorm1d"
                )
        self._layers: list[Module] = list(layers)
        self.dtype = self._common_dtype()
        self.in_features, self.out_features = self._check_widths()
        self._build_buffers()
        try:
            self._ops, self._bn_ops, self._op_layers = self._build_ops()
            self._plan = _core.Plan(
                self._ops, self.dtype == np.float64, self._params, self._grads, self._buffers
            )
        except BaseException:
            for p in self.parameters():  # a failed model must not keep its layers
                p.owner = None
            raise
        # Dropout masks: from `seed`, else one draw from fastbp's global generator.
        self.seed(seed if seed is not None else int(default_generator().integers(2**63)))
        self._lock = threading.RLock()
        self._profiling = False
        self._finite_arrays: tuple[np.ndarray, ...] = ()
        self._exclusive_lock = _ExclusiveLock(self._lock)
        # multiply-adds of one row through the Linear layers (fit's first chunk size)
        self._macs_per_row = sum(
            layer.in_features * layer.out_features
            for layer in self._layers
            if isinstance(layer, Linear)
        )
        self._fit_optimizer = None
        self._last_batch: int | None = None
        self.training = True

    # ---- construction ----------------------------------------------------------------------

    def _common_dtype(self) -> np.dtype:
        dtypes = {layer.dtype for layer in self._layers if hasattr(layer, "dtype")}
        if len(dtypes) > 1:
            raise TypeError(
                f"all layers of a model must share one dtype, got {sorted(str(d) for d in dtypes)}"
            )
        return dtypes.pop() if dtypes else np.dtype(np.float32)

    def _check_widths(self) -> tuple[int, int]:
        sized = [
            (i, layer)
            for i, layer in enumerate(self._layers)
            if isinstance(layer, (Linear, BatchNorm1d))
        ]
        if not sized:
            raise ValueError(
                "Sequential needs at least one Linear or BatchNorm1d layer to know its widths"
            )
        first = sized[0][1]
        width = first.in_features if isinstance(first, Linear) else first.num_features
        in_features = width
        for i, layer in enumerate(self._layers):
            if isinstance(layer, Linear):
                if layer.in_features != width:
                    raise ValueError(
                        f"layer {i} (Linear) expects {layer.in_features} features but receives {width}"
                    )
                width = layer.out_features
            elif isinstance(layer, BatchNorm1d) and layer.num_features != width:
                raise ValueError(
                    f"layer {i} (BatchNorm1d) expects {layer.num_features} features but receives {width}"
                )
        return in_features, width

    def _build_buffers(self) -> None:
        named = list(self.named_parameters())
        for name, p in named:
            if p.owner is not None:
                raise ValueError(
                    f"parameter {name} already belongs to another model; create new layers"
                )
        total = sum(p.data.size for _, p in named)
        self._params = _aligned_zeros(max(total, 1), self.dtype)
        self._grads = _aligned_zeros(max(total, 1), self.dtype)
        self._param_slices: dict[str, slice] = {}
        offset = 0
        for name, p in named:
            n = p.data.size
            view = self._params[offset : offset + n].reshape(p.data.shape)
            view[...] = p.data
            p.data = view
            p._grad = self._grads[offset : offset + n].reshape(view.shape)
            p.owner = self
            self._param_slices[name] = slice(offset, offset + n)
            offset += n
        n_buffers = sum(
            2 * layer.num_features for layer in self._layers if isinstance(layer, BatchNorm1d)
        )
        self._buffers = _aligned_zeros(max(n_buffers, 1), self.dtype)
        offset = 0
        for layer in self._layers:
            if isinstance(layer, BatchNorm1d):
                n = layer.num_features
                self._buffers[offset : offset + n] = layer.running_mean
                self._buffers[offset + n : offset + 2 * n] = layer.running_var
                layer.running_mean = self._buffers[offset : offset + n]
                layer.running_var = self._buffers[offset + n : offset + 2 * n]
                layer._buffer_offset = offset
                offset += 2 * n

    def _offset(self, p: Parameter | None) -> int:
        if p is None:
            return -1
        return (p.data.ctypes.data - self._params.ctypes.data) // self.dtype.itemsize

    def _build_ops(self) -> tuple[list[tuple], dict[int, int], list[tuple[int, ...]]]:
        """The plan: each Linear absorbs the activation right after it (fused epilogue). Also
        returns, per op, the indices of the layers it runs."""
        ops: list[tuple] = []
        bn_ops: dict[int, int] = {}
        op_layers: list[tuple[int, ...]] = []
        width = self.in_features
        i = 0
        while i < len(self._layers):
            layer = self._layers[i]
            first = i
            n_ops = len(ops)
            if isinstance(layer, Linear):
                act = 0
                nxt = self._layers[i + 1] if i + 1 < len(self._layers) else None
                if isinstance(nxt, _Activation):
                    act = _ACTIVATION_CODES[nxt.name]
                    i += 1
                ops.append(
                    (
                        _OP_LINEAR,
                        act,
                        layer.in_features,
                        layer.out_features,
                        self._offset(layer.weight),
                        self._offset(layer.bias),
                        -1,
                        0.0,
                        0.0,
                    )
                )
                width = layer.out_features
            elif isinstance(layer, _Activation):
                if layer.name != "identity":
                    ops.append(
                        (
                            _OP_ACTIVATION,
                            _ACTIVATION_CODES[layer.name],
                            width,
                            width,
                            -1,
                            -1,
                            -1,
                            0.0,
                            0.0,
                        )
                    )
            elif isinstance(layer, Dropout):
                if layer.p > 0:
                    ops.append((_OP_DROPOUT, 0, width, width, -1, -1, -1, layer.p, 0.0))
            elif isinstance(layer, BatchNorm1d):
                bn_ops[i] = len(ops)
                ops.append(
                    (
                        _OP_BATCHNORM,
                        0,
                        width,
                        width,
                        self._offset(layer.weight),
                        self._offset(layer.bias),
                        layer._buffer_offset,
                        layer.eps,
                        layer.momentum,
                    )
                )
            else:
                raise TypeError(f"layer {i}: unsupported layer type {type(layer).__name__}")
            if len(ops) > n_ops:
                op_layers.append(tuple(range(first, i + 1)))
            i += 1
        if not ops:  # only identities: keep a plan op so the model still runs
            ops.append((_OP_ACTIVATION, 0, width, width, -1, -1, -1, 0.0, 0.0))
            op_layers.append(tuple(range(len(self._layers))))
        return ops, bn_ops, op_layers

    # ---- the Module surface ------------------------------------------------------------------

    def __getitem__(self, index: int) -> Module:
        return self._layers[index]

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._layers)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for i, layer in enumerate(self._layers):
            yield from layer.named_parameters(f"{prefix}{i}.")

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        for i, layer in enumerate(self._layers):
            if isinstance(layer, BatchNorm1d):
                layer.num_batches_tracked = self._plan.batchnorm_batches(self._bn_ops[i])
            yield from layer.named_buffers(f"{prefix}{i}.")

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of parameters and buffers under torch's keys, in torch's order (layer by
        layer: weight, bias, then BatchNorm's running_mean, running_var, num_batches_tracked)."""
        out: dict[str, np.ndarray] = {}
        for i, layer in enumerate(self._layers):
            if isinstance(layer, BatchNorm1d):
                layer.num_batches_tracked = self._plan.batchnorm_batches(self._bn_ops[i])
            for name, p in layer.named_parameters(f"{i}."):
                out[name] = p.data.copy()
            for name, b in layer.named_buffers(f"{i}."):
                out[name] = np.array(b, copy=True)
        return out

    def train(self, mode: bool = True) -> Sequential:
        mode = bool(mode)
        self.training = mode
        for layer in self._layers:
            if layer.training is not mode:  # train_step calls this every step
                layer.train(mode)
        return self

    def zero_grad(self) -> None:
        """Set all gradients to zero: one memset of the flat gradient buffer."""
        self._grads.fill(0)

    def num_parameters(self) -> int:
        """Total number of trainable values."""
        return sum(p.data.size for p in self.parameters())

    def load_state_dict(self, state_dict: Mapping[str, object], strict: bool = True) -> None:
        """Copy values (NumPy arrays or torch tensors) into the model's buffers, by torch key.

        Checks every key and shape before writing anything, so a failed load changes nothing.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict must be a mapping of name -> array, got {type(state_dict).__name__}"
            )
        targets: dict[str, np.ndarray] = {name: p.data for name, p in self.named_parameters()}
        for i, layer in enumerate(self._layers):
            if isinstance(layer, BatchNorm1d):
                targets[f"{i}.running_mean"] = layer.running_mean
                targets[f"{i}.running_var"] = layer.running_var
        counters = {f"{i}.num_batches_tracked": op for i, op in self._bn_ops.items()}
        known = set(targets) | set(counters)
        missing = sorted(known - set(state_dict))
        unexpected = sorted(set(state_dict) - known)
        if strict and (missing or unexpected):
            raise ValueError(
                f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}"
            )
        staged: list[tuple[np.ndarray, np.ndarray]] = []
        for name, target in targets.items():
            if name not in state_dict:
                continue
            value = _to_numpy(state_dict[name], name)
            if value.shape != target.shape:
                raise ValueError(
                    f"load_state_dict: {name} has shape {value.shape}, the model expects {target.shape}"
                )
            if value.dtype.kind not in "fiu":
                raise TypeError(
                    f"load_state_dict: {name} must be a real array, got dtype {value.dtype}"
                )
            staged.append((target, value))
        staged_counters = []
        for name, op in counters.items():
            if name in state_dict:
                value = _to_numpy(state_dict[name], name)
                if value.size != 1 or value.dtype.kind not in "iu":
                    raise ValueError(f"load_state_dict: {name} must be one integer")
                staged_counters.append((op, int(value.reshape(-1)[0])))
        for target, value in staged:
            target[...] = value
        for op, count in staged_counters:
            self._plan.set_batchnorm_batches(op, count)

    def seed(self, seed: int) -> None:
        """Seed the dropout masks of this model (fit(seed=...) does this too)."""
        self._plan.set_seed(int(seed) % 2**64)

    @contextlib.contextmanager
    def profile(self) -> Iterator[Profile]:
        """Time the model's C plan, op by op, while the ``with`` block runs::

            with model.profile() as prof:
                model.fit(X, y, epochs=1)
            print(prof)  # microseconds per pass of each op's forward and backward

        The :class:`~fastbp.profiling.Profile` is filled in when the block ends (also when it
        raises). Each op reads the clock once or twice per pass (~20 ns a read); no result
        changes. Profiles do not nest on one model.
        """
        with self._exclusive():
            if self._profiling:
                raise RuntimeError("this model is already being profiled")
            self._profiling = True
            self._plan.set_profiling(True)
        prof = Profile()
        try:
            yield prof
        finally:
            with self._exclusive():
                seconds = np.zeros((len(self._ops), 3), dtype=np.float64)
                totals = self._plan.read_profile(seconds)
                self._plan.set_profiling(False)
                self._profiling = False
            ops = []
            for layers, (fwd, dx, dw) in zip(self._op_layers, seconds.tolist(), strict=True):
                name = " + ".join(_layer_label(self._layers[i]) for i in layers)
                ops.append(OpProfile(layers, name, fwd, dx, dw))
            prof._fill(tuple(ops), totals)

    def extra_repr(self) -> str:
        return (
            "\n" + "\n".join(f"  ({i}): {layer!r}" for i, layer in enumerate(self._layers)) + "\n"
        )

    def _spec(self) -> dict[str, object]:
        return {
            "type": "Sequential",
            "dtype": str(self.dtype),
            "layers": [layer._spec() for layer in self._layers],
        }

    def _exclusive(self) -> _ExclusiveLock:
        """One call at a time per model: the plan's workspace holds one batch's activations, so
        concurrent calls would mix them. Another thread is refused, not queued; the same thread
        may re-enter (a fit callback may call predict between batches)."""
        return self._exclusive_lock

    # ---- step API ------------------------------------------------------------------------------

    def _check_input(self, x: object, name: str = "x") -> np.ndarray:
        arr = _input_matrix(x, self.dtype, name)
        if arr.shape[1] != self.in_features:
            raise ValueError(
                f"{name} has {arr.shape[1]} features, the model expects {self.in_features}"
            )
        if arr.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (0 rows)")
        return arr

    def _check_batchnorm_batch(self, rows: int, training: bool) -> None:
        if training and self._bn_ops and rows < 2:
            raise ValueError(
                "BatchNorm1d needs more than 1 sample per batch in training mode; "
                "use a larger batch or call model.eval()"
            )

    def forward(self, x: object) -> np.ndarray:
        """Run the model on x (batch, in_features); in training mode keep what backward needs."""
        arr = self._check_input(x)
        self._check_batchnorm_batch(arr.shape[0], self.training)
        out = np.empty((arr.shape[0], self.out_features), dtype=self.dtype)
        with self._exclusive():
            self._plan.forward(arr, out, self.training)
        self._last_batch = arr.shape[0] if self.training else None
        return out

    def backward(self, grad_output: object) -> np.ndarray:
        """Accumulate parameter gradients from dL/doutput of the last forward; return dL/dx."""
        if self._last_batch is None:
            raise RuntimeError(
                "backward() needs a forward() in training mode first (model.train())"
            )
        dy = _input_matrix(grad_output, self.dtype, "grad_output")
        if dy.shape != (self._last_batch, self.out_features):
            raise ValueError(
                f"grad_output must have shape {(self._last_batch, self.out_features)} "
                f"(the last forward's output), got {dy.shape}"
            )
        dx = np.empty((self._last_batch, self.in_features), dtype=self.dtype)
        with self._exclusive():
            self._plan.backward(dy, dx)
        return dx

    def _loss_target(self, loss: Loss, y: object, rows: int, name: str = "y") -> np.ndarray:
        if isinstance(loss, CrossEntropyLoss):
            labels = y if isinstance(y, np.ndarray) else np.asarray(y)
            if labels.dtype == np.bool_ or labels.dtype.kind not in "iu":
                raise TypeError(
                    f"{name} must hold integer class labels for cross-entropy, got dtype {labels.dtype}"
                )
            if labels.shape != (rows,):
                raise ValueError(f"{name} must have shape ({rows},), got {labels.shape}")
            if rows and (labels.min() < 0 or labels.max() >= self.out_features):
                bad = labels.min() if labels.min() < 0 else labels.max()
                raise ValueError(f"{name} labels must lie in [0, {self.out_features}), found {bad}")
            return np.ascontiguousarray(labels, dtype=np.int64)
        arr = y if isinstance(y, np.ndarray) else np.asarray(y)
        if arr.dtype.kind not in "fiu":  # bool is kind "b"
            raise TypeError(f"{name} must be a real array for MSE, got dtype {arr.dtype}")
        if arr.ndim == 1 and self.out_features == 1:
            arr = arr.reshape(-1, 1)
        if arr.shape != (rows, self.out_features):
            raise ValueError(f"{name} must have shape {(rows, self.out_features)}, got {arr.shape}")
        out = _contiguous(arr, self.dtype)
        if not _all_finite(out):
            raise ValueError(f"{name} contains NaN or infinity")
        return out

    def train_step(self, x: object, y: object, loss_fn: object, optimizer: object) -> float:
        """zero_grad, forward, loss, backward and the optimizer update in one call into C.

        ``optimizer`` must be over this model's parameters (``optim.SGD(model.parameters())``).
        Returns the loss before the update.
        """
        loss = resolve_loss(loss_fn)
        arr = self._check_input(x)  # NaN and infinity: checked in C, in the pass copying x
        self._check_batchnorm_batch(arr.shape[0], True)
        target = self._loss_target(loss, y, arr.shape[0])
        state = _flat_state(optimizer, self)
        was_training = self.training
        self.train()
        with self._exclusive():
            optimizer._sync(state)
            try:
                value = self._plan.train_step(arr, target, loss.kind, state)
            except ValueError:  # refused before anything changed: so is the mode
                self.train(was_training)
                raise
        self._last_batch = arr.shape[0]
        return value

    # ---- whole-epoch training ------------------------------------------------------------------

    def fit(
        self,
        X: object,
        y: object,
        *,
        loss: object = "mse",
        optimizer: object = None,
        epochs: int = 1,
        batch_size: int = 32,
        shuffle: bool = True,
        seed: int | None = None,
        validation_data: tuple[object, object] | None = None,
        callbacks: Sequence[object] | None = None,
        lr_scheduler: object = None,
        verbose: int = 0,
        stop_on_nonfinite: bool = True,
        comm: object = None,
        deterministic: bool = False,
        overlap: bool = False,
    ) -> History:
        """Train for ``epochs`` epochs; each epoch runs in C (shuffle, gather, forward, loss,
        backward, update) and returns to Python only to report progress.

        ``optimizer`` defaults to Adam(lr=1e-3), kept across fit calls. ``seed`` fixes the batch
        order and dropout masks: the same seed gives bitwise the same weights, whatever the
        thread count. ``callbacks`` are callables ``f(epoch, logs)`` or objects with
        ``on_epoch_end(epoch, logs)`` / ``on_batch_end(batch, logs)``. ``lr_scheduler.step()``
        runs after each epoch. NaN or infinity in X or y raises ValueError and changes nothing
        (for an X of 4 MiB and more, X is checked as the first epoch reads it, and a bad row
        undoes that epoch's steps first). A NaN/inf loss stops training with
        :class:`fastbp.NonFiniteLossError` naming the epoch and batch (weights are those of the
        last good step); with ``stop_on_nonfinite=False`` that batch is skipped instead.
        Returns a :class:`History`.

        ``comm`` (an mpi4py communicator, e.g. ``MPI.COMM_WORLD``; every rank calls fit with the
        same data) trains data-parallel: rank 0's weights and seed are broadcast, each rank takes
        its share of every global ``batch_size`` batch, gradients are summed over the ranks
        every step, and every rank applies the same update; rank 0 alone prints and calls the
        callbacks. N ranks train what one process would, to rounding (BatchNorm1d is refused).
        ``deterministic=True`` sums the gradients in rank order on rank 0 (gather, add,
        broadcast) instead of MPI's Allreduce, so repeated runs are bitwise identical.
        ``overlap=True`` starts each layer's reduction (``Iallreduce``) as soon as backward has
        its gradient, while the earlier layers are still differentiated; it pays when the MPI
        library progresses in the background (RDMA networks, a progress thread), not over
        shared memory with every core computing. See :mod:`fastbp.distributed`.
        """
        loss_obj = _fit_loss(loss)
        Xa, x_unchecked = self._unscanned_input(X, "X")
        n = Xa.shape[0]
        Ya = self._loss_target(loss_obj, y, n)
        epochs = _nonnegative_int(epochs, "epochs")
        batch_size = _positive_int(batch_size, "batch_size")
        if batch_size > n:
            warnings.warn(
                f"batch_size={batch_size} is larger than the {n} samples; using {n}", stacklevel=2
            )
            batch_size = n
        self._check_batchnorm_batch(min(batch_size, n % batch_size or batch_size), True)
        callbacks = list(callbacks or [])
        created_optimizer = optimizer is None and self._fit_optimizer is None
        if optimizer is None:
            if self._fit_optimizer is None:
                from .optim import Adam  # here, not per call: an import statement costs ~1 us

                self._fit_optimizer = Adam(self.parameters(), lr=1e-3)
            optimizer = self._fit_optimizer
        state = _flat_state(optimizer, self)
        # X's NaN/inf check: up front, or as the first epoch reads each batch (undone on a bad
        # row, see _FitUndo)
        defer_x_check = x_unchecked and self._can_defer_x_check(Xa, epochs, callbacks, comm, state)
        if x_unchecked and not defer_x_check and not _all_finite(Xa):
            if created_optimizer:
                self._fit_optimizer = None  # a bad X changes nothing
            raise ValueError("X contains NaN or infinity")
        val = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data must be a pair (X_val, y_val)")
            Xv = self._fit_inputs(validation_data[0], "validation X")
            val = (Xv, self._loss_target(loss_obj, validation_data[1], Xv.shape[0], "validation y"))
        undo = _FitUndo(self, state, Xa, created_optimizer) if defer_x_check else None
        if comm is not None:
            from .distributed import fit_distributed

            return fit_distributed(
                self,
                Xa,
                Ya,
                comm=comm,
                deterministic=bool(deterministic),
                overlap=bool(overlap),
                loss_obj=loss_obj,
                optimizer=optimizer,
                state=state,
                epochs=epochs,
                batch_size=batch_size,
                shuffle=shuffle,
                seed=seed,
                val=val,
                callbacks=callbacks,
                lr_scheduler=lr_scheduler,
                verbose=verbose,
                stop_on_nonfinite=stop_on_nonfinite,
            )
        # the shuffles' seed (and dropout's, from an explicit seed); unused without shuffling
        base_seed = int(seed) if seed is not None else fresh_seed() if shuffle else 0
        if seed is not None:
            self.seed(derive_seed(base_seed, 1))

        # The whole fit holds the model: another thread must not step it between chunks.
        with self._exclusive():
            history = History()
            self._last_batch = None  # fit overwrites the activations a step-API backward would use
            n_batches = math.ceil(n / batch_size)
            # batches per call into C; grows while calls are short, kept across epochs
            chunk = self._first_chunk(batch_size, n_batches, callbacks)
            self.train()
            if (
                chunk >= n_batches
                and not callbacks
                and lr_scheduler is None
                and val is None
                and not verbose
                and stop_on_nonfinite
            ):
                # Short epochs and nothing to do between them: several epochs per call into C
                # (a tiny network's epoch is ~40 us, and Python's part of it was ~6 us).
                # the shuffles fill the order; without them C reads the rows in order
                order = np.empty(n, dtype=np.int64) if shuffle else None
                self._run_epochs_in_c(
                    history, chunk // n_batches, epochs, Xa, Ya, order, batch_size, n_batches,
                    loss_obj, state, optimizer, base_seed if shuffle else None, undo,
                )  # fmt: skip
                return history
            order = np.arange(n, dtype=np.int64)
            for epoch in range(epochs):
                t0 = time.perf_counter()
                if shuffle:
                    _core.shuffle(order, derive_seed(base_seed, 0, epoch))
                loss_sum, rows_done, skipped, chunk = self._run_epoch(
                    chunk,
                    Xa,
                    Ya,
                    order,
                    batch_size,
                    n_batches,
                    loss_obj,
                    state,
                    optimizer,
                    epoch,
                    callbacks,
                    stop_on_nonfinite,
                    undo,
                )
                undo = None  # the first epoch read every row of X
                logs = _epoch_logs(
                    loss_sum, rows_done, time.perf_counter() - t0, optimizer, skipped
                )
                if val is not None:
                    logs.update(self._validation_logs(val, loss_obj))
                history._append(epoch, logs)
                _report_epoch(epoch, epochs, logs, verbose, callbacks)
                if lr_scheduler is not None:
                    lr_scheduler.step()
            return history

    def _run_epochs_in_c(
        self,
        history: History,
        per_call: int,
        epochs: int,
        Xa: np.ndarray,
        Ya: np.ndarray,
        order: np.ndarray | None,
        batch_size: int,
        n_batches: int,
        loss_obj: Loss,
        state: _core.OptimizerState,
        optimizer: object,
        shuffle_seed: int | None,
        undo: _FitUndo | None,
    ) -> None:
        """fit's loop for short epochs without callbacks, validation, scheduler or printing:
        the same steps, shuffles and History as one call per epoch, in calls of ``per_call``
        epochs that double while they take under _CHUNK_SECONDS (so Ctrl-C stays prompt).
        With ``undo``, the first epoch checks X's rows as it reads them."""
        n = Xa.shape[0]
        done = 0
        per_call = max(1, per_call)
        while done < epochs:
            count = min(per_call, epochs - done)
            seeds = None
            if shuffle_seed is not None:
                seeds = [derive_seed(shuffle_seed, 0, e) for e in range(done, done + count)]
            t0 = time.perf_counter()
            optimizer._sync(state)
            check_x = undo is not None and done == 0
            try:
                bad_epoch, bad_batch, sums, seconds = self._plan.train_epochs(
                    Xa, Ya, order, batch_size, count, seeds, loss_obj.kind, state, check_x
                )
            except _core.NonFiniteInputError:
                undo.fail()
            history._extend_trained(done, sums, seconds, n, float(optimizer.param_groups[0]["lr"]))
            if bad_epoch >= 0:
                if check_x and bad_epoch == 0:
                    undo.confirm_x()  # X's unread rows could still hold NaN or infinity
                raise _core.NonFiniteLossError(
                    _nonfinite_message(done + bad_epoch, bad_batch, n_batches)
                )
            done += count
            if time.perf_counter() - t0 < _CHUNK_SECONDS:
                per_call *= 2

    def _first_chunk(self, batch_size: int, n_batches: int, callbacks: Sequence[object]) -> int:
        """Batches in fit's first call into C: as many as surely take under _CHUNK_SECONDS,
        costing a step at 1 us plus its multiply-adds at 1e9/s (both pessimistic), so a tiny
        network's epoch is one call instead of a doubling series of them. Batch callbacks are
        promised every batch: then one."""
        if callbacks and any(hasattr(cb, "on_batch_end") for cb in callbacks):
            return 1
        macs = batch_size * self._macs_per_row
        step_seconds = 1e-6 + 3 * macs / 1e9  # forward, weight and input gradients
        return max(1, min(n_batches, int(_CHUNK_SECONDS / step_seconds)))

    def _fit_inputs(self, X: object, name: str) -> np.ndarray:
        """X as this model's dtype, C-contiguous, checked: shape, features, no NaN or infinity."""
        out, unchecked = self._unscanned_input(X, name)
        if unchecked and not _all_finite(out):
            raise ValueError(f"{name} contains NaN or infinity")
        return out

    def _unscanned_input(self, X: object, name: str) -> tuple[np.ndarray, bool]:
        """:meth:`_fit_inputs` but for the NaN/inf scan, and whether that scan is still due: not
        for an array the caller vouched for (:meth:`_known_finite`), nor for integers (every
        integer type converts to a finite float32 or float64)."""
        arr = X if isinstance(X, np.ndarray) else np.asarray(X)
        if arr.dtype.kind not in "fiu":  # bool is kind "b"
            raise TypeError(f"{name} must be a real array, got dtype {arr.dtype}")
        if arr.ndim != 2:
            hint = f"; for a single sample use {name}.reshape(1, -1)" if arr.ndim == 1 else ""
            raise ValueError(f"{name} must be 2-D (samples, features), got shape {arr.shape}{hint}")
        if arr.shape[0] == 0:
            raise ValueError(f"{name} has no samples")
        if arr.shape[1] != self.in_features:
            raise ValueError(
                f"{name} has {arr.shape[1]} features, the model expects {self.in_features}"
            )
        out = _contiguous(arr, self.dtype)
        unchecked = arr.dtype.kind == "f" and not (
            self._finite_arrays and any(out is a for a in self._finite_arrays)
        )
        return out, unchecked

    def _can_defer_x_check(
        self,
        Xa: np.ndarray,
        epochs: int,
        callbacks: Sequence[object],
        comm: object,
        state: _core.OptimizerState,
    ) -> bool:
        """Whether fit may check X as its first epoch reads it, undoing that epoch's steps on
        a bad row (_FitUndo), instead of in a pass of its own first: for an X much larger than
        what the undo copies (the copy must cost less than the pass it saves), when nothing
        sees the steps before the epoch ends (batch callbacks do) and nothing the undo cannot
        restore is lost (a step-API forward awaiting its backward; a distributed fit's peers)."""
        if Xa.nbytes < _DEFER_CHECK_MIN_BYTES:
            return False
        state_bytes = self._params.nbytes + self._grads.nbytes + self._buffers.nbytes
        state_bytes += sum(a.nbytes for a in state.arrays if a is not None)
        return (
            comm is None
            and epochs > 0
            and self._last_batch is None
            and Xa.nbytes >= max(_DEFER_CHECK_MIN_BYTES, _DEFER_CHECK_STATE_RATIO * state_bytes)
            and not any(hasattr(cb, "on_batch_end") for cb in callbacks)
        )

    @contextlib.contextmanager
    def _known_finite(self, *arrays: np.ndarray) -> Iterator[None]:
        """fit skips its NaN/inf scan of these very arrays (the caller has checked them): the
        scikit-learn estimators train one epoch per fit call, and each call scanned all of X
        again (Fashion-MNIST's 188 MB: 13 ms at one thread, ~4% of a W3-sized epoch)."""
        saved = self._finite_arrays
        self._finite_arrays = saved + arrays
        try:
            yield
        finally:
            self._finite_arrays = saved

    def _run_epoch(
        self,
        chunk: int,
        Xa,
        Ya,
        order,
        batch_size,
        n_batches,
        loss_obj,
        state,
        optimizer,
        epoch,
        callbacks,
        stop_on_nonfinite,
        undo,
    ) -> tuple[float, int, int, int]:
        """One epoch of fit, in calls into C of ``chunk`` batches (which grows while calls are
        short). With ``undo``, X's rows are checked as they are read (the first epoch)."""
        n = Xa.shape[0]
        batch_hooks = [cb for cb in callbacks if hasattr(cb, "on_batch_end")]
        loss_sum, rows_done, skipped = 0.0, 0, 0
        first = 0
        while first < n_batches:
            count = min(chunk, n_batches - first)
            t0 = time.perf_counter()
            with self._exclusive():
                optimizer._sync(state)
                # the running sum goes into C: an epoch's loss is then summed batch by batch
                # in order, whatever the (timing-dependent) chunks
                try:
                    loss_sum, bad = self._plan.train_batches(
                        Xa, Ya, order, batch_size, first, count, loss_obj.kind, state, loss_sum,
                        undo is not None,
                    )  # fmt: skip
                except _core.NonFiniteInputError:
                    undo.fail()
            done = (bad if bad >= 0 else first + count) - first
            rows_done += min(n, (first + done) * batch_size) - first * batch_size
            if bad >= 0:
                if stop_on_nonfinite:
                    if undo is not None:
                        undo.confirm_x()  # X's unread rows could still hold NaN or infinity
                    raise _core.NonFiniteLossError(_nonfinite_message(epoch, bad, n_batches))
                skipped += 1
                first = bad + 1
            else:
                first += count
            running = loss_sum / rows_done if rows_done else float("nan")
            for cb in batch_hooks:
                cb.on_batch_end(first - 1, {"epoch": epoch, "loss": running})
            # Grow chunks while they are short: few returns to Python, prompt Ctrl-C. Batch
            # callbacks are promised every batch, so with them the chunk stays one batch.
            if not batch_hooks and time.perf_counter() - t0 < _CHUNK_SECONDS:
                chunk *= 2
        return loss_sum, rows_done, skipped, chunk

    def predict(self, X: object, batch_size: int = 1024) -> np.ndarray:
        """Outputs for X in eval mode (dropout off, BatchNorm's running statistics), batch by batch."""
        Xa, check_x = self._eval_input(X)
        batch_size = _positive_int(batch_size, "batch_size")
        out = np.empty((Xa.shape[0], self.out_features), dtype=self.dtype)
        with self._exclusive():
            try:
                for start in range(0, Xa.shape[0], batch_size):
                    stop = min(start + batch_size, Xa.shape[0])
                    self._plan.predict(Xa[start:stop], out[start:stop], check_x)
            except _core.NonFiniteInputError:
                raise ValueError("X contains NaN or infinity") from None
            finally:
                self._last_batch = None  # the forwards overwrote the activations
        return out

    def _eval_input(self, X: object) -> tuple[np.ndarray, bool]:
        """predict's and evaluate's X, and whether their forwards are to check it for NaN/inf
        (the first product reads every value anyway: a separate scan read X from memory once
        more). Up front instead when a step-API forward awaits its backward, whose activations
        a forward stopped by the check would have overwritten."""
        Xa, unchecked = self._unscanned_input(X, "X")
        if unchecked and self._last_batch is not None:
            if not _all_finite(Xa):
                raise ValueError("X contains NaN or infinity")
            unchecked = False
        return Xa, unchecked

    def evaluate(
        self, X: object, y: object, loss: object = None, batch_size: int = 1024
    ) -> dict[str, float]:
        """Loss (and accuracy for classification) in eval mode. The loss defaults to
        cross-entropy for integer labels, MSE otherwise."""
        if loss is None:
            y_arr = np.asarray(y)
            loss = (
                "cross_entropy"
                if y_arr.dtype.kind in "iu" and y_arr.ndim == 1 and self.out_features > 1
                else "mse"
            )
        loss_obj = resolve_loss(loss)
        Xa, check_x = self._eval_input(X)
        return self._evaluate(
            Xa,
            self._loss_target(loss_obj, y, Xa.shape[0]),
            loss_obj,
            _positive_int(batch_size, "batch_size"),
            check_x,
        )

    def _validation_logs(
        self, val: tuple[np.ndarray, np.ndarray], loss_obj: Loss
    ) -> dict[str, float]:
        """``val_loss`` (and ``val_accuracy``) of the validation pair, in eval mode."""
        return {f"val_{k}": v for k, v in self._evaluate(val[0], val[1], loss_obj, 1024).items()}

    def _evaluate(
        self, Xa: np.ndarray, Ya: np.ndarray, loss_obj: Loss, batch_size: int, check_x: bool = False
    ) -> dict[str, float]:
        with self._exclusive():
            try:
                loss_sum, correct = self._plan.evaluate(Xa, Ya, batch_size, loss_obj.kind, check_x)
            except _core.NonFiniteInputError:
                raise ValueError("X contains NaN or infinity") from None
            finally:
                self._last_batch = None  # the forwards overwrote the activations
        out = {"loss": loss_sum / Xa.shape[0]}
        if isinstance(loss_obj, CrossEntropyLoss):
            out["accuracy"] = correct / Xa.shape[0]
        return out


def _layer_label(layer: Module) -> str:
    """A short name for a profile row: ``Linear(784, 256)``, ``ReLU``, ``Dropout(0.5)``."""
    if isinstance(layer, Linear):
        return f"Linear({layer.in_features}, {layer.out_features})"
    if isinstance(layer, Dropout):
        return f"Dropout({layer.p})"
    if isinstance(layer, BatchNorm1d):
        return f"BatchNorm1d({layer.num_features})"
    return type(layer).__name__


def _nonfinite_message(epoch: int, batch: int, n_batches: int) -> str:
    """fit's NonFiniteLossError text for 0-based ``epoch`` and ``batch``."""
    return (
        f"the training loss became NaN or infinite at epoch {epoch + 1}, batch {batch + 1} "
        f"(of {n_batches}); the weights are those after the last finite step. Lower the "
        "learning rate, check the data, or pass stop_on_nonfinite=False to skip such batches"
    )


def _epoch_logs(
    loss_sum: float, rows_done: int, elapsed: float, optimizer: object, skipped: int
) -> dict[str, float]:
    """One epoch's History entry: mean loss over the rows trained (NaN if every batch was
    skipped), time, samples/s, the learning rate, and the skipped-batch count when nonzero."""
    logs = {
        "loss": loss_sum / rows_done if rows_done else float("nan"),
        "time": elapsed,
        "samples_per_sec": rows_done / elapsed if elapsed > 0 else float("inf"),
        "lr": float(optimizer.param_groups[0]["lr"]),
    }
    if skipped:
        logs["skipped_batches"] = skipped
    return logs


def _report_epoch(
    epoch: int, epochs: int, logs: Mapping[str, float], verbose: int, callbacks: Sequence[object]
) -> None:
    """The verbose line and the epoch-end callbacks."""
    if verbose:
        print(
            f"epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in logs.items()),
            flush=True,
        )
    for cb in callbacks:
        if hasattr(cb, "on_epoch_end"):
            cb.on_epoch_end(epoch, logs)
        elif callable(cb):
            cb(epoch, logs)


def MLP(
    sizes: Sequence[int],
    activation: str = "relu",
    output_activation: str | None = None,
    dropout: float = 0.0,
    dtype: object = np.float32,
    seed: int | None = None,
) -> Sequential:
    """A fully-connected network, e.g. ``MLP([784, 256, 128, 10])``: Linear, activation (and
    Dropout when ``dropout > 0``) between layers, an optional output activation. ``seed`` fixes
    the initial weights (torch's init) and the dropout masks."""
    acts = {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh, "identity": Identity}
    if not isinstance(sizes, (list, tuple)) or len(sizes) < 2:
        raise ValueError(f"sizes must list at least an input and an output width, got {sizes!r}")
    sizes = [_positive_int(s, f"sizes[{i}]") for i, s in enumerate(sizes)]
    for name, value in (("activation", activation), ("output_activation", output_activation)):
        if value is None and name == "output_activation":
            continue
        if not isinstance(value, str) or value.lower() not in acts:
            raise ValueError(f"{name} must be one of {sorted(acts)}, got {value!r}")
    dt = _check_dtype(dtype)
    rng = np.random.default_rng(seed) if seed is not None else None
    layers: list[Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(Linear(fan_in, fan_out, dtype=dt, rng=rng))
        if i < len(sizes) - 2:
            layers.append(acts[activation.lower()]())
            if dropout:
                layers.append(Dropout(dropout))
    if output_activation is not None:
        layers.append(acts[output_activation.lower()]())
    return Sequential(*layers, seed=None if seed is None else derive_seed(int(seed), 2))


def _nonnegative_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _to_numpy(value: object, name: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(
        value, "cpu"
    ):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object:
        raise TypeError(f"{name}: cannot convert {type(value).__name__} to an array")
    return arr


_optimizer_class: type | None = None  # fastbp.optim.Optimizer, imported on first use (a cycle)


class _FitUndo:
    """What a fit changes before its first epoch has read, and checked, every row of X: kept
    when that check is deferred into the epoch, so that a NaN or infinity found there still
    leaves model and optimizer as the up-front check did (untouched): parameters, gradients and
    buffers (BatchNorm's running statistics), the optimizer's state and step count, BatchNorm's
    batch counts, dropout's stream, the train/eval modes, and a default optimizer this fit
    created. fit defers only for an X at least _DEFER_CHECK_STATE_RATIO times these bytes."""

    __slots__ = ("_X", "_arrays", "_bn", "_created_optimizer", "_dropout", "_model", "_modes",
                 "_state", "_step")  # fmt: skip

    def __init__(
        self, model: Sequential, state: _core.OptimizerState, X: np.ndarray, created_optimizer: bool
    ) -> None:
        self._model, self._state, self._X = model, state, X
        live = (model._params, model._grads, model._buffers, *state.arrays)
        self._arrays = [(a, a.copy()) for a in live if a is not None]
        self._step = state.step
        self._dropout = model._plan.dropout_state()
        self._bn = {op: model._plan.batchnorm_batches(op) for op in model._bn_ops.values()}
        self._modes = (model.training, [layer.training for layer in model._layers])
        self._created_optimizer = created_optimizer

    def fail(self) -> None:
        """Restore everything and raise fit's ValueError for a non-finite X."""
        model = self._model
        for live, saved in self._arrays:
            np.copyto(live, saved)
        self._state.step = self._step
        model._plan.set_dropout_state(*self._dropout)
        for op, count in self._bn.items():
            model._plan.set_batchnorm_batches(op, count)
        training, layer_modes = self._modes
        model.training = training
        for layer, mode in zip(model._layers, layer_modes, strict=True):
            layer.train(mode)
        if self._created_optimizer:
            model._fit_optimizer = None
        model._last_batch = None
        raise ValueError("X contains NaN or infinity") from None

    def confirm_x(self) -> None:
        """Before fit reports a non-finite loss in the first epoch: scan X, whose rows after
        that batch are unread, and :meth:`fail` if it holds NaN or infinity (the error an
        up-front check would have raised)."""
        if not _all_finite(self._X):
            self.fail()


def _flat_state(optimizer: object, model: Sequential):
    global _optimizer_class
    if _optimizer_class is None:
        from .optim import Optimizer

        _optimizer_class = Optimizer
    if not isinstance(optimizer, _optimizer_class):
        raise TypeError(
            f"optimizer must be a fastbp.optim optimizer, got {type(optimizer).__name__}"
        )
    state = optimizer._flat_state_for(model)
    if state is None:
        raise ValueError(
            "the optimizer must be built over exactly this model's parameters, "
            "e.g. fastbp.optim.SGD(model.parameters(), lr=0.1)"
        )
    return state
