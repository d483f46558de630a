"""Snapshot files: a daemon's model state on disk, written atomically, checked when read.

A snapshot file is one msgpack map, the envelope::

    {"format": "thpsplit-snapshot", "version": 1, "daemon": "collapsed" | "remapd",
     "written_at": <unix time>, "sha256": <hex of state>, "state": <bytes: msgpack of the state>}

The state is whatever the daemon's model put in it (plain msgpack: ints, strings, lists, maps,
bytes for arrays). Writing goes to a temporary file in the same directory, which is fsync'd,
renamed over the old snapshot and the directory fsync'd: a crash at any moment leaves either the
old snapshot or the new one, never a mix (a temporary file left behind is ignored and removed at
the next write). Reading refuses, with one line saying why, a file that is not a snapshot, one of
another version or of the other daemon, and one whose state does not match its checksum.

Sans-IO apart from the file itself: no trio (the daemons run these calls in a worker thread).
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path
from typing import Any

import msgpack

FORMAT = "thpsplit-snapshot"
VERSION = 1
# The envelope is small; the state inside it may be large (a page cache of many GiB is a few
# hundred MB of arrays), so msgpack's limits are lifted for our own files only.
_UNLIMITED = 2**31 - 1


class SnapshotError(Exception):
    """A snapshot that cannot be used: the message says which file and why (one line)."""


def snapshot_path(state_dir: str | os.PathLike[str], daemon: str) -> Path:
    return Path(state_dir) / f"{daemon}.snapshot"


def encode(daemon: str, state: dict[str, Any], now: float | None = None) -> bytes:
    """The file's bytes for ``state``."""
    body = msgpack.packb(state, use_bin_type=True)
    envelope = {
        "format": FORMAT,
        "version": VERSION,
        "daemon": daemon,
        "written_at": time.time() if now is None else now,
        "sha256": hashlib.sha256(body).hexdigest(),
        "state": body,
    }
    return bytes(msgpack.packb(envelope, use_bin_type=True))


def decode(data: bytes, daemon: str, where: str = "snapshot") -> dict[str, Any]:
    """The state in a file's bytes.

    Errors:
        SnapshotError: not a snapshot, another version or daemon, or a damaged state.
    """
    try:
        envelope = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            max_bin_len=_UNLIMITED,
            max_str_len=_UNLIMITED,
            max_array_len=_UNLIMITED,
            max_map_len=_UNLIMITED,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as err:
        raise SnapshotError(f"{where}: not a thpsplit snapshot (undecodable: {err or type(err).__name__})") from None
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise SnapshotError(f"{where}: not a thpsplit snapshot")
    if envelope.get("version") != VERSION:
        raise SnapshotError(f"{where}: snapshot version {envelope.get('version')!r}, this daemon reads version {VERSION}")
    if envelope.get("daemon") != daemon:
        raise SnapshotError(f"{where}: a snapshot of {envelope.get('daemon')!r}, not of {daemon}")
    body = envelope.get("state")
    if not isinstance(body, bytes) or hashlib.sha256(body).hexdigest() != envelope.get("sha256"):
        raise SnapshotError(f"{where}: damaged (its state does not match its checksum)")
    try:
        state = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=False,
            max_bin_len=_UNLIMITED,
            max_str_len=_UNLIMITED,
            max_array_len=_UNLIMITED,
            max_map_len=_UNLIMITED,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as err:
        raise SnapshotError(f"{where}: damaged state ({err or type(err).__name__})") from None
    if not isinstance(state, dict):
        raise SnapshotError(f"{where}: damaged state (not a map)")
    return state


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temporary file, fsync, rename, fsync of the directory."""
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dirfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    for stale in directory.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)  # left by a daemon that died mid-write


def save(state_dir: str | os.PathLike[str], daemon: str, state: dict[str, Any]) -> int:
    """Write ``daemon``'s snapshot in ``state_dir``; returns its size in bytes."""
    data = encode(daemon, state)
    write_atomically(snapshot_path(state_dir, daemon), data)
    return len(data)


def _check_private(path: Path, what: str) -> None:
    """Whoever may write the state directory or the snapshot decides the world a daemon starts
    with (the checksum only detects damage): both must be this user's and nobody else's to
    write, as the socket directory must be (shared.shell.transport.prepare_socket_dir).

    Errors:
        SnapshotError: they are not. FileNotFoundError: ``path`` does not exist.
    """
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise SnapshotError(f"{path}: the {what} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise SnapshotError(
            f"{path}: the {what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); chmod go-w"
        )


def load(state_dir: str | os.PathLike[str], daemon: str) -> dict[str, Any] | None:
    """``daemon``'s snapshot in ``state_dir``, or None if there is none.

    Errors:
        SnapshotError: the file cannot be read or used (see :func:`decode`), or the directory
        or the file may be written by another user.
    """
    path = snapshot_path(state_dir, daemon)
    try:
        _check_private(path.parent, "directory")
        _check_private(path, "snapshot")
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise SnapshotError(f"{path}: cannot be read: {err.strerror or err}") from None
    return decode(data, daemon, str(path))


__all__ = ["FORMAT", "VERSION", "SnapshotError", "decode", "encode", "load", "save", "snapshot_path", "write_atomically"]
