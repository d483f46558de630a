"""collapsed: the collapser core (page cache, file operations, khugepaged's scan) behind a socket.

One listener takes both the remapper's peer connection (hello role "remapd"; one at a time) and
clients (role "client"). Clients get collapsed's operation table (shared/protocol/messages.py):
the file commands, drop_caches, the page-cache half of vmstat, meminfo, sysfs reads (with
khugepaged's counters) and wait-scans. Knobs are set through remapd, which owns them and pushes
them here whenever it connects.
"""

from __future__ import annotations

from secrets import randbits
from typing import Any

from collapsed import procfs, snapshot
from collapsed.collapser import RESCHED_PAGES, Collapser
from shared.errors import UserError
from shared.knobs import Knobs, sysfs_entries
from shared.protocol import messages as m
from shared.protocol.schema import CLIENT, COLLAPSED, REMAPD
from shared.shell.auth import Secrets
from shared.shell.config import Limits
from shared.shell.driver import Driver
from shared.shell.job import Job, Stream, Work
from shared.shell.peer import PeerLink
from shared.shell.requests import operation_handlers
from shared.shell.server import Server
from shared.shell.state import StateDir
from shared.shell.trace import trace_stream

# Who connects to collapsed: remapd (the peer, one at a time) and clients.
ACCEPTS = frozenset({REMAPD, CLIENT})


class Collapsed:
    def __init__(
        self,
        knobs: Knobs,
        seed: int = 0,
        secrets: Secrets | None = None,
        limits: Limits | None = None,
        core: Collapser | None = None,
        state: StateDir | None = None,
    ):
        """``core``: a collapser restored from ``state``'s snapshot (--state-dir), else a new one."""
        self.secrets = secrets
        self.limits = limits
        self.state = state
        if core is None:
            # A random boot identity: inode numbers restart at every start, so the files a remapper
            # still maps from an earlier boot are told apart by their generation (issue 14, item 4).
            core = Collapser(knobs, seed=seed, resched_pages=RESCHED_PAGES, boot=new_boot_id())
        self.core = core
        if state is not None:
            state.take = lambda: snapshot.snapshot(self.core)
        self.driver = Driver(self.core, COLLAPSED)
        self.link = PeerLink(self.driver, peer_role=REMAPD)
        self.handlers = operation_handlers(COLLAPSED, self.driver, self)

    def counters(self) -> dict[str, int]:
        """The read-only sysfs files collapsed serves: khugepaged's counters and the PMD order's
        hugepages-2048kB/stats."""
        return {**self.khugepaged_counters(), **procfs.mthp_stats(self.core)}

    def khugepaged_counters(self) -> dict[str, int]:
        k = self.core.khugepaged
        return {"khugepaged/pages_collapsed": k.pages_collapsed, "khugepaged/full_scans": k.full_scans}

    # -- the special requests of collapsed's operation table -----------------------------------

    def handle_sysfs_get(self, q: m.SysfsGet) -> Job:
        return self.driver.start(sysfs_entries, self.core.knobs, q.name, self.counters())

    def handle_wait_scans(self, q: m.WaitScans) -> Work:
        if q.n < 0:
            return self.driver.done(UserError("EINVAL", "the number of scans must not be negative"))
        k = self.core.khugepaged
        goal = k.full_scans + q.n

        async def wait() -> dict[str, int]:
            while k.full_scans < goal:
                await self.driver.changed()
            return self.khugepaged_counters()

        return wait

    def handle_trace(self, q: m.Trace) -> Stream:
        return trace_stream(self.driver, q)

    def handle_sync(self, q: m.Sync) -> Work:
        async def sync() -> None:
            await self.link.barrier(wait_for_peer=True)

        return sync

    def handle_status(self, q: m.Status) -> Job:
        return self.driver.start(self.status)

    def status(self) -> dict[str, Any]:
        c = self.core
        return {
            **self.driver.status(),
            "files": len(c.files),
            "mm_slots": len(c.khugepaged.slots),
            **self.khugepaged_counters(),
            "khugepaged/passes": c.khugepaged.passes,
            "khugepaged/scans": sum(c.khugepaged.results.values()),
        }

    async def serve(self, listen: str, ready_file: str | None) -> None:
        state = self.state
        background = [state.periodically] if state is not None else []
        before_stop = state.save_logged if state is not None else None
        server = Server(self.driver, self.link, ACCEPTS, self.handlers, self.secrets, self.limits)
        await server.serve(listen, ready_file, background=background, before_stop=before_stop)


def new_boot_id() -> int:
    """A fresh, non-zero 62-bit boot identity (the generation of this boot's files)."""
    return randbits(62) | 1
