"""Import a real process's file-backed and shmem mappings as a trace (``thpctl import procfs``).

Input: a live PID (``/proc/PID/maps``, ``/proc/PID/smaps`` and ``/proc/PID/mountinfo``) or a
directory holding saved copies named ``maps`` and/or ``smaps`` (and optionally ``mountinfo``).
Output: a :class:`~shared.sim.trace.Trace` that rebuilds the layout in the model, all at
``t_ms = 0``:

1. ``file_create`` per distinct backing object — one per (device, inode, path): two mappings of
   ``/dev/zero (deleted)`` with different inodes are two shared-memory objects. Its model name is
   the path's last component (`` (deleted)`` dropped), ``~2``, ``~3`` added when two objects share
   one; the header's ``meta.files`` maps each name back to path, device, inode. Its size is the
   largest ``offset + length`` any of its mappings reaches, in whole pages (the real size is not
   in /proc; a live import does not stat the file either, so saved copies import the same).
   Shmem (``shmem: true``) is anything on a tmpfs mount (by the device number, from
   ``mountinfo``) and, by name, ``/dev/shm/*``, ``/memfd:*``, ``/SYSV*``, ``/dev/zero (deleted)``
   (shared anonymous memory) and ``[anon_shmem:*]``.
2. ``spawn`` of the process (its own pid; ``pid=`` picks another; a directory named by a number
   gives that pid, any other directory pid 1).
3. ``mmap`` of every file/shmem VMA at its own address, length and file offset, with its
   permissions: ``r``, ``w``, ``x`` as ``prot`` (a mapping without ``r`` is mapped with it: the
   model has no write- or exec-only protection) and ``s``/``p`` as ``shared``. Then ``madvise``
   with the advice behind each madvise letter smaps' ``VmFlags`` shows (``hg`` hugepage, ``nh``
   nohugepage, ``rr`` random, ``sr`` sequential, ``dc`` dontfork, ``dd`` dontdump: shared.vm's
   ``VMFLAG_ADVICE``).
4. Residency: ``touch`` events that fault in as many pages as the VMA's ``Rss``, **from the start
   of the VMA** (``residency="start"``, the default) or spread evenly over it
   (``residency="spread"``). In a private writable VMA the ``Anonymous`` pages are written
   first (CoW copies, as the real process made them), the rest read. /proc does not say *which*
   pages are resident; "start" is the default because the model's fault-around maps the cached
   neighbours of every read fault, as the kernel does, so pages spread out would come back with
   up to 15 neighbours each, while contiguous pages come back with at most one fault-around
   window (``fault_around_bytes``, 64 KiB) more than the original Rss per VMA.

Skipped (counted in ``meta.skipped``): anonymous memory (``[heap]``, ``[stack]``, unnamed and
``[anon:*]``), special mappings (``[vdso]``, ``[vvar]``, ``[vsyscall]``, ``anon_inode:*``),
device mappings (``/dev/*`` files, ``VmFlags`` ``io``/``pf``), hugetlbfs (``ht``) and
``PROT_NONE`` (``---p``) guard mappings, which the model cannot map.

API: :func:`parse_maps`, :func:`parse_smaps`, :func:`parse_mountinfo`, :func:`read_procfs`
(→ :class:`Layout`), :func:`build_trace` (:class:`Layout` → :class:`Trace`),
:func:`import_procfs` (both), :func:`compare_rss` (a replayed world's smaps against the
original, VMA by VMA), :func:`main`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared.sim.trace import (
    MAX_NAME,
    PID_MAX,
    Trace,
    make_header,
    validate_event,
    write_trace,
)
from shared.units import PAGE_SIZE
from shared.vm import VMFLAG_ADVICE

KB = 1024
_HEADER = re.compile(
    r"^(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+) (?P<perms>[r-][w-][x-][sp]) (?P<offset>[0-9a-f]+) "
    r"(?P<major>[0-9a-f]+):(?P<minor>[0-9a-f]+) (?P<inode>\d+)"
)
_FIELD = re.compile(r"^(?P<key>[A-Za-z_][A-Za-z0-9_]*):\s*(?P<value>.*?)\s*$")
_KB_VALUE = re.compile(r"^(\d+) kB$")
# show_vma_header_prefix pads the line to this column (25 + sizeof(void *) * 6 - 1), then
# writes one space and the name.
_NAME_COLUMN = 72
_DELETED = " (deleted)"
TMPFS_TYPES = ("tmpfs", "shmem", "ramfs")
RESIDENCY = ("start", "spread")


class ProcfsError(ValueError):
    """Input that is not /proc maps/smaps text, or a process that cannot be read."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None):
        where = ":".join(str(p) for p in (source, line) if p is not None)
        super().__init__(f"{where}: {message}" if where else message)
        self.source = source
        self.line = line


