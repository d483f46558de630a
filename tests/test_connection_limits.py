"""Bounded connections (issue 14 item 8, issue 13 "Hostile input"), with real daemon processes: a
client limit, the hello, idle and read timeouts, and a bound on partly received frames, so idle
or slow connections and floods of bad frames neither block new clients nor grow memory."""

from __future__ import annotations

import struct
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from helpers import ONE_PAGE_FLAGS, next_message, raw_hello

from shared.errors import UserError
from shared.protocol import messages as m
from shared.protocol.framing import (
    MAX_FRAME_BYTES,
    FrameDecoder,
    encode_frame,
    encode_message,
)
from shared.shell.auth import Secrets
from shared.shell.config import MAX_BUFFERED_BYTES, parse_address
from shared.shell.transport import connect
from shared.thpctl.client import COLLAPSED, ConnectError, open_client
from shared.thpctl.launch import running_daemons

MB = 1 << 20
NO_SECRETS = Secrets()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def status_within(address: str, daemon: str, seconds: float) -> dict:
    """A new client's status, which must come within ``seconds``."""
    with trio.fail_after(seconds):
        async with open_client(address, daemon, NO_SECRETS) as c:
            return await c.call(m.Status)


async def test_clients_beyond_the_limit_get_emfile_and_the_peer_is_not_counted(workdir):
    async with running_daemons(workdir, collapsed_args=["--max-clients", "3"], remapd_args=ONE_PAGE_FLAGS) as d:
        async with AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(open_client(d.collapsed.address, COLLAPSED, NO_SECRETS))
                for _ in range(3)
            ]
            with pytest.raises(ConnectError) as info:
                async with open_client(d.collapsed.address, COLLAPSED, NO_SECRETS):
                    pass
            assert info.value.errno_name == "EMFILE" and "at most 3 clients" in info.value.message
            with trio.fail_after(20):
                await clients[0].call(m.Sync)  # answered once remapd is connected
            for client in clients:
                status = await client.call(m.Status)
                # remapd, the peer, holds its own slot: 3 clients and the peer.
                assert (status["clients"], status["peer"]) == (3, True)
        # Once the daemon has seen them close: room again.
        with trio.fail_after(5):
            while True:
                try:
                    status = await status_within(d.collapsed.address, COLLAPSED, 5)
                    break
                except ConnectError as err:
                    assert err.errno_name == "EMFILE"
                    await trio.sleep(0.01)
        assert status["clients"] == 1
    assert (d.collapsed.proc.returncode, d.remapd.proc.returncode) == (0, 0)


async def test_a_connection_that_never_says_hello_is_closed(workdir):
    async with running_daemons(workdir, remapd_args=["--hello-timeout", "0.5"]) as d:
        stream = await connect(parse_address(d.remapd.address))
        decoder = FrameDecoder()
        with trio.fail_after(5):
            assert isinstance(await next_message(stream, decoder), m.PeerHello)
            reply = await next_message(stream, decoder)
            assert isinstance(reply, m.ErrorReply) and reply.errno == "ETIMEDOUT"
            assert await next_message(stream, decoder) is None
        await stream.aclose()


async def test_an_idle_client_is_closed_and_a_waiting_one_is_not(workdir):
    args = ["--idle-timeout", "0.5"]
    async with (
        running_daemons(workdir, collapsed_args=args, remapd_args=ONE_PAGE_FLAGS) as d,
        AsyncExitStack() as stack,
    ):
        waiting = await stack.enter_async_context(open_client(d.collapsed.address, COLLAPSED, NO_SECRETS))
        scans = await waiting.start(m.WaitScans, n=10**6)  # in flight for good: not idle
        async with open_client(d.collapsed.address, COLLAPSED, NO_SECRETS) as idle:
            await idle.call(m.Status)
            await trio.sleep(1.5)
            with pytest.raises(UserError) as info:
                await idle.call(m.Status)
            assert info.value.errno_name == "ETIMEDOUT" and "no request for 0.5 s" in info.value.message
        # The waiting client's connection is still there (its wait-scans still pending):
        # a new client sees it and itself.
        with trio.move_on_after(0.1) as still_waiting:
            await scans.result()
        assert still_waiting.cancelled_caught
        assert (await status_within(d.collapsed.address, COLLAPSED, 5))["clients"] == 2
    log = (workdir / "collapsed.log").read_text()
    assert '"client_idle"' in log


