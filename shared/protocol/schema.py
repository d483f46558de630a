"""How a message is declared: the base classes, the decorators that register them, float ranges,
and the operation spec a client request carries.

A message is a frozen, slotted dataclass with a wire ``TAG``, registered by :func:`message` (a
peer message) or :func:`request` (a client request, which also gets its reply class and its
:class:`Op`). The set of messages is closed: only registered classes are sent or received.
Field annotations say what travels (:mod:`shared.protocol.codec` lists what it supports); a float
is always ``Annotated[float, Range(lo, hi)]``, so every float on the wire has a documented range,
and an address, offset or length is ``Annotated[int, Range(lo, hi)]`` (its C type's range). A
long column of integers travels packed: ``Annotated[bytes, Packed(fmt, max_items)]``.

There is one protocol version, :data:`PROTOCOL_VERSION`, exchanged in the hello; messages carry
none of their own.
"""

from __future__ import annotations

import dataclasses
import operator
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, dataclass_transform

# Version 5: peer.rmap_delta is columnar: packed little-endian arrays (Packed) for its pfns and
# its three deltas, where version 4 sent an array of [pfn, pte, pmd, pin] rows; so are
# peer.unmap_mapping's pfns.
# Version 4: peer.lookup_pages / peer.page_answers, a batch of read faults looked up as one step.
# Version 3: the hello carries a challenge and a peer.auth answers it (challenge-response with
# the shared secrets). Version 2: frames are [tag, fields] (version 1 sent [tag, 1, fields]),
# replies are typed.
PROTOCOL_VERSION = 5

# The roles a connection says it has in its hello: the two actors and their clients.
COLLAPSED = "collapsed"
REMAPD = "remapd"
CLIENT = "client"
ACTORS = (COLLAPSED, REMAPD)

REGISTRY: dict[str, type[Message]] = {}

R = TypeVar("R")
# A request's result type (a request only ever produces one).
R_co = TypeVar("R_co", covariant=True)
M = TypeVar("M", bound="type[Message]")


class Message:
    """Base of every message. Subclasses are frozen, slotted dataclasses made by :func:`message`
    or :func:`request`."""

    TAG: ClassVar[str]
    __slots__ = ()

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(typing.cast(Any, self))}


@dataclasses.dataclass(frozen=True, slots=True)
class Range:
    """Bounds of a field: ``Annotated[float, Range(lo, hi)]`` accepts finite ``lo <= x <= hi``;
    ``Annotated[int, Range(lo, hi)]`` an int (never a bool) with ``lo <= x <= hi`` (give int
    bounds: a float cannot hold 2**64 - 1)."""

    lo: float
    hi: float


@dataclasses.dataclass(frozen=True, slots=True)
class Packed:
    """A column of integers packed in one ``bytes`` (a msgpack bin): ``Annotated[bytes,
    Packed(fmt, max_items)]`` accepts a ``bytes`` whose length is a multiple of the item size of
    ``fmt`` (a :mod:`struct` format of one little-endian integer: ``"<q"``, ``"<i"``), holding at
    most ``max_items`` of them. Thousands of integers cost the codec one check, not one each."""

    fmt: str
    max_items: int


@dataclass_transform(frozen_default=True)
def message(tag: str) -> Callable[[M], M]:
    """Class decorator: make ``cls`` a frozen slotted dataclass and register it under ``tag``."""

    def wrap(cls: M) -> M:
        return _register(tag, cls)

    return wrap


def _register(tag: str, cls: M) -> M:
    if tag in REGISTRY:
        raise ValueError(f"duplicate message tag {tag!r}")
    if not issubclass(cls, Message):
        raise TypeError(f"{cls.__name__} must subclass Message")
    made: Any = dataclasses.dataclass(frozen=True, slots=True)(cls)
    made.__init__ = _slot_init(made)
    made.TAG = tag
    REGISTRY[tag] = made
    return typing.cast(M, made)


