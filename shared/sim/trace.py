"""Trace files: a documented, versioned event stream thpsplit can write, validate, read and replay.

Format (version 1): JSON lines, UTF-8, ``\\n``-terminated.

* Line 1 is the **header**, an object with ``"thpsplit_trace": 1`` and optional metadata:
  ``source`` (str: ``"workload:text"``, ``"procfs"``, ``"record"``, ...), ``description`` (str),
  ``created`` (str, ISO 8601; left out by the workload generators so that their output is
  byte-identical run to run), ``clock`` (``"virtual"``: model time, or ``"real"``: measured on a
  machine), ``seed`` (int or null), ``params`` (object: the generator's parameters), ``sysfs``
  (object: knob → value, the knobs the trace was made for; :func:`replay` applies them first
  unless told not to; names and values are checked as sysfs would) and ``meta`` (object:
  anything else). No other key is allowed.
* Every following line is one **event**: ``t_ms`` (a finite number ≥ 0, non-decreasing from one
  event to the next: milliseconds since the start of the trace, virtual or real as ``clock``
  says), ``op`` (the operation) and the operation's fields, named as the parameters of the
  in-process :class:`~shared.sim.world.World` method of the same name and as the arguments of the
  ``thpctl run`` line of the same meaning (:func:`to_run_line` prints it)::

      {"t_ms":12.5,"op":"fault","pid":1,"addr":1073745920,"write":false}

  ======================  ==========================================================
  op                      fields (``= default`` marks an optional field)
  ======================  ==========================================================
  ``file_create``         name, size, shmem=false
  ``file_write``          name, offset, length
  ``file_sync``           name
  ``file_truncate``       name, size
  ``file_punch``          name, offset, length
  ``drop_caches``         (none)
  ``spawn``               pid
  ``exit``                pid
  ``fork``                pid, child
  ``mmap``                pid, addr (int, or null: the kernel picks), length, name,
                          offset=0, prot="r" (r rw rx rwx), shared=true
  ``munmap``              pid, addr, length
  ``madvise``             pid, addr, length, advice (shared.vm.Advice: hugepage nohugepage
                          collapse dontneed pageout random willneed ...)
  ``fault``               pid, addr, write=false
  ``touch``               pid, addr, length, write=false, stride=4096
  ``lock``                pid, hold_ms, write=false
  ``pin`` / ``unpin``     pid, addr
  ``uprobe``              action (add, del), name, offset
  ``sysfs_set``           name (a writable knob), value (str or int)
  ``wait_scans``          n
  ``mark``                label (a no-op: names a point in time, e.g. the end of a run)
  ======================  ==========================================================

  Integers are JSON integers (``4096``, never ``4096.0`` or ``"4K"``); addresses, offsets and
  sizes are non-negative and below 2**64 (sizes below 2**63); pids are 1..4194303; booleans
  are ``true``/``false``; file names are 1..255 characters without ``/`` or NUL.

Limits (:class:`TraceReader` enforces them while it reads, one line at a time, so a hostile
file cannot make it hold more than one line): a line is at most :data:`MAX_LINE_BYTES` bytes;
a trace holds at most :data:`MAX_EVENTS` events (both adjustable per reader). A line that breaks
a rule raises :class:`TraceError` naming the file, the line number and the field.

:func:`replay` applies a trace's events to a :class:`~shared.sim.world.World`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Self

from shared.errors import UserError
from shared.knobs import SPECS, KnobError, Knobs
from shared.vm import ADVICE, PROTS, VM_FLAGS_ADVICE

FORMAT_VERSION = 1
MAX_LINE_BYTES = 1 << 16
MAX_EVENTS = 10_000_000
# remapd's pid limit (the kernel's PID_MAX_LIMIT on 64-bit).
PID_MAX = 4194304
MAX_NAME = 255
MAX_LABEL = 1024
MAX_T_MS = 1e15  # ~31,000 years: a bound that catches garbage, not a policy
MAX_WAIT_SCANS = 1_000_000
_U64 = 1 << 64
_S64 = 1 << 63

HEADER_KEY = "thpsplit_trace"
CLOCKS = ("virtual", "real")
UPROBE_ACTIONS = ("add", "del")
TIMINGS = ("original", "fast")


class TraceError(ValueError):
    """A trace that breaks the format. ``source``, ``line`` (1-based) and ``field`` say where."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.source = source
        self.line = line
        self.field = field
        self.reason = message
        where = ":".join(str(p) for p in (source or "<trace>", line) if p is not None)
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{message}")


# -- field kinds ------------------------------------------------------------------------------