@dataclasses.dataclass
class MapEntry:
    """One VMA as /proc prints it; ``fields`` holds smaps' numbers (kB), ``vmflags`` its flags."""

    start: int
    end: int
    perms: str
    offset: int
    major: int
    minor: int
    inode: int
    path: str
    deleted: bool = False
    fields: dict[str, int] = dataclasses.field(default_factory=dict)
    vmflags: tuple[str, ...] = ()
    line: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def dev(self) -> str:
        return f"{self.major:02x}:{self.minor:02x}"

    @property
    def rss_kb(self) -> int:
        return self.fields.get("Rss", 0)

    @property
    def anon_kb(self) -> int:
        return self.fields.get("Anonymous", 0)

    def layout_key(self) -> tuple[int, int, str, int, str, int]:
        return (self.start, self.end, self.perms, self.offset, self.path, self.inode)


def _name_of(line: str, prefix_end: int) -> str:
    """The name part of a maps line: the kernel pads to column 72, then writes a space and the
    name (which may itself start with or contain spaces). A copy whose padding was changed falls
    back to everything after the inode, left-stripped."""
    rest_start = prefix_end + 1  # the space show_vma_header_prefix writes after the inode
    if len(line) <= prefix_end or not line[prefix_end:].strip(" "):
        return ""
    name_start = max(_NAME_COLUMN, rest_start) + 1
    if len(line) > name_start and not line[prefix_end:name_start].strip(" "):
        return line[name_start:]
    return line[prefix_end:].lstrip(" ")


def _parse_header(line: str, lineno: int, source: str) -> MapEntry:
    m = _HEADER.match(line)
    if m is None:
        raise ProcfsError(f"not a maps line: {line[:80]!r}", source=source, line=lineno)
    start, end = int(m["start"], 16), int(m["end"], 16)
    if end <= start or start % PAGE_SIZE or end % PAGE_SIZE:
        raise ProcfsError(f"bad range {m['start']}-{m['end']}", source=source, line=lineno)
    if len(line) > m.end() and line[m.end()] != " ":
        raise ProcfsError(f"not a maps line: {line[:80]!r}", source=source, line=lineno)
    path = _name_of(line, m.end())
    deleted = path.endswith(_DELETED)
    if deleted:
        path = path[: -len(_DELETED)]
    return MapEntry(
        start, end, m["perms"], int(m["offset"], 16), int(m["major"], 16), int(m["minor"], 16),
        int(m["inode"]), path, deleted, line=lineno,
    )


def _lines(text: str) -> Iterable[tuple[int, str]]:
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if line.strip():
            yield lineno, line


def parse_maps(text: str, source: str = "maps") -> list[MapEntry]:
    """Parse /proc/PID/maps text.

    Raises:
        ProcfsError: a line that is not a maps line, naming it.
    """
    return [_parse_header(line, lineno, source) for lineno, line in _lines(text)]


