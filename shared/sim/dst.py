"""Deterministic simulation testing: both actors in one process, the real message code and codec
between them, faults injected into the peer link, a random workload, every step checked.

One seed decides everything: the knobs, the workload, when each message is delivered, and which
fault strikes when. The harness drives a :class:`~shared.sim.world.World` whose peer messages stay
in flight (each actor's outbox is its direction of the link) until a step delivers them, through
the codec and a frame, as a socket would. A step is one of:

* ``op``: a client request (through the codec, on the actor that serves it) starts; up to
  :data:`MAX_IN_FLIGHT_OPS` run at once, as from as many client connections;
* ``deliver``: a few messages cross, each from a direction picked at random, so the two
  directions interleave in every order (and with client requests and timers);
* ``tick``: model time passes with messages in flight (lock holds end, khugepaged wakes, ...);
* ``drain``: everything in flight crosses (the link catches up);

and the faults (:data:`FAULT_KINDS`):

* ``delay``: a whole direction is held for some steps while everything else goes on;
* ``duplicate``: the next message of a direction is delivered twice, if a second copy is one
  the protocol tolerates (:data:`IDEMPOTENT` notices and replies; see docs/RELIABILITY.md for why
  nothing else is ever duplicated);
* ``cut``: the connection breaks at a message boundary: each direction delivers a prefix of what
  is in flight, the rest is lost, both sides lose their peer; some steps later they reconnect and
  resync (``cut_mid_collapse`` counts the cuts while collapse_file waited on the remapper);
* ``crash_collapser`` / ``crash_remapper``: that daemon dies at a message boundary (what it had
  sent may still arrive; what was sent to it is lost) and a new one starts, empty (a new boot,
  new inode generations), and reconnects some steps later;
* ``restore``: with this kind allowed, a ``snapshot`` step saves both daemons' state now and then
  (through the real file format, :mod:`shared.persist`), and a crashed daemon comes back from its
  last snapshot half the time (``restored_collapser`` / ``restored_remapper``): an older world
  than its peer's, which the identities and the revalidation of mappings must reconcile.

Within a direction, messages are never reordered: the link is a byte stream and the protocol
depends on it (an ``RmapDelta`` travels ahead of the ``Unmapped`` it explains). ``--unsafe
reorder`` and ``--unsafe duplicate`` break those rules on purpose, to show what the checks catch.

After every step the invariant checker runs if nothing is in flight, and otherwise the in-flight
checks (:func:`check_in_flight`): every file page the remapper maps is allocated, of the file and
index its VMA says, and accounted by the collapser (counting the accounting still in flight). At
the end the link is restored, everything is delivered and model time runs until every request
has finished; then the full checker and :func:`check_end` (nothing waiting, nothing isolated, the
huge-page pool conserved, khugepaged's ranges those the remapper registered).

    python -m shared.sim.dst --seed 7 --steps 400          # one seed, verbose on failure
    python -m shared.sim.dst --seeds 0:1000 --steps 400    # a range: figures per fault kind
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from collapsed import snapshot as collapsed_snapshot
from collapsed.collapser import Collapser
from collapsed.pagecache import PG_HEAD
from remapd import snapshot as remapd_snapshot
from remapd.mm import ANON_PFN_BASE, PTE_ANON, PteTable, pte_pfn
from remapd.remapper import Remapper
from remapd.uprobes import uprobe_add, uprobe_del
from shared import persist
from shared.errors import UserError
from shared.knobs import RETRY_POLICIES, Knobs
from shared.protocol import messages as m
from shared.protocol.schema import Message, Request
from shared.sim.invariants import check
from shared.sim.world import Pending, World
from shared.units import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SHIFT,
    HPAGE_PMD_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
)

MB = 1 << 20
FAULT_KINDS = ("delay", "duplicate", "cut", "crash_collapser", "crash_remapper", "restore")
UNSAFE_KINDS = ("reorder", "duplicate")
# Client requests running at once (each as from its own connection).
MAX_IN_FLIGHT_OPS = 6
C2R, R2C = "c2r", "r2c"
# The knob remapd never pushes: the collapser's own huge page pool.
POOL_KNOB = "thpsplit/free_huge_pages"
_PUSHED = tuple(k for k in Knobs().writable_items() if k != POOL_KNOB)

# Messages a second copy of which changes nothing. Notices that restate state (what a reconnect's
# resync sends again): the receiver sets, rather than adds. Replies: the first copy resumes the
# waiting task, and a reply whose ``req`` no longer waits is ignored.
IDEMPOTENT: tuple[type[Message], ...] = (
    m.FileInfo,
    m.KnobsChanged,
    m.RegisterRange,
    m.UnregisterRange,
    m.MmExit,
    m.SetCollapsePmd,
    m.MarkDirty,
    m.PageAnswer,
    m.FolioAnswer,
    m.CollapseResult,
    m.Unmapped,
    m.Retracted,
    m.CollapsePteMappedResult,
    m.VisitMmDone,
)

FILES = (("a", False), ("b", False), ("s", True))
PIDS = (1, 2, 3, 4)
BASE_ADDR = 0x40000000


class Violation(Exception):
    """A check failed, or the model raised where it must not."""


class LinkWorld(World):
    """A World whose peer messages stay in flight while the link is up (``manual``): the caller
    delivers them, one at a time (:meth:`deliver`) or all (:meth:`drain`)."""

    manual = False

    def settle(self) -> None:
        if self.manual and self.connected:
            return
        super().settle()

    def deliver(self, direction: str) -> Message:
        """Hand the next message of ``direction`` (:data:`C2R` or :data:`R2C`) to its receiver."""
        if direction == C2R:
            msg = self.collapser.outbox.popleft()
            self.remapper.deliver(self.wire(msg))
        else:
            msg = self.remapper.outbox.popleft()
            self.collapser.deliver(self.wire(msg))
        return msg

    def drain(self) -> None:
        """Deliver until neither side has anything in flight."""
        while self.connected and (self.collapser.outbox or self.remapper.outbox):
            self.deliver(C2R if self.collapser.outbox else R2C)


@dataclasses.dataclass
class Result:
    seed: int
    steps: int
    unsafe: tuple[str, ...] = ()
    faults_allowed: tuple[str, ...] = FAULT_KINDS
    faults: Counter[str] = dataclasses.field(default_factory=Counter)
    ops: Counter[str] = dataclasses.field(default_factory=Counter)
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    delivered: int = 0
    checks: int = 0
    flight_checks: int = 0
    collapses: int = 0
    violation: str | None = None
    trace: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def command(self) -> str:
        """The one line that reproduces this run."""
        cmd = f"python -m shared.sim.dst --seed {self.seed} --steps {self.steps}"
        if tuple(self.faults_allowed) != FAULT_KINDS:
            cmd += f" --faults {','.join(self.faults_allowed) or 'none'}"
        if self.unsafe:
            cmd += f" --unsafe {','.join(self.unsafe)}"
        return cmd


# -- the checks ------------------------------------------------------------------------------


def check_in_flight(world: World) -> None:
    """What must hold at every step, with messages in flight: the remapper maps only file pages
    that are allocated, of its VMA's file and index, and no more mappings of a page than the
    collapser accounts once the rows in flight to it are applied (it may account more: a fault's
    answer in flight, or held by a fault that waits to retake the mmap lock)."""
    c, r = world.collapser, world.remapper
    mem = c.mem
    mapped_pte: Counter[int] = Counter()
    mapped_pmd: Counter[int] = Counter()
    pinned: Counter[int] = Counter()
    for pid, mm in r.mms.items():
        for pidx, entry in mm.pmds.items():
            base = pidx << HPAGE_PMD_SHIFT
            if isinstance(entry, int):
                head = pte_pfn(entry)
                vma = mm.find_vma(base)
                _assert(world.connected, f"pid {pid}: PMD at {base:#x} with the peer gone")
                _assert(vma is not None and mem.allocated(head), f"pid {pid}: PMD at {base:#x} maps freed {head}")
                assert vma is not None
                _assert(
                    mem.ino[head] == vma.ino and mem.index[head] == vma.pgoff_at(base),
                    f"pid {pid}: PMD at {base:#x} maps the wrong THP",
                )
                mapped_pmd[head] += 1
                continue
            assert isinstance(entry, PteTable)
            for slot, pte in entry.present():
                if pte & PTE_ANON:
                    continue
                addr = base + (slot << PAGE_SHIFT)
                pfn = pte_pfn(pte)
                vma = mm.find_vma(addr)
                _assert(world.connected, f"pid {pid}: PTE at {addr:#x} maps a file page with the peer gone")
                _assert(vma is not None, f"pid {pid}: PTE at {addr:#x} outside any VMA")
                assert vma is not None
                _assert(mem.allocated(pfn), f"pid {pid}: PTE at {addr:#x} maps freed pfn {pfn}")
                head = mem.head(pfn)
                _assert(
                    mem.ino[head] == vma.ino and mem.index[pfn] == vma.pgoff_at(addr),
                    f"pid {pid}: PTE at {addr:#x} maps pfn {pfn} of ino {mem.ino[head]} index "
                    f"{mem.index[pfn]}, not {vma}'s page",
                )
                mapped_pte[pfn] += 1
        for pfns in mm.pins.values():
            for pfn in pfns:
                if pfn < ANON_PFN_BASE:
                    pinned[mem.head(pfn)] += 1
    rows_pte: Counter[int] = Counter()
    rows_pmd: Counter[int] = Counter()
    rows_pin: Counter[int] = Counter()
    in_flight = [msg for msg in r.outbox if isinstance(msg, m.RmapDelta)]
    pending_rows = [row for msg in (*in_flight, r.rmap.delta()) for row in msg.rows]
    for pfn, pte, pmd, pin in pending_rows:
        rows_pte[pfn] += pte
        rows_pmd[pfn] += pmd
        rows_pin[pfn] += pin
    for pfn, n in mapped_pte.items():
        _assert(
            mem.mapcount[pfn] + rows_pte[pfn] >= n,
            f"pfn {pfn}: mapped by {n} PTEs, accounted {mem.mapcount[pfn]} + {rows_pte[pfn]} in flight",
        )
    for head, n in mapped_pmd.items():
        _assert(mem.entire.get(head, 0) + rows_pmd[head] >= n, f"THP {head}: {n} PMDs, fewer accounted")
    for head, n in pinned.items():
        accounted = mem.pins.get(head, 0) + sum(v for p, v in rows_pin.items() if mem.head(p) == head)
        _assert(accounted >= n, f"pfn {head}: {n} pins held, {accounted} accounted")


def _pool_total(c: Collapser) -> int:
    """Free huge pages, plus those allocated (THPs), plus those split into small pages: constant
    over a collapser's life unless the pool knob is written."""
    mem = c.mem
    heads = sum(1 for b in range(0, len(mem.flags), HPAGE_PMD_NR) if mem.flags[b] & PG_HEAD and mem.pmd_mappable(b))
    return int(c.knobs.free_huge_pages) + heads + c.vm["thp_split_page"]


