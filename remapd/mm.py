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
from shared.units import HPAGE_PMD_NR, HPAGE_PMD_SHIFT, PAGE_SHIFT, TASK_SIZE
from shared.vm import PROT_WRITE

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_ANON = 1 << 2
PTE_THP = 1 << 3
PTE_SHMEM = 1 << 4
PTE_DIRTY = 1 << 5
PTE_SHIFT = 6

# The vm_flags bits madvise sets and clears on a VMA besides VM_HUGEPAGE/VM_NOHUGEPAGE (Vma.flags;
# include/linux/mm.h). VM_WIPEONFORK is anon-only (MADV_WIPEONFORK is EINVAL on a file VMA), so no
# VMA here has it.
VM_SEQ_READ = 0x00008000
VM_RAND_READ = 0x00010000
VM_DONTCOPY = 0x00020000
VM_DONTDUMP = 0x04000000
VM_MADV_FLAGS = VM_SEQ_READ | VM_RAND_READ | VM_DONTCOPY | VM_DONTDUMP
VM_READ_HINTS = VM_SEQ_READ | VM_RAND_READ

# Anonymous pages live in a pfn space of their own (the remapper allocates them without asking
# the collapser): pfns at or above this are anon.
ANON_PFN_BASE = 1 << 40

# What a new PTE table copies: ``array("Q", bytes(4096))`` costs ~3 us (a bytes object built,
# copied in and freed, the array over-allocated by its growth rule), a copy of this 0.2 us, and
# a fault into a PMD range with no table pays it (a third of the minor faults or more when
# faults spread over many processes).
_ZERO_PTES = array("Q", bytes(8 * HPAGE_PMD_NR))


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
        self.ptes = _ZERO_PTES * 1
        self.nr = 0
        self.nr_foreign = 0
        self.mark = False

    def set(self, slot: int, pte: int) -> None:
        # pte_belongs written out: every PTE installed or zapped comes here.
        ptes = self.ptes
        old = ptes[slot]
        if old:
            self.nr -= 1
            if not (old & PTE_THP and (old >> PTE_SHIFT) & (HPAGE_PMD_NR - 1) == slot):
                self.nr_foreign -= 1
        ptes[slot] = pte
        if pte:
            self.nr += 1
            if not (pte & PTE_THP and (pte >> PTE_SHIFT) & (HPAGE_PMD_NR - 1) == slot):
                self.nr_foreign += 1

    def present(self) -> Iterator[tuple[int, int]]:
        """(slot, pte) of every present entry."""
        if self.nr:
            for slot, pte in enumerate(self.ptes):
                if pte:
                    yield slot, pte


