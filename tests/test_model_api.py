"""The torch-like model surface: Linear init, Sequential containers, the flat parameter buffer,
gradients, train/eval, state dicts (against torch's nn.Sequential), MLP, input validation,
BatchNorm1d's batch-size rule and Dropout masks.

Values that fastbp only copies or rearranges are compared exactly (``np.array_equal``); values
it computes are compared to float64 references with tolerances derived where they are used.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
from torch import nn as tnn

import fastbp
from fastbp import (
    BatchNorm1d,
    Dropout,
    Identity,
    Linear,
    Parameter,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
)
from tests.conftest import build_mlp, dot_error_bound, torch_equivalent, using_threads

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)


def bn_model(dtype=np.float32, seed: int = 0) -> Sequential:
    """Linear, BatchNorm1d, ReLU, Dropout, Linear, Tanh: every kind of parameter and buffer."""
    rng = np.random.default_rng(seed)
    return Sequential(
        Linear(5, 6, dtype=dtype, rng=rng),
        BatchNorm1d(6, dtype=dtype),
        ReLU(),
        Dropout(0.25),
        Linear(6, 3, dtype=dtype, rng=rng),
        Tanh(),
    )


def randomise(model: Sequential, seed: int = 1) -> None:
    """Overwrite every parameter and BatchNorm buffer with distinct random values."""
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape)
    for layer in model:
        if isinstance(layer, BatchNorm1d):
            layer.running_mean[...] = rng.standard_normal(layer.num_features)
            layer.running_var[...] = rng.uniform(0.5, 2.0, layer.num_features)


# ---- Linear initialisation ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_shapes_dtype_and_torch_init_bounds(dtype):
    """weight (out, in) and bias (out,) in the requested dtype, uniform in ±1/sqrt(in).

    With 200 x 400 = 80000 draws the extremes come within 1e-3 of the bound (the chance that
    all 80000 uniforms miss a band of relative width 1e-3 at one end is (1 - 5e-4)^80000 ~ 4e-18)
    and the variance bound^2/3 is matched to 3% (its relative standard error is ~0.4%), so a
    wrong bound (1/in, 1/sqrt(out), a normal draw) fails."""
    layer = Linear(400, 200, dtype=dtype, rng=np.random.default_rng(0))
    bound = 1 / np.sqrt(400)
    assert layer.weight.shape == (200, 400) and layer.bias.shape == (200,)
    assert layer.weight.dtype == dtype and layer.bias.dtype == dtype
    w = layer.weight.data.astype(np.float64)
    assert np.abs(w).max() <= bound
    assert w.max() > bound * (1 - 1e-3) and w.min() < -bound * (1 - 1e-3)
    assert abs(w.mean()) < 0.02 * bound
    assert w.var() == pytest.approx(bound**2 / 3, rel=0.03)
    b = layer.bias.data.astype(np.float64)
    assert np.abs(b).max() <= bound and b.std() > 0.3 * bound


def test_linear_bias_false_has_no_bias_parameter():
    layer = Linear(3, 2, bias=False, rng=np.random.default_rng(0))
    assert layer.bias is None
    assert [n for n, _ in layer.named_parameters()] == ["weight"]


def test_linear_seeded_rng_is_reproducible():
    a = Linear(7, 5, rng=np.random.default_rng(42))
    b = Linear(7, 5, rng=np.random.default_rng(42))
    c = Linear(7, 5, rng=np.random.default_rng(43))
    assert np.array_equal(a.weight.data, b.weight.data)
    assert np.array_equal(a.bias.data, b.bias.data)
    assert not np.array_equal(a.weight.data, c.weight.data)


def test_manual_seed_makes_default_init_reproducible():
    fastbp.manual_seed(123)
    a1, a2 = Linear(6, 4), Linear(4, 2)
    fastbp.manual_seed(123)
    b1, b2 = Linear(6, 4), Linear(4, 2)
    assert np.array_equal(a1.weight.data, b1.weight.data)
    assert np.array_equal(a2.bias.data, b2.bias.data)
    # the generator advances between layers, and another seed gives other weights
    assert not np.array_equal(a1.weight.data[:2, :2], a2.weight.data[:2, :2])
    fastbp.manual_seed(124)
    assert not np.array_equal(Linear(6, 4).weight.data, a1.weight.data)


def test_manual_seed_also_fixes_new_models_dropout_stream():
    """Like torch.manual_seed: after the same manual_seed, two identically built models draw the
    same dropout masks (each model's stream is seeded from the global generator)."""
    x = np.ones((8, 4), np.float32)
    outs = []
    for _ in range(2):
        fastbp.manual_seed(5)
        outs.append(fastbp.MLP([4, 32, 2], dropout=0.5).forward(x))
    assert np.array_equal(outs[0], outs[1])
    fastbp.manual_seed(6)
    assert not np.array_equal(fastbp.MLP([4, 32, 2], dropout=0.5).forward(x), outs[0])


@pytest.mark.parametrize("seed", [-1, 1.5, True, "1"])
def test_manual_seed_rejects_bad_seeds(seed):
    with pytest.raises(ValueError):
        fastbp.manual_seed(seed)


@pytest.mark.parametrize("args", [(0, 3), (3, 0), (-1, 2)])
def test_linear_rejects_nonpositive_sizes(args):
    with pytest.raises(ValueError):
        Linear(*args)


def test_linear_rejects_non_float_dtype():
    with pytest.raises(TypeError):
        Linear(2, 2, dtype=np.int32)


def test_parameter_wraps_user_arrays():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    p = Parameter(arr)
    assert p.data is arr  # used in place, not copied
    assert p.shape == (2, 3) and p.dtype == np.float32 and p.numel() == 6
    assert np.array_equal(p.grad, np.zeros((2, 3))) and p.grad.dtype == np.float32
    assert np.array_equal(np.asarray(p), arr)
    assert np.asarray(p, dtype=np.float64).dtype == np.float64
    assert repr(p) == "Parameter(shape=(2, 3), dtype=float32)"
    assert p.owner is None
    lst = Parameter([1.0, 2.0])
    assert lst.dtype == np.float64
    strided = Parameter(np.zeros((4, 4))[:, ::2])
    assert strided.data.flags.c_contiguous
    with pytest.raises(TypeError):
        Parameter(np.arange(3))


@pytest.mark.parametrize(
    "kwargs", [{"eps": 0}, {"eps": -1e-5}, {"momentum": 1.5}, {"momentum": -0.1}]
)
def test_batchnorm_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        BatchNorm1d(4, **kwargs)


# ---- Sequential as a container ------------------------------------------------------------------


def test_sequential_indexing_len_iter():
    layers = [Linear(4, 8), ReLU(), Linear(8, 3), Sigmoid()]
    model = Sequential(*layers)
    assert len(model) == 4
    assert list(model) == layers
    assert all(model[i] is layers[i] for i in range(4))
    assert model[-1] is layers[-1]
    with pytest.raises(IndexError):
        model[4]
    assert (model.in_features, model.out_features) == (4, 3)


def test_sequential_repr_matches_torch():
    """Linear and the activations print exactly as torch's nn.Sequential does."""
    model = Sequential(
        Linear(4, 8), ReLU(), Linear(8, 3, bias=False), Sigmoid(), Tanh(), Identity()
    )
    assert repr(model) == repr(torch_equivalent(model))
    assert "(3): Dropout(p=0.5)" in repr(Sequential(Linear(2, 2), ReLU(), Linear(2, 2), Dropout()))


def test_sequential_rejects_empty_nested_and_foreign_layers():
    with pytest.raises(ValueError):
        Sequential()
    with pytest.raises(TypeError):
        Sequential(Sequential(Linear(2, 2)))
    with pytest.raises(TypeError):
        Sequential(Linear(2, 2), tnn.ReLU())
    with pytest.raises(ValueError):
        Sequential(ReLU(), Tanh())  # no layer knows a width


def test_parameter_names_and_shapes_match_torch():
    model = Sequential(
        Linear(5, 6),
        BatchNorm1d(6),
        ReLU(),
        Linear(6, 4, bias=False),
        Dropout(0.1),
        Tanh(),
        Linear(4, 2),
    )
    ref = torch_equivalent(model)
    ours = [(n, p.shape) for n, p in model.named_parameters()]
    theirs = [(n, tuple(p.shape)) for n, p in ref.named_parameters()]
    assert ours == theirs
    assert [p.shape for p in model.parameters()] == [s for _, s in theirs]
    assert model.num_parameters() == sum(p.numel() for p in ref.parameters())
    sd = model.state_dict()
    assert set(sd) == set(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert sd[key].shape == tuple(value.shape), key
    assert sd["1.num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameters_are_adjacent_views_of_one_aligned_buffer(dtype):
    model = bn_model(dtype)
    params = list(model.parameters())
    assert model._params.ctypes.data % 64 == 0
    assert model._grads.ctypes.data % 64 == 0
    assert params[0].data.ctypes.data == model._params.ctypes.data
    for p in params:
        assert np.shares_memory(p.data, model._params)
        assert np.shares_memory(p.grad, model._grads)
        assert p.data.flags.c_contiguous and p.dtype == dtype
    for a, b in itertools.pairwise(params):
        assert a.data.ctypes.data + a.data.nbytes == b.data.ctypes.data
        assert a.grad.ctypes.data + a.grad.nbytes == b.grad.ctypes.data
    assert sum(p.numel() for p in params) == model._params.size
    # the values copied into the buffer are the layers' initial values
    fresh = bn_model(dtype)
    for p, q in zip(params, fresh.parameters(), strict=True):
        assert np.array_equal(p.data, q.data)


def test_construction_preserves_initial_values():
    rng = np.random.default_rng(5)
    lin = Linear(3, 2, rng=rng)
    w, b = lin.weight.data.copy(), lin.bias.data.copy()
    model = Sequential(lin, Tanh())
    assert np.array_equal(model[0].weight.data, w) and np.array_equal(model[0].bias.data, b)
    assert np.shares_memory(lin.weight.data, model._params)


def test_setting_weights_in_place_changes_the_output():
    model = Sequential(Linear(3, 2, dtype=np.float64), Sigmoid())
    x = np.array([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    before = model(x)
    w = np.array([[0.1, -0.2, 0.3], [0.0, 0.5, -0.5]])
    b = np.array([0.25, -1.0])
    model[0].weight.data[...] = w
    model[0].bias.data[...] = b
    after = model(x)
    expected = 1 / (1 + np.exp(-(x @ w.T + b)))
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, expected, rtol=1e-14, atol=0)
    # and the optimizer's view (the flat buffer) sees the same values
    assert np.array_equal(model._params[:6].reshape(2, 3), w)


# ---- gradients ------------------------------------------------------------------------------------


def run_backward(model, x, dy):
    model.forward(x)
    return model.backward(dy)


def test_grad_views_zero_grad_and_grad_setter():
    model = bn_model(np.float64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 5))
    model.seed(0)
    run_backward(model, x, rng.standard_normal((8, 3)))
    for name, p in model.named_parameters():
        assert np.shares_memory(p.grad, model._grads)
        assert np.abs(p.grad).sum() > 0, name
    model.zero_grad()
    assert not model._grads.any()
    assert all(not p.grad.any() for p in model.parameters())
    # assigning .grad writes into the model's gradient buffer, keeping the view
    p0 = model[0].weight
    p0.grad = np.ones(p0.shape)
    assert np.shares_memory(p0.grad, model._grads)
    assert model._grads[: p0.numel()].sum() == p0.numel()
    with pytest.raises(ValueError):
        p0.grad = np.ones((2, 2))
    # Parameter.zero_grad and the optimizer's zero_grad reach the same buffer
    p0.zero_grad()
    assert not model._grads.any()
    model[4].weight.grad = np.full(model[4].weight.shape, 3.0)
    fastbp.optim.SGD(model.parameters(), lr=0.1).zero_grad()
    assert not model._grads.any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradients_accumulate_across_backward_calls(dtype):
    """Two identical forward/backward passes leave 2x the gradient of one.

    The second pass adds a freshly computed g to the stored g. If the kernel computes g
    identically both times (deterministic), the sum is exactly 2g; if it folds the stored value
    into its running sum first, each element differs from 2g by at most gamma_k sum|terms| with
    k = batch + 1 terms, bounded here by (batch + 2) * eps * (|2g| + the same-sign-free scale of
    the products), which is below 32 eps * max|2g| for batch 8 and these well-conditioned
    inputs. A missing accumulation (g or 0 instead of 2g) is off by 100%."""
    model = Sequential(Linear(5, 7, dtype=dtype), Tanh(), Linear(7, 3, dtype=dtype))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 5)).astype(dtype)
    dy = rng.standard_normal((8, 3)).astype(dtype)
    dx1 = run_backward(model, x, dy)
    once = model._grads.copy()
    dx2 = run_backward(model, x, dy)
    assert np.array_equal(dx1, dx2)  # dx is not accumulated
    twice = model._grads
    eps = float(np.finfo(dtype).eps)
    np.testing.assert_allclose(twice, 2 * once, rtol=0, atol=32 * eps * np.abs(2 * once).max())
    assert np.abs(once).max() > 0.1


# ---- train / eval -------------------------------------------------------------------------------


def test_train_eval_propagate_to_every_layer():
    model = bn_model()
    assert model.training and all(layer.training for layer in model)
    assert model.eval() is model
    assert not model.training and not any(layer.training for layer in model)
    assert model.train() is model
    assert model.training and all(layer.training for layer in model)
    model.train(False)
    assert not any(layer.training for layer in model)


# ---- state dicts ----------------------------------------------------------------------------------


def test_state_dict_returns_copies():
    model = bn_model()
    sd = model.state_dict()
    for key, value in sd.items():
        assert isinstance(value, np.ndarray), key
        assert not np.shares_memory(value, model._params), key
        assert not np.shares_memory(value, model._buffers), key
    before = model._params.copy()
    buffers = model._buffers.copy()
    for value in sd.values():
        value[...] = 7
    assert np.array_equal(model._params, before)
    assert np.array_equal(model._buffers, buffers)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_load_state_dict_from_numpy_is_exact(dtype):
    src = bn_model(dtype, seed=1)
    randomise(src, seed=2)
    dst = bn_model(dtype, seed=3)
    dst.load_state_dict(src.state_dict())
    for key, value in src.state_dict().items():
        assert np.array_equal(dst.state_dict()[key], value), key
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(dtype)
    assert np.array_equal(src.predict(x), dst.predict(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_dict_round_trips_through_torch_exactly(dtype):
    """fastbp -> torch nn.Sequential.load_state_dict (strict) -> back to fastbp: every value,
    including BatchNorm's running statistics and num_batches_tracked, survives bitwise."""
    model = bn_model(dtype)
    randomise(model, seed=3)
    model.seed(0)
    rng = np.random.default_rng(1)
    for _ in range(3):  # count batches and move the running statistics
        model.forward(rng.standard_normal((8, 5)).astype(dtype))
    original = model.state_dict()
    assert int(original["1.num_batches_tracked"]) == 3

    ref = torch_equivalent(model)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in original.items()}, strict=True)
    for key, value in ref.state_dict().items():
        assert np.array_equal(value.numpy(), original[key]), key

    other = bn_model(dtype, seed=9)
    other.load_state_dict(ref.state_dict())  # torch tensors straight in
    back = other.state_dict()
    assert set(back) == set(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype, key
        assert np.array_equal(back[key], value), key


def test_load_state_dict_from_torch_model_matches_torch_output():
    """A torch-initialised model loaded into fastbp computes torch's eval-mode output."""
    model = bn_model(np.float64)
    ref = torch_equivalent(model)
    with torch.no_grad():
        ref[1].running_mean.uniform_(-1, 1)
        ref[1].running_var.uniform_(0.5, 2)
    model.load_state_dict(ref.state_dict())
    x = np.random.default_rng(0).standard_normal((6, 5))
    with torch.no_grad():
        expected = ref.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.predict(x), expected, rtol=1e-12, atol=1e-14)


def _assert_unchanged(model, params, buffers):
    assert np.array_equal(model._params, params)
    assert np.array_equal(model._buffers, buffers)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda sd: sd.pop("4.bias"), "missing keys.*4.bias"),
        (lambda sd: sd.pop("1.running_var"), "missing keys.*1.running_var"),
        (lambda sd: sd.update({"9.weight": np.zeros(2)}), "unexpected keys.*9.weight"),
        (lambda sd: sd.update({"4.bias": np.zeros(4)}), r"4\.bias.*shape"),
        (lambda sd: sd.update({"0.weight": np.zeros((5, 6))}), r"0\.weight.*shape"),
    ],
    ids=["missing-param", "missing-buffer", "unexpected", "bias-shape", "transposed-weight"],
)
def test_strict_load_errors_leave_the_model_unchanged(mutate, pattern):
    """Every other entry is valid (and different from the model's values): a failed load must
    not have written any of them."""
    model = bn_model()
    params, buffers = model._params.copy(), model._buffers.copy()
    src = bn_model(seed=5)
    randomise(src, seed=6)
    sd = src.state_dict()
    mutate(sd)
    with pytest.raises(ValueError, match=pattern):
        model.load_state_dict(sd)
    _assert_unchanged(model, params, buffers)


