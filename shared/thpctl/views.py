"""thpctl maps / smaps-rollup / pagemap / kpageflags / thpmaps: the kernel's own ways to look at
a process's memory, and the pte-mapped THP among it (served by remapd, which asks collapsed for
the page-cache pages' flags and mapcounts).

``pagemap`` and ``kpageflags`` print one decoded line per page by default; ``--binary`` writes
the little-endian u64s the kernel's files hold (to stdout, or to ``-o FILE``). ``thpmaps`` runs
the breakdown of the kernel's tools/mm/thpmaps over those same bytes
(:mod:`shared.thpctl.thpmaps`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, TextIO

from shared.errors import UserError
from shared.pageflags import (
    MAX_ENTRIES,
    PM_FILE,
    PM_MMAP_EXCLUSIVE,
    PM_PFN_MASK,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAP,
    kpf_names,
    page_types_symbols,
)
from shared.protocol import messages as m
from shared.thpctl import thpmaps
from shared.thpctl.cli import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    REMAPD,
    Outcome,
    Request,
    address,
    command,
    count,
    emit,
    failed,
    ok,
    req,
    size,
)
from shared.thpctl.client import Session
from shared.thpctl.render import render_maps, render_smaps, render_smaps_rollup
from shared.units import PAGE_SHIFT, PAGE_SIZE


def _pages(addr: int, length: int) -> tuple[int, int]:
    return addr >> PAGE_SHIFT, (addr + length + PAGE_SIZE - 1) >> PAGE_SHIFT


def _plan_pagemap(args: argparse.Namespace) -> list[Request]:
    first, last = _pages(args.addr, args.length)
    return [
        req(REMAPD, m.Pagemap, pid=args.pid, addr=vfn << PAGE_SHIFT, length=min(MAX_ENTRIES, last - vfn) << PAGE_SHIFT)
        for vfn in range(first, last, MAX_ENTRIES)
    ]


def pagemap_line(vaddr: int, entry: int) -> str:
    bits = []
    if entry & PM_PRESENT:
        bits.append("present")
    if entry & PM_SWAP:
        bits.append("swapped")
    if entry & PM_FILE:
        bits.append("file")
    if entry & PM_MMAP_EXCLUSIVE:
        bits.append("exclusive")
    if entry & PM_SOFT_DIRTY:
        bits.append("soft-dirty")
    pfn = f"{entry & PM_PFN_MASK:#x}" if entry & PM_PRESENT else "-"
    return f"{vaddr:016x} {entry:016x} {pfn:>14} {','.join(bits) or 'none'}"


def _binary(args: argparse.Namespace, data: bytes) -> Outcome:
    """Write ``data`` to -o FILE, or keep it for stdout (written by the runner-less path below)."""
    if args.out:
        try:
            with open(args.out, "wb") as f:
                f.write(data)
        except OSError as err:
            return failed(UserError("EIO", f"{args.out}: {err.strerror}"))
        return ok({"file": args.out, "bytes": len(data)})
    out = ok({"bytes": len(data)})
    out.binary = data
    return out


def _render_pagemap(args: argparse.Namespace, results: list[Any]) -> Outcome:
    entries = [e for chunk in results for e in chunk][: _pages(args.addr, args.length)[1] - _pages(args.addr, args.length)[0]]
    if args.binary or args.out:
        return _binary(args, thpmaps.to_bytes(entries))
    first = args.addr >> PAGE_SHIFT
    header = f"{'ADDR':<16} {'ENTRY':<16} {'PFN':>14} FLAGS"
    text = "".join(pagemap_line((first + i) << PAGE_SHIFT, e) + "\n" for i, e in enumerate(entries))
    return ok(entries, header + "\n" + text)


def _plan_kpageflags(args: argparse.Namespace) -> list[Request]:
    return [
        req(REMAPD, m.KPageFlags, pfn=pfn, count=min(MAX_ENTRIES, args.pfn + args.n - pfn))
        for pfn in range(args.pfn, args.pfn + args.n, MAX_ENTRIES)
    ]


def kpageflags_line(pfn: int, flags: int, mapcount: int) -> str:
    return f"{pfn:#12x} {flags:016x} {mapcount:>5} {page_types_symbols(flags)} {','.join(kpf_names(flags)) or '-'}"


def _render_kpageflags(args: argparse.Namespace, results: list[Any]) -> Outcome:
    flags: list[int] = []
    counts: list[int] = []
    for chunk in results:
        flags += chunk["flags"]
        counts += chunk["counts"]
        if len(chunk["flags"]) < min(MAX_ENTRIES, args.n):
            break  # a short read: the end of memory
    if args.binary or args.out:
        return _binary(args, thpmaps.to_bytes(flags))
    header = f"{'PFN':>12} {'FLAGS':<16} {'COUNT':>5} {'SYMBOLS':<27} NAMES"
    text = "".join(kpageflags_line(args.pfn + i, f, c) + "\n" for i, (f, c) in enumerate(zip(flags, counts, strict=True)))
    return ok({"pfn": args.pfn, "flags": flags, "counts": counts}, header + "\n" + text)


async def _thpmaps(session: Session, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    """Read smaps, each VMA's pagemap and the kpageflags of the pages they map, as the tool reads
    the kernel's files, then run its breakdown."""
    per_pid: dict[int, Any] = {}
    try:
        for pid in args.pid:
            smaps = await session.call(m.Smaps, pid=pid)
            pagemaps: dict[tuple[int, int], bytes] = {}
            flags: dict[int, int] = {}
            for e in smaps:
                entries: list[int] = []
                for vfn in range(e["start"] >> PAGE_SHIFT, e["end"] >> PAGE_SHIFT, MAX_ENTRIES):
                    n = min(MAX_ENTRIES, (e["end"] >> PAGE_SHIFT) - vfn)
                    entries += await session.call(m.Pagemap, pid=pid, addr=vfn << PAGE_SHIFT, length=n << PAGE_SHIFT)
                pagemaps[(e["start"], e["end"])] = thpmaps.to_bytes(entries)
                wanted = sorted({x & PM_PFN_MASK for x in entries if x & PM_PRESENT})
                # Each page and the one after it (the tool reads the flags past a run's end).
                for pfn in sorted(set(wanted) | {p + 1 for p in wanted}):
                    if pfn not in flags:
                        got = await session.call(m.KPageFlags, pfn=pfn, count=1)
                        flags[pfn] = got["flags"][0] if got["flags"] else 0
            table = dict(flags)
            per_pid[pid] = (render_smaps(smaps), pagemaps, lambda pfn, t=table: t.get(pfn, 0))
    except UserError as err:
        emit(failed(err), args.json, stdout, stderr, "thpctl thpmaps")
        return EXIT_FAIL
    cont = [_cont_order(c) for c in args.cont]
    if None in cont:
        stderr.write("thpctl thpmaps: --cont must be a power-of-2 number of pages, 8K to 2M\n")
        return EXIT_USAGE
    text, doc = thpmaps.report(per_pid, args.rollup, args.inc_smaps, args.inc_empty, [c for c in cont if c])
    if args.summary:
        text, doc = _summary(doc)
    stdout.write(json.dumps(doc) + "\n" if args.json else text)
    return EXIT_OK