class Vma:
    """vm_area_struct. ``anon_vma`` is the identity of the VMA's anon_vma (None until the first
    private anon page, anon_vma_prepare), shared by the pieces of a split and taken over by a
    merge; ``fork_child`` says its anon_vma_chain is not singular (the VMA was copied by fork
    from one with an anon_vma: vma_is_fork_child). ``file`` is the identity of vm_file, the open
    file of inode ``ino`` it maps (0: none given). ``account`` is VM_ACCOUNT: a private mapping
    that is or was writable counts in the commit charge (accountable_mapping at mmap, set by
    mprotect and never cleared for a file mapping). ``locked`` and ``lockonfault`` are VM_LOCKED
    and VM_LOCKONFAULT (mlock, mlock2(MLOCK_ONFAULT)). ``flags``: the other vm_flags bits madvise
    changes (:data:`VM_MADV_FLAGS`). ``mm`` is vm_mm, set when the VMA is linked."""

    __slots__ = (
        "account",
        "anon_vma",
        "end",
        "file",
        "flags",
        "fork_child",
        "hugepage",
        "ino",
        "locked",
        "lockonfault",
        "mm",
        "nohugepage",
        "pgoff",
        "prot",
        "shared",
        "start",
    )

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
        anon_vma: int | None = None,
        fork_child: bool = False,
        file: int = 0,
        account: bool = False,
        locked: bool = False,
        lockonfault: bool = False,
        flags: int = 0,
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
        self.fork_child = fork_child
        self.file = file
        self.account = account
        self.locked = locked
        self.lockonfault = lockonfault
        self.flags = flags
        self.mm: Mm | None = None

    def pgoff_at(self, addr: int) -> int:
        return self.pgoff + ((addr - self.start) >> PAGE_SHIFT)

    def addr_of(self, pgoff: int) -> int:
        return self.start + ((pgoff - self.pgoff) << PAGE_SHIFT)

    @property
    def writes_file(self) -> bool:
        """A shared writable mapping keeps its file open for write (i_writecount)."""
        return self.shared and bool(self.prot & PROT_WRITE)

    def same_flags(self, other: Vma) -> bool:
        """is_mergeable_vma: the same open file (vm_file) and the same vm_flags."""
        return (
            self.file == other.file
            and self.ino == other.ino
            and self.prot == other.prot
            and self.shared == other.shared
            and self.hugepage == other.hugepage
            and self.nohugepage == other.nohugepage
            and self.account == other.account
            and self.locked == other.locked
            and self.lockonfault == other.lockonfault
            and self.flags == other.flags
        )

    def can_merge(self, nxt: Vma) -> bool:
        """Whether ``nxt``, which starts where this VMA ends, is compatible with it and contiguous
        in the file (is_mergeable_vma and the pgoff test of can_vma_merge_after/_before); the
        anon_vmas are :func:`is_mergeable_anon_vma`'s to judge."""
        return self.end == nxt.start and self.same_flags(nxt) and self.pgoff_at(self.end) == nxt.pgoff

    def anon_vma_compatible(self, nxt: Vma) -> bool:
        """anon_vma_compatible(self, nxt): neighbours that could share an anon_vma. Like
        :meth:`can_merge`, but the access flags (VM_READ/WRITE/EXEC) may differ."""
        return (
            self.end == nxt.start
            and self.file == nxt.file
            and self.ino == nxt.ino
            and self.shared == nxt.shared
            and self.hugepage == nxt.hugepage
            and self.nohugepage == nxt.nohugepage
            and self.account == nxt.account
            and self.locked == nxt.locked
            and self.lockonfault == nxt.lockonfault
            and self.flags == nxt.flags
            and self.pgoff_at(self.end) == nxt.pgoff
        )

    def copy(self, start: int, end: int) -> Vma:
        """A VMA like this one over [start, end): __split_vma's new piece (vm_area_dup), sharing
        the anon_vma and its chain."""
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
            self.fork_child,
            self.file,
            self.account,
            self.locked,
            self.lockonfault,
            self.flags,
        )

    def anon_vma_prepare(self) -> None:
        """The VMA now holds private anon pages (a CoW copy, a uprobe breakpoint): give it an
        anon_vma if it has none (__anon_vma_prepare). find_mergeable_anon_vma reuses the next
        VMA's, else the previous one's, when that neighbour is anon_vma_compatible and its chain
        is singular (reusable_anon_vma); otherwise a new one. From here on retract_page_tables
        leaves the VMA's page tables alone."""
        if self.anon_vma is not None:
            return
        mm = self.mm
        assert mm is not None, f"{self} is not linked"
        i = bisect.bisect_left(mm.starts, self.start)
        nxt = mm.vmas[i + 1] if i + 1 < len(mm.vmas) else None
        prev = mm.vmas[i - 1] if i > 0 else None
        if nxt is not None and nxt.anon_vma is not None and not nxt.fork_child and self.anon_vma_compatible(nxt):
            self.anon_vma = nxt.anon_vma
        elif prev is not None and prev.anon_vma is not None and not prev.fork_child and prev.anon_vma_compatible(self):
            self.anon_vma = prev.anon_vma
        else:
            self.anon_vma = mm.new_anon_vma()

    def thp_suitable(self) -> bool:
        """Whether some 2 MiB-aligned range inside the VMA can hold a PMD mapping: the last one
        before vm_end passes thp_vma_suitable_order (__thp_vma_allowable_orders' test outside
        the fault path)."""
        return self.pmd_suitable((self.end - (1 << HPAGE_PMD_SHIFT)) & ~((1 << HPAGE_PMD_SHIFT) - 1))

    def can_set_pmd(self, haddr: int) -> bool:
        """What do_set_pmd checks of the VMA before it maps a PMD-order folio at ``haddr``: THPs
        not disabled for it (vma_thp_disabled: VM_NOHUGEPAGE; prctl(PR_SET_THP_DISABLE) is not
        modelled) and the range suitable (thp_vma_suitable_order)."""
        return not self.nohugepage and self.pmd_suitable(haddr)

    def pmd_suitable(self, haddr: int) -> bool:
        """thp_vma_suitable_order: the VMA covers [haddr, haddr+2M) with matching alignment."""
        if haddr < self.start or haddr + (1 << HPAGE_PMD_SHIFT) > self.end:
            return False
        return ((self.start >> PAGE_SHIFT) - self.pgoff) % HPAGE_PMD_NR == 0

    def __repr__(self) -> str:
        return f"Vma({self.start:#x}-{self.end:#x} ino={self.ino} pgoff={self.pgoff:#x})"


