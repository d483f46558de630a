"""The page cache and the physical memory under it: ``struct page`` state, files, xarray slots.

Per-page state is kept as parallel arrays indexed by pfn (a ``mem_map``), about 30 bytes a page
instead of a Python object per page. Physical memory comes in 2 MiB blocks: a PMD-order compound
page is one whole block, so its head is ``pfn & ~511`` and subpage ``i`` is ``head + i``, as in the
kernel. Small pages are carved from blocks of their own. Huge allocations draw on
``free_huge_pages`` (a knob) and may fail to fragmentation; small allocations never fail.

A file's page cache is a dict of 512-slot ``array('q')`` chunks (an xarray node per 2 MiB that has
ever held a page): slot value 0 is a hole, > 0 a pfn, < 0 a shmem swap entry. A compound page
occupies all 512 slots of its chunk with its subpages' pfns (the multi-index entry).
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

from shared.units import HPAGE_PMD_NR

PG_LOCKED = 1 << 0
PG_UPTODATE = 1 << 1
PG_DIRTY = 1 << 2
PG_WRITEBACK = 1 << 3
PG_LRU = 1 << 4
PG_HEAD = 1 << 5
PG_TAIL = 1 << 6
PG_SWAPBACKED = 1 << 7
# The page is in use (allocated); cleared on free so a stale pfn is detectable.
PG_ALLOCATED = 1 << 9


# Block 0 is never handed out, so pfn 0 can mean "no page" in xarray slots and messages.
_FIRST_BLOCK = 1
_NR = HPAGE_PMD_NR
_MASK = _NR - 1


class PhysMem:
    """``mem_map`` plus the allocator. Refcount lives on the head of a compound page."""

    def __init__(self, seed: int = 0) -> None:
        self.ref = array("l")
        self.mapcount = array("l")  # per-PTE mappings of this (sub)page
        self.flags = array("H")
        self.index = array("q")
        self.ino = array("l")  # owning file; 0 when none
        self.entire: dict[int, int] = {}  # head pfn -> PMD mappings (entire_mapcount)
        self.pins: dict[int, int] = {}  # head pfn -> GUP pins (also counted in ref)
        self._free_small: list[int] = []
        self._free_blocks: list[int] = []
        self._small_block_next = 0
        self._small_block_end = 0
        self.nr_blocks = _FIRST_BLOCK
        self._grow(_FIRST_BLOCK)
        self._rng = random.Random(seed)
        self.nr_allocated = 0

    def _grow(self, blocks: int) -> None:
        n = blocks * _NR
        self.ref.extend(array("l", bytes(self.ref.itemsize * n)))
        self.mapcount.extend(array("l", bytes(self.mapcount.itemsize * n)))
        self.flags.extend(array("H", bytes(self.flags.itemsize * n)))
        self.index.extend(array("q", bytes(self.index.itemsize * n)))
        self.ino.extend(array("l", bytes(self.ino.itemsize * n)))

    def _new_block(self) -> int:
        if self._free_blocks:
            return self._free_blocks.pop()
        block = self.nr_blocks
        self.nr_blocks += 1
        self._grow(1)
        return block * _NR

    def alloc_small(self) -> int:
        if self._free_small:
            pfn = self._free_small.pop()
        else:
            if self._small_block_next == self._small_block_end:
                self._small_block_next = self._new_block()
                self._small_block_end = self._small_block_next + _NR
            pfn = self._small_block_next
            self._small_block_next += 1
        self.ref[pfn] = 1
        self.flags[pfn] = PG_ALLOCATED
        self.nr_allocated += 1
        return pfn

    def alloc_huge(self, free_huge_pages: int, direct_compaction: bool, fragmentation: int) -> int:
        """Allocate a PMD-order page; 0 on failure. The caller charges ``free_huge_pages``."""
        if free_huge_pages <= 0:
            return 0
        if not direct_compaction and fragmentation and self._rng.randrange(100) < fragmentation:
            return 0
        head = self._new_block()
        self.ref[head] = 1
        self.flags[head] = PG_ALLOCATED | PG_HEAD
        for pfn in range(head + 1, head + _NR):
            self.flags[pfn] = PG_ALLOCATED | PG_TAIL
            self.ref[pfn] = 0
        self.nr_allocated += _NR
        return head

    def free(self, pfn: int) -> None:
        """Return a page (small or compound head) whose last reference is gone."""
        if self.flags[pfn] & PG_HEAD:
            for sub in range(pfn, pfn + _NR):
                self._clear(sub)
            self.entire.pop(pfn, None)
            self._free_blocks.append(pfn)
            self.nr_allocated -= _NR
        else:
            self._clear(pfn)
            self._free_small.append(pfn)
            self.nr_allocated -= 1
        self.pins.pop(pfn, None)

    def _clear(self, pfn: int) -> None:
        self.ref[pfn] = 0
        self.mapcount[pfn] = 0
        self.flags[pfn] = 0
        self.index[pfn] = 0
        self.ino[pfn] = 0

    def split_huge(self, head: int) -> None:
        """Turn a compound page into 512 small pages; the block is not a huge page any more."""
        ref = self.ref[head]
        pins = self.pins.pop(head, 0)
        base = self.flags[head] & ~(PG_HEAD | PG_TAIL)
        for i, pfn in enumerate(range(head, head + _NR)):
            self.flags[pfn] = base
            self.index[pfn] = self.index[head] + i
            self.ino[pfn] = self.ino[head]
            self.ref[pfn] = 0
        # References held on the head (cache refs are redistributed by the caller).
        self.ref[head] = ref
        if pins:
            self.pins[head] = pins

    def head(self, pfn: int) -> int:
        return pfn & ~_MASK if self.flags[pfn] & PG_TAIL else pfn

    def is_thp(self, pfn: int) -> bool:
        return bool(self.flags[pfn] & (PG_HEAD | PG_TAIL))

    def allocated(self, pfn: int) -> bool:
        return 0 < pfn < len(self.flags) and bool(self.flags[pfn] & PG_ALLOCATED)

    def total_mapcount(self, head: int) -> int:
        """folio_mapcount: PTE mappings of every subpage plus PMD mappings."""
        if self.flags[head] & PG_HEAD:
            return sum(self.mapcount[head : head + _NR]) + self.entire.get(head, 0)
        return self.mapcount[head]


@dataclass(eq=False)
class File:
    """An inode and its address_space. ``size`` is i_size in bytes."""

    ino: int
    name: str
    size: int
    shmem: bool
    chunks: dict[int, array] = field(default_factory=dict)
    nrpages: int = 0  # pages in the cache (a THP counts 512)
    nrswap: int = 0  # shmem swap entries
    writecount: int = 0  # i_writecount: open for write (shared writable mappings, writers)
    collapse_pmd: bool = False  # AS_COLLAPSE_PMD, per-mapping policy only
    nr_thps: int = 0

    def get(self, index: int) -> int:
        chunk = self.chunks.get(index >> 9)
        return chunk[index & _MASK] if chunk is not None else 0

    def set(self, index: int, value: int) -> None:
        chunk = self.chunks.get(index >> 9)
        if chunk is None:
            if value == 0:
                return
            chunk = self.chunks[index >> 9] = array("q", bytes(8 * _NR))
        chunk[index & _MASK] = value

    def chunk(self, index: int) -> array | None:
        return self.chunks.get(index >> 9)

    def drop_empty_chunk(self, index: int) -> None:
        chunk = self.chunks.get(index >> 9)
        if chunk is not None and not any(chunk):
            del self.chunks[index >> 9]

    def entries(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """(index, slot value) for every non-empty slot in [start, end), in index order."""
        for key in sorted(self.chunks):
            base = key << 9
            if end is not None and base >= end:
                break
            if base + _NR <= start:
                continue
            chunk = self.chunks[key]
            for i, value in enumerate(chunk):
                if value and start <= base + i and (end is None or base + i < end):
                    yield base + i, value

    @property
    def nr_pages_size(self) -> int:
        """Pages covered by i_size (the first index at or beyond EOF)."""
        return (self.size + 4095) >> 12
