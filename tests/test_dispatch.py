"""The runtime around the kernels: ISA detection and FASTBP_ISA, thread control (own setting,
OMP_NUM_THREADS, threadpoolctl), fork safety, show_config, and that the generic kernel object
really is free of AVX instructions (so it runs on any x86-64)."""

from __future__ import annotations

import bisect
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import threadpoolctl

import fastbp
from fastbp import _core

# Children import the build this test session already loaded: scikit-build-core's editable
# finder would otherwise rebuild on import when csrc/ changed meanwhile (slow, and a different
# binary from the one under test).
CHILD_PRELUDE = (
    "import sys\n"
    "for finder in sys.meta_path:\n"
    "    if hasattr(finder, 'rebuild_flag'):\n"
    "        finder.rebuild_flag = False\n"
)
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")


def run_python(code: str, *, timeout: float = 60, **env_changes: str | None):
    """Run `code` in a fresh interpreter; env_changes set (or, with None, remove) variables."""
    env = dict(os.environ)
    for key in ("FASTBP_ISA", "OMP_NUM_THREADS"):
        env.pop(key, None)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run(
        [sys.executable, "-c", CHILD_PRELUDE + code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def marked(proc, marker: str) -> str:
    """The rest of the stdout line starting with `marker` (the build may print other lines)."""
    found = re.search(rf"^{marker} (.*)$", proc.stdout, re.M)
    assert found, f"no {marker!r} line; rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return found.group(1)


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    match = re.search(r"^flags\s*:(.*)$", text, re.M)
    if not match:
        pytest.skip("/proc/cpuinfo has no flags line")
    return set(match.group(1).split())


def expected_isas() -> list[str]:
    flags = cpu_flags()
    compiled = fastbp.get_config()["compiled_isas"]
    expected = ["generic"]
    if {"avx2", "fma"} <= flags:
        expected.append("avx2")
        if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags:
            expected.append("avx512")
    return [isa for isa in expected if isa in compiled]


@pytest.fixture
def default_threads():
    """Start from OpenMP's own thread setting and leave it that way (the state after import)."""
    fastbp.set_num_threads(None)
    yield
    fastbp.set_num_threads(None)


# ---- ISA detection and selection -------------------------------------------------------------


@pytest.mark.skipif(not IS_X86, reason="ISA flags are x86-specific")
def test_available_isas_follow_cpu_flags():
    """available_isas() is exactly the compiled ISAs the CPU supports, per /proc/cpuinfo:
    'generic' always, 'avx2' iff avx2+fma, 'avx512' iff also avx512f/vl/bw/dq."""
    assert fastbp.available_isas() == expected_isas()
    assert fastbp.get_config()["compiled_isas"] == ["generic", "avx2", "avx512"]


def test_default_isa_is_the_best_available():
    proc = run_python("import fastbp\nprint('ISA', fastbp.get_config()['isa'])")
    assert marked(proc, "ISA") == fastbp.available_isas()[-1]


def _forced_cases() -> list[tuple[str, str]]:
    cases = [(isa, isa) for isa in fastbp.available_isas()]
    cases.append(("  Generic ", "generic"))  # case and surrounding blanks do not matter
    if "avx2" in fastbp.available_isas():
        cases.append(("AVX2", "avx2"))
    return cases


@pytest.mark.parametrize(("value", "isa"), _forced_cases())
def test_fastbp_isa_selects_kernels(value, isa):
    """FASTBP_ISA picks the kernel table at import, and those kernels compute correctly."""
    code = (
        "import numpy as np, fastbp\n"
        "a = np.arange(35.0).reshape(5, 7) / 7\n"
        "ok = np.allclose(fastbp.ops.gemm(a, a, trans_b=True), a @ a.T, rtol=1e-14, atol=0)\n"
        "print('ISA', fastbp.get_config()['isa'], ok)\n"
    )
    proc = run_python(code, FASTBP_ISA=value)
    assert marked(proc, "ISA") == f"{isa} True"


def _import_error(value: str) -> str:
    code = (
        "try:\n    import fastbp\n"
        "except ImportError as exc:\n    print('IMPORT_ERROR', exc)\n"
        "else:\n    print('IMPORTED', fastbp.get_config()['isa'])\n"
    )
    return marked(run_python(code, FASTBP_ISA=value), "IMPORT_ERROR")


@pytest.mark.skipif(not IS_X86, reason="avx512 is an x86 ISA")
def test_fastbp_isa_unsupported_by_cpu():
    """Forcing AVX-512 on a CPU without it fails the import (instead of crashing later with
    SIGILL), naming the ISA and what is available."""
    if "avx512" in fastbp.available_isas():
        pytest.skip("this CPU supports AVX-512")
    message = _import_error("avx512")
    assert "avx512" in message and "not available" in message
    for isa in fastbp.available_isas():
        assert isa in message, message


def test_fastbp_isa_unknown_name():
    message = _import_error("bogus")
    assert "'bogus'" in message and "unknown ISA" in message
    for isa in fastbp.available_isas():
        assert isa in message, message


# ---- configuration report --------------------------------------------------------------------


def test_show_config(capsys):
    """show_config prints version, ISA, available ISAs, thread count and the OpenMP runtime,
    and the version is the installed distribution's."""
    fastbp.show_config()
    out = capsys.readouterr().out
    fields = dict(re.findall(r"^\s*(\w+): (.*)$", out, re.M))
    config = fastbp.get_config()
    assert fields["version"] == fastbp.__version__ == importlib.metadata.version("fastbp")
    assert fields["isa"] == config["isa"] == _core.active_isa()
    assert fields["available_isas"] == ", ".join(fastbp.available_isas())
    assert int(fields["num_threads"]) == fastbp.get_num_threads()
    assert fields["openmp"] == config["openmp"]
    assert re.match(r"lib(g|i)?omp \(OpenMP spec \d{6}\)", fields["openmp"]), fields["openmp"]


# ---- threads ---------------------------------------------------------------------------------


def test_set_num_threads_round_trip(default_threads):
    for n in (1, 2, 5, 1):
        fastbp.set_num_threads(n)
        assert fastbp.get_num_threads() == n
        assert fastbp.get_config()["num_threads"] == n


@pytest.mark.parametrize(
    ("bad", "error"),
    [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("2", TypeError), (True, TypeError)],
)
def test_set_num_threads_rejects(default_threads, bad, error):
    """Non-positive counts are ValueErrors, non-ints (bool included) TypeErrors; the setting
    is left as it was."""
    fastbp.set_num_threads(3)
    with pytest.raises(error, match="set_num_threads"):
        fastbp.set_num_threads(bad)
    assert fastbp.get_num_threads() == 3


@pytest.mark.parametrize("omp", [None, "1", "3"])
def test_default_follows_openmp(omp):
    """Without set_num_threads the count is OpenMP's (OMP_NUM_THREADS, else the usable CPUs);
    set_num_threads(None) returns to it after an explicit setting."""
    code = (
        "import os, fastbp\n"
        "first = fastbp.get_num_threads()\n"
        "fastbp.set_num_threads(7)\n"
        "seven = fastbp.get_num_threads()\n"
        "fastbp.set_num_threads(None)\n"
        "print('THREADS', first, seven, fastbp.get_num_threads(), len(os.sched_getaffinity(0)))\n"
    )
    first, seven, back, cpus = map(
        int, marked(run_python(code, OMP_NUM_THREADS=omp), "THREADS").split()
    )
    assert first == (int(omp) if omp else cpus)
    assert seven == 7
    assert back == first


def test_threadpoolctl_sees_and_limits_fastbp(default_threads):
    """threadpoolctl finds the OpenMP runtime fastbp uses and its limits apply to fastbp, until
    set_num_threads overrides them."""
    info = threadpoolctl.threadpool_info()
    assert any(entry["user_api"] == "openmp" for entry in info), info
    before = fastbp.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert fastbp.get_num_threads() == 1
        a = np.random.default_rng(0).standard_normal((300, 300))
        np.testing.assert_array_equal(fastbp.ops.gemm(a, a), fastbp.ops.gemm(a, a))
    assert fastbp.get_num_threads() == before
    fastbp.set_num_threads(2)
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert fastbp.get_num_threads() == 2, "an explicit set_num_threads wins"


FORK_SCRIPT = """
import multiprocessing as mp
import os, sys, time
import numpy as np
import fastbp
from fastbp import ops

fastbp.set_num_threads(2)
rng = np.random.default_rng(0)
a, b = rng.standard_normal((500, 500)), rng.standard_normal((500, 500))
ref = ops.gemm(a, b)  # a threaded product: libgomp's worker pool now exists

def check(_=None):
    return fastbp.get_num_threads() == 1 and np.array_equal(ops.gemm(a, b), ref)

pid = os.fork()
if pid == 0:
    os._exit(0 if check() else 3)
deadline = time.monotonic() + 30
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    if time.monotonic() > deadline:  # a hung child: kill it (only it) and report
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("CHILD hung")
        sys.exit(1)
    time.sleep(0.01)
print("CHILD", os.waitstatus_to_exitcode(status))
print("PARENT", fastbp.get_num_threads(), np.array_equal(ops.gemm(a, b), ref))
with mp.get_context("fork").Pool(2) as pool:
    print("POOL", all(pool.map_async(check, range(4)).get(timeout=30)))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_after_threaded_gemm():
    """After a 2-thread gemm, a forked child (os.fork and multiprocessing's 'fork' pool) runs
    gemm to the same bits on one thread instead of hanging on libgomp's dead pool; the parent
    keeps its 2 threads. The whole script must finish well inside the timeout."""
    proc = run_python(FORK_SCRIPT, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert marked(proc, "CHILD") == "0"
    assert marked(proc, "PARENT") == "2 True"
    assert marked(proc, "POOL") == "True"


# ---- the generic object has no AVX ------------------------------------------------------------

# Mnemonics starting with 'v' that are not SIMD (VMX and segment verification).
NON_SIMD_V = {
    "verr",
    "verw",
    "vmcall",
    "vmlaunch",
    "vmresume",
    "vmxoff",
    "vmxon",
    "vmread",
    "vmwrite",
    "vmptrld",
    "vmptrst",
    "vmclear",
    "vmfunc",
    "vmrun",
    "vmload",
    "vmsave",
    "vmmcall",
}
PREFIXES = {"rep", "repz", "repe", "repnz", "repne", "lock", "notrack", "bnd", "data16", "addr32"}
AVX_REGISTER = re.compile(r"%(?:[yz]mm\d+|k[0-7]\b)")


def is_avx(instruction: str) -> bool:
    """VEX/EVEX code: a ymm/zmm/mask register, or a 'v'-prefixed SIMD mnemonic (vmovups,
    vfmadd231ps, vbroadcastss, vxorps on xmm...)."""
    words = instruction.split()
    while words and words[0] in PREFIXES:
        words = words[1:]
    mnemonic = words[0] if words else ""
    simd_v = mnemonic.startswith("v") and mnemonic not in NON_SIMD_V
    return simd_v or bool(AVX_REGISTER.search(instruction))


def objdump(path: Path) -> list[tuple[int, str, str]]:
    """(address, enclosing label, instruction) for every instruction objdump -d lists."""
    text = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    rows, label = [], ""
    for line in text.splitlines():
        header = re.match(r"^[0-9a-f]+ <([^>]+)>:$", line)
        if header:
            label = header.group(1)
            continue
        insn = re.match(r"^\s*([0-9a-f]+):\t(.*)$", line)
        if insn and insn.group(2).strip() not in ("", "..."):
            rows.append((int(insn.group(1), 16), label, insn.group(2).strip()))
    return rows


def functions_by_symbol(path: Path) -> dict[str, list[str]]:
    """{function: its instructions}, each function cut to [address, address + size) from the
    symbol tables (nm). objdump's labels alone are not enough: a stripped wheel keeps only the
    dynamic symbols, and the static code that follows an exported function would be listed
    under that function's label."""
    ranges: dict[str, tuple[int, int]] = {}
    for flags in (["-S"], ["-D", "-S"]):
        listing = subprocess.run(
            ["nm", *flags, "--defined-only", str(path)], capture_output=True, text=True, timeout=60
        ).stdout
        for line in listing.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[2] in "tTwWi" and int(parts[1], 16) > 0:
                start = int(parts[0], 16)
                ranges.setdefault(parts[3].split("@")[0], (start, start + int(parts[1], 16)))
    by_start = sorted((start, end, name) for name, (start, end) in ranges.items())
    starts = [start for start, _, _ in by_start]
    functions: dict[str, list[str]] = {name: [] for name in ranges}
    for address, _, insn in objdump(path):
        i = bisect.bisect_right(starts, address) - 1
        if i >= 0 and address < by_start[i][1]:
            functions[by_start[i][2]].append(insn)
    return functions


def kernel_object_dirs() -> dict[str, Path]:
    """{isa: CMakeFiles/fastbp_kernels_<isa>.dir} of the build that produced the loaded
    extension (walking up from it), else of any build under the repository's build/."""
    for parent in Path(_core.__file__).resolve().parents:
        found = {
            isa: parent / "CMakeFiles" / f"fastbp_kernels_{isa}.dir"
            for isa in ("generic", "avx2", "avx512")
        }
        if found["generic"].is_dir():
            return {isa: d for isa, d in found.items() if d.is_dir()}
    build = Path(__file__).resolve().parents[1] / "build"
    dirs: dict[str, Path] = {}
    if build.is_dir():
        for d in build.rglob("fastbp_kernels_*.dir"):
            dirs.setdefault(d.name[len("fastbp_kernels_") : -len(".dir")], d)
    return dirs


needs_objdump = pytest.mark.skipif(
    shutil.which("objdump") is None or shutil.which("nm") is None, reason="binutils not found"
)


@needs_objdump
@pytest.mark.skipif(not IS_X86, reason="AVX is an x86 concern")
def test_generic_symbols_have_no_avx():
    """In the installed extension every *_generic function is plain x86-64 (SSE2): no ymm/zmm
    or mask registers, no VEX-encoded instruction; the avx2 kernels, disassembled the same
    way, do use ymm and FMA (so the check can see AVX when it is there)."""
    functions = functions_by_symbol(Path(_core.__file__))
    generic = {name: body for name, body in functions.items() if name.endswith("_generic")}
    for dtype in ("f32", "f64"):
        for kernel in ("gemm", "activation_forward", "activation_backward", "adam_step"):
            assert f"fbp_{kernel}_{dtype}_generic" in generic, sorted(generic)
    for name, body in generic.items():
        bad = [ins for ins in body if is_avx(ins)]
        assert not bad, f"{name} contains AVX instructions: {bad[:5]}"
    if "avx2" in fastbp.get_config()["compiled_isas"]:
        # all the avx2 symbols, not only fbp_gemm_*_avx2: whether the compiler inlines the GEMM's
        # body into that entry point (or leaves it a call) depends on the build's flags
        avx2_all = [
            ins for name, body in functions.items() if name.endswith("_avx2") for ins in body
        ]
        assert any("%ymm" in ins for ins in avx2_all) and any("vfmadd" in ins for ins in avx2_all)
        assert sum(map(is_avx, avx2_all)) > 100


@needs_objdump
@pytest.mark.skipif(not IS_X86, reason="AVX is an x86 concern")
def test_generic_objects_have_no_avx():
    """Every object of the generic kernel library, static helpers and OpenMP-outlined bodies
    included (they carry no _generic suffix), is free of AVX; the avx2 gemm object has ymm
    and vfmadd."""
    dirs = kernel_object_dirs()
    if "generic" not in dirs:
        pytest.skip("no CMake build tree with fastbp_kernels_generic.dir found")
    objects = sorted(dirs["generic"].rglob("*.o"))
    assert any(o.name.startswith("gemm") for o in objects), objects
    for obj in objects:
        bad = [f"{label}: {insn}" for _, label, insn in objdump(obj) if is_avx(insn)]
        assert not bad, f"{obj} contains AVX instructions: {bad[:5]}"
    if "avx2" in dirs:
        gemm_objects = list(dirs["avx2"].rglob("gemm*.o"))
        assert gemm_objects
        code = "\n".join(insn for obj in gemm_objects for _, _, insn in objdump(obj))
        assert "%ymm" in code and "vfmadd" in code


def test_thread_limit_restores_the_exact_setting() -> None:
    """thread_limit puts back a pinned count, or "follow OpenMP", whichever was in force."""
    fastbp.set_num_threads(None)
    default = fastbp.get_num_threads()
    with fastbp.thread_limit(1):
        assert fastbp.get_num_threads() == 1
    assert fastbp._config._requested is None and fastbp.get_num_threads() == default
    fastbp.set_num_threads(default)  # pinned to the same number: must come back pinned
    try:
        with fastbp.thread_limit(1):
            assert fastbp.get_num_threads() == 1
        assert fastbp._config._requested == default
        with fastbp.thread_limit(None):
            assert fastbp._config._requested == default
    finally:
        fastbp.set_num_threads(None)