def is_mergeable_anon_vma(tgt: Vma, src: Vma) -> bool:
    """mm/vma.c is_mergeable_anon_vma(): may ``src`` (the new or changed range) merge into its
    neighbour ``tgt``? An anon_vma on one side only is taken over by the merge, unless the VMA
    that has it is a fork child (vma_is_fork_child); on both sides it must be the same."""
    if tgt.anon_vma is None:
        return src.anon_vma is None or not src.fork_child
    if src.anon_vma is None:
        return not tgt.fork_child
    return tgt.anon_vma == src.anon_vma


def mergeable_neighbours(a: Vma, b: Vma) -> bool:
    """Whether neighbours ``a`` and ``b`` (``b`` starting where ``a`` ends) could be one VMA: a
    change to either would merge them (vma_merge_existing_range, with either as the middle)."""
    return a.can_merge(b) and (is_mergeable_anon_vma(a, b) or is_mergeable_anon_vma(b, a))


def anon_vmas_compatible(a: Vma, b: Vma) -> bool:
    """can_vma_merge_right's extra test when a range merges with both neighbours: their own
    anon_vmas must not differ."""
    return a.anon_vma is None or b.anon_vma is None or a.anon_vma == b.anon_vma


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
        self.anon_vmas = 0  # anon_vmas made for this mm: the last identity handed out
        self.fdtable: dict[int, int] = {}  # inode -> the open file mmap uses for it (struct file)
        self.locked_vm = 0  # pages in VM_LOCKED VMAs (VmLck)
        self.hiwater_rss = 0  # pages: the rss before its last fall (VmHWM)
        self.hiwater_vm = 0  # pages: total_vm before its last munmap (VmPeak)
        # MMF_VM_HUGEPAGE: khugepaged_enter_vma() put the mm on khugepaged's list (for good).
        self.khugepaged_entered = False
        # Boundaries between neighbours the kernel leaves unmerged though they could merge: fork
        # clears VM_LOCKED in the child's copies (dup_mmap) without merging them.
        self.unmerged: set[int] = set()

    def new_anon_vma(self) -> int:
        """A new anon_vma's identity (anon_vma_alloc), unique in this mm."""
        self.anon_vmas += 1
        return self.anon_vmas

    def update_hiwater_rss(self) -> None:
        """Called before the rss falls (zap, unmap), as the kernel does, so the high-water mark
        is the peak without a check on every fault."""
        rss = self.rss["MM_FILEPAGES"] + self.rss["MM_ANONPAGES"] + self.rss["MM_SHMEMPAGES"]
        if rss > self.hiwater_rss:
            self.hiwater_rss = rss

    def total_vm(self) -> int:
        """Pages in all VMAs."""
        return sum(v.end - v.start for v in self.vmas) >> PAGE_SHIFT

    def update_hiwater_vm(self) -> None:
        """Called before a munmap shrinks total_vm (vms_complete_munmap_vmas)."""
        self.hiwater_vm = max(self.hiwater_vm, self.total_vm())

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

    def sigsegv_end(self, addr: int) -> int:
        """Where the run of addresses that fault like ``addr`` (a SIGSEGV: no VMA, or one whose
        protection refuses the access) ends: the next VMA's start, or the refusing VMA's end."""
        if addr < 0:
            return 0
        if addr >= TASK_SIZE:
            return 1 << 64
        vma = self.find_vma(addr)
        if vma is not None:
            return vma.end
        i = bisect.bisect_right(self.starts, addr)
        return self.vmas[i].start if i < len(self.vmas) else TASK_SIZE

    def overlapping(self, start: int, end: int) -> list[Vma]:
        i = max(bisect.bisect_right(self.starts, start) - 1, 0)
        out = []
        while i < len(self.vmas) and self.vmas[i].start < end:
            if self.vmas[i].end > start:
                out.append(self.vmas[i])
            i += 1
        return out

    def insert_vma(self, vma: Vma) -> None:
        vma.mm = self
        if vma.locked:
            self.locked_vm += (vma.end - vma.start) >> PAGE_SHIFT
        i = bisect.bisect_left(self.starts, vma.start)
        self.starts.insert(i, vma.start)
        self.vmas.insert(i, vma)

    def remove_vma(self, vma: Vma) -> None:
        if vma.locked:
            self.locked_vm -= (vma.end - vma.start) >> PAGE_SHIFT
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
