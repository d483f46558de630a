"""``remapd`` / ``python -m remapd``: run the remapper daemon."""

from __future__ import annotations

import argparse
import sys

from shared.config import (
    ENV_COLLAPSED,
    AddressError,
    add_daemon_flags,
    add_knob_flags,
    default_address,
    knobs_from,
    log_json,
    parse_address,
)
from shared.knobs import KnobError
from shared.logs import configure


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        knobs = knobs_from(args)
        listen = args.listen or default_address("remapd")
        collapsed = args.collapsed or default_address("collapsed")
        parse_address(listen)
        parse_address(collapsed)
    except (KnobError, AddressError) as err:
        print(f"remapd: {err}", file=sys.stderr)
        return 2
    configure(args.log_level, log_json(args.log_format))

    from remapd.daemon import Remapd
    from shared.driver import main_wrapper

    async def run() -> None:
        await Remapd(knobs).serve(listen, args.ready_file, collapsed)

    return main_wrapper("remapd", run)


if __name__ == "__main__":
    sys.exit(main())
