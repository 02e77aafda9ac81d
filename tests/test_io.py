"""fastbp.save / fastbp.load: exact round trips, torch interoperability through
safetensors.torch, the architecture metadata, the error contract for bad files, and atomic
saving."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn as tnn

import fastbp
from fastbp import (
    BatchNorm1d,
    Dropout,
    Identity,
    Linear,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
)
from tests.conftest import torch_equivalent


def full_model(dtype=np.float32, seed=0) -> Sequential:
    """Every layer type and option: biases on and off, BatchNorm affine and not (non-default
    eps/momentum), Dropout, all four activations."""
    rng = np.random.default_rng(seed)
    return Sequential(
        Linear(6, 10, dtype=dtype, rng=rng),
        BatchNorm1d(10, eps=1e-3, momentum=0.2, dtype=dtype),
        ReLU(),
        Dropout(0.3),
        Linear(10, 8, bias=False, dtype=dtype, rng=rng),
        Tanh(),
        BatchNorm1d(8, affine=False, dtype=dtype),
        Linear(8, 5, dtype=dtype, rng=rng),
        Sigmoid(),
        Linear(5, 4, dtype=dtype, rng=rng),
        Identity(),
    )


def trained(model: Sequential) -> Sequential:
    """A few training steps: non-trivial weights, running statistics and batch counters."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((64, model.in_features)).astype(model.dtype)
    y = rng.integers(0, model.out_features, 64)
    model.fit(X, y, loss="cross_entropy", epochs=2, batch_size=16, seed=0)
    return model


@pytest.fixture
def saved(tmp_path):
    """A trained float32 model and the path it was saved to."""
    model = trained(full_model())
    path = tmp_path / "model.safetensors"
    fastbp.save(model, path)
    return model, path


def inputs(model, rows=50, seed=2):
    return (
        np.random.default_rng(seed).standard_normal((rows, model.in_features)).astype(model.dtype)
    )


# ---- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    model = trained(full_model(dtype))
    path = tmp_path / "m.safetensors"
    fastbp.save(model, path)
    loaded = fastbp.load(path)
    assert isinstance(loaded, Sequential)
    assert loaded.dtype == dtype
    assert repr(loaded) == repr(model)
    assert [type(a) for a in loaded] == [type(b) for b in model]
    for a, b in zip(loaded, model, strict=True):
        assert a._spec() == b._spec()
    ours, theirs = loaded.state_dict(), model.state_dict()
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert np.array_equal(ours[key], theirs[key]), key
    assert int(ours["1.num_batches_tracked"]) == 8  # 2 epochs x 4 batches
    x = inputs(model)
    assert np.array_equal(loaded.predict(x), model.predict(x))


def test_loaded_model_trains_like_the_original(saved):
    """Equal weights, buffers, counters and hyperparameters (eps, momentum, p): the same fit
    (fresh Adam, same seed) on both ends bitwise equal."""
    model, path = saved
    loaded = fastbp.load(path)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((48, 6)).astype(np.float32)
    y = rng.integers(0, 4, 48)
    for m in (model, loaded):
        opt = fastbp.optim.Adam(m.parameters(), lr=0.01)
        m.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=16, seed=5)
    assert np.array_equal(loaded._params, model._params)
    assert np.array_equal(loaded._buffers, model._buffers)


def test_save_accepts_str_paths_and_overwrites(tmp_path):
    a, b = full_model(seed=1), full_model(seed=2)
    path = str(tmp_path / "m.safetensors")
    fastbp.save(a, path)
    fastbp.save(b, path)
    assert np.array_equal(fastbp.load(path)._params, b._params)
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_save_in_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = full_model()
    fastbp.save(model, "bare.safetensors")
    assert np.array_equal(fastbp.load("bare.safetensors")._params, model._params)


def test_saved_file_permissions_follow_the_umask(tmp_path):
    """A saved model is an ordinary file: its mode is what open() would give it under the
    process umask (typically 0o644), not the 0o600 of a private temporary file."""
    old = os.umask(0o022)
    try:
        fastbp.save(full_model(), tmp_path / "m.safetensors")
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == 0o644