def _slot_init(cls: Any) -> Callable[..., None]:
    """An ``__init__`` for frozen slotted dataclass ``cls`` with the signature of the one
    dataclasses made, that stores each field through its slot's descriptor. The dataclass's goes
    through ``object.__setattr__`` per field (a frozen class's own ``__setattr__`` refuses), which
    looks the name up in the class each time: an 11-field message cost ~7 us to build, every fault
    builds two, and each operation one. The class stays frozen to everyone else: its
    ``__setattr__``, ``__eq__``, ``__hash__``, ``__repr__`` and fields are the dataclass's."""
    fields = dataclasses.fields(cls)
    if any(not f.init or f.kw_only or f.default_factory is not dataclasses.MISSING for f in fields):
        raise TypeError(f"{cls.__name__}: a message field is a plain positional one")
    setters = {f"_set_{f.name}": cls.__dict__[f.name].__set__ for f in fields}
    body = [f"_set_{f.name}(self, {f.name})" for f in fields] or ["pass"]
    init = _generate(cls, "__init__", ["self"], fields, body, setters)
    init.__annotations__ = dict(cls.__init__.__annotations__)
    return init


def _binder(cls: Any) -> Callable[..., tuple[Any, ...]]:
    """A function with the parameters of request ``cls``'s constructor after ``id`` (their
    defaults included) that returns the operation's arguments, as ``cls(id, ...).args()`` would,
    without building the message."""
    fields = dataclasses.fields(cls)[1:]
    values = "".join(f"{f.name}, " for f in fields)
    return _generate(cls, "bind", [], fields, [f"return ({values})"], {})