class InvalidValue(ValueError):
    """A value of the wrong kind (a string where an integer goes): a ValueError, as every check's
    refusal is; :class:`TraceError` adds where it was."""


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def _int(v: Any, lo: int, hi: int, what: str = "integer") -> int:
    if type(v) is not int:
        raise InvalidValue(f"expected an integer, got {_type_name(v)}")
    if v < 0 and lo >= 0:
        raise ValueError(f"must not be negative (got {v})")
    if not lo <= v < hi:
        raise ValueError(f"{what} {v} is outside {lo}..{hi - 1}")
    return v


def _k_pid(v: Any) -> int:
    return _int(v, 1, PID_MAX, "pid")


def _k_u64(v: Any) -> int:
    return _int(v, 0, _U64, "value")


def _k_size(v: Any) -> int:
    return _int(v, 0, _S64, "size")


def _k_positive(v: Any) -> int:
    return _int(v, 1, _S64, "value")


def _k_addr_or_null(v: Any) -> int | None:
    return None if v is None else _k_u64(v)


def _k_count(v: Any) -> int:
    return _int(v, 0, MAX_WAIT_SCANS + 1, "count")


def _k_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise InvalidValue(f"expected true or false, got {_type_name(v)}")
    return v


def _k_ms(v: Any) -> float | int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidValue(f"expected a number of milliseconds, got {_type_name(v)}")
    if not math.isfinite(v):
        raise ValueError("must be a finite number")
    if v < 0:
        raise ValueError(f"must not be negative (got {v})")
    if v > MAX_T_MS:
        raise ValueError(f"{v} is too large (at most {MAX_T_MS:g})")
    return v


def _k_str(v: Any, limit: int) -> str:
    if not isinstance(v, str):
        raise InvalidValue(f"expected a string, got {_type_name(v)}")
    if len(v) > limit:
        raise ValueError(f"longer than {limit} characters")
    return v


def _k_name(v: Any) -> str:
    v = _k_str(v, MAX_NAME)
    if not v or "/" in v or "\0" in v:
        raise ValueError(f"bad file name {v!r} (1..{MAX_NAME} characters, no '/' or NUL)")
    return v


def _k_label(v: Any) -> str:
    return _k_str(v, MAX_LABEL)


def _choice(choices: Iterable[str]) -> Callable[[Any], str]:
    options = tuple(choices)

    def check(v: Any) -> str:
        if not isinstance(v, str):
            raise InvalidValue(f"expected a string, got {_type_name(v)}")
        if v not in options:
            raise ValueError(f"{v!r} is not one of {', '.join(options)}")
        return v

    return check


def _k_knob(v: Any) -> str:
    v = _k_str(v, MAX_NAME)
    spec = SPECS.get(v)
    if spec is None:
        raise ValueError(f"no such knob: {v!r}")
    if not spec.writable:
        raise ValueError(f"{v} is read-only")
    return v


def _k_knob_value(v: Any) -> str | int:
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise InvalidValue(f"expected a string or an integer, got {_type_name(v)}")
    if isinstance(v, str):
        _k_str(v, MAX_LABEL)
    return v


_REQUIRED = object()
_KNOBS = Knobs()  # only its validate() is used: sysfs's parsing of a value


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    check: Callable[[Any], Any]
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


def _f(name: str, check: Callable[[Any], Any], default: Any = _REQUIRED) -> Field:
    return Field(name, check, default)


# Every operation and its fields, in the order the writer puts them.
OPS: dict[str, tuple[Field, ...]] = {
    "file_create": (_f("name", _k_name), _f("size", _k_size), _f("shmem", _k_bool, False)),
    "file_write": (_f("name", _k_name), _f("offset", _k_size), _f("length", _k_size)),
    "file_sync": (_f("name", _k_name),),
    "file_truncate": (_f("name", _k_name), _f("size", _k_size)),
    "file_punch": (_f("name", _k_name), _f("offset", _k_size), _f("length", _k_size)),
    "drop_caches": (),
    "spawn": (_f("pid", _k_pid),),
    "exit": (_f("pid", _k_pid),),
    "fork": (_f("pid", _k_pid), _f("child", _k_pid)),
    "mmap": (
        _f("pid", _k_pid),
        _f("addr", _k_addr_or_null),
        _f("length", _k_size),
        _f("name", _k_name),
        _f("offset", _k_size, 0),
        _f("prot", _choice(PROTS), "r"),
        _f("shared", _k_bool, True),
    ),
    "munmap": (_f("pid", _k_pid), _f("addr", _k_u64), _f("length", _k_size)),
    "mremap": (
        _f("pid", _k_pid),
        _f("addr", _k_u64),
        _f("old_length", _k_size),
        _f("new_length", _k_size),
        _f("to", _k_addr_or_null, None),
        _f("maymove", _k_bool, False),
        _f("dontunmap", _k_bool, False),
    ),
    "madvise": (_f("pid", _k_pid), _f("addr", _k_u64), _f("length", _k_size), _f("advice", _choice(ADVICE))),
    "fault": (_f("pid", _k_pid), _f("addr", _k_u64), _f("write", _k_bool, False)),
    "touch": (
        _f("pid", _k_pid),
        _f("addr", _k_u64),
        _f("length", _k_size),
        _f("write", _k_bool, False),
        _f("stride", _k_positive, 4096),
    ),
    "lock": (_f("pid", _k_pid), _f("hold_ms", _k_ms), _f("write", _k_bool, False)),
    "pin": (_f("pid", _k_pid), _f("addr", _k_u64)),
    "unpin": (_f("pid", _k_pid), _f("addr", _k_u64)),
    "uprobe": (_f("action", _choice(UPROBE_ACTIONS)), _f("name", _k_name), _f("offset", _k_size)),
    "sysfs_set": (_f("name", _k_knob), _f("value", _k_knob_value)),
    "wait_scans": (_f("n", _k_count),),
    "mark": (_f("label", _k_label),),
}

