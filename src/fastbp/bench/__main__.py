"""``python -m fastbp.bench``: time fastbp against NumPy, torch and scikit-learn on W1-W4.

Writes ``report.md`` (medians, ratios to fastbp, rates, checks), ``report.png`` (bar chart of
the ratios) and ``results.json`` into ``--output``. Exits with status 1 when a contender's
result fails its check against fastbp's.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Sequence

from .machine import machine_summary
from .report import run_suite, write_report
from .workloads import FULL, QUICK


def _thread_counts(values: list[str] | None) -> list[int]:
    if not values:
        return [1, 2] if (os.cpu_count() or 1) >= 2 else [1]
    out: list[int] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                n = int(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"--threads: not an integer: {part!r}") from None
            if n < 1:
                raise argparse.ArgumentTypeError(f"--threads must be >= 1, got {n}")
            if n not in out:
                out.append(n)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see ``python -m fastbp.bench --help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m fastbp.bench",
        description="Time fastbp's training (fit and a train_step loop) against a hand-written "
        "NumPy MLP, torch and scikit-learn on the workloads W1-W4, check every result against "
        "fastbp's, and write a markdown table and a PNG chart.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help=f"the quick subset: {', '.join(QUICK)} (default)",
    )
    size.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help=f"every workload: {', '.join(FULL)}",
    )
    parser.set_defaults(mode="quick")
    parser.add_argument(
        "--threads",
        action="append",
        metavar="N",
        help="thread count for every contender; repeat or give a comma list "
        "(default: 1,2 on a machine with at least 2 cores, else 1)",
    )
    parser.add_argument(
        "--output",
        type=pathlib.Path,
        default=pathlib.Path("bench-results"),
        help="folder for report.md, report.png and results.json (default ./bench-results)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        metavar="R",
        help="interleaved rounds per workload; the median is reported (default 3)",
    )
    # Hidden: shrink every workload to a few steps (the test suite's smoke test).
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.threads = _thread_counts(args.threads)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks and write the report; returns the exit status."""
    args = parse_args(argv)
    machine = machine_summary()
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable); "
        f"fastbp {machine['fastbp']} kernels {machine['isa']}; threads "
        f"{', '.join(map(str, args.threads))}; {args.mode}"
        + (" (smoke size)" if args.smoke else "")
        + f", median of {args.repeat}",
        flush=True,
    )
    keys = QUICK if args.mode == "quick" else FULL
    suite = run_suite(
        keys,
        args.threads,
        args.repeat,
        scale="smoke" if args.smoke else "full",
        mode=args.mode,
        log=lambda line: print(line, flush=True),
    )
    written = write_report(suite, args.output)
    print(f"wrote {written['markdown']}")
    if "chart" in written:
        print(f"wrote {written['chart']}")
    else:
        print(written["chart_message"])
    print(f"wrote {written['json']}")
    for failure in suite.failed:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if suite.failed else 0


if __name__ == "__main__":
    sys.exit(main())