def test_load_state_dict_non_strict_and_bad_values():
    model = bn_model()
    src = bn_model(seed=5)
    randomise(src, seed=6)
    sd = src.state_dict()
    del sd["0.weight"]
    sd["extra"] = np.zeros(3)
    w0 = model[0].weight.data.copy()
    model.load_state_dict(sd, strict=False)
    assert np.array_equal(model[0].weight.data, w0)  # missing: kept
    assert np.array_equal(model[4].weight.data, src[4].weight.data)  # present: loaded

    params, buffers = model._params.copy(), model._buffers.copy()
    bad = src.state_dict()
    bad["1.num_batches_tracked"] = np.array([1.5])
    with pytest.raises(ValueError, match="num_batches_tracked"):
        model.load_state_dict(bad)
    bad = src.state_dict()
    bad["0.bias"] = np.array(["a"] * 6)
    with pytest.raises(TypeError):
        model.load_state_dict(bad)
    with pytest.raises(TypeError):
        model.load_state_dict([("0.weight", np.zeros((6, 5)))])
    bad = src.state_dict()
    bad["0.bias"] = object()
    with pytest.raises(TypeError, match=r"0\.bias"):
        model.load_state_dict(bad)
    _assert_unchanged(model, params, buffers)


# ---- construction errors ---------------------------------------------------------------------------