_HEADER_FIELDS: dict[str, Callable[[Any], Any]] = {
    "source": lambda v: _k_str(v, MAX_LABEL),
    "description": lambda v: _k_str(v, MAX_LINE_BYTES),
    "created": lambda v: _k_str(v, 64),
    "clock": _choice(CLOCKS),
    "seed": lambda v: None if v is None else _int(v, -_S64, _S64, "seed"),
    "params": lambda v: _object(v),
    "sysfs": lambda v: _sysfs(v),
    "meta": lambda v: _object(v),
}


def _object(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise InvalidValue(f"expected an object, got {_type_name(v)}")
    return v


def _sysfs(v: Any) -> dict[str, str | int]:
    knobs = Knobs()
    for name, value in _object(v).items():
        try:
            _k_knob(name)
            _k_knob_value(value)
            knobs.validate(name, str(value))
        except (ValueError, KnobError) as err:
            raise ValueError(f"{name}: {err}") from None
    return v


# -- validation -------------------------------------------------------------------------------

def validate_event(obj: Any, *, line: int | None = None, source: str | None = None) -> dict[str, Any]:
    """Check one event and return it normalised: ``t_ms``, ``op``, then every field of the op
    in :data:`OPS` order, defaults filled in.

    Raises:
        TraceError: naming the field that is missing, unknown, of the wrong type or out of range.
    """

    def fail(msg: str, field: str | None = None) -> TraceError:
        return TraceError(msg, source=source, line=line, field=field)

    if not isinstance(obj, dict):
        raise fail(f"an event must be a JSON object, got {_type_name(obj)}")
    if "op" not in obj:
        raise fail("missing field", "op")
    op = obj["op"]
    if not isinstance(op, str):
        raise fail(f"expected a string, got {_type_name(op)}", "op")
    spec = OPS.get(op)
    if spec is None:
        raise fail(f"unknown op {op!r} (one of {', '.join(OPS)})", "op")
    if "t_ms" not in obj:
        raise fail("missing field", "t_ms")
    try:
        t = _k_ms(obj["t_ms"])
    except ValueError as err:
        raise fail(str(err), "t_ms") from None
    known = {"t_ms", "op"} | {f.name for f in spec}
    for key in obj:
        if key not in known:
            raise fail(f"unknown field for op {op!r} (its fields: {', '.join(f.name for f in spec) or 'none'})", key)
    out: dict[str, Any] = {"t_ms": t, "op": op}
    for f in spec:
        if f.name not in obj:
            if f.required:
                raise fail(f"missing field for op {op!r}", f.name)
            out[f.name] = f.default
            continue
        try:
            out[f.name] = f.check(obj[f.name])
        except ValueError as err:
            raise fail(str(err), f.name) from None
    if op == "sysfs_set":
        try:
            _KNOBS.validate(out["name"], str(out["value"]))
        except KnobError as err:
            raise fail(str(err), "value") from None
    return out


def validate_header(obj: Any, *, source: str | None = None, line: int | None = 1) -> dict[str, Any]:
    """Check a header object; returns it with keys in canonical order.

    Raises:
        TraceError: not a thpsplit trace, an unsupported version, or a bad header field.
    """

    def fail(msg: str, field: str | None = None) -> TraceError:
        return TraceError(msg, source=source, line=line, field=field)

    if not isinstance(obj, dict) or HEADER_KEY not in obj:
        raise fail(f'not a thpsplit trace: the first line must be a header object {{"{HEADER_KEY}": {FORMAT_VERSION}, ...}}')
    version = obj[HEADER_KEY]
    if type(version) is not int:
        raise fail(f"expected an integer version, got {_type_name(version)}", HEADER_KEY)
    if version != FORMAT_VERSION:
        raise fail(f"unsupported trace version {version} (this reader knows {FORMAT_VERSION})", HEADER_KEY)
    out: dict[str, Any] = {HEADER_KEY: version}
    for key in obj:
        if key != HEADER_KEY and key not in _HEADER_FIELDS:
            raise fail(f"unknown header field (allowed: {', '.join(_HEADER_FIELDS)}; put anything else in 'meta')", key)
    for key, check in _HEADER_FIELDS.items():
        if key in obj:
            try:
                out[key] = check(obj[key])
            except ValueError as err:
                raise fail(str(err), key) from None
    return out


def make_header(source: str | None = None, **fields: Any) -> dict[str, Any]:
    """A validated header; ``fields`` are the optional header keys (None values are dropped)."""
    obj: dict[str, Any] = {HEADER_KEY: FORMAT_VERSION}
    if source is not None:
        obj["source"] = source
    obj.update({k: v for k, v in fields.items() if v is not None})
    return validate_header(obj)


def event(op: str, t_ms: float = 0, **fields: Any) -> dict[str, Any]:
    """Build one validated, normalised event: ``event("fault", 1.5, pid=1, addr=0x1000)``."""
    return validate_event({"t_ms": t_ms, "op": op, **fields})


# -- JSON in and out --------------------------------------------------------------------------

def _no_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} (JSON has none)")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


