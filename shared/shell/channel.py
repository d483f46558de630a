"""A framed message stream over a trio Stream: the one transport of the peer and client protocols.

:meth:`Channel.receive` reads the stream in the receiving task and splits the bytes into frames
and messages (:mod:`shared.protocol.framing`, whose limits bound every frame an untrusted peer sends); a
writer task puts queued frames on the wire from a bounded trio memory channel. A slow receiver
stops reading (TCP backpressure) and a flooding sender waits on the bounded queue: neither grows
memory.

A protocol error (a bad frame, an unknown message, a wrong first message) is delivered in stream
order, after every good message before it, as a :class:`ChannelError` raised from
:meth:`Channel.receive`; nothing more is read. So is a frame left incomplete for longer than the
channel's ``read_timeout`` (ETIMEDOUT: a stalled or trickling sender), or one that would take the
daemon's shared :class:`ReadBudget` for partly received frames beyond its limit (ENOBUFS). Until
its hello is done a channel takes frames of at most :data:`HELLO_FRAME_BYTES`. The owner answers with an ``ErrorReply`` and
closes: leaving the ``async with`` flushes what is queued (for at most :data:`CLOSE_TIMEOUT_S`)
and closes the stream.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio

from shared.clip import MAX_ERROR_CHARS, clip, quote
from shared.protocol.codec import ProtocolError, from_wire
from shared.protocol.framing import MAX_FRAME_BYTES, FrameDecoder, encode_message
from shared.protocol.messages import ErrorReply, PeerAuth, PeerHello
from shared.protocol.schema import PROTOCOL_VERSION, Message
from shared.shell import config
from shared.shell.auth import (
    ACCEPT,
    CONNECT,
    NONCE_HEX,
    PROOF_HEX,
    Secrets,
    is_hex,
    new_nonce,
    proof,
    proof_matches,
    secret_hint,
)

# Bytes asked of the stream per read.
RECV_CHUNK = 64 * 1024
# Messages buffered in each direction before the other side waits.
QUEUE_DEPTH = 64
# Frames coalesced into one write when several are queued.
WRITE_BATCH_BYTES = 256 * 1024
# How long the other side has to send its hello (a daemon's --hello-timeout).
HELLO_TIMEOUT_S = config.HELLO_TIMEOUT_S
# The largest frame taken before the hello is done: hellos and proofs are a few hundred bytes.
HELLO_FRAME_BYTES = 4096
# How long closing waits for queued frames to reach the stream.
CLOSE_TIMEOUT_S = 1.0
# A lingering close (a daemon closing a connection the other side has not closed): how long, and
# how many bytes, it reads and drops after its last frame, so that unread bytes do not make the
# kernel reset the connection before the other side has read that frame (an error reply).
LINGER_S = 0.5
LINGER_BYTES = 2 * MAX_FRAME_BYTES


class ChannelError(Exception):
    """The other side broke the protocol. ``errno`` names the failure as the kernel would;
    ``reply_to`` is the id of the offending request when it could be read, else 0."""

    def __init__(self, reason: str, errno: str = "EPROTO", reply_to: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.errno = errno
        self.reply_to = reply_to

    def reply(self) -> ErrorReply:
        return ErrorReply(self.reply_to, self.errno, self.reason)


def _request_id(obj: Any) -> int:
    """The ``id`` (client request) or ``req`` (peer request) of a decoded but invalid message."""
    if type(obj) is list and len(obj) == 2 and type(obj[1]) is dict:
        for key in ("id", "req"):
            value = obj[1].get(key)
            if type(value) is int and 0 < value < 1 << 63:
                return value
    return 0


class ReadBudget:
    """Bytes of partly received frames that a daemon's connections may hold together."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0


