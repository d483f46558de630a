"""The async client library: what ``thpctl`` and the tests use to talk to the daemons.

:func:`open_client` is one connection to one daemon; :class:`Session` holds a connection to each
(opened on first use) and sends every request to the daemon that serves it::

    async with Session(collapsed="unix:/run/user/1000/thpsplit/collapsed.sock") as s:
        await s.call(m.FileCreate, name="libfoo.so", size=4 << 20)
        addr = (await s.call(m.Mmap, pid=1, addr=None, length=4 << 20, name="libfoo.so"))["addr"]

Requests are pipelined: :meth:`Client.start` sends at once and returns a :class:`Pending` to await
later; a daemon runs one connection's requests in the order sent. A daemon's reply comes only
after the other daemon has seen the request's effects, so awaiting a reply before talking to the
other daemon is all the ordering a client needs.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any, Self, TypeVar

import trio

from shared.clip import MAX_ERROR_CHARS, clip
from shared.errors import UserError
from shared.protocol import messages as m
from shared.protocol.codec import ProtocolError
from shared.protocol.schema import CLIENT, COLLAPSED, REMAPD, Reply, Request, routes
from shared.shell.auth import Secrets, load_secrets
from shared.shell.channel import Channel, ChannelError, open_channel, unwrap_single
from shared.shell.config import AddressError, default_address, parse_address
from shared.shell.transport import connect

R = TypeVar("R")

# Replies of a stream (thpctl trace) waiting for the client to read them.
STREAM_DEPTH = 256

# Which daemon serves each request that names none: from the operation tables.
ROUTES: dict[type[Request[Any]], str] = routes()


class ConnectError(UserError):
    """A daemon cannot be reached, refused the hello, or went away mid-request."""


class Pending:
    """A request on its way; :meth:`result` waits for the reply."""

    def __init__(self, msg: Request[Any]):
        self.msg = msg
        self._done = False
        self._value: Any = None
        # The task parked in result() (one, the common case: no trio.Event, and one task switch
        # from the reader to it), or an Event made when more than one waits.
        self._waiter: trio.lowlevel.Task | None = None
        self._event: trio.Event | None = None

    def _resolve(self, value: Any) -> None:
        if not self._done:
            self._value = value
            self._done = True
            waiter = self._waiter
            if waiter is not None:
                self._waiter = None
                trio.lowlevel.reschedule(waiter)
            if self._event is not None:
                self._event.set()

    def _abort(self, raise_cancel: Any) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def result(self) -> Any:
        """The reply's result.

        Errors:
            UserError: the daemon refused the request (its errno and message);
            ConnectError: the connection ended first.
        """
        if self._done:
            await trio.lowlevel.checkpoint()
        elif self._waiter is None:
            self._waiter = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        else:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()
        if isinstance(self._value, UserError):
            raise self._value
        return self._value


class Client:
    """One connection to one daemon; make with :func:`open_client`."""

    def __init__(self, ch: Channel, name: str):
        self.name = name
        self._ch = ch
        self._ids = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._streams: dict[int, trio.MemorySendChannel[Any]] = {}
        self._gone: UserError | None = None

    async def start(self, cls: type[Request[Any]], **fields: Any) -> Pending:
        """Send ``cls(id=..., **fields)`` now; await the returned Pending for the result.

        Errors:
            UserError: EINVAL for a value the protocol refuses (a float out of range, an
            unknown enum value) or cannot encode (an int beyond 64 bits); ConnectError: the
            connection is gone.
        """
        if self._gone is not None:
            raise self._gone
        msg = cls(next(self._ids), **fields)
        pending = self._pending[msg.id] = Pending(msg)
        try:
            # Written at once to an idle socket (no coroutine for the common case); a full
            # queue is waited on.
            if not self._ch.send_nowait(msg):
                await self._ch.send(msg)
        except ProtocolError as err:
            del self._pending[msg.id]
            raise UserError("EINVAL", str(err)) from None
        except (ValueError, TypeError, OverflowError) as err:
            del self._pending[msg.id]
            raise UserError("EINVAL", f"a value does not fit in the request ({err})") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._fail(ConnectError("ECONNRESET", f"{self.name} closed the connection"))
        return pending

    @asynccontextmanager
    async def stream(self, cls: type[Request[R]], **fields: Any) -> AsyncIterator[trio.MemoryReceiveChannel[R]]:
        """Send a request whose replies stream (``Trace``) and yield a channel of their results,
        until the block ends (then the connection should be closed: the daemon streams until it
        is). A refusal or a lost connection ends the channel with a UserError."""
        if self._gone is not None:
            raise self._gone
        send, recv = trio.open_memory_channel[Any](STREAM_DEPTH)
        msg = cls(next(self._ids), **fields)
        self._streams[msg.id] = send
        try:
            await self._ch.send(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._fail(ConnectError("ECONNRESET", f"{self.name} closed the connection"))
        try:
            yield recv
        finally:
            self._streams.pop(msg.id, None)

    async def call(self, cls: type[Request[R]], **fields: Any) -> R:
        """Send a request and wait for its result (of the request's result type)."""
        result: R = await (await self.start(cls, **fields)).result()
        return result

    def _fail(self, err: UserError) -> None:
        self._gone = err
        for pending in self._pending.values():
            pending._resolve(err)
        self._pending.clear()
        for stream in self._streams.values():
            _end_stream(stream, err)
        self._streams.clear()

    async def _reader(self) -> None:
        try:
            # receive() awaited directly (not ``async for``): one coroutine fewer per reply.
            receive = self._ch.receive
            while True:
                try:
                    msg = await receive()
                except trio.EndOfChannel:
                    break
                # The common case first: the reply to a request waiting for it.
                if isinstance(msg, Reply) and msg.id not in self._streams:
                    pending = self._pending.pop(msg.id, None)
                    if pending is not None:
                        if not isinstance(msg, pending.msg.REPLY):
                            self._fail(ConnectError("EPROTO", f"{self.name} answered {pending.msg.TAG} with {msg.TAG}"))
                            return
                        pending._resolve(msg.result)
                    continue
                if isinstance(msg, m.ErrorReply) and msg.id == 0:
                    self._fail(UserError(clip(msg.errno, 32), f"{self.name}: {clip(msg.message, MAX_ERROR_CHARS)}"))
                    return
                if isinstance(msg, (m.ErrorReply, Reply)) and msg.id in self._streams:
                    stream = self._streams[msg.id]
                    if isinstance(msg, m.ErrorReply):
                        _end_stream(stream, UserError(msg.errno, msg.message))
                        del self._streams[msg.id]
                    else:
                        await stream.send(msg.result)
                    continue
                if isinstance(msg, m.ErrorReply):
                    pending = self._pending.pop(msg.id, None)
                    if pending is not None:
                        pending._resolve(UserError(clip(msg.errno, 32), clip(msg.message, MAX_ERROR_CHARS)))
                    continue
                self._fail(ConnectError("EPROTO", f"{self.name} sent {msg.TAG}, not a reply"))
                return
        except ChannelError as err:
            self._fail(ConnectError(err.errno, f"{self.name}: {err.reason}"))
            return
        self._fail(ConnectError("ECONNRESET", f"{self.name} closed the connection"))


def _end_stream(stream: trio.MemorySendChannel[Any], err: UserError) -> None:
    """A stream's last item is the error that ended it."""
    try:
        stream.send_nowait(err)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    stream.close()


@asynccontextmanager
async def open_client(address: str, name: str = "daemon", secrets: Secrets | None = None) -> AsyncIterator[Client]:
    """Connect to the daemon at ``address`` and say hello, proving the client secret of
    ``secrets`` (default: ``$THPSPLIT_SECRET`` / ``$THPSPLIT_SECRET_FILE``, if set) and checking
    the daemon's proof of it.

    Errors:
        ConnectError: bad address, nothing listening, or the hello failed (EACCES: a missing or
        wrong secret on either side).
        SecretError: the secret in the environment cannot be used.
    """
    if secrets is None:
        secrets = load_secrets(peer=False)
    try:
        addr = parse_address(address)
    except AddressError as err:
        raise ConnectError("EINVAL", str(err)) from None
    try:
        stream = await connect(addr)
    except OSError as err:
        raise ConnectError("ECONNREFUSED", f"cannot reach {name} at {addr}: {err.strerror or err}") from None
    async with open_channel(stream) as ch:
        try:
            hello = await ch.handshake(CLIENT, secrets=secrets)
        except ChannelError as err:
            raise ConnectError(err.errno, f"{name} at {addr}: {err.reason}") from None
        except trio.EndOfChannel:
            raise ConnectError("ECONNRESET", f"{name} at {addr} closed the connection") from None
        client = Client(ch, hello.role)
        ch.direct_writes = True  # its reader runs apart from the senders from here on
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._reader)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()


