"""/proc/PID/smaps, computed from the page tables the way fs/proc/task_mmu.c walks them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from remapd.files import Files
from remapd.mm import (
    PTE_ANON,
    PTE_SHMEM,
    PTE_THP,
    VM_DONTCOPY,
    VM_DONTDUMP,
    VM_RAND_READ,
    VM_SEQ_READ,
    Mm,
    PteTable,
    Vma,
    pte_pfn,
)
from shared.knobs import Knobs
from shared.thp import thp_vma_allowable_order
from shared.units import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SHIFT,
    HPAGE_PMD_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from shared.vm import PROT_EXEC, PROT_READ, PROT_WRITE


def thp_eligible(vma: Vma, files: Files, knobs: Knobs) -> bool:
    """THPeligible: thp_vma_allowable_order with TVA_SMAPS | TVA_ENFORCE_SYSFS, for a file VMA."""
    if vma.nohugepage:
        return False
    haddr = (vma.start + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1)
    if not vma.pmd_suitable(haddr):
        return False
    f = files.get(vma.ino)
    if f is None:
        return False
    return thp_vma_allowable_order(
        knobs,
        shmem=f.shmem,
        i_size=f.size,
        pgoff=vma.pgoff,
        vm_hugepage=vma.hugepage,
        vm_nohugepage=vma.nohugepage,
        open_for_write=files.open_for_write(vma.ino),
        large_folio=f.large_folio,
    )


def vm_flags(vma: Vma) -> str:
    flags = []
    if vma.prot & PROT_READ:
        flags.append("rd")
    if vma.prot & PROT_WRITE:
        flags.append("wr")
    if vma.prot & PROT_EXEC:
        flags.append("ex")
    if vma.shared:
        flags.append("sh")
    flags += ["mr", "mw", "me"]
    if vma.shared:
        flags.append("ms")
    if vma.locked:
        flags.append("lo")
    flags += [name for bit, name in ((VM_SEQ_READ, "sr"), (VM_RAND_READ, "rr"), (VM_DONTCOPY, "dc")) if vma.flags & bit]
    if vma.lockonfault:
        flags.append("lf")
    if vma.account:
        flags.append("ac")
    if vma.flags & VM_DONTDUMP:
        flags.append("dd")
    if vma.hugepage:
        flags.append("hg")
    if vma.nohugepage:
        flags.append("nh")
    return " ".join(flags)


# smaps_account() sums proportional sizes in units of 1 << PSS_SHIFT of a byte.
PSS_SHIFT = 12


class Mapcounts:
    """folio_precise_page_mapcount() for every page mapped anywhere: its PTE mappings in every
    mm, plus the PMD mappings of its THP (the remapper holds every page table, so it can count
    them; the kernel reads _mapcount and _entire_mapcount)."""

    def __init__(self, mms: Iterable[Mm]):
        self.ptes: Counter[int] = Counter()
        self.pmds: Counter[int] = Counter()
        for mm in mms:
            for entry in mm.pmds.values():
                if isinstance(entry, int):
                    self.pmds[pte_pfn(entry)] += 1
                else:
                    for _, pte in entry.present():
                        self.ptes[pte_pfn(pte)] += 1

    def pss(self, pte: int) -> int:
        """The proportional size of the page a PTE maps, in 1 << PSS_SHIFT of a byte."""
        pfn = pte_pfn(pte)
        mapcount = self.ptes[pfn] + (self.pmds[pfn & ~(HPAGE_PMD_NR - 1)] if pte & PTE_THP else 0)
        return (PAGE_SIZE << PSS_SHIFT) // max(mapcount, 1)

    def pss_pmd(self, entry: int) -> int:
        """The proportional size of a PMD-mapped THP: page by page (smaps_account)."""
        head = pte_pfn(entry)
        pmds = self.pmds[head]
        return sum((PAGE_SIZE << PSS_SHIFT) // max(self.ptes[head + i] + pmds, 1) for i in range(HPAGE_PMD_NR))


def smaps(mm: Mm, files: Files, knobs: Knobs, mms: Iterable[Mm] = ()) -> list[dict[str, Any]]:
    """``mms``: every process (their mappings share the pages a VM_LOCKED VMA's Locked divides)."""
    out = []
    counts = Mapcounts(mms or (mm,)) if any(v.locked for v in mm.vmas) else None
    for vma in mm.vmas:
        pss_locked = 0
        rss = anon = file_pmd = shmem_pmd = 0
        for pidx in mm.pmd_indices(vma.start, vma.end):
            entry = mm.pmds[pidx]
            base = pidx << HPAGE_PMD_SHIFT
            if isinstance(entry, int):
                if vma.start <= base and base + HPAGE_PMD_SIZE <= vma.end:
                    rss += HPAGE_PMD_SIZE
                    if entry & PTE_SHMEM:
                        shmem_pmd += HPAGE_PMD_SIZE
                    else:
                        file_pmd += HPAGE_PMD_SIZE
                    if counts is not None and vma.locked:
                        pss_locked += counts.pss_pmd(entry)
                continue
            assert isinstance(entry, PteTable)
            lo = max(vma.start, base)
            hi = min(vma.end, base + HPAGE_PMD_SIZE)
            first, last = (lo - base) >> PAGE_SHIFT, (hi - base) >> PAGE_SHIFT
            for slot, pte in entry.present():
                if first <= slot < last:
                    rss += PAGE_SIZE
                    if pte & PTE_ANON:
                        anon += PAGE_SIZE
                    if counts is not None and vma.locked:
                        pss_locked += counts.pss(pte)
        f = files.get(vma.ino)
        prot = vma.prot
        perms = (
            ("r" if prot & PROT_READ else "-")
            + ("w" if prot & PROT_WRITE else "-")
            + ("x" if prot & PROT_EXEC else "-")
            + ("s" if vma.shared else "p")
        )
        kb = 1024
        out.append(
            {
                "start": vma.start,
                "end": vma.end,
                "perms": perms,
                "offset": vma.pgoff << PAGE_SHIFT,
                "ino": vma.ino,
                "name": f.name if f is not None else "",
                "Size": (vma.end - vma.start) // kb,
                "KernelPageSize": PAGE_SIZE // kb,
                "MMUPageSize": PAGE_SIZE // kb,
                "Rss": rss // kb,
                "Anonymous": anon // kb,
                "AnonHugePages": 0,
                "ShmemPmdMapped": shmem_pmd // kb,
                "FilePmdMapped": file_pmd // kb,
                "Shared_Hugetlb": 0,
                "Private_Hugetlb": 0,
                "Swap": 0,
                # Locked is the VMA's Pss when VM_LOCKED: a page mapped N times counts 1/N.
                "Locked": (pss_locked >> PSS_SHIFT) // kb,
                "THPeligible": int(thp_eligible(vma, files, knobs)),
                "VmFlags": vm_flags(vma),
            }
        )
    return out
