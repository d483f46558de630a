"""The remapper actor's core: processes, VMAs, page tables, faults, and khugepaged's second half
(``retract_page_tables``, ``collapse_pte_mapped_thp``, the retry policies, uprobes, MADV_COLLAPSE).

Sans-IO: see :mod:`shared.actor`. Operations that may wait (for the mmap lock, for the page cache)
are generators; the shell or the in-process world spawns them and gets their result.
"""

from __future__ import annotations

from collections import Counter
import bisect
from collections.abc import Generator
from typing import Any

from remapd.mm import (
    ANON_PFN_BASE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    PTE_ANON,
    PTE_SHMEM,
    PTE_THP,
    PTE_WRITE,
    Mm,
    PteTable,
    Vma,
    pte_belongs,
    pte_make,
    pte_pfn,
)
from shared import messages as m
from shared.actor import Actor, Call, Sleep, Wait
from shared.errors import UserError
from shared.knobs import Knobs
from shared.logs import get_logger
from shared.message import Message
from shared.scan_result import ScanResult as R
from shared.units import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SHIFT,
    HPAGE_PMD_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    TASK_SIZE,
)

log = get_logger("remapd")

# v5.4's per-mm array of pte-mapped THP addresses (mm-slot policy).
MAX_PTE_MAPPED_THP = 8
# Where mmap(NULL, ...) starts looking for room, top-down (x86-64 mmap_base, roughly).
MMAP_BASE = 0x7F0000000000
MMAP_MIN_ADDR = 0x10000
PID_MAX = 4194304

VM_EVENTS = ("pgfault", "thp_file_mapped", "thp_split_pmd", "cow_fault")

PROTS = {"r": PROT_READ, "rw": PROT_READ | PROT_WRITE, "rx": PROT_READ | PROT_EXEC, "rwx": 7}


class FileMirror:
    """What the remapper knows of a file: the collapser's FileInfo notices."""

    __slots__ = ("ino", "name", "size", "shmem")

    def __init__(self, ino: int, name: str, size: int, shmem: bool):
        self.ino = ino
        self.name = name
        self.size = size
        self.shmem = shmem


