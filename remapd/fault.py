"""The remapper's fault path (handle_mm_fault, fault-around, CoW) and GUP pins. Mixed into
:class:`remapd.remapper.Remapper`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator
from typing import Any

from remapd.mm import (
    ANON_PFN_BASE,
    PTE_ANON,
    PTE_SHMEM,
    PTE_THP,
    PTE_WRITE,
    Mm,
    PteTable,
    Vma,
    pte_make,
    pte_pfn,
)
from shared import messages as m
from shared.actor import Call, Wait
from shared.errors import UserError
from shared.units import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SHIFT,
    HPAGE_PMD_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    TASK_SIZE,
)
from shared.vm import PROT_READ, PROT_WRITE


class FaultPath:
    """Page faults and pins."""

    # -- page faults --------------------------------------------------------------------------

    def fault(self, pid: int, addr: int, write: bool = False) -> Generator[Any, Any, dict[str, Any]]:
        """handle_mm_fault under mmap_read_lock. Returns ``{"result": ...}``: ``hit`` (already
        mapped, no fault), ``minor``, ``major``, ``pmd`` (mapped with a PMD), ``sigsegv``,
        ``sigbus``."""
        mm = self.mm(pid)
        self.vm["pgfault"] += 1
        if not 0 <= addr < TASK_SIZE:
            return {"result": "sigsegv"}
        yield from self.lock_read(mm)
        try:
            result = yield from self._do_fault(mm, addr & ~(PAGE_SIZE - 1), write)
        finally:
            self.unlock_read(mm)
        return {"result": result}

    def _do_fault(self, mm: Mm, addr: int, write: bool) -> Generator[Any, Any, str]:
        while True:
            vma = mm.find_vma(addr)
            if vma is None or mm.exiting:
                return "sigsegv"
            if (write and not vma.prot & PROT_WRITE) or not vma.prot & PROT_READ:
                return "sigsegv"
            pidx = addr >> HPAGE_PMD_SHIFT
            slot = (addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)
            entry = mm.pmds.get(pidx)
            cow = write and not vma.shared
            if isinstance(entry, int):
                if not cow:
                    if write:
                        self.send(m.MarkDirty(pte_pfn(entry)))
                    return "hit"
                self._zap_pmd(mm, pidx, split=True)  # CoW on a PMD-mapped file THP splits it
                continue
            pte = entry.ptes[slot] if entry is not None else 0
            if pte:
                if not write or pte & PTE_WRITE:
                    return "hit"
                if vma.shared:
                    entry.ptes[slot] = pte | PTE_WRITE  # write-protect fault: page_mkwrite
                    self.send(m.MarkDirty(pte_pfn(pte)))
                    return "minor"
                return self._cow(mm, vma, pidx, slot, pte)
            haddr = addr & ~(HPAGE_PMD_SIZE - 1)
            pmd_ok = (
                not cow
                and entry is None
                and not vma.nohugepage
                and vma.pmd_suitable(haddr)
            )
            purpose = "copy" if cow else "map"
            around = () if write else self._around(mm, vma, addr, entry)
            # The page-cache lookup is the collapser's: mmap_lock is not held across it (it stands
            # for microseconds of filemap_fault, or for I/O that drops the lock), so a fault in
            # flight does not fail khugepaged's trylock. Everything is revalidated after.
            self.unlock_read(mm)
            reply = yield Call(
                m.LookupPage(
                    self.new_req(), vma.ino, vma.pgoff_at(addr), purpose, write, pmd_ok, vma.hugepage, around
                )
            )
            if reply.status != "ok":
                while not mm.lock.try_read():
                    yield Wait(("mmap", mm.pid))
                return reply.status
            relocked = mm.lock.try_read()
            if not relocked or mm.exiting or mm.find_vma(addr) is not vma:
                # Hand the accounting back rather than hold it while we wait (a writer has the
                # lock, or the VMA changed): the fault starts again, as after VM_FAULT_RETRY.
                if purpose == "map":
                    self._row(reply.head if reply.pmd else reply.pfn, pte=0 if reply.pmd else -1, pmd=-1 if reply.pmd else 0)
                    self._map_around(mm, vma, reply, install=False)
                while not relocked:
                    yield Wait(("mmap", mm.pid))
                    relocked = mm.lock.try_read()
                if mm.exiting:
                    return "sigsegv"
                continue
            if cow:
                # do_cow_fault: a private anon copy of the file page.
                new = self._anon_new()
                self._anon_map(new)
                self._ensure_anon_vma(mm, vma)
                self._set_pte(mm, pidx, slot, pte_make(new, PTE_ANON | PTE_WRITE))
                self.vm["thpsplit_cow_fault"] += 1
                return "major" if reply.major else "minor"
            current = mm.pmds.get(pidx)
            if reply.pmd:
                if current is None:
                    self._install_pmd(mm, pidx, reply.head, reply.shmem, accounted=True)
                    self._map_around(mm, vma, reply, install=False)
                    return "pmd"
                self._row(reply.head, pmd=-1)  # lost a race with another fault: look again
                self._map_around(mm, vma, reply, install=False)
                continue
            if isinstance(current, int) or (current is not None and current.ptes[slot]):
                self._row(reply.pfn, pte=-1)
                self._map_around(mm, vma, reply, install=False)
                continue
            if current is None and reply.thp and not vma.nohugepage and vma.pmd_suitable(haddr):
                # finish_fault: the table went (retracted while we waited on the page lock), so
                # do_set_pmd maps the THP rather than a PTE in a new table.
                self._row(reply.pfn, pte=-1)
                self._install_pmd(mm, pidx, reply.head, reply.shmem, accounted=False)
                self._map_around(mm, vma, reply, install=False)
                return "pmd"
            flags = (PTE_THP if reply.thp else 0) | (PTE_SHMEM if reply.shmem else 0)
            if write:
                flags |= PTE_WRITE
            self._set_pte(mm, pidx, slot, pte_make(reply.pfn, flags))
            self._map_around(mm, vma, reply, install=True)
            return "major" if reply.major else "minor"

    def _around(self, mm: Mm, vma: Vma, addr: int, entry: PteTable | None) -> tuple[int, ...]:
        """do_fault_around's window: the fault_around_bytes-aligned block holding ``addr``, inside
        the VMA and the PMD, minus the fault itself and the PTEs already present."""
        nr = self.knobs.fault_around_pages()
        if nr <= 1:
            return ()
        size = nr << PAGE_SHIFT
        haddr = addr & ~(HPAGE_PMD_SIZE - 1)
        lo = max(addr & ~(size - 1), vma.start, haddr)
        hi = min((addr & ~(size - 1)) + size, vma.end, haddr + HPAGE_PMD_SIZE)
        ptes = entry.ptes if entry is not None else None
        return tuple(
            vma.pgoff_at(a)
            for a in range(lo, hi, PAGE_SIZE)
            if a != addr and (ptes is None or not ptes[(a >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)])
        )

    def _map_around(self, mm: Mm, vma: Vma, reply: m.PageAnswer, install: bool) -> None:
        """Map the fault-around pages the collapser accounted; hand back those that lost a race."""
        for index, pfn, thp in reply.around:
            addr = vma.addr_of(index)
            pidx, slot = addr >> HPAGE_PMD_SHIFT, (addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)
            entry = mm.pmds.get(pidx)
            if not install or isinstance(entry, int) or (entry is not None and entry.ptes[slot]):
                self._row(pfn, pte=-1)
                continue
            self._set_pte(mm, pidx, slot, pte_make(pfn, (PTE_THP if thp else 0) | (PTE_SHMEM if reply.shmem else 0)))

    def _cow(self, mm: Mm, vma: Vma, pidx: int, slot: int, pte: int) -> str:
        """wp_page_copy (or reuse of an exclusive anon page)."""
        table = mm.pmds[pidx]
        assert isinstance(table, PteTable)
        if pte & PTE_ANON and self.anon[pte_pfn(pte)] == 1 and not self.anon_pins.get(pte_pfn(pte)):
            table.ptes[slot] = pte | PTE_WRITE
            return "minor"
        self._zap_pte(mm, table, slot)
        new = self._anon_new()
        self._anon_map(new)
        self._ensure_anon_vma(mm, vma)
        self._set_pte(mm, pidx, slot, pte_make(new, PTE_ANON | PTE_WRITE))
        self.vm["thpsplit_cow_fault"] += 1
        return "minor"

    def _ensure_anon_vma(self, mm: Mm, vma: Vma) -> None:
        """anon_vma_prepare: the VMA now has private anon pages; khugepaged's retract skips it."""
        vma.anon_vma = True

    def touch(
        self, pid: int, addr: int, length: int, write: bool = False, stride: int = PAGE_SIZE
    ) -> Generator[Any, Any, dict[str, Any]]:
        """Fault every ``stride`` bytes of [addr, addr+length); counts per outcome."""
        if stride <= 0 or length < 0:
            raise UserError("EINVAL", "stride must be positive and length non-negative")
        self.mm(pid)
        counts: Counter[str] = Counter()
        for a in range(addr, addr + length, stride):
            outcome = yield from self.fault(pid, a, write)
            counts[outcome["result"]] += 1
        return dict(counts)

    # -- GUP pins -----------------------------------------------------------------------------

    def pin(self, pid: int, addr: int) -> Generator[Any, Any, dict[str, Any]]:
        """pin_user_pages_fast on one page: fault it in if needed, then take a pin."""
        mm = self.mm(pid)
        page = addr & ~(PAGE_SIZE - 1)
        outcome = yield from self.fault(pid, page, False)
        if outcome["result"] in ("sigsegv", "sigbus"):
            raise UserError("EFAULT", f"cannot pin {addr:#x}: {outcome['result']}")
        pfn = self._resolve(mm, page)
        if pfn >= ANON_PFN_BASE:
            self.anon_pins[pfn] = self.anon_pins.get(pfn, 0) + 1
        else:
            self._row(pfn, pin=1)
        mm.pins.setdefault(page, []).append(pfn)
        return {"pid": pid, "addr": page, "pfn": pfn}

    def unpin(self, pid: int, addr: int) -> dict[str, Any]:
        mm = self.mm(pid)
        page = addr & ~(PAGE_SIZE - 1)
        pfns = mm.pins.get(page)
        if not pfns:
            raise UserError("EINVAL", f"no pin at {page:#x} in process {pid}")
        pfn = pfns.pop()
        if not pfns:
            del mm.pins[page]
        self._unpin(pfn)
        self.flush()  # a plain call, not a task: nothing else pushes the row out
        return {"pid": pid, "addr": page, "pfn": pfn}

    def _unpin(self, pfn: int) -> None:
        if pfn >= ANON_PFN_BASE:
            self.anon_pins[pfn] -= 1
            if not self.anon_pins[pfn]:
                del self.anon_pins[pfn]
                if self.anon.get(pfn) == 0:
                    del self.anon[pfn]
        else:
            self._row(pfn, pin=-1)

    def _unpin_range(self, mm: Mm, start: int, end: int) -> None:
        """Pins outlive munmap in the kernel; here the modelled driver drops them with the VMA."""
        for page in [p for p in mm.pins if start <= p < end]:
            for pfn in mm.pins.pop(page):
                self._unpin(pfn)

    def _resolve(self, mm: Mm, addr: int) -> int:
        entry = mm.pmds.get(addr >> HPAGE_PMD_SHIFT)
        if isinstance(entry, int):
            return pte_pfn(entry) + ((addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1))
        assert entry is not None
        return pte_pfn(entry.ptes[(addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)])

