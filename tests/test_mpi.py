"""Data-parallel training (fastbp.distributed).

Without MPI: the sharding arithmetic, the C gradient entry (shards sum to the whole batch's
gradient, dropout included), and fit(comm=...) with a 1-rank stand-in communicator, which must
equal plain fit bitwise. Under ``mpirun -n N`` (N >= 2, mpi4py installed; see .ci/mpi): N-rank
training against single-process training, bitwise reproducibility with deterministic=True,
identical weights on every rank, non-finite agreement and the CLI's --distributed. The MPI tests
skip cleanly under plain pytest: mpi4py is imported only when a launcher started this process.
"""

from __future__ import annotations

import itertools
import os
import sys
import warnings
from typing import Any

import numpy as np
import pytest

import fastbp
import fastbp.distributed
from fastbp import _core
from fastbp.distributed import grad_scale, gradient_buckets, shard_bounds, shard_rows

# ---- the sharding arithmetic (pure functions) ---------------------------------------------------


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 7, 128, 129])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
def test_shards_cover_the_batch_in_rank_order(rows: int, size: int) -> None:
    bounds = [shard_bounds(rows, size, r) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    for (_, stop), (start, _) in itertools.pairwise(bounds):
        assert stop == start
    lengths = [stop - start for start, stop in bounds]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)  # the longer shards come first
    assert [shard_rows(rows, size, r) for r in range(size)] == lengths


