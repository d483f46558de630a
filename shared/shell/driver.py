"""The trio driver around a sans-IO actor core; both daemons are this plus a table of requests.

The core (a :class:`~shared.actor.Actor`) is only ever touched from the trio thread, between
checkpoints, so it needs no locks. Every event is synchronous: a client request starts its core
operation at once (so requests start in the order they arrive), a peer message goes straight to
``core.deliver``, and the clock task calls ``core.advance`` when the core's next deadline (model
milliseconds since the daemon started) comes up in real time. After each event the pump task
moves the core's outbox to the peer channel, whose bounded queue is the backpressure.

While no peer is connected nothing can be sent: whatever the core queues for the peer, and every
call it waits on, is answered through ``core.peer_lost()``. A new peer gets ``core.resync()``,
which describes the whole state again.

A reply to a client that made the core send something to the peer waits for a round trip
(:class:`~shared.messages.Sync` over the peer channel) before it goes out: once the client sees
the reply, the other daemon has seen the operation's effects too, so a client may switch
daemons between two requests without racing the peer traffic.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any

import trio

from shared import messages as m
from shared.actor import Actor
from shared.errors import UserError
from shared.logs import get_logger
from shared.message import Message
from shared.shell.channel import Channel, ChannelError, send_quietly

log = get_logger("thpsplit.driver")

# Requests one client may have queued, and replies waiting to go out; beyond that the
# connection is not read until one is answered.
MAX_PENDING_PER_CLIENT = 64
# Rounds of peer_lost() per event while disconnected: answering a call may queue another.
MAX_LOST_PEER_ROUNDS = 64
# Rows per RmapDelta (pfns per Reclaim) in one frame: unmapping or paging out gigabytes at once
# must not make a frame the peer refuses. Rows are additive, so a split changes nothing.
MAX_ROWS_PER_FRAME = 65536


def split_for_frames(msg: Message) -> list[Message]:
    if isinstance(msg, m.RmapDelta) and len(msg.rows) > MAX_ROWS_PER_FRAME:
        rows = msg.rows
        return [m.RmapDelta(rows[i : i + MAX_ROWS_PER_FRAME]) for i in range(0, len(rows), MAX_ROWS_PER_FRAME)]
    if isinstance(msg, m.Reclaim) and len(msg.pfns) > MAX_ROWS_PER_FRAME:
        pfns = msg.pfns
        return [m.Reclaim(pfns[i : i + MAX_ROWS_PER_FRAME]) for i in range(0, len(pfns), MAX_ROWS_PER_FRAME)]
    return [msg]


class Op:
    """An operation started on the core; :meth:`result` waits for it (and for the peer to have
    seen what it sent)."""

    def __init__(self, driver: Driver, mark: int):
        self._driver = driver
        self._mark = mark
        self._done = trio.Event()
        self._value: Any = None

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def set(self, value: Any) -> None:
        self._value = value
        self._done.set()

    async def finished_wait(self) -> None:
        """Wait for the operation itself (not for the peer to have seen its effects)."""
        await self._done.wait()

    async def result(self) -> Any:
        await self._done.wait()
        await self._driver.barrier_after(self._mark)
        if isinstance(self._value, BaseException):
            raise self._value
        return self._value


# What a request handler returns: an operation already started, or work to await in the
# connection's task before its next request starts.
Work = Op | Callable[[], Awaitable[Any]]
Handler = Callable[[Any], Work]


class Driver:
    def __init__(self, core: Actor, name: str, peer_role: str):
        self.core = core
        self.name = name
        self.peer_role = peer_role
        self.peer: Channel | None = None
        self.on_peer: Callable[[], None] | None = None
        self.clients = 0
        self.active_requests = 0
        self._t0 = trio.current_time()
        self._tick = trio.Event()
        self._clock_wake = trio.Event()
        self._planned: float | None = None
        self._pumped = 0
        self._barriers: dict[int, trio.Event] = {}
        self._barrier_ids = itertools.count(1)

    # -- time ---------------------------------------------------------------------------------

    def now_ms(self) -> float:
        return (trio.current_time() - self._t0) * 1000.0

    def uptime_s(self) -> float:
        return trio.current_time() - self._t0

    def status(self, daemon: str) -> dict[str, Any]:
        """What ``thpctl status`` shows of any daemon; each adds its own model's figures."""
        return {
            "daemon": daemon,
            "peer": self.peer is not None,
            "clients": self.clients,
            "uptime_s": round(self.uptime_s(), 3),
            "model_ms": self.core.now,
        }

    # -- events -------------------------------------------------------------------------------

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run core code; a bug in it is logged and returned, and the daemon carries on."""
        try:
            return fn(*args)
        except UserError:
            raise
        except Exception as exc:
            log.exception("model_error", call=getattr(fn, "__qualname__", repr(fn)))
            return exc

    def _settle(self, from_clock: bool = False) -> None:
        """After every event: answer what cannot be sent, wake the pump, the clock, the waiters."""
        core = self.core
        if self.peer is None:
            rounds = 0
            while (core.outbox or core.pending_calls()) and rounds < MAX_LOST_PEER_ROUNDS:
                self._guard(core.peer_lost)
                rounds += 1
            if core.outbox or core.pending_calls():
                log.error("peer_lost_not_quiet", queued=len(core.outbox), calls=core.pending_calls())
        if not from_clock:
            deadline = core.next_deadline()
            if deadline is not None and (self._planned is None or deadline < self._planned):
                self._clock_wake.set()
        self._tick.set()
        self._tick = trio.Event()

    async def changed(self) -> None:
        """Wait for the next event (a request, a peer message, a clock step)."""
        await self._tick.wait()

    def _mark(self) -> int:
        return self._pumped + len(self.core.outbox)

    def start(self, fn: Callable[..., Any], *args: Any) -> Op:
        """Run ``fn(*args)`` on the core now; a generator becomes a core task. Errors (UserError,
        or a bug logged as EIO) become the Op's result."""
        op = Op(self, self._mark())
        self._guard(self.core.advance, self.now_ms())
        try:
            value = self._guard(fn, *args)
        except UserError as err:
            value = err
        if isinstance(value, Generator):
            crash = self._guard(self.core.spawn, value, op.set, getattr(fn, "__name__", ""))
            if isinstance(crash, Exception) and not op.finished:
                op.set(UserError("EIO", f"internal error: {crash}"))
            self._settle()
            return op
        if isinstance(value, Exception) and not isinstance(value, UserError):
            value = UserError("EIO", f"internal error: {value}")
        op.set(value)
        self._settle()
        return op

    def done(self, value: Any) -> Op:
        """An Op that has already finished with ``value``."""
        op = Op(self, self._mark())
        op.set(value)
        return op

    # -- the peer -----------------------------------------------------------------------------

    async def barrier_after(self, mark: int) -> None:
        if self.peer is not None and self._mark() != mark:
            await self.barrier()

    async def barrier(self, wait_for_peer: bool = False) -> bool:
        """Round trip through the peer: True once it has processed everything sent before.
        False if there is no peer (or it went away), unless ``wait_for_peer``: then wait for
        one and try again."""
        while True:
            while self.peer is None:
                if not wait_for_peer:
                    return False
                await self.changed()
            bid = next(self._barrier_ids)
            event = self._barriers[bid] = trio.Event()
            self.core.send(m.Sync(bid))
            self._settle()
            await event.wait()
            if self._barriers.pop(bid, None) is None:
                return True
            if not wait_for_peer:
                return False

    async def serve_peer(self, ch: Channel) -> None:
        """Run the peer connection until it ends; the hello is done."""
        if self.peer is not None:
            raise ChannelError(f"a {self.peer_role} is already connected", "EBUSY")
        self.peer = ch
        log.info("peer_connected")
        try:
            if self.on_peer is not None:
                self.on_peer()
            self._guard(self.core.resync)
            self._settle()
            async for msg in ch:
                self._from_peer(msg)
        finally:
            self.peer = None
            log.warning("peer_lost")
            self._guard(self.core.peer_lost)
            # Barriers still waiting stay in the table: their waiters see the peer went away.
            for event in self._barriers.values():
                event.set()
            self._settle()

    def _from_peer(self, msg: Message) -> None:
        if isinstance(msg, m.Sync):
            self.core.send(m.Reply(msg.id, None))
        elif isinstance(msg, m.Reply):
            event = self._barriers.pop(msg.id, None)
            if event is not None:
                event.set()
        elif isinstance(msg, m.ErrorReply):
            raise ChannelError(f"{self.peer_role} refused: {msg.errno}: {msg.message}", msg.errno)
        elif not msg.TAG.startswith("peer.") or isinstance(msg, m.PeerHello):
            raise ChannelError(f"{msg.TAG} is not a peer message", reply_to=getattr(msg, "id", 0))
        else:
            self._guard(self.core.advance, self.now_ms())
            self._guard(self.core.deliver, msg)
        self._settle()

    # -- clients ------------------------------------------------------------------------------

    async def serve_client(self, ch: Channel, handlers: Mapping[type[Message], Handler]) -> None:
        """Answer a client's requests until it closes; the hello is done.

        One connection's requests run one after another, in the order sent, as syscalls from
        one thread do; a reply goes out as soon as it is ready, and one that waits for the peer
        round trip may be overtaken by the next. Concurrency comes from more connections. When
        the client closes, whatever it still waits for is abandoned at once.
        """
        queue_send, queue_recv = trio.open_memory_channel[Message](MAX_PENDING_PER_CLIENT)
        self.clients += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._execute, ch, handlers, queue_recv, nursery)
                try:
                    async for msg in ch:
                        if type(getattr(msg, "id", None)) is not int or isinstance(msg, (m.Reply, m.ErrorReply)):
                            raise ChannelError(f"{msg.TAG} is not a client request")
                        await queue_send.send(msg)
                except ChannelError as err:
                    log.warning("protocol_error", errno=err.errno, reason=err.reason)
                    await send_quietly(ch, err.reply())
                nursery.cancel_scope.cancel()
        finally:
            self.clients -= 1

    async def _execute(
        self,
        ch: Channel,
        handlers: Mapping[type[Message], Handler],
        requests: trio.MemoryReceiveChannel[Message],
        nursery: trio.Nursery,
    ) -> None:
        # Replies still waiting for the peer round trip count against the same limit.
        limiter = trio.Semaphore(MAX_PENDING_PER_CLIENT)
        async for msg in requests:
            await limiter.acquire()
            op = await self._run_request(handlers.get(type(msg)), msg)
            nursery.start_soon(self._answer, ch, msg.id, op, limiter)  # type: ignore[attr-defined]

    async def _run_request(self, handler: Handler | None, msg: Message) -> Op:
        self.active_requests += 1
        try:
            if handler is None:
                return self.done(UserError("EOPNOTSUPP", f"{self.name} does not serve {msg.TAG}"))
            work = handler(msg)
            if isinstance(work, Op):
                await work.finished_wait()
                return work
            try:
                value = await work()
            except UserError as err:
                value = err
            except Exception as exc:
                log.exception("request_error", tag=msg.TAG)
                value = UserError("EIO", f"internal error: {exc}")
            return self.done(value)
        finally:
            self.active_requests -= 1

    async def _answer(self, ch: Channel, req: int, op: Op, limiter: trio.Semaphore) -> None:
        self.active_requests += 1
        try:
            try:
                reply: Message = m.Reply(req, await op.result())
            except UserError as err:
                reply = m.ErrorReply(req, err.errno_name, err.message)
            try:
                await ch.send(reply)
            except (ValueError, TypeError, OverflowError) as exc:
                await ch.send(m.ErrorReply(req, "EOVERFLOW", f"reply cannot be sent: {exc}"))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.active_requests -= 1
            limiter.release()
            self._tick.set()
            self._tick = trio.Event()

    async def idle(self) -> None:
        while self.active_requests:
            await self.changed()

    # -- the tasks ----------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._clock)
            nursery.start_soon(self._pump)

    async def _clock(self) -> None:
        while True:
            deadline = self.core.next_deadline()
            self._planned = deadline
            self._clock_wake = trio.Event()
            now = None
            if deadline is None:
                await self._clock_wake.wait()
            else:
                with trio.move_on_at(self._t0 + deadline / 1000.0) as scope:
                    await self._clock_wake.wait()
                if scope.cancelled_caught:
                    # Float rounding must not leave the timer just short of due.
                    now = max(self.now_ms(), deadline)
            self._guard(self.core.advance, self.now_ms() if now is None else now)
            self._settle(from_clock=True)

    async def _pump(self) -> None:
        while True:
            peer = self.peer
            if peer is None or not self.core.outbox:
                await self.changed()
                continue
            msg = self.core.outbox.popleft()
            self._pumped += 1
            try:
                for part in split_for_frames(msg):
                    await peer.send(part)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the peer's handler sees the end and calls peer_lost()
            except (ValueError, TypeError, OverflowError):
                log.exception("unsendable_peer_message", tag=msg.TAG)
