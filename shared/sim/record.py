"""Record a real command's page faults and file mappings on this machine (``thpctl record -- CMD``).

Needs root, x86-64 and tracefs with the ``exceptions:page_fault_user`` and ``syscalls:*mmap``
tracepoints (Linux 6.x); :func:`unavailable` says why recording cannot work here.

How it works
------------

* **tracefs.** If nothing is mounted at ``/sys/kernel/tracing`` the recorder mounts tracefs there
  and unmounts it when done (only then). It creates an instance of its own,
  ``instances/thpsplit-record-<pid>-<random>``, never touching the global buffer or any other
  instance, and removes it when done, whatever happens (``try``/``finally``; if a tracee
  still holds it, it is killed first). In the instance: ``trace_clock=mono`` (the same clock
  as ``time.monotonic``), ``options/record-tgid`` (each line says its process),
  ``options/event-fork`` with the command's pid in ``set_event_pid`` (so its children and
  threads are traced, nobody else), and the events ``exceptions:page_fault_user``,
  ``syscalls:sys_enter_mmap``/``sys_exit_mmap``/``sys_enter_munmap``/``sys_enter_mprotect``/
  ``sys_enter_madvise``/``sys_enter_mremap``/``sys_exit_mremap`` and ``sched:sched_process_fork``/
  ``sched_process_exit``. A thread drains ``trace_pipe`` into a temporary file while the command
  runs, so the ring buffer (``buffer_kb`` per CPU) only has to absorb bursts; events the kernel
  still dropped are counted in ``meta.stats.lost_events``.
* **The command runs under ptrace** (the recorder is its tracer, following forks, vforks, clones
  and execs). That gives what tracepoints cannot:

  - *the layout an exec creates* (the binary, the dynamic loader, the vDSO, the stack are mapped
    by the kernel, not by mmap calls): at every exec the new image is stopped before its first
    instruction and its ``/proc/PID/smaps`` is read;
  - *which file each mmap maps* (a tracepoint has only the fd): a seccomp filter installed before
    the exec makes every ``mmap`` call stop the caller (``SECCOMP_RET_TRACE``, only for mmap)
    while the recorder reads ``/proc/TID/fd/FD`` (path, device, inode, size);
  - ``smaps`` once more when each process exits (for the statistics, and to name a mapping
    whose fd could not be read).

  The child stops itself (SIGSTOP) right after ``PTRACE_TRACEME``, the recorder sets its ptrace
  options and the tracing instance up, then the child installs the filter and execs: nothing
  the command does is missed. Costs: one stop per exec, exit and mmap call; job-control stops
  (SIGSTOP/SIGTSTP) are not kept; a command that uses ptrace itself (gdb, strace) cannot run.
* **Translation** (:func:`translate`, pure, unit-tested without root): the events are put in
  time order and replayed against a per-process map of file VMAs. An exec is ``spawn`` (``exit``
  and ``spawn`` if the pid already had an image) followed by an ``mmap`` per file or shmem VMA of
  the snapshot (and a ``madvise`` for each madvise letter of its VmFlags: ``hg`` hugepage, ``rr``
  random, ...); a fork that makes a process (not a
  thread) is ``fork``; an ``mmap`` call of a file is ``mmap`` at the address it returned (the
  model's mmap with an address replaces what was there, as MAP_FIXED); an anonymous mmap over a
  file mapping and ``munmap`` of one are ``munmap``; a successful ``mremap`` of one is
  ``mremap`` (old and new length, MREMAP_MAYMOVE/DONTUNMAP, and MREMAP_FIXED at the returned
  address where the kernel moved it), an anonymous mapping moved over one ``munmap``; ``madvise`` on one is
  ``madvise`` (every advice of shared.vm.Advice);
  ``mprotect`` is not modelled: a mapping gets the union of the protections it had (the model
  has no PROT_NONE, no mprotect); a user page fault (error code bit 1: write) inside a file
  mapping is ``fault`` at its page; a process's last thread exiting is ``exit`` (unless
  ``keep_alive``). Times are real milliseconds since the first exec (``clock: real``).
  Files are created at t=0, named and sized as :mod:`shared.sim.procfs_import` does (the size is
  the larger of the file's size and what its mappings reach, in pages).
* **Not captured**: anonymous memory (heap, stacks, anonymous mmaps) and its faults (counted),
  faults the kernel handles without a user fault (faults from the kernel's own accesses,
  e.g. read(2) into a buffer), accesses that hit pages already mapped (they cost no fault),
  file pages mapped by fault-around (no fault of their own), mappings whose file cannot be
  identified.

API: :func:`record` (→ :class:`RecordResult`), :func:`translate`, :func:`parse_trace_line`,
:func:`unavailable`, :func:`main`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import platform
import re
import secrets
import select
import signal
import struct
import sys
import tempfile
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, Self

from shared.sim.procfs_import import (
    MapEntry,
    classify,
    model_name,
    parse_mountinfo,
    parse_smaps,
)
from shared.sim.trace import Trace, make_header, validate_event, write_trace
from shared.units import PAGE_SIZE, TASK_SIZE
from shared.vm import VMFLAG_ADVICE, Advice

TRACEFS = Path("/sys/kernel/tracing")
INSTANCE_PREFIX = "thpsplit-record-"

REQUIRED_EVENTS = ("exceptions/page_fault_user", "syscalls/sys_enter_mmap", "syscalls/sys_exit_mmap",
                   "syscalls/sys_enter_munmap")
OPTIONAL_EVENTS = ("syscalls/sys_enter_mprotect", "syscalls/sys_enter_madvise", "syscalls/sys_enter_mremap",
                   "syscalls/sys_exit_mremap", "sched/sched_process_fork", "sched/sched_process_exit")

# ptrace
PTRACE_TRACEME, PTRACE_CONT, PTRACE_GETREGS = 0, 7, 12
PTRACE_SETOPTIONS, PTRACE_GETEVENTMSG = 0x4200, 0x4201
O_TRACEFORK, O_TRACEVFORK, O_TRACECLONE, O_TRACEEXEC, O_TRACEEXIT, O_TRACESECCOMP = 2, 4, 8, 0x10, 0x40, 0x80
O_EXITKILL = 0x100000
EV_FORK, EV_VFORK, EV_CLONE, EV_EXEC, EV_VFORK_DONE, EV_EXIT, EV_SECCOMP = 1, 2, 3, 4, 5, 6, 7
WALL = 0x40000000
# user_regs_struct (x86-64) indices
R10, R8 = 7, 9
# seccomp
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
AUDIT_ARCH_X86_64, NR_MMAP = 0xC000003E, 9
SECCOMP_RET_ALLOW, SECCOMP_RET_TRACE = 0x7FFF0000, 0x7FF00000
# mmap
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_ANONYMOUS = 0x01, 0x20
MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP = 1, 2, 4
MADVICE = {a.madv: a.value for a in Advice}


class RecordError(RuntimeError):
    """Recording cannot start or failed; the message says why."""


def unavailable(tracefs: Path = TRACEFS) -> str | None:
    """Why recording cannot work on this machine, or None if it can (as far as can be told
    without mounting anything)."""
    if platform.machine() != "x86_64":
        return f"recording needs x86-64 (page fault error codes, ptrace registers), not {platform.machine()}"
    if not sys.platform.startswith("linux"):
        return "recording needs Linux"
    if os.geteuid() != 0:
        return "recording needs root (tracefs, ptrace of the command, seccomp)"
    try:
        with open("/proc/filesystems") as f:
            if "tracefs" not in f.read():
                return "the kernel has no tracefs"
    except OSError as err:
        return f"cannot read /proc/filesystems: {err}"
    if not tracefs.is_dir():
        return f"{tracefs} does not exist"
    return None


# -- the raw trace ----------------------------------------------------------------------------

_LINE = re.compile(
    r"^\s*(?P<comm>.*?)-(?P<tid>\d+)\s+(?:\(\s*(?P<tgid>\d+|-+)\)\s+)?\[(?P<cpu>\d+)\]\s+"
    r"(?:(?P<flags>[^\s\[]+)\s+)?(?P<sec>\d+)\.(?P<usec>\d+):\s(?P<body>.*)$"
)
_SYSCALL = re.compile(r"^sys_(?P<name>\w+)\((?P<args>.*)\)$")
_SYSRET = re.compile(r"^sys_(?P<name>\w+) -> (?P<ret>-?(?:0x)?[0-9a-fA-F]+)$")
_ARG = re.compile(r"(\w+): (?:0x)?([0-9a-fA-F]+)")
_KV = re.compile(r"(\w+)=(\S+)")
_LOST = re.compile(r"^CPU:\d+ \[LOST (\d+) EVENTS\]")


@dataclasses.dataclass
class Raw:
    """One parsed trace line: ``ts_us`` (CLOCK_MONOTONIC µs), ``tid``, ``tgid`` (None if the
    line had none), ``kind`` (``fault``, ``enter``, ``exit``, ``fork``, ``pexit``, ``lost``,
    ``other``), ``name`` (the syscall or event), ``args``."""

    ts_us: int
    tid: int
    tgid: int | None
    kind: str
    name: str
    args: dict[str, Any]


def _num(text: str) -> int:
    return int(text, 16) if text.lower().startswith("0x") else int(text, 0 if text.startswith("0") and len(text) > 1 else 10)


def parse_trace_line(line: str) -> Raw | None:
    """Parse one line of an instance's ``trace``/``trace_pipe`` (default output options plus
    ``record-tgid``). Returns None for comments and blank lines; ``kind="other"`` for events
    this recorder does not use, ``kind="lost"`` for the ring buffer's ``[LOST N EVENTS]``."""
    line = line.rstrip("\n")
    if not line.strip() or line.startswith("#"):
        return None
    lost = _LOST.match(line)
    if lost:
        return Raw(0, 0, None, "lost", "lost", {"count": int(lost.group(1))})
    m = _LINE.match(line)
    if m is None:
        return Raw(0, 0, None, "other", "unparsed", {"line": line})
    usec = (m["usec"] + "000000")[:6]
    ts = int(m["sec"]) * 1_000_000 + int(usec)
    tid = int(m["tid"])
    tgid = int(m["tgid"]) if m["tgid"] and m["tgid"].isdigit() else None
    body = m["body"]
    if body.startswith("page_fault_user:"):
        kv = dict(_KV.findall(body))
        return Raw(ts, tid, tgid, "fault", "page_fault_user",
                   {"address": int(kv["address"], 16), "error_code": int(kv["error_code"], 16)})
    sc = _SYSCALL.match(body)
    if sc:
        # Syscall arguments are hex (6.x writes 0x for values >= 10; older kernels never did).
        return Raw(ts, tid, tgid, "enter", sc["name"], {k: int(v, 16) for k, v in _ARG.findall(sc["args"])})
    sr = _SYSRET.match(body)
    if sr:
        text = sr["ret"]
        ret = int(text, 16) if "0x" in text.lower() else int(text)
        if ret >= 1 << 63:
            ret -= 1 << 64
        return Raw(ts, tid, tgid, "exit", sr["name"], {"ret": ret})
    event, _, rest = body.partition(":")
    kv = dict(_KV.findall(rest))
    if event == "sched_process_fork" and "child_pid" in kv:
        return Raw(ts, tid, tgid, "fork", event, {"parent": int(kv["pid"]), "child": int(kv["child_pid"])})
    if event == "sched_process_exit" and "pid" in kv:
        return Raw(ts, tid, tgid, "pexit", event, {"pid": int(kv["pid"]), "group_dead": kv.get("group_dead") in ("true", "1")})
    return Raw(ts, tid, tgid, "other", event, {})


