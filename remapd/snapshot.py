"""The remapper's model state as a snapshot (plain msgpack data, page tables as bytes), a new
remapper built from one, and the revalidation of its file mappings.

Saved: the knobs (remapd owns them), vmstat and the retry policies' counters, the file mirror
(with each file's identity and the open files' count), the processes with their VMAs (flags,
anon_vma and open file identities), open-file tables, page tables, pins, the mm-slot policy's
queue and the per-PMD marks, anon pages and uprobes. Not saved: tasks (a fault, an
mmap lock held by an application thread) and the collapser's accounting of our mappings.

A file page a restored page table maps, or a restored pin holds, is not trusted: the collapser
may have restarted (or been restored from an older snapshot) since, and its page at that pfn may
be another page, or free. The restored remapper keeps them aside and, at its first resync, names
them to the collapser (``Remap``: pfn, file, index, kind); the collapser accounts each that is
still the page cached there, as a fault's lookup would, and answers which. The accepted ones are
installed if their VMA still maps that page and the slot is still empty (else handed back, as a
fault that lost a race hands its page back); the others are dropped, to be faulted in again.
"""

from __future__ import annotations

from array import array
from collections.abc import Generator, Iterable, Mapping
from typing import Any

from remapd.mm import (
    ANON_PFN_BASE,
    PTE_ANON,
    PTE_DIRTY,
    PTE_SHMEM,
    PTE_WRITE,
    VM_MADV_FLAGS,
    Mm,
    PteTable,
    Vma,
    pte_pfn,
)
from remapd.remapper import Remapper
from shared.actor import Call
from shared.knobs import KnobError, Knobs
from shared.persist import SnapshotError
from shared.protocol import messages as m
from shared.units import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SHIFT,
    HPAGE_PMD_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
)

DAEMON = "remapd"
PTE, PMD, PIN = 0, 1, 2
# Rows per Remap request: the frame limits of the peer link (as RmapDelta's).
ROWS_PER_REQUEST = 65536


class Restored:
    """A file mapping or pin of the snapshot, waiting to be revalidated."""

    __slots__ = ("addr", "entry", "index", "ino", "kind", "pfn", "pid")

    def __init__(self, pid: int, addr: int, kind: int, pfn: int, entry: int, ino: int, index: int):
        self.pid = pid
        self.addr = addr
        self.kind = kind
        self.pfn = pfn
        self.entry = entry  # the PTE or PMD value (0 for a pin)
        self.ino = ino
        self.index = index


def snapshot(r: Remapper) -> dict[str, Any]:
    """Everything :func:`restore` needs, as plain data (safe to encode in another thread)."""
    return {
        "knobs": r.knobs.writable_items(),
        "vm": dict(r.vm),
        "stats": dict(r.khugepaged.stats),
        "files": [[f.ino, f.gen, f.name, f.size, f.shmem] for f in r.files.values()],
        "opens": r.files.opens,
        "anon": {
            "mapcount": [[p, n] for p, n in r.anon.mapcount.items()],
            "pins": [[p, n] for p, n in r.anon.pins.items()],
            "next": r.anon._next_pfn,
        },
        "probes": sorted([ino, index] for ino, index in r.uprobes.probes),
        "marked": sorted([pid, pidx] for pid, pidx in r.marked),
        "mms": [
            {
                "pid": mm.pid,
                "vmas": [
                    [
                        v.start, v.end, v.pgoff, v.ino, v.prot, v.shared, v.hugepage, v.nohugepage,
                        v.anon_vma, v.fork_child, v.file, v.account, v.locked, v.lockonfault, v.flags,
                    ]
                    for v in mm.vmas
                ],
                "anon_vmas": mm.anon_vmas,
                "fdtable": [[ino, file] for ino, file in mm.fdtable.items()],
                "unmerged": sorted(mm.unmerged),
                "tables": [[pidx, e.ptes.tobytes()] for pidx, e in mm.pmds.items() if isinstance(e, PteTable)],
                "pmds": [[pidx, e] for pidx, e in mm.pmds.items() if isinstance(e, int)],
                "pte_mapped_thp": list(mm.pte_mapped_thp),
                "pins": [[addr, list(pfns)] for addr, pfns in mm.pins.items()],
            }
            for mm in r.mms.values()
            if not mm.exiting
        ],
    }


def restore(state: Mapping[str, Any], knobs: Knobs | None = None, keep: Iterable[str] = ()) -> Remapper:
    """A new remapper holding ``state``'s world, its file mappings waiting for revalidation at
    the first resync. ``knobs``/``keep`` as :func:`collapsed.snapshot.restore`.

    Errors:
        SnapshotError: the state is malformed or contradicts itself.
    """
    try:
        return _restore(state, knobs or Knobs(), set(keep))
    except SnapshotError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, AttributeError, AssertionError) as err:
        raise SnapshotError(f"{DAEMON} snapshot: malformed ({type(err).__name__}: {err})") from None


