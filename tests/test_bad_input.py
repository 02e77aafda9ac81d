"""Bad input gets a clear Python exception, and nothing is lost.

Every case below hands one public entry point (a kernel in ``fastbp.ops``, a layer or model
constructor, an optimizer, ``fit``/``predict``/``evaluate``/``forward``/``train_step``,
``load_state_dict``) one wrong argument and checks three things:

* the exception type is TypeError or ValueError (never a crash, AttributeError, IndexError...);
* its message names the argument and what was expected (a regex per case);
* the model's parameter buffer, its gradient-free optimizer state (Adam moments and step count)
  and BatchNorm running statistics are bitwise what they were before the call.

Also: layouts that must be *accepted* (lists, Fortran order, negative strides, read-only inputs,
non-contiguous views) give bitwise the answer of the C-contiguous array; a batch_size larger
than the data is clipped with a warning; and 64-bit index arithmetic is exercised with strides
beyond 2**31 elements over a sparse memory mapping (cheap: two rows touched).
"""

from __future__ import annotations

import math
import mmap
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import fastbp
from fastbp import ops, optim

F32 = np.float32
NAN = float("nan")

# ---- a trained model whose every piece of state is snapshotted ------------------------------


def _model_and_optimizer(with_bn: bool = False):
    rng = np.random.default_rng(0)
    layers = [fastbp.Linear(4, 8, rng=rng)]
    if with_bn:
        layers.append(fastbp.BatchNorm1d(8))
    layers += [fastbp.ReLU(), fastbp.Linear(8, 3, rng=rng)]
    model = fastbp.Sequential(*layers)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    X, y = _data()
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=5, seed=0)
    return model, opt


def _data(n: int = 20):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((n, 4)).astype(F32)
    y = np.arange(n) % 3
    return X, y


def _snapshot(model, opt):
    return (
        model._params.copy(),
        model._buffers.copy(),
        opt._exp_avg.copy(),
        opt._exp_avg_sq.copy(),
        opt._flat.step,
    )


def _assert_same(before, after):
    names = ("params", "buffers", "exp_avg", "exp_avg_sq", "step")
    for name, a, b in zip(names, before, after, strict=True):
        if isinstance(a, np.ndarray):
            assert a.tobytes() == b.tobytes(), f"{name} changed by a failed call"
        else:
            assert a == b, f"{name} changed by a failed call"


@pytest.fixture
def trained():
    """(model, optimizer) after one epoch of Adam, so the moments and step are non-trivial."""
    return _model_and_optimizer(with_bn=True)


X0, Y0 = _data()


def _with(arr, index, value):
    out = np.array(arr, copy=True)
    out[index] = value
    return out


def _fit(**kw):
    def call(m, o):
        args = {
            "X": X0,
            "y": Y0,
            "loss": "cross_entropy",
            "optimizer": o,
            "epochs": 1,
            "batch_size": 4,
            "seed": 0,
        }
        args.update(kw)
        X, y = args.pop("X"), args.pop("y")
        return m.fit(X, y, **args)

    return call