def test_mixed_dtypes_raise_type_error():
    with pytest.raises(TypeError, match="dtype"):
        Sequential(Linear(3, 4, dtype=np.float32), ReLU(), Linear(4, 2, dtype=np.float64))
    with pytest.raises(TypeError, match="dtype"):
        Sequential(Linear(3, 4, dtype=np.float64), BatchNorm1d(4, dtype=np.float32))


def test_layer_in_two_models_raises_and_first_model_survives():
    lin = Linear(3, 2, rng=np.random.default_rng(0))
    first = Sequential(lin)
    x = np.ones((1, 3), np.float32)
    y0 = first(x)
    with pytest.raises(ValueError, match="already belongs"):
        Sequential(Linear(2, 3), ReLU(), lin)
    assert np.shares_memory(lin.weight.data, first._params)
    assert np.array_equal(first(x), y0)


def test_failed_construction_does_not_claim_the_layers():
    """A Sequential whose construction fails (here: an unsupported custom layer) must not leave
    its other layers marked as belonging to the half-built model: fixing the layer list and
    building again has to work."""

    class Custom(fastbp.Module):
        pass

    lin = Linear(3, 3, rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match="unsupported layer"):
        Sequential(lin, Custom())
    model = Sequential(lin)
    assert np.shares_memory(lin.weight.data, model._params)