def _route(cls: type[Request[Any]], daemon: str | None) -> str:
    """The daemon a request goes to: ``daemon``, or by default the one that serves ``cls``."""
    target = daemon or ROUTES.get(cls)
    if target is None:
        raise ValueError(f"{cls.TAG} is served by both daemons: name one")
    return target


class Session:
    """Connections to both daemons, each opened when first needed (from the owning task), with
    the client secret of ``secrets`` (default: from the environment, read now).

    Errors:
        SecretError: the secret in the environment cannot be used.
    """

    def __init__(self, collapsed: str | None = None, remapd: str | None = None, secrets: Secrets | None = None):
        self.addresses = {
            COLLAPSED: collapsed or default_address(COLLAPSED),
            REMAPD: remapd or default_address(REMAPD),
        }
        self.secrets = secrets if secrets is not None else load_secrets(peer=False)
        self._clients: dict[str, Client] = {}
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Self:
        await self._stack.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return await self._stack.__aexit__(exc_type, exc, tb)

    async def client(self, daemon: str) -> Client:
        client = self._clients.get(daemon)
        if client is None:
            client = await self._stack.enter_async_context(open_client(self.addresses[daemon], daemon, self.secrets))
            self._clients[daemon] = client
        return client

    async def start(self, cls: type[Request[Any]], daemon: str | None = None, **fields: Any) -> Pending:
        """Send a request to ``daemon`` (by default the one that serves ``cls``)."""
        target = _route(cls, daemon)
        client = self._clients.get(target) or await self.client(target)
        return await client.start(cls, **fields)

    async def call(self, cls: type[Request[R]], daemon: str | None = None, **fields: Any) -> R:
        target = _route(cls, daemon)
        client = self._clients.get(target) or await self.client(target)
        # As start() then result(), one coroutine fewer on every call's path.
        result: R = await (await client.start(cls, **fields)).result()
        return result

    async def vmstat(self) -> dict[str, int]:
        """/proc/vmstat: the union of both daemons' counters."""
        out: dict[str, int] = await self.call(m.Vmstat, COLLAPSED)
        share: dict[str, int] = await self.call(m.Vmstat, REMAPD)
        return {**out, **share}
