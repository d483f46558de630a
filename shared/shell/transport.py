"""Sockets: connect to and listen on a :class:`~shared.shell.config.Address` (Unix or TCP).

Access (issue 14, item 9): a Unix socket is created mode 0600 whatever the umask, in a directory
that only this user can write (created 0700 when missing; an existing one that is group- or
world-writable, or owned by someone else, is refused, since whoever can write it can replace the
socket). TCP without a host listens on 127.0.0.1; anything else reachable from other machines
needs the shared secrets (:mod:`shared.shell.auth`).
"""

from __future__ import annotations

import errno
import os
import stat

import trio

from shared.shell.config import Address

# Connections the kernel queues before the daemon accepts them (capped by net.core.somaxconn):
# above the client limit, so a burst of connections is accepted and answered rather than reset.
LISTEN_BACKLOG = 1024
SOCKET_MODE = 0o600
SOCKET_DIR_MODE = 0o700


class UnsafeSocketDir(OSError):
    """The directory a Unix socket would live in can be written by others (or is theirs)."""


async def connect(address: Address) -> trio.abc.Stream:
    if address.kind == "unix":
        return await trio.open_unix_socket(address.path)
    return await trio.open_tcp_stream(address.tcp_host, address.port)


def prepare_socket_dir(path: str) -> str:
    """The directory of Unix socket ``path``, created 0700 if missing, checked if not.

    Errors:
        UnsafeSocketDir: the directory is writable by group or others, or owned by another user.
        OSError: it cannot be created.
    """
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.mkdir(parent, SOCKET_DIR_MODE)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(parent), exist_ok=True)
        os.mkdir(parent, SOCKET_DIR_MODE)
        os.chmod(parent, SOCKET_DIR_MODE)
    else:
        os.chmod(parent, SOCKET_DIR_MODE)  # the umask may have taken bits away
    st = os.stat(parent)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeSocketDir(errno.ENOTDIR, f"{parent} is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafeSocketDir(
            errno.EPERM,
            f"refusing to listen in {parent}: it belongs to uid {st.st_uid}, not to this user "
            f"(uid {os.geteuid()}), who could replace the socket",
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeSocketDir(
            errno.EPERM,
            f"refusing to listen in {parent}: it is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); use a directory only you can write (chmod go-w)",
        )
    return parent


async def listen(address: Address) -> tuple[list[trio.SocketListener], Address]:
    """Listeners on ``address`` and the address actually bound (the port chosen for port 0).

    A Unix socket file left by a daemon that died is replaced; one a live daemon answers on is
    EADDRINUSE.
    """
    if address.kind == "tcp":
        host = address.tcp_host
        listeners = await trio.open_tcp_listeners(address.port, host=host, backlog=LISTEN_BACKLOG)
        port = listeners[0].socket.getsockname()[1]
        return list(listeners), Address("tcp", host=host, port=port)
    path = address.path
    prepare_socket_dir(path)
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
        # The socket file is born 0600 (connecting takes write permission on it): no window in
        # which the umask's mode lets others in. The daemon is one thread, so the umask is ours.
        old_umask = os.umask(0o777 & ~SOCKET_MODE)
        try:
            await sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, SOCKET_MODE)
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
