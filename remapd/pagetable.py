"""The remapper's page-table primitives: installing and zapping PTEs and PMDs with their rmap
rows, mm counters and the per-PMD mark, and anon pages. Mixed into :class:`remapd.remapper.Remapper`."""

from __future__ import annotations

from remapd.mm import (
    PTE_ANON,
    PTE_SHMEM,
    Mm,
    PteTable,
    pte_belongs,
    pte_make,
    pte_pfn,
)
from shared.logs import get_logger
from shared.units import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SHIFT,
    HPAGE_PMD_SIZE,
    PAGE_SHIFT,
)

log = get_logger("remapd")


class PageTableOps:
    """PTE/PMD install and zap, accounted as the kernel's rmap does."""

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

