"""Conversion between messages and plain msgpack-able data, with strict validation on the way in.

Sans-IO: no sockets, no trio. :func:`to_wire` turns a message into ``[tag, {field: value}]``;
:func:`from_wire` turns such data (as decoded from msgpack) back into a message, checking every
field against the class's annotations. :mod:`shared.protocol.framing` puts the result on a byte
stream.

Field annotations the messages use, and so the only ones supported:

* ``int``, ``str``, ``bool`` (exact: a bool is never an int, nor an int a bool), ``None``;
* ``Annotated[float, Range(lo, hi)]``: finite and within the bounds, both ways (an int is
  accepted for it);
* ``Annotated[int, Range(lo, hi)]``: an int (not a bool) within the bounds, both ways (addresses,
  offsets, lengths: the range of their C type, so a negative address or a 2**64 offset is refused
  before the model sees it);
* ``Annotated[bytes, Packed(fmt, max_items)]``: a ``bytes`` (msgpack bin) holding whole
  little-endian integers of ``fmt``, at most ``max_items``, both ways (what the integers say is
  the receiver's to check);
* ``IntEnum`` / ``StrEnum`` subclasses: sent as the plain value (a plain value of a member is
  accepted when sending), decoded to the member;
* ``X | None``, and unions of the scalars above (``int | str``);
* ``tuple[T, ...]`` and ``tuple[A, B, ...]`` (decoded as tuples), ``list[T]`` (as lists),
  ``dict[str, T]``, and ``TypedDict`` classes (decoded as plain dicts, in the order sent).

Another annotation, or one nesting deeper than a frame may, raises ``TypeError`` the first time
the class is encoded or decoded.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
import struct
import types
import typing
from collections.abc import Callable
from itertools import compress
from operator import is_not
from typing import Any

from shared.clip import quote
from shared.protocol.schema import REGISTRY, Message, Packed, Range

__all__ = ["ProtocolError", "from_wire", "to_wire"]

# Deepest nesting of arrays and maps in a frame (the framing layer enforces it on the way in).
MAX_DEPTH = 16
# Containers around every field value on the wire: the [tag, fields] list and the map.
_ENVELOPE_DEPTH = 2
# Longest repr of peer-supplied data quoted in an error, so a hostile peer cannot bloat our logs.
_QUOTE_CHARS = 60

_NoneType = type(None)
_SCALARS = (int, str, bool, _NoneType)


class ProtocolError(ValueError):
    """Data does not form a valid message; the text says why, on one line."""


class _Invalid(Exception):
    """A value does not match its annotation. Containers append their location to ``path``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []


# A check takes a wire value and returns the field value (converted where the annotation asks,
# e.g. list -> tuple, int -> enum member), or raises _Invalid.
_Check = Callable[[Any], Any]
# An encoder takes a field value and returns its wire form, or raises _Invalid.
_Encode = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True, slots=True)
class _Codec:
    """What one annotation compiles to. ``exact``: the type a decoded value may have to be taken
    unchanged without calling ``check`` (None: always check). ``encode``: None when the value is
    sent as it is."""

    exact: type | None
    check: _Check
    encode: _Encode | None
    depth: int  # containers a value nests


def _quote(value: Any) -> str:
    return quote(value, _QUOTE_CHARS)


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _describe(tp: Any) -> str:
    if tp is _NoneType:
        return "None"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_describe(a) for a in args)
    if origin is typing.Annotated:
        return _describe(args[0])
    if origin is not None:
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _describe(a) for a in args)}]"
    return getattr(tp, "__name__", None) or repr(tp)


def _mismatch(expected: str, value: Any) -> _Invalid:
    return _Invalid(f"expected {expected}, got {_type_name(value)}")


