"""``thpctl --record FILE``: every request thpctl sends to the daemons, written as a trace.

:class:`RecordingSession` is a :class:`~shared.thpctl.client.Session` that notes each request
that changes state as it is sent — the trace event of the same name (``client.mmap`` → ``mmap``,
``client.proc_spawn`` → ``spawn``, ``client.wait_scans`` → ``wait_scans``), its fields, and the
real time since the first one (``clock: "real"``) — and writes the trace when the session ends,
so ``thpctl replay FILE`` (into the daemons or in-process) plays it again. An ``mmap`` at ``auto``
is written with the address the daemon chose once its reply is in, so the events after it, which
name that address, find their mapping in the replay too. Requests that only read (``smaps``,
``vmstat``, ``meminfo``, ``file ls``, ``sysfs get``, ``status``, ``sync``) are not trace events: they
are counted in the header's ``meta.skipped``.

The file is written when thpctl's session closes, failed or not (to a temporary name, then
renamed); a request the daemon refused is kept (it is refused again on replay).
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from shared.protocol import messages as m
from shared.protocol.schema import Request, requests
from shared.shell.auth import Secrets
from shared.sim.trace import OPS, make_header, write_trace
from shared.thpctl.client import Pending, Session

# The trace op of each request that changes state (the World method of the same name).
OP_OF: dict[type[Request[Any]], str] = {
    **{cls: str(cls.OP.world) for cls in requests() if cls.OP.world in OPS},
    m.WaitScans: "wait_scans",
}


class _Entry:
    def __init__(self, t_ms: float, op: str, fields: dict[str, Any]):
        self.t_ms = t_ms
        self.op = op
        self.fields = fields

    def event(self) -> dict[str, Any]:
        return {"t_ms": self.t_ms, "op": self.op, **self.fields}


class _Tap(Pending):
    """The Pending thpctl awaits, passing the reply through to the recorder."""

    def __init__(self, inner: Pending, entry: _Entry):
        super().__init__(inner.msg)
        self._inner = inner
        self._entry = entry

    async def result(self) -> Any:
        value = await self._inner.result()
        if self._entry.op == "mmap" and self._entry.fields.get("addr") is None and isinstance(value, dict):
            self._entry.fields["addr"] = value.get("addr")
        return value


class Recorder:
    """Collects the events of one thpctl run; :meth:`write` puts them in a trace file."""

    def __init__(self, path: str, command: str = "thpctl"):
        self.path = path
        self.command = command
        self.entries: list[_Entry] = []
        self.skipped: Counter[str] = Counter()
        self._t0: float | None = None
        self.created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    def sent(self, cls: type[Request[Any]], fields: dict[str, Any]) -> _Entry | None:
        op = OP_OF.get(cls)
        if op is None:
            self.skipped[cls.TAG] += 1
            return None
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        values = {f.name: _plain(fields[f.name]) for f in OPS[op] if f.name in fields}
        entry = _Entry(round((now - self._t0) * 1000, 3), op, values)
        self.entries.append(entry)
        return entry

    def write(self) -> int:
        header = make_header(
            "thpctl",
            clock="real",
            created=self.created,
            description="requests thpctl sent to the daemons (thpctl --record)",
            meta={"command": self.command, "skipped": dict(sorted(self.skipped.items()))},
        )
        return write_trace(self.path, (e.event() for e in self.entries), header)


def _plain(value: Any) -> Any:
    """An enum member as its plain value (StrEnum/IntEnum), anything else as is."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    return value


class RecordingSession(Session):
    """A Session that records what it sends (see the module docstring)."""

    def __init__(self, collapsed: str | None, remapd: str | None, recorder: Recorder, secrets: Secrets | None = None):
        super().__init__(collapsed, remapd, secrets)
        self.recorder = recorder

    async def start(self, cls: type[Request[Any]], daemon: str | None = None, **fields: Any) -> Pending:
        pending = await super().start(cls, daemon, **fields)
        entry = self.recorder.sent(cls, fields)
        return _Tap(pending, entry) if entry is not None else pending


def record_path(text: str) -> str:
    """``--record FILE``'s type: FILE must be writable (checked when the command line is read, so
    a bad path is a usage error before anything is sent)."""
    try:
        with open(text, "a", encoding="utf-8"):
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {err.strerror or err}") from None
    return text


record_path.__name__ = "FILE"


@asynccontextmanager
async def session_for(args: Any, secrets: Secrets | None = None) -> AsyncIterator[Session]:
    """thpctl's session: a plain one, or with ``--record FILE`` one that records (the trace is
    written when it closes, also after a failure)."""
    path = getattr(args, "record", None)
    if not path:
        async with Session(args.collapsed, args.remapd, secrets) as session:
            yield session
        return
    recorder = Recorder(path, getattr(args, "name", "thpctl"))
    try:
        async with RecordingSession(args.collapsed, args.remapd, recorder, secrets) as session:
            yield session
    finally:
        recorder.write()
