"""The collapser actor's core: the page cache, its file operations, and the peer protocol's
page-cache side (fault lookups, rmap accounting, folio locks). khugepaged itself is in
:mod:`collapsed.khugepaged`.

Sans-IO: no sockets, no clock of its own. See :mod:`shared.actor` for how it is driven.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator
from typing import Any

from collapsed.fileops import FileOps
from collapsed.khugepaged import Khugepaged
from collapsed.pagecache import (
    PG_DIRTY,
    PG_HEAD,
    PG_LOCKED,
    PG_LRU,
    PG_SWAPBACKED,
    PG_UPTODATE,
    File,
    PhysMem,
)
from shared import messages as m
from shared.actor import Actor, Wait
from shared.knobs import Knobs
from shared.message import Message
from shared.scan_result import ScanResult
from shared.thp import shmem_huge_global_enabled
from shared.units import HPAGE_PMD_NR, PAGE_SIZE

# Pages wait in a per-CPU batch before they reach the LRU (folio_batch: PAGEVEC_SIZE in 6.x).
LRU_BATCH = 15

# The vmstat event counters this side owns, in /proc/vmstat order.
VM_EVENTS = (
    "pgmajfault",
    "pswpin",
    "pswpout",
    "thp_collapse_alloc",
    "thp_collapse_alloc_failed",
    "thp_file_alloc",
    "thp_file_fallback",
    "thp_file_fallback_charge",
    "thp_split_page",
    "thp_split_page_failed",
    "thp_scan_exceed_none_pte",
    "thp_scan_exceed_swap_pte",
    "thp_scan_exceed_share_pte",
)


class Collapser(FileOps, Actor):
    """Owns files, pages and khugepaged's scan. Peer messages go in through :meth:`deliver`."""

    def __init__(self, knobs: Knobs | None = None, seed: int = 0, start_khugepaged: bool = True):
        super().__init__()
        self.knobs = knobs or Knobs()
        self.mem = PhysMem(seed)
        self.files: dict[int, File] = {}
        self.by_name: dict[str, File] = {}
        self._next_ino = 1
        self.vm: Counter[str] = Counter({name: 0 for name in VM_EVENTS})
        self.nr_swap_entries = 0
        self._next_swap = 1
        self._lru_batch: list[int] = []
        self._writeback: list[tuple[float, int]] = []  # (done at, pfn)
        # Bumped when the remapper is lost: a lookup begun for the old one must not account.
        self.peer_epoch = 0
        self.khugepaged = Khugepaged(self)
        if start_khugepaged:
            self.spawn(self.khugepaged.thread(), name="khugepaged")

    # -- peer messages ------------------------------------------------------------------------

    def deliver(self, msg: Message) -> None:
        """Handle one message from the remapper."""
        if isinstance(msg, m.LookupPage):
            if self.lookup_page(msg) is not None:
                self.spawn(self._lookup(msg), name="lookup")
        elif isinstance(msg, m.RmapDelta):
            self.apply_rmap(msg.rows)
        elif isinstance(msg, m.MarkDirty):
            self._set_dirty(self.mem.head(msg.pfn))
        elif isinstance(msg, m.RegisterRange):
            self.khugepaged.register(msg)
        elif isinstance(msg, m.UnregisterRange):
            self.khugepaged.unregister(msg.pid, msg.start)
        elif isinstance(msg, m.MmExit):
            self.khugepaged.mm_exit(msg.pid)
        elif isinstance(msg, m.WriteOpen):
            f = self.files.get(msg.ino)
            if f is not None:
                f.writecount += msg.delta
                if msg.delta > 0 and f.writecount == msg.delta and f.nr_thps and not f.shmem:
                    self.spawn(self._drop_for_write(f), name="drop_for_write")
        elif isinstance(msg, m.SetCollapsePmd):
            f = self.files.get(msg.ino)
            if f is not None:
                f.collapse_pmd = True
        elif isinstance(msg, m.Reclaim):
            self._reclaim(msg.pfns)
        elif isinstance(msg, m.LockFolio):
            self.spawn(self._lock_folio(msg), name="lock_folio")
        elif isinstance(msg, m.UnlockFolio):
            self.unlock(msg.pfn)
        elif isinstance(msg, m.MadvCollapse):
            self.spawn(self.khugepaged.madvise_collapse(msg), name="madv_collapse")
        elif isinstance(msg, m.KnobsChanged):
            for name, value in msg.values.items():
                self.knobs.set(name, str(value))
            self.notify("khugepaged_wake")
        elif isinstance(msg, m.FileInfo):
            self._adopt_file(msg)
        elif hasattr(msg, "req"):
            self.deliver_reply(msg.req, msg)  # type: ignore[attr-defined]
        self.flush()

    # -- losing and regaining the peer --------------------------------------------------------

    def peer_lost(self) -> None:
        """The remapper is gone, and every mapping and pin it held with it: drop their
        accounting, answer whatever waited on it, forget its mm slots and write opens."""
        self.peer_epoch += 1
        mem = self.mem
        heads = set(mem.pins) | set(mem.entire)
        for f in self.files.values():
            f.writecount = 0
            for _, value in f.entries():
                if value > 0 and mem.mapcount[value]:
                    heads.add(mem.head(value))
        for head in heads:
            subs = range(head, head + HPAGE_PMD_NR) if mem.flags[head] & PG_HEAD else (head,)
            drop = sum(mem.mapcount[p] for p in subs) + mem.entire.pop(head, 0) + mem.pins.pop(head, 0)
            for p in subs:
                mem.mapcount[p] = 0
            if drop:
                self.put(head, drop)
        for pid in list(self.khugepaged.slots):
            self.khugepaged.mm_exit(pid)
        self.fail_calls(_answer_for_lost_peer)
        self.outbox.clear()

    def resync(self) -> None:
        """A remapper (new or back) is connected: tell it every file."""
        for f in self.files.values():
            self.send(m.FileInfo(f.ino, f.name, f.size, f.shmem))

    def _adopt_file(self, msg: m.FileInfo) -> None:
        """A remapper that outlived us names a file it maps: recreate it (empty page cache)."""
        if msg.ino in self.files or msg.name in self.by_name or msg.size < 0:
            return
        f = File(msg.ino, msg.name, msg.size, msg.shmem)
        self.files[f.ino] = f
        self.by_name[f.name] = f
        self._next_ino = max(self._next_ino, f.ino + 1)

    # -- struct page helpers ------------------------------------------------------------------

    def trylock(self, pfn: int) -> bool:
        flags = self.mem.flags
        if flags[pfn] & PG_LOCKED:
            return False
        flags[pfn] |= PG_LOCKED
        return True

    def lock(self, pfn: int) -> Generator[Any, Any, None]:
        """lock_page: sleep until the page lock is ours."""
        while not self.trylock(pfn):
            yield Wait(("page", pfn))

    def unlock(self, pfn: int) -> None:
        self.mem.flags[pfn] &= ~PG_LOCKED
        self.notify(("page", pfn))

    def put(self, head: int, n: int = 1) -> None:
        """put_page: drop references; the last one frees the page (a THP's block goes back to the
        huge pool)."""
        mem = self.mem
        mem.ref[head] -= n
        if mem.ref[head] < 0:
            raise AssertionError(f"refcount underflow on pfn {head}")
        if mem.ref[head] == 0:
            huge = mem.flags[head] & PG_HEAD
            self._lru_del(head)
            mem.free(head)
            if huge:
                self.knobs.free_huge_pages += 1

    def apply_rmap(self, rows: tuple[tuple[int, int, int, int], ...]) -> None:
        mem = self.mem
        for pfn, pte, pmd, pin in rows:
            head = mem.head(pfn)
            if pte:
                mem.mapcount[pfn] += pte
            if pmd:
                mem.entire[head] = mem.entire.get(head, 0) + pmd
                if not mem.entire[head]:
                    del mem.entire[head]
            if pin:
                mem.pins[head] = mem.pins.get(head, 0) + pin
                if not mem.pins[head]:
                    del mem.pins[head]
            delta = pte + pmd + pin
            if delta > 0:
                mem.ref[head] += delta
            elif delta < 0:
                self.put(head, -delta)

    # -- LRU (per-CPU add batch, as folio_add_lru) --------------------------------------------

    def lru_add(self, pfn: int) -> None:
        self._lru_batch.append(pfn)
        if len(self._lru_batch) >= LRU_BATCH:
            self.lru_add_drain()

    def lru_add_drain(self) -> None:
        flags = self.mem.flags
        for pfn in self._lru_batch:
            if self.mem.allocated(pfn):
                flags[pfn] |= PG_LRU
        self._lru_batch.clear()

    def _lru_del(self, pfn: int) -> None:
        self.mem.flags[pfn] &= ~PG_LRU
        if pfn in self._lru_batch:
            self._lru_batch.remove(pfn)

    # -- page cache insertion/removal ---------------------------------------------------------

    def add_small_page(self, f: File, index: int, dirty: bool = False) -> int:
        """Allocate a small page, insert it at ``index`` (ref 1 for the cache), uptodate, on LRU."""
        mem = self.mem
        pfn = mem.alloc_small()
        mem.flags[pfn] |= PG_UPTODATE | (PG_SWAPBACKED | PG_DIRTY if f.shmem else 0)
        if dirty:
            mem.flags[pfn] |= PG_DIRTY
        mem.index[pfn] = index
        mem.ino[pfn] = f.ino
        old = f.get(index)
        if old < 0:
            f.nrswap -= 1
            self.nr_swap_entries -= 1
        f.set(index, pfn)
        f.nrpages += 1
        self.lru_add(pfn)
        return pfn

    def alloc_huge(self, direct_compaction: bool) -> int:
        k = self.knobs
        head = self.mem.alloc_huge(k.free_huge_pages, direct_compaction, k.fragmentation)
        if head:
            k.free_huge_pages -= 1
        return head

    def add_huge_page(self, f: File, start: int, head: int) -> None:
        """Publish a PMD-order folio at ``start`` (one multi-index entry: 512 slots)."""
        mem = self.mem
        mem.index[head] = start
        mem.ino[head] = f.ino
        mem.flags[head] |= PG_UPTODATE | (PG_SWAPBACKED | PG_DIRTY if f.shmem else 0)
        for i in range(HPAGE_PMD_NR):
            mem.index[head + i] = start + i
            mem.ino[head + i] = f.ino
            f.set(start + i, head + i)
        mem.ref[head] += HPAGE_PMD_NR - 1  # the cache holds one reference per subpage
        f.nrpages += HPAGE_PMD_NR
        f.nr_thps += 1
        self.lru_add(head)

    def remove_page(self, f: File, pfn: int) -> None:
        """Delete a small page or a whole THP from the cache and drop the cache's references."""
        mem = self.mem
        head = mem.head(pfn)
        if mem.flags[head] & PG_HEAD:
            start = mem.index[head]
            for i in range(HPAGE_PMD_NR):
                f.set(start + i, 0)
            f.drop_empty_chunk(start)
            f.nrpages -= HPAGE_PMD_NR
            f.nr_thps -= 1
            mem.ino[head] = 0
            self.put(head, HPAGE_PMD_NR)
        else:
            index = mem.index[head]
            f.set(index, 0)
            f.drop_empty_chunk(index)
            f.nrpages -= 1
            mem.ino[head] = 0
            self.put(head)

    def _set_dirty(self, head: int) -> None:
        if self.mem.allocated(head):
            self.mem.flags[head] |= PG_DIRTY

    # -- fault lookups (filemap_fault / shmem_fault) ------------------------------------------

    def _lookup(self, msg: m.LookupPage) -> Generator[Any, Any, None]:
        """A lookup that met a locked page: the fault waits for the unlock, then looks again
        (the page it waited for may be gone)."""
        epoch = self.peer_epoch
        while (locked := self.lookup_page(msg)) is not None:
            yield Wait(("page", locked))
            if self.peer_epoch != epoch:
                return

    def lookup_page(self, msg: m.LookupPage) -> int | None:
        """One attempt at a fault lookup: answers and returns None, or returns the locked page
        the fault has to wait for (the common case answers without a task: faults are hot)."""
        mem = self.mem
        f = self.files.get(msg.ino)
        if f is None or msg.index >= f.nr_pages_size:
            self.send(m.PageAnswer(msg.req, "sigbus"))
            return None
        value = f.get(msg.index)
        if value > 0 and mem.flags[mem.head(value)] & PG_LOCKED:
            return mem.head(value)
        # do_fault_around runs first: it maps what the cache holds around the fault.
        around = self._fault_around(f, msg.around) if msg.around and msg.purpose == "map" else ()
        major = False
        if value > 0:
            pfn = value
        elif value < 0:
            pfn = self.add_small_page(f, msg.index)
            self.vm["pswpin"] += 1
            major = True
        elif f.shmem:
            pfn = self._shmem_alloc(f, msg.index, msg.pmd_ok, msg.vm_hugepage)
        else:
            pfn = self.add_small_page(f, msg.index)
            self._read_around(f, msg.index, msg.vm_hugepage)
            major = True
        if major:
            self.vm["pgmajfault"] += 1
        head = mem.head(pfn)
        thp = bool(mem.flags[head] & PG_HEAD)
        pmd = False
        if msg.purpose == "map":
            if thp and msg.pmd_ok:
                pmd = True
                self.apply_rmap(((head, 0, 1, 0),))
            else:
                self.apply_rmap(((pfn, 1, 0, 0),))
            if msg.write:
                self._set_dirty(head)
        elif msg.purpose == "pin":
            self.apply_rmap(((pfn, 0, 0, 1),))
        self.send(m.PageAnswer(msg.req, "ok", pfn, head, thp, pmd, major, f.shmem, around))
        return None

    def _fault_around(self, f: File, indices: tuple[int, ...]) -> tuple[tuple[int, int, bool], ...]:
        """filemap_map_pages: map the cached, uptodate, unlocked pages among ``indices``."""
        mem = self.mem
        out = []
        for index in indices:
            value = f.get(index)
            if value <= 0:
                continue
            head = mem.head(value)
            if mem.flags[head] & PG_LOCKED or not mem.flags[head] & PG_UPTODATE:
                continue
            self.apply_rmap(((value, 1, 0, 0),))
            out.append((index, value, bool(mem.flags[head] & PG_HEAD)))
        return tuple(out)

    def _read_around(self, f: File, index: int, vm_hugepage: bool) -> None:
        """do_sync_mmap_readahead for a major fault on a regular file: with VM_HUGEPAGE two PMD
        ranges from the aligned index ("even if readahead is disabled"), else read-around of
        read_ahead_kb centred on the fault. Pages arrive uptodate; the mmap_miss heuristic is
        not modelled."""
        if vm_hugepage:
            start = index & ~(HPAGE_PMD_NR - 1)
            size = 2 * HPAGE_PMD_NR
        else:
            size = self.knobs.read_ahead_kb * 1024 // PAGE_SIZE
            if size <= 1:
                return
            start = max(0, index - size // 2)
        for i in range(start, min(start + size, f.nr_pages_size)):
            if f.get(i) == 0:
                self.add_small_page(f, i)

    def _shmem_alloc(self, f: File, index: int, pmd_ok: bool, vm_hugepage: bool) -> int:
        """shmem_get_folio_gfp for a hole: a PMD-order folio when shmem_enabled allows it here."""
        start = index & ~(HPAGE_PMD_NR - 1)
        if pmd_ok and shmem_huge_global_enabled(self.knobs, f.size, start, vm_hugepage):
            chunk = f.chunk(start)
            if chunk is None or not any(chunk):
                k = self.knobs
                direct = k.defrag == "always" or (k.defrag in ("madvise", "defer+madvise") and vm_hugepage)
                head = self.alloc_huge(direct)
                if head:
                    self.mem.flags[head] |= PG_UPTODATE
                    self.add_huge_page(f, start, head)
                    self.vm["thp_file_alloc"] += 1
                    return head + (index - start)
                self.vm["thp_file_fallback"] += 1
        return self.add_small_page(f, index)

    def _lock_folio(self, msg: m.LockFolio) -> Generator[Any, Any, None]:
        mem = self.mem
        epoch = self.peer_epoch
        while True:
            f = self.files.get(msg.ino)
            value = f.get(msg.index) if f is not None else 0
            if value <= 0:
                self.send(m.FolioAnswer(msg.req, 0, 0))
                return
            head = mem.head(value)
            if self.trylock(head):
                break
            yield Wait(("page", head))
            if self.peer_epoch != epoch:
                return
        self.send(m.FolioAnswer(msg.req, head, 9 if mem.flags[head] & PG_HEAD else 0))

    # -- reports ------------------------------------------------------------------------------

    def meminfo(self) -> dict[str, int]:
        """The THP lines of /proc/meminfo, in kB, plus the page-cache totals they sit beside."""
        mem = self.mem
        file_pages = shmem_pages = file_thp = shmem_thp = file_pmd = shmem_pmd = 0
        for f in self.files.values():
            if f.shmem:
                shmem_pages += f.nrpages
                shmem_thp += f.nr_thps
            else:
                file_thp += f.nr_thps
            file_pages += f.nrpages
        for head, count in mem.entire.items():
            if count > 0:
                if mem.flags[head] & PG_SWAPBACKED:
                    shmem_pmd += 1
                else:
                    file_pmd += 1
        kb = PAGE_SIZE // 1024
        huge_kb = HPAGE_PMD_NR * kb
        return {
            "Cached": file_pages * kb,
            "Shmem": shmem_pages * kb,
            "SwapCached": 0,
            "ShmemHugePages": shmem_thp * huge_kb,
            "ShmemPmdMapped": shmem_pmd * huge_kb,
            "FileHugePages": file_thp * huge_kb,
            "FilePmdMapped": file_pmd * huge_kb,
        }

    def vmstat(self) -> dict[str, int]:
        stats = self.meminfo()
        out = {
            "nr_file_pages": stats["Cached"] // 4,
            "nr_shmem": stats["Shmem"] // 4,
            "nr_shmem_hugepages": stats["ShmemHugePages"] // 2048,
            "nr_shmem_pmdmapped": stats["ShmemPmdMapped"] // 2048,
            "nr_file_hugepages": stats["FileHugePages"] // 2048,
            "nr_file_pmdmapped": stats["FilePmdMapped"] // 2048,
            "nr_swap_entries": self.nr_swap_entries,
        }
        out.update(self.vm)
        return out


def _answer_for_lost_peer(request: Message) -> Message:
    """What a request to a remapper that is gone resolves to: nothing was mapped any more."""
    if isinstance(request, m.UnmapMapping):
        return m.Unmapped(request.req)
    if isinstance(request, m.Retract):
        return m.Retracted(request.req, 0, 0, 0, 0)
    if isinstance(request, m.CollapsePteMapped):
        return m.CollapsePteMappedResult(request.req, int(ScanResult.SCAN_ANY_PROCESS))
    if isinstance(request, m.VisitMm):
        return m.VisitMmDone(request.req)
    raise TypeError(f"no answer for {request!r}")