# -- what ptrace saw --------------------------------------------------------------------------

@dataclasses.dataclass
class Snapshot:
    """smaps of process ``pid`` at ``ts_us``: ``why`` is ``exec`` or ``exit``."""

    ts_us: int
    pid: int
    why: str
    entries: list[MapEntry]


@dataclasses.dataclass
class FdInfo:
    """The file behind an mmap call's fd, read while the caller was stopped (seccomp)."""

    ts_us: int
    tid: int
    fd: int
    path: str | None
    major: int = 0
    minor: int = 0
    inode: int = 0
    size: int = 0
    deleted: bool = False


# -- translation ------------------------------------------------------------------------------

@dataclasses.dataclass
class _Vma:
    start: int
    end: int
    key: tuple[int, int, int, str]
    offset: int  # file offset at ``start``
    event: dict[str, Any]  # the mmap event that made it (its prot may widen later)


class _Space:
    """A process's file VMAs, sorted and disjoint."""

    def __init__(self, vmas: list[_Vma] | None = None):
        self.vmas: list[_Vma] = vmas or []

    def copy(self) -> _Space:
        return _Space([dataclasses.replace(v) for v in self.vmas])

    def find(self, addr: int) -> _Vma | None:
        for v in self.vmas:
            if v.start <= addr < v.end:
                return v
        return None

    def overlapping(self, start: int, end: int) -> list[_Vma]:
        return [v for v in self.vmas if v.start < end and start < v.end]

    def remove(self, start: int, end: int) -> bool:
        """Take [start, end) out; True if any file VMA was there."""
        hit = False
        out = []
        for v in self.vmas:
            if v.end <= start or end <= v.start:
                out.append(v)
                continue
            hit = True
            if v.start < start:
                out.append(dataclasses.replace(v, end=start))
            if end < v.end:
                out.append(dataclasses.replace(v, start=end, offset=v.offset + (end - v.start)))
        self.vmas = sorted(out, key=lambda v: v.start)
        return hit

    def add(self, vma: _Vma) -> None:
        self.remove(vma.start, vma.end)
        self.vmas.append(vma)
        self.vmas.sort(key=lambda v: v.start)


