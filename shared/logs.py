"""structlog configuration shared by both daemons, the demo and the tests.

Events are named after the kernel's tracepoints where one exists (``mm_khugepaged_scan_file``,
``mm_khugepaged_collapse_file``) and carry its fields. Until :func:`configure` is called only
warnings and errors are emitted, so the model stays quiet and fast when used as a library.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure(level: str = "warning", json: bool | None = None, stream: TextIO | None = None) -> None:
    """Set the level and renderer: JSON lines when not on a TTY (or ``json=True``), else console.

    An event logged with ``exc_info`` (``log.exception(...)``) carries its formatted traceback: in
    JSON as the ``exception`` string, on the console below the line.
    """
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        # Without it the JSON renderer writes "exc_info": true and loses the traceback (the
        # console renderer formats exceptions itself).
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str):
    return structlog.get_logger(name)


configure()
