"""The reference workloads of WORKLOADS.md (W0-W5), reproduced through fastbp's public API.

W0 is checked against the 4-decimal table and, in float64, against an independent NumPy
forward/backward written out by hand; W1, W2 and W5 against their stated outcomes (and W5 against
its closed form); W3 and W4 are shape-faithful training runs kept short enough for the test suite.
Parity with torch on the same workloads lives in test_torch_parity.py.
"""

from __future__ import annotations

import gzip
import os
import pathlib

import numpy as np
import pytest

import fastbp

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]

# ---- W0: the worked backpropagation example --------------------------------------------------

W0_X = np.array([[0.05, 0.10]])
W0_T = np.array([[0.01, 0.99]])
W0_W1 = np.array([[0.15, 0.20], [0.25, 0.30]])
W0_B1 = np.array([0.35, 0.35])
W0_W2 = np.array([[0.40, 0.45], [0.50, 0.55]])
W0_B2 = np.array([0.60, 0.60])
W0_LR = 0.5

# The table of WORKLOADS.md, to 4 decimals.
W0_TABLE = {
    "output": np.array([[0.7514, 0.7729]]),
    "loss": 0.2984,
    "grad_W1": np.array([[0.0004, 0.0009], [0.0005, 0.0010]]),
    "grad_W2": np.array([[0.0822, 0.0827], [-0.0226, -0.0227]]),
    "0.weight": np.array([[0.1498, 0.1996], [0.2498, 0.2995]]),
    "0.bias": np.array([0.3456, 0.3450]),
    "2.weight": np.array([[0.3589, 0.4087], [0.5113, 0.5614]]),
    "2.bias": np.array([0.5308, 0.6190]),
}
# "Equals the table to 4 decimals": within half a unit of the 4th decimal (what rounding to 4
# decimals means, without np.round's dtype-dependent tie behaviour).
HALF_UNIT_4DP = 5e-5


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def w0_reference() -> dict[str, np.ndarray]:
    """W0 in float64 NumPy, forward and backward written out by hand (independent of fastbp)."""
    z1 = W0_X @ W0_W1.T + W0_B1
    h = _sigmoid(z1)
    z2 = h @ W0_W2.T + W0_B2
    out = _sigmoid(z2)
    loss = np.sum((out - W0_T) ** 2) / 2
    d2 = (out - W0_T) * out * (1 - out)  # dL/dz2
    d1 = (d2 @ W0_W2) * h * (1 - h)  # dL/dz1
    ref = {
        "output": out,
        "loss": np.float64(loss),
        "grad_W1": d1.T @ W0_X,
        "grad_b1": d1.sum(axis=0),
        "grad_W2": d2.T @ h,
        "grad_b2": d2.sum(axis=0),
        "dx": d1 @ W0_W1,
    }
    ref["0.weight"] = W0_W1 - W0_LR * ref["grad_W1"]
    ref["0.bias"] = W0_B1 - W0_LR * ref["grad_b1"]
    ref["2.weight"] = W0_W2 - W0_LR * ref["grad_W2"]
    ref["2.bias"] = W0_B2 - W0_LR * ref["grad_b2"]
    return ref


def run_w0(dtype) -> dict[str, np.ndarray]:
    """W0 through fastbp's step API: weights set in place, forward, backward(out - t), SGD step."""
    model = fastbp.Sequential(
        fastbp.Linear(2, 2, dtype=dtype),
        fastbp.Sigmoid(),
        fastbp.Linear(2, 2, dtype=dtype),
        fastbp.Sigmoid(),
    )
    model[0].weight.data[...] = W0_W1
    model[0].bias.data[...] = W0_B1
    model[2].weight.data[...] = W0_W2
    model[2].bias.data[...] = W0_B2
    x, t = W0_X.astype(dtype), W0_T.astype(dtype)
    out = model(x)
    got = {"output": out.copy(), "loss": np.sum((out.astype(np.float64) - W0_T) ** 2) / 2}
    got["dx"] = model.backward(out - t)
    got["grad_W1"] = model[0].weight.grad.copy()
    got["grad_b1"] = model[0].bias.grad.copy()
    got["grad_W2"] = model[2].weight.grad.copy()
    got["grad_b2"] = model[2].bias.grad.copy()
    fastbp.optim.SGD(model.parameters(), lr=W0_LR).step()
    got.update(model.state_dict())
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_w0_matches_the_table(dtype):
    """W0's output, loss, weight gradients and post-step parameters equal the 4-decimal table,
    in float32 and float64."""
    got = run_w0(dtype)
    for key, expected in W0_TABLE.items():
        value = np.asarray(got[key], dtype=np.float64)
        assert value.shape == np.shape(expected), key
        dev = np.max(np.abs(value - expected))
        assert dev <= HALF_UNIT_4DP, f"{key}: {value} is not {expected} to 4 decimals"


