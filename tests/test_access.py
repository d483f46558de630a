"""Socket permissions and the default TCP host (issue 14 item 9, issue 13 "Access"), with real
daemon processes: Unix sockets 0600 whatever the umask, in a directory only we can write; TCP
without a host on 127.0.0.1."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from shared.protocol import messages as m
from shared.shell.auth import Secrets
from shared.shell.config import parse_address
from shared.thpctl.client import COLLAPSED, open_client
from shared.thpctl.launch import DaemonProcess

SECRETS_UNSET = {"THPSPLIT_SECRET": "", "THPSPLIT_SECRET_FILE": "", "THPSPLIT_PEER_SECRET": "", "THPSPLIT_PEER_SECRET_FILE": ""}


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def run_daemon(argv: list[str], umask: int = 0o022, env: dict[str, str] | None = None, timeout: float = 30):
    """Start a daemon under ``umask``; it is expected to refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **SECRETS_UNSET, **(env or {})},
        umask=umask,
        check=False,
    )


async def start_daemon(workdir: Path, listen: str, umask: int, env: dict[str, str] | None = None) -> DaemonProcess:
    old = os.umask(umask)  # inherited by the child
    try:
        d = DaemonProcess("collapsed", workdir, listen, env={**SECRETS_UNSET, **(env or {})})
        await d.start()
    finally:
        os.umask(old)
    await d.wait_ready()
    return d


async def test_a_unix_socket_is_0600_in_a_0700_directory_whatever_the_umask(workdir):
    runtime = workdir / "runtime"
    d = await start_daemon(workdir, f"unix:{runtime / 'collapsed.sock'}", umask=0o000)
    try:
        assert mode(runtime) == 0o700
        assert mode(runtime / "collapsed.sock") == 0o600
        async with open_client(d.address, COLLAPSED, Secrets()) as c:
            assert (await c.call(m.Status))["daemon"] == "collapsed"
    finally:
        with trio.CancelScope(shield=True):
            assert await d.stop() == 0


def test_the_default_runtime_directory_is_made_0700(tmp_path):
    runtime = tmp_path / "xdg" / "thpsplit"
    (tmp_path / "xdg").mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "xdg"), "THPSPLIT_RUNTIME_DIR": "", "THPSPLIT_COLLAPSED": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "collapsed", "--ready-file", str(tmp_path / "ready")],
        env={**os.environ, **SECRETS_UNSET, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        umask=0,
    )
    try:
        for _ in range(1500):
            if (tmp_path / "ready").exists() or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert (tmp_path / "ready").read_text().strip() == f"unix:{runtime / 'collapsed.sock'}"
        assert (mode(runtime), mode(runtime / "collapsed.sock")) == (0o700, 0o600)
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


@pytest.mark.parametrize("dir_mode", [0o777, 0o770, 0o1777, 0o720])
def test_a_socket_directory_others_can_write_is_refused(tmp_path, dir_mode):
    shared_dir = tmp_path / "shared"
    shared_dir.mkdir()
    os.chmod(shared_dir, dir_mode)
    run = run_daemon(["collapsed", "--listen", f"unix:{shared_dir / 'c.sock'}"])
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "writable by group or others" in run.stderr and f"{dir_mode:04o}" in run.stderr
    assert not (shared_dir / "c.sock").exists()
    # The runtime directory the daemons default to is held to the same rule.
    run = run_daemon(["remapd"], env={"THPSPLIT_RUNTIME_DIR": str(shared_dir), "THPSPLIT_REMAPD": ""})
    assert run.returncode == 2 and "writable by group or others" in run.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_a_socket_directory_owned_by_another_user_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    run = run_daemon(["collapsed", "--listen", f"unix:{theirs / 'c.sock'}"])
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "belongs to uid 65534" in run.stderr


async def test_tcp_without_a_host_listens_on_loopback(workdir):
    d = await start_daemon(workdir, "tcp::0", umask=0o022)
    try:
        bound = parse_address(d.address)
        assert (bound.kind, bound.host) == ("tcp", "127.0.0.1") and bound.port > 0
        # A client given the same host-less form connects to 127.0.0.1 too.
        async with open_client(f"tcp::{bound.port}", COLLAPSED, Secrets()) as c:
            assert (await c.call(m.Status))["daemon"] == "collapsed"
    finally:
        with trio.CancelScope(shield=True):
            assert await d.stop() == 0


def test_loopback_is_told_apart_from_the_rest():
    local = ["unix:/x.sock", "tcp::1", "tcp:127.0.0.1:1", "tcp:127.1.2.3:1", "tcp:[::1]:1", "tcp:localhost:1"]
    remote = ["tcp:0.0.0.0:1", "tcp:[::]:1", "tcp:10.0.0.1:1", "tcp:collapsed:1", "tcp:example.org:1"]
    assert [parse_address(a).local for a in local] == [True] * len(local)
    assert [parse_address(a).local for a in remote] == [False] * len(remote)