def test_width_mismatch_names_the_layer():
    with pytest.raises(ValueError, match=r"layer 2 \(Linear\).*4.*5"):
        Sequential(Linear(3, 5), ReLU(), Linear(4, 2))
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm1d\)"):
        Sequential(Linear(3, 5), BatchNorm1d(4))


# ---- input errors -------------------------------------------------------------------------------------


@pytest.fixture
def small():
    return Sequential(Linear(4, 3, rng=np.random.default_rng(0)), Tanh(), Linear(3, 2))


def test_forward_1d_input_hints_reshape(small):
    with pytest.raises(ValueError, match=re.escape("reshape(1, -1)")):
        small.forward(np.ones(4, np.float32))


def test_forward_wrong_feature_count(small):
    with pytest.raises(ValueError, match=r"5 features.*expects 4"):
        small.forward(np.ones((2, 5), np.float32))


def test_forward_float64_into_float32_model_mentions_astype(small):
    with pytest.raises(TypeError, match="astype"):
        small.forward(np.ones((2, 4), np.float64))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.float16])
def test_forward_non_float_input(small, dtype):
    with pytest.raises(TypeError):
        small.forward(np.ones((2, 4), dtype))


def test_forward_empty_batch(small):
    with pytest.raises(ValueError, match="empty"):
        small.forward(np.empty((0, 4), np.float32))


