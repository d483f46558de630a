"""The main job: both daemons as real processes, a demo workload through the client, what was won.

Run it with ``bash .ci/demo`` (or ``python -m shared.thpctl.demo``). It starts ``collapsed`` and
``remapd`` on Unix sockets in a temporary directory, plays Kirill's scenario against them in real
time (two processes map a text file; a thread of one holds its mmap_lock while khugepaged
collapses the file; the remapper recovers the pte-mapped THP), prints smaps/vmstat/meminfo
excerpts, stops the daemons, and then runs the same busy-lock workload under every retry policy
in-process on the virtual clock and prints them side by side.

``--collapsed ADDR --remapd ADDR`` plays the same story against daemons already running there
(the docker compose demo) instead, with process ids and a file name of its own so it does not
disturb what else they hold, and leaves them running. Either way the last line is the tally:

    tally: pmd_mapped_kb=24576 thp_file_mapped=12 collapses=4

(the demo's processes' FilePmdMapped at the end, and how much vmstat's thp_file_mapped and
thp_collapse_alloc grew during the story); the exit status is 1, with one line, when the story
fails (no daemons, a refusal, a timeout, no PMD mapping won).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Awaitable, Callable

import trio

from shared.errors import UserError
from shared.protocol import messages as m
from shared.shell.auth import SecretError, Secrets, load_secrets
from shared.sim.experiment import Workload, compare, render
from shared.thpctl.client import COLLAPSED, REMAPD, Session
from shared.thpctl.launch import DaemonError, running_daemons
from shared.thpctl.mm import ordered_counts
from shared.thpctl.render import render_smaps

MB = 1 << 20
SIZE = 8 * MB
# Long enough to cover khugepaged's first pass (scan_sleep_millisecs below) with room to spare.
HOLD_MS = 1500
SCAN_MS = 100
IDLE_MS = 600_000
# How long attaching waits for remapd to be connected to collapsed.
ATTACH_TIMEOUT_S = 30.0
FILE = "libbig.so"

Say = Callable[[str], None]


class DemoFailed(Exception):
    """The story did not play out: one line for stderr."""


@dataclasses.dataclass(frozen=True)
class Tally:
    """What the story won: the grep-able last line of the demo."""

    pmd_mapped_kb: int
    thp_file_mapped: int
    collapses: int

    def line(self) -> str:
        return f"tally: pmd_mapped_kb={self.pmd_mapped_kb} thp_file_mapped={self.thp_file_mapped} collapses={self.collapses}"


def _touched(counts: dict[str, int]) -> str:
    """A touch's outcomes as ``thpctl touch`` names them: ``pmd 2, hit 1022``."""
    return ", ".join(f"{o} {n}" for o, n in ordered_counts(counts))


def _pmd_kb(smaps: list[m.SmapsEntry]) -> int:
    return sum(e["FilePmdMapped"] for e in smaps)


async def _wait_for(what: Callable[[], Awaitable[bool]], deadline_s: float = 10.0, poll_s: float = 0.05) -> None:
    """Poll ``what()`` until true: the daemons run in real time."""
    with trio.fail_after(deadline_s):
        while not await what():
            await trio.sleep(poll_s)