def _restore(state: Mapping[str, Any], given: Knobs, keep: set[str]) -> Remapper:
    knobs = Knobs()
    try:
        for name, value in state["knobs"].items():
            knobs.set(name, str(value))
    except KnobError as err:
        raise SnapshotError(f"{DAEMON} snapshot: bad knob ({err})") from None
    for name in keep:
        knobs.set(name, str(given.get(name)))
    r = Remapper(knobs)
    r.files.opens = int(state["opens"])
    for ino, gen, name, size, shmem in state["files"]:
        r.files.file_info(m.FileInfo(int(ino), str(name), int(size), bool(shmem), int(gen)))
    anon = state["anon"]
    r.anon._next_pfn = int(anon["next"])
    r.anon.pins = {int(p): int(n) for p, n in anon["pins"] if n}
    anon_maps: dict[int, int] = {}
    restored: list[Restored] = []
    for saved in state["mms"]:
        pid = int(saved["pid"])
        if pid in r.mms:
            raise SnapshotError(f"{DAEMON} snapshot: process {pid} twice")
        mm = r.mms[pid] = Mm(pid)
        mm.anon_vmas = int(saved["anon_vmas"])
        mm.fdtable = {int(ino): int(file) for ino, file in saved["fdtable"]}
        mm.unmerged = {int(addr) for addr in saved["unmerged"]}
        for row in saved["vmas"]:
            start, end, pgoff, ino, prot, shared, hugepage, nohugepage, anon_vma = row[:9]
            # flags (madvise's other vm_flags) came later: a snapshot without them has none set.
            fork_child, file, account, locked, lockonfault, *rest = row[9:]
            flags = int(rest[0]) if rest else 0
            if int(ino) not in r.files or not 0 <= start < end or start % PAGE_SIZE or end % PAGE_SIZE:
                raise SnapshotError(f"{DAEMON} snapshot: process {pid}: bad VMA {start:#x}-{end:#x}")
            if mm.overlapping(start, end):
                raise SnapshotError(f"{DAEMON} snapshot: process {pid}: overlapping VMAs at {start:#x}")
            if flags & ~VM_MADV_FLAGS or len(rest) > 1:
                raise SnapshotError(f"{DAEMON} snapshot: process {pid}: VMA {start:#x} has unknown flags")
            if anon_vma is not None and not 0 < anon_vma <= mm.anon_vmas or not 0 <= file <= r.files.opens:
                raise SnapshotError(f"{DAEMON} snapshot: process {pid}: VMA {start:#x} names an anon_vma or file never made")
            vma = Vma(
                start, end, pgoff, ino, prot, bool(shared), bool(hugepage), bool(nohugepage),
                None if anon_vma is None else int(anon_vma), bool(fork_child), int(file), bool(account),
                bool(locked), bool(lockonfault), flags,
            )
            mm.insert_vma(vma)
            r.files.i_mmap_insert(mm, vma)
        for pidx, data in saved["tables"]:
            ptes = array("Q")
            ptes.frombytes(data)
            if len(ptes) != HPAGE_PMD_NR:
                raise SnapshotError(f"{DAEMON} snapshot: process {pid}: a page table of {len(ptes)} entries")
            for slot, pte in enumerate(ptes):
                if not pte:
                    continue
                addr = (int(pidx) << HPAGE_PMD_SHIFT) + (slot << PAGE_SHIFT)
                vma = _vma_at(mm, addr)
                if pte & PTE_ANON:
                    r.pagetables.set_pte_at(mm, int(pidx), slot, pte)
                    anon_maps[pte_pfn(pte)] = anon_maps.get(pte_pfn(pte), 0) + 1
                else:
                    restored.append(Restored(pid, addr, PTE, pte_pfn(pte), pte, vma.ino, vma.pgoff_at(addr)))
        for pidx, entry in saved["pmds"]:
            addr = int(pidx) << HPAGE_PMD_SHIFT
            vma = _vma_at(mm, addr)
            restored.append(Restored(pid, addr, PMD, pte_pfn(entry), int(entry), vma.ino, vma.pgoff_at(addr)))
        mm.pte_mapped_thp = [int(a) for a in saved["pte_mapped_thp"]]
        for addr, pfns in saved["pins"]:
            for pfn in pfns:
                if pfn >= ANON_PFN_BASE:
                    mm.pins.setdefault(int(addr), []).append(int(pfn))
                else:
                    vma = _vma_at(mm, int(addr))
                    restored.append(Restored(pid, int(addr), PIN, int(pfn), 0, vma.ino, vma.pgoff_at(int(addr))))
    # Anon pages: what the restored tables map, plus the pinned.
    r.anon.mapcount = {p: n for p, n in anon_maps.items()}
    for pfn in r.anon.pins:
        r.anon.mapcount.setdefault(pfn, 0)
    saved_maps = {int(p): int(n) for p, n in anon["mapcount"] if n}
    if saved_maps != {p: n for p, n in r.anon.mapcount.items() if n}:
        raise SnapshotError(f"{DAEMON} snapshot: anon page mapcounts disagree with the page tables")
    # Marks: the tables that hold no file page until revalidation carry none yet.
    marks = {(int(pid), int(pidx)) for pid, pidx in state["marked"]}
    _reconcile_marks(r, r.mms.values(), marks)
    r.uprobes.probes = {(int(ino), int(index)) for ino, index in state["probes"]}
    r.vm.update({k: int(v) for k, v in state["vm"].items()})
    r.khugepaged.stats.update({k: int(v) for k, v in state["stats"].items()})
    r.after_restore = lambda: revalidate(r, restored, marks)
    return r


