"""Data sets for examples and the command line: the bundled 8×8 digits, MNIST and Fashion-MNIST
from IDX files, and CSV / npz files of your own.

- :func:`load_digits`: 1,797 8×8 handwritten digits (UCI optdigits, CC BY 4.0), bundled.
- :func:`load_fashion_mnist`, :func:`load_mnist`: the 28×28 IDX files, found in a folder you
  pass, an environment variable (``FASHION_MNIST_DIR``, ``MNIST_DIR``) or where Debian's
  ``dataset-fashion-mnist`` package puts them. Nothing is downloaded.
- :func:`load_idx`: one IDX file, gzipped or not, validated before it is read.
- :func:`load_csv`: features then the integer label in the last column.
- :func:`load_npz`: arrays ``X`` (samples × features) and ``y`` (integer labels).
- :func:`scale_and_flatten`: uint8 images → float32 ``(n, pixels)`` in [0, 1].

Images and pixel counts come back as uint8 and labels as int64 (class indices, what
cross-entropy takes).
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = [
    "FASHION_MNIST_DEBIAN_DIR",
    "MNIST_DEBIAN_DIR",
    "load_csv",
    "load_digits",
    "load_fashion_mnist",
    "load_idx",
    "load_idx_folder",
    "load_mnist",
    "load_npz",
    "scale_and_flatten",
]

#: Where Debian's ``dataset-fashion-mnist`` package installs the four gzipped IDX files.
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The matching place for MNIST. Debian has no MNIST package at the time of writing; a folder
#: here (or one a future package creates) is used when present.
MNIST_DEBIAN_DIR = Path("/usr/share/datasets/mnist")

# IDX type byte -> big-endian NumPy dtype (http://yann.lecun.com/exdb/mnist/, "the IDX file format").
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CHUNK = 1 << 22  # read compressed streams in 4 MiB pieces: memory follows the real data


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 8×8 handwritten digits bundled with fastbp: ``(X, y)``.

    ``X`` is uint8 ``(1797, 64)``, each row an 8×8 image (row-major) of pixel counts 0–16;
    ``y`` is int64 ``(1797,)``, the digits 0–9. The same values as scikit-learn's
    ``load_digits()`` (the test set of UCI's *Optical Recognition of Handwritten Digits*, by
    E. Alpaydin and C. Kaynak, CC BY 4.0). Divide ``X`` by 16 to scale it to [0, 1].
    """
    ref = resources.files(__package__).joinpath("data", "digits.npz")
    with ref.open("rb") as fh, np.load(fh) as npz:
        X = np.ascontiguousarray(npz["X"], dtype=np.uint8)
        y = npz["y"].astype(np.int64)
    return X, y


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (MNIST's format), gzipped or not (told apart by its first bytes).

    The header is two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian
    uint32; the data follow, big-endian, row-major. Returns an array of that shape in native
    byte order. Raises ``ValueError`` naming the file if the magic, type, dimensions or size are
    wrong (a truncated file, trailing bytes, a corrupt gzip stream) and never reads more than the
    header announces plus one byte.
    """
    path = Path(path)
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        if compressed:
            with gzip.GzipFile(fileobj=raw, mode="rb") as fh:
                return _read_idx_stream(fh, path, None)
        return _read_idx_stream(raw, path, os.fstat(raw.fileno()).st_size)


def _read_idx_stream(fh: io.BufferedIOBase, path: Path, file_size: int | None) -> np.ndarray:
    try:
        magic = _read_exact(fh, 4, path, "the 4-byte magic number")
        if magic[0] != 0 or magic[1] != 0:
            raise ValueError(
                f"{path}: not an IDX file (magic {magic.hex()} does not start with two zero bytes)"
            )
        code, ndim = magic[2], magic[3]
        if code not in _IDX_DTYPES:
            raise ValueError(f"{path}: unknown IDX data type 0x{code:02x}")
        if ndim == 0:
            raise ValueError(f"{path}: IDX file with 0 dimensions")
        dims = tuple(
            int(d) for d in np.frombuffer(_read_exact(fh, 4 * ndim, path, "the dimensions"), ">u4")
        )
        dtype = _IDX_DTYPES[code]
        nbytes = int(np.prod(dims, dtype=object)) * dtype.itemsize
        header = 4 + 4 * ndim
        if file_size is not None and file_size != header + nbytes:
            raise ValueError(
                f"{path}: the header announces {dims} values of {dtype.name} ({nbytes:,} bytes) "
                f"but the file holds {file_size - header:,} bytes after the header"
            )
        data = _read_exact(fh, nbytes, path, f"{dims} values of {dtype.name}")
        if fh.read(1):
            raise ValueError(f"{path}: trailing data after the {dims} values the header announces")
    except (EOFError, OSError, zlib.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc})") from None
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _read_exact(fh: io.BufferedIOBase, n: int, path: Path, what: str) -> bytes:
    """Read exactly ``n`` bytes in bounded chunks, or raise ValueError: truncated."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        part = fh.read(min(_CHUNK, n - got))
        if not part:
            raise ValueError(f"{path}: truncated IDX file: ended after {got:,} bytes of {what}")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


# ---- MNIST and Fashion-MNIST ---------------------------------------------------------------------

_KIND_PREFIX = {"train": "train", "test": "t10k"}


def _idx_file(folder: Path, prefix: str, part: str, rank: int) -> Path | None:
    """``train-images-idx3-ubyte.gz`` and the spellings other mirrors use (no .gz, a dot)."""
    for sep in ("-", "."):
        for suffix in (".gz", ""):
            candidate = folder / f"{prefix}-{part}{sep}idx{rank}-ubyte{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _has_idx_files(folder: Path) -> bool:
    return _idx_file(folder, "train", "images", 3) is not None or (
        _idx_file(folder, "t10k", "images", 3) is not None
    )


def load_idx_folder(
    folder: str | os.PathLike, kind: str = "train", *, labels_required: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """Images and labels of one split from a folder of MNIST-style IDX files.

    ``kind='train'`` reads ``train-images-idx3-ubyte[.gz]`` and ``train-labels-idx1-ubyte[.gz]``,
    ``kind='test'`` the ``t10k-`` pair (``train-images.idx3-ubyte`` spellings work too). Returns
    uint8 images ``(n, rows, cols)`` and int64 labels ``(n,)``; with ``labels_required=False``
    a missing labels file gives ``None`` instead of an error.
    """
    if kind not in _KIND_PREFIX:
        raise ValueError(f"kind must be 'train' or 'test', got {kind!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    prefix = _KIND_PREFIX[kind]
    images_path = _idx_file(folder, prefix, "images", 3)
    if images_path is None:
        raise FileNotFoundError(f"{folder}: no {prefix}-images-idx3-ubyte[.gz] file")
    images = load_idx(images_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: expected uint8 images (n, rows, cols), got {images.dtype} {images.shape}"
        )
    labels_path = _idx_file(folder, prefix, "labels", 1)
    if labels_path is None:
        if labels_required:
            raise FileNotFoundError(f"{folder}: no {prefix}-labels-idx1-ubyte[.gz] file")
        return images, None
    labels = load_idx(labels_path)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{labels_path}: expected 1-D integer labels, got {labels.dtype} {labels.shape}"
        )
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{folder}: {images.shape[0]:,} images but {labels.shape[0]:,} labels for the {kind} split"
        )
    return images, labels.astype(np.int64)


def _find_folder(
    path: str | os.PathLike | None, env: str, debian: Path, name: str, how: str
) -> Path:
    if path is not None:
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{name}: {folder} is not a folder. {how}")
        if not _has_idx_files(folder):
            raise FileNotFoundError(
                f"{name}: no IDX files (train-images-idx3-ubyte[.gz]) in {folder}. {how}"
            )
        return folder
    tried = []
    from_env = os.environ.get(env, "").strip()
    if from_env:
        folder = Path(from_env)
        if folder.is_dir() and _has_idx_files(folder):
            return folder
        raise FileNotFoundError(
            f"{name}: {env}={from_env} holds no IDX files (train-images-idx3-ubyte[.gz]). {how}"
        )
    tried.append(f"${env} (unset)")
    if _has_idx_files(debian):
        return debian
    tried.append(str(debian))
    raise FileNotFoundError(f"{name} not found (looked in {', '.join(tried)}). {how}")


def _load_28x28(
    path: str | os.PathLike | None, kind: str, env: str, debian: Path, name: str, how: str
) -> tuple[np.ndarray, np.ndarray]:
    if kind not in _KIND_PREFIX:
        raise ValueError(f"kind must be 'train' or 'test', got {kind!r}")
    folder = _find_folder(path, env, debian, name, how)
    images, labels = load_idx_folder(folder, kind)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{name}: expected 28×28 images in {folder}, got {images.shape[1:]}")
    assert labels is not None
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{name}: labels in {folder} are outside 0-9")
    return images, labels


_FASHION_MNIST_HOW = (
    "Install Debian's package (sudo apt-get install dataset-fashion-mnist) or download the four "
    "IDX files from https://github.com/zalandoresearch/fashion-mnist into a folder and set "
    "FASHION_MNIST_DIR to it"
)
_MNIST_HOW = (
    "Download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
    "and t10k-labels-idx1-ubyte.gz (e.g. from https://ossci-datasets.s3.amazonaws.com/mnist/) "
    "into a folder and set MNIST_DIR to it"
)


def load_fashion_mnist(
    path: str | os.PathLike | None = None, kind: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (Zalando, MIT licence): ``(images, labels)`` of the ``'train'`` (60,000)
    or ``'test'`` (10,000) split; uint8 images ``(n, 28, 28)``, int64 labels 0–9.

    The IDX files (gzipped or not) are looked for in ``path`` if given, else in
    ``$FASHION_MNIST_DIR``, else in ``/usr/share/datasets/fashion-mnist`` (Debian's
    ``dataset-fashion-mnist`` package). Raises ``FileNotFoundError`` saying how to get them.
    Use :func:`scale_and_flatten` to get float32 ``(n, 784)`` inputs in [0, 1].
    """
    return _load_28x28(
        path,
        kind,
        "FASHION_MNIST_DIR",
        FASHION_MNIST_DEBIAN_DIR,
        "Fashion-MNIST",
        _FASHION_MNIST_HOW,
    )


def load_mnist(
    path: str | os.PathLike | None = None, kind: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST handwritten digits: ``(images, labels)`` of the ``'train'`` (60,000) or ``'test'``
    (10,000) split; uint8 images ``(n, 28, 28)``, int64 labels 0–9.

    The IDX files are looked for in ``path`` if given, else in ``$MNIST_DIR``, else in
    ``/usr/share/datasets/mnist``. Debian packages no MNIST, so usually you download the four
    files once and set ``MNIST_DIR``; the ``FileNotFoundError`` says so.
    """
    return _load_28x28(path, kind, "MNIST_DIR", MNIST_DEBIAN_DIR, "MNIST", _MNIST_HOW)


def scale_and_flatten(images: np.ndarray) -> np.ndarray:
    """uint8 images ``(n, ...)`` → float32 ``(n, pixels)`` in [0, 1] (divided by 255)."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise TypeError(f"scale_and_flatten expects uint8 images, got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise ValueError(f"scale_and_flatten expects images of shape (n, ...), got {arr.shape}")
    return arr.reshape(arr.shape[0], -1).astype(np.float32) / np.float32(255)


# ---- files of your own -----------------------------------------------------------------------


def _as_labels(values: np.ndarray, source: str) -> np.ndarray:
    """Integer class labels (int64) from any numeric column, or ValueError."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{source}: labels must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        labels = arr.astype(np.int64)
    elif arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        labels = arr.astype(np.int64)
    else:
        raise ValueError(
            f"{source}: labels must be integer class indices, got values like {arr[:3]}"
        )
    if labels.size and labels.min() < 0:
        raise ValueError(f"{source}: labels must be >= 0, found {labels.min()}")
    return labels


def load_csv(
    path: str | os.PathLike, *, has_labels: bool = True, delimiter: str = ","
) -> tuple[np.ndarray, np.ndarray | None]:
    """A numeric CSV file (``.csv`` or ``.csv.gz``): one sample per row, the features first and
    the integer class label in the **last column**. A first row that is not numeric is taken as a
    header and skipped. Returns float32 ``X (n, columns - 1)`` and int64 ``y (n,)``; with
    ``has_labels=False`` every column is a feature and ``y`` is ``None``.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as fh:
        first = fh.readline()
    skip = 0
    try:
        [float(v) for v in first.strip().split(delimiter)]
    except ValueError:
        skip = 1
    try:
        table = np.loadtxt(path, delimiter=delimiter, skiprows=skip, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{path}: not a numeric CSV file ({exc})") from None
    if table.shape[0] == 0:
        raise ValueError(f"{path}: no rows")
    if not has_labels:
        return np.ascontiguousarray(table, dtype=np.float32), None
    if table.shape[1] < 2:
        raise ValueError(f"{path}: needs at least one feature column and the label column")
    return (
        np.ascontiguousarray(table[:, :-1], dtype=np.float32),
        _as_labels(table[:, -1], f"{path} (last column)"),
    )


def load_npz(
    path: str | os.PathLike, *, split: str = "train", labels_required: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """An ``.npz`` file (``np.savez``) holding ``X`` (samples × features, or images ``(n, ...)``
    which are flattened) and ``y`` (integer labels); ``split='test'`` reads ``X_test`` and
    ``y_test`` instead. ``X`` keeps its dtype (uint8 stays uint8), ``y`` becomes int64; with
    ``labels_required=False`` a missing ``y`` gives ``None``. Never unpickles.
    """
    path = Path(path)
    keys = ("X", "y") if split == "train" else ("X_test", "y_test")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zlib.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
    with npz:
        if not hasattr(npz, "files"):
            raise ValueError(f"{path}: a single .npy array, expected an .npz with arrays X and y")
        if keys[0] not in npz.files:
            raise ValueError(
                f"{path}: no array {keys[0]!r} (it has {', '.join(npz.files) or 'none'})"
            )
        X = np.asarray(npz[keys[0]])
        y = np.asarray(npz[keys[1]]) if keys[1] in npz.files else None
    if X.ndim < 2 or X.shape[0] == 0:
        raise ValueError(f"{path}: {keys[0]} must be (samples, features), got shape {X.shape}")
    if X.dtype.kind not in "fiu" or X.dtype == np.bool_:
        raise ValueError(f"{path}: {keys[0]} must be numeric, got dtype {X.dtype}")
    X = np.ascontiguousarray(X.reshape(X.shape[0], -1))
    if y is None:
        if labels_required:
            raise ValueError(f"{path}: no array {keys[1]!r} with the labels")
        return X, None
    labels = _as_labels(
        y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y, f"{path} ({keys[1]})"
    )
    if labels.shape[0] != X.shape[0]:
        raise ValueError(
            f"{path}: {X.shape[0]:,} samples in {keys[0]} but {labels.shape[0]:,} labels"
        )
    return X, labels


def _npz_has_test_split(path: str | os.PathLike) -> bool:
    """Whether an ``.npz`` file holds a test split (``X_test``)."""
    with np.load(path, allow_pickle=False) as npz:
        return "X_test" in npz.files