async def scenario(s: Session, say: Say, pids: tuple[int, int, int] = (1, 2, 3), name: str = FILE) -> Tally:
    p1, p2, p3 = pids
    start = await s.vmstat()
    # khugepaged stays asleep while the processes set up; it is woken once p1's lock is held.
    await s.call(m.SysfsSet, name="khugepaged/scan_sleep_millisecs", value=str(IDLE_MS))
    await s.call(m.SysfsSet, name="thpsplit/remap_sleep_millisecs", value=str(SCAN_MS))
    await s.call(m.FileCreate, name=name, size=SIZE)
    addrs = {}
    for pid in (p1, p2):
        await s.call(m.ProcSpawn, pid=pid)
        addrs[pid] = (await s.call(m.Mmap, pid=pid, addr=None, length=SIZE, name=name, prot="rx", shared=False))["addr"]
        await s.call(m.Madvise, pid=pid, addr=addrs[pid], length=SIZE, advice="hugepage")
        counts = await s.call(m.Touch, pid=pid, addr=addrs[pid], length=SIZE)
        say(f"   pid {pid}: mmap {SIZE // MB} MiB of {name} r-x at {addrs[pid]:#x}, MADV_HUGEPAGE, touch: {_touched(counts)}")
    say(f"2. A thread of pid {p1} holds its mmap_lock for {HOLD_MS} ms while khugepaged collapses the file.")
    await s.call(m.Lock, pid=p1, hold_ms=HOLD_MS)
    await s.call(m.SysfsSet, name="khugepaged/scan_sleep_millisecs", value=str(SCAN_MS))  # wakes it
    await s.call(m.WaitScans, n=1)
    vm = await s.vmstat()
    st1 = await s.call(m.Smaps, pid=p1)
    st2 = await s.call(m.Smaps, pid=p2)
    say(f"   collapse_file built {vm['thp_collapse_alloc'] - start['thp_collapse_alloc']} THPs; pid {p2} got "
        f"PMDs right away (FilePmdMapped {_pmd_kb(st2)} kB); pid {p1}'s retract waits (FilePmdMapped {_pmd_kb(st1)} kB).")
    # The lock is held for read: p1's other threads keep faulting meanwhile.
    counts = await s.call(m.Touch, pid=p1, addr=addrs[p1], length=SIZE)
    status = await s.call(m.Status, REMAPD)
    say(f"3. pid {p1} runs its text meanwhile ({_touched(counts)}) -- the THPs come back PTE-mapped (pte-mapped THP);")
    say(f"   its PTE tables carry the per-PMD mark (remapd status: {status.get('marked_tables')} marked).")

    async def p1_recovered() -> bool:
        return _pmd_kb(await s.call(m.Smaps, pid=p1)) == SIZE // 1024

    try:
        await _wait_for(p1_recovered)
    except trio.TooSlowError:
        raise DemoFailed(f"pid {p1} did not get its PMD mappings back within 10 s") from None
    say(f"4. The remapper's pass over marked tables maps them with PMDs: pid {p1} FilePmdMapped {SIZE // 1024} kB.")
    await s.call(m.ProcSpawn, pid=p3)
    a3 = (await s.call(m.Mmap, pid=p3, addr=None, length=SIZE, name=name, prot="rx", shared=False))["addr"]
    counts = await s.call(m.Touch, pid=p3, addr=a3, length=SIZE)
    say(f"5. A new mapping (pid {p3}) gets PMDs at its first faults: {_touched(counts)}.\n")
    say(f"smaps of pid {p1} (thpctl smaps {p1}):")
    say(render_smaps(await s.call(m.Smaps, pid=p1)).rstrip())
    vm = await s.vmstat()
    say("\nvmstat excerpt (thpctl vmstat):")
    for key in ("thp_collapse_alloc", "thp_file_mapped", "thp_split_pmd", "nr_file_hugepages", "nr_file_pmdmapped"):
        say(f"{key} {vm[key]}")
    mi = await s.call(m.Meminfo)
    say("\nmeminfo excerpt (thpctl meminfo):")
    for key in ("FileHugePages", "FilePmdMapped"):
        say(f"{key + ':':<16}{mi[key]:>8} kB")
    won = 0
    for pid in pids:
        won += _pmd_kb(await s.call(m.Smaps, pid=pid))
    return Tally(
        pmd_mapped_kb=won,
        thp_file_mapped=vm["thp_file_mapped"] - start["thp_file_mapped"],
        collapses=vm["thp_collapse_alloc"] - start["thp_collapse_alloc"],
    )