def _is_typeddict(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__required_keys__")


# --- compiling annotations -------------------------------------------------------------------


def _compile(tp: Any) -> _Codec:
    if tp in _SCALARS:
        return _Codec(tp, _exact_check(tp), None, 0)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated and args[0] in (float, int):
        ranges = [a for a in args[1:] if isinstance(a, Range)]
        if len(ranges) == 1:
            return _float_codec(ranges[0]) if args[0] is float else _int_codec(ranges[0])
    if origin is typing.Annotated and args[0] is bytes:
        packed = [a for a in args[1:] if isinstance(a, Packed)]
        if len(packed) == 1:
            return _packed_codec(packed[0])
    if isinstance(tp, type) and issubclass(tp, enum.Enum) and issubclass(tp, (int, str)):
        return _enum_codec(tp)
    if _is_typeddict(tp):
        return _typeddict_codec(tp)
    if origin in (types.UnionType, typing.Union):
        if all(a in _SCALARS for a in args):
            return _scalar_union_codec(args)
        if len(args) == 2 and _NoneType in args:
            (inner,) = [a for a in args if a is not _NoneType]
            return _optional_codec(_compile(inner))
    if origin is list and len(args) == 1:
        return _sequence_codec(_compile(args[0]), list)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _sequence_codec(_compile(args[0]), tuple)
    if origin is tuple and args and Ellipsis not in args:
        return _fixed_tuple_codec([_compile(a) for a in args], _describe(tp))
    if origin is dict and len(args) == 2 and args[0] is str:
        return _dict_codec(_compile(args[1]))
    if tp is float:
        raise TypeError("a float must be Annotated[float, Range(lo, hi)]")
    raise TypeError(f"unsupported annotation {_describe(tp)}")


def _exact_check(tp: type) -> _Check:
    # Exact type, not isinstance: bool is an int subclass and must not pass for int (nor int
    # for bool, which msgpack keeps distinct).
    name = _describe(tp)

    def check(value: Any) -> Any:
        if type(value) is tp:
            return value
        raise _mismatch(name, value)

    return check


def _number(x: float) -> str:
    return str(int(x)) if x.is_integer() and abs(x) < 1e16 else repr(x)


def _float_codec(bounds: Range) -> _Codec:
    lo, hi = bounds.lo, bounds.hi
    span = f"{_number(lo)}..{_number(hi)}"

    def check(value: Any) -> float:
        kind = type(value)
        # Python code routinely writes 1 for 1.0, which msgpack then sends as an int.
        if kind is not float and kind is not int:
            raise _mismatch("float", value)
        if not math.isfinite(value):
            raise _Invalid(f"expected a finite float, got {value!r}")
        if not lo <= value <= hi:
            raise _Invalid(f"{_quote(value)} is outside {span}")
        return float(value)

    # No exact type: every float is checked (a NaN is a float too).
    return _Codec(None, check, check, 0)


def _int_codec(bounds: Range) -> _Codec:
    lo, hi = bounds.lo, bounds.hi
    if type(lo) is not int or type(hi) is not int:
        raise TypeError("an int range needs int bounds")
    span = f"{lo}..{hi}"

    def check(value: Any) -> int:
        if type(value) is not int:
            raise _mismatch("int", value)
        if not lo <= value <= hi:
            raise _Invalid(f"{_quote(value)} is outside {span}")
        return value

    # No exact type: every value is range-checked, on the way out too.
    return _Codec(None, check, check, 0)


def _packed_codec(packed: Packed) -> _Codec:
    if packed.fmt not in ("<b", "<h", "<i", "<q"):
        raise TypeError(f"a packed column holds little-endian signed integers, not {packed.fmt!r}")
    size = struct.calcsize(packed.fmt)
    most = packed.max_items
    kind = f"packed {packed.fmt} integers"

    def check(value: Any) -> bytes:
        if type(value) is not bytes:
            raise _mismatch(f"bytes ({kind})", value)
        if len(value) % size:
            raise _Invalid(f"{len(value)} bytes is not a whole number of {kind} ({size} bytes each)")
        if len(value) > most * size:
            raise _Invalid(f"{len(value) // size} {kind} (at most {most})")
        return value

    # No exact type: every length is checked, on the way out too.
    return _Codec(None, check, check, 0)


def _enum_codec(cls: type[enum.Enum]) -> _Codec:
    base = int if issubclass(cls, int) else str
    # Each member under its plain value; members equal (and hash as) their values.
    members = {member._value_: member for member in cls}
    expected = f"{cls.__name__} value"

    def check(value: Any) -> Any:
        if type(value) is base:
            member = members.get(value)
            if member is not None:
                return member
            raise _Invalid(f"expected {expected}, got unknown value {_quote(value)}")
        raise _mismatch(expected, value)

    def encode(value: Any) -> Any:
        # A member, or its plain value (model code passes plain strings and ints); not a bool.
        if type(value) is cls or type(value) is base:
            member = members.get(value)
            if member is not None:
                return member._value_
            raise _Invalid(f"expected {expected}, got unknown value {_quote(value)}")
        raise _mismatch(expected, value)

    return _Codec(None, check, encode, 0)


def _scalar_union_codec(args: tuple[Any, ...]) -> _Codec:
    allowed = frozenset(args)
    expected = " | ".join(_describe(a) for a in args)

    def check(value: Any) -> Any:
        if type(value) in allowed:
            return value
        raise _mismatch(expected, value)

    return _Codec(None, check, None, 0)


def _optional_codec(inner: _Codec) -> _Codec:
    check, encode = inner.check, inner.encode

    def optional(value: Any) -> Any:
        return None if value is None else check(value)

    if encode is None:
        return _Codec(inner.exact, optional, None, inner.depth)
    encode_inner = encode

    def optional_encode(value: Any) -> Any:
        return None if value is None else encode_inner(value)

    return _Codec(inner.exact, optional, optional_encode, inner.depth)


def _sequence_codec(element: _Codec, result: type) -> _Codec:
    exact, inner, inner_encode = element.exact, element.check, element.encode
    as_tuple = result is tuple

    def check(value: Any) -> Any:
        if type(value) is not list:
            raise _mismatch("list", value)
        out: list[Any] = []
        append = out.append
        try:
            for item in value:
                append(item if type(item) is exact else inner(item))
        except _Invalid as err:
            err.path.append(f"[{len(out)}]")
            raise
        return tuple(out) if as_tuple else out

    def encode(value: Any) -> Any:
        if type(value) is not list and type(value) is not tuple:
            raise _mismatch(_describe(result), value)
        if inner_encode is None:
            return list(value)
        out: list[Any] = []
        try:
            for item in value:
                out.append(inner_encode(item))
        except _Invalid as err:
            err.path.append(f"[{len(out)}]")
            raise
        return out

    return _Codec(None, check, encode, element.depth + 1)


def _fixed_tuple_codec(elements: list[_Codec], expected: str) -> _Codec:
    size = len(elements)
    plain = all(e.encode is None for e in elements)

    def check(value: Any) -> Any:
        if type(value) is not list:
            raise _mismatch(f"list for {expected}", value)
        if len(value) != size:
            raise _Invalid(f"expected {size} items for {expected}, got {len(value)}")
        out: list[Any] = []
        append = out.append
        try:
            for element, item in zip(elements, value):
                append(item if type(item) is element.exact else element.check(item))
        except _Invalid as err:
            err.path.append(f"[{len(out)}]")
            raise
        return tuple(out)

    def encode(value: Any) -> Any:
        if (type(value) is not tuple and type(value) is not list) or len(value) != size:
            raise _Invalid(f"expected {expected}, got {_quote(value)}")
        if plain:
            return list(value)
        out: list[Any] = []
        try:
            for element, item in zip(elements, value):
                out.append(item if element.encode is None else element.encode(item))
        except _Invalid as err:
            err.path.append(f"[{len(out)}]")
            raise
        return out

    return _Codec(None, check, encode, 1 + max(e.depth for e in elements))


def _dict_codec(element: _Codec) -> _Codec:
    exact, inner, inner_encode = element.exact, element.check, element.encode

    def check(value: Any) -> Any:
        if type(value) is not dict:
            raise _mismatch("map", value)
        out: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _Invalid(f"map keys must be str, got {_type_name(key)}")
            if type(item) is not exact:
                try:
                    item = inner(item)
                except _Invalid as err:
                    err.path.append(f"[{_quote(key)}]")
                    raise
            out[key] = item
        return out

    def encode(value: Any) -> Any:
        if not isinstance(value, dict):
            raise _mismatch("dict", value)
        out: dict[str, Any] = {}
        for key, item in value.items():
            # A StrEnum key is a str and is sent as one.
            if not isinstance(key, str):
                raise _Invalid(f"dict keys must be str, got {_type_name(key)}")
            if inner_encode is not None:
                try:
                    item = inner_encode(item)
                except _Invalid as err:
                    err.path.append(f"[{_quote(key)}]")
                    raise
            out[key] = item
        return out

    return _Codec(None, check, encode, element.depth + 1)


def _typeddict_codec(cls: type) -> _Codec:
    hints = typing.get_type_hints(cls, include_extras=True)
    items = {name: _compile(tp) for name, tp in hints.items()}
    required: frozenset[str] = typing.cast(Any, cls).__required_keys__
    encoders = {name: c.encode for name, c in items.items() if c.encode is not None}
    expected = f"{cls.__name__} map"

    def check(value: Any) -> Any:
        if type(value) is not dict:
            raise _mismatch(expected, value)
        out: dict[str, Any] = {}
        for key, item in value.items():
            codec = items.get(key) if type(key) is str else None
            if codec is None:
                raise _Invalid(f"unexpected key {_quote(key)} in {expected}")
            if type(item) is not codec.exact:
                try:
                    item = codec.check(item)
                except _Invalid as err:
                    err.path.append(f"[{_quote(key)}]")
                    raise
            out[key] = item
        if not required <= out.keys():
            raise _Invalid(f"{expected} lacks {', '.join(sorted(map(repr, required - out.keys())))}")
        return out

    def encode(value: Any) -> Any:
        if not isinstance(value, dict):
            raise _mismatch("dict", value)
        out = dict(value)
        for key, encode_item in encoders.items():
            if key in out:
                try:
                    out[key] = encode_item(out[key])
                except _Invalid as err:
                    err.path.append(f"[{_quote(key)}]")
                    raise
        return out

    depth = 1 + max((c.depth for c in items.values()), default=0)
    return _Codec(None, check, encode, depth)


# --- per-class schema ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Schema:
    cls: type[Message]
    tag: str
    names: tuple[str, ...]
    # A message's field values, in ``names`` order, in one call.
    values: Callable[[Any], tuple[Any, ...]]
    codecs: dict[str, _Codec]
    # (name, encoder) of the fields whose values are converted or checked when sent.
    encoders: tuple[tuple[str, _Encode], ...]
    required: tuple[str, ...]
    # Per field, in ``names`` order: the type a value is taken unchanged with (None: always
    # checked), and its check; what from_wire's path for a message sent whole and in order uses.
    exacts: tuple[type | None, ...]
    checks: tuple[_Check, ...]
    positions: range


_SCHEMAS: dict[type, _Schema] = {}


def _schema(cls: type) -> _Schema:
    schema = _SCHEMAS.get(cls)
    if schema is None:
        schema = _SCHEMAS[cls] = _build_schema(cls)
    return schema


def _build_schema(cls: type) -> _Schema:
    if REGISTRY.get(getattr(cls, "TAG", "")) is not cls:
        raise TypeError(f"{cls!r} is not a registered message class")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = dataclasses.fields(typing.cast(Any, cls))
    codecs: dict[str, _Codec] = {}
    for f in fields:
        try:
            codec = codecs[f.name] = _compile(hints[f.name])
        except TypeError as err:
            raise TypeError(f"{cls.__name__}.{f.name}: {err}") from None
        if codec.depth > MAX_DEPTH - _ENVELOPE_DEPTH:
            raise TypeError(f"{cls.__name__}.{f.name}: nests deeper than a frame allows")
    required = tuple(
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    encoders = tuple((name, c.encode) for name, c in codecs.items() if c.encode is not None)
    names = tuple(codecs)
    getter = operator.attrgetter(*names)
    values = getter if len(names) > 1 else lambda msg: (getter(msg),)
    exacts = tuple(codecs[name].exact for name in names)
    checks = tuple(codecs[name].check for name in names)
    return _Schema(cls, cls.TAG, names, values, codecs, encoders, required, exacts, checks, range(len(names)))


# --- public API ------------------------------------------------------------------------------


def from_wire(obj: Any) -> Message:
    """Build the message that ``obj`` (``[tag, {field: value}]``, as msgpack decodes it)
    describes.

    Args:
        obj: decoded wire data. Arrays must be lists and maps dicts, as msgpack produces.
    Returns:
        An instance of the class registered under ``tag``. Tuple fields come back as tuples,
        enum fields as members, float fields as floats (ints are accepted for them), TypedDict
        fields as dicts; omitted fields that have a default take it.
    Errors:
        ProtocolError: ``obj`` is not a 2-element list, the tag is unknown, a field is unknown
        or missing, or a value does not match its annotation (bool and int are never
        interchangeable; a float is finite and in its range).
        TypeError: the message class uses an unsupported annotation (a bug on this side).
    """
    if type(obj) is not list or len(obj) != 2:
        got = f"list of {len(obj)} items" if type(obj) is list else _type_name(obj)
        raise ProtocolError(f"expected a 2-element list [tag, fields], got {got}")
    tag, fields = obj
    if type(tag) is not str:
        raise ProtocolError(f"message tag must be str, got {_type_name(tag)}")
    cls = REGISTRY.get(tag)
    if cls is None:
        raise ProtocolError(f"unknown message tag {_quote(tag)}")
    schema = _SCHEMAS.get(cls) or _schema(cls)
    if type(fields) is not dict:
        raise ProtocolError(f"{tag}: fields must be a map, got {_type_name(fields)}")
    names = schema.names
    if len(fields) == len(names) and tuple(fields) == names:
        # Every field, in declaration order: what to_wire sends. Only the values that are not
        # of their field's exact type are checked, picked in C, and the message is built
        # from positions (no keyword dictionary).
        args = list(fields.values())
        checks = schema.checks
        for i in compress(schema.positions, map(is_not, map(type, args), schema.exacts)):
            try:
                args[i] = checks[i](args[i])
            except _Invalid as err:
                where = "".join(reversed(err.path))
                raise ProtocolError(f"{tag}: field {names[i]!r}{where}: {err.reason}") from None
        return schema.cls(*args)
    codecs = schema.codecs
    if not fields.keys() <= codecs.keys():
        unknown = next(name for name in fields if name not in codecs)
        raise ProtocolError(f"{tag}: unknown field {_quote(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in fields.items():
        codec = codecs[name]
        if type(value) is not codec.exact:
            try:
                value = codec.check(value)
            except _Invalid as err:
                where = "".join(reversed(err.path))
                raise ProtocolError(f"{tag}: field {name!r}{where}: {err.reason}") from None
        kwargs[name] = value
    if len(kwargs) != len(codecs):
        for name in schema.required:
            if name not in kwargs:
                raise ProtocolError(f"{tag}: missing required field {name!r}")
    return schema.cls(**kwargs)


def to_wire(msg: Message) -> list[Any]:
    """Turn ``msg`` into ``[tag, {field: value}]`` that msgpack can encode.

    Tuples become lists and enum members their plain values. Floats are checked (finite, in
    range) and so are enum values and dict keys; other values are checked by the receiver's
    :func:`from_wire`.

    Errors:
        ProtocolError: a float, enum value or dict key that the receiver would refuse.
        TypeError: ``msg`` is not a registered message, or its class uses an unsupported
        annotation.
    """
    schema = _SCHEMAS.get(type(msg)) or _schema(type(msg))
    fields = dict(zip(schema.names, schema.values(msg)))
    for name, encode in schema.encoders:
        try:
            fields[name] = encode(fields[name])
        except _Invalid as err:
            where = "".join(reversed(err.path))
            raise ProtocolError(f"{schema.tag}: field {name!r}{where}: {err.reason}") from None
    return [schema.tag, fields]
