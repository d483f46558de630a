"""The remapper's address-space syscalls: mmap, munmap, madvise, and the VMA bookkeeping under
them (link/unlink with the file rmap and khugepaged registration, split, vma_merge). Mixed into
:class:`remapd.remapper.Remapper`."""

from __future__ import annotations

import bisect
from collections.abc import Generator
from typing import Any

from remapd.khugepaged import madvise_collapse
from remapd.mm import (
    PTE_ANON,
    Mm,
    Vma,
    pte_pfn,
)
from remapd.uprobes import uprobe_mmap
from shared import messages as m
from shared.errors import UserError
from shared.units import (
    HPAGE_PMD_SHIFT,
    HPAGE_PMD_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    TASK_SIZE,
)
from shared.vm import ADVICE, PROT_READ, PROT_WRITE, PROTS

# Where mmap(NULL, ...) starts looking for room, top-down (x86-64 mmap_base, roughly).
MMAP_BASE = 0x7F0000000000
MMAP_MIN_ADDR = 0x10000


class AddressSpaceOps:
    """mmap/munmap/madvise and VMA split/merge."""

    # -- VMA bookkeeping (link/unlink/split/merge) --------------------------------------------

    def _link(self, mm: Mm, vma: Vma) -> None:
        mm.insert_vma(vma)
        self.i_mmap.setdefault(vma.ino, {})[id(vma)] = (mm, vma)
        f = self.files.get(vma.ino)
        if vma.writes_file and f is not None and not f.shmem:
            self.send(m.WriteOpen(vma.ino, 1))
        if self._khugepaged_suitable(vma):
            self.send(m.RegisterRange(mm.pid, vma.start, vma.end, vma.ino, vma.pgoff, vma.hugepage, vma.nohugepage))

    def _unlink(self, mm: Mm, vma: Vma) -> None:
        mm.remove_vma(vma)
        del self.i_mmap[vma.ino][id(vma)]
        f = self.files.get(vma.ino)
        if vma.writes_file and f is not None and not f.shmem:
            self.send(m.WriteOpen(vma.ino, -1))
        if self._khugepaged_suitable(vma):
            self.send(m.UnregisterRange(mm.pid, vma.start))

    def _khugepaged_suitable(self, vma: Vma) -> bool:
        """What khugepaged_enter_vma needs on this side: not VM_NOHUGEPAGE, an aligned 2 MiB."""
        if vma.nohugepage:
            return False
        haddr = (vma.start + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1)
        return vma.pmd_suitable(haddr)

    def _split_at(self, mm: Mm, addr: int) -> None:
        """Split the VMA containing ``addr`` so that a VMA starts there (__split_vma). A PMD
        mapping across the new boundary is split first (vma_adjust_trans_huge)."""
        vma = mm.find_vma(addr)
        if vma is None or vma.start == addr:
            return
        entry = mm.pmds.get(addr >> HPAGE_PMD_SHIFT)
        if isinstance(entry, int) and addr & (HPAGE_PMD_SIZE - 1):
            self._zap_pmd(mm, addr >> HPAGE_PMD_SHIFT, split=True)
        self._unlink(mm, vma)
        self._link(mm, vma.copy(vma.start, addr))
        self._link(mm, vma.copy(addr, vma.end))

    def _merge_around(self, mm: Mm, start: int, end: int) -> None:
        """vma_merge: fold VMAs in [start, end] with identical, contiguous neighbours."""
        i = max(0, bisect.bisect_left(mm.starts, start) - 1)
        while i + 1 < len(mm.vmas):
            a, b = mm.vmas[i], mm.vmas[i + 1]
            if a.start > end:
                break
            if a.end == b.start and a.same_flags(b) and a.pgoff_at(a.end) == b.pgoff:
                merged = a.copy(a.start, b.end)
                merged.anon_vma = a.anon_vma or b.anon_vma
                self._unlink(mm, a)
                self._unlink(mm, b)
                self._link(mm, merged)
                continue
            i += 1

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
    ) -> Generator[Any, Any, dict[str, Any]]:
        mm = self.mm(pid)
        f = self.file(name)
        if prot not in PROTS:
            raise UserError("EINVAL", f"prot must be one of {', '.join(PROTS)}")
        if length <= 0:
            raise UserError("EINVAL", "length must be positive")
        if offset < 0 or offset % PAGE_SIZE:
            raise UserError("EINVAL", "offset must be a non-negative multiple of the page size")
        length = (length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        if addr is None:
            addr = self._get_unmapped_area(mm, length, offset >> PAGE_SHIFT)
        elif addr % PAGE_SIZE or addr < MMAP_MIN_ADDR or addr + length > TASK_SIZE:
            raise UserError("EINVAL", f"address {addr:#x} is not a page-aligned user address")
        yield from self.lock_write(mm)
        try:
            if mm.overlapping(addr, addr + length):
                self._do_munmap(mm, addr, addr + length)  # MAP_FIXED replaces what was there
            vma = Vma(addr, addr + length, offset >> PAGE_SHIFT, f.ino, PROTS[prot], shared)
            self._link(mm, vma)
            self._merge_around(mm, addr, addr + length)
            yield from uprobe_mmap(self, mm, vma)
        finally:
            self.unlock_write(mm)
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
        mm = self.mm(pid)
        if addr % PAGE_SIZE or length <= 0 or addr + length > TASK_SIZE:
            raise UserError("EINVAL", "munmap needs a page-aligned address and a positive length")
        end = addr + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        yield from self.lock_write(mm)
        try:
            self._do_munmap(mm, addr, end)
        finally:
            self.unlock_write(mm)
        return {"addr": addr, "length": end - addr}

    def _do_munmap(self, mm: Mm, start: int, end: int) -> None:
        self._split_at(mm, start)
        self._split_at(mm, end)
        for vma in mm.overlapping(start, end):
            self._unpin_range(mm, vma.start, vma.end)
            self.zap_range(mm, vma.start, vma.end)
            self._unlink(mm, vma)
        self.free_pgtables(mm, start, end)

    def madvise(self, pid: int, addr: int, length: int, advice: str) -> Generator[Any, Any, dict[str, Any]]:
        mm = self.mm(pid)
        if advice not in ADVICE:
            raise UserError("EINVAL", f"unknown advice {advice!r}")
        if addr % PAGE_SIZE or length < 0:
            raise UserError("EINVAL", "madvise needs a page-aligned address")
        end = addr + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        if end == addr:
            return {"result": 0}
        if advice == "collapse":
            result = yield from madvise_collapse(self, mm, addr, end)
            return {"result": result}
        covered = mm.overlapping(addr, end)
        unmapped = sum(min(v.end, end) - max(v.start, addr) for v in covered) != end - addr
        if advice in ("hugepage", "nohugepage"):
            yield from self.lock_write(mm)
            try:
                self._split_at(mm, addr)
                self._split_at(mm, end)
                for vma in mm.overlapping(addr, end):
                    new = vma.copy(vma.start, vma.end)
                    new.hugepage = advice == "hugepage"
                    new.nohugepage = advice == "nohugepage"
                    self._unlink(mm, vma)
                    self._link(mm, new)
                self._merge_around(mm, addr, end)
            finally:
                self.unlock_write(mm)
        elif advice == "dontneed":
            yield from self.lock_read(mm)
            try:
                for vma in covered:
                    self.zap_range(mm, max(vma.start, addr), min(vma.end, end))
            finally:
                self.unlock_read(mm)
        elif advice == "pageout":
            yield from self.lock_read(mm)
            try:
                self._pageout(mm, addr, end)
            finally:
                self.unlock_read(mm)
        else:
            # madvise_populate, as observed on 6.18: it stops at the first hole (ENOMEM) or VMA
            # whose protection refuses the access (EINVAL), keeping what it populated before.
            write = advice == "populate_write"
            page = addr
            while page < end:
                vma = mm.find_vma(page)
                if vma is None:
                    return {"result": "ENOMEM"}
                if (write and not vma.prot & PROT_WRITE) or not vma.prot & PROT_READ:
                    return {"result": "EINVAL"}
                outcome = yield from self.fault(pid, page, write)
                if outcome["result"] in ("sigsegv", "sigbus"):
                    return {"result": "EFAULT"}
                if isinstance(mm.pmds.get(page >> HPAGE_PMD_SHIFT), int):
                    page = (page | (HPAGE_PMD_SIZE - 1)) + 1  # the PMD mapped the rest
                else:
                    page += PAGE_SIZE
        return {"result": "ENOMEM" if unmapped else 0}

    def _pageout(self, mm: Mm, start: int, end: int) -> None:
        """MADV_PAGEOUT: unmap this process's file pages in the range and ask for reclaim."""
        pfns: list[int] = []
        for pidx in self._pidx_range(mm, start, end):
            entry = mm.pmds[pidx]
            base = pidx << HPAGE_PMD_SHIFT
            if isinstance(entry, int):
                pfns.append(pte_pfn(entry))
                self._zap_pmd(mm, pidx, split=not (start <= base and base + HPAGE_PMD_SIZE <= end))
                continue
            lo, hi = max(start, base), min(end, base + HPAGE_PMD_SIZE)
            for slot in range((lo - base) >> PAGE_SHIFT, (hi - base) >> PAGE_SHIFT):
                pte = entry.ptes[slot]
                if pte and not pte & PTE_ANON:
                    pfns.append(pte_pfn(pte))
                    self._zap_pte(mm, entry, slot)
        if pfns:
            self.send(m.Reclaim(tuple(pfns)))

