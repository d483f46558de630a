"""Experiments: one event stream, every retry policy, in-process on the virtual clock.

An experiment takes a **source** — a named workload (``busy-lock`` and those of
:mod:`shared.sim.workloads`) or a trace file — and replays the identical event stream into a fresh
:class:`~shared.sim.world.World` once per retry policy (and per seed and knob value of a sweep),
measuring each run from outside the model:

* at fixed points of virtual time (``samples`` of them) it counts the eligible 2 MiB ranges and
  those mapped by a PMD, from the remapper's page tables (the coverage curve);
* a PMD install is noticed when the remapper's ``thp_file_mapped`` moves (checked after every
  settle, :class:`ObservedWorld`), and timed from the first fault in its range (the fault or
  touch event that first put anything there): time to PMD;
* at the end it reads the model's counters (``vmstat``, the remapper's ``stats``, khugepaged's
  ``results``/``full_scans``) and the messages the two actors exchanged.

Every run is a pure function of its :class:`Run` (the model and the generators are
deterministic), so the results of a run do not depend on where or with how many others it ran:
:func:`execute` fans them out over local processes (``concurrent.futures``) or Dask and puts them
back in plan order. What is measured rather than modelled — wall seconds, events per second — is
kept apart (``cost``), so :func:`results_document` is byte-identical for identical inputs.

The scenario behind the README's policy table is the workload ``busy-lock``: the text of a shared
library mapped by several processes, collapsed by khugepaged while some of those processes'
mmap locks are busy, so that retract_page_tables' trylock fails and the processes fault the new
THP back in with PTEs. :func:`compare`/:func:`render` still print that table.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import multiprocessing
import os
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from remapd.mm import PteTable, pte_pfn
from shared.knobs import RETRY_POLICIES, SPECS, KnobError, Knobs
from shared.sim import workloads as wl
from shared.sim.trace import TraceError, TraceReader, make_header, replay, validate_file
from shared.sim.world import World
from shared.thp import thp_vma_allowable_order
from shared.units import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SHIFT,
    HPAGE_PMD_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    pages,
)

MB = 1 << 20
RESULTS_VERSION = 1
# A trace without --duration runs at least this long (virtual ms): an imported process's trace
# is all at t=0, and khugepaged needs model time to do anything.
TRACE_MIN_MS = 60_000.0
DEFAULT_SAMPLES = 100
POLICY_KNOB = "thpsplit/retry_policy"
ENGINES = ("local", "dask")


class ExperimentError(ValueError):
    """A bad experiment: an unknown workload or policy, a bad parameter, knob or trace."""


# -- the busy-lock scenario -------------------------------------------------------------------

BUSY_ADDR = 0x40000000


@dataclasses.dataclass(frozen=True)
class BusyLockParams:
    """``procs`` processes map a ``size`` text file r-x private with MADV_HUGEPAGE and fault it in;
    the first ``busy`` of them hold their mmap lock for read for ``busy_ms`` from the start, across
    khugepaged's first passes; everyone touches the whole text again at ``busy_ms`` and at the
    end (``duration_ms``). khugepaged and the remapper wake every ``scan_sleep_ms``/
    ``remap_sleep_ms``. The seed changes nothing (the scenario is fixed)."""

    procs: int = 4
    size: int = 32 * MB
    busy: int = 2
    busy_ms: float = 300.0
    duration_ms: float = 5300.0
    scale: float = 1.0
    scan_sleep_ms: int = 100
    remap_sleep_ms: int = 100
    file_name: str = "libbig.so"


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A generated event stream that is not one of :mod:`shared.sim.workloads`' (same shape as
    :class:`shared.sim.workloads.Workload`: ``header`` and a fresh ``events()`` per call)."""

    name: str
    seed: int
    params: Any
    header: dict[str, Any]

    def events(self) -> Iterator[dict[str, Any]]:
        return _busy_lock_events(self.params)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.events()


