"""The page cache and the physical memory under it: ``struct page`` state, files, xarray slots,
and :class:`PageCache`, the part that owns them and the page operations every other part uses.

Per-page state is kept as parallel arrays indexed by pfn (a ``mem_map``), 35 bytes a page (8 more
for its xarray slot) instead of a Python object per page. What works on a whole range at once
(collapse_file and its scan, freeing the pages a collapse replaced, a long batch of rmap rows) does
so through numpy views of these arrays (:func:`view`), never kept across a yield.

Physical memory comes in 2 MiB blocks: a PMD-order compound page is one whole block, so its head
is ``pfn & ~511`` and subpage ``i`` is ``head + i``, as in the kernel. Splitting a folio
(``__split_unmapped_folio``) leaves naturally aligned folios of any smaller order in its block;
every page of a large folio stores the folio's order (``order``), so a tail finds its head as
``pfn & ~(nr - 1)`` and ``folio_nr_pages`` is ``1 << order[head]``. The page cache holds one
reference per page of a folio, all on the head, as ``__filemap_add_folio``'s
``folio_ref_add(folio, nr)`` does. Small pages are carved from blocks of their own. Huge
allocations draw on ``free_huge_pages`` (a knob) and may fail to fragmentation. Memory has a size, the knob
``thpsplit/mem_total_mb``: once every block it allows is in use (and no page is free in them), an
allocation fails, as the page allocator's does when reclaim cannot help. Blocks are not compacted:
a block that held small pages stays theirs, so a huge allocation may fail while small pages are
free.

A file's page cache is a dict of 512-slot ``array('q')`` chunks (an xarray node per 2 MiB that has
ever held a page): slot value 0 is a hole, > 0 a pfn, < 0 a shmem swap entry. A large folio
occupies one slot per page with its subpages' pfns (the multi-index entry).
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable, Generator, Hashable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from shared import messages as m
from shared.actor import Wait
from shared.knobs import Knobs
from shared.units import HPAGE_PMD_NR
from shared.vm import DEFAULT_FS, FsKind

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
# PG_readahead: a fault that finds this folio starts async readahead; fault-around skips it.
PG_READAHEAD = 1 << 10


# Pages wait in a per-CPU batch before they reach the LRU (folio_batch: PAGEVEC_SIZE in 6.x).
LRU_BATCH = 15


def view(a: array) -> np.ndarray:
    """A numpy view of a per-page array, for operations on a whole 512-page range at once.
    Never kept across a yield: an array that exports a view cannot grow (``PhysMem._grow``)."""
    return np.frombuffer(a, dtype=a.typecode)


# One block's worth of zeros for each per-page array's type: what a new block starts as.
_ZERO_BLOCK = {code: array(code, bytes(array(code).itemsize * HPAGE_PMD_NR)) for code in "lHqB"}

# A batch of rmap rows at least this long is applied (and checked) with array operations.
BULK_ROWS = 16


Drops = tuple[np.ndarray, np.ndarray] | None
# The last message pte_drops() looked at and its answer: the peer check and the accounting of one
# RmapDelta ask about it one after the other (the message is kept alive here, so its identity
# cannot be taken by another).
_last_drops: tuple[m.RmapDelta | None, Drops] = (None, None)


def pte_drops(delta: m.RmapDelta) -> Drops:
    """(pfns, PTE deltas) of a long :class:`~shared.messages.RmapDelta` that only drops PTE
    mappings (a zapped range: munmap, try_to_unmap, exit): a read-only view of its pfns and
    the deltas as int64 (``np.add.at`` into the int64 mapcounts with int32 deltas is ~25x
    slower);
    None for anything else, which goes row by row."""
    global _last_drops
    if delta.pmds or delta.pins or not delta.ptes or delta.nrows < BULK_ROWS:
        return None
    if delta is _last_drops[0]:
        return _last_drops[1]
    ptes = np.frombuffer(delta.ptes, dtype=np.dtype(m.RMAP_DELTA))
    drops = None
    if not np.count_nonzero(ptes >= 0):
        drops = np.frombuffer(delta.pfns, dtype=np.dtype(m.RMAP_PFN)), ptes.astype(np.int64)
    _last_drops = delta, drops
    return drops


def sum_by(keys: np.ndarray, deltas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys, the sum of the deltas of each)."""
    if not np.count_nonzero(keys[1:] <= keys[:-1]):
        return keys, deltas  # ascending, so distinct already (a zapped range's pages, often)
    distinct, where = np.unique(keys, return_inverse=True)
    sums = np.zeros(len(distinct), dtype=np.int64)
    np.add.at(sums, where, deltas)
    return distinct, sums