class Remapper(Actor):
    """Owns processes and page tables. Peer messages go in through :meth:`deliver`."""

    def __init__(self, knobs: Knobs | None = None, start_threads: bool = True):
        super().__init__()
        self.knobs = knobs or Knobs()
        self.mms: dict[int, Mm] = {}
        self.files: dict[int, FileMirror] = {}
        self.by_name: dict[str, FileMirror] = {}
        self.i_mmap: dict[int, dict[int, tuple[Mm, Vma]]] = {}
        self.anon: dict[int, int] = {}  # anon pfn -> mapcount
        self.anon_pins: dict[int, int] = {}
        self._next_anon = ANON_PFN_BASE
        self.marked: set[tuple[int, int]] = set()  # (pid, pmd index) of marked PTE tables
        self.uprobes: set[tuple[int, int]] = set()  # (ino, page index)
        self.vm: Counter[str] = Counter({name: 0 for name in VM_EVENTS})
        self.stats: Counter[str] = Counter()
        self._rows: list[tuple[int, int, int, int]] = []
        if start_threads:
            self.spawn(self._remap_thread(), name="remap")

    # -- outbox: rmap rows always travel ahead of whatever is sent next ------------------------

    def send(self, msg: Message) -> None:
        self.flush()
        self.outbox.append(msg)

    def flush(self) -> None:
        if self._rows:
            self.outbox.append(m.RmapDelta(tuple(self._rows)))
            self._rows = []

    def _row(self, pfn: int, pte: int = 0, pmd: int = 0, pin: int = 0) -> None:
        self._rows.append((pfn, pte, pmd, pin))

    # -- peer messages ------------------------------------------------------------------------

    def deliver(self, msg: Message) -> None:
        if isinstance(msg, m.FileInfo):
            self._file_info(msg)
        elif isinstance(msg, m.UnmapMapping):
            self._unmap_mapping(msg)
            self.send(m.Unmapped(msg.req))
        elif isinstance(msg, m.Retract):
            self.send(self.retract_page_tables(msg))
        elif isinstance(msg, m.CollapsePteMapped):
            self.spawn(self._collapse_pte_mapped_request(msg), name="collapse_pte_mapped")
        elif isinstance(msg, m.VisitMm):
            self.spawn(self._visit_mm(msg), name="visit_mm")
        elif isinstance(msg, m.KnobsChanged):
            for name, value in msg.values.items():
                self.knobs.set(name, str(value))
            self.notify("remap_wake")
        elif hasattr(msg, "req"):
            self.deliver_reply(msg.req, msg)  # type: ignore[attr-defined]
        self.flush()

    def _file_info(self, msg: m.FileInfo) -> None:
        f = self.files.get(msg.ino)
        if f is None:
            f = self.files[msg.ino] = FileMirror(msg.ino, msg.name, msg.size, msg.shmem)
            self.by_name[msg.name] = f
        f.size = msg.size

    # -- losing and regaining the peer --------------------------------------------------------

    def peer_lost(self) -> None:
        """The collapser is gone, and its page cache with it: every file page mapping and pin
        goes (anon pages stay), waiting faults fail with SIGBUS, nothing queued for it is sent."""
        for mm in self.mms.values():
            for pidx, entry in list(mm.pmds.items()):
                if isinstance(entry, int):
                    self._zap_pmd(mm, pidx, split=False)
                    continue
                for slot, pte in list(entry.present()):
                    if not pte & PTE_ANON:
                        self._zap_pte(mm, entry, slot)
            for page, pfns in list(mm.pins.items()):
                kept = [p for p in pfns if p >= ANON_PFN_BASE]
                if kept:
                    mm.pins[page] = kept
                else:
                    del mm.pins[page]
        self._rows.clear()
        self.fail_calls(_answer_for_lost_peer)
        self._rows.clear()
        self.outbox.clear()

    def resync(self) -> None:
        """A collapser (new or back) is connected: name every file we know (a restarted collapser
        recreates them), and re-register every mapping's write open and khugepaged range."""
        for f in self.files.values():
            self.send(m.FileInfo(f.ino, f.name, f.size, f.shmem))
        for mm in self.mms.values():
            for vma in mm.vmas:
                f = self.files.get(vma.ino)
                if vma.writes_file and f is not None and not f.shmem:
                    self.send(m.WriteOpen(vma.ino, 1))
                if self._khugepaged_suitable(vma):
                    self.send(
                        m.RegisterRange(mm.pid, vma.start, vma.end, vma.ino, vma.pgoff, vma.hugepage, vma.nohugepage)
                    )

    # -- lookups ------------------------------------------------------------------------------

    def mm(self, pid: int) -> Mm:
        mm = self.mms.get(pid)
        if mm is None or mm.exiting:
            raise UserError("ESRCH", f"no process {pid}")
        return mm

    def file(self, name: str) -> FileMirror:
        f = self.by_name.get(name)
        if f is None:
            raise UserError("ENOENT", f"no file {name!r}")
        return f

    # -- mmap lock ----------------------------------------------------------------------------

    def lock_read(self, mm: Mm) -> Generator[Any, Any, None]:
        """mmap_read_lock; fails with ESRCH if the process exits while we wait."""
        while not mm.lock.try_read():
            yield Wait(("mmap", mm.pid))
        if mm.exiting:
            self.unlock_read(mm)
            raise UserError("ESRCH", f"process {mm.pid} exited")

    def lock_write(self, mm: Mm) -> Generator[Any, Any, None]:
        """mmap_write_lock; fails with ESRCH if the process exits while we wait."""
        while not mm.lock.try_write():
            yield Wait(("mmap", mm.pid))
        if mm.exiting:
            self.unlock_write(mm)
            raise UserError("ESRCH", f"process {mm.pid} exited")

    def unlock_read(self, mm: Mm) -> None:
        mm.lock.readers -= 1
        if not mm.lock.readers:
            self.notify(("mmap", mm.pid))

    def unlock_write(self, mm: Mm) -> None:
        mm.lock.writer = False
        self.notify(("mmap", mm.pid))

    def hold_lock(self, pid: int, hold_ms: float, write: bool) -> Generator[Any, Any, dict[str, Any]]:
        """An application thread takes the mmap lock and keeps it for ``hold_ms`` of model time."""
        mm = self.mm(pid)
        if hold_ms < 0:
            raise UserError("EINVAL", "hold time must not be negative")
        yield from (self.lock_write(mm) if write else self.lock_read(mm))
        until = self.now + hold_ms
        self.spawn(self._release_later(mm, until, write), name="lock_hold")
        return {"pid": pid, "mode": "write" if write else "read", "until_ms": until}

    def _release_later(self, mm: Mm, until: float, write: bool) -> Generator[Any, Any, None]:
        yield Sleep(until)
        if write:
            self.unlock_write(mm)
        else:
            self.unlock_read(mm)

    # -- rmap and page-table primitives -------------------------------------------------------

    def _rss_key(self, pte: int) -> str:
        if pte & PTE_ANON:
            return "MM_ANONPAGES"
        return "MM_SHMEMPAGES" if pte & PTE_SHMEM else "MM_FILEPAGES"

    def _table(self, mm: Mm, pidx: int) -> PteTable:
        """pte_alloc: the PTE table at ``pidx``, allocated if the PMD is none."""
        entry = mm.pmds.get(pidx)
        if entry is None:
            entry = mm.pmds[pidx] = PteTable()
            mm.nr_ptes += 1
        assert isinstance(entry, PteTable)
        return entry

    def _free_table(self, mm: Mm, pidx: int) -> None:
        del mm.pmds[pidx]
        mm.nr_ptes -= 1
        self.marked.discard((mm.pid, pidx))

    def _set_pte(self, mm: Mm, pidx: int, slot: int, pte: int) -> None:
        """Install a PTE (the page's reference and mapcount are already accounted) and keep the
        per-PMD mark: set by a subpage that belongs, cleared by anything foreign."""
        table = self._table(mm, pidx)
        table.set(slot, pte)
        mm.rss[self._rss_key(pte)] += 1
        if pte_belongs(pte, slot):
            if not table.nr_foreign and not table.mark:
                table.mark = True
                self.marked.add((mm.pid, pidx))
                log.debug("mark_set", pid=mm.pid, addr=hex(pidx << HPAGE_PMD_SHIFT), why="fault")
        elif table.mark:
            self._unmark(mm, pidx, table, "foreign")

    def _unmark(self, mm: Mm, pidx: int, table: PteTable, why: str) -> None:
        table.mark = False
        self.marked.discard((mm.pid, pidx))
        log.debug("mark_cleared", pid=mm.pid, addr=hex(pidx << HPAGE_PMD_SHIFT), why=why)

    def _zap_pte(self, mm: Mm, table: PteTable, slot: int) -> None:
        pte = table.ptes[slot]
        table.set(slot, 0)
        mm.rss[self._rss_key(pte)] -= 1
        pfn = pte_pfn(pte)
        if pte & PTE_ANON:
            self._anon_put(pfn)
        else:
            self._row(pfn, pte=-1)

    def _zap_pmd(self, mm: Mm, pidx: int, split: bool) -> None:
        entry = mm.pmds.pop(pidx)
        assert isinstance(entry, int)
        rss = "MM_SHMEMPAGES" if entry & PTE_SHMEM else "MM_FILEPAGES"
        mm.rss[rss] -= HPAGE_PMD_NR
        self._row(pte_pfn(entry), pmd=-1)
        if split:
            # __split_huge_pmd on a file THP just clears the PMD; the range refaults as PTEs.
            self.vm["thp_split_pmd"] += 1

    def _install_pmd(self, mm: Mm, pidx: int, head: int, shmem: bool, accounted: bool) -> None:
        """do_set_pmd: map the PMD-order folio ``head`` with one PMD entry."""
        mm.pmds[pidx] = pte_make(head, PTE_SHMEM if shmem else 0)
        mm.rss["MM_SHMEMPAGES" if shmem else "MM_FILEPAGES"] += HPAGE_PMD_NR
        if not accounted:
            self._row(head, pmd=1)
        self.vm["thp_file_mapped"] += 1
        log.debug("pmd_install", pid=mm.pid, addr=hex(pidx << HPAGE_PMD_SHIFT), pfn=head)

    def _anon_new(self) -> int:
        pfn = self._next_anon
        self._next_anon += 1
        self.anon[pfn] = 0
        return pfn

    def _anon_map(self, pfn: int) -> None:
        self.anon[pfn] += 1

    def _anon_put(self, pfn: int) -> None:
        self.anon[pfn] -= 1
        if self.anon[pfn] == 0 and not self.anon_pins.get(pfn):
            del self.anon[pfn]

    def _pidx_range(self, mm: Mm, start: int, end: int) -> list[int]:
        lo, hi = start >> HPAGE_PMD_SHIFT, (end - 1) >> HPAGE_PMD_SHIFT
        if hi - lo + 1 > len(mm.pmds):
            return sorted(p for p in mm.pmds if lo <= p <= hi)
        return [p for p in range(lo, hi + 1) if p in mm.pmds]

    def zap_range(
        self, mm: Mm, start: int, end: int, anon: bool = True, pfns: set[int] | None = None
    ) -> None:
        """zap_page_range: clear PTEs and PMDs in [start, end). A PMD cut by the range is split."""
        for pidx in self._pidx_range(mm, start, end):
            entry = mm.pmds[pidx]
            base = pidx << HPAGE_PMD_SHIFT
            if isinstance(entry, int):
                if pfns is None:
                    self._zap_pmd(mm, pidx, split=not (start <= base and base + HPAGE_PMD_SIZE <= end))
                continue
            lo = max(start, base)
            hi = min(end, base + HPAGE_PMD_SIZE)
            for slot in range((lo - base) >> PAGE_SHIFT, (hi - base) >> PAGE_SHIFT):
                pte = entry.ptes[slot]
                if not pte or (pte & PTE_ANON and not anon):
                    continue
                if pfns is not None and pte_pfn(pte) not in pfns:
                    continue
                self._zap_pte(mm, entry, slot)

    def free_pgtables(self, mm: Mm, start: int, end: int) -> None:
        """Free PTE tables no VMA overlaps any more (after munmap)."""
        for pidx in self._pidx_range(mm, start, end):
            base = pidx << HPAGE_PMD_SHIFT
            if not mm.overlapping(base, base + HPAGE_PMD_SIZE):
                entry = mm.pmds[pidx]
                if isinstance(entry, PteTable):
                    for slot, _ in list(entry.present()):
                        self._zap_pte(mm, entry, slot)
                    self._free_table(mm, pidx)
                else:
                    self._zap_pmd(mm, pidx, split=False)

    # -- VMA bookkeeping (link/unlink/split/merge) --------------------------------------------

    def _link(self, mm: Mm, vma: Vma) -> None:
        mm.insert_vma(vma)
        self.i_mmap.setdefault(vma.ino, {})[id(vma)] = (mm, vma)
        f = self.files.get(vma.ino)
        if vma.writes_file and f is not None and not f.shmem:
            self.send(m.WriteOpen(vma.ino, 1))
        if self._khugepaged_suitable(vma):
            self.send(m.RegisterRange(mm.pid, vma.start, vma.end, vma.ino, vma.pgoff, vma.hugepage, vma.nohugepage))

    def _unlink(self, mm: Mm, vma: Vma) -> None:
        mm.remove_vma(vma)
        del self.i_mmap[vma.ino][id(vma)]
        f = self.files.get(vma.ino)
        if vma.writes_file and f is not None and not f.shmem:
            self.send(m.WriteOpen(vma.ino, -1))
        if self._khugepaged_suitable(vma):
            self.send(m.UnregisterRange(mm.pid, vma.start))

    def _khugepaged_suitable(self, vma: Vma) -> bool:
        """What khugepaged_enter_vma needs on this side: not VM_NOHUGEPAGE, an aligned 2 MiB."""
        if vma.nohugepage:
            return False
        haddr = (vma.start + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1)
        return vma.pmd_suitable(haddr)

    def _split_at(self, mm: Mm, addr: int) -> None:
        """Split the VMA containing ``addr`` so that a VMA starts there (__split_vma). A PMD
        mapping across the new boundary is split first (vma_adjust_trans_huge)."""
        vma = mm.find_vma(addr)
        if vma is None or vma.start == addr:
            return
        entry = mm.pmds.get(addr >> HPAGE_PMD_SHIFT)
        if isinstance(entry, int) and addr & (HPAGE_PMD_SIZE - 1):
            self._zap_pmd(mm, addr >> HPAGE_PMD_SHIFT, split=True)
        self._unlink(mm, vma)
        self._link(mm, vma.copy(vma.start, addr))
        self._link(mm, vma.copy(addr, vma.end))

    def _merge_around(self, mm: Mm, start: int, end: int) -> None:
        """vma_merge: fold VMAs in [start, end] with identical, contiguous neighbours."""
        i = max(0, bisect.bisect_left(mm.starts, start) - 1)
        while i + 1 < len(mm.vmas):
            a, b = mm.vmas[i], mm.vmas[i + 1]
            if a.start > end:
                break
            if a.end == b.start and a.same_flags(b) and a.pgoff_at(a.end) == b.pgoff:
                merged = a.copy(a.start, b.end)
                merged.anon_vma = a.anon_vma or b.anon_vma
                self._unlink(mm, a)
                self._unlink(mm, b)
                self._link(mm, merged)
                continue
            i += 1

    # -- process lifecycle --------------------------------------------------------------------

    def spawn_process(self, pid: int) -> dict[str, Any]:
        if not 0 < pid < PID_MAX:
            raise UserError("EINVAL", f"pid {pid} out of range 1..{PID_MAX - 1}")
        if pid in self.mms:
            raise UserError("EEXIST", f"process {pid} exists")
        self.mms[pid] = Mm(pid)
        return {"pid": pid}

    def exit_process(self, pid: int) -> dict[str, Any]:
        """exit_mmap: release pins, zap everything, free page tables, drop the khugepaged slot."""
        mm = self.mm(pid)
        mm.exiting = True
        for pfns in mm.pins.values():
            for pfn in pfns:
                self._unpin(pfn)
        mm.pins.clear()
        for vma in list(mm.vmas):
            self.zap_range(mm, vma.start, vma.end)
            self._unlink(mm, vma)
        for pidx, entry in list(mm.pmds.items()):
            if isinstance(entry, PteTable):
                self._free_table(mm, pidx)
        self.send(m.MmExit(pid))
        del self.mms[pid]
        self.notify(("mmap", pid))
        return {"pid": pid}

    def fork(self, pid: int, child: int) -> Generator[Any, Any, dict[str, Any]]:
        """dup_mmap under the parent's mmap write lock: copy VMAs; page tables are copied only
        where the VMA has an anon_vma (vma_needs_copy), and file PMDs never are (copy_huge_pmd
        leaves them to refault)."""
        parent = self.mm(pid)
        yield from self.lock_write(parent)
        try:
            self.spawn_process(child)
            self._dup_mmap(parent, self.mms[child])
        finally:
            self.unlock_write(parent)
        return {"pid": child, "parent": pid}

    def _dup_mmap(self, parent: Mm, mm: Mm) -> None:
        for vma in parent.vmas:
            self._link(mm, vma.copy(vma.start, vma.end))
            if not vma.anon_vma:
                continue
            for pidx in self._pidx_range(parent, vma.start, vma.end):
                entry = parent.pmds[pidx]
                if not isinstance(entry, PteTable):
                    continue
                base = pidx << HPAGE_PMD_SHIFT
                for slot, pte in list(entry.present()):
                    addr = base + (slot << PAGE_SHIFT)
                    if not vma.start <= addr < vma.end:
                        continue
                    if pte & PTE_ANON and self.anon_pins.get(pte_pfn(pte)):
                        # copy_present_page: a pinned anon page stays the parent's alone (a
                        # later CoW must not move the parent off the page the pin holds).
                        new = self._anon_new()
                        self._anon_map(new)
                        pte = pte_make(new, PTE_ANON | (PTE_WRITE if vma.prot & PROT_WRITE else 0))
                    elif pte & PTE_ANON:
                        # Shared anon pages become copy-on-write in both.
                        pte &= ~PTE_WRITE
                        entry.ptes[slot] = pte
                        self._anon_map(pte_pfn(pte))
                    else:
                        self._row(pte_pfn(pte), pte=1)
                    self._set_pte(mm, pidx, slot, pte)

    # -- mmap / munmap / madvise --------------------------------------------------------------

    def mmap(
        self,
        pid: int,
        addr: int | None,
        length: int,
        name: str,
        offset: int = 0,
        prot: str = "r",
        shared: bool = True,
    ) -> Generator[Any, Any, dict[str, Any]]:
        mm = self.mm(pid)
        f = self.file(name)
        if prot not in PROTS:
            raise UserError("EINVAL", f"prot must be one of {', '.join(PROTS)}")
        if length <= 0:
            raise UserError("EINVAL", "length must be positive")
        if offset < 0 or offset % PAGE_SIZE:
            raise UserError("EINVAL", "offset must be a non-negative multiple of the page size")
        length = (length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        if addr is None:
            addr = self._get_unmapped_area(mm, length, offset >> PAGE_SHIFT)
        elif addr % PAGE_SIZE or addr < MMAP_MIN_ADDR or addr + length > TASK_SIZE:
            raise UserError("EINVAL", f"address {addr:#x} is not a page-aligned user address")
        yield from self.lock_write(mm)
        try:
            if mm.overlapping(addr, addr + length):
                self._do_munmap(mm, addr, addr + length)  # MAP_FIXED replaces what was there
            vma = Vma(addr, addr + length, offset >> PAGE_SHIFT, f.ino, PROTS[prot], shared)
            self._link(mm, vma)
            self._merge_around(mm, addr, addr + length)
            yield from self._uprobe_mmap(mm, vma)
        finally:
            self.unlock_write(mm)
        return {"addr": addr, "length": length}

    def _get_unmapped_area(self, mm: Mm, length: int, pgoff: int) -> int:
        """Top-down search; a mapping of 2 MiB or more is placed so that its file offset and
        its address agree modulo 2 MiB (thp_get_unmapped_area)."""
        align = length >= HPAGE_PMD_SIZE
        hi = MMAP_BASE
        for vma in reversed(mm.vmas):
            if vma.end > hi:
                hi = min(hi, vma.start)
                continue
            candidate = self._place(hi - length, pgoff, align)
            if candidate >= vma.end:
                return candidate
            hi = vma.start
        candidate = self._place(hi - length, pgoff, align)
        if candidate >= MMAP_MIN_ADDR:
            return candidate
        raise UserError("ENOMEM", "no room for the mapping")

    @staticmethod
    def _place(addr: int, pgoff: int, align: bool) -> int:
        addr &= ~(PAGE_SIZE - 1)
        if align:
            want = (pgoff << PAGE_SHIFT) & (HPAGE_PMD_SIZE - 1)
            addr = ((addr - want) & ~(HPAGE_PMD_SIZE - 1)) + want
        return addr

    def munmap(self, pid: int, addr: int, length: int) -> Generator[Any, Any, dict[str, Any]]:
        mm = self.mm(pid)
        if addr % PAGE_SIZE or length <= 0 or addr + length > TASK_SIZE:
            raise UserError("EINVAL", "munmap needs a page-aligned address and a positive length")
        end = addr + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        yield from self.lock_write(mm)
        try:
            self._do_munmap(mm, addr, end)
        finally:
            self.unlock_write(mm)
        return {"addr": addr, "length": end - addr}

    def _do_munmap(self, mm: Mm, start: int, end: int) -> None:
        self._split_at(mm, start)
        self._split_at(mm, end)
        for vma in mm.overlapping(start, end):
            self._unpin_range(mm, vma.start, vma.end)
            self.zap_range(mm, vma.start, vma.end)
            self._unlink(mm, vma)
        self.free_pgtables(mm, start, end)

    def madvise(self, pid: int, addr: int, length: int, advice: str) -> Generator[Any, Any, dict[str, Any]]:
        mm = self.mm(pid)
        if advice not in _ADVICE:
            raise UserError("EINVAL", f"unknown advice {advice!r}")
        if addr % PAGE_SIZE or length < 0:
            raise UserError("EINVAL", "madvise needs a page-aligned address")
        end = addr + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        if end == addr:
            return {"result": 0}
        if advice == "collapse":
            from remapd.collapse import madvise_collapse

            result = yield from madvise_collapse(self, mm, addr, end)
            return {"result": result}
        covered = mm.overlapping(addr, end)
        unmapped = sum(min(v.end, end) - max(v.start, addr) for v in covered) != end - addr
        if advice in ("hugepage", "nohugepage"):
            yield from self.lock_write(mm)
            try:
                self._split_at(mm, addr)
                self._split_at(mm, end)
                for vma in mm.overlapping(addr, end):
                    new = vma.copy(vma.start, vma.end)
                    new.hugepage = advice == "hugepage"
                    new.nohugepage = advice == "nohugepage"
                    self._unlink(mm, vma)
                    self._link(mm, new)
                self._merge_around(mm, addr, end)
            finally:
                self.unlock_write(mm)
        elif advice == "dontneed":
            yield from self.lock_read(mm)
            try:
                for vma in covered:
                    self.zap_range(mm, max(vma.start, addr), min(vma.end, end))
            finally:
                self.unlock_read(mm)
        elif advice == "pageout":
            yield from self.lock_read(mm)
            try:
                self._pageout(mm, addr, end)
            finally:
                self.unlock_read(mm)
        else:
            # madvise_populate, as observed on 6.18: it stops at the first hole (ENOMEM) or VMA
            # whose protection refuses the access (EINVAL), keeping what it populated before.
            write = advice == "populate_write"
            page = addr
            while page < end:
                vma = mm.find_vma(page)
                if vma is None:
                    return {"result": "ENOMEM"}
                if (write and not vma.prot & PROT_WRITE) or not vma.prot & PROT_READ:
                    return {"result": "EINVAL"}
                outcome = yield from self.fault(pid, page, write)
                if outcome["result"] in ("sigsegv", "sigbus"):
                    return {"result": "EFAULT"}
                if isinstance(mm.pmds.get(page >> HPAGE_PMD_SHIFT), int):
                    page = (page | (HPAGE_PMD_SIZE - 1)) + 1  # the PMD mapped the rest
                else:
                    page += PAGE_SIZE
        return {"result": "ENOMEM" if unmapped else 0}

    def _pageout(self, mm: Mm, start: int, end: int) -> None:
        """MADV_PAGEOUT: unmap this process's file pages in the range and ask for reclaim."""
        pfns: list[int] = []
        for pidx in self._pidx_range(mm, start, end):
            entry = mm.pmds[pidx]
            base = pidx << HPAGE_PMD_SHIFT
            if isinstance(entry, int):
                pfns.append(pte_pfn(entry))
                self._zap_pmd(mm, pidx, split=not (start <= base and base + HPAGE_PMD_SIZE <= end))
                continue
            lo, hi = max(start, base), min(end, base + HPAGE_PMD_SIZE)
            for slot in range((lo - base) >> PAGE_SHIFT, (hi - base) >> PAGE_SHIFT):
                pte = entry.ptes[slot]
                if pte and not pte & PTE_ANON:
                    pfns.append(pte_pfn(pte))
                    self._zap_pte(mm, entry, slot)
        if pfns:
            self.send(m.Reclaim(tuple(pfns)))

    # -- page faults --------------------------------------------------------------------------

    def fault(self, pid: int, addr: int, write: bool = False) -> Generator[Any, Any, dict[str, Any]]:
        """handle_mm_fault under mmap_read_lock. Returns ``{"result": ...}``: ``hit`` (already
        mapped, no fault), ``minor``, ``major``, ``pmd`` (mapped with a PMD), ``sigsegv``,
        ``sigbus``."""
        mm = self.mm(pid)
        self.vm["pgfault"] += 1
        if not 0 <= addr < TASK_SIZE:
            return {"result": "sigsegv"}
        yield from self.lock_read(mm)
        try:
            result = yield from self._do_fault(mm, addr & ~(PAGE_SIZE - 1), write)
        finally:
            self.unlock_read(mm)
        return {"result": result}

    def _do_fault(self, mm: Mm, addr: int, write: bool) -> Generator[Any, Any, str]:
        while True:
            vma = mm.find_vma(addr)
            if vma is None or mm.exiting:
                return "sigsegv"
            if (write and not vma.prot & PROT_WRITE) or not vma.prot & PROT_READ:
                return "sigsegv"
            pidx = addr >> HPAGE_PMD_SHIFT
            slot = (addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)
            entry = mm.pmds.get(pidx)
            cow = write and not vma.shared
            if isinstance(entry, int):
                if not cow:
                    if write:
                        self.send(m.MarkDirty(pte_pfn(entry)))
                    return "hit"
                self._zap_pmd(mm, pidx, split=True)  # CoW on a PMD-mapped file THP splits it
                continue
            pte = entry.ptes[slot] if entry is not None else 0
            if pte:
                if not write or pte & PTE_WRITE:
                    return "hit"
                if vma.shared:
                    entry.ptes[slot] = pte | PTE_WRITE  # write-protect fault: page_mkwrite
                    self.send(m.MarkDirty(pte_pfn(pte)))
                    return "minor"
                return self._cow(mm, vma, pidx, slot, pte)
            haddr = addr & ~(HPAGE_PMD_SIZE - 1)
            pmd_ok = (
                not cow
                and entry is None
                and not vma.nohugepage
                and vma.pmd_suitable(haddr)
            )
            purpose = "copy" if cow else "map"
            around = () if write else self._around(mm, vma, addr, entry)
            # The page-cache lookup is the collapser's: mmap_lock is not held across it (it stands
            # for microseconds of filemap_fault, or for I/O that drops the lock), so a fault in
            # flight does not fail khugepaged's trylock. Everything is revalidated after.
            self.unlock_read(mm)
            reply = yield Call(
                m.LookupPage(
                    self.new_req(), vma.ino, vma.pgoff_at(addr), purpose, write, pmd_ok, vma.hugepage, around
                )
            )
            if reply.status != "ok":
                while not mm.lock.try_read():
                    yield Wait(("mmap", mm.pid))
                return reply.status
            relocked = mm.lock.try_read()
            if not relocked or mm.exiting or mm.find_vma(addr) is not vma:
                # Hand the accounting back rather than hold it while we wait (a writer has the
                # lock, or the VMA changed): the fault starts again, as after VM_FAULT_RETRY.
                if purpose == "map":
                    self._row(reply.head if reply.pmd else reply.pfn, pte=0 if reply.pmd else -1, pmd=-1 if reply.pmd else 0)
                    self._map_around(mm, vma, reply, install=False)
                while not relocked:
                    yield Wait(("mmap", mm.pid))
                    relocked = mm.lock.try_read()
                if mm.exiting:
                    return "sigsegv"
                continue
            if cow:
                # do_cow_fault: a private anon copy of the file page.
                new = self._anon_new()
                self._anon_map(new)
                self._ensure_anon_vma(mm, vma)
                self._set_pte(mm, pidx, slot, pte_make(new, PTE_ANON | PTE_WRITE))
                self.vm["cow_fault"] += 1
                return "major" if reply.major else "minor"
            current = mm.pmds.get(pidx)
            if reply.pmd:
                if current is None:
                    self._install_pmd(mm, pidx, reply.head, reply.shmem, accounted=True)
                    self._map_around(mm, vma, reply, install=False)
                    return "pmd"
                self._row(reply.head, pmd=-1)  # lost a race with another fault: look again
                self._map_around(mm, vma, reply, install=False)
                continue
            if isinstance(current, int) or (current is not None and current.ptes[slot]):
                self._row(reply.pfn, pte=-1)
                self._map_around(mm, vma, reply, install=False)
                continue
            if current is None and reply.thp and not vma.nohugepage and vma.pmd_suitable(haddr):
                # finish_fault: the table went (retracted while we waited on the page lock), so
                # do_set_pmd maps the THP rather than a PTE in a new table.
                self._row(reply.pfn, pte=-1)
                self._install_pmd(mm, pidx, reply.head, reply.shmem, accounted=False)
                self._map_around(mm, vma, reply, install=False)
                return "pmd"
            flags = (PTE_THP if reply.thp else 0) | (PTE_SHMEM if reply.shmem else 0)
            if write:
                flags |= PTE_WRITE
            self._set_pte(mm, pidx, slot, pte_make(reply.pfn, flags))
            self._map_around(mm, vma, reply, install=True)
            return "major" if reply.major else "minor"

    def _around(self, mm: Mm, vma: Vma, addr: int, entry: PteTable | None) -> tuple[int, ...]:
        """do_fault_around's window: the fault_around_bytes-aligned block holding ``addr``, inside
        the VMA and the PMD, minus the fault itself and the PTEs already present."""
        nr = self.knobs.fault_around_pages()
        if nr <= 1:
            return ()
        size = nr << PAGE_SHIFT
        haddr = addr & ~(HPAGE_PMD_SIZE - 1)
        lo = max(addr & ~(size - 1), vma.start, haddr)
        hi = min((addr & ~(size - 1)) + size, vma.end, haddr + HPAGE_PMD_SIZE)
        ptes = entry.ptes if entry is not None else None
        return tuple(
            vma.pgoff_at(a)
            for a in range(lo, hi, PAGE_SIZE)
            if a != addr and (ptes is None or not ptes[(a >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)])
        )

    def _map_around(self, mm: Mm, vma: Vma, reply: m.PageAnswer, install: bool) -> None:
        """Map the fault-around pages the collapser accounted; hand back those that lost a race."""
        for index, pfn, thp in reply.around:
            addr = vma.addr_of(index)
            pidx, slot = addr >> HPAGE_PMD_SHIFT, (addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)
            entry = mm.pmds.get(pidx)
            if not install or isinstance(entry, int) or (entry is not None and entry.ptes[slot]):
                self._row(pfn, pte=-1)
                continue
            self._set_pte(mm, pidx, slot, pte_make(pfn, (PTE_THP if thp else 0) | (PTE_SHMEM if reply.shmem else 0)))

    def _cow(self, mm: Mm, vma: Vma, pidx: int, slot: int, pte: int) -> str:
        """wp_page_copy (or reuse of an exclusive anon page)."""
        table = mm.pmds[pidx]
        assert isinstance(table, PteTable)
        if pte & PTE_ANON and self.anon[pte_pfn(pte)] == 1 and not self.anon_pins.get(pte_pfn(pte)):
            table.ptes[slot] = pte | PTE_WRITE
            return "minor"
        self._zap_pte(mm, table, slot)
        new = self._anon_new()
        self._anon_map(new)
        self._ensure_anon_vma(mm, vma)
        self._set_pte(mm, pidx, slot, pte_make(new, PTE_ANON | PTE_WRITE))
        self.vm["cow_fault"] += 1
        return "minor"

    def _ensure_anon_vma(self, mm: Mm, vma: Vma) -> None:
        """anon_vma_prepare: the VMA now has private anon pages; khugepaged's retract skips it."""
        vma.anon_vma = True

    def touch(
        self, pid: int, addr: int, length: int, write: bool = False, stride: int = PAGE_SIZE
    ) -> Generator[Any, Any, dict[str, Any]]:
        """Fault every ``stride`` bytes of [addr, addr+length); counts per outcome."""
        if stride <= 0 or length < 0:
            raise UserError("EINVAL", "stride must be positive and length non-negative")
        self.mm(pid)
        counts: Counter[str] = Counter()
        for a in range(addr, addr + length, stride):
            outcome = yield from self.fault(pid, a, write)
            counts[outcome["result"]] += 1
        return dict(counts)

    # -- GUP pins -----------------------------------------------------------------------------

    def pin(self, pid: int, addr: int) -> Generator[Any, Any, dict[str, Any]]:
        """pin_user_pages_fast on one page: fault it in if needed, then take a pin."""
        mm = self.mm(pid)
        page = addr & ~(PAGE_SIZE - 1)
        outcome = yield from self.fault(pid, page, False)
        if outcome["result"] in ("sigsegv", "sigbus"):
            raise UserError("EFAULT", f"cannot pin {addr:#x}: {outcome['result']}")
        pfn = self._resolve(mm, page)
        if pfn >= ANON_PFN_BASE:
            self.anon_pins[pfn] = self.anon_pins.get(pfn, 0) + 1
        else:
            self._row(pfn, pin=1)
        mm.pins.setdefault(page, []).append(pfn)
        return {"pid": pid, "addr": page, "pfn": pfn}

    def unpin(self, pid: int, addr: int) -> dict[str, Any]:
        mm = self.mm(pid)
        page = addr & ~(PAGE_SIZE - 1)
        pfns = mm.pins.get(page)
        if not pfns:
            raise UserError("EINVAL", f"no pin at {page:#x} in process {pid}")
        pfn = pfns.pop()
        if not pfns:
            del mm.pins[page]
        self._unpin(pfn)
        self.flush()  # a plain call, not a task: nothing else pushes the row out
        return {"pid": pid, "addr": page, "pfn": pfn}

    def _unpin(self, pfn: int) -> None:
        if pfn >= ANON_PFN_BASE:
            self.anon_pins[pfn] -= 1
            if not self.anon_pins[pfn]:
                del self.anon_pins[pfn]
                if self.anon.get(pfn) == 0:
                    del self.anon[pfn]
        else:
            self._row(pfn, pin=-1)

    def _unpin_range(self, mm: Mm, start: int, end: int) -> None:
        """Pins outlive munmap in the kernel; here the modelled driver drops them with the VMA."""
        for page in [p for p in mm.pins if start <= p < end]:
            for pfn in mm.pins.pop(page):
                self._unpin(pfn)

    def _resolve(self, mm: Mm, addr: int) -> int:
        entry = mm.pmds.get(addr >> HPAGE_PMD_SHIFT)
        if isinstance(entry, int):
            return pte_pfn(entry) + ((addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1))
        assert entry is not None
        return pte_pfn(entry.ptes[(addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)])

    # -- requests from the collapser ----------------------------------------------------------

    def _vmas_of(self, ino: int) -> list[tuple[Mm, Vma]]:
        return list(self.i_mmap.get(ino, {}).values())

    def _unmap_mapping(self, msg: m.UnmapMapping) -> None:
        """unmap_mapping_range / try_to_unmap over every VMA mapping [start, end) of the file."""
        pfns = set(msg.pfns) if msg.pfns else None
        for mm, vma in self._vmas_of(msg.ino):
            lo = max(msg.start, vma.pgoff)
            hi = min(msg.end, vma.pgoff_at(vma.end))
            if lo >= hi:
                continue
            self.zap_range(mm, vma.addr_of(lo), vma.addr_of(hi), anon=msg.even_cows, pfns=pfns)

    def retract_page_tables(self, msg: m.Retract) -> m.Retracted:
        from remapd.collapse import retract_page_tables

        return retract_page_tables(self, msg)

    def _collapse_pte_mapped_request(self, msg: m.CollapsePteMapped) -> Generator[Any, Any, None]:
        from remapd.collapse import collapse_pte_mapped_thp

        mm = self.mms.get(msg.pid)
        if mm is None or mm.exiting:
            self.send(m.CollapsePteMappedResult(msg.req, int(R.SCAN_ANY_PROCESS)))
            return
        try:
            yield from self.lock_read(mm)
        except UserError:  # the process exited while we waited: khugepaged still gets its answer
            self.send(m.CollapsePteMappedResult(msg.req, int(R.SCAN_ANY_PROCESS)))
            return
        try:
            result = yield from collapse_pte_mapped_thp(self, mm, msg.addr, bool(self.knobs.install_pmd))
        finally:
            self.unlock_read(mm)
        self.send(m.CollapsePteMappedResult(msg.req, int(result)))

    def _visit_mm(self, msg: m.VisitMm) -> Generator[Any, Any, None]:
        from remapd.collapse import khugepaged_collapse_pte_mapped_thps

        mm = self.mms.get(msg.pid)
        if mm is not None:
            yield from khugepaged_collapse_pte_mapped_thps(self, mm)
        self.send(m.VisitMmDone(msg.req))

    def _remap_thread(self) -> Generator[Any, Any, None]:
        from remapd.collapse import remap_marked_tables

        while True:
            yield Sleep(self.now + self.knobs.remap_sleep_millisecs, wake="remap_wake")
            if self.knobs.retry_policy == "per-pmd" and self.marked:
                yield from remap_marked_tables(self)

    def _uprobe_mmap(self, mm: Mm, vma: Vma) -> Generator[Any, Any, None]:
        from remapd.uprobes import uprobe_mmap

        yield from uprobe_mmap(self, mm, vma)

    # -- reports ------------------------------------------------------------------------------

    def smaps(self, pid: int) -> list[dict[str, Any]]:
        """Per-VMA /proc/PID/smaps fields (kB), as task_mmu.c computes them."""
        from remapd.report import smaps

        return smaps(self, self.mm(pid))

    def vmstat(self) -> dict[str, int]:
        return dict(self.vm)

    def status(self, pid: int) -> dict[str, Any]:
        mm = self.mm(pid)
        return {
            "pid": pid,
            "vmas": len(mm.vmas),
            "nr_ptes": mm.nr_ptes,
            "rss": dict(mm.rss),
            "marked": sum(1 for p, _ in self.marked if p == pid),
            "pte_mapped_thp": list(mm.pte_mapped_thp),
            "lock": {"readers": mm.lock.readers, "writer": mm.lock.writer},
        }


_ADVICE = (
    "hugepage",
    "nohugepage",
    "collapse",
    "dontneed",
    "populate_read",
    "populate_write",
    "pageout",
)


def _answer_for_lost_peer(request: Message) -> Message:
    """What a request to a collapser that is gone resolves to."""
    if isinstance(request, m.LookupPage):
        return m.PageAnswer(request.req, "sigbus")
    if isinstance(request, m.LockFolio):
        return m.FolioAnswer(request.req, 0, 0)
    if isinstance(request, m.MadvCollapse):
        return m.CollapseResult(request.req, int(R.SCAN_FAIL))
    raise TypeError(f"no answer for {request!r}")