def test_forward_accepts_lists_and_noncontiguous_arrays(small):
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    view = x[:, ::2]  # strided columns
    assert not view.flags.c_contiguous
    assert np.array_equal(small.forward(view), small.forward(np.ascontiguousarray(view)))
    assert np.array_equal(small.forward(view.tolist()), small.forward(np.ascontiguousarray(view)))


def test_backward_state_errors(small):
    dy = np.ones((2, 2), np.float32)
    with pytest.raises(RuntimeError):
        small.backward(dy)  # no forward yet
    small.eval()
    small.forward(np.ones((2, 4), np.float32))
    with pytest.raises(RuntimeError):
        small.backward(dy)  # eval-mode forward keeps nothing for backward
    small.train()
    small.forward(np.ones((2, 4), np.float32))
    small.predict(np.ones((3, 4), np.float32))  # overwrites the saved activations
    with pytest.raises(RuntimeError):
        small.backward(dy)


def test_backward_grad_output_shape_and_dtype(small):
    small.forward(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="grad_output"):
        small.backward(np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="grad_output"):
        small.backward(np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match="astype"):
        small.backward(np.ones((2, 2), np.float64))
    dx = small.backward(np.ones((2, 2), np.float32))  # still usable after the errors
    assert dx.shape == (2, 4) and dx.dtype == np.float32


# ---- MLP ---------------------------------------------------------------------------------------------------