# (id, call(model, opt), exception, message regex)
MODEL_CASES = [
    # fit: X
    (
        "fit-X-complex",
        _fit(X=X0.astype(np.complex64)),
        TypeError,
        r"X must be a real array.*complex",
    ),
    ("fit-X-object", _fit(X=X0.astype(object)), TypeError, r"X must be a real array.*object"),
    ("fit-X-bool", _fit(X=X0 > 0), TypeError, r"X must be a real array.*bool"),
    ("fit-X-str", _fit(X=X0.astype(str)), TypeError, r"X must be a real array"),
    ("fit-X-1d", _fit(X=X0[0]), ValueError, r"X must be 2-D.*reshape\(1, -1\)"),
    ("fit-X-3d", _fit(X=X0[None]), ValueError, r"X must be 2-D"),
    ("fit-X-features", _fit(X=X0[:, :3]), ValueError, r"X has 3 features.*expects 4"),
    ("fit-X-empty", _fit(X=X0[:0], y=Y0[:0]), ValueError, r"X has no samples"),
    ("fit-X-nan", _fit(X=_with(X0, (3, 1), NAN)), ValueError, r"X contains NaN"),
    ("fit-X-inf", _fit(X=_with(X0, (0, 0), np.inf)), ValueError, r"X contains NaN or infinity"),
    ("fit-X-neginf", _fit(X=_with(X0, (5, 2), -np.inf)), ValueError, r"X contains NaN"),
    # fit: y
    ("fit-y-length", _fit(y=Y0[:-1]), ValueError, r"y must have shape \(20,\)"),
    ("fit-y-2d", _fit(y=Y0[:, None]), ValueError, r"y must have shape \(20,\)"),
    ("fit-y-too-large", _fit(y=_with(Y0, 4, 3)), ValueError, r"labels must lie in \[0, 3\).*3"),
    ("fit-y-negative", _fit(y=_with(Y0, 7, -1)), ValueError, r"labels must lie in \[0, 3\).*-1"),
    ("fit-y-float", _fit(y=Y0.astype(F32)), TypeError, r"y must hold integer class labels"),
    ("fit-y-bool", _fit(y=Y0 > 0), TypeError, r"y must hold integer class labels.*bool"),
    ("fit-y-object", _fit(y=Y0.astype(object)), TypeError, r"y must hold integer class labels"),
    (
        "fit-mse-y-nan",
        _fit(y=_with(np.zeros((20, 3), F32), (2, 2), NAN), loss="mse"),
        ValueError,
        r"y contains NaN",
    ),
    (
        "fit-mse-y-inf",
        _fit(y=_with(np.zeros((20, 3), F32), (0, 0), np.inf), loss="mse"),
        ValueError,
        r"y contains NaN or infinity",
    ),
    (
        "fit-mse-y-shape",
        _fit(y=np.zeros((20, 2), F32), loss="mse"),
        ValueError,
        r"y must have shape \(20, 3\)",
    ),
    (
        "fit-mse-y-complex",
        _fit(y=np.zeros((20, 3), np.complex64), loss="mse"),
        TypeError,
        r"y must be a real array for MSE",
    ),
    # fit: the other arguments
    ("fit-batch-0", _fit(batch_size=0), ValueError, r"batch_size must be >= 1, got 0"),
    ("fit-batch-neg", _fit(batch_size=-3), ValueError, r"batch_size must be >= 1, got -3"),
    ("fit-batch-float", _fit(batch_size=2.5), TypeError, r"batch_size must be an int"),
    ("fit-epochs-neg", _fit(epochs=-1), ValueError, r"epochs must be >= 0, got -1"),
    ("fit-epochs-float", _fit(epochs=1.5), TypeError, r"epochs must be an int"),
    ("fit-loss-name", _fit(loss="hinge"), ValueError, r"loss must be 'mse'.*'hinge'"),
    ("fit-optimizer-type", _fit(optimizer="adam"), TypeError, r"optimizer must be a fastbp.optim"),
    (
        "fit-optimizer-other-model",
        _fit(optimizer=optim.SGD(fastbp.MLP([4, 3], seed=0).parameters(), lr=0.1)),
        ValueError,
        r"optimizer must be built over exactly this model's parameters",
    ),
    (
        "fit-validation-pair",
        _fit(validation_data=(X0,)),
        ValueError,
        r"validation_data must be a pair",
    ),
    (
        "fit-validation-nan",
        _fit(validation_data=(_with(X0, (0, 0), NAN), Y0)),
        ValueError,
        r"validation X contains NaN",
    ),
    (
        "fit-validation-labels",
        _fit(validation_data=(X0, _with(Y0, 0, 9))),
        ValueError,
        r"validation y labels must lie in \[0, 3\)",
    ),
    # predict / evaluate / forward / backward / train_step
    ("predict-1d", lambda m, o: m.predict(X0[0]), ValueError, r"X must be 2-D.*reshape\(1, -1\)"),
    ("predict-complex", lambda m, o: m.predict(X0 + 0j), TypeError, r"X must be a real array"),
    ("predict-nan", lambda m, o: m.predict(_with(X0, (1, 1), NAN)), ValueError, r"X contains NaN"),
    (
        "predict-batch-0",
        lambda m, o: m.predict(X0, batch_size=0),
        ValueError,
        r"batch_size must be >= 1",
    ),
    ("predict-empty", lambda m, o: m.predict(X0[:0]), ValueError, r"X has no samples"),
    (
        "evaluate-y-shape",
        lambda m, o: m.evaluate(X0, Y0[:5]),
        ValueError,
        r"y must have shape \(20,\)",
    ),
    (
        "evaluate-labels",
        lambda m, o: m.evaluate(X0, _with(Y0, 0, 3), loss="cross_entropy"),
        ValueError,
        r"labels must lie in \[0, 3\)",
    ),
    (
        "evaluate-batch-neg",
        lambda m, o: m.evaluate(X0, Y0, batch_size=-1),
        ValueError,
        r"batch_size must be >= 1",
    ),
    ("forward-1d", lambda m, o: m.forward(X0[0]), ValueError, r"x must be 2-D.*reshape\(1, -1\)"),
    (
        "forward-int",
        lambda m, o: m.forward(X0.astype(np.int64)),
        TypeError,
        r"x must have dtype float32.*int64",
    ),
    (
        "forward-f16",
        lambda m, o: m.forward(X0.astype(np.float16)),
        TypeError,
        r"x must have dtype float32.*float16",
    ),
    (
        "forward-f64",
        lambda m, o: m.forward(X0.astype(np.float64)),
        TypeError,
        r"x has dtype float64.*astype",
    ),
    ("forward-bool", lambda m, o: m.forward(X0 > 0), TypeError, r"x must have dtype float32.*bool"),
    ("forward-empty", lambda m, o: m.forward(X0[:0]), ValueError, r"x is an empty batch"),
    (
        "forward-features",
        lambda m, o: m.forward(X0[:, :2]),
        ValueError,
        r"x has 2 features.*expects 4",
    ),
    ("call-1d", lambda m, o: m(X0[0]), ValueError, r"reshape\(1, -1\)"),
    (
        "train-step-labels",
        lambda m, o: m.train_step(X0, _with(Y0, 0, 5), "cross_entropy", o),
        ValueError,
        r"labels must lie in \[0, 3\)",
    ),
    (
        "train-step-float-labels",
        lambda m, o: m.train_step(X0, Y0 + 0.5, "cross_entropy", o),
        TypeError,
        r"y must hold integer class labels",
    ),
    (
        "train-step-other-optimizer",
        lambda m, o: m.train_step(
            X0, Y0, "cross_entropy", optim.Adam(fastbp.MLP([4, 3]).parameters())
        ),
        ValueError,
        r"optimizer must be built over exactly this model's parameters",
    ),
    (
        "train-step-x-nan",
        lambda m, o: m.train_step(_with(X0, (0, 0), NAN), Y0, "cross_entropy", o),
        ValueError,
        r"x contains NaN",
    ),
    (
        "train-step-mse-y-inf",
        lambda m, o: m.train_step(X0, _with(np.zeros((20, 3), F32), (1, 1), np.inf), "mse", o),
        ValueError,
        r"y contains NaN or infinity",
    ),
    (
        "train-step-subset-optimizer",
        lambda m, o: m.train_step(
            X0, Y0, "cross_entropy", optim.SGD(list(m.parameters())[:2], lr=0.1)
        ),
        ValueError,
        r"optimizer must be built over exactly this model's parameters",
    ),
    # optimizer hyperparameters changed after construction (what a scheduler or user does)
    (
        "step-lr-nan",
        lambda m, o: _set_and_step(m, o, lr=NAN),
        ValueError,
        r"lr must be a finite number",
    ),
    (
        "step-lr-neg",
        lambda m, o: _set_and_step(m, o, lr=-0.1),
        ValueError,
        r"lr must be a finite number >= 0",
    ),
    (
        "fit-lr-neg",
        lambda m, o: _set_and_fit(m, o, lr=-1.0),
        ValueError,
        r"lr must be a finite number >= 0",
    ),
    ("step-betas-1", lambda m, o: _set_and_step(m, o, betas=(1.0, 0.999)), ValueError, r"beta"),
    ("step-betas-neg", lambda m, o: _set_and_step(m, o, betas=(0.9, -0.5)), ValueError, r"beta"),
    ("step-eps-nan", lambda m, o: _set_and_step(m, o, eps=NAN), ValueError, r"eps"),
    # load_state_dict
    (
        "load-wrong-shape",
        lambda m, o: m.load_state_dict(_state_with(m, "0.weight", np.zeros((8, 5), F32))),
        ValueError,
        r"0.weight has shape \(8, 5\), the model expects \(8, 4\)",
    ),
    (
        "load-wrong-shape-last",
        lambda m, o: m.load_state_dict(_state_with(m, "3.bias", np.zeros(4, F32))),
        ValueError,
        r"3.bias has shape \(4,\)",
    ),
    (
        "load-complex",
        lambda m, o: m.load_state_dict(_state_with(m, "0.bias", np.zeros(8, np.complex64))),
        TypeError,
        r"0.bias must be a real array.*complex",
    ),
    (
        "load-missing-key",
        lambda m, o: m.load_state_dict({k: v for k, v in m.state_dict().items() if k != "3.bias"}),
        ValueError,
        r"missing keys \['3.bias'\]",
    ),
    (
        "load-not-mapping",
        lambda m, o: m.load_state_dict(list(m.state_dict().values())),
        TypeError,
        r"state_dict must be a mapping",
    ),
    (
        "load-optimizer-wrong-shape",
        lambda m, o: o.load_state_dict(
            _optimizer_state_with(o, 0, "exp_avg", np.zeros((2, 2), F32))
        ),
        ValueError,
        r"exp_avg has shape \(2, 2\), expected \(8, 4\)",
    ),
]


