"""Data-parallel throughput: one epoch of W3 (784-256-128-10, float32, batch 128, Adam) on
Fashion-MNIST (random data of the same shape when it is not installed).

    python bench/mpi_bench.py --threads 2                 # 1 rank x 2 threads (plain fit)
    mpiexec -n 2 python bench/mpi_bench.py --threads 1    # 2 ranks x 1 thread (fit(comm=...))

Rank 0 prints the epoch's samples/s and, measured apart from training, the time of one
compute_gradients call on a rank's shard and of one Allreduce of the flat gradient buffer.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

import fastbp
from fastbp.distributed import shard_rows


def _data() -> tuple[np.ndarray, np.ndarray, str]:
    try:
        images, labels = fastbp.datasets.load_fashion_mnist()
    except (FileNotFoundError, OSError):
        rng = np.random.default_rng(0)
        return (
            rng.random((60000, 784), dtype=np.float32),
            rng.integers(0, 10, 60000).astype(np.int64),
            "random",
        )
    return fastbp.datasets.scale_and_flatten(images), labels, "fashion-mnist"


def _median_seconds(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    """Parse the options, run the epoch and the timings, print on rank 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per rank")
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--no-mpi", action="store_true", help="plain fit, without mpi4py")
    args = parser.parse_args()
    fastbp.set_num_threads(args.threads)

    comm = None
    if not args.no_mpi:
        try:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        except ImportError:
            comm = None
    rank = comm.Get_rank() if comm is not None else 0
    size = comm.Get_size() if comm is not None else 1
    X, y, source = _data()
    model = fastbp.MLP([784, 256, 128, 10], seed=0)
    opt = fastbp.optim.Adam(model.parameters(), lr=1e-3)
    # a 1-rank world trains without the communicator: the plain C loop is the baseline
    fit_comm = comm if size > 1 else None
    model.fit(
        X[:1024], y[:1024], loss="cross_entropy", optimizer=opt, batch_size=128, comm=fit_comm
    )
    if comm is not None:
        comm.Barrier()
    history = model.fit(
        X,
        y,
        loss="cross_entropy",
        optimizer=opt,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=1,
        comm=fit_comm,
    )

    # The parts of one step, timed apart: this rank's shard of a batch, and the reduction.
    k = shard_rows(args.batch_size, size, rank)
    xs, ys = X[:k].copy(), y[:k].copy()
    compute = _median_seconds(lambda: model._plan.compute_gradients(xs, ys, 2, 1.0), 50)
    allreduce = float("nan")
    if comm is not None and size > 1:
        from mpi4py import MPI

        grads = model._grads
        comm.Barrier()
        allreduce = _median_seconds(lambda: comm.Allreduce(MPI.IN_PLACE, grads, op=MPI.SUM), 200)
    if rank == 0:
        steps = -(-X.shape[0] // args.batch_size)
        sps = history["samples_per_sec"][-1]
        print(
            f"W3 on {source} ({X.shape[0]} rows), global batch {args.batch_size}: "
            f"{size} rank(s) x {args.threads} thread(s) ({fastbp.get_config()['isa']})\n"
            f"  epoch: {history['time'][-1]:.2f} s, {sps:,.0f} samples/s, "
            f"{1e3 * history['time'][-1] / steps:.3f} ms per step\n"
            f"  compute_gradients on a {k}-row shard: {1e3 * compute:.3f} ms\n"
            f"  Allreduce of {model._grads.size:,} float32 gradients "
            f"({model._grads.nbytes / 2**20:.2f} MiB): "
            + (f"{1e3 * allreduce:.3f} ms" if allreduce == allreduce else "n/a (1 rank)"),
            flush=True,
        )


if __name__ == "__main__":
    main()
