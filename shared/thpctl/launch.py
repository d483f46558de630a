"""Start both daemons as real processes and stop them again (for the tests and the demo).

    async with running_daemons(workdir, transport="tcp") as d:
        async with Session(d.collapsed.address, d.remapd.address) as s:
            ...

Each daemon writes its bound address to a ready file; waiting polls for it (bounded), and a
daemon that exits before it is ready raises with the end of its log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

import trio

READY_POLL_S = 0.01
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


class DaemonError(RuntimeError):
    pass


class DaemonProcess:
    """One daemon as a child process; ``env`` is laid over this process's environment (an empty
    value unsets a THPSPLIT_* variable as far as the daemon is concerned)."""

    def __init__(
        self, name: str, workdir: Path, listen: str, extra: Sequence[str] = (), env: Mapping[str, str] | None = None
    ):
        self.name = name
        self.workdir = workdir
        self.listen = listen
        self.extra = list(extra)
        self.env = dict(env or {})
        self.ready_file = workdir / f"{name}.ready"
        self.log_file = workdir / f"{name}.log"
        self.address = ""
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", self.name, "--listen", self.listen, "--ready-file", str(self.ready_file)]
        with self._open_log() as log:
            self.proc = await trio.lowlevel.open_process(
                argv + self.extra, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env={**os.environ, **self.env}
            )

    def _open_log(self) -> BinaryIO:
        return open(self.log_file, "ab")  # the child's stdout and stderr; appended across restarts

    async def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> str:
        assert self.proc is not None
        with trio.move_on_after(timeout):
            while True:
                if self.ready_file.exists():
                    self.address = self.ready_file.read_text().strip()
                    if self.address:
                        # A restart on port 0 would move: keep the port we got.
                        self.listen = self.address
                        return self.address
                if self.proc.poll() is not None:
                    raise DaemonError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                await trio.sleep(READY_POLL_S)
        raise DaemonError(f"{self.name} not ready within {timeout:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Send ``sig`` and wait for the exit status (killed after ``timeout``)."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
            with trio.move_on_after(timeout):
                return await self.proc.wait()
            self.proc.kill()
        return await self.proc.wait()


class Daemons:
    def __init__(self, collapsed: DaemonProcess, remapd: DaemonProcess):
        self.collapsed = collapsed
        self.remapd = remapd

    @property
    def thpctl_args(self) -> list[str]:
        return ["--collapsed", self.collapsed.address, "--remapd", self.remapd.address]


@asynccontextmanager
async def running_daemons(
    workdir: Path | str,
    transport: str = "unix",
    collapsed_args: Sequence[str] = (),
    remapd_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
) -> AsyncIterator[Daemons]:
    """Both daemons on Unix sockets in ``workdir`` (created 0700) or on TCP ``host`` (ports
    chosen by the kernel), with ``env`` over this process's environment (e.g. the secrets);
    stopped with SIGTERM on exit (each exit status is in ``proc.returncode``)."""
    workdir = Path(workdir)
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if transport == "unix":
        collapsed = DaemonProcess("collapsed", workdir, f"unix:{workdir / 'collapsed.sock'}", collapsed_args, env)
        remapd_listen = f"unix:{workdir / 'remapd.sock'}"
    elif transport == "tcp":
        collapsed = DaemonProcess("collapsed", workdir, f"tcp:{host}:0", collapsed_args, env)
        remapd_listen = f"tcp:{host}:0"
    else:
        raise ValueError(f"transport must be unix or tcp, not {transport!r}")
    await collapsed.start()
    try:
        await collapsed.wait_ready()
        remapd = DaemonProcess(
            "remapd", workdir, remapd_listen, ["--collapsed", collapsed.address, *remapd_args], env
        )
        await remapd.start()
        try:
            await remapd.wait_ready()
            yield Daemons(collapsed, remapd)
        finally:
            with trio.CancelScope(shield=True):
                await remapd.stop()
    finally:
        with trio.CancelScope(shield=True):
            await collapsed.stop()


__all__ = ["DaemonError", "DaemonProcess", "Daemons", "running_daemons"]
