"""Client connections: a daemon's handlers, derived from its operation table, and the loop that
runs one connection's requests in order and sends their typed replies."""

from __future__ import annotations

from collections.abc import Mapping
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
        self.last = trio.current_time()
        self._changed = trio.Event()

    def touch(self) -> None:
        # No wake-up: the watcher looks at ``last`` again when its deadline comes (a task switch
        # per request saved).
        self.last = trio.current_time()

    def started(self) -> None:
        self.in_flight += 1
        self.touch()

    def finished(self) -> None:
        self.in_flight -= 1
        self.touch()
        if not self.in_flight:
            self._changed.set()
            self._changed = trio.Event()

    async def idle_for(self, timeout: float) -> None:
        """Return once nothing has been in flight, nor arrived, for ``timeout`` seconds."""
        while True:
            if self.in_flight:
                await self._changed.wait()
                continue
            deadline = self.last + timeout
            if trio.current_time() >= deadline:
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
    queue_send, queue_recv = trio.open_memory_channel[Request[Any]](MAX_PENDING_PER_CLIENT)
    activity = _Activity()
    idle = False
    driver.clients += 1
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_execute, driver, ch, handlers, queue_recv, nursery, activity)
            if idle_timeout > 0:

                async def watch_idle() -> None:
                    nonlocal idle
                    await activity.idle_for(idle_timeout)
                    idle = True
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_idle)
            try:
                async for msg in ch:
                    if not isinstance(msg, Request):
                        raise ChannelError(f"{msg.TAG} is not a client request")
                    activity.started()
                    try:
                        queue_send.send_nowait(msg)
                    except trio.WouldBlock:
                        await queue_send.send(msg)
            except ChannelError as err:
                log.warning("protocol_error", errno=err.errno, reason=err.reason)
                await send_quietly(ch, err.reply())
            nursery.cancel_scope.cancel()
        if idle:
            log.info("client_idle", idle_s=idle_timeout)
            await send_quietly(
                ch, m.ErrorReply(0, "ETIMEDOUT", f"no request for {idle_timeout:g} s: {driver.name} closes the connection")
            )
    finally:
        driver.clients -= 1


async def _execute(
    driver: Driver,
    ch: Channel,
    handlers: Handlers,
    requests: trio.MemoryReceiveChannel[Request[Any]],
    nursery: trio.Nursery,
    activity: _Activity,
) -> None:
    # Replies still waiting for the peer round trip count against the same limit.
    limiter = trio.Semaphore(MAX_PENDING_PER_CLIENT)
    async for msg in requests:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await limiter.acquire()
        job = await _run_request(driver, handlers.get(type(msg)), msg)
        if isinstance(job, Stream):
            limiter.release()
            nursery.start_soon(_stream, ch, msg, job, activity)
            continue
        if job.finished and not job.needs_barrier():
            # The common case (a fault answered, nothing left for the peer to see): reply from
            # here rather than from a task of its own, a task switch less per request.
            await _answer(driver, ch, msg, job, limiter, activity)
        else:
            nursery.start_soon(_answer, driver, ch, msg, job, limiter, activity)


async def _run_request(driver: Driver, handler: Handler | None, msg: Request[Any]) -> Job | Stream:
    driver.active_requests += 1
    try:
        if handler is None:
            return driver.done(UserError("EOPNOTSUPP", f"{driver.name} does not serve {msg.TAG}"))
        work = handler(msg)
        if isinstance(work, Stream):
            return work
        if isinstance(work, Job):
            try:
                await work.finished_wait()
            except trio.Cancelled:
                work.cancel()  # the client went away (or its deadline passed and it closed)
                raise
            return work
        try:
            value = await work()
        except UserError as err:
            value = err
        except Exception as exc:
            log.exception("request_error", tag=msg.TAG)
            value = UserError("EIO", f"internal error: {exc}")
        return driver.done(value)
    finally:
        driver.active_requests -= 1


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


async def _answer(
    driver: Driver, ch: Channel, msg: Request[Any], job: Job, limiter: trio.Semaphore, activity: _Activity
) -> None:
    driver.active_requests += 1
    try:
        try:
            reply: Message = msg.REPLY(msg.id, await job.result())
        except UserError as err:
            # A message may embed a bad value the client sent (a 1 MiB name): never echo it whole.
            reply = m.ErrorReply(msg.id, err.errno_name, clip(err.message, MAX_ERROR_CHARS))
        try:
            await ch.send(reply)
        except ProtocolError as exc:
            log.error("reply_does_not_match_its_type", tag=msg.TAG, reason=str(exc))
            await ch.send(m.ErrorReply(msg.id, "EIO", f"internal error: {exc}"))
        except (ValueError, TypeError, OverflowError) as exc:
            await ch.send(m.ErrorReply(msg.id, "EOVERFLOW", f"reply cannot be sent: {exc}"))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        driver.active_requests -= 1
        limiter.release()
        activity.finished()
        driver.wake()


__all__ = ["MAX_PENDING_PER_CLIENT", "Handlers", "operation_handlers", "serve_client"]
