"""The remapper's /proc files, computed the way fs/proc/task_mmu.c walks page tables: maps, smaps
(every field of 6.18, Pss by mapcount as ``smaps_account`` does), smaps_rollup, status, pagemap,
kpageflags; and the views of thpctl's ``map`` and ``top``.

The remapper owns page tables, VMAs and anon pages; the state of file pages (their flags and
mapcounts, and shmem swap entries) is the collapser's, so a report that needs it asks with one
:class:`~shared.protocol.messages.PageQuery` per chunk of pfns, after walking the page tables (the
walk is a snapshot: a page freed before the answer comes back reads as unmapped and clean).

Paths: a regular file is ``/thpsplit/NAME`` on device ``fe:01``, a shmem file ``/dev/shm/NAME``
on tmpfs' anonymous device ``00:19``. Locked is a VM_LOCKED VMA's Pss. Deliberate differences:
every mapped page counts as referenced (the model maps pages only when they are accessed), and
the reports take no mmap lock (a busy ``thpctl lock`` never blocks them).
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any

from remapd.files import Files
from remapd.mm import (
    ANON_PFN_BASE,
    PTE_ANON,
    PTE_SHMEM,
    PTE_THP,
    Mm,
    PteTable,
    Vma,
    find_mm,
    pte_pfn,
)
from remapd.report import thp_eligible, vm_flags
from remapd.rmap import AnonPages
from shared.actor import Actor, Call
from shared.errors import UserError
from shared.knobs import Knobs
from shared.pageflags import (
    KPF_ANON,
    KPF_BUDDY,
    KPF_DIRTY,
    KPF_LRU,
    KPF_MMAP,
    KPF_SWAPBACKED,
    KPF_UPTODATE,
    MAX_ENTRIES,
    PM_FILE,
    PM_MMAP_EXCLUSIVE,
    PM_PFN_MASK,
    PM_PRESENT,
)
from shared.protocol import messages as m
from shared.units import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SHIFT,
    HPAGE_PMD_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from shared.vm import PROT_EXEC, PROT_READ, PROT_WRITE

# Where the model's files live, as the kernel would print them.
FILE_DIR, FILE_DEV = "/thpsplit", "fe:01"
SHMEM_DIR, SHMEM_DEV = "/dev/shm", "00:19"
# smaps' Pss is fixed point with 12 fractional bits (PSS_SHIFT).
PSS_SHIFT = 12

# A PTE or PMD a report walked: (pfn, is_anon, is_shmem, npages) where npages is 512 for a PMD.
Mapped = tuple[int, bool, bool, int]


@dataclass
class MemSizeStats:
    """struct mem_size_stats: bytes (pss_* in bytes << PSS_SHIFT)."""

    resident: int = 0
    shared_clean: int = 0
    shared_dirty: int = 0
    private_clean: int = 0
    private_dirty: int = 0
    referenced: int = 0
    anonymous: int = 0
    lazyfree: int = 0
    anonymous_thp: int = 0
    shmem_thp: int = 0
    file_thp: int = 0
    swap: int = 0
    pss: int = 0
    pss_dirty: int = 0
    pss_anon: int = 0
    pss_file: int = 0
    pss_shmem: int = 0
    pss_locked: int = 0
    swap_pss: int = 0

    def add(self, other: MemSizeStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def kb(self, rollup: bool) -> dict[str, int]:
        """The kB lines of __show_smap, in order (Pss_Anon/File/Shmem only in the rollup)."""
        pss = {
            "Pss": self.pss >> PSS_SHIFT >> 10,
            "Pss_Dirty": self.pss_dirty >> PSS_SHIFT >> 10,
        }
        if rollup:
            pss |= {
                "Pss_Anon": self.pss_anon >> PSS_SHIFT >> 10,
                "Pss_File": self.pss_file >> PSS_SHIFT >> 10,
                "Pss_Shmem": self.pss_shmem >> PSS_SHIFT >> 10,
            }
        return {
            "Rss": self.resident >> 10,
            **pss,
            "Shared_Clean": self.shared_clean >> 10,
            "Shared_Dirty": self.shared_dirty >> 10,
            "Private_Clean": self.private_clean >> 10,
            "Private_Dirty": self.private_dirty >> 10,
            "Referenced": self.referenced >> 10,
            "Anonymous": self.anonymous >> 10,
            "KSM": 0,
            "LazyFree": self.lazyfree >> 10,
            "AnonHugePages": self.anonymous_thp >> 10,
            "ShmemPmdMapped": self.shmem_thp >> 10,
            "FilePmdMapped": self.file_thp >> 10,
            "Shared_Hugetlb": 0,
            "Private_Hugetlb": 0,
            "Swap": self.swap >> 10,
            "SwapPss": self.swap_pss >> PSS_SHIFT >> 10,
            "Locked": self.pss_locked >> PSS_SHIFT >> 10,
        }


class PageView:
    """The answers to the PageQueries of one report: flags and mapcount by pfn, max_pfn."""

    def __init__(self) -> None:
        self.flags: dict[int, int] = {}
        self.mapcount: dict[int, int] = {}
        self.max_pfn = 0
        self.swapped: list[tuple[int, ...]] = []


def perms(vma: Vma) -> str:
    prot = vma.prot
    return (
        ("r" if prot & PROT_READ else "-")
        + ("w" if prot & PROT_WRITE else "-")
        + ("x" if prot & PROT_EXEC else "-")
        + ("s" if vma.shared else "p")
    )


class Procfs:
    """The reports of every process; ``actor`` carries the PageQueries to the collapser."""

    def __init__(self, actor: Actor, mms: dict[int, Mm], files: Files, knobs: Knobs, anon: AnonPages, marked: Any):
        self.actor = actor
        self.mms = mms
        self.files = files
        self.knobs = knobs
        self.anon = anon
        self.marked = marked  # the set of (pid, pmd index) of marked PTE tables
        self.stats: Any = None  # remapd's khugepaged stats, set by the remapper

    # -- asking the collapser -----------------------------------------------------------------

    def query(
        self, pfns: Iterable[int], swap_ranges: tuple[tuple[int, int, int], ...] = ()
    ) -> Generator[Any, Any, PageView]:
        """Flags and mapcounts of the file pages ``pfns`` (anon pfns are answered here), and
        the swap entries of ``swap_ranges``, in chunks of MAX_ENTRIES pfns."""
        view = PageView()
        file_pfns = sorted({p for p in pfns if p < ANON_PFN_BASE})
        for p in {p for p in pfns if p >= ANON_PFN_BASE}:
            view.flags[p], view.mapcount[p] = self.anon_flags(p)
        chunks = [tuple(file_pfns[i : i + MAX_ENTRIES]) for i in range(0, len(file_pfns), MAX_ENTRIES)]
        if swap_ranges and not chunks:
            chunks = [()]
        for n, chunk in enumerate(chunks):
            reply = yield Call(m.PageQuery(self.actor.new_req(), chunk, swap_ranges if n == 0 else ()))
            for pfn, flags, count in reply.pages:
                view.flags[pfn] = flags
                view.mapcount[pfn] = count
            view.max_pfn = reply.max_pfn
            if n == 0:
                view.swapped = list(reply.swapped)
        return view

    def anon_flags(self, pfn: int) -> tuple[int, int]:
        """kpageflags and mapcount of an anon page (the remapper's own)."""
        count = self.anon.mapcount.get(pfn)
        if count is None:
            return KPF_BUDDY, 0
        flags = KPF_UPTODATE | KPF_LRU | KPF_ANON | KPF_SWAPBACKED
        return (flags | KPF_MMAP if count else flags), count

    # -- walking ------------------------------------------------------------------------------

    @staticmethod
    def walk(mm: Mm, vma: Vma) -> Iterator[tuple[int, int, int]]:
        """(addr, entry, npages) of every PMD mapping and present PTE inside ``vma``."""
        for pidx in mm.pmd_indices(vma.start, vma.end):
            entry = mm.pmds[pidx]
            base = pidx << HPAGE_PMD_SHIFT
            if isinstance(entry, int):
                if vma.start <= base and base + HPAGE_PMD_SIZE <= vma.end:
                    yield base, entry, HPAGE_PMD_NR
                continue
            assert isinstance(entry, PteTable)
            lo = max(vma.start, base)
            hi = min(vma.end, base + HPAGE_PMD_SIZE)
            first, last = (lo - base) >> PAGE_SHIFT, (hi - base) >> PAGE_SHIFT
            for slot, pte in entry.present():
                if first <= slot < last:
                    yield base + (slot << PAGE_SHIFT), pte, 1

    @staticmethod
    def pfns_of(entries: Iterable[tuple[int, int, int]]) -> set[int]:
        out: set[int] = set()
        for _, entry, npages in entries:
            pfn = pte_pfn(entry)
            out.update(range(pfn, pfn + npages))
        return out

    # -- maps and smaps -----------------------------------------------------------------------

    def maps_entry(self, vma: Vma) -> dict[str, Any]:
        f = self.files.get(vma.ino)
        name = f.name if f is not None else ""
        shmem = f is not None and f.shmem
        return {
            "start": vma.start,
            "end": vma.end,
            "perms": perms(vma),
            "offset": vma.pgoff << PAGE_SHIFT,
            "dev": SHMEM_DEV if shmem else FILE_DEV,
            "ino": vma.ino,
            "name": name,
            "path": f"{SHMEM_DIR if shmem else FILE_DIR}/{name}" if name else "",
        }

    def maps(self, pid: int) -> list[dict[str, Any]]:
        return [self.maps_entry(vma) for vma in find_mm(self.mms, pid).vmas]

    def _gather(self, pid: int) -> Generator[Any, Any, tuple[Mm, list[tuple[Vma, MemSizeStats]]]]:
        mm = find_mm(self.mms, pid)
        vmas = list(mm.vmas)
        walked = [list(self.walk(mm, vma)) for vma in vmas]
        swap_ranges = tuple(
            (vma.ino, vma.pgoff, vma.pgoff + ((vma.end - vma.start) >> PAGE_SHIFT))
            for vma in vmas
            if self.files.is_shmem(vma.ino)
        )
        pfns: set[int] = set()
        for entries in walked:
            pfns |= self.pfns_of(entries)
        view = yield from self.query(pfns, swap_ranges)
        swapped = iter(view.swapped)
        out = []
        for vma, entries in zip(vmas, walked, strict=True):
            mss = MemSizeStats()
            for _, entry, npages in entries:
                self.account(mss, view, entry, npages)
            if self.files.is_shmem(vma.ino):
                # shmem_swap_usage: swap entries where nothing (not even a CoW copy) is mapped.
                present = {vma.pgoff_at(addr) for addr, _, n in entries if n == 1}
                mss.swap += sum(1 for i in next(swapped, ()) if i not in present) * PAGE_SIZE
            if vma.locked:
                mss.pss_locked = mss.pss  # smaps_page_accumulate: a VM_LOCKED VMA's Pss is locked
            out.append((vma, mss))
        return mm, out

    @staticmethod
    def account(mss: MemSizeStats, view: PageView, entry: int, npages: int) -> None:
        """smaps_account for one PTE (npages 1) or PMD (512) mapping of the page at ``entry``."""
        pfn = pte_pfn(entry)
        anon = bool(entry & PTE_ANON)
        size = npages * PAGE_SIZE
        if npages > 1:
            if entry & PTE_SHMEM:
                mss.shmem_thp += size
            else:
                mss.file_thp += size
        if anon:
            mss.anonymous += size  # swap-backed: never LazyFree
        mss.resident += size
        mss.referenced += size
        # Anon pages come from a write (CoW, uprobes' FOLL_WRITE copy): their PTE is dirty.
        dirty = anon or bool(view.flags.get(pfn, 0) & KPF_DIRTY)
        for page in range(pfn, pfn + npages):
            mapcount = max(view.mapcount.get(page, 1), 1)
            pss = PAGE_SIZE << PSS_SHIFT
            if mapcount >= 2:
                pss //= mapcount
            mss.pss += pss
            if anon:
                mss.pss_anon += pss
            elif entry & PTE_SHMEM:
                mss.pss_shmem += pss
            else:
                mss.pss_file += pss
            if dirty:
                mss.pss_dirty += pss
                if mapcount < 2:
                    mss.private_dirty += PAGE_SIZE
                else:
                    mss.shared_dirty += PAGE_SIZE
            elif mapcount < 2:
                mss.private_clean += PAGE_SIZE
            else:
                mss.shared_clean += PAGE_SIZE

    def smaps(self, pid: int) -> Generator[Any, Any, list[dict[str, Any]]]:
        """/proc/PID/smaps: every VMA's maps fields and smaps fields (kB)."""
        _, gathered = yield from self._gather(pid)
        out = []
        for vma, mss in gathered:
            out.append(
                {
                    **self.maps_entry(vma),
                    "Size": (vma.end - vma.start) >> 10,
                    "KernelPageSize": PAGE_SIZE >> 10,
                    "MMUPageSize": PAGE_SIZE >> 10,
                    **mss.kb(rollup=False),
                    "THPeligible": int(thp_eligible(vma, self.files, self.knobs)),
                    "VmFlags": vm_flags(vma),
                }
            )
        return out

    def smaps_rollup(self, pid: int) -> Generator[Any, Any, dict[str, Any]]:
        """/proc/PID/smaps_rollup: the sums over every VMA (from the first VMA's start to the
        last one's end)."""
        _, gathered = yield from self._gather(pid)
        total = MemSizeStats()
        for _, mss in gathered:
            total.add(mss)
        start = gathered[0][0].start if gathered else 0
        end = gathered[-1][0].end if gathered else 0
        return {"start": start, "end": end, **total.kb(rollup=True)}

    # -- status -------------------------------------------------------------------------------

    def status(self, pid: int) -> dict[str, int]:
        """/proc/PID/status: task_mem()'s lines (kB) and the few others the model has. No
        high-water marks are kept, so VmPeak and VmHWM equal VmSize and VmRSS."""
        mm = find_mm(self.mms, pid)
        kb = PAGE_SIZE >> 10
        total_vm = sum(v.end - v.start for v in mm.vmas) >> PAGE_SHIFT
        data_vm = sum(v.end - v.start for v in mm.vmas if v.prot & PROT_WRITE and not v.shared) >> PAGE_SHIFT
        exec_vm = sum(v.end - v.start for v in mm.vmas if v.prot & PROT_EXEC and not v.prot & PROT_WRITE) >> PAGE_SHIFT
        anon, file, shmem = mm.rss["MM_ANONPAGES"], mm.rss["MM_FILEPAGES"], mm.rss["MM_SHMEMPAGES"]
        rss = anon + file + shmem
        return {
            "Pid": pid,
            "VmPeak": total_vm * kb,
            "VmSize": total_vm * kb,
            "VmLck": 0,
            "VmPin": 0,
            "VmHWM": rss * kb,
            "VmRSS": rss * kb,
            "RssAnon": anon * kb,
            "RssFile": file * kb,
            "RssShmem": shmem * kb,
            "VmData": data_vm * kb,
            "VmStk": 0,
            "VmExe": 0,
            "VmLib": exec_vm * kb,
            "VmPTE": mm.nr_ptes * kb,
            "VmSwap": 0,
            "HugetlbPages": 0,
            "THP_enabled": 1,
            "Threads": 1,
        }

    # -- pagemap and kpageflags ---------------------------------------------------------------

    def pagemap(self, pid: int, addr: int, length: int) -> Generator[Any, Any, list[int]]:
        """/proc/PID/pagemap for the pages of [addr, addr+length): present (63), file-page (61),
        exclusively mapped (56: the page's mapcount is 1), PFN (0-54); 0 for an unmapped page.
        No soft-dirty bit: these kernels have no CONFIG_MEM_SOFT_DIRTY."""
        mm = find_mm(self.mms, pid)
        if length < 0 or addr < 0:
            raise UserError("EINVAL", "address and length must not be negative")
        first = addr >> PAGE_SHIFT
        last = (addr + length + PAGE_SIZE - 1) >> PAGE_SHIFT
        if last - first > MAX_ENTRIES:
            raise UserError("EINVAL", f"at most {MAX_ENTRIES} pages per request")
        out = [0] * (last - first)
        files: list[tuple[int, int, bool]] = []  # (index in out, pfn, anon)
        for vma in mm.overlapping(first << PAGE_SHIFT, last << PAGE_SHIFT):
            for vaddr, entry, npages in self.walk(mm, vma):
                pfn = pte_pfn(entry)
                for i in range(npages):
                    vfn = (vaddr >> PAGE_SHIFT) + i
                    if first <= vfn < last:
                        files.append((vfn - first, pfn + i, bool(entry & PTE_ANON)))
        view = yield from self.query(p for _, p, _ in files)
        for slot, pfn, anon in files:
            value = PM_PRESENT | (pfn & PM_PFN_MASK)
            if not anon:
                value |= PM_FILE
            if view.mapcount.get(pfn, 1) == 1:
                value |= PM_MMAP_EXCLUSIVE
            out[slot] = value
        return out

    def kpageflags(self, pfn: int, count: int = 1) -> Generator[Any, Any, dict[str, Any]]:
        """/proc/kpageflags and /proc/kpagecount for ``count`` pages from ``pfn``: a short read
        at the end of the collapser's memory, or past the last anon page."""
        if pfn < 0 or count < 0:
            raise UserError("EINVAL", "pfn and count must not be negative")
        if count > MAX_ENTRIES:
            raise UserError("EINVAL", f"at most {MAX_ENTRIES} pages per request")
        pfns = range(pfn, pfn + count)
        flags: list[int] = []
        counts: list[int] = []
        if pfn >= ANON_PFN_BASE:
            end = self.anon._next_pfn  # the next anon page to be allocated: the end of the file
            for p in pfns:
                if p >= end:
                    break
                f, c = self.anon_flags(p)
                flags.append(f)
                counts.append(c)
            return {"pfn": pfn, "flags": flags, "counts": counts}
        view = yield from self.query(p for p in pfns if p < ANON_PFN_BASE)
        for p in pfns:
            if p >= view.max_pfn or p not in view.flags:
                break
            flags.append(view.flags[p])
            counts.append(view.mapcount[p])
        return {"pfn": pfn, "flags": flags, "counts": counts}

    def vmstat(self) -> dict[str, int]:
        """The remapper's share of /proc/vmstat beside its event counters: anon pages (CoW copies,
        uprobes), page tables, and the anon THP counters, which stay 0 (no anon THP here)."""
        return {
            "nr_anon_pages": len(self.anon.mapcount),
            "nr_anon_transparent_hugepages": 0,
            "nr_page_table_pages": sum(mm.nr_ptes for mm in self.mms.values()),
            "thp_fault_alloc": 0,
            "thp_fault_fallback": 0,
            "thp_fault_fallback_charge": 0,
        }

    # -- thpctl map and top -------------------------------------------------------------------

    def pmd_map(self, pid: int) -> list[dict[str, Any]]:
        """Per VMA, one letter per 2 MiB range it overlaps: P, M, T, s or . (see PmdMapRow)."""
        mm = find_mm(self.mms, pid)
        out = []
        for vma in mm.vmas:
            cells = []
            for pidx in range(vma.start >> HPAGE_PMD_SHIFT, ((vma.end - 1) >> HPAGE_PMD_SHIFT) + 1):
                cells.append(self.cell(mm, vma, pidx))
            entry = self.maps_entry(vma)
            out.append(
                {"start": vma.start, "end": vma.end, "perms": entry["perms"], "path": entry["path"], "cells": "".join(cells)}
            )
        return out

    @staticmethod
    def cell(mm: Mm, vma: Vma, pidx: int) -> str:
        entry = mm.pmds.get(pidx)
        if entry is None:
            return "."
        if isinstance(entry, int):
            return "P"
        base = pidx << HPAGE_PMD_SHIFT
        first = (max(vma.start, base) - base) >> PAGE_SHIFT
        last = (min(vma.end, base + HPAGE_PMD_SIZE) - base) >> PAGE_SHIFT
        present = [pte for slot, pte in entry.present() if first <= slot < last]
        if not present:
            return "."
        if entry.mark:
            return "M"
        if any(pte & PTE_THP for pte in present):
            return "T"
        return "s"

    def top(self) -> dict[str, Any]:
        """Per process: size, RSS, PMD-mapped and PTE-mapped THP kB, marked tables, lock state;
        and the retry machinery's counters."""
        procs = []
        for pid in sorted(self.mms):
            mm = self.mms[pid]
            if mm.exiting:
                continue
            pmd = pte_thp = 0
            for entry in mm.pmds.values():
                if isinstance(entry, int):
                    pmd += HPAGE_PMD_SIZE
                else:
                    pte_thp += sum(PAGE_SIZE for _, pte in entry.present() if pte & PTE_THP)
            rss = sum(mm.rss.values()) * PAGE_SIZE
            lock = "write" if mm.lock.writer else f"read×{mm.lock.readers}" if mm.lock.readers else "free"
            procs.append(
                {
                    "pid": pid,
                    "vmas": len(mm.vmas),
                    "size_kb": sum(v.end - v.start for v in mm.vmas) >> 10,
                    "rss_kb": rss >> 10,
                    "pmd_kb": pmd >> 10,
                    "pte_thp_kb": pte_thp >> 10,
                    "marked": sum(1 for p, _ in self.marked if p == pid),
                    "lock": lock,
                }
            )
        stats = dict(self.stats) if self.stats is not None else {}
        counters = {
            "marked_tables": len(self.marked),
            "retracted": stats.get("retracted", 0),
            "retract_deferred": stats.get("retract_deferred", 0),
            "remap_trylock_failed": stats.get("remap_trylock_failed", 0),
            "remap_succeeded": stats.get("remap_SCAN_SUCCEED", 0),
            "pte_mapped_thp_dropped": stats.get("pte_mapped_thp_dropped", 0),
        }
        return {"processes": procs, "counters": counters}
