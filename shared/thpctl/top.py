"""thpctl top: a live view of both daemons, refreshed in place (rich), until q or Ctrl-C.

Shows khugepaged's progress (full scans, 2 MiB ranges scanned, pages collapsed, collapses per
second), the retry machinery (retracts, retract trylock failures, the remapper's own trylock
failures, marks pending) and, per process, how much of its file memory a PMD maps. A daemon
that is down is shown down. When stdout is not a terminal it prints ``--iterations`` snapshots
(default 1) one after another instead, as ``top -b``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any, TextIO

import trio

from shared.errors import UserError
from shared.protocol import messages as m
from shared.thpctl.cli import COLLAPSED, EXIT_OK, REMAPD, count, seconds
from shared.thpctl.client import Session


async def _maybe(session: Session, cls: type[Any], daemon: str) -> Any:
    try:
        return await session.call(cls, daemon)
    except UserError as err:
        return err


async def snapshot(addresses: dict[str, str]) -> dict[str, Any]:
    """Everything one screen shows (a daemon that cannot be reached: its UserError). Each
    snapshot has connections of its own, so a daemon that restarts comes back on the next one."""
    async with Session(addresses[COLLAPSED], addresses[REMAPD]) as session:
        return {
            "t": time.monotonic(),
            "collapsed": await _maybe(session, m.Status, COLLAPSED),
            "remapd": await _maybe(session, m.Status, REMAPD),
            "vmstat": await _maybe(session, m.Vmstat, COLLAPSED),
            "top": await _maybe(session, m.Top, REMAPD),
        }


def _rate(now: dict[str, Any], before: dict[str, Any] | None, get: Any) -> float:
    if before is None:
        return 0.0
    try:
        dt = now["t"] - before["t"]
        return (get(now) - get(before)) / dt if dt > 0 else 0.0
    except (TypeError, KeyError):
        return 0.0


def render(now: dict[str, Any], before: dict[str, Any] | None) -> Any:
    """The screen as a rich renderable."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    c, r = now["collapsed"], now["remapd"]
    state = []
    for name, s in (("collapsed", c), ("remapd", r)):
        if isinstance(s, UserError):
            state.append(f"{name} down ({s.errno_name})")
        else:
            state.append(f"{name} up, peer {'connected' if s['peer'] else 'not connected'}, model {s['model_ms'] / 1000:.1f} s")
    parts.append(Text("thpctl top — " + "; ".join(state) + "   (q quits)", style="bold"))

    scan = Table(title="khugepaged", title_justify="left", box=None, pad_edge=False)
    for col in ("full_scans", "ranges scanned", "pages scanned", "pages_collapsed", "collapses/s", "thp_collapse_alloc"):
        scan.add_column(col, justify="right")
    if isinstance(c, UserError):
        scan.add_row(*["-"] * 6)
    else:
        vm = now["vmstat"] if isinstance(now["vmstat"], dict) else {}
        rate = _rate(now, before, lambda s: s["collapsed"]["khugepaged/pages_collapsed"])
        scans = c.get("khugepaged/scans", 0)
        scan.add_row(
            str(c["khugepaged/full_scans"]),
            str(scans),
            str(scans * 512),
            str(c["khugepaged/pages_collapsed"]),
            f"{rate:.1f}",
            str(vm.get("thp_collapse_alloc", 0)),
        )
    parts.append(scan)

    top = now["top"]
    retry = Table(title="retract and retry", title_justify="left", box=None, pad_edge=False)
    for col in ("retracted", "trylock failed (retract)", "trylock failed (remapper)", "marks pending", "remapped"):
        retry.add_column(col, justify="right")
    procs = Table(title="processes", title_justify="left", box=None, pad_edge=False)
    for col in ("PID", "VMAS", "SIZE kB", "RSS kB", "PMD kB", "PMD %", "PTE-THP kB", "MARKED", "MMAP_LOCK"):
        procs.add_column(col, justify="right")
    if isinstance(top, UserError):
        retry.add_row(*["-"] * 5)
    else:
        k = top["counters"]
        retry.add_row(
            str(k["retracted"]),
            str(k["retract_deferred"]),
            str(k["remap_trylock_failed"]),
            str(k["marked_tables"]),
            str(k["remap_succeeded"]),
        )
        for p in top["processes"]:
            share = 100.0 * p["pmd_kb"] / p["rss_kb"] if p["rss_kb"] else 0.0
            procs.add_row(
                str(p["pid"]),
                str(p["vmas"]),
                str(p["size_kb"]),
                str(p["rss_kb"]),
                str(p["pmd_kb"]),
                f"{share:.0f}%",
                str(p["pte_thp_kb"]),
                str(p["marked"]),
                p["lock"],
            )
    parts += [retry, procs]
    return Group(*parts)


async def _keys(quit: trio.Event) -> None:
    """Wait for q (or Q) on a terminal's stdin, in cbreak mode."""
    fd = sys.stdin.fileno()
    while True:
        await trio.lowlevel.wait_readable(fd)
        data = os.read(fd, 32)
        if not data or b"q" in data.lower():
            quit.set()
            return


async def _signals(quit: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            quit.set()
            return


async def _top(session: Session, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from rich.console import Console

    interactive = stdout.isatty() and not args.batch
    console = Console(file=stdout, force_terminal=interactive, highlight=False, width=None if interactive else 120)
    before: dict[str, Any] | None = None
    if not interactive:
        for i in range(args.iterations or 1):
            now = await snapshot(session.addresses)
            console.print(render(now, before))
            before = now
            if i + 1 < (args.iterations or 1):
                await trio.sleep(args.interval)
        return EXIT_OK
    from rich.live import Live

    quit = trio.Event()
    restore = _cbreak()
    try:
        async with trio.open_nursery() as nursery:
            if sys.stdin.isatty():
                nursery.start_soon(_keys, quit)
            nursery.start_soon(_signals, quit)
            with Live(console=console, auto_refresh=False, transient=False) as live:
                shown = 0
                while not quit.is_set():
                    now = await snapshot(session.addresses)
                    live.update(render(now, before), refresh=True)
                    before = now
                    shown += 1
                    if args.iterations and shown >= args.iterations:
                        break
                    with trio.move_on_after(args.interval):
                        await quit.wait()
            nursery.cancel_scope.cancel()
    finally:
        restore()
    return EXIT_OK


def _cbreak() -> Any:
    """Put a terminal stdin in cbreak mode (keys arrive one by one, Ctrl-C still signals);
    returns what restores it."""
    if not sys.stdin.isatty():
        return lambda: None
    import termios
    import tty

    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    return lambda: termios.tcsetattr(fd, termios.TCSADRAIN, old)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "top",
        help="a live view: khugepaged's progress, collapses/s, retracts, trylock failures, marks, "
        "PMD coverage per process (q or Ctrl-C quits)",
        description=__doc__,
        epilog="example: thpctl top --interval 0.5",
    )
    p.add_argument("--interval", type=seconds, default=1.0, metavar="SECONDS", help="time between refreshes")
    p.add_argument("-n", "--iterations", type=count, metavar="N", help="stop after N screens (default: until q; 1 without a terminal)")
    p.add_argument("-b", "--batch", action="store_true", help="print snapshots one after another, as without a terminal")
    p.set_defaults(runner=_top, name="thpctl top", prog="thpctl top")
