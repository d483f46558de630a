"""The breakdown of the kernel's ``tools/mm/thpmaps`` (Ryan Roberts, 2024), reimplemented over
thpsplit's /proc output: it reads smaps text, pagemap entries and kpageflags entries as the tool
reads the kernel's files (little-endian u64s), so that its classification can be shown to work on
what thpsplit prints.

Per VMA with a permission and some Rss, of the present pages those whose kpageflags have THP
are cut into runs contiguous in both virtual and physical frame numbers. In a run, pages before
the first compound head belong to a THP mapped only partly (``partial``); so does the last folio
if the page after the run is a compound tail; every other folio is fully mapped and counts as
``aligned`` when its virtual frame is a multiple of its size, else ``unaligned``, by order. The
PMD-mapped ones are then moved out of the PMD order's PTE counter, using smaps' AnonHugePages and
ShmemPmdMapped + FilePmdMapped: ``file-thp-pmd-aligned-2048kB`` is the PMD-mapped THPs,
``file-thp-pte-aligned-2048kB`` the pte-mapped ones, ``file-thp-pte-partial`` the pages of THPs
mapped only in part.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.pageflags import (
    KPF_ANON,
    KPF_COMPOUND_HEAD,
    KPF_COMPOUND_TAIL,
    KPF_THP,
    PM_PFN_MASK,
    PM_PRESENT,
)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PMD_ORDER = 9

# The smaps fields thpmaps reads (all of them with --inc-smaps).
VMA_MIN_STATS = ("Rss", "Anonymous", "AnonHugePages", "ShmemPmdMapped", "FilePmdMapped")
VMA_ALL_STATS = (
    "Size", "Rss", "Pss", "Pss_Dirty", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty",
    "Referenced", "Anonymous", "KSM", "LazyFree", "AnonHugePages", "ShmemPmdMapped", "FilePmdMapped",
    "Shared_Hugetlb", "Private_Hugetlb", "Swap", "SwapPss", "Locked",
)  # fmt: skip

HEADER = "       PID             START              END PROT   OFFSET   DEV    INODE OBJECT"


def u64s(data: bytes) -> list[int]:
    """Little-endian u64s, as the tool reads /proc/PID/pagemap and /proc/kpageflags."""
    return list(struct.unpack(f"<{len(data) // 8}Q", data))


def to_bytes(values: Iterable[int]) -> bytes:
    values = list(values)
    return struct.pack(f"<{len(values)}Q", *values)


def kb_of_order(order: int) -> int:
    return (PAGE_SIZE << order) >> 10


@dataclass
class Vma:
    """A VMA as the tool parses it from smaps (its inode field parsed as hex, as the tool does)."""

    name: str
    start: int
    end: int
    read: bool
    write: bool
    execute: bool
    private: bool
    pgoff: int
    major: int
    minor: int
    inode: int
    stats: dict[str, int] = field(default_factory=dict)


def parse_smaps(text: str, wanted: Sequence[str] = VMA_ALL_STATS) -> list[Vma]:
    vmas: list[Vma] = []
    for line in text.splitlines():
        elements = line.split()
        if not elements:
            continue
        if "-" in elements[0]:
            start, end = (int(x, 16) for x in elements[0].split("-"))
            major, minor = (int(x, 16) for x in elements[3].split(":"))
            perms = elements[1]
            vmas.append(
                Vma(
                    name=elements[5] if len(elements) == 6 else "",
                    start=start,
                    end=end,
                    read=perms[0] == "r",
                    write=perms[1] == "w",
                    execute=perms[2] == "x",
                    private=perms[3] == "p",
                    pgoff=int(elements[2], 16),
                    major=major,
                    minor=minor,
                    inode=int(elements[4], 16),
                )
            )
        elif elements[0][:-1] in wanted:
            vmas[-1].stats[elements[0][:-1]] = int(elements[1])
    return vmas


@dataclass
class _Kind:
    partial: int = 0
    aligned: list[int] = field(default_factory=lambda: [0] * (PMD_ORDER + 1))
    unaligned: list[int] = field(default_factory=lambda: [0] * (PMD_ORDER + 1))


def _runs(vfns: list[int], pfns: list[int]) -> list[tuple[int, int]]:
    """[first, last] index ranges over which both vfn and pfn go up by one each step."""
    out = []
    start = 0
    for i in range(1, len(vfns) + 1):
        if i == len(vfns) or vfns[i] != vfns[i - 1] + 1 or pfns[i] != pfns[i - 1] + 1:
            out.append((start, i - 1))
            start = i
    return out if vfns else []


def vma_stats(
    vma: Vma, pagemap: Sequence[int], kpageflags: Callable[[int], int], cont_orders: Sequence[int] = ()
) -> tuple[dict[str, tuple[str, int]], int, int]:
    """The tool's statistics of one VMA: {label: (anon|file, kB)}, total anon kB, total file kB.

    ``pagemap`` holds the VMA's entries (one per page from its start); ``kpageflags(pfn)`` reads
    one kpageflags entry.
    """
    first_vfn = vma.start >> PAGE_SHIFT
    present = [(first_vfn + i, pme & PM_PFN_MASK) for i, pme in enumerate(pagemap) if pme & PM_PRESENT]
    thp = []
    for vfn, pfn in present:
        flags = kpageflags(pfn)
        if flags & KPF_THP:
            thp.append((vfn, pfn, bool(flags & KPF_ANON), bool(flags & KPF_COMPOUND_HEAD)))
    vfns = [t[0] for t in thp]
    pfns = [t[1] for t in thp]
    kinds = {"anon": _Kind(), "file": _Kind()}

    def kind_at(i: int) -> _Kind:
        return kinds["anon" if thp[i][2] else "file"]

    runs = _runs(vfns, pfns)
    for lo, hi in runs:
        end = hi + 1
        heads = [i for i in range(lo, end) if thp[i][3]]
        kind_at(lo).partial += (heads[0] if heads else end) - lo
        if heads and kpageflags(pfns[hi] + 1) & KPF_COMPOUND_TAIL:
            last = heads.pop()
            kind_at(end - 1).partial += end - last
            end = last
        for n, head in enumerate(heads):
            nr = (heads[n + 1] if n + 1 < len(heads) else end) - head
            order = nr.bit_length() - 1
            aligned = vfns[head] % (1 << order) == 0
            getattr(kind_at(head), "aligned" if aligned else "unaligned")[order] += 1 << order

    anon_pmd = vma.stats.get("AnonHugePages", 0)
    file_pmd = vma.stats.get("ShmemPmdMapped", 0) + vma.stats.get("FilePmdMapped", 0)
    kinds["anon"].aligned[PMD_ORDER] = max(0, kinds["anon"].aligned[PMD_ORDER] - (anon_pmd << 10 >> PAGE_SHIFT))
    kinds["file"].aligned[PMD_ORDER] = max(0, kinds["file"].aligned[PMD_ORDER] - (file_pmd << 10 >> PAGE_SHIFT))

    pmd_kb = kb_of_order(PMD_ORDER)
    out: dict[str, tuple[str, int]] = {
        f"anon-thp-pmd-aligned-{pmd_kb}kB": ("anon", anon_pmd),
        f"file-thp-pmd-aligned-{pmd_kb}kB": ("file", file_pmd),
    }
    for name, kind in kinds.items():
        for sub in ("aligned", "unaligned"):
            for order, nr in enumerate(getattr(kind, sub)[2:], 2):
                out[f"{name}-thp-pte-{sub}-{kb_of_order(order)}kB"] = (name, (nr << PAGE_SHIFT) >> 10)
        out[f"{name}-thp-pte-partial"] = (name, (kind.partial << PAGE_SHIFT) >> 10)
    for order in cont_orders:
        out.update(_cont_stats(order, runs, thp, anon_pmd, file_pmd))
    tot_anon = vma.stats.get("Anonymous", 0)
    return out, tot_anon, vma.stats.get("Rss", 0) - tot_anon


def _cont_stats(
    order: int, runs: list[tuple[int, int]], thp: list[tuple[int, int, bool, bool]], anon_pmd: int, file_pmd: int
) -> dict[str, tuple[str, int]]:
    """--cont SIZE: memory mapped in blocks of 2^order pages contiguous and aligned in both
    spaces, within one folio."""
    nr_cont = 1 << order
    nr = {"anon": 0, "file": 0}
    for lo, hi in runs:
        vfn, pfn = thp[lo][0], thp[lo][1]
        if pfn % nr_cont != vfn % nr_cont:
            continue
        i = lo + (-vfn % nr_cont)
        while i + nr_cont <= hi + 1:
            if not any(thp[j][3] for j in range(i + 1, i + nr_cont)):
                nr["anon" if thp[i][2] else "file"] += nr_cont
            i += nr_cont
    size = (nr_cont << PAGE_SHIFT) >> 10
    anon = max(0, nr["anon"] - (anon_pmd << 10 >> PAGE_SHIFT))
    file = max(0, nr["file"] - (file_pmd << 10 >> PAGE_SHIFT))
    return {
        f"anon-cont-pmd-aligned-{size}kB": ("anon", anon_pmd),
        f"file-cont-pmd-aligned-{size}kB": ("file", file_pmd),
        f"anon-cont-pte-aligned-{size}kB": ("anon", (anon << PAGE_SHIFT) >> 10),
        f"file-cont-pte-aligned-{size}kB": ("file", (file << PAGE_SHIFT) >> 10),
    }


def vma_line(vma: Vma, pid: int) -> str:
    return (
        f"{pid:010d}: {vma.start:016x}-{vma.end:016x} "
        f"{'r' if vma.read else '-'}{'w' if vma.write else '-'}{'x' if vma.execute else '-'}"
        f"{'p' if vma.private else 's'} {vma.pgoff:08x} {vma.major:02x}:{vma.minor:02x} {vma.inode:08x} {vma.name}"
    )


def stats_lines(stats: dict[str, tuple[str, int]], tot_anon: int, tot_file: int, inc_empty: bool) -> list[str]:
    out = []
    for label, (kind, value) in stats.items():
        if not value and not inc_empty:
            continue
        pad = max(0, 32 - len(label) - 1)
        total = tot_anon if kind == "anon" else tot_file if kind == "file" else 0
        percent = f" ({value / total:3.0%})" if kind in ("anon", "file") and total > 0 else ""
        out.append(f"{label}:{' ' * pad}{value:8} kB{percent}")
    return out


def report(
    per_pid: dict[int, tuple[str, dict[tuple[int, int], bytes], Callable[[int], int]]],
    rollup: bool = False,
    inc_smaps: bool = False,
    inc_empty: bool = False,
    cont_orders: Sequence[int] = (),
) -> tuple[str, dict[str, Any]]:
    """The tool's output for processes given as {pid: (smaps text, {(start, end): pagemap bytes},
    kpageflags(pfn))}, and the same as a document."""
    lines = [] if rollup else [HEADER]
    total: dict[str, tuple[str, int]] = {}
    total_anon = total_file = 0
    doc: dict[str, Any] = {"processes": {}}
    for pid, (smaps_text, pagemaps, kpageflags) in per_pid.items():
        vmas_doc = []
        for vma in parse_smaps(smaps_text, VMA_ALL_STATS if inc_smaps else VMA_MIN_STATS):
            stats: dict[str, tuple[str, int]] = {}
            vma_anon = vma_file = 0
            if (vma.read or vma.write or vma.execute) and vma.stats.get("Rss", 0) > 0:
                stats, vma_anon, vma_file = vma_stats(
                    vma, u64s(pagemaps[(vma.start, vma.end)]), kpageflags, cont_orders
                )
            if inc_smaps:
                stats = {**{k: ("", v) for k, v in vma.stats.items()}, **stats}
            vmas_doc.append({"start": vma.start, "end": vma.end, "name": vma.name,
                             "stats": {k: v for k, (_, v) in stats.items()}})  # fmt: skip
            if rollup:
                for k, (kind, v) in stats.items():
                    old = total.get(k, (kind, 0))
                    total[k] = (kind, old[1] + v)
                total_anon += vma_anon
                total_file += vma_file
            else:
                lines.append(vma_line(vma, pid))
                lines += stats_lines(stats, vma_anon, vma_file, inc_empty)
        doc["processes"][str(pid)] = vmas_doc
    if rollup:
        lines += stats_lines(total, total_anon, total_file, inc_empty)
        doc["rollup"] = {k: v for k, (_, v) in total.items()}
    return "".join(line + "\n" for line in lines), doc
