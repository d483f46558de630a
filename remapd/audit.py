"""``thpctl check``, remapd's half: the rules of the invariant checker that remapd can judge alone
(its VMAs, page tables, counters, marks, anon pages), then every file page it maps or pins named
to collapsed (:class:`~shared.protocol.messages.Audit`), which judges those against its pages and
page cache (``collapsed/audit.py``). The daemons cannot import the simulator's checker; this is
that checker split along the peer protocol, for a pair of real processes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from remapd.mm import ANON_PFN_BASE, PTE_ANON, PTE_SHMEM, PteTable, pte_belongs, pte_pfn
from shared.actor import Call
from shared.errors import UserError
from shared.protocol import messages as m
from shared.units import HPAGE_PMD_NR, HPAGE_PMD_SHIFT, HPAGE_PMD_SIZE, PAGE_SHIFT

if TYPE_CHECKING:
    from remapd.remapper import Remapper

ROWS_PER_REQUEST = 65536
MAX_PROBLEMS = 50


def check(r: Remapper) -> Generator[Any, Any, dict[str, Any]]:
    """The ``client.check`` operation (see :class:`~shared.protocol.messages.Check`)."""
    if r.pending_calls():
        raise UserError("EAGAIN", "remapd has requests to collapsed in flight: try again")
    problems: list[str] = []
    # pfn -> [ino, index, ptes, pmds, pins]
    rows: dict[int, list[int]] = {}
    local(r, problems, rows)
    ordered: list[tuple[int, int, int, int, int, int]] = [
        (pfn, row[0], row[1], row[2], row[3], row[4]) for pfn, row in sorted(rows.items())
    ]
    totals = (
        sum(row[3] for row in ordered),
        sum(row[4] for row in ordered),
        sum(row[5] for row in ordered),
    )
    writers = _writers(r)
    files = tuple((f.ino, f.gen, f.name, f.size, f.shmem, writers[f.ino]) for f in r.files.values())
    chunks = _chunks(ordered)
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        msg = m.Audit(r.new_req(), tuple(chunk), last, totals if last else (0, 0, 0), files if last else ())
        reply = yield Call(msg)
        if reply.busy:
            raise UserError("EAGAIN", "collapsed has a collapse in flight: try again")
        problems.extend(reply.problems)
    return {"ok": not problems, "problems": problems[:MAX_PROBLEMS], "pages": len(ordered), "files": len(files)}


Row = tuple[int, int, int, int, int, int]


def _chunks(rows: list[Row]) -> list[list[Row]]:
    """At most ROWS_PER_REQUEST rows each, never splitting a 2 MiB block (a THP's subpages and
    its head travel together); at least one, possibly empty, so the last one always goes."""
    out: list[list[Row]] = [[]]
    for row in rows:
        cur = out[-1]
        if len(cur) >= ROWS_PER_REQUEST and cur[-1][0] // HPAGE_PMD_NR != row[0] // HPAGE_PMD_NR:
            out.append(cur := [])
        cur.append(row)
    return out


def _writers(r: Remapper) -> Counter[int]:
    """i_writecount as remapd's shared writable mappings of regular files make it."""
    writers: Counter[int] = Counter()
    for mm in r.mms.values():
        for vma in mm.vmas:
            f = r.files.get(vma.ino)
            if vma.writes_file and f is not None and not f.shmem:
                writers[vma.ino] += 1
    return writers


def local(r: Remapper, problems: list[str], rows: dict[int, list[int]]) -> None:
    """Check what remapd holds; collect the file pages it maps into ``rows``."""
    anon_maps: Counter[int] = Counter()

    def note(pfn: int, ino: int, index: int, kind: int) -> None:
        row = rows.get(pfn)
        if row is None:
            row = rows[pfn] = [ino, index, 0, 0, 0]
        elif (row[0], row[1]) != (ino, index):
            problems.append(f"pfn {pfn} is mapped as ino {ino} index {index} and as ino {row[0]} index {row[1]}")
        row[2 + kind] += 1

    for pid, mm in r.mms.items():
        prev = None
        for vma in mm.vmas:
            if prev is not None and prev.end > vma.start:
                problems.append(f"pid {pid}: {prev} overlaps {vma}")
            if r.files.i_mmap.get(vma.ino, {}).get(id(vma)) != (mm, vma):
                problems.append(f"pid {pid}: {vma} missing from the file rmap")
            if vma.ino not in r.files:
                problems.append(f"pid {pid}: {vma} maps an unknown file")
            prev = vma
        rss: Counter[str] = Counter()
        tables = 0
        for pidx, entry in mm.pmds.items():
            base = pidx << HPAGE_PMD_SHIFT
            if isinstance(entry, int):
                pmd_vma = mm.find_vma(base)
                if pmd_vma is None or pmd_vma.end < base + HPAGE_PMD_SIZE:
                    problems.append(f"pid {pid}: PMD at {base:#x} outside a VMA")
                    continue
                note(pte_pfn(entry), pmd_vma.ino, pmd_vma.pgoff_at(base), 1)
                rss["MM_SHMEMPAGES" if entry & PTE_SHMEM else "MM_FILEPAGES"] += HPAGE_PMD_NR
                continue
            if not isinstance(entry, PteTable):
                problems.append(f"pid {pid}: PMD slot {pidx:#x} holds {entry!r}")
                continue
            tables += 1
            nr = foreign = 0
            for slot, pte in entry.present():
                nr += 1
                foreign += not pte_belongs(pte, slot)
                addr = base + (slot << PAGE_SHIFT)
                pte_vma = mm.find_vma(addr)
                if pte_vma is None:
                    problems.append(f"pid {pid}: PTE at {addr:#x} outside any VMA")
                    continue
                if pte & PTE_ANON:
                    anon_maps[pte_pfn(pte)] += 1
                    rss["MM_ANONPAGES"] += 1
                    continue
                note(pte_pfn(pte), pte_vma.ino, pte_vma.pgoff_at(addr), 0)
                rss["MM_SHMEMPAGES" if pte & PTE_SHMEM else "MM_FILEPAGES"] += 1
            if (nr, foreign) != (entry.nr, entry.nr_foreign):
                problems.append(f"pid {pid}: table {pidx:#x} counts {entry.nr}/{entry.nr_foreign}, holds {nr}/{foreign}")
            if entry.mark != ((pid, pidx) in r.marked) or (entry.mark and foreign):
                problems.append(f"pid {pid}: table {pidx:#x} mark wrong")
        if tables != mm.nr_ptes:
            problems.append(f"pid {pid}: nr_ptes {mm.nr_ptes}, {tables} tables")
        for key, value in mm.rss.items():
            if value != rss[key]:
                problems.append(f"pid {pid}: {key} {value}, {rss[key]} mapped")
        for addr, pfns in mm.pins.items():
            pin_vma = mm.find_vma(addr)
            for pfn in pfns:
                if pfn >= ANON_PFN_BASE:
                    continue
                if pin_vma is None:
                    problems.append(f"pid {pid}: a pin at {addr:#x} outside any VMA")
                    continue
                note(pfn, pin_vma.ino, pin_vma.pgoff_at(addr), 2)
    if dict(anon_maps) != {p: n for p, n in r.anon.mapcount.items() if n}:
        problems.append("anon mapcounts disagree with the page tables")
    for pid, pidx in r.marked:
        marked_mm = r.mms.get(pid)
        if marked_mm is None or not isinstance(marked_mm.pmds.get(pidx), PteTable):
            problems.append(f"mark ({pid}, {pidx:#x}) without a table")


__all__ = ["ROWS_PER_REQUEST", "check", "local"]