def test_w0_float64_is_exact():
    """In float64, every W0 quantity (including the bias gradients and dL/dx, which the table
    omits) equals the hand-written NumPy reference to 1e-10.

    All values are O(1) and come from ~10 float64 operations, so the two computations agree to a
    few ulps (~1e-16); 1e-10 is the brief's bound and is far below the 4th decimal, so any
    formula slip (e.g. a missing sigmoid derivative) fails by orders of magnitude."""
    got, ref = run_w0(np.float64), w0_reference()
    for key, expected in ref.items():
        value = np.asarray(got[key])
        assert value.dtype == np.float64, key
        np.testing.assert_allclose(value, expected, rtol=0, atol=1e-10, err_msg=key)


def test_w0_float32_is_float64_rounded():
    """In float32, W0 equals the float64 reference to float32 rounding: each value is O(1) and
    goes through at most ~15 float32 operations (u = 6e-8), so |error| <= 15u ~ 1e-6."""
    got, ref = run_w0(np.float32), w0_reference()
    for key, expected in ref.items():
        value = np.asarray(got[key], dtype=np.float64)
        np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6, err_msg=key)


# ---- W1: linear regression by minibatch SGD -----------------------------------------------------

W1_TRUE_W = np.array([2.0, -3.4])
W1_TRUE_B = 4.2


def w1_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(0, 1, size=(1000, 2))
    y = X @ W1_TRUE_W + W1_TRUE_B + rng.normal(0, 0.01, size=1000)
    w0 = rng.normal(0, 0.01, size=(1, 2))
    perms = [rng.permutation(1000) for _ in range(3)]
    return X, y.reshape(-1, 1), w0, perms


def w1_model(dtype, w0: np.ndarray) -> fastbp.Sequential:
    model = fastbp.Sequential(fastbp.Linear(2, 1, dtype=dtype))
    model[0].weight.data[...] = w0
    model[0].bias.data[...] = 0
    return model


def w1_halved_mse(model: fastbp.Sequential, X: np.ndarray, y: np.ndarray) -> float:
    """W1's loss, (yhat - y)^2 / 2 averaged, on the whole data set."""
    pred = model.predict(X).astype(np.float64)
    return float(np.mean((pred - y) ** 2) / 2)


def assert_w1_solved(model: fastbp.Sequential, X: np.ndarray, y: np.ndarray) -> None:
    w = model[0].weight.data.reshape(-1).astype(np.float64)
    b = float(model[0].bias.data[0])
    assert np.all(np.abs(w - W1_TRUE_W) < 0.01), w
    assert abs(b - W1_TRUE_B) < 0.01, b
    # The noise floor is E[noise^2]/2 = 5e-5 ("final loss ~5e-5"); 1e-4 allows for a residual
    # parameter error of ~0.007 (sqrt(2 * 5e-5)) on top of it.
    loss = w1_halved_mse(model, X.astype(model.dtype), y)
    assert loss < 1e-4, loss