def parse_smaps(text: str, source: str = "smaps") -> list[MapEntry]:
    """Parse /proc/PID/smaps text: header lines as in maps, each followed by ``Key: value``
    lines (``N kB`` values become ints in ``fields``; ``VmFlags`` becomes ``vmflags``).

    Raises:
        ProcfsError: a line that is neither, naming it.
    """
    out: list[MapEntry] = []
    for lineno, line in _lines(text):
        if _HEADER.match(line):
            out.append(_parse_header(line, lineno, source))
            continue
        f = _FIELD.match(line)
        if f is None:
            raise ProcfsError(f"not an smaps line: {line[:80]!r}", source=source, line=lineno)
        if not out:
            raise ProcfsError(f"field {f['key']!r} before any mapping", source=source, line=lineno)
        key, value = f["key"], f["value"]
        if key == "VmFlags":
            out[-1].vmflags = tuple(value.split())
            continue
        kb = _KB_VALUE.match(value)
        if kb:
            out[-1].fields[key] = int(kb.group(1))
        elif value.isdigit():
            out[-1].fields[key] = int(value)
        # anything else (a future text field) is kept out of the numbers
    return out


def parse_mountinfo(text: str) -> dict[tuple[int, int], str]:
    """``(major, minor) → filesystem type`` from /proc/PID/mountinfo text (bad lines ignored)."""
    out: dict[tuple[int, int], str] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        parts = left.split()
        if not sep or len(parts) < 3 or ":" not in parts[2]:
            continue
        major, _, minor = parts[2].partition(":")
        fstype = right.split(" ", 1)[0]
        if major.isdigit() and minor.isdigit() and fstype:
            out[(int(major), int(minor))] = fstype
    return out


def classify(e: MapEntry, fstypes: dict[tuple[int, int], str] | None = None) -> str:
    """``file``, ``shmem``, ``anon``, ``special``, ``device``, ``hugetlb`` or ``prot_none``."""
    p = e.path
    if not p:
        return "anon"
    if p.startswith(("[anon:", "[heap]", "[stack")):
        return "anon"
    if p.startswith("[") and not p.startswith("[anon_shmem:") or not p.startswith(("/", "[")):
        return "special"  # [vdso] [vvar] [vsyscall] [uprobes], anon_inode:...
    if "ht" in e.vmflags:
        return "hugetlb"
    if "io" in e.vmflags or "pf" in e.vmflags:
        return "device"
    if p.startswith(("[anon_shmem:", "/memfd:", "/SYSV", "/dev/shm/")) or (p == "/dev/zero" and e.deleted):
        kind = "shmem"
    elif p.startswith("/dev/"):
        return "device"
    elif fstypes and fstypes.get((e.major, e.minor)) in TMPFS_TYPES:
        kind = "shmem"
    else:
        kind = "file"
    if e.perms[:3] == "---":
        return "prot_none"
    return kind


@dataclasses.dataclass
class Layout:
    """What was read: the entries (smaps' when there was one, else maps'), the mount table's
    filesystem types, the pid, where it came from, and warnings."""

    entries: list[MapEntry]
    pid: int
    source: str
    fstypes: dict[tuple[int, int], str]
    has_smaps: bool
    warnings: list[str]
    comm: str | None = None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="surrogateescape")
    except FileNotFoundError:
        return None
    except ProcessLookupError:
        return None


