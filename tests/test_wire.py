"""Tests for shared.wire: Message <-> plain data, with strict validation on the way in."""

from __future__ import annotations

import enum
import typing
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.framing import MAX_DEPTH
from shared.message import Message, message
from shared.wire import ProtocolError, from_wire, to_wire


class Color(enum.IntEnum):
    RED = 1
    GREEN = 2


class Mode(enum.StrEnum):
    FAST = "fast"
    SLOW = "slow"


@message("test.wire.scalars")
class Scalars(Message):
    i: int
    s: str
    b: bool
    f: float
    raw: bytes


@message("test.wire.containers")
class Containers(Message):
    opt: int | None
    var: tuple[int, ...]
    pair: tuple[str, bool]
    items: list[float]
    table: dict[str, int]
    anything: Any


@message("test.wire.enums")
class Enums(Message):
    color: Color
    mode: Mode
    maybe: Color | None = None


@message("test.wire.nested")
class Nested(Message):
    groups: dict[str, list[tuple[int, Color]]]
    rows: tuple[list[str | None], ...]


@message("test.wire.versioned", version=3)
class Versioned(Message):
    n: int


@message("test.wire.undeclared")
class Undeclared:
    """Decorated without subclassing Message, which @message allows."""

    n: int


@message("test.wire.unsupported")
class Unsupported(Message):
    s: set[int]


INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
FLOATS = st.floats(allow_nan=False)
PLAIN_SCALARS = st.none() | st.booleans() | INT64 | FLOATS | st.text() | st.binary()


def plain_values(depth: int) -> st.SearchStrategy[Any]:
    """msgpack-able values (lists, str-keyed dicts) nesting at most ``depth`` containers."""
    if depth == 0:
        return PLAIN_SCALARS
    child = plain_values(depth - 1)
    return (
        PLAIN_SCALARS
        | st.lists(child, max_size=3)
        | st.dictionaries(st.text(max_size=4), child, max_size=3)
    )


def nested_lists(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def over_msgpack(wire: Any) -> Any:
    """What the peer's from_wire receives: the data after a msgpack round trip."""
    return msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False)


def roundtrip(msg: Any) -> Any:
    return from_wire(over_msgpack(to_wire(msg)))


