"""Crash recovery with real processes (issue 13): a busy collapse workload runs through the client
library while one daemon or the other is killed with SIGKILL at seeded random moments and
restarted; afterwards the pair has resynchronised: `thpctl check` (remapd's tables and pins
against collapsed's pages and cache, the invariant checker's rules across the two processes)
finds nothing mapped that points at a freed or foreign page, no reference or count astray, both
sides naming the same files; the reports agree with each other; and the mappings work.

Also, the check itself: it passes on a consistent model and names each kind of damage.
"""

from __future__ import annotations

import random
import signal
from typing import Any

import pytest
import trio
from helpers import ONE_PAGE_FLAGS, ok, thpctl

from shared.errors import UserError
from shared.knobs import Knobs
from shared.protocol import messages as m
from shared.sim.world import World
from shared.thpctl.client import Session
from shared.thpctl.launch import Daemons, running_daemons

MB = 1 << 20
FILES = (("lib", False), ("data", False), ("shm", True))
PIDS = (1, 2, 3)


# -- the check itself, in-process -----------------------------------------------------------


def _world() -> World:
    w = World(Knobs(enabled="always", scan_sleep_millisecs=10, read_ahead_kb=0, fault_around_bytes=4096))
    w.file_create("lib", 4 * MB)
    w.spawn(1)
    a = w.mmap(1, None, 4 * MB, "lib", prot="rx", shared=False)
    w.touch(1, a, 4 * MB)
    w.wait_scans(2)
    w.pin(1, a)
    w.file_create("other", MB)
    return w


def test_the_check_passes_on_a_consistent_pair():
    assert _world().audit() == {"ok": True, "problems": [], "pages": 2, "files": 2}  # two PMD-mapped THPs


@pytest.mark.parametrize(
    "damage, found",
    [
        (lambda w: w.collapser.mem.mapcount.__setitem__(700, 1), "PTE mappings"),
        (lambda w: w.collapser.mem.ref.__setitem__(w.collapser.by_name["lib"].get(0), 7), "refcount"),
        (lambda w: w.collapser.mem.pins.clear(), "pins counted"),
        (lambda w: setattr(w.remapper.files[2], "gen", 99), "to remapd"),
        (lambda w: w.collapser.mem.flags.__setitem__(w.collapser.by_name["lib"].get(0), 0), "but free"),
        (lambda w: w.remapper.mms[1].rss.__setitem__("MM_FILEPAGES", 3), "MM_FILEPAGES"),
    ],
)
def test_the_check_names_each_kind_of_damage(damage, found):
    w = _world()
    damage(w)
    result = w.audit()
    assert not result["ok"] and any(found in p for p in result["problems"]), result


def test_a_pinned_page_truncated_out_of_the_cache_is_not_damage():
    """DST seed 213: a GUP pin keeps a page a truncate took out of the cache (and out of every
    mapping); the check compared the page's cleared file and index with the pin's."""
    w = World(Knobs(read_ahead_kb=0, fault_around_bytes=4096))
    w.file_create("f", 4 * 4096)
    w.spawn(1)
    a = w.mmap(1, None, 4 * 4096, "f")
    w.pin(1, a + 3 * 4096)
    pfn = w.collapser.by_name["f"].get(3)
    w.file_truncate("f", 4096)
    assert w.collapser.mem.pins == {pfn: 1} and w.collapser.mem.ino[pfn] == 0  # pinned, uncached
    assert w.audit() == {"ok": True, "problems": [], "pages": 1, "files": 1}


def test_the_check_waits_for_a_quiet_pair():
    from shared.sim.dst import LinkWorld

    w = LinkWorld(Knobs(read_ahead_kb=0, fault_around_bytes=4096))
    w.file_create("f", MB)
    w.spawn(1)
    a = w.mmap(1, None, MB, "f")
    w.manual = True
    w.perform(w.request(m.Fault, 1, a), w.remapper, waits=True)  # a fault waits on collapsed
    check = w.perform(w.request(m.Check), w.remapper, waits=True)
    with pytest.raises(UserError) as err:
        check.result()
    assert err.value.errno_name == "EAGAIN"


