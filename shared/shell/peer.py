"""The remapper's side of the peer link: connect to collapsed, and again after every loss."""

from __future__ import annotations

import structlog
import trio

from shared.logs import get_logger
from shared.shell.channel import ChannelError, open_channel, send_quietly
from shared.shell.config import parse_address
from shared.shell.driver import Driver
from shared.shell.transport import connect

log = get_logger("thpsplit.peer")


async def connect_peer(driver: Driver, address: str, backoff_min_s: float, backoff_max_s: float) -> None:
    """The remapper's side of the peer channel: connect, and again after every loss, waiting
    twice as long after each failed attempt (up to ``backoff_max_s``)."""
    addr = parse_address(address)
    delay = backoff_min_s
    with structlog.contextvars.bound_contextvars(peer=str(addr)):
        while True:
            try:
                stream = await connect(addr)
            except OSError as err:
                log.debug("connect_failed", error=err.strerror or str(err), retry_s=delay)
                await trio.sleep(delay)
                delay = min(delay * 2, backoff_max_s)
                continue
            started = trio.current_time()
            async with open_channel(stream) as ch:
                try:
                    await ch.handshake(driver.name, accept={driver.peer_role})
                    await driver.serve_peer(ch)
                except ChannelError as err:
                    log.warning("peer_protocol_error", errno=err.errno, reason=err.reason)
                    await send_quietly(ch, err.reply())
                except trio.EndOfChannel:
                    pass
            if trio.current_time() - started > backoff_max_s:
                delay = backoff_min_s
            await trio.sleep(delay)
            delay = min(delay * 2, backoff_max_s)
