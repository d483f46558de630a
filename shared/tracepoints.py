"""Log events as tracepoints: the model's loggers also hand every event to whoever subscribed
(a daemon streaming ``thpctl trace``), whatever the log level.

The model logs through :func:`get_logger`, which wraps structlog's logger: when no sink is
registered (the common case, and always in-process) a call costs one check more than structlog's;
with sinks, each gets ``(logger name, event, fields)`` before the level filter. Events carry the
kernel's fields where the kernel has a tracepoint (``mm_khugepaged_scan_file``,
``mm_khugepaged_collapse_file``): ``mm`` is the mm_struct "pointer" of the process
(:func:`mm_pointer`), pfns are ints, a missing pfn is the kernel's ``-1`` as an unsigned long
(:data:`NO_PFN`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

# Importing shared.logs applies the default configuration (warnings and errors only) before the
# model's first event: an unconfigured structlog would print every debug event.
import shared.logs  # noqa: F401

Sink = Callable[[str, str, dict[str, Any]], None]

# (unsigned long)-1: what the kernel's tracepoints record for "no folio".
NO_PFN = (1 << 64) - 1
# mm_struct "addresses": in the kernel's direct map, one 4 KiB slot per pid, so the pid reads back.
MM_BASE = 0xFFFF888000000000

_sinks: list[Sink] = []


def mm_pointer(pid: int) -> int:
    """The made-up address of process ``pid``'s mm_struct, as ``mm=%p`` prints it."""
    return MM_BASE + (pid << 12)


def pid_of_mm(mm: int) -> int:
    return (mm - MM_BASE) >> 12


def add_sink(sink: Sink) -> None:
    _sinks.append(sink)


def remove_sink(sink: Sink) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


class TracedLogger:
    """A structlog logger whose events also reach the sinks.

    Each event goes through the lazy proxy's ``bind()``, which returns the logger structlog
    cached on first use (``cache_logger_on_first_use``): a method looked up on the proxy itself
    goes through its ``__getattr__`` and costs ~4 us more an event, filtered out or not."""

    __slots__ = ("_log", "name")

    def __init__(self, name: str):
        self.name = name
        self._log = structlog.get_logger(name)

    def _emit(self, event: str, fields: dict[str, Any]) -> None:
        for sink in _sinks.copy():  # a sink may remove itself
            sink(self.name, event, fields)

    def debug(self, event: str, **fields: Any) -> None:
        if _sinks:
            self._emit(event, fields)
        self._log.bind().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        if _sinks:
            self._emit(event, fields)
        self._log.bind().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        if _sinks:
            self._emit(event, fields)
        self._log.bind().warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        if _sinks:
            self._emit(event, fields)
        self._log.bind().error(event, **fields)


def get_logger(name: str) -> TracedLogger:
    return TracedLogger(name)


__all__ = ["NO_PFN", "TracedLogger", "add_sink", "get_logger", "mm_pointer", "pid_of_mm", "remove_sink"]
