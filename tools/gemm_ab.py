#!/usr/bin/env python3
"""Compare the GEMM of two fastbp builds in one process, call by call, to beat the host's drift.

Timing two builds in separate processes compares two moments of a shared machine as much as two
kernels (this project's hosts drift 5-15% within minutes). This loads each build's extension
(``_core*.so``) with ctypes, privately (RTLD_LOCAL, so the two sets of ``fbp_*`` symbols do not
clash), and calls one ISA's ``fbp_gemm_<dtype>_<isa>`` of each in turn on the same aligned
operands: rounds alternate which build goes first, each round is as many calls as fill ~4 ms,
and each build's time is the median over its rounds. It also says whether the two builds'
results have the same bits.

Build the old one aside, e.g.::

    git worktree add /tmp/old <commit>
    (cd /tmp/old && pip install --no-build-isolation --no-deps -t /tmp/old-site .)
    python tools/gemm_ab.py --old /tmp/old-site/fastbp --new build/editable

Two identical builds read 0.98-1.02 at 21 rounds; trust a shift only beyond that, and in the
same direction on a rerun.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import statistics
import sys
import time

import numpy as np

# m, n, k, A stored transposed, B stored transposed: a square product, then W3's and W4's
# forward (B = W.T), weight-gradient (A = dZ.T) and input-gradient products
DEFAULT_SHAPES = (
    "1024x1024x1024",
    "128x256x784:tb",
    "256x784x128:ta",
    "128x128x256:tb",
    "128x256x128",
    "256x1024x784:tb",
    "1024x784x256:ta",
    "256x1024x1024:tb",
    "1024x1024x256:ta",
    "256x1024x1024",
)


def parse_shape(text: str) -> tuple[int, int, int, bool, bool]:
    """``MxNxK`` with an optional ``:ta``, ``:tb`` or ``:ta,tb`` suffix."""
    dims, _, flags = text.partition(":")
    try:
        m, n, k = (int(d) for d in dims.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be MxNxK[:ta,tb], got {text!r}") from None
    marks = {f for f in flags.split(",") if f}
    if min(m, n, k) < 1 or not marks <= {"ta", "tb"}:
        raise argparse.ArgumentTypeError(f"shape must be MxNxK[:ta,tb], got {text!r}")
    return m, n, k, "ta" in marks, "tb" in marks


def find_extension(path: str) -> str:
    """The ``_core*.so`` at ``path`` (the file, or a folder holding it)."""
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "_core*.so")))
    if not found:
        raise SystemExit(f"no _core*.so in {path}")
    return found[0]


def load_gemm(path: str, dtype: np.dtype, isa: str, threads: int):
    """One build's fbp_gemm for ``dtype`` and ``isa``, its thread count set."""
    lib = ctypes.CDLL(find_extension(path), mode=ctypes.RTLD_LOCAL)
    sfx = "f64" if dtype == np.float64 else "f32"
    try:
        gemm = getattr(lib, f"fbp_gemm_{sfx}_{isa}")
    except AttributeError:
        raise SystemExit(f"{path} has no fbp_gemm_{sfx}_{isa}") from None
    real = ctypes.c_double if dtype == np.float64 else ctypes.c_float
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    gemm.argtypes = [ptr, ptr, ptr, ptr] + [i64] * 8 + [real, real, ctypes.c_int]
    gemm.restype = ctypes.c_int
    lib.fbp_set_num_threads(threads)
    return gemm


def aligned(shape: tuple[int, int], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """A 64-byte aligned C-contiguous array of uniform [0, 1) values."""
    size = shape[0] * shape[1]
    buf = np.empty(size + 64 // dtype.itemsize, dtype)
    start = (-buf.ctypes.data % 64) // dtype.itemsize
    out = buf[start : start + size].reshape(shape)
    out[...] = rng.random(shape)
    return out


def compare(gemms: dict, shape: tuple[int, int, int, bool, bool], dtype, rounds: int) -> str:
    """One line: both builds' GFLOP/s on ``shape``, new / old, and whether the bits agree."""
    m, n, k, ta, tb = shape
    rng = np.random.default_rng(0)
    a = aligned((k, m) if ta else (m, k), dtype, rng)
    b = aligned((n, k) if tb else (k, n), dtype, rng)
    c = aligned((m, n), dtype, rng)
    rs_a, cs_a = (1, m) if ta else (k, 1)
    rs_b, cs_b = (1, k) if tb else (n, 1)
    args = (c.ctypes.data, a.ctypes.data, b.ctypes.data, None, m, n, k)
    args += (rs_a, cs_a, rs_b, cs_b, n, 1.0, 0.0, 0)
    results = {}
    for who, gemm in gemms.items():
        if gemm(*args) != 0:
            raise SystemExit(f"{who}'s fbp_gemm failed on {m}x{n}x{k}")
        results[who] = c.copy()
    flops = 2.0 * m * n * k
    t0 = time.perf_counter()
    gemms["old"](*args)
    one = max(time.perf_counter() - t0, 1e-7)
    calls = min(100_000, max(1, int(4e-3 / one)))
    times: dict[str, list[float]] = {who: [] for who in gemms}
    order = list(gemms)
    for r in range(rounds):
        for who in order if r % 2 == 0 else order[::-1]:
            gemm = gemms[who]
            t0 = time.perf_counter()
            for _ in range(calls):
                gemm(*args)
            times[who].append((time.perf_counter() - t0) / calls)
    rate = {who: flops / statistics.median(t) / 1e9 for who, t in times.items()}
    same = np.array_equal(results["old"], results["new"])
    marks = ",".join(f for f, on in (("ta", ta), ("tb", tb)) if on)
    label = f"{m}x{n}x{k}" + (f":{marks}" if marks else "")
    return (
        f"{label:20s} old {rate['old']:7.1f}  new {rate['new']:7.1f} GFLOP/s  "
        f"new/old {rate['new'] / rate['old']:.3f}  {'same bits' if same else 'bits differ'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", required=True, help="the old build's _core*.so, or its folder")
    parser.add_argument("--new", required=True, help="the new build's _core*.so, or its folder")
    parser.add_argument(
        "--isa",
        choices=("avx512", "avx2", "generic"),
        help="the kernels to compare (default: the best this CPU runs, as fastbp picks)",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("shapes", nargs="*", type=parse_shape, help="MxNxK[:ta,tb] ...")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.rounds < 1:
        parser.error("--threads and --rounds must be at least 1")
    import fastbp  # this environment's build says what the CPU runs

    available = fastbp.get_config()["available_isas"]
    isa = args.isa or fastbp.get_config()["isa"]
    if isa not in available:
        parser.error(f"this CPU runs {', '.join(available)}, not {isa}")
    dtype = np.dtype(args.dtype)
    gemms = {
        "old": load_gemm(args.old, dtype, isa, args.threads),
        "new": load_gemm(args.new, dtype, isa, args.threads),
    }
    for shape in args.shapes or [parse_shape(s) for s in DEFAULT_SHAPES]:
        print(compare(gemms, shape, dtype, args.rounds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
