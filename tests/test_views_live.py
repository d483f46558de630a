"""The live views against real daemons: thpctl trace's trace_pipe lines and its subscription's
bounded queue, thpctl top under a pseudo-terminal (q and Ctrl-C quit), thpmaps end to end, and
pagemap's --binary bytes."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio
from helpers import ONE_PAGE_FLAGS, ok

from shared.pageflags import PM_FILE, PM_PRESENT
from shared.thpctl.cli import amain
from shared.thpctl.launch import running_daemons
from shared.thpctl.thpmaps import u64s

ROOT = Path(__file__).resolve().parent.parent

COLLAPSE_LINE = re.compile(
    r"^ +khugepaged-\d+ \[000\] \.\.\.\.\. +\d+\.\d{6}: mm_khugepaged_collapse_file: mm=0xffff888000001000, "
    r"hpage_pfn=0x[0-9a-f]+, index=(\d+), addr=([0-9a-f]+), is_shmem=0, filename=lib, nr=512, result=(\w+)$"
)
SCAN_LINE = re.compile(
    r"mm_khugepaged_scan_file: mm=0xffff888000001000, scan_pfn=0x[0-9a-f]+, filename=lib, present=\d+, "
    r"swap=0, result=\w+$"
)


@pytest.fixture
async def d(tmp_path: Path):
    short = len(str(tmp_path / "collapsed.sock")) < 100
    workdir = tmp_path if short else Path(tempfile.mkdtemp(prefix="thp-"))
    async with running_daemons(workdir, "unix", remapd_args=ONE_PAGE_FLAGS) as daemons:
        yield daemons
    if not short:
        shutil.rmtree(workdir, ignore_errors=True)


async def _mapped(d) -> int:
    # khugepaged asleep for an hour once it has looked at the new registration: the tests count
    # what MADV_COLLAPSE made, and on a slow run its 10 s wake-up would collapse the other PMD
    # range too (the write wakes it now, with nothing registered yet).
    await ok(d, "sysfs", "set", "khugepaged/scan_sleep_millisecs", "3600000")
    await ok(d, "file", "create", "lib", "--size", "4M")
    await ok(d, "proc", "spawn", "1")
    addr = int(await ok(d, "mmap", "1", "auto", "4M", "--file", "lib", "--prot", "rx", "--private"), 16)
    await ok(d, "madvise", "1", hex(addr), "4M", "hugepage")
    await ok(d, "touch", "1", hex(addr), "4M")
    return addr


async def test_trace_prints_the_kernels_tracepoint_lines(d):
    out, err = io.StringIO(), io.StringIO()
    async with trio.open_nursery() as nursery:

        async def trace() -> None:
            argv = [*d.thpctl_args, "trace", "--count", "4", "--duration", "20"]
            assert await amain([*argv, "--filter", "mm_khugepaged_collapse_file", "--filter", "mm_khugepaged_scan_file"], out, err) == 0

        nursery.start_soon(trace)
        await trio.sleep(0.5)  # subscribed (the first batch is empty)
        addr = await _mapped(d)
        assert await ok(d, "madvise", "1", hex(addr), "4M", "collapse") == "0\n"
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and err.getvalue() == ""
    collapses = [COLLAPSE_LINE.match(line) for line in lines if "collapse_file" in line]
    assert len(collapses) == 2 and all(collapses), lines
    # The kernel prints the end index of the range it collapsed, and addr in hex without 0x.
    assert [(int(c[1]), int(c[2], 16), c[3]) for c in collapses if c] == [
        (512, addr, "pte_mapped_hugepage"),
        (1024, addr + (2 << 20), "pte_mapped_hugepage"),
    ]
    assert all(SCAN_LINE.search(line) for line in lines if "scan_file" in line)


async def test_trace_json_lines_and_a_slow_reader_gets_a_dropped_count(d, monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    async with trio.open_nursery() as nursery:

        async def trace() -> None:
            assert await amain([*d.thpctl_args, "--json", "trace", "--daemon", "remapd", "--count", "2", "--duration", "20"], out, err) == 0

        nursery.start_soon(trace)
        await trio.sleep(0.5)
        addr = await _mapped(d)
        await ok(d, "madvise", "1", hex(addr), "2M", "collapse")
    import json

    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert docs[0]["daemon"] == "remapd" and docs[0]["task"].startswith("remapd-")
    assert {"ts", "event", "mm"} <= set(docs[0]) and isinstance(docs[0]["mm"], int)


async def test_a_subscription_drops_and_counts_what_a_slow_client_does_not_read(monkeypatch):
    from shared.protocol import messages as m
    from shared.shell import trace as shell_trace
    from shared.tracepoints import get_logger

    monkeypatch.setattr(shell_trace, "QUEUE_DEPTH", 4)

    class FakeDriver:
        name = "remapd"

        def now_ms(self) -> float:
            return 1000.0

    sent: list = []
    gate = trio.Event()

    async def send(batch) -> None:
        sent.append(batch)
        if len(sent) == 2:
            await gate.wait()  # the client stops reading

    stream = shell_trace.trace_stream(FakeDriver(), m.Trace(1, ()))  # type: ignore[arg-type]
    log = get_logger("remapd.test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.run, send)
        await trio.sleep(0.05)
        log.debug("first", n=0)
        await trio.sleep(0.05)  # batch 2 is out; its send blocks
        for i in range(10):
            log.debug("burst", n=i)
        gate.set()
        await trio.sleep(0.05)
        log.debug("last", n=99)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert sent[0] == {"events": [], "dropped": 0}
    assert [e["event"] for e in sent[1]["events"]] == ["first"]
    # The queue held 4 of the burst; the 6 others were dropped and are counted with them.
    assert [e["fields"]["n"] for e in sent[2]["events"]] == [0, 1, 2, 3] and sent[2]["dropped"] == 6
    assert sent[3]["dropped"] == 0 and [e["event"] for e in sent[3]["events"]] == ["last"]


def _pty_thpctl(d, *argv: str) -> tuple[int, int]:
    pid, fd = pty.fork()
    if pid == 0:  # the child: thpctl on the pseudo-terminal
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "shared.thpctl", *d.thpctl_args, *argv])
    return pid, fd


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    end = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return seen


def _wait(pid: int, fd: int, timeout: float = 15) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            os.close(fd)
            return os.waitstatus_to_exitcode(status)
        _read_until(fd, b"\x00", 0.1)  # keep the terminal drained
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(fd)
    raise AssertionError("thpctl top did not quit")


@pytest.mark.parametrize("key", [b"q", b"\x03"])
async def test_top_refreshes_in_place_and_quits_on_q_or_ctrl_c(d, key):
    addr = await _mapped(d)
    await ok(d, "madvise", "1", hex(addr), "2M", "collapse")
    pid, fd = await trio.to_thread.run_sync(lambda: _pty_thpctl(d, "top", "--interval", "0.2"))
    screen = await trio.to_thread.run_sync(lambda: _read_until(fd, b"MMAP_LOCK", 20))
    text = screen.decode(errors="replace")
    assert "thpctl top" in text and "collapsed up" in text and "khugepaged" in text, text
    # A second screen comes by redrawing (cursor movement), not by scrolling a new copy.
    again = await trio.to_thread.run_sync(lambda: _read_until(fd, b"\x1b[", 5))
    assert b"\x1b[" in screen + again
    os.write(fd, key)
    assert await trio.to_thread.run_sync(lambda: _wait(pid, fd)) == 0


async def test_top_without_a_terminal_prints_a_snapshot(d):
    addr = await _mapped(d)
    await ok(d, "madvise", "1", hex(addr), "2M", "collapse")
    out = await ok(d, "top")
    assert "khugepaged" in out and "processes" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["PID", "VMAS"])
    row = lines[header + 1]
    assert row.split()[0] == "1"
    assert "2048" in row and "50%" in row  # half of the 4 MiB is PMD-mapped


async def test_thpmaps_and_pagemap_binary_end_to_end(d, tmp_path):
    addr = await _mapped(d)
    await ok(d, "madvise", "1", hex(addr), "2M", "collapse")
    out = await ok(d, "thpmaps", "1")
    assert out.splitlines()[0] == "       PID             START              END PROT   OFFSET   DEV    INODE OBJECT"
    assert "file-thp-pmd-aligned-2048kB:        2048 kB (50%)" in out
    assert "thpsplit/lib" in out
    summary = await ok(d, "thpmaps", "1", "--summary")
    assert summary.splitlines()[1].split() == ["1", "2048", "kB", "0", "kB", "0", "kB", "0", "kB"]
    path = tmp_path / "pm.bin"
    await ok(d, "pagemap", "1", hex(addr), "8K", "-o", str(path))
    entries = u64s(path.read_bytes())
    assert len(entries) == 2 and all(e & PM_PRESENT and e & PM_FILE for e in entries)
    p = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "shared.thpctl", *d.thpctl_args, "pagemap", "1", hex(addr), "8K", "--binary"],
            capture_output=True,
            cwd=ROOT,
            timeout=30,
            check=False,
        )
    )
    assert p.returncode == 0 and p.stdout == path.read_bytes()
    text = await ok(d, "kpageflags", hex(entries[0] & ((1 << 55) - 1)), "2")
    assert "COMPOUND_HEAD" in text.splitlines()[1] and "COMPOUND_TAIL" in text.splitlines()[2]
