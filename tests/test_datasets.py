"""fastbp.datasets: the bundled digits, IDX files (written here, gzipped and plain, and broken),
the Fashion-MNIST/MNIST finders (Debian folder, environment variable, absent data), CSV and npz."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from fastbp import datasets

DEBIAN_FASHION = datasets.FASHION_MNIST_DEBIAN_DIR


def write_idx(path: Path, arr: np.ndarray, code: int, *, compress: bool = False) -> Path:
    """An IDX file of ``arr`` (big-endian), written by hand from the format description."""
    big = arr.astype(arr.dtype.newbyteorder(">"))
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + big.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_mnist_folder(folder: Path, n_train: int = 12, n_test: int = 5, *, gz: bool = True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, 0x08, compress=gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 0x08, compress=gz)
        data[prefix] = (images, labels)
    return data


# ---- digits -------------------------------------------------------------------------------------


def test_load_digits_shape_dtype_range():
    X, y = datasets.load_digits()
    assert X.shape == (1797, 64) and X.dtype == np.uint8
    assert y.shape == (1797,) and y.dtype == np.int64
    assert X.min() == 0 and X.max() == 16
    assert sorted(np.unique(y).tolist()) == list(range(10))
    assert np.bincount(y).min() >= 170  # every digit about 180 times


def test_load_digits_equals_sklearn():
    sk = pytest.importorskip("sklearn.datasets")
    ref = sk.load_digits()
    X, y = datasets.load_digits()
    assert np.array_equal(X, ref.data) and np.array_equal(y, ref.target)


def test_digits_attribution_is_shipped():
    import fastbp.datasets as pkg

    note = (Path(pkg.__file__).parent / "data" / "README.md").read_text()
    for needed in ("UCI", "Alpaydin", "Kaynak", "CC BY 4.0"):
        assert needed in note


# ---- IDX ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    ("code", "dtype"),
    [
        (0x08, np.uint8),
        (0x09, np.int8),
        (0x0B, np.int16),
        (0x0C, np.int32),
        (0x0D, np.float32),
        (0x0E, np.float64),
    ],
)
def test_idx_round_trip(tmp_path, compress, code, dtype):
    rng = np.random.default_rng(code)
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    out = datasets.load_idx(write_idx(tmp_path / "a.idx", arr, code, compress=compress))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert np.array_equal(out, arr)


def _broken(tmp_path: Path, raw: bytes, compress: bool) -> Path:
    path = tmp_path / "bad.idx"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


GOOD = bytes([0, 0, 0x08, 2]) + struct.pack(">2I", 2, 3) + bytes(range(6))


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\x00\x00", "truncated"),
        (bytes([1, 0, 0x08, 1]) + struct.pack(">I", 1) + b"\x00", "magic"),
        (bytes([0, 0, 0x07, 1]) + struct.pack(">I", 1) + b"\x00", "data type"),
        (bytes([0, 0, 0x08, 0]), "0 dimensions"),
        (bytes([0, 0, 0x08, 3]) + struct.pack(">2I", 2, 3), "truncated"),
        (GOOD[:-1], "truncated|holds 5 bytes"),
        (GOOD + b"\x00", "trailing|holds 7 bytes"),
        # a header announcing 2^32 - 1 squared bytes must fail fast, not try to read them
        (
            bytes([0, 0, 0x08, 2]) + struct.pack(">2I", 2**32 - 1, 2**32 - 1) + b"\x00",
            "truncated|holds 1 bytes",
        ),
    ],
    ids=[
        "short-magic",
        "bad-magic",
        "bad-type",
        "zero-dims",
        "short-dims",
        "short-data",
        "trailing",
        "huge",
    ],
)
def test_malformed_idx_raises_value_error(tmp_path, raw, match, compress):
    assert datasets.load_idx(_broken(tmp_path, GOOD, compress)).shape == (2, 3)
    with pytest.raises(ValueError, match=match):
        datasets.load_idx(_broken(tmp_path, raw, compress))


def test_corrupt_gzip_raises_value_error(tmp_path):
    packed = gzip.compress(GOOD)
    path = tmp_path / "cut.gz"
    path.write_bytes(packed[: len(packed) // 2])  # a gzip stream cut in the middle
    with pytest.raises(ValueError, match=r"cut\.gz"):
        datasets.load_idx(path)
    path.write_bytes(packed[:10] + b"\xff" * (len(packed) - 10))  # garbage deflate data
    with pytest.raises(ValueError, match=r"cut\.gz"):
        datasets.load_idx(path)


def test_load_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        datasets.load_idx(tmp_path / "absent")


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_load_fashion_mnist_from_folder(tmp_path, gz):
    data = write_mnist_folder(tmp_path, gz=gz)
    for kind, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = datasets.load_fashion_mnist(tmp_path, kind=kind)
        assert images.dtype == np.uint8 and images.shape == data[prefix][0].shape
        assert labels.dtype == np.int64
        assert np.array_equal(images, data[prefix][0]) and np.array_equal(labels, data[prefix][1])
    images, labels = datasets.load_mnist(tmp_path, kind="test")
    assert images.shape == (5, 28, 28)
    with pytest.raises(ValueError, match="kind"):
        datasets.load_fashion_mnist(tmp_path, kind="validation")


def test_fashion_mnist_env_var_overrides_debian(tmp_path, monkeypatch):
    write_mnist_folder(tmp_path, n_train=7)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    images, labels = datasets.load_fashion_mnist()
    assert images.shape == (7, 28, 28) and labels.shape == (7,)
    monkeypatch.setenv("MNIST_DIR", str(tmp_path))
    assert datasets.load_mnist(kind="test")[0].shape == (5, 28, 28)


def test_env_var_to_an_empty_folder_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="FASHION_MNIST_DIR"):
        datasets.load_fashion_mnist()


def test_absent_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.delenv("MNIST_DIR", raising=False)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setattr(datasets, "MNIST_DEBIAN_DIR", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as exc:
        datasets.load_fashion_mnist()
    assert "FASHION_MNIST_DIR" in str(exc.value)
    with pytest.raises(FileNotFoundError, match="MNIST_DIR"):
        datasets.load_mnist()
    with pytest.raises(FileNotFoundError, match="not a folder"):
        datasets.load_fashion_mnist(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="t10k-labels"):
        write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8), 0x08)
        datasets.load_fashion_mnist(tmp_path, kind="test")


def test_mismatched_images_and_labels(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8), 0x08)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, np.uint8), 0x08)
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        datasets.load_fashion_mnist(tmp_path)


@pytest.mark.skipif(
    not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_finds_debian_fashion_mnist(monkeypatch):
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    images, labels = datasets.load_fashion_mnist(kind="test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and np.array_equal(np.bincount(labels), [1000] * 10)
    X = datasets.scale_and_flatten(images)
    assert X.shape == (10000, 784) and X.dtype == np.float32
    assert X.min() == 0.0 and X.max() == 1.0


def test_scale_and_flatten():
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    X = datasets.scale_and_flatten(images)
    assert X.dtype == np.float32 and X.shape == (1, 4)
    assert np.array_equal(X, np.array([[0, 255, 51, 102]], np.float32) / np.float32(255))
    with pytest.raises(TypeError, match="uint8"):
        datasets.scale_and_flatten(images.astype(np.float32))


# ---- CSV and npz --------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [False, True])
def test_load_csv(tmp_path, header):
    path = tmp_path / "d.csv"
    path.write_text(("a,b,label\n" if header else "") + "0.5,1,2\n1.5,-2,0\n")
    X, y = datasets.load_csv(path)
    assert X.dtype == np.float32 and np.array_equal(X, [[0.5, 1], [1.5, -2]])
    assert y.dtype == np.int64 and np.array_equal(y, [2, 0])
    X, none = datasets.load_csv(path, has_labels=False)
    assert X.shape == (2, 3) and none is None


def test_load_csv_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("1,2,0.5\n")
    with pytest.raises(ValueError, match="integer class"):
        datasets.load_csv(path)
    path.write_text("1,2,x\n3,4,y\n")
    with pytest.raises(ValueError, match="not a numeric CSV"):
        datasets.load_csv(path)


def test_load_npz(tmp_path):
    path = tmp_path / "d.npz"
    X = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.savez(path, X=X, y=np.array([1, 0]), X_test=X[:1], y_test=np.array([1]))
    X2, y2 = datasets.load_npz(path)
    assert X2.shape == (2, 12) and X2.dtype == np.uint8 and np.array_equal(y2, [1, 0])
    X3, y3 = datasets.load_npz(path, split="test")
    assert X3.shape == (1, 12) and np.array_equal(y3, [1])
    np.savez(path, X=X)
    assert datasets.load_npz(path, labels_required=False)[1] is None
    with pytest.raises(ValueError, match="'y'"):
        datasets.load_npz(path)
    np.savez(path, features=X)
    with pytest.raises(ValueError, match="no array 'X'"):
        datasets.load_npz(path)
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="npz"):
        datasets.load_npz(path)
