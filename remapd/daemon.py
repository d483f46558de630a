"""remapd: the remapper core (processes, VMAs, page tables, faults, retract) behind a socket.

It listens for clients and keeps a peer connection to collapsed, reconnecting with exponential
backoff whenever it is down. Clients get the process and mapping commands, smaps, the
page-table half of vmstat, and sysfs writes: remapd owns the knobs (it outlives collapsed
restarts with the processes that depend on them), applies a write, and forwards it to collapsed;
a connecting collapsed gets every knob except ``thpsplit/free_huge_pages``, which is the
collapser's own huge page pool.
"""

from __future__ import annotations

from typing import Any

from remapd.remapper import Remapper
from remapd.uprobes import uprobe_add, uprobe_del
from shared import messages as m
from shared.errors import UserError
from shared.knobs import KnobError, Knobs, sysfs_entries
from shared.message import Message
from shared.shell.driver import Driver, Handler, Op
from shared.shell.peer import connect_peer
from shared.shell.server import Server

# The first retry after a failed connect; each failure doubles the wait up to the maximum.
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
# The collapser's huge page pool: it changes as collapses allocate, so only a write moves it.
POOL_KNOB = "thpsplit/free_huge_pages"


class Remapd:
    def __init__(self, knobs: Knobs):
        self.core = Remapper(knobs)
        self.driver = Driver(self.core, "remapd", peer_role="collapsed")
        self.driver.on_peer = self.push_knobs
        r, d = self.core, self.driver
        self.handlers: dict[type[Message], Handler] = {
            m.ProcSpawn: lambda q: d.start(r.spawn_process, q.pid),
            m.ProcExit: lambda q: d.start(r.exit_process, q.pid),
            m.ProcFork: lambda q: d.start(r.fork, q.pid, q.child),
            m.Mmap: lambda q: d.start(r.mmap, q.pid, q.addr, q.length, q.name, q.offset, q.prot, q.shared),
            m.Munmap: lambda q: d.start(r.munmap, q.pid, q.addr, q.length),
            m.Madvise: lambda q: d.start(r.madvise, q.pid, q.addr, q.length, q.advice),
            m.Fault: lambda q: d.start(r.fault, q.pid, q.addr, q.write),
            m.Touch: lambda q: d.start(r.touch, q.pid, q.addr, q.length, q.write, q.stride),
            m.Lock: lambda q: d.start(r.hold_lock, q.pid, q.hold_ms, q.write),
            m.Pin: lambda q: d.start(r.pin, q.pid, q.addr),
            m.Unpin: lambda q: d.start(r.unpin, q.pid, q.addr),
            m.Uprobe: self.uprobe,
            m.Smaps: lambda q: d.start(r.smaps, q.pid),
            m.Vmstat: lambda q: d.start(r.vmstat),
            m.SysfsGet: lambda q: d.start(sysfs_entries, r.knobs, q.name, None),
            m.SysfsSet: self.sysfs_set,
            m.Sync: lambda q: self.sync,
            m.Status: lambda q: d.start(self.status),
        }

    def uprobe(self, q: m.Uprobe) -> Op:
        fn = {"add": uprobe_add, "del": uprobe_del}.get(q.action)
        if fn is None:
            return self.driver.done(UserError("EINVAL", f"uprobe action must be add or del, not {q.action!r}"))
        return self.driver.start(fn, self.core, q.name, q.offset)

    def sysfs_set(self, q: m.SysfsSet) -> Op:
        return self.driver.start(self._sysfs_set, q.name, q.value)

    def _sysfs_set(self, name: str, text: str) -> dict[str, Any]:
        r = self.core
        try:
            value = r.knobs.validate(name, text)
        except KnobError as err:
            raise UserError(err.errno_name, str(err)) from None
        if name == POOL_KNOB and self.driver.peer is None:
            raise UserError("ENOTCONN", f"{name} is collapsed's pool and collapsed is not connected")
        change = m.KnobsChanged({name: value})
        r.deliver(change)
        if self.driver.peer is not None:
            r.send(change)
        return {name: value}

    def push_knobs(self) -> None:
        values = {k: v for k, v in self.core.knobs.writable_items().items() if k != POOL_KNOB}
        self.core.send(m.KnobsChanged(values))

    async def sync(self) -> None:
        await self.driver.barrier(wait_for_peer=True)

    def status(self) -> dict[str, Any]:
        r = self.core
        return {
            **self.driver.status("remapd"),
            "processes": sorted(r.mms),
            "files": len(r.files),
            "marked_tables": len(r.marked),
        }

    async def serve(self, listen: str, ready_file: str | None, collapsed: str) -> None:
        async def peer() -> None:
            await connect_peer(self.driver, collapsed, BACKOFF_MIN_S, BACKOFF_MAX_S)

        await Server(self.driver, {"client"}, self.handlers).serve(listen, ready_file, background=[peer])
