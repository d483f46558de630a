"""Tests for shared.protocol.codec: Message <-> plain data, with strict validation both ways."""

from __future__ import annotations

import enum
import math
import re
import typing
from typing import Annotated, Any, TypedDict

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.protocol import messages as m
from shared.protocol.codec import MAX_DEPTH, ProtocolError, from_wire, to_wire
from shared.protocol.framing import decode_message, encode_message
from shared.protocol.schema import (
    COLLAPSED,
    REGISTRY,
    REMAPD,
    Message,
    Packed,
    Range,
    Request,
    message,
    ops_of,
    request,
    requests,
    routes,
)


class Color(enum.IntEnum):
    RED = 1
    GREEN = 2


class Mode(enum.StrEnum):
    FAST = "fast"
    SLOW = "slow"


Ratio = Annotated[float, Range(-1e6, 1e6)]


@message("test.wire.scalars")
class Scalars(Message):
    i: int
    s: str
    b: bool
    f: Ratio


@message("test.wire.containers")
class Containers(Message):
    opt: int | None
    var: tuple[int, ...]
    pair: tuple[str, bool]
    items: list[Ratio]
    table: dict[str, int]
    either: int | str


@message("test.wire.enums")
class Enums(Message):
    color: Color
    mode: Mode
    maybe: Color | None = None


@message("test.wire.nested")
class Nested(Message):
    groups: dict[str, list[tuple[int, Color]]]
    rows: tuple[list[str | None], ...]


class Point(TypedDict):
    x: int
    label: str


class Labelled(Point, total=False):
    weight: Ratio
    tags: list[Mode]


@message("test.wire.typed")
class Typed(Message):
    points: list[Labelled]


@message("test.wire.small")
class Small(Message):
    n: int


@message("test.wire.unsupported")
class Unsupported(Message):
    s: set[int]


@message("test.wire.bare_float")
class BareFloat(Message):
    f: float


def deep(depth: int) -> Any:
    tp: Any = int
    for _ in range(depth):
        tp = list[tp]
    return tp


@message("test.wire.too_deep")
class TooDeep(Message):
    v: deep(MAX_DEPTH - 1)  # type: ignore[valid-type]


@message("test.wire.deepest")
class Deepest(Message):
    v: deep(MAX_DEPTH - 2)  # type: ignore[valid-type]


class Sum(TypedDict):
    total: int


INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
FLOATS = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


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