def read_procfs(target: int | str | os.PathLike[str], pid: int | None = None) -> Layout:
    """Read a live process (an int, or a string of digits) or a directory of saved copies.

    Raises:
        ProcfsError: no such process or directory, neither ``maps`` nor ``smaps`` there, a
            permission problem, or text that does not parse.
    """
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        live = True
        default_pid = int(target)
        base = Path("/proc") / str(default_pid)
        if not base.is_dir():
            raise ProcfsError(f"no process {default_pid}")
    else:
        live = False
        base = Path(target)
        if not base.is_dir():
            raise ProcfsError(f"{base}: not a directory (give a PID or a directory holding 'maps'/'smaps')")
        default_pid = int(base.name) if base.name.isdigit() and 0 < int(base.name) < PID_MAX else 1
    try:
        maps_text = _read(base / "maps")
        smaps_text = _read(base / "smaps")
        mountinfo = _read(base / "mountinfo")
        comm = _read(base / "comm")
    except PermissionError as err:
        raise ProcfsError(f"{err.filename}: permission denied (reading another user's smaps needs ptrace access)") from None
    if maps_text is None and smaps_text is None:
        raise ProcfsError(f"{base}: neither 'maps' nor 'smaps' found" if not live else f"process {default_pid} is gone")
    warnings: list[str] = []
    smaps = parse_smaps(smaps_text, str(base / "smaps")) if smaps_text is not None else None
    maps = parse_maps(maps_text, str(base / "maps")) if maps_text is not None else None
    if smaps is not None and maps is not None:
        a = [e.layout_key() for e in maps]
        b = [e.layout_key() for e in smaps]
        if a != b:
            warnings.append(f"maps and smaps differ ({len(set(a) ^ set(b))} VMAs): the process changed "
                            "between the two reads or the copies were taken apart; using smaps")
    if smaps is None:
        warnings.append("no smaps: no residency (Rss) and no VmFlags (MADV_HUGEPAGE) imported")
    entries = smaps if smaps is not None else maps
    assert entries is not None
    chosen = default_pid if pid is None else pid
    if not 0 < chosen < PID_MAX:
        raise ProcfsError(f"pid {chosen} out of range 1..{PID_MAX - 1}")
    return Layout(entries, chosen, str(base), parse_mountinfo(mountinfo or ""), smaps is not None, warnings,
                  comm.strip() if comm else None)


def _prot(perms: str) -> str:
    w, x = perms[1] == "w", perms[2] == "x"
    return "r" + ("w" if w else "") + ("x" if x else "")


def model_name(path: str, taken: set[str]) -> str:
    base = path.rstrip("/").rsplit("/", 1)[-1] if path.startswith("/") else path.strip("[]")
    base = base.replace("/", "_").replace("\0", "_") or "file"
    base = base[: MAX_NAME - 8]
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}~{n}"
    taken.add(name)
    return name


