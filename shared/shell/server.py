"""The daemon around a :class:`~shared.shell.driver.Driver`: listener, connections, hello, signals,
graceful shutdown, and the console entry point both daemons share."""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import structlog
import trio

from shared.knobs import KnobError, Knobs
from shared.logs import configure, get_logger
from shared.protocol.schema import CLIENT
from shared.shell.channel import ChannelError, open_channel, send_quietly
from shared.shell.config import AddressError, knobs_from, log_json, parse_address
from shared.shell.driver import Driver
from shared.shell.peer import PeerLink
from shared.shell.requests import Handlers, serve_client
from shared.shell.transport import listen, write_ready_file

log = get_logger("thpsplit.server")

# After SIGTERM/SIGINT, how long requests in flight get to finish before everything is cancelled.
SHUTDOWN_GRACE_S = 2.0


class Server:
    """Listener, connections, signals: what both daemons do around their :class:`Driver`: clients
    get ``handlers``, the peer (a hello with a role in ``accept_roles`` other than client) the link."""

    def __init__(self, driver: Driver, link: PeerLink, accept_roles: Collection[str], handlers: Handlers):
        self.driver = driver
        self.link = link
        self.accept_roles = accept_roles
        self.handlers = handlers
        self._conn_ids = itertools.count(1)

    async def serve(
        self,
        listen_addr: str,
        ready_file: str | None = None,
        background: Collection[Callable[[], Awaitable[None]]] = (),
        before_stop: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Serve until SIGTERM/SIGINT. ``before_stop``: awaited once requests in flight had their
        grace period, before the peer link and everything else is cancelled (the final snapshot
        of --state-dir: remapd's page tables are still whole then)."""
        # Signals are ours from before the ready file exists, so a supervisor may stop us at once.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            listeners, bound = await listen(parse_address(listen_addr))
            log.info("listening", address=str(bound))
            try:
                async with trio.open_nursery() as root:
                    root.start_soon(self.driver.run_clock)
                    root.start_soon(self.link.pump)
                    for task in background:
                        root.start_soon(task)
                    accepting = trio.CancelScope()
                    root.start_soon(self._accept, listeners, root, accepting)
                    if ready_file:
                        write_ready_file(ready_file, str(bound))
                    async for signum in signals:
                        log.info("shutdown", signal=signal.Signals(signum).name)
                        break
                    accepting.cancel()
                    for listener in listeners:
                        await listener.aclose()
                    with trio.move_on_after(SHUTDOWN_GRACE_S):
                        async with trio.open_nursery() as grace:
                            grace.start_soon(_then_cancel, self.driver.idle, grace.cancel_scope)
                            # A second signal cuts the grace period short.
                            grace.start_soon(_then_cancel, signals.__anext__, grace.cancel_scope)
                    if before_stop is not None:
                        await before_stop()
                    root.cancel_scope.cancel()
            finally:
                if bound.kind == "unix":
                    try:
                        os.unlink(bound.path)
                    except FileNotFoundError:
                        pass

    async def _accept(self, listeners: list[trio.SocketListener], root: trio.Nursery, scope: trio.CancelScope) -> None:
        with scope:
            await trio.serve_listeners(self._connection, listeners, handler_nursery=root)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        conn = next(self._conn_ids)
        with structlog.contextvars.bound_contextvars(daemon=self.driver.name, conn=conn):
            async with open_channel(stream) as ch:
                try:
                    hello = await ch.handshake(self.driver.name, accept=self.accept_roles)
                except ChannelError as err:
                    log.warning("hello_failed", errno=err.errno, reason=err.reason)
                    await send_quietly(ch, err.reply())
                    return
                except trio.EndOfChannel:
                    return
                with structlog.contextvars.bound_contextvars(role=hello.role):
                    try:
                        if hello.role == CLIENT:
                            log.debug("client_connected")
                            await serve_client(self.driver, ch, self.handlers)
                            log.debug("client_closed")
                        else:
                            await self.link.serve(ch)
                    except ChannelError as err:
                        log.warning("protocol_error", errno=err.errno, reason=err.reason)
                        await send_quietly(ch, err.reply())


async def _then_cancel(wait: Callable[[], Awaitable[Any]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


def main_wrapper(prog: str, run: Callable[[], Awaitable[None]]) -> int:
    """trio.run(run) for a daemon's console entry point: exit 0 after a signal, 1 with one line
    on stderr when it cannot start (address in use, ...)."""
    try:
        trio.run(run)
    except OSError as err:
        print(f"{prog}: {err.strerror or err}{': ' + err.filename if err.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def daemon_main(
    prog: str,
    args: argparse.Namespace,
    addresses: Sequence[str],
    start: Callable[[Knobs], Awaitable[None]],
) -> int:
    """What both daemons' ``main`` does once flags are parsed: refuse bad knobs or addresses with
    one line and exit status 2, configure logging, then run ``start(knobs)`` under trio."""
    try:
        knobs = knobs_from(args)
        for address in addresses:
            parse_address(address)
    except (KnobError, AddressError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    configure(args.log_level, log_json(args.log_format))
    return main_wrapper(prog, lambda: start(knobs))