def encode_error(msg: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        to_wire(msg)
    text = str(info.value)
    assert "\n" not in text
    return text


# --- round trips -------------------------------------------------------------------------------


@given(st.builds(Scalars, i=INT64, s=st.text(), b=st.booleans(), f=FLOATS))
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
        either=INT64 | st.text(),
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


def test_enum_fields_accept_plain_values_and_decode_to_members() -> None:
    # Model code passes plain strings and ints; the receiver gets members equal to them.
    back = roundtrip(Enums(2, "slow", 1))  # type: ignore[arg-type]
    assert back.color is Color.GREEN and back.mode is Mode.SLOW and back.maybe is Color.RED
    assert back.mode == "slow" and back.color == 2


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


def test_typeddict_round_trips_as_a_plain_dict_in_the_order_sent() -> None:
    points = [{"label": "b", "x": 2, "tags": ["fast"], "weight": 1}, {"x": 1, "label": "a"}]
    back = roundtrip(Typed(points))  # type: ignore[arg-type]
    assert back.points == [{"label": "b", "x": 2, "tags": [Mode.FAST], "weight": 1.0}, {"x": 1, "label": "a"}]
    assert [list(p) for p in back.points] == [["label", "x", "tags", "weight"], ["x", "label"]]
    assert type(back.points[0]) is dict and type(back.points[0]["weight"]) is float


@pytest.mark.parametrize(
    ("point", "where_reason"),
    [
        ({"x": 1}, "[0]: Labelled map lacks 'label'"),
        ({"x": 1, "label": "a", "z": 0}, "[0]: unexpected key 'z' in Labelled map"),
        ({"x": "1", "label": "a"}, "[0]['x']: expected int, got str"),
        ({"x": 1, "label": "a", "weight": math.inf}, "[0]['weight']: expected a finite float, got inf"),
        ({"x": 1, "label": "a", "tags": ["slowly"]}, "[0]['tags'][0]: expected Mode value, got unknown value 'slowly'"),
        ([1], "[0]: expected Labelled map, got list"),
    ],
)
def test_typeddict_is_checked(point: Any, where_reason: str) -> None:
    text = decode_error(["test.wire.typed", {"points": [point]}])
    assert text == f"test.wire.typed: field 'points'{where_reason}"


def test_default_field_may_be_omitted() -> None:
    msg = from_wire(["test.wire.enums", {"color": 2, "mode": "slow"}])
    assert msg == Enums(Color.GREEN, Mode.SLOW, None)


def test_float_field_accepts_int_as_float() -> None:
    msg = from_wire(["test.wire.scalars", {"i": 1, "s": "", "b": True, "f": 3}])
    assert msg.f == 3.0 and type(msg.f) is float


# --- floats: finite and in range, both ways ----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (math.nan, "expected a finite float, got nan"),
        (math.inf, "expected a finite float, got inf"),
        (-math.inf, "expected a finite float, got -inf"),
        (1e6 + 1, "1000001.0 is outside -1000000..1000000"),
        (-(10**7), "-10000000 is outside -1000000..1000000"),
    ],
)
def test_floats_must_be_finite_and_in_range(value: float, reason: str) -> None:
    assert decode_error(["test.wire.scalars", {"i": 1, "s": "", "b": True, "f": value}]) == (
        f"test.wire.scalars: field 'f': {reason}"
    )
    assert encode_error(Scalars(1, "", True, value)) == f"test.wire.scalars: field 'f': {reason}"


def test_floats_inside_containers_are_checked_when_sent() -> None:
    msg = Containers(None, (), ("a", True), [0.5, math.nan], {}, 0)
    assert encode_error(msg) == "test.wire.containers: field 'items'[1]: expected a finite float, got nan"


def test_the_bounds_are_inclusive() -> None:
    for value in (-1e6, 1e6, 0.0):
        assert roundtrip(Scalars(1, "", True, value)).f == value


def test_a_float_without_a_range_is_an_unsupported_annotation() -> None:
    with pytest.raises(TypeError, match=r"BareFloat\.f: a float must be Annotated\[float, Range"):
        to_wire(BareFloat(1.0))


# --- to_wire -----------------------------------------------------------------------------------


def test_to_wire_shape_and_plain_values() -> None:
    wire = to_wire(Enums(Color.RED, Mode.FAST, Color.GREEN))
    assert wire == ["test.wire.enums", {"color": 1, "mode": "fast", "maybe": 2}]
    # Members must be sent as their bare values, not as enum subclasses of int/str.
    assert [type(v) for v in wire[1].values()] == [int, str, int]


def test_to_wire_turns_tuples_into_lists_recursively() -> None:
    msg = Nested({"g": [(1, Color.RED)]}, (["a", None],))
    fields = to_wire(msg)[1]
    assert fields["groups"] == {"g": [[1, 1]]} and type(fields["groups"]["g"][0]) is list
    assert fields["rows"] == [["a", None]] and type(fields["rows"]) is list
    fields = to_wire(Containers(None, (1, 2), ("a", True), [0.5], {"k": 1}, "x"))[1]
    assert fields["var"] == [1, 2] and type(fields["var"]) is list
    assert fields["pair"] == ["a", True] and type(fields["pair"]) is list


