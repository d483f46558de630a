"""``collapsed`` / ``python -m collapsed``: run the collapser daemon."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from shared.knobs import Knobs
from shared.persist import SnapshotError
from shared.protocol.schema import CLIENT, REMAPD
from shared.shell.auth import Secrets
from shared.shell.config import (
    ENV_SEED,
    Limits,
    add_daemon_flags,
    add_knob_flags,
    default_address,
)
from shared.shell.server import daemon_main
from shared.shell.state import StateDir, add_state_flags, restore_from

if TYPE_CHECKING:
    from collapsed.collapser import Collapser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="collapsed",
        description="The collapser daemon: page cache, file operations and khugepaged's scan. "
        "Listens for remapd's peer connection and for thpctl clients on one address. Knobs "
        "given here apply until remapd connects and pushes its own (remapd owns them), except "
        "thpsplit/free_huge_pages, the huge page pool, which stays as set here.",
    )
    add_daemon_flags(parser, "collapsed")
    parser.add_argument(
        "--seed",
        type=int,
        default=int(os.environ.get(ENV_SEED, "0")),
        help=f"seed for the modelled physical memory's fragmentation (${ENV_SEED}; default 0)",
    )
    add_knob_flags(parser)
    add_state_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    listen = args.listen or default_address("collapsed")
    try:
        state, core = _restore(args)
    except SnapshotError as err:
        print(f"collapsed: {err}: refusing to start (move it away to start empty)", file=sys.stderr)
        return 2

    async def start(knobs: Knobs, secrets: Secrets, limits: Limits) -> None:
        from collapsed.daemon import Collapsed

        await Collapsed(knobs, seed=args.seed, secrets=secrets, limits=limits, core=core, state=state).serve(
            listen, args.ready_file
        )

    # Who connects: remapd (the peer) and clients, as collapsed.daemon.ACCEPTS.
    return daemon_main("collapsed", args, listen, {REMAPD, CLIENT}, start)


def _restore(args: argparse.Namespace) -> tuple[StateDir | None, Collapser | None]:
    """With --state-dir: where snapshots go, and the collapser its snapshot holds (if any).

    Errors:
        SnapshotError: the snapshot is unusable; nothing was applied.
    """
    from collapsed import snapshot
    from collapsed.collapser import RESCHED_PAGES
    from collapsed.daemon import new_boot_id

    return restore_from(
        args,
        snapshot.DAEMON,
        lambda saved, knobs, keep: snapshot.restore(
            saved, knobs, boot=new_boot_id(), seed=args.seed, keep=keep, resched_pages=RESCHED_PAGES
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
