"""remapd: the remapper core (processes, VMAs, page tables, faults, retract) behind a socket.

It listens for clients and keeps a peer connection to collapsed, reconnecting with exponential
backoff whenever it is down. Clients get remapd's operation table (shared/protocol/messages.py):
the process and mapping commands, smaps, the page-table half of vmstat, and sysfs writes: remapd
owns the knobs (it outlives collapsed restarts with the processes that depend on them), applies
a write, and forwards it to collapsed; a connecting collapsed gets every knob except
``thpsplit/free_huge_pages``, which is the collapser's own huge page pool.
"""

from __future__ import annotations

from typing import Any

from remapd import snapshot
from remapd.remapper import Remapper
from remapd.uprobes import uprobe_add, uprobe_del
from shared.errors import UserError
from shared.knobs import KnobError, Knobs, sysfs_entries
from shared.protocol import messages as m
from shared.protocol.schema import CLIENT, COLLAPSED, REMAPD
from shared.shell.auth import Secrets
from shared.shell.config import Limits
from shared.shell.driver import Driver
from shared.shell.job import Job, Stream, Work
from shared.shell.peer import PeerLink, connect_peer
from shared.shell.requests import operation_handlers
from shared.shell.server import Server
from shared.shell.state import StateDir
from shared.shell.trace import trace_stream

# The first retry after a failed connect; each failure doubles the wait up to the maximum.
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
# The collapser's huge page pool: it changes as collapses allocate, so only a write moves it.
POOL_KNOB = "thpsplit/free_huge_pages"


# Who connects to remapd: clients only (remapd connects to collapsed itself).
ACCEPTS = frozenset({CLIENT})


class Remapd:
    def __init__(
        self,
        knobs: Knobs,
        secrets: Secrets | None = None,
        limits: Limits | None = None,
        core: Remapper | None = None,
        state: StateDir | None = None,
    ):
        """``core``: a remapper restored from ``state``'s snapshot (--state-dir), else a new one."""
        self.secrets = secrets
        self.limits = limits
        self.state = state
        self.core = core if core is not None else Remapper(knobs)
        if state is not None:
            state.take = lambda: snapshot.snapshot(self.core)
        self.driver = Driver(self.core, REMAPD)
        self.link = PeerLink(self.driver, peer_role=COLLAPSED, on_connect=self.push_knobs)
        self.handlers = operation_handlers(REMAPD, self.driver, self)

    # -- the special requests of remapd's operation table --------------------------------------

    def handle_uprobe(self, q: m.Uprobe) -> Job:
        fn = uprobe_add if q.action == m.UprobeAction.ADD else uprobe_del
        return self.driver.start(fn, self.core, q.name, q.offset)

    def handle_sysfs_get(self, q: m.SysfsGet) -> Job:
        return self.driver.start(sysfs_entries, self.core.knobs, q.name, None)

    def handle_sysfs_set(self, q: m.SysfsSet) -> Job:
        return self.driver.start(self._sysfs_set, q.name, q.value)

    def handle_trace(self, q: m.Trace) -> Stream:
        return trace_stream(self.driver, q)

    def handle_sync(self, q: m.Sync) -> Work:
        async def sync() -> None:
            await self.link.barrier(wait_for_peer=True)

        return sync

    def handle_status(self, q: m.Status) -> Job:
        return self.driver.start(self.status)

    def _sysfs_set(self, name: str, text: str) -> dict[str, Any]:
        r = self.core
        try:
            value = r.knobs.validate(name, text)
        except KnobError as err:
            raise UserError(err.errno_name, str(err)) from None
        if name == POOL_KNOB and self.link.channel is None:
            raise UserError("ENOTCONN", f"{name} is collapsed's pool and collapsed is not connected")
        change = m.KnobsChanged({name: value})
        r.deliver(change)
        if self.link.channel is not None:
            r.send(change)
        return {name: value}

    def push_knobs(self) -> None:
        values = {k: v for k, v in self.core.knobs.writable_items().items() if k != POOL_KNOB}
        self.core.send(m.KnobsChanged(values))

    def status(self) -> dict[str, Any]:
        r = self.core
        return {
            **self.driver.status(),
            "processes": sorted(r.mms),
            "files": len(r.files),
            "marked_tables": len(r.marked),
        }

    async def serve(self, listen: str, ready_file: str | None, collapsed: str) -> None:
        async def peer() -> None:
            await connect_peer(self.link, collapsed, BACKOFF_MIN_S, BACKOFF_MAX_S, self.secrets)

        state = self.state
        background = [peer, state.periodically] if state is not None else [peer]
        before_stop = state.save_logged if state is not None else None
        server = Server(self.driver, self.link, ACCEPTS, self.handlers, self.secrets, self.limits)
        await server.serve(listen, ready_file, background=background, before_stop=before_stop)
