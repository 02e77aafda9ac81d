"""Every ISA variant of the GEMM, the AVX-512 one included, checked on any x86-64 machine.

The AVX-512 kernels cannot run on a CPU without AVX-512, so the runtime tests skip them there.
This test compiles the kernel sources with the AVX-512 layout but only AVX2 flags (GCC emulates
the wide vectors exactly) and runs a C checker against a naive reference: the register tiles,
block sizes, packing and in-register transposes of that path are then verified everywhere.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
KERNELS = ["gemm", "activation", "loss", "optim", "small", "isa_table"]
VARIANTS = {
    "generic": ["-DFBP_BUILD_GENERIC=1"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DFBP_BUILD_AVX2=1"],
    # the AVX-512 layout compiled for AVX2: same code, vectors emulated as pairs
    "emu512": ["-mavx2", "-mfma", "-mf16c", "-DFBP_BUILD_AVX512=1"],
}

pytestmark = [
    pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the checker"),
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 variants"),
    pytest.mark.skipif(not (CSRC / "gemm.c").exists(), reason="needs the source tree"),
]


def _cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@pytest.mark.skipif(not _cpu_has_avx2(), reason="the emulated variants need AVX2 to run")
def test_every_isa_variant_matches_the_naive_reference(tmp_path: Path) -> None:
    """Builds generic, AVX2 and emulated-AVX-512 kernels and checks 1248 GEMM cases."""
    base = [
        "gcc",
        "-std=gnu11",
        "-O2",
        "-fno-math-errno",
        "-fno-trapping-math",
        "-fopenmp",
        "-Wall",
        "-Wextra",
        "-Wno-psabi",
        f"-I{CSRC}",
    ]
    jobs = []
    for variant, flags in VARIANTS.items():
        for kernel in KERNELS:
            obj = tmp_path / f"{variant}_{kernel}.o"
            jobs.append(
                (
                    [
                        *base,
                        *flags,
                        f"-DFBP_ISA_SUFFIX={variant}",
                        "-c",
                        str(CSRC / f"{kernel}.c"),
                        "-o",
                        str(obj),
                    ],
                    str(obj),
                )
            )
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(lambda job: subprocess.run(job[0], check=True), jobs))
    objects = [obj for _, obj in jobs]
    exe = tmp_path / "check"
    subprocess.run(
        [
            *base,
            str(ROOT / "tests" / "c" / "check_isa_variants.c"),
            *objects,
            "-o",
            str(exe),
            "-lm",
        ],
        check=True,
    )
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "0 failures" in result.stdout
