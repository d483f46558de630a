"""Hostile input against the sans-IO decoder (shared/protocol/framing.py and codec.py): random,
truncated, oversized, deeply nested and wrong-typed frames, fed in arbitrary pieces. Whatever
arrives, the decoder raises nothing but the documented ProtocolError (FrameError when the stream
is lost), a FrameError poisons it for good, a well-framed bad message leaves it usable, and
decoding allocates no more than a small multiple of the bytes it was given.

scripts/fuzz_frames.py runs the same target under atheris (coverage-guided) for as long as asked.
"""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any

import hypothesis.strategies as st
import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings

from shared.knobs import Knobs
from shared.protocol.codec import ProtocolError
from shared.protocol.framing import (
    MAX_CONTAINERS,
    MAX_DEPTH,
    MAX_FRAME_BYTES,
    MAX_ITEMS,
    MAX_STR,
    FrameDecoder,
    FrameError,
    decode_message,
    encode_message,
)
from shared.protocol.schema import Message
from shared.sim.world import Pending, World
from shared.units import HPAGE_PMD_SIZE

MB = 1 << 20
HEADER = struct.Struct(">I")
# Decoding a frame allocates at most this many bytes per byte fed, plus SLACK: the worst case is
# an array of two-character strings (a 49-byte str object and an 8-byte slot for 3 wire bytes);
# arrays and maps are capped per frame (MAX_CONTAINERS), or an empty map would cost 74 times.
AMPLIFICATION = 24
SLACK = 256 * 1024


def _corpus() -> list[bytes]:
    """Real frames, one or a few of every kind a short session sends (peer and client)."""
    frames: list[bytes] = []

    class Recording(World):
        def wire(self, msg: Message) -> Message:
            frames.append(encode_message(msg))
            return super().wire(msg)

    w = Recording(Knobs(enabled="always", shmem_enabled="advise", scan_sleep_millisecs=10, retry_policy="lockless"))
    w.file_create("lib", 4 * MB)
    w.file_create("shm", 2 * MB, shmem=True)
    w.spawn(1)
    a = w.mmap(1, None, 4 * MB, "lib", prot="rx", shared=False)
    w.madvise(1, a, 4 * MB, "hugepage")
    w.touch(1, a, 4 * MB, stride=64 * 1024)
    w.wait_scans(2)
    s = w.mmap(1, None, 2 * MB, "shm", prot="rw")
    w.touch(1, s, 2 * MB, write=True)
    w.madvise(1, s, 2 * MB, "pageout")
    w.fork(1, 2)
    w.pin(2, a)
    w.unpin(2, a)
    w.uprobe("add", "lib", 0x1000)
    w.uprobe("del", "lib", 0x1000)
    w.madvise(2, a, HPAGE_PMD_SIZE, "collapse")
    held: Pending = w.lock(1, 5.0)
    w.advance(10)
    assert held.done
    w.sysfs_set("thpsplit/retry_policy", "per-pmd")
    w.file_write("lib", 0, 8192)
    w.file_truncate("lib", MB)
    w.file_ls()
    w.smaps(1)
    w.vmstat()
    w.meminfo()
    w.restart_collapser()
    seen: dict[str, list[bytes]] = {}
    for frame in frames:
        tag = msgpack.unpackb(frame[4:])[0]
        if len(seen.setdefault(tag, [])) < 3:
            seen[tag].append(frame)
    return [f for group in seen.values() for f in group]


CORPUS = _corpus()


def test_the_corpus_covers_the_protocol():
    tags = {msgpack.unpackb(f[4:])[0] for f in CORPUS}
    assert len(tags) >= 40, sorted(tags)
    for frame in CORPUS:
        assert encode_message(decode_message(frame)) == frame


# -- the target ------------------------------------------------------------------------------


