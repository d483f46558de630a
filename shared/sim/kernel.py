"""The real kernel as a backend of the differential conformance harness (issue 9).

A *scenario* is a list of steps in the ``thpctl run`` line syntax (a subset: files, processes,
mmap/munmap/madvise/mprotect/mremap/mlock/munlock, fault/touch, truncate/punch/write, and
``sysfs set`` / ``wait-scans`` for khugepaged).
:class:`KernelBackend` performs them on the running Linux kernel, one step at a time, and
:meth:`KernelBackend.observe` reads back what the model reports too: per process and per VMA the
``/proc/PID/smaps`` fields, and ``/proc/vmstat`` deltas.

How it is built (plain synchronous Python: os, socket, subprocess, ctypes; nothing from the
model):

* **Files** live in a private tmpfs the backend mounts itself,
  ``mount -t tmpfs -o huge=advise,size=... tmpfs DIR`` (:data:`DEFAULT_HUGE`). For a tmpfs mount
  the ``huge=`` option is the policy ``shmem_huge_global_enabled()`` applies (the sysfs
  ``shmem_enabled`` only governs the internal shm_mnt behind memfd/SysV/anon shared memory), so
  no global knob has to change: ``huge=advise`` is the model's ``shmem_enabled=advise``
  (a PMD-order folio at fault time only in a VM_HUGEPAGE VMA), ``huge=never`` its ``never``
  (fault-time THP off, MADV_COLLAPSE still allowed: ``shmem_huge_force``).
  A regular file (``file create NAME --fs large-folio``) lives on ext4: at the first one the
  backend makes a sparse image inside that tmpfs, ``mkfs.ext4`` and ``mount -o loop`` it under
  the root (its loop device's ``read_ahead_kb`` set to the model's 128), and unmounts it in
  :meth:`KernelBackend.close` (autoclear detaches the loop device); :func:`ext4_unavailable`
  says where that cannot work. A ``ro-thp`` file has no kernel here
  (CONFIG_READ_ONLY_THP_FOR_FS is off).
* **Processes.** Each model PID is a real worker process running a command loop on a
  ``SOCK_SEQPACKET`` socket (pickled requests and replies). Workers descend from a *zygote*, a
  fresh ``python -I -S`` running this file, so they carry nothing of the caller (no threads, no
  pytest). ``proc spawn`` asks the zygote to fork; ``proc fork P C`` asks P's worker to
  ``os.fork()`` (so C really is P's child: dup_mmap, CoW, page tables copied where the kernel
  copies them), and the new worker's socket comes back over SCM_RIGHTS. ``proc exit`` ends the
  worker; the backend waits for the socket's EOF, which the kernel delivers from
  ``exit_files()``, after ``exit_mm()`` tore the address space down.
* **One CPU.** The zygote, so every worker, is pinned to one CPU (:attr:`KernelBackend.cpu`, the
  lowest the caller may run on), and the caller's own file I/O (``file write``/``truncate``/
  ``punch``) runs pinned to it too. A folio just added to the page cache or faulted in waits in
  its CPU's ``lru_add`` folio_batch (up to 31) before it reaches the LRU; MADV_PAGEOUT drains only
  the local CPU's batch (``madvise_pageout`` -> ``lru_add_drain``), and
  ``madvise_cold_or_pageout_pte_range`` leaves mapped a folio ``folio_isolate_lru`` cannot take.
  Unpinned, a ``file write`` on one CPU and a pageout on the other left up to 30 pages mapped that
  the model (one batch, drained at that madvise) unmaps, as often as not; on one CPU the drain
  takes them all, every time (seen with /proc/kpageflags' KPF_LRU).
* **Accesses** (``fault``/``touch``) are real CPU loads and stores. A small x86-64 probe
  (``mov cl,[r8]`` for a read, ``lock add byte [r8],0`` for a write: a write fault that keeps
  the data) and a SIGSEGV/SIGBUS handler, both machine code in an executable page made by the
  zygote, turn a signal at the probe's instruction into a return value: the handler writes the
  signal number into RAX and moves RIP to the probe's final ``ret`` (a signal anywhere else
  resets the handler to SIG_DFL and lets the worker die as it should). So sigsegv and sigbus are what the
  CPU and the kernel really decided, not a prediction from /proc/PID/maps and the file size, and
  no access goes through GUP (``/proc/self/mem`` would FOLL_FORCE-write read-only mappings).
  Per access, ``getrusage(RUSAGE_THREAD)`` minor/major fault deltas (two raw syscalls in the
  probe right before and after the access, so only the access's own faults count) and, when a
  fault happened, the ``thp_file_mapped`` vmstat event (did this fault map a PMD: do_set_pmd)
  tell ``hit`` / ``minor`` / ``major`` / ``pmd`` apart. hit/minor/major are exact; ``pmd`` reads
  a system-wide counter (exact on a quiet machine). ``sigsegv`` / ``sigbus`` are exact.
* **Fixed addresses.** ``mmap PID ADDR`` means MAP_FIXED in the model. The worker first tries
  MAP_FIXED_NOREPLACE; on EEXIST it reads its own maps and uses MAP_FIXED only if every mapping
  in the way is one of the backend's tmpfs files, else the step fails with EEXIST (the worker
  never maps over the interpreter).

Outcomes (:meth:`KernelBackend.step`) are dicts with ``"result"``: ``0`` or an errno name for
syscalls (``mmap`` and ``mremap`` add ``"addr"``), one of ``hit minor major pmd sigsegv sigbus``
for ``fault``, a ``{outcome: count}`` dict for ``touch`` (as the model's), and pids for process
steps. :func:`coarse` folds ``hit/minor/major/pmd`` into ``ok`` for exact comparison.

What compares exactly with the model (checked over ~1600 random sequences on 6.18): return
codes; per VMA start/end, Rss, Anonymous, ShmemPmdMapped, FilePmdMapped, Locked, VmFlags
(hg/nh), THPeligible; per file the page-cache page count (mincore); the vmstat deltas
thp_file_alloc, thp_file_mapped, thp_collapse_alloc, thp_split_pmd, nr_shmem_hugepages,
nr_shmem_pmdmapped (machine-wide: exact only while nothing else on the machine makes THPs, hence
the flock). Per-access sigsegv/sigbus exactly; hit/minor/major exactly; pmd on a quiet machine.
Not comparable: addresses of ``mmap auto`` (the model's MMAP_BASE is not the kernel's),
Pss/Referenced/Shared_* (the model does not report them), page-sized vmstat counters.

khugepaged: it only scans mms registered with it (a VMA khugepaged_enter_vma finds eligible; on
6.18 a *first* MADV_HUGEPAGE on a shmem VMA does not register its mm, a second one does: the
check reads the VMA's old flags). With some mm registered it sleeps
``khugepaged/scan_sleep_millisecs`` between passes (10 s by default); with none it sleeps until
the first registration and then scans at once, racing the scenario's next steps.
:func:`quiet_khugepaged` registers a sentinel mm, sets the sleep to a day through a
:class:`SysfsGuard` and waits until the one pass that write triggers is over (khugepaged asleep in
its wait again); see its docstring. :meth:`KernelBackend.observe` reports
``khugepaged/full_scans`` and ``pages_collapsed`` deltas so a harness can tell if it ran anyway.

With a guard (``KernelBackend(guard=...)``) a scenario may also ``sysfs set`` the khugepaged
limits (:data:`SCENARIO_KNOBS`; put back by :meth:`KernelBackend.reset`) and ``wait-scans N``:
``scan_sleep_millisecs`` at 1 ms until ``full_scans`` has grown by N, then back to its quiet value
(waiting for the pass that write starts). At 1 ms khugepaged scans every registered mm on the
machine, so machine-wide counters may move for others' reasons during that step.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import json
import os
import pickle
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any, Self

PAGE_SIZE = 4096
HPAGE_PMD_SIZE = 2 << 20

THP = "/sys/kernel/mm/transparent_hugepage"
LOCK_PATH = "/tmp/thpsplit-kernel-backend.lock"
# The THP knobs' values from before the lock's holder changed them, written before each first
# change: a holder killed before it restored them (SIGKILL, a SIGTERM'd pytest) leaves this file,
# and the next holder of the lock writes them back.
KNOB_JOURNAL = LOCK_PATH + ".knobs"
DEFAULT_HUGE = "advise"

# vmstat fields the backend reports (deltas since the backend started or was reset). The thp_*
# events are per-cpu event counters summed on read (exact); nr_*_hugepages/pmdmapped are node
# stats in THP units that move by HPAGE_PMD_NR pages, more than any per-cpu threshold, so they
# are folded into the global value at once (exact too). Page-sized node stats (nr_shmem,
# nr_file_pages, ...) are not: their per-cpu diffs fold up to a second later, so they are left out.
VMSTAT_PREFIXES = ("thp_",)
VMSTAT_FIELDS = (
    "nr_shmem_hugepages",
    "nr_shmem_pmdmapped",
    "nr_file_hugepages",
    "nr_file_pmdmapped",
    "nr_anon_transparent_hugepages",
)

SMAPS_KB_FIELDS = (
    "Size",
    "Rss",
    "Pss",
    "Shared_Clean",
    "Shared_Dirty",
    "Private_Clean",
    "Private_Dirty",
    "Referenced",
    "Anonymous",
    "AnonHugePages",
    "ShmemPmdMapped",
    "FilePmdMapped",
    "Swap",
    "SwapPss",
    "Locked",
)

# ---------------------------------------------------------------------------------------------
# Sizes and the scenario language
# ---------------------------------------------------------------------------------------------

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_NUMBER = re.compile(r"^(0[xX][0-9a-fA-F]+|[0-9]+)([KkMmGgTt]?)(?:[iI]?[bB])?$")


def parse_size(text: str) -> int:
    """``4096``, ``0x1000``, ``2M``, ``1G``, ``64KiB`` → bytes (as shared.units.parse_size)."""
    m = _NUMBER.match(str(text).strip())
    if not m:
        raise ValueError(f"not a size: {text!r} (use decimal, 0x-hex, with an optional K/M/G suffix)")
    return int(m.group(1), 0) * _SUFFIX[m.group(2).upper()]


PROTS = {"none": 0, "r": 1, "rw": 3, "rx": 5, "rwx": 7, "w": 2, "x": 4, "wx": 6}

# madvise advice names → MADV_* values: shared.vm's table. The worker runs this file alone
# (``python -I -S kernel.py --zygote``, the standard library only) and is sent the numbers.
if __name__ != "__main__":
    from shared.vm import MADV as ADVICE

# Filesystem kinds of a regular file (``file create --fs``), as shared.vm.FsKind: ``ro-thp`` is
# CONFIG_READ_ONLY_THP_FOR_FS (khugepaged builds THPs of read-only mapped files; no kernel here
# has it), ``large-folio`` a filesystem with large folios (ext4 on 6.18): the backend puts such a
# file on an ext4 image it makes and loop-mounts itself.
FS_KINDS = ("ro-thp", "large-folio")
DEFAULT_FS = "ro-thp"

# The knobs a scenario may set with ``sysfs set`` (through the backend's SysfsGuard; reset to the
# session's values by :meth:`KernelBackend.reset`). scan_sleep_millisecs belongs to ``wait-scans``.
SCENARIO_KNOBS = (
    "khugepaged/max_ptes_none",
    "khugepaged/max_ptes_swap",
    "khugepaged/max_ptes_shared",
    "khugepaged/pages_to_scan",
)

# op → (positional argument kinds, {flag: kind or None for a boolean}). Kinds: "name", "pid",
# "size", "addr" (a size or "auto"), "prot", "advice", "knob", "int", "seconds".
_GRAMMAR: dict[str, tuple[tuple[str, ...], dict[str, str | None]]] = {
    "file create": (("name",), {"--size": "size", "--shmem": None, "--fs": "fs"}),
    "file write": (("name", "size", "size"), {}),
    "file truncate": (("name", "size"), {}),
    "file punch": (("name", "size", "size"), {}),
    "proc spawn": (("pid",), {}),
    "proc fork": (("pid", "pid"), {}),
    "proc exit": (("pid",), {}),
    "mmap": (
        ("pid", "addr", "size"),
        {"--file": "name", "--offset": "size", "--prot": "prot", "--shared": None, "--private": None, "--reopen": None},
    ),
    "munmap": (("pid", "size", "size"), {}),
    "madvise": (("pid", "size", "size", "advice"), {}),
    "mprotect": (("pid", "size", "size", "prot"), {}),
    "mlock": (("pid", "size", "size"), {"--onfault": None}),
    "munlock": (("pid", "size", "size"), {}),
    "mremap": (("pid", "size", "size", "size"), {"--to": "size", "--maymove": None, "--dontunmap": None}),
    "fault": (("pid", "size"), {"--write": None}),
    "touch": (("pid", "size", "size"), {"--write": None, "--stride": "size"}),
    "sysfs set": (("knob", "int"), {}),
    "wait-scans": (("int",), {"--timeout": "seconds"}),
}

# Positional names per op, in order, as Step.args keys.
_NAMES: dict[str, tuple[str, ...]] = {
    "file create": ("name",),
    "file write": ("name", "offset", "length"),
    "file truncate": ("name", "size"),
    "file punch": ("name", "offset", "length"),
    "proc spawn": ("pid",),
    "proc fork": ("pid", "child"),
    "proc exit": ("pid",),
    "mmap": ("pid", "addr", "length"),
    "munmap": ("pid", "addr", "length"),
    "madvise": ("pid", "addr", "length", "advice"),
    "mprotect": ("pid", "addr", "length", "prot"),
    "mlock": ("pid", "addr", "length"),
    "munlock": ("pid", "addr", "length"),
    "mremap": ("pid", "addr", "old_length", "new_length"),
    "fault": ("pid", "addr"),
    "touch": ("pid", "addr", "length"),
    "sysfs set": ("knob", "value"),
    "wait-scans": ("n",),
}


class ScenarioError(ValueError):
    """A line the scenario language does not accept."""


@dataclasses.dataclass(frozen=True)
class Step:
    """One parsed line: ``op`` is e.g. ``"madvise"`` or ``"file create"``; ``args`` its values."""

    op: str
    args: dict[str, Any]

    def line(self) -> str:
        """The step back in ``thpctl run`` syntax (hex addresses)."""
        return format_step(self)


def _convert(kind: str, text: str) -> Any:
    if kind == "name":
        if not re.fullmatch(r"[A-Za-z0-9._+-]+", text) or text in (".", ".."):
            raise ScenarioError(f"bad file name {text!r}")
        return text
    if kind == "pid":
        if not text.isdigit():
            raise ScenarioError(f"bad pid {text!r}")
        return int(text)
    if kind == "addr" and text == "auto":
        return None
    if kind in ("size", "addr"):
        try:
            return parse_size(text)
        except ValueError as err:
            raise ScenarioError(str(err)) from None
    if kind == "prot":
        if text not in PROTS:
            raise ScenarioError(f"prot must be one of {', '.join(PROTS)}")
        return text
    if kind == "advice":
        if text not in ADVICE:
            raise ScenarioError(f"unknown advice {text!r}")
        return text
    if kind == "fs":
        if text not in FS_KINDS:
            raise ScenarioError(f"--fs must be one of {', '.join(FS_KINDS)}")
        return text
    if kind == "knob":
        if text not in SCENARIO_KNOBS:
            raise ScenarioError(f"sysfs set: a scenario may set only {', '.join(SCENARIO_KNOBS)}")
        return text
    if kind == "int":
        if not text.isdigit():
            raise ScenarioError(f"not a non-negative integer: {text!r}")
        return int(text)
    if kind == "seconds":
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 < value < 3600:
            raise ScenarioError(f"not a timeout in seconds: {text!r}")
        return value
    raise AssertionError(kind)


def parse_step(line: str) -> Step | None:
    """Parse one line; ``None`` for a blank or comment line.

    Raises:
        ScenarioError: a line outside the subset, with the reason.
    """
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as err:
        raise ScenarioError(str(err)) from None
    if not tokens:
        return None
    if tokens[0] in ("file", "proc", "sysfs"):
        if len(tokens) < 2:
            raise ScenarioError(f"{tokens[0]} needs a subcommand")
        op, rest = f"{tokens[0]} {tokens[1]}", tokens[2:]
    else:
        op, rest = tokens[0], tokens[1:]
    if op not in _GRAMMAR:
        raise ScenarioError(f"unsupported step {op!r}")
    kinds, flags = _GRAMMAR[op]
    positional: list[str] = []
    args: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("--"):
            key, _, inline = tok.partition("=")
            if key not in flags:
                raise ScenarioError(f"{op}: unknown flag {key}")
            kind = flags[key]
            name = key[2:]
            if kind is None:
                if inline:
                    raise ScenarioError(f"{op}: {key} takes no value")
                args[name] = True
            else:
                if not inline:
                    i += 1
                    if i >= len(rest):
                        raise ScenarioError(f"{op}: {key} needs a value")
                    inline = rest[i]
                args[name] = _convert(kind, inline)
        else:
            positional.append(tok)
        i += 1
    if len(positional) != len(kinds):
        raise ScenarioError(f"{op}: expected {len(kinds)} arguments, got {len(positional)}")
    for name, kind, text in zip(_NAMES[op], kinds, positional):
        args[name] = _convert(kind, text)
    # Defaults, as thpctl's.
    if op == "file create":
        if "size" not in args:
            raise ScenarioError("file create needs --size")
        args.setdefault("shmem", False)
        if args["shmem"] and "fs" in args:
            raise ScenarioError("file create: --fs is for regular files, not --shmem")
        if not args["shmem"]:
            args.setdefault("fs", DEFAULT_FS)
    elif op == "mmap":
        if "file" not in args:
            raise ScenarioError("mmap needs --file")
        if args.get("shared") and args.get("private"):
            raise ScenarioError("mmap: --shared and --private exclude each other")
        args["shared"] = not args.pop("private", False)
        args.setdefault("offset", 0)
        args.setdefault("prot", "r")
        args.setdefault("reopen", False)
    elif op in ("fault", "touch"):
        args.setdefault("write", False)
        if op == "touch":
            args.setdefault("stride", PAGE_SIZE)
    elif op == "mlock":
        args.setdefault("onfault", False)
    elif op == "mremap":
        args.setdefault("to", None)
        args.setdefault("maymove", False)
        args.setdefault("dontunmap", False)
    elif op == "wait-scans":
        args.setdefault("timeout", 10.0)
    return Step(op, args)


def parse_scenario(text: str | list[str]) -> list[Step]:
    """Every step of ``text`` (a string of lines, or a list of lines)."""
    lines = text.splitlines() if isinstance(text, str) else list(text)
    steps = []
    for n, line in enumerate(lines, 1):
        try:
            step = parse_step(line)
        except ScenarioError as err:
            raise ScenarioError(f"line {n}: {err}") from None
        if step is not None:
            steps.append(step)
    return steps


def _hex(v: int) -> str:
    return f"{v:#x}"


def _sz(v: int) -> str:
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if v and v % unit == 0:
            return f"{v // unit}{suffix}"
    return str(v)


def format_step(step: Step) -> str:
    a, op = step.args, step.op
    if op == "file create":
        s = f"file create {a['name']} --size {_sz(a['size'])}"
        if a["shmem"]:
            return s + " --shmem"
        return s + (f" --fs {a['fs']}" if a["fs"] != DEFAULT_FS else "")
    if op in ("file write", "file punch"):
        return f"{op} {a['name']} {_sz(a['offset'])} {_sz(a['length'])}"
    if op == "file truncate":
        return f"file truncate {a['name']} {_sz(a['size'])}"
    if op == "proc fork":
        return f"proc fork {a['pid']} {a['child']}"
    if op in ("proc spawn", "proc exit"):
        return f"{op} {a['pid']}"
    if op == "mmap":
        addr = "auto" if a["addr"] is None else _hex(a["addr"])
        s = f"mmap {a['pid']} {addr} {_sz(a['length'])} --file {a['file']}"
        if a["offset"]:
            s += f" --offset {_sz(a['offset'])}"
        s += f" --prot {a['prot']} " + ("--shared" if a["shared"] else "--private")
        return s + (" --reopen" if a.get("reopen") else "")
    if op in ("munmap", "munlock"):
        return f"{op} {a['pid']} {_hex(a['addr'])} {_sz(a['length'])}"
    if op == "mlock":
        return f"mlock {a['pid']} {_hex(a['addr'])} {_sz(a['length'])}" + (" --onfault" if a["onfault"] else "")
    if op == "madvise":
        return f"madvise {a['pid']} {_hex(a['addr'])} {_sz(a['length'])} {a['advice']}"
    if op == "mprotect":
        return f"mprotect {a['pid']} {_hex(a['addr'])} {_sz(a['length'])} {a['prot']}"
    if op == "mremap":
        s = f"mremap {a['pid']} {_hex(a['addr'])} {_sz(a['old_length'])} {_sz(a['new_length'])}"
        if a["to"] is not None:
            s += f" --to {_hex(a['to'])}"
        return s + (" --maymove" if a["maymove"] else "") + (" --dontunmap" if a["dontunmap"] else "")
    if op == "fault":
        return f"fault {a['pid']} {_hex(a['addr'])}" + (" --write" if a["write"] else "")
    if op == "touch":
        s = f"touch {a['pid']} {_hex(a['addr'])} {_sz(a['length'])}"
        if a["write"]:
            s += " --write"
        if a["stride"] != PAGE_SIZE:
            s += f" --stride {_sz(a['stride'])}"
        return s
    if op == "sysfs set":
        return f"sysfs set {a['knob']} {a['value']}"
    if op == "wait-scans":
        return f"wait-scans {a['n']}" + (f" --timeout {a['timeout']:g}" if a["timeout"] != 10.0 else "")
    raise AssertionError(op)


def coarse(outcome: Any) -> Any:
    """An outcome with ``hit/minor/major/pmd`` folded into ``ok`` (what is exactly comparable)."""
    if isinstance(outcome, dict) and "result" in outcome:
        return {**outcome, "result": coarse(outcome["result"])}
    if isinstance(outcome, str) and outcome in ("hit", "minor", "major", "pmd"):
        return "ok"
    if isinstance(outcome, dict):
        out: Counter[str] = Counter()
        for k, v in outcome.items():
            out[coarse(k) if isinstance(k, str) else k] += v
        return dict(out)
    return outcome


# ---------------------------------------------------------------------------------------------
# sysfs knobs
# ---------------------------------------------------------------------------------------------


def thp_available() -> str | None:
    """``None`` when the backend can run here, else the reason it cannot (one line)."""
    if sys.platform != "linux":
        return "not Linux"
    if os.uname().machine != "x86_64":
        return f"the access probe is x86-64 machine code; this is {os.uname().machine}"
    if os.geteuid() != 0:
        return "needs root (mount -t tmpfs, sysfs knobs)"
    if not os.path.isdir(THP):
        return f"no {THP}: kernel without transparent huge pages"
    return None


EXT4_IMAGE = ".ext4.img"
EXT4_DIR = "ext4"


def ext4_unavailable() -> str | None:
    """``None`` when the backend can loop-mount an ext4 image for ``--fs large-folio`` files,
    else why not (one line)."""
    reason = thp_available()
    if reason:
        return reason
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"no {tool} in PATH (an ext4 image for --fs large-folio files)"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control: no loop devices for an ext4 image"
    with open("/proc/filesystems") as f:
        if not any(line.split()[-1] == "ext4" for line in f if line.strip()):
            return "the kernel has no ext4 (not in /proc/filesystems)"
    return None


class _MachineLock:
    """One flock on :data:`LOCK_PATH` per process, re-entrant within it (flock locks belong to
    an open file description, so a second open in the same process would wait for itself).
    Held by every :class:`KernelBackend` and :class:`SysfsGuard`: vmstat deltas and the THP
    knobs are machine-wide, and a concurrent run (the test suite and a harness run, say) would
    see each other's THPs or wake khugepaged by restoring a knob."""

    fd: int | None = None
    depth = 0

    @classmethod
    def acquire(cls, timeout: float) -> None:
        if cls.depth == 0:
            fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        os.close(fd)
                        raise BackendError(f"another kernel backend or knob guard holds {LOCK_PATH}") from None
                    time.sleep(0.05)
            cls.fd = fd
            _recover_machine()
        cls.depth += 1

    @classmethod
    def release(cls) -> None:
        cls.depth -= 1
        if cls.depth == 0 and cls.fd is not None:
            _retire_journal()
            os.close(cls.fd)  # releases the flock
            cls.fd = None


