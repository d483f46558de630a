"""Length-prefixed msgpack frames on a byte stream.

Sans-IO: the caller moves bytes; this module only turns objects into frames and frames back into
objects. A frame is a 4-byte big-endian unsigned length followed by that many bytes holding
exactly one msgpack value: one message ``[tag, fields]``, or an array of them (a frame of many
messages, :func:`encode_batch`, which a receiver takes in order). Frames come from an untrusted peer, so every size is bounded before
memory is committed to it.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from collections import deque
from typing import Any

import msgpack

from shared.clip import clip
from shared.protocol.codec import MAX_DEPTH, ProtocolError, from_wire, to_wire
from shared.protocol.schema import Message

__all__ = [
    "MAX_CONTAINERS",
    "MAX_DEPTH",
    "MAX_FRAME_BYTES",
    "MAX_ITEMS",
    "MAX_STR",
    "FrameDecoder",
    "FrameDecoderStatistics",
    "FrameError",
    "batchable_body",
    "decode_message",
    "encode_batch",
    "encode_frame",
    "encode_message",
]

# Largest frame body either side accepts; bounds the memory one frame can claim.
MAX_FRAME_BYTES = 4 * 1024 * 1024
# MAX_DEPTH (from the codec, which checks message annotations against it): deepest nesting of
# arrays and maps in a frame; bounds recursion when walking decoded values.
# Longest array or map in a frame, so a tiny header cannot make msgpack preallocate millions.
MAX_ITEMS = 1_000_000
# Longest str or bin value in a frame, in bytes.
MAX_STR = 1024 * 1024
# Most arrays and maps in one frame, all levels together. Decoded, an empty map costs ~72 bytes
# for the 1 byte it takes on the wire: a 4 MiB frame of them would claim ~300 MB before the codec
# could refuse it. The frames with the most either side sends, a Remap or Audit request of
# 65,536 rows (shared.shell.peer.MAX_ROWS_PER_FRAME), hold about 65,540; twice that leaves room.
MAX_CONTAINERS = 2 * 65536

_HEADER = struct.Struct(">I")
# msgpack's decoder with the limits above: strings as str, only str/int map keys.
_unpackb = functools.partial(
    msgpack.unpackb,
    raw=False,
    strict_map_key=True,
    max_str_len=MAX_STR,
    max_bin_len=MAX_STR,
    max_array_len=MAX_ITEMS,
    max_map_len=MAX_ITEMS,
)
# Frames up to this size are decoded from a copy of their bytes, larger ones through a view of
# the buffer. Below MAX_CONTAINERS: such a frame cannot hold more arrays and maps than allowed.
_COPY_BYTES = 16 * 1024
# A frame of many messages (encode_batch): what each may weigh and how many it holds; 256 bodies
# of at most 4 KiB stay far below MAX_FRAME_BYTES and MAX_CONTAINERS.
MAX_BATCHED_BODY = 4096
MAX_BATCH_MESSAGES = 256


class FrameError(ProtocolError):
    """The byte stream is not a valid sequence of frames; its position is lost for good."""


class _TooManyContainers(Exception):
    pass


class _ContainerBudget:
    """msgpack's list_hook and object_hook: counts the arrays and maps of one frame as each is
    completed, and stops the decoding past :data:`MAX_CONTAINERS`."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_CONTAINERS

    def __call__(self, obj: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise _TooManyContainers
        return obj


@dataclasses.dataclass(frozen=True, slots=True)
class FrameDecoderStatistics:
    """A snapshot of a :class:`FrameDecoder`.

    Attributes:
        frames_decoded: frames turned into objects so far.
        bytes_buffered: bytes fed but not yet consumed by a decoded frame.
    """

    frames_decoded: int
    bytes_buffered: int


def encode_frame(obj: Any) -> bytes:
    """Encode ``obj`` as one frame.

    Args:
        obj: a msgpack-able value other than None; bytes are sent as bin, str as str.
    Returns:
        The 4-byte big-endian length followed by the msgpack body.
    Errors:
        ValueError: ``obj`` is None (the decoder reserves None for "no frame yet") or the body
        exceeds MAX_FRAME_BYTES, which the peer would reject, losing the stream; msgpack's own
        TypeError/OverflowError for values it cannot encode.
    The peer also rejects values beyond MAX_DEPTH, MAX_ITEMS or MAX_STR; :func:`encode_message`
    enforces the depth, the sizes are the caller's to respect.
    """
    if obj is None:
        raise ValueError("a frame cannot hold None: the decoder returns None for 'no frame yet'")
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {len(body)} bytes exceeds MAX_FRAME_BYTES ({MAX_FRAME_BYTES})")
    return _HEADER.pack(len(body)) + body


def encode_message(msg: Message) -> bytes:
    """Encode ``msg`` as one frame: ``encode_frame(to_wire(msg))``; raises what those raise."""
    return encode_frame(to_wire(msg))


def batchable_body(msg: Message) -> bytes | None:
    """``msg``'s msgpack body if it may travel in a frame of many messages (small, and shallow
    enough to nest one level deeper), else None: it goes as a frame of its own.

    Errors: as :func:`encode_message`.
    """
    wire = to_wire(msg)
    body = msgpack.packb(wire, use_bin_type=True)
    if len(body) > MAX_BATCHED_BODY or not _within_depth(wire, MAX_DEPTH - 1):
        return None
    return body


def encode_batch(bodies: list[bytes]) -> bytes:
    """One frame holding the messages whose bodies (:func:`batchable_body`) are given, in order:
    an array of ``[tag, fields]`` arrays. At most :data:`MAX_BATCH_MESSAGES` bodies of at most
    :data:`MAX_BATCHED_BODY` bytes each, so the frame stays within every limit. A lone message
    is a frame of its own (as :func:`encode_message` makes it): a receiver takes it with less
    work."""
    n = len(bodies)
    if not 0 < n <= MAX_BATCH_MESSAGES:
        raise ValueError(f"a batch frame holds 1..{MAX_BATCH_MESSAGES} messages, not {n}")
    if n == 1:
        return _HEADER.pack(len(bodies[0])) + bodies[0]
    header = bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
    body = header + b"".join(bodies)
    return _HEADER.pack(len(body)) + body


def decode_message(frame: bytes) -> Message:
    """Decode one whole frame (as :func:`encode_message` made it) back into its message, with
    every limit a stream decoder applies.

    Errors:
        FrameError, ProtocolError: as :meth:`FrameDecoder.next_message`, or the bytes are not
        exactly one frame.
    """
    decoder = FrameDecoder()
    decoder.feed(frame)
    msg = decoder.next_message()
    if msg is None or decoder.statistics().bytes_buffered:
        raise FrameError("expected exactly one whole frame")
    return msg


def _within_depth(obj: Any, budget: int) -> bool:
    """Whether ``obj`` nests at most ``budget`` arrays/maps deep (scalars nest 0 deep)."""
    kind = type(obj)
    if kind is list:
        children: Any = obj
    elif kind is dict:
        # strict_map_key leaves only str and bytes keys, which cannot nest.
        children = obj.values()
    else:
        return True
    if budget == 0:
        return False
    budget -= 1
    for child in children:
        kind = type(child)
        if (kind is list or kind is dict) and not _within_depth(child, budget):
            return False
    return True


class FrameDecoder:
    """Splits a byte stream into frames and decodes them.

    Feed bytes as they arrive with :meth:`feed`, then call :meth:`next_object` or
    :meth:`next_message` until it returns None. Frames may be split anywhere across feeds.

    A :class:`FrameError` poisons the decoder: the frame boundary is lost, so every later call
    raises the same error and the connection must be dropped. A :class:`ProtocolError` from
    :meth:`next_message` about a well-framed but invalid message leaves the stream usable.

    Memory: the decoder holds what was fed and not yet decoded (plus consumed bytes at most equal
    to that, reclaimed on the next feed); a frame whose header announces more than
    ``max_frame_bytes`` is rejected before its body is buffered. Decoding many frames costs time
    proportional to their total size.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        """Args:
        max_frame_bytes: largest frame body accepted, excluding the 4-byte header.
        """
        self._max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        # Start of the unconsumed bytes: consuming a frame only moves it, so decoding a batch
        # of frames does not copy the rest of the buffer each time.
        self._offset = 0
        self._frames_decoded = 0
        self._error: FrameError | None = None
        # The rest of a frame of many messages (next_wire).
        self._batched: deque[Any] = deque()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` received from the stream.

        Errors:
            FrameError: the decoder is poisoned by an earlier error.
        """
        if self._error is not None:
            raise self._error
        # Drop consumed bytes once they are at least half the buffer: each compaction moves no
        # more bytes than were consumed since the previous one, keeping feeding O(total).
        if self._offset and self._offset * 2 >= len(self._buffer):
            del self._buffer[: self._offset]
            self._offset = 0
        self._buffer += data

    def next_object(self) -> Any:
        """Decode the next complete frame.

        Returns:
            The frame's msgpack value (arrays as lists, maps as dicts, str as str, bin as
            bytes), or None if the next frame has not fully arrived yet.
        Errors:
            FrameError: the header announces more than ``max_frame_bytes``; the body is not
            exactly one valid msgpack value; it nests deeper than MAX_DEPTH; a str/bin exceeds
            MAX_STR or an array/map MAX_ITEMS; it holds more than MAX_CONTAINERS arrays and
            maps; a map key is not str/bytes; or the decoder is already poisoned.
            ProtocolError: the frame holds nil, which would read as "no frame yet"; the frame
            is consumed and the stream stays usable.
        """
        if self._error is not None:
            raise self._error
        buffer, start = self._buffer, self._offset
        available = len(buffer) - start
        if available < _HEADER.size:
            return None
        (length,) = _HEADER.unpack_from(buffer, start)
        if length > self._max_frame_bytes:
            raise self._poison(
                f"frame of {length} bytes exceeds the limit of {self._max_frame_bytes} bytes"
            )
        end = start + _HEADER.size + length
        if len(buffer) < end:
            return None
        try:
            # A frame of n bytes holds at most n arrays and maps: only a larger one needs them
            # counted as they are decoded.
            if length <= _COPY_BYTES:
                # A small frame is copied out: cheaper than a view of the buffer and its release.
                obj = _unpackb(buffer[start + _HEADER.size : end])
            else:
                budget = _ContainerBudget() if length > MAX_CONTAINERS else None
                # The views must be released before feed() resizes the buffer.
                with memoryview(buffer) as view, view[start + _HEADER.size : end] as body:
                    obj = _unpackb(body, list_hook=budget, object_hook=budget)
        except _TooManyContainers:
            raise self._poison(f"frame holds more than {MAX_CONTAINERS} arrays and maps") from None
        except msgpack.ExtraData as exc:
            raise self._poison(
                f"frame body has {len(exc.extra)} trailing bytes after its msgpack value"
            ) from exc
        except ValueError as exc:
            # FormatError carries no text; its class name is the explanation then.
            raise self._poison(f"undecodable frame body: {clip(str(exc)) or type(exc).__name__}") from exc
        if not _within_depth(obj, MAX_DEPTH):
            raise self._poison(f"frame nests deeper than {MAX_DEPTH} levels")
        self._offset = end
        self._frames_decoded += 1
        if obj is None:
            raise ProtocolError("frame holds nil, which no encoder sends")
        return obj

    def next_wire(self) -> Any:
        """The next message's wire form (``[tag, fields]``, unchecked), taking the messages of a
        frame of many (:func:`encode_batch`) one at a time; None if the next frame has not fully
        arrived yet. Errors: as :meth:`next_object`."""
        if self._batched:
            return self._batched.popleft()
        obj = self.next_object()
        if type(obj) is list and obj and type(obj[0]) is list:
            self._batched.extend(obj)
            return self._batched.popleft()
        return obj

    def next_message(self) -> Message | None:
        """Decode the next message (of the next complete frame, or of a frame of many).

        Returns:
            The message, or None if the next frame has not fully arrived yet.
        Errors:
            FrameError: as :meth:`next_object`; the decoder is poisoned.
            ProtocolError: the frame is not a valid message (see :func:`shared.protocol.codec.from_wire`);
            the frame is consumed and the stream stays usable.
        """
        obj = self.next_wire()
        return None if obj is None else from_wire(obj)

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame body accepted; may be changed between frames (a connection takes only
        small frames until it has said hello)."""
        return self._max_frame_bytes

    @max_frame_bytes.setter
    def max_frame_bytes(self, value: int) -> None:
        self._max_frame_bytes = value

    def buffered(self) -> int:
        """Bytes fed but not yet consumed by a decoded frame (``statistics().bytes_buffered``)."""
        return len(self._buffer) - self._offset

    def statistics(self) -> FrameDecoderStatistics:
        """Return counters describing the decoder; works on a poisoned decoder too."""
        return FrameDecoderStatistics(
            frames_decoded=self._frames_decoded,
            bytes_buffered=self.buffered(),
        )

    def _poison(self, reason: str) -> FrameError:
        self._error = FrameError(reason)
        # The stream position is lost, so the buffered bytes can never be decoded.
        self._buffer = bytearray()
        self._offset = 0
        return self._error
