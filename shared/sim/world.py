"""Both actors in one process under a virtual clock: the model as a library.

:class:`World` wires a :class:`~collapsed.collapser.Collapser` to a
:class:`~remapd.remapper.Remapper` with two FIFO queues and a shared model clock. Each call runs
an operation and delivers messages until both sides are quiet; :meth:`advance` moves the clock
and runs whatever falls due (khugepaged passes, lock releases, writeback). With ``seed`` set,
the two directions interleave in a seeded random order (each stays FIFO), so tests can show
the protocol holds with replies arriving among other traffic. Tests, the demo and the benchmarks
drive the model through this class; the daemons replace it with sockets.

The operations (``file_create``, ``mmap``, ``fault``, ...) are the actors' operation tables
(``shared/protocol/messages.py``): each request served by one actor gets a method here, named by
its ``world`` entry, taking the request's fields after ``id``. With ``codec`` on (the default),
every message goes through the real codec and framing on its way: both peer directions, each
operation's request and its reply (or error), so every model test tests the protocol too. A
request the codec refuses (an unknown enum value, a float out of range) fails as EINVAL, as the
kernel refuses a bad argument. Benchmarks turn ``codec`` off.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import random
import typing
from collections.abc import Callable, Generator
from types import GeneratorType
from typing import TYPE_CHECKING, Any

from collapsed import snapshot as collapsed_snapshot
from collapsed.collapser import Collapser
from remapd import snapshot as remapd_snapshot
from remapd.remapper import Remapper
from remapd.uprobes import uprobe_add, uprobe_del
from shared.errors import UserError
from shared.knobs import Knobs
from shared.protocol import messages as m
from shared.protocol.codec import ProtocolError
from shared.protocol.framing import decode_message, encode_message
from shared.protocol.schema import COLLAPSED, Message, Reply, Request, requests, resolve

Actor = Collapser | Remapper
# The knobs remapd pushes to a collapser that connects: a restored one takes them from the
# remapper, its own pool from its snapshot.
_PUSHED_KNOBS = tuple(k for k in Knobs().writable_items() if k != "thpsplit/free_huge_pages")
Q = typing.TypeVar("Q", bound=Request[Any])
# What an operation's result becomes on its way back (its reply through the codec).
Answer = Callable[[Any], Any]


class Pending:
    """An operation that has not finished yet (it waits for model time to pass)."""

    def __init__(self, answer: Answer | None = None) -> None:
        self.done = False
        self.value: Any = None
        self._answer = answer

    def set(self, value: Any) -> None:
        self.done = True
        self.value = value if self._answer is None else self._answer(value)

    def result(self) -> Any:
        if not self.done:
            raise RuntimeError("operation still pending")
        if isinstance(self.value, UserError):
            raise self.value
        return self.value


class World:
    def __init__(
        self, knobs: Knobs | None = None, seed: int | None = None, mem_seed: int = 0, codec: bool = True
    ):
        base = knobs or Knobs()
        self.codec = codec
        self._ids = itertools.count(1)
        self.collapser = Collapser(dataclasses.replace(base), seed=mem_seed)
        self.remapper = Remapper(dataclasses.replace(base))
        self.now = 0.0
        self._rng = random.Random(seed) if seed is not None else None
        # Whether the peer link is up (see disconnect() and connect()).
        self.connected = True
        self.settle()

    if TYPE_CHECKING:
        # The operations derived from the tables are set on the class below.
        def __getattr__(self, name: str) -> Any: ...

    # -- driving ------------------------------------------------------------------------------

    def settle(self) -> None:
        """Deliver messages both ways until neither side has anything to send. While the link is
        down nothing can be sent: each side answers what it queued or waits on through
        ``peer_lost()``, as the daemons' driver does."""
        c, r = self.collapser, self.remapper
        if not self.connected:
            for actor in (c, r):
                for _ in range(64):
                    if not (actor.outbox or actor.pending_calls()):
                        break
                    actor.peer_lost()
            return
        while c.outbox or r.outbox:
            if c.outbox and r.outbox and self._rng is not None:
                to_remapper = self._rng.random() < 0.5
            else:
                to_remapper = bool(c.outbox)
            if to_remapper:
                r.deliver(self.wire(c.outbox.popleft()))
            else:
                c.deliver(self.wire(r.outbox.popleft()))

    def wire(self, msg: Message) -> Message:
        """``msg`` as the receiver gets it: through the codec and a frame (with ``codec`` on)."""
        return decode_message(encode_message(msg)) if self.codec else msg

    def start(self, actor: Actor, op: Generator[Any, Any, Any] | Any, answer: Answer | None = None) -> Pending:
        """Run ``op`` (a generator, or a plain call's result) on ``actor``; settle; return it.
        ``answer`` turns the result (or the UserError) into what the caller gets."""
        pending = Pending(answer)
        if isinstance(op, GeneratorType):  # not the ABC: its isinstance costs a call per operation
            actor.spawn(op, pending.set)
        else:
            pending.set(op)
        self.settle()
        return pending

    def call(self, actor: Actor, op: Any, answer: Answer | None = None) -> Any:
        """Run ``op`` as :meth:`start` does and return its result (raise its UserError); it must
        finish without model time passing. (No Pending: every operation of a benchmark comes
        here.)"""
        if isinstance(op, GeneratorType):
            finished: list[Any] = []
            actor.spawn(op, finished.append)
            self.settle()
            if not finished:
                raise RuntimeError("operation waits for model time; use start() and advance()")
            value = finished[0]
        else:
            value = op
            # A plain call (a hit) most often sent nothing: settle() would find nothing to do.
            if self.collapser.outbox or self.remapper.outbox or not self.connected:
                self.settle()
        if answer is not None:
            value = answer(value)
        if isinstance(value, UserError):
            raise value
        return value

    def advance(self, ms: float) -> None:
        """Move the model clock forward by ``ms``, running everything that falls due in order."""
        target = self.now + ms
        while True:
            deadlines = [d for d in (self.collapser.next_deadline(), self.remapper.next_deadline()) if d is not None]
            nxt = min(deadlines) if deadlines else None
            if nxt is None or nxt > target:
                break
            self.now = max(self.now, nxt)
            self.collapser.advance(self.now)
            self.settle()
            self.remapper.advance(self.now)
            self.settle()
        self.now = target
        self.collapser.advance(target)
        self.remapper.advance(target)
        self.settle()

    def wait_scans(self, n: int, limit_ms: float = 10_000_000) -> None:
        """Advance until khugepaged's full_scans has grown by ``n``."""
        goal = self.collapser.khugepaged.full_scans + n
        start = self.now
        while self.collapser.khugepaged.full_scans < goal:
            nxt = [d for d in (self.collapser.next_deadline(), self.remapper.next_deadline()) if d is not None]
            if not nxt or self.now - start > limit_ms:
                raise RuntimeError("khugepaged is not making progress")
            self.advance(max(min(nxt) - self.now, 0))

    def restart_collapser(self, reconnect: bool = True, state: dict[str, Any] | None = None) -> None:
        """collapsed dies and comes back with an empty page cache (a new boot, so new inode
        generations), or with ``state`` (a snapshot, :func:`collapsed.snapshot.snapshot`); the
        remapper resyncs it. ``reconnect=False`` leaves the link down, so the new collapser can
        serve clients before :meth:`connect`."""
        knobs = dataclasses.replace(self.remapper.knobs)
        self.remapper.outbox.clear()
        self.collapser.halt()
        boot = self.collapser.boot + 1
        if state is not None:
            self.collapser = collapsed_snapshot.restore(state, knobs, boot=boot, keep=_PUSHED_KNOBS)
        else:
            self.collapser = Collapser(knobs, boot=boot)
        self.collapser.advance(self.now)
        self.remapper.peer_lost()
        self.connected = False
        if reconnect:
            self.connect()

    def restart_remapper(self, reconnect: bool = True, state: dict[str, Any] | None = None) -> None:
        """remapd dies (its processes with it) and a new one connects (``reconnect=False``: not
        yet; see :meth:`connect`), or one restored from ``state`` (a snapshot,
        :func:`remapd.snapshot.snapshot`), which revalidates its file mappings as it resyncs."""
        knobs = dataclasses.replace(self.collapser.knobs)
        self.collapser.outbox.clear()
        self.remapper.halt()
        self.remapper = Remapper(knobs) if state is None else remapd_snapshot.restore(state, knobs)
        self.remapper.advance(self.now)
        self.collapser.peer_lost()
        self.connected = False
        if reconnect:
            self.connect()

    def disconnect(self) -> None:
        """The peer link breaks: whatever is in flight is lost, both sides lose their peer."""
        self.collapser.outbox.clear()
        self.remapper.outbox.clear()
        self.remapper.peer_lost()
        self.collapser.peer_lost()
        self.connected = False
        self.settle()

    def connect(self) -> None:
        """The peer link is (re)established: both sides resync, the remapper first (its names
        of the files it maps reach the collapser ahead of anything else it sends)."""
        self.connected = True
        self.remapper.resync()
        self.collapser.resync()
        self.settle()

    # -- the operations ------------------------------------------------------------------------

    def actor(self, name: str) -> Actor:
        return self.collapser if name == COLLAPSED else self.remapper

    def request(self, cls: type[Q], *args: Any, **kwargs: Any) -> Q:
        """A request as the serving actor's daemon would receive it (through the codec).

        Errors:
            UserError: EINVAL for a value the protocol refuses, EOVERFLOW for an int beyond
            64 bits.
        """
        msg = cls(next(self._ids), *args, **kwargs)
        if not self.codec:
            return msg
        try:
            return typing.cast(Q, self.wire(msg))
        except ProtocolError as err:
            raise UserError("EINVAL", str(err)) from None
        except OverflowError as err:
            raise UserError("EOVERFLOW", f"cannot send {cls.TAG}: {err}") from None

    def perform(
        self, msg: Request[Any], actor: Actor, fn: Callable[..., Any] | None = None, waits: bool = False
    ) -> Any:
        """Run request ``msg`` on ``actor`` (its core method, or ``fn``) as a daemon would, and
        return its result as the client gets it (the Pending, if ``waits``)."""
        run = fn if fn is not None else resolve(actor, msg.OP.run or "")
        return self._run(actor, run, msg.args(), self._answer(msg) if self.codec else None, waits)

    def _run(
        self, actor: Actor, run: Callable[..., Any], args: tuple[Any, ...], answer: Answer | None, waits: bool
    ) -> Any:
        """``run(*args)`` on ``actor``, its result through ``answer`` (the Pending, if ``waits``)."""
        try:
            op = run(*args)
        except UserError as err:
            if answer is not None:
                answer(err)
            raise
        if waits:
            return self.start(actor, op, answer)
        return self.call(actor, op, answer)

    def _answer(self, msg: Request[Any]) -> Answer:
        """What turns the result of request ``msg`` into what the client gets: its reply (or
        error) through the codec."""

        def answer(value: Any) -> Any:
            if isinstance(value, UserError):
                self.wire(m.ErrorReply(msg.id, value.errno_name, value.message))
                return value
            return typing.cast(Reply[Any], self.wire(msg.REPLY(msg.id, value))).result

        return answer

    # -- the operations the tables cannot derive ------------------------------------------------

    def uprobe(self, action: str, name: str, offset: int) -> dict[str, Any]:
        msg = self.request(m.Uprobe, action, name, offset)
        fn = uprobe_add if msg.action == m.UprobeAction.ADD else uprobe_del
        result: dict[str, Any] = self.perform(msg, self.remapper, lambda action, name, offset: fn(self.remapper, name, offset))
        return result

    def sysfs_set(self, name: str, value: Any) -> None:
        """Validate once, then apply to both actors (as the daemons do through KnobsChanged)."""
        msg = self.request(m.SysfsSet, name, str(value))
        parsed = self.remapper.knobs.validate(msg.name, msg.value)
        change = m.KnobsChanged({name: parsed})
        for actor in (self.collapser, self.remapper):
            actor.deliver(self.wire(change))
        self.settle()

    def vmstat(self) -> dict[str, int]:
        """/proc/vmstat: both actors' shares, as a client shows them."""
        out: dict[str, int] = {}
        for actor in (self.collapser, self.remapper):
            out.update(self.perform(self.request(m.Vmstat), actor))
        return out

    def check(self) -> None:
        """Run the invariant checker (the model must be quiet: call after an operation)."""
        from shared.sim.invariants import check

        check(self.collapser, self.remapper, connected=self.connected)