# -- real processes -------------------------------------------------------------------------


class Workload:
    """A busy collapse workload through the client library; it survives its daemons dying
    (a new session, and the files or processes a restart lost made again)."""

    def __init__(self, d: Daemons, seed: int):
        self.d = d
        self.rng = random.Random(seed)
        self.stop = trio.Event()
        self.ops = 0
        self.errors: dict[str, int] = {}
        self.sessions = 0

    async def run(self) -> None:
        while not self.stop.is_set():
            self.sessions += 1
            try:
                async with Session(self.d.collapsed.address, self.d.remapd.address) as s:
                    await self._setup(s)
                    while not self.stop.is_set():
                        await self._op(s)
            except UserError as err:  # a daemon went away (ECONNRESET, ECONNREFUSED, ...)
                self.errors[err.errno_name] = self.errors.get(err.errno_name, 0) + 1
                await trio.sleep(0.05)

    async def _try(self, s: Session, cls: type[Any], **fields: Any) -> Any:
        self.ops += 1
        try:
            return await s.call(cls, **fields)
        except UserError as err:
            if err.errno_name in ("ECONNRESET", "ECONNREFUSED", "EPIPE", "ENOTCONN"):
                raise
            self.errors[err.errno_name] = self.errors.get(err.errno_name, 0) + 1
            return None

    async def _setup(self, s: Session) -> None:
        for name, shmem in FILES:
            await self._try(s, m.FileCreate, name=name, size=4 * MB, shmem=shmem)
        for pid in PIDS:
            have: set[int] = set()
            if await self._try(s, m.ProcSpawn, pid=pid) is None:
                # It survived, with the mappings the restored snapshot held: a kill between
                # the spawn and the last mmap (or before the snapshot that had them) loses some.
                have = {row["start"] for row in await self._try(s, m.Smaps, pid=pid) or ()}
            for i, (name, shmem) in enumerate(FILES):
                addr = 0x40000000 + (pid * 4 + i) * 8 * MB
                if addr in have:
                    continue
                await self._try(s, m.Mmap, pid=pid, addr=addr, length=4 * MB, name=name, prot="rx" if name == "lib" else "rw", shared=name != "lib")
                await self._try(s, m.Madvise, pid=pid, addr=addr, length=4 * MB, advice="hugepage")

    async def _op(self, s: Session) -> None:
        rng = self.rng
        pid = rng.choice(PIDS)
        i = rng.randrange(len(FILES))
        name = FILES[i][0]
        base = 0x40000000 + (pid * 4 + i) * 8 * MB + rng.choice((0, 2 * MB))
        roll = rng.random()
        if roll < 0.4:
            await self._try(s, m.Touch, pid=pid, addr=base, length=2 * MB, write=name != "lib" and rng.random() < 0.3, stride=16 * 1024)
        elif roll < 0.55:
            await self._try(s, m.Madvise, pid=pid, addr=base, length=2 * MB, advice="collapse")
        elif roll < 0.65:
            await self._try(s, m.FileWrite, name=name, offset=rng.randrange(0, 4 * MB, 4096), length=64 * 1024)
        elif roll < 0.7:
            await self._try(s, m.FileSync, name=name)
        elif roll < 0.75:
            await self._try(s, m.FilePunch, name=name, offset=rng.randrange(0, 4 * MB, 4096), length=64 * 1024)
        elif roll < 0.8:
            await self._try(s, m.Madvise, pid=pid, addr=base, length=64 * 1024, advice=rng.choice(("dontneed", "pageout")))
        elif roll < 0.85:
            await self._try(s, m.Pin, pid=pid, addr=base)
        elif roll < 0.9:
            await self._try(s, m.Lock, pid=pid, hold_ms=20.0, write=True)
        elif roll < 0.95:
            await self._try(s, m.Fault, pid=pid, addr=base + rng.randrange(512) * 4096, write=name != "lib")
        else:
            await self._try(s, m.DropCaches)


