"""Differential conformance: the model against the real kernel, step by step (issue 9).

One scenario language (:mod:`shared.sim.kernel`'s steps, the ``thpctl run`` line syntax) and two
backends run side by side: the real kernel (:class:`~shared.sim.kernel.KernelBackend`: worker
processes, a private tmpfs, real faults) and the model (:class:`ModelBackend`: an in-process
:class:`~shared.sim.world.World` on its virtual clock). After every step the harness compares

* the step's outcome: return codes (errno names), the address of a fixed ``mmap``, and per access
  ``ok``/``sigsegv``/``sigbus`` (:func:`~shared.sim.kernel.coarse`; ``hit``/``minor``/``major`` too
  with ``fine``);
* per process and VMA the smaps fields that are exact on both sides (:data:`VMA_FIELDS`: start, end,
  perms, offset, Rss, Anonymous, ShmemPmdMapped, FilePmdMapped, Locked, THPeligible, and the madvise
  VmFlags);
* per file the size and the page-cache page count;
* the step's deltas of the deterministic vmstat counters (:data:`VMSTAT_EXACT`) unless ``vmstat``
  is off. They are machine-wide on the kernel: exact while nothing else on the machine makes or
  splits shmem THPs. Kernel backends and knob guards serialize on a machine-wide flock.

A divergence outside the table (or only in vmstat) is run a second time from scratch; one that
does not come back is counted as ``noise`` (with its report), not reported: the kernel side is not
deterministic to the page (other processes' THPs in vmstat; now and then a page of a CoW-faulted
private shmem mapping missing from the page cache).

The first difference ends the sequence (the two states are apart from then on). A difference is
looked up in :data:`KNOWN`, the table of differences the model keeps on purpose ("deliberate",
each naming its entry in the README's "Deliberate differences") or that are known and not fixed
yet ("open", numbered as in the issue's divergence list). A match is masked and counted by its
id; anything else is *unexpected* and fails. Every entry with a reproducer is checked by
:func:`check_known`: an open entry whose reproducer now agrees is reported as "now agrees: remove
it from the table", so the table cannot outlive the bugs it excuses.

Modes. *step*: khugepaged asleep on both sides (the kernel's through
:func:`~shared.sim.kernel.quiet_khugepaged`, the model's by a day-long ``scan_sleep``), fault-time
THPs per tmpfs ``huge=`` (``advise`` or ``never``, the model's ``shmem_enabled`` to match), every
step compared. *khugepaged*: ``sysfs set khugepaged/max_ptes_none N`` (0, 255 or 511), a set-up
compared step by step, then ``wait-scans 2`` on both sides, where only the timing-robust outcome is
compared (smaps, files, THP counts: what the scans left), then a re-fault of every PMD (``touch
--stride 2M``) compared in full.

Random sequences come from :func:`generate` (one generator, fed by a seeded
:class:`random.Random` for the command line or by hypothesis in the tests: :func:`sequences`);
:meth:`Harness.shrink` removes steps while the same kind of divergence stays, and every report
ends with a one-line replay command.

Command line: ``python -m shared.sim.conformance --help`` (``thpctl conformance`` is the same).
Exit status: 0 everything agreed or was a known difference, 1 an unexpected divergence or a stale
known-difference entry, 2 bad usage, 77 the kernel side cannot run here (not root, no THP, no
tmpfs; 0 with ``--skip-unavailable``). See docs/CONFORMANCE.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import random
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, Self, TextIO, TypeVar

from collapsed.khugepaged import MmSlot
from shared import logs
from shared.errors import UserError
from shared.knobs import Knobs
from shared.sim import kernel as kmod
from shared.sim.kernel import (
    BackendError,
    KernelBackend,
    ScenarioError,
    Step,
    SysfsGuard,
    coarse,
    parse_scenario,
    quiet_khugepaged,
    read_knob,
    swap_active,
    thp_available,
)
from shared.sim.world import World
from shared.vm import ADVICE
from shared.vm import Prot

T = TypeVar("T")

A = 0x4000_0000  # where sequences map: 2 MiB aligned, free in a fresh worker
K = 1 << 10
M = 1 << 20
PMD = 2 * M
FILE = "c"
FILE_SIZE = 4 * M
QUIET_MS = kmod.QUIET_SCAN_SLEEP_MS
HUGE_CHOICES = ("advise", "never")
MAX_PTES_NONE = (0, 255, 511)

EXIT_OK = 0
EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 77

# smaps fields compared per VMA (besides start, end, perms, offset and the madvise VmFlags).
VMA_FIELDS = ("Rss", "Anonymous", "ShmemPmdMapped", "FilePmdMapped", "Locked", "THPeligible")
# The VmFlags compared: the ones madvise sets (the access, sharing and mlock ones follow from perms
# and Locked).
VM_FLAGS = ("sr", "rr", "dc", "wf", "dd", "hg", "nh")
# vmstat counters whose per-step deltas are exact on a quiet machine (see kernel.py).
VMSTAT_EXACT = (
    "thp_file_alloc",
    "thp_file_mapped",
    "thp_collapse_alloc",
    "thp_split_pmd",
    "nr_shmem_hugepages",
    "nr_shmem_pmdmapped",
)
# After khugepaged scans only the gauges: how many THPs there are and are PMD-mapped, not how
# many attempts it took (thp_collapse_alloc counts a transient failure's allocation too, and every
# other mm's anon collapses while khugepaged runs at full speed).
VMSTAT_AFTER_SCANS = ("nr_shmem_hugepages", "nr_shmem_pmdmapped")
# Compared besides when a sequence has a regular file (the large-folio mode): THP gauges of
# regular files, which readahead moves without any thp_* event. Machine-wide like the rest, and
# other processes' ext4 large folios can move them (the noise re-run covers that).
VMSTAT_REGULAR = ("nr_file_hugepages", "nr_file_pmdmapped")

# Step op → the World method that performs it (detected by name: an op the World lacks is
# reported as unsupported by the model until the model gains it).
WORLD_METHODS = {
    "file create": "file_create",
    "file write": "file_write",
    "file truncate": "file_truncate",
    "file punch": "file_punch",
    "proc spawn": "spawn",
    "proc fork": "fork",
    "proc exit": "exit",
    "mmap": "mmap",
    "munmap": "munmap",
    "madvise": "madvise",
    "mprotect": "mprotect",
    "mlock": "mlock",
    "munlock": "munlock",
    "mremap": "mremap",
    "fault": "fault",
    "touch": "touch",
    "sysfs set": "sysfs_set",
    "wait-scans": "wait_scans",
}
# Step argument → World parameter name, where they differ.
_ALIASES = {"mmap": {"file": "name"}, "sysfs set": {"knob": "name"}}

Obs = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Settings and the model's knobs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a sequence is run and compared.

    Args:
        huge: the kernel's tmpfs ``huge=`` and the model's ``shmem_enabled``.
        vmstat: compare vmstat deltas (machine-wide on the kernel; see the module docstring).
        fine: compare ``hit``/``minor``/``major`` per access, not only ``ok``/signals.
        model_knobs: extra model knobs (sysfs names, values), after the harness's own.
        kernel_knobs: the kernel's THP knobs the model mirrors (read by :class:`KernelSession`).
    """

    huge: str = "advise"
    vmstat: bool = True
    fine: bool = False
    model_knobs: tuple[tuple[str, str], ...] = ()
    kernel_knobs: tuple[tuple[str, str], ...] = ()

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


# The kernel's knobs the model copies, so that the two agree on what the machine is set to.
MIRRORED_KNOBS = (
    "enabled",
    "defrag",
    "khugepaged/defrag",
    "khugepaged/max_ptes_none",
    "khugepaged/max_ptes_swap",
    "khugepaged/max_ptes_shared",
    "khugepaged/pages_to_scan",
)


def model_knobs(settings: Settings) -> Knobs:
    """The model's knobs for a comparison with the kernel.

    * ``shmem_enabled`` = the tmpfs ``huge=`` option (a mount's ``huge=`` is what
      ``shmem_huge_global_enabled()`` applies to its files);
    * ``install_pmd=0``: khugepaged's own behaviour; the default 1 is a deliberate difference
      (:data:`KNOWN` "install-pmd");
    * ``retry_policy=lockless``: the kernel under test is 6.x, whose retract_page_tables() needs
      no mmap_lock (the model's default, per-pmd, is the design under study);
    * ``scan_sleep_millisecs`` and ``remap_sleep_millisecs`` a day: nothing runs on its own timer
      (the kernel's khugepaged is kept asleep the same way; ``wait-scans`` wakes both);
    * ``fault_around_bytes`` 65536 and ``read_ahead_kb`` 128, the kernel's defaults (shmem has no
      readahead; debugfs ``fault_around_bytes`` is not mounted on these machines, so its default
      stands);
    * then the kernel's THP knobs (:data:`MIRRORED_KNOBS`), ``thpsplit/swap`` as the machine
      has swap or not (:func:`~shared.sim.kernel.swap_active`), and ``settings.model_knobs``.
    """
    knobs = Knobs(
        shmem_enabled=settings.huge,
        install_pmd=0,
        retry_policy="lockless",
        scan_sleep_millisecs=QUIET_MS,
        remap_sleep_millisecs=QUIET_MS,
        fault_around_bytes=65536,
        read_ahead_kb=128,
    )
    for name, value in (*settings.kernel_knobs, *settings.model_knobs):
        knobs.set(name, value)
    return knobs


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