_DECODER = json.JSONDecoder(parse_constant=_no_constant, object_pairs_hook=_no_duplicates)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _parse_line(raw: bytes | str, *, lineno: int, source: str | None) -> Any:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as err:
        raise TraceError(f"not UTF-8 ({err.reason} at byte {err.start})", source=source, line=lineno) from None
    text = text.rstrip("\r\n")
    if not text.strip():
        raise TraceError("empty line", source=source, line=lineno)
    try:
        obj, end = _DECODER.raw_decode(text)
    except ValueError as err:  # json.JSONDecodeError or our hooks' ValueError
        raise TraceError(f"not JSON: {err}", source=source, line=lineno) from None
    if text[end:].strip():
        raise TraceError("one JSON value per line: extra text after it", source=source, line=lineno)
    return obj


# -- reading ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Trace:
    """A trace held in memory: its header and its events (normalised)."""

    header: dict[str, Any]
    events: list[dict[str, Any]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)


class TraceReader:
    """Reads a trace incrementally: the header at construction, then events as you iterate.

    ``src`` is a path or a file object (binary or text). Only one line is held at a time; a line
    longer than ``max_line`` or more than ``max_events`` events raise :class:`TraceError`.
    Events come back normalised (:func:`validate_event`) and ``t_ms`` must never decrease.
    """

    def __init__(self, src: str | os.PathLike[str] | IO[Any], *, name: str | None = None,
                 max_line: int = MAX_LINE_BYTES, max_events: int = MAX_EVENTS):
        self._own = isinstance(src, (str, os.PathLike))
        self._f: IO[Any] = open(src, "rb") if isinstance(src, (str, os.PathLike)) else src  # noqa: SIM115 (close())
        self.source = name if name is not None else (str(src) if self._own else getattr(src, "name", "<trace>"))
        if not isinstance(self.source, str):
            self.source = "<trace>"
        self.max_line = max_line
        self.max_events = max_events
        self.lineno = 0
        self.events_read = 0
        self._last_t: float = 0.0
        self._iterating = False
        try:
            raw = self._readline()
            if raw is None:
                raise TraceError("empty file: no header", source=self.source, line=1)
            self.header = validate_header(_parse_line(raw, lineno=1, source=self.source), source=self.source)
        except BaseException:
            self.close()
            raise

    def _readline(self) -> bytes | str | None:
        raw = self._f.readline(self.max_line + 1)
        if not raw:
            return None
        self.lineno += 1
        body = raw.rstrip(b"\r\n") if isinstance(raw, bytes) else raw.rstrip("\r\n")
        size = len(body) if isinstance(body, bytes) else len(body.encode("utf-8", "surrogatepass"))
        if size > self.max_line:
            raise TraceError(f"line longer than {self.max_line} bytes", source=self.source, line=self.lineno)
        return raw

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._iterating:
            raise RuntimeError("a TraceReader can be iterated once")
        self._iterating = True
        while True:
            raw = self._readline()
            if raw is None:
                return
            if self.events_read >= self.max_events:
                raise TraceError(f"more than {self.max_events} events", source=self.source, line=self.lineno)
            ev = validate_event(_parse_line(raw, lineno=self.lineno, source=self.source),
                                line=self.lineno, source=self.source)
            if ev["t_ms"] < self._last_t:
                raise TraceError(f"time goes backwards ({ev['t_ms']} after {self._last_t})",
                                 source=self.source, line=self.lineno, field="t_ms")
            self._last_t = ev["t_ms"]
            self.events_read += 1
            yield ev

    def close(self) -> None:
        if self._own:
            self._f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_trace(src: str | os.PathLike[str] | IO[Any], **kw: Any) -> TraceReader:
    """A :class:`TraceReader` (use it as a context manager)."""
    return TraceReader(src, **kw)


