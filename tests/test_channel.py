"""shared.shell.channel over in-memory streams: ordering, hello, limits, errors, backpressure, close."""

from __future__ import annotations

import struct

import msgpack
import pytest
import trio
import trio.testing

from shared.protocol import messages as m
from shared.protocol.framing import (
    MAX_FRAME_BYTES,
    FrameDecoder,
    encode_frame,
    encode_message,
)
from shared.shell.auth import CONNECT, Secrets, proof
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
            hello = await b.handshake("collapsed", {"remapd"}, initiator=False)
        assert (hello.role, hello.protocol) == ("remapd", PROTOCOL_VERSION)
        assert a.hello is not None and (a.hello.role, a.hello.protocol) == ("collapsed", PROTOCOL_VERSION)
        assert a.hello.nonce != hello.nonce and len(hello.nonce) == 64
        sent = [m.RmapDelta.of(((100 + i, 1, 0, 0),)) for i in range(200)] + [m.Mmap(7, 1, None, 4096, "f")]
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
        (m.PeerHello("client", 2), "EPROTONOSUPPORT", 0),  # version 2 had no nonce
        (m.PeerHello("intruder", PROTOCOL_VERSION, "ab" * 32), "EPERM", 0),
        (m.PeerHello("client", PROTOCOL_VERSION), "EPROTO", 0),  # no challenge
        (m.PeerHello("client", PROTOCOL_VERSION, "AB" * 32), "EPROTO", 0),
    ],
)
async def test_a_bad_hello_is_refused(first, errno, reply_to):
    left, raw = trio.testing.memory_stream_pair()
    async with open_channel(left) as a:
        await raw.send_all(encode_message(first))
        with pytest.raises(ChannelError) as info:
            await a.handshake("collapsed", {"client", "remapd"}, initiator=False)
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
            # The queue holds at most ``depth`` frames and the writer one batch it cannot write
            # (or the sender waits in its own write: the stream was idle when it began).
            assert sent <= 2 * depth + 1
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


# ---- authentication in the hello (issue 8, issue 14 item 6) -------------------------------------

CLIENT_SECRET = b"c" * 32
PEER_SECRET = b"p" * 32
DAEMON = Secrets(CLIENT_SECRET, PEER_SECRET)


async def hello_pair(
    connector_role: str, connector: Secrets | None, listener: Secrets | None
) -> tuple[BaseException | m.PeerHello, BaseException | m.PeerHello]:
    """Both sides' handshakes over a memory stream: each side's hello or error."""
    left, right = trio.testing.memory_stream_pair()
    results: list[BaseException | m.PeerHello] = [RuntimeError("unset"), RuntimeError("unset")]
    async with open_channel(left) as a, open_channel(right) as b:

        async def side(i: int, ch, role: str, accept, secrets, initiator: bool) -> None:
            try:
                results[i] = await ch.handshake(role, accept, secrets=secrets, initiator=initiator)
            except (ChannelError, trio.EndOfChannel) as err:
                results[i] = err
                if isinstance(err, ChannelError):
                    await ch.send(err.reply())
                await ch._close()  # flushes the reply, then closes: the other side is not left waiting

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(side, 0, a, connector_role, {"collapsed"}, connector, True)
                nursery.start_soon(side, 1, b, "collapsed", {"client", "remapd"}, listener, False)
    return results[0], results[1]


@pytest.mark.parametrize("role", ["client", "remapd"])
async def test_both_sides_prove_the_secret_of_the_connecting_role(role):
    mine = Secrets(CLIENT_SECRET) if role == "client" else Secrets(peer=PEER_SECRET)
    ours, theirs = await hello_pair(role, mine, DAEMON)
    assert isinstance(ours, m.PeerHello) and ours.role == "collapsed"
    assert isinstance(theirs, m.PeerHello) and theirs.role == role


@pytest.mark.parametrize(
    ("role", "mine", "reason"),
    [
        ("client", None, "authentication required: the 'client' role needs the shared secret"),
        ("client", Secrets(b"x" * 32), "authentication failed"),
        # A client's secret does not make it the peer: the peer role has its own.
        ("remapd", Secrets(CLIENT_SECRET, None), "authentication required: the 'remapd' role"),
        ("remapd", Secrets(CLIENT_SECRET, CLIENT_SECRET), "authentication failed"),
        ("client", Secrets(PEER_SECRET), "authentication failed"),
    ],
)
async def test_a_wrong_or_missing_proof_is_refused_with_eacces(role, mine, reason):
    ours, theirs = await hello_pair(role, mine, DAEMON)
    assert isinstance(theirs, ChannelError) and theirs.errno == "EACCES" and reason in theirs.reason
    # The connecting side learns why, from the listener's error reply.
    assert isinstance(ours, ChannelError) and ours.errno == "EACCES" and reason in ours.reason


async def test_a_listener_that_cannot_prove_the_secret_is_not_trusted():
    ours, _ = await hello_pair("client", Secrets(CLIENT_SECRET), Secrets())
    assert isinstance(ours, ChannelError) and ours.errno == "EACCES"
    assert "did not prove it knows the secret" in ours.reason
    ours, _ = await hello_pair("client", Secrets(CLIENT_SECRET), Secrets(b"y" * 32, PEER_SECRET))
    assert isinstance(ours, ChannelError) and ours.errno == "EACCES" and "authentication failed" in ours.reason


