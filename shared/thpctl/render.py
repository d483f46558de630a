"""Text renderers: /proc/PID/smaps, /proc/vmstat, /proc/meminfo and sysfs, as the kernel prints
them (for the fields the model has). Input is what the daemons return (plain dicts), so a client
renders without the model's classes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shared.vm import SMAPS_FIELDS

# show_map_vma pads the header to this column before the name (25 + 6 * sizeof(void *) - 1).
_SMAPS_NAME_COLUMN = 25 + 6 * 8 - 1

# /proc/vmstat order (6.x) of the counters the model keeps; others follow, sorted.
VMSTAT_ORDER = (
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
    "nr_swapcached",
    "pgpgin",
    "pgpgout",
    "pswpin",
    "pswpout",
    "pgfault",
    "pgmajfault",
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
    "thp_split_pmd",
    "thp_scan_exceed_none_pte",
    "thp_scan_exceed_swap_pte",
    "thp_scan_exceed_share_pte",
)

# /proc/meminfo order (6.x) of the lines the model has; others follow in the order given.
MEMINFO_ORDER = (
    "Cached",
    "SwapCached",
    "Dirty",
    "Writeback",
    "Mapped",
    "Shmem",
    "AnonHugePages",
    "ShmemHugePages",
    "ShmemPmdMapped",
    "FileHugePages",
    "FilePmdMapped",
)
# meminfo lines that count pages rather than kB (printed without the unit, as HugePages_Free).
MEMINFO_COUNTS = frozenset({"HugePagesFreeTHP"})


def _ordered(names: Iterable[str], order: tuple[str, ...], sort_rest: bool) -> list[str]:
    rank = {name: i for i, name in enumerate(order)}
    names = list(names)
    known = sorted((n for n in names if n in rank), key=rank.__getitem__)
    rest = [n for n in names if n not in rank]
    return known + (sorted(rest) if sort_rest else rest)


def render_smaps(entries: Sequence[Mapping[str, Any]]) -> str:
    """/proc/PID/smaps for these VMAs (the fields of :func:`remapd.report.smaps`)."""
    lines = []
    for e in entries:
        header = f"{e['start']:08x}-{e['end']:08x} {e['perms']} {e['offset']:08x} 00:00 {e['ino']} "
        if e.get("name"):
            header = f"{header:<{_SMAPS_NAME_COLUMN}} /{e['name']}"
        lines.append(header)
        for name in SMAPS_FIELDS:
            lines.append(f"{name + ':':<16}{e[name]:>8} kB")
        lines.append(f"{'THPeligible:':<16}{e['THPeligible']:>8}")
        lines.append("VmFlags: " + "".join(flag + " " for flag in e["VmFlags"].split()))
    return "".join(line + "\n" for line in lines)


def render_vmstat(counters: Mapping[str, int]) -> str:
    return "".join(f"{name} {counters[name]}\n" for name in _ordered(counters, VMSTAT_ORDER, True))


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
