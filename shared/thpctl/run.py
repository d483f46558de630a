"""thpctl run FILE|-: one command per line, pipelined.

Every line is parsed before anything is sent (a bad line stops the run with status 2). Then
consecutive commands to the same daemon are sent without waiting for replies; the daemon runs
them in order. Before a command goes to the other daemon (or waits, like wait-scans) the replies
outstanding are collected: each daemon replies only once the other has seen the effects, so a
script reads as if it ran one line at a time. Output comes in line order; the first failure
stops the run (commands after it that were already sent have run), unless --keep-going.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any, TextIO

from shared.errors import UserError
from shared.thpctl.cli import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    Outcome,
    RawHelpFormatter,
    Request,
    UsageError,
    build_parser,
    emit,
    failed,
    finish,
    send,
)
from shared.thpctl.client import Pending, Session


def _parse_script(text: str) -> list[tuple[int, argparse.Namespace]]:
    parser = build_parser()
    commands = []
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as err:
            raise UsageError(f"line {lineno}: {err}") from None
        if not tokens:
            continue
        try:
            args = parser.parse_args(tokens)
        except UsageError as err:
            raise UsageError(f"line {lineno}: {err}") from None
        except SystemExit:
            raise UsageError(f"line {lineno}: --help is not a command") from None
        if getattr(args, "runner", None) is not None:
            raise UsageError(f"line {lineno}: run cannot nest")
        commands.append((lineno, args))
    return commands


async def _run(session: Session, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file) as f:
                text = f.read()
    except OSError as err:
        stderr.write(f"thpctl run: {args.file}: {err.strerror}\n")
        return EXIT_FAIL
    try:
        commands = _parse_script(text)
    except UsageError as err:
        stderr.write(f"thpctl run: {err}\n")
        return EXIT_USAGE
    for _, cmd in commands:
        cmd.deadline = args.deadline

    documents: list[Any] = []
    status = EXIT_OK
    in_flight: list[tuple[int, argparse.Namespace, list[tuple[Request, Pending]] | Outcome]] = []

    async def collect() -> bool:
        """Print what is in flight, in order; False once something failed (and we stop)."""
        nonlocal status
        batch = list(in_flight)
        in_flight.clear()
        for lineno, cmd, sent in batch:
            outcome = sent if isinstance(sent, Outcome) else await finish(cmd, sent)
            if outcome.status and not outcome.error:
                # madvise's errno: printed as its result, named again here as the reason to stop.
                result = outcome.data.get("result") if isinstance(outcome.data, dict) else None
                outcome.error = str(result) if result is not None else f"exit status {outcome.status}"
            documents.append(outcome.error_document() if outcome.status and outcome.data is None else outcome.data)
            label = f"thpctl run: line {lineno}: {cmd.prog.removeprefix('thpctl ')}"
            emit(outcome, False, _NULL if args.json else stdout, stderr, label)
            if outcome.status:
                status = outcome.status
                if not args.keep_going:
                    return False
        return True

    for lineno, cmd in commands:
        targets = {r.daemon for r in cmd.plan(cmd)}
        busy = {r.daemon for _, _, sent in in_flight if not isinstance(sent, Outcome) for r, _ in sent}
        if in_flight and (cmd.barrier or len(targets | busy) > 1):
            if not await collect():
                break
        try:
            sent: list[tuple[Request, Pending]] | Outcome = await send(session, cmd)
        except UserError as err:
            sent = failed(err)
        in_flight.append((lineno, cmd, sent))
        if cmd.barrier and not await collect():
            break
    else:
        await collect()
    if args.json:
        stdout.write(json.dumps(documents) + "\n")
    return status


class _Null:
    def write(self, text: str) -> int:
        return len(text)


_NULL: Any = _Null()


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run commands from FILE (- for stdin), one per line, pipelined",
        description=__doc__,
        formatter_class=RawHelpFormatter,
        epilog="example: printf 'proc spawn 1\\nvmstat\\n' | thpctl run -",
    )
    p.add_argument("file", metavar="FILE|-", help="the script to run; - reads standard input")
    p.add_argument("-k", "--keep-going", action="store_true", help="run every line; exit 1 if any failed")
    p.set_defaults(runner=_run, name="thpctl run")
