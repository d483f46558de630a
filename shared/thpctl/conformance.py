"""thpctl conformance: the model against the real kernel, step by step (no daemons needed).

The harness is shared/sim/conformance.py (``python -m shared.sim.conformance`` takes the same
options). It runs random sequences, or one given with ``--replay FILE`` / ``--steps-text``, on a
real-kernel backend (worker processes on a private tmpfs, as root) and on the in-process model,
compares them after every step, prints agreement per operation family and every divergence with
a one-line replay command. Exit status: 0 agreed (or only known differences), 1 an unexpected
divergence or a stale known-difference entry, 2 bad usage, 77 the kernel side cannot run here
(0 with ``--skip-unavailable``).
"""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from shared.sim import conformance
from shared.thpctl.cli import Outcome, command
from shared.thpctl.client import Session


async def _run(session: Session, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    del session  # in-process: no daemon is contacted
    return conformance.run_cli(args, stdout, stderr, program="thpctl conformance")


def register(sub: Any) -> None:
    p = command(
        sub,
        "conformance",
        "differential conformance: random sequences (or one replayed) on the real kernel and the "
        "model side by side, compared after every step; agreement per operation family, divergences "
        "with a replay command",
        lambda a: [],
        lambda a, results: Outcome(),
        "conformance --seeds 100 --mode step --huge advise",
    )
    conformance.add_arguments(p, json_flag=False)
    # thpctl's global --json works too; this one must not reset it when absent.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document")
    p.set_defaults(runner=_run)