def _set_and_step(model, opt, **hyper):
    opt.param_groups[0].update(hyper)
    model.train_step(X0, Y0, "cross_entropy", opt)


def _set_and_fit(model, opt, **hyper):
    opt.param_groups[0].update(hyper)
    model.fit(X0, Y0, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=4)


def _state_with(model, key, value):
    state = model.state_dict()
    state[key] = value
    return state


def _optimizer_state_with(opt, index, key, value):
    state = opt.state_dict()
    state["state"][index][key] = value
    return state


@pytest.mark.parametrize(
    ("call", "exc", "pattern"),
    [pytest.param(c, e, p, id=i) for i, c, e, p in MODEL_CASES],
)
def test_model_call_refused_and_nothing_changes(trained, call, exc, pattern):
    """The call raises `exc` with a message naming the argument, and the model's weights,
    BatchNorm statistics and the optimizer's moments and step are bitwise unchanged."""
    model, opt = trained
    before = _snapshot(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a batch-size clipping warning is not what is tested
        with pytest.raises(exc, match=pattern):
            call(model, opt)
    _assert_same(before, _snapshot(model, opt))


# ---- constructors: layers, models, optimizers, threads ------------------------------------------


def _params():
    return fastbp.MLP([3, 2], seed=0).parameters()


CONSTRUCTOR_CASES = [
    ("linear-in-0", lambda: fastbp.Linear(0, 3), ValueError, r"in_features must be >= 1, got 0"),
    ("linear-out-0", lambda: fastbp.Linear(3, 0), ValueError, r"out_features must be >= 1, got 0"),
    ("linear-out-neg", lambda: fastbp.Linear(3, -2), ValueError, r"out_features must be >= 1"),
    ("linear-float", lambda: fastbp.Linear(2.5, 3), TypeError, r"in_features must be an int"),
    (
        "linear-f16",
        lambda: fastbp.Linear(2, 2, dtype=np.float16),
        TypeError,
        r"dtype must be float32 or float64",
    ),
    (
        "linear-int",
        lambda: fastbp.Linear(2, 2, dtype=np.int32),
        TypeError,
        r"dtype must be float32 or float64",
    ),
    (
        "linear-complex",
        lambda: fastbp.Linear(2, 2, dtype=complex),
        TypeError,
        r"dtype must be float32 or float64",
    ),
    ("batchnorm-0", lambda: fastbp.BatchNorm1d(0), ValueError, r"num_features must be >= 1"),
    ("batchnorm-eps", lambda: fastbp.BatchNorm1d(3, eps=-1.0), ValueError, r"eps must be > 0"),
    ("dropout-1", lambda: fastbp.Dropout(1.0), ValueError, r"p must be in \[0, 1\)"),
    ("dropout-neg", lambda: fastbp.Dropout(-0.1), ValueError, r"p must be in \[0, 1\)"),
    ("dropout-nan", lambda: fastbp.Dropout(NAN), ValueError, r"p must be in \[0, 1\)"),
    ("mlp-width-0", lambda: fastbp.MLP([4, 0, 2]), ValueError, r"sizes\[1\] must be >= 1, got 0"),
    ("mlp-one-size", lambda: fastbp.MLP([4]), ValueError, r"sizes must list at least"),
    (
        "mlp-activation",
        lambda: fastbp.MLP([4, 3, 2], activation="gelu"),
        ValueError,
        r"activation must be one of.*'gelu'",
    ),
    (
        "mlp-activation-none",
        lambda: fastbp.MLP([4, 3, 2], activation=None),
        ValueError,
        r"activation must be one of",
    ),
    (
        "mlp-output-activation",
        lambda: fastbp.MLP([4, 2], output_activation="softmax"),
        ValueError,
        r"output_activation must be one of",
    ),
    (
        "mlp-dtype",
        lambda: fastbp.MLP([4, 2], dtype=np.float16),
        TypeError,
        r"dtype must be float32 or float64",
    ),
    ("sequential-empty", lambda: fastbp.Sequential(), ValueError, r"at least one layer"),
    (
        "sequential-widths",
        lambda: fastbp.Sequential(fastbp.Linear(4, 3), fastbp.Linear(2, 1)),
        ValueError,
        r"layer 1 \(Linear\) expects 2 features but receives 3",
    ),
    (
        "sequential-dtypes",
        lambda: fastbp.Sequential(fastbp.Linear(4, 3), fastbp.Linear(3, 1, dtype=np.float64)),
        TypeError,
        r"share one dtype",
    ),
    (
        "sequential-not-layer",
        lambda: fastbp.Sequential(fastbp.Linear(2, 2), "relu"),
        TypeError,
        r"layer 1: unsupported layer type str",
    ),
    (
        "sgd-lr-neg",
        lambda: optim.SGD(_params(), lr=-0.1),
        ValueError,
        r"lr must be a finite number >= 0",
    ),
    ("sgd-lr-nan", lambda: optim.SGD(_params(), lr=NAN), ValueError, r"lr must be a finite number"),
    (
        "sgd-lr-inf",
        lambda: optim.SGD(_params(), lr=math.inf),
        ValueError,
        r"lr must be a finite number",
    ),
    ("sgd-lr-str", lambda: optim.SGD(_params(), lr="0.1"), TypeError, r"lr must be a real number"),
    (
        "sgd-momentum-neg",
        lambda: optim.SGD(_params(), lr=0.1, momentum=-0.9),
        ValueError,
        r"momentum must be a finite number >= 0",
    ),
    (
        "sgd-nesterov",
        lambda: optim.SGD(_params(), lr=0.1, nesterov=True),
        ValueError,
        r"Nesterov momentum requires",
    ),
    (
        "sgd-weight-decay",
        lambda: optim.SGD(_params(), lr=0.1, weight_decay=-1),
        ValueError,
        r"weight_decay must be a finite number >= 0",
    ),
    ("sgd-no-params", lambda: optim.SGD([], lr=0.1), ValueError, r"empty parameter list"),
    (
        "sgd-one-param",
        lambda: optim.SGD(next(iter(_params())), lr=0.1),
        TypeError,
        r"params must be an iterable",
    ),
    (
        "sgd-array-param",
        lambda: optim.SGD([np.zeros(3)], lr=0.1),
        TypeError,
        r"params\[0\] must be a fastbp.Parameter",
    ),
    (
        "adam-beta1-1",
        lambda: optim.Adam(_params(), betas=(1.0, 0.999)),
        ValueError,
        r"betas\[0\] must be in \[0, 1\), got 1.0",
    ),
    (
        "adam-beta2-1",
        lambda: optim.Adam(_params(), betas=(0.9, 1.0)),
        ValueError,
        r"betas\[1\] must be in \[0, 1\)",
    ),
    (
        "adam-beta1-neg",
        lambda: optim.Adam(_params(), betas=(-0.1, 0.999)),
        ValueError,
        r"betas\[0\] must be in \[0, 1\)",
    ),
    (
        "adam-beta-nan",
        lambda: optim.Adam(_params(), betas=(0.9, NAN)),
        ValueError,
        r"betas\[1\] must be in \[0, 1\)",
    ),
    (
        "adam-betas-triple",
        lambda: optim.Adam(_params(), betas=(0.9, 0.9, 0.9)),
        TypeError,
        r"betas must be a pair",
    ),
    (
        "adam-lr-neg",
        lambda: optim.Adam(_params(), lr=-1e-3),
        ValueError,
        r"lr must be a finite number >= 0",
    ),
    (
        "adam-eps-nan",
        lambda: optim.Adam(_params(), eps=NAN),
        ValueError,
        r"eps must be a finite number",
    ),
    (
        "adamw-lr-nan",
        lambda: optim.AdamW(_params(), lr=NAN),
        ValueError,
        r"lr must be a finite number",
    ),
    ("threads-0", lambda: fastbp.set_num_threads(0), ValueError, r"n must be >= 1, got 0"),
    ("threads-neg", lambda: fastbp.set_num_threads(-2), ValueError, r"n must be >= 1, got -2"),
    (
        "threads-float",
        lambda: fastbp.set_num_threads(1.5),
        TypeError,
        r"n must be a positive int or None",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "pattern"),
    [pytest.param(c, e, p, id=i) for i, c, e, p in CONSTRUCTOR_CASES],
)
def test_constructor_refused(call, exc, pattern):
    """Building a layer, model or optimizer (or setting threads) with a bad argument raises
    `exc` naming the argument; the thread setting is left as it was."""
    threads = fastbp.get_num_threads()
    with pytest.raises(exc, match=pattern):
        call()
    assert fastbp.get_num_threads() == threads


# ---- the kernels ----------------------------------------------------------------------------

_RNG = np.random.default_rng(7)
A = _RNG.standard_normal((5, 4))
B = _RNG.standard_normal((4, 3))
A32 = A.astype(F32)
LOGITS = _RNG.standard_normal((6, 3))
LABELS = np.array([0, 1, 2, 2, 1, 0])


def _readonly(arr):
    out = np.array(arr, copy=True)
    out.flags.writeable = False
    return out


KERNEL_CASES = [
    (
        "gemm-a-int",
        lambda: ops.gemm(A.astype(np.int32), B),
        TypeError,
        r"a must have dtype float32 or float64, got int32",
    ),
    (
        "gemm-a-f16",
        lambda: ops.gemm(A.astype(np.float16), B),
        TypeError,
        r"a must have dtype float32 or float64, got float16",
    ),
    ("gemm-a-complex", lambda: ops.gemm(A + 0j, B), TypeError, r"a must have dtype .*complex128"),
    (
        "gemm-a-object",
        lambda: ops.gemm(A.astype(object), B),
        TypeError,
        r"a must have dtype .*object",
    ),
    ("gemm-a-bool", lambda: ops.gemm(A > 0, B), TypeError, r"a must have dtype .*bool"),
    (
        "gemm-b-mixed",
        lambda: ops.gemm(A, B.astype(F32)),
        TypeError,
        r"b must have dtype float64 \(like the other arrays\)",
    ),
    ("gemm-a-1d", lambda: ops.gemm(A[0], B), ValueError, r"a must be 2-D.*reshape\(1, -1\)"),
    ("gemm-b-3d", lambda: ops.gemm(A, B[None]), ValueError, r"b must be 2-D"),
    (
        "gemm-a-0d",
        lambda: ops.gemm(np.float64(1.0), B),
        ValueError,
        r"a must be 2-D, got shape \(\)",
    ),
    ("gemm-inner", lambda: ops.gemm(A, B.T), ValueError, r"inner dimensions differ"),
    (
        "gemm-inner-trans",
        lambda: ops.gemm(A, B, trans_a=True),
        ValueError,
        r"inner dimensions differ.*trans_a=True",
    ),
    ("gemm-beta-no-out", lambda: ops.gemm(A, B, beta=1.0), ValueError, r"beta != 0 needs out="),
    ("gemm-alpha-nan", lambda: ops.gemm(A, B, alpha=NAN), ValueError, r"alpha must be finite"),
    (
        "gemm-beta-inf",
        lambda: ops.gemm(A, B, beta=math.inf, out=np.zeros((5, 3))),
        ValueError,
        r"beta must be finite",
    ),
    (
        "gemm-alpha-str",
        lambda: ops.gemm(A, B, alpha="2"),
        TypeError,
        r"alpha must be a real number",
    ),
    (
        "gemm-out-readonly",
        lambda: ops.gemm(A, B, out=_readonly(np.zeros((5, 3)))),
        ValueError,
        r"out is read-only",
    ),
    (
        "gemm-out-shape",
        lambda: ops.gemm(A, B, out=np.zeros((3, 5))),
        ValueError,
        r"out must have shape \(5, 3\)",
    ),
    (
        "gemm-out-dtype",
        lambda: ops.gemm(A, B, out=np.zeros((5, 3), F32)),
        TypeError,
        r"out must have dtype float64",
    ),
    (
        "gemm-out-list",
        lambda: ops.gemm(A, B, out=[[0.0] * 3] * 5),
        TypeError,
        r"out must be a numpy.ndarray",
    ),
    (
        "gemm-out-fortran",
        lambda: ops.gemm(A, B, out=np.zeros((5, 3), order="F")),
        ValueError,
        r"out must have contiguous rows",
    ),
    (
        "gemm-out-negative-stride",
        lambda: ops.gemm(A, B, out=np.zeros((5, 3))[::-1]),
        ValueError,
        r"out must have contiguous rows",
    ),
    (
        "gemm-out-overlap",
        lambda: ops.gemm(A[:, :3], A[:3, :3], out=A[:, :3]),
        ValueError,
        r"out must not overlap a",
    ),
    (
        "gemm-bias-shape",
        lambda: ops.gemm(A, B, bias=np.zeros(4)),
        ValueError,
        r"bias must have shape \(3,\)",
    ),
    (
        "gemm-bias-dtype",
        lambda: ops.gemm(A, B, bias=np.zeros(3, F32)),
        TypeError,
        r"bias must have dtype float64",
    ),
    (
        "gemm-activation",
        lambda: ops.gemm(A, B, activation="gelu"),
        ValueError,
        r"activation must be one of.*'gelu'",
    ),
    (
        "gemm-activation-int",
        lambda: ops.gemm(A, B, activation=1),
        ValueError,
        r"activation must be one of",
    ),
    (
        "linear-features",
        lambda: ops.linear_forward(A, B),
        ValueError,
        r"x has 4 features but weight expects 3",
    ),
    (
        "linear-backward-shapes",
        lambda: ops.linear_backward(np.ones((5, 2)), A, B.T),
        ValueError,
        r"shapes disagree",
    ),
    (
        "act-backward-no-output",
        lambda: ops.activation_backward(A, None, "sigmoid"),
        ValueError,
        r"'sigmoid' needs the forward output",
    ),
    (
        "act-backward-shape",
        lambda: ops.activation_backward(A, A[:2], "tanh"),
        ValueError,
        r"output must have the shape of grad_output",
    ),
    (
        "sigmoid-int",
        lambda: ops.sigmoid(np.arange(4)),
        TypeError,
        r"x must have dtype float32 or float64, got int64",
    ),
    (
        "tanh-f16",
        lambda: ops.tanh(np.ones(4, np.float16)),
        TypeError,
        r"x must have dtype .*float16",
    ),
    ("relu-out-readonly", lambda: ops.relu(A, out=_readonly(A)), ValueError, r"out is read-only"),
    (
        "relu-out-shape",
        lambda: ops.relu(A, out=np.zeros(20)),
        ValueError,
        r"out must have shape \(5, 4\)",
    ),
    (
        "sigmoid-out-noncontig",
        lambda: ops.sigmoid(A[:, :2], out=np.zeros((5, 4))[:, :2]),
        ValueError,
        r"out must be C-contiguous",
    ),
    (
        "xent-labels-float",
        lambda: ops.softmax_cross_entropy(LOGITS, LABELS.astype(float)),
        TypeError,
        r"labels must be an integer array, got dtype float64",
    ),
    (
        "xent-labels-bool",
        lambda: ops.softmax_cross_entropy(LOGITS, LABELS > 0),
        TypeError,
        r"labels must be an integer array, got dtype bool",
    ),
    (
        "xent-labels-high",
        lambda: ops.softmax_cross_entropy(LOGITS, _with(LABELS, 2, 3)),
        ValueError,
        r"labels must lie in \[0, 3\), found 3",
    ),
    (
        "xent-labels-neg",
        lambda: ops.softmax_cross_entropy(LOGITS, _with(LABELS, 0, -1)),
        ValueError,
        r"labels must lie in \[0, 3\), found -1",
    ),
    (
        "xent-labels-shape",
        lambda: ops.softmax_cross_entropy(LOGITS, LABELS[:4]),
        ValueError,
        r"labels must have shape \(6,\)",
    ),
    (
        "xent-empty",
        lambda: ops.softmax_cross_entropy(LOGITS[:0], LABELS[:0]),
        ValueError,
        r"non-empty batch",
    ),
    (
        "xent-1d",
        lambda: ops.softmax_cross_entropy(LOGITS[0], LABELS[:1]),
        ValueError,
        r"logits must be 2-D",
    ),
    (
        "mse-shape",
        lambda: ops.mse(A, A.T),
        ValueError,
        r"pred \(5, 4\) and target \(4, 5\) must have the same shape",
    ),
    ("mse-empty", lambda: ops.mse(A[:0], A[:0]), ValueError, r"at least one element"),
    (
        "mse-reduction",
        lambda: ops.mse(A, A, reduction="max"),
        ValueError,
        r"reduction must be 'mean' or 'sum'",
    ),
    ("mse-dtypes", lambda: ops.mse(A, A32), TypeError, r"target must have dtype float64"),
]


@pytest.mark.parametrize(
    ("call", "exc", "pattern"),
    [pytest.param(c, e, p, id=i) for i, c, e, p in KERNEL_CASES],
)
def test_kernel_refused(call, exc, pattern):
    """Each kernel refuses a bad argument before any C runs, naming it and what was expected;
    the shared input arrays are not modified."""
    before = [A.copy(), B.copy(), LOGITS.copy(), LABELS.copy()]
    with pytest.raises(exc, match=pattern):
        call()
    for old, new in zip(before, [A, B, LOGITS, LABELS], strict=True):
        assert old.tobytes() == new.tobytes()


def _opt_arrays(dtype=np.float64):
    rng = np.random.default_rng(3)
    p = rng.standard_normal(6).astype(dtype)
    return p, rng.standard_normal(6).astype(dtype), np.zeros(6, dtype), np.zeros(6, dtype)


def _sgd(**kw):
    def call(p, g, m, v):
        args = {"param": p, "grad": g, "momentum_buffer": m, "lr": 0.1, "momentum": 0.9}
        args.update(kw)
        return ops.sgd_step(
            args.pop("param"), args.pop("grad"), args.pop("momentum_buffer"), **args
        )

    return call


def _adam(**kw):
    def call(p, g, m, v):
        args = {"param": p, "grad": g, "exp_avg": m, "exp_avg_sq": v, "step": 1}
        args.update(kw)
        return ops.adam_step(
            args.pop("param"), args.pop("grad"), args.pop("exp_avg"), args.pop("exp_avg_sq"), **args
        )

    return call


def _ro(arr):
    view = arr.view()
    view.flags.writeable = False
    return view


# (id, call(param, grad, m, v) -> fastbp call, exception, regex). Inputs may be replaced via kw;
# the arrays passed in are the ones checked for "unchanged".
OPTIM_KERNEL_CASES = [
    ("sgd-lr-neg", _sgd(lr=-0.1), ValueError, r"lr must be >= 0"),
    ("sgd-lr-nan", _sgd(lr=NAN), ValueError, r"lr must be finite"),
    ("sgd-lr-inf", _sgd(lr=math.inf), ValueError, r"lr must be finite"),
    ("sgd-momentum-neg", _sgd(momentum=-1.0), ValueError, r"momentum must be >= 0"),
    (
        "sgd-no-buffer",
        _sgd(momentum_buffer=None),
        ValueError,
        r"momentum != 0 needs a momentum_buffer",
    ),
    ("sgd-nesterov", _sgd(momentum=0.0, nesterov=True), ValueError, r"nesterov momentum requires"),
    ("sgd-param-list", _sgd(param=[1.0, 2.0]), TypeError, r"param must be a numpy.ndarray"),
    (
        "sgd-param-int",
        _sgd(param=np.arange(6)),
        TypeError,
        r"param must have dtype float32 or float64",
    ),
    (
        "sgd-grad-shape",
        _sgd(grad=np.ones(5)),
        ValueError,
        r"grad must have the shape of param \(6,\)",
    ),
    ("sgd-grad-dtype", _sgd(grad=np.ones(6, F32)), TypeError, r"grad must have dtype float64"),
    (
        "sgd-buffer-dtype",
        _sgd(momentum_buffer=np.zeros(6, F32)),
        TypeError,
        r"momentum_buffer must have dtype float64",
    ),
    (
        "sgd-buffer-list",
        _sgd(momentum_buffer=[0.0] * 6),
        TypeError,
        r"momentum_buffer must be a numpy.ndarray",
    ),
    ("adam-step-0", _adam(step=0), ValueError, r"step must be an int >= 1, got 0"),
    ("adam-step-float", _adam(step=1.0), ValueError, r"step must be an int >= 1"),
    ("adam-beta1-1", _adam(betas=(1.0, 0.999)), ValueError, r"betas must lie in \[0, 1\)"),
    ("adam-beta2-neg", _adam(betas=(0.9, -0.1)), ValueError, r"betas\[1\] must be >= 0"),
    ("adam-beta-nan", _adam(betas=(NAN, 0.9)), ValueError, r"betas\[0\] must be finite"),
    ("adam-lr-nan", _adam(lr=NAN), ValueError, r"lr must be finite"),
    ("adam-eps-neg", _adam(eps=-1e-8), ValueError, r"eps must be >= 0"),
    (
        "adam-exp-avg-shape",
        _adam(exp_avg=np.zeros(5)),
        ValueError,
        r"exp_avg must have shape \(6,\)",
    ),
    (
        "adam-exp-avg-sq-f32",
        _adam(exp_avg_sq=np.zeros(6, F32)),
        TypeError,
        r"exp_avg_sq must have dtype float64",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "pattern"),
    [pytest.param(c, e, p, id=i) for i, c, e, p in OPTIM_KERNEL_CASES],
)
def test_optimizer_kernel_refused_and_state_unchanged(call, exc, pattern):
    """An optimizer kernel with one bad argument raises naming it, and neither the parameter
    nor the moment buffers it would update in place are touched."""
    arrays = _opt_arrays()
    before = [a.copy() for a in arrays]
    with pytest.raises(exc, match=pattern):
        call(*arrays)
    for old, new in zip(before, arrays, strict=True):
        assert old.tobytes() == new.tobytes()


WRITE_TARGET_CASES = [
    (
        "sgd-param-readonly",
        lambda p, g, m, v: ops.sgd_step(_ro(p), g, lr=0.1),
        r"param is read-only",
    ),
    (
        "sgd-param-strided",
        lambda p, g, m, v: ops.sgd_step(p[::2], g[::2], lr=0.1),
        r"param must be C-contiguous",
    ),
    (
        "sgd-param-reversed",
        lambda p, g, m, v: ops.sgd_step(p[::-1], g, lr=0.1),
        r"param must be C-contiguous",
    ),
    (
        "sgd-buffer-readonly",
        lambda p, g, m, v: ops.sgd_step(p, g, _ro(m), lr=0.1, momentum=0.9),
        r"momentum_buffer is read-only",
    ),
    (
        "sgd-buffer-strided",
        lambda p, g, m, v: ops.sgd_step(p[:3], g[:3], m[::2], lr=0.1, momentum=0.9),
        r"momentum_buffer must be C-contiguous",
    ),
    (
        "adam-param-readonly",
        lambda p, g, m, v: ops.adam_step(_ro(p), g, m, v, step=1),
        r"param is read-only",
    ),
    (
        "adam-exp-avg-readonly",
        lambda p, g, m, v: ops.adam_step(p, g, _ro(m), v, step=1),
        r"exp_avg is read-only",
    ),
    (
        "adam-exp-avg-sq-readonly",
        lambda p, g, m, v: ops.adam_step(p, g, m, _ro(v), step=1),
        r"exp_avg_sq is read-only",
    ),
    (
        "adam-exp-avg-reversed",
        lambda p, g, m, v: ops.adam_step(p, g, m[::-1], v, step=1),
        r"exp_avg must be C-contiguous",
    ),
]


@pytest.mark.parametrize(
    ("call", "pattern"), [pytest.param(c, p, id=i) for i, c, p in WRITE_TARGET_CASES]
)
def test_arrays_fastbp_writes_must_be_writeable_and_contiguous(call, pattern):
    """Read-only, strided or reversed arrays where fastbp must write in place are refused with
    a ValueError naming the array, and nothing is written."""
    arrays = _opt_arrays()
    before = [a.copy() for a in arrays]
    with pytest.raises(ValueError, match=pattern):
        call(*arrays)
    for old, new in zip(before, arrays, strict=True):
        assert old.tobytes() == new.tobytes()


# ---- layouts that must be accepted, bitwise like the C-contiguous array ------------------------


def _layouts(arr):
    """(name, same values in another layout) for a 2-D array."""
    rev = np.ascontiguousarray(arr[::-1])[::-1]  # negative row stride, same values
    padded = np.zeros((arr.shape[0], arr.shape[1] * 2), arr.dtype)[:, ::2]
    padded[...] = arr
    return [
        ("list", arr.tolist()),
        ("fortran", np.asfortranarray(arr)),
        ("negative-stride", rev),
        ("readonly", _readonly(arr)),
        ("strided", padded),
    ]


LAYOUT_IDS = ["list", "fortran", "negative-stride", "readonly", "strided"]


@pytest.mark.parametrize("layout", range(5), ids=LAYOUT_IDS)
def test_kernels_accept_any_input_layout(layout):
    """gemm, linear_forward, the activations and the losses give bitwise the C-contiguous
    result for lists, Fortran-ordered, negatively strided, read-only and strided inputs."""
    a, b = A, np.ascontiguousarray(B.T)  # b as a (3, 4) weight
    name, a2 = _layouts(a)[layout]
    _, b2 = _layouts(b)[layout]
    assert np.array_equal(ops.gemm(a2, b2, trans_b=True), ops.gemm(a, b, trans_b=True)), name
    assert np.array_equal(
        ops.linear_forward(a2, b2, activation="tanh"), ops.linear_forward(a, b, activation="tanh")
    )
    for fn in (ops.sigmoid, ops.relu, ops.tanh):
        assert np.array_equal(fn(a2), fn(a))
    l2, g2 = ops.softmax_cross_entropy(_layouts(LOGITS)[layout][1], LABELS)
    l1, g1 = ops.softmax_cross_entropy(LOGITS, LABELS)
    assert l1 == l2 and np.array_equal(g1, g2)
    m2, d2 = ops.mse(a2, _layouts(a * 0.5)[layout][1])
    m1, d1 = ops.mse(a, a * 0.5)
    assert m1 == m2 and np.array_equal(d1, d2)


@pytest.mark.parametrize("layout", range(5), ids=LAYOUT_IDS)
def test_model_accepts_any_input_layout(layout):
    """fit, predict, evaluate and forward on a list, Fortran-ordered, negatively strided,
    read-only or strided X give bitwise the weights and outputs of the C-contiguous X."""
    results = []
    for X in (X0, _layouts(X0)[layout][1]):
        model = fastbp.MLP([4, 6, 3], seed=0)
        model.fit(X, Y0, loss="cross_entropy", epochs=2, batch_size=4, seed=1)
        model.eval()
        results.append(
            (model._params.copy(), model.predict(X), model.evaluate(X, Y0), model.forward(X))
        )
    (p1, pr1, ev1, f1), (p2, pr2, ev2, f2) = results
    assert p1.tobytes() == p2.tobytes()
    assert np.array_equal(pr1, pr2) and np.array_equal(f1, f2) and ev1 == ev2


def test_batch_size_larger_than_data_is_clipped_with_a_warning():
    """batch_size > n warns (naming both numbers) and trains exactly like batch_size = n."""
    weights = []
    for bs in (20, 500):
        model = fastbp.MLP([4, 6, 3], seed=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(X0, Y0, loss="cross_entropy", epochs=2, batch_size=bs, seed=1)
        messages = [str(w.message) for w in caught]
        if bs == 500:
            assert any("batch_size=500" in m and "20 samples" in m for m in messages), messages
        else:
            assert not messages, messages
        weights.append(model._params.copy())
    assert weights[0].tobytes() == weights[1].tobytes()


def test_zero_size_kernel_calls_are_harmless():
    """Zero-size GEMMs and activations (a batch of 0 rows, k = 0) are defined, not errors:
    gemm with k = 0 gives act(beta*C + bias); 0-row outputs have the right shape."""
    assert ops.gemm(np.ones((0, 3)), np.ones((3, 2))).shape == (0, 2)
    out = ops.gemm(
        np.ones((2, 0)), np.ones((0, 3)), bias=np.array([1.0, -2.0, 3.0]), activation="relu"
    )
    assert np.array_equal(out, [[1.0, 0.0, 3.0]] * 2)
    assert ops.sigmoid(np.ones((0, 4), F32)).shape == (0, 4)
    dz, db = ops.activation_backward(np.ones((0, 3)), np.ones((0, 3)), "tanh")
    assert dz.shape == (0, 3) and np.array_equal(db, np.zeros(3))


# ---- sizes beyond 2**31 elements ----------------------------------------------------------------

HUGE_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from numpy.lib.stride_tricks import as_strided
    import fastbp
    from fastbp import ops

    # Cap the address space so that a huge allocation fails fast with MemoryError instead of
    # swapping the machine; what fastbp must not do is crash or compute garbage.
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY))
    one = np.ones(1, np.float32)
    big = 2**31 + 7
    cases = {
        "sigmoid": lambda: ops.sigmoid(np.broadcast_to(one, (big,))),
        "relu-2d": lambda: ops.relu(as_strided(one, (2**20, 2**20), (0, 0))),
        "gemm-m": lambda: ops.gemm(as_strided(one, (big, 1), (0, 0)), np.ones((1, 1), np.float32)),
        "gemm-mn": lambda: ops.gemm(as_strided(one, (2**20, 1), (0, 0)),
                                    as_strided(one, (1, 2**20), (0, 0))),
        "linear": lambda: ops.linear_forward(as_strided(one, (big, 2), (0, 0)), np.ones((3, 2), np.float32)),
        "mse": lambda: ops.mse(np.broadcast_to(one, (big,)), np.broadcast_to(one, (big,))),
        "xent": lambda: ops.softmax_cross_entropy(as_strided(one, (big, 2), (0, 0)),
                                                  np.zeros(big, np.int64)),
        "sgd": lambda: ops.sgd_step(np.broadcast_to(one, (big,)), np.broadcast_to(one, (big,)), lr=0.1),
        "act-backward": lambda: ops.activation_backward(as_strided(one, (big, 2), (0, 0)), None, None),
        "predict": lambda: fastbp.MLP([2, 1]).predict(as_strided(one, (big, 2), (0, 0))),
    }
    for name, call in cases.items():
        try:
            call()
            print(name, "ran")
        except (MemoryError, ValueError, TypeError) as exc:
            print(name, type(exc).__name__, str(exc)[:80].replace("\\n", " "))
    print("DONE")
    """
)


# Under AddressSanitizer (.ci/sanitize preloads libasan) a capped address space breaks ASan's
# shadow memory and its allocator aborts on multi-TiB requests by design: skip those there.
SANITIZED = "libasan" in os.environ.get("LD_PRELOAD", "")


@pytest.mark.skipif(SANITIZED, reason="address-space caps and TiB allocations abort under ASan")
def test_huge_broadcast_views_are_refused_or_handled():
    """Stride-0 views claiming more than 2**31 (up to 2**40) elements are refused with a
    Python exception (MemoryError for the copy they would need, ValueError for a read-only
    destination) or handled; the process never crashes. Run in a child with a capped address
    space so a refused allocation cannot take the machine's memory."""
    proc = subprocess.run(
        [sys.executable, "-c", HUGE_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "DONE", proc.stdout + proc.stderr
    assert len(lines) == 11, proc.stdout


def _sparse_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous memory that reserves nothing: only the pages touched become resident."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
    return mmap.mmap(-1, nbytes, flags=flags)


@pytest.mark.skipif(sys.maxsize < 2**40, reason="needs a 64-bit address space")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_strides_beyond_2_31_elements(dtype):
    """64-bit index arithmetic: gemm reads A's rows and writes C's rows (ldc) that lie more
    than 2**31 elements apart, in a sparse 16-32 GiB mapping of which only those rows are
    touched. A 32-bit row offset would read or write the wrong address (or crash); the result
    must equal NumPy's on copies of the rows."""
    item = np.dtype(dtype).itemsize
    row = (2**31 + 64) * item  # bytes between rows: 2**31 + 64 elements
    try:
        buf = _sparse_buffer(2 * row)
    except (OSError, OverflowError, ValueError) as exc:
        pytest.skip(f"cannot map {2 * row} sparse bytes: {exc}")
    try:
        base = np.frombuffer(buf, dtype=dtype)
        rng = np.random.default_rng(5)
        k, n = 40, 33  # > 24**3 multiply-adds in total: the packed path, not the direct loop
        a = np.lib.stride_tricks.as_strided(base, shape=(2, k), strides=(row, item))
        a[...] = rng.standard_normal((2, k))
        b = rng.standard_normal((k, n)).astype(dtype)
        expected = np.ascontiguousarray(a) @ b
        got = ops.gemm(a, b)
        np.testing.assert_allclose(got, expected, rtol=1e-5 if dtype == np.float32 else 1e-12)
        # C's rows 2**31 + 64 elements apart (padded rows are allowed in out=)
        c = np.lib.stride_tricks.as_strided(base[k:], shape=(2, n), strides=(row, item))
        big_a = rng.standard_normal((2, k)).astype(dtype)
        ops.gemm(big_a, b, out=c)
        np.testing.assert_allclose(
            np.array(c), big_a @ b, rtol=1e-5 if dtype == np.float32 else 1e-12
        )
        del a, c, base
    finally:
        try:
            buf.close()
        except BufferError:
            pass


# ---- the data-set finiteness scan (fastbp._core.all_finite, used by fit/predict/estimators) ----

_ODD_SIZES = (1, 7, 33, 257, 4095, 4096, 4097, 9000)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_all_finite_finds_every_bad_value_anywhere(dtype, threads):
    from fastbp import _core

    rng = np.random.default_rng(7)
    info = np.finfo(dtype)
    with fastbp.thread_limit(threads):
        for n in _ODD_SIZES:
            clean = rng.standard_normal(n).astype(dtype)
            # finite extremes: the largest, the smallest normal and subnormal, -0
            extremes = np.array([info.max, -info.max, info.tiny, info.smallest_subnormal, -0.0])
            clean[rng.integers(0, n, extremes.size)] = extremes.astype(dtype)
            assert _core.all_finite(clean)
            for bad in (np.nan, np.inf, -np.inf):
                for pos in {0, n // 2, n - 1, int(rng.integers(0, n))}:
                    x = clean.copy()
                    x[pos] = bad
                    assert not _core.all_finite(x), (n, pos, bad)
        # a scan split over threads (above its 4M-element grain) still sees the last element
        big = np.zeros(9_000_001, dtype=dtype)
        assert _core.all_finite(big)
        big[-1] = np.nan
        assert not _core.all_finite(big)
        big[-1] = 0
        big[4_500_000] = np.inf
        assert not _core.all_finite(big)


def test_all_finite_agrees_with_numpy_on_every_float32_exponent():
    """Every exponent (and a few mantissas each), as raw bit patterns: NaN payloads, signalling
    NaNs, both infinities, subnormals."""
    from fastbp import _core

    exps = np.arange(256, dtype=np.uint32) << 23
    mants = np.array([0, 1, 0x400000, 0x7FFFFF], dtype=np.uint32)
    bits = (exps[:, None] | mants[None, :]).ravel()
    bits = np.concatenate([bits, bits | 0x80000000])
    values = bits.view(np.float32)
    for v in values:
        one = np.array([1.0, v, 2.0], dtype=np.float32)
        assert _core.all_finite(one) == bool(np.isfinite(one).all()), hex(v.view(np.uint32))


def test_all_finite_takes_any_contiguous_float_array_and_declines_the_rest():
    """The scan reads C-contiguous float32/float64 arrays of any shape in place; for anything
    else it returns None and the callers fall back to numpy, so every array is still checked."""
    from fastbp import _core
    from fastbp._model import _all_finite

    for dtype in (np.float32, np.float64):
        grid = np.zeros((3, 5, 7), dtype)
        assert _core.all_finite(grid) is True
        grid[2, 4, 6] = np.nan
        assert _core.all_finite(grid) is False
        assert _core.all_finite(np.empty((0, 4), dtype)) is True
    declined = [
        np.ones((4, 4))[:, ::2],  # not contiguous
        np.ones(3, np.float16),
        np.ones(3, ">f4"),  # not native byte order
        np.ones(3, np.int64),
        [1.0, float("nan")],  # not an array
    ]
    for x in declined:
        assert _core.all_finite(x) is None
    bad_strided = np.ones((4, 4))
    bad_strided[1, 2] = np.inf
    assert _all_finite(bad_strided[:, ::2]) is False
    assert _all_finite(np.array([np.nan], np.float16)) is False
    assert _all_finite(np.array([np.inf], ">f8")) is False
    assert _all_finite(np.array([1, 2])) is True