def decode_stream(data: bytes, cuts: list[int]) -> list[Any]:
    """Feed ``data`` in pieces cut at ``cuts`` and decode every message it holds: returns the
    messages and the ProtocolErrors met. Anything else raised is a failure of the decoder."""
    decoder = FrameDecoder()
    out: list[Any] = []
    bounds = sorted({c for c in cuts if 0 < c < len(data)})
    pieces = [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)])]
    poisoned = False
    for piece in pieces:
        if poisoned:
            with pytest.raises(FrameError):
                decoder.feed(piece)
            continue
        decoder.feed(piece)
        while True:
            try:
                msg = decoder.next_message()
            except FrameError as err:
                out.append(err)
                poisoned = True
                assert decoder.statistics().bytes_buffered == 0
                with pytest.raises(FrameError):
                    decoder.next_message()
                break
            except ProtocolError as err:
                out.append(err)  # a well-framed bad message: the stream goes on
                continue
            if msg is None:
                break
            out.append(msg)
    # Never holds more than one frame's worth beyond what it could not yet decode.
    assert decoder.statistics().bytes_buffered <= len(data)
    return out


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=6), children, max_size=6),
    max_leaves=24,
)


# -- random bytes ----------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048), st.lists(st.integers(0, 2048), max_size=8))
def test_random_bytes_raise_only_protocol_errors(data, cuts):
    decode_stream(data, cuts)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6), st.lists(st.integers(0, 4096), max_size=8))
def test_random_bodies_in_valid_frames_raise_only_protocol_errors(bodies, cuts):
    decode_stream(b"".join(frame(b) for b in bodies), cuts)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(msgpack_values, min_size=1, max_size=4), st.lists(st.integers(0, 4096), max_size=6))
def test_random_msgpack_values_raise_only_protocol_errors(values, cuts):
    data = b"".join(frame(msgpack.packb(v, use_bin_type=True)) for v in values if v is not None)
    decode_stream(data, cuts)


# -- truncated -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CORPUS), st.data())
def test_a_truncated_frame_waits_for_the_rest(whole, data):
    cut = data.draw(st.integers(0, len(whole) - 1))
    decoder = FrameDecoder()
    decoder.feed(whole[:cut])
    assert decoder.next_message() is None
    decoder.feed(whole[cut:])
    assert encode_message(decoder.next_message()) == whole


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CORPUS), st.data())
def test_a_frame_cut_short_inside_its_body_is_refused(whole, data):
    """A header that promises fewer bytes than the message needs: the body is not one value."""
    body = whole[4:]
    cut = data.draw(st.integers(0, len(body) - 1))
    out = decode_stream(frame(body[:cut]) + whole, [])
    assert isinstance(out[0], ProtocolError)


# -- wrong-typed -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CORPUS), st.data())
def test_wrong_typed_fields_raise_only_protocol_errors_and_leave_the_stream_usable(whole, data):
    tag, fields = msgpack.unpackb(whole[4:], raw=False)
    fields = dict(fields)
    how = data.draw(st.sampled_from(("replace", "drop", "add", "tag", "shape")))
    if how == "replace" and fields:
        fields[data.draw(st.sampled_from(sorted(fields)))] = data.draw(msgpack_values)
    elif how == "drop" and fields:
        del fields[data.draw(st.sampled_from(sorted(fields)))]
    elif how == "add":
        fields[data.draw(st.text(max_size=8))] = data.draw(msgpack_values)
    elif how == "tag":
        tag = data.draw(st.text(max_size=24) | st.sampled_from([msgpack.unpackb(f[4:])[0] for f in CORPUS]))
    obj: Any = [tag, fields]
    if how == "shape":
        obj = data.draw(st.sampled_from(([tag], [tag, fields, 1], [fields, tag], {"tag": tag}, [tag, list(fields)])))
    body = msgpack.packb(obj, use_bin_type=True)
    out = decode_stream(frame(body) + whole, [])
    assert len(out) == 2 and isinstance(out[0], (Message, ProtocolError))
    assert encode_message(out[1]) == whole  # the next frame still decodes


# -- oversized, nested, amplified ------------------------------------------------------------


