"""Tests for shared.framing: length-prefixed msgpack frames on a byte stream."""

from __future__ import annotations

import itertools
import struct
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.protocol.codec import ProtocolError
from shared.protocol.framing import (
    MAX_DEPTH,
    MAX_FRAME_BYTES,
    MAX_ITEMS,
    MAX_STR,
    FrameDecoder,
    FrameDecoderStatistics,
    FrameError,
    decode_message,
    encode_frame,
    encode_message,
)
from shared.protocol.schema import Message, message


@message("test.framing.ping")
class Ping(Message):
    seq: int
    note: str = ""


@message("test.framing.blob")
class Blob(Message):
    data: str
    parts: tuple[int, ...]


MESSAGES = [Ping(1), Blob("\x00\xff" * 50, (1, 2, 3)), Ping(2, "two"), Blob("", ()), Ping(3)]


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def nested(depth: int) -> Any:
    """``depth`` containers deep, alternating lists and maps."""
    value: Any = 0
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def drain(decoder: FrameDecoder) -> list[Any]:
    out = []
    while (msg := decoder.next_message()) is not None:
        out.append(msg)
    return out


def frame_error(decoder: FrameDecoder) -> FrameError:
    with pytest.raises(FrameError) as info:
        decoder.next_object()
    return info.value


# --- encoding ----------------------------------------------------------------------------------


def test_frame_layout_is_big_endian_length_then_msgpack() -> None:
    obj = {"a": [1, b"\x01", "s"]}
    frame = encode_frame(obj)
    body = msgpack.packb(obj, use_bin_type=True)
    assert frame == len(body).to_bytes(4, "big") + body


def test_encode_message_frames_the_wire_form() -> None:
    frame = encode_message(Ping(7, "x"))
    wire = ["test.framing.ping", {"seq": 7, "note": "x"}]
    assert msgpack.unpackb(frame[4:], raw=False) == wire


def test_decode_message_reads_back_one_whole_frame() -> None:
    for msg in MESSAGES:
        assert decode_message(encode_message(msg)) == msg
    with pytest.raises(FrameError, match="exactly one whole frame"):
        decode_message(encode_message(Ping(1)) + encode_message(Ping(2)))
    with pytest.raises(FrameError, match="exactly one whole frame"):
        decode_message(encode_message(Ping(1))[:-1])
    with pytest.raises(ProtocolError, match="unknown message tag"):
        decode_message(encode_frame(["test.framing.nope", {}]))


def test_encode_frame_refuses_what_the_peer_would_reject() -> None:
    with pytest.raises(ValueError, match="exceeds MAX_FRAME_BYTES"):
        encode_frame(b"x" * MAX_FRAME_BYTES)
    with pytest.raises(ValueError, match="cannot hold None"):
        encode_frame(None)


def test_frame_error_is_a_protocol_error() -> None:
    assert issubclass(FrameError, ProtocolError) and issubclass(ProtocolError, ValueError)


# --- decoding streams --------------------------------------------------------------------------


def test_many_frames_fed_at_once_decode_in_order() -> None:
    msgs = [Ping(i, str(i)) for i in range(1000)]
    decoder = FrameDecoder()
    decoder.feed(b"".join(encode_message(m) for m in msgs))
    assert drain(decoder) == msgs
    assert decoder.statistics() == FrameDecoderStatistics(frames_decoded=1000, bytes_buffered=0)


def test_one_byte_at_a_time_yields_the_same_messages() -> None:
    stream = b"".join(encode_message(m) for m in MESSAGES)
    decoder = FrameDecoder()
    got = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        got.extend(drain(decoder))
    assert got == MESSAGES
    assert decoder.statistics().bytes_buffered == 0


@given(st.lists(st.integers(min_value=0, max_value=400), max_size=20))
def test_any_split_yields_the_same_messages(cuts: list[int]) -> None:
    stream = b"".join(encode_message(m) for m in MESSAGES)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder()
    got = []
    for start, end in itertools.pairwise(points):
        decoder.feed(memoryview(stream)[start:end])
        got.extend(drain(decoder))
    assert got == MESSAGES


def test_partial_frame_waits_and_is_counted_as_buffered() -> None:
    frame = encode_message(Ping(5))
    decoder = FrameDecoder()
    decoder.feed(frame[:3])
    assert decoder.next_message() is None
    decoder.feed(frame[3:-1])
    assert decoder.next_message() is None
    assert decoder.statistics() == FrameDecoderStatistics(0, len(frame) - 1)
    decoder.feed(frame[-1:])
    assert decoder.next_message() == Ping(5)
    assert decoder.statistics() == FrameDecoderStatistics(1, 0)


def test_next_object_returns_plain_values() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame([1, "s", b"b", {"k": 2.5}]) + encode_frame(False))
    assert decoder.next_object() == [1, "s", b"b", {"k": 2.5}]
    assert decoder.next_object() is False
    assert decoder.next_object() is None