def read_trace(src: str | os.PathLike[str] | IO[Any], **kw: Any) -> Trace:
    """Read and validate a whole trace into memory."""
    with TraceReader(src, **kw) as reader:
        return Trace(reader.header, list(reader))


def loads_trace(text: str, **kw: Any) -> Trace:
    """:func:`read_trace` from a string."""
    return read_trace(io.BytesIO(text.encode("utf-8")), name=kw.pop("name", "<string>"), **kw)


def validate_file(src: str | os.PathLike[str] | IO[Any], **kw: Any) -> dict[str, Any]:
    """Validate a trace without keeping its events; returns ``{"header", "events", "duration_ms",
    "ops"}``."""
    ops: Counter[str] = Counter()
    last = 0.0
    with TraceReader(src, **kw) as reader:
        for ev in reader:
            ops[ev["op"]] += 1
            last = ev["t_ms"]
        return {"header": reader.header, "events": reader.events_read, "duration_ms": last, "ops": dict(ops)}


# -- writing ----------------------------------------------------------------------------------

class TraceWriter:
    """Writes a header, then validated events in canonical form, one per line.

    ``dst`` is a path (created or truncated) or a text/binary file object.
    """

    def __init__(self, dst: str | os.PathLike[str] | IO[Any], header: dict[str, Any] | None = None,
                 *, max_events: int = MAX_EVENTS):
        self.header = validate_header(header if header is not None else {HEADER_KEY: FORMAT_VERSION})
        self._own = isinstance(dst, (str, os.PathLike))
        self._f: IO[Any] = (open(dst, "w", encoding="utf-8", newline="\n")  # noqa: SIM115 (closed by close())
                            if isinstance(dst, (str, os.PathLike)) else dst)
        self._binary = not self._own and isinstance(dst, (io.RawIOBase, io.BufferedIOBase))
        self.max_events = max_events
        self.count = 0
        self._last_t: float = 0.0
        self._put(self.header)

    def _put(self, obj: dict[str, Any]) -> None:
        text = _dumps(obj)
        if len(text.encode("utf-8")) > MAX_LINE_BYTES:
            raise TraceError(f"line longer than {MAX_LINE_BYTES} bytes", source="<writer>", line=self.count + 1)
        text += "\n"
        self._f.write(text.encode("utf-8") if self._binary else text)

    def write(self, ev: dict[str, Any]) -> dict[str, Any]:
        """Validate ``ev``, write it, and return its normalised form."""
        out = validate_event(ev, source="<writer>", line=self.count + 2)
        if out["t_ms"] < self._last_t:
            raise TraceError(f"time goes backwards ({out['t_ms']} after {self._last_t})",
                             source="<writer>", line=self.count + 2, field="t_ms")
        if self.count >= self.max_events:
            raise TraceError(f"more than {self.max_events} events", source="<writer>", line=self.count + 2)
        self._last_t = out["t_ms"]
        self._put(out)
        self.count += 1
        return out

    def write_all(self, events: Iterable[dict[str, Any]]) -> int:
        for ev in events:
            self.write(ev)
        return self.count

    def close(self) -> None:
        if self._own:
            self._f.close()
        else:
            self._f.flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_trace(dst: str | os.PathLike[str] | IO[Any], events: Iterable[dict[str, Any]],
                header: dict[str, Any] | None = None) -> int:
    """Write a whole trace; returns the number of events. With a path, the file is written to a
    temporary name and renamed, so a failed validation leaves no half-written trace behind."""
    if isinstance(dst, (str, os.PathLike)):
        path = Path(dst)
        tmp = path.with_name(path.name + ".part")
        try:
            with TraceWriter(tmp, header) as w:
                n = w.write_all(events)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return n
    with TraceWriter(dst, header) as w:
        return w.write_all(events)


def dumps_trace(events: Iterable[dict[str, Any]], header: dict[str, Any] | None = None) -> str:
    """The trace as a string."""
    buf = io.StringIO()
    write_trace(buf, events, header)
    return buf.getvalue()


# -- thpctl run lines -------------------------------------------------------------------------