def _touches(pid: int, e: MapEntry, residency: str) -> list[dict[str, Any]]:
    pages = e.length // PAGE_SIZE
    rss = min(e.rss_kb * KB // PAGE_SIZE, pages)
    if rss <= 0:
        return []
    writable_private = e.perms[1] == "w" and e.perms[3] == "p"
    anon = min(e.anon_kb * KB // PAGE_SIZE, rss) if writable_private else 0
    step = max(pages // rss, 1) if residency == "spread" else 1
    stride = step * PAGE_SIZE
    out = []
    if anon:
        out.append({"op": "touch", "pid": pid, "addr": e.start, "length": anon * stride, "write": True, "stride": stride})
    if rss > anon:
        out.append({"op": "touch", "pid": pid, "addr": e.start + anon * stride, "length": (rss - anon) * stride,
                        "write": False, "stride": stride})
    return out


def build_trace(layout: Layout, residency: str = "start") -> Trace:
    """The trace that rebuilds ``layout`` in the model (see the module docstring)."""
    if residency not in RESIDENCY:
        raise ValueError(f"residency must be one of {', '.join(RESIDENCY)}")
    kinds: list[tuple[MapEntry, str]] = [(e, classify(e, layout.fstypes)) for e in layout.entries]
    skipped: dict[str, int] = {}
    files: dict[tuple[int, int, int, str], dict[str, Any]] = {}
    taken: set[str] = set()
    kept: list[tuple[MapEntry, dict[str, Any]]] = []
    for e, kind in kinds:
        if kind not in ("file", "shmem"):
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        key = (e.major, e.minor, e.inode, e.path)
        f = files.get(key)
        if f is None:
            f = files[key] = {"name": model_name(e.path, taken), "path": e.path, "dev": e.dev, "inode": e.inode,
                              "shmem": kind == "shmem", "deleted": e.deleted, "size": 0}
        f["size"] = max(f["size"], e.offset + e.length)
        kept.append((e, f))
    pid = layout.pid
    raw: list[dict[str, Any]] = []
    for f in files.values():
        f["size"] = -(-f["size"] // PAGE_SIZE) * PAGE_SIZE
        raw.append({"op": "file_create", "name": f["name"], "size": f["size"], "shmem": f["shmem"]})
    raw.append({"op": "spawn", "pid": pid})
    for e, f in kept:
        raw.append({"op": "mmap", "pid": pid, "addr": e.start, "length": e.length, "name": f["name"], "offset": e.offset,
                        "prot": _prot(e.perms), "shared": e.perms[3] == "s"})
    for e, _ in kept:
        for flag, advice in VMFLAG_ADVICE.items():
            if flag in e.vmflags:
                raw.append({"op": "madvise", "pid": pid, "addr": e.start, "length": e.length, "advice": advice.value})
    for e, _ in kept:
        raw.extend(_touches(pid, e, residency))
    events = [validate_event({"t_ms": 0, **r}) for r in raw]
    meta = {
        "target": layout.source,
        "pid": pid,
        "comm": layout.comm,
        "residency": residency,
        "vmas": len(kept),
        "rss_kb": sum(e.rss_kb for e, _ in kept),
        "skipped": dict(sorted(skipped.items())),
        "files": {f["name"]: {k: v for k, v in f.items() if k != "name"} for f in files.values()},
        "warnings": layout.warnings,
    }
    header = make_header("procfs", clock="virtual", description=f"the file and shmem mappings of {layout.source}",
                         meta={k: v for k, v in meta.items() if v is not None})
    return Trace(header, events)


def import_procfs(target: int | str | os.PathLike[str], *, pid: int | None = None, residency: str = "start") -> Trace:
    """:func:`read_procfs` then :func:`build_trace`."""
    return build_trace(read_procfs(target, pid), residency)


def compare_rss(entries: Iterable[MapEntry], world_smaps: list[dict[str, Any]], fstypes: dict | None = None) -> list[dict[str, Any]]:
    """Line up the original file/shmem VMAs with a replayed world's smaps (of the same pid).

    The model merges adjacent VMAs the kernel kept apart for reasons it does not model (an
    anon_vma, flags it lacks), so VMAs are compared in groups: each world VMA with the original
    VMAs it covers. Returns one row per group: ``start``, ``end``, ``vmas`` (how many original
    VMAs), ``perms``, ``rss_kb`` (original), ``replayed_kb``, ``diff_kb``.
    """
    originals = [e for e in entries if classify(e, fstypes) in ("file", "shmem")]
    rows = []
    for w in world_smaps:
        inside = [e for e in originals if w["start"] <= e.start and e.end <= w["end"]]
        rss = sum(e.rss_kb for e in inside)
        rows.append({"start": w["start"], "end": w["end"], "vmas": len(inside), "perms": w["perms"],
                     "name": w["name"], "rss_kb": rss, "replayed_kb": w["Rss"], "diff_kb": w["Rss"] - rss})
    return rows


def main(argv: list[str] | None = None) -> int:
    """``thpctl import procfs PID|DIR [-o FILE] [--pid N] [--residency start|spread]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="thpctl import procfs",
                                 description="rebuild a process's file and shmem mappings as a trace")
    ap.add_argument("target", metavar="PID|DIR")
    ap.add_argument("-o", "--out", metavar="FILE", help="write the trace here (default: stdout)")
    ap.add_argument("--pid", type=int, help="the pid in the model (default: the process's own)")
    ap.add_argument("--residency", choices=RESIDENCY, default="start")
    args = ap.parse_args(argv)
    try:
        trace = import_procfs(args.target, pid=args.pid, residency=args.residency)
        write_trace(args.out or sys.stdout, trace.events, trace.header)
    except (ProcfsError, ValueError, OSError) as err:
        sys.stderr.write(f"thpctl import procfs: {err}\n")
        return 1
    meta = trace.header["meta"]
    for w in meta["warnings"]:
        sys.stderr.write(f"warning: {w}\n")
    sys.stderr.write(f"{meta['vmas']} VMAs of {len(meta['files'])} files, {meta['rss_kb']} kB resident; "
                     f"skipped {meta['skipped']}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