# ---- torch interoperability and metadata ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_file_loads_into_torch_with_the_same_eval_output(tmp_path, dtype):
    """safetensors.torch.load_file + strict load_state_dict into the equivalent nn.Sequential.

    In float64 both compute the same math to ~1e-15 relative. In float32 each layer's result
    carries at most ~k u (k <= 11 terms, u = 6e-8) of its terms' magnitude from either library's
    summation order, so < 1e-6 per layer; through four Linear layers and two BatchNorms (the
    normalisation scales by 1/sqrt(var + eps), O(1) here) the outputs agree to 1e-5."""
    model = trained(full_model(dtype))
    path = tmp_path / "m.safetensors"
    fastbp.save(model, path)
    tensors = safetensors.torch.load_file(str(path))
    ref = torch_equivalent(model)
    ref.load_state_dict(tensors, strict=True)
    assert ref[1].num_batches_tracked.item() == 8
    x = inputs(model)
    with torch.no_grad():
        expected = ref.eval()(torch.from_numpy(x)).numpy()
    ours = model.predict(x)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(ours, expected, rtol=tol, atol=tol)
    assert np.abs(ours - ours.mean(axis=0)).max() > 1e-3  # outputs vary: not a trivial match


def test_metadata_describes_the_architecture(saved):
    model, path = saved
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "fastbp.sequential"
    assert meta["format_version"] == "1"
    arch = json.loads(meta["architecture"])
    assert arch["type"] == "Sequential" and arch["dtype"] == "float32"
    assert [layer["type"] for layer in arch["layers"]] == [type(m).__name__ for m in model]
    assert arch["layers"][0] == {"type": "Linear", "in_features": 6, "out_features": 10,
                                 "bias": True}  # fmt: skip
    assert arch["layers"][1] == {"type": "BatchNorm1d", "num_features": 10, "eps": 1e-3,
                                 "momentum": 0.2, "affine": True}  # fmt: skip
    assert arch["layers"][3] == {"type": "Dropout", "p": 0.3}
    assert arch["layers"][4]["bias"] is False
    assert keys == set(model.state_dict())


# ---- errors ------------------------------------------------------------------------------------------