def decode_error(obj: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        from_wire(obj)
    text = str(info.value)
    assert "\n" not in text
    return text


# --- round trips -------------------------------------------------------------------------------


@given(st.builds(Scalars, i=INT64, s=st.text(), b=st.booleans(), f=FLOATS, raw=st.binary()))
def test_scalars_round_trip(msg: Scalars) -> None:
    back = roundtrip(msg)
    assert back == msg
    assert type(back.i) is int and type(back.b) is bool and type(back.f) is float


@given(
    st.builds(
        Containers,
        opt=st.none() | INT64,
        var=st.lists(INT64).map(tuple),
        pair=st.tuples(st.text(), st.booleans()),
        items=st.lists(FLOATS),
        table=st.dictionaries(st.text(), INT64),
        anything=plain_values(3),
    )
)
def test_containers_round_trip(msg: Containers) -> None:
    back = roundtrip(msg)
    # Dataclass equality compares tuple fields with ==, which a list never satisfies.
    assert back == msg
    assert type(back.var) is tuple and type(back.pair) is tuple and type(back.items) is list


@given(
    st.builds(
        Enums,
        color=st.sampled_from(Color),
        mode=st.sampled_from(Mode),
        maybe=st.none() | st.sampled_from(Color),
    )
)
def test_enums_round_trip_to_members(msg: Enums) -> None:
    back = roundtrip(msg)
    # IntEnum/StrEnum members equal their raw values, so check identity, not equality.
    assert back.color is msg.color
    assert back.mode is msg.mode
    assert back.maybe is msg.maybe


@given(
    st.builds(
        Nested,
        groups=st.dictionaries(
            st.text(max_size=4),
            st.lists(st.tuples(INT64, st.sampled_from(Color)), max_size=3),
            max_size=3,
        ),
        rows=st.lists(st.lists(st.none() | st.text(max_size=4), max_size=3), max_size=3).map(
            tuple
        ),
    )
)
def test_nested_annotations_round_trip(msg: Nested) -> None:
    back = roundtrip(msg)
    assert back == msg
    for pairs in back.groups.values():
        for pair in pairs:
            assert type(pair) is tuple and type(pair[1]) is Color


def test_default_field_may_be_omitted() -> None:
    msg = from_wire(["test.wire.enums", 1, {"color": 2, "mode": "slow"}])
    assert msg == Enums(Color.GREEN, Mode.SLOW, None)


def test_float_field_accepts_int_as_float() -> None:
    msg = from_wire(["test.wire.scalars", 1, {"i": 1, "s": "", "b": True, "f": 3, "raw": b""}])
    assert msg.f == 3.0 and type(msg.f) is float


# --- to_wire -----------------------------------------------------------------------------------


def test_to_wire_shape_and_plain_values() -> None:
    wire = to_wire(Enums(Color.RED, Mode.FAST, Color.GREEN))
    assert wire == ["test.wire.enums", 1, {"color": 1, "mode": "fast", "maybe": 2}]
    # Members must be sent as their bare values, not as enum subclasses of int/str.
    assert [type(v) for v in wire[2].values()] == [int, str, int]


def test_to_wire_turns_tuples_into_lists_recursively() -> None:
    msg = Containers(None, (1, 2), ("a", True), [0.5], {"k": 1}, {"t": (1, (2,))})
    fields = to_wire(msg)[2]
    assert fields["var"] == [1, 2] and type(fields["var"]) is list
    assert fields["pair"] == ["a", True] and type(fields["pair"]) is list
    assert fields["anything"] == {"t": [1, [2]]}
    assert type(fields["anything"]["t"][1]) is list


def test_to_wire_carries_version() -> None:
    assert to_wire(Versioned(7)) == ["test.wire.versioned", 3, {"n": 7}]


def test_class_not_subclassing_message_round_trips() -> None:
    assert to_wire(Undeclared(4)) == ["test.wire.undeclared", 1, {"n": 4}]
    assert from_wire(["test.wire.undeclared", 1, {"n": 4}]) == Undeclared(4)


@pytest.mark.parametrize("inner", [Versioned(1), Undeclared(1)])
def test_to_wire_rejects_nested_message(inner: Any) -> None:
    msg = Containers(None, (), ("a", True), [], {}, [inner])
    with pytest.raises(TypeError, match=r"Containers\.anything: nested Message values"):
        to_wire(msg)


@pytest.mark.parametrize(
    ("anything", "pattern"),
    [({1, 2}, "cannot encode a value of type set"), ({1: "x"}, "dict keys must be str")],
)
def test_to_wire_rejects_unencodable_values(anything: Any, pattern: str) -> None:
    with pytest.raises(TypeError, match=pattern):
        to_wire(Containers(None, (), ("a", True), [], {}, anything))


def test_to_wire_limits_depth_to_what_frames_allow() -> None:
    # Field values sit inside the [tag, version, {fields}] list and map.
    deepest = MAX_DEPTH - 2
    assert to_wire(Containers(None, (), ("a", True), [], {}, nested_lists(deepest)))
    with pytest.raises(ValueError, match="deeper than the depth limit"):
        to_wire(Containers(None, (), ("a", True), [], {}, nested_lists(deepest + 1)))


def test_to_wire_rejects_unregistered_object() -> None:
    with pytest.raises(TypeError, match="not a registered message class"):
        to_wire(object())  # type: ignore[arg-type]


def test_unsupported_annotation_is_reported_on_first_use() -> None:
    with pytest.raises(TypeError, match=r"Unsupported\.s: unsupported annotation set\[int\]"):
        to_wire(Unsupported({1}))
    with pytest.raises(TypeError, match="unsupported annotation"):
        from_wire(["test.wire.unsupported", 1, {"s": [1]}])


# --- from_wire envelope errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "got"),
    [
        ({"tag": "test.wire.versioned"}, "got dict"),
        (("test.wire.versioned", 3, {"n": 1}), "got tuple"),
        (["test.wire.versioned", 3], "got list of 2 items"),
        (["test.wire.versioned", 3, {"n": 1}, None], "got list of 4 items"),
        (None, "got None"),
    ],
)
def test_rejects_non_triple(obj: Any, got: str) -> None:
    text = decode_error(obj)
    assert text == f"expected a 3-element list [tag, version, fields], {got}"


def test_rejects_unknown_tag() -> None:
    assert decode_error(["test.wire.nope", 1, {}]) == "unknown message tag 'test.wire.nope'"


def test_rejects_non_str_tag() -> None:
    text = decode_error([b"test.wire.versioned", 3, {"n": 1}])
    assert text == "message tag must be str, got bytes"


def test_quotes_of_peer_data_are_bounded() -> None:
    text = decode_error(["x" * 10_000, 1, {}])
    assert text.startswith("unknown message tag 'xxx") and len(text) < 100


@pytest.mark.parametrize("version", [1, 4, True, "3", 3.0])
def test_rejects_other_versions_naming_the_expected_one(version: Any) -> None:
    text = decode_error(["test.wire.versioned", version, {"n": 1}])
    assert text == f"test.wire.versioned: unsupported version {version!r}, expected version 3"


def test_rejects_non_map_fields() -> None:
    text = decode_error(["test.wire.versioned", 3, [1]])
    assert text == "test.wire.versioned: fields must be a map, got list"


def test_rejects_unknown_field() -> None:
    text = decode_error(["test.wire.versioned", 3, {"n": 1, "zzz": 2}])
    assert text == "test.wire.versioned: unknown field 'zzz'"


def test_rejects_missing_required_field_even_if_an_optional_one_is_given() -> None:
    # Same field count as the class declares minus one, plus the defaulted field: a count-only
    # check would miss that 'mode' is absent.
    text = decode_error(["test.wire.enums", 1, {"color": 1, "maybe": 2}])
    assert text == "test.wire.enums: missing required field 'mode'"


