"""``remapd`` / ``python -m remapd``: run the remapper daemon."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from shared.knobs import Knobs
from shared.persist import SnapshotError
from shared.protocol.schema import CLIENT
from shared.shell.auth import Secrets
from shared.shell.config import (
    ENV_COLLAPSED,
    Limits,
    add_daemon_flags,
    add_knob_flags,
    default_address,
)
from shared.shell.server import daemon_main
from shared.shell.state import StateDir, add_state_flags, restore_from

if TYPE_CHECKING:
    from remapd.remapper import Remapper


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remapd",
        description="The remapper daemon: processes, VMAs, page tables, faults and retract. "
        "Connects to collapsed (retrying with backoff, and again whenever the connection is "
        "lost) and listens for thpctl clients. Owns the knobs: the values here (or set later "
        "with 'thpctl sysfs set') are pushed to collapsed whenever it connects.",
    )
    add_daemon_flags(parser, "remapd")
    parser.add_argument(
        "--collapsed",
        metavar="ADDR",
        default=None,
        help=f"collapsed's address (${ENV_COLLAPSED}; default {default_address('collapsed')})",
    )
    add_knob_flags(parser)
    add_state_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    listen = args.listen or default_address("remapd")
    collapsed = args.collapsed or default_address("collapsed")
    try:
        state, core = _restore(args)
    except SnapshotError as err:
        print(f"remapd: {err}: refusing to start (move it away to start empty)", file=sys.stderr)
        return 2

    async def start(knobs: Knobs, secrets: Secrets, limits: Limits) -> None:
        from remapd.daemon import Remapd

        await Remapd(knobs, secrets, limits, core=core, state=state).serve(listen, args.ready_file, collapsed)

    # Who connects: clients only, as remapd.daemon.ACCEPTS; remapd is the peer link's client.
    return daemon_main("remapd", args, listen, {CLIENT}, start, peer=collapsed)


def _restore(args: argparse.Namespace) -> tuple[StateDir | None, Remapper | None]:
    """With --state-dir: where snapshots go, and the remapper its snapshot holds (if any; its file
    mappings are revalidated with collapsed once connected).

    Errors:
        SnapshotError: the snapshot is unusable; nothing was applied.
    """
    from remapd import snapshot

    return restore_from(args, snapshot.DAEMON, lambda saved, knobs, keep: snapshot.restore(saved, knobs, keep=keep))


if __name__ == "__main__":
    sys.exit(main())