def test_an_oversized_header_is_refused_before_its_body_is_buffered():
    decoder = FrameDecoder()
    decoder.feed(HEADER.pack(MAX_FRAME_BYTES + 1))
    with pytest.raises(FrameError, match="exceeds the limit"):
        decoder.next_message()
    assert decoder.statistics().bytes_buffered == 0
    with pytest.raises(FrameError):
        decoder.feed(b"\x00" * 1024)


@pytest.mark.parametrize(
    "body",
    [
        b"\xdd" + struct.pack(">I", MAX_ITEMS + 1),  # an array claiming one item too many
        b"\xdf" + struct.pack(">I", MAX_ITEMS + 1),  # a map likewise
        b"\xdb" + struct.pack(">I", MAX_STR + 1),  # a string one byte too long
        b"\xc6" + struct.pack(">I", MAX_STR + 1),  # bin likewise
        b"\xdd" + struct.pack(">I", MAX_ITEMS),  # a full-size array header with nothing after it
        b"\xc1",  # the one byte msgpack never uses
        b"\x92\xa3abc",  # an array missing its second item
    ],
)
def test_claims_beyond_the_limits_or_the_bytes_are_refused(body):
    out = decode_stream(frame(body), [])
    assert len(out) == 1 and isinstance(out[0], FrameError)


@pytest.mark.parametrize("depth", [MAX_DEPTH - 2, MAX_DEPTH, MAX_DEPTH + 1, 100, 100_000])
@pytest.mark.parametrize("kind", ["array", "map"])
def test_deep_nesting_is_refused_without_recursing(depth, kind):
    body = (b"\x91" if kind == "array" else b"\x81\xa1k") * depth + b"\xc0"
    out = decode_stream(frame(body), [])
    assert len(out) == 1 and isinstance(out[0], ProtocolError)
    if depth > MAX_DEPTH:
        assert isinstance(out[0], FrameError)


def _peak_while_decoding(data: bytes) -> int:
    decoder = FrameDecoder()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            decoder.feed(data)
            while decoder.next_message() is not None:
                pass
        except ProtocolError:
            pass
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "value",
    [
        pytest.param([{}] * 1_000_000, id="a million empty maps"),
        pytest.param([[]] * 1_000_000, id="a million empty arrays"),
        pytest.param([[{}] * 100_000] * 10, id="nested empty maps"),
        pytest.param(["ab"] * 300_000, id="two-character strings"),
        pytest.param([70_000] * 300_000, id="ints"),
        pytest.param([1.5] * 200_000, id="floats"),
    ],
)
def test_decoding_allocates_a_small_multiple_of_the_frame(value):
    data = frame(msgpack.packb(value, use_bin_type=True))
    assert len(data) <= MAX_FRAME_BYTES
    assert _peak_while_decoding(data) <= AMPLIFICATION * len(data) + SLACK


def test_containers_are_capped_per_frame():
    many = frame(msgpack.packb([{}] * (MAX_CONTAINERS + 1)))
    out = decode_stream(many, [])
    assert isinstance(out[0], FrameError) and "arrays and maps" in str(out[0])
    # The largest frame the peers exchange still decodes: an RmapDelta of 65,536 rows.
    from shared.protocol import messages as m
    from shared.shell.peer import MAX_ROWS_PER_FRAME

    rows = tuple((i + 1, 1, 0, 0) for i in range(MAX_ROWS_PER_FRAME))
    assert decode_message(encode_message(m.RmapDelta.of(rows))) == m.RmapDelta.of(rows)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(msgpack_values, min_size=1, max_size=3) | st.lists(st.binary(max_size=400), min_size=1, max_size=3))
def test_random_frames_allocate_a_small_multiple_of_their_size(values):
    data = b"".join(
        frame(v if isinstance(v, bytes) else msgpack.packb(v, use_bin_type=True)) for v in values if v is not None
    )
    assert _peak_while_decoding(data) <= AMPLIFICATION * len(data) + SLACK