def _journal() -> dict[str, str]:
    try:
        with open(KNOB_JOURNAL) as f:
            saved = json.load(f)
    except FileNotFoundError:
        return {}
    except ValueError:
        return {}  # torn by a crash mid-write: os.replace makes that the previous, complete one
    return {str(k): str(v) for k, v in saved.items()} if isinstance(saved, dict) else {}


def _journal_add(name: str, value: str) -> None:
    """Record a knob's value before its first change under this lock (the lock is held)."""
    saved = _journal()
    if name in saved:
        return
    saved[name] = value
    tmp = KNOB_JOURNAL + ".tmp"
    with open(tmp, "w") as f:
        json.dump(saved, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, KNOB_JOURNAL)


def _retire_journal() -> None:
    """At the outermost release: the journal goes once every knob in it reads its old value
    again; one that does not (a restore that failed) is left for the next holder."""
    saved = _journal()
    if all(_read_or_none(name) == value for name, value in saved.items()):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(KNOB_JOURNAL)


def _read_or_none(name: str) -> str | None:
    try:
        return read_knob(name)
    except OSError:
        return None


def _recover_machine() -> None:
    """What a dead holder of the lock left (said on stderr): its knobs, from the journal, and
    its tmpfs mounts (a backend holds the lock while its tmpfs is mounted, so any left now is a
    dead one's)."""
    _recover_knobs()
    tmp = tempfile.gettempdir()
    with open("/proc/mounts") as f:
        stale = [line.split()[1] for line in f]
    for point in stale:
        if os.path.dirname(point) == tmp and os.path.basename(point).startswith("thpsplit-kernel-"):
            if subprocess.run(["umount", "-l", point], capture_output=True, check=False).returncode == 0:
                with contextlib.suppress(OSError):
                    shutil.rmtree(point)
                print(f"kernel backend: unmounted {point}, left by a run that died", file=sys.stderr)


