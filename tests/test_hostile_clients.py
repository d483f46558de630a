"""Hostile clients against one daemon's shell, in-process on trio's virtual clock (autojump): a
sender of one byte a second, connections that never send, a client that sends without reading
its replies (issue 13, "Hostile input"). Each is dealt with on its own connection (served while it
keeps within the limits, else closed with an error) while another client is served at once, and
what the daemon holds for it stays bounded. The code is the daemons' own (Server, Channel,
serve_client around a real collapser); tests/test_connection_limits.py does the same with real
processes in real time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from helpers import next_message, raw_hello

from collapsed.daemon import ACCEPTS, Collapsed
from shared.knobs import Knobs
from shared.protocol import messages as m
from shared.protocol.framing import FrameDecoder, encode_message
from shared.shell.channel import QUEUE_DEPTH
from shared.shell.config import HELLO_TIMEOUT_S, IDLE_TIMEOUT_S, Limits
from shared.shell.requests import MAX_PENDING_PER_CLIENT
from shared.shell.server import Server


@asynccontextmanager
async def daemon(limits: Limits | None = None) -> AsyncIterator[SimpleNamespace]:
    """collapsed's shell (default limits unless given), and ``connect()`` for a client's stream.
    ``lockstep``: a stream whose sends complete only as the other side reads (no socket buffer
    in between, so backpressure shows at once)."""
    c = Collapsed(Knobs())
    server = Server(c.driver, c.link, ACCEPTS, c.handlers, limits=limits or Limits())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.driver.run_clock)

        def connect(lockstep: bool = False) -> trio.abc.Stream:
            pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
            ours, theirs = pair()
            nursery.start_soon(server._connection, ours)
            return theirs

        yield SimpleNamespace(collapsed=c, server=server, connect=connect)
        nursery.cancel_scope.cancel()


async def served_at_once(d: SimpleNamespace, name: str) -> None:
    """A new client's request is answered with no virtual time passing."""
    stream = d.connect()
    decoder, _, _ = await raw_hello(stream)
    start = trio.current_time()
    await stream.send_all(encode_message(m.FileCreate(1, name, 8192)))
    reply = await next_message(stream, decoder)
    assert isinstance(reply, m.FileCreate.REPLY) and reply.result["name"] == name
    assert trio.current_time() == start
    await stream.aclose()


async def test_one_byte_a_second_is_served_while_each_frame_completes_in_time(autojump_clock):
    read_timeout = 60.0  # --read-timeout 60: a frame of up to 60 bytes gets through at this pace
    async with daemon(Limits(read_timeout_s=read_timeout)) as d:
        slow = d.connect()
        decoder, _, _ = await raw_hello(slow)
        short = encode_message(m.Status(1))
        assert len(short) < read_timeout
        for byte in short:
            await slow.send_all(bytes([byte]))
            await trio.sleep(1)
        reply = await next_message(slow, decoder)
        assert isinstance(reply, m.Status.REPLY) and reply.id == 1
        # A longer frame at the same pace is cut off read_timeout after its first byte, while
        # another client is served at once.
        long = encode_message(m.FileCreate(2, "x" * 100, 4096))
        began = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def trickle() -> None:
                for byte in long:
                    try:
                        await slow.send_all(bytes([byte]))
                    except trio.BrokenResourceError:
                        return  # closed on us
                    await trio.sleep(1)

            nursery.start_soon(trickle)
            await trio.sleep(30.5)
            await served_at_once(d, "other")
            reply = await next_message(slow, decoder)
            nursery.cancel_scope.cancel()
        assert isinstance(reply, m.ErrorReply) and reply.errno == "ETIMEDOUT" and "incomplete" in reply.message
        assert trio.current_time() - began == pytest.approx(read_timeout, abs=1)
        assert "x" * 100 not in d.collapsed.core.by_name
        assert d.server.budget.used == 0


async def test_connections_that_never_send_are_closed_at_their_timeouts(autojump_clock):
    async with daemon() as d:
        silent = [d.connect() for _ in range(50)]  # never a byte, not even a hello
        idle = d.connect()
        decoder, _, _ = await raw_hello(idle)  # a client that says hello, then nothing
        await trio.sleep(HELLO_TIMEOUT_S / 2)
        assert d.server.in_hello == 50
        await served_at_once(d, "meanwhile")
        for stream in silent:
            decoder = FrameDecoder()
            assert isinstance(await next_message(stream, decoder), m.PeerHello)  # the daemon's
            reply = await next_message(stream, decoder)
            assert isinstance(reply, m.ErrorReply) and reply.errno == "ETIMEDOUT"
            assert await next_message(stream, decoder) is None
        assert trio.current_time() == pytest.approx(HELLO_TIMEOUT_S)
        assert d.server.in_hello == 0
        reply = await next_message(idle, decoder)
        assert isinstance(reply, m.ErrorReply) and reply.errno == "ETIMEDOUT"
        assert trio.current_time() == pytest.approx(IDLE_TIMEOUT_S)
        assert d.collapsed.driver.clients == 0


async def test_a_client_that_never_reads_its_replies_is_held_back_and_loses_nothing(autojump_clock):
    """Replies it does not read fill its stream, then its reply queue, then its requests in
    flight; then the daemon stops reading from it, so its sends block: what the daemon holds for
    it is bounded whatever it sends. Other clients are served meanwhile; once it reads, every
    reply comes, once, in order."""
    total = 5000
    async with daemon() as d:
        greedy = d.connect(lockstep=True)
        decoder, _, _ = await raw_hello(greedy)
        sent = 0

        async def send_all_requests() -> None:
            nonlocal sent
            for i in range(1, total + 1):
                await greedy.send_all(encode_message(m.FileLs(i)))
                sent = i

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all_requests)
            await trio.sleep(60)
            # The daemon took what its queues hold: replies waiting to be sent, requests in
            # flight, requests queued behind them, and a few frames in hand.
            held = sent
            assert MAX_PENDING_PER_CLIENT < held <= 2 * MAX_PENDING_PER_CLIENT + QUEUE_DEPTH + 8
            await served_at_once(d, "other")
            assert sent == held  # still held back
            ids = []
            while len(ids) < total:
                reply = await next_message(greedy, decoder)
                assert isinstance(reply, m.FileLs.REPLY)
                ids.append(reply.id)
        assert ids == list(range(1, total + 1))
        await trio.testing.wait_all_tasks_blocked()  # the last reply's sender returns from its write
        assert d.collapsed.driver.active_requests == 0