def check_end(world: World, pool_base: int) -> None:
    """The end state, everything delivered and finished: nothing waits on the peer (so every
    collapse completed or rolled back: the checker has seen no page locked or isolated, and no
    THP half published), the huge page pool is conserved (every THP a collapse allocated is in
    the cache, or was freed or split), and khugepaged's ranges are exactly the remapper's."""
    c, r = world.collapser, world.remapper
    _assert(not c.pending_calls() and not r.pending_calls(), "a request to the peer was never answered")
    total = _pool_total(c)
    _assert(total == pool_base, f"huge page pool: {total} (free + THPs + split) != {pool_base}")
    expected: dict[tuple[int, int], tuple[int, int, int]] = {}
    for pid, mm in r.mms.items():
        for vma in mm.vmas:
            if r.address_space._khugepaged_suitable(vma):
                expected[(pid, vma.start)] = (vma.end, vma.ino, vma.pgoff)
    have = {
        (pid, start): (rng.end, rng.ino, rng.pgoff)
        for pid, slot in c.khugepaged.slots.items()
        for start, rng in slot.ranges.items()
    }
    _assert(have == expected, f"khugepaged's ranges {sorted(have)} are not the remapper's {sorted(expected)}")


def _assert(ok: bool, what: str) -> None:
    if not ok:
        raise Violation(what)


