"""Page tables: every change to a PTE or a PMD goes through :class:`PageTables`, which keeps what
the kernel keeps beside them (the rmap, the mm counters, nr_ptes) and Kirill's per-PMD mark.

The mark says "this PTE table maps only subpages of one THP, each at its own slot: try to map it
with a PMD". It is set when a PTE that belongs is installed in a table with nothing foreign, or
when retract_page_tables' trylock fails (retry policy ``per-pmd``), and cleared by anything
foreign, by freeing the table, or by the remapper's pass once it has tried. :attr:`marked`
indexes the marked tables so that pass need not walk every page table.
"""

from __future__ import annotations

import operator
from collections import Counter

import numpy as np

from remapd.mm import (
    PTE_ANON,
    PTE_DIRTY,
    PTE_PRESENT,
    PTE_SHIFT,
    PTE_SHMEM,
    PTE_THP,
    PTE_WRITE,
    Mm,
    PteTable,
    Vma,
    pte_make,
    pte_pfn,
)
from remapd.rmap import AnonPages, RmapBatch
from shared.tracepoints import get_logger, mm_pointer
from shared.units import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SHIFT,
    HPAGE_PMD_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from shared.vm import PROT_WRITE

log = get_logger("remapd")

# The PTE bits _zap_ptes tests on a table's entries, as numpy scalars made once.
_SHIFT = np.uint64(PTE_SHIFT)
_ANON = np.uint64(PTE_ANON)
_THP = np.uint64(PTE_THP)
_SHMEM = np.uint64(PTE_SHMEM)
_AROUND_THP = operator.itemgetter(2)  # of a fault-around page (index, pfn, thp)


def mm_counter(pte: int) -> str:
    """The rss counter a page mapped by ``pte`` counts in (mm_counter)."""
    if pte & PTE_ANON:
        return "MM_ANONPAGES"
    return "MM_SHMEMPAGES" if pte & PTE_SHMEM else "MM_FILEPAGES"