def _recover_knobs() -> None:
    """A journal at acquire time is a dead holder's: write its knobs back."""
    saved = _journal()
    for name, value in saved.items():
        if _read_or_none(name) != value:
            try:
                SysfsGuard._write(name, value)
            except (OSError, RuntimeError) as err:
                print(f"kernel backend: could not put back {name}={value}: {err}", file=sys.stderr)
                continue
            print(f"kernel backend: put back {name}={value}, left changed by a run that died", file=sys.stderr)
    _retire_journal()


def swap_active() -> bool:
    """Whether a swap device is in use (a line under /proc/swaps' header): reclaim of dirty
    shmem depends on it (shmem_writeout's !total_swap_pages)."""
    with open("/proc/swaps") as fh:
        return len(fh.read().strip().splitlines()) > 1


def read_knob(name: str) -> str:
    """A knob's current value: the bracketed choice for choice knobs, else the text."""
    with open(os.path.join(THP, name)) as f:
        text = f.read().strip()
    m = re.search(r"\[([^\]]+)\]", text)
    return m.group(1) if m else text


class SysfsGuard:
    """Changes /sys/kernel/mm/transparent_hugepage knobs and puts every one back.

    ``set(name, value)`` remembers a knob's value the first time it changes it, writes, and
    verifies the write. Leaving the ``with`` block (normally or by an exception) writes back
    every saved value in reverse order and reads each back; a knob that does not come back
    raises :class:`RuntimeError` (chained to the block's own exception, if any), after every
    other knob was tried.
    """

    def __init__(self, lock_timeout: float = 300.0) -> None:
        self.saved: dict[str, str] = {}
        self.cleanups: list[Any] = []  # run after the knobs are restored
        self.lock_timeout = lock_timeout
        self._locked = False

    def __enter__(self) -> Self:
        _MachineLock.acquire(self.lock_timeout)
        self._locked = True
        return self

    def set(self, name: str, value: Any) -> None:
        value = str(value)
        if name not in self.saved:
            self.saved[name] = read_knob(name)
            _journal_add(name, self.saved[name])
        self._write(name, value)

    @staticmethod
    def _write(name: str, value: str) -> None:
        path = os.path.join(THP, name)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
        now = read_knob(name)
        if now != value:
            raise RuntimeError(f"{path}: wrote {value!r}, reads {now!r}")

    def restore(self) -> None:
        failures = []
        for name, value in reversed(list(self.saved.items())):
            try:
                self._write(name, value)
            except (OSError, RuntimeError) as err:
                failures.append(f"{name}: {err}")
        while self.cleanups:
            self.cleanups.pop()()
        if failures:
            raise RuntimeError("sysfs knobs not restored: " + "; ".join(failures))
        self.saved.clear()

    def __exit__(self, *exc: object) -> None:
        try:
            self.restore()
        finally:
            if self._locked:
                self._locked = False
                _MachineLock.release()


