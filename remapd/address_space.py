"""A process's address space as its syscalls change it: mmap, munmap, madvise, fork's copy and
exit's teardown, and the VMA bookkeeping under them (split, vma_merge, the file rmap, i_writecount
and khugepaged registration). Not the kernel's ``struct address_space`` (a file's page cache),
though the file rmap that lives there (:class:`remapd.files.Files`) is kept up to date here.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Generator, Iterator
from typing import Any

import numpy as np

from remapd.fault import FaultPath
from remapd.files import Files
from remapd.khugepaged import Khugepaged
from remapd.mm import (
    PTE_ANON,
    PTE_THP,
    VM_DONTCOPY,
    VM_DONTDUMP,
    VM_RAND_READ,
    VM_SEQ_READ,
    Mm,
    MmapLocks,
    Vma,
    anon_vmas_compatible,
    find_mm,
    is_mergeable_anon_vma,
    mergeable_neighbours,
    pte_pfn,
)
from remapd.pagetable import PageTables
from remapd.uprobes import Uprobes
from shared.actor import Actor, Call
from shared.errors import UserError
from shared.protocol import Message
from shared.protocol import messages as m
from shared.thp import hugepage_pmd_enabled, thp_vma_allowable_order
from shared.units import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SHIFT,
    HPAGE_PMD_SIZE,
    MAX_LFS_FILESIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    TASK_SIZE,
)
from shared.vm import ADVICE, PROT_READ, PROT_WRITE, PROTS, VM_FLAGS_ADVICE

# Where mmap(NULL, ...) starts looking for room, top-down (x86-64 mmap_base, roughly).
MMAP_BASE = 0x7F0000000000
MMAP_MIN_ADDR = 0x10000
# vm.max_map_count's default (DEFAULT_MAX_MAP_COUNT): VMAs per mm; a split or mmap past it is ENOMEM.
MAX_MAP_COUNT = 65530


# madvise_vma_behavior's other vm_flags advices: the Vma.flags bits each sets and clears.
# MADV_KEEPONFORK clears VM_WIPEONFORK, which no file VMA has (MADV_WIPEONFORK is EINVAL on one).
_MADV_FLAG_BITS = {
    "normal": (0, VM_RAND_READ | VM_SEQ_READ),
    "random": (VM_RAND_READ, VM_SEQ_READ),
    "sequential": (VM_SEQ_READ, VM_RAND_READ),
    "dontfork": (VM_DONTCOPY, 0),
    "dofork": (0, VM_DONTCOPY),
    "dontdump": (VM_DONTDUMP, 0),
    "dodump": (0, VM_DONTDUMP),
    "keeponfork": (0, 0),
}


class MapCountExceeded(UserError):
    """The mm holds vm.max_map_count VMAs and the next step would add one: ENOMEM before that
    step. mprotect, mlock, madvise and mremap answer it as their result (earlier VMAs of the
    range stay changed, as for a hole); mmap and munmap raise it before changing anything."""

    def __init__(self, mm: Mm):
        super().__init__("ENOMEM", f"{len(mm.vmas)} VMAs: vm.max_map_count is {MAX_MAP_COUNT}")


class AddressSpace:
    """mmap/munmap/madvise for every process, and VMA link/unlink/split/merge. ``actor`` carries
    the notices the collapser needs about mappings (write opens, khugepaged ranges, reclaim)."""

    def __init__(
        self,
        actor: Actor,
        mms: dict[int, Mm],
        files: Files,
        locks: MmapLocks,
        pagetables: PageTables,
        faults: FaultPath,
        khugepaged: Khugepaged,
        uprobes: Uprobes,
    ):
        self.actor = actor
        self.mms = mms
        self.files = files
        self.locks = locks
        self.pagetables = pagetables
        self.faults = faults
        self.khugepaged = khugepaged
        self.uprobes = uprobes

    # -- mmap / munmap / madvise --------------------------------------------------------------

    def mmap(
        self,
        pid: int,
        addr: int | None,
        length: int,
        name: str,
        offset: int = 0,
        prot: str = "r",
        shared: bool = True,
        reopen: bool = False,
    ) -> Generator[Any, Any, dict[str, Any]]:
        """mmap(2) of file ``name``. Its struct file (vm_file) is the process's one open file of
        ``name``, opened at the first mmap of it and inherited across fork, as a program that
        maps one fd several times; ``reopen``: a new open(2) for this mapping alone."""
        mm = find_mm(self.mms, pid)
        f = self.files.lookup(name)
        if prot not in PROTS:
            raise UserError("EINVAL", f"prot must be one of {', '.join(PROTS)}")
        if length <= 0:
            raise UserError("EINVAL", "length must be positive")
        if offset < 0 or offset % PAGE_SIZE:
            raise UserError("EINVAL", "offset must be a non-negative multiple of the page size")
        if offset + length > MAX_LFS_FILESIZE:
            # file_mmap_ok: the mapping would reach past the largest file offset.
            raise UserError("EOVERFLOW", f"offset {offset:#x} + length {length:#x} passes MAX_LFS_FILESIZE")
        length = (length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        if addr is None:
            addr = self._get_unmapped_area(mm, length, offset >> PAGE_SHIFT)
        elif addr + length > TASK_SIZE:
            # __get_unmapped_area checks the range before the alignment: past the user address
            # space is ENOMEM, as for a length no hole fits.
            raise UserError("ENOMEM", f"[{addr:#x}, +{length:#x}) passes the user address space")
        elif addr % PAGE_SIZE or addr < MMAP_MIN_ADDR:
            raise UserError("EINVAL", f"address {addr:#x} is not a page-aligned user address")
        yield from self.locks.mmap_write_lock(mm)
        try:
            if len(mm.vmas) > MAX_MAP_COUNT:
                raise MapCountExceeded(mm)  # do_mmap's check
            if mm.overlapping(addr, addr + length):
                self._do_munmap(mm, addr, addr + length)  # MAP_FIXED replaces what was there
            if reopen:
                file = self.files.open_file()
            else:
                file = mm.fdtable.get(f.ino) or mm.fdtable.setdefault(f.ino, self.files.open_file())
            vma = Vma(
                addr,
                addr + length,
                offset >> PAGE_SHIFT,
                f.ino,
                PROTS[prot],
                shared,
                file=file,
                account=not shared and bool(PROTS[prot] & PROT_WRITE),  # accountable_mapping
            )
            self.vma_link(mm, vma)
            vma = self._vma_merge(mm, vma)
            self.khugepaged_enter_vma(mm, vma)  # __mmap_new_vma, for the VMA as mapped
            yield from self.uprobes.uprobe_mmap(mm, vma)
        finally:
            self.locks.mmap_write_unlock(mm)
        return {"addr": addr, "length": length}

    def _get_unmapped_area(self, mm: Mm, length: int, pgoff: int) -> int:
        """Top-down search; a mapping of 2 MiB or more is placed so that its file offset and
        its address agree modulo 2 MiB (thp_get_unmapped_area)."""
        align = length >= HPAGE_PMD_SIZE
        hi = MMAP_BASE
        for vma in reversed(mm.vmas):
            if vma.end > hi:
                hi = min(hi, vma.start)
                continue
            candidate = self._place(hi - length, pgoff, align)
            if candidate >= vma.end:
                return candidate
            hi = vma.start
        candidate = self._place(hi - length, pgoff, align)
        if candidate >= MMAP_MIN_ADDR:
            return candidate
        raise UserError("ENOMEM", "no room for the mapping")

    @staticmethod
    def _place(addr: int, pgoff: int, align: bool) -> int:
        addr &= ~(PAGE_SIZE - 1)
        if align:
            want = (pgoff << PAGE_SHIFT) & (HPAGE_PMD_SIZE - 1)
            addr = ((addr - want) & ~(HPAGE_PMD_SIZE - 1)) + want
        return addr

    def munmap(self, pid: int, addr: int, length: int) -> Generator[Any, Any, dict[str, Any]]:
        mm = find_mm(self.mms, pid)
        # __do_munmap: start beyond TASK_SIZE (a negative address is a huge unsigned one) is EINVAL.
        if addr % PAGE_SIZE or not 0 <= addr < TASK_SIZE or length <= 0 or addr + length > TASK_SIZE:
            raise UserError("EINVAL", "munmap needs a page-aligned address and a positive length")
        end = addr + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        yield from self.locks.mmap_write_lock(mm)
        try:
            self._do_munmap(mm, addr, end)
        finally:
            self.locks.mmap_write_unlock(mm)
        return {"addr": addr, "length": end - addr}

    def _do_munmap(self, mm: Mm, start: int, end: int) -> None:
        self._room_for_splits(mm, start, end)
        if mm.overlapping(start, end):
            mm.update_hiwater_vm()
        self._split_vma(mm, start)
        self._split_vma(mm, end)
        for vma in mm.overlapping(start, end):
            self.faults.unpin_range(mm, vma.start, vma.end)
            self.pagetables.zap_page_range(mm, vma.start, vma.end)
            self.vma_unlink(mm, vma)
        self.pagetables.free_pgtables(mm, start, end)

    def madvise(self, pid: int, addr: int, length: int, advice: str) -> Generator[Any, Any, dict[str, Any]]:
        mm = find_mm(self.mms, pid)
        if advice not in ADVICE:
            raise UserError("EINVAL", f"unknown advice {advice!r}")
        if addr % PAGE_SIZE or length < 0:
            raise UserError("EINVAL", "madvise needs a page-aligned address")
        end = addr + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        if end == addr:
            return {"result": 0}
        if advice == "collapse":
            result = yield from self.khugepaged.madvise_collapse(mm, addr, end)
            return {"result": result}
        covered = mm.overlapping(addr, end)
        unmapped = sum(min(v.end, end) - max(v.start, addr) for v in covered) != end - addr
        if advice in VM_FLAGS_ADVICE:
            yield from self.locks.mmap_write_lock(mm)
            try:
                for vma, lo, hi in self._walk_vmas(mm, addr, end):
                    changes = self._madvise_flags(mm, vma, advice)
                    if changes is None:
                        return {"result": "EINVAL"}
                    if all(getattr(vma, name) == value for name, value in changes.items()):
                        continue  # madvise_update_vma: the flags do not change, nothing is split
                    self._vma_modify(mm, lo, hi, **changes)
            except MapCountExceeded:
                return {"result": "ENOMEM"}
            finally:
                self.locks.mmap_write_unlock(mm)
        elif advice == "dontneed":
            yield from self.locks.mmap_read_lock(mm)
            try:
                for vma in mm.overlapping(addr, end):
                    if vma.locked:
                        return {"result": "EINVAL"}  # madvise_dontneed_free_valid_vma
                    self.pagetables.zap_page_range(mm, max(vma.start, addr), min(vma.end, end), reclaim_pt=True)
            finally:
                self.locks.mmap_read_unlock(mm)
        elif advice == "free":
            # madvise_free_single_vma: only anonymous VMAs (there are none here): EINVAL at the
            # first VMA; a range of holes alone is ENOMEM.
            if covered:
                return {"result": "EINVAL"}
        elif advice in ("remove", "willneed"):
            error = yield from self._per_vma_call(mm, addr, end, self._remove if advice == "remove" else self._willneed)
            if error:
                return {"result": error}
        elif advice in ("pageout", "cold"):
            yield from self.locks.mmap_read_lock(mm)
            try:
                # can_madv_lru_vma: a VM_LOCKED VMA is EINVAL; the VMAs before it are paged out.
                stop = next((v.start for v in mm.overlapping(addr, end) if v.locked), None)
                self._pageout(mm, addr, end if stop is None else max(addr, stop), advice == "pageout")
                if stop is not None:
                    return {"result": "EINVAL"}
            finally:
                self.locks.mmap_read_unlock(mm)
        else:
            # madvise_populate, as observed on 6.18: it stops at the first hole (ENOMEM) or VMA
            # whose protection refuses the access (EINVAL), keeping what it populated before.
            write = advice == "populate_write"
            page = addr
            while page < end:
                if self.actor.cancelled():
                    raise UserError("ECANCELED", f"populate of process {pid} cancelled at {page:#x}: its caller went away")
                cur = mm.find_vma(page)
                if cur is None:
                    return {"result": "ENOMEM"}
                if (write and not cur.prot & PROT_WRITE) or not cur.prot & PROT_READ:
                    return {"result": "EINVAL"}
                if not write:
                    nxt, failed = yield from self.faults.read_faults(mm, page, end, PAGE_SIZE, None)
                    if failed is not None:
                        return {"result": "EFAULT"}
                    if nxt != page:
                        page = nxt
                        continue
                result = yield from self.faults.do_user_addr_fault(pid, page, write)
                if result in ("sigsegv", "sigbus"):
                    return {"result": "EFAULT"}
                if isinstance(mm.pmds.get(page >> HPAGE_PMD_SHIFT), int):
                    page = (page | (HPAGE_PMD_SIZE - 1)) + 1  # the PMD mapped the rest
                else:
                    page += PAGE_SIZE
        return {"result": "ENOMEM" if unmapped else 0}

    def _madvise_flags(self, mm: Mm, vma: Vma, advice: str) -> dict[str, Any] | None:
        """madvise_vma_behavior for an advice that changes vm_flags: the VMA attributes it gives
        ``vma`` (:meth:`_vma_modify`'s changes), or None for EINVAL."""
        if advice in ("hugepage", "nohugepage"):
            # hugepage_madvise: VM_HUGEPAGE and VM_NOHUGEPAGE exclude each other.
            hg = advice == "hugepage"
            if hg:
                # hugepage_madvise -> khugepaged_enter_vma(vma, new flags), before the VMA
                # changes. For shmem, 6.18's shmem_allowable_huge_orders() reads vma->vm_flags,
                # still without VM_HUGEPAGE: under huge=advise the first MADV_HUGEPAGE does not
                # register the mm, a second one does.
                shmem = self.files.is_shmem(vma.ino)
                self.khugepaged_enter_vma(
                    mm, vma, hugepage=vma.hugepage if shmem else True, nohugepage=vma.nohugepage and shmem
                )
            return {"hugepage": hg, "nohugepage": not hg}
        if advice == "wipeonfork":
            # Private anonymous memory only (vma->vm_file or VM_SHARED: EINVAL); every VMA here
            # maps a file.
            return None
        set_bits, clear_bits = _MADV_FLAG_BITS[advice]
        return {"flags": (vma.flags & ~clear_bits) | set_bits}

    def mremap(
        self,
        pid: int,
        addr: int,
        old_length: int,
        new_length: int,
        to: int | None = None,
        maymove: bool = False,
        dontunmap: bool = False,
    ) -> Generator[Any, Any, dict[str, Any]]:
        """mremap(2): ``to`` is MREMAP_FIXED (with MREMAP_MAYMOVE), ``dontunmap``
        MREMAP_DONTUNMAP (with MREMAP_MAYMOVE). Returns ``{"result": 0, "addr": new address}``
        or ``{"result": errno name, "addr": None}``; bad arguments are EINVAL as results too.

        As 6.18's mm/mremap.c: a shrink unmaps the tail; a grow extends the VMA in place when
        it ends the range and the space after it is free (merging with the next VMA), else
        moves it with MREMAP_MAYMOVE (ENOMEM without); a move (move_vma) copies the VMA to the
        new place (merging there), moves the page tables (:meth:`PageTables.move_page_tables`:
        a PMD moves whole when both addresses are aligned), and unmaps the old range unless
        MREMAP_DONTUNMAP, which leaves the old VMA, unlocked. With MREMAP_FIXED and an unchanged
        size, every VMA in the range moves, gaps kept, and what is mapped opposite a gap stays
        (remap_move). ``old_length`` 0 maps a shared mapping a second time. A VM_LOCKED VMA's
        new tail is faulted in."""
        mm = find_mm(self.mms, pid)
        fixed = to is not None
        maymove = maymove or fixed or dontunmap
        old_len = (old_length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        new_len = (new_length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        if addr % PAGE_SIZE or old_length < 0 or new_length <= 0 or addr + old_len > TASK_SIZE:
            return {"result": "EINVAL", "addr": None}
        if dontunmap and old_len != new_len:
            return {"result": "EINVAL", "addr": None}
        if to is not None and (
            to % PAGE_SIZE
            or to < MMAP_MIN_ADDR
            or to + new_len > TASK_SIZE
            or (to < addr + old_len and addr < to + new_len)
        ):
            return {"result": "EINVAL", "addr": None}
        populate: tuple[int, int] | None = None
        yield from self.locks.mmap_write_lock(mm)
        try:
            try:
                result, new_addr, populate = self._mremap(mm, addr, old_len, new_len, to, maymove, dontunmap)
            except MapCountExceeded:
                result, new_addr, populate = "ENOMEM", None, None
        finally:
            self.locks.mmap_write_unlock(mm)
        if populate is not None:
            yield from self._mm_populate(mm, *populate)  # a VM_LOCKED VMA's new tail
        return {"result": result, "addr": new_addr}

    def _mremap(
        self, mm: Mm, addr: int, old_len: int, new_len: int, to: int | None, maymove: bool, dontunmap: bool
    ) -> tuple[int | str, int | None, tuple[int, int] | None]:
        vma = mm.find_vma(addr)
        if vma is None:
            return "EFAULT", None, None
        if old_len == 0 and not vma.shared:
            return "EINVAL", None, None  # only a shared mapping can be mapped twice
        if to is not None and old_len == new_len and old_len:
            # remap_move: every VMA in the range moves by the same distance, each replacing what
            # was at its own target; what lies opposite a gap stays.
            delta = to - addr
            pieces = [(max(v.start, addr), min(v.end, addr + old_len)) for v in mm.overlapping(addr, addr + old_len)]
            for lo, hi in pieces:
                self._do_munmap(mm, lo + delta, hi + delta)
                self._move_vma(mm, lo, hi - lo, hi - lo, lo + delta, dontunmap)
            return 0, to, None
        if to is None and new_len <= old_len:
            # Nothing new is mapped (check_prep_vma stops here): the range may span VMAs, and a
            # shrink unmaps the tail, whatever is there.
            if new_len < old_len:
                self._do_munmap(mm, addr + new_len, addr + old_len)
            return 0, addr, None
        # A grow or a move stays inside one VMA (MREMAP_FIXED first drops what a shrink drops).
        if (old_len if to is None else min(old_len, new_len)) > vma.end - addr:
            return "EFAULT", None, None
        if to is not None:
            self._do_munmap(mm, to, to + new_len)
            if mm.find_vma(addr) is None:
                # mremap_to: with old_length 0 the target may start at addr itself, and the
                # munmap took the page the VMA is looked up by (vma_lookup fails: -EFAULT).
                return "EFAULT", None, None
            if old_len > new_len:
                self._do_munmap(mm, addr + new_len, addr + old_len)
                old_len = new_len
            return 0, to, self._move_vma(mm, addr, old_len, new_len, to, dontunmap)
        end = addr + new_len
        if old_len and addr + old_len == vma.end and end <= TASK_SIZE and not mm.overlapping(vma.end, end):
            # vma_expandable: grow in place (vma_merge_extend merges with the next VMA).
            grown = vma.copy(vma.start, end)
            self.vma_unlink(mm, vma)
            self.vma_link(mm, grown)
            # vma_merge_new_range -> vma_expand succeeds with or without a next VMA to take in.
            self.khugepaged_enter_vma(mm, self._vma_merge(mm, grown))
            return 0, addr, ((addr + old_len, end) if grown.locked else None)
        if not maymove:
            return "ENOMEM", None, None
        new_addr = self._get_unmapped_area(mm, new_len, vma.pgoff_at(addr))
        return 0, new_addr, self._move_vma(mm, addr, old_len, new_len, new_addr, dontunmap)

    def _move_vma(
        self, mm: Mm, old: int, old_len: int, new_len: int, new: int, dontunmap: bool
    ) -> tuple[int, int] | None:
        """move_vma: a copy of the VMA holding ``old`` at [new, new+new_len) (copy_vma, which
        merges it there), the page tables and GUP pins moved, the old range unmapped (or, with
        ``dontunmap``, its VMA kept without VM_LOCKED, and without its anon_vma when it moved
        whole). Returns the range to populate for a VM_LOCKED VMA that grew, else None."""
        if len(mm.vmas) >= MAX_MAP_COUNT - 3:
            raise MapCountExceeded(mm)  # move_vma: the unmap after the copy may split one VMA in three
        vma = mm.find_vma(old)
        assert vma is not None
        copy = vma.copy(old, vma.end)
        copy.start, copy.end = new, new + new_len
        self.vma_link(mm, copy)
        copy = self._vma_merge(mm, copy)
        if not old_len:
            return None  # a second mapping of a shared one: nothing moves
        self.pagetables.move_page_tables(mm, old, new, old_len)
        for page in [p for p in mm.pins if old <= p < old + old_len]:
            mm.pins[page - old + new] = mm.pins.pop(page)
        if not dontunmap:
            self._do_munmap(mm, old, old + old_len)
        elif vma.locked or (vma.anon_vma is not None and (vma.start, vma.end) == (old, old + old_len)):
            kept = vma.copy(vma.start, vma.end)
            kept.locked = kept.lockonfault = False  # the old VMA loses VM_LOCKED_MASK, whole
            if (vma.start, vma.end) == (old, old + old_len):
                kept.anon_vma, kept.fork_child = None, False  # unlink_anon_vmas
            self.vma_unlink(mm, vma)
            self.vma_link(mm, kept)
            self._note_unmerged(mm, kept)
        if copy.locked and new_len > old_len:
            return new + old_len, new + new_len
        return None

    @staticmethod
    def _note_unmerged(mm: Mm, vma: Vma) -> None:
        """``vma`` changed in place, with no merge attempt (as the kernel's vm_flags_clear):
        remember the boundaries where it now could merge and did not."""
        i = bisect.bisect_left(mm.starts, vma.start)
        if i > 0 and mergeable_neighbours(mm.vmas[i - 1], vma):
            mm.unmerged.add(vma.start)
        if i + 1 < len(mm.vmas) and mergeable_neighbours(vma, mm.vmas[i + 1]):
            mm.unmerged.add(vma.end)

    def _per_vma_call(
        self, mm: Mm, start: int, end: int, request: Callable[[Vma, int, int], Message | str | None]
    ) -> Generator[Any, Any, str | None]:
        """An advice the collapser carries out, VMA by VMA, with the mmap lock dropped across
        each request as the kernel drops it (madvise_remove, madvise_willneed: the VMAs are
        looked up afresh after). ``request(vma, lo, hi)`` gives the request for the part [lo, hi)
        of ``vma``, None for nothing, or an errno name that ends the walk. Returns that errno
        name, or None."""
        pos = start
        while pos < end:
            yield from self.locks.mmap_read_lock(mm)
            try:
                vmas = mm.overlapping(pos, end)
                if not vmas:
                    break
                vma = vmas[0]
                lo, hi = max(vma.start, pos), min(vma.end, end)
                req = request(vma, lo, hi)
            finally:
                self.locks.mmap_read_unlock(mm)
            if isinstance(req, str):
                return req
            if req is not None:
                yield Call(req)
            pos = hi
        return None

    def _remove(self, vma: Vma, lo: int, hi: int) -> Message | str:
        """MADV_REMOVE (madvise_remove): a VM_LOCKED VMA is EINVAL, one that is not shared and
        may-write (vma_is_shared_maywrite; files are opened read-write) EACCES; else the collapser
        punches the file range it maps (vfs_fallocate PUNCH_HOLE, which unmaps it from every
        mapping)."""
        if vma.locked:
            return "EINVAL"
        if not vma.shared:
            return "EACCES"
        return m.PunchHole(self.actor.new_req(), vma.ino, vma.pgoff_at(lo) << PAGE_SHIFT, hi - lo)

    def _willneed(self, vma: Vma, lo: int, hi: int) -> Message | None:
        """MADV_WILLNEED (madvise_willneed): a regular file's range is read ahead as
        vfs_fadvise(POSIX_FADV_WILLNEED) does (force_page_cache_ra, in the collapser). Shmem's
        shmem_swapin_range starts reading its swap entries into the swap cache, which the model
        does not have: nothing changes (as on a machine without swap)."""
        if self.files.is_shmem(vma.ino):
            return None
        return m.WillNeed(self.actor.new_req(), vma.ino, vma.pgoff_at(lo), (hi - lo) >> PAGE_SHIFT)

    def mprotect(self, pid: int, addr: int, length: int, prot: str) -> Generator[Any, Any, dict[str, Any]]:
        """mprotect(2) (do_mprotect_pkey): each VMA in the range takes the protection through
        mprotect_fixup, which leaves a VMA that already has it alone and otherwise splits it at
        the range's edges (splitting a PMD there) and merges the result with its neighbours. A
        hole at the start is ENOMEM before anything changes; one further on is ENOMEM after the
        VMAs before it changed. Mappings stay: change_protection keeps a PMD the range covers
        whole and sets each PTE's write bit as the new protection has it."""
        mm = find_mm(self.mms, pid)
        if prot not in PROTS:
            raise UserError("EINVAL", f"prot must be one of {', '.join(PROTS)}")
        if addr % PAGE_SIZE or length < 0:
            raise UserError("EINVAL", "mprotect needs a page-aligned address")
        end = addr + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        if end == addr:
            return {"result": 0}
        newprot = PROTS[prot]
        populate: list[tuple[int, int]] = []
        yield from self.locks.mmap_write_lock(mm)
        try:
            try:
                result = self._mprotect(mm, addr, end, newprot, populate)
            except MapCountExceeded:
                result = "ENOMEM"
        finally:
            self.locks.mmap_write_unlock(mm)
        # A private VM_LOCKED VMA made writable is populated with write faults (breaking CoW at
        # once rather than at the next access); in the kernel still under the write lock.
        for lo, hi in populate:
            yield from self._mm_populate(mm, lo, hi)
        return {"result": result}

    def _mprotect(self, mm: Mm, start: int, end: int, newprot: int, populate: list[tuple[int, int]]) -> int | str:
        if mm.find_vma(start) is None:
            return "ENOMEM"
        pos = start
        for vma, lo, hi in self._walk_vmas(mm, start, end):
            if lo != pos:
                return "ENOMEM"  # a hole: what came before it stays changed
            pos = hi
            if vma.prot == newprot:
                continue  # mprotect_fixup: the flags do not change
            # A private mapping made writable is charged (VM_ACCOUNT), for good.
            account = vma.account or (not vma.shared and bool(newprot & PROT_WRITE))
            if vma.locked and not vma.shared and not vma.prot & PROT_WRITE and newprot & PROT_WRITE:
                populate.append((lo, hi))
            vma = self._vma_modify(mm, lo, hi, prot=newprot, account=account)
            self.pagetables.change_protection(mm, vma, lo, hi)
        return 0 if pos >= end else "ENOMEM"

    def mlock(self, pid: int, addr: int, length: int, onfault: bool = False) -> Generator[Any, Any, dict[str, Any]]:
        """mlock(2), or mlock2(MLOCK_ONFAULT) with ``onfault`` (do_mlock): the range is widened to
        whole pages, every VMA in it gets VM_LOCKED (and VM_LOCKONFAULT, or loses it) through
        mlock_fixup (apply_vma_lock_flags: a VMA that has the flags already is left alone, a
        hole is ENOMEM), then __mm_populate faults the range in: write faults in a private
        writable VMA (breaking CoW), read faults elsewhere, nothing in a VM_LOCKONFAULT VMA. A
        PROT_NONE VMA or a page past EOF (EFAULT) makes it ENOMEM (__mlock_posix_error_return),
        the VMAs staying locked. RLIMIT_MEMLOCK is not modelled (root has CAP_IPC_LOCK)."""
        mm = find_mm(self.mms, pid)
        start, end = self._lock_range(addr, length)
        if start == end:
            return {"result": 0}
        yield from self.locks.mmap_write_lock(mm)
        try:
            error = self._apply_vma_lock_flags(mm, start, end, True, onfault)
        finally:
            self.locks.mmap_write_unlock(mm)
        if error:
            return {"result": error}
        result = yield from self._mm_populate(mm, start, end)
        return {"result": result}

    def munlock(self, pid: int, addr: int, length: int) -> Generator[Any, Any, dict[str, Any]]:
        """munlock(2): apply_vma_lock_flags with no lock flags (ENOMEM for a hole)."""
        mm = find_mm(self.mms, pid)
        start, end = self._lock_range(addr, length)
        if start == end:
            return {"result": 0}
        yield from self.locks.mmap_write_lock(mm)
        try:
            error = self._apply_vma_lock_flags(mm, start, end, False, False)
        finally:
            self.locks.mmap_write_unlock(mm)
        return {"result": error or 0}

    @staticmethod
    def _lock_range(addr: int, length: int) -> tuple[int, int]:
        """mlock's and munlock's range: from ``addr`` rounded down, ``length`` plus the offset into
        the first page rounded up (they take an unaligned address, unlike madvise and mprotect)."""
        if addr < 0 or length < 0:
            raise UserError("EINVAL", "address and length must not be negative")
        start = addr & ~(PAGE_SIZE - 1)
        end = start + ((length + (addr - start) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        if end > TASK_SIZE:
            raise UserError("ENOMEM", "range beyond the address space")
        return start, end

    def _apply_vma_lock_flags(self, mm: Mm, start: int, end: int, locked: bool, onfault: bool) -> str | None:
        """apply_vma_lock_flags: mlock_fixup on each VMA; the errno name, or None."""
        try:
            return self._mlock_fixups(mm, start, end, locked, onfault)
        except MapCountExceeded:
            return "ENOMEM"

    def _mlock_fixups(self, mm: Mm, start: int, end: int, locked: bool, onfault: bool) -> str | None:
        if mm.find_vma(start) is None:
            return "ENOMEM"
        pos = start
        for vma, lo, hi in self._walk_vmas(mm, start, end):
            if lo != pos:
                return "ENOMEM"
            pos = hi
            if vma.locked == locked and vma.lockonfault == (locked and onfault):
                continue  # mlock_fixup: the flags do not change
            self._vma_modify(mm, lo, hi, locked=locked, lockonfault=locked and onfault)
        return None if pos >= end else "ENOMEM"

    def _mm_populate(self, mm: Mm, start: int, end: int) -> Generator[Any, Any, int | str]:
        """__mm_populate -> populate_vma_page_range over [start, end), VMA by VMA, under the
        mmap read lock each fault takes: 0, or ENOMEM (EFAULT, as mlock reports it)."""
        page = start
        while page < end:
            vma = mm.find_vma(page)
            if vma is None:
                nxt = mm.overlapping(page, end)
                if not nxt:
                    break
                page = nxt[0].start
                continue
            stop = min(vma.end, end)
            if vma.lockonfault:
                page = stop  # VM_LOCKONFAULT: populate_vma_page_range does nothing
                continue
            if not vma.prot:
                return "ENOMEM"  # never faults in PROT_NONE: -EFAULT
            # FOLL_WRITE where a write would break CoW (private writable), else a read fault.
            write = bool(vma.prot & PROT_WRITE) and not vma.shared
            while page < stop:
                if not write:
                    resume, failed = yield from self.faults.read_faults(mm, page, stop, PAGE_SIZE, None)
                    if failed is not None:
                        return "ENOMEM"
                    if resume != page:
                        page = resume
                        continue
                result = yield from self.faults.do_user_addr_fault(mm.pid, page, write)
                if result in ("sigsegv", "sigbus"):
                    return "ENOMEM"
                if isinstance(mm.pmds.get(page >> HPAGE_PMD_SHIFT), int):
                    page = (page | (HPAGE_PMD_SIZE - 1)) + 1  # the PMD mapped the rest
                else:
                    page += PAGE_SIZE
        return 0

    def _pageout(self, mm: Mm, start: int, end: int, pageout: bool) -> None:
        """MADV_PAGEOUT (``pageout``) and MADV_COLD, madvise_cold_or_pageout_pte_range()
        (mm/madvise.c, 6.18), VMA by VMA (MADV_COLD's deactivation is invisible here, so only
        its splits remain):
        a folio mapped by another mm (folio_maybe_mapped_shared), or a small one mapped more than
        once, is left alone; a large folio the walk covers only in part (a PMD cut by the range,
        or fewer than all its PTEs in a row: madvise_folio_pte_batch) is split (split_folio, which
        unmaps it everywhere and does not map a file folio again) and nothing of it is paged out;
        any other is unmapped (try_to_unmap, a PMD through TTU_SPLIT_HUGE_PMD) and goes to
        reclaim, which the collapser does (shrink_folio_list). Anon CoW pages are not file pages:
        without swap they stay, so the model leaves them."""
        reclaim: list[int] = []
        split: list[int] = []
        for vma in mm.overlapping(start, end):
            lo, hi = max(vma.start, start), min(vma.end, end)
            for pidx in mm.pmd_indices(lo, hi):
                entry = mm.pmds.get(pidx)  # an earlier split may have unmapped it
                base = pidx << HPAGE_PMD_SHIFT
                if isinstance(entry, int):
                    head = pte_pfn(entry)
                    first = vma.pgoff_at(base)
                    if len(self._folio_mappers(vma.ino, first, head)) > 1:
                        continue
                    whole = lo <= base and base + HPAGE_PMD_SIZE <= hi
                    if whole and not pageout:
                        continue
                    self._unmap_folio(vma.ino, first, head)
                    (reclaim if whole else split).append(head)
                    continue
                if entry is None:
                    continue
                slot, stop = (max(lo, base) - base) >> PAGE_SHIFT, (min(hi, base + HPAGE_PMD_SIZE) - base) >> PAGE_SHIFT
                while slot < stop:
                    pte = entry.ptes[slot]
                    if not pte or pte & PTE_ANON:
                        slot += 1
                        continue
                    pfn = pte_pfn(pte)
                    index = vma.pgoff_at(base + (slot << PAGE_SHIFT))
                    if not pte & PTE_THP:
                        if pageout and sum(self._folio_mappers(vma.ino, index, pfn, 1).values()) == 1:
                            self.pagetables.zap_pte(mm, entry, slot)
                            reclaim.append(pfn)
                        slot += 1
                        continue
                    head = pfn & ~(HPAGE_PMD_NR - 1)
                    first = index - (pfn - head)
                    nr = 1
                    while (
                        slot + nr < stop
                        and pfn + nr < head + HPAGE_PMD_NR
                        and (p := entry.ptes[slot + nr])
                        and not p & PTE_ANON
                        and pte_pfn(p) == pfn + nr
                    ):
                        nr += 1
                    mappers = self._folio_mappers(vma.ino, first, head)
                    if nr < HPAGE_PMD_NR:
                        if len(mappers) <= 1:
                            self._unmap_folio(vma.ino, first, head)
                            split.append(head)
                    elif pageout and sum(mappers.values()) == HPAGE_PMD_NR:
                        self._unmap_folio(vma.ino, first, head)
                        reclaim.append(head)
                    slot += nr
        if reclaim or split:
            self.actor.send(m.Reclaim(tuple(reclaim), tuple(split)))

    def _folio_mappers(self, ino: int, first: int, head: int, nr: int = HPAGE_PMD_NR) -> dict[int, int]:
        """The rmap walk behind folio_mapcount: for each mm mapping the folio of ``nr`` pages from
        ``head`` (file index ``first``), its mappings of it (a PMD counts one, a PTE one)."""
        out: dict[int, int] = {}
        for mm, vma in self.files.mappings(ino):
            lo, hi = max(first, vma.pgoff), min(first + nr, vma.pgoff_at(vma.end))
            n = 0
            index = lo
            while index < hi:
                addr = vma.addr_of(index)
                entry = mm.pmds.get(addr >> HPAGE_PMD_SHIFT)
                if isinstance(entry, int):
                    n += pte_pfn(entry) == head
                    index = vma.pgoff_at((addr | (HPAGE_PMD_SIZE - 1)) + 1)
                    continue
                if entry is not None:
                    pte = entry.ptes[(addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)]
                    n += bool(pte) and not pte & PTE_ANON and pte_pfn(pte) == head + (index - first)
                index += 1
            if n:
                out[mm.pid] = out.get(mm.pid, 0) + n
        return out

    def _unmap_folio(self, ino: int, first: int, head: int) -> None:
        """try_to_unmap / unmap_folio of a large folio (or, for a small one, its one page) from
        every mm: a PMD mapping is split (TTU_SPLIT_HUGE_PMD counts thp_split_pmd), PTEs zapped."""
        pfns = np.arange(head, head + HPAGE_PMD_NR, dtype=np.int64)
        for mm, vma in self.files.mappings(ino):
            lo, hi = max(first, vma.pgoff), min(first + HPAGE_PMD_NR, vma.pgoff_at(vma.end))
            if lo >= hi:
                continue
            a, b = vma.addr_of(lo), vma.addr_of(hi)
            for pidx in mm.pmd_indices(a, b):
                entry = mm.pmds[pidx]
                if isinstance(entry, int) and pte_pfn(entry) == head:
                    self.pagetables.zap_huge_pmd(mm, pidx, split=True)
            self.pagetables.zap_page_range(mm, a, b, anon=False, pfns=pfns)

    # -- fork, exit, and the collapser's requests ---------------------------------------------

    def dup_mmap(self, parent: Mm, mm: Mm) -> None:
        """fork, under the parent's mmap write lock: copy every VMA; page tables only where the
        VMA has an anon_vma (vma_needs_copy), since file pages simply refault in the child."""
        mm.fdtable.update(parent.fdtable)  # the child shares the parent's open files
        mm.khugepaged_entered = parent.khugepaged_entered  # khugepaged_fork
        prev: Vma | None = None
        for vma in parent.vmas:
            if vma.flags & VM_DONTCOPY:
                continue  # MADV_DONTFORK: the child does not get the VMA
            child = vma.copy(vma.start, vma.end)
            child.locked = child.lockonfault = False  # VM_LOCKED_MASK is not inherited
            if vma.anon_vma is not None:
                # anon_vma_fork: the child's VMA gets an anon_vma of its own, chained to the
                # parent's (so a fork child: its chain is not singular).
                child.anon_vma, child.fork_child = mm.new_anon_vma(), True
            self.vma_link(mm, child)
            if prev is not None and mergeable_neighbours(prev, child):
                # Neighbours only VM_LOCKED kept apart stay apart: dup_mmap merges nothing.
                mm.unmerged.add(child.start)
            prev = child
            if vma.anon_vma is not None:
                self.pagetables.copy_page_range(mm, parent, vma)

    def exit_mmap(self, mm: Mm) -> None:
        """Release pins, zap every VMA, unlink it and free the page tables."""
        self.faults.unpin_all(mm)
        for vma in list(mm.vmas):
            self.pagetables.zap_page_range(mm, vma.start, vma.end)
            self.vma_unlink(mm, vma)
        self.pagetables.free_all_pgtables(mm)

    def unmap_mapping_range(self, msg: m.UnmapMapping) -> None:
        """unmap_mapping_range / try_to_unmap over every VMA mapping [start, end) of the file."""
        pfns = np.frombuffer(msg.pfns, dtype=np.dtype(m.RMAP_PFN)) if msg.pfns else None
        for mm, vma in self.files.mappings(msg.ino):
            lo = max(msg.start, vma.pgoff)
            hi = min(msg.end, vma.pgoff_at(vma.end))
            if lo >= hi:
                continue
            self.pagetables.zap_page_range(mm, vma.addr_of(lo), vma.addr_of(hi), anon=msg.even_cows, pfns=pfns)

    def resync(self) -> None:
        """A collapser (new or back) is connected: tell it again about every mapping's write open
        and khugepaged range."""
        for mm in self.mms.values():
            for vma in mm.vmas:
                if self._holds_write_open(vma):
                    self.actor.send(m.WriteOpen(vma.ino, 1))
                if self._khugepaged_suitable(vma):
                    self.actor.send(self._register_range(mm, vma))

    def khugepaged_enter_vma(self, mm: Mm, vma: Vma, hugepage: bool | None = None, nohugepage: bool | None = None) -> None:
        """khugepaged_enter_vma(vma, vm_flags): the first VMA found eligible for khugepaged
        (thp_vma_allowable_order with TVA_KHUGEPAGED, under ``hugepage``/``nohugepage`` as the
        flags it is given, the VMA's own by default) puts the mm on khugepaged's list for good
        (MMF_VM_HUGEPAGE). Called where 6.18 calls it: mmap, a successful VMA merge or expand,
        MADV_HUGEPAGE; fork inherits the flag (khugepaged_fork)."""
        if mm.khugepaged_entered or not self._khugepaged_suitable(vma):
            return
        f = self.files.get(vma.ino)
        knobs = self.khugepaged.knobs
        if f is None or not hugepage_pmd_enabled(knobs):
            return
        if not thp_vma_allowable_order(
            knobs,
            shmem=f.shmem,
            i_size=f.size,
            pgoff=vma.pgoff,
            vm_hugepage=vma.hugepage if hugepage is None else hugepage,
            vm_nohugepage=vma.nohugepage if nohugepage is None else nohugepage,
            open_for_write=self.files.open_for_write(vma.ino),
        ):
            return
        mm.khugepaged_entered = True
        self.actor.send(self._register_range(mm, vma))

    # -- VMA bookkeeping (link/unlink/split/merge) --------------------------------------------

    def vma_link(self, mm: Mm, vma: Vma) -> None:
        """Insert ``vma`` in the mm and the file rmap, and tell the collapser what it implies."""
        mm.insert_vma(vma)
        self.files.i_mmap_insert(mm, vma)
        if self._holds_write_open(vma):
            self.actor.send(m.WriteOpen(vma.ino, 1))
        if self._khugepaged_suitable(vma):
            self.actor.send(self._register_range(mm, vma))

    def vma_unlink(self, mm: Mm, vma: Vma) -> None:
        """The reverse of :meth:`vma_link`. The caller has zapped what the VMA mapped, or links
        VMAs in its place that take over its page tables (split, merge, a flags change)."""
        mm.remove_vma(vma)
        self.files.i_mmap_remove(vma)
        if self._holds_write_open(vma):
            self.actor.send(m.WriteOpen(vma.ino, -1))
        if self._khugepaged_suitable(vma):
            self.actor.send(m.UnregisterRange(mm.pid, vma.start))

    def _holds_write_open(self, vma: Vma) -> bool:
        """A shared writable mapping of a regular file counts in its i_writecount, which the
        collapser keeps (shmem is not subject to the open-for-write rule)."""
        f = self.files.get(vma.ino)
        return vma.writes_file and f is not None and not f.shmem

    @staticmethod
    def _register_range(mm: Mm, vma: Vma) -> m.RegisterRange:
        return m.RegisterRange(
            mm.pid, vma.start, vma.end, vma.ino, vma.pgoff, vma.hugepage, vma.nohugepage, mm.khugepaged_entered
        )

    def _khugepaged_suitable(self, vma: Vma) -> bool:
        """What khugepaged_enter_vma needs on this side: not VM_NOHUGEPAGE, an aligned 2 MiB."""
        if vma.nohugepage:
            return False
        haddr = (vma.start + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1)
        return vma.pmd_suitable(haddr)

    @staticmethod
    def _walk_vmas(mm: Mm, start: int, end: int) -> Iterator[tuple[Vma, int, int]]:
        """madvise_walk_vmas and mprotect's loop: each VMA overlapping [start, end) with the part
        of it in the range, looked up afresh after the caller changed the previous one (a split
        or a merge replaces VMAs)."""
        pos = start
        while pos < end:
            i = bisect.bisect_right(mm.starts, pos) - 1
            if i < 0 or mm.vmas[i].end <= pos:
                i += 1
            if i >= len(mm.vmas) or mm.vmas[i].start >= end:
                return
            vma = mm.vmas[i]
            lo, hi = max(vma.start, pos), min(vma.end, end)
            yield vma, lo, hi
            pos = hi

    @staticmethod
    def _room_for_splits(mm: Mm, start: int, end: int) -> None:
        """ENOMEM, before anything changes, if splitting the VMAs at ``start`` and ``end`` would
        take the mm past vm.max_map_count (vms_gather_munmap_vmas and __split_vma's checks)."""
        splits = sum(1 for a in (start, end) if (v := mm.find_vma(a)) is not None and v.start != a)
        if splits and len(mm.vmas) + splits > MAX_MAP_COUNT:
            raise MapCountExceeded(mm)

    def _split_vma(self, mm: Mm, addr: int) -> None:
        """Split the VMA containing ``addr`` so that a VMA starts there (__split_vma). A PMD
        mapping across the new boundary is split first (vma_adjust_trans_huge)."""
        vma = mm.find_vma(addr)
        if vma is None or vma.start == addr:
            return
        entry = mm.pmds.get(addr >> HPAGE_PMD_SHIFT)
        if isinstance(entry, int) and addr & (HPAGE_PMD_SIZE - 1):
            self.pagetables.zap_huge_pmd(mm, addr >> HPAGE_PMD_SHIFT, split=True)
        self.vma_unlink(mm, vma)
        self.vma_link(mm, vma.copy(vma.start, addr))
        self.vma_link(mm, vma.copy(addr, vma.end))

    def _vma_modify(self, mm: Mm, start: int, end: int, **changes: Any) -> Vma:
        """vma_modify_flags: [start, end), inside one VMA, takes ``changes`` (Vma attributes); the
        rest of that VMA is split off, and the changed part merges with its neighbours where it can
        (vma_merge_existing_range). Returns the VMA that now holds [start, end)."""
        self._room_for_splits(mm, start, end)
        self._split_vma(mm, start)
        self._split_vma(mm, end)
        old = mm.find_vma(start)
        assert old is not None and (old.start, old.end) == (start, end)
        new = old.copy(start, end)
        for name, value in changes.items():
            setattr(new, name, value)
        self.vma_unlink(mm, old)
        self.vma_link(mm, new)
        return self._vma_merge(mm, new)

    def _vma_merge(self, mm: Mm, vma: Vma) -> Vma:
        """Merge ``vma`` (new, or just changed) with its previous and next neighbours where they
        are compatible and contiguous in the file (vma_merge_new_range /
        vma_merge_existing_range). Returns the VMA that now holds ``vma``'s range."""
        i = bisect.bisect_left(mm.starts, vma.start)
        assert mm.vmas[i] is vma
        prev = mm.vmas[i - 1] if i > 0 and mm.vmas[i - 1].end == vma.start else None
        nxt = mm.vmas[i + 1] if i + 1 < len(mm.vmas) and mm.vmas[i + 1].start == vma.end else None
        left = prev is not None and prev.can_merge(vma) and is_mergeable_anon_vma(prev, vma)
        right = (
            nxt is not None
            and vma.can_merge(nxt)
            and is_mergeable_anon_vma(nxt, vma)
            and (not left or prev is None or anon_vmas_compatible(prev, nxt))
        )
        if not (left or right):
            return vma
        first = prev if left and prev is not None else vma
        last = nxt if right and nxt is not None else vma
        merged = first.copy(first.start, last.end)
        # The merged VMA has the one anon_vma among them (dup_anon_vma), with its chain.
        owner = next((v for v in (first, vma, last) if v.anon_vma is not None), None)
        if owner is not None:
            merged.anon_vma, merged.fork_child = owner.anon_vma, owner.fork_child
        for part in dict.fromkeys((first, vma, last)):
            self.vma_unlink(mm, part)
        self.vma_link(mm, merged)
        self.khugepaged_enter_vma(mm, merged)  # vma_merge_new_range / vma_merge_existing_range
        return merged