def _busy_lock_events(p: BusyLockParams) -> Iterator[dict[str, Any]]:
    size = max(HPAGE_PMD_SIZE, int(p.size * p.scale) // HPAGE_PMD_SIZE * HPAGE_PMD_SIZE)
    pids = range(1, p.procs + 1)

    def ev(t: float, op: str, **fields: Any) -> dict[str, Any]:
        return {"t_ms": t, "op": op, **fields}

    def touch_all(t: float) -> Iterator[dict[str, Any]]:
        for pid in pids:
            yield ev(t, "touch", pid=pid, addr=BUSY_ADDR, length=size, write=False, stride=PAGE_SIZE)

    yield ev(0.0, "file_create", name=p.file_name, size=size, shmem=False)
    for pid in pids:
        yield ev(0.0, "spawn", pid=pid)
        yield ev(0.0, "mmap", pid=pid, addr=BUSY_ADDR, length=size, name=p.file_name, offset=0, prot="rx",
                 shared=False)
        yield ev(0.0, "madvise", pid=pid, addr=BUSY_ADDR, length=size, advice="hugepage")
        yield ev(0.0, "touch", pid=pid, addr=BUSY_ADDR, length=size, write=False, stride=PAGE_SIZE)
    for pid in range(1, p.busy + 1):
        yield ev(0.0, "lock", pid=pid, hold_ms=p.busy_ms, write=False)
    yield from touch_all(p.busy_ms)
    yield from touch_all(p.duration_ms)
    yield ev(p.duration_ms, "mark", label="end")


SCENARIOS: dict[str, type] = {"busy-lock": BusyLockParams}
SCENARIO_DESCRIPTIONS = {
    "busy-lock": "a shared library's text mapped by several processes, collapsed while some of them "
    "hold their mmap lock: the README's policy table",
}


def workload_names() -> tuple[str, ...]:
    """Every named event source: the scenarios here, then the generators' workloads."""
    return (*SCENARIOS, *wl.WORKLOADS)


def _param_class(name: str) -> type:
    cls = SCENARIOS.get(name) or wl.WORKLOADS.get(name)
    if cls is None:
        raise ExperimentError(f"unknown workload {name!r} (one of {', '.join(workload_names())})")
    return cls


def parse_param(name: str, key: str, text: str) -> Any:
    """A ``-p KEY=VALUE`` value of workload ``name`` as its parameter's type (sizes take K/M/G,
    floats take ``1/64``).

    Raises:
        ExperimentError: an unknown workload or parameter, or a value of the wrong kind.
    """
    cls = _param_class(name)
    try:
        return wl.parse_value(cls, key, text)
    except ValueError as err:
        raise ExperimentError(f"workload {name}: {err}") from None


def generate(name: str, seed: int = 0, **params: Any) -> Any:
    """The event source ``name`` (a scenario here or a :mod:`shared.sim.workloads` workload)
    with ``seed`` and parameter overrides: an object with ``header`` and ``events()``.

    Raises:
        ExperimentError: an unknown workload or parameter, or a value out of range.
    """
    if name not in SCENARIOS:
        _param_class(name)
        try:
            return wl.generate(name, seed, **params)
        except ValueError as err:
            raise ExperimentError(str(err)) from None
    cls = SCENARIOS[name]
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in params.items():
        if key not in known:
            raise ExperimentError(f"workload {name}: unknown parameter {key!r} (one of {', '.join(known)})")
        default = known[key].default
        if isinstance(default, (bool, str)) and type(value) is not type(default):
            raise ExperimentError(f"workload {name}: {key} must be a {type(default).__name__}, not {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ExperimentError(f"workload {name}: {key} must be a finite number >= 0, not {value!r}")
            if isinstance(default, int) and value != int(value):
                raise ExperimentError(f"workload {name}: {key} must be an integer, not {value!r}")
            value = type(default)(value)
        values[key] = value
    p = cls(**values)
    if p.procs < 1 or p.size <= 0 or p.scale <= 0:
        raise ExperimentError(f"workload {name}: procs, size and scale must be positive")
    if not 0 <= p.busy <= p.procs:
        raise ExperimentError(f"workload {name}: busy must be within 0..procs ({p.procs})")
    if p.busy_ms > p.duration_ms:
        raise ExperimentError(f"workload {name}: busy_ms ({p.busy_ms:g}) is beyond duration_ms ({p.duration_ms:g})")
    header = make_header(
        f"workload:{name}",
        clock="virtual",
        seed=seed,
        params=dataclasses.asdict(p),
        sysfs={"khugepaged/scan_sleep_millisecs": p.scan_sleep_ms, "thpsplit/remap_sleep_millisecs": p.remap_sleep_ms},
        description=SCENARIO_DESCRIPTIONS[name],
    )
    return Scenario(name, seed, p, header)


# -- one run ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """One run: ``source`` (a workload name, or a trace file's path) under ``policy``.

    ``params``: workload parameters (``duration_ms`` included for a workload); ``knobs``: sysfs
    writes applied after the source's own and before the policy; ``end_ms``: how long the run
    lasts in virtual ms (events after it are dropped; the clock is moved to it at the end);
    ``variant``: the sweep's label for the knobs and parameters it chose; ``samples``: coverage
    samples over the run. Picklable: it is what a worker process or a Dask worker receives.
    """

    source: str
    policy: str
    seed: int = 0
    params: tuple[tuple[str, Any], ...] = ()
    knobs: tuple[tuple[str, str | int], ...] = ()
    end_ms: float = 0.0
    variant: str = ""
    samples: int = DEFAULT_SAMPLES
    trace: bool = False
    codec: bool = False
    check: bool = False


class ObservedWorld(World):
    """A :class:`World` that tells an observer after every settle (the moment a PMD install
    becomes visible, at the model time it happened) and counts the messages the actors exchange.
    The model is untouched: this only looks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.messages: Counter[str] = Counter()
        self.retract_keys: set[tuple[int, int, int]] = set()
        self.retract_repeats = 0
        self.on_settle: Callable[[], None] | None = None
        super().__init__(*args, **kwargs)

    def settle(self) -> None:
        super().settle()
        hook = self.on_settle
        if hook is not None:
            hook()

    def wire(self, msg: Any) -> Any:
        name = type(msg).__name__
        self.messages[name] += 1
        if name == "Retract":
            # A second Retract for the same new THP is a retry (per-mapping's AS_COLLAPSE_PMD).
            key = (msg.ino, msg.pgoff, msg.head)
            if key in self.retract_keys:
                self.retract_repeats += 1
            else:
                self.retract_keys.add(key)
        return super().wire(msg)


class _RangeClock:
    """First fault and first PMD per (pid, 2 MiB range), from outside the model."""

    def __init__(self, world: ObservedWorld):
        self.world = world
        self.first: dict[int, dict[int, float]] = {}  # pid -> pidx -> first fault (ms)
        self.pmd_at: dict[int, dict[int, float]] = {}  # pid -> pidx -> first PMD (ms), untimed yet
        self.done: dict[int, set[int]] = {}  # pid -> pidx whose first PMD has been timed
        self.known_pmds: dict[int, set[int]] = {}
        self.times: list[float] = []
        self.untimed = 0
        self._mapped = -1

    def after_settle(self) -> None:
        r = self.world.remapper
        mapped = r.vm["thp_file_mapped"]
        if mapped == self._mapped:
            return
        self._mapped = mapped
        now = self.world.now
        for pid, mm in r.mms.items():
            pmds = {pidx for pidx, e in mm.pmds.items() if type(e) is int and e}
            seen = self.known_pmds.get(pid)
            new = pmds - seen if seen is not None else pmds
            self.known_pmds[pid] = pmds
            if not new:
                continue
            done = self.done.setdefault(pid, set())
            first = self.first.get(pid, {})
            for pidx in new:
                if pidx in done:
                    continue
                t0 = first.get(pidx)
                if t0 is None:
                    # Its first fault is the event running now (a PMD fault): timed after it.
                    self.pmd_at.setdefault(pid, {}).setdefault(pidx, now)
                else:
                    done.add(pidx)
                    self.times.append(now - t0)

    def after_event(self, ev: dict[str, Any], at_ms: float) -> None:
        op = ev["op"]
        if op in ("fault", "touch"):
            pid = ev["pid"]
            mm = self.world.remapper.mms.get(pid)
            if mm is None:
                return
            lo = ev["addr"] >> HPAGE_PMD_SHIFT
            hi = (ev["addr"] + max(ev.get("length", 1), 1) - 1) >> HPAGE_PMD_SHIFT
            first = self.first.setdefault(pid, {})
            pending = self.pmd_at.get(pid)
            for pidx in range(lo, hi + 1):
                if pidx in first or mm.pmds.get(pidx) is None:
                    continue
                first[pidx] = at_ms
                if pending and pidx in pending:
                    self.times.append(max(pending.pop(pidx) - at_ms, 0.0))
                    self.done.setdefault(pid, set()).add(pidx)
        elif op == "exit":
            self._forget(ev["pid"], None)
        elif op in ("munmap", "mremap"):  # what a mremap moves starts afresh at its new place
            length = ev["length"] if op == "munmap" else ev["old_length"]
            lo = ev["addr"] >> HPAGE_PMD_SHIFT
            hi = (ev["addr"] + max(length, 1) - 1) >> HPAGE_PMD_SHIFT
            self._forget(ev["pid"], range(lo, hi + 1))

    def _forget(self, pid: int, pidxs: range | None) -> None:
        for table in (self.first, self.pmd_at):
            d = table.get(pid)
            if d is None:
                continue
            if pidxs is None:
                self.untimed += len(d) if table is self.pmd_at else 0
                del table[pid]
            else:
                for pidx in pidxs:
                    if d.pop(pidx, None) is not None and table is self.pmd_at:
                        self.untimed += 1
        if pidxs is None:
            self.done.pop(pid, None)
            self.known_pmds.pop(pid, None)
        else:
            for s in (self.done.get(pid), self.known_pmds.get(pid)):
                if s is not None:
                    s.difference_update(pidxs)

    def finish(self) -> None:
        self.untimed += sum(len(d) for d in self.pmd_at.values())
        self.pmd_at.clear()


def census(world: World, detail: bool = False) -> dict[str, int]:
    """Count 2 MiB ranges in the remapper's page tables, as smaps would judge them.

    ``eligible_all``: naturally aligned 2 MiB ranges of THPeligible VMAs (smaps' rule: no
    VM_NOHUGEPAGE, suitably aligned, ``thp_vma_allowable_order``), wholly below EOF, in live
    processes. ``eligible``: those with anything mapped (a PMD, or a PTE table with a present
    entry): the ranges a PMD mapping is wanted for. ``pmd_mapped``: those mapped by a PMD. With
    ``detail``: ``pte_mapped_thp`` (eligible ranges mapped by PTEs while the page cache holds a
    PMD-order THP there) and ``nr_ptes`` (PTE tables of every process).
    """
    r = world.remapper
    writers = {v.ino for mm in r.mms.values() for v in mm.vmas if v.writes_file}
    eligible_all = eligible = pmd = pte_mapped = 0
    collapser = world.collapser if detail else None
    for mm in r.mms.values():
        if mm.exiting:
            continue
        bounds: dict[int, tuple[int, int]] = {}  # id(vma) -> [first, last] aligned range starts
        for vma in mm.vmas:
            f = r.files.get(vma.ino)
            if f is None or vma.nohugepage:
                continue
            hs = (vma.start + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1)
            if not vma.pmd_suitable(hs):
                continue
            if not thp_vma_allowable_order(r.knobs, shmem=f.shmem, i_size=f.size, pgoff=vma.pgoff,
                                           vm_hugepage=vma.hugepage, vm_nohugepage=vma.nohugepage,
                                           open_for_write=vma.ino in writers):
                continue
            room = pages(f.size) - HPAGE_PMD_NR - vma.pgoff  # pages from the VMA start to the last range
            if room < 0:
                continue
            last = min((vma.end - HPAGE_PMD_SIZE) & ~(HPAGE_PMD_SIZE - 1),
                       (vma.start + (room << PAGE_SHIFT)) & ~(HPAGE_PMD_SIZE - 1))
            if last < hs:
                continue
            eligible_all += (last - hs) // HPAGE_PMD_SIZE + 1
            bounds[id(vma)] = (hs, last)
        if not bounds:
            continue
        for pidx, entry in mm.pmds.items():
            addr = pidx << HPAGE_PMD_SHIFT
            found = mm.find_vma(addr)
            b = bounds.get(id(found)) if found is not None else None
            if found is None or b is None or not b[0] <= addr <= b[1]:
                continue
            if type(entry) is int:
                if entry:
                    eligible += 1
                    pmd += 1
                continue
            assert isinstance(entry, PteTable)
            if not entry.nr:
                continue
            eligible += 1
            if collapser is not None and _maps_a_thp(collapser, found.ino, found.pgoff_at(addr), entry):
                pte_mapped += 1
    out = {"eligible_all": eligible_all, "eligible": eligible, "pmd_mapped": pmd}
    if detail:
        out["pte_mapped_thp"] = pte_mapped
        out["nr_ptes"] = sum(mm.nr_ptes for mm in r.mms.values())
    return out


def _maps_a_thp(collapser: Any, ino: int, pgoff: int, table: PteTable) -> bool:
    f = collapser.files.get(ino)
    head = f.get(pgoff) if f is not None else 0
    if head <= 0 or not collapser.mem.pmd_mappable(head):
        return False
    return any(head <= pte_pfn(pte) < head + HPAGE_PMD_NR for _, pte in table.present())


def _percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (no interpolation: a value that occurred)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _open_source(run: Run) -> tuple[dict[str, Any], Iterable[dict[str, Any]], Callable[[], None]]:
    if run.trace:
        reader = TraceReader(run.source)
        return reader.header, reader, reader.close
    src = generate(run.source, run.seed, **dict(run.params))
    return src.header, src.events(), lambda: None


class _Stream:
    """The source's events up to ``end_ms``, with coverage sample marks woven in; remembers which
    event replay is applying (its progress callback only gets the outcome)."""

    def __init__(self, events: Iterable[dict[str, Any]], end_ms: float, samples: int):
        self.events = events
        self.end_ms = end_ms
        self.times = [end_ms * k / samples for k in range(samples + 1)] if samples > 0 else [end_ms]
        self.current: dict[str, Any] | None = None
        self.is_sample = False
        self.dropped_policy_writes = 0
        self.dropped_late = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        times = iter(self.times)
        nxt = next(times, None)
        for ev in self.events:
            if ev["t_ms"] > self.end_ms:
                self.dropped_late += 1
                continue
            if ev["op"] == "sysfs_set" and ev["name"] == POLICY_KNOB:
                self.dropped_policy_writes += 1  # the experiment chooses the policy
                continue
            while nxt is not None and nxt < ev["t_ms"]:
                yield self._sample(nxt)
                nxt = next(times, None)
            self.current, self.is_sample = ev, False
            yield ev
        while nxt is not None:
            yield self._sample(nxt)
            nxt = next(times, None)

    def _sample(self, t: float) -> dict[str, Any]:
        ev = {"t_ms": t, "op": "mark", "label": "sample"}
        self.current, self.is_sample = ev, True
        return ev


def run_one(run: Run) -> dict[str, Any]:
    """Run ``run`` and return its result: the deterministic figures, the coverage series and,
    under ``cost``, the wall time it took (the one part that varies from run to run)."""
    result, _ = execute_run(run)
    return result


def execute_run(run: Run) -> tuple[dict[str, Any], ObservedWorld]:
    """:func:`run_one`, also returning the world at the end (for callers in this process)."""
    wall0 = time.perf_counter()
    header, events, close = _open_source(run)
    try:
        world = ObservedWorld(Knobs(), codec=run.codec)
        clock = _RangeClock(world)
        world.on_settle = clock.after_settle
        try:
            for name, value in (header.get("sysfs") or {}).items():
                if name != POLICY_KNOB:
                    world.sysfs_set(name, value)
            for name, value in run.knobs:
                world.sysfs_set(name, value)
            world.sysfs_set(POLICY_KNOB, run.policy)
        except KnobError as err:
            raise ExperimentError(f"{run.source}: {err}") from None
        stream = _Stream(events, run.end_ms, run.samples)
        series: list[list[float | int]] = []

        def progress(i: int, out: dict[str, Any]) -> None:
            if stream.is_sample:
                c = census(world)
                series.append([round(world.now - start, 6), c["pmd_mapped"], c["eligible"]])
            elif stream.current is not None:
                clock.after_event(stream.current, out["at_ms"])

        start = world.now
        res = replay(stream, world, "original", apply_sysfs=False, keep_outcomes=False, progress=progress)
    finally:
        close()
    clock.finish()
    if run.check:
        world.check()
    wall = time.perf_counter() - wall0
    events_n = res.counts["events"] - len(stream.times)
    result = _figures(run, world, clock, series, events_n, res.counts, stream)
    result["cost"] = {"wall_s": round(wall, 6), "events_per_s": round(events_n / wall, 1) if wall > 0 else None}
    return result, world


def _figures(run: Run, world: ObservedWorld, clock: _RangeClock, series: list[list[float | int]], events: int,
             counts: dict[str, Any], stream: _Stream) -> dict[str, Any]:
    end = census(world, detail=True)
    vm = world.vmstat()
    r = world.remapper
    k = world.collapser.khugepaged
    stats = dict(sorted(r.stats.items()))
    results = dict(sorted(k.results.items()))
    scans = sum(results.values())
    collapsed = results.get("SCAN_SUCCEED", 0)
    retry = {
        "remap_pass": sum(v for key, v in stats.items() if key.startswith("remap_")),
        "mm_slot": sum(v for key, v in stats.items()
                       if key.startswith("pte_mapped_thp_") and key != "pte_mapped_thp_dropped"),
        "per_mapping_retract": world.retract_repeats,
        "lockless_collapse": world.messages.get("CollapsePteMapped", 0),
    }
    times = sorted(clock.times)
    eligible = end["eligible"]
    return {
        "source": run.source,
        "kind": "trace" if run.trace else "workload",
        "variant": run.variant,
        "policy": run.policy,
        "seed": run.seed,
        "params": dict(run.params),
        "knobs": dict(run.knobs),
        "virtual_ms": round(world.now, 6),
        "events": events,
        "eligible_all": end["eligible_all"],
        "eligible": eligible,
        "pmd_mapped": end["pmd_mapped"],
        "pmd_mapped_pct": round(100 * end["pmd_mapped"] / eligible, 3) if eligible else None,
        "time_to_pmd_p50_ms": _percentile(times, 50),
        "time_to_pmd_p99_ms": _percentile(times, 99),
        "time_to_pmd_n": len(times),
        "time_to_pmd_untimed": clock.untimed,
        "pte_mapped_thp": end["pte_mapped_thp"],
        "nr_ptes": end["nr_ptes"],
        "retract_calls": world.messages.get("Retract", 0),
        "retract_attempts": stats.get("retracted", 0) + stats.get("retract_deferred", 0),
        "retracted": stats.get("retracted", 0),
        "retract_deferred": stats.get("retract_deferred", 0),
        "retries": sum(retry.values()),
        "retry_detail": retry,
        "scans": scans,
        "wasted_scans": scans - collapsed,
        "full_scans": k.full_scans,
        "pages_collapsed": k.pages_collapsed,
        "thp_collapse_alloc": vm.get("thp_collapse_alloc", 0),
        "thp_collapse_alloc_failed": vm.get("thp_collapse_alloc_failed", 0),
        "thp_file_alloc": vm.get("thp_file_alloc", 0),
        "thp_file_mapped": vm.get("thp_file_mapped", 0),
        "scan_results": results,
        "remapper_stats": stats,
        "replay": {
            "errors": counts["errors"],
            "pending": counts["pending"],
            "waited": counts["waited"],
            "dropped_policy_writes": stream.dropped_policy_writes,
            "dropped_after_end": stream.dropped_late,
        },
        "coverage": series,
    }


# -- planning ---------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """``90s``, ``1.5m``, ``500ms`` or a plain number of seconds → milliseconds.

    Raises:
        ValueError: not a finite positive duration.
    """
    t = text.strip().lower()
    for suffix, factor in (("ms", 1.0), ("s", 1000.0), ("m", 60_000.0), ("h", 3_600_000.0)):
        if t.endswith(suffix):
            number, scale = t[: -len(suffix)], factor
            break
    else:
        number, scale = t, 1000.0
    value = float(number) * scale
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"not a positive duration: {text!r}")
    return value


@dataclasses.dataclass
class Plan:
    """What to run: sources × variants (the sweep's knob and parameter combinations) × policies
    × seeds, in that order (the order of :attr:`runs` and of every output)."""

    sources: tuple[str, ...]
    policies: tuple[str, ...] = RETRY_POLICIES
    seeds: tuple[int, ...] = (0,)
    duration_ms: float | None = None
    params: dict[str, str] = dataclasses.field(default_factory=dict)  # -p: workload params and knobs
    sweep: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    samples: int = DEFAULT_SAMPLES
    check: bool = False
    runs: list[Run] = dataclasses.field(default_factory=list)

    def config(self) -> dict[str, Any]:
        return {
            "sources": list(self.sources),
            "policies": list(self.policies),
            "seeds": list(self.seeds),
            "duration_ms": self.duration_ms,
            "params": dict(self.params),
            "sweep": {k: list(v) for k, v in self.sweep.items()},
            "samples": self.samples,
        }


def is_knob(key: str) -> bool:
    return key in SPECS


def _check_knob(key: str, value: str) -> str | int:
    spec = SPECS[key]
    if not spec.writable:
        raise ExperimentError(f"knob {key} is read-only")
    if key == POLICY_KNOB:
        raise ExperimentError(f"{POLICY_KNOB} is what the experiment varies: use --policies")
    try:
        parsed = Knobs().validate(key, value)
    except KnobError as err:
        raise ExperimentError(f"knob {key}: {err}") from None
    return parsed if isinstance(parsed, (int, str)) else str(value)


def make_plan(
    sources: Sequence[str],
    policies: Sequence[str] = RETRY_POLICIES,
    seeds: int | Sequence[int] = 1,
    duration_ms: float | None = None,
    params: dict[str, str] | None = None,
    sweep: dict[str, Sequence[str]] | None = None,
    samples: int = DEFAULT_SAMPLES,
    check: bool = False,
) -> Plan:
    """Resolve and check everything up front (so a bad value fails before any run starts).

    ``sources``: workload names or trace paths. ``seeds``: a count N (seeds 0..N-1) or the seeds.
    ``params`` and ``sweep`` keys are knob names (``khugepaged/max_ptes_none``) or workload
    parameters (``procs``); values are text, as typed.

    Raises:
        ExperimentError: anything unknown or out of range, or an unreadable or invalid trace.
    """
    if not sources:
        raise ExperimentError("no workload or trace")
    bad = [p for p in policies if p not in RETRY_POLICIES]
    if bad or not policies:
        raise ExperimentError(f"unknown policy {', '.join(bad) or '(none)'} (from {', '.join(RETRY_POLICIES)})")
    seed_list = tuple(range(seeds)) if isinstance(seeds, int) else tuple(seeds)
    if not seed_list:
        raise ExperimentError("at least one seed")
    if samples < 1 or samples > 100_000:
        raise ExperimentError("samples must be within 1..100000")
    params = dict(params or {})
    swept = {k: tuple(v) for k, v in (sweep or {}).items()}
    for key, values in swept.items():
        if not values:
            raise ExperimentError(f"--sweep {key}: no values")
        if key in params:
            raise ExperimentError(f"{key} is both set (-p) and swept (--sweep)")
    plan = Plan(tuple(sources), tuple(policies), seed_list, duration_ms, params, swept, samples, check)
    combos = list(itertools.product(*[[(k, v) for v in vs] for k, vs in swept.items()]))
    for source in sources:
        trace = source not in workload_names()
        trace_end = None
        if trace:
            if not os.path.exists(source):
                raise ExperimentError(f"{source}: no such workload or trace file "
                                      f"(workloads: {', '.join(workload_names())})")
            try:
                summary = validate_file(source)
            except TraceError as err:
                raise ExperimentError(str(err)) from None
            except OSError as err:
                raise ExperimentError(f"{source}: {err.strerror or err}") from None
            trace_end = duration_ms if duration_ms is not None else max(summary["duration_ms"], TRACE_MIN_MS)
        for combo in combos:
            chosen = [*params.items(), *combo]
            knobs = tuple((k, _check_knob(k, v)) for k, v in chosen if is_knob(k))
            wparams = [(k, v) for k, v in chosen if not is_knob(k)]
            if trace and wparams:
                raise ExperimentError(f"{source}: a trace takes knobs only, not workload parameters "
                                      f"({', '.join(k for k, _ in wparams)})")
            typed = {k: parse_param(source, k, v) for k, v in wparams} if not trace else {}
            if not trace and duration_ms is not None:
                typed["duration_ms"] = duration_ms
            if trace:
                end_ms = float(trace_end or 0.0)
            else:
                probe = generate(source, 0, **typed)  # checks the values; the header has the duration
                end_ms = float(probe.header["params"]["duration_ms"])
            label = ",".join(f"{k}={v}" for k, v in combo)
            for policy in policies:
                for seed in seed_list:
                    plan.runs.append(Run(source, policy, seed, tuple(sorted(typed.items())), knobs, end_ms, label,
                                         samples, trace, check=check))
    return plan


# -- running many -----------------------------------------------------------------------------


def _quiet_worker() -> None:
    # Ctrl-C reaches the whole process group: the parent stops the workers, they stay quiet.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def execute(
    runs: Sequence[Run],
    jobs: int = 1,
    engine: str = "local",
    scheduler: str | None = None,
    on_done: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every run; results in the order of ``runs`` whatever order they finish in.

    ``engine="local"``: in this process (``jobs`` 1) or a ``concurrent.futures``
    ProcessPoolExecutor of ``jobs`` worker processes. ``engine="dask"``: a dask.distributed
    ``Client`` for ``scheduler`` (an address), or a ``LocalCluster`` of ``jobs`` single-threaded
    worker processes started for the occasion. ``on_done(index, result)`` is called as each run
    finishes (for a progress bar).
    """
    if jobs < 1:
        raise ExperimentError("jobs must be at least 1")
    if engine == "dask":
        return _execute_dask(runs, jobs, scheduler, on_done)
    if engine != "local":
        raise ExperimentError(f"unknown engine {engine!r} (one of {', '.join(ENGINES)})")
    results: list[dict[str, Any] | None] = [None] * len(runs)
    if jobs == 1 or len(runs) <= 1:
        for i, run in enumerate(runs):
            results[i] = run_one(run)
            if on_done is not None:
                on_done(i, results[i])  # type: ignore[arg-type]
        return [r for r in results if r is not None]
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may run threads
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(runs)), mp_context=ctx, initializer=_quiet_worker)
    try:
        futures: dict[Future[dict[str, Any]], int] = {pool.submit(run_one, run): i for i, run in enumerate(runs)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=futures.__getitem__):
                i = futures[fut]
                results[i] = fut.result()
                if on_done is not None:
                    on_done(i, results[i])  # type: ignore[arg-type]
    except BaseException:
        for proc in list(getattr(pool, "_processes", {}).values()):  # stop work in progress now
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return [r for r in results if r is not None]


def _execute_dask(
    runs: Sequence[Run], jobs: int, scheduler: str | None, on_done: Callable[[int, dict[str, Any]], None] | None
) -> list[dict[str, Any]]:
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ExperimentError("--engine dask needs dask.distributed: pip install 'thpsplit[dask]'") from None
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        # On the loopback only, without the dashboard: a cluster of this machine's cores for this run.
        cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None)
        client = Client(cluster)
    try:
        futures = client.map(run_one, list(runs), pure=False)
        index = {fut.key: i for i, fut in enumerate(futures)}
        for fut in as_completed(futures):
            if on_done is not None:
                on_done(index[fut.key], fut.result())
        results: list[dict[str, Any]] = client.gather(futures)
        return results
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# -- summaries and outputs --------------------------------------------------------------------