def _generate(
    cls: Any, name: str, first: list[str], fields: tuple[dataclasses.Field[Any], ...], body: list[str], env: dict[str, Any]
) -> Any:
    """The function ``name`` of ``cls`` with parameters ``first`` then one per field of ``fields``
    (with its default), running ``body`` (lines), as dataclasses generates ``__init__``: from the
    field names alone. ``env`` and the defaults are its closure (cells, not globals)."""
    env = dict(env)
    params = list(first)
    for f in fields:
        if f.default is dataclasses.MISSING:
            params.append(f.name)
        else:
            env[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
    lines = "".join(f"        {line}\n" for line in body)
    src = f"def make({', '.join(env)}):\n    def {name}({', '.join(params)}):\n{lines}    return {name}\n"
    scope: dict[str, Any] = {}
    exec(src, {}, scope)
    fn = scope["make"](**env)
    fn.__qualname__ = f"{cls.__qualname__}.{name}"
    fn.__module__ = cls.__module__
    return fn


# -- client requests and their replies -----------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Op:
    """Who serves a client request and what runs it: one row of an actor's operation table.

    Attributes:
        name: the request's name (its tag without ``client.``).
        served_by: the actors that serve it.
        route: where a client sends it when it names no daemon (None: it must name one).
        run: the actor core's method, by name (dotted for an attribute's method), called with the
            request's fields after ``id`` in order; None: a special request, which each daemon
            serving it handles with its own ``handle_<name>`` method.
        world: the in-process world's method for it (None: none). Derived from ``run`` when one
            actor serves it; otherwise the world writes it by hand.
        unwrap: the world method returns ``result[unwrap]`` instead of the whole result.
        waits: the world method returns the operation's ``Pending`` (it waits for model time).
    """

    name: str
    served_by: tuple[str, ...]
    route: str | None
    run: str | None
    world: str | None
    unwrap: str | None
    waits: bool

    @property
    def derived_in_world(self) -> bool:
        return self.world is not None and self.run is not None and len(self.served_by) == 1


class Reply(Message, Generic[R]):
    """The answer to a request: the request's ``id`` and its typed ``result``. Each request class
    has its own reply class (``Request.REPLY``), tagged ``<request tag>.reply``."""

    __slots__ = ()
    id: int
    result: R

    if TYPE_CHECKING:

        def __init__(self, id: int, result: R = ...) -> None: ...


class Request(Message, Generic[R_co]):
    """A client request; ``R`` is the type of its result. Subclasses declare ``id: int`` first,
    then the arguments of the operation."""

    __slots__ = ()
    OP: ClassVar[Op]
    REPLY: ClassVar[type[Reply[Any]]]
    # The fields after ``id``: the operation's arguments, in order.
    ARGS: ClassVar[tuple[str, ...]]
    # Their values, as one C call (every operation asks for them).
    _ARGS_OF: ClassVar[Callable[[Any], tuple[Any, ...]]]
    # The same from the constructor's arguments after ``id``, without building the message (the
    # in-process world without the codec: the request is only its arguments there).
    BIND: ClassVar[Callable[..., tuple[Any, ...]]]
    id: int

    if TYPE_CHECKING:

        def __init__(self, id: int, *args: Any, **kwargs: Any) -> None: ...

    def args(self) -> tuple[Any, ...]:
        return type(self)._ARGS_OF(self)


_UNSET: Any = object()


@dataclass_transform(frozen_default=True)
def request(
    tag: str,
    served_by: str | tuple[str, ...],
    *,
    run: str | None = None,
    route: str | None = _UNSET,
    world: str | None = _UNSET,
    unwrap: str | None = None,
    waits: bool = False,
) -> Callable[[M], M]:
    """Class decorator for a client request ``class X(Request[Result])``: register it under
    ``tag``, declare its operation (see :class:`Op`; ``route`` defaults to the one actor serving
    it, ``world`` to ``run``) and make its reply class ``X.REPLY``."""
    actors = (served_by,) if isinstance(served_by, str) else tuple(served_by)
    for actor in actors:
        if actor not in ACTORS:
            raise ValueError(f"{tag}: unknown actor {actor!r}")

    def wrap(cls: M) -> M:
        made: Any = _register(tag, cls)
        if not issubclass(made, Request):
            raise TypeError(f"{cls.__name__} must subclass Request")
        names = tuple(made.__dataclass_fields__)
        if names[:1] != ("id",):
            raise TypeError(f"{cls.__name__}: a request's first field is its id")
        made.ARGS = names[1:]
        made._ARGS_OF = staticmethod(_args_getter(made.ARGS))
        made.BIND = staticmethod(_binder(made))
        name = tag.removeprefix("client.")
        made.OP = Op(
            name=name,
            served_by=actors,
            route=(actors[0] if len(actors) == 1 else None) if route is _UNSET else route,
            run=run,
            world=run if world is _UNSET else world,
            unwrap=unwrap,
            waits=waits,
        )
        made.REPLY = _reply_class(made, tag, _result_type(made))
        return typing.cast(M, made)

    return wrap


def _args_getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """The values of fields ``names`` of a message, as a tuple."""
    if len(names) > 1:
        return operator.attrgetter(*names)  # a tuple, in C
    if names:
        get = operator.attrgetter(names[0])  # the value itself
        return lambda msg: (get(msg),)
    return lambda msg: ()


def _result_type(cls: type) -> Any:
    for base in getattr(cls, "__orig_bases__", ()):
        if typing.get_origin(base) is Request:
            (result,) = typing.get_args(base)
            return result
    raise TypeError(f"{cls.__name__} must subclass Request[ResultType]")


def _reply_class(cls: type, tag: str, result: Any) -> type[Reply[Any]]:
    namespace: dict[str, Any] = {
        "__annotations__": {"id": int, "result": result},
        "__module__": cls.__module__,
        "__qualname__": f"{cls.__qualname__}Reply",
        "__doc__": f"The reply to :class:`{cls.__name__}`.",
    }
    if result is type(None):
        namespace["result"] = None
    reply = type(f"{cls.__name__}Reply", (Reply,), namespace)
    return _register(f"{tag}.reply", reply)


def requests() -> list[type[Request[Any]]]:
    """Every registered request class, in declaration order."""
    return [cls for cls in REGISTRY.values() if issubclass(cls, Request)]


def ops_of(actor: str) -> list[type[Request[Any]]]:
    """The operation table of ``actor``: the request classes it serves (each with its ``OP``)."""
    return [cls for cls in requests() if actor in cls.OP.served_by]


def routes() -> dict[type[Request[Any]], str]:
    """Where a client sends each request that names no daemon."""
    return {cls: cls.OP.route for cls in requests() if cls.OP.route is not None}


def resolve(core: Any, run: str) -> Callable[..., Any]:
    """The core's method named ``run`` (``a.b`` is ``core.a.b``)."""
    if "." not in run:  # most are: one getattr, as every operation resolves its method
        target: Callable[..., Any] = getattr(core, run)
        return target
    target = core
    for part in run.split("."):
        target = getattr(target, part)
    return target
