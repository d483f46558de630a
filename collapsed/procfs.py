"""The collapser's share of /proc and sysfs: /proc/meminfo, its /proc/vmstat lines, the
hugepages-2048kB/stats counters, and the page state behind /proc/kpageflags, /proc/kpagecount,
smaps and pagemap (answers to :class:`~shared.protocol.messages.PageQuery`).

Read-only: nothing here changes the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collapsed.pagecache import (
    PG_ALLOCATED,
    PG_DIRTY,
    PG_HEAD,
    PG_LOCKED,
    PG_LRU,
    PG_SWAPBACKED,
    PG_UPTODATE,
    PG_WRITEBACK,
    PhysMem,
)
from shared import messages as m
from shared.knobs import PER_SIZE
from shared.pageflags import (
    KPF_BUDDY,
    KPF_COMPOUND_HEAD,
    KPF_COMPOUND_TAIL,
    KPF_DIRTY,
    KPF_LOCKED,
    KPF_LRU,
    KPF_MMAP,
    KPF_RESERVED,
    KPF_SWAPBACKED,
    KPF_THP,
    KPF_UPTODATE,
    KPF_WRITEBACK,
)
from shared.units import HPAGE_PMD_NR, PAGE_SIZE

if TYPE_CHECKING:
    from collapsed.collapser import Collapser

_NR = HPAGE_PMD_NR
_KB = PAGE_SIZE // 1024


def page_flags(mem: PhysMem, pfn: int) -> tuple[int, int]:
    """``stable_page_flags`` and the precise mapcount of ``pfn`` (which must be below the end of
    memory). Folio-wide bits (locked, dirty, lru, ...) are read from the head, as 6.x reads
    ``folio->flags``; a free page is BUDDY; block 0, never handed out, is RESERVED."""
    if pfn < _NR:
        return KPF_RESERVED, 0
    flags = mem.flags
    if not flags[pfn] & PG_ALLOCATED:
        return KPF_BUDDY, 0
    head = mem.head(pfn)
    f = flags[head]
    large = bool(f & PG_HEAD)
    mapcount = mem.mapcount[pfn] + (mem.entire.get(head, 0) if large else 0)
    out = 0
    if f & PG_LOCKED:
        out |= KPF_LOCKED
    if f & PG_UPTODATE:
        out |= KPF_UPTODATE
    if f & PG_DIRTY:
        out |= KPF_DIRTY
    if f & PG_LRU:
        out |= KPF_LRU
    if f & PG_WRITEBACK:
        out |= KPF_WRITEBACK
    if f & PG_SWAPBACKED:
        out |= KPF_SWAPBACKED
    if large:
        out |= KPF_THP | (KPF_COMPOUND_HEAD if pfn == head else KPF_COMPOUND_TAIL)
        mapped = head in mem.entire or any(mem.mapcount[head : head + mem.folio_nr(head)])
    else:
        mapped = mapcount > 0
    if mapped:
        out |= KPF_MMAP
    return out, mapcount


def page_info(c: Collapser, msg: m.PageQuery) -> m.PageInfo:
    """The answer to a :class:`~shared.protocol.messages.PageQuery`."""
    mem = c.mem
    end = len(mem.flags)
    rows = tuple((pfn, *page_flags(mem, pfn)) for pfn in msg.pfns if 0 <= pfn < end)
    swapped = []
    for ino, start, stop in msg.swap_ranges:
        f = c.cache.files.get(ino)
        swapped.append(tuple(i for i, v in f.entries(start, stop) if v < 0) if f is not None and f.nrswap else ())
    return m.PageInfo(msg.req, rows, end, tuple(swapped))


def _page_counts(c: Collapser) -> dict[str, int]:
    """Pages mapped (NR_FILE_MAPPED: a page counts once however many map it; a PMD-mapped THP
    counts all 512), dirty and under writeback (a THP's flag counts for its 512 pages)."""
    mem = c.mem
    mapped = dirty = writeback = 0
    seen_heads: set[int] = set()
    for f in c.cache.files.values():
        for _, value in f.entries():
            if value <= 0:
                continue
            flags = mem.flags
            head = mem.head(value)
            large = flags[head] & PG_HEAD
            if large:
                if head in seen_heads:
                    continue
                seen_heads.add(head)
                n = mem.folio_nr(head)
                if head in mem.entire:
                    mapped += n
                else:
                    mapped += sum(1 for p in range(head, head + n) if mem.mapcount[p])
            else:
                mapped += 1 if mem.mapcount[value] else 0
                n = 1
            if flags[head] & PG_DIRTY:
                dirty += n
            if flags[head] & PG_WRITEBACK:
                writeback += n
    return {"mapped": mapped, "dirty": dirty, "writeback": writeback}


def meminfo(c: Collapser) -> dict[str, int]:
    """/proc/meminfo's lines the model has, in kB, in the kernel's order (fs/proc/meminfo.c)."""
    mem = c.mem
    file_pages = shmem_pages = file_thp = shmem_thp = file_pmd = shmem_pmd = 0
    for f in c.cache.files.values():
        if f.shmem:
            shmem_pages += f.nrpages
            shmem_thp += f.nr_thps
        else:
            file_thp += f.nr_thps
        file_pages += f.nrpages
    for head, count in mem.entire.items():
        if count > 0:
            if mem.flags[head] & PG_SWAPBACKED:
                shmem_pmd += 1
            else:
                file_pmd += 1
    counts = _page_counts(c)
    huge_kb = _NR * _KB
    return {
        "Cached": file_pages * _KB,
        "SwapCached": 0,
        "Dirty": counts["dirty"] * _KB,
        "Writeback": counts["writeback"] * _KB,
        "Mapped": counts["mapped"] * _KB,
        "Shmem": shmem_pages * _KB,
        "AnonHugePages": 0,
        "ShmemHugePages": shmem_thp * huge_kb,
        "ShmemPmdMapped": shmem_pmd * huge_kb,
        "FileHugePages": file_thp * huge_kb,
        "FilePmdMapped": file_pmd * huge_kb,
    }


def vmstat(c: Collapser) -> dict[str, int]:
    """This side's /proc/vmstat lines (mm/vmstat.c vmstat_text names), plus one of ours under
    ``thpsplit_``: the shmem swap entries of every file, which the kernel counts per inode
    (``shmem_inode_info.swapped``) but not in vmstat."""
    info = meminfo(c)
    out = {
        "nr_mapped": info["Mapped"] // _KB,
        "nr_file_pages": info["Cached"] // _KB,
        "nr_dirty": info["Dirty"] // _KB,
        "nr_writeback": info["Writeback"] // _KB,
        "nr_shmem": info["Shmem"] // _KB,
        "nr_shmem_hugepages": info["ShmemHugePages"] // (_NR * _KB),
        "nr_shmem_pmdmapped": info["ShmemPmdMapped"] // (_NR * _KB),
        "nr_file_hugepages": info["FileHugePages"] // (_NR * _KB),
        "nr_file_pmdmapped": info["FilePmdMapped"] // (_NR * _KB),
        "nr_swapcached": 0,
        # Page-cache reads and shmem swap-ins, in kB, as submit_bio counts them.
        "pgpgin": c.cache.pages_read * _KB,
        # Deferred split is for anon THPs (none here); the huge zero page is anon's too.
        "thp_deferred_split_page": 0,
        "thp_underused_split_page": 0,
        "thp_zero_page_alloc": 0,
        "thp_zero_page_alloc_failed": 0,
        "thpsplit_nr_swap_entries": c.cache.nr_swap_entries,
    }
    out.update(c.vm)
    return out


def mthp_stats(c: Collapser) -> dict[str, int]:
    """hugepages-2048kB/stats/*: the PMD order's shmem and split counters (the anon and swap ones
    are 0: no anon THP, and shmem THPs are split before they go to swap)."""
    from shared.knobs import MTHP_STATS

    vm = c.vm
    values = {
        "shmem_alloc": vm["thp_file_alloc"],
        "shmem_fallback": vm["thp_file_fallback"],
        "shmem_fallback_charge": vm["thp_file_fallback_charge"],
        "split": vm["thp_split_page"],
        "split_failed": vm["thp_split_page_failed"],
    }
    return {f"{PER_SIZE}/stats/{name}": values.get(name, 0) for name in MTHP_STATS}