@pytest.mark.parametrize(
    ("msg", "where_reason"),
    [
        (Enums(3, Mode.FAST), "'color': expected Color value, got unknown value 3"),  # type: ignore[arg-type]
        (Enums(True, Mode.FAST), "'color': expected Color value, got bool"),  # type: ignore[arg-type]
        (Enums(Color.RED, "FAST"), "'mode': expected Mode value, got unknown value 'FAST'"),  # type: ignore[arg-type]
        (Nested({1: []}, ()), "'groups': dict keys must be str, got int"),  # type: ignore[dict-item]
    ],
)
def test_to_wire_refuses_what_the_receiver_would(msg: Any, where_reason: str) -> None:
    assert encode_error(msg) == f"{msg.TAG}: field {where_reason}"


def test_annotations_deeper_than_a_frame_allows_are_refused() -> None:
    # Field values sit inside the [tag, {fields}] list and map.
    assert roundtrip(Deepest(nested_lists(MAX_DEPTH - 2))) == Deepest(nested_lists(MAX_DEPTH - 2))
    with pytest.raises(TypeError, match="nests deeper than a frame allows"):
        to_wire(TooDeep(nested_lists(MAX_DEPTH - 1)))


def test_to_wire_rejects_unregistered_object() -> None:
    with pytest.raises(TypeError, match="not a registered message class"):
        to_wire(object())  # type: ignore[arg-type]


def test_unsupported_annotation_is_reported_on_first_use() -> None:
    with pytest.raises(TypeError, match=r"Unsupported\.s: unsupported annotation set\[int\]"):
        to_wire(Unsupported({1}))
    with pytest.raises(TypeError, match="unsupported annotation"):
        from_wire(["test.wire.unsupported", {"s": [1]}])


def test_message_classes_must_subclass_message() -> None:
    with pytest.raises(TypeError, match="must subclass Message"):

        @message("test.wire.undeclared")
        class Undeclared:
            n: int


# --- from_wire envelope errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "got"),
    [
        ({"tag": "test.wire.small"}, "got dict"),
        (("test.wire.small", {"n": 1}), "got tuple"),
        (["test.wire.small"], "got list of 1 items"),
        (["test.wire.small", 1, {"n": 1}], "got list of 3 items"),
        (None, "got None"),
    ],
)
def test_rejects_non_pair(obj: Any, got: str) -> None:
    text = decode_error(obj)
    assert text == f"expected a 2-element list [tag, fields], {got}"


def test_rejects_unknown_tag() -> None:
    assert decode_error(["test.wire.nope", {}]) == "unknown message tag 'test.wire.nope'"


def test_rejects_non_str_tag() -> None:
    text = decode_error([b"test.wire.small", {"n": 1}])
    assert text == "message tag must be str, got bytes"


def test_quotes_of_peer_data_are_bounded() -> None:
    text = decode_error(["x" * 10_000, {}])
    assert text.startswith("unknown message tag 'xxx") and len(text) < 100


def test_rejects_non_map_fields() -> None:
    text = decode_error(["test.wire.small", [1]])
    assert text == "test.wire.small: fields must be a map, got list"


def test_rejects_unknown_field() -> None:
    text = decode_error(["test.wire.small", {"n": 1, "zzz": 2}])
    assert text == "test.wire.small: unknown field 'zzz'"


def test_rejects_missing_required_field_even_if_an_optional_one_is_given() -> None:
    # Same field count as the class declares minus one, plus the defaulted field: a count-only
    # check would miss that 'mode' is absent.
    text = decode_error(["test.wire.enums", {"color": 1, "maybe": 2}])
    assert text == "test.wire.enums: missing required field 'mode'"


# --- from_wire field type errors ---------------------------------------------------------------

SCALARS_OK = {"i": 1, "s": "x", "b": False, "f": 1.5}


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
        ("s", None, "expected str, got None"),
    ],
)
def test_scalar_type_mismatch(field: str, value: Any, reason: str) -> None:
    text = decode_error(["test.wire.scalars", {**SCALARS_OK, field: value}])
    assert text == f"test.wire.scalars: field {field!r}: {reason}"


CONTAINERS_OK = {
    "opt": None,
    "var": [],
    "pair": ["a", True],
    "items": [],
    "table": {},
    "either": 0,
}


