"""thpctl file ...: files and the page cache (served by collapsed)."""

from __future__ import annotations

import argparse
from typing import Any

from shared.protocol import messages as m
from shared.thpctl.cli import COLLAPSED, Outcome, command, lines, ok, req, size
from shared.vm import DEFAULT_FS, FsKind


def _kind(f: dict[str, Any]) -> str:
    """``shmem``, ``file`` (ro-thp, the default) or ``file large-folio``."""
    if f["shmem"]:
        return "shmem"
    return "file" if f.get("fs", DEFAULT_FS) == DEFAULT_FS else f"file {f['fs']}"


def _stat_line(f: dict[str, Any]) -> str:
    return (
        f"{f['name']} ino {f['ino']} size {f['size']} {_kind(f)} "
        f"nrpages {f['nrpages']} thps {f['thps']} swap {f['swap']} dirty {f['dirty']} "
        f"writers {f['open_for_write']}"
    )


def _render_stat(args: argparse.Namespace, results: list[Any]) -> Outcome:
    return ok(results[0], lines(_stat_line(results[0])))


def _render_write(args: argparse.Namespace, results: list[Any]) -> Outcome:
    result = results[0]
    short = [f"short write: {result['written']} of {args.length} bytes"] if result["written"] < args.length else []
    return ok(result, lines(_stat_line(result), *short))


def _render_ls(args: argparse.Namespace, results: list[Any]) -> Outcome:
    files = results[0]
    header = f"{'NAME':<24} {'INO':>5} {'SIZE':>12} {'KIND':<11} {'PAGES':>8} {'THPS':>5} {'SWAP':>6} {'DIRTY':>6} {'WRITERS':>7}"
    rows = [
        f"{f['name']:<24} {f['ino']:>5} {f['size']:>12} {_kind(f).removeprefix('file '):<11} "
        f"{f['nrpages']:>8} {f['thps']:>5} {f['swap']:>6} {f['dirty']:>6} {f['open_for_write']:>7}"
        for f in files
    ]
    return ok(files, lines(header, *rows))


def register(sub: Any) -> None:
    group = sub.add_parser("file", help="files and the page cache (collapsed)")
    gsub = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)

    p = command(
        gsub,
        "create",
        "create a regular file (or a shmem file) of SIZE bytes, nothing cached yet",
        lambda a: [req(COLLAPSED, m.FileCreate, name=a.name, size=a.size, shmem=a.shmem, fs=a.fs)],
        _render_stat,
        "file create libfoo.so --size 4M",
    )
    p.add_argument("name", metavar="NAME", help="the file's name")
    p.add_argument("--size", type=size, required=True, metavar="SIZE", help="i_size in bytes")
    p.add_argument("--shmem", action="store_true", help="a shmem (tmpfs/memfd) file")
    p.add_argument(
        "--fs",
        choices=tuple(FsKind),
        default=DEFAULT_FS,
        help="a regular file's filesystem (ignored with --shmem): ro-thp (CONFIG_READ_ONLY_THP_FOR_FS: "
        "khugepaged and MADV_COLLAPSE build THPs) or large-folio (ext4 on 6.18: PMD-order folios from "
        "fault-time readahead in a VM_HUGEPAGE VMA and from 2 MiB writes, no collapse)",
    )

    p = command(
        gsub,
        "write",
        "write(2) LENGTH bytes at OFFSET: dirties the pages (and extends the file)",
        lambda a: [req(COLLAPSED, m.FileWrite, name=a.name, offset=a.offset, length=a.length)],
        _render_write,
        "file write libfoo.so 0 2M",
    )
    p.add_argument("name", metavar="NAME", help="the file's name")
    p.add_argument("offset", type=size, metavar="OFFSET", help="byte offset in the file")
    p.add_argument("length", type=size, metavar="LENGTH", help="bytes from the start")

    p = command(
        gsub,
        "sync",
        "start writeback of the file's dirty pages (they are clean once it completes)",
        lambda a: [req(COLLAPSED, m.FileSync, name=a.name)],
        _render_stat,
        "file sync libfoo.so",
    )
    p.add_argument("name", metavar="NAME", help="the file's name")

    p = command(
        gsub,
        "truncate",
        "truncate(2) to SIZE: unmaps and drops pages past the new end",
        lambda a: [req(COLLAPSED, m.FileTruncate, name=a.name, size=a.size)],
        _render_stat,
        "file truncate libfoo.so 1M",
    )
    p.add_argument("name", metavar="NAME", help="the file's name")
    p.add_argument("size", type=size, metavar="SIZE", help="the new i_size in bytes")

    p = command(
        gsub,
        "punch",
        "fallocate(PUNCH_HOLE) on [OFFSET, OFFSET+LENGTH): unmaps and drops the pages in it, splits a large folio it cuts",
        lambda a: [req(COLLAPSED, m.FilePunch, name=a.name, offset=a.offset, length=a.length)],
        _render_stat,
        "file punch libfoo.so 1M 64K",
    )
    p.add_argument("name", metavar="NAME", help="the file's name")
    p.add_argument("offset", type=size, metavar="OFFSET", help="byte offset in the file")
    p.add_argument("length", type=size, metavar="LENGTH", help="bytes from the start")

    command(
        gsub,
        "ls",
        "list files with their page-cache state",
        lambda a: [req(COLLAPSED, m.FileLs)],
        _render_ls,
        "file ls",
    )

    command(
        gsub,
        "drop-caches",
        "echo 1 > /proc/sys/vm/drop_caches: drop clean, unmapped page-cache pages",
        lambda a: [req(COLLAPSED, m.DropCaches)],
        lambda a, r: ok(r[0], lines(f"dropped_pages {r[0]['dropped_pages']}")),
        "file drop-caches",
    )