# Block 0 is never handed out, so pfn 0 can mean "no page" in xarray slots and messages.
_FIRST_BLOCK = 1
_NR = HPAGE_PMD_NR
_MASK = _NR - 1
HPAGE_PMD_ORDER = 9


class PhysMem:
    """``mem_map`` plus the allocator. Refcount lives on the head of a compound page."""

    def __init__(self, seed: int = 0, max_pages: Callable[[], int] | None = None) -> None:
        # The memory size in pages, asked when a new block is needed (None: unlimited).
        self.max_pages = max_pages
        self.ref = array("l")
        self.mapcount = array("l")  # per-PTE mappings of this (sub)page
        self.flags = array("H")
        self.index = array("q")
        self.ino = array("l")  # owning file; 0 when none
        self.order = array("B")  # folio order, in every page of a large folio; 0 for a small page
        self.entire: dict[int, int] = {}  # head pfn -> PMD mappings (entire_mapcount)
        self.pins: dict[int, int] = {}  # head pfn -> GUP pins (also counted in ref)
        # Free small pages, taken from the end: an array, so a collapse's 512 go back in one copy.
        self._free_small = array("q")
        self._free_blocks: list[int] = []
        self._small_block_next = 0
        self._small_block_end = 0
        self.nr_blocks = _FIRST_BLOCK
        self._grow(_FIRST_BLOCK)
        self._rng = random.Random(seed)
        self.nr_allocated = 0

    def _grow(self, blocks: int) -> None:
        for a in (self.ref, self.mapcount, self.flags, self.index, self.ino, self.order):
            zeros = _ZERO_BLOCK[a.typecode]
            for _ in range(blocks):
                a.extend(zeros)

    def _new_block(self) -> int:
        """A free 2 MiB block's first pfn; 0 when memory is full."""
        if self._free_blocks:
            return self._free_blocks.pop()
        if self.max_pages is not None and (self.nr_blocks - _FIRST_BLOCK + 1) * _NR > self.max_pages():
            return 0
        block = self.nr_blocks
        self.nr_blocks += 1
        self._grow(1)
        return block * _NR

    def alloc_small(self) -> int:
        """A page with one reference; 0 when memory is full."""
        if self._free_small:
            pfn = self._free_small.pop()
        else:
            if self._small_block_next == self._small_block_end:
                block = self._new_block()
                if not block:
                    return 0
                self._small_block_next = block
                self._small_block_end = block + _NR
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
        if not head:
            return 0
        self.ref[head] = 1
        self.flags[head] = PG_ALLOCATED | PG_HEAD
        view(self.flags)[head + 1 : head + _NR] = PG_ALLOCATED | PG_TAIL
        view(self.ref)[head + 1 : head + _NR] = 0
        view(self.order)[head : head + _NR] = HPAGE_PMD_ORDER
        self.nr_allocated += _NR
        return head

    def free(self, pfn: int) -> None:
        """Return a page (small or a large folio's head) whose last reference is gone. A PMD-order
        folio's block goes back whole; a smaller folio's pages (a split left its block carved)
        become free small pages."""
        if self.flags[pfn] & PG_HEAD:
            nr = 1 << self.order[pfn]
            for a in (self.ref, self.mapcount, self.flags, self.index, self.ino, self.order):
                view(a)[pfn : pfn + nr] = 0
            self.entire.pop(pfn, None)
            if nr == _NR:
                self._free_blocks.append(pfn)
            else:
                self._free_small.extend(range(pfn, pfn + nr))
            self.nr_allocated -= nr
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
        self.order[pfn] = 0

    def split_folio(self, head: int, at: int | None) -> list[tuple[int, int]]:
        """__split_unmapped_folio on an unmapped folio that only the page cache holds (one
        reference per page): ``at`` None splits it uniformly to order 0; otherwise non-uniformly
        (try_folio_split), halving it and keeping whole the half without ``at`` until ``at`` is an
        order-0 folio, so an order-9 folio split at page 3 leaves orders 8, 7, ..., 2, 1, 0, 0.
        Each new folio takes its pages' cache references on its head and the old head's flags
        (locked if it was: the caller unlocks those it does not keep). Returns the new folios as
        (head, order), in pfn order."""
        order = self.order[head]
        if at is None:
            pieces = [(p, 0) for p in range(head, head + (1 << order))]
        else:
            pieces = []
            start = head
            while order:
                order -= 1
                half = 1 << order
                if at < start + half:
                    pieces.append((start + half, order))
                else:
                    pieces.append((start, order))
                    start += half
            pieces.append((start, 0))
            pieces.sort()
        flags, index, ino, ref, orders = self.flags, self.index, self.ino, self.ref, self.order
        base = flags[head] & ~(PG_HEAD | PG_TAIL)
        first_index, owner = index[head], ino[head]
        for new, new_order in pieces:
            nr = 1 << new_order
            for pfn in range(new, new + nr):
                flags[pfn] = (base & ~PG_LOCKED) | PG_TAIL
                index[pfn] = first_index + (pfn - head)
                ino[pfn] = owner
                ref[pfn] = 0
                orders[pfn] = new_order
            flags[new] = base | (PG_HEAD if new_order else 0)
            ref[new] = nr
        return pieces

    def head(self, pfn: int) -> int:
        return pfn & ~((1 << self.order[pfn]) - 1)

    def folio_nr(self, head: int) -> int:
        """folio_nr_pages."""
        return 1 << self.order[head]

    def pmd_mappable(self, head: int) -> bool:
        """folio_test_pmd_mappable: a PMD-order folio, the only size a PMD maps."""
        return self.order[head] == HPAGE_PMD_ORDER

    def is_thp(self, pfn: int) -> bool:
        return self.order[pfn] == HPAGE_PMD_ORDER

    def allocated(self, pfn: int) -> bool:
        return 0 < pfn < len(self.flags) and bool(self.flags[pfn] & PG_ALLOCATED)

    def total_mapcount(self, head: int) -> int:
        """folio_mapcount: PTE mappings of every subpage plus PMD mappings."""
        if self.flags[head] & PG_HEAD:
            return sum(self.mapcount[head : head + (1 << self.order[head])]) + self.entire.get(head, 0)
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
    i_rwsem: bool = False  # the inode lock, held by a write, truncate or punch-hole
    gen: int = 0  # the collapser boot that made it: (ino, gen) is the file's identity
    fs: FsKind = DEFAULT_FS  # a regular file's filesystem kind
    # file_ra_state (start, size, async_size, order) of a large-folio file: one per file, not
    # per open.
    ra: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    # Small pages marked PG_readahead together, standing for one smaller large folio: start -> nr.
    ra_marks: dict[int, int] = field(default_factory=dict)

    @property
    def large_folio(self) -> bool:
        """A regular file on a large-folio filesystem (not shmem)."""
        return not self.shmem and self.fs == FsKind.LARGE_FOLIO

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


