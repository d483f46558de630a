"""shared.shell.channel over in-memory streams: ordering, hello, limits, errors, backpressure, close."""

from __future__ import annotations

import struct

import msgpack
import pytest
import trio
import trio.testing

from shared.protocol import messages as m
from shared.protocol.framing import MAX_FRAME_BYTES, FrameDecoder, encode_frame, encode_message
from shared.shell.channel import (
    HELLO_TIMEOUT_S,
    PROTOCOL_VERSION,
    ChannelError,
    open_channel,
)


async def test_messages_arrive_in_order_both_ways_after_hello():
    left, right = trio.testing.memory_stream_pair()
    async with open_channel(left) as a, open_channel(right) as b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.handshake, "remapd", {"collapsed"})
            hello = await b.handshake("collapsed", {"remapd"})
        assert hello == m.PeerHello("remapd", PROTOCOL_VERSION)
        assert a.hello == m.PeerHello("collapsed", PROTOCOL_VERSION)
        sent = [m.RmapDelta(((100 + i, 1, 0, 0),)) for i in range(200)] + [m.Mmap(7, 1, None, 4096, "f")]
        for msg in sent:
            await a.send(msg)
        got = [await b.receive() for _ in sent]
        assert got == sent
        await b.send(m.Mmap.REPLY(7, {"addr": 0x7F0000000000, "length": 4096}))
        assert await a.receive() == m.Mmap.REPLY(7, {"addr": 0x7F0000000000, "length": 4096})


async def test_hello_times_out_when_the_other_side_is_silent(autojump_clock):
    left, _silent = trio.testing.memory_stream_pair()
    async with open_channel(left) as a:
        start = trio.current_time()
        with pytest.raises(ChannelError) as info:
            await a.handshake("client")
    assert info.value.errno == "ETIMEDOUT"
    assert trio.current_time() - start == pytest.approx(HELLO_TIMEOUT_S)


@pytest.mark.parametrize(
    ("first", "errno", "reply_to"),
    [
        (m.FileLs(9), "EPROTO", 9),  # a request before the hello
        (m.PeerHello("client", PROTOCOL_VERSION + 1), "EPROTONOSUPPORT", 0),
        (m.PeerHello("intruder", PROTOCOL_VERSION), "EPERM", 0),
    ],
)
async def test_a_bad_hello_is_refused(first, errno, reply_to):
    left, raw = trio.testing.memory_stream_pair()
    async with open_channel(left) as a:
        await raw.send_all(encode_message(first))
        with pytest.raises(ChannelError) as info:
            await a.handshake("collapsed", {"client", "remapd"})
    assert (info.value.errno, info.value.reply_to) == (errno, reply_to)
    assert info.value.reply() == m.ErrorReply(reply_to, errno, info.value.reason)


async def test_oversized_frame_is_an_error_after_the_good_messages_before_it():
    left, raw = trio.testing.memory_stream_pair()
    async with open_channel(left) as a:
        await raw.send_all(encode_message(m.FileLs(1)) + struct.pack(">I", MAX_FRAME_BYTES + 1) + b"x" * 64)
        assert await a.receive() == m.FileLs(1)
        with pytest.raises(ChannelError) as info:
            await a.receive()
        assert "exceeds the limit" in info.value.reason
        # The reader stopped at the bad frame: nothing more comes out of this channel.
        with pytest.raises(trio.ClosedResourceError):
            await a.receive()


async def test_an_invalid_message_names_the_request_it_came_in():
    left, raw = trio.testing.memory_stream_pair()
    async with open_channel(left) as a:
        await raw.send_all(encode_frame(["client.no_such_thing", {"id": 42}]))
        await raw.send_all(encode_frame(["client.fault", {"id": 43, "pid": "one", "addr": 0}]))
        with pytest.raises(ChannelError) as info:
            await a.receive()
    assert info.value.reply_to == 42
    assert info.value.errno == "EPROTO"
    assert "unknown message tag" in info.value.reason


async def test_undecodable_body_and_nesting_beyond_the_limit_are_errors():
    for body in (b"\xc1", msgpack.packb([[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]])):
        left, raw = trio.testing.memory_stream_pair()
        async with open_channel(left) as a:
            await raw.send_all(struct.pack(">I", len(body)) + body)
            with pytest.raises(ChannelError) as info:
                await a.receive()
        assert info.value.errno == "EPROTO"


async def test_end_of_stream_ends_iteration():
    left, raw = trio.testing.memory_stream_pair()
    async with open_channel(left) as a:
        await raw.send_all(encode_message(m.Sync(1)) + encode_message(m.Sync(2)))
        await raw.send_eof()
        assert [msg async for msg in a] == [m.Sync(1), m.Sync(2)]


async def test_a_frame_split_across_reads_is_reassembled():
    left, raw = trio.testing.memory_stream_pair()
    data = encode_message(m.Touch(5, 1, 0x7F0000000000, 4 << 20))
    async with open_channel(left) as a:
        for i in range(len(data)):
            await raw.send_all(data[i : i + 1])
        assert await a.receive() == m.Touch(5, 1, 0x7F0000000000, 4 << 20)


async def test_unencodable_message_raises_at_the_sender_and_queues_nothing():
    left, raw = trio.testing.memory_stream_pair()
    async with open_channel(left) as a:
        with pytest.raises(OverflowError):
            await a.send(m.Fault(1, 1 << 70, 0))  # a pid beyond what msgpack holds
        await a.send(m.Sync(2))
        decoder = FrameDecoder()
        decoder.feed(await raw.receive_some())
        assert decoder.next_message() == m.Sync(2)


async def test_a_reader_that_does_not_read_makes_the_sender_wait():
    left, right = trio.testing.lockstep_stream_pair()
    depth = 4
    sent = 0
    async with open_channel(left, queue_depth=depth) as a:

        async def flood() -> None:
            nonlocal sent
            for i in range(100):
                await a.send(m.Sync(i + 1))
                sent += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            await trio.testing.wait_all_tasks_blocked()
            # The queue holds ``depth`` frames and the writer one batch it cannot write.
            assert depth <= sent <= 2 * depth + 1
            stalled = sent
            await trio.testing.wait_all_tasks_blocked()
            assert sent == stalled
            decoder = FrameDecoder()
            got = []
            while len(got) < 100:
                decoder.feed(await right.receive_some())
                while (msg := decoder.next_message()) is not None:
                    got.append(msg)
        assert got == [m.Sync(i + 1) for i in range(100)]


async def test_closing_flushes_what_was_queued():
    left, raw = trio.testing.memory_stream_pair()
    async with open_channel(left) as a:
        await a.send(m.ErrorReply(0, "EPROTO", "bye"))
    decoder = FrameDecoder()
    while (data := await raw.receive_some()) != b"":
        decoder.feed(data)
    assert decoder.next_message() == m.ErrorReply(0, "EPROTO", "bye")


async def test_sending_after_the_peer_vanished_fails_instead_of_hanging():
    left, right = trio.testing.memory_stream_pair()
    async with open_channel(left, queue_depth=1) as a:
        await right.aclose()
        with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
            for i in range(10):
                await a.send(m.Sync(i + 1))
                await trio.testing.wait_all_tasks_blocked()