class Channel:
    """Typed messages over a stream. Create with :func:`open_channel`."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        max_frame_bytes: int,
        queue_depth: int,
        read_timeout: float | None = None,
        budget: ReadBudget | None = None,
        linger: bool = False,
    ):
        self.stream = stream
        # A socket is read and written by this channel itself, without trio's stream layer: a
        # write that the socket takes whole is done without a checkpoint (no scheduler pass
        # per message on a round trip's path), and a read that emptied the socket waits for
        # readiness before the next one (no EAGAIN read per message). Other streams (the
        # tests' in-memory ones) go through the Stream interface.
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        # Whether the last read filled its buffer: more may be waiting, so the next read goes
        # ahead at once (after a checkpoint, so a flooding peer cannot starve the others).
        self._read_full = True
        self._linger = linger
        self._eof = False  # the other side closed its end
        self.hello: PeerHello | None = None
        self._max_frame_bytes = max_frame_bytes
        self._decoder = FrameDecoder(max_frame_bytes)
        self._failed = False
        self._out_send, self._out_recv = trio.open_memory_channel[bytes](queue_depth)
        self._writer_done = trio.Event()
        # Whoever writes to the stream holds this: a sender that finds the stream idle and
        # nothing queued writes at once (no task switch on a round trip's path); otherwise its
        # bytes queue behind the others and the writer task coalesces them.
        self._write_lock = trio.Lock()
        # Off during the hello, where both sides send before they read (over a stream without a
        # buffer, two blocking writes would wait for each other); on once the connection's
        # reader runs apart from its senders (serve_client, the peer link).
        self.direct_writes = False
        self._unwritten = 0  # queued chunks not yet written
        self._closed = False
        self._broken = False
        self._read_timeout = read_timeout
        # When the frame now being received began to arrive (None: between frames).
        self._partial_since: float | None = None
        self._budget = budget
        self._charged = 0  # bytes of ours counted in the budget

    # -- sending -------------------------------------------------------------------------------

    async def send(self, msg: Message) -> None:
        """Queue ``msg``; waits while the queue is full.

        Errors:
            ProtocolError: a value the receiver would refuse (a float out of range, an
            unknown enum value); ValueError/TypeError/OverflowError: ``msg`` cannot be encoded
            (too big for a frame, a value msgpack cannot hold); nothing was queued.
            trio.BrokenResourceError: the stream failed; trio.ClosedResourceError: closed.
        """
        await self._send_bytes(encode_message(msg))

    async def send_frames(self, frames: list[bytes]) -> None:
        """Queue frames already encoded (:func:`~shared.protocol.framing.encode_message`) as one
        write; waits while the queue is full. Errors: as :meth:`send` for the stream."""
        await self._send_bytes(b"".join(frames))

    def send_nowait(self, msg: Message) -> bool:
        """Send ``msg`` without waiting: written to the socket at once when the stream is idle
        (what the socket does not take queues for the writer task), else queued. False if the
        queue is full: nothing was sent, the caller awaits :meth:`send`. Errors: as :meth:`send`."""
        return self._send_bytes_nowait(encode_message(msg))

    def send_frames_nowait(self, frames: list[bytes]) -> bool:
        """:meth:`send_frames` without waiting, as :meth:`send_nowait`."""
        return self._send_bytes_nowait(b"".join(frames))

    def _send_bytes_nowait(self, data: bytes) -> bool:
        self._check_open()
        if self.idle():
            data = data[self._write_now(data) :]
            if not data:
                return True
        try:
            self._out_send.send_nowait(data)
        except trio.WouldBlock:
            return False
        self._unwritten += 1
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the channel is closed")
        if self._broken:
            raise trio.BrokenResourceError("the stream failed")

    def idle(self) -> bool:
        """Whether a sender may write to the socket now: nothing queued, no write under way."""
        return self.direct_writes and self._sock is not None and not self._unwritten and not self._write_lock.locked()

    def _write_if_idle(self, data: bytes) -> bytes:
        """What is left of ``data`` once an idle socket has taken what it takes at once: an
        idle channel has nothing queued, so the rest is the next thing to send."""
        return data[self._write_now(data) :] if self.idle() else data

    def _write_now(self, data: bytes) -> int:
        """Write what the socket takes of ``data`` without waiting; the bytes written. On a
        failed stream all of it counts as written: as when the writer task meets the failure,
        this send is lost with the stream and the next ones are refused."""
        assert self._sock is not None
        fd = self._sock.fileno()
        try:
            if fd >= 0:
                return os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError:
            pass
        self._broken = True
        self._out_recv.close()
        return len(data)

    async def _send_bytes(self, data: bytes) -> None:
        self._check_open()
        data = self._write_if_idle(data)
        if not data:
            return
        if self.direct_writes and not self._unwritten:
            # Taken without a checkpoint: no other sender can slip in between the test and the
            # write, so frames go out in the order they were sent.
            try:
                self._write_lock.acquire_nowait()
            except trio.WouldBlock:
                pass
            else:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    # As when the writer task meets it: this send is lost with the stream, the
                    # next ones are refused.
                    self._broken = True
                    self._out_recv.close()
                finally:
                    self._write_lock.release()
                return
        self._unwritten += 1
        try:
            await self._out_send.send(data)
        except BaseException:
            self._unwritten -= 1
            raise

    # -- receiving -----------------------------------------------------------------------------

    async def receive(self) -> Message:
        """The next message.

        Errors:
            trio.EndOfChannel: the other side closed the stream.
            ChannelError: the next frame broke the protocol; nothing more will be received.
        """
        # Read in the receiving task itself: a task switch per message saved on the hot path.
        # The decoder's frame limit bounds what is buffered.
        while True:
            msg = self.receive_nowait()
            if msg is not None:
                return msg
            data = await self._read()
            if not data:
                self._eof = True
                raise trio.EndOfChannel
            budget = self._budget
            if budget is not None and budget.used + len(data) > budget.limit:
                self._fail()
                raise ChannelError(
                    f"the daemon holds its limit of partly received frames ({budget.limit >> 20} MiB) "
                    f"for its connections: try again",
                    "ENOBUFS",
                )
            self._decoder.feed(data)
            if budget is not None:
                self._charge()

    def receive_nowait(self) -> Message | None:
        """The next message if it has already been read from the stream, else None.

        Errors: ChannelError, as :meth:`receive`.
        """
        if self._failed:
            raise trio.ClosedResourceError("the channel stopped at a protocol error")
        obj = None
        try:
            obj = self._decoder.next_wire()
            if obj is None:
                return None
            self._partial_since = None
            if self._budget is not None:
                self._charge()
            return from_wire(obj)
        except ProtocolError as err:
            self._failed = True
            self._charge()
            raise ChannelError(str(err), reply_to=_request_id(obj)) from None

    async def _read(self) -> bytes | bytearray:
        """The next bytes from the stream (b"" at its end), within the read timeout once a frame
        has begun."""
        if self._read_timeout is not None and self._decoder.buffered():
            if self._partial_since is None:
                self._partial_since = trio.current_time()
            with trio.move_on_at(self._partial_since + self._read_timeout):
                return await self._receive_some()
            self._fail()
            raise ChannelError(f"a frame still incomplete {self._read_timeout:g} s after it began", "ETIMEDOUT")
        return await self._receive_some()

    async def _receive_some(self) -> bytes | bytearray:
        sock = self._sock
        if sock is None:
            try:
                return await self.stream.receive_some(RECV_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""
        try:
            if self._read_full:
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.wait_readable(sock)
            while True:
                fd = sock.fileno()
                if fd < 0:
                    return b""
                try:
                    data = os.read(fd, RECV_CHUNK)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                self._read_full = len(data) == RECV_CHUNK
                return data
        except (OSError, trio.ClosedResourceError):
            return b""

    def _charge(self) -> None:
        """Count what the decoder holds now in the shared budget."""
        if self._budget is not None:
            held = self._decoder.buffered()
            self._budget.used += held - self._charged
            self._charged = held

    def _fail(self) -> None:
        self._failed = True
        self._release()

    def _release(self) -> None:
        if self._budget is not None:
            self._budget.used -= self._charged
            self._charged = 0

    def trust(self) -> None:
        """The authenticated peer link: its large frames are neither counted against the shared
        budget nor timed (one connection, and losing it costs a resync)."""
        self._release()
        self._budget = None
        self._read_timeout = None

    def __aiter__(self) -> Channel:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def handshake(
        self,
        role: str,
        accept: Collection[str] | None = None,
        timeout: float = HELLO_TIMEOUT_S,
        *,
        secrets: Secrets | None = None,
        initiator: bool = True,
        admit: Callable[[PeerHello], None] | None = None,
    ) -> PeerHello:
        """Say hello and prove who we are; read the other side's hello and check its proof.

        Both sides send ``PeerHello(role, protocol, nonce)`` first (neither waits on the other),
        then ``PeerAuth(proof)``: the connecting side (``initiator``) right away, the listener
        only once the connecting side's proof checks out. The secret is the one of the
        connecting side's role (:meth:`Secrets.for_role`); a side without it sends an empty
        proof and checks nothing (:mod:`shared.shell.auth`). All within ``timeout``, in frames of
        at most :data:`HELLO_FRAME_BYTES`. A listener's ``admit(their_hello)`` runs once the
        other side has proved itself, before our proof goes out; it may refuse the connection by
        raising ChannelError (EMFILE: too many clients).

        Errors:
            ChannelError: no hello within ``timeout`` (ETIMEDOUT), the first message is not a
            hello (EPROTO), another protocol version (EPROTONOSUPPORT), a role not in ``accept``
            (EPERM), a missing or wrong proof (EACCES); or the other side refused us (its errno).
            trio.EndOfChannel: closed before saying hello.
        """
        nonce = new_nonce()
        await self.send(PeerHello(role, PROTOCOL_VERSION, nonce))
        self._decoder.max_frame_bytes = min(HELLO_FRAME_BYTES, self._max_frame_bytes)
        with trio.move_on_after(timeout):
            theirs = await self._read_hello(nonce, accept)
            connector = role if initiator else theirs.role
            key = secrets.for_role(connector) if secrets is not None else None
            if initiator:
                await self._send_proof(key, CONNECT, role, theirs, nonce)
                await self._check_proof(key, ACCEPT, role, theirs, nonce, connector)
            else:
                await self._check_proof(key, CONNECT, role, theirs, nonce, connector)
                if admit is not None:
                    admit(theirs)
                await self._send_proof(key, ACCEPT, role, theirs, nonce)
            self._decoder.max_frame_bytes = self._max_frame_bytes
            self.hello = theirs
            return theirs
        raise ChannelError(f"no hello within {timeout:g} s", "ETIMEDOUT")

    async def _receive_handshake(self) -> Message:
        msg = await self.receive()
        if isinstance(msg, ErrorReply):
            errno = clip(msg.errno, 32)
            raise ChannelError(f"refused: {errno}: {clip(msg.message, MAX_ERROR_CHARS)}", errno)
        return msg

    async def _read_hello(self, nonce: str, accept: Collection[str] | None) -> PeerHello:
        msg = await self._receive_handshake()
        if not isinstance(msg, PeerHello):
            raise ChannelError(
                f"expected peer.hello first, got {msg.TAG}", reply_to=_request_id([msg.TAG, msg.fields()])
            )
        if msg.protocol != PROTOCOL_VERSION:
            raise ChannelError(
                f"protocol version {msg.protocol} is not supported (this side speaks {PROTOCOL_VERSION})",
                "EPROTONOSUPPORT",
            )
        if accept is not None and msg.role not in accept:
            raise ChannelError(f"role {quote(msg.role)} is not accepted here", "EPERM")
        if not is_hex(msg.nonce, NONCE_HEX) or msg.nonce == nonce:
            raise ChannelError(f"peer.hello: the nonce must be {NONCE_HEX} fresh lowercase hex digits")
        return msg

    async def _send_proof(self, key: bytes | None, direction: str, role: str, theirs: PeerHello, nonce: str) -> None:
        mine = proof(key, direction, role, theirs.role, nonce, theirs.nonce) if key is not None else ""
        await self.send(PeerAuth(mine))

    async def _check_proof(
        self, key: bytes | None, direction: str, role: str, theirs: PeerHello, nonce: str, connector: str
    ) -> None:
        msg = await self._receive_handshake()
        if not isinstance(msg, PeerAuth):
            raise ChannelError(f"expected peer.auth after the hello, got {msg.TAG}")
        if msg.proof and not is_hex(msg.proof, PROOF_HEX):
            raise ChannelError(f"peer.auth: the proof must be empty or {PROOF_HEX} lowercase hex digits")
        if key is None:
            return  # nothing to check it against: the local case (auth.startup_problem)
        if not msg.proof:
            if direction == CONNECT:
                raise ChannelError(
                    f"authentication required: the {quote(connector)} role needs the shared secret "
                    f"({secret_hint(connector)})",
                    "EACCES",
                )
            raise ChannelError(
                f"{quote(theirs.role)} did not prove it knows the secret (it has none set?)", "EACCES"
            )
        expected = proof(key, direction, theirs.role, role, theirs.nonce, nonce)
        if not proof_matches(msg.proof, expected):
            raise ChannelError(f"authentication failed: {quote(theirs.role)} does not know the secret", "EACCES")

    # -- the two tasks -------------------------------------------------------------------------

    async def _writer(self) -> None:
        try:
            async for data in self._out_recv:
                chunks = [data]
                size = len(data)
                while size < WRITE_BATCH_BYTES:
                    try:
                        more = self._out_recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    chunks.append(more)
                    size += len(more)
                async with self._write_lock:
                    await self.stream.send_all(b"".join(chunks))
                self._unwritten -= len(chunks)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # Senders now get BrokenResourceError instead of filling a queue nobody drains.
            self._out_recv.close()
        finally:
            self._writer_done.set()

    async def _close(self) -> None:
        self._release()
        self._closed = True
        self._out_send.close()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await self._writer_done.wait()
            if self._linger and not self._eof:
                await self._drain()
            await trio.aclose_forcefully(self.stream)

    async def _drain(self) -> None:
        await drain(self.stream)


async def drain(stream: trio.abc.Stream) -> None:
    """Half-close ``stream``, then read and drop what the other side still sends until it closes
    too (within LINGER_S and LINGER_BYTES): closing with unread bytes would make the kernel reset
    the connection, and the other side could lose the last frame we sent it."""
    try:
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        with trio.move_on_after(LINGER_S):
            dropped = 0
            while dropped < LINGER_BYTES:
                data = await stream.receive_some(RECV_CHUNK)
                if not data:
                    break
                dropped += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
        pass


@contextmanager
def unwrap_single() -> Iterator[None]:
    """Re-raise a lone exception out of a nursery's group, so an ``async with`` that runs
    background tasks around its body raises what the body raised."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