# The figures summarised over seeds (mean, stdev, min, max), in table and CSV order.
FIGURES = (
    "eligible", "pmd_mapped", "pmd_mapped_pct", "time_to_pmd_p50_ms", "time_to_pmd_p99_ms", "pte_mapped_thp",
    "retract_attempts", "retract_deferred", "retries", "wasted_scans", "scans", "thp_collapse_alloc",
    "thp_file_alloc", "thp_file_mapped", "nr_ptes", "eligible_all", "full_scans", "events", "virtual_ms",
)
COST = ("wall_s", "events_per_s")


def _stats(values: list[float | int | None]) -> dict[str, float | None]:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {
        "mean": round(statistics.fmean(xs), 6),
        "sd": round(statistics.stdev(xs), 6) if len(xs) > 1 else 0.0,
        "min": round(min(xs), 6),
        "max": round(max(xs), 6),
        "n": len(xs),
    }


def summarise(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (source, variant, policy), in plan order: every figure's mean, stdev, min and
    max over the seeds, and the coverage curve averaged over them (min and max too)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["source"], r["variant"], r["policy"]), []).append(r)
    out = []
    for (source, variant, policy), rs in groups.items():
        entry: dict[str, Any] = {"source": source, "variant": variant, "policy": policy,
                                 "seeds": [r["seed"] for r in rs]}
        entry["figures"] = {f: _stats([r[f] for r in rs]) for f in FIGURES}
        entry["coverage"] = _mean_coverage([r["coverage"] for r in rs])
        out.append(entry)
    return out