def rewrite(path, out, *, tensors=None, metadata=None):
    """Write a safetensors file at `out` from the file at `path`, with tensors/metadata edited."""
    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    if tensors is not None:
        tensors(data)
    if metadata is not None:
        metadata(meta)
    safetensors.numpy.save_file(data, str(out), metadata=meta)
    return out


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        fastbp.load(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        fastbp.load(tmp_path)  # a directory is not a model file


def test_random_bytes(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fastbp.load(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ValueError):
        fastbp.load(path)


def test_truncated_file(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fastbp.load(cut)


def test_safetensors_file_without_fastbp_metadata(saved, tmp_path):
    model, _ = saved
    path = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file(
        {k: np.ascontiguousarray(v) for k, v in model.state_dict().items()}, str(path)
    )
    with pytest.raises(ValueError, match="not a fastbp model"):
        fastbp.load(path)


@pytest.mark.parametrize("version", ["2", "0", ""])
def test_wrong_format_version(saved, tmp_path, version):
    _, path = saved
    out = rewrite(path, tmp_path / "v.safetensors",
                  metadata=lambda m: m.update(format_version=version))  # fmt: skip
    with pytest.raises(ValueError, match="format version"):
        fastbp.load(out)


def test_tensor_with_wrong_shape(saved, tmp_path):
    _, path = saved
    out = rewrite(path, tmp_path / "s.safetensors",
                  tensors=lambda t: t.update({"0.weight": np.zeros((10, 7), np.float32)}))  # fmt: skip
    with pytest.raises(ValueError, match=r"0\.weight.*shape"):
        fastbp.load(out)


def test_missing_tensor(saved, tmp_path):
    _, path = saved
    out = rewrite(path, tmp_path / "k.safetensors", tensors=lambda t: t.pop("7.bias"))
    with pytest.raises(ValueError, match=r"missing keys.*7\.bias"):
        fastbp.load(out)


def test_unexpected_tensor(saved, tmp_path):
    _, path = saved
    out = rewrite(path, tmp_path / "u.safetensors",
                  tensors=lambda t: t.update({"99.weight": np.zeros(3, np.float32)}))  # fmt: skip
    with pytest.raises(ValueError, match=r"unexpected keys.*99\.weight"):
        fastbp.load(out)


def edit_architecture(edit):
    def apply(meta):
        arch = json.loads(meta["architecture"])
        edit(arch)
        meta["architecture"] = json.dumps(arch)

    return apply


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda a: a["layers"][2].update(type="GELU"), "unknown layer type 'GELU'"),
        (lambda a: a["layers"][0].pop("in_features"), r"layer 0 \(Linear\)"),
        (lambda a: a["layers"][0].update(in_features="six"), r"layer 0 \(Linear\)"),
        (lambda a: a["layers"][3].update(p=1.5), r"layer 3 \(Dropout\)"),
        (lambda a: a["layers"].__setitem__(2, "ReLU"), "layer 2"),
        (lambda a: a.update(layers=[]), "non-empty Sequential"),
        (lambda a: a.update(type="MLP"), "non-empty Sequential"),
        (lambda a: a.update(dtype="int32"), "unsupported dtype"),
        (lambda a: a.update(dtype="no-such-dtype"), "malformed architecture"),
        (lambda a: a.pop("layers"), "malformed architecture"),
        (lambda a: a["layers"][0].update(out_features=11), "receives 11"),
    ],
    ids=[
        "unknown-type", "missing-field", "bad-field", "bad-p", "not-a-dict", "no-layers",
        "not-sequential", "int-dtype", "bad-dtype", "no-layers-key", "inconsistent-widths",
    ],
)  # fmt: skip
def test_bad_architecture(saved, tmp_path, edit, pattern):
    _, path = saved
    out = rewrite(path, tmp_path / "a.safetensors", metadata=edit_architecture(edit))
    with pytest.raises(ValueError, match=pattern):
        fastbp.load(out)


@pytest.mark.parametrize("text", ['{"type": "Sequential", "layers": [', "null", "[1, 2]", '"x"'])
def test_malformed_architecture_json(saved, tmp_path, text):
    _, path = saved
    out = rewrite(path, tmp_path / "j.safetensors",
                  metadata=lambda m: m.update(architecture=text))  # fmt: skip
    with pytest.raises(ValueError, match="malformed architecture"):
        fastbp.load(out)


def test_missing_architecture_entry(saved, tmp_path):
    _, path = saved
    out = rewrite(path, tmp_path / "n.safetensors", metadata=lambda m: m.pop("architecture"))
    with pytest.raises(ValueError, match="malformed architecture"):
        fastbp.load(out)


def test_save_rejects_non_models(tmp_path):
    for obj in (Linear(2, 2), {"0.weight": np.zeros((2, 2))}, tnn.Linear(2, 2), None):
        with pytest.raises(TypeError, match=r"fastbp\.Sequential"):
            fastbp.save(obj, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_save_into_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        fastbp.save(full_model(), tmp_path / "no" / "such" / "dir.safetensors")


# ---- atomic saving ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_the_previous_file_and_leaves_no_temp_file(saved, monkeypatch, exc):
    """The writer dies half-way (after writing part of the temporary file): the old file is
    byte-for-byte intact and still loads, and nothing else is left in the folder."""
    model, path = saved
    before = path.read_bytes()
    real_save_file = safetensors.numpy.save_file

    def dying_save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # a partial write
            f.truncate(100)
        raise exc

    monkeypatch.setattr(safetensors.numpy, "save_file", dying_save_file)
    with pytest.raises(type(exc)):
        fastbp.save(full_model(seed=7), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == [path.name]
    x = inputs(model)
    assert np.array_equal(fastbp.load(path).predict(x), model.predict(x))


def test_failed_first_save_creates_nothing(tmp_path, monkeypatch):
    def failing(tensors, filename, metadata=None):
        raise OSError("no space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", failing)
    with pytest.raises(OSError, match="no space"):
        fastbp.save(full_model(), tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == []
