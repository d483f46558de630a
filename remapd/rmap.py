"""The reverse-map accounting of the pages the remapper maps.

File pages are the collapser's: their refcount, mapcount and pins live in its ``mem_map``. Every
PTE, PMD or pin the remapper adds or drops is a row of :class:`RmapBatch`, and the batch travels
ahead of the next message to the collapser, so its counts are right before it reads them (the
kernel updates them in place, under the page table lock).

Anon pages are the remapper's own (:class:`AnonPages`): CoW copies and uprobe breakpoints, in a
pfn space above ``ANON_PFN_BASE`` that the collapser never sees.
"""

from __future__ import annotations

from itertools import repeat

from remapd.mm import ANON_PFN_BASE

# (pfn, PTE mappings, PMD mappings, pins): deltas, each unit also a page reference.
RmapRow = tuple[int, int, int, int]


class RmapBatch:
    """File-page rmap deltas not yet sent to the collapser."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows: list[RmapRow] = []

    def add(self, pfn: int, pte: int = 0, pmd: int = 0, pin: int = 0) -> None:
        self.rows.append((pfn, pte, pmd, pin))

    def unmap_ptes(self, pfns: list[int]) -> None:
        """A row of one PTE mapping less for each of ``pfns``, in order (a zapped range)."""
        self.rows.extend(zip(pfns, repeat(-1), repeat(0), repeat(0)))

    def take(self) -> tuple[RmapRow, ...]:
        """Every pending row, in order; the batch is empty afterwards."""
        rows, self.rows = self.rows, []
        return tuple(rows)

    def clear(self) -> None:
        """Drop pending rows: the collapser they were for is gone."""
        self.rows.clear()


class AnonPages:
    """Anon pages: mapcount and GUP pins per pfn. A page lives while something maps or pins it."""

    __slots__ = ("_next_pfn", "mapcount", "pins")

    def __init__(self) -> None:
        self.mapcount: dict[int, int] = {}
        self.pins: dict[int, int] = {}
        self._next_pfn = ANON_PFN_BASE

    def alloc(self) -> int:
        """A new anon page, mapped once (folio_add_new_anon_rmap)."""
        pfn = self._next_pfn
        self._next_pfn += 1
        self.mapcount[pfn] = 1
        return pfn

    def dup(self, pfn: int) -> None:
        """One more mapping, as fork shares the page copy-on-write (folio_try_dup_anon_rmap)."""
        self.mapcount[pfn] += 1

    def remove(self, pfn: int) -> None:
        """One mapping less (folio_remove_rmap_pte); the last one frees an unpinned page."""
        self.mapcount[pfn] -= 1
        if self.mapcount[pfn] == 0 and not self.pins.get(pfn):
            del self.mapcount[pfn]

    def pinned(self, pfn: int) -> bool:
        return bool(self.pins.get(pfn))

    def exclusive(self, pfn: int) -> bool:
        """Mapped once and unpinned: a write fault may reuse it rather than copy (wp_page_reuse)."""
        return self.mapcount[pfn] == 1 and not self.pins.get(pfn)

    def pin(self, pfn: int) -> None:
        self.pins[pfn] = self.pins.get(pfn, 0) + 1

    def unpin(self, pfn: int) -> None:
        """Drop a pin; the last one frees a page nothing maps any more."""
        self.pins[pfn] -= 1
        if not self.pins[pfn]:
            del self.pins[pfn]
            if self.mapcount.get(pfn) == 0:
                del self.mapcount[pfn]
