"""Text renderers: /proc/PID/smaps, /proc/vmstat, /proc/meminfo and sysfs, as the kernel prints
them (for the fields the model has). Input is what the daemons return (plain dicts), so a client
renders without the model's classes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shared.vm import SMAPS_FIELDS, SMAPS_ROLLUP_FIELDS

# show_map_vma pads the header to this column before the name (25 + 6 * sizeof(void *) - 1).
_SMAPS_NAME_COLUMN = 25 + 6 * 8 - 1

# /proc/vmstat's order (mm/vmstat.c vmstat_text, as 6.18 prints it); the model's counters follow it, and
# its own (thpsplit_*) come last, sorted.
VMSTAT_ORDER = (
    "nr_free_pages",
    "nr_free_pages_blocks",
    "nr_zone_inactive_anon",
    "nr_zone_active_anon",
    "nr_zone_inactive_file",
    "nr_zone_active_file",
    "nr_zone_unevictable",
    "nr_zone_write_pending",
    "nr_mlock",
    "nr_zspages",
    "nr_free_cma",
    "numa_hit",
    "numa_miss",
    "numa_foreign",
    "numa_interleave",
    "numa_local",
    "numa_other",
    "nr_inactive_anon",
    "nr_active_anon",
    "nr_inactive_file",
    "nr_active_file",
    "nr_unevictable",
    "nr_slab_reclaimable",
    "nr_slab_unreclaimable",
    "nr_isolated_anon",
    "nr_isolated_file",
    "workingset_nodes",
    "workingset_refault_anon",
    "workingset_refault_file",
    "workingset_activate_anon",
    "workingset_activate_file",
    "workingset_restore_anon",
    "workingset_restore_file",
    "workingset_nodereclaim",
    "nr_anon_pages",
    "nr_mapped",
    "nr_file_pages",
    "nr_dirty",
    "nr_writeback",
    "nr_shmem",
    "nr_shmem_hugepages",
    "nr_shmem_pmdmapped",
    "nr_file_hugepages",
    "nr_file_pmdmapped",
    "nr_anon_transparent_hugepages",
    "nr_vmscan_write",
    "nr_vmscan_immediate_reclaim",
    "nr_dirtied",
    "nr_written",
    "nr_throttled_written",
    "nr_kernel_misc_reclaimable",
    "nr_foll_pin_acquired",
    "nr_foll_pin_released",
    "nr_kernel_stack",
    "nr_page_table_pages",
    "nr_sec_page_table_pages",
    "nr_iommu_pages",
    "nr_swapcached",
    "pgpromote_success",
    "pgpromote_candidate",
    "pgpromote_candidate_nrl",
    "pgdemote_kswapd",
    "pgdemote_direct",
    "pgdemote_khugepaged",
    "pgdemote_proactive",
    "nr_hugetlb",
    "nr_balloon_pages",
    "nr_kernel_file_pages",
    "nr_dirty_threshold",
    "nr_dirty_background_threshold",
    "nr_memmap_pages",
    "nr_memmap_boot_pages",
    "pgpgin",
    "pgpgout",
    "pswpin",
    "pswpout",
    "pgalloc_dma",
    "pgalloc_dma32",
    "pgalloc_normal",
    "pgalloc_movable",
    "pgalloc_device",
    "allocstall_dma",
    "allocstall_dma32",
    "allocstall_normal",
    "allocstall_movable",
    "allocstall_device",
    "pgskip_dma",
    "pgskip_dma32",
    "pgskip_normal",
    "pgskip_movable",
    "pgskip_device",
    "pgfree",
    "pgactivate",
    "pgdeactivate",
    "pglazyfree",
    "pgfault",
    "pgmajfault",
    "pglazyfreed",
    "pgrefill",
    "pgreuse",
    "pgsteal_kswapd",
    "pgsteal_direct",
    "pgsteal_khugepaged",
    "pgsteal_proactive",
    "pgscan_kswapd",
    "pgscan_direct",
    "pgscan_khugepaged",
    "pgscan_proactive",
    "pgscan_direct_throttle",
    "pgscan_anon",
    "pgscan_file",
    "pgsteal_anon",
    "pgsteal_file",
    "zone_reclaim_success",
    "zone_reclaim_failed",
    "pginodesteal",
    "slabs_scanned",
    "kswapd_inodesteal",
    "kswapd_low_wmark_hit_quickly",
    "kswapd_high_wmark_hit_quickly",
    "pageoutrun",
    "pgrotated",
    "drop_pagecache",
    "drop_slab",
    "oom_kill",
    "numa_pte_updates",
    "numa_huge_pte_updates",
    "numa_hint_faults",
    "numa_hint_faults_local",
    "numa_pages_migrated",
    "pgmigrate_success",
    "pgmigrate_fail",
    "thp_migration_success",
    "thp_migration_fail",
    "thp_migration_split",
    "compact_migrate_scanned",
    "compact_free_scanned",
    "compact_isolated",
    "compact_stall",
    "compact_fail",
    "compact_success",
    "compact_daemon_wake",
    "compact_daemon_migrate_scanned",
    "compact_daemon_free_scanned",
    "htlb_buddy_alloc_success",
    "htlb_buddy_alloc_fail",
    "unevictable_pgs_culled",
    "unevictable_pgs_scanned",
    "unevictable_pgs_rescued",
    "unevictable_pgs_mlocked",
    "unevictable_pgs_munlocked",
    "unevictable_pgs_cleared",
    "unevictable_pgs_stranded",
    "thp_fault_alloc",
    "thp_fault_fallback",
    "thp_fault_fallback_charge",
    "thp_collapse_alloc",
    "thp_collapse_alloc_failed",
    "thp_file_alloc",
    "thp_file_fallback",
    "thp_file_fallback_charge",
    "thp_file_mapped",
    "thp_split_page",
    "thp_split_page_failed",
    "thp_deferred_split_page",
    "thp_underused_split_page",
    "thp_split_pmd",
    "thp_scan_exceed_none_pte",
    "thp_scan_exceed_swap_pte",
    "thp_scan_exceed_share_pte",
    "thp_split_pud",
    "thp_zero_page_alloc",
    "thp_zero_page_alloc_failed",
    "thp_swpout",
    "thp_swpout_fallback",
    "balloon_inflate",
    "balloon_deflate",
    "balloon_migrate",
    "swap_ra",
    "swap_ra_hit",
    "swpin_zero",
    "swpout_zero",
    "ksm_swpin_copy",
    "cow_ksm",
    "zswpin",
    "zswpout",
    "zswpwb",
    "direct_map_level2_splits",
    "direct_map_level3_splits",
    "direct_map_level2_collapses",
    "direct_map_level3_collapses",
    "nr_unstable",
)

# /proc/meminfo's order (fs/proc/meminfo.c, 6.18); lines it does not know follow in the order given.
MEMINFO_ORDER = (
    "MemTotal",
    "MemFree",
    "MemAvailable",
    "Buffers",
    "Cached",
    "SwapCached",
    "Active",
    "Inactive",
    "Active(anon)",
    "Inactive(anon)",
    "Active(file)",
    "Inactive(file)",
    "Unevictable",
    "Mlocked",
    "SwapTotal",
    "SwapFree",
    "Zswap",
    "Zswapped",
    "Dirty",
    "Writeback",
    "AnonPages",
    "Mapped",
    "Shmem",
    "KReclaimable",
    "Slab",
    "SReclaimable",
    "SUnreclaim",
    "KernelStack",
    "PageTables",
    "SecPageTables",
    "NFS_Unstable",
    "Bounce",
    "WritebackTmp",
    "CommitLimit",
    "Committed_AS",
    "VmallocTotal",
    "VmallocUsed",
    "VmallocChunk",
    "Percpu",
    "HardwareCorrupted",
    "AnonHugePages",
    "ShmemHugePages",
    "ShmemPmdMapped",
    "FileHugePages",
    "FilePmdMapped",
    "CmaTotal",
    "CmaFree",
    "Balloon",
    "HugePages_Total",
    "HugePages_Free",
    "HugePages_Rsvd",
    "HugePages_Surp",
    "Hugepagesize",
    "Hugetlb",
    "DirectMap4k",
    "DirectMap2M",
    "DirectMap1G",
)
# meminfo lines that count pages rather than kB (printed without the unit, as HugePages_Free).
MEMINFO_COUNTS = frozenset({"HugePagesFreeTHP"})


def _ordered(names: Iterable[str], order: tuple[str, ...], sort_rest: bool) -> list[str]:
    rank = {name: i for i, name in enumerate(order)}
    names = list(names)
    known = sorted((n for n in names if n in rank), key=rank.__getitem__)
    rest = [n for n in names if n not in rank]
    return known + (sorted(rest) if sort_rest else rest)


def _vma_header(e: Mapping[str, Any]) -> str:
    """show_map_vma: the range, permissions, offset, device, inode, and the path padded to its
    column."""
    header = f"{e['start']:08x}-{e['end']:08x} {e['perms']} {e['offset']:08x} {e.get('dev', '00:00')} {e['ino']} "
    path = e.get("path") or (f"/{e['name']}" if e.get("name") else "")
    return f"{header:<{_SMAPS_NAME_COLUMN}} {path}" if path else header


def _kb_line(name: str, value: int) -> str:
    # SEQ_PUT_DEC: the label padded to 16 columns (Private_Hugetlb's 17 with a 7-wide value).
    return f"{name + ':':<16}{value:>8} kB"


def render_maps(entries: Sequence[Mapping[str, Any]]) -> str:
    """/proc/PID/maps."""
    return "".join(_vma_header(e) + "\n" for e in entries)


def render_smaps(entries: Sequence[Mapping[str, Any]]) -> str:
    """/proc/PID/smaps for these VMAs (the fields of :meth:`remapd.procfs.Procfs.smaps`)."""
    lines = []
    for e in entries:
        lines.append(_vma_header(e))
        for name in SMAPS_FIELDS:
            lines.append(_kb_line(name, e[name]))
        lines.append(f"{'THPeligible:':<16}{e['THPeligible']:>8}")
        lines.append("VmFlags: " + "".join(flag + " " for flag in e["VmFlags"].split()))
    return "".join(line + "\n" for line in lines)


def render_smaps_rollup(rollup: Mapping[str, Any]) -> str:
    """/proc/PID/smaps_rollup: a [rollup] header over the VMAs' span, then the sums."""
    header = f"{rollup['start']:08x}-{rollup['end']:08x} ---p 00000000 00:00 0 "
    lines = [f"{header:<{_SMAPS_NAME_COLUMN}} [rollup]"]
    lines += [_kb_line(name, rollup[name]) for name in SMAPS_ROLLUP_FIELDS]
    return "".join(line + "\n" for line in lines)


