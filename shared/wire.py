"""Conversion between :class:`~shared.message.Message` objects and plain msgpack-able data.

Sans-IO: no sockets, no trio. :func:`to_wire` turns a message into ``[tag, version, {field:
value}]``; :func:`from_wire` turns such data (as decoded from msgpack) back into a message,
checking every field against the class's annotations. :mod:`shared.framing` puts the result on a
byte stream.

Supported field annotations: ``int``, ``str``, ``bool``, ``float``, ``bytes``, ``X | None``,
``tuple[T, ...]``, ``tuple[A, B]``, ``list[T]``, ``dict[str, T]``, ``typing.Any`` and
``enum.Enum`` subclasses whose values are ints or strs (``IntEnum``, ``StrEnum``, ...). Using any
other annotation raises ``TypeError`` the first time the class is encoded or decoded.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from typing import Any

from shared.message import REGISTRY, Message

__all__ = ["ProtocolError", "from_wire", "to_wire"]


class ProtocolError(ValueError):
    """Data received from a peer does not form a valid message; the text says why, on one line."""


_NoneType = type(None)
_SCALARS = frozenset({_NoneType, bool, int, float, str, bytes})
# Containers around every field value on the wire: the [tag, version, fields] list and the map.
_ENVELOPE_DEPTH = 2
# Longest repr of peer-supplied data quoted in an error, so a hostile peer cannot bloat our logs.
_QUOTE_CHARS = 60

# A check takes a wire value and returns the field value (converted where the annotation asks,
# e.g. list -> tuple, int -> enum member), or raises _Invalid.
_Check = Callable[[Any], Any]
# The check for one annotation plus the exact type it accepts unchanged, so the decoder can skip
# the call for the common case; None when every value needs the check.
_Compiled = tuple[type | None, _Check]


class _Invalid(Exception):
    """A value does not match its annotation. Containers append their location to ``path``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 3] + "..."


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _describe(tp: Any) -> str:
    if tp is _NoneType:
        return "None"
    if tp is Ellipsis:
        return "..."
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_describe(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_describe(a) for a in args)}]"
    return getattr(tp, "__name__", None) or repr(tp)


def _mismatch(expected: str, value: Any) -> _Invalid:
    return _Invalid(f"expected {expected}, got {_type_name(value)}")


# --- decoding: one compiled check per annotation -------------------------------------------


def _compile(tp: Any, budget: int) -> _Compiled:
    """Build the check for annotation ``tp``; ``budget`` is how many container levels a value at
    this position may still nest, so Any values stay within the frame depth limit."""
    if tp in (int, str, bool, bytes):
        return tp, _exact_check(tp)
    if tp is float:
        return float, _check_float
    if tp is Any:
        return None, _any_check(budget)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return None, _enum_check(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union) and len(args) == 2 and _NoneType in args:
        (inner,) = [a for a in args if a is not _NoneType]
        fast, check = _compile(inner, budget)
        return fast, _optional_check(check)
    if origin is list and len(args) == 1:
        return None, _sequence_check(_compile(args[0], budget - 1), list)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return None, _sequence_check(_compile(args[0], budget - 1), tuple)
    if origin is tuple and Ellipsis not in args:
        return None, _fixed_tuple_check([_compile(a, budget - 1) for a in args], _describe(tp))
    if origin is dict and len(args) == 2 and args[0] is str:
        return None, _dict_check(_compile(args[1], budget - 1))
    raise TypeError(f"unsupported annotation {_describe(tp)}")


def _exact_check(tp: type) -> _Check:
    # Exact type, not isinstance: bool is an int subclass and must not pass for int (nor int
    # for bool, which msgpack keeps distinct).
    name = tp.__name__

    def check(value: Any) -> Any:
        if type(value) is tp:
            return value
        raise _mismatch(name, value)

    return check


def _check_float(value: Any) -> float:
    if type(value) is float:
        return value
    # Python code routinely writes 1 for 1.0, which msgpack then sends as an int.
    if type(value) is int:
        return float(value)
    raise _mismatch("float", value)


def _any_check(budget: int) -> _Check:
    def check(value: Any) -> Any:
        _check_plain(value, budget)
        return value

    return check


