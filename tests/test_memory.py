"""No leaks: repeated load/fit/predict/evaluate/save cycles (and kernel calls, and failed calls)
keep the process's resident memory flat.

RSS is read from /proc/self/statm (after gc.collect() and glibc's malloc_trim(0)) after a warm-up (allocator arenas, OpenMP pools, the kernels'
per-thread scratch, NumPy caches all reach their steady size first). The bound: each cycle
allocates a model whose parameter buffer, gradient buffer, Adam moments and C workspace total
more than BYTES_PER_CYCLE; leaking any one of them for CYCLES cycles would grow RSS by at least
CYCLES x that. We allow a quarter of the smallest such leak, which is still several MiB above
the measured noise (< 1 MiB: glibc returns or reuses the freed blocks).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

import numpy as np
import pytest

import fastbp
from fastbp import ops, optim

pytestmark = [
    pytest.mark.skipif(
        not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)"
    ),
    pytest.mark.skipif(
        "libasan" in os.environ.get("LD_PRELOAD", ""),
        reason="ASan's quarantine keeps freed memory resident by design",
    ),
]

SIZES = [64, 192, 10]  # 64*192 + 192 + 192*10 + 10 = 14,410 float32 parameters: 57.6 KB a buffer
CYCLES = 300
BUFFER_BYTES = 4 * (64 * 192 + 192 + 192 * 10 + 10)
ALLOWED_GROWTH = CYCLES * BUFFER_BYTES // 4  # ~4.3 MB; one leaked buffer per cycle = 17 MB


def _malloc_trim() -> None:
    """Hand glibc's freed-but-retained heap pages back to the OS, so RSS measures live memory.

    Without it RSS wanders by ~10-20 MiB with the allocator's retention (freed workspaces of
    earlier models stay mapped) while malloc_trim shows it flat: retention, not a leak."""
    name = ctypes.util.find_library("c")
    if name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def rss_bytes() -> int:
    gc.collect()
    _malloc_trim()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(cycle, warmup: int = 40, cycles: int = CYCLES) -> int:
    for i in range(warmup):
        cycle(i)
    start = rss_bytes()
    for i in range(cycles):
        cycle(warmup + i)
    return rss_bytes() - start


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((256, SIZES[0])).astype(np.float32)
    return X, (X[:, : SIZES[-1]].argmax(axis=1)).astype(np.int64)


def test_fit_predict_save_load_cycles_keep_memory_flat(tmp_path, data):
    """Each cycle loads the model from disk (a new Sequential, plan and workspace), fits one
    epoch with a new Adam, predicts, evaluates and saves it back; RSS growth over 300 cycles
    stays below a quarter of what leaking one parameter-sized buffer per cycle would cost."""
    X, y = data
    path = tmp_path / "m.safetensors"
    fastbp.save(fastbp.MLP(SIZES, seed=0), path)

    def cycle(i):
        model = fastbp.load(path)
        opt = optim.Adam(model.parameters(), lr=1e-3)
        model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=64, seed=i)
        model.predict(X)
        model.evaluate(X, y)
        fastbp.save(model, path)

    growth = _measure(cycle)
    assert growth < ALLOWED_GROWTH, f"RSS grew by {growth / 2**20:.2f} MiB over {CYCLES} cycles"


def test_step_api_and_kernel_cycles_keep_memory_flat(data):
    """forward/backward/train_step on a fresh model each cycle and every ops kernel (gemm large
    enough to pack and use the per-thread scratch) keep RSS flat."""
    X, y = data
    rng = np.random.default_rng(1)
    a = rng.standard_normal((96, 128))
    b = rng.standard_normal((128, 80))
    p, g = rng.standard_normal(BUFFER_BYTES // 8), rng.standard_normal(BUFFER_BYTES // 8)
    m, v = np.zeros_like(p), np.zeros_like(p)

    def cycle(i):
        model = fastbp.MLP(SIZES, activation="sigmoid", seed=i)
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        out = model(X[:32])
        model.backward(np.ones_like(out))
        model.train_step(X[:32], y[:32], "cross_entropy", opt)
        ops.gemm(a, b, bias=np.ones(80), activation="tanh")
        ops.linear_backward(
            np.ones((96, 80)), a, b.T, ops.linear_forward(a, b.T, activation="relu"), "relu"
        )
        ops.softmax_cross_entropy(a, np.zeros(96, np.int64))
        ops.mse(a, a)
        ops.sgd_step(p, g, m, lr=0.01, momentum=0.9)
        ops.adam_step(p, g, m, v, step=i + 1)

    growth = _measure(cycle)
    assert growth < ALLOWED_GROWTH, f"RSS grew by {growth / 2**20:.2f} MiB over {CYCLES} cycles"


def test_failed_calls_keep_memory_flat(tmp_path, data):
    """Calls refused by validation, failed loads and models whose construction fails in C or
    Python free what they allocated: RSS stays flat over hundreds of failures."""
    X, y = data
    model = fastbp.MLP(SIZES, seed=0)
    bad_file = tmp_path / "bad.safetensors"
    bad_file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b"\x00" * 64)
    X_nan = X.copy()
    X_nan[0, 0] = np.nan
    y_bad = y.copy()
    y_bad[0] = 99

    def cycle(i):
        for call in (
            lambda: model.fit(X_nan, y, loss="cross_entropy", epochs=1),
            lambda: model.fit(X, y_bad, loss="cross_entropy", epochs=1),
            lambda: model.predict(X[0]),
            lambda: fastbp.load(bad_file),
            lambda: fastbp.Sequential(fastbp.Linear(64, 192), fastbp.Linear(10, 3)),
            lambda: ops.gemm(X, X),
        ):
            with pytest.raises((ValueError, TypeError)):
                call()

    growth = _measure(cycle)
    assert growth < ALLOWED_GROWTH, f"RSS grew by {growth / 2**20:.2f} MiB over {CYCLES} cycles"
