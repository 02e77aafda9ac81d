"""Data-parallel throughput: one epoch of W3 (784-256-128-10, float32, batch 128, Adam) on
Fashion-MNIST (random data of the same shape when it is not installed).

    python bench/mpi_bench.py --threads 2                 # 1 rank x 2 threads (plain fit)
    mpiexec -n 2 python bench/mpi_bench.py --threads 1    # 2 ranks x 1 thread (fit(comm=...))
    mpiexec -n 2 python bench/mpi_bench.py --overlap      # Allreduce overlapped with backward
    ... --hidden 1024,1024,1024                           # a deeper net than W3's 256,128

Rank 0 prints the epoch's samples/s and, measured apart from training, the time of one
compute_gradients call on a rank's shard and of one Allreduce of the flat gradient buffer.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

import fastbp
import fastbp.distributed
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
    parser.add_argument(
        "--overlap", action="store_true", help="fit(overlap=True): Iallreduce during backward"
    )
    parser.add_argument(
        "--bucket-kib",
        type=float,
        default=fastbp.distributed.BUCKET_BYTES / 1024,
        help="with --overlap: the least KiB per Iallreduce",
    )
    parser.add_argument("--hidden", default="256,128", help="hidden layer widths (W3: 256,128)")
    args = parser.parse_args()
    fastbp.set_num_threads(args.threads)
    fastbp.distributed.BUCKET_BYTES = int(args.bucket_kib * 1024)
    sizes = [784, *(int(w) for w in args.hidden.split(",")), 10]

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
    model = fastbp.MLP(sizes, seed=0)
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
        overlap=args.overlap and fit_comm is not None,
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
    layout = fastbp.distributed.gradient_buckets(
        model._ops, model._grads.size, model._grads.itemsize, fastbp.distributed.BUCKET_BYTES
    )
    overlapped = args.overlap and size > 1 and layout is not None and len(layout) > 1
    buckets = f"{len(layout)} buckets overlapped" if overlapped else "no overlap"
    if rank == 0:
        steps = -(-X.shape[0] // args.batch_size)
        sps = history["samples_per_sec"][-1]
        print(
            f"{'-'.join(map(str, sizes))} on {source} ({X.shape[0]} rows), global batch "
            f"{args.batch_size}: {size} rank(s) x {args.threads} thread(s) "
            f"({fastbp.get_config()['isa']}), {buckets}\n"
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
