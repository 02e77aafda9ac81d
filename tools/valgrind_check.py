#!/usr/bin/env python3
"""Run a small fastbp workload under valgrind memcheck and fail on definite leaks from fastbp.

The workload builds models (with BatchNorm and Dropout, and a small one that trains through the
fused small-network step), fits, predicts, evaluates, runs the step API and every ops kernel, saves and loads, and triggers refused calls. valgrind reports
every "definitely lost" block; CPython and NumPy have their own (benign, at-exit) ones, so only
records whose allocation stack passes through fastbp's extension (_core / fbp_ symbols) count.

Usage: python tools/valgrind_check.py [--python PATH]   (exit 0 clean, 1 leaks, 2 no valgrind)
Takes ~1-3 minutes (valgrind runs ~30x slower).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

WORKLOAD = textwrap.dedent(
    """
    import os, tempfile
    import numpy as np
    import fastbp
    from fastbp import ops, optim

    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 8)).astype(np.float32)
    y = (X[:, :3].argmax(axis=1)).astype(np.int64)
    path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    for i in range(3):
        model = fastbp.Sequential(
            fastbp.Linear(8, 16), fastbp.BatchNorm1d(16), fastbp.ReLU(), fastbp.Dropout(0.2),
            fastbp.Linear(16, 3),
        )
        opt = optim.Adam(model.parameters(), lr=1e-2)
        model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=16, seed=i)
        model.predict(X)
        model.evaluate(X, y)
        out = model(X[:8])
        model.backward(np.ones_like(out))
        model.train_step(X[:8], y[:8], "cross_entropy", optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        fastbp.save(model, path)
        fastbp.load(path).predict(X)
        a = rng.standard_normal((40, 50)); b = rng.standard_normal((50, 30))
        ops.gemm(a, b, bias=np.ones(30), activation="tanh")
        ops.linear_backward(np.ones((40, 30)), a, b.T, None, "identity")
        ops.softmax_cross_entropy(a, np.zeros(40, np.int64))
        ops.mse(a, a)
        p = np.ones(100); g = np.ones(100); m = np.zeros(100); v = np.zeros(100)
        ops.sgd_step(p, g, m, lr=0.1, momentum=0.9)
        ops.adam_step(p, g, m, v, step=1)
        tiny = fastbp.MLP([8, 5, 3], activation="sigmoid", seed=i)  # the fused small-net step
        tiny.fit(X, y, loss="cross_entropy", epochs=2, batch_size=4, seed=i)
        tiny.train_step(X[:4], y[:4], "cross_entropy", optim.Adam(tiny.parameters()))
        for bad in (lambda: model.fit(X[:, :3], y), lambda: fastbp.load(path + ".missing")):
            try:
                bad()
            except (ValueError, TypeError, FileNotFoundError):
                pass
    print("WORKLOAD OK")
    """
)


# a frame in fastbp's extension: its C functions (fbp_*), Cython's (__pyx_*), or the .so itself
OURS = re.compile(r"\bfbp_\w+|__pyx_\w+|fastbp/_core\.cpython")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    valgrind = shutil.which("valgrind")
    if not valgrind:
        print("valgrind not found", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "workload.py")
        log = os.path.join(tmp, "valgrind.log")
        with open(script, "w") as f:
            f.write(WORKLOAD)
        env = dict(os.environ, PYTHONMALLOC="malloc", OMP_NUM_THREADS="1")
        cmd = [
            valgrind,
            "--tool=memcheck",
            "--leak-check=full",
            "--show-leak-kinds=definite",
            "--num-callers=40",
            f"--log-file={log}",
            args.python,
            script,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        with open(log) as f:
            text = f.read()
    if proc.returncode != 0 or "WORKLOAD OK" not in proc.stdout:
        print(proc.stdout, proc.stderr, text[-4000:], sep="\n")
        print("valgrind_check: the workload failed under valgrind")
        return 1
    # a record: from its "definitely lost" line up to the next blank "==pid== " line
    blocks = re.split(r"\n==\d+== ?\n", text)
    ours = [b for b in blocks if "definitely lost in loss record" in b and OURS.search(b)]
    total = [b for b in blocks if "definitely lost in loss record" in b]
    summary = re.search(r"definitely lost: .*", text)
    errors = re.search(r"ERROR SUMMARY: .*", text)
    print(f"valgrind: {summary.group(0) if summary else 'no leak summary'}")
    print(
        f"valgrind: {len(total)} definitely-lost records, {len(ours)} through fastbp (fbp_*/__pyx_*/_core.so)"
    )
    print(f"valgrind: {errors.group(0) if errors else ''}")
    invalid = [
        b for b in blocks if re.search(r"Invalid (read|write)|uninitialised", b) and OURS.search(b)
    ]
    for b in ours + invalid:
        print(b)
    if invalid:
        print(f"valgrind_check: {len(invalid)} memory errors in fastbp's code")
    return 1 if ours or invalid else 0


if __name__ == "__main__":
    sys.exit(main())