# /proc/PID/status: the lines the model has, in task_mem()'s order; kB ones printed "%8lu kB".
STATUS_KB = (
    "VmPeak",
    "VmSize",
    "VmLck",
    "VmPin",
    "VmHWM",
    "VmRSS",
    "RssAnon",
    "RssFile",
    "RssShmem",
    "VmData",
    "VmStk",
    "VmExe",
    "VmLib",
    "VmPTE",
    "VmSwap",
    "HugetlbPages",
)


def render_status(status: Mapping[str, int]) -> str:
    """/proc/PID/status (Pid, the memory lines, THP_enabled, Threads)."""
    lines = [f"Pid:\t{status['Pid']}"]
    lines += [f"{name}:\t{status[name]:>8} kB" for name in STATUS_KB]
    lines += [f"THP_enabled:\t{status['THP_enabled']}", f"Threads:\t{status['Threads']}"]
    return "".join(line + "\n" for line in lines)


def render_vmstat(counters: Mapping[str, int]) -> str:
    return "".join(f"{name} {counters[name]}\n" for name in _ordered(counters, VMSTAT_ORDER, True))


def render_meminfo_order() -> tuple[str, ...]:
    return MEMINFO_ORDER


def render_meminfo(lines: Mapping[str, int]) -> str:
    out = []
    for name in _ordered(lines, MEMINFO_ORDER, False):
        label = f"{name + ':':<16}"
        unit = "" if name in MEMINFO_COUNTS else " kB"
        out.append(f"{label}{lines[name]:>8}{unit}\n")
    return "".join(out)


def render_sysfs(entries: Mapping[str, Mapping[str, Any]], single: bool) -> str:
    """One knob: its file's content. Several: ``grep -r .`` style, ``name:content`` per line."""
    if single:
        ((entry),) = entries.values()
        return f"{entry['text']}\n"
    return "".join(f"{name}:{entry['text']}\n" for name, entry in entries.items())
