"""Both actors in one process under a virtual clock: the model as a library.

:class:`World` wires a :class:`~collapsed.collapser.Collapser` to a
:class:`~remapd.remapper.Remapper` with two FIFO queues and a shared model clock. Each call runs
an operation and delivers messages until both sides are quiet; :meth:`advance` moves the clock
and runs whatever falls due (khugepaged passes, lock releases, writeback). With ``seed`` set,
the two directions interleave in a seeded random order (each stays FIFO), so tests can show
the protocol holds with replies arriving among other traffic. Tests, the demo and the benchmarks
drive the model through this class; the daemons replace it with sockets.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Generator
from typing import Any

from collapsed.collapser import Collapser
from remapd.remapper import Remapper
from shared.errors import UserError
from shared.knobs import Knobs


class Pending:
    """An operation that has not finished yet (it waits for model time to pass)."""

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None

    def set(self, value: Any) -> None:
        self.done = True
        self.value = value

    def result(self) -> Any:
        if not self.done:
            raise RuntimeError("operation still pending")
        if isinstance(self.value, UserError):
            raise self.value
        return self.value


class World:
    def __init__(self, knobs: Knobs | None = None, seed: int | None = None, mem_seed: int = 0):
        base = knobs or Knobs()
        self.collapser = Collapser(dataclasses.replace(base), seed=mem_seed)
        self.remapper = Remapper(dataclasses.replace(base))
        self.now = 0.0
        self._rng = random.Random(seed) if seed is not None else None
        self.settle()

    # -- driving ------------------------------------------------------------------------------

    def settle(self) -> None:
        """Deliver messages both ways until neither side has anything to send."""
        c, r = self.collapser, self.remapper
        while c.outbox or r.outbox:
            if c.outbox and r.outbox and self._rng is not None:
                to_remapper = self._rng.random() < 0.5
            else:
                to_remapper = bool(c.outbox)
            if to_remapper:
                r.deliver(c.outbox.popleft())
            else:
                c.deliver(r.outbox.popleft())

    def start(self, actor: Collapser | Remapper, op: Generator[Any, Any, Any] | Any) -> Pending:
        """Run ``op`` (a generator, or a plain call's result) on ``actor``; settle; return it."""
        pending = Pending()
        if isinstance(op, Generator):
            actor.spawn(op, pending.set)
        else:
            pending.set(op)
        self.settle()
        return pending

    def call(self, actor: Collapser | Remapper, op: Any) -> Any:
        pending = self.start(actor, op)
        if not pending.done:
            raise RuntimeError("operation waits for model time; use start() and advance()")
        return pending.result()

    def advance(self, ms: float) -> None:
        """Move the model clock forward by ``ms``, running everything that falls due in order."""
        target = self.now + ms
        while True:
            deadlines = [d for d in (self.collapser.next_deadline(), self.remapper.next_deadline()) if d is not None]
            nxt = min(deadlines) if deadlines else None
            if nxt is None or nxt > target:
                break
            self.now = max(self.now, nxt)
            self.collapser.advance(self.now)
            self.settle()
            self.remapper.advance(self.now)
            self.settle()
        self.now = target
        self.collapser.advance(target)
        self.remapper.advance(target)
        self.settle()

    def wait_scans(self, n: int, limit_ms: float = 10_000_000) -> None:
        """Advance until khugepaged's full_scans has grown by ``n``."""
        goal = self.collapser.khugepaged.full_scans + n
        start = self.now
        while self.collapser.khugepaged.full_scans < goal:
            nxt = [d for d in (self.collapser.next_deadline(), self.remapper.next_deadline()) if d is not None]
            if not nxt or self.now - start > limit_ms:
                raise RuntimeError("khugepaged is not making progress")
            self.advance(max(min(nxt) - self.now, 0))

    def restart_collapser(self) -> None:
        """collapsed dies and comes back with an empty page cache; the remapper resyncs it."""
        knobs = dataclasses.replace(self.remapper.knobs)
        self.remapper.outbox.clear()
        self.collapser = Collapser(knobs)
        self.collapser.advance(self.now)
        self.remapper.peer_lost()
        self.remapper.resync()
        self.collapser.resync()
        self.settle()

    def restart_remapper(self) -> None:
        """remapd dies (its processes with it) and a new one connects."""
        knobs = dataclasses.replace(self.collapser.knobs)
        self.collapser.outbox.clear()
        self.remapper = Remapper(knobs)
        self.remapper.advance(self.now)
        self.collapser.peer_lost()
        self.collapser.resync()
        self.remapper.resync()
        self.settle()

    # -- the operations, by actor -------------------------------------------------------------

    def file_create(self, name: str, size: int, shmem: bool = False) -> dict[str, Any]:
        return self.call(self.collapser, self.collapser.file_create(name, size, shmem))

    def file_write(self, name: str, offset: int, length: int) -> dict[str, Any]:
        return self.call(self.collapser, self.collapser.file_write(name, offset, length))

    def file_sync(self, name: str) -> dict[str, Any]:
        return self.call(self.collapser, self.collapser.file_sync(name))

    def file_truncate(self, name: str, size: int) -> dict[str, Any]:
        return self.call(self.collapser, self.collapser.file_truncate(name, size))

    def file_punch(self, name: str, offset: int, length: int) -> dict[str, Any]:
        return self.call(self.collapser, self.collapser.file_punch(name, offset, length))

    def drop_caches(self) -> dict[str, Any]:
        return self.call(self.collapser, self.collapser.drop_caches())

    def spawn(self, pid: int) -> dict[str, Any]:
        return self.call(self.remapper, self.remapper.spawn_process(pid))

    def exit(self, pid: int) -> dict[str, Any]:
        return self.call(self.remapper, self.remapper.exit_process(pid))

    def fork(self, pid: int, child: int) -> dict[str, Any]:
        return self.call(self.remapper, self.remapper.fork(pid, child))

    def mmap(self, pid: int, addr: int | None, length: int, name: str, offset: int = 0,
             prot: str = "r", shared: bool = True) -> int:
        return self.call(self.remapper, self.remapper.mmap(pid, addr, length, name, offset, prot, shared))["addr"]

    def munmap(self, pid: int, addr: int, length: int) -> dict[str, Any]:
        return self.call(self.remapper, self.remapper.munmap(pid, addr, length))

    def madvise(self, pid: int, addr: int, length: int, advice: str) -> int | str:
        return self.call(self.remapper, self.remapper.madvise(pid, addr, length, advice))["result"]

    def fault(self, pid: int, addr: int, write: bool = False) -> str:
        return self.call(self.remapper, self.remapper.fault(pid, addr, write))["result"]

    def touch(self, pid: int, addr: int, length: int, write: bool = False, stride: int = 4096) -> dict[str, int]:
        return self.call(self.remapper, self.remapper.touch(pid, addr, length, write, stride))

    def lock(self, pid: int, hold_ms: float, write: bool = False) -> Pending:
        return self.start(self.remapper, self.remapper.hold_lock(pid, hold_ms, write))

    def pin(self, pid: int, addr: int) -> dict[str, Any]:
        return self.call(self.remapper, self.remapper.pin(pid, addr))

    def unpin(self, pid: int, addr: int) -> dict[str, Any]:
        return self.call(self.remapper, self.remapper.unpin(pid, addr))

    def uprobe(self, action: str, name: str, offset: int) -> dict[str, Any]:
        from remapd.uprobes import uprobe_add, uprobe_del

        fn = uprobe_add if action == "add" else uprobe_del
        return self.call(self.remapper, fn(self.remapper, name, offset))

    def sysfs_set(self, name: str, value: Any) -> None:
        """Validate once, then apply to both actors (as the daemons do through KnobsChanged)."""
        from shared.messages import KnobsChanged

        parsed = self.remapper.knobs.validate(name, str(value))
        for actor in (self.collapser, self.remapper):
            actor.deliver(KnobsChanged({name: parsed}))
        self.settle()

    def smaps(self, pid: int) -> list[dict[str, Any]]:
        return self.remapper.smaps(pid)

    def vmstat(self) -> dict[str, int]:
        out = self.collapser.vmstat()
        out.update(self.remapper.vmstat())
        return out

    def meminfo(self) -> dict[str, int]:
        return self.collapser.meminfo()

    def check(self) -> None:
        """Run the invariant checker (the model must be quiet: call after an operation)."""
        from shared.sim.invariants import check

        check(self.collapser, self.remapper)