async def test_without_secrets_on_either_side_the_hello_needs_none():
    ours, theirs = await hello_pair("client", None, Secrets())
    assert isinstance(ours, m.PeerHello) and isinstance(theirs, m.PeerHello)


async def raw_connect(listener_secrets: Secrets, send_hello) -> tuple[list[m.Message], ChannelError | m.PeerHello]:
    """A listener's handshake against a raw connecting side: ``send_hello(listener_nonce)``
    returns the frames to send once the listener's hello is read. Returns what the listener sent
    and how its handshake ended."""
    left, raw = trio.testing.memory_stream_pair()
    outcome: list[ChannelError | m.PeerHello] = []
    got: list[m.Message] = []
    async with open_channel(left) as a:

        async def listener() -> None:
            try:
                outcome.append(await a.handshake("collapsed", {"client"}, secrets=listener_secrets, initiator=False))
            except ChannelError as err:
                outcome.append(err)
                await a.send(err.reply())
            await a._close()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(listener)
                decoder = FrameDecoder()
                while not got:
                    decoder.feed(await raw.receive_some())
                    while (msg := decoder.next_message()) is not None:
                        got.append(msg)
                await raw.send_all(send_hello(got[0].nonce))
                while data := await raw.receive_some():
                    decoder.feed(data)
                    while (msg := decoder.next_message()) is not None:
                        got.append(msg)
    return got, outcome[0]


async def test_a_recorded_proof_is_useless_on_another_connection():
    """A proof answers the listener's fresh nonce: replayed on a new connection it fails. And the
    listener proves itself only after the connecting side did, so there is nothing to reflect."""
    nonce = "12" * 32
    recorded = []

    def honest(listener_nonce: str) -> bytes:
        mine = proof(CLIENT_SECRET, CONNECT, "client", "collapsed", nonce, listener_nonce)
        recorded.append(mine)
        return encode_message(m.PeerHello("client", PROTOCOL_VERSION, nonce)) + encode_message(m.PeerAuth(mine))

    got, outcome = await raw_connect(DAEMON, honest)
    assert isinstance(outcome, m.PeerHello) and isinstance(got[1], m.PeerAuth) and len(got[1].proof) == 64

    def replay(listener_nonce: str) -> bytes:
        return encode_message(m.PeerHello("client", PROTOCOL_VERSION, nonce)) + encode_message(m.PeerAuth(recorded[0]))

    got, outcome = await raw_connect(DAEMON, replay)
    assert isinstance(outcome, ChannelError) and outcome.errno == "EACCES"
    assert "authentication failed" in outcome.reason
    # The listener sent its hello and the refusal, never a proof of its own.
    assert [type(x) for x in got] == [m.PeerHello, m.ErrorReply]


async def test_a_listener_refuses_its_own_nonce_sent_back():
    left, raw = trio.testing.memory_stream_pair()
    async with open_channel(left) as a, trio.open_nursery() as nursery:

        async def echo_nonce() -> None:
            decoder = FrameDecoder()
            while (hello := decoder.next_message()) is None:
                decoder.feed(await raw.receive_some())
            await raw.send_all(encode_message(m.PeerHello("client", PROTOCOL_VERSION, hello.nonce)))

        nursery.start_soon(echo_nonce)
        with pytest.raises(ChannelError) as info:
            await a.handshake("collapsed", {"client"}, secrets=DAEMON, initiator=False)
    assert info.value.errno == "EPROTO" and "nonce" in info.value.reason


async def _socket_channel_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    # A small send buffer: a large frame is more than one write takes.
    a.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4096)
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_over_a_socket_a_write_the_socket_takes_in_part_keeps_its_place():
    """A socket channel writes an idle stream itself, without waiting: what the socket does not
    take of a large frame is queued first, and the frames sent after it, waiting or not, follow
    it in order."""
    left, right = await _socket_channel_pair()
    big = m.ErrorReply(1, "EIO", "x" * 300_000)
    sent = [big, m.Sync(2), big, m.Sync(3)]
    async with open_channel(left) as a, open_channel(right) as b:
        a.direct_writes = True
        assert a.send_nowait(sent[0])
        assert not a.idle()  # the rest of the first frame waits for the writer task
        assert a.send_nowait(sent[1])
        await a.send(sent[2])
        assert a.send_nowait(sent[3])
        got = [await b.receive() for _ in sent]
        assert got == sent
        with trio.fail_after(5):
            while not a.idle():
                await trio.sleep(0.001)
        assert a.send_nowait(m.Sync(4))  # idle again: written at once
        assert a.idle()
        assert await b.receive() == m.Sync(4)


async def test_over_a_socket_the_end_of_the_stream_and_a_closed_peer_are_seen():
    left, right = await _socket_channel_pair()
    async with open_channel(left) as a:
        a.direct_writes = True
        async with open_channel(right) as b:
            await a.send(m.Sync(1))
            assert await b.receive() == m.Sync(1)
        with pytest.raises(trio.EndOfChannel):
            await a.receive()
        # The write that meets the closed socket is lost with it, as the writer task's would
        # be; the ones after it are refused.
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(3):
                a.send_nowait(m.Sync(2))