async def test_a_frame_left_incomplete_is_closed_after_the_read_timeout(workdir):
    async with running_daemons(workdir, collapsed_args=["--read-timeout", "0.5"]) as d:
        stream = await connect(parse_address(d.collapsed.address))
        decoder, _, _ = await raw_hello(stream)
        frame = encode_frame(["client.file_create", {"id": 1, "name": "x" * 100_000, "size": 4096}])
        await stream.send_all(frame[: len(frame) // 2])
        with trio.fail_after(5):
            reply = await next_message(stream, decoder)
            assert isinstance(reply, m.ErrorReply) and reply.errno == "ETIMEDOUT" and "incomplete" in reply.message
            assert await next_message(stream, decoder) is None
        await stream.aclose()
        # One byte a second is no better: the frame must be complete within the timeout.
        stream = await connect(parse_address(d.collapsed.address))
        decoder, _, _ = await raw_hello(stream)
        with trio.fail_after(5):
            for byte in frame[:8]:
                try:
                    await stream.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    break  # closed on us, as it should
                await trio.sleep(0.2)
            reply = await next_message(stream, decoder)
            assert isinstance(reply, m.ErrorReply) and reply.errno == "ETIMEDOUT"
        await stream.aclose()
        assert (await status_within(d.collapsed.address, COLLAPSED, 5))["daemon"] == "collapsed"


async def open_raw(address: str):
    return await connect(parse_address(address))


async def test_floods_of_idle_connections_bad_frames_and_partial_frames_leave_memory_bounded(workdir):
    args = ["--hello-timeout", "60", "--read-timeout", "3"]
    async with running_daemons(workdir, collapsed_args=args, remapd_args=ONE_PAGE_FLAGS) as d:
        pid = d.collapsed.proc.pid
        address = d.collapsed.address
        await status_within(address, COLLAPSED, 5)
        before = rss_kb(pid)
        # 200 connections that never say hello stay open meanwhile.
        idle = [await open_raw(address) for _ in range(200)]
        # 1000 bad frames, 40 connections at a time: each answered with an error and closed.
        bad = [
            struct.pack(">I", 0xFFFFFFF0) + b"\0" * 16,  # a header announcing 4 GiB
            struct.pack(">I", 1) + b"\xc1",  # not msgpack
            b"GET / HTTP/1.1\r\n\r\n",  # not even a frame
            struct.pack(">I", 100_000) + b"\x92" + b"\0" * 99_999,  # a big frame before the hello
        ]
        errors: dict[str, int] = {}

        async def one_bad(i: int) -> None:
            stream = await open_raw(address)
            await stream.send_all(bad[i % len(bad)])
            decoder = FrameDecoder()
            while (msg := await next_message(stream, decoder)) is not None:
                if isinstance(msg, m.ErrorReply):
                    errors[msg.errno] = errors.get(msg.errno, 0) + 1
            await stream.aclose()

        with trio.fail_after(60):
            for batch in range(0, 1000, 40):
                async with trio.open_nursery() as nursery:
                    for i in range(batch, batch + 40):
                        nursery.start_soon(one_bad, i)
        assert sum(errors.values()) == 1000 and set(errors) == {"EPROTO"}
        # A new client is served at once all the same.
        assert (await status_within(address, COLLAPSED, 2))["daemon"] == "collapsed"
        after_bad = rss_kb(pid)

        # 30 clients each leave 3 MiB of a 4 MiB frame hanging: 90 MiB offered, the daemon holds
        # at most MAX_BUFFERED_BYTES of it and turns the rest away (ENOBUFS).
        partial = []
        for _ in range(30):
            stream = await open_raw(address)
            decoder, _, _ = await raw_hello(stream)
            await stream.send_all(struct.pack(">I", MAX_FRAME_BYTES - 1) + b"\x00" * (3 * MB))
            partial.append((stream, decoder))
        await trio.sleep(0.5)
        held = rss_kb(pid)
        assert (await status_within(address, COLLAPSED, 2))["daemon"] == "collapsed"
        outcomes: dict[str, int] = {}
        with trio.fail_after(20):
            for stream, decoder in partial:
                reply = await next_message(stream, decoder)
                key = reply.errno if isinstance(reply, m.ErrorReply) else "closed"
                outcomes[key] = outcomes.get(key, 0) + 1
                await stream.aclose()
        # Those held were closed by the read timeout; the rest were refused at once.
        assert outcomes.get("ENOBUFS", 0) >= 30 - MAX_BUFFERED_BYTES // (3 * MB)
        assert outcomes.get("ETIMEDOUT", 0) >= 10 and sum(outcomes.values()) == 30
        for stream in idle:
            await stream.aclose()
        await trio.sleep(0.5)
        after = rss_kb(pid)
        assert (await status_within(address, COLLAPSED, 2))["clients"] == 1
    print(f"collapsed RSS kB: before {before}, after 1000 bad frames and 200 idle {after_bad}, "
          f"holding partial frames {held}, after {after}; outcomes {outcomes}")
    assert after_bad - before < 16 * 1024
    assert held - before < (MAX_BUFFERED_BYTES >> 10) * 2 + 32 * 1024
    assert after - before < 48 * 1024
    assert (d.collapsed.proc.returncode, d.remapd.proc.returncode) == (0, 0)


# Frames a daemon refuses, each on its own (EPROTO; the connection closed): oversized, not
# msgpack, not a frame, deeply nested, wrong-typed, an unknown tag, random bytes.
BAD_FRAMES = (
    struct.pack(">I", 0xFFFFFFF0) + b"\0" * 16,
    struct.pack(">I", 1) + b"\xc1",
    b"GET / HTTP/1.1\r\n\r\n",
    struct.pack(">I", 201) + b"\x91" * 200 + b"\xc0",  # 200 arrays deep
    encode_frame(["client.file_create", {"id": "one", "name": 7, "size": -1}]),
    encode_frame(["client.no_such_request", {"id": 1}]),
    bytes(range(7, 250, 3)),
)


async def test_a_flood_of_100k_bad_frames_and_refused_requests_leaves_memory_bounded(workdir):
    """100,000 bad frames on 1,000 connections (half before their hello, half after): each
    connection sends 100 back to back; the daemon answers the first with EPROTO and closes,
    reading and dropping the rest as it lingers, never buffering them. Then 10,000 well-formed
    requests the model refuses, pipelined on 4 connections: each answered once with its errno,
    the connections kept. Other clients are served throughout; RSS before and after."""
    async with running_daemons(workdir, remapd_args=ONE_PAGE_FLAGS) as d:
        pid = d.collapsed.proc.pid
        address = d.collapsed.address
        await status_within(address, COLLAPSED, 5)
        before = rss_kb(pid)
        errors: dict[str, int] = {}

        async def bad(i: int) -> None:
            stream = await open_raw(address)
            decoder = FrameDecoder()
            if i % 2:
                decoder, _, _ = await raw_hello(stream)
            frames = [BAD_FRAMES[(i + k) % len(BAD_FRAMES)] for k in range(100)]
            try:
                await stream.send_all(b"".join(frames))
            except trio.BrokenResourceError:
                pass  # closed on us already
            while (msg := await next_message(stream, decoder)) is not None:
                if isinstance(msg, m.ErrorReply):
                    errors[msg.errno] = errors.get(msg.errno, 0) + 1
            await stream.aclose()

        with trio.fail_after(120):
            for batch in range(0, 1000, 50):
                async with trio.open_nursery() as nursery:
                    for i in range(batch, batch + 50):
                        nursery.start_soon(bad, i)
                if batch % 250 == 0:
                    assert (await status_within(address, COLLAPSED, 2))["daemon"] == "collapsed"
        assert errors == {"EPROTO": 1000}
        after_bad = rss_kb(pid)
        async with open_client(address, COLLAPSED, NO_SECRETS) as c:
            await c.call(m.FileCreate, name="f", size=4096)

        refused = (
            (lambda i: m.FileTruncate(i, "nosuch", 0), "ENOENT"),
            (lambda i: m.FileCreate(i, "..", 4096), "EINVAL"),
            (lambda i: m.FileWrite(i, "f", (1 << 63) - 1, (1 << 63) - 1), "EINVAL"),  # rw_verify_area
            (lambda i: m.ProcSpawn(i, 1), "EOPNOTSUPP"),  # remapd's, not collapsed's
        )
        per_connection = 2500
        answers: dict[int, str] = {}
        expected: dict[int, str] = {}

        async def refusals(c: int) -> None:
            stream = await open_raw(address)
            decoder, _, _ = await raw_hello(stream)
            ids = range(c * per_connection + 1, (c + 1) * per_connection + 1)
            blob = b""
            for i in ids:
                make, errno = refused[i % len(refused)]
                blob += encode_message(make(i))
                expected[i] = errno
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, blob)
                for _ in ids:
                    reply = await next_message(stream, decoder)
                    assert isinstance(reply, m.ErrorReply) and reply.id not in answers
                    answers[reply.id] = reply.errno
            await stream.aclose()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for c in range(4):
                    nursery.start_soon(refusals, c)
        assert answers == expected
        assert (await status_within(address, COLLAPSED, 2))["clients"] == 1
        await trio.sleep(0.5)
        after = rss_kb(pid)
    print(f"collapsed RSS kB: before {before}, after 100,000 bad frames {after_bad}, after 10,000 refused requests {after}")
    assert after_bad - before < 16 * 1024
    assert after - before < 16 * 1024
    assert (d.collapsed.proc.returncode, d.remapd.proc.returncode) == (0, 0)


def test_limit_flags_are_validated(tmp_path):
    import subprocess
    import sys

    for flag, value in (("--max-clients", "0"), ("--max-clients", "lots"), ("--idle-timeout", "-1"), ("--read-timeout", "nan")):
        run = subprocess.run(
            [sys.executable, "-m", "collapsed", "--listen", f"unix:{tmp_path}/c.sock", flag, value],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and flag in run.stderr, run.stderr