def w1_step_api(dtype, X, y, w0, perms) -> fastbp.Sequential:
    """W1 with the step API: forward, backward((yhat - y) / B), SGD(lr 0.03) step, zero_grad."""
    model = w1_model(dtype, w0)
    opt = fastbp.optim.SGD(model.parameters(), lr=0.03)
    Xd, yd = X.astype(dtype), y.astype(dtype)
    for perm in perms:
        for start in range(0, len(perm), 10):
            idx = perm[start : start + 10]
            yhat = model(Xd[idx])
            model.backward((yhat - yd[idx]) / len(idx))
            opt.step()
            opt.zero_grad()
    return model


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_w1_step_api(dtype):
    """W1 through forward/backward/step: 3 shuffled epochs of batch-10 SGD at lr 0.03 recover
    w = [2, -3.4] and b = 4.2 to 0.01 and reach the ~5e-5 noise floor."""
    X, y, w0, perms = w1_data()
    model = w1_step_api(dtype, X, y, w0, perms)
    assert_w1_solved(model, X, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_w1_fit(dtype):
    """W1 through fit: loss='mse' is the mean of (yhat - y)^2, twice W1's loss, so SGD at lr
    0.015 is the same algorithm; 3 shuffled epochs solve the problem, and the epoch losses
    fall to about the noise level (twice W1's 5e-5)."""
    X, y, w0, _ = w1_data()
    model = w1_model(dtype, w0)
    opt = fastbp.optim.SGD(model.parameters(), lr=0.015)
    history = model.fit(
        X.astype(dtype), y, loss="mse", optimizer=opt, epochs=3, batch_size=10, seed=0
    )
    assert_w1_solved(model, X, y)
    losses = history["loss"]
    assert len(losses) == 3
    assert losses[0] > losses[1] > losses[2]
    assert losses[2] < 1e-3, losses


def test_w1_fit_equals_step_api():
    """fit(loss='mse', lr=0.015) is W1's step-API algorithm exactly: on the same batches in the
    same order (fit with shuffle=False on each epoch's pre-permuted data), the float64 parameters
    after 3 epochs agree with the step API's to 1e-12.

    The two differ only in where the factor 2 of the MSE gradient meets the learning rate
    (2 * 0.015 vs 0.03 / 1: both exact in binary scaling of the same products, up to a rounding
    or two per step), over 300 contracting steps of a 3-parameter model: ~1e-15 expected."""
    X, y, w0, perms = w1_data()
    stepped = w1_step_api(np.float64, X, y, w0, perms)
    fitted = w1_model(np.float64, w0)
    opt = fastbp.optim.SGD(fitted.parameters(), lr=0.015)
    for perm in perms:
        fitted.fit(X[perm], y[perm], loss="mse", optimizer=opt, batch_size=10, shuffle=False)
    for key, value in stepped.state_dict().items():
        np.testing.assert_allclose(fitted.state_dict()[key], value, rtol=0, atol=1e-12)


# ---- W2: tiny MLP regression, one sample at a time ----------------------------------------------


def w2_model(dtype, seed: int = 0) -> fastbp.Sequential:
    rng = np.random.default_rng(seed)
    return fastbp.Sequential(
        fastbp.Linear(1, 2, dtype=dtype, rng=rng),
        fastbp.Sigmoid(),
        fastbp.Linear(2, 5, dtype=dtype, rng=rng),
        fastbp.Sigmoid(),
        fastbp.Linear(5, 1, dtype=dtype, rng=rng),
    )


def w2_data(dtype):
    x = np.linspace(0, 3, 100).reshape(-1, 1)
    return x.astype(dtype), (2.3 * x + 4.7).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_w2_fit_save_load(dtype, tmp_path):
    """W2: 200 epochs of batch-1 Adam(0.02) on MSE in sample order (20,000 steps) fit the line
    2.3x + 4.7; the model saved and loaded back predicts bitwise the same values.

    Measured with this init (rng seed 0): final-epoch loss 0.0025 and max |pred - line| 0.207 in
    both dtypes. Batch-1 Adam at lr 0.02 never settles (the last epoch's loss wanders between
    6e-4 and 0.08 over 40 initialisations), so the bounds are the brief's: loss < 0.05 (20x the
    measurement) and max error < 0.5 (2.4x), still far below the untrained error (~8 at x = 3).
    """
    model = w2_model(dtype)
    x, y = w2_data(dtype)
    untrained = np.max(np.abs(model.predict(x) - y))
    opt = fastbp.optim.Adam(model.parameters(), lr=0.02)
    history = model.fit(
        x, y, loss=fastbp.MSELoss(), optimizer=opt, epochs=200, batch_size=1, shuffle=False
    )
    assert len(history["loss"]) == 200
    assert history["loss"][-1] < 0.05, history["loss"][-1]
    assert history["loss"][-1] < history["loss"][0] / 100
    pred = model.predict(x)
    assert pred.dtype == dtype
    err = np.max(np.abs(pred.astype(np.float64) - (2.3 * x.astype(np.float64) + 4.7)))
    assert err < 0.5, err
    assert untrained > 10 * err

    path = tmp_path / "w2.safetensors"
    fastbp.save(model, path)
    loaded = fastbp.load(path)
    assert loaded.dtype == model.dtype
    assert [type(layer) for layer in loaded] == [type(layer) for layer in model]
    for key, value in model.state_dict().items():
        assert np.array_equal(loaded.state_dict()[key], value), key
    assert np.array_equal(loaded.predict(x), pred)
    loaded.eval()
    assert np.array_equal(loaded(x), pred)


# ---- W3: image-classification MLP ---------------------------------------------------------------


def test_w3_shaped_training_learns():
    """A W3-shaped run (784-256-128-10 ReLU, softmax cross-entropy on integer labels, batch 128,
    shuffled, Adam 1e-3) learns a learnable synthetic problem: labels are the argmax of a fixed
    random linear map of X. Over 2 epochs of 4096 samples the epoch loss falls, and the trained
    model beats chance by far.

    Measured: epoch losses 2.25 then 1.55, evaluation loss 2.31 -> 0.70, accuracy 0.10 -> 0.90.
    The bounds (loss halves, accuracy > 0.6) leave wide room for other inits and ISAs while
    ruling out a model that does not learn (chance is 0.1, loss ln 10 = 2.30)."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((4096, 784)).astype(np.float32)
    y = np.argmax(X @ rng.standard_normal((784, 10)), axis=1)
    model = fastbp.MLP([784, 256, 128, 10], seed=0)
    before = model.evaluate(X, y)
    history = model.fit(
        X,
        y,
        loss="cross_entropy",
        optimizer=fastbp.optim.Adam(model.parameters(), lr=1e-3),
        epochs=2,
        batch_size=128,
        seed=0,
    )
    losses = history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[1] < losses[0]
    after = model.evaluate(X, y)
    assert after["loss"] < before["loss"] / 2, (before, after)
    assert after["accuracy"] > 0.6, after


def _fashion_mnist_dir() -> pathlib.Path | None:
    """Where Debian's dataset-fashion-mnist puts the IDX files (or FASHION_MNIST_DIR)."""
    candidates = [
        os.environ.get("FASHION_MNIST_DIR", ""),
        "/usr/share/datasets/fashion-mnist",
        "/usr/share/dataset-fashion-mnist",
    ]
    for folder in candidates:
        if folder and (pathlib.Path(folder) / "train-images-idx3-ubyte.gz").is_file():
            return pathlib.Path(folder)
    return None


def _read_idx(path: pathlib.Path) -> np.ndarray:
    """An IDX file (gzip): 2 zero bytes, a type byte (0x08: uint8), ndim, big-endian dims."""
    raw = gzip.decompress(path.read_bytes())
    assert raw[:3] == b"\x00\x00\x08", path
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.mark.skipif(_fashion_mnist_dir() is None, reason="dataset-fashion-mnist not installed")
def test_w3_fashion_mnist_one_epoch():
    """W3 on the real Fashion-MNIST: one shuffled epoch (469 steps) of Adam 1e-3 at batch 128
    reaches > 80% test accuracy.

    Measured over 3 seeds: 83.0-84.0% after the one epoch (the workload's reference, 88%, is
    after 5 epochs); under 10 s on 2 cores including reading the files."""
    folder = _fashion_mnist_dir()
    X = _read_idx(folder / "train-images-idx3-ubyte.gz").reshape(-1, 784)
    y = _read_idx(folder / "train-labels-idx1-ubyte.gz")
    X_test = _read_idx(folder / "t10k-images-idx3-ubyte.gz").reshape(-1, 784)
    y_test = _read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    assert X.shape == (60000, 784) and X_test.shape == (10000, 784)
    X = X.astype(np.float32) / 255
    X_test = X_test.astype(np.float32) / 255
    model = fastbp.MLP([784, 256, 128, 10], seed=0)
    opt = fastbp.optim.Adam(model.parameters(), lr=1e-3)
    history = model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=128, seed=0)
    assert history["loss"][0] < 0.7, history["loss"]
    result = model.evaluate(X_test, y_test)
    assert result["accuracy"] > 0.80, result


