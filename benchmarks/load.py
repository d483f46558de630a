"""Load: many concurrent clients, each pipelining a mix of requests to both daemons; every request
must be answered exactly once, each connection's requests must take effect in the order sent,
and the figures are throughput and latency.

    python benchmarks/load.py                                  # 100 clients x 3,000 requests
    python benchmarks/load.py --clients 100 --requests 300     # the test's size
    python benchmarks/load.py --collapsed unix:/run/c.sock --remapd unix:/run/r.sock

Without addresses it starts both daemons in a temporary directory. Each client has its own file
and process and two connections, one to each daemon, on which it keeps ``--window`` requests in
flight. Exactly once is checked by id: every reply's id must be one still waiting (a second reply
for an id, or one for an id never sent, counts as duplicated; a request never answered by the end
as lost). Order is checked by side effects only this connection causes, since a daemon may send
replies out of order (one that waits for the peer barrier can be overtaken):

* collapsed: the k-th write appends the k-th page to the client's file, so its reply must give
  the file exactly that size; a sync, or a ``file ls``, must see the size of the writes before it;
* remapd: the k-th mmap maps a fixed address of its own, a fault or touch there after it must
  not be SIGSEGV, and smaps must list exactly the mappings made before it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.protocol import messages as m
from shared.protocol.schema import CLIENT, Reply, Request
from shared.shell.channel import Channel, open_channel
from shared.shell.config import parse_address
from shared.shell.transport import connect

KB = 1024
MB = 1 << 20
FILE_SIZE = MB
MAP_LEN = 64 * KB
MAP_BASE = 0x100000000  # 4 GiB; mapping k of a client at MAP_BASE + k * MAP_STRIDE
MAP_STRIDE = 128 * KB  # a gap between mappings: they never merge
MAX_MAPS = 40

Check = Callable[[Any], str | None]  # a reply's result -> None, or what was wrong


@dataclasses.dataclass
class Figures:
    clients: int
    requests: int
    answered: int = 0
    errors: int = 0
    lost: int = 0
    duplicated: int = 0
    order_violations: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = dataclasses.field(default_factory=list, repr=False)
    problems: list[str] = dataclasses.field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [0.0] * 99
        return {
            "clients": self.clients,
            "requests": self.requests,
            "answered": self.answered,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "errors": self.errors,
            "order_violations": self.order_violations,
            "seconds": round(self.seconds, 2),
            "requests_per_s": round(self.requests / self.seconds) if self.seconds else 0,
            "p50_ms": round(q[49], 2),
            "p99_ms": round(q[98], 2),
            "max_ms": round(lat[-1], 2) if lat else 0.0,
        }


class Connection:
    """One client connection: pipelined requests, replies matched by id and counted."""

    def __init__(self, ch: Channel, figures: Figures, window: int, name: str):
        self.ch = ch
        self.figures = figures
        self.window = trio.Semaphore(window)
        self.name = name
        self.next_id = 1
        self.waiting: dict[int, tuple[float, Request[Any], Check | None]] = {}
        self.answered: set[int] = set()
        self.all_answered = trio.Event()

    async def send(self, cls: type[Request[Any]], check: Check | None = None, **fields: Any) -> None:
        await self.window.acquire()
        msg = cls(self.next_id, **fields)
        self.next_id += 1
        self.waiting[msg.id] = (time.perf_counter(), msg, check)
        self.all_answered = trio.Event() if self.all_answered.is_set() else self.all_answered
        await self.ch.send(msg)

    async def call(self, cls: type[Request[Any]], **fields: Any) -> Any:
        """Send and wait for this one reply (setup steps)."""
        done = trio.Event()
        box: list[Any] = []

        def keep(result: Any) -> None:
            box.append(result)
            done.set()

        await self.send(cls, lambda r: keep(r), **fields)
        await done.wait()
        return box[0]

    async def reader(self) -> None:
        f = self.figures
        async for msg in self.ch:
            rid = getattr(msg, "id", None)
            if not isinstance(msg, (Reply, m.ErrorReply)) or rid is None:
                f.problems.append(f"{self.name}: unexpected {msg.TAG}")
                continue
            entry = self.waiting.pop(rid, None)
            if entry is None:
                f.duplicated += 1
                f.problems.append(f"{self.name}: a reply for id {rid}, {'again' if rid in self.answered else 'never sent'}")
                continue
            self.answered.add(rid)
            sent, request, check = entry
            f.latencies_ms.append((time.perf_counter() - sent) * 1000)
            f.answered += 1
            self.window.release()
            if isinstance(msg, m.ErrorReply):
                f.errors += 1
                f.problems.append(f"{self.name}: {request.TAG} #{rid}: {msg.errno} {msg.message}")
            elif check is not None:
                wrong = check(msg.result)
                if wrong:
                    f.order_violations += 1
                    f.problems.append(f"{self.name}: {request.TAG} #{rid}: {wrong}")
            if not self.waiting:
                self.all_answered.set()

    async def drain(self) -> None:
        while self.waiting:
            await self.all_answered.wait()


async def open_connection(address: str, figures: Figures, window: int, name: str, nursery: trio.Nursery) -> Connection:
    stream = await connect(parse_address(address))
    ch = await nursery.start(_channel, stream)
    await ch.handshake(CLIENT)
    conn = Connection(ch, figures, window, name)
    nursery.start_soon(conn.reader)
    return conn


async def _channel(stream: trio.abc.Stream, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async with open_channel(stream) as ch:
        task_status.started(ch)
        await trio.sleep_forever()


async def one_client(
    i: int, collapsed: str, remapd: str, requests: int, window: int, seed: int, figures: Figures, base_pid: int
) -> None:
    rng = random.Random(f"{seed}:{i}")
    name = f"load-{seed}-{i}"
    pid = base_pid + i
    async with trio.open_nursery() as nursery:
        c = await open_connection(collapsed, figures, window, f"client {i} collapsed", nursery)
        r = await open_connection(remapd, figures, window, f"client {i} remapd", nursery)
        await c.call(m.FileCreate, name=name, size=FILE_SIZE, shmem=False)
        await r.call(m.ProcSpawn, pid=pid)
        setup = 2
        per_daemon = (requests - setup) // 2
        async with trio.open_nursery() as streams:
            streams.start_soon(_collapsed_stream, c, name, per_daemon, rng.random())
            streams.start_soon(_remapd_stream, r, name, pid, requests - setup - per_daemon, random.Random(rng.random()))
        await c.drain()
        await r.drain()
        nursery.cancel_scope.cancel()


async def _collapsed_stream(c: Connection, name: str, n: int, seed: float) -> None:
    rng = random.Random(seed)
    size = FILE_SIZE
    for _ in range(n):
        roll = rng.random()
        if roll < 0.55:
            offset = size
            size += 4 * KB
            await c.send(m.FileWrite, _size_is(size, "write"), name=name, offset=offset, length=4 * KB)
        elif roll < 0.7:
            await c.send(m.FileSync, _size_is(size, "sync"), name=name)
        elif roll < 0.75:
            await c.send(m.FileLs, _listed_size_is(name, size))
        elif roll < 0.9:
            await c.send(m.Vmstat)
        else:
            await c.send(m.Meminfo)


async def _remapd_stream(r: Connection, name: str, pid: int, n: int, rng: random.Random) -> None:
    maps = 0
    for _ in range(n):
        roll = rng.random()
        if maps < MAX_MAPS and (maps == 0 or roll < 0.15):
            addr = MAP_BASE + maps * MAP_STRIDE
            maps += 1
            await r.send(m.Mmap, _addr_is(addr), pid=pid, addr=addr, length=MAP_LEN, name=name, prot="r", shared=True)
            continue
        addr = MAP_BASE + rng.randrange(maps) * MAP_STRIDE
        if roll < 0.45:
            page = addr + rng.randrange(MAP_LEN // (4 * KB)) * 4 * KB
            await r.send(m.Fault, _not_segv("fault"), pid=pid, addr=page)
        elif roll < 0.6:
            await r.send(m.Touch, _touch_ok, pid=pid, addr=addr, length=MAP_LEN)
        elif roll < 0.7:
            await r.send(m.Smaps, _maps_are(maps), pid=pid)
        elif roll < 0.8:
            await r.send(m.Madvise, _is_zero, pid=pid, addr=addr, length=MAP_LEN, advice="dontneed")
        elif roll < 0.9:
            await r.send(m.Vmstat)
        else:
            await r.send(m.Status)


def _size_is(size: int, what: str) -> Check:
    def check(result: Any) -> str | None:
        return None if result["size"] == size else f"{what} saw size {result['size']}, expected {size}"

    return check


def _listed_size_is(name: str, size: int) -> Check:
    def check(result: Any) -> str | None:
        mine = [f for f in result if f["name"] == name]
        if len(mine) != 1 or mine[0]["size"] != size:
            return f"file ls saw {mine}, expected size {size}"
        return None

    return check


def _addr_is(addr: int) -> Check:
    return lambda result: None if result["addr"] == addr else f"mmap at {result['addr']:#x}, asked {addr:#x}"


def _not_segv(what: str) -> Check:
    return lambda result: f"{what}: {result['result']} (before its mmap?)" if result["result"] == "sigsegv" else None


def _touch_ok(result: Any) -> str | None:
    return f"touch: {result}" if "sigsegv" in result else None


def _maps_are(n: int) -> Check:
    return lambda result: None if len(result) == n else f"smaps lists {len(result)} mappings, {n} were made before it"


def _is_zero(result: Any) -> str | None:
    return None if result["result"] == 0 else f"madvise: {result['result']}"


async def run_load(
    collapsed: str,
    remapd: str,
    clients: int = 100,
    requests: int = 300,
    window: int = 16,
    seed: int = 0,
    base_pid: int = 100_000,
) -> Figures:
    """``clients`` clients, each sending ``requests`` requests (two of them setup, the rest split
    between its two connections), at most ``window`` in flight per connection."""
    figures = Figures(clients, clients * requests)
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(one_client, i, collapsed, remapd, requests, window, seed, figures, base_pid)
    figures.seconds = time.perf_counter() - t0
    figures.lost = figures.requests - figures.answered
    return figures


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    if args.collapsed and args.remapd:
        figures = await run_load(args.collapsed, args.remapd, args.clients, args.requests, args.window, args.seed)
    else:
        from shared.thpctl.launch import running_daemons

        with tempfile.TemporaryDirectory(prefix="thp-load-") as tmp:
            async with running_daemons(Path(tmp)) as d:
                figures = await run_load(d.collapsed.address, d.remapd.address, args.clients, args.requests, args.window, args.seed)
    for line in figures.problems[:20]:
        print(line, file=sys.stderr)
    return figures.summary()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--requests", type=int, default=3000, help="per client (default 3000)")
    parser.add_argument("--window", type=int, default=16, help="requests in flight per connection (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--collapsed", help="a running collapsed (else both daemons are started)")
    parser.add_argument("--remapd", help="a running remapd")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    summary = trio.run(_main, args)
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key}: {value}")
    bad = summary["lost"] or summary["duplicated"] or summary["errors"] or summary["order_violations"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
