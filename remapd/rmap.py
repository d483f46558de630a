"""The reverse-map accounting of the pages the remapper maps.

File pages are the collapser's: their refcount, mapcount and pins live in its ``mem_map``. Every
PTE, PMD or pin the remapper adds or drops is a row of :class:`RmapBatch`, and the batch travels
ahead of the next message to the collapser, so its counts are right before it reads them (the
kernel updates them in place, under the page table lock).

Anon pages are the remapper's own (:class:`AnonPages`): CoW copies and uprobe breakpoints, in a
pfn space above ``ANON_PFN_BASE`` that the collapser never sees.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

import numpy as np

from remapd.mm import ANON_PFN_BASE
from shared import messages as m

# A zapped range's PTE column: one mapping less per page.
_ONE_LESS = array("i", [-1])


def _wire(column: array) -> bytes:
    """A column packed as the wire has it: little-endian."""
    if sys.byteorder == "little":
        return column.tobytes()
    swapped = array(column.typecode, column)
    swapped.byteswap()
    return swapped.tobytes()


def _deltas(column: array, n: int) -> bytes:
    """A delta column of ``n`` rows packed (zeros past its end); empty when all are zero, as an
    RmapDelta allows."""
    packed = _wire(column)
    if packed.count(0) == len(packed):
        return b""
    return packed + bytes(4 * (n - len(column)))


class RmapBatch:
    """File-page rmap deltas not yet sent to the collapser: the columns of an
    :class:`~shared.messages.RmapDelta` (pfn, PTE mappings, PMD mappings, pins), each unit also a
    page reference. ``pmds`` and ``pins`` end at the last row that has either: the rows past
    them have zeros there (a zapped range adds none)."""

    __slots__ = ("pfns", "pins", "pmds", "ptes")

    def __init__(self) -> None:
        self.pfns = array("q")
        self.ptes = array("i")
        self.pmds = array("i")
        self.pins = array("i")

    def __len__(self) -> int:
        return len(self.pfns)

    def add(self, pfn: int, pte: int = 0, pmd: int = 0, pin: int = 0) -> None:
        if pmd or pin:
            zeros = array("i", bytes(4 * (len(self.pfns) - len(self.pmds))))
            self.pmds.extend(zeros)
            self.pmds.append(pmd)
            self.pins.extend(zeros)
            self.pins.append(pin)
        self.pfns.append(pfn)
        self.ptes.append(pte)

    def unmap_ptes(self, pfns: Sequence[int] | np.ndarray) -> None:
        """A row of one PTE mapping less for each of ``pfns``, in order (a zapped range)."""
        self.pfns.frombytes(np.asarray(pfns, dtype=np.int64).tobytes())
        self.ptes.extend(_ONE_LESS * len(pfns))

    def delta(self) -> m.RmapDelta:
        """The pending rows, in order, as one message; the batch keeps them."""
        n = len(self.pfns)
        return m.RmapDelta(_wire(self.pfns), _deltas(self.ptes, n), _deltas(self.pmds, n), _deltas(self.pins, n))

    def take(self) -> m.RmapDelta:
        """:meth:`delta`, and the batch is empty afterwards."""
        delta = self.delta()
        self.clear()
        return delta

    def clear(self) -> None:
        """Drop pending rows (after sending them, or the collapser they were for is gone)."""
        for column in (self.pfns, self.ptes, self.pmds, self.pins):
            del column[:]


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