# ---- W4: GEMM-bound MLP -------------------------------------------------------------------------


def test_w4_shaped_smoke():
    """A W4-shaped fit (784-1024-1024-10 ReLU, batch 256, SGD) runs on 1024 random samples:
    4 steps, a finite loss near ln 10 (random labels), and every parameter tensor changed."""
    rng = np.random.default_rng(4)
    X = rng.random((1024, 784), dtype=np.float32)
    y = rng.integers(0, 10, size=1024)
    model = fastbp.MLP([784, 1024, 1024, 10], seed=0)
    before = model.state_dict()
    history = model.fit(
        X,
        y,
        loss="cross_entropy",
        optimizer=fastbp.optim.SGD(model.parameters(), lr=0.01),
        epochs=1,
        batch_size=256,
        seed=0,
    )
    loss = history["loss"][0]
    assert np.isfinite(loss)
    assert abs(loss - np.log(10)) < 0.5, loss
    for key, value in model.state_dict().items():
        assert np.all(np.isfinite(value)), key
        assert not np.array_equal(value, before[key]), key


# ---- W5: plain gradient descent on a function ---------------------------------------------------


def w5_start(seed: int, size: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1000, size=size).astype(np.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_w5_sgd_on_2x_squared(seed):
    """W5: minimising y = 2x^2 by hand-filled gradients (4x) and SGD(lr 1e-2) on a bare
    Parameter for 1000 steps gives the closed form x0 (1 - 0.04)^1000 to 1e-12 relative.

    Each step multiplies x by 0.96 up to 2 roundings (rel. 2.2e-16 each), so after 1000 steps the
    relative error is at most ~4.4e-13 (measured 4e-14)."""
    x0 = w5_start(seed)
    p = fastbp.Parameter(x0.copy())
    opt = fastbp.optim.SGD([p], lr=1e-2)
    for _ in range(1000):
        p.grad[...] = 4 * p.data
        opt.step()
    exact = x0 * (1 - 0.04) ** 1000
    if x0[0] == 0:
        assert p.data[0] == 0
    else:
        np.testing.assert_allclose(p.data, exact, rtol=1e-12, atol=0)
    assert np.all(np.abs(p.data) < 1e-14)  # |x0| < 1000 and 0.96^1000 = 1.9e-18


def test_w5_sgd_on_sum_of_squares():
    """W5's f(x, y, z) = x^2 + y^2 + z^2 with a 3-element Parameter (gradient 2v, assigned via
    the ``grad`` setter): every coordinate follows v0 (1 - 0.02)^1000 to 1e-12 relative."""
    v0 = w5_start(5, size=3)
    v = fastbp.Parameter(v0.copy())
    opt = fastbp.optim.SGD([v], lr=1e-2)
    for _ in range(1000):
        v.grad = 2 * v.data
        opt.step()
    np.testing.assert_allclose(v.data, v0 * (1 - 0.02) ** 1000, rtol=1e-12, atol=0)
    assert np.all(np.abs(v.data) < 1e-5)  # 1000 * 0.98^1000 = 1.7e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_w5_adam(seed):
    """Adam on W5's two functions from random integer starts in [-1000, 1000) ends at |x| < 1e-2
    within 1000 steps.

    Adam's step is scale-free: while the gradient keeps its sign, m_hat / sqrt(v_hat) ~ 1 and
    each step moves ~lr, so lr 1e-2 travels only ~10 in 1000 steps (measured: -822 -> -812.03)
    and cannot reach 0 from |x0| up to 1000. lr = 5 crosses the distance within ~200 steps and
    then v's long memory (beta2 = 0.999) damps the oscillation: measured worst |x| 4.5e-5 over
    starts from -1000 to 999 (lr 10: 3e-18). The bound 1e-2 is the brief's."""
    x0 = w5_start(seed)
    p = fastbp.Parameter(x0.copy())
    opt = fastbp.optim.Adam([p], lr=5.0)
    for _ in range(1000):
        p.grad = 4 * p.data
        opt.step()
    assert abs(p.data[0]) < 1e-2, p.data

    v = fastbp.Parameter(w5_start(seed + 10, size=3))
    opt = fastbp.optim.Adam([v], lr=5.0)
    for _ in range(1000):
        v.grad = 2 * v.data
        opt.step()
    assert np.all(np.abs(v.data) < 1e-2), v.data


def test_w5_adam_small_lr_moves_lr_per_step():
    """With W5's own lr 1e-2, Adam moves x toward 0 by almost exactly lr per step (the first
    step exactly lr): after 1000 steps from x0 the distance covered is in [0.99, 1] x 10."""
    x0 = w5_start(0)
    assert abs(x0[0]) > 100
    p = fastbp.Parameter(x0.copy())
    opt = fastbp.optim.Adam([p], lr=1e-2)
    p.grad = 4 * p.data
    opt.step()
    np.testing.assert_allclose(abs(x0[0]) - abs(p.data[0]), 1e-2, rtol=1e-9)
    for _ in range(999):
        p.grad = 4 * p.data
        opt.step()
    moved = abs(x0[0]) - abs(p.data[0])
    assert 0.99 * 10 <= moved <= 10 * (1 + 1e-9), moved
