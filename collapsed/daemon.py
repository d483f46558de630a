"""collapsed: the collapser core (page cache, file operations, khugepaged's scan) behind a socket.

One listener takes both the remapper's peer connection (hello role "remapd"; one at a time) and
clients (role "client"). Clients get the file commands, drop_caches, the page-cache half of
vmstat, meminfo, sysfs reads (with khugepaged's counters) and wait-scans. Knobs are set through
remapd, which owns them and pushes them here whenever it connects.
"""

from __future__ import annotations

from typing import Any

from collapsed.collapser import Collapser
from shared import messages as m
from shared.errors import UserError
from shared.knobs import Knobs, sysfs_entries
from shared.message import Message
from shared.shell.driver import Driver, Handler, Op
from shared.shell.server import Server


class Collapsed:
    def __init__(self, knobs: Knobs, seed: int = 0):
        self.core = Collapser(knobs, seed=seed)
        self.driver = Driver(self.core, "collapsed", peer_role="remapd")
        c, d = self.core, self.driver
        self.handlers: dict[type[Message], Handler] = {
            m.FileCreate: lambda q: d.start(c.file_create, q.name, q.size, q.shmem),
            m.FileWrite: lambda q: d.start(c.file_write, q.name, q.offset, q.length),
            m.FileSync: lambda q: d.start(c.file_sync, q.name),
            m.FileTruncate: lambda q: d.start(c.file_truncate, q.name, q.size),
            m.FilePunch: lambda q: d.start(c.file_punch, q.name, q.offset, q.length),
            m.FileLs: lambda q: d.start(c.file_ls),
            m.DropCaches: lambda q: d.start(c.drop_caches),
            m.Vmstat: lambda q: d.start(c.vmstat),
            m.Meminfo: lambda q: d.start(c.meminfo),
            m.SysfsGet: lambda q: d.start(sysfs_entries, c.knobs, q.name, self.counters()),
            m.WaitScans: self.wait_scans,
            m.Sync: lambda q: self.sync,
            m.Status: lambda q: d.start(self.status),
        }

    def counters(self) -> dict[str, int]:
        k = self.core.khugepaged
        return {"khugepaged/pages_collapsed": k.pages_collapsed, "khugepaged/full_scans": k.full_scans}

    def wait_scans(self, q: m.WaitScans) -> Op | Any:
        if q.n < 0:
            return self.driver.done(UserError("EINVAL", "the number of scans must not be negative"))
        k = self.core.khugepaged
        goal = k.full_scans + q.n

        async def wait() -> dict[str, int]:
            while k.full_scans < goal:
                await self.driver.changed()
            return self.counters()

        return wait

    async def sync(self) -> None:
        await self.driver.barrier(wait_for_peer=True)

    def status(self) -> dict[str, Any]:
        c = self.core
        return {
            **self.driver.status("collapsed"),
            "files": len(c.files),
            "mm_slots": len(c.khugepaged.slots),
            **self.counters(),
        }

    async def serve(self, listen: str, ready_file: str | None) -> None:
        await Server(self.driver, {"remapd", "client"}, self.handlers).serve(listen, ready_file)
