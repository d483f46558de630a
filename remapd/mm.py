"""The virtual side's data: ``mm_struct``, VMAs, PMD slots, PTE tables and the mmap lock.

A PMD slot is absent (pmd_none), a :class:`PteTable`, or an ``int`` PMD entry mapping a PMD-order
compound page (``head << PTE_SHIFT | flags``). A PTE table's 512 entries are an ``array('Q')``
allocated with the table (4 KiB, as the kernel's page); a PMD range with nothing mapped has no table.

A PTE is ``pfn << PTE_SHIFT | flags``. ``PTE_THP`` marks a subpage of a PMD-order compound page;
the entry "belongs" in its table (Kirill's per-PMD mark) when ``pfn % 512 == slot``. Everything else
(a small page, an anon page, another THP's subpage) is foreign and counted in ``nr_foreign``.
``PTE_DIRTY`` is the bit the CPU sets on a write through a writable PTE: a file page mapped writable
but clean (a read fault on a shared writable shmem mapping) is dirtied by the first write, which
is no fault.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Callable, Generator, Iterator
from typing import Any

from shared.actor import Wait
from shared.errors import UserError
from shared.units import HPAGE_PMD_NR, HPAGE_PMD_SHIFT, PAGE_SHIFT
from shared.vm import PROT_WRITE

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_ANON = 1 << 2
PTE_THP = 1 << 3
PTE_SHMEM = 1 << 4
PTE_DIRTY = 1 << 5
PTE_SHIFT = 6

# Anonymous pages live in a pfn space of their own (the remapper allocates them without asking
# the collapser): pfns at or above this are anon.
ANON_PFN_BASE = 1 << 40


def pte_make(pfn: int, flags: int) -> int:
    return (pfn << PTE_SHIFT) | flags | PTE_PRESENT


def pte_pfn(pte: int) -> int:
    return pte >> PTE_SHIFT


def pte_belongs(pte: int, slot: int) -> bool:
    return bool(pte & PTE_THP) and (pte >> PTE_SHIFT) & (HPAGE_PMD_NR - 1) == slot


class PteTable:
    """A page of 512 PTEs plus the per-PMD "try collapse" mark Kirill proposed for its struct page."""

    __slots__ = ("mark", "nr", "nr_foreign", "ptes")

    def __init__(self) -> None:
        self.ptes = array("Q", bytes(8 * HPAGE_PMD_NR))
        self.nr = 0
        self.nr_foreign = 0
        self.mark = False

    def set(self, slot: int, pte: int) -> None:
        old = self.ptes[slot]
        if old:
            self._account(old, slot, -1)
        self.ptes[slot] = pte
        if pte:
            self._account(pte, slot, 1)

    def _account(self, pte: int, slot: int, sign: int) -> None:
        self.nr += sign
        if not pte_belongs(pte, slot):
            self.nr_foreign += sign

    def present(self) -> Iterator[tuple[int, int]]:
        """(slot, pte) of every present entry."""
        if self.nr:
            for slot, pte in enumerate(self.ptes):
                if pte:
                    yield slot, pte


class Vma:
    __slots__ = ("anon_vma", "end", "hugepage", "ino", "nohugepage", "pgoff", "prot", "shared", "start")

    def __init__(
        self,
        start: int,
        end: int,
        pgoff: int,
        ino: int,
        prot: int,
        shared: bool,
        hugepage: bool = False,
        nohugepage: bool = False,
        anon_vma: bool = False,
    ):
        self.start = start
        self.end = end
        self.pgoff = pgoff
        self.ino = ino
        self.prot = prot
        self.shared = shared
        self.hugepage = hugepage
        self.nohugepage = nohugepage
        self.anon_vma = anon_vma

    def pgoff_at(self, addr: int) -> int:
        return self.pgoff + ((addr - self.start) >> PAGE_SHIFT)

    def addr_of(self, pgoff: int) -> int:
        return self.start + ((pgoff - self.pgoff) << PAGE_SHIFT)

    @property
    def writes_file(self) -> bool:
        """A shared writable mapping keeps its file open for write (i_writecount)."""
        return self.shared and bool(self.prot & PROT_WRITE)

    def same_flags(self, other: Vma) -> bool:
        # anon_vma is no bar: is_mergeable_anon_vma accepts one on a side only (observed on 6.18),
        # and the model cannot tell two anon_vmas apart.
        return (
            self.ino == other.ino
            and self.prot == other.prot
            and self.shared == other.shared
            and self.hugepage == other.hugepage
            and self.nohugepage == other.nohugepage
        )

    def copy(self, start: int, end: int) -> Vma:
        return Vma(
            start,
            end,
            self.pgoff_at(start),
            self.ino,
            self.prot,
            self.shared,
            self.hugepage,
            self.nohugepage,
            self.anon_vma,
        )

    def anon_vma_prepare(self) -> None:
        """The VMA now holds private anon pages (a CoW copy, a uprobe breakpoint): from here on
        retract_page_tables leaves its page tables alone."""
        self.anon_vma = True

    def pmd_suitable(self, haddr: int) -> bool:
        """thp_vma_suitable_order: the VMA covers [haddr, haddr+2M) with matching alignment."""
        if haddr < self.start or haddr + (1 << HPAGE_PMD_SHIFT) > self.end:
            return False
        return ((self.start >> PAGE_SHIFT) - self.pgoff) % HPAGE_PMD_NR == 0

    def __repr__(self) -> str:
        return f"Vma({self.start:#x}-{self.end:#x} ino={self.ino} pgoff={self.pgoff:#x})"


class MmapLock:
    """mmap_lock: readers or one writer; application threads may hold it for model time."""

    __slots__ = ("readers", "writer")

    def __init__(self) -> None:
        self.readers = 0
        self.writer = False

    def try_read(self) -> bool:
        if self.writer:
            return False
        self.readers += 1
        return True

    def try_write(self) -> bool:
        if self.writer or self.readers:
            return False
        self.writer = True
        return True

    def held(self) -> bool:
        return self.writer or self.readers > 0


class MmapLocks:
    """mmap_read_lock and mmap_write_lock for tasks: a task that cannot take an mm's lock waits
    until an unlock of that mm notifies it (through the actor's ``notify``). Trylocks
    (khugepaged's) call :meth:`MmapLock.try_write` directly and unlock here."""

    # Waiters sleep on ("mmap", pid). Written out at each use rather than built by a helper:
    # every fault unlocks twice, and a call per unlock shows in the fault rate.

    def __init__(self, notify: Callable[[Any], None]):
        self._notify = notify

    @staticmethod
    def wait(mm: Mm) -> Wait:
        """The effect that sleeps until ``mm``'s lock is released or the mm exits."""
        return Wait(("mmap", mm.pid))

    def mmap_read_lock(self, mm: Mm) -> Generator[Any, Any, None]:
        """Fails with ESRCH if the process exits while we wait."""
        while not mm.lock.try_read():
            yield self.wait(mm)
        if mm.exiting:
            self.mmap_read_unlock(mm)
            raise UserError("ESRCH", f"process {mm.pid} exited")

    def mmap_write_lock(self, mm: Mm) -> Generator[Any, Any, None]:
        """Fails with ESRCH if the process exits while we wait."""
        while not mm.lock.try_write():
            yield self.wait(mm)
        if mm.exiting:
            self.mmap_write_unlock(mm)
            raise UserError("ESRCH", f"process {mm.pid} exited")

    def mmap_read_unlock(self, mm: Mm) -> None:
        mm.lock.readers -= 1
        if not mm.lock.readers:
            self._notify(("mmap", mm.pid))

    def mmap_write_unlock(self, mm: Mm) -> None:
        mm.lock.writer = False
        self._notify(("mmap", mm.pid))

    def wake_all(self, mm: Mm) -> None:
        """The mm is gone: every task waiting for its lock wakes and sees it exiting."""
        self._notify(("mmap", mm.pid))


class Mm:
    """mm_struct: VMAs sorted by start, PMD slots, rss counters, nr_ptes, the mmap lock."""

    def __init__(self, pid: int):
        self.pid = pid
        self.vmas: list[Vma] = []
        self.starts: list[int] = []
        self.pmds: dict[int, PteTable | int] = {}
        self.rss = {"MM_FILEPAGES": 0, "MM_ANONPAGES": 0, "MM_SHMEMPAGES": 0}
        self.nr_ptes = 0
        self.lock = MmapLock()
        self.exiting = False
        self.pte_mapped_thp: list[int] = []  # mm-slot policy: v5.4's mm_slot array
        self.pins: dict[int, list[int]] = {}  # page-aligned addr -> pinned pfns (GUP)

    def pmd_indices(self, start: int, end: int) -> list[int]:
        """The PMD slots in [start, end) that hold a PTE table or a PMD mapping, in order: the
        page-table walk of every range operation, cheaper from whichever side is smaller."""
        lo, hi = start >> HPAGE_PMD_SHIFT, (end - 1) >> HPAGE_PMD_SHIFT
        if hi - lo + 1 > len(self.pmds):
            return sorted(p for p in self.pmds if lo <= p <= hi)
        return [p for p in range(lo, hi + 1) if p in self.pmds]

    def find_vma(self, addr: int) -> Vma | None:
        """The VMA containing ``addr`` (vma_lookup), in O(log n)."""
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and addr < self.vmas[i].end:
            return self.vmas[i]
        return None

    def overlapping(self, start: int, end: int) -> list[Vma]:
        i = max(bisect.bisect_right(self.starts, start) - 1, 0)
        out = []
        while i < len(self.vmas) and self.vmas[i].start < end:
            if self.vmas[i].end > start:
                out.append(self.vmas[i])
            i += 1
        return out

    def insert_vma(self, vma: Vma) -> None:
        i = bisect.bisect_left(self.starts, vma.start)
        self.starts.insert(i, vma.start)
        self.vmas.insert(i, vma)

    def remove_vma(self, vma: Vma) -> None:
        i = bisect.bisect_left(self.starts, vma.start)
        assert self.vmas[i] is vma
        del self.starts[i]
        del self.vmas[i]


def find_mm(mms: dict[int, Mm], pid: int) -> Mm:
    """The live mm of ``pid``, or ESRCH: what every operation on a process looks up first."""
    mm = mms.get(pid)
    if mm is None or mm.exiting:
        raise UserError("ESRCH", f"no process {pid}")
    return mm
