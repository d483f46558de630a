"""structlog configuration shared by both daemons, the demo and the tests.

Events are named after the kernel's tracepoints where one exists (``mm_khugepaged_scan_file``,
``mm_khugepaged_collapse_file``) and carry its fields. Until :func:`configure` is called only
warnings and errors are emitted, so the model stays quiet and fast when used as a library.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "warning", json: bool | None = None, stream=None) -> None:
    """Set the level and renderer: JSON lines when not on a TTY (or ``json=True``), else console."""
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str):
    return structlog.get_logger(name)


configure()
