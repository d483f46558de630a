"""``collapsed`` / ``python -m collapsed``: run the collapser daemon."""

from __future__ import annotations

import argparse
import os
import sys

from shared.knobs import Knobs
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    listen = args.listen or default_address("collapsed")

    async def start(knobs: Knobs, secrets: Secrets, limits: Limits) -> None:
        from collapsed.daemon import Collapsed

        await Collapsed(knobs, seed=args.seed, secrets=secrets, limits=limits).serve(listen, args.ready_file)

    # Who connects: remapd (the peer) and clients, as collapsed.daemon.ACCEPTS.
    return daemon_main("collapsed", args, listen, {REMAPD, CLIENT}, start)


if __name__ == "__main__":
    sys.exit(main())
