"""tools/gemm_ab.py, the in-process A/B of two builds' GEMMs: it runs, compares the bits, and
refuses bad shapes and ISAs this CPU does not run."""

from __future__ import annotations

import argparse
import importlib.util
import pathlib

import pytest

import fastbp
from fastbp import _core

_TOOL = pathlib.Path(__file__).resolve().parent.parent / "tools" / "gemm_ab.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("gemm_ab", _TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_shape() -> None:
    tool = _load_tool()

    def fields(text: str) -> tuple[int, int, int, bool, bool]:
        p = tool.parse_shape(text)
        return p.m, p.n, p.k, p.trans_a, p.trans_b

    assert fields("7x33x5") == (7, 33, 5, False, False)
    assert fields("7x33x5:tb") == (7, 33, 5, False, True)
    assert fields("7x33x5:ta,tb") == (7, 33, 5, True, True)
    for bad in ("7x33", "7x33x0", "7xax5", "7x33x5:tc"):
        with pytest.raises(argparse.ArgumentTypeError):
            tool.parse_shape(bad)


@pytest.mark.parametrize("isa", fastbp.get_config()["available_isas"])
def test_a_build_against_itself_gives_the_same_bits(isa, capsys) -> None:
    tool = _load_tool()
    so = _core.__file__
    shapes = ["7x33x5", "33x7x257:ta,tb", "40x70x30:tb"]
    assert tool.main(["--old", so, "--new", so, "--isa", isa, "--rounds", "2", *shapes]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(shapes)
    for line, shape in zip(lines, shapes, strict=True):
        assert line.startswith(shape) and "new/old" in line and line.endswith("same bits"), line


def test_refuses_a_missing_build() -> None:
    tool = _load_tool()
    with pytest.raises(SystemExit, match="no _core"):
        tool.main(["--old", "/nonexistent", "--new", _core.__file__, "1x1x1"])