@pytest.mark.parametrize(
    ("field", "value", "where_reason"),
    [
        ("opt", True, ": expected int | None, got bool"),
        ("var", [1, 2, False], "[2]: expected int, got bool"),
        ("var", {"a": 1}, ": expected list, got dict"),
        ("pair", ["a", True, 1], ": expected 2 items for tuple[str, bool], got 3"),
        ("pair", ["a", 1], "[1]: expected bool, got int"),
        ("pair", "ab", ": expected list for tuple[str, bool], got str"),
        ("items", [1.0, "x"], "[1]: expected float, got str"),
        ("table", {"k": 1, "j": "v"}, "['j']: expected int, got str"),
        ("table", {b"k": 1}, ": map keys must be str, got bytes"),
        ("table", [], ": expected map, got list"),
        ("either", True, ": expected int | str, got bool"),
        ("either", None, ": expected int | str, got None"),
    ],
)
def test_container_type_mismatch_names_the_location(
    field: str, value: Any, where_reason: str
) -> None:
    text = decode_error(["test.wire.containers", {**CONTAINERS_OK, field: value}])
    assert text == f"test.wire.containers: field {field!r}{where_reason}"


def test_nested_location_is_outermost_first() -> None:
    wire = ["test.wire.nested", {"groups": {"g": [[1, 1], [2, 9]]}, "rows": []}]
    text = decode_error(wire)
    assert text == (
        "test.wire.nested: field 'groups'['g'][1][1]: expected Color value, got unknown value 9"
    )


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
    assert decode_error(["test.wire.enums", fields]) == f"test.wire.enums: field {where_reason}"


def test_enum_decodes_to_members() -> None:
    msg = from_wire(["test.wire.enums", {"color": 2, "mode": "slow", "maybe": 1}])
    assert msg.color is Color.GREEN and msg.mode is Mode.SLOW and msg.maybe is Color.RED


def test_scan_results_travel_as_ints_and_decode_to_the_enum() -> None:
    wire = to_wire(m.CollapseResult(3, 10))  # type: ignore[arg-type]
    assert wire == ["peer.collapse_result", {"req": 3, "result": 10}] and type(wire[1]["result"]) is int
    back = from_wire(over_msgpack(wire))
    assert back.result is m.ScanResult.SCAN_PTE_MAPPED_HUGEPAGE


# --- requests, their replies and the operation tables -------------------------------------------


@pytest.fixture
def Add() -> Any:
    """A request of the test's own; unregistered afterwards, so no operation table keeps it."""

    @request("test.wire.add", COLLAPSED, run="add", unwrap="total")
    class Add(Request[Sum]):
        id: int
        a: int
        b: int = 1

    yield Add
    del REGISTRY["test.wire.add"], REGISTRY["test.wire.add.reply"]


def test_a_request_declares_its_reply_and_its_operation(Add: Any) -> None:
    assert Add.ARGS == ("a", "b")
    assert Add(7, 2).args() == (2, 1)
    assert Add.REPLY.TAG == "test.wire.add.reply" and REGISTRY["test.wire.add.reply"] is Add.REPLY
    assert Add.OP.served_by == (COLLAPSED,) and Add.OP.route == COLLAPSED and Add.OP.world == "add"
    reply = Add.REPLY(7, {"total": 3})
    assert roundtrip(reply) == reply
    assert decode_error(["test.wire.add.reply", {"id": 7, "result": {"total": "3"}}]) == (
        "test.wire.add.reply: field 'result'['total']: expected int, got str"
    )


def test_every_request_has_its_reply_and_a_route_or_several_actors() -> None:
    for cls in requests():
        assert cls.TAG.startswith("client.") and cls.REPLY.TAG == cls.TAG + ".reply"
        op = cls.OP
        assert op.served_by and (op.route is not None or len(op.served_by) > 1)
    table = {cls.TAG for cls in ops_of(REMAPD)}
    assert {"client.mmap", "client.fault", "client.status", "client.vmstat"} <= table
    assert "client.file_create" not in table
    assert routes()[m.FileCreate] == COLLAPSED and routes()[m.SysfsGet] == COLLAPSED
    assert m.Vmstat not in routes() and m.Status not in routes()