class Backend(Protocol):
    """One side of the comparison."""

    name: str

    def start(self) -> None:
        """A fresh state: no processes, no files, counters from zero."""

    def unsupported(self, step: Step) -> str | None:
        """Why this side cannot run ``step`` (None: it can)."""

    def step(self, step: Step) -> dict[str, Any]:
        """Run one step; its outcome (``{"result": ...}``, as KernelBackend.step)."""

    def observe(self) -> Obs:
        """``{"smaps": {pid: [row]}, "files": {name: {...}}, "vmstat": {...}, "khugepaged": {...}}``
        with rows as :func:`vma_row` makes them and vmstat cumulative since :meth:`start`."""


def vma_row(entry: dict[str, Any]) -> dict[str, Any]:
    """The compared fields of one smaps entry (either side's)."""
    flags = str(entry.get("VmFlags", "")).split()
    row = {"start": entry["start"], "end": entry["end"], "perms": entry.get("perms"), "offset": entry.get("offset", 0)}
    row.update({f: entry.get(f, 0) for f in VMA_FIELDS})
    row["flags"] = tuple(f for f in VM_FLAGS if f in flags)
    return row


class KernelSide:
    """:class:`KernelBackend` as a :class:`Backend`."""

    name = "kernel"

    def __init__(self, kb: KernelBackend):
        self.kb = kb

    def start(self) -> None:
        self.kb.reset()

    def unsupported(self, step: Step) -> str | None:
        if step.op == "file create" and not step.args["shmem"]:
            if step.args["fs"] != "large-folio":
                return f"a regular file of kind {step.args['fs']} has no kernel here (CONFIG_READ_ONLY_THP_FOR_FS is off)"
            return kmod.ext4_unavailable()
        if step.op == "wait-scans" and self.kb.guard is None:
            return "wait-scans needs the backend's SysfsGuard"
        return None

    def step(self, step: Step) -> dict[str, Any]:
        return self.kb.step(step)

    def observe(self) -> Obs:
        obs = self.kb.observe()
        return {
            "smaps": {pid: [vma_row(e) for e in rows] for pid, rows in obs["smaps"].items()},
            "files": {n: {"size": f["size"], "nrpages": f["nrpages"]} for n, f in obs["files"].items()},
            "vmstat": obs["vmstat"],
            "khugepaged": obs["khugepaged"],
        }


# The model's sentinel mm (see ModelBackend._new_world): no scenario process has pid 0.
SENTINEL_PID = 0


class ModelBackend:
    """The model (an in-process :class:`World`) as a :class:`Backend`.

    Steps go through the World's operations by name (:data:`WORLD_METHODS`); an operation the
    World does not have, a protection outside the model's enum, or a flag the World
    method has no parameter for, is *unsupported*: the harness skips that step on both sides and
    counts it, so a syscall the model gains later is compared from then on without a change here.
    """

    name = "model"

    def __init__(self, settings: Settings | None = None, world_factory: Callable[[Knobs], World] | None = None):
        self.settings = settings or Settings()
        self.world_factory = world_factory or (lambda knobs: World(knobs, codec=False))
        self.world: World = self._new_world()
        self.pids: set[int] = set()

    def start(self) -> None:
        self.world = self._new_world()
        self.pids = set()

    def _new_world(self) -> World:
        """A World whose khugepaged already has an mm on its list, as quiet_khugepaged's sentinel
        is on the kernel's: a scenario's first registration then wakes nobody (__khugepaged_enter
        wakes khugepaged only when the list was empty). Its one pass scans the empty sentinel."""
        world = self.world_factory(model_knobs(self.settings))
        k = world.collapser.khugepaged
        k.slots[SENTINEL_PID] = MmSlot(SENTINEL_PID)
        k.order.append(SENTINEL_PID)
        world.collapser.notify("khugepaged_work")
        world.settle()
        return world

    def _method(self, step: Step) -> Callable[..., Any] | None:
        name = WORLD_METHODS.get(step.op)
        return getattr(self.world, name, None) if name else None

    def unsupported(self, step: Step) -> str | None:
        name = WORLD_METHODS.get(step.op, step.op)
        method = self._method(step)
        if method is None:
            return f"{step.op} is not modelled (World has no {name})"
        a = step.args
        if step.op == "mmap" and a["prot"] not in tuple(Prot):
            return f"prot {a['prot']} is not modelled"
        if step.op == "mprotect" and a["prot"] not in tuple(Prot):
            return f"prot {a['prot']} is not modelled"
        if step.op in ("sysfs set", "wait-scans", "file create"):
            return None
        _, missing, extra = self._bind(step, method)
        if missing:
            return f"the model's {name} takes no {', '.join(missing)}"
        if extra:
            return f"the model's {name} has no {', '.join(extra)}"
        return None

    @staticmethod
    def _bind(step: Step, method: Callable[..., Any]) -> tuple[dict[str, Any], list[str], list[str]]:
        """kwargs for ``method`` from the step's args; required parameters the step lacks; step
        arguments (set to something other than their default) the method has no parameter for."""
        aliases = _ALIASES.get(step.op, {})
        params = inspect.signature(method).parameters
        kwargs: dict[str, Any] = {}
        used = set()
        missing = []
        for pname, param in params.items():
            source = next((k for k, v in aliases.items() if v == pname), pname)
            if source in step.args:
                kwargs[pname] = step.args[source]
                used.add(source)
            elif param.default is inspect.Parameter.empty:
                missing.append(pname)
        extra = [k for k, v in step.args.items() if k not in used and v not in (None, False, 0)]
        return kwargs, missing, extra

    def step(self, step: Step) -> dict[str, Any]:
        w, a, op = self.world, step.args, step.op
        try:
            if op == "file create":
                w.file_create(a["name"], a["size"], a["shmem"], a.get("fs", kmod.DEFAULT_FS))
                return {"result": 0}
            if op == "sysfs set":
                w.sysfs_set(a["knob"], a["value"])
                return {"result": 0}
            if op == "wait-scans":
                w.sysfs_set("khugepaged/scan_sleep_millisecs", kmod.FAST_SCAN_SLEEP_MS)
                try:
                    w.wait_scans(a["n"])
                except RuntimeError:
                    # Nothing registered: the model's khugepaged waits for a registration, as the
                    # kernel's would; there it scans the harness's sentinel mm, with the same
                    # effect on this scenario (none).
                    pass
                w.sysfs_set("khugepaged/scan_sleep_millisecs", QUIET_MS)
                return {"result": 0}
            method = self._method(step)
            assert method is not None
            kwargs, _, _ = self._bind(step, method)
            value = method(**kwargs)
        except UserError as err:
            out: dict[str, Any] = {"result": err.errno_name}
            if op in ("mmap", "mremap"):
                out["addr"] = None
            return out
        if op == "proc spawn":
            self.pids.add(a["pid"])
        elif op == "proc fork":
            self.pids.add(a["child"])
        elif op == "proc exit":
            self.pids.discard(a["pid"])
        if op in ("fault", "touch", "madvise"):
            return {"result": value}
        if op == "mremap":
            return {"result": value["result"], "addr": value["addr"]}  # mremap's errors are results
        if op == "mmap":
            return {"result": 0, "addr": value}
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            return {"result": value}
        return {"result": 0}

    def observe(self) -> Obs:
        w = self.world
        return {
            "smaps": {pid: [vma_row(e) for e in w.smaps(pid)] for pid in sorted(self.pids)},
            "files": {f["name"]: {"size": f["size"], "nrpages": f["nrpages"]} for f in w.file_ls()},
            "vmstat": w.vmstat(),
            "khugepaged": {},
        }


# ---------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------


def family(step: Step) -> str:
    """The operation family a step counts under in the figures."""
    a = step.args
    if step.op in ("fault", "touch"):
        return f"{step.op} {'write' if a['write'] else 'read'}"
    if step.op == "madvise":
        return f"madvise {a['advice']}"
    if step.op == "mmap":
        return f"mmap {'shared' if a['shared'] else 'private'}"
    return step.op


