"""The daemons' fault path: batched lookups, against the fidelity they buy.

Both daemons' shells and cores run in this process over in-memory streams that take
:data:`LATENCY_S` per write, on trio's virtual clock (autojump): a round trip costs model time
as it costs real time between the daemons, deterministically.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from conftest import CheckedWorld
from helpers import FIXED, H, P, make_file_thp, pte_at

from collapsed.daemon import Collapsed
from remapd.daemon import Remapd
from remapd.mm import PTE_THP, PteTable
from shared.knobs import Knobs
from shared.protocol import messages as m
from shared.protocol.framing import FrameDecoder, batchable_body, encode_batch, encode_message
from shared.protocol.messages import MAX_BATCH_FAULTS
from shared.shell.channel import open_channel
from shared.shell.requests import serve_client
from shared.sim.invariants import check
from shared.shell.job import Job
from shared.units import HPAGE_PMD_NR, HPAGE_PMD_SHIFT, HPAGE_PMD_SIZE, PAGE_SIZE

# Per write on either stream: a round trip between the daemons costs twice this.
LATENCY_S = 0.0005


class SlowStream(trio.abc.Stream):
    """A stream whose every write arrives ``LATENCY_S`` after it is made."""

    def __init__(self, inner: trio.abc.Stream):
        self.inner = inner
        self.written = bytearray()  # everything sent, to look at its frames

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data
        await trio.sleep(LATENCY_S)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Pair:
    def __init__(self, collapsed: Collapsed, remapd: Remapd):
        self.collapsed = collapsed
        self.remapd = remapd
        self._ids = iter(range(1, 1 << 30))
        self.written: dict[str, bytearray] = {}

    def start(self, cls: type[m.Request[Any]], **fields: Any) -> Any:
        daemon = self.collapsed if cls.OP.route == "collapsed" else self.remapd
        return daemon.handlers[cls](cls(next(self._ids), **fields))

    async def call(self, cls: type[m.Request[Any]], **fields: Any) -> Any:
        work = self.start(cls, **fields)
        return await work.result() if isinstance(work, Job) else await work()


@asynccontextmanager
async def daemons(**knobs: Any) -> AsyncIterator[Pair]:
    collapsed = Collapsed(Knobs(**knobs))
    remapd = Remapd(Knobs(**knobs))
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        for d in (collapsed, remapd):
            nursery.start_soon(d.driver.run_clock)
            nursery.start_soon(d.link.pump)

        slow = {"collapsed": SlowStream(left), "remapd": SlowStream(right)}

        async def side(d: Collapsed | Remapd, stream: trio.abc.Stream, role: str, initiator: bool) -> None:
            async with open_channel(slow[role]) as ch:
                await ch.handshake(role, initiator=initiator)
                await d.link.serve(ch)

        nursery.start_soon(side, collapsed, left, "collapsed", False)
        nursery.start_soon(side, remapd, right, "remapd", True)
        pair = Pair(collapsed, remapd)
        pair.written = {role: stream.written for role, stream in slow.items()}
        await remapd.link.barrier(wait_for_peer=True)
        yield pair
        nursery.cancel_scope.cancel()


async def test_populate_read_of_a_pmd_range_is_not_collapsed_in_the_middle(autojump_clock):
    """The kernel selftest's max_ptes_none run on a regular file: fault 255 pages of a PMD, wait
    for scans (257 holes exceed max_ptes_none 256: no collapse), re-fault the whole PMD range with
    MADV_POPULATE_READ. The kernel's populate finishes long before khugepaged's next 10 ms
    wake-up; one round trip per fault (~1 ms here) would let khugepaged collapse in its middle,
    and the rest of the populate map the new THP by a PMD."""
    knobs = dict(enabled="always", read_ahead_kb=0, fault_around_bytes=4096, max_ptes_none=256, scan_sleep_millisecs=10)
    async with daemons(**knobs) as d:
        await d.call(m.FileCreate, name="f", size=HPAGE_PMD_SIZE)
        await d.call(m.ProcSpawn, pid=1)
        addr = (await d.call(m.Mmap, pid=1, addr=None, length=HPAGE_PMD_SIZE, name="f", prot="r"))["addr"]
        first = 255
        assert (await d.call(m.Madvise, pid=1, addr=addr, length=first * PAGE_SIZE, advice="populate_read"))[
            "result"
        ] == 0
        await d.call(m.WaitScans, n=2)
        khugepaged = d.collapsed.core.khugepaged
        assert khugepaged.pages_collapsed == 0  # 257 holes: SCAN_EXCEED_NONE_PTE

        job = d.start(m.Madvise, pid=1, addr=addr, length=HPAGE_PMD_SIZE, advice="populate_read")
        await job.finished_wait()
        table = d.remapd.core.mms[1].pmds.get(addr >> HPAGE_PMD_SHIFT)
        assert isinstance(table, PteTable), "collapsed in the middle of the populate: its end got a PMD"
        assert all(table.ptes) and not any(pte & PTE_THP for pte in table.ptes)
        assert (await job.result())["result"] == 0

        # Then khugepaged collapses it at a later wake-up, as in the kernel.
        await d.call(m.WaitScans, n=2)
        assert khugepaged.pages_collapsed == 1
        assert d.collapsed.core.by_name["f"].nrpages == HPAGE_PMD_NR


def _table(world, pid: int) -> dict[int, Any]:
    return {
        pidx: entry if isinstance(entry, int) else tuple(entry.ptes)
        for pidx, entry in world.remapper.mms[pid].pmds.items()
    }


CASES = {
    # name: (knobs, file size, shmem, madvise, stride, pages touched before, thp in the cache)
    "defaults": ({}, 4 * H, False, None, P, 37, False),
    "vm_hugepage": ({}, 4 * H, False, "hugepage", P, 0, False),
    "past_eof": ({}, 3 * H + 5 * P, False, None, P, 0, False),
    "stride_3000": ({}, 4 * H, False, None, 3000, 11, False),
    "stride_8k_wide_around": ({"fault_around_bytes": 1 << 20}, 4 * H, False, None, 2 * P, 5, False),
    "one_page": ({"read_ahead_kb": 0, "fault_around_bytes": P}, 2 * H, False, None, P, 3, False),
    "shmem_thp": ({"shmem_enabled": "always"}, 4 * H, True, None, P, 0, False),
    "file_thp": ({}, 4 * H, False, "hugepage", P, 0, True),
}


@pytest.mark.parametrize("case", CASES)
def test_batched_read_faults_end_as_the_faults_one_after_the_other(case):
    """A touch's batch against the same accesses as single faults on an identical world: the same
    outcomes, page tables, page-cache accounting and vmstat."""
    knobs, size, shmem, advice, stride, before, thp = CASES[case]
    worlds = [CheckedWorld(Knobs(**knobs), seed=1) for _ in range(2)]
    for world in worlds:
        if thp:
            make_file_thp(world, "f", size)
        else:
            world.file_create("f", size, shmem=shmem)
        world.spawn(1)
        world.mmap(1, FIXED, 4 * H, "f")
        if advice:
            assert world.madvise(1, FIXED, 4 * H, advice) == 0
        if before:
            world.touch(1, FIXED + 3 * P, 4 * H - 3 * P, stride=before * P)
    batched, single = worlds
    counts = batched.touch(1, FIXED, 4 * H, stride=stride)
    # The reference: thousands of steps, checked once at the end rather than after each.
    single._checking = False
    one_by_one: Counter[str] = Counter(single.fault(1, a) for a in range(FIXED, FIXED + 4 * H, stride))
    single.check()
    assert counts == dict(one_by_one)
    assert _table(batched, 1) == _table(single, 1)
    assert batched.vmstat() == single.vmstat()
    assert batched.smaps(1) == single.smaps(1)
    mem_b, mem_s = batched.collapser.mem, single.collapser.mem
    assert (list(mem_b.ref), list(mem_b.mapcount)) == (list(mem_s.ref), list(mem_s.mapcount))


@pytest.mark.parametrize("shmem", [False, True])
def test_a_batched_fault_past_eof_maps_its_fault_around_pages_first(shmem):
    """do_read_fault() runs do_fault_around() before ->fault answers SIGBUS: a batch's fault past
    EOF maps the cached pages below EOF in its window, as a single fault does, with the file's
    own rss counter (MM_SHMEMPAGES for shmem)."""
    worlds = [CheckedWorld(Knobs(), seed=1) for _ in range(2)]
    eof = 3 * H + 5 * P
    for world in worlds:
        world.file_create("f", eof, shmem=shmem)
        world.file_write("f", 3 * H, 5 * P)  # cached, not mapped
        world.spawn(1)
        world.mmap(1, FIXED, 4 * H, "f")
    batched, single = worlds
    start = FIXED + 3 * H + 8 * P  # past EOF; its window starts at 3 * H
    counts = batched.touch(1, start, 8 * P)
    one_by_one = Counter(single.fault(1, a) for a in range(start, start + 8 * P, P))
    assert counts == dict(one_by_one) == {"sigbus": 8}
    assert _table(batched, 1) == _table(single, 1)
    assert batched.smaps(1) == single.smaps(1)
    assert batched.smaps(1)[0]["Rss"] == 5 * 4
    assert batched.proc_status(1)["RssShmem" if shmem else "RssFile"] == 5 * 4


async def test_a_touch_stops_soon_after_its_client_goes_away(autojump_clock):
    """A client that closes its connection (as thpctl does when its --deadline passes) cancels
    its 1 GiB touch: it stops within one batch, and the model is consistent after."""
    gib = 1 << 30
    async with daemons(read_ahead_kb=0, fault_around_bytes=4096) as d:
        await d.call(m.FileCreate, name="f", size=gib)
        await d.call(m.ProcSpawn, pid=1)
        addr = (await d.call(m.Mmap, pid=1, addr=None, length=gib, name="f"))["addr"]
        driver = d.remapd.driver
        mm = d.remapd.core.mms[1]
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                async with open_channel(server) as ch:
                    await ch.handshake("remapd", initiator=False)
                    await serve_client(driver, ch, d.remapd.handlers)

            nursery.start_soon(serve)
            async with open_channel(SlowStream(client)) as ch:
                await ch.handshake("client")
                await ch.send(m.Touch(1, pid=1, addr=addr, length=gib))
                while mm.rss["MM_FILEPAGES"] < MAX_BATCH_FAULTS:  # the first batch is mapped
                    await driver.changed()
            mapped_at_close = mm.rss["MM_FILEPAGES"]
            # The touch's task is done once nothing waits on the collapser any more.
            with trio.fail_after(1):
                while driver.active_requests or d.remapd.core.pending_calls():
                    await driver.changed()
        assert mapped_at_close <= mm.rss["MM_FILEPAGES"] <= mapped_at_close + MAX_BATCH_FAULTS < gib // PAGE_SIZE
        await d.remapd.link.barrier()
        check(d.collapsed.core, d.remapd.core)
        assert d.collapsed.core.by_name["f"].nrpages == mm.rss["MM_FILEPAGES"]


def test_a_frame_of_many_messages_is_taken_in_order():
    msgs = [m.Sync(1), m.MmExit(5), m.RmapDelta.of(((7, 1, 0, 0),)), m.Sync(2)]
    bodies = [batchable_body(msg) for msg in msgs]
    assert all(b is not None for b in bodies)
    decoder = FrameDecoder()
    decoder.feed(encode_batch(bodies) + encode_message(m.Sync(3)))
    got = []
    while (msg := decoder.next_message()) is not None:
        got.append(msg)
    assert got == [*msgs, m.Sync(3)]
    assert decoder.statistics().frames_decoded == 2
    # A lone message is a frame of its own.
    assert encode_batch([batchable_body(m.Sync(1)) or b""]) == encode_message(m.Sync(1))
    # A large message never shares a frame (it could not nest within every limit).
    assert batchable_body(m.RmapDelta.of(tuple((p, 1, 0, 0) for p in range(1, 2000)))) is None


async def test_the_lookups_of_many_connections_share_one_peer_frame(autojump_clock):
    """Single faults of eight processes started together reach the collapser as one write of
    one frame, and their answers come back the same way."""
    async with daemons(read_ahead_kb=0, fault_around_bytes=4096) as d:
        await d.call(m.FileCreate, name="f", size=HPAGE_PMD_SIZE)
        addrs = {}
        for pid in range(1, 9):
            await d.call(m.ProcSpawn, pid=pid)
            addrs[pid] = (await d.call(m.Mmap, pid=pid, addr=None, length=HPAGE_PMD_SIZE, name="f"))["addr"]
        sent = {role: len(w) for role, w in d.written.items()}
        jobs = [d.start(m.Fault, pid=pid, addr=addrs[pid] + pid * PAGE_SIZE) for pid in addrs]
        assert [await job.result() for job in jobs] == [{"result": "major"}] * 8
        for role, kind in (("remapd", m.LookupPage), ("collapsed", m.PageAnswer)):
            decoder = FrameDecoder()
            decoder.feed(bytes(d.written[role][sent[role] :]))
            got = []
            while (msg := decoder.next_message()) is not None:
                got.append(msg)
            assert [type(msg) for msg in got] == [kind] * 8
            assert decoder.statistics().frames_decoded == 1


def test_a_batch_that_meets_a_locked_page_waits_for_it(make_world):
    """filemap_fault sleeps on a locked folio: the batch waits at that page (and other work may run
    meanwhile, as while one fault sleeps), then finishes as the faults one by one would."""
    world = make_world()
    world.file_create("f", H)
    world.file_write("f", 0, H)  # every page cached, small
    world.spawn(1)
    world.mmap(1, FIXED, H, "f")
    f = world.collapser.by_name["f"]
    locked = f.get(100)
    world._checking = False  # the page locked by hand is a lock the checker would not know
    assert world.collapser.cache.trylock(locked)
    touch = world.start(world.remapper, world.remapper.touch(1, FIXED, H))
    assert not touch.done
    # The faults before it are mapped while it sleeps, accounting and page table alike, as one
    # by one; nothing after it is.
    mapcount = world.collapser.mem.mapcount
    assert [bool(pte_at(world, 1, FIXED + i * P)) for i in range(HPAGE_PMD_NR)] == [i < 100 for i in range(HPAGE_PMD_NR)]
    assert [mapcount[f.get(i)] for i in range(HPAGE_PMD_NR)] == [int(i < 100) for i in range(HPAGE_PMD_NR)]
    world.collapser.cache.unlock(locked)
    world._checking = True
    world.settle()
    assert touch.result() == {"minor": HPAGE_PMD_NR}
    assert world.smaps(1)[0]["Rss"] == H // 1024


async def test_a_jobs_then_runs_once_after_the_event_that_finished_it(autojump_clock):
    """serve_client answers a request that waits (a fault's page-cache lookup) from Job.then,
    with no task waiting for it: the driver runs it after the event that finished the job (the
    peer's answer), not from within the core's step, once, with the job's value; then(None)
    takes it back (the client went away)."""
    async with daemons(read_ahead_kb=0, fault_around_bytes=4096) as d:
        await d.call(m.FileCreate, name="f", size=HPAGE_PMD_SIZE)
        await d.call(m.ProcSpawn, pid=1)
        addr = (await d.call(m.Mmap, pid=1, addr=None, length=HPAGE_PMD_SIZE, name="f"))["addr"]
        core = d.remapd.core
        seen: list[Any] = []
        job = d.start(m.Fault, pid=1, addr=addr)
        assert not job.finished  # it waits for the collapser
        job.then(lambda j: seen.append((j.value(), core._stepping)))
        dropped = d.start(m.Fault, pid=1, addr=addr + PAGE_SIZE)
        dropped.then(lambda j: seen.append("dropped"))
        dropped.then(None)
        assert await job.result() == {"result": "major"}
        assert await dropped.result() == {"result": "major"}
        assert seen == [({"result": "major"}, False)]