def _prot_name(bits: int) -> str:
    return "r" + ("w" if bits & PROT_WRITE else "") + ("x" if bits & PROT_EXEC else "")


def _prot_bits(name: str) -> int:
    return PROT_READ | (PROT_WRITE if "w" in name else 0) | (PROT_EXEC if "x" in name else 0)


def _page_up(n: int) -> int:
    return -(-n // PAGE_SIZE) * PAGE_SIZE


class Translator:
    """Turns what was recorded into trace events (see the module docstring)."""

    def __init__(self, fstypes: dict[tuple[int, int], str] | None = None, keep_alive: bool = False):
        self.fstypes = fstypes or {}
        self.keep_alive = keep_alive
        self.events: list[tuple[int, dict[str, Any]]] = []
        self.files: dict[tuple[int, int, int, str], dict[str, Any]] = {}
        self._taken: set[str] = set()
        self.spaces: dict[int, _Space] = {}
        self.stats: dict[str, int] = defaultdict(int)
        self._fds: dict[int, deque[FdInfo]] = defaultdict(deque)
        self._pending: dict[int, dict[str, Any]] = {}
        self._pending_mremap: dict[int, dict[str, int]] = {}
        self._snapshots: dict[int, list[Snapshot]] = defaultdict(list)
        self.t0: int | None = None

    # -- files ------------------------------------------------------------------------------

    def _file(self, key: tuple[int, int, int, str], shmem: bool, deleted: bool, size: int = 0) -> dict[str, Any]:
        f = self.files.get(key)
        if f is None:
            major, minor, inode, path = key
            f = self.files[key] = {"name": model_name(path, self._taken), "path": path,
                                   "dev": f"{major:02x}:{minor:02x}", "inode": inode, "shmem": shmem,
                                   "deleted": deleted, "size": 0}
        f["size"] = max(f["size"], _page_up(size))
        return f

    def _entry_kind(self, e: MapEntry) -> str:
        return classify(e, self.fstypes)

    # -- emitting ---------------------------------------------------------------------------

    def _emit(self, ts: int, op: str, **fields: Any) -> dict[str, Any]:
        ev = {"op": op, **fields}
        self.events.append((ts, ev))
        self.stats[f"ev_{op}"] += 1
        return ev

    def _mmap(self, ts: int, pid: int, start: int, end: int, key: tuple[int, int, int, str], offset: int,
              prot: int, shared: bool) -> None:
        f = self.files[key]
        f["size"] = max(f["size"], _page_up(offset + (end - start)))
        ev = self._emit(ts, "mmap", pid=pid, addr=start, length=end - start, name=f["name"], offset=offset,
                        prot=_prot_name(prot), shared=shared)
        self.spaces[pid].add(_Vma(start, end, key, offset, ev))

    def _image(self, snap: Snapshot) -> None:
        pid = snap.pid
        if pid in self.spaces:
            self._emit(snap.ts_us, "exit", pid=pid)
        self._emit(snap.ts_us, "spawn", pid=pid)
        self.spaces[pid] = _Space()
        for e in snap.entries:
            kind = self._entry_kind(e)
            if kind not in ("file", "shmem"):
                self.stats[f"exec_skipped_{kind}"] += 1
                continue
            key = (e.major, e.minor, e.inode, e.path)
            self._file(key, kind == "shmem", e.deleted)
            self._mmap(snap.ts_us, pid, e.start, e.end, key, e.offset, _prot_bits(e.perms), e.perms[3] == "s")
            for flag, advice in VMFLAG_ADVICE.items():
                if flag in e.vmflags:
                    self._emit(snap.ts_us, "madvise", pid=pid, addr=e.start, length=e.end - e.start, advice=advice.value)

    def _resolve_late(self, pid: int, ts: int, addr: int, off: int) -> tuple[tuple[int, int, int, str], bool, bool] | None:
        """Name an mmap whose fd could not be read from a later smaps of the process."""
        for snap in self._snapshots.get(pid, ()):
            if snap.ts_us < ts:
                continue
            for e in snap.entries:
                if e.start <= addr < e.end and e.offset + (addr - e.start) == off:
                    kind = self._entry_kind(e)
                    if kind in ("file", "shmem"):
                        return (e.major, e.minor, e.inode, e.path), kind == "shmem", e.deleted
        return None

    # -- the event kinds --------------------------------------------------------------------

    def _tgid(self, r: Raw) -> int:
        return r.tgid if r.tgid is not None else self.tgid_of.get(r.tid, r.tid)

    def _syscall_enter(self, r: Raw, pid: int) -> None:
        a = r.args
        if r.name == "mmap":
            info = None
            fd = a.get("fd", 0) & 0xFFFFFFFF
            fd = fd - (1 << 32) if fd >= 1 << 31 else fd
            if not a.get("flags", 0) & MAP_ANONYMOUS and fd >= 0:
                queue = self._fds[r.tid]
                while queue and queue[0].fd != fd:
                    queue.popleft()
                    self.stats["fd_unpaired"] += 1
                info = queue.popleft() if queue else None
            self._pending[r.tid] = {**a, "fd": fd, "info": info}
            return
        if r.name == "mremap":
            self._pending_mremap[r.tid] = a  # its effect depends on the address it returns
            return
        space = self.spaces.get(pid)
        if space is None:
            return
        if r.name == "munmap":
            start = a.get("addr", 0)
            length = a.get("len", 0)
            end = min(start + _page_up(length), TASK_SIZE)
            if start % PAGE_SIZE or not length or start >= end:
                return
            if space.remove(start, end):
                self._emit(r.ts_us, "munmap", pid=pid, addr=start, length=end - start)
        elif r.name == "mprotect":
            start, end = a.get("start", 0), a.get("start", 0) + _page_up(a.get("len", 0))
            for v in space.overlapping(start, end):
                bits = _prot_bits(v.event["prot"]) | (a.get("prot", 0) & (PROT_READ | PROT_WRITE | PROT_EXEC))
                if _prot_name(bits) != v.event["prot"]:
                    v.event["prot"] = _prot_name(bits)
                    self.stats["prot_widened"] += 1
        elif r.name == "madvise":
            advice = MADVICE.get(a.get("behavior", -1))
            start = a.get("start", 0)
            end = start + _page_up(a.get("len_in", 0))
            if advice is None or start % PAGE_SIZE:
                return
            for v in space.overlapping(start, end):
                lo, hi = max(v.start, start), min(v.end, end)
                self._emit(r.ts_us, "madvise", pid=pid, addr=lo, length=hi - lo, advice=advice)

    def _mmap_exit(self, r: Raw, pid: int) -> None:
        call = self._pending.pop(r.tid, None)
        if call is None:
            return
        ret = r.args["ret"]
        space = self.spaces.get(pid)
        if ret < 0 or space is None or ret % PAGE_SIZE:
            return
        length = _page_up(call.get("len", 0))
        start, end = ret, min(ret + length, TASK_SIZE)
        if start >= end:
            return
        anon = call.get("flags", 0) & MAP_ANONYMOUS or call["fd"] < 0
        if anon:
            if space.remove(start, end):
                self._emit(r.ts_us, "munmap", pid=pid, addr=start, length=end - start)
            return
        prot = call.get("prot", 0) & (PROT_READ | PROT_WRITE | PROT_EXEC)
        off = call.get("off", 0)
        info: FdInfo | None = call["info"]
        key = shmem = deleted = None
        size = 0
        if info is not None and info.path is not None:
            key = (info.major, info.minor, info.inode, info.path)
            probe = MapEntry(0, PAGE_SIZE, "r--s", 0, info.major, info.minor, info.inode, info.path, info.deleted)
            kind = self._entry_kind(probe)
            if kind not in ("file", "shmem"):
                self.stats[f"mmap_skipped_{kind}"] += 1
                space.remove(start, end)
                return
            shmem, deleted, size = kind == "shmem", info.deleted, info.size
        else:
            late = self._resolve_late(pid, r.ts_us, start, off)
            if late is None:
                self.stats["mmap_unresolved"] += 1
                if space.remove(start, end):
                    self._emit(r.ts_us, "munmap", pid=pid, addr=start, length=end - start)
                return
            key, shmem, deleted = late
            self.stats["mmap_resolved_late"] += 1
        if not prot:
            self.stats["mmap_prot_none"] += 1
            if space.remove(start, end):
                self._emit(r.ts_us, "munmap", pid=pid, addr=start, length=end - start)
            return
        self._file(key, bool(shmem), bool(deleted), size)
        self._mmap(r.ts_us, pid, start, end, key, off, prot, bool(call.get("flags", 0) & MAP_SHARED))

    def _mremap_exit(self, r: Raw, pid: int) -> None:
        """A successful mremap of a file mapping is ``mremap`` with its own arguments; where the
        kernel moved it, MREMAP_FIXED at the address it returned (the model would choose its own
        place). A moved anonymous mapping replaces the file VMAs it lands on (``munmap``)."""
        a = self._pending_mremap.pop(r.tid, None)
        space = self.spaces.get(pid)
        ret = r.args["ret"]
        if a is None or space is None or ret < 0 or ret % PAGE_SIZE:
            return
        addr, flags = a.get("addr", 0), a.get("flags", 0)
        old_len, new_len = _page_up(a.get("old_len", 0)), _page_up(a.get("new_len", 0))
        if addr % PAGE_SIZE or not new_len or addr + old_len > TASK_SIZE or ret + new_len > TASK_SIZE:
            return
        dontunmap = bool(flags & MREMAP_DONTUNMAP)
        pieces = [(max(v.start, addr), min(v.end, addr + old_len), v) for v in space.overlapping(addr, addr + old_len)]
        if old_len == 0 and (v0 := space.find(addr)) is not None:
            pieces = [(addr, addr, v0)]  # a second mapping of a shared one
        if not pieces:
            if ret != addr and space.remove(ret, ret + new_len):
                self._emit(r.ts_us, "munmap", pid=pid, addr=ret, length=new_len)
            return
        self.stats["mremap_of_file_mapping"] += 1
        moved = ret != addr
        self._emit(r.ts_us, "mremap", pid=pid, addr=addr, old_length=old_len, new_length=new_len,
                   to=ret if moved else None, maymove=bool(flags & (MREMAP_MAYMOVE | MREMAP_FIXED)) or moved,
                   dontunmap=dontunmap)
        if not moved:
            if new_len < old_len:
                space.remove(addr + new_len, addr + old_len)
            elif new_len > old_len:
                lo, hi, v = pieces[-1]
                self._grow_file(v, hi, addr + new_len)
                space.add(_Vma(hi, addr + new_len, v.key, v.offset + (hi - v.start), v.event))
            return
        if not dontunmap and old_len:
            space.remove(addr, addr + old_len)
        space.remove(ret, ret + new_len)
        for i, (lo, hi, v) in enumerate(pieces):
            start = ret + (lo - addr)
            end = ret + new_len if i == len(pieces) - 1 and new_len > old_len else min(ret + (hi - addr), ret + new_len)
            if start < end:
                self._grow_file(v, lo, lo + (end - start))
                space.add(_Vma(start, end, v.key, v.offset + (lo - v.start), v.event))

    def _grow_file(self, v: _Vma, start: int, end: int) -> None:
        """A file is as large as what its mappings reach (as procfs_import sizes it)."""
        f = self.files[v.key]
        f["size"] = max(f["size"], _page_up(v.offset + (end - v.start)))

    def _fault(self, r: Raw, pid: int) -> None:
        self.stats["faults"] += 1
        space = self.spaces.get(pid)
        if space is None:
            self.stats["faults_before_exec"] += 1
            return
        addr = r.args["address"]
        if space.find(addr) is None:
            self.stats["faults_elsewhere"] += 1
            return
        self.stats["faults_in_file_mappings"] += 1
        self._emit(r.ts_us, "fault", pid=pid, addr=addr & ~(PAGE_SIZE - 1), write=bool(r.args["error_code"] & 2))

    def _fork(self, r: Raw) -> None:
        parent = self._tgid(r)
        child = r.args["child"]
        if self.tgid_of.get(child, child) != child:
            return  # a thread
        if parent not in self.spaces:
            return
        if child in self.spaces:
            self._emit(r.ts_us, "exit", pid=child)
        self._emit(r.ts_us, "fork", pid=parent, child=child)
        self.spaces[child] = self.spaces[parent].copy()

    def _exit(self, r: Raw) -> None:
        if not r.args["group_dead"]:
            return
        pid = self._tgid(r)
        if pid in self.spaces:
            self.exits.append((r.ts_us, pid))
            if not self.keep_alive:
                self._emit(r.ts_us, "exit", pid=pid)
            del self.spaces[pid]

    # -- the whole ------------------------------------------------------------------------------

    def run(self, raws: Iterable[Raw], snapshots: Iterable[Snapshot], fds: Iterable[FdInfo],
            tgid_of: dict[int, int] | None = None) -> list[dict[str, Any]]:
        self.tgid_of = dict(tgid_of or {})
        self.exits: list[tuple[int, int]] = []
        snaps = sorted(snapshots, key=lambda s: s.ts_us)
        for s in snaps:
            self._snapshots[s.pid].append(s)
        execs = [s for s in snaps if s.why == "exec"]
        if not execs:
            raise RecordError("no exec was seen: nothing to translate")
        self.t0 = execs[0].ts_us
        timeline: list[tuple[int, int, int, Any]] = []
        for i, s in enumerate(execs):
            timeline.append((s.ts_us, 0, i, s))
        for i, f in enumerate(sorted(fds, key=lambda f: f.ts_us)):
            timeline.append((f.ts_us, 1, i, f))
        for i, r in enumerate(raws):
            if r.kind == "lost":
                self.stats["lost_events"] += r.args["count"]
                continue
            if r.kind == "other":
                self.stats["lines_other"] += 1
                continue
            if r.tgid is not None:
                self.tgid_of.setdefault(r.tid, r.tgid)
            timeline.append((r.ts_us, 2, i, r))
        timeline.sort(key=lambda x: x[:3])
        for ts, _, _, item in timeline:
            if isinstance(item, Snapshot):
                self._image(item)
            elif isinstance(item, FdInfo):
                self._fds[item.tid].append(item)
            elif item.kind == "fault":
                self._fault(item, self._tgid(item))
            elif item.kind == "enter":
                self._syscall_enter(item, self._tgid(item))
            elif item.kind == "exit" and item.name == "mmap":
                self._mmap_exit(item, self._tgid(item))
            elif item.kind == "exit" and item.name == "mremap":
                self._mremap_exit(item, self._tgid(item))
            elif item.kind == "fork":
                self._fork(item)
            elif item.kind == "pexit":
                self._exit(item)
        return self.finish()

    def finish(self) -> list[dict[str, Any]]:
        assert self.t0 is not None
        out = []
        for f in self.files.values():
            out.append({"t_ms": 0, "op": "file_create", "name": f["name"], "size": max(f["size"], PAGE_SIZE),
                        "shmem": f["shmem"]})
        for ts, ev in self.events:
            t_ms = max(ts - self.t0, 0) / 1000
            out.append(validate_event({"t_ms": t_ms, **ev}))
        return out


def translate(raws: Iterable[Raw], snapshots: Iterable[Snapshot], fds: Iterable[FdInfo] = (),
              tgid_of: dict[int, int] | None = None, fstypes: dict[tuple[int, int], str] | None = None,
              keep_alive: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, int]]:
    """What was recorded → ``(events, files, stats)``: trace events (files first, then in time
    order), the files (model name → path, dev, inode, shmem, size) and counts of what was
    translated and skipped."""
    t = Translator(fstypes, keep_alive)
    events = t.run(raws, snapshots, fds, tgid_of)
    files = {f["name"]: {k: v for k, v in f.items() if k != "name"} for f in t.files.values()}
    return events, files, dict(sorted(t.stats.items()))