# --- from_wire field type errors ---------------------------------------------------------------

SCALARS_OK = {"i": 1, "s": "x", "b": False, "f": 1.5, "raw": b"\x00"}


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("i", True, "expected int, got bool"),
        ("i", 1.0, "expected int, got float"),
        ("i", "1", "expected int, got str"),
        ("b", 1, "expected bool, got int"),
        ("b", 0, "expected bool, got int"),
        ("f", True, "expected float, got bool"),
        ("f", "1.5", "expected float, got str"),
        ("s", b"x", "expected str, got bytes"),
        ("raw", "x", "expected bytes, got str"),
        ("raw", None, "expected bytes, got None"),
    ],
)
def test_scalar_type_mismatch(field: str, value: Any, reason: str) -> None:
    text = decode_error(["test.wire.scalars", 1, {**SCALARS_OK, field: value}])
    assert text == f"test.wire.scalars: field {field!r}: {reason}"


CONTAINERS_OK = {
    "opt": None,
    "var": [],
    "pair": ["a", True],
    "items": [],
    "table": {},
    "anything": None,
}


@pytest.mark.parametrize(
    ("field", "value", "where_reason"),
    [
        ("opt", True, ": expected int, got bool"),
        ("var", [1, 2, False], "[2]: expected int, got bool"),
        ("var", {"a": 1}, ": expected list, got dict"),
        ("pair", ["a", True, 1], ": expected 2 items for tuple[str, bool], got 3"),
        ("pair", ["a", 1], "[1]: expected bool, got int"),
        ("pair", "ab", ": expected list for tuple[str, bool], got str"),
        ("items", [1.0, "x"], "[1]: expected float, got str"),
        ("table", {"k": 1, "j": "v"}, "['j']: expected int, got str"),
        ("table", {b"k": 1}, ": map keys must be str, got bytes"),
        ("table", [], ": expected map, got list"),
        ("anything", {1, 2}, ": expected a msgpack value, got set"),
        ("anything", [{b"k": 1}], ": map keys must be str, got bytes"),
    ],
)
def test_container_type_mismatch_names_the_location(
    field: str, value: Any, where_reason: str
) -> None:
    text = decode_error(["test.wire.containers", 1, {**CONTAINERS_OK, field: value}])
    assert text == f"test.wire.containers: field {field!r}{where_reason}"


def test_nested_location_is_outermost_first() -> None:
    wire = ["test.wire.nested", 1, {"groups": {"g": [[1, 1], [2, 9]]}, "rows": []}]
    text = decode_error(wire)
    assert text == (
        "test.wire.nested: field 'groups'['g'][1][1]: expected Color value, got unknown value 9"
    )


def test_any_depth_matches_the_frame_limit() -> None:
    deepest = MAX_DEPTH - 2
    wire = ["test.wire.containers", 1, {**CONTAINERS_OK, "anything": nested_lists(deepest)}]
    assert from_wire(wire).anything == nested_lists(deepest)
    text = decode_error(
        ["test.wire.containers", 1, {**CONTAINERS_OK, "anything": nested_lists(deepest + 1)}]
    )
    assert text == "test.wire.containers: field 'anything': value nests deeper than the depth limit"


# --- enums -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "where_reason"),
    [
        ({"color": 3, "mode": "fast"}, "'color': expected Color value, got unknown value 3"),
        ({"color": True, "mode": "fast"}, "'color': expected Color value, got bool"),
        ({"color": "RED", "mode": "fast"}, "'color': expected Color value, got str"),
        ({"color": 1, "mode": "FAST"}, "'mode': expected Mode value, got unknown value 'FAST'"),
        ({"color": 1, "mode": 1}, "'mode': expected Mode value, got int"),
        (
            {"color": 1, "mode": "fast", "maybe": 0},
            "'maybe': expected Color value, got unknown value 0",
        ),
    ],
)
def test_enum_rejects_unknown_or_mistyped_values(fields: dict[str, Any], where_reason: str) -> None:
    assert decode_error(["test.wire.enums", 1, fields]) == f"test.wire.enums: field {where_reason}"


def test_enum_decodes_to_members() -> None:
    msg = from_wire(["test.wire.enums", 1, {"color": 2, "mode": "slow", "maybe": 1}])
    assert msg.color is Color.GREEN and msg.mode is Mode.SLOW and msg.maybe is Color.RED


# --- caching -----------------------------------------------------------------------------------


def test_decoding_does_not_resolve_annotations_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    wire = ["test.wire.versioned", 3, {"n": 5}]
    assert from_wire(wire) == Versioned(5)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("get_type_hints called on the hot path")

    monkeypatch.setattr(typing, "get_type_hints", fail)
    assert from_wire(wire) == Versioned(5)
    assert to_wire(Versioned(6)) == ["test.wire.versioned", 3, {"n": 6}]