@dataclasses.dataclass
class Difference:
    """One compared value that differs. ``what``: result, access, addr, smaps, files, vmstat."""

    what: str
    key: str
    kernel: Any
    model: Any

    def aspects(self) -> set[str]:
        """What differs, coarsely: ``smaps.vmas`` (boundaries) or ``smaps.<field>``, ``vmstat.<field>``,
        ``files``, ``result``, ``access``, ``addr``."""
        if self.what == "vmstat":
            return {f"vmstat.{self.key}"}
        if self.what != "smaps":
            return {self.what}
        krows, mrows = self.kernel or [], self.model or []
        if [(r["start"], r["end"]) for r in krows] != [(r["start"], r["end"]) for r in mrows]:
            return {"smaps.vmas"}
        out: set[str] = set()
        for kr, mr in zip(krows, mrows):
            out.update(f"smaps.{f}" for f in kr if kr[f] != mr.get(f))
        return out


def _vmstat_delta(after: Obs, before: Obs, field: str) -> int:
    return int(after["vmstat"].get(field, 0)) - int(before["vmstat"].get(field, 0))


def relocated(obs: Obs, moved: Sequence[tuple[int, int, int, int]]) -> Obs:
    """``obs`` with the smaps rows of each (pid, kernel address, model address, length) moved to
    the model's address."""
    if not moved:
        return obs
    smaps = dict(obs["smaps"])
    for pid, kaddr, maddr, length in moved:
        rows = []
        for row in smaps.get(pid, []):
            if kaddr <= row["start"] < kaddr + length:
                row = {**row, "start": row["start"] - kaddr + maddr, "end": row["end"] - kaddr + maddr}
            rows.append(row)
        if pid in smaps:
            smaps[pid] = sorted(rows, key=lambda r: r["start"])
    return {**obs, "smaps": smaps}


def compare_step(
    step: Step,
    kernel_outcome: dict[str, Any],
    model_outcome: dict[str, Any],
    kernel: tuple[Obs, Obs],
    model: tuple[Obs, Obs],
    settings: Settings,
    regular: bool = False,
) -> list[Difference]:
    """What differs after ``step``: outcomes, smaps, files, vmstat deltas (``kernel``/``model``
    are (before, after) observations)."""
    diffs: list[Difference] = []
    kr, mr = kernel_outcome.get("result"), model_outcome.get("result")
    if step.op in ("fault", "touch"):
        if not settings.fine:
            kr, mr = coarse(kr), coarse(mr)
        if kr != mr:
            diffs.append(Difference("access", "", kr, mr))
    elif kr != mr:
        diffs.append(Difference("result", "", kr, mr))
    if step.op == "mmap" and step.args["addr"] is not None and kernel_outcome.get("addr") != model_outcome.get("addr"):
        diffs.append(Difference("addr", "", kernel_outcome.get("addr"), model_outcome.get("addr")))
    (kb, ka), (mb, ma) = kernel, model
    for pid in sorted(set(ka["smaps"]) | set(ma["smaps"])):
        krows, mrows = ka["smaps"].get(pid), ma["smaps"].get(pid)
        if krows != mrows:
            diffs.append(Difference("smaps", str(pid), krows, mrows))
    for name in sorted(set(ka["files"]) | set(ma["files"])):
        if ka["files"].get(name) != ma["files"].get(name):
            diffs.append(Difference("files", name, ka["files"].get(name), ma["files"].get(name)))
    if settings.vmstat:
        fields = VMSTAT_AFTER_SCANS if step.op == "wait-scans" else VMSTAT_EXACT
        for field in (*fields, *(VMSTAT_REGULAR if regular else ())):
            dk, dm = _vmstat_delta(ka, kb, field), _vmstat_delta(ma, mb, field)
            if dk != dm:
                diffs.append(Difference("vmstat", field, dk, dm))
    return diffs