# -- the machinery --------------------------------------------------------------------------

def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    libc.prctl.restype = ctypes.c_int
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _seccomp_program() -> tuple[_SockFprog, Any]:
    """BPF: x86-64 mmap → SECCOMP_RET_TRACE, everything else allowed."""
    ins = [
        (0x20, 0, 0, 4),  # ld [arch]
        (0x15, 1, 0, AUDIT_ARCH_X86_64),  # arch ok: skip the next
        (0x06, 0, 0, SECCOMP_RET_ALLOW),
        (0x20, 0, 0, 0),  # ld [nr]
        (0x15, 0, 1, NR_MMAP),
        (0x06, 0, 0, SECCOMP_RET_TRACE),
        (0x06, 0, 0, SECCOMP_RET_ALLOW),
    ]
    code = b"".join(struct.pack("=HBBI", *i) for i in ins)
    buf = ctypes.create_string_buffer(code, len(code))
    return _SockFprog(len(ins), ctypes.cast(buf, ctypes.c_void_p)), buf


def _ptrace(libc: Any, req: int, pid: int, addr: int = 0, data: int | Any = 0) -> int:
    ret = libc.ptrace(req, pid, ctypes.c_void_p(addr), data if isinstance(data, ctypes.c_void_p) else ctypes.c_void_p(data))
    if ret == -1:
        err = ctypes.get_errno()
        if err:
            raise OSError(err, f"ptrace({req}, {pid}): {os.strerror(err)}")
    return ret


