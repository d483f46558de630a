"""uprobes: a breakpoint replaces one subpage of a file's text with an anon copy in every mapping
(``install_breakpoint`` → ``uprobe_write_opcode``); removing it puts the page back and calls
``collapse_pte_mapped_thp``, as ``uprobe_write_opcode`` does for a page that belongs to a THP."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from remapd.files import Files
from remapd.khugepaged import Khugepaged
from remapd.mm import (
    PTE_ANON,
    PTE_SHMEM,
    PTE_THP,
    Mm,
    MmapLocks,
    Vma,
    pte_make,
)
from remapd.pagetable import PageTables
from remapd.rmap import AnonPages
from shared.actor import Actor, Call
from shared.errors import UserError
from shared.knobs import Knobs
from shared.protocol import messages as m
from shared.scan_result import ScanResult
from shared.units import HPAGE_PMD_NR, HPAGE_PMD_SHIFT, PAGE_SHIFT
from shared.vm import PROT_EXEC, PROT_WRITE

if TYPE_CHECKING:
    from remapd.remapper import Remapper


def valid_vma(vma: Vma) -> bool:
    """uprobes' valid_vma: a private, executable, not writable file mapping."""
    return not vma.shared and (vma.prot & (PROT_WRITE | PROT_EXEC)) == PROT_EXEC