async def run_daemons(transport: str, say: Say, secrets: Secrets) -> Tally:
    """Start both daemons, play the story against them, stop them."""
    with tempfile.TemporaryDirectory(prefix="thpsplit-demo-") as workdir:
        async with running_daemons(workdir, transport=transport) as d:
            say(f"== Both daemons up: collapsed on {d.collapsed.address}, remapd on {d.remapd.address} ==\n")
            say("1. Two processes map a text file and fault it in with PTEs.")
            async with Session(d.collapsed.address, d.remapd.address, secrets) as s:
                tally = await scenario(s, say)
        codes = [p.proc.returncode if p.proc is not None else None for p in (d.collapsed, d.remapd)]
        say(f"\n== Daemons stopped (collapsed exit {codes[0]}, remapd exit {codes[1]}) ==")
    return tally


async def attach(collapsed: str, remapd: str, say: Say, secrets: Secrets) -> Tally:
    """Play the story against daemons already running at ``collapsed`` and ``remapd``."""
    async with Session(collapsed, remapd, secrets) as s:
        # Connect first: a connection opened inside the timeout's scope would outlive it.
        for daemon in (COLLAPSED, REMAPD):
            await s.client(daemon)
        try:
            with trio.fail_after(ATTACH_TIMEOUT_S):
                await s.call(m.Sync, REMAPD)  # answered once remapd is connected to collapsed
        except trio.TooSlowError:
            raise DemoFailed(f"remapd at {remapd} did not connect to collapsed within {ATTACH_TIMEOUT_S:g} s") from None
        status = await s.call(m.Status, REMAPD)
        first = max(status.get("processes", []), default=0) + 1
        names = {f["name"] for f in await s.call(m.FileLs)}
        name = FILE if FILE not in names else next(f"libbig-{i}.so" for i in range(2, 10**6) if f"libbig-{i}.so" not in names)
        say(f"== Attached to running daemons: collapsed on {collapsed}, remapd on {remapd} ==\n")
        say("1. Two processes map a text file and fault it in with PTEs.")
        return await scenario(s, say, (first, first + 1, first + 2), name)


# What ends the story with one line instead of a traceback.
_STORY_ERRORS = (DemoFailed, UserError, DaemonError, SecretError, trio.TooSlowError)


def _story_error(exc: BaseException) -> BaseException | None:
    """``exc`` if it is one of the story's errors, or the one such error a group holds."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, _STORY_ERRORS) else None


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.thpctl.demo", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--transport", choices=("unix", "tcp"), default="unix", help="for the daemons it starts")
    parser.add_argument(
        "--collapsed", metavar="ADDR", help="attach to collapsed running at ADDR instead of starting the daemons"
    )
    parser.add_argument("--remapd", metavar="ADDR", help="attach to remapd running at ADDR (with --collapsed)")
    parser.add_argument(
        "--secret-file",
        metavar="PATH",
        help="the daemons' client secret ($THPSPLIT_SECRET_FILE, or the value in $THPSPLIT_SECRET)",
    )
    parser.add_argument(
        "--no-policies", action="store_true", help="skip the in-process retry policy comparison (skipped when attaching)"
    )
    args = parser.parse_args(argv)
    if (args.collapsed is None) != (args.remapd is None):
        parser.error("--collapsed and --remapd go together")

    def say(line: str = "") -> None:
        print(line, flush=True)

    try:
        secrets = load_secrets(args.secret_file, peer=False)
        if args.collapsed is not None:
            tally = trio.run(attach, args.collapsed, args.remapd, say, secrets)
        else:
            tally = trio.run(run_daemons, args.transport, say, secrets)
    except BaseException as exc:
        err = _story_error(exc)
        if err is None:
            raise
        print(f"demo: FAILED: {_one_line(err)}", file=sys.stderr)
        return 1
    if args.collapsed is None and not args.no_policies:
        work = Workload()
        say(f"\n== Retry policies side by side (in-process, virtual clock): {work.procs} processes map a "
            f"{work.size // MB} MiB text file; {work.busy} keep mmap_lock busy while khugepaged collapses it ==\n")
        say(render(compare(work)))
        say("")
    say(tally.line())
    if tally.pmd_mapped_kb <= 0 or tally.thp_file_mapped <= 0:
        print("demo: FAILED: no PMD mapping was won", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