def _now_us() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _tracefs_mounted(path: Path) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1:3] == [str(path), "tracefs"] for line in f if len(line.split()) > 2)
    except OSError:
        return False


class _Instance:
    """A tracefs instance of our own: created on enter, removed on exit (and tracefs unmounted
    if we mounted it)."""

    def __init__(self, libc: Any, tracefs: Path, buffer_kb: int):
        self.libc = libc
        self.tracefs = tracefs
        self.buffer_kb = buffer_kb
        self.mounted = False
        self.path: Path | None = None
        self.warnings: list[str] = []

    def __enter__(self) -> Self:
        try:
            if not _tracefs_mounted(self.tracefs):
                if self.libc.mount(b"nodev", str(self.tracefs).encode(), b"tracefs", 0, None) != 0:
                    err = ctypes.get_errno()
                    raise RecordError(f"mount -t tracefs {self.tracefs}: {os.strerror(err)}")
                self.mounted = True
            name = f"{INSTANCE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            path = self.tracefs / "instances" / name
            try:
                path.mkdir()
            except OSError as err:
                raise RecordError(f"cannot create tracing instance {path}: {err.strerror}") from None
            self.path = path
            self.write("tracing_on", "0")
            self.write("buffer_size_kb", str(self.buffer_kb))
            self.write("trace_clock", "mono")
            self.write("options/record-tgid", "1")
            self.write("options/event-fork", "1")
            for ev in REQUIRED_EVENTS:
                if not (path / "events" / ev).is_dir():
                    raise RecordError(f"this kernel has no {ev.replace('/', ':')} tracepoint")
            for ev in OPTIONAL_EVENTS:
                if not (path / "events" / ev).is_dir():
                    self.warnings.append(f"no {ev.replace('/', ':')} tracepoint: not recorded")
            return self
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def write(self, rel: str, text: str) -> None:
        assert self.path is not None
        try:
            with open(self.path / rel, "w") as f:
                f.write(text)
        except OSError as err:
            raise RecordError(f"writing {text!r} to {self.path / rel}: {err.strerror}") from None

    def start(self, pid: int) -> None:
        assert self.path is not None
        self.write("set_event_pid", str(pid))
        for ev in REQUIRED_EVENTS + OPTIONAL_EVENTS:
            if (self.path / "events" / ev).is_dir():
                self.write(f"events/{ev}/enable", "1")
        self.write("tracing_on", "1")

    def lost(self) -> int:
        n = 0
        if self.path is None:
            return 0
        for stats in sorted((self.path / "per_cpu").glob("cpu*/stats")):
            try:
                for line in stats.read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key.strip() in ("overrun", "dropped events"):
                        n += int(value.strip() or 0)
            except (OSError, ValueError):
                continue
        return n

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            try:
                with open(self.path / "tracing_on", "w") as f:
                    f.write("0")
            except OSError:
                pass
            for attempt in range(50):
                try:
                    self.path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02 * (attempt + 1))
            else:
                self.warnings.append(f"could not remove {self.path}")
            self.path = None
        if self.mounted:
            if self.libc.umount2(str(self.tracefs).encode(), 0) != 0:
                self.warnings.append(f"could not unmount {self.tracefs}: {os.strerror(ctypes.get_errno())}")
            self.mounted = False


