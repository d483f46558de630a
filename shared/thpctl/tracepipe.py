"""thpctl trace [--filter EVENT] [--json]: the daemons' events as they happen, in the shape of
/sys/kernel/tracing/trace_pipe.

Each daemon streams its log events (a :class:`~shared.protocol.messages.Trace` subscription;
the daemon drops events when this client reads too slowly and says how many). Events with a
kernel tracepoint print its TP_printk fields in its order (include/trace/events/huge_memory.h):

    khugepaged-4242  [000] ..... 12.345678: mm_khugepaged_collapse_file: mm=0xffff888000001000,
        hpage_pfn=0x1200, index=512, addr=7effffc00000, is_shmem=0, filename=libfoo.so, nr=512,
        result=succeeded

(one line); thpsplit's own events (``retract``, ``pmd_install``, ``mark_set``, ...) print their
fields the same way. ``--json``: one JSON object per event. It runs until interrupted (Ctrl-C),
or until ``--count`` events or ``--duration`` seconds.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, TextIO

import trio

from shared.errors import UserError
from shared.protocol import messages as m
from shared.thpctl.cli import COLLAPSED, EXIT_FAIL, EXIT_OK, REMAPD, count, seconds
from shared.thpctl.client import Client, Session

# TP_printk of the kernel's tracepoints the model has: (field, printf conversion) in order.
KERNEL_FORMATS: dict[str, tuple[tuple[str, str], ...]] = {
    "mm_khugepaged_scan_file": (
        ("mm", "0x%x"), ("scan_pfn", "0x%x"), ("filename", "%s"), ("present", "%d"), ("swap", "%d"), ("result", "%s"),
    ),
    "mm_khugepaged_collapse_file": (
        ("mm", "0x%x"), ("hpage_pfn", "0x%x"), ("index", "%d"), ("addr", "%x"), ("is_shmem", "%d"),
        ("filename", "%s"), ("nr", "%d"), ("result", "%s"),
    ),
}  # fmt: skip
# Fields of thpsplit's own events printed in hex.
HEX_FIELDS = frozenset({"mm", "addr", "hpage_pfn", "scan_pfn", "pfn"})


def _conv(fmt: str, value: Any) -> str:
    if fmt == "%s":
        return str(value)
    if not isinstance(value, int):
        return str(value)
    if fmt == "%d":
        return str(value)
    return ("0x" if fmt.startswith("0x") else "") + f"{value & ((1 << 64) - 1):x}"


def format_fields(event: str, fields: dict[str, Any]) -> str:
    layout = KERNEL_FORMATS.get(event)
    if layout is not None:
        return ", ".join(f"{name}={_conv(fmt, fields.get(name, ''))}" for name, fmt in layout)
    return ", ".join(f"{k}={_conv('0x%x' if k in HEX_FIELDS else '%d', v)}" for k, v in fields.items())


def trace_line(e: dict[str, Any]) -> str:
    """One event as trace_pipe prints it: task-pid, CPU, flags, timestamp, event: fields."""
    return f"{e['task']:>22} [000] ..... {e['ts']:12.6f}: {e['event']}: {format_fields(e['event'], e['fields'])}"


async def _follow(client: Client, events: tuple[str, ...], out: trio.MemorySendChannel[Any]) -> None:
    async with client.stream(m.Trace, events=events) as replies:
        async for batch in replies:
            if isinstance(batch, UserError):
                raise batch
            await out.send(batch)


async def _trace(session: Session, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    daemons = [COLLAPSED, REMAPD] if args.daemon == "both" else [args.daemon]
    events = tuple(args.filter)
    shown = 0
    status = EXIT_OK
    send, recv = trio.open_memory_channel[Any](64)
    try:
        # Connections are opened here, in the session's own task (a connection lives in a nursery).
        clients = [await session.client(daemon) for daemon in daemons]
        with trio.move_on_after(args.duration if args.duration is not None else math.inf):
            async with trio.open_nursery() as nursery:
                for client in clients:
                    nursery.start_soon(_follow, client, events, send)
                async for batch in recv:
                    if batch["dropped"]:
                        stderr.write(f"thpctl trace: {batch['dropped']} events dropped (reading too slowly)\n")
                    for e in batch["events"]:
                        if args.json:
                            stdout.write(json.dumps({"ts": e["ts"], "daemon": e["daemon"], "task": e["task"],
                                                     "event": e["event"], **e["fields"]}) + "\n")  # fmt: skip
                        else:
                            stdout.write(trace_line(e) + "\n")
                        shown += 1
                        if args.count is not None and shown >= args.count:
                            nursery.cancel_scope.cancel()
                            break
                    stdout.flush()
    except UserError as err:
        stderr.write(f"thpctl trace: {err.errno_name}: {err.message}\n")
        status = EXIT_FAIL
    return status


def register(sub: Any) -> None:
    p = sub.add_parser(
        "trace",
        help="stream the daemons' events live, as trace_pipe prints them (or JSON lines)",
        description=__doc__,
        epilog="example: thpctl trace --filter mm_khugepaged_collapse_file",
    )
    p.add_argument("--filter", action="append", default=[], metavar="EVENT",
                   help="only this event (repeatable; default: every event)")  # fmt: skip
    p.add_argument("--daemon", choices=(COLLAPSED, REMAPD, "both"), default="both", help="whose events")
    p.add_argument("--count", type=count, metavar="N", help="stop after N events (default: run until interrupted)")
    p.add_argument("--duration", type=seconds, metavar="SECONDS", help="stop after SECONDS (default: run until interrupted)")
    p.set_defaults(runner=_trace, name="thpctl trace", prog="thpctl trace")