class Uprobes:
    """The probes set on files, as (ino, page index), and their breakpoints in every mapping."""

    def __init__(
        self,
        actor: Actor,
        knobs: Knobs,
        files: Files,
        locks: MmapLocks,
        pagetables: PageTables,
        anon: AnonPages,
        khugepaged: Khugepaged,
    ):
        self.actor = actor
        self.knobs = knobs
        self.files = files
        self.locks = locks
        self.pagetables = pagetables
        self.anon = anon
        self.khugepaged = khugepaged
        self.probes: set[tuple[int, int]] = set()

    def uprobe_add(self, name: str, offset: int) -> Generator[Any, Any, dict[str, Any]]:
        f = self.files.lookup(name)
        if offset < 0 or offset >= max(f.size, 1):
            raise UserError("EINVAL", f"offset {offset:#x} is outside {name}")
        ino, index = key = (f.ino, offset >> PAGE_SHIFT)
        if key in self.probes:
            raise UserError("EEXIST", f"a uprobe is already at {name}+{offset:#x}")
        self.probes.add(key)
        done = 0
        for mm, vma in self._targets(ino, index):
            cur = yield from self._lock_target(mm, vma, index)
            if cur is None:
                continue
            try:
                if (yield from self.install_breakpoint(mm, cur, index)):
                    done += 1
            finally:
                self.locks.mmap_write_unlock(mm)
        return {"file": name, "offset": offset, "mappings": done}

    def uprobe_del(self, name: str, offset: int) -> Generator[Any, Any, dict[str, Any]]:
        f = self.files.lookup(name)
        ino, index = key = (f.ino, offset >> PAGE_SHIFT)
        if key not in self.probes:
            raise UserError("ENOENT", f"no uprobe at {name}+{offset:#x}")
        self.probes.discard(key)
        results = []
        for mm, vma in self._targets(ino, index):
            cur = yield from self._lock_target(mm, vma, index)
            if cur is None:
                continue
            try:
                result = yield from self.remove_breakpoint(mm, cur, index)
                if result is not None:
                    results.append(result.name)
            finally:
                self.locks.mmap_write_unlock(mm)
        return {"file": name, "offset": offset, "collapse_pte_mapped_thp": results}

    def uprobe_mmap(self, mm: Mm, vma: Vma) -> Generator[Any, Any, None]:
        """A new mapping of probed text gets the breakpoints too (the caller holds the write lock)."""
        if not valid_vma(vma) or not self.probes:
            return
        last = vma.pgoff_at(vma.end)
        for ino, index in sorted(self.probes):
            if ino == vma.ino and vma.pgoff <= index < last:
                yield from self.install_breakpoint(mm, vma, index)

    def install_breakpoint(self, mm: Mm, vma: Vma, index: int) -> Generator[Any, Any, bool]:
        """Replace the page at ``index`` with an anon copy; the caller holds the mmap write lock.

        GUP with FOLL_SPLIT_PMD splits a PMD mapping first (for a file THP: the PMD is cleared)."""
        addr = vma.addr_of(index)
        pidx, slot = addr >> HPAGE_PMD_SHIFT, (addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)
        if isinstance(mm.pmds.get(pidx), int):
            self.pagetables.zap_huge_pmd(mm, pidx, split=True)
        table = self.pagetables.pte_alloc(mm, pidx)
        pte = table.ptes[slot]
        if pte & PTE_ANON:
            return False
        if not pte:
            reply = yield Call(m.LookupPage(self.actor.new_req(), vma.ino, index, m.Purpose.COPY, False, False, False))
            if reply.status != m.PageStatus.OK or mm.exiting:
                return False  # the process exited during the lookup: its tables are gone
            entry = mm.pmds.get(pidx)
            if isinstance(entry, int):  # a lockless retract mapped the THP meanwhile
                self.pagetables.zap_huge_pmd(mm, pidx, split=True)
            elif entry is not None and entry.ptes[slot]:
                self.pagetables.zap_pte(mm, entry, slot)  # a fault mapped it meanwhile
        else:
            self.pagetables.zap_pte(mm, table, slot)
        vma.anon_vma_prepare()
        self.pagetables.set_pte_at(mm, pidx, slot, pte_make(self.anon.alloc(), PTE_ANON))
        return True

    def remove_breakpoint(self, mm: Mm, vma: Vma, index: int) -> Generator[Any, Any, ScanResult | None]:
        """Put the original page back and, if it belongs to a THP, collapse_pte_mapped_thp."""
        addr = vma.addr_of(index)
        pidx, slot = addr >> HPAGE_PMD_SHIFT, (addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)
        table = mm.pmds.get(pidx)
        if isinstance(table, int) or table is None or not table.ptes[slot] & PTE_ANON:
            return None
        reply = yield Call(m.LookupPage(self.actor.new_req(), vma.ino, index, m.Purpose.MAP, False, False, False))
        if mm.exiting or mm.pmds.get(pidx) is not table or not table.ptes[slot] & PTE_ANON:
            # The process exited, or the table or the breakpoint went, during the lookup: hand
            # back the mapping it accounted.
            if reply.status == m.PageStatus.OK:
                self.pagetables.rmap.add(reply.pfn, pte=-1)
            return None
        self.pagetables.zap_pte(mm, table, slot)
        if reply.status != m.PageStatus.OK:
            return None
        flags = (PTE_THP if reply.thp else 0) | (PTE_SHMEM if reply.shmem else 0)
        self.pagetables.set_pte_at(mm, pidx, slot, pte_make(reply.pfn, flags))
        if not reply.thp:
            return None
        return (yield from self.khugepaged.collapse_pte_mapped_thp(mm, addr, bool(self.knobs.install_pmd)))

    def _targets(self, ino: int, index: int) -> list[tuple[Mm, Vma]]:
        return [
            (mm, vma)
            for mm, vma in self.files.mappings(ino)
            if valid_vma(vma) and vma.pgoff <= index < vma.pgoff_at(vma.end)
        ]

    def _lock_target(self, mm: Mm, vma: Vma, index: int) -> Generator[Any, Any, Vma | None]:
        """mmap_write_lock a target and look its VMA up again, as register_for_each_vma does: while
        we waited the process may have exited, or unmapped or remapped the range. Returns the VMA
        that now maps ``index`` at the same address, locked, or None (and nothing locked)."""
        addr = vma.addr_of(index)
        try:
            yield from self.locks.mmap_write_lock(mm)
        except UserError:
            return None  # exited while we waited
        cur = mm.find_vma(addr)
        if cur is None or cur.ino != vma.ino or not valid_vma(cur) or cur.addr_of(index) != addr:
            self.locks.mmap_write_unlock(mm)
            return None
        return cur


def uprobe_add(remapper: Remapper, name: str, offset: int) -> Generator[Any, Any, dict[str, Any]]:
    """The daemon's and the world's entry point: :meth:`Uprobes.uprobe_add` on ``remapper``."""
    return remapper.uprobes.uprobe_add(name, offset)


def uprobe_del(remapper: Remapper, name: str, offset: int) -> Generator[Any, Any, dict[str, Any]]:
    """The daemon's and the world's entry point: :meth:`Uprobes.uprobe_del` on ``remapper``."""
    return remapper.uprobes.uprobe_del(name, offset)