def _mean_coverage(curves: list[list[list[float | int]]]) -> list[list[float | None]]:
    """[t_ms, mean %, min %, max %] per sample point (% of the eligible ranges at that time)."""
    out: list[list[float | None]] = []
    for points in zip(*curves):
        pct = [100.0 * p[1] / p[2] if p[2] else 0.0 for p in points]
        out.append([points[0][0], round(statistics.fmean(pct), 4), round(min(pct), 4), round(max(pct), 4)])
    return out


def cost_summary(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["source"], r["variant"], r["policy"]), []).append(r)
    return [{"source": s, "variant": v, "policy": p, **{c: _stats([r["cost"][c] for r in rs]) for c in COST}}
            for (s, v, p), rs in groups.items()]


def results_document(plan: Plan, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Everything deterministic: the configuration, every run (without its wall time) and the
    summary. Identical inputs give an identical document, however the runs were spread."""
    return {
        "thpsplit_experiment": RESULTS_VERSION,
        "config": plan.config(),
        "runs": [{k: v for k, v in r.items() if k != "cost"} for r in results],
        "summary": summarise(results),
    }


def dumps(doc: Any) -> str:
    return json.dumps(doc, indent=1, sort_keys=False, allow_nan=False) + "\n"


RUN_COLUMNS = (
    "source", "variant", "policy", "seed", "eligible", "pmd_mapped", "pmd_mapped_pct", "time_to_pmd_p50_ms",
    "time_to_pmd_p99_ms", "time_to_pmd_n", "pte_mapped_thp", "retract_calls", "retract_attempts", "retracted",
    "retract_deferred", "retries", "scans", "wasted_scans", "full_scans", "pages_collapsed", "thp_collapse_alloc",
    "thp_collapse_alloc_failed", "thp_file_alloc", "thp_file_mapped", "nr_ptes", "eligible_all", "events",
    "virtual_ms",
)


def runs_csv(results: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RUN_COLUMNS)
    for r in results:
        w.writerow(["" if r[c] is None else r[c] for c in RUN_COLUMNS])
    return buf.getvalue()


def summary_csv(summary: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["source", "variant", "policy", "seeds",
                *[f"{f}_{s}" for f in FIGURES for s in ("mean", "sd", "min", "max")]])
    for e in summary:
        row: list[Any] = [e["source"], e["variant"], e["policy"], len(e["seeds"])]
        for f in FIGURES:
            st = e["figures"][f]
            row += ["" if st[s] is None else st[s] for s in ("mean", "sd", "min", "max")]
        w.writerow(row)
    return buf.getvalue()


def write_outputs(out: str | os.PathLike[str], plan: Plan, results: Sequence[dict[str, Any]],
                  run_info: dict[str, Any] | None = None, plot: bool = True) -> dict[str, Path]:
    """Write ``results.json``, ``runs.csv``, ``summary.csv`` (deterministic), ``cost.json`` (wall
    time) and ``experiment.png`` into ``out``; returns the paths by kind."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"json": d / "results.json", "runs_csv": d / "runs.csv", "summary_csv": d / "summary.csv",
             "cost": d / "cost.json"}
    doc = results_document(plan, results)
    paths["json"].write_text(dumps(doc))
    paths["runs_csv"].write_text(runs_csv(results))
    paths["summary_csv"].write_text(summary_csv(doc["summary"]))
    cost = {"runs": [{"source": r["source"], "variant": r["variant"], "policy": r["policy"], "seed": r["seed"],
                      **r["cost"]} for r in results],
            "summary": cost_summary(results), **(run_info or {})}
    paths["cost"].write_text(dumps(cost))
    if plot and plotting_available():
        from shared.sim.plot import plot_experiment

        paths["png"] = d / "experiment.png"
        plot_experiment(doc["summary"], paths["png"])
    return paths


