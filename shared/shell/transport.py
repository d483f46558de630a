"""Sockets: connect to and listen on a :class:`~shared.shell.config.Address` (Unix or TCP)."""

from __future__ import annotations

import errno
import os
import stat

import trio

from shared.shell.config import Address

LISTEN_BACKLOG = 128


async def connect(address: Address) -> trio.abc.Stream:
    if address.kind == "unix":
        return await trio.open_unix_socket(address.path)
    return await trio.open_tcp_stream(address.host, address.port)


async def listen(address: Address) -> tuple[list[trio.SocketListener], Address]:
    """Listeners on ``address`` and the address actually bound (the port chosen for port 0).

    A Unix socket file left by a daemon that died is replaced; one a live daemon answers on is
    EADDRINUSE.
    """
    if address.kind == "tcp":
        listeners = await trio.open_tcp_listeners(address.port, host=address.host or None, backlog=LISTEN_BACKLOG)
        port = listeners[0].socket.getsockname()[1]
        return list(listeners), Address("tcp", host=address.host, port=port)
    path = address.path
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        try:
            live = await trio.open_unix_socket(path)
        except OSError:
            os.unlink(path)
        else:
            await live.aclose()
            raise OSError(errno.EADDRINUSE, f"a daemon already listens on {path}")
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return [trio.SocketListener(sock)], address


def write_ready_file(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)
