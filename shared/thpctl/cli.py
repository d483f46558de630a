"""thpctl's machinery: the parser, how a command becomes requests, and how results become output.

A command is a parser with two functions set as defaults: ``plan(args)`` returns the requests
to send (each to one daemon), ``render(args, results)`` turns their results into an
:class:`Outcome`. Keeping the two apart is what lets ``run`` pipeline: it sends a command's
requests before the previous command's replies are in.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TextIO

import trio

from shared.errors import UserError
from shared.protocol import schema
from shared.shell.auth import ENV_SECRET, ENV_SECRET_FILE, SecretError, load_secrets
from shared.shell.config import ENV_COLLAPSED, ENV_DEADLINE, ENV_REMAPD, default_address
from shared.thpctl.client import COLLAPSED, REMAPD, Pending, Session
from shared.thpctl.recording import record_path, session_for
from shared.units import parse_size

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad command-line input: one line for stderr, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help shows its default, unless there is none to show (None, False, or a
    help text that already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS or "default" in help:
            return help
        return super()._get_help_string(action) or help


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """HelpFormatter that keeps the description's own line breaks."""


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so ``run`` can report a bad
    line and the top level can print exactly one line. Help shows every option's default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

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
    # The command renders a refusal (or an unreachable daemon) itself: the UserError is its result.
    tolerate: bool = False


@dataclasses.dataclass
class Outcome:
    data: Any = None  # the JSON document
    text: str = ""  # the text output (each line ends with a newline)
    error: str = ""  # one line for stderr
    status: int = EXIT_OK
    errno: str = ""  # the error's errno name, for --json's error document
    binary: bytes | None = None  # raw output (pagemap --binary): written to stdout's buffer

    def error_document(self) -> dict[str, Any]:
        """What --json prints for a failure without a document of its own."""
        errno, _, message = self.error.partition(": ")
        if self.errno:
            errno, message = self.errno, self.error.removeprefix(f"{self.errno}: ")
        elif not errno.isupper() or not message:
            errno, message = "EINVAL" if self.status == EXIT_USAGE else "EIO", self.error
        return {"error": {"errno": errno, "message": message}}


Plan = Callable[[argparse.Namespace], list[Request]]
Render = Callable[[argparse.Namespace, list[Any]], Outcome]


def command(
    sub: Any, name: str, help: str, plan: Plan, render: Render, example: str = "", barrier: bool = False
) -> Parser:
    """Add a subcommand; ``barrier``: in ``run``, wait for everything before and for this."""
    epilog = f"example: thpctl {example}" if example else None
    parser = sub.add_parser(name, help=help, description=help, epilog=epilog)
    # ``prog`` names the command in its errors (a positional NAME must not replace it).
    parser.set_defaults(plan=plan, render=render, barrier=barrier, name=parser.prog, prog=parser.prog)
    return parser


def req(daemon: str, cls: type[schema.Request[Any]], **fields: Any) -> Request:
    return Request(daemon, cls, fields)


# -- argument types (their __name__ is what argparse calls the value in errors) ---------------


# Addresses, sizes and offsets travel as unsigned 64-bit integers.
U64_MAX = (1 << 64) - 1


def size(text: str) -> int:
    return _u64(parse_size(text), text)


def address(text: str) -> int:
    return _u64(parse_size(text), text)


def _u64(value: int, text: str) -> int:
    if value > U64_MAX:
        raise argparse.ArgumentTypeError(f"EINVAL: {text} does not fit in 64 bits")
    return value


def count(text: str) -> int:
    """A non-negative decimal count (N of wait-scans, ...)."""
    value = int(text, 10)
    if value < 0:
        raise argparse.ArgumentTypeError(f"EINVAL: {text} is negative")
    return value


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
    return Outcome(
        data=data, text=text, error=f"{err.errno_name}: {err.message}", status=EXIT_FAIL, errno=err.errno_name
    )


def lines(*items: str) -> str:
    return "".join(f"{item}\n" for item in items)


def plain(value: Any) -> str:
    """A value as text output shows it: never a Python repr (lists comma-joined, dicts as
    ``key value`` pairs, floats rounded, booleans as yes/no)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {plain(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ",".join(plain(v) for v in value) or "none"
    return str(value)


def pairs(mapping: dict[str, Any]) -> str:
    return lines(*(f"{key} {plain(value)}" for key, value in mapping.items()))


# -- the parser -------------------------------------------------------------------------------


def build_parser() -> Parser:
    from shared.thpctl import (
        conformance,
        experiment,
        files,
        mapview,
        mm,
        proc,
        reports,
        run,
        top,
        tracepipe,
        traces,
        views,
    )

    parser = Parser(
        prog="thpctl",
        description="Drive the thpsplit daemons: files and the page cache (collapsed), "
        "processes and mappings (remapd), and what the kernel would report about them.",
        epilog="SIZE, ADDR and OFFSET take decimal, 0x-hex and K/M/G suffixes (2M, 0x200000). "
        "Exit status: 0 done, 1 refused (the errno is on stderr), 2 bad command line. "
        "With --json a failure prints {\"error\": {\"errno\": ..., \"message\": ...}} on stdout "
        "(unless the command has a document of its own) and the one line on stderr.",
    )
    parser.add_argument("--version", action="version", version=f"thpctl {_version()}")
    _add_completion(parser)
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
        help=f"give up on any reply after SECONDS (${ENV_DEADLINE}; default: wait)",
    )
    parser.add_argument("--record", metavar="FILE", type=record_path, help="write every request sent as a trace")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (files, proc, mm, reports, views, mapview, top, tracepipe, run, experiment, traces, conformance):
        module.register(sub)
    return parser


def _env_deadline() -> float | None:
    """$THPSPLIT_DEADLINE, when --deadline is not given.

    Raises:
        UsageError: a value that is not a number of seconds (never silently ignored).
    """
    text = os.environ.get(ENV_DEADLINE, "")
    if not text:
        return None
    try:
        return seconds(text)
    except ValueError:
        raise UsageError(f"thpctl: ${ENV_DEADLINE}: invalid seconds value: {text!r}") from None


def _version() -> str:
    try:
        return importlib.metadata.version("thpsplit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _add_completion(parser: Parser) -> None:
    """``--print-completion bash|zsh|tcsh``: the shell completion script (shtab)."""
    try:
        import shtab
    except ImportError:  # completion is optional: thpctl works without it
        return
    shtab.add_argument_to(parser, ["--print-completion"], help="print a shell completion script and exit")


# -- running ----------------------------------------------------------------------------------


class _Refused(Pending):
    """A request that could not be sent (its daemon unreachable): its result is the error."""

    def __init__(self, request: Request, err: UserError):
        self.err = err

    async def result(self) -> Any:
        raise self.err


async def send(session: Session, args: argparse.Namespace) -> list[tuple[Request, Pending]]:
    """Send a command's requests (each daemon gets its own in order)."""
    sent: list[tuple[Request, Pending]] = []
    for request in args.plan(args):
        try:
            pending = await session.start(request.cls, request.daemon, **request.fields)
        except UserError as err:
            if not request.tolerate:
                raise
            pending = _Refused(request, err)
        sent.append((request, pending))
    return sent