def plotting_available() -> bool:
    """Whether matplotlib is installed (the ``plot`` extra: ``pip install 'thpsplit[plot]'``)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


# -- the table --------------------------------------------------------------------------------


def _cell(st: dict[str, Any], digits: int, spread: bool, unit: str = "") -> str:
    """``mean`` (with one decimal if a count's mean is not whole) and ``±sd`` when the seeds
    disagree."""
    mean = st["mean"]
    if mean is None:
        return "-"
    shown = digits if digits or float(mean).is_integer() else 1
    text = f"{mean:.{shown}f}{unit}"
    if spread and st["n"] > 1 and st["sd"]:
        text += f" ±{st['sd']:.{max(digits, 1)}f}"
    return text


TABLE = (
    # header, figure, digits, unit
    ("ranges", "eligible", 0, ""),
    ("PMD-mapped", "pmd_mapped_pct", 1, "%"),
    ("to-PMD p50 ms", "time_to_pmd_p50_ms", 0, ""),
    ("p99 ms", "time_to_pmd_p99_ms", 0, ""),
    ("pte-mapped", "pte_mapped_thp", 0, ""),
    ("retracts", "retract_attempts", 0, ""),
    ("trylock-fail", "retract_deferred", 0, ""),
    ("retries", "retries", 0, ""),
    ("wasted scans", "wasted_scans", 0, ""),
    ("collapse-alloc", "thp_collapse_alloc", 0, ""),
    ("file-alloc", "thp_file_alloc", 0, ""),
)


def render_table(summary: Sequence[dict[str, Any]], cost: Sequence[dict[str, Any]] | None = None) -> str:
    """The text table: one block per (source, variant), a row per policy. With several seeds a
    cell is ``mean ±stdev``; the model's cost (wall seconds, events/s) closes each row."""
    blocks: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any] | None]]] = {}
    costs = {(c["source"], c["variant"], c["policy"]): c for c in cost or ()}
    for e in summary:
        blocks.setdefault((e["source"], e["variant"]), []).append((e, costs.get((e["source"], e["variant"], e["policy"]))))
    out = []
    for (source, variant), rows in blocks.items():
        seeds = rows[0][0]["seeds"]
        spread = len(seeds) > 1
        seed_text = f"seed {seeds[0]}" if not spread else f"{len(seeds)} seeds ({seeds[0]}..{seeds[-1]}), mean ±stdev"
        out.append(f"{source}{' [' + variant + ']' if variant else ''}: {seed_text}")
        headers = ["policy", *[h for h, *_ in TABLE]] + (["wall s", "events/s"] if cost is not None else [])
        table = [headers]
        for e, c in rows:
            f = e["figures"]
            row = [e["policy"], *[_cell(f[key], digits, spread, unit) for _, key, digits, unit in TABLE]]
            if cost is not None:
                row += [f"{c['wall_s']['mean']:.2f}" if c else "-",
                        f"{c['events_per_s']['mean']:.0f}" if c and c["events_per_s"]["mean"] is not None else "-"]
            table.append(row)
        widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
        for n, r in enumerate(table):
            out.append("  ".join(r[i].ljust(widths[i]) if i == 0 else r[i].rjust(widths[i]) for i in range(len(r))))
            if n == 0:
                out.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
        out.append("")
    return "\n".join(out)


