"""fastbp.load on hand-crafted safetensors files whose header lies: a header length beyond the
file, data_offsets beyond the file or overlapping, huge declared shapes, unknown dtypes, extra
keys, malformed JSON. Each gives a clear ValueError naming the file, never a crash, and never a
huge allocation (checked in a child process with a capped address space, where allocating what
the header claims would raise MemoryError instead). test_io.py covers truncated, empty and
random files and bad fastbp metadata; this file covers the safetensors container itself."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastbp


def _write(path, header: dict | bytes, data: bytes = b"", header_len: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


@pytest.fixture
def good(tmp_path):
    """(header dict, data bytes) of a valid fastbp file, parsed by hand."""
    path = tmp_path / "good.safetensors"
    fastbp.save(fastbp.MLP([3, 2], seed=0), path)
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _edit(header, key, **changes):
    out = json.loads(json.dumps(header))
    out[key].update(changes)
    return out


CASES = {
    "header-length-beyond-file": lambda h, d: (h, d, 10**6),
    "header-length-2**63": lambda h, d: (h, d, 2**63),
    "header-length-zero": lambda h, d: (h, d, 0),
    "offsets-beyond-file": lambda h, d: (_edit(h, "0.weight", data_offsets=[0, 10**9]), d, None),
    "offsets-reversed": lambda h, d: (_edit(h, "0.weight", data_offsets=[24, 0]), d, None),
    "offsets-size-mismatch": lambda h, d: (_edit(h, "0.weight", data_offsets=[0, 20]), d, None),
    "huge-shape": lambda h, d: (_edit(h, "0.weight", shape=[2**40, 2**20]), d, None),
    "negative-shape": lambda h, d: (_edit(h, "0.weight", shape=[-2, 3]), d, None),
    "unknown-dtype": lambda h, d: (_edit(h, "0.weight", dtype="F128"), d, None),
    "complex-dtype": lambda h, d: (_edit(h, "0.weight", dtype="C64"), d, None),
    # the bytes of float32 weights declared as int32: the file contradicts its architecture
    "int-dtype": lambda h, d: (_edit(h, "0.weight", dtype="I32"), d, None),
    "extra-tensor": lambda h, d: (
        {**h, "9.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
        d,
        None,
    ),
    "not-json": lambda h, d: (b"{not json", d, None),
    "json-list": lambda h, d: (b"[1, 2, 3]", d, None),
    "metadata-not-strings": lambda h, d: ({**h, "__metadata__": {"format": 1}}, d, None),
    "missing-data": lambda h, d: (h, b"", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lying_header_gives_a_clear_error(tmp_path, good, case):
    """Loading the crafted file raises ValueError (the documented error for a file that is not
    a valid fastbp model) whose message names the file."""
    header, data, n = CASES[case](*good)
    path = _write(tmp_path / f"{case}.safetensors", header, data, n)
    with pytest.raises(ValueError, match=re.escape(path.name)):
        fastbp.load(path)


CHILD = textwrap.dedent(
    """
    import resource, struct, json, sys
    import fastbp
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY))
    path = sys.argv[1]
    try:
        fastbp.load(path)
    except ValueError as exc:
        print("ValueError", str(exc)[:200])
    """
)


@pytest.mark.skipif(
    "libasan" in os.environ.get("LD_PRELOAD", ""), reason="an address-space cap breaks ASan"
)
@pytest.mark.parametrize("case", ["header-length-2**63", "huge-shape", "offsets-beyond-file"])
def test_lying_header_allocates_nothing_huge(tmp_path, good, case):
    """In a child limited to 3 GiB of address space, a header claiming 2**63 bytes of header or
    a 2**60-element tensor is refused with ValueError, not MemoryError or a crash: the size is
    checked against the file before anything is allocated."""
    header, data, n = CASES[case](*good)
    path = _write(tmp_path / "lie.safetensors", header, data, n)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ValueError"), proc.stdout + proc.stderr


def test_extra_field_in_a_tensor_entry_is_ignored(tmp_path, good):
    """An unknown field inside a tensor's header entry (safetensors tolerates it) is harmless:
    the file loads with exactly the saved weights."""
    header, data = good
    path = _write(tmp_path / "extra.safetensors", _edit(header, "0.weight", extra=1), data)
    model = fastbp.load(path)
    assert np.array_equal(model[0].weight.data, fastbp.MLP([3, 2], seed=0)[0].weight.data)


def test_valid_file_round_trip_still_loads(tmp_path, good):
    """The hand-writer itself is right: re-writing the parsed header and data unchanged gives
    a file that loads to the same model (so the failures above come from the edits)."""
    header, data = good
    path = _write(tmp_path / "same.safetensors", header, data)
    model = fastbp.load(path)
    ref = fastbp.MLP([3, 2], seed=0)
    assert np.array_equal(model[0].weight.data, ref[0].weight.data)