def _check_plain(value: Any, budget: int) -> None:
    kind = type(value)
    if kind in _SCALARS:
        return
    if kind is list:
        children: Any = value
    elif kind is dict:
        for key in value:
            if type(key) is not str:
                raise _Invalid(f"map keys must be str, got {_type_name(key)}")
        children = value.values()
    else:
        raise _Invalid(f"expected a msgpack value, got {kind.__name__}")
    if budget <= 0:
        raise _Invalid("value nests deeper than the depth limit")
    for child in children:
        _check_plain(child, budget - 1)


def _enum_check(cls: type[enum.Enum]) -> _Check:
    by_value = {member.value: member for member in cls}
    value_types = {type(v) for v in by_value}
    if not value_types <= {int, str}:
        raise TypeError(f"unsupported annotation {cls.__name__}: enum values must be int or str")
    expected = f"{cls.__name__} value"

    def check(value: Any) -> Any:
        # The type test keeps True from matching a member whose value is 1.
        if type(value) in value_types:
            member = by_value.get(value)
            if member is not None:
                return member
            try:
                # Flag combinations and _missing_ hooks are not in the member map.
                return cls(value)
            except ValueError:
                pass
            raise _Invalid(f"expected {expected}, got unknown value {_quote(value)}")
        raise _mismatch(expected, value)

    return check


def _optional_check(check: _Check) -> _Check:
    def optional(value: Any) -> Any:
        return None if value is None else check(value)

    return optional


def _sequence_check(element: _Compiled, result: type) -> _Check:
    fast, inner = element
    as_tuple = result is tuple

    def check(value: Any) -> Any:
        if type(value) is not list:
            raise _mismatch("list", value)
        out: list[Any] = []
        append = out.append
        try:
            for item in value:
                append(item if type(item) is fast else inner(item))
        except _Invalid as err:
            err.path.append(f"[{len(out)}]")
            raise
        return tuple(out) if as_tuple else out

    return check


def _fixed_tuple_check(elements: list[_Compiled], expected: str) -> _Check:
    size = len(elements)

    def check(value: Any) -> Any:
        if type(value) is not list:
            raise _mismatch(f"list for {expected}", value)
        if len(value) != size:
            raise _Invalid(f"expected {size} items for {expected}, got {len(value)}")
        out: list[Any] = []
        append = out.append
        try:
            for (fast, inner), item in zip(elements, value):
                append(item if type(item) is fast else inner(item))
        except _Invalid as err:
            err.path.append(f"[{len(out)}]")
            raise
        return tuple(out)

    return check


def _dict_check(element: _Compiled) -> _Check:
    fast, inner = element

    def check(value: Any) -> Any:
        if type(value) is not dict:
            raise _mismatch("map", value)
        out: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _Invalid(f"map keys must be str, got {_type_name(key)}")
            if type(item) is not fast:
                try:
                    item = inner(item)
                except _Invalid as err:
                    err.path.append(f"[{_quote(key)}]")
                    raise
            out[key] = item
        return out

    return check


# --- per-class schema ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Schema:
    cls: type[Message]
    tag: str
    version: int
    names: tuple[str, ...]
    checks: dict[str, _Compiled]
    required: tuple[str, ...]
    # Container levels a field value may nest, so encoded frames stay within the depth limit.
    budget: int


_SCHEMAS: dict[type, _Schema] = {}


def _schema(cls: type) -> _Schema:
    schema = _SCHEMAS.get(cls)
    if schema is None:
        schema = _SCHEMAS[cls] = _build_schema(cls)
    return schema


