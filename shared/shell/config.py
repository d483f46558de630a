"""Where the daemons listen and how they are configured: addresses, THPSPLIT_* variables, defaults.

An address is ``unix:/path/to.sock`` or ``tcp:HOST:PORT`` (``tcp:[::1]:PORT`` for IPv6; port 0
asks the kernel for a free port, the daemon then reports the one it got; an empty HOST is
127.0.0.1). Without flags or environment, both daemons and ``thpctl`` meet on Unix sockets in a
per-user runtime directory, so ``collapsed & remapd &`` works locally; TCP is for containers.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from typing import Any

from shared.clip import quote
from shared.knobs import SPECS, Knobs

ENV_COLLAPSED = "THPSPLIT_COLLAPSED"
ENV_REMAPD = "THPSPLIT_REMAPD"
ENV_RUNTIME_DIR = "THPSPLIT_RUNTIME_DIR"
ENV_LOG_LEVEL = "THPSPLIT_LOG_LEVEL"
ENV_LOG_FORMAT = "THPSPLIT_LOG_FORMAT"
ENV_SEED = "THPSPLIT_SEED"
ENV_DEADLINE = "THPSPLIT_DEADLINE"

LOG_FORMATS = ("auto", "json", "console")

# Where ``tcp::PORT`` (no host) listens and connects: never every interface by accident.
DEFAULT_TCP_HOST = "127.0.0.1"

ENV_MAX_CLIENTS = "THPSPLIT_MAX_CLIENTS"
ENV_HELLO_TIMEOUT = "THPSPLIT_HELLO_TIMEOUT"
ENV_IDLE_TIMEOUT = "THPSPLIT_IDLE_TIMEOUT"
ENV_READ_TIMEOUT = "THPSPLIT_READ_TIMEOUT"

# Connection limits (issue 14, item 8). Clients after their hello, and connections still in it,
# each at most this many; beyond, a new one gets EMFILE and is closed.
MAX_CLIENTS = 256
# A connection that has not completed its hello (and authenticated) by then is closed.
HELLO_TIMEOUT_S = 5.0
# A client with no request in flight that sends nothing for this long is closed (0: never).
IDLE_TIMEOUT_S = 300.0
# A frame begun but not complete after this long closes its connection (slow or stuck senders).
READ_TIMEOUT_S = 10.0
# Bytes of partly received frames all of a daemon's client connections may hold together; a read
# beyond it closes that connection (ENOBUFS). The peer link is not counted.
MAX_BUFFERED_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a daemon allows its connections (see the constants above)."""

    max_clients: int = MAX_CLIENTS
    hello_timeout_s: float = HELLO_TIMEOUT_S
    idle_timeout_s: float = IDLE_TIMEOUT_S
    read_timeout_s: float = READ_TIMEOUT_S
    max_buffered_bytes: int = MAX_BUFFERED_BYTES


class LimitError(ValueError):
    """A limit flag or variable that is not a number in its range."""


def _limit(args: argparse.Namespace, attr: str, env: str, kind: type, lo: float, zero_ok: bool) -> Any:
    flag = "--" + attr.replace("_", "-")
    text = getattr(args, attr, None)
    source = flag
    if text is None:
        text, source = os.environ.get(env) or None, f"${env}"
    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise LimitError(f"{source}: {quote(text)} is not a {'whole ' if kind is int else ''}number") from None
    if not (value == 0 and zero_ok) and not (lo <= value < float("inf")):
        raise LimitError(f"{source}: {quote(text)} must be at least {lo:g}{' (or 0: none)' if zero_ok else ''}")
    return value


def limits_from(args: argparse.Namespace) -> Limits:
    """Limits from flags, then THPSPLIT_* variables, then the defaults.

    Raises:
        LimitError: a value that is not a number, or out of its range.
    """
    values = {
        "max_clients": _limit(args, "max_clients", ENV_MAX_CLIENTS, int, 1, False),
        "hello_timeout_s": _limit(args, "hello_timeout", ENV_HELLO_TIMEOUT, float, 0.001, False),
        "idle_timeout_s": _limit(args, "idle_timeout", ENV_IDLE_TIMEOUT, float, 0.001, True),
        "read_timeout_s": _limit(args, "read_timeout", ENV_READ_TIMEOUT, float, 0.001, False),
    }
    return Limits(**{k: v for k, v in values.items() if v is not None})

# Knobs a daemon accepts as flags and THPSPLIT_* variables: every writable sysfs knob.
KNOB_NAMES = tuple(name for name, spec in SPECS.items() if spec.writable)


class AddressError(ValueError):
    """An address that is neither ``unix:PATH`` nor ``tcp:HOST:PORT``."""


@dataclasses.dataclass(frozen=True)
class Address:
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    @property
    def tcp_host(self) -> str:
        """The host a TCP address listens on or connects to (DEFAULT_TCP_HOST when empty)."""
        return self.host or DEFAULT_TCP_HOST

    @property
    def local(self) -> bool:
        """A Unix socket, or TCP on a loopback address (127.0.0.0/8, ::1, ``localhost``): only
        this machine can reach it. Any other host name counts as not local."""
        if self.kind == "unix":
            return True
        host = self.tcp_host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def parse_address(text: str) -> Address:
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise AddressError(f"bad address {quote(text)}: use unix:PATH or tcp:HOST:PORT")
    if kind == "unix":
        return Address("unix", path=rest)
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        # An empty HOST (tcp::7070) is DEFAULT_TCP_HOST, never every interface.
        if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535:
            raise AddressError(f"bad address {quote(text)}: use tcp:HOST:PORT with PORT 0..65535")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return Address("tcp", host=host, port=int(port))
    raise AddressError(f"bad address {quote(text)}: use unix:PATH or tcp:HOST:PORT")


