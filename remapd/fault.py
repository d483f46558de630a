"""The fault path: handle_mm_fault with do_set_pmd, fault-around and copy-on-write, and GUP pins.

A fault looks the page up in the collapser's page cache (a message round trip) without holding
mmap_lock, then retakes the lock and revalidates before mapping anything
(:meth:`FaultPath.do_user_addr_fault`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator
from itertools import compress
from operator import not_
from typing import Any

from remapd.files import Files
from remapd.mm import (
    ANON_PFN_BASE,
    PTE_ANON,
    PTE_DIRTY,
    PTE_SHMEM,
    PTE_THP,
    PTE_WRITE,
    VM_RAND_READ,
    VM_READ_HINTS,
    VM_SEQ_READ,
    Mm,
    MmapLocks,
    PteTable,
    Vma,
    find_mm,
    pte_make,
    pte_pfn,
)
from remapd.pagetable import PageTables
from remapd.rmap import AnonPages, RmapBatch
from shared.actor import Actor, Call
from shared.errors import UserError
from shared.knobs import Knobs
from shared.protocol import messages as m
from shared.units import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SHIFT,
    HPAGE_PMD_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    TASK_SIZE,
)
from shared.vm import PROT_EXEC, PROT_READ, PROT_WRITE

# Bound once: reading an Enum member through its class runs a descriptor (Python 3.11), which
# the fault path would pay on every fault.
MAP, COPY, OK, SIGBUS = m.Purpose.MAP, m.Purpose.COPY, m.PageStatus.OK, m.PageStatus.SIGBUS
FAULT_PMD_OK, FAULT_THP_OK = m.FAULT_PMD_OK, m.FAULT_THP_OK
MAX_BATCH_FAULTS, MAX_BATCH_WINDOW_PAGES = m.MAX_BATCH_FAULTS, m.MAX_BATCH_WINDOW_PAGES
ANSWER_STATUS = m.ANSWER_STATUS
ANSWER_THP, ANSWER_PMD, ANSWER_MAJOR = m.ANSWER_THP, m.ANSWER_PMD, m.ANSWER_MAJOR
ANSWER_SHMEM, ANSWER_ALLOCATED = m.ANSWER_SHMEM, m.ANSWER_ALLOCATED
# The PTEs of a PMD range without a table: none present.
_NO_PTES = PteTable().ptes


class FaultPath:
    """Page faults and GUP pins of every process. ``actor`` runs the tasks and carries the
    page-cache lookups to the collapser; ``files`` is the file mirror (i_size decides whether a
    regular file's THP may be mapped whole); ``vm`` is the remapper's vmstat (``pgfault``,
    ``thpsplit_cow_fault``)."""

    def __init__(
        self,
        actor: Actor,
        knobs: Knobs,
        mms: dict[int, Mm],
        files: Files,
        locks: MmapLocks,
        pagetables: PageTables,
        rmap: RmapBatch,
        anon: AnonPages,
        vm: Counter[str],
    ):
        self.actor = actor
        self.knobs = knobs
        self.mms = mms
        self.files = files
        self.shmem_inos = files.shmem_inos
        self.locks = locks
        self.pagetables = pagetables
        self.rmap = rmap
        self.anon = anon
        self.vm = vm

    # -- page faults --------------------------------------------------------------------------

    def fault(self, pid: int, addr: int, write: bool = False) -> dict[str, Any] | Generator[Any, Any, dict[str, Any]]:
        """One access, as an operation: ``{"result": ...}`` of :meth:`do_user_addr_fault`. A hit
        (no fault: it changes nothing but ``pgfault``) is answered at once; anything else is a
        task, which may wait."""
        mm = self.mms.get(pid)
        if mm is not None and self._hits(mm, addr, addr + 1, write, PAGE_SIZE):
            return {"result": "hit"}
        return self._fault(pid, addr, write)

    def _fault(self, pid: int, addr: int, write: bool) -> Generator[Any, Any, dict[str, Any]]:
        return {"result": (yield from self.do_user_addr_fault(pid, addr, write))}

    def _hits(self, mm: Mm, addr: int, end: int, write: bool, stride: int) -> int:
        """How many of the accesses every ``stride`` bytes from ``addr`` (before ``end``) are hits
        that change nothing, counted as :meth:`do_user_addr_fault` counts them (``pgfault``):
        0 when the first is not. A hit is a present PTE or PMD the access may use (a read; a
        write through a writable PTE that is dirty or anon already), in a VMA that allows it,
        with the mmap lock free of writers (the read lock would be taken and dropped with no
        one waiting: a waiter only sleeps while the lock is held). The run ends at the first
        access that is not, at the VMA's end and at the PMD's."""
        lock = mm.lock
        if lock.writer or mm.exiting:
            return 0
        # The page table first: a PMD range with nothing in it (a cold fault's) needs no VMA.
        entry = mm.pmds.get(addr >> HPAGE_PMD_SHIFT)
        if entry is None:
            return 0
        vma = mm.find_vma(addr)
        if vma is None or not vma.prot & PROT_READ or (write and not vma.prot & PROT_WRITE):
            return 0
        limit = min(end, vma.end, (addr | (HPAGE_PMD_SIZE - 1)) + 1)
        n = -(-(limit - addr) // stride)
        if isinstance(entry, int):
            if write:
                return 0
        else:
            ptes = entry.ptes
            slot = (addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)
            pte = ptes[slot]
            if not pte or (write and not (pte & PTE_WRITE and pte & (PTE_DIRTY | PTE_ANON))):
                return 0
            if write or stride != PAGE_SIZE:
                n = 1
            elif n > 1:
                # The run ends at its first PTE not present. Tested before it is searched: most
                # runs are all present, and a ValueError raised and caught costs ~1 us.
                run = ptes[slot : slot + n]
                if 0 in run:
                    n = run.index(0)
        self.vm["pgfault"] += n
        return n

    def do_user_addr_fault(self, pid: int, addr: int, write: bool) -> Generator[Any, Any, str]:
        """An access by ``pid``: handle_mm_fault under mmap_read_lock. Returns ``hit`` (already
        mapped, no fault), ``minor``, ``major``, ``pmd`` (mapped with a PMD), ``sigsegv`` or
        ``sigbus``."""
        mm = find_mm(self.mms, pid)
        self.vm["pgfault"] += 1
        if not 0 <= addr < TASK_SIZE:
            return "sigsegv"
        yield from self.locks.mmap_read_lock(mm)
        try:
            return (yield from self._handle_mm_fault(mm, addr & ~(PAGE_SIZE - 1), write))
        finally:
            self.locks.mmap_read_unlock(mm)

    def _handle_mm_fault(self, mm: Mm, addr: int, write: bool) -> Generator[Any, Any, str]:
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
                        self.actor.send(m.MarkDirty(pte_pfn(entry)))
                    return "hit"
                self.pagetables.zap_huge_pmd(mm, pidx, split=True)  # CoW on a PMD-mapped file THP splits it
                continue
            if entry is not None and (pte := entry.ptes[slot]):
                if not write:
                    return "hit"
                if pte & PTE_WRITE:
                    if not pte & (PTE_DIRTY | PTE_ANON):
                        # Writable but clean (read-faulted on shared writable shmem): no fault,
                        # the CPU sets the dirty bit, which the kernel moves to the folio when it
                        # unmaps the page.
                        entry.ptes[slot] = pte | PTE_DIRTY
                        self.actor.send(m.MarkDirty(pte_pfn(pte)))
                    return "hit"
                if vma.shared:
                    # Write-protect fault (wp_page_shared): a regular file's shared writable
                    # mapping wants write-notify, so its read faults mapped the page read-only.
                    entry.ptes[slot] = pte | PTE_WRITE | PTE_DIRTY
                    self.actor.send(m.MarkDirty(pte_pfn(pte)))
                    return "minor"
                return self._cow(mm, vma, pidx, slot, pte)
            haddr = addr & ~(HPAGE_PMD_SIZE - 1)
            pmd_ok = not cow and entry is None and not vma.nohugepage and vma.pmd_suitable(haddr)
            # shmem sizes a new folio by the VMA and the page cache alone (shmem_get_folio_gfp):
            # PMD-order wherever the VMA could hold one (thp_vma_suitable_order, not
            # VM_NOHUGEPAGE), whatever the page table holds, for a CoW source too. Only shmem
            # allocates at fault, so a regular file's fault does not work it out.
            thp_ok = pmd_ok or (
                vma.ino in self.shmem_inos and not vma.nohugepage and vma.pmd_suitable(haddr)
            )
            purpose = COPY if cow else MAP
            if cow:
                # do_cow_fault: vmf_anon_prepare before __do_fault, so the VMA has its anon_vma
                # even when the lookup then fails (SIGBUS past EOF), and fork copies its PTEs.
                vma.anon_vma_prepare()
            # should_fault_around: a read fault with fault_around_bytes above a page.
            nr_around = 0 if write else self.knobs.fault_around_pages()
            around = self._around(vma, addr, entry, nr_around) if nr_around > 1 else ()
            # The page-cache lookup is the collapser's: mmap_lock is not held across it (it stands
            # for microseconds of filemap_fault, or for I/O that drops the lock), so a fault in
            # flight does not fail khugepaged's trylock. Everything is revalidated after.
            self.locks.mmap_read_unlock(mm)
            reply = yield Call(
                m.LookupPage(
                    self.actor.new_req(),
                    vma.ino,
                    vma.pgoff_at(addr),
                    purpose,
                    write,
                    pmd_ok,
                    vma.hugepage,
                    around,
                    thp_ok,
                    vma.pgoff_at(vma.end) if vma.prot & PROT_EXEC else 0,
                    bool(vma.flags & VM_RAND_READ),
                    bool(vma.flags & VM_SEQ_READ),
                )
            )
            if reply.status != OK:
                while not mm.lock.try_read():
                    yield self.locks.wait(mm)
                # Past EOF, fault-around has mapped what the cache holds below it first.
                self._map_around(mm, vma, reply, install=not mm.exiting and mm.find_vma(addr) is vma)
                return reply.status
            relocked = mm.lock.try_read()
            if not relocked or mm.exiting or mm.find_vma(addr) is not vma:
                # Hand the accounting back rather than hold it while we wait (a writer has the
                # lock, or the VMA changed): the fault starts again, as after VM_FAULT_RETRY.
                if purpose is MAP:
                    if reply.pmd:
                        self.rmap.add(reply.head, pmd=-1)
                    else:
                        self.rmap.add(reply.pfn, pte=-1)
                    self._map_around(mm, vma, reply, install=False)
                while not relocked:
                    yield self.locks.wait(mm)
                    relocked = mm.lock.try_read()
                if mm.exiting:
                    return "sigsegv"
                continue
            result = self._map_answer(mm, vma, addr, write, cow, nr_around, reply)
            if result is not None:
                return result

    def _map_answer(
        self, mm: Mm, vma: Vma, addr: int, write: bool, cow: bool, nr_around: int, reply: m.PageAnswer
    ) -> str | None:
        """finish_fault with the page-cache answer, mmap_lock held and the VMA revalidated: the
        fault's outcome, or None when it lost a race (the answer handed back) and must start
        again."""
        pidx = addr >> HPAGE_PMD_SHIFT
        slot = (addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)
        haddr = addr & ~(HPAGE_PMD_SIZE - 1)
        if cow:
            # do_cow_fault: a private anon copy of the file page, unless another fault mapped
            # something here meanwhile (finish_fault's !pte_none: VM_FAULT_NOPAGE); a copy's
            # lookup accounted nothing, so the fault just handles what is there now.
            current = mm.pmds.get(pidx)
            if isinstance(current, int) or (current is not None and current.ptes[slot]):
                return None
            if self._anon_full():
                return "nomem"
            self.pagetables.set_pte_at(mm, pidx, slot, pte_make(self.anon.alloc(), PTE_ANON | PTE_WRITE))
            self.vm["thpsplit_cow_fault"] += 1
            return "major" if reply.major else "minor"
        current = mm.pmds.get(pidx)
        if reply.pmd:
            if current is None:
                self.pagetables.do_set_pmd(mm, pidx, reply.head, reply.shmem, accounted=True)
                self._map_around(mm, vma, reply, install=False)
                return "pmd"
            self.rmap.add(reply.head, pmd=-1)  # lost a race with another fault: look again
            self._map_around(mm, vma, reply, install=False)
            return None
        if isinstance(current, int) or (current is not None and current.ptes[slot]):
            self.rmap.add(reply.pfn, pte=-1)
            self._map_around(mm, vma, reply, install=False)
            return None
        # With the PMD none, fault-around may map nothing (see _first_folio_at_eof).
        refused = nr_around > 1 and current is None and not reply.shmem and self._first_folio_at_eof(vma, addr, reply)
        # A large folio that lies inside the VMA and this PMD's page table is mapped whole
        # (finish_fault, filemap_map_folio_range), a regular file's only inside i_size.
        whole = False
        nr = 1 << reply.order
        folio_start = addr - ((reply.pfn - reply.head) << PAGE_SHIFT)
        folio_end = folio_start + (nr << PAGE_SHIFT)
        first = (folio_start - haddr) >> PAGE_SHIFT
        if (
            nr > 1
            and max(vma.start, haddr) <= folio_start
            and folio_end <= min(vma.end, haddr + HPAGE_PMD_SIZE)
            and self._can_map_large(vma, vma.pgoff_at(folio_end) - 1, reply.shmem)
        ):
            if reply.thp and current is None and not vma.nohugepage:
                # finish_fault: the table went (retracted while we waited on the page lock),
                # so do_set_pmd maps the THP rather than a PTE in a new table.
                self.rmap.add(reply.pfn, pte=-1)
                self.pagetables.do_set_pmd(mm, pidx, reply.head, reply.shmem, accounted=False)
                self._map_around(mm, vma, reply, install=False)
                return "pmd"
            # finish_fault (no fault-around ran, the folio was not in the cache for it, or it
            # mapped nothing) maps the whole folio only where every PTE of it is none
            # (pte_range_none), else the one page; fault-around (filemap_map_folio_range) maps
            # it whole around what is present, but a regular file's only if it ends before the
            # file's last page ("file_end >= folio_next_index(folio)"), else just the window.
            if nr_around > 1 and not reply.major and not reply.allocated and not refused:
                whole = self._can_map_large(vma, vma.pgoff_at(folio_end), reply.shmem)
            else:
                whole = current is None or not any(current.ptes[first : first + nr])
        flags = (PTE_THP if reply.thp else 0) | (PTE_SHMEM if reply.shmem else 0)
        if write:
            flags |= PTE_WRITE | PTE_DIRTY
        elif reply.shmem and vma.writes_file:
            flags |= PTE_WRITE  # shmem wants no write-notify: vm_page_prot is writable
        self.pagetables.set_pte_at(mm, pidx, slot, pte_make(reply.pfn, flags))
        if reply.around:
            self._map_around(mm, vma, reply, install=not refused)
        if whole:
            self.pagetables.map_folio_ptes(mm, pidx, first, reply.head, nr, flags)
        return "major" if reply.major else "minor"

    def _first_folio_at_eof(self, vma: Vma, addr: int, reply: m.PageAnswer) -> bool:
        """Whether the first folio filemap_map_pages finds in the fault-around window holds the
        file's last page. It then skips filemap_map_pmd (6.18's i_size rule, "file_end >=
        folio_next_index(folio)" with file_end the last page's index: a folio that ends right at
        EOF fails it too), so with the PMD none no page table is installed,
        pte_offset_map_lock() finds none, and nothing of the window is mapped; the fault maps
        its page (finish_fault) and the next fault the window. The scan met the fault-around
        pages the collapser found mappable, and the fault's own page unless the lookup filled
        it (a shmem hole) or read it after the scan (a large-folio file's fault is retried after
        its read, so its scan comes after)."""
        f = self.files.get(vma.ino)
        if f is None:
            return False
        # The last page of the folio of each page the scan met (PMD-order folios are aligned).
        lasts = {i: i | (HPAGE_PMD_NR - 1) if thp else i for i, _, thp in reply.around}
        if not reply.allocated and (not reply.major or f.large_folio):
            index = vma.pgoff_at(addr)
            lasts[index] = index - (reply.pfn - reply.head) + (1 << reply.order) - 1
        return bool(lasts) and lasts[min(lasts)] >= ((f.size + PAGE_SIZE - 1) >> PAGE_SHIFT) - 1

    def _large_folio(self, vma: Vma) -> bool:
        f = self.files.get(vma.ino)
        return f is not None and f.large_folio

    def _can_map_large(self, vma: Vma, last: int, shmem: bool) -> bool:
        """The i_size rule of finish_fault and filemap_map_pages (6.18, "mm/memory: do not
        populate page table entries beyond i_size"): a regular file's large folio, whose last
        page is ``last``, is mapped whole, or by a PMD, only if it ends inside i_size, so an
        access past EOF still raises SIGBUS; shmem is exempt (it has long mapped PMDs across
        i_size)."""
        if shmem:
            return True
        f = self.files.get(vma.ino)
        return f is not None and last < (f.size + PAGE_SIZE - 1) >> PAGE_SHIFT

    def _around(self, vma: Vma, addr: int, entry: PteTable | None, nr: int) -> tuple[int, ...]:
        """do_fault_around's window, minus the fault itself and the PTEs already present: it
        starts at the fault_around_bytes-aligned block holding ``addr``, raised to the VMA's start
        (and the PMD's), and runs fault_around_pages from there, cut at the VMA's end and the
        PMD's. Raised at a VMA start, the window is shifted, not shortened (``to_pte = from_pte +
        nr_pages``)."""
        haddr = addr & ~(HPAGE_PMD_SIZE - 1)
        lo = max(addr & ~((nr << PAGE_SHIFT) - 1), vma.start, haddr)
        hi = min(lo + (nr << PAGE_SHIFT), vma.end, haddr + HPAGE_PMD_SIZE)
        first = vma.pgoff_at(lo)
        skip = vma.pgoff_at(addr)
        pgoffs = range(first, first + ((hi - lo) >> PAGE_SHIFT))
        if entry is None:
            window = list(pgoffs)
        else:
            slot = (lo >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)
            window = list(compress(pgoffs, map(not_, entry.ptes[slot : slot + len(pgoffs)])))
        window.remove(skip)  # the fault's own page, whose PTE is none
        return tuple(window)

    def _map_around(self, mm: Mm, vma: Vma, reply: m.PageAnswer, install: bool) -> None:
        """Map the fault-around pages the collapser accounted; hand back those that lost a race.
        They are mapped with vm_page_prot (set_pte_range on a read fault): writable, clean, in a
        shared writable shmem mapping; read-only elsewhere."""
        if not reply.around:
            return
        if not install:
            self.rmap.unmap_ptes([pfn for _, pfn, _ in reply.around])
            return
        shmem = (PTE_SHMEM | PTE_WRITE if vma.writes_file else PTE_SHMEM) if reply.shmem else 0
        # vma.addr_of(index) is page number base + index.
        self.pagetables.map_file_ptes(mm, (vma.start >> PAGE_SHIFT) - vma.pgoff, reply.around, shmem)

    def page_mkclean(self, ino: int, indices: tuple[int, ...]) -> None:
        """folio_mkclean for pages of a regular file going under writeback: every PTE of a shared
        writable mapping that maps one goes read-only and clean, so the next write is a
        write-protect fault (page_mkwrite) that dirties the page again. An rmap walk: no mmap
        lock. Private mappings' file PTEs are read-only already."""
        for mm, vma in self.files.mappings(ino):
            if not vma.writes_file:
                continue
            lo, hi = vma.pgoff, vma.pgoff_at(vma.end)
            for index in indices:
                if not lo <= index < hi:
                    continue
                addr = vma.addr_of(index)
                table = mm.pmds.get(addr >> HPAGE_PMD_SHIFT)
                if isinstance(table, PteTable):
                    slot = (addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)
                    pte = table.ptes[slot]
                    if pte & PTE_WRITE and not pte & PTE_ANON:
                        table.ptes[slot] = pte & ~(PTE_WRITE | PTE_DIRTY)

    def _anon_full(self) -> bool:
        """A CoW copy would take the anon pages past the modelled memory: VM_FAULT_OOM, which
        the fault answers ``nomem`` as for a page-cache allocation that failed. (The page cache
        has the same memory to itself on the collapser's side.)"""
        return len(self.anon.mapcount) >= self.knobs.mem_total_mb << (20 - PAGE_SHIFT)

    def _cow(self, mm: Mm, vma: Vma, pidx: int, slot: int, pte: int) -> str:
        """wp_page_copy (or reuse of an exclusive anon page)."""
        table = mm.pmds[pidx]
        assert isinstance(table, PteTable)
        if pte & PTE_ANON and self.anon.exclusive(pte_pfn(pte)):
            table.ptes[slot] = pte | PTE_WRITE
            return "minor"
        if self._anon_full():
            return "nomem"
        self.pagetables.zap_pte(mm, table, slot)
        vma.anon_vma_prepare()
        self.pagetables.set_pte_at(mm, pidx, slot, pte_make(self.anon.alloc(), PTE_ANON | PTE_WRITE))
        self.vm["thpsplit_cow_fault"] += 1
        return "minor"

    def touch(
        self, pid: int, addr: int, length: int, write: bool = False, stride: int = PAGE_SIZE
    ) -> dict[str, Any] | Generator[Any, Any, dict[str, Any]]:
        """Fault every ``stride`` bytes of [addr, addr+length); counts per outcome. A touch whose
        every access hits (changes nothing but ``pgfault``) is answered at once; otherwise the
        rest, from its first access that does not, is a task, which may wait."""
        if stride <= 0 or length < 0:
            raise UserError("EINVAL", "stride must be positive and length non-negative")
        mm = find_mm(self.mms, pid)
        counts: dict[str, int] = {}  # not a Counter: its missing keys cost a Python call each
        hits = self._hits
        a, end = addr, addr + length
        while a < end and (n := hits(mm, a, end, write, stride)):
            counts["hit"] = counts.get("hit", 0) + n
            a += n * stride
        if a >= end:
            return counts
        return self._touch(pid, mm, a, end, write, stride, counts)

    def _touch(
        self, pid: int, mm: Mm, a: int, end: int, write: bool, stride: int, counts: dict[str, int]
    ) -> Generator[Any, Any, dict[str, Any]]:
        mms, hits = self.mms, self._hits
        missed = True  # whether the access at ``a`` is known not to hit (touch() found so)
        while a < end:
            if self.actor.cancelled():
                raise UserError("ECANCELED", f"touch of process {pid} cancelled at {a:#x}: its caller went away")
            # Accesses to what is mapped already are counted in runs, without a task step each;
            # the mm must still be the one the touch began with (the slow path looks it up).
            if not missed and mms.get(pid) is mm and (n := hits(mm, a, end, write, stride)):
                counts["hit"] = counts.get("hit", 0) + n
                a += n * stride
                continue
            missed = False
            if not write:
                nxt, _ = yield from self.read_faults(mm, a, end, stride, counts)
                if nxt != a:
                    a = nxt
                    continue
            result = yield from self.do_user_addr_fault(pid, a, write)
            counts[result] = counts.get(result, 0) + 1
            a += stride
            if result == "sigsegv" and a < end:
                # Every access up to the end of this hole (or of the VMA that refused it) faults
                # the same way: count them at once, so a touch costs O(what is mapped), not
                # O(its length) -- 100 TiB of nothing must not hold the daemon for hours.
                skip = -(-(min(mm.sigsegv_end(a - stride), end) - a) // stride)
                if skip > 0:
                    counts["sigsegv"] += skip
                    self.vm["pgfault"] += skip
                    a += skip * stride
        return counts

    # -- batched read faults (GUP's populate) --------------------------------------------------

    def read_faults(
        self, mm: Mm, addr: int, end: int, stride: int, counts: dict[str, int] | None
    ) -> Generator[Any, Any, tuple[int, str | None]]:
        """Read faults every ``stride`` bytes of [addr, end) inside the VMA holding ``addr``,
        looked up as one :class:`~shared.protocol.messages.LookupPages` (populate_vma_page_range
        runs them inside one mmap_lock read section, so no khugepaged work comes between them),
        with the outcomes :meth:`do_user_addr_fault` would have one after the other, added to
        ``counts`` (a touch). Without ``counts`` (a populate) the batch stops at a SIGBUS and a
        PMD mapping is passed over whole. Returns where to go on and ``"sigbus"`` when a populate
        stopped there; where to go on is ``addr`` itself when the batch cannot take it (no
        readable VMA: the caller faults it alone, which reports why; a large-folio file)."""
        yield from self.locks.mmap_read_lock(mm)
        try:
            return (yield from self._read_batch(mm, addr, end, stride, counts))
        finally:
            self.locks.mmap_read_unlock(mm)

    def _read_batch(
        self, mm: Mm, addr: int, end: int, stride: int, counts: dict[str, int] | None
    ) -> Generator[Any, Any, tuple[int, str | None]]:
        vma = mm.find_vma(addr)
        if vma is None or mm.exiting or not vma.prot & PROT_READ or self._large_folio(vma) or vma.flags & VM_READ_HINTS:
            # A large-folio file's faults read ahead by the fault's own VMA (exec_end, async
            # readahead marks), and a VMA's readahead hints (MADV_RANDOM, MADV_SEQUENTIAL) are
            # its own too, which the batch does not carry: they go one by one.
            return addr, None
        # Plan: the accesses that find a PTE (or a PMD) are hits now; each other one is a fault
        # of the batch, with its do_fault_around window and the window's present pages.
        nr = self.knobs.fault_around_pages()
        limit = min(end, vma.end)
        shmem = vma.ino in self.shmem_inos
        pmds = mm.pmds
        start, vma_end = vma.start, vma.end
        base = vma.pgoff - (start >> PAGE_SHIFT)  # the file index of page number p is base + p
        faults: list[int] = []
        addrs: list[int] = []
        hits_before: list[int] = []  # hits planned before each fault
        present: list[int] = []
        hits = pages = 0
        a = addr
        window_bytes = nr << PAGE_SHIFT
        # The batch's bounds: faults left, and the window pages a next fault may find taken.
        left, most = MAX_BATCH_FAULTS, MAX_BATCH_WINDOW_PAGES - nr
        room = pages <= most
        # One PMD range at a time (its entry looked up once), each fault in order.
        while a < limit and room:
            pidx = a >> HPAGE_PMD_SHIFT
            entry = pmds.get(pidx)
            haddr = pidx << HPAGE_PMD_SHIFT
            stop = min(haddr + HPAGE_PMD_SIZE, limit)
            if isinstance(entry, int):
                # PMD-mapped: a touch hits at every access up to its end; a populate's one fault
                # finds the PMD and goes on at its end.
                if counts is not None:
                    n = -(-(stop - a) // stride)
                    hits += n
                    a += n * stride
                else:
                    hits += 1
                    a = stop
                continue
            ptes = entry.ptes if entry is not None else _NO_PTES
            flags = -1
            hi = -1  # the end of the current fault-around window (none yet)
            while a < stop:
                page = a & ~(PAGE_SIZE - 1)
                if ptes[(page >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)]:
                    hits += 1
                    a += stride
                    continue
                if flags < 0:
                    suitable = not vma.nohugepage and vma.pmd_suitable(haddr)
                    # The first fault of the batch in a PMD without a table may map a PMD; the
                    # ones after it find the table it made (a fault that fails ends the batch).
                    later = FAULT_THP_OK if suitable and shmem else 0
                    flags = FAULT_PMD_OK | FAULT_THP_OK if suitable and entry is None else later
                else:
                    flags = later
                if nr <= 1:
                    first, n = base + (page >> PAGE_SHIFT), 1
                elif page >= hi:
                    # A new window (the accesses only go up): its present pages are sent once.
                    lo = max(page & ~(window_bytes - 1), start, haddr)
                    hi = min(lo + window_bytes, vma_end, haddr + HPAGE_PMD_SIZE)
                    n = (hi - lo) >> PAGE_SHIFT
                    first = base + (lo >> PAGE_SHIFT)
                    slot = (lo >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)
                    present += compress(range(first, first + n), ptes[slot : slot + n])
                faults += (base + (page >> PAGE_SHIFT), first, first + n, flags)
                addrs.append(a)
                hits_before.append(hits)
                pages += n
                a += stride
                left -= 1
                if not left or pages > most:
                    room = False
                    break
        if not addrs:
            self._count_hits(counts, hits)
            return a, None
        self.locks.mmap_read_unlock(mm)
        reply = yield Call(
            m.LookupPages(
                self.actor.new_req(), vma.ino, vma.hugepage, tuple(faults), tuple(present), counts is None
            )
        )
        records = _records(reply.answers)
        relocked = mm.lock.try_read()
        if not relocked or mm.exiting or mm.find_vma(addr) is not vma:
            # As one fault does (VM_FAULT_RETRY): hand everything back and start again, here.
            self._hand_back(mm, vma, records, 0)
            while not relocked:
                yield self.locks.wait(mm)
                relocked = mm.lock.try_read()
            self._count_hits(counts, hits_before[0])
            return addrs[0], None
        if not reply.done:
            self._count_hits(counts, hits_before[0])
            return addrs[0], None
        k = 0
        n_records = len(records)
        next_pos = records[0][0] if records else -1  # the position of the next record
        hit = 0
        outcomes: dict[str, int] = {}
        try:
            for pos in range(reply.done):
                fa = addrs[pos]
                page = fa & ~(PAGE_SIZE - 1)
                entry = pmds.get(page >> HPAGE_PMD_SHIFT)
                mapped = isinstance(entry, int) or (
                    entry is not None and entry.ptes[(page >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)] != 0
                )
                looked_up = pos == next_pos
                if looked_up == mapped:
                    # Our page table moved while the batch was out (another thread's fault mapped
                    # a page, or unmapped one): hand back what is left and go on from here.
                    hit += hits_before[pos]
                    self._hand_back(mm, vma, records, k)
                    return fa, None
                if not looked_up:
                    hit += 1
                    continue
                answer = records[k][1]
                k += 1
                next_pos = records[k][0] if k < n_records else -1
                result = str(answer.status)
                if answer.status != OK:
                    # Past EOF, fault-around has mapped what the cache holds below it first.
                    self._map_around(mm, vma, answer, install=True)
                else:
                    mapped_as = self._map_answer(mm, vma, page, False, False, nr, answer)
                    if mapped_as is None:
                        hit += hits_before[pos]
                        self._hand_back(mm, vma, records, k)
                        return fa, None
                    result = mapped_as
                outcomes[result] = outcomes.get(result, 0) + 1
                if counts is None and result == SIGBUS:
                    hit += hits_before[pos]
                    return fa, result
            if reply.done == len(addrs):
                hit += hits
                return a, None
            # The batch stopped early (after a large folio, or before a locked page): go on after
            # its last fault (a populate past the PMD it mapped).
            hit += hits_before[reply.done - 1]
            last = addrs[reply.done - 1]
            if counts is None and isinstance(pmds.get(last >> HPAGE_PMD_SHIFT), int):
                return (last | (HPAGE_PMD_SIZE - 1)) + 1, None
            return last + stride, None
        finally:
            self.vm["pgfault"] += sum(outcomes.values())
            if counts is not None:
                for result, n in outcomes.items():
                    counts[result] = counts.get(result, 0) + n
            self._count_hits(counts, hit)

    def _count_hits(self, counts: dict[str, int] | None, n: int) -> None:
        if n:
            self.vm["pgfault"] += n
            if counts is not None:
                counts["hit"] = counts.get("hit", 0) + n

    def _hand_back(self, mm: Mm, vma: Vma, records: list[tuple[int, m.PageAnswer]], k: int) -> None:
        """Give back the mappings the collapser accounted for the answers from the ``k``-th on."""
        for _, answer in records[k:]:
            if answer.status != OK:
                self._map_around(mm, vma, answer, install=False)
                continue
            if answer.pmd:
                self.rmap.add(answer.head, pmd=-1)
            else:
                self.rmap.add(answer.pfn, pte=-1)
            self._map_around(mm, vma, answer, install=False)

    # -- GUP pins -----------------------------------------------------------------------------

    def pin(self, pid: int, addr: int) -> Generator[Any, Any, dict[str, Any]]:
        """pin_user_pages_fast on one page: fault it in if needed, then take a pin."""
        mm = find_mm(self.mms, pid)
        page = addr & ~(PAGE_SIZE - 1)
        result = yield from self.do_user_addr_fault(pid, page, False)
        if result in ("sigsegv", "sigbus"):
            raise UserError("EFAULT", f"cannot pin {addr:#x}: {result}")
        pfn = self.pagetables.follow_page(mm, page)
        if pfn >= ANON_PFN_BASE:
            self.anon.pin(pfn)
        else:
            self.rmap.add(pfn, pin=1)
        mm.pins.setdefault(page, []).append(pfn)
        return {"pid": pid, "addr": page, "pfn": pfn}

    def unpin(self, pid: int, addr: int) -> dict[str, Any]:
        mm = find_mm(self.mms, pid)
        page = addr & ~(PAGE_SIZE - 1)
        pfns = mm.pins.get(page)
        if not pfns:
            raise UserError("EINVAL", f"no pin at {page:#x} in process {pid}")
        pfn = pfns.pop()
        if not pfns:
            del mm.pins[page]
        self._unpin(pfn)
        self.actor.flush()  # a plain call, not a task: nothing else pushes the row out
        return {"pid": pid, "addr": page, "pfn": pfn}

    def _unpin(self, pfn: int) -> None:
        if pfn >= ANON_PFN_BASE:
            self.anon.unpin(pfn)
        else:
            self.rmap.add(pfn, pin=-1)

    def unpin_range(self, mm: Mm, start: int, end: int) -> None:
        """Pins outlive munmap in the kernel; here the modelled driver drops them with the VMA."""
        for page in [p for p in mm.pins if start <= p < end]:
            for pfn in mm.pins.pop(page):
                self._unpin(pfn)

    def unpin_all(self, mm: Mm) -> None:
        """The process exits: its pins go with it."""
        for pfns in mm.pins.values():
            for pfn in pfns:
                self._unpin(pfn)
        mm.pins.clear()


def _records(flat: tuple[int, ...]) -> list[tuple[int, m.PageAnswer]]:
    """A :class:`~shared.protocol.messages.PageAnswers`' records: (position, answer)."""
    out = []
    i, n = 0, len(flat)
    while i < n:
        pos, status, pfn, head, flags, nr = flat[i : i + 6]
        i += 6
        around = m.around_pages(flat[i : i + 3 * nr])
        i += 3 * nr
        out.append(
            (
                pos,
                m.PageAnswer(
                    0,
                    ANSWER_STATUS[status],
                    pfn,
                    head,
                    bool(flags & ANSWER_THP),
                    bool(flags & ANSWER_PMD),
                    bool(flags & ANSWER_MAJOR),
                    bool(flags & ANSWER_SHMEM),
                    around,
                    bool(flags & ANSWER_ALLOCATED),
                    flags >> m.ANSWER_ORDER_SHIFT,
                ),
            )
        )
    return out