def _fmt_row(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    flags = "".join(" " + f for f in r["flags"])
    return (
        f"{r['start']:#x}-{r['end']:#x} {r['perms']} off={r['offset']:#x} Rss={r['Rss']} Anon={r['Anonymous']} "
        f"ShmemPmd={r['ShmemPmdMapped']} FilePmd={r['FilePmdMapped']} Locked={r['Locked']} "
        f"THPeligible={r['THPeligible']}{flags}"
    )


def render_difference(d: Difference) -> list[str]:
    if d.what == "smaps":
        out = [f"smaps of process {d.key}:"]
        krows, mrows = d.kernel or [], d.model or []
        for i in range(max(len(krows), len(mrows))):
            kr = krows[i] if i < len(krows) else None
            mr = mrows[i] if i < len(mrows) else None
            if kr == mr:
                out.append(f"  both    {_fmt_row(kr)}")
            else:
                out.append(f"  kernel  {_fmt_row(kr)}")
                out.append(f"  model   {_fmt_row(mr)}")
        if d.kernel is None or d.model is None:
            out.append(f"  (process {d.key} exists only in the {'model' if d.kernel is None else 'kernel'})")
        return out
    if d.what == "vmstat":
        return [f"vmstat {d.key} this step: kernel {d.kernel:+d}, model {d.model:+d}"]
    label = {"result": "result", "access": "access", "addr": "address", "files": f"file {d.key}"}[d.what]
    return [f"{label}: kernel {d.kernel}, model {d.model}"]


# ---------------------------------------------------------------------------------------------
# Divergences and the known differences
# ---------------------------------------------------------------------------------------------


def steps_text(steps: Iterable[Step]) -> str:
    return "; ".join(s.line() for s in steps)


def parse_steps_text(text: str) -> list[Step]:
    """Steps from ``'line; line; ...'`` or lines (``#`` comments and blank lines skipped)."""
    return parse_scenario([part for line in text.splitlines() for part in line.split(";")])


def replay_command(steps: Sequence[Step], settings: Settings, program: str = "thpctl conformance") -> str:
    """A one-line command that runs ``steps`` again on both sides, step by step."""
    opts = [f"--huge {settings.huge}"]
    if settings.fine:
        opts.append("--fine")
    if not settings.vmstat:
        opts.append("--no-vmstat")
    opts += [f"--model-knob {n}={v}" for n, v in settings.model_knobs]
    return f"{program} {' '.join(opts)} --steps-text {shlex.quote(steps_text(steps))}"


@dataclasses.dataclass
class Divergence:
    """The first step after which the two sides differ, with everything a matcher may need."""

    index: int
    steps: list[Step]  # the sequence up to and including the diverging step
    differences: list[Difference]
    kernel_outcome: dict[str, Any]
    model_outcome: dict[str, Any]
    kernel_before: Obs
    kernel_after: Obs
    model_before: Obs
    model_after: Obs
    settings: Settings
    seed: int | None = None
    known: Known | None = None

    @property
    def step(self) -> Step:
        return self.steps[self.index]

    @property
    def history(self) -> list[Step]:
        return self.steps[: self.index]

    def aspects(self) -> set[str]:
        out: set[str] = set()
        for d in self.differences:
            out |= d.aspects()
        return out

    def signature(self) -> tuple[str, frozenset[str]]:
        return family(self.step), frozenset(self.aspects())

    def replay(self, program: str = "thpctl conformance") -> str:
        return replay_command(self.steps, self.settings, program)

    def report(self, program: str = "thpctl conformance") -> str:
        head = "known difference " + self.known.id if self.known else "UNEXPECTED divergence"
        where = f"huge={self.settings.huge}" + (f", seed {self.seed}" if self.seed is not None else "")
        lines = [f"{head} ({where}) at step {self.index + 1} of {len(self.steps)}: {self.step.line()}"]
        if self.known:
            lines.append(f"  {self.known.title}")
        for d in self.differences:
            lines += ["  " + line for line in render_difference(d)]
        lines.append(f"  replay: {self.replay(program)}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.index + 1,
            "line": self.step.line(),
            "steps": [s.line() for s in self.steps],
            "known": self.known.id if self.known else None,
            "seed": self.seed,
            "differences": [dataclasses.asdict(d) for d in self.differences],
            "replay": self.replay(),
        }


Matcher = Callable[[Divergence], bool]


@dataclasses.dataclass(frozen=True)
class Known:
    """A difference the harness knows: masked when ``matcher`` recognises a divergence.

    ``status``: ``deliberate`` (the model keeps it; ``readme`` quotes the README's "Deliberate
    differences" entry), ``open`` (a divergence not fixed yet; ``number`` in the issue's list) or
    ``harness`` (a trap of the method, handled by the harness itself). ``reproducer``: steps that
    show it, checked by :func:`check_known` under ``huge``/``fine``/``model_knobs``.
    """

    id: str
    status: str
    title: str
    reason: str
    matcher: Matcher | None = None
    reproducer: str = ""
    number: int | None = None
    readme: str = ""
    huge: str = "advise"
    fine: bool = False
    model_knobs: tuple[tuple[str, str], ...] = ()
    # Where a reproducer cannot show it (the harness avoids it by construction).
    unreachable: str = ""

    def settings(self, base: Settings) -> Settings:
        return base.replace(huge=self.huge, fine=self.fine, model_knobs=self.model_knobs)


# -- matcher helpers ---------------------------------------------------------------------------






def _smaps_pairs(div: Divergence) -> Iterable[tuple[int, dict[str, Any], dict[str, Any]]]:
    """(pid, kernel row, model row) for VMAs with the same boundaries on both sides."""
    for d in div.differences:
        if d.what != "smaps" or d.kernel is None or d.model is None:
            continue
        mrows = {(r["start"], r["end"]): r for r in d.model}
        for kr in d.kernel:
            mr = mrows.get((kr["start"], kr["end"]))
            if mr is not None and mr != kr:
                yield int(d.key), kr, mr


def _only(div: Divergence, allowed: Iterable[str]) -> bool:
    allowed = set(allowed)
    return all(any(a == x or (x.endswith(".*") and a.startswith(x[:-1])) for x in allowed) for a in div.aspects())


def _vm(div: Divergence, field: str) -> tuple[int, int]:
    for d in div.differences:
        if d.what == "vmstat" and d.key == field:
            return int(d.kernel), int(d.model)
    return 0, 0






ACCESS_OPS = ("fault", "touch")


def _faulting(div: Divergence) -> bool:
    s = div.step
    return s.op in ACCESS_OPS or (s.op == "madvise" and s.args["advice"] in ("populate_read", "populate_write"))
























def _large_folio_file(div: Divergence) -> bool:
    first = div.steps[0]
    return first.op == "file create" and not first.args["shmem"] and first.args.get("fs") == "large-folio"


def _lf_orders(div: Divergence) -> bool:
    """Only how many pages are cached or mapped differs, in a sequence on a large-folio file:
    ext4's folios below PMD order (readahead at EOF and its async windows, the non-uniform split
    at truncate) are small pages in the model. Every PMD-order folio and mapping agrees."""
    if not _large_folio_file(div) or not _only(div, ("smaps.Rss", "files")):
        return False
    return _faulting(div) or div.step.op == "file truncate"


def _install_pmd(div: Divergence) -> bool:
    s = div.step
    if ("thpsplit/install_pmd", "1") not in div.settings.model_knobs:
        return False
    return s.op == "madvise" and s.args["advice"] == "collapse" and any(
        mr["ShmemPmdMapped"] > kr["ShmemPmdMapped"] and "nh" not in kr["flags"] for _, kr, mr in _smaps_pairs(div)
    )


_SETUP = "file create c --size 4M --shmem; proc spawn 1; "

KNOWN: tuple[Known, ...] = (
    Known(
        "install-pmd",
        "deliberate",
        "install_pmd=1: the remapper maps the PMD in every mm right after retracting",
        "Kirill's design: mapping the THP is the remapper's job. khugepaged (and MADV_COLLAPSE for "
        "other mms) leaves the PMD none for the next fault; the harness runs the model with "
        "install_pmd=0, and the reproducer shows the default still differs.",
        matcher=_install_pmd,
        reproducer=_SETUP + "file write c 0 2M; proc spawn 2; mmap 1 0x40000000 2M --file c --prot rw --shared; "
        "mmap 2 0x40000000 2M --file c --prot rw --shared; touch 2 0x40000000 2M --stride 64K; "
        "madvise 1 0x40000000 2M collapse",
        readme="`install_pmd=1` (default) makes the remapper map the PMD right after retracting — its job "
        "in Kirill's design",
        model_knobs=(("thpsplit/install_pmd", "1"),),
    ),
    Known(
        "khugepaged-timing",
        "deliberate",
        "khugepaged's timing: when a pass runs, and what it walks",
        "The model's khugepaged walks the ranges the remapper registered, on the virtual clock; the "
        "kernel's walks VMAs every scan_sleep_millisecs in real time. The step mode keeps both asleep "
        "(quiet_khugepaged; a day-long scan_sleep in the model); the khugepaged mode compares only what "
        "two full scans leave (PMD mappings after a re-fault, THP counts), never when.",
        readme="khugepaged walks the ranges the remapper registered (per mm, like its mm slots) rather "
        "than taking each mm's mmap_lock to walk VMAs.",
        unreachable="no matcher: the modes compare no timing",
    ),
    Known(
        "#14",
        "harness",
        "a scenario's first registration wakes an idle khugepaged at once",
        "khugepaged_wait_work() waits without a timeout while no mm is registered; __khugepaged_enter() "
        "wakes it. quiet_khugepaged() registers a sentinel mm first and sets a day-long sleep; a step "
        "during which khugepaged's full_scans moved anyway is reported as inconclusive, never compared.",
        number=14,
        unreachable="handled by quiet_khugepaged (tests/test_kernel_backend.py checks it)",
    ),
    Known(
        "large-folio-orders",
        "deliberate",
        "a large-folio file's folios below PMD order are small pages in the model",
        "page_cache_ra_order() lowers the order at EOF and page_cache_async_ra() raises it by two "
        "per window (mm/readahead.c); finish_fault() and filemap_map_pages() map such a folio whole "
        "where it lies inside the VMA and the page table, and truncate_inode_partial_folio() -> "
        "try_folio_split() unmaps a folio it splits (mm/truncate.c). The model has small and "
        "PMD-order folios only, so only Rss and the page-cache count can differ; every PMD-order "
        "folio and PMD mapping is compared as usual.",
        matcher=_lf_orders,
        reproducer="file create c --size 3M --fs large-folio; proc spawn 1; "
        "mmap 1 0x40000000 4M --file c --prot r --private; madvise 1 0x40000000 4M hugepage; fault 1 0x40200000",
        readme="A `large-folio` file's folios below PMD order",
    ),
)


def known_by_id(entry_id: str, table: Sequence[Known] = KNOWN) -> Known:
    for k in table:
        if k.id == entry_id:
            return k
    raise KeyError(entry_id)


# ---------------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SequenceResult:
    steps: list[Step]
    seed: int | None = None
    agreed: list[str] = dataclasses.field(default_factory=list)  # families of steps that agreed
    unsupported: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (family, reason)
    divergence: Divergence | None = None
    inconclusive: str = ""  # why the comparison stopped without a verdict (#14)
    noise: bool = False  # a divergence that did not come back on a second run
    noise_report: str = ""
    diverging_family: str = ""
    scans: int = 0  # wait-scans steps that agreed
    collapsing_scans: int = 0  # ... during which the kernel's khugepaged collapsed something

    @property
    def unexpected(self) -> bool:
        return self.divergence is not None and self.divergence.known is None


class Harness:
    """Runs sequences on a kernel backend and a model backend side by side.

    Args:
        kernel: the real kernel's side (a :class:`KernelSide`; any :class:`Backend` in tests).
        model: makes the model's side for given settings (default :class:`ModelBackend`).
        settings: how to compare.
        known: the known-difference table.
    """

    def __init__(
        self,
        kernel: Backend,
        settings: Settings | None = None,
        model: Callable[[Settings], Backend] | None = None,
        known: Sequence[Known] = KNOWN,
    ):
        self.kernel = kernel
        self.settings = settings or Settings()
        self.model_factory: Callable[[Settings], Backend] = model or ModelBackend
        self.known = tuple(known)
        self._models: dict[Settings, Backend] = {}

    def _model(self) -> Backend:
        model = self._models.get(self.settings)
        if model is None:
            model = self._models[self.settings] = self.model_factory(self.settings)
        return model

    def classify(self, div: Divergence) -> Known | None:
        for k in self.known:
            if k.matcher is not None and k.matcher(div):
                return k
        return None

    def run(self, steps: Sequence[Step], seed: int | None = None, confirm: bool = True) -> SequenceResult:
        """Run ``steps`` on both sides from a fresh state, comparing after each; stop at the
        first difference (classified against the known table) or an inconclusive step."""
        steps = list(steps)
        result = SequenceResult(steps, seed)
        kernel, model = self.kernel, self._model()
        kernel.start()
        model.start()
        moved: list[tuple[int, int, int, int]] = []
        kb, mb = kernel.observe(), model.observe()
        max_ptes_none = dict(self.settings.kernel_knobs).get("khugepaged/max_ptes_none", "511")
        regular = any(s.op == "file create" and not s.args["shmem"] for s in steps)
        for i, step in enumerate(steps):
            fam = family(step)
            if step.op == "sysfs set" and step.args["knob"] == "khugepaged/max_ptes_none":
                max_ptes_none = str(step.args["value"])
            if step.op == "wait-scans":
                fam = f"wait-scans (max_ptes_none={max_ptes_none})"
            reason = model.unsupported(step) or kernel.unsupported(step)
            if reason:
                result.unsupported.append((fam, reason))
                continue
            ko = kernel.step(step)
            mo = model.step(step)
            if (
                step.op == "mremap"
                and ko.get("result") == 0 == mo.get("result")
                and ko.get("addr") not in (None, mo.get("addr"))
                and mo.get("addr") is not None
            ):
                # Where a moving mremap puts the VMA is get_unmapped_area's choice in an address
                # space laid out differently (ASLR, the helper's own mappings): compared at the
                # model's address from here on.
                moved.append((step.args["pid"], ko["addr"], mo["addr"], step.args["new_length"]))
            elif step.op == "proc fork":
                child = step.args["child"]
                moved += [(child, k, m_, n) for pid, k, m_, n in moved if pid == step.args["pid"]]
            ka, ma = relocated(kernel.observe(), moved), model.observe()
            scans = ka["khugepaged"].get("full_scans", 0) - kb["khugepaged"].get("full_scans", 0)
            if scans and step.op != "wait-scans":
                result.inconclusive = f"#14: khugepaged ran {scans} full scan(s) during step {i + 1}"
                result.diverging_family = fam
                return result
            diffs = compare_step(step, ko, mo, (kb, ka), (mb, ma), self.settings, regular)
            if diffs:
                div = Divergence(i, steps[: i + 1], diffs, ko, mo, kb, ka, mb, ma, self.settings, seed)
                div.known = self.classify(div)
                vmstat_only = all(d.what == "vmstat" for d in diffs)
                if confirm and (div.known is None or vmstat_only):
                    # Reported only if it comes back: the kernel side is not deterministic to
                    # the page (docs/CONFORMANCE.md: "vmstat is machine-wide").
                    again = self.run(steps[: i + 1], seed, confirm=False).divergence
                    if again is None or again.index != i or again.signature() != div.signature():
                        result.noise = True
                        result.noise_report = div.report()
                        result.diverging_family = fam
                        return result
                result.divergence = div
                result.diverging_family = fam
                return result
            result.agreed.append(fam)
            if step.op == "wait-scans":
                result.scans += 1
                result.collapsing_scans += _vmstat_delta(ka, kb, "nr_shmem_hugepages") > 0
            kb, mb = ka, ma
        return result

    def shrink(self, div: Divergence, budget_s: float = 120.0) -> Divergence:
        """Remove steps while the sequence still diverges at its last step the same way (same
        family, same aspects); returns the smallest divergence found (within ``budget_s``)."""
        sig = div.signature()
        best = div
        deadline = time.monotonic() + budget_s
        changed = True
        while changed and time.monotonic() < deadline:
            changed = False
            for j in range(len(best.steps) - 2, -1, -1):
                cand = best.steps[:j] + best.steps[j + 1 :]
                try:
                    got = self.run(cand, best.seed).divergence
                except (BackendError, ScenarioError, OSError):
                    continue
                if (
                    got is not None
                    and got.index == len(cand) - 1
                    and got.signature() == sig
                    and (got.known is None) == (div.known is None)
                ):
                    best = got
                    changed = True
                    break
                if time.monotonic() > deadline:
                    break
        return best


@dataclasses.dataclass
class KnownCheck:
    known: Known
    verdict: str  # "diverges as listed", "now agrees: remove it from the table", "diverges differently", "not checkable"
    detail: str = ""

    @property
    def stale(self) -> bool:
        return self.verdict.startswith(("now agrees", "diverges differently"))


def check_known(
    harness_for: Callable[[Settings], Harness | None],
    base: Settings | None = None,
    table: Sequence[Known] = KNOWN,
    ids: Iterable[str] | None = None,
) -> list[KnownCheck]:
    """Run every entry's reproducer (on the harness ``harness_for`` gives for the entry's settings,
    None: no kernel backend for them): an entry that no longer diverges (or diverges otherwise
    than its matcher recognises) is stale."""
    out = []
    base = base or Settings()
    wanted = set(ids) if ids is not None else None
    for k in table:
        if wanted is not None and k.id not in wanted:
            continue
        if not k.reproducer:
            out.append(KnownCheck(k, "not checkable", k.unreachable))
            continue
        h = harness_for(k.settings(base))
        if h is None:
            out.append(KnownCheck(k, "not checkable", f"no kernel backend for huge={k.huge} in this run"))
            continue
        steps = parse_steps_text(k.reproducer)
        regular = any(s.op == "file create" and not s.args["shmem"] for s in steps)
        if regular and (why := kmod.ext4_unavailable()) is not None:
            out.append(KnownCheck(k, "not checkable", why))
            continue
        for _ in range(3):  # a noisy or inconclusive run says nothing: try again
            res = h.run(steps)
            if not (res.noise or res.inconclusive):
                break
        div = res.divergence
        if div is None:
            if res.noise or res.inconclusive:
                out.append(KnownCheck(k, "not checkable", res.inconclusive or f"noise three times:\n{res.noise_report}"))
            else:
                out.append(KnownCheck(k, "now agrees: remove it from the table", "both sides agree on every step"))
        elif div.known is not None and div.known.id == k.id:
            out.append(KnownCheck(k, "diverges as listed", f"at step {div.index + 1}: {div.step.line()}"))
        else:
            other = f"matched {div.known.id}" if div.known else "unmatched"
            out.append(KnownCheck(k, "diverges differently", f"{other} at step {div.index + 1}: {div.step.line()}\n{div.report()}"))
    return out


# ---------------------------------------------------------------------------------------------
# Random sequences
# ---------------------------------------------------------------------------------------------


class Draw(Protocol):
    def choice(self, options: Sequence[T]) -> T: ...

    def below(self, n: int) -> int: ...

    def chance(self, percent: int) -> bool: ...


class RandomDraw:
    """Draws from a seeded :class:`random.Random` (the command line's generator)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def choice(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def below(self, n: int) -> int:
        return self.rng.randrange(n)

    def chance(self, percent: int) -> bool:
        return self.rng.randrange(100) < percent


class HypothesisDraw:
    """Draws through hypothesis (``draw`` of a composite strategy): shrinks toward the first
    option, 0 and False."""

    def __init__(self, draw: Callable[[Any], Any]):
        self.draw = draw

    def choice(self, options: Sequence[T]) -> T:
        from hypothesis import strategies as st

        result: T = self.draw(st.sampled_from(options))
        return result

    def below(self, n: int) -> int:
        from hypothesis import strategies as st

        value: int = self.draw(st.integers(0, n - 1))
        return value

    def chance(self, percent: int) -> bool:
        return self.below(100) >= 100 - percent


# madvise advice by weight: the ones that make, map or drop THPs most (three quarters of the
# draws), every other advice of the table a little.
_THP_ADVICE_WEIGHTS = {
    "hugepage": 10,
    "nohugepage": 6,
    "dontneed": 6,
    "populate_read": 4,
    "populate_write": 4,
    "pageout": 2,
    "collapse": 6,
}
_ADVICE_WEIGHTS = tuple((a.value, _THP_ADVICE_WEIGHTS.get(a, 1)) for a in ADVICE)

_STEP_FAMILIES = (
    ("touch", 12),
    ("fault", 7),
    ("madvise", 22),
    ("collapse", 5),
    ("munmap", 6),
    ("mmap", 6),
    ("fork", 4),
    ("exit", 3),
    ("truncate", 4),
    ("punch", 5),
    ("write", 3),
    ("other-syscall", 6),
)
# The khugepaged mode's set-up: no MADV_COLLAPSE, no truncation (what khugepaged finds is the point).
_KH_FAMILIES = (
    ("touch", 12),
    ("fault", 6),
    ("madvise", 14),
    ("munmap", 4),
    ("mmap", 4),
    ("fork", 3),
    ("exit", 2),
    ("punch", 5),
    ("write", 4),
)


def _weighted(draw: Draw, table: Sequence[tuple[str, int]]) -> str:
    total = sum(w for _, w in table)
    n = draw.below(total)
    for name, w in table:
        if n < w:
            return name
        n -= w
    raise AssertionError


def _range(draw: Draw, base: int, span: int) -> tuple[int, int]:
    """A range around [base, base + span): whole, a PMD, a page, partial, an unaligned length,
    across the end into the neighbour, beyond the end, an unaligned address, or empty."""
    pages = span // 4096
    kind = draw.choice(("whole", "pmd", "partial", "page", "cross", "unaligned_len", "beyond", "unaligned", "empty"))
    if kind == "whole":
        return base, span
    if kind == "pmd":
        return base + draw.below(span // PMD) * PMD, PMD
    if kind == "page":
        return base + draw.below(pages) * 4096, 4096
    if kind == "partial":
        s = draw.below(pages)
        e = s + 1 + draw.below(pages - s)
        return base + s * 4096, (e - s) * 4096
    if kind == "cross":
        s = 1 + draw.below(pages - 1)
        return base + s * 4096, span - s * 4096 + draw.choice((4096, 1 * M + 4096, PMD))
    if kind == "unaligned_len":
        return base + draw.below(pages) * 4096, 1 + draw.below(3 * M)
    if kind == "beyond":
        return base + span - draw.choice((4096, PMD)), draw.choice((PMD, 2 * PMD))
    if kind == "unaligned":
        return base + draw.below(pages) * 4096 + 1, 4096
    return base + draw.below(pages) * 4096, 0


def _size(v: int) -> str:
    for suffix, unit in (("M", M), ("K", K)):
        if v and v % unit == 0:
            return f"{v // unit}{suffix}"
    return str(v)


def _access_step(draw: Draw, fam: str, pid: int, write_pct: int) -> str:
    """A generator's touch (a range of the mapping, one of four strides) or fault (anywhere in
    twice the file's span) line, writing ``write_pct`` percent of the time."""
    if fam == "touch":
        s, ln = _range(draw, A, 4 * M)
        stride = draw.choice((4096, 64 * K, 512 * K, PMD))
        write = " --write" if draw.chance(write_pct) else ""
        return f"touch {pid} {s:#x} {max(ln, 1)}{write}" + (f" --stride {_size(stride)}" if stride != 4096 else "")
    addr = A + draw.below(2 * FILE_SIZE // 4096) * 4096
    return f"fault {pid} {addr:#x}" + (" --write" if draw.chance(write_pct) else "")


def _fork_or_exit(fam: str, pid: int, pids: list[int], next_pid: int, lines: list[str]) -> int:
    """A generator's fork (up to three processes) or exit (never the last): the line, the pids
    alive after it; returns the next new pid."""
    if fam == "fork" and len(pids) < 3:
        lines.append(f"proc fork {pid} {next_pid}")
        pids.append(next_pid)
        return next_pid + 1
    if fam == "exit" and len(pids) > 1:
        lines.append(f"proc exit {pid}")
        pids.remove(pid)
    return next_pid


def generate(draw: Draw, steps: int = 12, mode: str = "step", exact: bool = True) -> list[Step]:
    """A random sequence on a 4 MiB shmem file mapped at :data:`A`.

    ``step`` mode: touch and fault (read/write), madvise with every advice of shared.vm's
    table (the THP ones most) over aligned, unaligned, partial and cross-VMA ranges,
    MADV_COLLAPSE, munmap inside and across PMDs, a second mmap beside or over the first (merging),
    fork and exit, truncate, hole punching, writes, and the syscalls the model lacks so far.
    ``khugepaged`` mode: ``sysfs set khugepaged/max_ptes_none`` 0, 255 or 511 first, a set-up of
    the same kind (no collapse, no truncation), then ``wait-scans 2`` and a re-fault of every PMD.
    ``large-folio`` mode: :func:`generate_large_folio`.
    ``exact``: exactly ``steps`` random steps (else 1 to ``steps``, for shrinking).
    """
    if mode == "large-folio":
        return generate_large_folio(draw, steps, exact)
    shared = draw.chance(60)
    lines = [f"file create {FILE} --size 4M --shmem"]
    if mode == "khugepaged":
        # Before any mm is registered, so that no pass runs under the default.
        lines.append(f"sysfs set khugepaged/max_ptes_none {draw.choice(MAX_PTES_NONE)}")
        lines.append(f"file write {FILE} 0 {draw.choice(('4M', '2M', '3M', '1M', '2052K', '4K'))}")
    elif draw.chance(25):
        lines.append(f"file write {FILE} 0 {draw.choice(('4M', '2M', '64K', '4K'))}")
    lines.append("proc spawn 1")
    lines.append(f"mmap 1 {A:#x} 4M --file {FILE} --prot rw {'--shared' if shared else '--private'}")
    if mode == "khugepaged":
        # Mostly twice: 6.18 registers a shmem mm only at a second MADV_HUGEPAGE
        # (hugepage_madvise; tests/test_collapse_file.py), so once leaves khugepaged out.
        lines += [f"madvise 1 {A:#x} 4M hugepage"] * (2 if draw.chance(80) else 1)
    pids = [1]
    next_pid = 2
    n = steps if exact else 1 + draw.below(steps)
    table = _KH_FAMILIES if mode == "khugepaged" else _STEP_FAMILIES
    for _ in range(n):
        fam = _weighted(draw, table)
        pid = draw.choice(pids)
        if fam in ("touch", "fault"):
            lines.append(_access_step(draw, fam, pid, write_pct=50))
        elif fam in ("madvise", "collapse"):
            if fam == "collapse":
                advice = "collapse"
            else:
                advice = _weighted(draw, tuple((a, w) for a, w in _ADVICE_WEIGHTS if mode == "step" or a != "collapse"))
            s, ln = _range(draw, A, 4 * M)
            lines.append(f"madvise {pid} {s:#x} {ln} {advice}")
        elif fam == "munmap":
            s, ln = _range(draw, A, 4 * M)
            lines.append(f"munmap {pid} {s:#x} {ln}")
        elif fam == "mmap":
            where = draw.choice((A + 4 * M, A + 2 * M, A + 1 * M, A + 6 * M, A - PMD))
            length = draw.choice((PMD, 4 * M, M))
            offset = draw.choice(("contiguous", 0, PMD, 4 * M))
            off = (where - A) if offset == "contiguous" and where >= A else (0 if offset == "contiguous" else offset)
            assert isinstance(off, int)
            prot = draw.choice(("rw", "r"))
            kind = "--shared" if draw.chance(60) else "--private"
            reopen = " --reopen" if draw.chance(20) else ""  # a new open(2): no merge with the first
            lines.append(
                f"mmap {pid} {where:#x} {_size(length)} --file {FILE}"
                + (f" --offset {_size(off)}" if off else "")
                + f" --prot {prot} {kind}{reopen}"
            )
        elif fam in ("fork", "exit"):
            next_pid = _fork_or_exit(fam, pid, pids, next_pid, lines)
        elif fam == "truncate":
            lines.append(f"file truncate {FILE} {draw.choice(('3M', '1M', '2M', '1052672', '0', '4M', '6M', '8M'))}")
        elif fam == "punch":
            s, ln = _range(draw, 0, FILE_SIZE)
            lines.append(f"file punch {FILE} {s} {max(ln, 1)}")
        elif fam == "write":
            s, ln = _range(draw, 0, FILE_SIZE)
            lines.append(f"file write {FILE} {s & ~4095} {max(ln, 1)}")
        elif fam == "other-syscall":
            s, ln = _range(draw, A, 4 * M)
            call = draw.choice(("mprotect", "mlock", "munlock", "mremap"))
            if call == "mprotect":
                lines.append(f"mprotect {pid} {s:#x} {ln} {draw.choice(('r', 'rw', 'none'))}")
            elif call == "mremap":
                old = draw.choice((PMD, M))
                new = draw.choice((M, 4 * M, PMD))
                # A move goes to a fixed address: where mremap(MREMAP_MAYMOVE) puts a mapping is the
                # kernel's get_unmapped_area (randomized), which the model does not reproduce.
                to = f" --to {A + 16 * M:#x}" if draw.chance(50) else ""
                lines.append(f"mremap {pid} {draw.choice((A, A + PMD)):#x} {_size(old)} {_size(new)}{to}")
            else:
                lines.append(f"{call} {pid} {s:#x} {ln}")
    if mode == "khugepaged":
        lines.append("wait-scans 2")
        for pid in pids:
            lines.append(f"touch {pid} {A:#x} 8M --stride 2M")
    return parse_scenario(lines)


# The large-folio mode: a regular file on ext4, the operations that apply to one.
_LF_FAMILIES = (
    ("touch", 12),
    ("fault", 8),
    ("madvise", 18),
    ("munmap", 5),
    ("mmap", 5),
    ("fork", 4),
    ("exit", 3),
    ("truncate", 4),
)
# The readahead hints, MADV_WILLNEED and MADV_COLD act on a regular file's page cache as on no shmem.
_LF_ADVICE = (
    ("hugepage", 6),
    ("nohugepage", 3),
    ("collapse", 3),
    ("dontneed", 3),
    ("populate_read", 3),
    ("random", 2),
    ("sequential", 2),
    ("normal", 1),
    ("willneed", 2),
    ("cold", 1),
)


def generate_large_folio(draw: Draw, steps: int = 12, exact: bool = True) -> list[Step]:
    """A random sequence on a regular file of the ``large-folio`` kind (ext4 on the kernel side),
    mapped read-only (``r`` or ``rx``, shared or private) at :data:`A`: touch and fault (reads;
    a write now and then, which faults SIGSEGV on both), madvise hugepage, nohugepage, collapse,
    dontneed, populate_read, the readahead hints, willneed and cold over the ranges of
    :func:`_range`, munmap, a second mapping, fork and exit, truncate. The file is 4 MiB, or 3 MiB now and then (a partial PMD at EOF)."""
    size = draw.choice(("4M", "4M", "4M", "3M"))
    lines = [f"file create {FILE} --size {size} --fs large-folio", "proc spawn 1"]
    prots = ("r", "rx")
    lines.append(f"mmap 1 {A:#x} 4M --file {FILE} --prot {draw.choice(prots)} {'--shared' if draw.chance(50) else '--private'}")
    if draw.chance(60):
        lines.append(f"madvise 1 {A:#x} 4M hugepage")
    pids = [1]
    next_pid = 2
    n = steps if exact else 1 + draw.below(steps)
    for _ in range(n):
        fam = _weighted(draw, _LF_FAMILIES)
        pid = draw.choice(pids)
        if fam in ("touch", "fault"):
            lines.append(_access_step(draw, fam, pid, write_pct=10))
        elif fam == "madvise":
            s, ln = _range(draw, A, 4 * M)
            lines.append(f"madvise {pid} {s:#x} {ln} {_weighted(draw, _LF_ADVICE)}")
        elif fam == "munmap":
            s, ln = _range(draw, A, 4 * M)
            lines.append(f"munmap {pid} {s:#x} {ln}")
        elif fam == "mmap":
            where = draw.choice((A + 4 * M, A + 2 * M, A + 1 * M, A + 6 * M, A - PMD))
            length = draw.choice((PMD, 4 * M, M))
            off = draw.choice((0, PMD, (where - A) if where >= A else 0))
            kind = "--shared" if draw.chance(50) else "--private"
            lines.append(
                f"mmap {pid} {where:#x} {_size(length)} --file {FILE}"
                + (f" --offset {_size(off)}" if off else "")
                + f" --prot {draw.choice(prots)} {kind}"
            )
        elif fam in ("fork", "exit"):
            next_pid = _fork_or_exit(fam, pid, pids, next_pid, lines)
        elif fam == "truncate":
            lines.append(f"file truncate {FILE} {draw.choice(('3M', '1M', '2M', '1052672', '0', '4M', '6M'))}")
    return parse_scenario(lines)


def sequences(steps: int = 12, mode: str = "step") -> Any:
    """A hypothesis strategy of sequences (1 to ``steps`` random steps after the set-up)."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw: Callable[[Any], Any]) -> list[Step]:
        return generate(HypothesisDraw(draw), steps, mode, exact=False)

    return build()


def with_max_ptes_none(steps: list[Step], value: int) -> list[Step]:
    """``steps`` with every ``sysfs set khugepaged/max_ptes_none`` set to ``value``."""
    out = []
    for s in steps:
        if s.op == "sysfs set" and s.args["knob"] == "khugepaged/max_ptes_none":
            s = Step(s.op, {**s.args, "value": value})
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------------
# The kernel side's session and figures
# ---------------------------------------------------------------------------------------------


def kernel_unavailable() -> str | None:
    """Why the kernel side cannot run here (one line), or None."""
    reason = thp_available()
    if reason:
        return reason
    if not kmod.os.path.exists(f"{kmod.THP}/shmem_enabled"):
        return "this kernel has no shmem THP (no transparent_hugepage/shmem_enabled)"
    return None


class KernelSession:
    """The kernel side for a run: a :class:`SysfsGuard` (every knob put back and verified on
    exit), khugepaged kept asleep (:func:`quiet_khugepaged`), one :class:`KernelBackend` per tmpfs
    ``huge=`` option, and the kernel's THP knobs read for the model to mirror.

    Raises:
        BackendError: the kernel side cannot run here (the reason).
    """

    def __init__(self, huge: Sequence[str] = ("advise",), size: str = "64M"):
        self.huge = tuple(huge)
        self.size = size
        self.guard: SysfsGuard | None = None
        self.backends: dict[str, KernelBackend] = {}
        self.kernel_knobs: tuple[tuple[str, str], ...] = ()

    def __enter__(self) -> Self:
        reason = kernel_unavailable()
        if reason:
            raise BackendError(reason)
        self.guard = SysfsGuard().__enter__()
        try:
            quiet_khugepaged(self.guard)
            self.kernel_knobs = (
                *((k, read_knob(k)) for k in MIRRORED_KNOBS),
                ("thpsplit/swap", "1" if swap_active() else "0"),
            )
            for huge in self.huge:
                self.backends[huge] = KernelBackend(huge=huge, size=self.size, guard=self.guard)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for kb in self.backends.values():
                kb.close()
            self.backends.clear()
        finally:
            if self.guard is not None:
                guard, self.guard = self.guard, None
                guard.__exit__(*exc)

    def settings(self, base: Settings) -> Settings:
        return base.replace(kernel_knobs=self.kernel_knobs)

    def harness(self, base: Settings, known: Sequence[Known] = KNOWN) -> Harness:
        """A harness on the backend for ``base.huge`` (KeyError: the session has none)."""
        return Harness(KernelSide(self.backends[base.huge]), self.settings(base), known=known)

    def harness_for(self, base: Settings) -> Harness | None:
        return self.harness(base) if base.huge in self.backends else None


FAMILY_COLUMNS = ("agreed", "known", "unexpected", "noise", "inconclusive", "unsupported")


@dataclasses.dataclass
class Figures:
    """Counts over a run of sequences."""

    mode: str
    huge: str
    sequences: int = 0
    agreed: int = 0  # sequences with no divergence at all
    noise: int = 0
    inconclusive: int = 0
    families: dict[str, Counter[str]] = dataclasses.field(default_factory=dict)
    known: Counter[str] = dataclasses.field(default_factory=Counter)
    unexpected: list[Divergence] = dataclasses.field(default_factory=list)
    noise_reports: list[str] = dataclasses.field(default_factory=list)
    steps_compared: int = 0
    scans: int = 0
    collapsing_scans: int = 0
    seconds: float = 0.0

    def _fam(self, name: str) -> Counter[str]:
        return self.families.setdefault(name, Counter())

    def add(self, r: SequenceResult) -> None:
        self.sequences += 1
        for fam in r.agreed:
            self._fam(fam)["agreed"] += 1
        for fam, _ in r.unsupported:
            self._fam(fam)["unsupported"] += 1
        self.steps_compared += len(r.agreed)
        self.scans += r.scans
        self.collapsing_scans += r.collapsing_scans
        if r.divergence is not None:
            self.steps_compared += 1
            if r.divergence.known is not None:
                self.known[r.divergence.known.id] += 1
                self._fam(r.diverging_family)["known"] += 1
            else:
                self.unexpected.append(r.divergence)
                self._fam(r.diverging_family)["unexpected"] += 1
        elif r.noise:
            self.noise += 1
            self.noise_reports.append(r.noise_report)
            self._fam(r.diverging_family)["noise"] += 1
        elif r.inconclusive:
            self.inconclusive += 1
            self._fam(r.diverging_family)["inconclusive"] += 1
        else:
            self.agreed += 1

    def render(self) -> str:
        head = (
            f"mode {self.mode}, huge={self.huge}: {self.sequences} sequences, {self.steps_compared} steps compared, "
            f"{self.agreed} sequences agreed throughout, {sum(self.known.values())} stopped at a known difference, "
            f"{len(self.unexpected)} unexpected, {self.noise} noise, {self.inconclusive} inconclusive ({self.seconds:.0f} s)"
        )
        out = [
            head,
            "",
            f"{'family':34} {'agreed':>7} {'known':>6} {'unexp.':>6} {'noise':>5} {'incon.':>6} {'unsupp.':>7} {'agreement':>9}",
        ]
        for name in sorted(self.families):
            c = self.families[name]
            judged = c["agreed"] + c["known"] + c["unexpected"]
            pct = f"{100 * c['agreed'] / judged:.1f}%" if judged else "-"
            out.append(
                f"{name:34} {c['agreed']:7} {c['known']:6} {c['unexpected']:6} {c['noise']:5} {c['inconclusive']:6} "
                f"{c['unsupported']:7} {pct:>9}"
            )
        if self.scans:
            out += ["", f"wait-scans steps agreed: {self.scans}, in {self.collapsing_scans} of them khugepaged collapsed a range"]
        if self.known:
            out += ["", "stopped at known differences: " + ", ".join(f"{k} {n}" for k, n in sorted(self.known.items(), key=_id_order))]
        for report in self.noise_reports:
            out += ["", "noise (did not come back on a second run):", *("  " + line for line in report.splitlines())]
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "huge": self.huge,
            "sequences": self.sequences,
            "steps_compared": self.steps_compared,
            "scans": self.scans,
            "collapsing_scans": self.collapsing_scans,
            "agreed": self.agreed,
            "noise": self.noise,
            "inconclusive": self.inconclusive,
            "known": dict(self.known),
            "families": {k: dict(v) for k, v in sorted(self.families.items())},
            "unexpected": [d.to_json() for d in self.unexpected],
            "noise_reports": self.noise_reports,
            "seconds": round(self.seconds, 1),
        }


def _id_order(item: tuple[str, int]) -> tuple[int, str]:
    key = item[0]
    return (int(key[1:]) if key.startswith("#") and key[1:].isdigit() else -1, key)


def run_seeds(
    harness: Harness,
    seeds: Iterable[int],
    steps: int = 12,
    mode: str = "step",
    max_ptes_none: int | None = None,
    shrink: bool = True,
    on_unexpected: Callable[[Divergence], None] | None = None,
) -> Figures:
    """One generated sequence per seed; unexpected divergences shrunk (when ``shrink``)."""
    figures = Figures(mode, harness.settings.huge)
    t0 = time.monotonic()
    for seed in seeds:
        seq = generate(RandomDraw(seed), steps, mode)
        if max_ptes_none is not None:
            seq = with_max_ptes_none(seq, max_ptes_none)
        result = harness.run(seq, seed)
        if result.unexpected and shrink:
            assert result.divergence is not None
            result.divergence = harness.shrink(result.divergence)
            result.divergence.seed = seed
        figures.add(result)
        if result.unexpected and on_unexpected is not None:
            assert result.divergence is not None
            on_unexpected(result.divergence)
    figures.seconds = time.monotonic() - t0
    return figures


def trace(harness: Harness, steps: Sequence[Step], out: TextIO) -> SequenceResult:
    """Run ``steps`` and print each with both sides' outcomes (a replay for a human)."""
    result = harness.run(steps, confirm=False)
    shown = steps[: result.divergence.index + 1] if result.divergence else steps
    for i, step in enumerate(shown):
        mark = "  <<< differs" if result.divergence and i == result.divergence.index else ""
        out.write(f"{i + 1:3}  {step.line()}{mark}\n")
    out.writelines(f"     skipped ({fam}): {reason}\n" for fam, reason in result.unsupported)
    if result.divergence:
        out.write(result.divergence.report() + "\n")
    elif result.inconclusive:
        out.write(f"inconclusive: {result.inconclusive}\n")
    else:
        out.write(f"both sides agree on all {len(result.agreed)} compared steps\n")
    return result


# ---------------------------------------------------------------------------------------------
# Command line (python -m shared.sim.conformance, and thpctl conformance)
# ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    p.add_argument("--seeds", type=int, default=20, metavar="N", help="random sequences to run per mode (default 20)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="the first seed (default 0)")
    p.add_argument("--steps", type=int, default=12, metavar="K", help="random steps per sequence (default 12)")
    p.add_argument(
        "--mode",
        choices=("step", "khugepaged", "both", "large-folio"),
        default="step",
        help="step by step, after khugepaged scans, or both (shmem); large-folio: step by step on a regular file on ext4 (default: %(default)s)",
    )
    p.add_argument("--huge", choices=(*HUGE_CHOICES, "both"), default="advise", help="tmpfs huge= (the model's shmem_enabled)")
    p.add_argument("--max-ptes-none", type=int, choices=MAX_PTES_NONE, default=None, help="khugepaged mode: pin it (default: drawn per sequence)")
    p.add_argument("--replay", metavar="FILE", help="run the steps of FILE ('-': stdin) step by step and show both sides")
    p.add_argument("--steps-text", metavar="'LINE; LINE'", help="as --replay, the steps given inline")
    p.add_argument("--fine", action="store_true", help="compare hit/minor/major per access too")
    p.add_argument("--no-vmstat", dest="vmstat", action="store_false", help="do not compare vmstat deltas")
    p.add_argument("--no-shrink", dest="shrink", action="store_false", help="report unexpected divergences unshrunk")
    p.add_argument("--no-check-known", dest="check_known", action="store_false", help="skip the known-difference reproducers")
    p.add_argument("--model-knob", action="append", default=[], metavar="NAME=VALUE", help="an extra model knob (sysfs name)")
    p.add_argument("--skip-unavailable", action="store_true", help="exit 0 (not 77) when the kernel side cannot run here")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print one JSON document")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m shared.sim.conformance",
        description="Differential conformance: random sequences on the real kernel and the model, compared after every step.",
        epilog="Exit status: 0 agreed (or known differences), 1 unexpected divergence or stale known entry, "
        "2 usage, 77 kernel side unavailable (0 with --skip-unavailable).",
    )
    add_arguments(p)
    return p


def _model_knob_pairs(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--model-knob {item!r}: want NAME=VALUE")
        Knobs().validate(name, value)
        out.append((name, value))
    return tuple(out)


def run_cli(args: argparse.Namespace, stdout: TextIO, stderr: TextIO, program: str = "thpctl conformance") -> int:
    """The command: figures or a replay; the exit status (see the module docstring)."""
    logs.configure("warning", stream=stderr)  # the model's trace events stay out of the figures
    as_json = bool(getattr(args, "json", False))
    try:
        knobs = _model_knob_pairs(args.model_knob)
    except ValueError as err:  # a KnobError (sysfs would refuse it) or no "=": one line
        stderr.write(f"{program}: {err}\n")
        return EXIT_USAGE
    replay_text = None
    if args.replay and args.steps_text:
        stderr.write(f"{program}: --replay and --steps-text exclude each other\n")
        return EXIT_USAGE
    try:
        if args.replay:
            if args.replay == "-":
                replay_text = sys.stdin.read()
            else:
                with open(args.replay) as f:
                    replay_text = f.read()
        elif args.steps_text:
            replay_text = args.steps_text
        replay_steps = parse_steps_text(replay_text) if replay_text is not None else None
    except OSError as err:
        stderr.write(f"{program}: {args.replay}: {err.strerror}\n")
        return EXIT_USAGE
    except ScenarioError as err:
        stderr.write(f"{program}: {err}\n")
        return EXIT_USAGE
    if args.seeds < 0 or args.steps < 1:
        stderr.write(f"{program}: need --seeds >= 0 and --steps >= 1\n")
        return EXIT_USAGE
    huges = HUGE_CHOICES if args.huge == "both" else (args.huge,)
    modes: tuple[str, ...] = ("step", "khugepaged") if args.mode == "both" else (args.mode,)
    if "large-folio" in modes and (why := kmod.ext4_unavailable()) is not None:
        stderr.write(f"{program}: large-folio mode skipped: {why}\n")
        modes = tuple(mo for mo in modes if mo != "large-folio")
    base = Settings(vmstat=args.vmstat, fine=args.fine, model_knobs=knobs)
    try:
        # The known-difference reproducers need both tmpfs huge= settings.
        session = KernelSession(HUGE_CHOICES if args.check_known and replay_steps is None else huges).__enter__()
    except BackendError as err:
        stderr.write(f"{program}: the kernel side cannot run here: {err}\n")
        if as_json:
            stdout.write(json.dumps({"skipped": str(err)}) + "\n")
        return EXIT_OK if args.skip_unavailable else EXIT_UNAVAILABLE
    status = EXIT_OK
    try:
        if replay_steps is not None:
            replays = []
            for huge in huges:
                h = session.harness(base.replace(huge=huge))
                if as_json:
                    r = h.run(replay_steps, confirm=False)
                    replays.append(
                        {
                            "huge": huge,
                            "steps": [s.line() for s in replay_steps],
                            "agreed": len(r.agreed),
                            "unsupported": [{"family": f, "reason": why} for f, why in r.unsupported],
                            "inconclusive": r.inconclusive or None,
                            "divergence": r.divergence.to_json() if r.divergence else None,
                        }
                    )
                else:
                    if len(huges) > 1:
                        stdout.write(f"== huge={huge}\n")
                    r = trace(h, replay_steps, stdout)
                if r.unexpected:
                    status = EXIT_DIVERGED
            if as_json:
                stdout.write(json.dumps({"replays": replays, "status": status}) + "\n")
            return status
        document: dict[str, Any] = {"runs": [], "known": []}
        if args.check_known:
            checks = check_known(session.harness_for, base)
            stale = [c for c in checks if c.stale]
            document["known"] = [
                {"id": c.known.id, "status": c.known.status, "verdict": c.verdict, "detail": c.detail} for c in checks
            ]
            if not as_json:
                stdout.write("known differences (reproducers):\n")
                stdout.writelines(f"  {c.known.id:18} {c.known.status:10} {c.verdict}\n" for c in checks)
                stdout.write("\n")
            if stale:
                status = EXIT_DIVERGED
                stderr.writelines(f"{program}: known difference {c.known.id}: {c.verdict}\n{c.detail}\n" for c in stale)
        for mode in modes:
            # tmpfs huge= concerns shmem only: a large-folio run needs one of them.
            for huge in huges[:1] if mode == "large-folio" else huges:
                h = session.harness(base.replace(huge=huge))

                def report(div: Divergence) -> None:
                    if not as_json:
                        stdout.write(div.report(program) + "\n\n")

                seeds = range(args.seed, args.seed + args.seeds)
                fig = run_seeds(h, seeds, args.steps, mode, args.max_ptes_none, args.shrink, report)
                document["runs"].append(fig.to_json())
                if not as_json:
                    stdout.write(fig.render() + "\n\n")
                if fig.unexpected:
                    status = EXIT_DIVERGED
        if as_json:
            document["status"] = status
            stdout.write(json.dumps(document) + "\n")
        return status
    finally:
        session.__exit__(None, None, None)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(args, sys.stdout, sys.stderr, program="python -m shared.sim.conformance")


if __name__ == "__main__":
    sys.exit(main())