def _build_schema(cls: type) -> _Schema:
    # framing owns the stream limits and imports this module, so import it only once both exist.
    from shared.framing import MAX_DEPTH

    if REGISTRY.get(getattr(cls, "TAG", None)) is not cls:
        raise TypeError(f"{cls!r} is not a registered message class")
    hints = typing.get_type_hints(cls)
    budget = MAX_DEPTH - _ENVELOPE_DEPTH
    fields = [f for f in dataclasses.fields(cls) if f.init]
    checks: dict[str, _Compiled] = {}
    for f in fields:
        try:
            checks[f.name] = _compile(hints[f.name], budget)
        except TypeError as err:
            raise TypeError(f"{cls.__name__}.{f.name}: {err}") from None
    required = tuple(
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    return _Schema(cls, cls.TAG, cls.VERSION, tuple(checks), checks, required, budget)


# --- public API ------------------------------------------------------------------------------


def from_wire(obj: Any) -> Message:
    """Build the message that ``obj`` (``[tag, version, {field: value}]``, as msgpack decodes it)
    describes.

    Args:
        obj: decoded wire data. Arrays must be lists and maps dicts, as msgpack produces.
    Returns:
        An instance of the class registered under ``tag``. Fields annotated as tuples come back
        as tuples, enum fields as members, float fields as floats (ints are accepted for them);
        omitted fields that have a dataclass default take it.
    Errors:
        ProtocolError: ``obj`` is not a 3-element list, the tag is unknown, the version is not
        the one this side speaks, a field is unknown or missing, or a value does not match its
        annotation (bool and int are never interchangeable).
        TypeError: the message class uses an unsupported annotation (a bug on this side).
    """
    if type(obj) is not list or len(obj) != 3:
        got = f"list of {len(obj)} items" if type(obj) is list else _type_name(obj)
        raise ProtocolError(f"expected a 3-element list [tag, version, fields], got {got}")
    tag, version, fields = obj
    if type(tag) is not str:
        raise ProtocolError(f"message tag must be str, got {_type_name(tag)}")
    cls = REGISTRY.get(tag)
    if cls is None:
        raise ProtocolError(f"unknown message tag {_quote(tag)}")
    schema = _SCHEMAS.get(cls) or _schema(cls)
    if type(version) is not int or version != schema.version:
        raise ProtocolError(
            f"{tag}: unsupported version {_quote(version)}, expected version {schema.version}"
        )
    if type(fields) is not dict:
        raise ProtocolError(f"{tag}: fields must be a map, got {_type_name(fields)}")
    checks = schema.checks
    kwargs: dict[str, Any] = {}
    for name, value in fields.items():
        compiled = checks.get(name)
        if compiled is None:
            raise ProtocolError(f"{tag}: unknown field {_quote(name)}")
        fast, check = compiled
        if type(value) is not fast:
            try:
                value = check(value)
            except _Invalid as err:
                where = "".join(reversed(err.path))
                raise ProtocolError(f"{tag}: field {name!r}{where}: {err.reason}") from None
        kwargs[name] = value
    if len(kwargs) != len(checks):
        for name in schema.required:
            if name not in kwargs:
                raise ProtocolError(f"{tag}: missing required field {name!r}")
    return schema.cls(**kwargs)


def to_wire(msg: Message) -> list[Any]:
    """Turn ``msg`` into ``[tag, version, {field: value}]`` that msgpack can encode.

    Tuples become lists and enum members their values; values are not checked against the
    annotations (the receiver's :func:`from_wire` does that).

    Args:
        msg: an instance of a class registered with :func:`shared.message.message`.
    Returns:
        A fresh list; field values are ints, strs, bools, floats, None, bytes, lists and dicts
        with str keys.
    Errors:
        TypeError: ``msg`` is not a registered message, its class uses an unsupported
        annotation, or a value (at any depth) is another Message, has a non-str dict key or a
        type outside the list above.
        ValueError: a value nests deeper than the frame depth limit allows.
    """
    schema = _schema(type(msg))
    fields: dict[str, Any] = {}
    for name in schema.names:
        value = getattr(msg, name)
        if type(value) not in _SCALARS:
            try:
                value = _to_plain(value, schema.budget)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{schema.cls.__name__}.{name}: {err}") from None
        fields[name] = value
    return [schema.tag, schema.version, fields]


def _to_plain(value: Any, budget: int) -> Any:
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is list or kind is tuple:
        if budget <= 0:
            raise ValueError("value nests deeper than the depth limit")
        return [_to_plain(item, budget - 1) for item in value]
    if kind is dict:
        if budget <= 0:
            raise ValueError("value nests deeper than the depth limit")
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"dict keys must be str, got {_type_name(key)}")
            out[key] = _to_plain(item, budget - 1)
        return out
    if isinstance(value, enum.Enum):
        return _to_plain(value.value, budget)
    # @message does not require subclassing Message; a TAG marks decorated classes too.
    if isinstance(value, Message) or hasattr(kind, "TAG"):
        raise TypeError(f"nested Message values are not allowed, got {kind.__name__}")
    raise TypeError(f"cannot encode a value of type {kind.__name__}")