class _Drain(threading.Thread):
    """Copies an instance's trace_pipe into a file until told to stop and the pipe is empty."""

    def __init__(self, pipe: Path, out: IO[bytes]):
        super().__init__(name="thpsplit-trace-pipe", daemon=True)
        self.fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
        self.out = out
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                stopping = self.stop.is_set()
                try:
                    chunk = os.read(self.fd, 1 << 16)
                except BlockingIOError:
                    chunk = b""
                if chunk:
                    self.out.write(chunk)
                    continue
                if stopping:
                    return
                select.select([self.fd], [], [], 0.05)
        except BaseException as err:  # noqa: BLE001 (reported by the caller)
            self.error = err

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=30)
        os.close(self.fd)


@dataclasses.dataclass
class RecordResult:
    """``trace`` (header + events), the command's ``exit_status`` (negative: killed by that
    signal), ``stats`` (what was recorded, translated and skipped), ``warnings``."""

    trace: Trace
    exit_status: int
    stats: dict[str, Any]
    warnings: list[str]


class _Tracer:
    """Runs the command under ptrace and collects exec/exit snapshots and mmap fds."""

    def __init__(self, libc: Any):
        self.libc = libc
        self.snapshots: list[Snapshot] = []
        self.fds: list[FdInfo] = []
        self.tgid_of: dict[int, int] = {}
        self.fstypes: dict[tuple[int, int], str] = {}
        self.tracees: set[int] = set()
        self.started: set[int] = set()
        self.exit_status: int | None = None
        self.root = 0
        self.stops = 0

    def snapshot(self, pid: int, why: str) -> None:
        ts = _now_us()
        try:
            text = Path(f"/proc/{pid}/smaps").read_text(errors="surrogateescape")
        except OSError:
            return
        entries = parse_smaps(text, f"/proc/{pid}/smaps")
        self.snapshots.append(Snapshot(ts, pid, why, entries))
        if not self.fstypes:
            try:
                self.fstypes = parse_mountinfo(Path(f"/proc/{pid}/mountinfo").read_text())
            except OSError:
                pass

    def fd_info(self, tid: int) -> None:
        ts = _now_us()
        regs = (ctypes.c_ulonglong * 27)()
        try:
            _ptrace(self.libc, PTRACE_GETREGS, tid, 0, ctypes.cast(regs, ctypes.c_void_p))
        except OSError:
            return
        fd = regs[R8] & 0xFFFFFFFF
        fd = fd - (1 << 32) if fd >= 1 << 31 else fd
        if regs[R10] & MAP_ANONYMOUS or fd < 0:
            return
        link = f"/proc/{tid}/fd/{fd}"
        try:
            path = os.readlink(link)
            st = os.stat(link)
        except OSError:
            self.fds.append(FdInfo(ts, tid, fd, None))
            return
        deleted = path.endswith(" (deleted)")
        if deleted:
            path = path[: -len(" (deleted)")]
        self.fds.append(FdInfo(ts, tid, fd, path, os.major(st.st_dev), os.minor(st.st_dev), st.st_ino,
                               st.st_size, deleted))

    def _tgid(self, pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return pid

    def handle(self, pid: int, status: int) -> None:
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self.tracees.discard(pid)
            if pid == self.root:
                self.exit_status = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
            return
        if not os.WIFSTOPPED(status):
            return
        self.stops += 1
        sig = os.WSTOPSIG(status)
        event = status >> 16
        deliver = 0
        if sig == signal.SIGTRAP and event:
            if event in (EV_FORK, EV_VFORK, EV_CLONE):
                msg = ctypes.c_ulong()
                _ptrace(self.libc, PTRACE_GETEVENTMSG, pid, 0, ctypes.cast(ctypes.pointer(msg), ctypes.c_void_p))
                child = msg.value
                self.tracees.add(child)
                self.tgid_of[child] = child if event != EV_CLONE else self._tgid(child)
            elif event == EV_EXEC:
                self.snapshot(pid, "exec")
            elif event == EV_EXIT:
                if self.tgid_of.get(pid, pid) == pid:
                    self.snapshot(pid, "exit")
            elif event == EV_SECCOMP:
                self.fd_info(pid)
        elif sig == signal.SIGSTOP and pid not in self.started:
            pass  # a new tracee's first stop
        else:
            deliver = sig
        self.started.add(pid)
        try:
            _ptrace(self.libc, PTRACE_CONT, pid, 0, deliver)
        except OSError:
            pass  # it died meanwhile (SIGKILL): its exit comes next

    def loop(self, deadline: float | None) -> None:
        idle = 0
        killed = False
        while self.tracees:
            if deadline is not None and not killed and time.monotonic() > deadline:
                for pid in list(self.tracees):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                killed = True
            progressed = False
            for pid in list(self.tracees):
                try:
                    wpid, status = os.waitpid(pid, os.WNOHANG | WALL)
                except ChildProcessError:
                    self.tracees.discard(pid)
                    continue
                if wpid:
                    progressed = True
                    self.handle(pid, status)
            if progressed:
                idle = 0
            else:
                idle += 1
                time.sleep(min(0.0001 * idle, 0.005))

    def kill_all(self) -> None:
        for pid in list(self.tracees):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                self.tracees.discard(pid)
        end = time.monotonic() + 5
        while self.tracees and time.monotonic() < end:
            for pid in list(self.tracees):
                try:
                    wpid, status = os.waitpid(pid, os.WNOHANG | WALL)
                except ChildProcessError:
                    self.tracees.discard(pid)
                    continue
                if wpid and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                    self.handle(pid, status)
            time.sleep(0.01)


def _spawn(libc: Any, argv: list[str], env: dict[str, str] | None, cwd: str | None, stdout: int | None,
           stderr: int | None) -> tuple[int, int]:
    """Fork the command: it asks to be traced, stops itself, then (once resumed) installs the
    mmap seccomp filter and execs. Returns (pid, read end of the status pipe)."""
    prog, keep = _seccomp_program()
    r, w = os.pipe2(os.O_CLOEXEC)
    env_list = dict(os.environ if env is None else env)
    pid = os.fork()
    if pid == 0:  # the child: nothing here may raise past os._exit
        try:
            os.close(r)
            if cwd is not None:
                os.chdir(cwd)
            if stdout is not None:
                os.dup2(stdout, 1)
            if stderr is not None:
                os.dup2(stderr, 2)
            if libc.ptrace(PTRACE_TRACEME, 0, None, None) != 0:
                os.write(w, b"P")
                os._exit(127)
            os.kill(os.getpid(), signal.SIGSTOP)
            ok = libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) == 0
            os.write(w, b"S" if ok else b"s")
            os.execvpe(argv[0], argv, env_list)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.write(w, b"E%d" % (err.errno or 0))
        except BaseException:  # noqa: BLE001, S110 (the forked child may only _exit)
            pass
        os._exit(127)
    os.close(w)
    del keep
    return pid, r