def _cont_order(nbytes: int) -> int | None:
    pages = nbytes >> PAGE_SHIFT
    order = pages.bit_length() - 1
    if pages < 2 or pages << PAGE_SHIFT != nbytes or 1 << order != pages or order > thpmaps.PMD_ORDER:
        return None
    return order


def _summary(doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """One line per process: file THP memory PMD-mapped, pte-mapped whole, and partly mapped."""
    pmd_label = f"file-thp-pmd-aligned-{thpmaps.kb_of_order(thpmaps.PMD_ORDER)}kB"
    pte_label = f"file-thp-pte-aligned-{thpmaps.kb_of_order(thpmaps.PMD_ORDER)}kB"
    rows = {}
    lines = [f"{'PID':>8} {'PMD-MAPPED':>12} {'PTE-MAPPED':>12} {'PARTIAL':>10} {'UNALIGNED':>10}"]
    for pid, vmas in doc["processes"].items():
        total = {"pmd_kb": 0, "pte_kb": 0, "partial_kb": 0, "unaligned_kb": 0}
        for vma in vmas:
            s = vma["stats"]
            total["pmd_kb"] += s.get(pmd_label, 0)
            total["pte_kb"] += s.get(pte_label, 0)
            total["partial_kb"] += s.get("file-thp-pte-partial", 0)
            total["unaligned_kb"] += sum(v for k, v in s.items() if k.startswith("file-thp-pte-unaligned"))
        rows[pid] = total
        lines.append(
            f"{pid:>8} {total['pmd_kb']:>9} kB {total['pte_kb']:>9} kB {total['partial_kb']:>7} kB {total['unaligned_kb']:>7} kB"
        )
    return "".join(line + "\n" for line in lines), rows


def register(sub: Any) -> None:
    p = command(
        sub,
        "maps",
        "/proc/PID/maps: every VMA's range, permissions, offset, device, inode and path",
        lambda a: [req(REMAPD, m.Maps, pid=a.pid)],
        lambda a, r: ok(r[0], render_maps(r[0])),
        "maps 1",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")

    p = command(
        sub,
        "smaps-rollup",
        "/proc/PID/smaps_rollup: smaps summed over every VMA (with Pss_Anon, Pss_File, Pss_Shmem)",
        lambda a: [req(REMAPD, m.SmapsRollupRequest, pid=a.pid)],
        lambda a, r: ok(r[0], render_smaps_rollup(r[0])),
        "smaps-rollup 1",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")

    p = command(
        sub,
        "pagemap",
        "/proc/PID/pagemap for [ADDR, ADDR+LENGTH): per page present, file, exclusive, PFN",
        _plan_pagemap,
        _render_pagemap,
        "pagemap 1 0x7effffc00000 16K",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")
    p.add_argument("addr", type=address, metavar="ADDR", help="virtual address (rounded down to a page)")
    p.add_argument("length", type=size, metavar="LENGTH", help="bytes from ADDR")
    p.add_argument("--binary", action="store_true", help="the file's bytes (little-endian u64s) on stdout")
    p.add_argument("-o", "--out", metavar="FILE", help="write the bytes to FILE")

    p = command(
        sub,
        "kpageflags",
        "/proc/kpageflags and /proc/kpagecount for N pages from PFN (KPF_* bits, mapcount)",
        _plan_kpageflags,
        _render_kpageflags,
        "kpageflags 0x200 4",
    )
    p.add_argument("pfn", type=address, metavar="PFN", help="the first page frame")
    p.add_argument("n", type=count, nargs="?", default=1, metavar="N", help="how many pages")
    p.add_argument("--binary", action="store_true", help="the file's bytes (little-endian u64s) on stdout")
    p.add_argument("-o", "--out", metavar="FILE", help="write the bytes to FILE")

    p = sub.add_parser(
        "thpmaps",
        help="tools/mm/thpmaps' breakdown of how THPs are mapped: PMD-mapped, pte-mapped (aligned or "
        "not) and partially mapped, per VMA",
        description=thpmaps.__doc__,
        epilog="example: thpctl thpmaps 1 --rollup",
    )
    p.add_argument("pid", type=int, nargs="+", metavar="PID", help="the modelled processes")
    p.add_argument("--rollup", action="store_true", help="sum the per-VMA statistics")
    p.add_argument("--summary", action="store_true", help="one line per process: file THP kB by how it is mapped")
    p.add_argument("--inc-smaps", action="store_true", help="include every additive smaps field")
    p.add_argument("--inc-empty", action="store_true", help="show statistics that are 0 too")
    p.add_argument("--cont", type=size, action="append", default=[], metavar="SIZE",
                   help="add contiguous-block statistics for blocks of SIZE (repeatable)")  # fmt: skip
    p.set_defaults(runner=_thpmaps, name="thpctl thpmaps", prog="thpctl thpmaps")