class PageCache:
    """The files, their cached pages and the ``struct page`` operations on them: insertion and
    removal, refcounts and rmap accounting, page locks, the LRU add batch, shmem swap entries.

    One part owns all of this so a page's refcount, its slot and its file's counts always change
    together, whichever part (file operations, khugepaged, fault lookups) asks. It receives the
    memory it carves pages from, the knobs that hold the huge-page pool (``free_huge_pages``,
    ``fragmentation``) and ``wake``, the actor's notify: unlocking a page wakes whoever sleeps in
    :meth:`lock` on it (key ``("page", pfn)``).
    """

    def __init__(
        self,
        mem: PhysMem,
        knobs: Knobs,
        wake: Callable[[Hashable], None],
        waiting: Callable[[], Iterable[Hashable]] = tuple,
    ) -> None:
        self.mem = mem
        self.knobs = knobs
        self.wake = wake
        # The keys someone sleeps on: unlocking 512 pages wakes only those, rather than calling
        # ``wake`` 512 times for nobody.
        self.waiting = waiting
        self.files: dict[int, File] = {}
        self.by_name: dict[str, File] = {}
        self.next_ino = 1
        # This boot's inode generation: new files get it (see File.gen).
        self.gen = 1
        # Shmem swap entries in every file (the sum of their nrswap); swap slots are never reused.
        self.nr_swap_entries = 0
        self._next_swap = 1
        self._lru_batch: list[int] = []
        # Pages read from storage (regular-file pages added clean, shmem swap-ins): vmstat pgpgin.
        self.pages_read = 0

    # -- files --------------------------------------------------------------------------------

    def add_file(self, f: File) -> None:
        """Link a new inode (its number is taken, even if it came from elsewhere); one without a
        generation gets this boot's."""
        if not f.gen:
            f.gen = self.gen
        self.files[f.ino] = f
        self.by_name[f.name] = f
        self.next_ino = max(self.next_ino, f.ino + 1)

    # -- page locks ---------------------------------------------------------------------------

    def trylock(self, pfn: int) -> bool:
        """folio_trylock: False if the page is locked; collapse_file and reclaim give up there
        rather than sleep as :meth:`lock` does."""
        flags = self.mem.flags
        if flags[pfn] & PG_LOCKED:
            return False
        flags[pfn] |= PG_LOCKED
        return True

    def lock(self, pfn: int) -> Generator[Wait, None, None]:
        """lock_page: sleep until the page lock is ours."""
        while not self.trylock(pfn):
            yield Wait(("page", pfn))

    def unlock(self, pfn: int) -> None:
        """folio_unlock: wake whoever sleeps on the page (faults, truncate, writers)."""
        self.mem.flags[pfn] &= ~PG_LOCKED
        self.wake(("page", pfn))

    def unlock_pages(self, pfns: np.ndarray) -> None:
        """:meth:`unlock` of every page of ``pfns`` (small pages, distinct), waking sleepers in
        that order."""
        flags = view(self.mem.flags)
        flags[pfns] &= ~PG_LOCKED & 0xFFFF
        del flags
        asleep = [key for key in self.waiting() if isinstance(key, tuple) and key[0] == "page"]
        if asleep:
            order = {pfn: i for i, pfn in enumerate(pfns.tolist())}
            for key in sorted((k for k in asleep if k[1] in order), key=lambda k: order[k[1]]):
                self.wake(key)

    # -- the inode lock -----------------------------------------------------------------------

    def inode_lock(self, f: File) -> Generator[Wait, None, None]:
        """inode_lock (i_rwsem for write): write(2), truncate(2) and fallocate(2) of one file run
        one at a time, whatever they sleep on. Taken before any page lock; faults, khugepaged and
        reclaim do not take it."""
        while f.i_rwsem:
            yield Wait(("inode", f.ino))
        f.i_rwsem = True

    def inode_unlock(self, f: File) -> None:
        f.i_rwsem = False
        self.wake(("inode", f.ino))

    # -- references and mappings --------------------------------------------------------------

    def put(self, head: int, n: int = 1) -> None:
        """put_page: drop references; the last one frees the page (a THP's block goes back to the
        huge pool)."""
        mem = self.mem
        mem.ref[head] -= n
        if mem.ref[head] < 0:
            raise AssertionError(f"refcount underflow on pfn {head}")
        if mem.ref[head] == 0:
            huge = mem.pmd_mappable(head)
            self._lru_del(head)
            mem.free(head)
            if huge:
                self.knobs.free_huge_pages += 1

    def put_small_pages(self, pfns: np.ndarray, n: int) -> None:
        """:meth:`put` of ``n`` references on each of ``pfns`` (small pages, distinct), in order:
        collapse_file's release of the pages it replaced, without a call per page."""
        mem = self.mem
        ref = view(mem.ref)
        left = ref[pfns] - n
        if np.count_nonzero(left < 0):
            bad = pfns[int(np.argmax(left < 0))]
            raise AssertionError(f"refcount underflow on pfn {bad}")
        ref[pfns] = left
        freed = pfns[left == 0]
        del ref
        if not len(freed):
            return
        if self._lru_batch:
            # The freed are the batch's pages without a reference left (a live page has one).
            self._lru_batch[:] = [p for p in self._lru_batch if mem.ref[p]]
        for a in (mem.mapcount, mem.flags, mem.index, mem.ino):
            view(a)[freed] = 0
        mem._free_small.frombytes(freed.astype(np.int64, copy=False).tobytes())
        mem.nr_allocated -= len(freed)
        if mem.pins:
            for pfn in freed.tolist():
                mem.pins.pop(pfn, None)

    def apply_rmap_delta(self, delta: m.RmapDelta) -> None:
        """:meth:`apply_rmap` of the rows of ``delta``; a zapped range's with array operations
        when no page is freed (the rows' order does not matter then)."""
        drops = pte_drops(delta)
        if drops is not None:
            mem = self.mem
            pfns, deltas = drops
            orders = view(mem.order)[pfns]
            heads = pfns
            if np.count_nonzero(orders):  # pages of large folios: their heads hold the references
                heads = pfns & ~((np.int64(1) << orders.astype(np.int64)) - 1)
            distinct, sums = sum_by(heads, deltas)
            ref = view(mem.ref)
            left = ref[distinct] + sums
            if not np.count_nonzero(left <= 0):
                np.add.at(view(mem.mapcount), pfns, deltas)
                ref[distinct] = left
                return
            del ref
        self.apply_rmap(delta.rows)

    def apply_rmap(self, rows: Iterable[m.RmapRow]) -> None:
        """Account mapping changes, rows of (pfn, PTE maps, PMD maps, pins): each unit of mapping or
        pin holds one reference on the head, as the kernel's rmap does."""
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

    def forget_mappings(self) -> None:
        """Whoever mapped and pinned pages is gone: drop every mapping's and pin's count and
        reference, and every file's write opens (they were its writable mappings)."""
        mem = self.mem
        heads = set(mem.pins) | set(mem.entire)
        for f in self.files.values():
            f.writecount = 0
            for _, value in f.entries():
                if value > 0 and mem.mapcount[value]:
                    heads.add(mem.head(value))
        for head in heads:
            subs = range(head, head + mem.folio_nr(head))
            drop = sum(mem.mapcount[p] for p in subs) + mem.entire.pop(head, 0) + mem.pins.pop(head, 0)
            for p in subs:
                mem.mapcount[p] = 0
            if drop:
                self.put(head, drop)

    def set_dirty(self, head: int) -> None:
        """folio_mark_dirty; a page freed meanwhile (the notice raced its removal) is left alone."""
        if self.mem.allocated(head):
            self.mem.flags[head] |= PG_DIRTY

    # -- LRU (per-CPU add batch, as folio_add_lru) --------------------------------------------

    def lru_add(self, pfn: int) -> None:
        """folio_add_lru: the page reaches the LRU when the batch fills or is drained, so a page
        just added is not yet PG_LRU (and khugepaged's scan sees SCAN_PAGE_LRU) until then."""
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

    # -- insertion and removal ----------------------------------------------------------------

    def add_small_page(self, f: File, index: int, dirty: bool = False) -> int:
        """Allocate a small page, insert it at ``index`` (ref 1 for the cache), uptodate, on LRU.
        A shmem swap entry there is replaced (swapin, which marks the page dirty). Returns 0,
        changing nothing, when memory is full. A shmem page is clean until written: a hole a
        read fault fills is zeroes that reclaim may simply drop."""
        mem = self.mem
        pfn = mem.alloc_small()
        if not pfn:
            return 0
        old = f.get(index)
        mem.flags[pfn] |= PG_UPTODATE | (PG_SWAPBACKED if f.shmem else 0)
        if dirty or old < 0:
            mem.flags[pfn] |= PG_DIRTY
        mem.index[pfn] = index
        mem.ino[pfn] = f.ino
        if old < 0 or not (f.shmem or dirty):
            self.pages_read += 1
        if old < 0:
            f.nrswap -= 1
            self.nr_swap_entries -= 1
        f.set(index, pfn)
        f.nrpages += 1
        self.lru_add(pfn)
        return pfn

    def alloc_huge(self, direct_compaction: bool) -> int:
        """A PMD-order page from the ``free_huge_pages`` pool (charged here, returned by
        :meth:`put`); 0 on failure."""
        k = self.knobs
        head = self.mem.alloc_huge(k.free_huge_pages, direct_compaction, k.fragmentation)
        if head:
            k.free_huge_pages -= 1
        return head

    def add_huge_page(self, f: File, start: int, head: int, dirty: bool = False) -> None:
        """Publish a PMD-order folio at ``start`` (one multi-index entry: 512 slots); a shmem
        one allocated at fault is clean until written, a collapsed one is ``dirty``."""
        mem = self.mem
        mem.flags[head] |= PG_UPTODATE | (PG_SWAPBACKED if f.shmem else 0) | (PG_DIRTY if dirty else 0)
        view(mem.index)[head : head + _NR] = np.arange(start, start + _NR)
        view(mem.ino)[head : head + _NR] = f.ino
        assert not start & _MASK, f"a PMD-order folio at unaligned index {start}"
        chunk = f.chunks.get(start >> 9)
        if chunk is None:
            chunk = f.chunks[start >> 9] = array("q", bytes(8 * _NR))
        view(chunk)[:] = np.arange(head, head + _NR)
        mem.ref[head] += _NR - 1  # the cache holds one reference per subpage
        f.nrpages += _NR
        f.nr_thps += 1
        self.lru_add(head)

    def remove_page(self, f: File, pfn: int) -> None:
        """Delete a small page or a whole large folio from the cache and drop the cache's
        references."""
        mem = self.mem
        head = mem.head(pfn)
        if mem.flags[head] & PG_HEAD:
            start = mem.index[head]
            nr = mem.folio_nr(head)
            for i in range(nr):
                f.set(start + i, 0)
            f.drop_empty_chunk(start)
            f.nrpages -= nr
            if nr == _NR:
                f.nr_thps -= 1
            mem.ino[head] = 0
            self.put(head, nr)
        else:
            index = mem.index[head]
            f.set(index, 0)
            f.drop_empty_chunk(index)
            f.nrpages -= 1
            mem.ino[head] = 0
            self.put(head)

    # -- shmem swap entries -------------------------------------------------------------------

    def swap_out(self, f: File, pfn: int) -> None:
        """A reclaimed shmem page leaves the cache; a swap entry takes its slot."""
        index = self.mem.index[pfn]
        self.remove_page(f, pfn)
        f.set(index, -self._next_swap)
        self._next_swap += 1
        f.nrswap += 1
        self.nr_swap_entries += 1

    def free_swap_entry(self, f: File, index: int) -> None:
        """Truncate or punch-hole drops a swap entry with the rest of the range."""
        f.set(index, 0)
        f.drop_empty_chunk(index)
        f.nrswap -= 1
        self.nr_swap_entries -= 1
