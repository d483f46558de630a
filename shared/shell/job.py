"""What a client request becomes in a daemon: a :class:`Job` (an operation started on the actor
core, awaited for its result) or work the connection's task awaits itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio


class Job:
    """An operation started on the core; :meth:`result` waits for it and then, through
    ``barrier_after(mark)``, for the peer to have seen what it sent."""

    def __init__(
        self,
        mark: int,
        barrier_after: Callable[[int], Awaitable[None]],
        needs_barrier: Callable[[int], bool] = lambda mark: False,
        report: Callable[[Job], None] | None = None,
    ):
        self._mark = mark
        self._barrier_after = barrier_after
        self._needs_barrier = needs_barrier
        self._finished = False
        # Made by the first task that waits: a job answered from its then() needs none.
        self._done: trio.Event | None = None
        self._value: Any = None
        # Tells the core that nobody waits for the operation any more (Driver.start sets it).
        self.on_cancel: Callable[[], None] | None = None
        # then(): who is told once the job has finished, and how (Driver.settle runs them).
        self._then: Callable[[Job], None] | None = None
        self._report = report

    @property
    def finished(self) -> bool:
        return self._finished

    def set(self, value: Any) -> None:
        self._value = value
        self._finished = True
        if self._done is not None:
            self._done.set()
        if self._then is not None and self._report is not None:
            self._report(self)

    def then(self, fn: Callable[[Job], None] | None) -> None:
        """Have ``fn(job)`` called once the unfinished job has finished: by the driver, after
        the event that finished it (not from within the core), with no task waking for it.
        None: no longer."""
        self._then = fn

    def run_then(self) -> None:
        if self._then is not None:
            self._then(self)

    def value(self) -> Any:
        """The finished operation's value, or the UserError it ended with (no barrier)."""
        return self._value

    def needs_barrier(self) -> bool:
        """Whether :meth:`result` would wait for a round trip through the peer."""
        return self._needs_barrier(self._mark)

    def cancel(self) -> None:
        """The client went away: a long operation still running stops at its next step."""
        if not self.finished and self.on_cancel is not None:
            self.on_cancel()

    async def finished_wait(self) -> None:
        """Wait for the operation itself (not for the peer to have seen its effects)."""
        if not self._finished:
            if self._done is None:
                self._done = trio.Event()
            await self._done.wait()

    async def result(self) -> Any:
        """The operation's value; raises the error (a UserError) it ended with."""
        await self.finished_wait()
        if self._needs_barrier(self._mark):
            await self._barrier_after(self._mark)
        if isinstance(self._value, BaseException):
            raise self._value
        return self._value


class Stream:
    """A request answered by many replies: ``run(send)`` awaits ``send(result)`` for each, in
    its own task beside the connection's other requests, until the client closes the connection
    (which cancels it)."""

    def __init__(self, run: Callable[[Callable[[Any], Awaitable[None]]], Awaitable[None]]):
        self.run = run


# What a request handler returns: a job already started, work to await in the connection's
# task before its next request starts, or a stream of replies.
Work = Job | Stream | Callable[[], Awaitable[Any]]
Handler = Callable[[Any], Work]

__all__ = ["Handler", "Job", "Stream", "Work"]