QUIET_SCAN_SLEEP_MS = 24 * 3600 * 1000
FAST_SCAN_SLEEP_MS = 1
SCAN_SETTLE_S = 0.05


def _khugepaged_pid() -> int | None:
    """The khugepaged kernel thread's pid (None when THP is off and it does not run)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != "khugepaged":
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] == "2":  # a child of kthreadd
                    return int(entry)
        except OSError:
            continue
    return None


def _khugepaged_state(pid: int) -> tuple[int, bool]:
    """(voluntary context switches, sleeping in its own wait): the thread is in state S with
    khugepaged() itself, not a callee, at the top of its kernel stack (khugepaged_wait_work() is
    inlined there). Without a readable stack, state S alone."""
    with open(f"/proc/{pid}/status") as f:
        switches = next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
    with open(f"/proc/{pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    if state != "S":
        return switches, False
    try:
        with open(f"/proc/{pid}/stack") as f:
            top = f.readline()
    except OSError:
        return switches, True
    return switches, " khugepaged+" in top


def _wait_khugepaged_asleep(switches_before: int, deadline: float, pid: int | None) -> None:
    """After a ``scan_sleep_millisecs`` write (which wakes khugepaged): wait until khugepaged has
    slept again since ``switches_before`` and stays asleep in its wait for :data:`SCAN_SETTLE_S`.

    ``full_scans`` cannot tell: with other mms on khugepaged's list one wake-up scans
    ``pages_to_scan`` pages and need not finish a full scan before the long sleep starts.
    """
    if pid is None:
        return
    last: int | None = None
    since = 0.0
    while True:
        switches, waiting = _khugepaged_state(pid)
        now = time.monotonic()
        if switches > switches_before and waiting:
            if switches != last:
                last, since = switches, now
            elif now - since >= SCAN_SETTLE_S:
                return
        else:
            last = None
        if now > deadline:
            raise BackendError("khugepaged did not go back to sleep after the scan_sleep_millisecs write")
        time.sleep(0.002)


def set_scan_sleep(guard: SysfsGuard, ms: int, timeout: float = 10.0) -> None:
    """Write ``khugepaged/scan_sleep_millisecs`` through ``guard`` and wait for the pass the write
    starts to end (khugepaged asleep again)."""
    pid = _khugepaged_pid()
    before = _khugepaged_state(pid)[0] if pid is not None else 0
    guard.set("khugepaged/scan_sleep_millisecs", ms)
    _wait_khugepaged_asleep(before, time.monotonic() + timeout, pid)


class _Sentinel:
    """An anonymous MADV_HUGEPAGE region of the calling process, one anon THP faulted in: keeps
    an mm on khugepaged's list (see :func:`quiet_khugepaged`), with nothing to collapse."""

    def __init__(self) -> None:
        lib = _lib()
        size = 2 * HPAGE_PMD_SIZE
        addr = lib.mmap(None, size, 3, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if addr in (None, MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap for the khugepaged sentinel")
        self.addr, self.size = addr, size
        aligned = (addr + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1)
        if lib.madvise(aligned, HPAGE_PMD_SIZE, ADVICE["hugepage"]) != 0:
            self.close()
            raise OSError(ctypes.get_errno(), "MADV_HUGEPAGE for the khugepaged sentinel")
        # An anonymous VMA without an anon_vma is not khugepaged-eligible
        # (__thp_vma_allowable_orders), so MADV_HUGEPAGE alone registers nothing: fault it in.
        # The fault maps an anon THP (do_huge_pmd_anonymous_page, which also calls
        # khugepaged_enter_vma), so khugepaged's passes find nothing to collapse here.
        ctypes.memset(aligned, 0, 1)

    def close(self) -> None:
        if self.addr is not None:
            _lib().munmap(self.addr, self.size)
            self.addr = None


def quiet_khugepaged(guard: SysfsGuard, sleep_ms: int = QUIET_SCAN_SLEEP_MS, timeout: float = 10.0) -> None:
    """Keep khugepaged from running a pass for ``sleep_ms``; call before any worker exists.

    A long ``scan_sleep_millisecs`` is not enough by itself. khugepaged_wait_work() sleeps
    ``scan_sleep_millisecs`` only while khugepaged_has_work(); with no mm on its list it waits
    with no timeout for khugepaged_wait_event(), and __khugepaged_enter() wakes it the moment
    the first mm is added (MADV_HUGEPAGE): it would scan that scenario's mm at once, racing
    the next steps. So a *sentinel* mm (this process: an anonymous MADV_HUGEPAGE region with
    one anon THP faulted in, 2 MiB) is registered first; the sysfs write then wakes khugepaged for one pass (over the
    sentinel, and whatever else on the machine is registered), this waits until that pass is over
    (khugepaged asleep in its wait again: see :func:`set_scan_sleep`), and from then on
    khugepaged sleeps ``sleep_ms``: later registrations find the list non-empty and do not wake
    it, and khugepaged_should_wakeup() stays false. The sentinel lives until the guard exits
    (after the knobs are restored).
    """
    sentinel = _Sentinel()
    guard.cleanups.append(sentinel.close)
    set_scan_sleep(guard, sleep_ms, timeout)


# ---------------------------------------------------------------------------------------------
# Reading /proc
# ---------------------------------------------------------------------------------------------


def read_vmstat() -> dict[str, int]:
    out = {}
    with open("/proc/vmstat") as f:
        for line in f:
            name, _, value = line.partition(" ")
            if name.startswith(VMSTAT_PREFIXES) or name in VMSTAT_FIELDS:
                out[name] = int(value)
    return out


def read_khugepaged() -> dict[str, int]:
    return {n: int(read_knob(f"khugepaged/{n}")) for n in ("full_scans", "pages_collapsed")}


_HEX_DIGITS = frozenset("0123456789abcdef")
_SMAPS_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) \S+ \d+\s*(.*)$")


def parse_smaps(text: str, under: str | None = None) -> list[dict[str, Any]]:
    """Parse smaps text; keep only VMAs whose path is inside ``under`` (when given). Each entry:
    start, end, perms, offset, path, name (basename), the kB fields, THPeligible, VmFlags (a
    string, as the model's), hg/nh booleans."""
    out: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    lines = text.splitlines()
    if under is not None:
        # Keep only the blocks of VMAs under ``under`` before parsing: a worker's smaps is mostly
        # the interpreter's hundreds of VMAs. A header starts with a hex digit, a field with a
        # capital letter.
        inside = False
        mine = []
        for line in lines:
            if line[:1] in _HEX_DIGITS:
                inside = under in line
            if inside:
                mine.append(line)
        lines = mine
    for line in lines:
        m = _SMAPS_HEADER.match(line)
        if m:
            cur = {
                "start": int(m.group(1), 16),
                "end": int(m.group(2), 16),
                "perms": m.group(3),
                "offset": int(m.group(4), 16),
                "path": m.group(5),
            }
            cur["name"] = os.path.basename(cur["path"].removesuffix(" (deleted)"))
            out.append(cur)
            continue
        if cur is None:
            continue
        key, _, rest = line.partition(":")
        rest = rest.strip()
        if key == "VmFlags":
            cur["VmFlags"] = rest
            flags = rest.split()
            cur["hg"] = "hg" in flags
            cur["nh"] = "nh" in flags
        elif key == "THPeligible":
            cur["THPeligible"] = int(rest)
        elif rest.endswith(" kB"):
            cur[key] = int(rest[:-3])
    if under is not None:
        prefix = under.rstrip("/") + "/"
        out = [e for e in out if e["path"].startswith(prefix)]
    return out


# ---------------------------------------------------------------------------------------------
# The worker side (runs in the zygote and its descendants)
# ---------------------------------------------------------------------------------------------

MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4
MLOCK_ONFAULT = 1
MAP_FAILED = ctypes.c_void_p(-1).value
SA_SIGINFO = 4
RUSAGE_THREAD = 1

_libc: Any = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
        lib.mremap.restype = ctypes.c_void_p
        lib.mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
        for fn in ("munmap", "madvise", "mprotect", "mlock", "munlock"):
            getattr(lib, fn).restype = ctypes.c_int
        lib.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        lib.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        lib.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        lib.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        lib.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        lib.mlock2.restype = ctypes.c_int
        lib.mlock2.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)
        lib.fallocate.restype = ctypes.c_int
        lib.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
        lib.getrusage.argtypes = (ctypes.c_int, ctypes.c_void_p)
        lib.mincore.restype = ctypes.c_int
        lib.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
        lib.sigaction.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        _libc = lib
    return _libc