def _vma_at(mm: Mm, addr: int) -> Vma:
    vma = mm.find_vma(addr)
    if vma is None:
        raise SnapshotError(f"{DAEMON} snapshot: process {mm.pid} maps {addr:#x} outside any VMA")
    return vma


def revalidate(r: Remapper, rows: list[Restored], marks: set[tuple[int, int]]) -> Generator[Any, Any, None]:
    """Name ``rows`` to the collapser; install those it accounted that still fit, hand back the
    others it accounted (the task :meth:`Remapper.resync` starts after a restore)."""
    accepted: list[Restored] = []
    for i in range(0, len(rows), ROWS_PER_REQUEST):
        chunk = rows[i : i + ROWS_PER_REQUEST]
        reply = yield Call(m.Remap(r.new_req(), tuple((row.pfn, row.ino, row.index, row.kind) for row in chunk)))
        accepted.extend(row for row, ok in zip(chunk, reply.accepted) if ok)
    by_pid: dict[int, list[Restored]] = {}
    for row in accepted:
        by_pid.setdefault(row.pid, []).append(row)
    for pid, mine in by_pid.items():
        mm = r.mms.get(pid)
        # Under the mmap read lock, as a fault maps what its lookup found; and like a fault, not
        # by waiting for it while holding what the collapser accounted: a busy process (an
        # application thread holds its lock for writing) gets those pages by faulting them.
        if mm is None or mm.exiting or not mm.lock.try_read():
            for row in mine:
                _hand_back(r, row)
            continue
        try:
            for row in mine:
                if not _install(r, mm, row):
                    _hand_back(r, row)
            _reconcile_marks(r, [mm], marks)
        finally:
            r.locks.mmap_read_unlock(mm)
    r.flush()


def _install(r: Remapper, mm: Mm, row: Restored) -> bool:
    vma = mm.find_vma(row.addr)
    if vma is None or vma.ino != row.ino or vma.pgoff_at(row.addr) != row.index:
        return False
    pidx = row.addr >> HPAGE_PMD_SHIFT
    entry = mm.pmds.get(pidx)
    if row.kind == PIN:
        mm.pins.setdefault(row.addr, []).append(row.pfn)
        return True
    if row.kind == PMD:
        if entry is not None or not vma.pmd_suitable(row.addr) or vma.nohugepage or row.addr % HPAGE_PMD_SIZE:
            return False
        mm.pmds[pidx] = row.entry
        mm.rss["MM_SHMEMPAGES" if row.entry & PTE_SHMEM else "MM_FILEPAGES"] += HPAGE_PMD_NR
        return True
    slot = (row.addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)
    if isinstance(entry, int) or (entry is not None and entry.ptes[slot]):
        return False
    pte = row.entry
    if not pte & PTE_SHMEM:
        # Writeback may have cleaned the page since the snapshot (folio_mkclean would have
        # write-protected this PTE): a regular file's PTE comes back clean and read-only, and
        # the next write faults (wp_page_shared) and dirties the page again.
        pte &= ~(PTE_WRITE | PTE_DIRTY)
    r.pagetables.set_pte_at(mm, pidx, slot, pte)
    return True


def _hand_back(r: Remapper, row: Restored) -> None:
    if row.kind == PTE:
        r.rmap.add(row.pfn, pte=-1)
    elif row.kind == PMD:
        r.rmap.add(row.pfn, pmd=-1)
    else:
        r.rmap.add(row.pfn, pin=-1)


def _reconcile_marks(r: Remapper, mms: Iterable[Mm], marks: set[tuple[int, int]]) -> None:
    """Marks as the snapshot had them, where the table is there and holds nothing foreign."""
    pt = r.pagetables
    for mm in mms:
        for pidx, entry in mm.pmds.items():
            if not isinstance(entry, PteTable):
                continue
            want = (mm.pid, pidx) in marks and not entry.nr_foreign
            if want and not entry.mark:
                pt.set_mark(mm, pidx, entry, "restored")
            elif not want and entry.mark:
                pt.clear_mark(mm, pidx, entry, "restored")


__all__ = ["DAEMON", "ROWS_PER_REQUEST", "Restored", "restore", "revalidate", "snapshot"]