def test_a_reply_without_a_result_carries_none() -> None:
    assert decode_message(encode_message(m.Sync.REPLY(4))) == m.Sync.REPLY(4, None)


# --- caching -----------------------------------------------------------------------------------


def test_decoding_does_not_resolve_annotations_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    wire = ["test.wire.small", {"n": 5}]
    assert from_wire(wire) == Small(5)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("get_type_hints called on the hot path")

    monkeypatch.setattr(typing, "get_type_hints", fail)
    assert from_wire(wire) == Small(5)
    assert to_wire(Small(6)) == ["test.wire.small", {"n": 6}]


# ---- integer ranges: addresses, offsets, lengths (issue 14, item 10) -----------------------------


@pytest.mark.parametrize(
    ("fields", "where_reason"),
    [
        ({"offset": (1 << 64) - 4096}, "field 'offset': 18446744073709547520 is outside 0..9223372036854775807"),
        ({"offset": -4096}, "field 'offset': -4096 is outside 0..9223372036854775807"),
        ({"addr": -1}, "field 'addr': -1 is outside 0..18446744073709551615"),
        ({"length": -4096}, "field 'length': -4096 is outside 0..18446744073709551615"),
        ({"offset": True}, "field 'offset': expected int, got bool"),
    ],
)
def test_addresses_offsets_and_lengths_have_their_c_types_range(fields: dict[str, Any], where_reason: str) -> None:
    wire = ["client.mmap", {"id": 1, "pid": 1, "addr": None, "length": 4096, "name": "f", **fields}]
    with pytest.raises(ProtocolError) as info:
        from_wire(wire)
    assert str(info.value) == f"client.mmap: {where_reason}"
    # The sender refuses it too, so the client library answers EINVAL without sending.
    kwargs = {"pid": 1, "addr": None, "length": 4096, "name": "f", **fields}
    with pytest.raises(ProtocolError) as info:
        to_wire(m.Mmap(1, **kwargs))
    assert str(info.value) == f"client.mmap: {where_reason}"


def test_integer_ranges_leave_valid_values_alone() -> None:
    for msg in (
        m.Mmap(1, 1, None, 4096, "f", offset=(1 << 63) - 4096),
        m.Mmap(1, 1, (1 << 64) - 4096, 4096, "f"),
        m.Munmap(2, 1, 0, (1 << 64) - 1),
        m.FileWrite(3, "f", (1 << 63) - 1, 0),
        m.Touch(4, 1, 0x7F0000000000, 1 << 40),
    ):
        assert from_wire(to_wire(msg)) == msg
    # Ints beyond the request fields keep their plain annotation (a file size from the peer).
    assert from_wire(to_wire(m.FileInfo(1, "f", -1, False))).size == -1


def test_an_int_range_needs_int_bounds() -> None:
    @message("test.bad_int_range")
    class BadIntRange(Message):
        x: Annotated[int, Range(0.0, 1.5)]

    try:
        with pytest.raises(TypeError, match="int bounds"):
            to_wire(BadIntRange(1))
    finally:
        del REGISTRY["test.bad_int_range"]


