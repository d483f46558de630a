"""thpctl's machinery: the parser, how a command becomes requests, and how results become output.

A command is a parser with two functions set as defaults: ``plan(args)`` returns the requests
to send (each to one daemon), ``render(args, results)`` turns their results into an
:class:`Outcome`. Keeping the two apart is what lets ``run`` pipeline: it sends a command's
requests before the previous command's replies are in.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TextIO

import trio

from shared.errors import UserError
from shared.protocol import schema
from shared.shell.auth import ENV_SECRET, ENV_SECRET_FILE, SecretError, load_secrets
from shared.shell.config import ENV_COLLAPSED, ENV_DEADLINE, ENV_REMAPD, default_address
from shared.thpctl.client import COLLAPSED, REMAPD, Pending, Session
from shared.units import parse_size

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad command-line input: one line for stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so ``run`` can report a bad
    line and the top level can print exactly one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


@dataclasses.dataclass
class Request:
    daemon: str
    cls: type[schema.Request[Any]]
    fields: dict[str, Any]
    # Seconds to wait for the reply (None: as long as it takes) and what to say when it expires.
    timeout: float | None = None
    timeout_message: str = ""


@dataclasses.dataclass
class Outcome:
    data: Any = None  # the JSON document
    text: str = ""  # the text output (each line ends with a newline)
    error: str = ""  # one line for stderr
    status: int = EXIT_OK


Plan = Callable[[argparse.Namespace], list[Request]]
Render = Callable[[argparse.Namespace, list[Any]], Outcome]


def command(
    sub: Any, name: str, help: str, plan: Plan, render: Render, example: str = "", barrier: bool = False
) -> Parser:
    """Add a subcommand; ``barrier``: in ``run``, wait for everything before and for this."""
    epilog = f"example: thpctl {example}" if example else None
    parser = sub.add_parser(name, help=help, description=help, epilog=epilog)
    parser.set_defaults(plan=plan, render=render, barrier=barrier, name=parser.prog)
    return parser


def req(daemon: str, cls: type[schema.Request[Any]], **fields: Any) -> Request:
    return Request(daemon, cls, fields)


# -- argument types (their __name__ is what argparse calls the value in errors) ---------------


def size(text: str) -> int:
    return parse_size(text)


def address(text: str) -> int:
    return parse_size(text)


def milliseconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


def seconds(text: str) -> float:
    return milliseconds(text)


# -- outcomes ---------------------------------------------------------------------------------


def ok(data: Any, text: str = "") -> Outcome:
    return Outcome(data=data, text=text)


def failed(err: UserError, data: Any = None, text: str = "") -> Outcome:
    return Outcome(data=data, text=text, error=f"{err.errno_name}: {err.message}", status=EXIT_FAIL)


def lines(*items: str) -> str:
    return "".join(f"{item}\n" for item in items)


def pairs(mapping: dict[str, Any]) -> str:
    return lines(*(f"{key} {value}" for key, value in mapping.items()))


# -- the parser -------------------------------------------------------------------------------


def build_parser() -> Parser:
    from shared.thpctl import experiment, files, mm, proc, reports, run

    parser = Parser(
        prog="thpctl",
        description="Drive the thpsplit daemons: files and the page cache (collapsed), "
        "processes and mappings (remapd), and what the kernel would report about them.",
        epilog="SIZE, ADDR and OFFSET take decimal, 0x-hex and K/M/G suffixes (2M, 0x200000). "
        "Exit status: 0 done, 1 refused (the errno is on stderr), 2 bad command line.",
    )
    parser.add_argument(
        "--collapsed",
        metavar="ADDR",
        help=f"collapsed's address (${ENV_COLLAPSED}; default {default_address('collapsed')})",
    )
    parser.add_argument(
        "--remapd",
        metavar="ADDR",
        help=f"remapd's address (${ENV_REMAPD}; default {default_address('remapd')})",
    )
    parser.add_argument(
        "--secret-file",
        metavar="PATH",
        help=f"the shared client secret the daemons check (${ENV_SECRET_FILE}, or the value itself in "
        f"${ENV_SECRET}; needed when the daemons have one)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument(
        "--deadline",
        metavar="SECONDS",
        type=seconds,
        default=_env_deadline(),
        help=f"give up on any reply after SECONDS (${ENV_DEADLINE}; default: wait)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (files, proc, mm, reports, run, experiment):
        module.register(sub)
    return parser


def _env_deadline() -> float | None:
    text = os.environ.get(ENV_DEADLINE)
    try:
        return seconds(text) if text else None
    except ValueError:
        return None


# -- running ----------------------------------------------------------------------------------


async def send(session: Session, args: argparse.Namespace) -> list[tuple[Request, Pending]]:
    """Send a command's requests (each daemon gets its own in order)."""
    sent = []
    for request in args.plan(args):
        pending = await session.start(request.cls, request.daemon, **request.fields)
        sent.append((request, pending))
    return sent


async def finish(args: argparse.Namespace, sent: list[tuple[Request, Pending]]) -> Outcome:
    """Wait for a command's replies and render them."""
    results = []
    for request, pending in sent:
        limit = min(x for x in (request.timeout, args.deadline, math.inf) if x is not None)
        try:
            with trio.fail_after(limit):
                results.append(await pending.result())
        except UserError as err:
            on_error = getattr(args, "on_error", None)
            return on_error(args, err) if on_error else failed(err)
        except trio.TooSlowError:
            what = request.timeout_message or f"no reply from {request.daemon} within {limit:g} s"
            return Outcome(error=f"ETIMEDOUT: {what}", status=EXIT_FAIL)
    return args.render(args, results)


async def execute(session: Session, args: argparse.Namespace) -> Outcome:
    try:
        return await finish(args, await send(session, args))
    except UserError as err:
        return failed(err)


def emit(outcome: Outcome, as_json: bool, stdout: TextIO, stderr: TextIO, prefix: str = "thpctl") -> None:
    if as_json:
        if outcome.data is not None or not outcome.status:
            stdout.write(json.dumps(outcome.data) + "\n")
    else:
        stdout.write(outcome.text)
    if outcome.error:
        stderr.write(f"{prefix}: {outcome.error}\n")


async def amain(argv: list[str], stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """thpctl without the process: parse ``argv``, run it, write the output; the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        stderr.write(f"{err}\n")
        return EXIT_USAGE
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else EXIT_OK
    try:
        secrets = load_secrets(args.secret_file, peer=False)
    except SecretError as err:
        stderr.write(f"thpctl: {err}\n")
        return EXIT_USAGE
    async with Session(args.collapsed, args.remapd, secrets) as session:
        if getattr(args, "runner", None) is not None:
            return await args.runner(session, args, stdout, stderr)
        outcome = await execute(session, args)
    emit(outcome, args.json, stdout, stderr, args.name)
    return outcome.status


__all__ = [
    "COLLAPSED",
    "EXIT_FAIL",
    "EXIT_OK",
    "EXIT_USAGE",
    "REMAPD",
    "Outcome",
    "Parser",
    "Plan",
    "Request",
    "UsageError",
    "amain",
    "build_parser",
    "command",
    "emit",
    "execute",
    "failed",
    "finish",
    "lines",
    "ok",
    "pairs",
    "req",
    "send",
]