def runtime_dir() -> str:
    """$THPSPLIT_RUNTIME_DIR, else $XDG_RUNTIME_DIR/thpsplit, else /tmp/thpsplit-$UID."""
    explicit = os.environ.get(ENV_RUNTIME_DIR)
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "thpsplit")
    return f"/tmp/thpsplit-{os.getuid()}"


def default_address(daemon: str) -> str:
    """The address ``daemon`` ("collapsed" or "remapd") uses without flag or environment."""
    env = ENV_COLLAPSED if daemon == "collapsed" else ENV_REMAPD
    return os.environ.get(env) or f"unix:{os.path.join(runtime_dir(), daemon + '.sock')}"


def knob_env(name: str) -> str:
    """THPSPLIT_ENABLED, THPSPLIT_KHUGEPAGED_SCAN_SLEEP_MILLISECS, THPSPLIT_RETRY_POLICY, ..."""
    return "THPSPLIT_" + name.removeprefix("thpsplit/").replace("/", "_").replace("-", "_").upper()


def knob_flag(name: str) -> str:
    """--enabled, --khugepaged-scan-sleep-millisecs, --retry-policy, ..."""
    return "--" + name.removeprefix("thpsplit/").replace("/", "-").replace("_", "-")


def add_knob_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "knobs", "sysfs knobs at start (each also read from the THPSPLIT_* variable shown)"
    )
    for name in KNOB_NAMES:
        group.add_argument(
            knob_flag(name),
            dest="knob:" + name,
            metavar="VALUE",
            help=f"{name} (${knob_env(name)})",
        )


def knobs_from(args: argparse.Namespace) -> Knobs:
    """Knobs from flags, then THPSPLIT_* variables, then the defaults.

    Raises:
        KnobError: a value sysfs would refuse; the message names the flag's knob.
    """
    knobs = Knobs()
    for name in KNOB_NAMES:
        value: Any = getattr(args, "knob:" + name, None)
        if value is None:
            value = os.environ.get(knob_env(name))
        if value is not None:
            knobs.set(name, value)
    return knobs


def add_daemon_flags(parser: argparse.ArgumentParser, daemon: str) -> None:
    env = ENV_COLLAPSED if daemon == "collapsed" else ENV_REMAPD
    parser.add_argument(
        "--listen",
        metavar="ADDR",
        default=None,
        help=f"address to listen on: unix:PATH or tcp:HOST:PORT, port 0 picks one "
        f"(${env}; default unix:{runtime_dir()}/{daemon}.sock)",
    )
    parser.add_argument(
        "--ready-file",
        metavar="PATH",
        help="once listening, write the actual address (with the bound port) to PATH",
    )
    limits = parser.add_argument_group("connection limits", "each also read from the THPSPLIT_* variable shown")
    limits.add_argument(
        "--max-clients",
        metavar="N",
        help=f"client connections at most (and as many still in their hello); beyond, EMFILE "
        f"(${ENV_MAX_CLIENTS}; default {MAX_CLIENTS})",
    )
    limits.add_argument(
        "--hello-timeout",
        metavar="S",
        help=f"close a connection that has not said hello and authenticated within S seconds "
        f"(${ENV_HELLO_TIMEOUT}; default {HELLO_TIMEOUT_S:g})",
    )
    limits.add_argument(
        "--idle-timeout",
        metavar="S",
        help=f"close a client with nothing in flight that sends nothing for S seconds, 0: never "
        f"(${ENV_IDLE_TIMEOUT}; default {IDLE_TIMEOUT_S:g})",
    )
    limits.add_argument(
        "--read-timeout",
        metavar="S",
        help=f"close a connection whose frame is still incomplete S seconds after it began "
        f"(${ENV_READ_TIMEOUT}; default {READ_TIMEOUT_S:g})",
    )
    secrets = parser.add_argument_group(
        "secrets",
        "required on a listener other machines can reach; checked whenever set (docs/protocol.md)",
    )
    secrets.add_argument(
        "--secret-file",
        metavar="PATH",
        help="the client secret, which clients prove in their hello "
        "($THPSPLIT_SECRET_FILE, or the value itself in $THPSPLIT_SECRET)",
    )
    secrets.add_argument(
        "--peer-secret-file",
        metavar="PATH",
        help="the peer secret, which only the two daemons hold and the peer link proves "
        "($THPSPLIT_PEER_SECRET_FILE, or the value itself in $THPSPLIT_PEER_SECRET)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=os.environ.get(ENV_LOG_LEVEL, "info"),
        help=f"${ENV_LOG_LEVEL}; default info (debug shows every scan)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get(ENV_LOG_FORMAT, "auto"),
        help=f"${ENV_LOG_FORMAT}; auto: console on a TTY, JSON lines otherwise",
    )


def log_json(fmt: str) -> bool | None:
    return None if fmt == "auto" else fmt == "json"


__all__ = [
    "DEFAULT_TCP_HOST",
    "HELLO_TIMEOUT_S",
    "IDLE_TIMEOUT_S",
    "MAX_BUFFERED_BYTES",
    "MAX_CLIENTS",
    "READ_TIMEOUT_S",
    "Address",
    "AddressError",
    "LimitError",
    "Limits",
    "add_daemon_flags",
    "add_knob_flags",
    "default_address",
    "knob_env",
    "knob_flag",
    "knobs_from",
    "limits_from",
    "parse_address",
    "runtime_dir",
]
