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

import fastbp
from fastbp.bench.products import Product, _operands, step_products


def default_products() -> list[Product]:
    """A square product, then W3's and W4's forward (B = W.T), weight-gradient (A = dZ.T) and
    input-gradient products, but for the tiny ones of their 10-class output layers."""
    hidden = step_products((784, 256, 128), 128) + step_products((784, 1024, 1024), 256)
    return [Product("1024x1024x1024", 1024, 1024, 1024), *hidden]


def parse_shape(text: str) -> Product:
    """``MxNxK`` with an optional ``:ta``, ``:tb`` or ``:ta,tb`` suffix."""
    dims, _, flags = text.partition(":")
    try:
        m, n, k = (int(d) for d in dims.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be MxNxK[:ta,tb], got {text!r}") from None
    marks = {f for f in flags.split(",") if f}
    if min(m, n, k) < 1 or not marks <= {"ta", "tb"}:
        raise argparse.ArgumentTypeError(f"shape must be MxNxK[:ta,tb], got {text!r}")
    return Product(text, m, n, k, trans_a="ta" in marks, trans_b="tb" in marks)


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


def compare(gemms: dict, p: Product, dtype: np.dtype, rounds: int) -> str:
    """One line: both builds' GFLOP/s on ``p``, new / old, and whether the bits agree."""
    m, n, k = p.m, p.n, p.k
    a, b, c = _operands(p, dtype, np.random.default_rng(0))
    rs_a, cs_a = (1, m) if p.trans_a else (k, 1)
    rs_b, cs_b = (1, k) if p.trans_b else (n, 1)
    args = (c.ctypes.data, a.ctypes.data, b.ctypes.data, None, m, n, k)
    args += (rs_a, cs_a, rs_b, cs_b, n, 1.0, 0.0, 0)
    results = {}
    for who, gemm in gemms.items():
        if gemm(*args) != 0:
            raise SystemExit(f"{who}'s fbp_gemm failed on {p.shape}")
        results[who] = c.copy()
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
    rate = {who: p.flops / statistics.median(t) / 1e9 for who, t in times.items()}
    same = np.array_equal(results["old"], results["new"])
    marks = ",".join(f for f, on in (("ta", p.trans_a), ("tb", p.trans_b)) if on)
    label = p.shape + (f":{marks}" if marks else "")
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
    available = fastbp.get_config()["available_isas"]
    isa = args.isa or fastbp.get_config()["isa"]
    if isa not in available:
        parser.error(f"this CPU runs {', '.join(available)}, not {isa}")
    dtype = np.dtype(args.dtype)
    gemms = {
        "old": load_gemm(args.old, dtype, isa, args.threads),
        "new": load_gemm(args.new, dtype, isa, args.threads),
    }
    for product in args.shapes or default_products():
        print(compare(gemms, product, dtype, args.rounds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