def test_rmap_delta_travels_as_packed_columns() -> None:
    """Protocol version 5: RmapDelta's rows travel as msgpack bins of little-endian integers
    (issue 10: 512 rows a collapse cost ~50 us as tuples); a delta column of zeros is empty."""
    rows = ((5, -1, 0, 0), ((1 << 63) - 1, 2, -3, (1 << 31) - 1), (9, -(1 << 31), 0, 0))
    msg = m.RmapDelta.of(rows)
    assert msg.pfns[:8] == (5).to_bytes(8, "little") and msg.ptes[:4] == (-1).to_bytes(4, "little", signed=True)
    body = msgpack.packb(to_wire(msg), use_bin_type=True)
    back = from_wire(msgpack.unpackb(body, raw=False))
    assert back == msg and back.rows == rows and back.nrows == 3
    zap = m.RmapDelta.of(((7, -1, 0, 0), (8, -1, 0, 0)))
    assert (zap.pmds, zap.pins) == (b"", b"") and zap.rows == ((7, -1, 0, 0), (8, -1, 0, 0))
    assert m.RmapDelta.of(()).rows == ()


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"pfns": [5]}, "field 'pfns': expected bytes (packed <q integers), got list"),
        ({"pfns": "12345678"}, "field 'pfns': expected bytes (packed <q integers), got str"),
        ({"pfns": b"\0" * 7}, "field 'pfns': 7 bytes is not a whole number of packed <q integers (8 bytes each)"),
        ({"pfns": b"", "ptes": b"\0" * 6}, "field 'ptes': 6 bytes is not a whole number of packed <i integers"),
        ({"pfns": b"\0" * 8 * (m.MAX_RMAP_ROWS + 1)}, f"field 'pfns': {m.MAX_RMAP_ROWS + 1} packed <q integers (at most {m.MAX_RMAP_ROWS})"),
        ({"pfns": b"", "pins": b"\0" * 4 * (m.MAX_RMAP_ROWS + 1)}, f"(at most {m.MAX_RMAP_ROWS})"),
        ({"ptes": b""}, "missing required field 'pfns'"),
    ],
)
def test_packed_columns_are_checked_both_ways(fields: dict[str, Any], reason: str) -> None:
    """A column of another type, a partial integer or too many integers is a ProtocolError that
    says so, on the way in and (for what a sender could build) on the way out."""
    with pytest.raises(ProtocolError) as info:
        from_wire(["peer.rmap_delta", fields])
    assert str(info.value).startswith("peer.rmap_delta: ") and reason in str(info.value)
    if "pfns" in fields:
        with pytest.raises(ProtocolError, match=re.escape(reason)):
            to_wire(m.RmapDelta(**fields))


def test_a_packed_column_holds_little_endian_signed_integers() -> None:
    @message("test.bad_packed")
    class BadPacked(Message):
        x: Annotated[bytes, Packed(">q", 4)]

    try:
        with pytest.raises(TypeError, match="little-endian signed integers"):
            to_wire(BadPacked(b""))
    finally:
        del REGISTRY["test.bad_packed"]


def test_the_remappers_batch_sends_its_rows_in_order_as_columns() -> None:
    """remapd's RmapBatch keeps PMD and pin deltas only up to the last row that has one; the
    message still carries every row, in order, and leaves out all-zero columns."""
    from remapd.rmap import RmapBatch

    batch = RmapBatch()
    batch.add(5, pte=-1)
    batch.unmap_ptes([6, 7])
    batch.add(8, pmd=1)
    batch.unmap_ptes([9])
    rows = ((5, -1, 0, 0), (6, -1, 0, 0), (7, -1, 0, 0), (8, 0, 1, 0), (9, -1, 0, 0))
    delta = batch.delta()
    assert delta.rows == rows and delta.pins == b"" and len(batch) == 5
    assert batch.take() == delta and not batch and batch.delta() == m.RmapDelta(b"")
    batch.unmap_ptes([3, 4])
    assert (batch.delta().pmds, batch.delta().rows) == (b"", ((3, -1, 0, 0), (4, -1, 0, 0)))


def test_unmap_mapping_names_at_most_a_folio_of_packed_pfns() -> None:
    pfns = b"".join(p.to_bytes(8, "little") for p in range(1, 513))
    msg = m.UnmapMapping(1, 7, 0, 512, pfns, False)
    assert from_wire(to_wire(msg)) == msg
    with pytest.raises(ProtocolError, match=r"field 'pfns': 513 packed <q integers \(at most 512\)"):
        from_wire(["peer.unmap_mapping", {**to_wire(msg)[1], "pfns": pfns + pfns[:8]}])