def _operation(cls: type[Request[Any]]) -> Callable[..., Any]:
    """The World method of an operation served by one actor: the request's fields are its
    parameters."""

    op = cls.OP
    collapsed, run, unwrap, waits, bind = op.served_by[0] == COLLAPSED, op.run or "", op.unwrap, op.waits, cls.BIND

    def operation(self: World, *args: Any, **kwargs: Any) -> Any:
        actor = self.collapser if collapsed else self.remapper
        if self.codec:
            result = self.perform(self.request(cls, *args, **kwargs), actor, waits=waits)
        else:
            # Without the codec the request is only its arguments (perform() with no answer to
            # make): bound as its constructor binds them, its id drawn, no message built.
            next(self._ids)
            result = self._run(actor, resolve(actor, run), bind(*args, **kwargs), None, waits)
        return result[unwrap] if unwrap is not None else result

    fields = dataclasses.fields(typing.cast(Any, cls))[1:]
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + [
        inspect.Parameter(
            f.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default,
        )
        for f in fields
    ]
    setattr(operation, "__signature__", inspect.Signature(params))
    operation.__name__ = str(op.world)
    operation.__qualname__ = f"World.{op.world}"
    operation.__doc__ = f"{cls.TAG} on the {op.served_by[0]} core ({op.run})" + (
        f", returning its {op.unwrap!r}" if op.unwrap else ""
    ) + (" as a Pending" if op.waits else "") + "."
    return operation


for _cls in requests():
    _op = _cls.OP
    if _op.derived_in_world:
        setattr(World, str(_op.world), _operation(_cls))
    elif _op.world is not None and not hasattr(World, _op.world):
        raise TypeError(f"World lacks {_op.world} for {_cls.TAG}")
