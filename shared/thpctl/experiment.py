"""thpctl experiment: the busy-lock workload under each retry policy, in-process (no daemons).

It runs the model on its virtual clock (shared/experiment.py), so a sweep over policies takes
seconds whatever model time it covers, and every run is deterministic.
"""

from __future__ import annotations

import argparse
from typing import Any

from shared.knobs import RETRY_POLICIES
from shared.sim.experiment import Workload, compare, render
from shared.thpctl.cli import EXIT_USAGE, Outcome, command, milliseconds, ok, size


def policies(text: str) -> tuple[str, ...]:
    names = tuple(p for p in text.split(",") if p)
    bad = [p for p in names if p not in RETRY_POLICIES]
    if bad or not names:
        raise ValueError(text)
    return names


def _render(args: argparse.Namespace, results: list[Any]) -> Outcome:
    if not 0 <= args.busy <= args.procs or args.procs < 1:
        return Outcome(error="EINVAL: need 1 <= --procs and 0 <= --busy <= --procs", status=EXIT_USAGE)
    work = Workload(
        procs=args.procs,
        size=args.size,
        busy=args.busy,
        busy_ms=args.busy_ms,
        run_ms=args.run_ms,
    )
    rows = compare(work, args.policies, install_pmd=args.install_pmd)
    return ok(rows, render(rows) + "\n")


def register(sub: Any) -> None:
    p = command(
        sub,
        "experiment",
        "compare retry policies in-process: PROCS processes map a SIZE text file, BUSY of them hold "
        "their mmap lock for BUSY_MS while khugepaged collapses it; what each policy maps with PMDs",
        lambda a: [],
        _render,
        "experiment --procs 8 --size 64M --busy 4 --policies per-pmd,mm-slot",
    )
    p.add_argument("--procs", type=int, default=Workload.procs, metavar="N")
    p.add_argument("--size", type=size, default=Workload.size, metavar="SIZE")
    p.add_argument("--busy", type=int, default=Workload.busy, metavar="N")
    p.add_argument("--busy-ms", type=milliseconds, default=Workload.busy_ms, metavar="MS")
    p.add_argument("--run-ms", type=milliseconds, default=Workload.run_ms, metavar="MS")
    p.add_argument("--install-pmd", type=int, choices=(0, 1), default=1)
    p.add_argument(
        "--policies",
        type=policies,
        default=RETRY_POLICIES,
        metavar="P,P",
        help=f"comma-separated, from {','.join(RETRY_POLICIES)} (default: all)",
    )