def to_run_line(ev: dict[str, Any]) -> str | None:
    """The ``thpctl run`` line for an event (its time dropped), or None for ``mark``."""
    import shlex

    e = validate_event(ev)
    op = e["op"]
    q = shlex.quote
    hx = hex
    w = " --write" if e.get("write") else ""
    if op == "file_create":
        return f"file create {q(e['name'])} --size {e['size']}" + (" --shmem" if e["shmem"] else "")
    if op in ("file_write", "file_punch"):
        return f"file {op[5:]} {q(e['name'])} {e['offset']} {e['length']}"
    if op == "file_sync":
        return f"file sync {q(e['name'])}"
    if op == "file_truncate":
        return f"file truncate {q(e['name'])} {e['size']}"
    if op == "drop_caches":
        return "file drop-caches"
    if op in ("spawn", "exit"):
        return f"proc {op} {e['pid']}"
    if op == "fork":
        return f"proc fork {e['pid']} {e['child']}"
    if op == "mmap":
        addr = "auto" if e["addr"] is None else hx(e["addr"])
        return (f"mmap {e['pid']} {addr} {e['length']} --file {q(e['name'])} --offset {e['offset']} "
                f"--prot {e['prot']} {'--shared' if e['shared'] else '--private'}")
    if op == "munmap":
        return f"munmap {e['pid']} {hx(e['addr'])} {e['length']}"
    if op == "mremap":
        return (f"mremap {e['pid']} {hx(e['addr'])} {e['old_length']} {e['new_length']}"
                + ("" if e["to"] is None else f" --to {hx(e['to'])}")
                + (" --maymove" if e["maymove"] else "") + (" --dontunmap" if e["dontunmap"] else ""))
    if op == "madvise":
        return f"madvise {e['pid']} {hx(e['addr'])} {e['length']} {e['advice']}"
    if op == "fault":
        return f"fault {e['pid']} {hx(e['addr'])}{w}"
    if op == "touch":
        return f"touch {e['pid']} {hx(e['addr'])} {e['length']}{w} --stride {e['stride']}"
    if op == "lock":
        return f"lock {e['pid']} --hold {e['hold_ms']}{w}"
    if op in ("pin", "unpin"):
        return f"{op} {e['pid']} {hx(e['addr'])}"
    if op == "uprobe":
        return f"uprobe {e['action']} {q(e['name'])} {e['offset']}"
    if op == "sysfs_set":
        return f"sysfs set {e['name']} {q(str(e['value']))}"
    if op == "wait_scans":
        return f"wait-scans {e['n']}"
    return None  # mark


# -- replay -----------------------------------------------------------------------------------

# Which mmap_lock mode an operation takes in the model (remapd): None for none.


def _lock_mode(ev: dict[str, Any]) -> str | None:
    op = ev["op"]
    if op in ("mmap", "munmap", "mremap", "fork", "uprobe"):
        return "write"
    if op == "madvise":
        return "write" if ev["advice"] in VM_FLAGS_ADVICE else "read"
    if op in ("fault", "touch", "pin"):
        return "read"
    if op == "lock":
        return "write" if ev["write"] else "read"
    return None


@dataclasses.dataclass
class _Hold:
    """One ``lock`` event: the World's Pending, its mode, when it was issued and for how long."""

    pending: Any
    write: bool
    issued: float
    hold_ms: float

    def end(self) -> float | None:
        """When it releases the lock (None: still waiting to take it)."""
        if not self.pending.done:
            return None
        v = self.pending.value
        if isinstance(v, dict) and isinstance(v.get("until_ms"), (int, float)):
            return float(v["until_ms"])
        return self.issued + self.hold_ms  # taken at once (the model said no more)

    def active(self, now: float) -> bool:
        if self.pending.done and isinstance(self.pending.value, BaseException):
            return False  # it failed (e.g. ESRCH): no hold
        end = self.end()
        return end is None or end > now


class _Holds:
    """The ``lock`` events replay has started, to wait for them as a real caller would.

    World methods other than ``lock`` cannot wait for model time: an operation that needs an
    mmap_lock an application thread holds would be left half-done. Replay therefore waits (moves
    the clock) until no conflicting hold is left before it applies such an operation.
    """

    def __init__(self) -> None:
        self.holds: dict[int, list[_Hold]] = {}
        self.files: dict[int, set[str]] = {}  # pid -> names it mapped (for uprobe's targets)

    def add(self, pid: int, hold: _Hold) -> None:
        self.holds.setdefault(pid, []).append(hold)

    def _prune(self, now: float) -> None:
        for pid in list(self.holds):
            keep = [h for h in self.holds[pid] if h.active(now)]
            if keep:
                self.holds[pid] = keep
            else:
                del self.holds[pid]

    def conflicts(self, pids: Iterable[int], mode: str, now: float) -> list[_Hold]:
        self._prune(now)
        return [h for pid in pids for h in self.holds.get(pid, ()) if mode == "write" or h.write]

    def all_ends(self, now: float) -> list[float]:
        return [e for hs in self.holds.values() for h in hs if (e := h.end()) is not None and e > now]

    def targets(self, ev: dict[str, Any]) -> list[int]:
        if ev["op"] == "uprobe":
            return [pid for pid, names in self.files.items() if ev["name"] in names]
        return [ev["pid"]]

    def note(self, ev: dict[str, Any], ok: bool) -> None:
        op = ev["op"]
        if not ok:
            return
        if op == "mmap":
            self.files.setdefault(ev["pid"], set()).add(ev["name"])
        elif op == "fork":
            self.files[ev["child"]] = set(self.files.get(ev["pid"], ()))
        elif op == "exit":
            self.files.pop(ev["pid"], None)
            self.holds.pop(ev["pid"], None)