def _errno_name(err: int | None) -> str:
    if err is None:
        return "EIO"
    return errno.errorcode.get(err, f"E{err}")


def _rc(ret: int) -> int | str:
    if ret == 0:
        return 0
    return _errno_name(ctypes.get_errno())


class _Probe:
    """The access probe and its signal handler, as machine code (x86-64 SysV, glibc ucontext).

    ``fn(addr, write, before, after)`` calls getrusage(RUSAGE_THREAD, before), makes a one-byte
    load (``mov cl,[r8]``) or a store that keeps the data (``lock add byte [r8],0``: a write
    fault), calls getrusage(RUSAGE_THREAD, after) and returns 0; or, if the access raised
    SIGSEGV/SIGBUS, returns the signal number (``after`` is then not written). The two
    getrusage calls are raw syscalls next to the access, so no fault of the interpreter can
    fall between them.
    """

    # offsetof(ucontext_t, uc_mcontext.gregs[REG_RAX / REG_RIP]) on x86-64 glibc.
    _RAX, _RIP = 40 + 13 * 8, 40 + 16 * 8

    def __init__(self) -> None:
        lib = _lib()
        size = PAGE_SIZE
        base = lib.mmap(None, size, 3, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if base in (None, MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap for the probe")
        getrusage_before = bytes.fromhex(
            "4989f8"  # mov r8, rdi     (addr)
            "4989f1"  # mov r9, rsi     (write)
            "4989ca"  # mov r10, rcx    (after)
            "b862000000"  # mov eax, 98 (getrusage)
            "bf01000000"  # mov edi, 1  (RUSAGE_THREAD)
            "4889d6"  # mov rsi, rdx    (before)
            "0f05"  # syscall
            "31c0"  # xor eax, eax
            "4585c9"  # test r9d, r9d
        )
        read = bytes.fromhex("418a08")  # mov cl, [r8]
        write = bytes.fromhex("f041800000")  # lock add byte [r8], 0
        after = bytes.fromhex(
            "b862000000"  # mov eax, 98
            "bf01000000"  # mov edi, 1
            "4c89d6"  # mov rsi, r10
            "0f05"  # syscall
            "31c0"  # xor eax, eax
            "c3"  # ret
        )
        # layout: before; jne W; read; jmp A; W: write; A: after; R: ret (recovery point)
        jmp_over_write = b"\xeb" + bytes([len(write)])
        jne_to_write = b"\x75" + bytes([len(read) + len(jmp_over_write)])
        code = getrusage_before + jne_to_write
        lo = base + len(code)
        code += read + jmp_over_write + write
        hi = base + len(code)
        code += after
        recover = base + len(code)
        code += b"\xc3"
        zero_area = base + 0x800  # a zeroed struct k_sigaction: SIG_DFL
        q = lambda v: v.to_bytes(8, "little")
        d32 = lambda v: v.to_bytes(4, "little")
        # handler(rdi=sig, rsi=info, rdx=uctx): a fault at RIP in [lo, hi) returns sig from fn.
        head = (
            b"\x48\x8b\x82" + d32(self._RIP)  # mov rax, [rdx+RIP]
            + b"\x48\xb9" + q(lo)  # movabs rcx, lo
            + b"\x48\x39\xc8"  # cmp rax, rcx
        )
        mid = (
            b"\x48\xb9" + q(hi)  # movabs rcx, hi
            + b"\x48\x39\xc8"  # cmp rax, rcx
        )
        recover_code = (
            b"\x48\x89\xba" + d32(self._RAX)  # mov [rdx+RAX], rdi
            + b"\x48\xb9" + q(recover)  # movabs rcx, recover
            + b"\x48\x89\x8a" + d32(self._RIP)  # mov [rdx+RIP], rcx
            + b"\xc3"  # ret
        )
        default = (
            b"\x48\xbe" + q(zero_area)  # movabs rsi, zero_area
            + b"\x31\xd2"  # xor edx, edx
            + b"\x41\xba\x08\x00\x00\x00"  # mov r10d, 8
            + b"\xb8\x0d\x00\x00\x00"  # mov eax, 13 (rt_sigaction)
            + b"\x0f\x05"  # syscall
            + b"\xc3"  # ret: the access faults again, now fatally
        )
        # jb default (after mid and its jae, and recover_code); jae default (after recover_code).
        jae = b"\x73" + bytes([len(recover_code)])
        jb = b"\x72" + bytes([len(mid) + len(jae) + len(recover_code)])
        handler = head + jb + mid + jae + recover_code + default
        hoff = 0x100
        assert len(code) < hoff and hoff + len(handler) < 0x800
        ctypes.memmove(base, code, len(code))
        ctypes.memmove(base + hoff, handler, len(handler))
        if lib.mprotect(base, size, 5) != 0:
            raise OSError(ctypes.get_errno(), "mprotect for the probe")
        self.fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(base)
        # struct sigaction (glibc x86-64): handler 8, sa_mask 128, sa_flags 4 (+4), restorer 8.
        act = ctypes.create_string_buffer(152)
        ctypes.memmove(act, q(base + hoff), 8)
        ctypes.memmove(ctypes.addressof(act) + 136, SA_SIGINFO.to_bytes(4, "little"), 4)
        for sig in (signal.SIGSEGV, signal.SIGBUS):
            if lib.sigaction(int(sig), act, None) != 0:
                raise OSError(ctypes.get_errno(), "sigaction")
        self.before = ctypes.create_string_buffer(144)
        self.after = ctypes.create_string_buffer(144)
        self.thp_file_mapped: int | None = None
        self._scratch = ctypes.create_string_buffer(64)
        self.scratch = ctypes.addressof(self._scratch)

    @staticmethod
    def _faults(buf: Any) -> tuple[int, int]:
        raw = buf.raw
        return int.from_bytes(raw[64:72], "little"), int.from_bytes(raw[72:80], "little")

    def warm_up(self) -> None:
        """Fault in the rusage buffers (copy-on-write after a fork) before measuring."""
        self.thp_file_mapped = None
        for _ in range(2):
            self.fn(self.scratch, 1, self.before, self.after)

    def access(self, addr: int, write: bool) -> str:
        if self.thp_file_mapped is None:
            self.thp_file_mapped = _thp_file_mapped()
        sig = self.fn(addr, 1 if write else 0, self.before, self.after)
        if sig == signal.SIGSEGV:
            return "sigsegv"
        if sig == signal.SIGBUS:
            return "sigbus"
        if sig:
            return f"signal{sig}"
        (mn0, mj0), (mn1, mj1) = self._faults(self.before), self._faults(self.after)
        if mj1 == mj0 and mn1 == mn0:
            return "hit"
        # Only our faults move thp_file_mapped on this quiet machine: compare with the value
        # after our previous fault (re-read at each step's start), not re-read per access.
        before, self.thp_file_mapped = self.thp_file_mapped, _thp_file_mapped()
        if mj1 > mj0:
            return "major"
        return "pmd" if self.thp_file_mapped > before else "minor"


def _thp_file_mapped() -> int:
    with open("/proc/vmstat", "rb") as f:
        data = f.read()
    i = data.find(b"\nthp_file_mapped ")
    if i < 0:
        return 0
    j = data.find(b"\n", i + 1)
    return int(data[i + 17 : j])


class _Worker:
    """The command loop of one modelled process."""

    def __init__(self, sock: socket.socket, root: str, probe: _Probe):
        self.sock = sock
        self.root = root
        self.probe = probe
        self.fds: dict[str, int] = {}
        # The forked child's end of its socket, handed back with the reply to "fork".
        self._pending_fd: socket.socket | None = None

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _ours(self, start: int, end: int) -> bool:
        """Every mapping overlapping [start, end) is one of the backend's files."""
        prefix = self.root.rstrip("/") + "/"
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if hi <= start or lo >= end:
                    continue
                path = fields[5].strip() if len(fields) > 5 else ""
                if not path.startswith(prefix):
                    return False
        return True

    def op_mmap(
        self, addr: int | None, length: int, file: str, offset: int, prot: str, shared: bool, reopen: bool = False
    ) -> dict:
        lib = _lib()
        # One open file per name and process (inherited across fork), as a program mapping one
        # fd several times: vma_merge needs the same struct file (is_mergeable_vma compares
        # vm_file), so an open per mmap would keep neighbouring mappings apart. --reopen maps a
        # new open(2) of its own (closed after the mmap: the mapping keeps the struct file).
        fd = None if reopen else self.fds.get(file)
        if fd is None:
            try:
                fd = os.open(self._path(file), os.O_RDWR)
            except OSError as err:
                return {"result": _errno_name(err.errno), "addr": None}
            if not reopen:
                self.fds[file] = fd
        try:
            return self._mmap_fd(lib, fd, addr, length, offset, prot, shared)
        finally:
            if reopen:
                os.close(fd)

    def _mmap_fd(self, lib: Any, fd: int, addr: int | None, length: int, offset: int, prot: str, shared: bool) -> dict:
        flags = MAP_SHARED if shared else MAP_PRIVATE
        if addr is None:
            ret = lib.mmap(None, length, PROTS[prot], flags, fd, offset)
        else:
            ret = lib.mmap(addr, length, PROTS[prot], flags | MAP_FIXED_NOREPLACE, fd, offset)
            if ret == MAP_FAILED and ctypes.get_errno() == errno.EEXIST:
                plen = (length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
                if self._ours(addr, addr + plen):
                    ret = lib.mmap(addr, length, PROTS[prot], flags | MAP_FIXED, fd, offset)
                else:
                    ctypes.set_errno(errno.EEXIST)
        if ret == MAP_FAILED or ret is None:
            return {"result": _errno_name(ctypes.get_errno()), "addr": None}
        return {"result": 0, "addr": ret}

    def op_munmap(self, addr: int, length: int) -> dict:
        if length and not self._ours(addr, addr + length):
            return {"result": "EPERM"}  # never unmap the interpreter
        return {"result": _rc(_lib().munmap(addr, length))}

    def op_madvise(self, addr: int, length: int, advice: int) -> dict:
        return {"result": _rc(_lib().madvise(addr, length, advice))}

    def op_mprotect(self, addr: int, length: int, prot: str) -> dict:
        if length and not self._ours(addr, addr + length):
            return {"result": "EPERM"}
        return {"result": _rc(_lib().mprotect(addr, length, PROTS[prot]))}

    def op_mlock(self, addr: int, length: int, onfault: bool) -> dict:
        return {"result": _rc(_lib().mlock2(addr, length, MLOCK_ONFAULT if onfault else 0))}

    def op_munlock(self, addr: int, length: int) -> dict:
        return {"result": _rc(_lib().munlock(addr, length))}

    def op_mremap(self, addr: int, old_length: int, new_length: int, to: int | None, maymove: bool, dontunmap: bool) -> dict:
        flags = (MREMAP_MAYMOVE if maymove or to is not None or dontunmap else 0)
        flags |= (MREMAP_FIXED if to is not None else 0) | (MREMAP_DONTUNMAP if dontunmap else 0)
        if old_length and not self._ours(addr, addr + old_length):
            return {"result": "EPERM", "addr": None}
        if to is not None and not self._ours(to, to + new_length):
            return {"result": "EEXIST", "addr": None}
        ret = _lib().mremap(addr, old_length, new_length, flags, to)
        if ret == MAP_FAILED or ret is None:
            return {"result": _errno_name(ctypes.get_errno()), "addr": None}
        return {"result": 0, "addr": ret}

    def op_fault(self, addr: int, write: bool) -> dict:
        self.probe.warm_up()
        return {"result": self.probe.access(addr, write)}

    def op_touch(self, addr: int, length: int, write: bool, stride: int) -> dict:
        if stride <= 0 or length < 0:
            return {"result": "EINVAL"}
        counts: Counter[str] = Counter()
        self.probe.warm_up()
        for a in range(addr, addr + length, stride):
            counts[self.probe.access(a, write)] += 1
        return {"result": dict(counts)}

    def op_fork(self) -> dict:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            mine.close()
            self.sock.close()
            self.sock = theirs
            raise _BecomeChild()
        theirs.close()
        self._pending_fd = mine
        return {"result": 0, "real_pid": pid}

    def serve(self) -> None:
        while True:
            data = self.sock.recv(1 << 16)
            if not data:
                os._exit(0)
            op, kwargs = pickle.loads(data)
            self._pending_fd = None
            if op == "exit":
                self.sock.sendall(pickle.dumps(("ok", {"result": 0})))
                os._exit(0)
            try:
                reply = ("ok", getattr(self, "op_" + op)(**kwargs))
            except _BecomeChild:
                continue  # the forked child: now serving its own socket, silently
            except Exception as err:  # noqa: BLE001 - reported to the backend, which raises
                reply = ("error", f"{type(err).__name__}: {err}")
            msg = pickle.dumps(reply)
            if self._pending_fd is not None:
                socket.send_fds(self.sock, [msg], [self._pending_fd.fileno()])
                self._pending_fd.close()
                self._pending_fd = None
            else:
                self.sock.sendall(msg)


class _BecomeChild(Exception):
    """Unwinds the forked child out of op_fork into the same serve loop, as the new worker."""


def _zygote_main(fd: int, root: str) -> None:
    """Fork a fresh worker per ``spawn`` request; send its socket back over SCM_RIGHTS."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # exited workers are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    probe = _Probe()
    sock = socket.socket(fileno=fd)
    while True:
        data = sock.recv(1 << 16)
        if not data:
            os._exit(0)
        op, _ = pickle.loads(data)
        if op != "spawn":
            sock.sendall(pickle.dumps(("error", f"zygote: unknown op {op}")))
            continue
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            sock.close()
            mine.close()
            _Worker(theirs, root, probe).serve()
        theirs.close()
        socket.send_fds(sock, [pickle.dumps(("ok", {"real_pid": pid}))], [mine.fileno()])
        mine.close()


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------


class BackendError(RuntimeError):
    """The backend itself failed (a worker died, mount failed, a step it cannot run)."""


class _Channel:
    def __init__(self, sock: socket.socket, real_pid: int):
        self.sock = sock
        self.real_pid = real_pid
        try:
            self.pidfd: int | None = os.pidfd_open(real_pid)
        except OSError:
            self.pidfd = None

    def call(self, op: str, **kwargs: Any) -> tuple[Any, socket.socket | None]:
        self.sock.sendall(pickle.dumps((op, kwargs)))
        msg, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 1)
        if not msg:
            raise BackendError(f"worker {self.real_pid} died during {op}")
        status, value = pickle.loads(msg)
        if status != "ok":
            raise BackendError(f"worker {self.real_pid}: {op}: {value}")
        return value, (socket.socket(fileno=fds[0]) if fds else None)

    def wait_eof(self, timeout: float = 10.0) -> None:
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(1 << 16):
                pass
        except TimeoutError:
            raise BackendError(f"worker {self.real_pid} did not exit") from None
        finally:
            self.sock.close()


class KernelBackend:
    """Scenario steps on the real kernel. Use as a context manager (or call :meth:`close`).

    Args:
        huge: the tmpfs ``huge=`` option (``advise`` ≙ the model's ``shmem_enabled=advise``,
            ``never`` ≙ ``never``, ``always``, ``within_size``).
        size: the tmpfs ``size=`` limit.
        lock_timeout: how long to wait for another backend on this machine to finish (vmstat
            deltas are system-wide, so backends take an flock on :data:`LOCK_PATH`).
        guard: the :class:`SysfsGuard` through which ``sysfs set`` and ``wait-scans`` steps
            change knobs (without one they fail with a :class:`BackendError`); a ``wait-scans``
            expects :func:`quiet_khugepaged` to have run on it.
        ext4_size: the ext4 image for ``file create --fs large-folio`` files (made and
            loop-mounted at the first such file; :func:`ext4_unavailable` says where it cannot).
        ext4_read_ahead_kb: its loop device's ``read_ahead_kb`` (the model's
            ``thpsplit/read_ahead_kb``).
    """

    def __init__(
        self,
        huge: str = DEFAULT_HUGE,
        size: str = "256M",
        lock_timeout: float = 300.0,
        guard: SysfsGuard | None = None,
        ext4_size: str = "64M",
        ext4_read_ahead_kb: int = 128,
    ):
        reason = thp_available()
        if reason:
            raise BackendError(reason)
        self.huge = huge
        self.guard = guard
        # Knobs the scenario set (sysfs set), with the value each had before: reset() puts them back.
        self.scenario_knobs: dict[str, str] = {}
        # vmstat is system-wide: one backend (or knob guard) at a time per machine.
        _MachineLock.acquire(lock_timeout)
        self._locked = True
        self.root = tempfile.mkdtemp(prefix="thpsplit-kernel-")
        self.mounted = False
        self.zygote: subprocess.Popen[bytes] | None = None
        self.procs: dict[int, _Channel] = {}
        self.files: set[str] = set()
        # Regular files (--fs large-folio) live on an ext4 image inside the tmpfs, loop-mounted
        # at EXT4_DIR under the root at the first such file (see _mount_ext4).
        self.ext4_mounted = False
        self.ext4_size = ext4_size
        self.ext4_read_ahead_kb = ext4_read_ahead_kb
        # Every per-CPU LRU add batch a scenario fills is this CPU's (see the module docstring).
        self.cpu = min(os.sched_getaffinity(0))
        try:
            proc = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"huge={huge},size={size},mode=0700", "tmpfs", self.root],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise BackendError(f"mount -t tmpfs -o huge={huge}: {proc.stderr.strip() or proc.returncode}")
            self.mounted = True
            zsock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.zygote = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), "--zygote", str(theirs.fileno()), self.root],
                pass_fds=(theirs.fileno(),),
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            )
            theirs.close()
            os.sched_setaffinity(self.zygote.pid, {self.cpu})  # before any spawn: workers inherit it
            self._zygote = _Channel(zsock, self.zygote.pid)
            self.reset_counters()
        except BaseException:
            self.close()
            raise

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset_counters(self) -> None:
        """vmstat and khugepaged deltas count from now."""
        self.vmstat0 = read_vmstat()
        self.khugepaged0 = read_khugepaged()

    def reset(self) -> None:
        """End every process, remove every file, and count from zero again (the mount stays)."""
        for pid in list(self.procs):
            self._exit(pid)
        for name in list(self.files):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.root, self.relpath(name)))
        self.files.clear()
        if self.guard is not None:
            for knob, value in self.scenario_knobs.items():
                self.guard.set(knob, value)
        self.scenario_knobs.clear()
        self.reset_counters()

    def close(self) -> None:
        for pid in list(self.procs):
            try:
                self._exit(pid)
            except Exception:  # noqa: BLE001 - fall back to SIGKILL of the pid we started
                chan = self.procs.pop(pid)
                if chan.pidfd is not None:
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(chan.pidfd, signal.SIGKILL)
                    os.close(chan.pidfd)
                chan.sock.close()
        if self.zygote is not None:
            self._zygote.sock.close()  # EOF: the zygote exits
            try:
                self.zygote.wait(5)
            except subprocess.TimeoutExpired:
                self.zygote.kill()
                self.zygote.wait()
            self.zygote = None
        self._umount_ext4()
        if self.mounted:
            for _ in range(50):
                if subprocess.run(["umount", self.root], capture_output=True, check=False).returncode == 0:
                    self.mounted = False
                    break
                time.sleep(0.1)  # a worker's exit is still tearing its mm down
            else:
                subprocess.run(["umount", "-l", self.root], capture_output=True, check=False)
                self.mounted = False
        with contextlib.suppress(OSError):
            os.rmdir(self.root)
        if self._locked:
            self._locked = False
            _MachineLock.release()

    # -- steps ----------------------------------------------------------------------------------

    def run(self, scenario: str | list[str] | list[Step]) -> list[dict[str, Any]]:
        steps = scenario if scenario and isinstance(scenario[0], Step) else parse_scenario(scenario)  # type: ignore[arg-type]
        return [self.step(s) for s in steps]

    def step(self, step: Step | str) -> dict[str, Any]:
        """Run one step; its outcome (see the module docstring)."""
        if isinstance(step, str):
            parsed = parse_step(step)
            if parsed is None:
                raise ScenarioError("empty step")
            step = parsed
        a = dict(step.args)
        op = step.op
        if op == "file create":
            return self._file_create(a["name"], a["size"], a["shmem"], a.get("fs"))
        if op == "file write":
            return self._file_io(a["name"], lambda fd: os.pwrite(fd, b"\x5a" * a["length"], a["offset"]))
        if op == "file truncate":
            return self._file_io(a["name"], lambda fd: os.ftruncate(fd, a["size"]))
        if op == "file punch":
            return self._file_punch(a["name"], a["offset"], a["length"])
        if op == "sysfs set":
            return self._sysfs_set(a["knob"], a["value"])
        if op == "wait-scans":
            return self._wait_scans(a["n"], a["timeout"])
        if op == "proc spawn":
            return self._spawn(a["pid"])
        if (op in ("proc fork", "proc exit") or "pid" in a) and a["pid"] not in self.procs:
            return {"result": "ESRCH"}  # as the model (and kill(2)) for a process that is not there
        if op == "proc fork":
            return self._fork(a["pid"], a["child"])
        if op == "proc exit":
            return self._exit(a["pid"])
        pid = a.pop("pid")
        chan = self._chan(pid)
        name = op
        if op == "mmap":
            a["file"] = self.relpath(a["file"])
        if op == "madvise":
            a["advice"] = ADVICE[a["advice"]]
        value, _ = chan.call(name, **a)
        return value

    def _need_guard(self, op: str) -> SysfsGuard:
        if self.guard is None:
            raise BackendError(f"{op} changes sysfs knobs: give the backend a SysfsGuard")
        return self.guard

    def _sysfs_set(self, knob: str, value: int) -> dict[str, Any]:
        guard = self._need_guard("sysfs set")
        before = read_knob(knob)
        try:
            guard.set(knob, value)
        except OSError as err:
            return {"result": _errno_name(err.errno)}
        self.scenario_knobs.setdefault(knob, before)
        return {"result": 0}

    def _wait_scans(self, n: int, timeout: float) -> dict[str, Any]:
        """khugepaged runs ``n`` full scans, then is quiet again (as after :func:`quiet_khugepaged`).

        ``scan_sleep_millisecs`` goes to :data:`FAST_SCAN_SLEEP_MS` (the write wakes khugepaged)
        until ``full_scans`` has grown by ``n``, then back to its quiet value. That write wakes
        khugepaged once more: one more khugepaged_do_scan() runs before it sleeps again, and this
        waits for it (:func:`set_scan_sleep`). The outcome reports how many full scans ran in all
        (timing: not compared).
        """
        guard = self._need_guard("wait-scans")
        knob = "khugepaged/scan_sleep_millisecs"
        quiet = int(read_knob(knob))
        start = read_khugepaged()["full_scans"]
        deadline = time.monotonic() + timeout
        result: int | str = 0
        guard.set(knob, FAST_SCAN_SLEEP_MS)
        try:
            while read_khugepaged()["full_scans"] < start + n:
                if time.monotonic() > deadline:
                    result = "ETIMEDOUT"
                    break
                time.sleep(0.002)
        finally:
            set_scan_sleep(guard, quiet)
        return {"result": result, "scans": read_khugepaged()["full_scans"] - start}

    def _chan(self, pid: int) -> _Channel:
        chan = self.procs.get(pid)
        if chan is None:
            raise BackendError(f"no process {pid}")
        return chan

    def _mount_ext4(self) -> None:
        """Make an ext4 image in the tmpfs (so the loop device's own I/O goes to small shmem
        pages, which no compared counter sees) and loop-mount it at :data:`EXT4_DIR`.

        The image is sparse and made fresh per backend; ``mount -o loop`` sets the loop
        device's autoclear flag, so the umount in :meth:`close` detaches it."""
        reason = ext4_unavailable()
        if reason:
            raise BackendError(reason)
        image = os.path.join(self.root, EXT4_IMAGE)
        mnt = os.path.join(self.root, EXT4_DIR)
        os.mkdir(mnt, 0o700)
        with open(image, "wb") as f:
            f.truncate(parse_size(self.ext4_size))
        for cmd in (
            ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", image],
            ["mount", "-t", "ext4", "-o", "loop", image, mnt],
        ):
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise BackendError(f"{' '.join(cmd[:2])}: {proc.stderr.strip() or proc.returncode}")
        self.ext4_mounted = True
        # A loop device's read_ahead_kb defaults to 2560 here; the model's read_ahead_kb is the
        # block device's default, 128. The knob belongs to this loop device only (gone with it),
        # and a file's readahead window is read from it at open(2) (file_ra_state_init).
        loop = self._loop_device(image)
        with open(f"/sys/block/{loop}/queue/read_ahead_kb", "w") as f:
            f.write(str(self.ext4_read_ahead_kb))

    @staticmethod
    def _loop_device(image: str) -> str:
        """The loop device (``loopN``) whose backing file is ``image``."""
        for name in os.listdir("/sys/block"):
            try:
                with open(f"/sys/block/{name}/loop/backing_file") as f:
                    if f.read().strip() == image:
                        return name
            except OSError:
                continue
        raise BackendError(f"no loop device backs {image}")

    def _umount_ext4(self) -> None:
        if not self.ext4_mounted:
            return
        mnt = os.path.join(self.root, EXT4_DIR)
        for _ in range(50):
            if subprocess.run(["umount", mnt], capture_output=True, check=False).returncode == 0:
                break
            time.sleep(0.1)  # a worker's exit is still tearing its mm down
        else:
            subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
        self.ext4_mounted = False

    def relpath(self, name: str) -> str:
        """Where file ``name`` is, relative to the root (a regular file is on the ext4 mount)."""
        if name in self.files and os.path.exists(os.path.join(self.root, EXT4_DIR, name)):
            return os.path.join(EXT4_DIR, name)
        return name

    def _file_create(self, name: str, size: int, shmem: bool, fs: str | None = None) -> dict[str, Any]:
        if not shmem and fs != "large-folio":
            raise BackendError(f"a regular file of kind {fs} has no kernel here (CONFIG_READ_ONLY_THP_FOR_FS is off): use --fs large-folio or --shmem")
        if name in self.files:
            return {"result": "EEXIST"}  # as the model: one namespace for both kinds
        if not shmem and not self.ext4_mounted:
            self._mount_ext4()
        path = os.path.join(self.root, name if shmem else os.path.join(EXT4_DIR, name))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        self.files.add(name)
        return {"result": 0}

    def _file_io(self, name: str, fn: Any) -> dict[str, Any]:
        try:
            fd = os.open(os.path.join(self.root, self.relpath(name)), os.O_RDWR)
        except OSError as err:
            return {"result": _errno_name(err.errno)}
        # The folios a write adds wait in this thread's CPU's LRU add batch: the workers' CPU.
        allowed = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {self.cpu})
        try:
            fn(fd)
        except OSError as err:
            return {"result": _errno_name(err.errno)}
        finally:
            os.sched_setaffinity(0, allowed)
            os.close(fd)
        return {"result": 0}

    def _file_punch(self, name: str, offset: int, length: int) -> dict[str, Any]:
        lib = _lib()

        def punch(fd: int) -> None:
            if lib.fallocate(fd, 3, offset, length) != 0:  # PUNCH_HOLE | KEEP_SIZE
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))

        return self._file_io(name, punch)

    def _spawn(self, pid: int) -> dict[str, Any]:
        if pid in self.procs:
            return {"result": "EEXIST"}
        value, sock = self._zygote.call("spawn")
        assert sock is not None
        self.procs[pid] = _Channel(sock, value["real_pid"])
        return {"result": 0, "pid": pid, "real_pid": value["real_pid"]}

    def _fork(self, pid: int, child: int) -> dict[str, Any]:
        if child in self.procs:
            return {"result": "EEXIST"}
        value, sock = self._chan(pid).call("fork")
        assert sock is not None
        self.procs[child] = _Channel(sock, value["real_pid"])
        return {"result": 0, "pid": child, "parent": pid, "real_pid": value["real_pid"]}

    def _exit(self, pid: int) -> dict[str, Any]:
        chan = self._chan(pid)
        chan.sock.sendall(pickle.dumps(("exit", {})))
        chan.wait_eof()  # EOF comes from exit_files(), after exit_mm() dropped the mm
        del self.procs[pid]
        # The mm's last fput()s are task work, run after exit_files() (exit_task_work): wait
        # until the pidfd says the process is gone, so that an unlink or a vmstat read after
        # this step sees every file reference dropped.
        if chan.pidfd is not None:
            try:
                select.select([chan.pidfd], [], [], 10.0)
            finally:
                os.close(chan.pidfd)
                chan.pidfd = None
        return {"result": 0}

    # -- observing -------------------------------------------------------------------------------

    def real_pid(self, pid: int) -> int:
        return self._chan(pid).real_pid

    def smaps(self, pid: int) -> list[dict[str, Any]]:
        """The backend's VMAs of model process ``pid``, parsed from /proc/PID/smaps."""
        with open(f"/proc/{self.real_pid(pid)}/smaps") as f:
            return parse_smaps(f.read(), under=self.root)

    def vmstat(self) -> dict[str, int]:
        """vmstat deltas since the backend started (or :meth:`reset`)."""
        now = read_vmstat()
        return {k: v - self.vmstat0.get(k, 0) for k, v in now.items()}

    def file_stat(self, name: str) -> dict[str, Any]:
        """``{"size": bytes, "nrpages": pages in the page cache}``: mincore(2) over a read-only
        shared mapping the backend makes for the call, up to i_size rounded up to 2 MiB
        (mincore faults nothing in; for shmem it reports the page cache, beyond i_size too, as
        ``file ls`` in the model)."""
        path = os.path.join(self.root, self.relpath(name))
        size = os.stat(path).st_size
        # A shmem THP may reach past i_size (huge=advise/always): look up to the next 2 MiB.
        span = max((size + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1), HPAGE_PMD_SIZE)
        lib = _lib()
        npages = span // PAGE_SIZE
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = lib.mmap(None, span, 1, MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if addr in (None, MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            vec = ctypes.create_string_buffer(npages)
            if lib.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(span), vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            return {"size": size, "nrpages": sum(b & 1 for b in vec.raw)}
        finally:
            lib.munmap(addr, span)

    def observe(self) -> dict[str, Any]:
        """``{"smaps": {pid: [vma, ...]}, "files": {name: file_stat}, "vmstat": {field: delta},
        "khugepaged": {"full_scans": delta, "pages_collapsed": delta}}``."""
        now = read_khugepaged()
        return {
            "smaps": {pid: self.smaps(pid) for pid in sorted(self.procs)},
            "files": {name: self.file_stat(name) for name in sorted(self.files)},
            "vmstat": self.vmstat(),
            "khugepaged": {k: v - self.khugepaged0[k] for k, v in now.items()},
        }


def project_vma(e: dict[str, Any], fields: tuple[str, ...] = ("Rss", "Anonymous", "ShmemPmdMapped")) -> tuple:
    """(start, end, *fields) of one smaps entry: the default comparison key."""
    return (e["start"], e["end"], *(e.get(f, 0) for f in fields))


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--zygote":
    _zygote_main(int(sys.argv[2]), sys.argv[3])
