"""Save and load models as safetensors files: tensors under torch's ``nn.Sequential`` keys and
the architecture as JSON in the metadata. No pickle: loading never executes anything, and
``safetensors.torch.load_file(path)`` loads the same file into the equivalent torch model."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ._model import Sequential
from .nn import BatchNorm1d, Dropout, Identity, Linear, Module, ReLU, Sigmoid, Tanh

__all__ = ["load", "save"]

FORMAT = "fastbp.sequential"
FORMAT_VERSION = "1"
_SIMPLE = {"ReLU": ReLU, "Sigmoid": Sigmoid, "Tanh": Tanh, "Identity": Identity}


def save(model: Sequential, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` atomically: a temporary file in the same folder, then a
    rename, so a crash mid-save never destroys an existing file."""
    from safetensors.numpy import save_file

    if not isinstance(model, Sequential):
        raise TypeError(f"save expects a fastbp.Sequential, got {type(model).__name__}")
    path = Path(path)
    tensors = {k: np.ascontiguousarray(v) for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": json.dumps(model._spec()),
    }
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 & ~umask)
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def _layer_from_spec(spec: object, dtype: np.dtype, index: int) -> Module:
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"layer {index}: malformed layer description {spec!r}")
    kind = spec["type"]
    try:
        if kind == "Linear":
            return Linear(
                int(spec["in_features"]),
                int(spec["out_features"]),
                bias=bool(spec["bias"]),
                dtype=dtype,
                rng=np.random.default_rng(0),
            )
        if kind == "BatchNorm1d":
            return BatchNorm1d(
                int(spec["num_features"]),
                eps=float(spec["eps"]),
                momentum=float(spec["momentum"]),
                affine=bool(spec["affine"]),
                dtype=dtype,
            )
        if kind == "Dropout":
            return Dropout(float(spec["p"]))
        if kind in _SIMPLE:
            return _SIMPLE[kind]()
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"layer {index} ({kind}): invalid description: {exc}") from None
    raise ValueError(f"layer {index}: unknown layer type {kind!r}")


def load(path: str | os.PathLike) -> Sequential:
    """Rebuild the model saved at ``path``. Raises ValueError for a file that is not a fastbp
    model (missing, truncated or inconsistent), FileNotFoundError if it does not exist."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not a fastbp model (no '{FORMAT}' metadata)"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported fastbp format version {metadata.get('format_version')!r}"
        )
    try:
        arch = json.loads(metadata["architecture"])
        dtype = np.dtype(arch["dtype"])
        specs = arch["layers"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: malformed architecture metadata ({exc})") from None
    if arch.get("type") != "Sequential" or not isinstance(specs, list) or not specs:
        raise ValueError(f"{path}: the architecture is not a non-empty Sequential")
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"{path}: unsupported dtype {dtype}")
    for key, tensor in tensors.items():
        expected = np.int64 if key.endswith("num_batches_tracked") else dtype
        if tensor.dtype != expected:
            raise ValueError(
                f"{path}: tensor {key} is {tensor.dtype}, the architecture says {np.dtype(expected)}"
            )
    model = Sequential(*[_layer_from_spec(s, dtype, i) for i, s in enumerate(specs)])
    model.load_state_dict(tensors)
    return model