# -- the README's table: busy-lock under each policy ------------------------------------------


@dataclasses.dataclass
class Workload:
    """The busy-lock scenario's parameters as ``thpctl experiment`` (no workload) takes them:
    ``procs`` processes map a ``size`` text file; the first ``busy`` of them hold their mmap lock
    for read for ``busy_ms`` around khugepaged's collapse; everything runs ``run_ms`` more."""

    procs: int = 4
    size: int = 32 * MB
    busy: int = 2
    busy_ms: float = 300.0
    run_ms: float = 5000.0
    scan_sleep_ms: int = 100
    remap_sleep_ms: int = 100

    def params(self) -> dict[str, Any]:
        return {"procs": self.procs, "size": self.size, "busy": self.busy, "busy_ms": self.busy_ms,
                "duration_ms": self.busy_ms + self.run_ms, "scan_sleep_ms": self.scan_sleep_ms,
                "remap_sleep_ms": self.remap_sleep_ms}


def run_policy(policy: str, w: Workload, install_pmd: int = 1, codec: bool = False) -> dict[str, Any]:
    """Run busy-lock ``w`` under ``policy`` (in this process; the invariant checker at the end).
    Like the benchmarks, an experiment measures the model and skips the codec round trip the
    tests put every message through (``codec`` turns it on)."""
    params = w.params()
    run = Run("busy-lock", policy, 0, tuple(sorted(params.items())), (("thpsplit/install_pmd", install_pmd),),
              params["duration_ms"], samples=1, codec=codec, check=True)
    result, world = execute_run(run)
    per_proc = {}
    for pid in range(1, w.procs + 1):
        pmd_kb = sum(e["FilePmdMapped"] for e in world.smaps(pid))
        per_proc[pid] = pmd_kb * 1024 // HPAGE_PMD_SIZE
    return {
        "policy": policy,
        "pmd_mapped": per_proc,
        "pmd_mapped_total": sum(per_proc.values()),
        "possible": w.size // HPAGE_PMD_SIZE * w.procs,
        "thp_collapse_alloc": result["thp_collapse_alloc"],
        "thp_file_mapped": result["thp_file_mapped"],
        "retract_deferred": result["retract_deferred"],
        "nr_ptes": result["nr_ptes"],
        "model_ms": world.now,
    }


def compare(
    w: Workload | None = None,
    policies: tuple[str, ...] = RETRY_POLICIES,
    install_pmd: int = 1,
    codec: bool = False,
) -> list[dict[str, Any]]:
    w = w or Workload()
    return [run_policy(p, w, install_pmd, codec) for p in policies]


def render(rows: list[dict[str, Any]]) -> str:
    header = f"{'policy':<12} {'PMD-mapped':>12} {'deferred':>9} {'thp_file_mapped':>16} {'PTE tables':>11}"
    lines = [header, "-" * len(header)]
    for row in rows:
        won = f"{row['pmd_mapped_total']}/{row['possible']}"
        lines.append(
            f"{row['policy']:<12} {won:>12} {row['retract_deferred']:>9} {row['thp_file_mapped']:>16} {row['nr_ptes']:>11}"
        )
    return "\n".join(lines)
