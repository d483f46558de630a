"""``thpctl trace``'s daemon half: a client's :class:`~shared.protocol.messages.Trace` request
subscribes to the daemon's log events (:mod:`shared.tracepoints`) and gets them back as a
stream of batches until it closes the connection.

Each subscription has its own bounded queue (:data:`QUEUE_DEPTH` events): an event that finds it
full is dropped and counted, and the count goes out with the next batch, so a slow client never
slows the model down nor grows the daemon's memory. The first reply is an empty batch: the
subscription is in place once the client has it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from shared.protocol import messages as m
from shared.shell.driver import Driver
from shared.shell.job import Stream
from shared.tracepoints import add_sink, remove_sink

QUEUE_DEPTH = 4096
MAX_BATCH = 512


def _task(logger: str) -> str:
    """The "comm" of trace_pipe: khugepaged for the collapser's scan, the daemon otherwise."""
    return "khugepaged" if logger.endswith("khugepaged") and logger.startswith("collapsed") else logger.split(".")[0]


def _plain(value: Any) -> int | str:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    return str(value)


def trace_stream(driver: Driver, q: m.Trace) -> Stream:
    wanted = frozenset(q.events)
    pid = os.getpid()

    async def run(send: Callable[[Any], Awaitable[None]]) -> None:
        queue_send, queue_recv = trio.open_memory_channel[dict[str, Any]](QUEUE_DEPTH)
        dropped = 0

        def sink(logger: str, event: str, fields: dict[str, Any]) -> None:
            nonlocal dropped
            if wanted and event not in wanted:
                return
            record = {
                "ts": round(driver.now_ms() / 1000.0, 6),
                "daemon": driver.name,
                "task": f"{_task(logger)}-{pid}",
                "event": event,
                "fields": {k: _plain(v) for k, v in fields.items()},
            }
            try:
                queue_send.send_nowait(record)
            except trio.WouldBlock:
                dropped += 1

        add_sink(sink)
        try:
            await send({"events": [], "dropped": 0})
            while True:
                batch = [await queue_recv.receive()]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(queue_recv.receive_nowait())
                    except trio.WouldBlock:
                        break
                lost, dropped = dropped, 0
                await send({"events": batch, "dropped": lost})
        finally:
            remove_sink(sink)

    return Stream(run)


__all__ = ["MAX_BATCH", "QUEUE_DEPTH", "trace_stream"]