async def finish(args: argparse.Namespace, sent: list[tuple[Request, Pending]]) -> Outcome:
    """Wait for a command's replies and render them."""
    results: list[Any] = []
    tick = getattr(args, "tick", None)
    for request, pending in sent:
        if tick is not None:
            tick(len(results), len(sent))
        limit = min(x for x in (request.timeout, args.deadline, math.inf) if x is not None)
        try:
            with trio.fail_after(limit):
                results.append(await pending.result())
        except UserError as err:
            if request.tolerate:
                results.append(err)
                continue
            on_error = getattr(args, "on_error", None)
            return on_error(args, err) if on_error else failed(err)
        except trio.TooSlowError:
            what = request.timeout_message or f"no reply from {request.daemon} within {limit:g} s"
            return Outcome(error=f"ETIMEDOUT: {what}", status=EXIT_FAIL, errno="ETIMEDOUT")
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
            stdout.write(json.dumps(outcome.error_document()) + "\n")
    elif outcome.binary is not None:
        buffer = getattr(stdout, "buffer", None)
        if buffer is None:
            outcome.error = outcome.error or "EINVAL: stdout takes no bytes here: use -o FILE"
        else:
            stdout.flush()
            buffer.write(outcome.binary)
            buffer.flush()
    else:
        stdout.write(outcome.text)
    if outcome.error:
        stderr.write(f"{prefix}: {outcome.error}\n")


async def amain(argv: list[str], stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """thpctl without the process: parse ``argv``, run it, write the output; the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.deadline is None:
            args.deadline = _env_deadline()
    except UsageError as err:
        if "--json" in argv:
            emit(Outcome(error=str(err), status=EXIT_USAGE), True, stdout, _NOWHERE)
        stderr.write(f"{err}\n")
        return EXIT_USAGE
    except SystemExit as exit_:  # --help, --version, --print-completion
        return exit_.code if isinstance(exit_.code, int) else EXIT_OK
    try:
        secrets = load_secrets(args.secret_file, peer=False)
    except SecretError as err:
        stderr.write(f"thpctl: {err}\n")
        return EXIT_USAGE
    async with session_for(args, secrets) as session:
        if getattr(args, "runner", None) is not None:
            return await args.runner(session, args, stdout, stderr)
        with progress(args, stderr):
            outcome = await execute(session, args)
    emit(outcome, args.json, stdout, stderr, args.prog)
    return outcome.status


@contextlib.contextmanager
def progress(args: argparse.Namespace, stderr: TextIO) -> Iterator[None]:
    """On a terminal, a progress bar (rich) for a command sent as several requests (a large
    touch), shown once it has run a second; ``finish`` ticks it as replies come in."""
    if not isatty(stderr):
        yield
        return
    bar = progress_bar(args.prog, stderr)
    started = time.monotonic()
    task: list[Any] = []

    def tick(done: int, total: int) -> None:
        if total < 2 or time.monotonic() - started < 1.0:
            return
        if not task:
            bar.start()
            task.append(bar.add_task("", total=total))
        bar.update(task[0], completed=done)

    args.tick = tick
    try:
        yield
    finally:
        args.tick = None
        if task:
            bar.stop()


def progress_bar(label: str, stderr: TextIO) -> Any:
    """A transient rich bar on stderr: label, bar, done/total, elapsed time."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.description}"), console=Console(file=stderr), transient=True)


def isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Nowhere:
    def write(self, text: str) -> int:
        return len(text)


_NOWHERE: Any = _Nowhere()


__all__ = [
    "COLLAPSED",
    "EXIT_FAIL",
    "EXIT_OK",
    "EXIT_USAGE",
    "REMAPD",
    "Outcome",
    "Parser",
    "Plan",
    "RawHelpFormatter",
    "Request",
    "UsageError",
    "amain",
    "build_parser",
    "command",
    "count",
    "emit",
    "execute",
    "failed",
    "finish",
    "lines",
    "ok",
    "pairs",
    "plain",
    "req",
    "send",
]