@asynccontextmanager
async def open_channel(
    stream: trio.abc.Stream,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    queue_depth: int = QUEUE_DEPTH,
    read_timeout: float | None = None,
    budget: ReadBudget | None = None,
    linger: bool = False,
) -> AsyncIterator[Channel]:
    """Run a :class:`Channel` over ``stream`` for the duration of the block; the stream is closed
    when the block ends (after queued frames are flushed, within :data:`CLOSE_TIMEOUT_S`).
    ``read_timeout``: how long a begun frame may take to arrive in full (None: as long as it
    takes); ``budget``: the shared bound on partly received frames this channel counts against;
    ``linger``: close gracefully when the other side has not closed (a daemon's connections)."""
    channel = Channel(stream, max_frame_bytes, queue_depth, read_timeout, budget, linger)
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel._writer)
            try:
                yield channel
            finally:
                await channel._close()
                nursery.cancel_scope.cancel()


__all__ = [
    "CLOSE_TIMEOUT_S",
    "HELLO_FRAME_BYTES",
    "HELLO_TIMEOUT_S",
    "PROTOCOL_VERSION",
    "QUEUE_DEPTH",
    "Channel",
    "ChannelError",
    "ReadBudget",
    "open_channel",
    "unwrap_single",
]


async def send_quietly(ch: Channel, msg: Message) -> None:
    """Send ``msg`` unless the other side has already gone (a last error reply, a refusal)."""
    try:
        await ch.send(msg)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