# -- the simulation --------------------------------------------------------------------------


class Simulation:
    """One seeded run; :meth:`run` returns its :class:`Result`."""

    def __init__(
        self,
        seed: int,
        steps: int,
        faults: Iterable[str] = FAULT_KINDS,
        unsafe: Iterable[str] = (),
        verbose: bool = False,
    ):
        self.rng = random.Random(seed)
        self.result = Result(seed, steps, tuple(sorted(set(unsafe))), tuple(f for f in FAULT_KINDS if f in set(faults)))
        self.verbose = verbose
        self.trace: deque[str] = deque(maxlen=60)
        self.knobs = self._knobs()
        self.world = LinkWorld(dataclasses.replace(self.knobs))
        self.world.manual = True
        self.pool_base = self.knobs.free_huge_pages
        self.held = {C2R: 0, R2C: 0}
        self.dup_next: set[str] = set()
        self.down_for = 0
        # Client requests in flight: (pending, the actor object that runs it, what).
        self.ops: list[tuple[Pending, Collapser | Remapper, str]] = []
        self.step_no = 0
        self.saved: dict[str, dict[str, Any]] = {}

    def _knobs(self) -> Knobs:
        rng = self.rng
        return Knobs(
            enabled="always",
            shmem_enabled=rng.choice(("within_size", "advise", "always")),
            scan_sleep_millisecs=rng.choice((10, 50, 100)),
            alloc_sleep_millisecs=100,
            remap_sleep_millisecs=rng.choice((10, 50, 100)),
            writeback_millisecs=rng.choice((10, 50)),
            retry_policy=rng.choice(RETRY_POLICIES),
            install_pmd=rng.choice((0, 1)),
            free_huge_pages=rng.choice((2, 8, 64)),
            fragmentation=rng.choice((0, 0, 30)),
            max_ptes_none=rng.choice((0, 64, 511)),
            read_ahead_kb=rng.choice((0, 16, 128)),
            fault_around_bytes=rng.choice((4096, 65536)),
        )

    # -- running --------------------------------------------------------------------------

    def run(self) -> Result:
        t0 = time.perf_counter()
        res = self.result
        try:
            self._setup()
            for self.step_no in range(res.steps):
                self._step()
                self._check()
            self._finish()
        except (Violation, AssertionError) as err:
            res.violation = f"step {self.step_no}: {err}"
        except Exception as err:  # noqa: BLE001 -- a bug in the model: an exception where none may be raised
            res.violation = f"step {self.step_no}: {type(err).__name__}: {err}\n{traceback.format_exc()}"
        res.collapses = self.world.collapser.khugepaged.pages_collapsed
        res.trace = list(self.trace)
        res.seconds = time.perf_counter() - t0
        return res

    def _log(self, what: str) -> None:
        self.trace.append(f"{self.step_no:5d} t={self.world.now:9.1f} {what}")
        if self.verbose:
            print(self.trace[-1], file=sys.stderr)

    def _setup(self) -> None:
        """Files, two processes mapping them with MADV_HUGEPAGE, a first touch: most steps then
        do something."""
        rng = self.rng
        for name, shmem in FILES:
            self._start(m.FileCreate, name=name, size=rng.randint(1, 4) * MB, shmem=shmem)
        self._drain()
        for pid in (1, 2):
            self._start(m.ProcSpawn, pid=pid)
            for i, (name, shmem) in enumerate(FILES):
                addr = BASE_ADDR + (pid * 8 + i * 2) * 4 * MB
                self._start(m.Mmap, pid=pid, addr=addr, length=4 * MB, name=name, prot="rx" if name == "a" else "rw", shared=shmem or name == "b")
                self._drain()
                self._start(m.Madvise, pid=pid, addr=addr, length=4 * MB, advice="hugepage")
                self._drain()
        self._check()

    def _step(self) -> None:
        res = self.result
        rng = self.rng
        allowed = set(res.faults_allowed)
        w = self.world
        if not w.connected:
            if self.down_for <= 0:
                self._reconnect()
                return
            self.down_for -= 1
        for d in self.held:
            self.held[d] = max(0, self.held[d] - 1)
        choices: list[tuple[str, float]] = [("op", 30), ("deliver", 40), ("tick", 12), ("drain", 5)]
        if w.connected:
            choices += [(k, wt) for k, wt in (("delay", 2.0), ("duplicate", 2.0), ("cut", 1.0)) if k in allowed]
        choices += [(k, wt) for k, wt in (("crash_collapser", 0.6), ("crash_remapper", 0.4)) if k in allowed]
        if "restore" in allowed:
            choices.append(("snapshot", 1.0))
        if self._mid_collapse() and "cut" in allowed and w.connected:
            choices.append(("cut", 3.0))
        kind = rng.choices([k for k, _ in choices], [wt for _, wt in choices])[0]
        if kind == "op":
            self._random_op()
        elif kind == "deliver":
            for _ in range(rng.choice((1, 1, 2, 3, 5, 8, 20))):
                if not self._deliver_one():
                    break
        elif kind == "tick":
            self._tick(rng.choice((0, 1, 5, 20, 60, 200)))
        elif kind == "drain":
            self._drain()
        elif kind == "delay":
            d = rng.choice((C2R, R2C))
            self.held[d] = rng.randint(3, 30)
            res.faults["delay"] += 1
            self._log(f"fault: hold {d} for {self.held[d]} steps")
        elif kind == "duplicate":
            d = rng.choice((C2R, R2C))
            self.dup_next.add(d)
            self._log(f"fault: duplicate the next {d} message")
        elif kind == "cut":
            self._cut()
        elif kind == "snapshot":
            self._snapshot()
        elif kind == "crash_collapser":
            self._crash_collapser()
        elif kind == "crash_remapper":
            self._crash_remapper()

    def _check(self) -> None:
        w = self.world
        self._reap()
        if not w.collapser.outbox and not w.remapper.outbox:
            check(w.collapser, w.remapper, connected=w.connected)
            self.result.checks += 1
        else:
            check_in_flight(w)
            self.result.flight_checks += 1

    def _finish(self) -> None:
        """Restore the link, deliver everything, run model time until every request finished."""
        w = self.world
        self._log("finish")
        if not w.connected:
            self._reconnect()
        self.held = {C2R: 0, R2C: 0}
        self.dup_next.clear()
        deadline = w.now + 120_000
        while True:
            self._drain()
            self._check()
            live = [p for p, actor, _ in self.ops if actor in (w.collapser, w.remapper) and not p.done]
            busy = w.collapser.pending_calls() or w.remapper.pending_calls()
            if not live and not busy:
                break
            nxt = [d for d in (w.collapser.next_deadline(), w.remapper.next_deadline()) if d is not None]
            if not nxt or w.now > deadline:
                what = [d for p, a, d in self.ops if a in (w.collapser, w.remapper) and not p.done]
                raise Violation(f"never finished: {what[:5]} (peer calls waiting: {bool(busy)})")
            self._tick(max(min(nxt) - w.now, 0.0))
        # Let the background threads run a while longer on a quiet link, then check the end.
        self._tick(200)
        self._drain()
        self._check()
        check_end(w, self.pool_base)
        # The daemons' own consistency check (thpctl check) must agree with the checker.
        w.manual = False
        audit = w.audit()
        w.manual = True
        _assert(audit["ok"], f"thpctl check disagrees with the checker: {audit['problems'][:3]}")
        self.result.checks += 1

    # -- the link -------------------------------------------------------------------------

    def _queue(self, d: str) -> deque[Message]:
        w = self.world
        return w.collapser.outbox if d == C2R else w.remapper.outbox

    def _deliver_one(self) -> bool:
        w = self.world
        if not w.connected:
            return False
        ready = [d for d in (C2R, R2C) if self._queue(d) and not self.held[d]]
        if not ready:
            return False
        d = self.rng.choice(ready)
        queue = self._queue(d)
        if "reorder" in self.result.unsafe and len(queue) > 1 and self.rng.random() < 0.5:
            queue.rotate(-1)  # the second message overtakes the first (not allowed: see above)
            msg = queue.pop()
            queue.rotate(1)
            self.result.faults["unsafe_reorder"] += 1
        else:
            msg = queue.popleft()
        self._hand(d, msg)
        if d in self.dup_next:
            self.dup_next.discard(d)
            if isinstance(msg, IDEMPOTENT) or "duplicate" in self.result.unsafe:
                self.result.faults["duplicate"] += 1
                self._log(f"  again {msg.TAG}")
                self._hand(d, msg)
        return True

    def _hand(self, d: str, msg: Message) -> None:
        w = self.world
        wire = w.wire(msg)
        self.result.delivered += 1
        if self.verbose:
            self._log(f"  {d} {_short(msg)}")
        if d == C2R:
            w.remapper.advance(w.now)
            w.remapper.deliver(wire)
        else:
            w.collapser.advance(w.now)
            w.collapser.deliver(wire)

    def _drain(self) -> None:
        for _ in range(1_000_000):
            w = self.world
            if not w.connected or not (w.collapser.outbox or w.remapper.outbox):
                return
            held, self.held = self.held, {C2R: 0, R2C: 0}
            self._deliver_one()
            self.held = {d: n for d, n in held.items()}
        raise Violation("the link never went quiet")

    def _tick(self, ms: float) -> None:
        w = self.world
        w.now += ms
        actors = [w.collapser, w.remapper]
        self.rng.shuffle(actors)
        for actor in actors:
            actor.advance(w.now)
        w.settle()  # with the link down: answer what cannot be sent

    def _mid_collapse(self) -> bool:
        """collapse_file waits on the remapper (try_to_unmap or retract)."""
        calls = getattr(self.world.collapser, "_calls", {})
        return any(isinstance(req, (m.UnmapMapping, m.Retract)) for _, req in calls.values())

    def _lose_in_flight(self, deliver_c2r: bool, deliver_r2c: bool) -> None:
        """A message boundary on each direction: a prefix arrives, the rest is lost."""
        rng = self.rng
        for d, deliver in ((C2R, deliver_c2r), (R2C, deliver_r2c)):
            queue = self._queue(d)
            keep = rng.randint(0, len(queue)) if deliver else 0
            for _ in range(keep):
                self._hand(d, queue.popleft())
            queue.clear()
        self.held = {C2R: 0, R2C: 0}
        self.dup_next.clear()

    def _cut(self) -> None:
        w = self.world
        res = self.result
        res.faults["cut"] += 1
        if self._mid_collapse():
            res.faults["cut_mid_collapse"] += 1
        self._log("fault: cut the link")
        self._lose_in_flight(True, True)
        if self.rng.random() < 0.5:
            w.collapser.peer_lost()
            w.remapper.peer_lost()
        else:
            w.remapper.peer_lost()
            w.collapser.peer_lost()
        w.connected = False
        w.settle()
        self.down_for = self.rng.randint(0, 15)

    def _crash_collapser(self) -> None:
        w = self.world
        res = self.result
        res.faults["crash_collapser"] += 1
        if self._mid_collapse():
            res.faults["crash_mid_collapse"] += 1
        self._log("fault: collapsed dies")
        if w.connected:
            self._lose_in_flight(True, False)
        w.collapser.outbox.clear()
        w.remapper.outbox.clear()
        w.collapser.halt()
        boot = w.collapser.boot + 1
        seed = self.rng.randrange(1 << 16)
        if self.saved.get(collapsed_snapshot.DAEMON) and self.rng.random() < 0.5:
            res.faults["restored_collapser"] += 1
            self._log("  restored from its last snapshot")
            state = self.saved[collapsed_snapshot.DAEMON]
            w.collapser = collapsed_snapshot.restore(state, dataclasses.replace(self.knobs), boot, seed, keep=_PUSHED)
        else:
            w.collapser = Collapser(dataclasses.replace(self.knobs), seed=seed, boot=boot)
        w.collapser.advance(w.now)
        self.pool_base = _pool_total(w.collapser)
        if w.connected:
            w.remapper.peer_lost()
        w.connected = False
        w.settle()
        self.down_for = self.rng.randint(0, 15)

    def _crash_remapper(self) -> None:
        w = self.world
        res = self.result
        res.faults["crash_remapper"] += 1
        if self._mid_collapse():
            res.faults["crash_mid_collapse"] += 1
        self._log("fault: remapd dies")
        if w.connected:
            self._lose_in_flight(False, True)
        w.collapser.outbox.clear()
        w.remapper.outbox.clear()
        w.remapper.halt()
        if self.saved.get(remapd_snapshot.DAEMON) and self.rng.random() < 0.5:
            res.faults["restored_remapper"] += 1
            self._log("  restored from its last snapshot")
            w.remapper = remapd_snapshot.restore(self.saved[remapd_snapshot.DAEMON], dataclasses.replace(self.knobs))
        else:
            w.remapper = Remapper(dataclasses.replace(self.knobs))
        w.remapper.advance(w.now)
        if w.connected:
            w.collapser.peer_lost()
        w.connected = False
        w.settle()
        self.down_for = self.rng.randint(0, 15)

    def _snapshot(self) -> None:
        """Both daemons save their state (as --state-dir does periodically), through the file
        format and back."""
        w = self.world
        for module, actor in ((collapsed_snapshot, w.collapser), (remapd_snapshot, w.remapper)):
            data = persist.encode(module.DAEMON, module.snapshot(actor))
            self.saved[module.DAEMON] = persist.decode(data, module.DAEMON)
        self._log("snapshot")

    def _reconnect(self) -> None:
        """What the daemons do on a new peer connection: remapd pushes its knobs (not the pool)
        and resyncs; collapsed resyncs. Both before either reads the other."""
        w = self.world
        self._log("reconnect")
        w.connected = True
        r = w.remapper
        knobs = {k: v for k, v in r.knobs.writable_items().items() if k != POOL_KNOB}
        r.send(m.KnobsChanged(knobs))
        r.resync()
        w.collapser.resync()

    # -- the workload ---------------------------------------------------------------------

    def _start(self, cls: type[Request[Any]], fn: Callable[..., Any] | None = None, **fields: Any) -> None:
        """Start a client request on the actor that serves it, through the codec, as a daemon
        would; a refusal is counted, a result awaited by :meth:`_reap`."""
        w = self.world
        res = self.result
        label = cls.TAG.removeprefix("client.")
        if fields.get("advice"):
            label += ":" + str(fields["advice"])
        res.ops[label] += 1
        try:
            msg = w.request(cls, **fields)
            actor = w.actor(cls.OP.served_by[0])
            pending = w.perform(msg, actor, fn=fn, waits=True)
        except UserError as err:
            res.errors[err.errno_name] += 1
            self._log(f"op {label} {_fields(fields)} -> {err.errno_name}")
            return
        self._log(f"op {label} {_fields(fields)}")
        self.ops.append((pending, actor, label))

    def _reap(self) -> None:
        """Forget finished requests (and those whose daemon died: their client saw ECONNRESET)."""
        w = self.world
        keep = []
        for pending, actor, label in self.ops:
            if actor is not w.collapser and actor is not w.remapper:
                self.result.errors["ECONNRESET"] += 1
                continue
            if pending.done:
                if isinstance(pending.value, UserError):
                    self.result.errors[pending.value.errno_name] += 1
                continue
            keep.append((pending, actor, label))
        self.ops = keep

    def _random_op(self) -> None:
        self._reap()
        if len(self.ops) >= MAX_IN_FLIGHT_OPS:
            self._deliver_one()
            return
        rng = self.rng
        r = self.world.remapper
        kind = rng.choices(_OPS, _OP_WEIGHTS)[0]
        pid = rng.choice(PIDS)
        name, shmem = rng.choice(FILES)
        if kind == "touch":
            addr, length = self._some_range(pid, rng.choice((1, 16, 128, 512)))
            stride = rng.choice((PAGE_SIZE, 16 * 1024, 64 * 1024))
            self._start(m.Touch, pid=pid, addr=addr, length=length, write=rng.random() < 0.3, stride=stride)
        elif kind == "fault":
            addr, _ = self._some_range(pid, 1)
            self._start(m.Fault, pid=pid, addr=addr, write=rng.random() < 0.3)
        elif kind == "mmap":
            where: int | None = rng.choice((None, BASE_ADDR + rng.randrange(64) * 2 * MB, BASE_ADDR + rng.randrange(64) * 2 * MB + PAGE_SIZE))
            length = rng.choice((PAGE_SIZE, 64 * 1024, 2 * MB, 4 * MB))
            offset = rng.choice((0, PAGE_SIZE, 2 * MB))
            prot = rng.choice(("r", "rx", "rw"))
            self._start(m.Mmap, pid=pid, addr=where, length=length, name=name, offset=offset, prot=prot, shared=rng.random() < 0.5)
        elif kind == "munmap":
            addr, length = self._some_range(pid, rng.choice((1, 3, 512)))
            self._start(m.Munmap, pid=pid, addr=addr, length=length)
        elif kind == "madvise":
            advice = rng.choice((
                "hugepage", "hugepage", "nohugepage", "collapse", "collapse", "dontneed", "populate_read", "populate_write",
                "pageout", "random", "sequential", "willneed", "cold", "dontfork",
            ))
            addr, length = self._some_range(pid, rng.choice((1, 512, 1024)))
            if advice in ("hugepage", "collapse"):
                addr &= ~(HPAGE_PMD_SIZE - 1)
            self._start(m.Madvise, pid=pid, addr=addr, length=length, advice=advice)
        elif kind == "spawn":
            self._start(m.ProcSpawn, pid=pid)
        elif kind == "exit":
            self._start(m.ProcExit, pid=pid)
        elif kind == "fork":
            self._start(m.ProcFork, pid=pid, child=rng.choice(PIDS))
        elif kind == "lock":
            self._start(m.Lock, pid=pid, hold_ms=float(rng.choice((1, 20, 150))), write=rng.random() < 0.5)
        elif kind == "pin":
            addr, _ = self._some_range(pid, 1)
            self._start(m.Pin, pid=pid, addr=addr)
        elif kind == "unpin":
            mm = r.mms.get(pid)
            if mm is not None and mm.pins:
                self._start(m.Unpin, pid=pid, addr=min(mm.pins))
        elif kind == "uprobe":
            add = rng.random() < 0.6
            remapper = r
            fn = uprobe_add if add else uprobe_del

            def run(action: str, name: str, offset: int) -> Any:
                return fn(remapper, name, offset)

            self._start(m.Uprobe, fn=run, action="add" if add else "del", name="a", offset=rng.randrange(0, 1024) * PAGE_SIZE)
        elif kind == "file_write":
            self._start(m.FileWrite, name=name, offset=rng.randrange(0, 6 * MB, PAGE_SIZE), length=rng.choice((PAGE_SIZE, 64 * 1024, 2 * MB)))
        elif kind == "file_truncate":
            self._start(m.FileTruncate, name=name, size=rng.randrange(0, 6 * MB, PAGE_SIZE // 2))
        elif kind == "file_punch":
            self._start(m.FilePunch, name=name, offset=rng.randrange(0, 6 * MB, PAGE_SIZE), length=rng.choice((PAGE_SIZE, 64 * 1024, 2 * MB)))
        elif kind == "file_sync":
            self._start(m.FileSync, name=name)
        elif kind == "file_create":
            new = rng.choice((name, f"{name}{rng.randrange(3)}"))
            self._start(m.FileCreate, name=new, size=rng.randint(0, 4) * MB, shmem=shmem)
        elif kind == "drop_caches":
            self._start(m.DropCaches)
        elif kind == "sysfs":
            self._sysfs()

    def _sysfs(self) -> None:
        """remapd's sysfs write: validated and applied there, forwarded to collapsed over the
        link (the pool is never written here, so the end check can count it)."""
        rng = self.rng
        knob, values = rng.choice(_SYSFS)
        value = rng.choice(values)
        w = self.world
        r = w.remapper
        parsed = r.knobs.validate(knob, str(value))
        change = m.KnobsChanged({knob: parsed})
        r.deliver(w.wire(change))
        if w.connected:
            r.send(change)
        self.knobs.set(knob, str(value))  # what a restarted daemon starts with, as if on its command line
        self.result.ops["sysfs"] += 1
        self._log(f"op sysfs {knob}={value}")

    def _some_range(self, pid: int, pages: int) -> tuple[int, int]:
        """An address inside one of ``pid``'s VMAs (or a fixed one), and ``pages`` pages."""
        mm = self.world.remapper.mms.get(pid)
        rng = self.rng
        if mm is None or not mm.vmas or rng.random() < 0.05:
            return BASE_ADDR, pages * PAGE_SIZE
        vma = rng.choice(mm.vmas)
        span = (vma.end - vma.start) // PAGE_SIZE
        if pages >= HPAGE_PMD_NR and rng.random() < 0.6:
            start = (vma.start + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1)
            if start < vma.end:
                return start, pages * PAGE_SIZE
        return vma.start + rng.randrange(span) * PAGE_SIZE, pages * PAGE_SIZE


_OPS_WEIGHTED = (
    ("touch", 16),
    ("fault", 8),
    ("mmap", 7),
    ("madvise", 9),
    ("munmap", 4),
    ("spawn", 3),
    ("exit", 1.5),
    ("fork", 1.5),
    ("lock", 3),
    ("pin", 2),
    ("unpin", 2),
    ("uprobe", 1.5),
    ("file_write", 4),
    ("file_truncate", 2),
    ("file_punch", 2),
    ("file_sync", 2),
    ("file_create", 1.5),
    ("drop_caches", 1),
    ("sysfs", 2),
)
_OPS = [k for k, _ in _OPS_WEIGHTED]
_OP_WEIGHTS = [w for _, w in _OPS_WEIGHTED]
_SYSFS: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("thpsplit/retry_policy", RETRY_POLICIES),
    ("thpsplit/install_pmd", (0, 1)),
    ("khugepaged/max_ptes_none", (0, 256, 511)),
    ("shmem_enabled", ("always", "within_size", "advise", "never")),
    ("enabled", ("always", "madvise")),
    ("thpsplit/read_ahead_kb", (0, 16, 128)),
    ("thpsplit/fault_around_bytes", (4096, 65536)),
    # Not 0: with mm-slot or lockless, khugepaged then trades messages with the remapper without
    # model time passing, so the link is never quiet (the daemons stay responsive: test_hostile).
    ("khugepaged/scan_sleep_millisecs", (1, 10, 100)),
)


def _fields(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={hex(v) if k == 'addr' and isinstance(v, int) else v}" for k, v in fields.items())


def _short(msg: Message) -> str:
    text = repr(msg)
    return text if len(text) < 160 else text[:157] + "..."


# -- many seeds ------------------------------------------------------------------------------


def run_seed(
    seed: int, steps: int, faults: Iterable[str] = FAULT_KINDS, unsafe: Iterable[str] = (), verbose: bool = False
) -> Result:
    return Simulation(seed, steps, faults, unsafe, verbose).run()


def run_seeds(
    seeds: Iterable[int], steps: int, faults: Iterable[str] = FAULT_KINDS, unsafe: Iterable[str] = ()
) -> list[Result]:
    faults = tuple(faults)
    return [run_seed(s, steps, faults, unsafe) for s in seeds]


def summary(results: Sequence[Result]) -> dict[str, Any]:
    faults: Counter[str] = Counter()
    ops: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for res in results:
        faults.update(res.faults)
        ops.update(res.ops)
        errors.update(res.errors)
    failed = [r for r in results if r.violation]
    return {
        "seeds": len(results),
        "steps": sum(r.steps for r in results),
        "requests": sum(ops.values()),
        "messages_delivered": sum(r.delivered for r in results),
        "full_checks": sum(r.checks for r in results),
        "in_flight_checks": sum(r.flight_checks for r in results),
        "collapses": sum(r.collapses for r in results),
        "faults": dict(sorted(faults.items())),
        "errors": dict(sorted(errors.items())),
        "violations": len(failed),
        "failing_seeds": [r.seed for r in failed],
        "seconds": round(sum(r.seconds for r in results), 1),
    }


def _parse_seeds(text: str) -> range | list[int]:
    if ":" in text:
        lo, hi = text.split(":", 1)
        return range(int(lo), int(hi))
    return [int(s) for s in text.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.sim.dst",
        description="Deterministic simulation of both actors with faults on the peer link.",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--seed", type=int, help="run one seed, printing its trace on failure")
    group.add_argument("--seeds", default="0:100", help="a range LO:HI or a list A,B,C (default 0:100)")
    parser.add_argument("--steps", type=int, default=400, help="steps per seed (default 400)")
    parser.add_argument(
        "--faults", default=",".join(FAULT_KINDS), help=f"fault kinds to inject (default: {','.join(FAULT_KINDS)}; 'none' for none)"
    )
    parser.add_argument("--unsafe", default="", help="break the protocol's rules on purpose: reorder, duplicate")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every step (one seed)")
    args = parser.parse_args(argv)
    faults = [] if args.faults == "none" else [f for f in args.faults.split(",") if f]
    unsafe = [u for u in args.unsafe.split(",") if u]
    for kind in faults:
        if kind not in FAULT_KINDS:
            parser.error(f"unknown fault kind {kind!r}")
    for kind in unsafe:
        if kind not in UNSAFE_KINDS:
            parser.error(f"unknown unsafe kind {kind!r}")
    if args.seed is not None:
        res = run_seed(args.seed, args.steps, faults, unsafe, args.verbose)
        print(f"seed {res.seed}: {res.steps} steps, {sum(res.ops.values())} requests, {res.delivered} messages, "
              f"faults {dict(res.faults)}, {res.checks} full checks, {res.flight_checks} in-flight checks, "
              f"{res.seconds:.2f} s")
        if res.violation:
            if not args.verbose:
                print("\n".join(res.trace))
            print(f"VIOLATION {res.violation}")
            print(f"reproduce: {res.command()}")
            return 1
        return 0
    results = []
    t0 = time.perf_counter()
    for seed in _parse_seeds(args.seeds):
        res = run_seed(seed, args.steps, faults, unsafe)
        results.append(res)
        if res.violation:
            print(f"seed {seed}: VIOLATION {res.violation.splitlines()[0]}\n  reproduce: {res.command()}")
    figures = summary(results)
    figures["wall_seconds"] = round(time.perf_counter() - t0, 1)
    for key, value in figures.items():
        print(f"{key}: {value}")
    return 1 if figures["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
