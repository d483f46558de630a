"""A sans-IO task runner: the one piece of machinery both actors' cores are built on.

An actor's long operations (a fault waiting for the page cache, ``collapse_file`` waiting for the
remapper to unmap, khugepaged sleeping between passes) are generators. A generator yields one of
the effects below and is resumed with its outcome:

* :class:`Call` — a request message to the peer actor; resumed with the peer's reply.
* :class:`Sleep` — resumed once the actor's clock reaches ``until`` (model milliseconds).
* :class:`Wait` — resumed when someone calls :meth:`Actor.notify` with the same key (a page lock
  released, an mmap lock dropped).

Nothing here touches a socket or a real clock: the owner moves time forward with
:meth:`Actor.advance`, hands peer messages to :meth:`Actor.deliver`, and drains :attr:`Actor.outbox`.
That is what lets the same core run in-process in tests and behind trio in the daemons.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict, deque
from collections.abc import Callable, Generator
from typing import Any

from shared.errors import UserError
from shared.message import Message

Task = Generator[Any, Any, Any]
Done = Callable[[Any], None]

# A task that yields a sleep which is already due resumes at once the first time in a burst of
# steps; the second time in the same burst it gives the CPU away for this long (one jiffy at
# HZ=1000). Without it, a loop with a zero sleep knob (khugepaged's scan_sleep_millisecs = 0, as
# the kernel accepts) would spin inside one burst and never hand control back to the owner.
RESCHED_MS = 1.0


class Call:
    """Effect: send ``msg`` (whose ``req`` field is already set) to the peer and wait for the reply."""

    __slots__ = ("msg",)

    def __init__(self, msg: Message):
        self.msg = msg


class Sleep:
    """Effect: resume when the actor's clock reaches ``until`` (model milliseconds), or earlier
    when ``wake`` is given and :meth:`Actor.notify` is called with it (an interruptible sleep)."""

    __slots__ = ("until", "wake")

    def __init__(self, until: float, wake: Any = None):
        self.until = until
        self.wake = wake


class Wait:
    """Effect: resume when :meth:`Actor.notify` is called with ``key``."""

    __slots__ = ("key",)

    def __init__(self, key: Any):
        self.key = key


class _Running:
    __slots__ = ("gen", "done", "name", "epoch", "due_burst", "cancelled")

    def __init__(self, gen: Task, done: Done | None, name: str):
        self.gen = gen
        self.done = done
        self.name = name
        # Whoever waits for the result has gone (Actor.cancel): a long operation stops at its
        # next check of Actor.cancelled().
        self.cancelled = False
        # Bumped at every resume; a timer or wait registered in an older epoch is stale.
        self.epoch = 0
        # The burst in which this task last went on past an already-due sleep (see RESCHED_MS).
        self.due_burst = -1


class Actor:
    """Base of the collapser and remapper cores: runs tasks, holds the outbox and the clock."""

    def __init__(self) -> None:
        self.now: float = 0.0
        self.outbox: deque[Message] = deque()
        self._req_ids = itertools.count(1)
        self._calls: dict[int, tuple[_Running, Message]] = {}
        self._timers: list[tuple[float, int, _Running, int]] = []
        self._timer_seq = itertools.count()
        self._waits: defaultdict[Any, list[tuple[_Running, int]]] = defaultdict(list)
        self._ready: deque[tuple[_Running, Any, int]] = deque()
        self._stepping = False
        self._current: _Running | None = None
        self._burst = 0
        # While the peer is gone (go_offline() until go_online()): what a call to it resolves to.
        self._offline: Callable[[Message], Message] | None = None

    # -- what the owner calls -----------------------------------------------------------------

    def new_req(self) -> int:
        return next(self._req_ids)

    def spawn(self, gen: Task, done: Done | None = None, name: str = "") -> _Running:
        """Start ``gen``; ``done(result)`` is called with its return value when it finishes.
        Returns the task, for :meth:`cancel`."""
        task = _Running(gen, done, name)
        self._run_ready(task)
        return task

    def cancel(self, task: _Running) -> None:
        """Nobody waits for ``task``'s result any more: a long operation (a touch, a populate)
        checks :meth:`cancelled` between its steps and stops there, its state consistent."""
        task.cancelled = True

    def cancelled(self) -> bool:
        """Whether the task now running was cancelled."""
        return self._current is not None and self._current.cancelled

    def deliver_reply(self, req: int, msg: Message) -> bool:
        """Resume the task waiting on request ``req``. Returns False if no task waits for it."""
        entry = self._calls.pop(req, None)
        if entry is None:
            return False
        self._run_ready(entry[0], msg)
        return True

    def advance(self, now: float) -> None:
        """Move the clock to ``now`` and run every task whose sleep has ended, in time order."""
        while self._timers and self._timers[0][0] <= now:
            until, _, task, epoch = heapq.heappop(self._timers)
            if task.epoch != epoch:
                continue
            self.now = max(self.now, until)
            self._ready.append((task, None, epoch))
            self._run_ready()
        self.now = max(self.now, now)

    def next_deadline(self) -> float | None:
        while self._timers and self._timers[0][2].epoch != self._timers[0][3]:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def notify(self, key: Any) -> None:
        waiters = self._waits.pop(key, None)
        if waiters:
            self._ready.extend((t, None, epoch) for t, epoch in waiters if t.epoch == epoch)
            self._run_ready()

    def pending_calls(self) -> int:
        return len(self._calls)

    def fail_calls(self, answer: Callable[[Message], Message]) -> None:
        """The peer is gone: resume every task waiting on it with ``answer(request)``."""
        calls, self._calls = self._calls, {}
        for task, request in calls.values():
            self._ready.append((task, answer(request), task.epoch))
        self._run_ready()

    def halt(self) -> None:
        """The actor's process died: no task runs again. (A task's generator closed later, when
        it is collected, runs its ``finally`` blocks against this dead state and wakes no one.)"""
        self._stepping = True
        self._ready.clear()

    def go_offline(self, answer: Callable[[Message], Message]) -> None:
        """The peer is gone: resume every task waiting on it with ``answer(request)``, and answer
        every call made from now until :meth:`go_online` the same way, at once. A task resumed
        by a lost peer's answer often calls again (a touch faults its next page): answered here,
        no call is ever left waiting for a message that the caller's peer_lost() then drops."""
        self._offline = answer
        self.fail_calls(answer)

    def go_online(self) -> None:
        """A peer is connected again: calls go out to it."""
        self._offline = None

    def send(self, msg: Message) -> None:
        self.outbox.append(msg)

    # -- internals ----------------------------------------------------------------------------

    def _run_ready(self, first: _Running | None = None, value: Any = None) -> None:
        """Run a burst: ``first`` resumed with ``value`` (when given) after whatever is ready
        already, then whatever becomes ready. Outside a burst nothing is ready (unless a step
        raised out of the last one), so ``first`` steps at once, without a trip through the
        queue: an operation's first step, the task a reply resumes."""
        ready = self._ready
        # Re-entrancy guard: a task that notifies or finishes others must not recurse into them.
        if self._stepping:
            if first is not None:
                ready.append((first, value, first.epoch))
            return
        self._stepping = True
        self._burst += 1
        try:
            if first is not None:
                if ready:
                    ready.append((first, value, first.epoch))
                else:
                    self._step(first, value)
            while ready:
                task, value, epoch = ready.popleft()
                if task.epoch == epoch:
                    self._step(task, value)
        finally:
            self._stepping = False
        self.flush()

    def flush(self) -> None:
        """Hook run after every burst of task steps: push batched notices to the outbox."""

    def _step(self, task: _Running, value: Any) -> None:
        task.epoch += 1
        self._current = task
        try:
            effect = task.gen.send(value)
        except StopIteration as stop:
            if task.done is not None:
                task.done(stop.value)
            return
        except UserError as err:
            if task.done is not None:
                task.done(err)
            return
        finally:
            self._current = None
        if isinstance(effect, Call):
            if self._offline is not None:
                self._ready.append((task, self._offline(effect.msg), task.epoch))
                return
            self._calls[effect.msg.req] = (task, effect.msg)  # type: ignore[attr-defined]
            self.send(effect.msg)
        elif isinstance(effect, Sleep):
            until = effect.until
            if until <= self.now:
                if task.due_burst != self._burst:
                    task.due_burst = self._burst
                    self._ready.append((task, None, task.epoch))
                    return
                until = self.now + RESCHED_MS
            heapq.heappush(self._timers, (until, next(self._timer_seq), task, task.epoch))
            if effect.wake is not None:
                self._waits[effect.wake].append((task, task.epoch))
        elif isinstance(effect, Wait):
            self._waits[effect.key].append((task, task.epoch))
        else:
            raise TypeError(f"task {task.name or task.gen!r} yielded {effect!r}, not an effect")
