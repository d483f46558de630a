"""Workload generators: parameterised, seeded streams of trace events (every workload is a trace).

Each workload is a function of a seed and a parameter dataclass; it yields events in the
:mod:`shared.sim.trace` format, in time order, so it can be written to a file, replayed into an
in-process :class:`~shared.sim.world.World` (:func:`shared.sim.trace.replay`), or sent to the
daemons. The same seed and parameters give the identical event stream, byte for byte: every
random choice comes from a ``random.Random`` seeded with a string derived from the seed and the
name of the stream that makes it, and streams are merged on (time, stream, sequence).

Times are virtual milliseconds, with microsecond resolution. Defaults are realistic sizes; every
workload has ``scale`` (multiplies its file sizes; 1/64 turns 256 MiB into 4 MiB) and a
``duration_ms``, so tests run them small. Each trace's header carries its parameters, its seed
and the knobs it was made for (``sysfs``: a short khugepaged sleep so that a run of a minute
sees many passes); :func:`shared.sim.trace.replay` applies them unless told not to, and an
experiment sets the policy under test after them.

``text``
    A large read-only executable (HHVM-like, default 256 MiB) mapped ``r-x`` private by
    ``procs`` processes (default 8) with MADV_HUGEPAGE. Each process faults in a startup region
    sequentially, then accesses its text in bursts (exponential gaps, mean ``access_interval_ms``):
    a sequential run of ``seq_bytes`` with probability ``seq_fraction``, otherwise a random read
    fault. Which 2 MiB range a burst lands in follows a Zipf law (exponent ``zipf_s``) over the
    file's ranges, ranked in a seeded random order (``hot_layout="scattered"``) or hottest first
    (``"front"``). An application thread per process holds mmap_lock (read, or write with
    ``lock_write``) a fraction ``lock_fraction`` of the time, in holds of mean ``lock_hold_ms``.
    Processes live an exponential lifetime of mean ``lifetime_ms`` (0: the whole run); a new one
    (a new pid) starts ``restart_delay_ms`` after one exits.
``shmem``
    A shared buffer pool (a shmem file, default 256 MiB) mapped ``rw`` shared by ``procs``
    processes with MADV_HUGEPAGE, written and read in ``buffer_bytes`` buffers (Zipf over 2 MiB
    ranges, uniform buffer within), with pageout pressure: every ``pageout_interval_ms`` a
    process calls MADV_PAGEOUT on one of the coldest ranges. ``sysfs`` sets
    ``shmem_enabled=advise``.
``uprobe``
    ``text`` (default 64 MiB, 4 processes, no lock holders) plus a debugger that adds a uprobe on
    a hot text page every ``probe_interval_ms`` (from ``probe_start_ms``) and removes each after
    an exponential time of mean ``probe_lifetime_ms``; at most ``max_probes`` at once.
``churn``
    mmap / munmap (whole or part of a mapping) / touch / madvise / fork / exit at a high rate
    (one operation every ``op_interval_ms`` on average) over ``files`` library files, ``procs``
    processes to start with, at most ``max_procs``; an exit below ``procs // 2`` processes is
    followed by a new process.

API: :data:`WORKLOADS` (name → parameter dataclass), :func:`params` (build and check
parameters), :func:`generate` (a :class:`Workload`: ``header`` and ``events()``),
:func:`write_workload`, :func:`main` (``python -m shared.sim.workloads NAME [-p k=v] [-o FILE]``).
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
import json
import math
import random
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from shared.sim.trace import OPS, make_header, write_trace
from shared.units import HPAGE_PMD_SIZE, PAGE_SIZE, parse_size

KB = 1 << 10
MB = 1 << 20
GB = 1 << 30

TEXT_ADDR = 0x40000000  # 1 GiB, 2 MiB aligned (a non-PIE binary's text would sit lower)
POOL_ADDR = 0x200000000  # 8 GiB
CHURN_BASE = 0x1000000000  # 64 GiB
CHURN_SLOT = 64 * MB
CHURN_SLOTS = 16

Event = dict[str, Any]


# -- parameters -------------------------------------------------------------------------------

class InvalidParameter(ValueError):
    """A parameter of the wrong kind (a ValueError, as every parameter check's refusal)."""


@dataclasses.dataclass(frozen=True)
class TextParams:
    size: int = 256 * MB
    procs: int = 8
    duration_ms: float = 60_000.0
    scale: float = 1.0
    hugepage: bool = True
    startup_bytes: int = 16 * MB
    start_spread_ms: float = 500.0
    access_interval_ms: float = 5.0
    seq_fraction: float = 0.2
    seq_bytes: int = 64 * KB
    zipf_s: float = 1.0
    hot_layout: str = "scattered"
    lock_fraction: float = 0.1
    lock_hold_ms: float = 200.0
    lock_write: bool = False
    lifetime_ms: float = 30_000.0
    restart_delay_ms: float = 100.0
    scan_sleep_ms: int = 1000
    file_name: str = "text.bin"


@dataclasses.dataclass(frozen=True)
class ShmemParams:
    size: int = 256 * MB
    procs: int = 4
    duration_ms: float = 30_000.0
    scale: float = 1.0
    hugepage: bool = True
    start_spread_ms: float = 100.0
    access_interval_ms: float = 5.0
    buffer_bytes: int = 64 * KB
    write_fraction: float = 0.5
    zipf_s: float = 0.9
    pageout_interval_ms: float = 200.0
    scan_sleep_ms: int = 1000
    file_name: str = "bufpool"


@dataclasses.dataclass(frozen=True)
class UprobeParams:
    size: int = 64 * MB
    procs: int = 4
    duration_ms: float = 30_000.0
    scale: float = 1.0
    hugepage: bool = True
    startup_bytes: int = 8 * MB
    start_spread_ms: float = 200.0
    access_interval_ms: float = 5.0
    seq_fraction: float = 0.2
    seq_bytes: int = 64 * KB
    zipf_s: float = 1.0
    hot_layout: str = "scattered"
    probe_start_ms: float = 1000.0
    probe_interval_ms: float = 500.0
    probe_lifetime_ms: float = 2000.0
    max_probes: int = 16
    scan_sleep_ms: int = 1000
    file_name: str = "text.bin"


@dataclasses.dataclass(frozen=True)
class ChurnParams:
    files: int = 4
    file_size: int = 16 * MB
    procs: int = 8
    max_procs: int = 32
    duration_ms: float = 10_000.0
    scale: float = 1.0
    op_interval_ms: float = 1.0
    max_touch_bytes: int = 256 * KB
    scan_sleep_ms: int = 1000


DESCRIPTIONS = {
    "text": "a large read-only executable mapped r-x private by several processes with MADV_HUGEPAGE: "
    "hot/cold read faults, application threads holding mmap_lock, processes starting and exiting",
    "shmem": "a shared shmem buffer pool written by several processes, with MADV_PAGEOUT pressure",
    "uprobe": "a text workload with uprobes added and removed on hot text pages",
    "churn": "mmap/munmap/touch/madvise/fork/exit at a high rate over several library files",
}

WORKLOADS: dict[str, type] = {
    "text": TextParams,
    "shmem": ShmemParams,
    "uprobe": UprobeParams,
    "churn": ChurnParams,
}


def params(name: str, **overrides: Any) -> Any:
    """The parameter dataclass of workload ``name`` with ``overrides``, checked.

    Raises:
        ValueError: an unknown workload or parameter, or a value out of range.
    """
    cls = WORKLOADS.get(name)
    if cls is None:
        raise ValueError(f"unknown workload {name!r} (one of {', '.join(WORKLOADS)})")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in overrides:
        if key not in known:
            raise ValueError(f"workload {name}: unknown parameter {key!r} (one of {', '.join(sorted(known))})")
    p = cls(**{k: _coerce(name, cls, k, v) for k, v in overrides.items()})
    _check(name, p)
    return p


def _coerce(name: str, cls: type, key: str, value: Any) -> Any:
    """The value as the parameter's declared type (so that 50 and 50.0 give the same trace)."""
    default = next(f.default for f in dataclasses.fields(cls) if f.name == key)
    kind = type(default)
    if kind is bool or kind is str:
        if type(value) is not kind:
            raise InvalidParameter(f"workload {name}: {key} must be a {kind.__name__}, not {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(f"workload {name}: {key} must be a number, not {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"workload {name}: {key} must be an integer, not {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"workload {name}: {key} must be a finite number")
        return int(value)
    return float(value)


def _check(name: str, p: Any) -> None:
    for f in dataclasses.fields(p):
        v = getattr(p, f.name)
        if isinstance(v, (bool, str)):
            continue
        if isinstance(v, (int, float)) and (not math.isfinite(v) or v < 0):
            raise ValueError(f"workload {name}: {f.name} must be a finite number >= 0, not {v}")
    positive = ("procs", "duration_ms", "scale", "access_interval_ms", "op_interval_ms", "size", "file_size",
                "files", "seq_bytes", "buffer_bytes", "probe_interval_ms", "pageout_interval_ms", "max_procs")
    for key in positive:
        if hasattr(p, key) and getattr(p, key) <= 0:
            raise ValueError(f"workload {name}: {key} must be positive")
    for key in ("seq_fraction", "lock_fraction", "write_fraction"):
        if hasattr(p, key) and not 0 <= getattr(p, key) <= 1:
            raise ValueError(f"workload {name}: {key} must be within 0..1")
    if getattr(p, "lock_fraction", 0) >= 1:
        raise ValueError(f"workload {name}: lock_fraction must be below 1")
    if getattr(p, "hot_layout", "front") not in ("front", "scattered"):
        raise ValueError(f"workload {name}: hot_layout must be 'front' or 'scattered'")
    if hasattr(p, "max_procs") and p.max_procs < p.procs:
        raise ValueError(f"workload {name}: max_procs must be >= procs")


# -- helpers ----------------------------------------------------------------------------------

def _ev(t_us: int, op: str, **fields: Any) -> Event:
    """An event in canonical form (field order and defaults as the writer puts them)."""
    out: Event = {"t_ms": t_us / 1000, "op": op}
    for f in OPS[op]:
        if f.name in fields:
            out[f.name] = fields.pop(f.name)
        else:
            assert not f.required, (op, f.name)
            out[f.name] = f.default
    assert not fields, (op, fields)
    return out


def _us(ms: float) -> int:
    return round(ms * 1000)


def _rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"thpsplit:{seed}:{stream}")


def _exp(rng: random.Random, mean_ms: float) -> int:
    """An exponential gap in microseconds, at least 1."""
    return max(1, _us(rng.expovariate(1.0 / mean_ms))) if mean_ms > 0 else 1


def _scaled(size: int, scale: float, unit: int = HPAGE_PMD_SIZE) -> int:
    return max(unit, int(size * scale) // unit * unit)


class _Zipf:
    """Zipf over ``n`` items (rank r has weight 1/r**s); ranks map to items in ``order``."""

    def __init__(self, n: int, s: float, order: list[int]):
        weights = [1.0 / (r**s) for r in range(1, n + 1)]
        total = sum(weights)
        acc = 0.0
        self.cdf = []
        for w in weights:
            acc += w / total
            self.cdf.append(acc)
        self.order = order

    def sample(self, rng: random.Random) -> int:
        rank = min(bisect.bisect_left(self.cdf, rng.random()), len(self.cdf) - 1)
        return self.order[rank]


def _layout(n: int, layout: str, rng: random.Random) -> list[int]:
    order = list(range(n))
    if layout == "scattered":
        rng.shuffle(order)
    return order


def _merge(streams: Iterable[Iterator[tuple[int, Event]]]) -> Iterator[Event]:
    """Merge per-stream (t_us, event) iterators on (time, stream index, sequence)."""
    keyed = []
    for sid, stream in enumerate(streams):
        keyed.append(((t, sid, seq, ev) for seq, (t, ev) in enumerate(stream)))
    for _, _, _, ev in heapq.merge(*keyed, key=lambda x: x[:3]):
        yield ev


def _spread(p: Any) -> float:
    """Processes start within the first ``start_spread_ms`` (at most half the run)."""
    return min(p.start_spread_ms, p.duration_ms / 2)


def _hugepage_knobs(scan_sleep_ms: int) -> dict[str, Any]:
    return {"khugepaged/scan_sleep_millisecs": scan_sleep_ms, "thpsplit/remap_sleep_millisecs": scan_sleep_ms}


# -- text (and uprobe's text part) ------------------------------------------------------------

def _text_process(p: Any, seed: int, slot: int, end_us: int, zipf: _Zipf, size: int,
                  lock: bool) -> Iterator[tuple[int, Event]]:
    """Successive processes in one slot: spawn, map, start up, run, (hold mmap_lock), exit."""
    rng = _rng(seed, f"proc{slot}")
    t = _us(rng.uniform(0, _spread(p)))
    startup = min(size, _scaled(p.startup_bytes, p.scale, PAGE_SIZE))
    seq_bytes = max(PAGE_SIZE, min(p.seq_bytes, HPAGE_PMD_SIZE) // PAGE_SIZE * PAGE_SIZE)
    lifetime = getattr(p, "lifetime_ms", 0.0)
    for incarnation in itertools.count():
        if t >= end_us:
            return
        pid = slot + 1 + p.procs * incarnation
        exit_at = t + _exp(rng, lifetime) if lifetime > 0 else None
        stop = min(end_us, exit_at) if exit_at is not None else end_us
        yield t, _ev(t, "spawn", pid=pid)
        yield t, _ev(t, "mmap", pid=pid, addr=TEXT_ADDR, length=size, name=p.file_name, prot="rx", shared=False)
        if p.hugepage:
            yield t, _ev(t, "madvise", pid=pid, addr=TEXT_ADDR, length=size, advice="hugepage")
        yield t, _ev(t, "touch", pid=pid, addr=TEXT_ADDR, length=startup)
        run = _text_accesses(p, rng, pid, t, stop, zipf, size, seq_bytes)
        if lock and p.lock_fraction > 0:
            holds = _lock_holds(p, _rng(seed, f"lock{slot}.{incarnation}"), pid, t, stop)
            yield from heapq.merge(run, holds, key=lambda x: x[0])
        else:
            yield from run
        if exit_at is None or exit_at >= end_us:
            return
        yield exit_at, _ev(exit_at, "exit", pid=pid)
        t = exit_at + _us(p.restart_delay_ms)


def _text_accesses(p: Any, rng: random.Random, pid: int, t: int, stop: int, zipf: _Zipf, size: int,
                   seq_bytes: int) -> Iterator[tuple[int, Event]]:
    pages_per_range = HPAGE_PMD_SIZE // PAGE_SIZE
    while True:
        t += _exp(rng, p.access_interval_ms)
        if t >= stop:
            return
        base = TEXT_ADDR + zipf.sample(rng) * HPAGE_PMD_SIZE
        if rng.random() < p.seq_fraction:
            first = rng.randrange(pages_per_range - seq_bytes // PAGE_SIZE + 1)
            yield t, _ev(t, "touch", pid=pid, addr=base + first * PAGE_SIZE, length=seq_bytes)
        else:
            yield t, _ev(t, "fault", pid=pid, addr=base + rng.randrange(pages_per_range) * PAGE_SIZE)


def _lock_holds(p: TextParams, rng: random.Random, pid: int, t: int, stop: int) -> Iterator[tuple[int, Event]]:
    free_mean = p.lock_hold_ms * (1 - p.lock_fraction) / p.lock_fraction
    while True:
        t += _exp(rng, free_mean)
        hold = _exp(rng, p.lock_hold_ms)
        if t + hold >= stop:  # a hold never outlives its process
            return
        yield t, _ev(t, "lock", pid=pid, hold_ms=hold / 1000, write=p.lock_write)
        t += hold


def _text_setup(p: Any, seed: int) -> tuple[int, _Zipf]:
    size = _scaled(p.size, p.scale)
    n = size // HPAGE_PMD_SIZE
    zipf = _Zipf(n, p.zipf_s, _layout(n, p.hot_layout, _rng(seed, "layout")))
    return size, zipf


def _text_events(p: TextParams, seed: int) -> Iterator[Event]:
    size, zipf = _text_setup(p, seed)
    end = _us(p.duration_ms)
    setup = iter([(0, _ev(0, "file_create", name=p.file_name, size=size))])
    procs = (_text_process(p, seed, slot, end, zipf, size, lock=True) for slot in range(p.procs))
    yield from _merge([setup, *procs, iter([(end, _ev(end, "mark", label="end"))])])


# -- uprobe -----------------------------------------------------------------------------------

def _debugger(p: UprobeParams, seed: int, zipf: _Zipf, end: int) -> Iterator[tuple[int, Event]]:
    rng = _rng(seed, "debugger")
    pages_per_range = HPAGE_PMD_SIZE // PAGE_SIZE
    active: dict[int, int] = {}  # page -> offset
    removals: list[tuple[int, int]] = []  # (t, page)
    t = _us(p.probe_start_ms)
    while True:
        nxt = t + _exp(rng, p.probe_interval_ms)
        while removals and removals[0][0] <= min(nxt, end):
            when, page = heapq.heappop(removals)
            yield when, _ev(when, "uprobe", action="del", name=p.file_name, offset=active.pop(page))
        if nxt >= end:
            return
        t = nxt
        if len(active) >= p.max_probes:
            continue
        page = zipf.sample(rng) * pages_per_range + rng.randrange(pages_per_range)
        if page in active:
            continue
        active[page] = page * PAGE_SIZE + rng.randrange(0, PAGE_SIZE, 16)
        yield t, _ev(t, "uprobe", action="add", name=p.file_name, offset=active[page])
        heapq.heappush(removals, (t + _exp(rng, p.probe_lifetime_ms), page))


def _uprobe_events(p: UprobeParams, seed: int) -> Iterator[Event]:
    size, zipf = _text_setup(p, seed)
    end = _us(p.duration_ms)
    setup = iter([(0, _ev(0, "file_create", name=p.file_name, size=size))])
    procs = (_text_process(p, seed, slot, end, zipf, size, lock=False) for slot in range(p.procs))
    yield from _merge([setup, *procs, _debugger(p, seed, zipf, end), iter([(end, _ev(end, "mark", label="end"))])])


# -- shmem ------------------------------------------------------------------------------------

def _shmem_process(p: ShmemParams, seed: int, slot: int, end: int, zipf: _Zipf, size: int) -> Iterator[tuple[int, Event]]:
    rng = _rng(seed, f"proc{slot}")
    pid = slot + 1
    t = _us(rng.uniform(0, _spread(p)))
    buf = max(PAGE_SIZE, min(p.buffer_bytes, HPAGE_PMD_SIZE) // PAGE_SIZE * PAGE_SIZE)
    per_range = HPAGE_PMD_SIZE // buf
    yield t, _ev(t, "spawn", pid=pid)
    yield t, _ev(t, "mmap", pid=pid, addr=POOL_ADDR, length=size, name=p.file_name, prot="rw", shared=True)
    if p.hugepage:
        yield t, _ev(t, "madvise", pid=pid, addr=POOL_ADDR, length=size, advice="hugepage")
    while True:
        t += _exp(rng, p.access_interval_ms)
        if t >= end:
            return
        addr = POOL_ADDR + zipf.sample(rng) * HPAGE_PMD_SIZE + rng.randrange(per_range) * buf
        yield t, _ev(t, "touch", pid=pid, addr=addr, length=buf, write=rng.random() < p.write_fraction)


def _pageout(p: ShmemParams, seed: int, end: int, zipf: _Zipf) -> Iterator[tuple[int, Event]]:
    """Reclaim pressure: MADV_PAGEOUT on a range drawn from the cold end of the distribution."""
    rng = _rng(seed, "pageout")
    cold = _Zipf(len(zipf.order), p.zipf_s, list(reversed(zipf.order)))
    t = _us(_spread(p))
    while True:
        t += _exp(rng, p.pageout_interval_ms)
        if t >= end:
            return
        pid = rng.randrange(p.procs) + 1
        addr = POOL_ADDR + cold.sample(rng) * HPAGE_PMD_SIZE
        yield t, _ev(t, "madvise", pid=pid, addr=addr, length=HPAGE_PMD_SIZE, advice="pageout")


def _shmem_events(p: ShmemParams, seed: int) -> Iterator[Event]:
    size = _scaled(p.size, p.scale)
    n = size // HPAGE_PMD_SIZE
    zipf = _Zipf(n, p.zipf_s, _layout(n, "scattered", _rng(seed, "layout")))
    end = _us(p.duration_ms)
    setup = iter([(0, _ev(0, "file_create", name=p.file_name, size=size, shmem=True))])
    procs = [_shmem_process(p, seed, slot, end, zipf, size) for slot in range(p.procs)]
    yield from _merge([setup, *procs, _pageout(p, seed, end, zipf), iter([(end, _ev(end, "mark", label="end"))])])


# -- churn ------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Mapping:
    addr: int
    length: int
    name: str
    offset: int
    prot: str
    shared: bool
    slot: int


class _Churn:
    """One stream, a state machine: each step picks an operation that is valid in the state."""

    MIX = (("mmap", 30), ("munmap", 18), ("touch", 32), ("madvise", 8), ("fork", 6), ("exit", 6))
    ADVICE = (("hugepage", 4), ("nohugepage", 1), ("dontneed", 2), ("pageout", 1), ("collapse", 1))

    def __init__(self, p: ChurnParams, seed: int):
        self.p = p
        self.rng = _rng(seed, "churn")
        self.size = _scaled(p.file_size, p.scale)
        self.files = [f"lib{i}.so" for i in range(p.files)]
        self.procs: dict[int, list[_Mapping]] = {}
        self.next_pid = 1
        self.t = 0

    def pick(self, table: tuple[tuple[str, int], ...]) -> str:
        names, weights = zip(*table, strict=True)
        return self.rng.choices(names, weights)[0]

    def spawn(self) -> Iterator[Event]:
        pid = self.next_pid
        self.next_pid += 1
        self.procs[pid] = []
        yield _ev(self.t, "spawn", pid=pid)
        yield from self.mmap(pid)

    def mmap(self, pid: int) -> Iterator[Event]:
        maps = self.procs[pid]
        used = {m.slot for m in maps}
        free = [s for s in range(CHURN_SLOTS) if s not in used]
        if not free:
            return
        slot = self.rng.choice(free)
        name = self.rng.choice(self.files)
        ranges = self.size // HPAGE_PMD_SIZE
        if self.rng.random() < 0.5:
            offset, length = 0, self.size
        else:
            first = self.rng.randrange(ranges)
            offset = first * HPAGE_PMD_SIZE
            length = self.rng.randrange(1, (self.size - offset) // PAGE_SIZE + 1) * PAGE_SIZE
        prot = self.rng.choice(("r", "rx", "rx", "rw"))
        shared = prot != "rx" and self.rng.random() < 0.5
        addr = CHURN_BASE + slot * CHURN_SLOT  # 2 MiB aligned, as the offset: THP-eligible
        maps.append(_Mapping(addr, length, name, offset, prot, shared, slot))
        yield _ev(self.t, "mmap", pid=pid, addr=addr, length=length, name=name, offset=offset, prot=prot, shared=shared)

    def munmap(self, pid: int) -> Iterator[Event]:
        maps = self.procs[pid]
        if not maps:
            return
        m = self.rng.choice(maps)
        pages = m.length // PAGE_SIZE
        if pages == 1 or self.rng.random() < 0.5:
            maps.remove(m)
            yield _ev(self.t, "munmap", pid=pid, addr=m.addr, length=m.length)
            return
        # Part of it: a head, a tail, or a hole in the middle (which splits the mapping).
        lo = self.rng.randrange(pages)
        hi = self.rng.randrange(lo + 1, pages + 1)
        if lo == 0 and hi == pages:
            hi -= 1
        yield _ev(self.t, "munmap", pid=pid, addr=m.addr + lo * PAGE_SIZE, length=(hi - lo) * PAGE_SIZE)
        maps.remove(m)
        if lo > 0:
            maps.append(dataclasses.replace(m, length=lo * PAGE_SIZE))
        if hi < pages:
            cut = hi * PAGE_SIZE
            maps.append(dataclasses.replace(m, addr=m.addr + cut, length=m.length - cut, offset=m.offset + cut))

    def touch(self, pid: int) -> Iterator[Event]:
        maps = self.procs[pid]
        if not maps:
            yield from self.mmap(pid)
            return
        m = self.rng.choice(maps)
        pages = m.length // PAGE_SIZE
        count = self.rng.randrange(1, min(pages, self.p.max_touch_bytes // PAGE_SIZE) + 1)
        first = self.rng.randrange(pages - count + 1)
        write = "w" in m.prot and self.rng.random() < 0.5
        yield _ev(self.t, "touch", pid=pid, addr=m.addr + first * PAGE_SIZE, length=count * PAGE_SIZE, write=write)

    def madvise(self, pid: int) -> Iterator[Event]:
        maps = self.procs[pid]
        if not maps:
            return
        m = self.rng.choice(maps)
        yield _ev(self.t, "madvise", pid=pid, addr=m.addr, length=m.length, advice=self.pick(self.ADVICE))

    def fork(self, pid: int) -> Iterator[Event]:
        if len(self.procs) >= self.p.max_procs:
            return
        child = self.next_pid
        self.next_pid += 1
        self.procs[child] = [dataclasses.replace(m) for m in self.procs[pid]]
        yield _ev(self.t, "fork", pid=pid, child=child)

    def exit(self, pid: int) -> Iterator[Event]:
        if len(self.procs) <= 1:
            return
        del self.procs[pid]
        yield _ev(self.t, "exit", pid=pid)
        if len(self.procs) < max(1, self.p.procs // 2):
            yield from self.spawn()

    def events(self) -> Iterator[Event]:
        p = self.p
        for name in self.files:
            yield _ev(0, "file_create", name=name, size=self.size)
        for _ in range(p.procs):
            yield from self.spawn()
        end = _us(p.duration_ms)
        while True:
            self.t += _exp(self.rng, p.op_interval_ms)
            if self.t >= end:
                break
            op = self.pick(self.MIX)
            pid = self.rng.choice(sorted(self.procs))
            yield from getattr(self, op)(pid)
        yield _ev(end, "mark", label="end")


def _churn_events(p: ChurnParams, seed: int) -> Iterator[Event]:
    return _Churn(p, seed).events()


# -- the API ----------------------------------------------------------------------------------

_GENERATORS: dict[str, Callable[[Any, int], Iterator[Event]]] = {
    "text": _text_events,
    "shmem": _shmem_events,
    "uprobe": _uprobe_events,
    "churn": _churn_events,
}

_SYSFS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "text": lambda p: _hugepage_knobs(p.scan_sleep_ms),
    "uprobe": lambda p: _hugepage_knobs(p.scan_sleep_ms),
    "shmem": lambda p: {**_hugepage_knobs(p.scan_sleep_ms), "shmem_enabled": "advise"},
    "churn": lambda p: _hugepage_knobs(p.scan_sleep_ms),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """A generated workload: ``header`` (a trace header) and ``events()`` (a fresh iterator of
    events each call, in time order and canonical form)."""

    name: str
    seed: int
    params: Any
    header: dict[str, Any]

    def events(self) -> Iterator[Event]:
        return _GENERATORS[self.name](self.params, self.seed)

    def __iter__(self) -> Iterator[Event]:
        return self.events()


def generate(name: str, seed: int = 0, **overrides: Any) -> Workload:
    """Workload ``name`` with ``seed`` and parameter ``overrides`` (see the dataclasses)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidParameter(f"seed must be an integer, not {seed!r}")
    p = params(name, **overrides)
    header = make_header(
        f"workload:{name}",
        clock="virtual",
        seed=seed,
        params=dataclasses.asdict(p),
        sysfs=_SYSFS[name](p),
        description=DESCRIPTIONS[name],
    )
    return Workload(name, seed, p, header)


def write_workload(name: str, dst: Any, seed: int = 0, **overrides: Any) -> int:
    """Generate and write a workload's trace to a path or file; returns the number of events."""
    w = generate(name, seed, **overrides)
    return write_trace(dst, w.events(), w.header)


def describe() -> dict[str, dict[str, Any]]:
    """Every workload's parameters and their defaults."""
    return {name: dataclasses.asdict(cls()) for name, cls in WORKLOADS.items()}


def parse_value(cls: type, key: str, text: str) -> Any:
    """A parameter of dataclass ``cls`` from text as typed: sizes take K/M/G, floats ``1/64``,
    booleans 1/0, true/false, yes/no, on/off.

    Raises:
        ValueError: an unknown parameter or a value that is not of its kind.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        raise ValueError(f"unknown parameter {key!r} (one of {', '.join(fields)})")
    default = fields[key].default
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}: {text!r} is not a boolean")
    if isinstance(default, int):
        return parse_size(text)
    if isinstance(default, float):
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    return text


def main(argv: list[str] | None = None) -> int:
    """``python -m shared.sim.workloads NAME [--seed N] [-p KEY=VALUE ...] [-o FILE]``: write the
    workload's trace (stdout by default); ``--list`` prints every workload's parameters."""
    import argparse

    ap = argparse.ArgumentParser(prog="thpsplit-workload", description="generate a workload trace")
    ap.add_argument("name", nargs="?", choices=tuple(WORKLOADS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a parameter (sizes take K/M/G; scale takes 1/64)")
    ap.add_argument("-o", "--out", metavar="FILE", help="write here instead of stdout")
    ap.add_argument("--list", action="store_true", help="print every workload's parameters (JSON)")
    args = ap.parse_args(argv)
    if args.list or args.name is None:
        print(json.dumps(describe(), indent=2))
        return 0
    try:
        overrides = {}
        for item in args.param:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"-p {item!r}: expected KEY=VALUE")
            overrides[key] = parse_value(WORKLOADS[args.name], key, value)
        if args.out:
            n = write_workload(args.name, args.out, args.seed, **overrides)
            sys.stderr.write(f"{args.out}: {n} events\n")
        else:
            write_workload(args.name, sys.stdout, args.seed, **overrides)
    except ValueError as err:
        sys.stderr.write(f"thpsplit-workload: {err}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
