"""The main job: both daemons as real processes, a demo workload through the client, what was won.

Run it with ``bash .ci/demo`` (or ``python -m shared.thpctl.demo``). It starts ``collapsed`` and
``remapd`` on Unix sockets in a temporary directory, plays Kirill's scenario against them in real
time (two processes map a text file; a thread of one holds its mmap_lock while khugepaged
collapses the file; the remapper recovers the pte-mapped THP), prints smaps/vmstat/meminfo
excerpts, stops the daemons, and then runs the same busy-lock workload under every retry policy
in-process on the virtual clock and prints them side by side.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import trio

from shared.protocol import messages as m
from shared.sim.experiment import Workload, compare, render
from shared.thpctl.client import REMAPD, Session
from shared.thpctl.launch import running_daemons
from shared.thpctl.render import render_smaps

MB = 1 << 20
SIZE = 8 * MB
# Long enough to cover khugepaged's first pass (scan_sleep_millisecs below) with room to spare.
HOLD_MS = 1500
SCAN_MS = 100
IDLE_MS = 600_000


def _pmd_kb(smaps: list[m.SmapsEntry]) -> int:
    return sum(e["FilePmdMapped"] for e in smaps)


async def _wait_for(what, deadline_s: float = 10.0, poll_s: float = 0.05) -> None:
    """Poll ``what()`` until true: the daemons run in real time."""
    with trio.fail_after(deadline_s):
        while not await what():
            await trio.sleep(poll_s)


async def scenario(s: Session, say) -> None:
    # khugepaged stays asleep while the processes set up; it is woken once pid 1's lock is held.
    await s.call(m.SysfsSet, name="khugepaged/scan_sleep_millisecs", value=str(IDLE_MS))
    await s.call(m.SysfsSet, name="thpsplit/remap_sleep_millisecs", value=str(SCAN_MS))
    await s.call(m.FileCreate, name="libbig.so", size=SIZE)
    addrs = {}
    for pid in (1, 2):
        await s.call(m.ProcSpawn, pid=pid)
        addrs[pid] = (await s.call(m.Mmap, pid=pid, addr=None, length=SIZE, name="libbig.so", prot="rx", shared=False))["addr"]
        await s.call(m.Madvise, pid=pid, addr=addrs[pid], length=SIZE, advice="hugepage")
        counts = await s.call(m.Touch, pid=pid, addr=addrs[pid], length=SIZE)
        say(f"   pid {pid}: mmap {SIZE // MB} MiB of libbig.so r-x at {addrs[pid]:#x}, MADV_HUGEPAGE, touch: {counts}")
    say(f"2. A thread of pid 1 holds its mmap_lock for {HOLD_MS} ms while khugepaged collapses the file.")
    await s.call(m.Lock, pid=1, hold_ms=HOLD_MS)
    await s.call(m.SysfsSet, name="khugepaged/scan_sleep_millisecs", value=str(SCAN_MS))  # wakes it
    await s.call(m.WaitScans, n=1)
    vm = await s.vmstat()
    st1 = await s.call(m.Smaps, pid=1)
    st2 = await s.call(m.Smaps, pid=2)
    say(f"   collapse_file built {vm['thp_collapse_alloc']} THPs; pid 2 got PMDs right away "
        f"(FilePmdMapped {_pmd_kb(st2)} kB); pid 1's retract waits (FilePmdMapped {_pmd_kb(st1)} kB).")
    # The lock is held for read: pid 1's other threads keep faulting meanwhile.
    counts = await s.call(m.Touch, pid=1, addr=addrs[1], length=SIZE)
    status = await s.call(m.Status, REMAPD)
    say(f"3. pid 1 runs its text meanwhile: {counts} -- the THPs come back PTE-mapped (pte-mapped THP);")
    say(f"   its PTE tables carry the per-PMD mark (remapd status: {status['marked_tables']} marked).")

    async def pid1_recovered() -> bool:
        return _pmd_kb(await s.call(m.Smaps, pid=1)) == SIZE // 1024

    await _wait_for(pid1_recovered)
    say(f"4. The remapper's pass over marked tables maps them with PMDs: pid 1 FilePmdMapped {SIZE // 1024} kB.")
    await s.call(m.ProcSpawn, pid=3)
    a3 = (await s.call(m.Mmap, pid=3, addr=None, length=SIZE, name="libbig.so", prot="rx", shared=False))["addr"]
    counts = await s.call(m.Touch, pid=3, addr=a3, length=SIZE)
    say(f"5. A new mapping (pid 3) gets PMDs at its first faults: {counts}.\n")
    say("smaps of pid 1 (thpctl smaps 1):")
    say(render_smaps(await s.call(m.Smaps, pid=1)).rstrip())
    vm = await s.vmstat()
    say("\nvmstat excerpt (thpctl vmstat):")
    for key in ("thp_collapse_alloc", "thp_file_mapped", "thp_split_pmd", "nr_file_hugepages", "nr_file_pmdmapped"):
        say(f"{key} {vm[key]}")
    mi = await s.call(m.Meminfo)
    say("\nmeminfo excerpt (thpctl meminfo):")
    for key in ("FileHugePages", "FilePmdMapped"):
        say(f"{key + ':':<16}{mi[key]:>8} kB")


async def run_daemons(transport: str, say) -> None:
    with tempfile.TemporaryDirectory(prefix="thpsplit-demo-") as workdir:
        async with running_daemons(workdir, transport=transport) as d:
            say(f"== Both daemons up: collapsed on {d.collapsed.address}, remapd on {d.remapd.address} ==\n")
            say("1. Two processes map a text file and fault it in with PTEs.")
            async with Session(d.collapsed.address, d.remapd.address) as s:
                await scenario(s, say)
        codes = [p.proc.returncode if p.proc is not None else None for p in (d.collapsed, d.remapd)]
        say(f"\n== Daemons stopped (collapsed exit {codes[0]}, remapd exit {codes[1]}) ==")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.thpctl.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    args = parser.parse_args(argv)

    def say(line: str = "") -> None:
        print(line, flush=True)

    trio.run(run_daemons, args.transport, say)
    work = Workload()
    say(f"\n== Retry policies side by side (in-process, virtual clock): {work.procs} processes map a "
        f"{work.size // MB} MiB text file; {work.busy} keep mmap_lock busy while khugepaged collapses it ==\n")
    say(render(compare(work)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