@dataclasses.dataclass
class ReplayResult:
    """What :func:`replay` did.

    ``outcomes``: one dict per event (None when ``keep_outcomes=False``): ``i`` (index),
    ``op``, ``t_ms`` (when it was due, in world time), ``at_ms`` (when it ran: later than due if it
    waited for an mmap_lock), and ``result`` (the World method's return value; ``touch`` gives
    its counts, ``lock`` ``"held"`` or ``"waiting"``) or ``error`` (``"ENOENT: no file 'x'"``, or
    ``"pending: ..."`` for an operation the model could not finish without more model time).
    ``counts``: ``events``, ``ops`` (per op), ``errors`` (per errno name), ``faults`` (per fault
    outcome, ``fault`` and ``touch`` together), ``waited`` (events that waited for a lock),
    ``max_wait_ms``, ``pending``. ``start_ms``/``end_ms``: world time before and after.
    """

    outcomes: list[dict[str, Any]] | None
    counts: dict[str, Any]
    start_ms: float
    end_ms: float
    header: dict[str, Any] | None = None


class ReplayError(RuntimeError):
    def __init__(self, index: int, ev: dict[str, Any], err: Exception):
        super().__init__(f"event {index} ({ev['op']} at {ev['t_ms']} ms): {err}")
        self.index = index
        self.event = ev
        self.error = err


def _events_of(trace: Any) -> tuple[dict[str, Any] | None, Iterable[dict[str, Any]], Callable[[], None]]:
    if isinstance(trace, (str, os.PathLike)):
        reader = TraceReader(trace)
        return reader.header, reader, reader.close
    if isinstance(trace, TraceReader):
        return trace.header, trace, lambda: None
    if isinstance(trace, Trace):
        return trace.header, trace.events, lambda: None
    if isinstance(trace, tuple) and len(trace) == 2 and isinstance(trace[0], dict):
        return validate_header(trace[0]), trace[1], lambda: None
    if isinstance(getattr(trace, "header", None), dict) and callable(getattr(trace, "events", None)):
        return validate_header(trace.header), trace.events(), lambda: None  # a generated workload
    return None, trace, lambda: None


def _scale(timing: str | float) -> float | None:
    if timing == "original":
        return 1.0
    if timing == "fast":
        return None
    if isinstance(timing, bool) or not isinstance(timing, (int, float)) or not math.isfinite(timing) or timing < 0:
        raise ValueError(f"timing must be 'original', 'fast' or a finite scale >= 0, not {timing!r}")
    return float(timing)


def _apply(world: Any, ev: dict[str, Any]) -> Any:
    op = ev["op"]
    a = {k: v for k, v in ev.items() if k not in ("t_ms", "op")}
    if op == "mark":
        return None
    if op == "lock":
        return world.lock(a["pid"], a["hold_ms"], a["write"])
    if op == "sysfs_set":
        world.sysfs_set(a["name"], a["value"])
        return 0
    if op == "wait_scans":
        world.wait_scans(a["n"])
        return 0
    return getattr(world, op)(**a)


