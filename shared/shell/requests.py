"""Client connections: a daemon's handlers, derived from its operation table, and the loop that
runs one connection's requests in order and sends their typed replies."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from shared.clip import MAX_ERROR_CHARS, clip
from shared.errors import UserError
from shared.logs import get_logger
from shared.protocol import messages as m
from shared.protocol.codec import ProtocolError
from shared.protocol.schema import Message, Request, ops_of, resolve
from shared.shell.channel import Channel, ChannelError, send_quietly
from shared.shell.driver import Driver
from shared.shell.job import Handler, Job, Stream

log = get_logger("thpsplit.requests")

# Requests one client may have queued, and replies waiting to go out; beyond that the
# connection is not read until one is answered.
MAX_PENDING_PER_CLIENT = 64

Handlers = Mapping[type[Request[Any]], Handler]


def operation_handlers(actor: str, driver: Driver, daemon: object) -> dict[type[Request[Any]], Handler]:
    """The handler of every request in ``actor``'s operation table: the core method its ``run``
    names, started with the request's arguments, or, for a special request, the daemon's own
    ``handle_<name>``.

    Errors:
        TypeError: the core lacks a method the table names, or the daemon a special handler
        (found at start-up, not at the first request).
    """
    handlers: dict[type[Request[Any]], Handler] = {}
    for cls in ops_of(actor):
        op = cls.OP
        if op.run is None:
            special = getattr(daemon, f"handle_{op.name}", None)
            if special is None:
                raise TypeError(f"{type(daemon).__name__} lacks handle_{op.name} for {cls.TAG}")
            handlers[cls] = special
            continue
        try:
            fn = resolve(driver.core, op.run)
        except AttributeError:
            raise TypeError(f"{actor}'s core has no {op.run} for {cls.TAG}") from None
        handlers[cls] = _starter(driver, fn)
    return handlers


def _starter(driver: Driver, fn: Any) -> Handler:
    def start(q: Request[Any]) -> Job:
        return driver.start(fn, *q.args())

    return start


class _Activity:
    """A client connection's requests in flight and when it last did anything, for the idle
    timeout: a client waiting on a reply (wait-scans, a lock) is not idle."""

    def __init__(self) -> None:
        self.in_flight = 0
        # The run's clock, read directly (trio.current_time() is three Python calls): twice a
        # request.
        self._time = trio.lowlevel.current_clock().current_time
        self.last = self._time()
        # Made by the idle watcher when it waits: a request finishing with nobody waiting costs
        # no trio.Event.
        self._changed: trio.Event | None = None

    def touch(self) -> None:
        # No wake-up: the watcher looks at ``last`` again when its deadline comes (a task switch
        # per request saved).
        self.last = self._time()

    def started(self) -> None:
        self.in_flight += 1
        self.touch()

    def finished(self) -> None:
        self.in_flight -= 1
        self.touch()
        changed = self._changed
        if changed is not None and not self.in_flight:
            self._changed = None
            changed.set()

    async def idle_for(self, timeout: float) -> None:
        """Return once nothing has been in flight, nor arrived, for ``timeout`` seconds."""
        while True:
            if self.in_flight:
                if self._changed is None:
                    self._changed = trio.Event()
                await self._changed.wait()
                continue
            deadline = self.last + timeout
            if self._time() >= deadline:
                return
            await trio.sleep_until(deadline)


async def serve_client(driver: Driver, ch: Channel, handlers: Handlers, idle_timeout: float = 0.0) -> None:
    """Answer a client's requests until it closes; the hello is done.

    One connection's requests run one after another, in the order sent, as syscalls from
    one thread do; a reply goes out as soon as it is ready, and one that waits for the peer
    round trip may be overtaken by the next. Concurrency comes from more connections. When
    the client closes, whatever it still waits for is abandoned at once. A client with nothing
    in flight that sends nothing for ``idle_timeout`` seconds (0: no limit) gets
    ``ErrorReply(0, ETIMEDOUT)`` and is closed.
    """
    ch.direct_writes = True
    activity = _Activity()
    idle = False
    driver.clients += 1
    try:
        async with trio.open_nursery() as nursery:
            requests = _Requests(driver, ch, handlers, nursery, activity)
            if idle_timeout > 0:

                async def watch_idle() -> None:
                    nonlocal idle
                    await activity.idle_for(idle_timeout)
                    idle = True
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_idle)
            try:
                # receive() awaited directly (not ``async for``): one coroutine fewer per request.
                receive = ch.receive
                while True:
                    try:
                        msg = await receive()
                    except trio.EndOfChannel:
                        break
                    if not isinstance(msg, Request):
                        raise ChannelError(f"{msg.TAG} is not a client request")
                    requests.take(msg)
                    if requests.unanswered >= MAX_PENDING_PER_CLIENT:
                        await requests.room()
            except ChannelError as err:
                log.warning("protocol_error", errno=err.errno, reason=err.reason)
                await send_quietly(ch, err.reply())
            finally:
                requests.abandon()
            nursery.cancel_scope.cancel()
        if idle:
            log.info("client_idle", idle_s=idle_timeout)
            await send_quietly(
                ch, m.ErrorReply(0, "ETIMEDOUT", f"no request for {idle_timeout:g} s: {driver.name} closes the connection")
            )
    finally:
        driver.clients -= 1


class _Requests:
    """One connection's requests: each starts once the one before it has finished, and is
    answered as soon as it is done. A request the core finishes at once is answered by the
    connection's receiving task, one that waits (a fault's page-cache lookup) by the event that
    finishes it (:meth:`Job.then`): no task per request, no wake-up of one. Only a reply that
    waits for the peer round trip, or for room in a full stream, and a special request's work
    run in a task of their own."""

    def __init__(
        self, driver: Driver, ch: Channel, handlers: Handlers, nursery: trio.Nursery, activity: _Activity
    ) -> None:
        self.driver = driver
        self.ch = ch
        self.handlers = handlers
        self.nursery = nursery
        self.activity = activity
        self.waiting: deque[Request[Any]] = deque()  # received, not started
        self.running: tuple[Request[Any], Job] | None = None  # started, not finished
        self.busy = False  # a request is running (a job, or a special request's work)
        # Requests received and not answered (or waiting for a stream's first reply): beyond
        # MAX_PENDING_PER_CLIENT, the connection is not read until one is answered.
        self.unanswered = 0
        self._room = trio.Event()
        self.closed = False

    def take(self, msg: Request[Any]) -> None:
        """Queue ``msg`` and start it if nothing runs; the caller awaits :meth:`room` before
        reading more once MAX_PENDING_PER_CLIENT requests are unanswered."""
        self.activity.started()
        self.unanswered += 1
        self.waiting.append(msg)
        if not self.busy:
            self._next()

    async def room(self) -> None:
        """Wait until fewer than MAX_PENDING_PER_CLIENT requests are unanswered."""
        while self.unanswered >= MAX_PENDING_PER_CLIENT:
            self._room = trio.Event()
            await self._room.wait()

    def abandon(self) -> None:
        """The client went away: its running operation stops at its next step, unanswered."""
        self.closed = True
        if self.running is not None:
            job = self.running[1]
            job.then(None)
            job.cancel()
            self.running = None
            self.driver.active_requests -= 1
            self.driver.wake()

    def _next(self) -> None:
        """Start the waiting requests, in order, until one has to be waited for."""
        driver = self.driver
        while self.waiting and not self.busy and not self.closed:
            msg = self.waiting.popleft()
            driver.active_requests += 1
            handler = self.handlers.get(type(msg))
            work = (
                handler(msg)
                if handler is not None
                else driver.done(UserError("EOPNOTSUPP", f"{driver.name} does not serve {msg.TAG}"))
            )
            if isinstance(work, Job):
                if work.finished:
                    self._done(msg, work)
                else:
                    self.busy = True
                    self.running = (msg, work)
                    work.then(self._finished)
            elif isinstance(work, Stream):
                # Not a request in flight (a daemon shutting down does not wait for streams),
                # nor ever idle.
                driver.active_requests -= 1
                self._room_for_one()
                self.nursery.start_soon(_stream, self.ch, msg, work, self.activity)
            else:
                self.busy = True
                self.nursery.start_soon(self._work, msg, work)

    def _finished(self, job: Job) -> None:
        assert self.running is not None
        msg = self.running[0]
        self.running = None
        self.busy = False
        self._done(msg, job)
        self._next()

    async def _work(self, msg: Request[Any], work: Callable[[], Awaitable[Any]]) -> None:
        try:
            value = await work()
        except UserError as err:
            value = err
        except Exception as exc:
            log.exception("request_error", tag=msg.TAG)
            value = UserError("EIO", f"internal error: {exc}")
        except BaseException:
            self._answered()  # cancelled: the client went away
            raise
        self.busy = False
        self._done(msg, self.driver.done(value))
        self._next()

    def _done(self, msg: Request[Any], job: Job) -> None:
        """Answer a finished request: now, unless the reply waits for the peer to have seen
        what the operation sent, or the stream is full."""
        if job.needs_barrier():
            self.nursery.start_soon(self._answer_after_barrier, msg, job)
            return
        reply = _reply(msg, job.value())
        try:
            try:
                sent = self.ch.send_nowait(reply)
            except (ValueError, TypeError, OverflowError) as exc:  # ProtocolError among them
                reply = _unsendable(msg, exc)
                sent = self.ch.send_nowait(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            sent = True  # lost with the connection, which is ending
        if sent:
            self._answered()
        else:
            self.nursery.start_soon(self._send, msg, reply)

    async def _answer_after_barrier(self, msg: Request[Any], job: Job) -> None:
        try:
            value = await job.result()
        except UserError as err:
            value = err
        except BaseException:
            self._answered()  # cancelled: the client went away
            raise
        await self._send(msg, _reply(msg, value))

    async def _send(self, msg: Request[Any], reply: Message) -> None:
        """Send ``reply`` once the stream has room (or the connection is gone)."""
        try:
            try:
                await self.ch.send(reply)
            except (ValueError, TypeError, OverflowError) as exc:
                await self.ch.send(_unsendable(msg, exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._answered()

    def _answered(self) -> None:
        self.driver.active_requests -= 1
        self._room_for_one()
        self.activity.finished()
        self.driver.wake()

    def _room_for_one(self) -> None:
        self.unanswered -= 1
        self._room.set()


def _reply(msg: Request[Any], value: Any) -> Message:
    if isinstance(value, UserError):
        # A message may embed a bad value the client sent (a 1 MiB name): never echo it whole.
        return m.ErrorReply(msg.id, value.errno_name, clip(value.message, MAX_ERROR_CHARS))
    return msg.REPLY(msg.id, value)


def _unsendable(msg: Request[Any], exc: Exception) -> Message:
    """What the client gets instead of a reply that cannot be encoded."""
    if isinstance(exc, ProtocolError):
        log.error("reply_does_not_match_its_type", tag=msg.TAG, reason=str(exc))
        return m.ErrorReply(msg.id, "EIO", f"internal error: {exc}")
    return m.ErrorReply(msg.id, "EOVERFLOW", f"reply cannot be sent: {exc}")


async def _stream(ch: Channel, msg: Request[Any], stream: Stream, activity: _Activity) -> None:
    """Send a stream's replies until it ends or the client goes (a daemon shutting down does
    not wait for streams: they are not counted as requests in flight). A subscriber that is
    being sent events is not idle."""

    async def send(result: Any) -> None:
        await ch.send(msg.REPLY(msg.id, result))
        activity.touch()

    try:
        await stream.run(send)
    except UserError as err:
        await send_quietly(ch, m.ErrorReply(msg.id, err.errno_name, err.message))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


__all__ = ["MAX_PENDING_PER_CLIENT", "Handlers", "operation_handlers", "serve_client"]
