"""The daemon around a :class:`~shared.shell.driver.Driver`: listener, connections, hello, signals,
graceful shutdown, and the console entry point both daemons share.

Connections are bounded (:class:`~shared.shell.config.Limits`, issue 14 item 8): at most
``max_clients`` in their hello and as many clients after it (beyond, EMFILE and closed; the peer is
not counted, so a flood of clients never locks remapd out), each hello within ``hello_timeout_s``,
each client closed after ``idle_timeout_s`` without a request, each frame complete within
``read_timeout_s`` of its first byte, and partly received frames of all client connections
together within ``max_buffered_bytes``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import structlog
import trio

from shared.knobs import KnobError, Knobs
from shared.logs import configure, get_logger
from shared.protocol.framing import encode_message
from shared.protocol.messages import ErrorReply, PeerHello
from shared.protocol.schema import CLIENT
from shared.shell.auth import SecretError, Secrets, load_secrets, startup_problem
from shared.shell.channel import (
    ChannelError,
    ReadBudget,
    drain,
    open_channel,
    send_quietly,
)
from shared.shell.config import (
    AddressError,
    LimitError,
    Limits,
    knobs_from,
    limits_from,
    log_json,
    parse_address,
)
from shared.shell.driver import Driver
from shared.shell.peer import PeerLink
from shared.shell.requests import Handlers, serve_client
from shared.shell.transport import listen, prepare_socket_dir, write_ready_file

log = get_logger("thpsplit.server")

# After SIGTERM/SIGINT, how long requests in flight get to finish before everything is cancelled.
SHUTDOWN_GRACE_S = 2.0
# How long a connection refused at once (too many) gets to read its error reply.
REFUSE_TIMEOUT_S = 1.0
# File descriptors a daemon needs besides its connections (listeners, logs, the peer, ...).
SPARE_FDS = 64
# Refusals are logged at most once per this many seconds (a flood must not flood the log too).
REFUSAL_LOG_INTERVAL_S = 1.0


class Server:
    """Listener, connections, signals: what both daemons do around their :class:`Driver`: clients
    get ``handlers``, the peer (a hello with a role in ``accept_roles`` other than client) the link.
    Every connection authenticates in its hello with ``secrets`` (:mod:`shared.shell.auth`)."""

    def __init__(
        self,
        driver: Driver,
        link: PeerLink,
        accept_roles: Collection[str],
        handlers: Handlers,
        secrets: Secrets | None = None,
        limits: Limits | None = None,
    ):
        self.driver = driver
        self.link = link
        self.accept_roles = accept_roles
        self.handlers = handlers
        self.secrets = secrets if secrets is not None else Secrets()
        self.limits = limits if limits is not None else Limits()
        self.budget = ReadBudget(self.limits.max_buffered_bytes)
        self._conn_ids = itertools.count(1)
        self.in_hello = 0  # connections that have not completed their hello
        self.client_slots = 0  # clients admitted (driver.clients lags behind by an await)
        self._refusals = 0
        self._refusal_logged = -float("inf")

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
            _raise_fd_limit(2 * self.limits.max_clients + SPARE_FDS)
            listeners, bound = await listen(parse_address(listen_addr))
            log.info("listening", address=str(bound))
            if not bound.local:
                # Allowed only with the secrets (daemon_main checked): say so all the same.
                log.warning("listening_beyond_loopback", address=str(bound), authenticated=True)
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
        where = _remote(stream)
        with structlog.contextvars.bound_contextvars(daemon=self.driver.name, conn=conn, **where):
            if self.in_hello >= self.limits.max_clients:
                await self._refuse(stream, f"{self.in_hello} connections are already in their hello")
                return
            self.in_hello += 1
            admitted = False

            def admit(hello: PeerHello) -> None:
                nonlocal admitted
                if hello.role != CLIENT:
                    return  # the peer: one slot of its own (PeerLink.serve, EBUSY)
                if self.client_slots >= self.limits.max_clients:
                    raise ChannelError(
                        f"{self.driver.name} serves at most {self.limits.max_clients} clients: try again later",
                        "EMFILE",
                    )
                self.client_slots += 1
                admitted = True

            try:
                await self._serve_connection(stream, admit)
            finally:
                if admitted:
                    self.client_slots -= 1

    async def _serve_connection(self, stream: trio.abc.Stream, admit: Callable[[PeerHello], None]) -> None:
        limits = self.limits
        async with open_channel(stream, read_timeout=limits.read_timeout_s, budget=self.budget, linger=True) as ch:
            try:
                hello = await ch.handshake(
                    self.driver.name,
                    accept=self.accept_roles,
                    timeout=limits.hello_timeout_s,
                    secrets=self.secrets,
                    initiator=False,
                    admit=admit,
                )
            except ChannelError as err:
                # EACCES (no or wrong proof), EPERM (a role not taken here), EMFILE (too many
                # clients), ETIMEDOUT (no hello in time), EPROTO, ...
                log.warning("hello_failed", errno=err.errno, reason=err.reason)
                await send_quietly(ch, err.reply())
                return
            except trio.EndOfChannel:
                return
            finally:
                self.in_hello -= 1
            with structlog.contextvars.bound_contextvars(role=hello.role):
                try:
                    if hello.role == CLIENT:
                        log.debug("client_connected")
                        await serve_client(self.driver, ch, self.handlers, limits.idle_timeout_s)
                        log.debug("client_closed")
                    else:
                        ch.trust()
                        await self.link.serve(ch)
                except ChannelError as err:
                    log.warning("protocol_error", errno=err.errno, reason=err.reason)
                    await send_quietly(ch, err.reply())

    async def _refuse(self, stream: trio.abc.Stream, why: str) -> None:
        """Turn a connection away before its hello: one error reply (EMFILE), then close."""
        self._refusals += 1
        now = trio.current_time()
        if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL_S:
            log.warning("connection_refused", errno="EMFILE", reason=why, refused=self._refusals)
            self._refusal_logged, self._refusals = now, 0
        reply = ErrorReply(0, "EMFILE", f"too many connections to {self.driver.name}: {why}; try again later")
        with trio.move_on_after(REFUSE_TIMEOUT_S):
            try:
                await stream.send_all(encode_message(reply))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            else:
                await drain(stream)
        await trio.aclose_forcefully(stream)


def _raise_fd_limit(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE towards ``needed`` (within the hard limit), so the connection
    limit is what turns clients away, not EMFILE from accept()."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def _remote(stream: trio.abc.Stream) -> dict[str, str]:
    """The remote address of a TCP connection, for its log lines (a Unix socket has none)."""
    sock = getattr(stream, "socket", None)
    if sock is None or sock.family == trio.socket.AF_UNIX:
        return {}
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return {}
    return {"remote": f"{host}:{port}"}


async def _then_cancel(wait: Callable[[], Awaitable[Any]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


def main_wrapper(prog: str, run: Callable[[], Awaitable[None]]) -> int:
    """trio.run(run) for a daemon's console entry point: exit 0 after a signal, 1 with one line
    on stderr when it cannot start (address in use, ...)."""
    try:
        trio.run(run)
    except OSError as err:
        print(f"{prog}: {_oserror_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _oserror_line(err: OSError) -> str:
    return f"{err.strerror or err}{': ' + str(err.filename) if err.filename else ''}"


class StartupError(ValueError):
    """A configuration the daemon refuses to start with."""


def daemon_main(
    prog: str,
    args: argparse.Namespace,
    listen: str,
    accepts: Collection[str],
    start: Callable[[Knobs, Secrets, Limits], Awaitable[None]],
    peer: str | None = None,
) -> int:
    """What both daemons' ``main`` does once flags are parsed: refuse bad knobs, addresses,
    secrets, an unsafe socket directory, or a listener other machines reach without the secrets
    of every role in ``accepts`` (and a ``peer`` link to another machine without the peer
    secret), with one line and exit status 2; configure logging; run ``start(knobs, secrets,
    limits)`` under trio."""
    try:
        knobs = knobs_from(args)
        limits = limits_from(args)
        listen_addr = parse_address(listen)
        peer_addr = parse_address(peer) if peer is not None else None
        secrets = load_secrets(args.secret_file, args.peer_secret_file)
        problem = startup_problem(secrets, listen_addr, accepts, peer_addr)
        if problem is not None:
            raise StartupError(problem)
        if listen_addr.kind == "unix":
            prepare_socket_dir(listen_addr.path)
    except (KnobError, AddressError, LimitError, SecretError, StartupError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{prog}: {_oserror_line(err)}", file=sys.stderr)
        return 2
    configure(args.log_level, log_json(args.log_format))
    return main_wrapper(prog, lambda: start(knobs, secrets, limits))