def record(argv: list[str], *, tracefs: str | os.PathLike[str] = TRACEFS, buffer_kb: int = 8192,
           timeout_s: float | None = None, keep_alive: bool = False, env: dict[str, str] | None = None,
           cwd: str | None = None, stdout: int | None = None, stderr: int | None = None) -> RecordResult:
    """Run ``argv`` and record its page faults and file mappings (see the module docstring).

    ``timeout_s``: kill the command (SIGKILL) after that long. ``keep_alive``: leave out the
    exits, so a replay ends with every process still mapped (the state an experiment measures).
    ``stdout``/``stderr``: file descriptors for the command (default: inherited).

    Raises:
        RecordError: recording is not possible here (:func:`unavailable`), the command cannot be
            started, or tracing failed.
    """
    if not argv:
        raise RecordError("no command to record")
    reason = unavailable(Path(tracefs))
    if reason:
        raise RecordError(reason)
    libc = _libc()
    tracer = _Tracer(libc)
    status_pipe = None
    spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally below)
    instance = _Instance(libc, Path(tracefs), buffer_kb)
    drain: _Drain | None = None
    warnings: list[str] = []
    seccomp = False
    lost = 0
    try:
        with instance:
            assert instance.path is not None
            pid, status_pipe = _spawn(libc, argv, env, cwd, stdout, stderr)
            tracer.root = pid
            tracer.tracees.add(pid)
            tracer.tgid_of[pid] = pid
            try:
                _, status = os.waitpid(pid, WALL)
                if not os.WIFSTOPPED(status):
                    code = os.read(status_pipe, 64)
                    raise RecordError("the command could not be traced (PTRACE_TRACEME failed)" if code == b"P"
                                      else f"the command ended before it started (status {status})")
                _ptrace(libc, PTRACE_SETOPTIONS, pid, 0, O_TRACEFORK | O_TRACEVFORK | O_TRACECLONE | O_TRACEEXEC
                        | O_TRACEEXIT | O_TRACESECCOMP | O_EXITKILL)
                drain = _Drain(instance.path / "trace_pipe", spool)
                drain.start()
                instance.start(pid)
                tracer.started.add(pid)
                _ptrace(libc, PTRACE_CONT, pid, 0, 0)
                tracer.loop(None if timeout_s is None else time.monotonic() + timeout_s)
            finally:
                if tracer.tracees:
                    tracer.kill_all()
                if drain is not None:
                    try:
                        instance.write("tracing_on", "0")
                    finally:
                        drain.finish()
                lost = instance.lost()
            code = b""
            while chunk := os.read(status_pipe, 64):
                code += chunk
            seccomp = code.startswith(b"S")
            if b"E" in code:
                errno = int(code.split(b"E", 1)[1] or 0)
                raise RecordError(f"{argv[0]}: {os.strerror(errno)}")
        warnings += instance.warnings
        if drain is not None and drain.error is not None:
            raise RecordError(f"reading trace_pipe: {drain.error}")
        if not seccomp:
            warnings.append("the seccomp filter could not be installed: mmap'd files are named from smaps at exit")
        spool.seek(0)
        raws = (r for r in (parse_trace_line(line.decode("utf-8", "replace")) for line in spool) if r is not None)
        events, files, stats = translate(raws, tracer.snapshots, tracer.fds, tracer.tgid_of, tracer.fstypes,
                                         keep_alive)
    finally:
        spool.close()
        if status_pipe is not None:
            os.close(status_pipe)
        warnings += [w for w in instance.warnings if w not in warnings]
    stats = {**stats, "lost_events": stats.get("lost_events", 0) + lost, "ptrace_stops": tracer.stops,
             "snapshots": len(tracer.snapshots), "mmap_fds": len(tracer.fds)}
    if stats["lost_events"]:
        warnings.append(f"{stats['lost_events']} trace events were lost (raise buffer_kb)")
    exit_status = tracer.exit_status if tracer.exit_status is not None else -signal.SIGKILL
    header = make_header(
        "record", clock="real",
        description=f"page faults and file mappings of: {' '.join(argv)}"[:1000],
        meta={"command": argv, "exit_status": exit_status, "keep_alive": keep_alive, "seccomp": seccomp,
              "files": files, "stats": stats, "warnings": warnings},
    )
    return RecordResult(Trace(header, events), exit_status, stats, warnings)