def test_shard_examples() -> None:
    assert [shard_bounds(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [shard_bounds(2, 4, r) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    with pytest.raises(ValueError):
        shard_bounds(4, 2, 2)
    with pytest.raises(ValueError):
        shard_bounds(4, 0, 0)


@pytest.mark.parametrize("rows,size", [(128, 2), (100, 3), (5, 8), (1, 1)])
def test_grad_scales_sum_to_one(rows: int, size: int) -> None:
    scales = [grad_scale(shard_rows(rows, size, r), rows) for r in range(size)]
    assert sum(scales) == pytest.approx(1.0, abs=1e-15)
    assert grad_scale(3, 10, mean_loss=False) == 1.0
    with pytest.raises(ValueError):
        grad_scale(11, 10)


# ---- the C entry: shard gradients add up to the batch gradient ----------------------------------


def _model(dropout: float = 0.0, dtype: Any = np.float64, seed: int = 3) -> fastbp.Sequential:
    return fastbp.MLP([6, 16, 8, 3], dropout=dropout, dtype=dtype, seed=seed)


def _data(n: int = 101, dtype: Any = np.float64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6)).astype(dtype)
    return X, (np.arange(n) % 3).astype(np.int64)


@pytest.mark.parametrize("size", [2, 3, 5])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_shard_gradients_sum_to_batch_gradient(size: int, dropout: float) -> None:
    model = _model(dropout)
    X, y = _data(13)
    model.seed(11)
    full_loss = model._plan.compute_gradients(X, y, 2)
    full = model._grads.copy()
    total = np.zeros_like(full)
    loss = 0.0
    for r in range(size):
        lo, hi = shard_bounds(len(X), size, r)
        scale = grad_scale(hi - lo, len(X))
        model.seed(11)  # every rank starts the step with the same dropout stream
        local = model._plan.compute_gradients(X[lo:hi], y[lo:hi], 2, scale, lo)
        loss += local * scale
        total += model._grads
    assert loss == pytest.approx(full_loss, rel=1e-13)
    np.testing.assert_allclose(total, full, rtol=1e-12, atol=1e-15)
    assert np.abs(full).max() > 0


def test_empty_shard_zeroes_grads_and_keeps_the_dropout_stream() -> None:
    model = _model(0.5)
    X, y = _data(8)
    model._plan.compute_gradients(X, y, 2)
    assert np.abs(model._grads).max() > 0
    model.seed(5)
    assert model._plan.compute_gradients(X[:0], y[:0], 2, 0.0, 8) == 0.0
    assert not model._grads.any()
    model._plan.compute_gradients(X, y, 2)
    after_empty = model._grads.copy()
    model.seed(5)
    model._plan.compute_gradients(X, y, 2)  # the first dropout draw: differs
    model._plan.compute_gradients(X, y, 2)  # the second: what followed the empty shard
    np.testing.assert_array_equal(model._grads, after_empty)


def test_compute_gradients_reports_a_nonfinite_loss_without_raising() -> None:
    model = fastbp.MLP([2, 1], dtype=np.float64, seed=0)
    X = np.ones((4, 2))
    T = np.full((4, 1), 1e300)
    model._grads[...] = np.nan  # a previous step's (backward overwrites; this path zeroes)
    loss = model._plan.compute_gradients(X, T, 0)
    assert not np.isfinite(loss)
    assert not model._grads.any()
    with pytest.raises(ValueError):
        model._plan.compute_gradients(X, np.array([0, 1, 0, 5]), 2)  # label out of range


# ---- the backward's gradients-ready hook (what overlap=True builds on) -------------------------


def _bn_model(affine: bool = True) -> fastbp.Sequential:
    rng = np.random.default_rng(2)
    return fastbp.Sequential(
        fastbp.nn.Linear(6, 8, dtype=np.float64, rng=rng),
        fastbp.nn.BatchNorm1d(8, dtype=np.float64, affine=affine),
        fastbp.nn.ReLU(),
        fastbp.nn.Dropout(0.3),
        fastbp.nn.Linear(8, 5, dtype=np.float64, rng=rng),
        fastbp.nn.Tanh(),
        fastbp.nn.Linear(5, 3, dtype=np.float64, rng=rng),
    )


@pytest.mark.parametrize(
    "make",
    [lambda: _model(0.4), _bn_model, lambda: _bn_model(affine=False)],
    ids=["mlp-dropout", "batchnorm", "batchnorm-no-affine"],
)
def test_grads_ready_hook_reports_each_op_once_its_gradients_are_final(make: Any) -> None:
    model = make()
    X, y = _data(11)
    model.seed(9)
    model._plan.compute_gradients(X, y, 2, 0.5, 3)
    final = model._grads.copy()

    ranges = {i: _op_ranges(op) for i, op in enumerate(model._ops)}
    calls: list[int] = []

    def ready(op: int) -> None:
        calls.append(op)
        for lo, hi in ranges[op]:  # this op's gradients: already what backward ends with
            np.testing.assert_array_equal(model._grads[lo:hi], final[lo:hi])
        for earlier in range(op):  # the ops before it: not differentiated yet (still stale)
            for lo, hi in ranges[earlier]:
                assert np.isnan(model._grads[lo:hi]).all()

    model._grads[...] = np.nan  # stale: backward overwrites every gradient, zeroing none first
    model.seed(9)
    model._plan.compute_gradients(X, y, 2, 0.5, 3, ready)
    np.testing.assert_array_equal(model._grads, final)  # the hook changes nothing
    assert calls == sorted((i for i in ranges if ranges[i]), reverse=True)
    assert len(calls) >= 3


def _op_ranges(op: tuple) -> list[tuple[int, int]]:
    from fastbp.distributed import _op_param_ranges

    return _op_param_ranges(op)


def test_grads_ready_hook_exception_stops_backward_and_is_reraised() -> None:
    model = _model()
    X, y = _data(9)

    class Stop(Exception):
        pass

    def stop(op: int) -> None:
        raise Stop(f"op {op}")

    with pytest.raises(Stop, match="op 2"):  # the last op, the first to finish
        model._plan.compute_gradients(X, y, 2, 1.0, 0, stop)
    # the plan is still usable and computes the same gradients as a fresh one
    model._plan.compute_gradients(X, y, 2)
    fresh = _model()
    fresh._plan.compute_gradients(X, y, 2)
    np.testing.assert_array_equal(model._grads, fresh._grads)


def test_grads_ready_hook_is_not_called_without_a_backward() -> None:
    calls: list[int] = []
    model = fastbp.MLP([2, 1], dtype=np.float64, seed=0)
    X = np.ones((4, 2))
    loss = model._plan.compute_gradients(X, np.full((4, 1), 1e300), 0, 1.0, 0, calls.append)
    assert not np.isfinite(loss) and calls == []
    model._plan.compute_gradients(X[:0], X[:0, :1], 0, 0.0, 4, calls.append)  # an empty shard
    assert calls == []


@pytest.mark.parametrize("bucket_bytes", [1, 64, 400, 1100, 10**9])
@pytest.mark.parametrize("itemsize", [4, 8])
def test_gradient_buckets_partition_the_buffer_last_layer_first(
    bucket_bytes: int, itemsize: int
) -> None:
    model = _bn_model()  # ops with and without parameters, BatchNorm's weight and bias
    n = model._grads.size
    buckets = gradient_buckets(model._ops, n, itemsize, bucket_bytes)
    assert buckets is not None
    assert buckets[0][2] == n and buckets[-1][1] == 0
    for (op_a, lo_a, _), (op_b, _, hi_b) in itertools.pairwise(buckets):
        assert hi_b == lo_a and op_b < op_a  # contiguous, later layers first
    for ready_op, lo, hi in buckets[:-1]:  # all but the last hold at least bucket_bytes
        assert (hi - lo) * itemsize >= bucket_bytes
        # ready once op ready_op is differentiated: it is the lowest op the bucket holds
        assert min(_op_ranges(model._ops[ready_op]))[0] == lo
    assert buckets[-1][0] == 0
    if bucket_bytes == 1:  # one bucket per op with parameters
        assert len(buckets) == sum(1 for op in model._ops if _op_ranges(op))
    if bucket_bytes == 10**9:
        assert buckets == [(0, 0, n)]


def test_gradient_buckets_refuse_a_layout_out_of_op_order() -> None:
    linear = lambda w, b: (0, 0, 2, 3, w, b, -1, 0.0, 0.0)  # noqa: E731  (in 2, out 3: 6 + 3)
    assert gradient_buckets([linear(0, 6), linear(9, 15)], 18, 4, 1) == [(1, 9, 18), (0, 0, 9)]
    assert gradient_buckets([linear(9, 15), linear(0, 6)], 18, 4, 1) is None  # swapped
    assert gradient_buckets([linear(0, 7), linear(10, 16)], 19, 4, 1) is None  # a gap
    assert gradient_buckets([(1, 1, 4, 4, -1, -1, -1, 0.0, 0.0)], 1, 4, 1) is None  # no params


# ---- fit(comm=...) with a stand-in 1-rank communicator -------------------------------------------


class OneRankComm:
    """The mpi4py Comm methods fastbp.distributed uses, for a world of one process."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def Allreduce(self, sendbuf: Any, recvbuf: np.ndarray, op: Any = None) -> None:
        self._count("Allreduce")
        if isinstance(sendbuf, np.ndarray):  # else MPI.IN_PLACE (or its stand-in)
            recvbuf[...] = sendbuf

    def Gather(self, sendbuf: np.ndarray, recvbuf: np.ndarray | None, root: int = 0) -> None:
        self._count("Gather")
        assert recvbuf is not None
        recvbuf.reshape(1, -1)[0] = sendbuf.ravel()

    def Bcast(self, buf: np.ndarray, root: int = 0) -> None:
        self._count("Bcast")

    def bcast(self, obj: Any, root: int = 0) -> Any:
        self._count("bcast")
        return obj


def _fit(model: fastbp.Sequential, X, y, **kwargs: Any) -> fastbp.History:
    opt = fastbp.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    defaults: dict[str, Any] = {"loss": "cross_entropy", "epochs": 2, "batch_size": 16, "seed": 7}
    defaults.update(kwargs)
    return model.fit(X, y, optimizer=opt, **defaults)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("deterministic", [False, True])
def test_one_rank_comm_fit_equals_plain_fit_bitwise(dtype: Any, deterministic: bool) -> None:
    X, y = _data(101, dtype)
    plain, dist = _model(0.3, dtype), _model(0.3, dtype)
    h_plain = _fit(plain, X, y, validation_data=(X, y))
    comm = OneRankComm()
    seen: list[int] = []
    h_dist = _fit(
        dist,
        X,
        y,
        validation_data=(X, y),
        comm=comm,
        deterministic=deterministic,
        callbacks=[lambda epoch, logs: seen.append(epoch)],
    )
    np.testing.assert_array_equal(dist._params, plain._params)
    # the epoch loss goes through the reduction (loss * grad scale, summed over ranks): rounding only
    assert h_dist["loss"] == pytest.approx(h_plain["loss"], rel=1e-12)
    assert h_dist["val_accuracy"] == h_plain["val_accuracy"]
    assert seen == [0, 1]
    assert comm.calls["Bcast"] >= 2  # the initial weights and buffers
    if deterministic:
        assert comm.calls["Gather"] >= 2 * 7  # gradients and stats, every step (7 per epoch)


def test_one_rank_comm_fit_mse_sum_and_batchnorm() -> None:
    X, _ = _data(50)
    T = np.random.default_rng(1).normal(size=(50, 3))

    def make() -> fastbp.Sequential:
        rng = np.random.default_rng(4)
        return fastbp.Sequential(
            fastbp.nn.Linear(6, 8, dtype=np.float64, rng=rng),
            fastbp.nn.BatchNorm1d(8, dtype=np.float64),
            fastbp.nn.ReLU(),
            fastbp.nn.Linear(8, 3, dtype=np.float64, rng=rng),
        )

    plain, dist = make(), make()
    loss = fastbp.losses.MSELoss(reduction="sum")
    _fit(plain, X, T, loss=loss, batch_size=12)
    _fit(dist, X, T, loss=loss, batch_size=12, comm=OneRankComm())
    np.testing.assert_array_equal(dist._params, plain._params)
    np.testing.assert_array_equal(dist._buffers, plain._buffers)


def test_one_rank_comm_nonfinite_matches_plain_fit() -> None:
    model = fastbp.MLP([2, 1], dtype=np.float64, seed=0)
    X = np.ones((8, 2))
    T = np.zeros((8, 1))
    T[5] = 1e300
    with pytest.raises(_core.NonFiniteLossError, match="batch 2"):
        _fit(model, X, T, loss="mse", batch_size=4, shuffle=False, comm=OneRankComm())
    a, b = (
        fastbp.MLP([2, 1], dtype=np.float64, seed=0),
        fastbp.MLP([2, 1], dtype=np.float64, seed=0),
    )
    kw: dict[str, Any] = {"loss": "mse", "batch_size": 4, "shuffle": False}
    h_a = _fit(a, X, T, stop_on_nonfinite=False, **kw)
    h_b = _fit(b, X, T, stop_on_nonfinite=False, comm=OneRankComm(), **kw)
    assert h_a["skipped_batches"] == h_b["skipped_batches"] == [1, 1]
    np.testing.assert_array_equal(a._params, b._params)


def test_overlap_needs_the_allreduce_path() -> None:
    X, y = _data(20)
    with pytest.raises(ValueError, match="deterministic=False"):
        _fit(_model(), X, y, comm=OneRankComm(), deterministic=True, overlap=True)
    # one rank: nothing to reduce, so nothing to overlap; the same bits as plain fit
    plain, dist = _model(), _model()
    _fit(plain, X, y)
    _fit(dist, X, y, comm=OneRankComm(), overlap=True)
    np.testing.assert_array_equal(dist._params, plain._params)


@pytest.mark.parametrize("early_stopping", [False, True])
@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_estimator_fit_with_one_rank_comm_equals_plain_fit(kind: str, early_stopping: bool) -> None:
    X, labels = _data(120)
    y = labels if kind == "classifier" else X[:, :2] @ np.array([1.0, -2.0]) + 0.1 * labels
    make = fastbp.MLPClassifier if kind == "classifier" else fastbp.MLPRegressor
    params: dict[str, Any] = {
        "hidden_layer_sizes": (9,),
        "max_iter": 6,
        "batch_size": 16,
        "random_state": 0,
        "early_stopping": early_stopping,
        "n_iter_no_change": 100,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: max_iter is small on purpose
        plain = make(**params).fit(X, y)
        comm = OneRankComm()
        dist = make(**params).fit(X, y, comm=comm)
        partial = make(**{**params, "early_stopping": False})
        if kind == "classifier":
            partial.partial_fit(X, y, classes=[0, 1, 2], comm=comm)
        else:
            partial.partial_fit(X, y, comm=comm)
    np.testing.assert_array_equal(dist.model_._params, plain.model_._params)
    assert dist.loss_curve_ == pytest.approx(plain.loss_curve_, rel=1e-12)
    assert dist.n_iter_ == plain.n_iter_
    assert comm.calls["bcast"] >= 6  # the seed, and each epoch's loss
    if early_stopping:
        assert dist.validation_scores_ == plain.validation_scores_
    assert partial.n_iter_ == 1


def test_estimator_distributed_options_are_checked() -> None:
    X, y = _data(30)
    clf = fastbp.MLPClassifier(max_iter=1)
    with pytest.raises(ValueError, match="pass comm"):
        clf.fit(X, y, deterministic=True)
    with pytest.raises(ValueError, match="pass comm"):
        clf.fit(X, y, overlap=True)
    with pytest.raises(TypeError, match="MPI communicator"):
        clf.fit(X, y, comm=object())
    assert not clf.__sklearn_is_fitted__()


def test_cli_distributed_without_mpi4py_is_one_line(monkeypatch, capsys) -> None:
    from fastbp import cli

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py raises ImportError
    assert cli.main(["train", "--distributed", "--epochs", "1", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "mpi4py" in err and "fastbp[mpi]" in err


# ---- under mpirun -------------------------------------------------------------------------------

_LAUNCHED = any(
    v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
)


def _world() -> Any:
    if not _LAUNCHED:
        pytest.skip("not started by mpirun/mpiexec")
    try:
        from mpi4py import MPI
    except Exception as exc:  # missing, or an MPI library that does not load
        pytest.skip(f"mpi4py unavailable: {exc}")
    comm = MPI.COMM_WORLD
    if comm.Get_size() < 2:
        pytest.skip("needs at least 2 MPI ranks")
    return comm


def _same_on_all_ranks(comm: Any, arr: np.ndarray) -> bool:
    """Whether every rank holds bitwise the same array (checked on rank 0, told to all)."""
    gathered = comm.gather(arr.tobytes(), root=0)
    same = all(g == gathered[0] for g in gathered) if comm.Get_rank() == 0 else None
    return bool(comm.bcast(same, root=0))


def _all_ok(comm: Any, ok: bool) -> bool:
    return all(comm.allgather(bool(ok)))


@pytest.mark.parametrize("batch_size", [16, 7, 101])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_mpi_fit_equals_single_process(batch_size: int, dropout: float) -> None:
    comm = _world()
    X, y = _data(101)  # 101 rows: uneven shards and a short last batch
    single = _model(dropout)
    h_single = _fit(single, X, y, batch_size=batch_size)
    # every rank starts from different weights: rank 0's are broadcast
    dist = _model(dropout, seed=3 + comm.Get_rank())
    h_dist = _fit(dist, X, y, batch_size=batch_size, comm=comm)
    ok = np.allclose(dist._params, single._params, rtol=1e-10, atol=1e-12)
    ok = ok and np.allclose(h_dist["loss"], h_single["loss"], rtol=1e-10)
    assert _all_ok(comm, ok)
    assert _same_on_all_ranks(comm, dist._params)


def test_mpi_deterministic_is_bitwise_reproducible() -> None:
    comm = _world()
    X, y = _data(101, np.float32)
    runs = []
    for _ in range(2):
        model = _model(0.2, np.float32)
        opt = fastbp.optim.Adam(model.parameters(), lr=1e-2)
        model.fit(
            X, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=10, seed=1, comm=comm,
            deterministic=True,
        )  # fmt: skip
        runs.append(model._params.copy())
    assert _all_ok(comm, np.array_equal(runs[0], runs[1]))
    assert _same_on_all_ranks(comm, runs[0])
    single = _model(0.2, np.float32)
    opt = fastbp.optim.Adam(single.parameters(), lr=1e-2)
    single.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=10, seed=1)
    assert _all_ok(comm, np.allclose(runs[0], single._params, rtol=1e-4, atol=1e-5))


def test_mpi_nonfinite_on_one_rank_stops_all_ranks() -> None:
    comm = _world()
    X = np.ones((8, 2))
    T = np.zeros((8, 1))
    T[0] = 1e300  # row 0 of batch 0: rank 0's shard only
    raised = False
    try:
        _fit(fastbp.MLP([2, 1], dtype=np.float64, seed=0), X, T, loss="mse", batch_size=4,
             shuffle=False, comm=comm)  # fmt: skip
    except _core.NonFiniteLossError:
        raised = True
    assert _all_ok(comm, raised)
    model = fastbp.MLP([2, 1], dtype=np.float64, seed=0)
    h = _fit(model, X, T, loss="mse", batch_size=4, shuffle=False, comm=comm,
             stop_on_nonfinite=False)  # fmt: skip
    assert _all_ok(comm, h["skipped_batches"] == [1, 1])
    assert _same_on_all_ranks(comm, model._params)


def test_mpi_refuses_batchnorm() -> None:
    comm = _world()
    model = fastbp.Sequential(
        fastbp.nn.Linear(6, 4, dtype=np.float64), fastbp.nn.BatchNorm1d(4, dtype=np.float64)
    )
    X, _ = _data(20)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        model.fit(X, np.zeros((20, 4)), batch_size=10, comm=comm)


def test_mpi_cli_rank0_prints_and_saves(capsys, tmp_path) -> None:
    comm = _world()
    from fastbp import cli

    path = comm.bcast(str(tmp_path / "model.safetensors"), root=0)
    code = cli.main(["train", "--distributed", "--epochs", "2", "--save", path])
    out = capsys.readouterr().out
    assert _all_ok(comm, code == 0)
    if comm.Get_rank() == 0:
        assert "test accuracy:" in out and f"distributed over {comm.Get_size()} ranks" in out
        assert os.path.exists(path)
    else:
        assert out == ""
    comm.Barrier()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bucket_bytes", [1, 200])
def test_mpi_overlap_equals_blocking_allreduce(monkeypatch, dtype: Any, bucket_bytes: int) -> None:
    comm = _world()
    monkeypatch.setattr(fastbp.distributed, "BUCKET_BYTES", bucket_bytes)  # several buckets
    X, y = _data(101, dtype)
    blocking, overlapped = _model(0.3, dtype), _model(0.3, dtype)
    h_b = _fit(blocking, X, y, batch_size=12, comm=comm)
    h_o = _fit(overlapped, X, y, batch_size=12, comm=comm, overlap=True)
    if comm.Get_size() == 2:  # a + b == b + a: the bucketed sums are the whole buffer's bits
        assert _all_ok(comm, np.array_equal(overlapped._params, blocking._params))
    else:  # MPI may pick another reduction order per message size
        assert _all_ok(comm, np.allclose(overlapped._params, blocking._params, rtol=1e-4))
    assert _all_ok(comm, np.allclose(h_o["loss"], h_b["loss"], rtol=1e-6))
    assert _same_on_all_ranks(comm, overlapped._params)
    single = _model(0.3, dtype)
    _fit(single, X, y, batch_size=12)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert _all_ok(comm, np.allclose(overlapped._params, single._params, rtol=tol, atol=tol))


def test_mpi_overlap_nonfinite_on_one_rank_stops_all_ranks(monkeypatch) -> None:
    comm = _world()
    monkeypatch.setattr(fastbp.distributed, "BUCKET_BYTES", 1)
    X = np.ones((8, 2))
    T = np.zeros((8, 1))
    T[0] = 1e300  # rank 0's backward does not run: it must still start the same buckets
    make = lambda: fastbp.MLP([2, 3, 1], dtype=np.float64, seed=0)  # noqa: E731
    model = make()
    h = _fit(model, X, T, loss="mse", batch_size=4, shuffle=False, comm=comm,
             stop_on_nonfinite=False, overlap=True)  # fmt: skip
    assert _all_ok(comm, h["skipped_batches"] == [1, 1])
    assert _same_on_all_ranks(comm, model._params)
    reference = make()
    _fit(reference, X, T, loss="mse", batch_size=4, shuffle=False, comm=comm,
         stop_on_nonfinite=False)  # fmt: skip
    assert _all_ok(comm, np.array_equal(model._params, reference._params))


@pytest.mark.parametrize("early_stopping", [False, True])
def test_mpi_estimator_fit_equals_single_process(capsys, early_stopping: bool) -> None:
    comm = _world()
    X, y = _data(150)
    params: dict[str, Any] = {
        "hidden_layer_sizes": (12,),
        "max_iter": 5,
        "batch_size": 20,
        "early_stopping": early_stopping,
        "n_iter_no_change": 100,
        "dtype": "float64",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: max_iter is small on purpose
        single = fastbp.MLPClassifier(random_state=4, **params).fit(X, y)
        capsys.readouterr()
        # rank 0's random_state wins: the other ranks' differ, even None
        rs = 4 if comm.Get_rank() == 0 else (None if comm.Get_rank() % 2 else 99)
        dist = fastbp.MLPClassifier(random_state=rs, verbose=True, **params)
        dist.fit(X, y, comm=comm)
    out = capsys.readouterr().out
    ok = np.allclose(dist.model_._params, single.model_._params, rtol=1e-10, atol=1e-12)
    ok = ok and dist.n_iter_ == single.n_iter_
    ok = ok and np.allclose(dist.loss_curve_, single.loss_curve_, rtol=1e-10)
    assert _all_ok(comm, ok)
    assert _same_on_all_ranks(comm, dist.model_._params)
    assert _all_ok(comm, ("Iteration 5" in out) == (comm.Get_rank() == 0))
    assert _all_ok(comm, np.array_equal(dist.predict(X), single.predict(X)))


def test_mpi_estimator_partial_fit_keeps_ranks_identical() -> None:
    comm = _world()
    X, labels = _data(90)
    y = X[:, :2] @ np.array([1.0, -2.0]) + 0.1 * labels
    rs = 5 if comm.Get_rank() == 0 else None  # rank 0's seed is the one used
    dist = fastbp.MLPRegressor(hidden_layer_sizes=(7,), batch_size=12, random_state=rs)
    single = fastbp.MLPRegressor(hidden_layer_sizes=(7,), batch_size=12, random_state=5)
    for _ in range(3):
        dist.partial_fit(X, y, comm=comm)
        single.partial_fit(X, y)
    ok = np.allclose(dist.model_._params, single.model_._params, rtol=1e-4, atol=1e-6)
    assert _all_ok(comm, ok and dist.n_iter_ == single.n_iter_ == 3)
    assert _same_on_all_ranks(comm, dist.model_._params)
    assert _all_ok(comm, dist.loss_curve_ == comm.bcast(dist.loss_curve_, root=0))
