"""The transport's ceiling: a minimal trio + msgpack echo over Unix sockets, between processes.

Run: ``.venv/bin/python benchmarks/bench_ceiling.py [--events N]``. What the daemons' figures
(benchmarks/bench_daemons.py, which runs this first) are measured against: the same socket type
and codec with no model behind them. One hop is client -> echo -> client; two hops add a relay
(client -> relay -> echo -> relay -> client), as a fault goes client -> remapd -> collapsed and
back. Every hop decodes each event and encodes its reply. Three ways to send:

* batched: the client writes many events per ``send_all`` and each server answers all it has
  read in one write (what the daemons' batched lookups and coalesced writes can reach);
* one event per write: pipelined, but each event and each reply its own ``send_all``;
* strict: the client sends one event and waits for its reply before the next.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import trio

RECV_CHUNK = 64 * 1024
# Events per client write when batched.
BATCH = 512
# An event as small as a fault's lookup: [tag, {fields}].
EVENT = ["peer.lookup_page", {"req": 1, "ino": 7, "index": 123456, "purpose": "map", "write": False}]


async def _serve(path: str, handle: str, to: str | None, per_write: bool) -> None:
    """An echo (``to`` None) or a relay to the echo at ``to``: decode every event read, encode
    its reply, write what one read produced in one write (or each reply alone: ``per_write``)."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    Path(handle).write_text("ready")
    async with trio.open_nursery() as nursery:
        while True:
            stream = await listener.accept()
            nursery.start_soon(_connection, stream, to, per_write)


async def _pump(src: trio.abc.Stream, dst: trio.abc.Stream, per_write: bool) -> None:
    unpacker = msgpack.Unpacker(raw=False)
    while True:
        data = await src.receive_some(RECV_CHUNK)
        if not data:
            return
        unpacker.feed(data)
        if per_write:
            for obj in unpacker:
                await dst.send_all(msgpack.packb(obj))
        else:
            out = [msgpack.packb(obj) for obj in unpacker]
            if out:
                await dst.send_all(b"".join(out))


async def _connection(stream: trio.abc.Stream, to: str | None, per_write: bool) -> None:
    async with stream:
        if to is None:
            await _pump(stream, stream, per_write)
            return
        upstream = await trio.open_unix_socket(to)
        async with upstream, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, upstream, stream, per_write)
            await _pump(stream, upstream, per_write)
            nursery.cancel_scope.cancel()


@dataclass
class Ceiling:
    """Events per second through one and two hops, batched, one per write, and strict."""

    one_batched: float
    one_per_write: float
    one_strict: float
    two_batched: float
    two_per_write: float
    two_strict: float

    def rows(self) -> list[tuple[str, float]]:
        return [
            ("1 hop, batched", self.one_batched),
            ("1 hop, one event per write", self.one_per_write),
            ("1 hop, strict round trip", self.one_strict),
            ("2 hops, batched", self.two_batched),
            ("2 hops, one event per write", self.two_per_write),
            ("2 hops, strict round trip", self.two_strict),
        ]


async def _pipelined(path: str, n: int, batch: int) -> float:
    stream = await trio.open_unix_socket(path)
    event = msgpack.packb(EVENT)
    async with stream:

        async def reader() -> None:
            unpacker = msgpack.Unpacker(raw=False)
            got = 0
            while got < n:
                unpacker.feed(await stream.receive_some(RECV_CHUNK))
                got += sum(1 for _ in unpacker)

        t = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for i in range(0, n, batch):
                await stream.send_all(event * min(batch, n - i))
        return n / (time.perf_counter() - t)


async def _strict(path: str, n: int) -> float:
    stream = await trio.open_unix_socket(path)
    event = msgpack.packb(EVENT)
    unpacker = msgpack.Unpacker(raw=False)
    async with stream:
        t = time.perf_counter()
        for _ in range(n):
            await stream.send_all(event)
            while True:
                unpacker.feed(await stream.receive_some(RECV_CHUNK))
                if next(unpacker, None) is not None:
                    break
        return n / (time.perf_counter() - t)


def _start(args: list[str], handle: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, __file__, *args])
    deadline = time.monotonic() + 10
    while not os.path.exists(handle):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{' '.join(args)} did not start")
        time.sleep(0.01)
    return proc


def measure(events: int = 200_000, strict: int = 5_000) -> Ceiling:
    """Start an echo and a relay (each twice: coalescing and one reply per write) as processes,
    and time them from this one."""
    with tempfile.TemporaryDirectory(prefix="thpsplit-ceiling-") as d:
        procs = []
        paths = {}
        try:
            for per_write in (False, True):
                tag = "w" if per_write else "b"
                echo, relay = f"{d}/echo{tag}", f"{d}/relay{tag}"
                flag = ["--per-write"] if per_write else []
                procs.append(_start(["--serve", echo, *flag], echo + ".ready"))
                procs.append(_start(["--serve", relay, "--to", echo, *flag], relay + ".ready"))
                paths[tag] = (echo, relay)

            async def run() -> Ceiling:
                (echo_b, relay_b), (echo_w, relay_w) = paths["b"], paths["w"]
                return Ceiling(
                    one_batched=await _pipelined(echo_b, events, BATCH),
                    one_per_write=await _pipelined(echo_w, events // 4, 1),
                    one_strict=await _strict(echo_b, strict),
                    two_batched=await _pipelined(relay_b, events, BATCH),
                    two_per_write=await _pipelined(relay_w, events // 4, 1),
                    two_strict=await _strict(relay_b, strict),
                )

            return trio.run(run)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events per pipelined figure")
    parser.add_argument("--strict", type=int, default=5_000, help="round trips per strict figure")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--to", help=argparse.SUPPRESS)
    parser.add_argument("--per-write", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(_serve, args.serve, args.serve + ".ready", args.to, args.per_write)
        return
    print(f"python {sys.version.split()[0]}, trio {trio.__version__}, msgpack {msgpack.version}")
    for name, value in measure(args.events, args.strict).rows():
        print(f"{name + ':':<32}{value:>12,.0f} events/s")


if __name__ == "__main__":
    main()