def main(argv: list[str] | None = None) -> int:
    """``thpctl record [-o FILE] [--timeout S] [--keep-alive] [--buffer-kb N] -- CMD ...``."""
    import argparse

    ap = argparse.ArgumentParser(prog="thpctl record", description="record a command's page faults as a trace (root)")
    ap.add_argument("-o", "--out", metavar="FILE", default="thpsplit-record.jsonl")
    ap.add_argument("--timeout", type=float, metavar="SECONDS")
    ap.add_argument("--keep-alive", action="store_true", help="leave the exits out of the trace")
    ap.add_argument("--buffer-kb", type=int, default=8192, metavar="KB", help="ring buffer per CPU")
    ap.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command (thpctl record -- CMD ...)")
    try:
        result = record(command, timeout_s=args.timeout, keep_alive=args.keep_alive, buffer_kb=args.buffer_kb)
        write_trace(args.out, result.trace.events, result.trace.header)
    except (RecordError, OSError) as err:
        sys.stderr.write(f"thpctl record: {err}\n")
        return 1
    for w in result.warnings:
        sys.stderr.write(f"warning: {w}\n")
    s = result.stats
    sys.stderr.write(f"{args.out}: {len(result.trace.events)} events; {s.get('faults', 0)} user faults, "
                     f"{s.get('faults_in_file_mappings', 0)} in file mappings; command exit status {result.exit_status}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