def test_consumed_bytes_are_reclaimed_when_draining_one_frame_per_feed() -> None:
    frame = encode_message(Blob("x" * 200, ()))
    count = 5000
    decoder = FrameDecoder()
    tracemalloc.start()
    try:
        for _ in range(count):
            decoder.feed(frame)
            assert decoder.next_message() is not None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Keeping consumed frames would hold count * len(frame) (over 1 MB) at the end.
    assert peak < 50 * len(frame)
    assert decoder.statistics() == FrameDecoderStatistics(count, 0)


# --- size limits -------------------------------------------------------------------------------


def test_oversized_length_is_rejected_from_the_header_alone() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    decoder.feed(struct.pack(">I", 101))
    assert str(frame_error(decoder)) == "frame of 101 bytes exceeds the limit of 100 bytes"


def test_default_limit_rejects_one_byte_more_than_max() -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", MAX_FRAME_BYTES + 1))
    assert f"frame of {MAX_FRAME_BYTES + 1} bytes" in str(frame_error(decoder))


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    body = msgpack.packb(b"y" * 95, use_bin_type=True)
    assert len(body) == 97
    decoder = FrameDecoder(max_frame_bytes=97)
    decoder.feed(raw_frame(body))
    assert decoder.next_object() == b"y" * 95


@pytest.mark.parametrize(
    ("obj", "limit"),
    [
        ("s" * (MAX_STR + 1), "max_str_len"),
        (b"b" * (MAX_STR + 1), "max_bin_len"),
        ([None] * (MAX_ITEMS + 1), "max_array_len"),
    ],
)
def test_value_size_limits(obj: Any, limit: str) -> None:
    decoder = FrameDecoder()
    decoder.feed(raw_frame(msgpack.packb(obj, use_bin_type=True)))
    assert limit in str(frame_error(decoder))


def test_values_at_the_size_limits_are_accepted() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(["s" * MAX_STR, b"b" * MAX_STR]))
    assert decoder.next_object() == ["s" * MAX_STR, b"b" * MAX_STR]


# --- malformed bodies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # a byte msgpack never uses
        b"\x93\x01\x02",  # array of 3 with only 2 items
        b"",  # no value at all
        b"\xa2\xff\xfe",  # str that is not UTF-8
        b"\x81\x01\x02",  # map with an int key
    ],
)
def test_malformed_body_is_rejected(body: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(raw_frame(body))
    reason = str(frame_error(decoder))
    assert reason.startswith("undecodable frame body: ")
    # Always a reason: msgpack's FormatError has no text, its name stands in (issue 14, item 10).
    assert reason.removeprefix("undecodable frame body: ").strip()
    if body == b"\xc1":
        assert reason == "undecodable frame body: FormatError"


def test_trailing_bytes_are_rejected() -> None:
    decoder = FrameDecoder()
    decoder.feed(raw_frame(msgpack.packb([1]) + b"\x01\x02"))
    assert str(frame_error(decoder)) == "frame body has 2 trailing bytes after its msgpack value"


def test_nesting_at_the_limit_is_accepted_and_one_more_rejected() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(nested(MAX_DEPTH)) + encode_frame(nested(MAX_DEPTH + 1)))
    assert decoder.next_object() == nested(MAX_DEPTH)
    assert str(frame_error(decoder)) == f"frame nests deeper than {MAX_DEPTH} levels"
    assert MAX_DEPTH == 16


def test_depth_counts_the_deepest_branch_not_the_first() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame([1, [2], {"a": [], "b": nested(MAX_DEPTH - 1)}]))
    assert "deeper" in str(frame_error(decoder))


# --- error handling ----------------------------------------------------------------------------


def test_frame_error_poisons_the_decoder() -> None:
    decoder = FrameDecoder()
    decoder.feed(raw_frame(b"\xc1") + encode_message(Ping(1)))
    error = frame_error(decoder)
    assert frame_error(decoder) is error
    with pytest.raises(FrameError) as info:
        decoder.next_message()
    assert info.value is error
    with pytest.raises(FrameError) as info:
        decoder.feed(encode_message(Ping(2)))
    assert info.value is error
    assert decoder.statistics() == FrameDecoderStatistics(frames_decoded=0, bytes_buffered=0)


def test_invalid_message_in_a_valid_frame_does_not_poison() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(["test.framing.nope", {}]) + encode_message(Ping(9)))
    with pytest.raises(ProtocolError, match="unknown message tag") as info:
        decoder.next_message()
    assert not isinstance(info.value, FrameError)
    assert decoder.next_message() == Ping(9)


def test_nil_frame_is_rejected_without_poisoning() -> None:
    # None is next_object's "no frame yet"; a nil frame must not be silently skipped.
    decoder = FrameDecoder()
    decoder.feed(raw_frame(b"\xc0") + encode_message(Ping(4)))
    with pytest.raises(ProtocolError, match="frame holds nil") as info:
        decoder.next_message()
    assert not isinstance(info.value, FrameError)
    assert decoder.next_message() == Ping(4)