def replay(trace: Any, world: Any, timing: str | float = "original", *, apply_sysfs: bool = True,
           keep_outcomes: bool = True, on_error: str = "continue",
           progress: Callable[[int, dict[str, Any]], None] | None = None) -> ReplayResult:
    """Apply a trace's events to ``world`` (a :class:`~shared.sim.world.World`), in order.

    ``trace``: a path, a :class:`TraceReader` (events stream through; with ``keep_outcomes=False``
    memory stays bounded), a :class:`Trace`, a ``(header, events)`` pair, a generated workload
    (:class:`shared.sim.workloads.Workload`), or an iterable of events (validated here).
    ``timing``: ``"original"`` moves the world's clock to ``start + t_ms`` before each event;
    a number ``s`` to ``start + t_ms * s`` (0.5: twice as fast; 2: half as fast); ``"fast"``
    applies the events back to back without moving the clock (khugepaged only runs when an
    event such as ``wait_scans`` moves it). ``start`` is ``world.now`` when replay begins.
    ``apply_sysfs``: first apply the header's ``sysfs`` knobs. ``on_error``: ``"continue"``
    (record the model's refusal, e.g. ENOENT, and go on) or ``"raise"`` (:class:`ReplayError`).
    Errors that are bugs (anything but the model's :class:`~shared.errors.UserError`) propagate.
    """
    scale = _scale(timing)
    if on_error not in ("continue", "raise"):
        raise ValueError("on_error must be 'continue' or 'raise'")
    header, events, close = _events_of(trace)
    start = world.now
    outcomes: list[dict[str, Any]] | None = [] if keep_outcomes else None
    ops: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    waited = pending = 0
    max_wait = 0.0
    holds = _Holds()
    try:
        if apply_sysfs and header and header.get("sysfs"):
            for name, value in header["sysfs"].items():
                world.sysfs_set(name, value)
        last_t = 0.0
        for i, raw in enumerate(events):
            ev = raw if isinstance(events, TraceReader) else validate_event(raw, line=i + 1, source="<events>")
            if ev["t_ms"] < last_t:
                raise TraceError(f"time goes backwards ({ev['t_ms']} after {last_t})", line=i + 1, field="t_ms",
                                 source="<events>")
            last_t = ev["t_ms"]
            due = world.now if scale is None else start + ev["t_ms"] * scale
            if due > world.now:
                world.advance(due - world.now)
            mode = _lock_mode(ev)
            if mode is not None and ev["op"] != "lock":
                before = world.now
                _wait_for_holds(world, holds, ev, mode)
                if world.now > before:
                    waited += 1
                    max_wait = max(max_wait, world.now - before)
            ops[ev["op"]] += 1
            out: dict[str, Any] = {"i": i, "op": ev["op"], "t_ms": due, "at_ms": world.now}
            try:
                value = _apply(world, ev)
            except UserError as err:
                errors[err.errno_name] += 1
                out["error"] = str(err)
                holds.note(ev, False)
                if on_error == "raise":
                    raise ReplayError(i, ev, err) from err
            except RuntimeError as err:
                if "waits for model time" not in str(err):
                    raise
                pending += 1
                out["error"] = f"pending: {err}"
                holds.note(ev, True)
                if on_error == "raise":
                    raise ReplayError(i, ev, err) from err
            else:
                holds.note(ev, True)
                if ev["op"] == "lock":
                    holds.add(ev["pid"], _Hold(value, ev["write"], world.now, ev["hold_ms"]))
                    if value.done and isinstance(value.value, UserError):
                        errors[value.value.errno_name] += 1
                        out["error"] = str(value.value)
                    else:
                        out["result"] = "held" if value.done else "waiting"
                else:
                    out["result"] = value
                    if ev["op"] == "fault":
                        faults[value] += 1
                    elif ev["op"] == "touch":
                        faults.update(value)
            if outcomes is not None:
                outcomes.append(out)
            if progress is not None:
                progress(i, out)
    finally:
        close()
    counts = {
        "events": sum(ops.values()),
        "ops": dict(sorted(ops.items())),
        "errors": dict(sorted(errors.items())),
        "faults": dict(sorted(faults.items())),
        "waited": waited,
        "max_wait_ms": max_wait,
        "pending": pending,
    }
    return ReplayResult(outcomes, counts, start, world.now, header)


def _wait_for_holds(world: Any, holds: _Holds, ev: dict[str, Any], mode: str) -> None:
    """Advance the clock until no ``lock`` hold conflicts with ``ev``'s mmap_lock mode."""
    for _ in range(100_000):
        conflicts = holds.conflicts(holds.targets(ev), mode, world.now)
        if not conflicts:
            return
        ends = [e for h in conflicts if (e := h.end()) is not None]
        if not ends:
            # Every conflicting hold still waits for the lock: let the holders before it go.
            ends = holds.all_ends(world.now)
            if not ends:
                return  # nothing we know of will release it; let the model report it
        world.advance(max(min(ends) - world.now, 0.0))
    raise RuntimeError("replay: lock holds never end")


# -- a small CLI (``thpctl replay`` will wrap it) ---------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``python -m shared.sim.trace [validate|replay] FILE [--timing original|fast|SCALE]``."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="thpsplit-trace", description="validate or replay a thpsplit trace")
    p.add_argument("command", choices=("validate", "replay"))
    p.add_argument("file")
    p.add_argument("--timing", default="original", help="original, fast, or a time scale (0.5 = twice as fast)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.command == "validate":
            summary = validate_file(args.file)
            doc: Any = summary
            text = f"{args.file}: valid, {summary['events']} events over {summary['duration_ms']} ms"
        else:
            from shared.sim.world import World

            timing: str | float = args.timing if args.timing in TIMINGS else float(args.timing)
            result = replay(args.file, World(), timing, keep_outcomes=False)
            doc = {"counts": result.counts, "start_ms": result.start_ms, "end_ms": result.end_ms}
            text = json.dumps(doc, indent=2)
    except (TraceError, OSError, ValueError) as err:
        sys.stderr.write(f"thpsplit-trace: {err}\n")
        return 2
    print(json.dumps(doc) if args.json else text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