def test_mlp_builds_torch_equivalent_layer_list():
    model = fastbp.MLP(
        [6, 8, 5, 3],
        activation="tanh",
        output_activation="sigmoid",
        dropout=0.2,
        dtype=np.float64,
        seed=0,
    )
    expected = tnn.Sequential(
        tnn.Linear(6, 8),
        tnn.Tanh(),
        tnn.Dropout(0.2),
        tnn.Linear(8, 5),
        tnn.Tanh(),
        tnn.Dropout(0.2),
        tnn.Linear(5, 3),
        tnn.Sigmoid(),
    )
    assert [type(layer).__name__ for layer in model] == [type(m).__name__ for m in expected]
    assert [(n, p.shape) for n, p in model.named_parameters()] == [
        (n, tuple(p.shape)) for n, p in expected.named_parameters()
    ]
    assert model.dtype == np.float64 and all(p.dtype == np.float64 for p in model.parameters())
    assert all(layer.p == 0.2 for layer in model if isinstance(layer, Dropout))


def test_mlp_defaults_relu_no_dropout_float32():
    model = fastbp.MLP([3, 4, 2])
    assert [type(layer) for layer in model] == [Linear, ReLU, Linear]
    assert model.dtype == np.float32
    assert [type(layer) for layer in fastbp.MLP([3, 2], activation="TANH")] == [Linear]


def test_mlp_seed_fixes_weights_and_masks():
    a = fastbp.MLP([5, 16, 2], dropout=0.5, seed=7)
    b = fastbp.MLP([5, 16, 2], dropout=0.5, seed=7)
    c = fastbp.MLP([5, 16, 2], dropout=0.5, seed=8)
    assert np.array_equal(a._params, b._params)
    assert not np.array_equal(a._params, c._params)
    x = np.ones((4, 5), np.float32)
    assert np.array_equal(a.forward(x), b.forward(x))  # same dropout stream


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sizes": [3, 4], "activation": "gelu"},
        {"sizes": [3, 4, 2], "output_activation": "softmax"},
        {"sizes": [3, 0, 2]},
        {"sizes": [0, 2]},
        {"sizes": [3]},
        {"sizes": 3},
        {"sizes": [3, 4, 2], "dropout": 1.0},
    ],
)
def test_mlp_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        fastbp.MLP(**kwargs)


# ---- BatchNorm1d and Dropout ---------------------------------------------------------------------------


def test_batchnorm_batch_of_one_in_training_raises():
    model = Sequential(Linear(3, 4), BatchNorm1d(4))
    with pytest.raises(ValueError, match="more than 1 sample"):
        model.forward(np.ones((1, 3), np.float32))
    model.eval()
    assert model.forward(np.ones((1, 3), np.float32)).shape == (1, 4)


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_training_forward_and_running_stats_match_torch(affine):
    """Training-mode output (batch statistics, biased variance) and the running statistics
    (momentum update with the unbiased variance) after three batches equal torch's in float64
    to 1e-12 relative (both sum <= 16 rows in double)."""
    model = Sequential(
        Linear(5, 6, dtype=np.float64, rng=np.random.default_rng(0)),
        BatchNorm1d(6, eps=1e-3, momentum=0.3, affine=affine, dtype=np.float64),
        Tanh(),
    )
    if affine:
        model[1].weight.data[...] = np.linspace(0.5, 2, 6)
        model[1].bias.data[...] = np.linspace(-1, 1, 6)
    ref = torch_equivalent(model)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    rng = np.random.default_rng(1)
    for rows in (16, 2, 9):
        x = rng.standard_normal((rows, 5)) * 3 + 1
        out = model.forward(x)
        with torch.no_grad():
            expected = ref(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-13)
    sd = model.state_dict()
    for key in ("1.running_mean", "1.running_var"):
        np.testing.assert_allclose(sd[key], ref.state_dict()[key].numpy(), rtol=1e-12)
    assert int(sd["1.num_batches_tracked"]) == 3
    # eval mode uses the running statistics, like torch
    x = rng.standard_normal((4, 5))
    model.eval()
    with torch.no_grad():
        expected = ref.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.forward(x), expected, rtol=1e-12, atol=1e-13)


def identity_dropout_model(width: int, p: float) -> Sequential:
    """Linear with identity weight and zero bias, then Dropout: the output is x * mask exactly
    (every product of the GEMM is x_i * 1 or x_i * 0, so the sum is exact)."""
    model = Sequential(Linear(width, width), Dropout(p))
    model[0].weight.data[...] = np.eye(width)
    model[0].bias.data[...] = 0
    return model


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_dropout_zeroes_fraction_p_and_scales_survivors(p):
    """Over 200 x 100 = 20000 elements the dropped fraction has standard deviation
    sqrt(p(1-p)/20000) <= 0.0036; 6 sigma (0.022) is a bound a correct mask essentially never
    crosses while p vs 1-p, or no dropout at all, is far outside. Survivors are x / (1 - p)
    exactly (1/(1-p) is exact in binary for these p and x = 1)."""
    model = identity_dropout_model(100, p)
    model.seed(0)
    out = model.forward(np.ones((200, 100), np.float32))
    dropped = out == 0
    sigma = np.sqrt(p * (1 - p) / out.size)
    assert abs(dropped.mean() - p) < 6 * sigma
    assert np.all(out[~dropped] == np.float32(1 / (1 - p)))
    # no row or column is systematically kept or dropped
    assert 0 < dropped.mean(axis=0).min() and dropped.mean(axis=0).max() < 1


