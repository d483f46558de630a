"""The trio driver around a sans-IO actor core: its events and its clock.

The core (a :class:`~shared.actor.Actor`) is only ever touched from the trio thread, between
checkpoints, so it needs no locks. Every event is synchronous: a client request starts its core
operation at once (so requests start in the order they arrive), a peer message goes straight to
``core.deliver`` (:mod:`shared.shell.peer`), and the clock task calls ``core.advance`` when the
core's next deadline (model milliseconds since the daemon started) comes up in real time. After
each event :meth:`Driver.settle` runs the ``then()`` of the jobs it finished (a client's reply
goes out from there), sends what the core queued for the peer (at once when the channel is idle,
else through the peer link's pump) and wakes whoever waits: the clock, requests.

While no peer is connected nothing can be sent: whatever the core queues for the peer, and every
call it waits on, is answered through ``core.peer_lost()``.

A peer message the core refuses (``deliver`` raises :class:`~shared.errors.PeerError`: a forged
or corrupt message) ends that peer connection (:meth:`Driver.deliver`); any other exception out of
the core is a bug in it, logged as ``model_error``, and the daemon carries on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Generator
from types import GeneratorType
from typing import Any, Protocol

import trio

from shared.errors import PeerError, UserError
from shared.logs import get_logger
from shared.protocol.schema import Message
from shared.shell.job import Job

log = get_logger("thpsplit.driver")

# Rounds of peer_lost() per event while disconnected: answering a call may queue another.
MAX_LOST_PEER_ROUNDS = 64


class Core(Protocol):
    """What the driver needs of an actor core (both actors' cores are :class:`~shared.actor.Actor`\\ s)."""

    now: float
    outbox: deque[Message]

    def advance(self, now: float) -> None: ...
    def next_deadline(self) -> float | None: ...
    def spawn(self, gen: Generator[Any, Any, Any], done: Callable[[Any], None] | None = None, name: str = "") -> Any: ...
    def cancel(self, task: Any) -> None: ...
    def send(self, msg: Message) -> None: ...
    def deliver(self, msg: Message) -> None: ...
    def pending_calls(self) -> int: ...
    def peer_lost(self) -> None: ...
    def resync(self) -> None: ...


async def _no_barrier(mark: int) -> None:
    pass


def _no_barrier_needed(mark: int) -> bool:
    return False


def _nothing_sent_now() -> bool:
    return False


class Driver:
    def __init__(self, core: Core, name: str):
        self.core = core
        self.name = name
        # Kept by the peer link: whether a peer is connected, how many messages it has taken
        # from the outbox, and how a reply waits for the peer to have seen an operation.
        self.connected = False
        # Whether this loss of the peer has been reported as leaving the core not quiet.
        self._not_quiet_reported = False
        self.sent = 0
        # The ``sent`` count up to which the peer is known to have processed everything (its
        # answer to a lookup sent then has arrived).
        self.acked = 0
        self.barrier_after: Callable[[int], Awaitable[None]] = _no_barrier
        self.needs_barrier: Callable[[int], bool] = _no_barrier_needed
        # The peer link's PeerLink.send_now: write the outbox at once if the channel is idle.
        self.send_now: Callable[[], bool] = _nothing_sent_now
        # While set, what events queue for the peer waits for the setter's flush(), so that it
        # goes out in one write.
        self.held = False
        self.clients = 0
        self.active_requests = 0
        # The run's clock, read directly: trio.current_time() is three Python calls, and every
        # event reads the time.
        self._time = trio.lowlevel.current_clock().current_time
        self._t0 = self._time()
        # What changed() waits on; made by the first waiter, so that an event nobody waits for
        # costs no trio.Event.
        self._tick: trio.Event | None = None
        # Set when the core has something for the peer (or a peer came): the pump's own wake-up,
        # so it is not woken by every event for nothing.
        self._sendable = trio.Event()
        self._clock_wake = trio.Event()
        self._planned: float | None = None
        # Jobs finished by the current event whose then() is still to run (settle runs it).
        self._finished: deque[Job] = deque()

    # -- time ---------------------------------------------------------------------------------

    def now_ms(self) -> float:
        return (self._time() - self._t0) * 1000.0

    def uptime_s(self) -> float:
        return self._time() - self._t0

    def status(self) -> dict[str, Any]:
        """What ``thpctl status`` shows of any daemon; each adds its own model's figures."""
        return {
            "daemon": self.name,
            "peer": self.connected,
            "clients": self.clients,
            "uptime_s": round(self.uptime_s(), 3),
            "model_ms": self.core.now,
        }

    # -- the peer -----------------------------------------------------------------------------

    def peer_connected(self) -> None:
        self.connected = True
        self._not_quiet_reported = False
        self._sendable.set()

    def peer_disconnected(self) -> None:
        self.connected = False

    def deliver(self, msg: Message) -> None:
        """Hand a peer message to the core (after moving its clock to now).

        Errors:
            PeerError: the core refuses the message; it is left as it was, and the caller must
            close the peer connection. A bug in the core is logged, not raised.
        """
        self.advance_now()
        try:
            self.core.deliver(msg)
        except PeerError:
            raise
        except Exception:
            log.exception("model_error", call="deliver", tag=msg.TAG)

    # -- events -------------------------------------------------------------------------------

    def guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run core code; a bug in it is logged and returned, and the daemon carries on."""
        try:
            return fn(*args)
        except UserError:
            raise
        except Exception as exc:
            log.exception("model_error", call=getattr(fn, "__qualname__", repr(fn)))
            return exc

    def advance_now(self) -> None:
        """Move the core's clock to now: ``guard(core.advance, now_ms())`` in one Python call,
        as every event does it first."""
        core = self.core
        try:
            core.advance((self._time() - self._t0) * 1000.0)
        except UserError:
            raise
        except Exception:
            log.exception("model_error", call=core.advance.__qualname__)

    def settle(self, from_clock: bool = False) -> None:
        """After every event: answer what cannot be sent, wake the pump, the clock, the waiters."""
        core = self.core
        if not self.connected:
            rounds = 0
            while (core.outbox or core.pending_calls()) and rounds < MAX_LOST_PEER_ROUNDS:
                self.guard(core.peer_lost)
                rounds += 1
            if (core.outbox or core.pending_calls()) and not self._not_quiet_reported:
                # A core task that keeps calling the absent peer (a retry loop) is answered again
                # at every event: said once per loss, not at every event.
                self._not_quiet_reported = True
                log.warning("peer_lost_not_quiet", queued=len(core.outbox), calls=core.pending_calls())
        if not from_clock:
            deadline = core.next_deadline()
            if deadline is not None and (self._planned is None or deadline < self._planned):
                self._clock_wake.set()
        finished = self._finished
        while finished:
            job = finished.popleft()
            try:
                job.run_then()
            except Exception:
                log.exception("shell_error", call="then")
        self.wake()

    def wake(self) -> None:
        """Wake every task waiting in :meth:`changed`, and send what the core queued for the
        peer (unless ``held``)."""
        if not self.held:
            self.flush()
        tick = self._tick
        if tick is not None:
            self._tick = None
            tick.set()

    def flush(self) -> None:
        """Send what the core queued for the peer: at once if the channel is idle, else by
        waking the pump."""
        if self.core.outbox and not self.send_now():
            self._sendable.set()


    async def sendable(self) -> None:
        """Wait until the core has queued something for the peer, or a peer connected."""
        if not self._sendable.is_set():
            await self._sendable.wait()
        self._sendable = trio.Event()

    async def changed(self) -> None:
        """Wait for the next event (a request, a peer message, a clock step, a reply sent)."""
        if self._tick is None:
            self._tick = trio.Event()
        await self._tick.wait()

    def mark(self) -> int:
        """How many messages the core has sent so far (sent to the peer, or still queued)."""
        return self.sent + len(self.core.outbox)

    def start(self, fn: Callable[..., Any], *args: Any) -> Job:
        """Run ``fn(*args)`` on the core now; a generator becomes a core task. Errors (UserError,
        or a bug logged as EIO) become the job's result."""
        job = Job(self.mark(), self.barrier_after, self.needs_barrier, self._finished.append)
        self.advance_now()
        # guard() written out: one Python call fewer on every request's path.
        try:
            value = fn(*args)
        except UserError as err:
            value = err
        except Exception as exc:
            log.exception("model_error", call=getattr(fn, "__qualname__", repr(fn)))
            value = exc
        if type(value) is GeneratorType:  # a core operation that waits (a generator function)
            task = self.guard(self.core.spawn, value, job.set, getattr(fn, "__name__", ""))
            if isinstance(task, Exception):
                if not job.finished:
                    job.set(UserError("EIO", f"internal error: {task}"))
            else:
                job.on_cancel = lambda: self.core.cancel(task)
            self.settle()
            return job
        if isinstance(value, Exception) and not isinstance(value, UserError):
            value = UserError("EIO", f"internal error: {value}")
        job.set(value)
        self.settle()
        return job

    def done(self, value: Any) -> Job:
        """A job that has already finished with ``value``."""
        job = Job(self.mark(), self.barrier_after, self.needs_barrier)
        job.set(value)
        return job

    async def idle(self) -> None:
        """Wait until no request is in flight."""
        while self.active_requests:
            await self.changed()

    # -- the clock ----------------------------------------------------------------------------

    async def run_clock(self) -> None:
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
            self.guard(self.core.advance, self.now_ms() if now is None else now)
            self.settle(from_clock=True)


__all__ = ["MAX_LOST_PEER_ROUNDS", "Core", "Driver"]
