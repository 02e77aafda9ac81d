"""Threads, ISA selection and build information."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterator

from . import _core

__all__ = [
    "available_isas",
    "get_config",
    "get_flush_denormal",
    "get_num_threads",
    "set_flush_denormal",
    "set_num_threads",
    "show_config",
    "thread_limit",
]

# What set_num_threads was last given (None: follow OpenMP), so thread_limit restores it exactly.
_requested: int | None = None


def get_num_threads() -> int:
    """Number of OpenMP threads fastbp's kernels may use.

    Follows ``OMP_NUM_THREADS`` (and threadpoolctl's limits) until :func:`set_num_threads` is
    called. Small work runs on one thread regardless.
    """
    return _core.get_num_threads()


def set_num_threads(n: int | None) -> None:
    """Limit fastbp's kernels to ``n`` threads; ``None`` returns to OpenMP's default.

    Results are bitwise identical for every thread count.
    """
    global _requested
    if n is None:
        _core.set_num_threads(0)
        _requested = None
        return
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"set_num_threads: n must be a positive int or None, got {n!r}")
    if n <= 0:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    _core.set_num_threads(n)
    _requested = int(n)


@contextlib.contextmanager
def thread_limit(n: int | None) -> Iterator[None]:
    """``with fastbp.thread_limit(n):`` uses n threads inside the block, then restores the
    previous setting exactly (a pinned count, or following OpenMP). ``None`` changes nothing.

    The setting is process-wide: blocks in concurrent threads share it.
    """
    if n is None:
        yield
        return
    previous = _requested
    set_num_threads(n)
    try:
        yield
    finally:
        set_num_threads(previous)


def set_flush_denormal(mode: bool) -> None:
    """Whether the optimizer updates flush subnormal numbers to zero (default ``True``).

    A first or second moment whose gradient is mostly zero (the weight of a rarely lit input
    pixel, of a dead ReLU) decays toward zero and spends ~150 steps as a subnormal number
    (below 1.2e-38 in float32), where every x86 multiply takes a ~100-cycle microcode assist:
    by the third epoch of a Fashion-MNIST MLP with Adam, 9% of the first moments are
    subnormal and an epoch takes 50% longer. With flushing, the updates (SGD, Adam, AdamW:
    ``fit``, ``train_step``, ``optimizer.step()``, :func:`fastbp.ops.sgd_step` /
    :func:`~fastbp.ops.adam_step`) read subnormal inputs as zero and store subnormal results as
    zero, so each stored value differs from IEEE arithmetic (and torch) by less than the
    smallest normal number (1.2e-38 in float32, 2.2e-308 in float64); normal results are
    unchanged. ``False`` gives IEEE gradual underflow, like torch's default. Only the update
    kernels change mode, and only while they run: the caller's floating-point mode is
    restored. Process-wide; not thread-local. (torch's ``torch.set_flush_denormal`` is the
    global equivalent.) No effect on CPUs without x86's MXCSR.
    """
    if not isinstance(mode, (bool, int)):
        raise TypeError(f"set_flush_denormal: mode must be a bool, got {mode!r}")
    _core.set_flush_denormal(bool(mode))


def get_flush_denormal() -> bool:
    """Whether the optimizer updates flush subnormals to zero (see :func:`set_flush_denormal`)."""
    return _core.get_flush_denormal()


def available_isas() -> list[str]:
    """Instruction sets whose kernels are compiled in and supported by this CPU."""
    return _core.available_isas()


def get_config() -> dict[str, object]:
    """The build and run-time configuration as a dict (what :func:`show_config` prints)."""
    return {
        "version": _core.version(),
        "isa": _core.active_isa(),
        "available_isas": _core.available_isas(),
        "compiled_isas": list(_core.ISA_NAMES),
        "num_threads": _core.get_num_threads(),
        "flush_denormal": _core.get_flush_denormal(),
        "openmp": _core.openmp_info(),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "FASTBP_ISA": os.environ.get("FASTBP_ISA"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def show_config() -> None:
    """Print version, chosen ISA, available ISAs, threads and OpenMP runtime."""
    for key, value in get_config().items():
        if isinstance(value, list):
            value = ", ".join(value)
        print(f"{key:>16}: {value}")


def _select_isa_from_environment() -> None:
    forced = os.environ.get("FASTBP_ISA", "").strip().lower() or None
    try:
        _core.select_isa(forced)
    except (ValueError, RuntimeError) as exc:
        raise ImportError(f"FASTBP_ISA={os.environ['FASTBP_ISA']!r}: {exc}") from None


def _after_fork_in_child() -> None:
    # libgomp's thread pool does not survive fork: a child's first parallel region would hang.
    # One thread in the child is always safe; the user may raise it again.
    global _requested
    _core.set_num_threads(1)
    _requested = 1