def test_dropout_eval_mode_and_predict_are_identity():
    model = identity_dropout_model(50, 0.5)
    x = np.random.default_rng(0).standard_normal((30, 50)).astype(np.float32)
    assert np.array_equal(model.predict(x), x)
    assert model.training  # predict does not change the mode
    model.eval()
    assert np.array_equal(model.forward(x), x)


def test_dropout_masks_follow_the_seed():
    model = identity_dropout_model(64, 0.5)
    x = np.ones((16, 64), np.float32)
    model.seed(11)
    first = model.forward(x)
    second = model.forward(x)  # the stream advances: a new mask
    model.seed(11)
    again = model.forward(x)
    model.seed(12)
    other = model.forward(x)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, other)
    # a second model seeded alike draws the same masks
    twin = identity_dropout_model(64, 0.5)
    twin.seed(11)
    assert np.array_equal(twin.forward(x), first)


def test_dropout_backward_uses_the_forward_mask():
    model = identity_dropout_model(32, 0.5)
    model.seed(3)
    out = model.forward(np.ones((8, 32), np.float32))
    dx = model.backward(np.ones((8, 32), np.float32))
    assert np.array_equal(dx, out)  # d(x * mask)/dx = mask


def test_standalone_layers_outside_a_model():
    """Linear(x) == x @ W.T + b within the dot-product rounding bound; activations, BatchNorm
    (eval) and Dropout (eval) work alone; training-mode Dropout/BatchNorm refuse."""
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        layer = Linear(37, 11, dtype=dtype, rng=rng)
        x = rng.standard_normal((9, 37)).astype(dtype)
        w = layer.weight.data.astype(np.float64)
        b = layer.bias.data.astype(np.float64)
        ref = x.astype(np.float64) @ w.T + b
        bound = dot_error_bound(np.abs(x.astype(np.float64)), np.abs(w.T), 38, dtype) + (
            float(np.finfo(dtype).eps) * (np.abs(ref) + np.abs(b))
        )
        out = layer(x)
        assert out.dtype == dtype and out.shape == (9, 11)
        assert (np.abs(out - ref) <= bound).all()

    x = rng.standard_normal((4, 3))
    np.testing.assert_allclose(Sigmoid()(x), 1 / (1 + np.exp(-x)), rtol=1e-15)
    np.testing.assert_allclose(Tanh()(x), np.tanh(x), rtol=1e-15, atol=1e-16)
    assert np.array_equal(ReLU()(x), np.maximum(x, 0))
    ident = Identity()(x)
    assert np.array_equal(ident, x) and not np.shares_memory(ident, x)
    with pytest.raises(TypeError):
        Sigmoid()(np.arange(3))
    with pytest.raises(RuntimeError):
        Dropout(0.5)(x)
    assert np.array_equal(Dropout(0.5).eval()(x), x)
    bn = BatchNorm1d(3, dtype=np.float64)
    with pytest.raises(RuntimeError):
        bn(x)
    bn.eval()
    bn.running_mean[...] = [1.0, 2.0, 3.0]
    bn.running_var[...] = [4.0, 1.0, 0.25]
    np.testing.assert_allclose(
        bn(x), (x - bn.running_mean) / np.sqrt(bn.running_var + 1e-5), rtol=1e-14
    )
    with pytest.raises(ValueError, match=re.escape("reshape(1, -1)")):
        Linear(3, 2)(np.ones(3, np.float32))


def test_seeded_models_do_not_advance_the_global_generator() -> None:
    """MLP(seed=...) draws nothing from fastbp's global generator (manual_seed users keep
    their stream), while an unseeded model does."""
    fastbp.manual_seed(123)
    expected = fastbp.Linear(3, 2).weight.data.copy()
    fastbp.manual_seed(123)
    fastbp.MLP([4, 3, 2], seed=7)
    assert np.array_equal(fastbp.Linear(3, 2).weight.data, expected)
    fastbp.manual_seed(123)
    fastbp.Sequential(fastbp.Linear(4, 3, rng=np.random.default_rng(0)))
    assert not np.array_equal(fastbp.Linear(3, 2).weight.data, expected)