class PageTables:
    """PTE/PMD install and zap for every mm, with rmap rows (file pages), anon mapcounts, mm
    counters, ``thp_file_mapped``/``thp_split_pmd`` and the per-PMD mark."""

    def __init__(self, rmap: RmapBatch, anon: AnonPages, vm: Counter[str]):
        self.rmap = rmap
        self.anon = anon
        self.vm = vm
        self.marked: set[tuple[int, int]] = set()  # (pid, pmd index) of every marked PTE table

    # -- PTE tables and the mark --------------------------------------------------------------

    def pte_alloc(self, mm: Mm, pidx: int) -> PteTable:
        """The PTE table at ``pidx``, allocated if the PMD is none."""
        entry = mm.pmds.get(pidx)
        if entry is None:
            entry = mm.pmds[pidx] = PteTable()
            mm.nr_ptes += 1
        assert isinstance(entry, PteTable)
        return entry

    def pte_free(self, mm: Mm, pidx: int) -> None:
        """Free the (empty) PTE table at ``pidx``; the PMD is none afterwards."""
        del mm.pmds[pidx]
        mm.nr_ptes -= 1
        self.marked.discard((mm.pid, pidx))

    def set_mark(self, mm: Mm, pidx: int, table: PteTable, why: str) -> None:
        """Mark the table for a collapse try, unless something foreign is mapped there."""
        if not table.nr_foreign and not table.mark:
            table.mark = True
            self.marked.add((mm.pid, pidx))
            log.debug("mark_set", mm=mm_pointer(mm.pid), addr=pidx << HPAGE_PMD_SHIFT, why=why)

    def clear_mark(self, mm: Mm, pidx: int, table: PteTable, why: str) -> None:
        table.mark = False
        self.marked.discard((mm.pid, pidx))
        log.debug("mark_cleared", mm=mm_pointer(mm.pid), addr=pidx << HPAGE_PMD_SHIFT, why=why)

    # -- PTEs ---------------------------------------------------------------------------------

    def set_pte_at(self, mm: Mm, pidx: int, slot: int, pte: int) -> None:
        """Install a PTE, allocating its table. The page's reference and mapcount are the
        caller's to account (a file page's by the collapser's lookup, an anon page's by
        :class:`AnonPages`). A subpage that belongs marks the table; anything foreign unmarks it."""
        table = mm.pmds.get(pidx)
        if not isinstance(table, PteTable):  # every fault comes here: no call when it exists
            table = self.pte_alloc(mm, pidx)
        table.set(slot, pte)
        mm.rss["MM_ANONPAGES" if pte & PTE_ANON else "MM_SHMEMPAGES" if pte & PTE_SHMEM else "MM_FILEPAGES"] += 1
        if pte & PTE_THP and (pte >> PTE_SHIFT) & (HPAGE_PMD_NR - 1) == slot:  # pte_belongs
            if not table.mark:
                self.set_mark(mm, pidx, table, "fault")
        elif table.mark:
            self.clear_mark(mm, pidx, table, "foreign")

    def map_file_ptes(self, mm: Mm, base: int, pages: tuple[tuple[int, int, bool], ...], flags: int) -> None:
        """:meth:`set_pte_at` for each (index, pfn, thp) of ``pages`` (fault-around's, whose
        mappings the collapser accounted) at page number ``base + index``, with ``flags`` (and
        ``PTE_THP`` for a THP's subpage), where the PTE is none; where it is not (or a PMD maps
        the range), the mapping goes back as an rmap row. The same PTEs, counts, marks and rows,
        in the same order, as one call each: written out, as every fault-around page comes here,
        ~500k a second."""
        if not pages:
            return
        pmds, give_back = mm.pmds, self.rmap.add
        pidx = (base + min(pages)[0]) >> 9
        table: PteTable | int | None = pmds.get(pidx)
        if (base + max(pages)[0]) >> 9 == pidx and not isinstance(table, int) and not any(map(_AROUND_THP, pages)):
            # The common case, small pages within one table: each is foreign, so the first PTE
            # installed clears the mark, and the counts add up at the end.
            if table is None:
                table = self.pte_alloc(mm, pidx)
            ptes = table.ptes
            off = base - (pidx << 9)  # the slot of index i
            pte_flags = flags | PTE_PRESENT
            n = 0
            for index, pfn, _ in pages:
                slot = off + index
                if ptes[slot]:
                    give_back(pfn, -1)
                    continue
                ptes[slot] = (pfn << PTE_SHIFT) | pte_flags  # pte_make
                n += 1
            if n:
                table.nr += n
                table.nr_foreign += n
                if table.mark:
                    self.clear_mark(mm, pidx, table, "foreign")
                mm.rss[mm_counter(flags)] += n
            return
        pidx = -1
        n = 0
        for index, pfn, thp in pages:
            page = base + index
            if page >> 9 != pidx:
                pidx = page >> 9
                table = pmds.get(pidx)
            slot = page & (HPAGE_PMD_NR - 1)
            if isinstance(table, int) or (table is not None and table.ptes[slot]):
                give_back(pfn, -1)
                continue
            if table is None:
                table = self.pte_alloc(mm, pidx)
            table.ptes[slot] = (pfn << PTE_SHIFT) | flags | PTE_PRESENT | (PTE_THP if thp else 0)  # pte_make
            table.nr += 1
            n += 1
            if thp and pfn & (HPAGE_PMD_NR - 1) == slot:  # pte_belongs
                if not table.mark:
                    self.set_mark(mm, pidx, table, "fault")
            else:
                table.nr_foreign += 1
                if table.mark:
                    self.clear_mark(mm, pidx, table, "foreign")
        if n:
            mm.rss[mm_counter(flags)] += n

    def map_folio_ptes(self, mm: Mm, pidx: int, first: int, head: int, nr: int, flags: int) -> None:
        """Map with PTEs every page of the ``nr``-page folio ``head`` whose PTE is none, its first
        page at slot ``first`` of the table at ``pidx``, which holds it whole (set_pte_range over a
        whole folio, as finish_fault and filemap_map_folio_range do), each with its rmap row (a PTE
        mapping and a page reference). A PMD-order folio fills the table, subpage *i* at slot *i*:
        each belongs, so the table keeps its mark; a smaller folio's pages are foreign."""
        table = self.pte_alloc(mm, pidx)
        ptes = table.ptes
        add = self.rmap.add
        n = 0
        for i in range(nr):
            slot = first + i
            if not ptes[slot]:
                pfn = head + i
                table.set(slot, pte_make(pfn, flags))
                add(pfn, pte=1)
                n += 1
        if n:
            mm.rss[mm_counter(flags)] += n
            if nr == HPAGE_PMD_NR:
                if not table.mark:
                    self.set_mark(mm, pidx, table, "fault")
            elif table.mark:
                self.clear_mark(mm, pidx, table, "foreign")

    def change_protection(self, mm: Mm, vma: Vma, start: int, end: int) -> None:
        """change_pte_range over [start, end) of ``vma``, which has its new protection: where it
        may not write, every PTE loses its write bit (pte_modify); where it
        may, a shared mapping's shmem PTEs take vm_page_prot's write bit (shmem wants no
        write-notify), and under MM_CP_TRY_CHANGE_WRITABLE a regular file's dirty PTEs
        (can_change_shared_pte_writable) and a private mapping's exclusive anon PTEs
        (can_change_private_pte_writable) become writable again. PMD mappings keep no write bit
        in the model, and a file PTE made read-only loses its dirty bit too (the folio is dirty
        already: the model marks it at the write), so a regular file's page takes a
        write-protect fault where the kernel's kept dirty PTE would not. Only tables that exist
        are visited."""
        writable = bool(vma.prot & PROT_WRITE)
        lo, hi = start >> HPAGE_PMD_SHIFT, ((end - 1) >> HPAGE_PMD_SHIFT) + 1
        pidxs = range(lo, hi) if hi - lo <= len(mm.pmds) else sorted(p for p in mm.pmds if lo <= p < hi)
        for pidx in pidxs:
            table = mm.pmds.get(pidx)
            if not isinstance(table, PteTable) or not table.nr:
                continue
            base = pidx << HPAGE_PMD_SHIFT
            first = max(start - base, 0) >> PAGE_SHIFT
            last = min((end - base) >> PAGE_SHIFT, HPAGE_PMD_NR)
            ptes = table.ptes
            for slot in range(first, last):
                pte = ptes[slot]
                if not pte:
                    continue
                if not writable:
                    ptes[slot] = pte & ~PTE_WRITE if pte & PTE_ANON else pte & ~(PTE_WRITE | PTE_DIRTY)
                elif pte & PTE_ANON:
                    if self.anon.exclusive(pte_pfn(pte)):
                        ptes[slot] = pte | PTE_WRITE
                elif vma.shared and pte & (PTE_SHMEM | PTE_DIRTY):
                    ptes[slot] = pte | PTE_WRITE

    def zap_pte(self, mm: Mm, table: PteTable, slot: int) -> None:
        """Clear one present PTE and drop the mapping it held (zap_present_ptes)."""
        pte = table.ptes[slot]
        table.set(slot, 0)
        mm.update_hiwater_rss()
        mm.rss[mm_counter(pte)] -= 1
        pfn = pte_pfn(pte)
        if pte & PTE_ANON:
            self.anon.remove(pfn)
        else:
            self.rmap.add(pfn, pte=-1)

    def follow_page(self, mm: Mm, addr: int) -> int:
        """The pfn mapped at ``addr``, which must be mapped (follow_page_mask)."""
        entry = mm.pmds.get(addr >> HPAGE_PMD_SHIFT)
        if isinstance(entry, int):
            return pte_pfn(entry) + ((addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1))
        assert entry is not None
        return pte_pfn(entry.ptes[(addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)])

    # -- PMDs ---------------------------------------------------------------------------------

    def do_set_pmd(self, mm: Mm, pidx: int, head: int, shmem: bool, accounted: bool) -> None:
        """Map the PMD-order folio ``head`` with one PMD entry (do_set_pmd; khugepaged's
        set_huge_pmd does the same). ``accounted``: the collapser already counted the PMD
        mapping (a fault's lookup does; a retract's install does not)."""
        mm.pmds[pidx] = pte_make(head, PTE_SHMEM if shmem else 0)
        mm.rss["MM_SHMEMPAGES" if shmem else "MM_FILEPAGES"] += HPAGE_PMD_NR
        if not accounted:
            self.rmap.add(head, pmd=1)
        self.vm["thp_file_mapped"] += 1
        log.debug("pmd_install", mm=mm_pointer(mm.pid), addr=pidx << HPAGE_PMD_SHIFT, hpage_pfn=head)

    def zap_huge_pmd(self, mm: Mm, pidx: int, split: bool) -> None:
        """Clear a PMD mapping. ``split``: the PMD is being split rather than unmapped whole
        (__split_huge_pmd), which for a file THP also just clears it: the range refaults as PTEs."""
        entry = mm.pmds.pop(pidx)
        assert isinstance(entry, int)
        rss = "MM_SHMEMPAGES" if entry & PTE_SHMEM else "MM_FILEPAGES"
        mm.update_hiwater_rss()
        mm.rss[rss] -= HPAGE_PMD_NR
        self.rmap.add(pte_pfn(entry), pmd=-1)
        if split:
            self.vm["thp_split_pmd"] += 1

    # -- ranges -------------------------------------------------------------------------------

    def zap_page_range(
        self,
        mm: Mm,
        start: int,
        end: int,
        anon: bool = True,
        pfns: np.ndarray | None = None,
        reclaim_pt: bool = False,
    ) -> None:
        """Clear PTEs and PMDs in [start, end); a PMD the range cuts is split. ``anon=False``
        keeps private CoW copies; ``pfns`` limits the zap to mappings of those pages (try_to_unmap,
        whose TTU_SPLIT_HUGE_PMD splits a PMD that maps them: unmap_folio before a folio split).
        ``reclaim_pt`` (MADV_DONTNEED's zap_details, CONFIG_PT_RECLAIM, 6.13+): zap_pte_range()
        frees a PTE table the zap covered whole (reclaim_pt_is_enabled: at least PMD_SIZE of it)
        and left empty (try_get_and_clear_pmd, mm/pt_reclaim.c), so the PMD is none again."""
        only = pfns
        if only is not None and np.count_nonzero(only[1:] <= only[:-1]):
            only = np.unique(only)  # collapse_file's come in ascending order
        for pidx in mm.pmd_indices(start, end):
            entry = mm.pmds[pidx]
            base = pidx << HPAGE_PMD_SHIFT
            if isinstance(entry, int):
                if pfns is None:
                    self.zap_huge_pmd(mm, pidx, split=not (start <= base and base + HPAGE_PMD_SIZE <= end))
                elif pte_pfn(entry) in pfns:
                    self.zap_huge_pmd(mm, pidx, split=True)
                continue
            lo = max(start, base)
            hi = min(end, base + HPAGE_PMD_SIZE)
            if entry.nr:
                self._zap_ptes(mm, entry, (lo - base) >> PAGE_SHIFT, (hi - base) >> PAGE_SHIFT, anon, only)
            if reclaim_pt and hi - lo == HPAGE_PMD_SIZE and not entry.nr:
                self.pte_free(mm, pidx)

    def _zap_ptes(
        self, mm: Mm, table: PteTable, first: int, stop: int, anon: bool, only: np.ndarray | None
    ) -> None:
        """:meth:`zap_pte` of every present PTE in slots [first, stop) of ``table`` (anon ones
        only with ``anon``; with ``only``, those mapping one of its pfns), the file pages' in one
        go: their rmap rows in slot order, the table's counts and the mm counters."""
        ptes = np.frombuffer(table.ptes, dtype=np.uint64)
        window = ptes[first:stop]
        chosen = window != 0
        if only is not None and len(only):
            # Membership in the sorted pfns: where each would go, and whether it is there.
            mapped = (window >> _SHIFT).astype(np.int64)
            at = only.searchsorted(mapped)
            at[at == len(only)] = 0
            chosen &= only[at] == mapped
        elif only is not None:
            return
        is_anon = (window & _ANON) != 0
        file_slots = (chosen & ~is_anon).nonzero()[0] + first
        anon_slots = (chosen & is_anon).nonzero()[0] + first if anon else ()
        if len(file_slots):
            gone = ptes[file_slots]
            thp = (gone & _THP) != 0
            belongs = 0  # PTEs of a PMD-order page at its own slot (none unless some map a THP)
            if np.count_nonzero(thp):
                slot_of = (gone >> _SHIFT) & np.uint64(HPAGE_PMD_NR - 1)
                belongs = int(np.count_nonzero(thp & (slot_of == file_slots.astype(np.uint64))))
            ptes[file_slots] = 0
            n = len(file_slots)
            shmem = int(np.count_nonzero(gone & _SHMEM))
            table.nr -= n
            table.nr_foreign -= n - belongs
            mm.update_hiwater_rss()
            mm.rss["MM_SHMEMPAGES"] -= shmem
            mm.rss["MM_FILEPAGES"] -= n - shmem
            self.rmap.unmap_ptes((gone >> _SHIFT).astype(np.int64))
        del ptes, window
        for slot in anon_slots:
            self.zap_pte(mm, table, int(slot))

    def move_page_tables(self, mm: Mm, old: int, new: int, length: int) -> None:
        """mremap's move_page_tables: what maps [old, old+length) maps [new, new+length) after,
        each page keeping its mapcount. A PMD mapping moves whole (move_huge_pmd) when both
        addresses are PMD-aligned with a whole PMD left to move and nothing is at the target;
        otherwise it is split first (split_huge_pmd: for a file THP the PMD is just cleared).
        PTEs move one by one (the kernel may move a whole table; the model keeps the old, now
        empty table until the range is unmapped)."""
        end = old + length
        while old < end:
            pidx = old >> HPAGE_PMD_SHIFT
            nxt = min((pidx + 1) << HPAGE_PMD_SHIFT, end)
            extent = min(nxt - old, HPAGE_PMD_SIZE - (new & (HPAGE_PMD_SIZE - 1)))
            entry = mm.pmds.get(pidx)
            if isinstance(entry, int):
                if extent == HPAGE_PMD_SIZE and (new >> HPAGE_PMD_SHIFT) not in mm.pmds:
                    mm.pmds[new >> HPAGE_PMD_SHIFT] = mm.pmds.pop(pidx)
                    old, new = old + extent, new + extent
                    continue
                self.zap_huge_pmd(mm, pidx, split=True)
            elif entry is not None and entry.nr:
                for off in range(0, extent, PAGE_SIZE):
                    slot = ((old + off) >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)
                    pte = entry.ptes[slot]
                    if not pte:
                        continue
                    entry.set(slot, 0)
                    mm.rss[mm_counter(pte)] -= 1  # set_pte_at counts it again
                    to = new + off
                    target = mm.pmds.get(to >> HPAGE_PMD_SHIFT)
                    if isinstance(target, int):
                        self.zap_huge_pmd(mm, to >> HPAGE_PMD_SHIFT, split=True)
                    self.set_pte_at(mm, to >> HPAGE_PMD_SHIFT, (to >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1), pte)
            old, new = old + extent, new + extent

    def zap_file_pages(self, mm: Mm) -> None:
        """Clear every mapping of a file page, keeping anon pages (the page cache is gone)."""
        for pidx, entry in list(mm.pmds.items()):
            if isinstance(entry, int):
                self.zap_huge_pmd(mm, pidx, split=False)
                continue
            for slot, pte in list(entry.present()):
                if not pte & PTE_ANON:
                    self.zap_pte(mm, entry, slot)

    def free_pgtables(self, mm: Mm, start: int, end: int) -> None:
        """Free the PTE tables in [start, end) that no VMA overlaps any more (after munmap)."""
        for pidx in mm.pmd_indices(start, end):
            base = pidx << HPAGE_PMD_SHIFT
            if not mm.overlapping(base, base + HPAGE_PMD_SIZE):
                entry = mm.pmds[pidx]
                if isinstance(entry, PteTable):
                    for slot, _ in list(entry.present()):
                        self.zap_pte(mm, entry, slot)
                    self.pte_free(mm, pidx)
                else:
                    self.zap_huge_pmd(mm, pidx, split=False)

    def free_all_pgtables(self, mm: Mm) -> None:
        """Free every PTE table left once everything is zapped (exit_mmap)."""
        for pidx, entry in list(mm.pmds.items()):
            if isinstance(entry, PteTable):
                self.pte_free(mm, pidx)

    def copy_page_range(self, dst: Mm, src: Mm, vma: Vma) -> None:
        """fork's copy of ``vma``'s PTEs from ``src`` into ``dst``. Anon pages become shared
        copy-on-write, except a pinned one: the child gets its own copy at once
        (copy_present_page), so a later CoW cannot move the parent off the page the pin holds.
        File PMDs are not copied (copy_huge_pmd leaves them to refault)."""
        for pidx in src.pmd_indices(vma.start, vma.end):
            entry = src.pmds[pidx]
            if not isinstance(entry, PteTable):
                continue
            base = pidx << HPAGE_PMD_SHIFT
            for slot, pte in list(entry.present()):
                addr = base + (slot << PAGE_SHIFT)
                if not vma.start <= addr < vma.end:
                    continue
                if pte & PTE_ANON and self.anon.pinned(pte_pfn(pte)):
                    pte = pte_make(self.anon.alloc(), PTE_ANON | (PTE_WRITE if vma.prot & PROT_WRITE else 0))
                elif pte & PTE_ANON:
                    pte &= ~PTE_WRITE
                    entry.ptes[slot] = pte
                    self.anon.dup(pte_pfn(pte))
                else:
                    self.rmap.add(pte_pfn(pte), pte=1)
                    pte &= ~PTE_DIRTY  # copy_present_pte: pte_mkclean in the child
                self.set_pte_at(dst, pidx, slot, pte)