async def _check_until_quiet(d: Daemons) -> dict[str, Any]:
    """thpctl check, retried while a collapse is in flight."""
    with trio.fail_after(20):
        while True:
            status, out, err = await thpctl(d, "--json", "check")
            if "EAGAIN" not in err:
                assert status in (0, 1), err
                import json

                return json.loads(out)
            await trio.sleep(0.05)


async def _crash_and_recover(workdir, seed: int, kills: int, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    rng = random.Random(seed)
    r_args = [*ONE_PAGE_FLAGS, "--khugepaged-scan-sleep-millisecs", "20", "--remap-sleep-millisecs", "20", *extra]
    async with running_daemons(workdir, collapsed_args=list(extra), remapd_args=r_args) as d:
        await ok(d, "sysfs", "set", "enabled", "always")
        await ok(d, "sysfs", "set", "shmem_enabled", "advise")
        work = Workload(d, seed)
        killed: list[str] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(work.run)
            for _ in range(kills):
                await trio.sleep(rng.uniform(0.2, 0.8))
                victim = d.collapsed if rng.random() < 0.5 else d.remapd
                assert victim.proc is not None
                victim.proc.send_signal(signal.SIGKILL)
                assert await victim.proc.wait() == -signal.SIGKILL
                killed.append(victim.name)
                await victim.start()
                await victim.wait_ready()
            await trio.sleep(0.5)
            work.stop.set()
        # Quiet the pair, let it finish what is in flight, and judge.
        await ok(d, "sysfs", "set", "khugepaged/scan_sleep_millisecs", "100000")
        await ok(d, "--deadline", "20", "sync")
        result = await _check_until_quiet(d)
        assert result["ok"], result["problems"]
        # The reports agree with each other and with the check.
        meminfo = {line.split()[0].rstrip(":"): int(line.split()[1]) for line in (await ok(d, "meminfo")).splitlines()}
        files = (await ok(d, "--json", "file", "ls"))
        import json

        ls = json.loads(files)
        assert meminfo["Cached"] == 4 * sum(f["nrpages"] for f in ls)
        assert meminfo["FileHugePages"] == 2048 * sum(f["thps"] for f in ls if not f["shmem"])
        # The workload's files, and perhaps old ones still mapped: a client re-created a name on
        # a restarted collapsed before remapd's claim of the file it maps arrived.
        names = {f["name"] for f in ls}
        assert {name for name, _ in FILES} <= names
        assert all(n.split(" (deleted)")[0] in dict(FILES) for n in names), names
        # Every mapping still works: touch them all (the check runs again after).
        for pid in PIDS:
            for i in range(len(FILES)):
                addr = hex(0x40000000 + (pid * 4 + i) * 8 * MB)
                out = await ok(d, "touch", str(pid), addr, "4M", "--stride", "64K")
                assert "sigsegv" not in out and "sigbus" not in out, out
        again = await _check_until_quiet(d)
        # Each 2 MiB touched is mapped: at least one row, its THP's head for a PMD mapping (a
        # shmem fault allocates a PMD-size folio and a cached THP is mapped whole).
        assert again["ok"] and again["pages"] >= len(PIDS) * len(FILES) * 2, again
        print(f"kills {killed}, ops {work.ops}, sessions {work.sessions}, errors {work.errors}, checks {result} {again}")
        return {"killed": killed, "ops": work.ops, "check": result}


async def test_sigkill_at_random_moments_then_the_pair_is_consistent(workdir):
    out = await _crash_and_recover(workdir, seed=1, kills=6)
    assert set(out["killed"]) == {"collapsed", "remapd"} and out["ops"] > 100


async def test_sigkill_with_a_state_dir_restores_and_revalidates(workdir):
    state = workdir / "state"
    out = await _crash_and_recover(workdir, seed=2, kills=4, extra=("--state-dir", str(state), "--snapshot-interval", "0.1"))
    assert out["ops"] > 50
    logs = (workdir / "collapsed.log").read_text() + (workdir / "remapd.log").read_text()
    assert '"snapshot_restored"' in logs