def _step_net(dtype):
    # 12 x 40 weights: past the fused small-network step, so train_step copies its batch
    return build_mlp([12, 40, 3], ["tanh"], dtype, seed=4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_train_step_refuses_nonfinite_x_and_keeps_the_last_batch(dtype, bad):
    """train_step checks x for NaN/inf in C, while copying it: a refused batch changes nothing,
    not even the batch a later backward() reads, nor the train/eval mode; on the first call,
    in the step after another, and with a batch larger than any before."""
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(r, 12)).astype(dtype) for r in (8, 8, 30)]
    ys = [rng.integers(0, 3, size=x.shape[0]) for x in xs]
    dy = rng.normal(size=(8, 3)).astype(dtype)

    def run(refused):
        model = _step_net(dtype)
        opt = fastbp.optim.SGD(model.parameters(), lr=0.1)
        if refused:  # the first call, with nothing allocated yet
            with pytest.raises(ValueError, match="x contains NaN or infinity"):
                model.train_step(_poisoned(xs[0], bad), ys[0], "cross_entropy", opt)
        losses = [model.train_step(xs[0], ys[0], "cross_entropy", opt)]
        if refused:  # a step after another: the last batch's copy must survive
            for x, y in ((xs[1], ys[1]), (xs[2], ys[2])):  # same size, then larger
                model.eval()
                with pytest.raises(ValueError, match="x contains NaN or infinity"):
                    model.train_step(_poisoned(x, bad), y, "cross_entropy", opt)
                assert not model.training  # the mode is restored too
                model.train()
        model.backward(dy)  # reads train_step's saved batch and activations
        grads = [p.grad.copy() for p in model.parameters()]
        losses.append(model.train_step(xs[1], ys[1], "cross_entropy", opt))
        return model.state_dict(), grads, losses

    got, expected = run(True), run(False)
    for key in expected[0]:
        np.testing.assert_array_equal(got[0][key], expected[0][key], err_msg=key, strict=True)
    for g, e in zip(got[1], expected[1], strict=True):
        np.testing.assert_array_equal(g, e, strict=True)
    assert got[2] == expected[2]


def _poisoned(x, value):
    out = x.copy()
    out[x.shape[0] // 2, 5] = value
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_train_step_copy_check_finds_every_position(isa, dtype, threads):
    """The checked copy (fbp_copy_finite) on every ISA path, split over two threads for a large
    batch (200 x 784 values): a NaN or infinity in the first and last value, in each thread's
    share and in the vector tail is refused; a clean batch trains as fit's first step does."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 787)).astype(dtype)  # 787: a tail after the whole vectors
    y = rng.integers(0, 3, size=200)
    n = x.size
    for flat in (0, n // 4, n // 2 - 1, n // 2, 3 * n // 4, n - 2, n - 1):
        with using_threads(threads):
            model = build_mlp([787, 16, 3], ["relu"], dtype, seed=1)
            opt = fastbp.optim.SGD(model.parameters(), lr=0.1)
            model.train_step(x, y, "cross_entropy", opt)  # sizes the copies
            w = model._params.copy()
            bad = x.copy()
            bad.reshape(-1)[flat] = np.nan if flat % 2 else -np.inf
            with pytest.raises(ValueError, match="x contains NaN or infinity"):
                model.train_step(bad, y, "cross_entropy", opt)
            assert np.array_equal(model._params, w), flat
    with using_threads(threads):
        stepped = build_mlp([787, 16, 3], ["relu"], dtype, seed=1)
        sopt = fastbp.optim.SGD(stepped.parameters(), lr=0.1)
        for _ in range(2):
            stepped.train_step(x, y, "cross_entropy", sopt)
        fitted = build_mlp([787, 16, 3], ["relu"], dtype, seed=1)
        fopt = fastbp.optim.SGD(fitted.parameters(), lr=0.1)
        fitted.fit(x, y, loss="cross_entropy", optimizer=fopt, epochs=2, batch_size=200,
                   shuffle=False)  # fmt: skip
    assert np.array_equal(stepped._params, fitted._params)


def test_train_step_alternates_its_batch_copies(dtype):
    """Consecutive train_steps write alternate copies of the batch: a backward after each reads
    that step's batch (the grads of a forward-backward on it; lr 0 keeps the weights)."""
    rng = np.random.default_rng(1)
    model = _step_net(dtype)
    twin = _step_net(dtype)
    opt = fastbp.optim.SGD(model.parameters(), lr=0.0)
    dy = rng.normal(size=(8, 3)).astype(dtype)
    for _ in range(3):
        x = rng.normal(size=(8, 12)).astype(dtype)
        twin.load_state_dict(model.state_dict())
        model.train_step(x, rng.integers(0, 3, size=8), "cross_entropy", opt)
        model.zero_grad()
        model.backward(dy)
        twin.zero_grad()
        twin.forward(x)
        twin.backward(dy)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            np.testing.assert_array_equal(p.grad, q.grad, strict=True)
