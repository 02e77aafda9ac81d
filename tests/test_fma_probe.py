"""The multiply-add probe behind the benchmark report's "of FMA peak" (fastbp._core.fma_probe,
fastbp.bench.machine.fma_peak): the flops it reports are the ones it did, on every ISA path."""

from __future__ import annotations

import math

import pytest

from fastbp import _core
from fastbp.bench.machine import fma_peak


@pytest.mark.parametrize("float64", [False, True], ids=["f32", "f64"])
def test_probe_counts_its_flops(isa, float64):
    """Flops grow exactly with the steps and the threads, and one step is a whole number of
    vector multiply-adds (2 flops per lane): the count is the work, not an estimate."""
    lanes = {"generic": 16, "avx2": 32, "avx512": 64}[isa] // (8 if float64 else 4)
    one = _core.fma_probe(float64, 1000, 1)
    assert one > 0 and one % (2 * lanes * 1000) == 0, (isa, one)
    assert _core.fma_probe(float64, 3000, 1) == 3 * one
    assert _core.fma_probe(float64, 1000, 2) == 2 * one
    assert _core.fma_probe(float64, 0, 1) == 0


def test_probe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="iters >= 0"):
        _core.fma_probe(False, -1, 1)
    with pytest.raises(ValueError, match="threads >= 1"):
        _core.fma_probe(False, 10, 0)


def test_fma_peak_is_a_rate():
    """A positive, finite GFLOP/s (how fast is the machine's business, not the test's)."""
    gflops = fma_peak(1, seconds=0.004, rounds=2)
    assert math.isfinite(gflops) and gflops > 0
    with pytest.raises(ValueError):
        fma_peak(0)
    with pytest.raises(ValueError):
        fma_peak(1, seconds=0)
