"""Data-parallel training over MPI: ``Sequential.fit(..., comm=MPI.COMM_WORLD)``.

Every rank holds the whole data set and the same model. Each global batch (``batch_size`` rows of
the epoch's shuffled order, the same order on every rank) is split into contiguous per-rank
shards; each rank computes the gradient of its shard's mean loss in C, scaled by
``shard_rows / batch_rows``, and one SUM reduction of the flat gradient buffer gives every rank the
gradient of the global batch's mean loss. Every rank then takes the same optimizer step, so the
weights stay identical without ever being sent again. ``batch_size`` therefore means the same
with 1 or N processes, and N ranks train the model one process would (to rounding; bitwise with
one rank).

Communication per step: the gradient buffer and two doubles (the loss and a non-finite flag),
by default one in-place ``Allreduce`` after backward (``deterministic=True``: ``Gather`` + a sum
in rank order + ``Bcast``). With ``overlap=True`` the reduction overlaps the backward pass: the C
backward calls back as soon as a layer's weight and bias gradients are final (before it computes
that layer's input gradient), and the gradients ready so far are reduced by a non-blocking
``Iallreduce`` per bucket (whole layers, at least ``BUCKET_BYTES``, the same partition on every
rank) while the earlier layers are still being differentiated; a ``Waitall`` precedes the update.
That pays only when the MPI library moves data while the rank computes (an RDMA network, or a
progress thread on a spare core, e.g. MPICH's ``MPIR_CVAR_ASYNC_PROGRESS=1``). On one node over
shared memory with every core computing, a non-blocking collective progresses only inside MPI
calls, so there is nothing to overlap with and the extra messages cost a little (measured on a
2-core machine, W3 at batch 128, 2 ranks: 0.86 ms per step without, 0.88 with; see
bench/mpi_bench.py and the README). Hence it is off by default.

Only the communicator methods that mpi4py's ``Comm`` has are used (``Get_rank``, ``Get_size``,
``Allreduce``, ``Gather``, ``Bcast``, ``bcast``; ``overlap=True`` needs mpi4py and ``Iallreduce``),
so any object implementing them works.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _core
from ._model import _epoch_logs, _report_epoch
from ._random import derive_seed, fresh_seed
from .losses import Loss

if TYPE_CHECKING:
    from ._model import History, Sequential

__all__ = ["BUCKET_BYTES", "grad_scale", "gradient_buckets", "shard_bounds", "shard_rows"]

_MSE_SUM = 1  # fbp_loss FBP_LOSS_MSE_SUM: a sum over rows, so shards add without scaling
_OP_LINEAR, _OP_BATCHNORM = 0, 3  # fbp_op_kind

BUCKET_BYTES = 64 * 1024
"""The least gradient bytes per overlapped ``Iallreduce`` (``overlap=True``): whole layers, last
first, are added to a bucket until it holds this much. Larger buckets mean fewer messages,
smaller ones an earlier start."""


def shard_bounds(rows: int, size: int, rank: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of a ``rows``-row global batch that ``rank`` of ``size`` takes.

    Contiguous shards, the first ``rows % size`` ranks one row longer; a rank gets no rows when
    the batch has fewer rows than there are ranks. The shards cover the batch exactly, in rank
    order.
    """
    if size <= 0 or not 0 <= rank < size or rows < 0:
        raise ValueError(f"bad shard request: rows={rows}, size={size}, rank={rank}")
    base, extra = divmod(rows, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_rows(rows: int, size: int, rank: int) -> int:
    """How many rows of a ``rows``-row global batch ``rank`` of ``size`` takes."""
    start, stop = shard_bounds(rows, size, rank)
    return stop - start


def grad_scale(local_rows: int, batch_rows: int, mean_loss: bool = True) -> float:
    """The factor on a shard's mean-loss gradient so that the SUM over ranks is the gradient of
    the global batch's mean loss: ``local_rows / batch_rows`` (1 for a sum-reduced loss)."""
    if batch_rows <= 0 or not 0 <= local_rows <= batch_rows:
        raise ValueError(f"bad shard: {local_rows} of {batch_rows} rows")
    return local_rows / batch_rows if mean_loss else 1.0


def _op_param_ranges(op: tuple) -> list[tuple[int, int]]:
    """The ``[lo, hi)`` ranges of the flat parameter buffer that a plan op owns."""
    kind, _act, in_features, out_features, weight, bias = op[:6]
    if kind == _OP_LINEAR:
        sizes = (in_features * out_features, out_features)
    elif kind == _OP_BATCHNORM:
        sizes = (out_features, out_features)
    else:
        return []
    return [(lo, lo + n) for lo, n in zip((weight, bias), sizes, strict=True) if lo >= 0]


def gradient_buckets(
    ops: Sequence[tuple], n_params: int, itemsize: int, bucket_bytes: int = BUCKET_BYTES
) -> list[tuple[int, int, int]] | None:
    """The overlapped reduction's buckets, in the order they become ready (last layer first):
    ``(ready_op, lo, hi)`` = the gradients ``[lo, hi)`` are final once op ``ready_op`` has been
    differentiated. Together they cover ``[0, n_params)``. ``None`` when the plan's parameters
    are not laid out in op order (nothing to overlap then) or there are none.
    """
    buckets: list[tuple[int, int, int]] = []
    lo = hi = n_params
    for index in range(len(ops) - 1, -1, -1):
        for r_lo, r_hi in sorted(_op_param_ranges(ops[index]), reverse=True):
            if r_hi != lo:
                return None
            lo = r_lo
        if hi - lo > 0 and (hi - lo) * itemsize >= bucket_bytes:
            buckets.append((index, lo, hi))
            hi = lo
    if hi > lo:
        buckets.append((0, lo, hi))
    if lo != 0 or not buckets:
        return None
    return buckets


def _mpi_constants() -> tuple[Any, Any]:
    """(IN_PLACE, SUM) from mpi4py when it is importable, else stand-ins for a duck-typed comm
    (which then receives ``None`` as the in-place marker and the op)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None, None
    return MPI.IN_PLACE, MPI.SUM


class _Reducer:
    """Sums a buffer over the ranks in place: MPI's Allreduce, or (deterministic) a gather to
    rank 0, a sum in rank order and a broadcast, whose result does not depend on MPI's algorithm
    or the rank count's reduction tree."""

    def __init__(self, comm: Any, deterministic: bool) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.deterministic = deterministic
        self.in_place, self.sum_op = _mpi_constants()
        self._gathered: dict[tuple[int, str], np.ndarray] = {}

    def sum(self, buf: np.ndarray) -> None:
        if self.size == 1 and not self.deterministic:
            return  # nothing to add; keeps a 1-rank run bitwise equal to plain fit
        if not self.deterministic:
            self.comm.Allreduce(self.in_place, buf, op=self.sum_op)
            return
        recv = None
        if self.rank == 0:
            key = (buf.size, buf.dtype.str)
            recv = self._gathered.get(key)
            if recv is None:
                recv = self._gathered[key] = np.empty((self.size, buf.size), dtype=buf.dtype)
        self.comm.Gather(buf, recv, root=0)
        if self.rank == 0:
            assert recv is not None
            buf[...] = recv[0]
            for r in range(1, self.size):  # rank order, one addition at a time
                buf += recv[r]
        self.comm.Bcast(buf, root=0)


class _OverlappedAllreduce:
    """Reduces the gradient buffer bucket by bucket while backward runs: ``ready`` is the C
    hook (op ``op``'s gradients are final), ``finish`` starts what is left and waits for all.
    Every rank starts the same buckets in the same order, also a rank whose backward did not
    run (an empty shard or a non-finite loss), so the collectives always match."""

    def __init__(self, comm: Any, grads: np.ndarray, buckets: list[tuple[int, int, int]]) -> None:
        from mpi4py import MPI

        self.comm = comm
        self.request_type = MPI.Request
        self.in_place, self.sum_op = MPI.IN_PLACE, MPI.SUM
        self.views = [(ready_op, grads[lo:hi]) for ready_op, lo, hi in buckets]
        self.requests: list[Any] = []

    def _start_through(self, op: int) -> None:
        while len(self.requests) < len(self.views) and self.views[len(self.requests)][0] >= op:
            view = self.views[len(self.requests)][1]
            self.requests.append(self.comm.Iallreduce(self.in_place, view, op=self.sum_op))

    def ready(self, op: int) -> None:
        self._start_through(op)
        self.request_type.Testall(self.requests)  # lets MPI progress the ones in flight

    def finish(self) -> None:
        self._start_through(-1)
        self.request_type.Waitall(self.requests)
        self.requests.clear()


def _overlap_for(model: Sequential, comm: Any, overlap: bool) -> _OverlappedAllreduce | None:
    """The overlapped reduction when asked for and there is something to overlap: several
    ranks and at least two buckets."""
    if not overlap or comm.Get_size() == 1:
        return None
    if not hasattr(comm, "Iallreduce"):
        raise TypeError("overlap=True needs a communicator with Iallreduce (mpi4py's Comm)")
    buckets = gradient_buckets(model._ops, model._grads.size, model._grads.itemsize, BUCKET_BYTES)
    if buckets is None or len(buckets) < 2:
        return None
    return _OverlappedAllreduce(comm, model._grads, buckets)


def _agree(comm: Any, reducer: _Reducer, mismatch: bool, message: str) -> None:
    """Raise ValueError(message) on every rank when any rank reports a mismatch."""
    flag = np.array([1.0 if mismatch else 0.0])
    reducer.sum(flag)
    if flag[0] > 0:
        raise ValueError(message)


def fit_distributed(
    model: Sequential,
    Xa: np.ndarray,
    Ya: np.ndarray,
    *,
    comm: Any,
    deterministic: bool,
    overlap: bool,
    loss_obj: Loss,
    optimizer: Any,
    state: _core.OptimizerState,
    epochs: int,
    batch_size: int,
    shuffle: bool,
    seed: int | None,
    val: tuple[np.ndarray, np.ndarray] | None,
    callbacks: Sequence[Any],
    lr_scheduler: Any,
    verbose: int,
    stop_on_nonfinite: bool,
) -> History:
    """The body of ``Sequential.fit`` when a communicator is given (arrays already validated).

    Rank 0's initial weights, buffers and seed are broadcast first. Rank 0 alone prints and calls
    the callbacks; every rank returns the same History.
    """
    from ._model import History

    if deterministic and overlap:
        raise ValueError(
            "overlap=True needs deterministic=False: the deterministic reduction sums the whole "
            "buffer in rank order after backward"
        )
    rank, size = comm.Get_rank(), comm.Get_size()
    reducer = _Reducer(comm, deterministic)
    if size > 1 and model._bn_ops:
        raise ValueError(
            "distributed fit does not support BatchNorm1d: its batch statistics would be per "
            "rank (a synchronized BatchNorm is not implemented)"
        )
    n = Xa.shape[0]
    ref = comm.bcast((n, Xa.shape[1], Ya.shape, Ya.dtype.str, batch_size, epochs), root=0)
    _agree(
        comm,
        reducer,
        ref != (n, Xa.shape[1], Ya.shape, Ya.dtype.str, batch_size, epochs),
        "distributed fit: every rank must pass the same data shapes, batch_size and epochs",
    )
    comm.Bcast(model._params, root=0)
    comm.Bcast(model._buffers, root=0)
    base_seed = int(seed) if seed is not None else fresh_seed()
    base_seed = int(comm.bcast(base_seed, root=0))
    model.seed(derive_seed(base_seed, 1))  # the same dropout stream on every rank

    mean_loss = loss_obj.kind != _MSE_SUM
    reporting = rank == 0
    batch_hooks = [cb for cb in callbacks if hasattr(cb, "on_batch_end")] if reporting else []
    plan = model._plan
    overlapped = _overlap_for(model, comm, overlap)
    hook = overlapped.ready if overlapped is not None else None
    rows_max = min(batch_size, n)
    width = shard_rows(rows_max, size, 0)
    xbuf = np.empty((width, Xa.shape[1]), dtype=Xa.dtype)
    ybuf = np.empty((width, *Ya.shape[1:]), dtype=Ya.dtype)
    stats = np.zeros(2)  # [this rank's share of the batch loss, non-finite flag]
    n_batches = math.ceil(n / batch_size)
    history = History()
    with model._exclusive():
        model._last_batch = None
        order = np.arange(n, dtype=np.int64)
        model.train()
        for epoch in range(epochs):
            t0 = time.perf_counter()
            if shuffle:
                _core.shuffle(order, derive_seed(base_seed, 0, epoch))
            loss_sum, rows_done, skipped = 0.0, 0, 0
            for b in range(n_batches):
                start = b * batch_size
                rows = min(batch_size, n - start)
                lo, hi = shard_bounds(rows, size, rank)
                k = hi - lo
                idx = order[start + lo : start + hi]
                np.take(Xa, idx, axis=0, out=xbuf[:k])
                np.take(Ya, idx, axis=0, out=ybuf[:k])
                scale = grad_scale(k, rows, mean_loss)
                local = plan.compute_gradients(xbuf[:k], ybuf[:k], loss_obj.kind, scale, lo, hook)
                finite = math.isfinite(local)
                stats[0] = local * scale if finite else 0.0
                stats[1] = 0.0 if finite else 1.0
                if overlapped is not None:
                    overlapped.finish()
                else:
                    reducer.sum(model._grads)
                reducer.sum(stats)
                if stats[1] > 0:  # some rank's loss was not finite: all ranks agree to skip
                    if stop_on_nonfinite:
                        raise _core.NonFiniteLossError(
                            f"the training loss became NaN or infinite at epoch {epoch + 1}, batch {b + 1} "
                            f"(of {n_batches}) on {int(stats[1])} of {size} ranks; the weights are those "
                            "after the last finite step. Lower the learning rate, check the data, or pass "
                            "stop_on_nonfinite=False to skip such batches"
                        )
                    skipped += 1
                else:
                    optimizer._sync(state)
                    plan.update(state)
                    loss_sum += stats[0] * rows
                    rows_done += rows
                for cb in batch_hooks:
                    running = loss_sum / rows_done if rows_done else float("nan")
                    cb.on_batch_end(b, {"epoch": epoch, "loss": running})
            logs = _epoch_logs(loss_sum, rows_done, time.perf_counter() - t0, optimizer, skipped)
            if val is not None and reporting:  # identical weights: rank 0 evaluates for all
                logs.update(model._validation_logs(val, loss_obj))
            logs = comm.bcast(logs, root=0)
            history._append(epoch, logs)
            if reporting:
                _report_epoch(epoch, epochs, logs, verbose, callbacks)
            if lr_scheduler is not None:
                lr_scheduler.step()
    return history
