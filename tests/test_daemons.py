"""Both daemons as real processes, driven through thpctl and the client library."""

from __future__ import annotations

import json
import math
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio
from helpers import ONE_PAGE_FLAGS, next_message, ok, raw_hello, thpctl

from shared.errors import UserError
from shared.protocol import PROTOCOL_VERSION
from shared.protocol import messages as m
from shared.protocol.framing import (
    MAX_FRAME_BYTES,
    FrameDecoder,
    encode_frame,
    encode_message,
)
from shared.shell.config import parse_address
from shared.shell.peer import MAX_ROWS_PER_FRAME, split_for_frames
from shared.shell.transport import connect
from shared.thpctl.client import COLLAPSED, REMAPD, Session, open_client
from shared.thpctl.launch import DaemonProcess, running_daemons

MB = 1 << 20


def smaps_fields(text: str) -> dict[str, int]:
    return {
        line.split(":")[0]: int(line.split()[1])
        for line in text.splitlines()
        if line.endswith(" kB") or line.startswith("THPeligible:")
    }


def table(text: str) -> dict[str, int]:
    """vmstat ("name value") or meminfo ("Name:  value kB") text as a dict."""
    return {line.split()[0].rstrip(":"): int(line.split()[1]) for line in text.splitlines()}


@pytest.fixture
def workdir(tmp_path: Path):
    # sun_path holds 108 bytes: a long test name in tmp_path could overflow it.
    if len(str(tmp_path / "collapsed.sock")) < 100:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="thp-"))
    yield short
    shutil.rmtree(short, ignore_errors=True)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_file_mapped_by_two_processes_collapses_to_pmd_mappings(workdir, transport):
    async with running_daemons(workdir, transport, remapd_args=ONE_PAGE_FLAGS) as d:
        if transport == "tcp":
            assert parse_address(d.collapsed.address).port != 0
        assert parse_address(d.remapd.address).kind == transport
        await ok(d, "file", "create", "libfoo.so", "--size", "4M")
        addrs = {}
        for pid in (1, 2):
            await ok(d, "proc", "spawn", str(pid))
            addrs[pid] = (await ok(d, "mmap", str(pid), "auto", "4M", "--file", "libfoo.so", "--prot", "rx", "--private")).strip()
            assert await ok(d, "madvise", str(pid), addrs[pid], "4M", "hugepage") == "0\n"
        # With VM_HUGEPAGE the first fault reads two PMD ranges (do_sync_mmap_readahead, even with
        # read_ahead_kb 0): the whole file; every other fault of either process finds it cached.
        assert await ok(d, "touch", "1", addrs[1], "4M") == "minor 1023\nmajor 1\n"
        assert await ok(d, "touch", "2", addrs[2], "4M") == "minor 1024\n"
        before = table(await ok(d, "vmstat"))
        assert (before["nr_file_pages"], before["nr_file_hugepages"], before["pgmajfault"]) == (1024, 0, 1)

        await ok(d, "sysfs", "set", "khugepaged/scan_sleep_millisecs", "10")
        await ok(d, "wait-scans", "2", "--timeout", "20")

        for pid in (1, 2):
            fields = smaps_fields(await ok(d, "smaps", str(pid)))
            assert (fields["Size"], fields["Rss"], fields["FilePmdMapped"], fields["THPeligible"]) == (4096, 4096, 4096, 1)
            # Every page is now reached through the PMD the collapse installed.
            assert await ok(d, "touch", str(pid), addrs[pid], "4M") == "hit 1024\n"
        vmstat = table(await ok(d, "vmstat"))
        meminfo = table(await ok(d, "meminfo"))
        assert vmstat["thp_collapse_alloc"] == 2
        assert vmstat["nr_file_hugepages"] == 2 and meminfo["FileHugePages"] == 2 * 2048
        # Both processes map both huge pages with a PMD: the rmap counts a huge page once.
        assert vmstat["nr_file_pmdmapped"] == 2 and meminfo["FilePmdMapped"] == 2 * 2048
        assert vmstat["nr_file_pages"] == 1024 and meminfo["Cached"] == 4096
        assert (await ok(d, "sysfs", "get", "khugepaged/pages_collapsed")) == "2\n"
        ls = await ok(d, "--json", "file", "ls")
        assert '"thps": 2' in ls and '"nrpages": 1024' in ls
    assert (d.collapsed.proc.returncode, d.remapd.proc.returncode) == (0, 0)
    if transport == "unix":
        assert not (workdir / "collapsed.sock").exists() and not (workdir / "remapd.sock").exists()


async def test_remapd_reconnects_to_a_restarted_collapsed(workdir):
    async with running_daemons(workdir, "unix", remapd_args=ONE_PAGE_FLAGS) as d:
        await ok(d, "file", "create", "f", "--size", "2M")
        await ok(d, "proc", "spawn", "1")
        addr = (await ok(d, "mmap", "1", "auto", "2M", "--file", "f")).strip()
        assert await ok(d, "touch", "1", addr, "2M") == "major 512\n"

        d.collapsed.proc.kill()
        assert await d.collapsed.proc.wait() == -signal.SIGKILL
        await d.collapsed.start()
        await d.collapsed.wait_ready()

        # Returns once remapd is connected again and the two have exchanged everything.
        await ok(d, "--deadline", "20", "sync")
        status = await ok(d, "--json", "status")
        assert '"peer": true' in status and '"peer": false' not in status
        # The new page cache is empty, and the mappings of the old one went with it; remapd
        # named its file again, so the new collapsed knows "f" (size kept, nothing cached).
        ls = await ok(d, "file", "ls")
        assert ls.splitlines()[1].split()[:5] == ["f", "1", str(2 * MB), "file", "0"]
        assert smaps_fields(await ok(d, "smaps", "1"))["Rss"] == 0
        assert await ok(d, "touch", "1", addr, "2M") == "major 512\n"
        # A new file, created on the new collapsed, is mapped and faulted through remapd.
        await ok(d, "file", "create", "g", "--size", "2M")
        addr_g = (await ok(d, "mmap", "1", "auto", "2M", "--file", "g")).strip()
        assert await ok(d, "fault", "1", addr_g) == "major\n"
        assert table(await ok(d, "meminfo"))["Cached"] == 2048 + 4
    log = (workdir / "remapd.log").read_text()
    assert log.count('"peer_connected"') == 2 and '"peer_lost"' in log


async def raw_client(address: str) -> tuple[trio.abc.Stream, FrameDecoder]:
    stream = await connect(parse_address(address))
    decoder, hello, auth = await raw_hello(stream)
    assert (hello.role, hello.protocol, auth) == ("collapsed", PROTOCOL_VERSION, m.PeerAuth(""))
    return stream, decoder


async def test_bad_frames_get_an_error_and_the_daemon_carries_on(workdir):
    async with running_daemons(workdir, "unix", remapd_args=ONE_PAGE_FLAGS) as d:
        async with open_client(d.collapsed.address, COLLAPSED) as good:
            await good.call(m.FileCreate, name="f", size=MB)
            cases = [
                # a message that does not exist, with a readable id
                (encode_frame(["client.no_such_thing", {"id": 7}]), 7),
                # a header announcing a frame beyond MAX_FRAME_BYTES
                (struct.pack(">I", 0xFFFFFFF0) + b"\x00" * 16, 0),
                # a valid frame that is not msgpack
                (struct.pack(">I", 1) + b"\xc1", 0),
                # a peer message from a client
                (encode_message(m.MmExit(1)), 0),
            ]
            for data, reply_to in cases:
                stream, decoder = await raw_client(d.collapsed.address)
                await stream.send_all(data)
                reply = await next_message(stream, decoder)
                assert isinstance(reply, m.ErrorReply) and (reply.id, reply.errno) == (reply_to, "EPROTO"), reply
                assert await next_message(stream, decoder) is None  # and the connection is closed
                await stream.aclose()
            # Not even a hello: an HTTP request reads as a 1.2 GB frame.
            stream = await connect(parse_address(d.collapsed.address))
            await stream.send_all(b"GET / HTTP/1.1\r\n\r\n")
            decoder = FrameDecoder()
            hello = await next_message(stream, decoder)
            assert isinstance(hello, m.PeerHello) and hello.role == "collapsed"
            reply = await next_message(stream, decoder)
            assert isinstance(reply, m.ErrorReply) and reply.errno == "EPROTO"
            await stream.aclose()
            # A second remapper is turned away; the real one stays connected.
            stream = await connect(parse_address(d.collapsed.address))
            decoder, _, auth = await raw_hello(stream, "remapd")
            assert auth == m.PeerAuth("")  # no peer secret on these daemons: a local link
            assert await next_message(stream, decoder) == m.ErrorReply(0, "EBUSY", "a remapd is already connected")
            await stream.aclose()
            # A request this daemon does not serve is refused, and the connection stays up.
            with pytest.raises(UserError) as info:
                await good.call(m.Smaps, pid=1)
            assert info.value.errno_name == "EOPNOTSUPP"
            assert [f["name"] for f in await good.call(m.FileLs)] == ["f"]
            status = await good.call(m.Status)
            assert status["peer"] is True
        await ok(d, "proc", "spawn", "1")
        addr = (await ok(d, "mmap", "1", "auto", "1M", "--file", "f")).strip()
        assert await ok(d, "fault", "1", addr) == "major\n"


@pytest.mark.parametrize("hold_ms", [float("nan"), float("inf"), -1.0, 1e300])
async def test_a_lock_hold_time_that_is_not_a_finite_bounded_float_is_refused(workdir, hold_ms):
    """Issue 14, item 1: a NaN hold time used to kill remapd (and inf held the lock for good)."""
    async with running_daemons(workdir, "unix", remapd_args=ONE_PAGE_FLAGS) as d:
        stream = await connect(parse_address(d.remapd.address))
        decoder, hello, _ = await raw_hello(stream)
        assert hello.role == "remapd"
        await stream.send_all(encode_frame(["client.proc_spawn", {"id": 1, "pid": 5}]))
        assert await next_message(stream, decoder) == m.ProcSpawn.REPLY(1, {"pid": 5})
        await stream.send_all(encode_frame(["client.lock", {"id": 2, "pid": 5, "hold_ms": hold_ms}]))
        reply = await next_message(stream, decoder)
        assert isinstance(reply, m.ErrorReply) and (reply.id, reply.errno) == (2, "EPROTO"), reply
        assert reply.message.startswith("client.lock: field 'hold_ms': ")
        assert ("finite" in reply.message) == (not math.isfinite(hold_ms))
        assert await next_message(stream, decoder) is None  # and the connection is closed
        await stream.aclose()
        # The client library refuses to send it in the first place.
        async with open_client(d.remapd.address, REMAPD) as c:
            with pytest.raises(UserError) as info:
                await c.call(m.Lock, pid=5, hold_ms=hold_ms)
            assert info.value.errno_name == "EINVAL" and "hold_ms" in info.value.message
        # remapd is still up and the process still has its mmap lock free.
        assert (await ok(d, "lock", "5", "--hold", "1", "--write")).startswith("pid 5 mmap lock held for write")
        assert '"processes": [5]' in await ok(d, "--json", "status", "remapd")
    assert (d.collapsed.proc.returncode, d.remapd.proc.returncode) == (0, 0)


async def test_requests_pipeline_on_a_connection_and_run_concurrently_across_connections(workdir):
    async with (
        running_daemons(workdir, "unix", remapd_args=ONE_PAGE_FLAGS) as d,
        Session(d.collapsed.address, d.remapd.address) as s,
    ):
        # remapd is ready once it listens; before the pair has met, collapsed answers a create
        # without a barrier and the file reaches remapd at its resync, maybe after the mmap.
        collapsed = await s.client(COLLAPSED)
        with trio.fail_after(20):
            while not (await collapsed.call(m.Status))["peer"]:
                await trio.sleep(0.01)
        await s.call(m.FileCreate, name="f", size=2 * MB)
        await s.call(m.ProcSpawn, pid=1)
        addr = (await s.call(m.Mmap, pid=1, addr=None, length=2 * MB, name="f"))["addr"]
        # 128 faults sent back to back, answered by id.
        remapd = await s.client(REMAPD)
        pending = [await remapd.start(m.Fault, pid=1, addr=addr + i * 4096) for i in range(128)]
        results = [(await p.result())["result"] for p in pending]
        assert results == ["major"] * 128
        # An application holds the mmap lock for writing: a fault on another connection
        # waits for it, while other requests are answered meanwhile.
        hold = await s.call(m.Lock, pid=1, hold_ms=400.0, write=True)
        assert hold["mode"] == "write"
        order = []
        async with open_client(d.remapd.address, REMAPD) as other:

            async def fault() -> None:
                order.append(("fault", (await other.call(m.Fault, pid=1, addr=addr + 128 * 4096))["result"]))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(fault)
                smaps = await s.call(m.Smaps, pid=1)
                order.append(("smaps", smaps[0]["Rss"]))
        assert order == [("smaps", 128 * 4), ("fault", "major")]


async def test_knobs_are_validated_once_and_end_equal_on_both_daemons(workdir):
    async with running_daemons(workdir, "unix", remapd_args=ONE_PAGE_FLAGS) as d:
        await ok(d, "sysfs", "set", "khugepaged/max_ptes_none", "100")
        await ok(d, "sysfs", "set", "enabled", "always")
        for value, errno in (("512", "EINVAL"), ("lots", "EINVAL")):
            status, out, err = await thpctl(d, "sysfs", "set", "khugepaged/max_ptes_none", value)
            assert (status, out) == (1, "") and err.startswith(f"thpctl sysfs set: {errno}: ")
        status, _, err = await thpctl(d, "sysfs", "set", "khugepaged/full_scans", "3")
        assert status == 1 and "EACCES" in err
        status, _, err = await thpctl(d, "sysfs", "get", "khugepaged/nope")
        assert status == 1 and "ENOENT" in err
        async with Session(d.collapsed.address, d.remapd.address) as s:
            views = [await s.call(m.SysfsGet, daemon) for daemon in (COLLAPSED, REMAPD)]
        values = [
            {k: e["value"] for k, e in v.items() if k != "thpsplit/free_huge_pages" and "/stats/" not in k}
            for v in views
        ]
        assert views[0]["hugepages-2048kB/stats/split"]["value"] == 0  # collapsed serves the mTHP stats
        assert values[0]["khugepaged/max_ptes_none"] == 100 and values[0]["enabled"] == "always"
        assert values[0] == {**values[1], "khugepaged/pages_collapsed": 0, "khugepaged/full_scans": values[0]["khugepaged/full_scans"]}
        assert await ok(d, "sysfs", "get", "enabled") == "[always] madvise never\n"


async def test_remapd_pushes_its_knobs_to_collapsed_when_it_connects(workdir):
    async with running_daemons(
        workdir, "unix", collapsed_args=["--retry-policy", "none"], remapd_args=["--retry-policy", "mm-slot"]
    ) as d:
        await ok(d, "--deadline", "20", "sync")
        assert await ok(d, "sysfs", "get", "thpsplit/retry_policy") == "per-pmd [mm-slot] per-mapping lockless none\n"


async def test_sigterm_during_a_request_still_exits_zero(workdir):
    async with (
        running_daemons(workdir, "unix", remapd_args=ONE_PAGE_FLAGS) as d,
        open_client(d.collapsed.address, COLLAPSED) as c,
    ):
        waiting = await c.start(m.WaitScans, n=10**6)
        assert await d.collapsed.stop() == 0
        with pytest.raises(UserError) as info:
            await waiting.result()
        assert info.value.errno_name == "ECONNRESET"


def test_daemon_command_lines():
    run = [sys.executable, "-m"]
    help_ = subprocess.run(run + ["remapd", "--help"], capture_output=True, text=True, timeout=30, check=False)
    assert help_.returncode == 0
    assert "THPSPLIT_REMAPD" in help_.stdout and "THPSPLIT_KHUGEPAGED_SCAN_SLEEP_MILLISECS" in help_.stdout
    bad = subprocess.run(
        run + ["collapsed", "--khugepaged-max-ptes-none", "600", "--listen", "unix:/nonexistent/x.sock"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "outside 0..511" in bad.stderr
    bad = subprocess.run(run + ["remapd", "--collapsed", "udp:1"], capture_output=True, text=True, timeout=30, check=False)
    assert bad.returncode == 2 and "bad address" in bad.stderr and "Traceback" not in bad.stderr


async def test_a_second_daemon_on_a_live_socket_is_refused(workdir):
    async with running_daemons(workdir, "unix", remapd_args=ONE_PAGE_FLAGS) as d:
        second = DaemonProcess("collapsed", workdir / "second", d.collapsed.address)
        (workdir / "second").mkdir()
        await second.start()
        assert await second.proc.wait() == 1
        assert "already listens" in second.log_file.read_text()
        assert json.loads(await ok(d, "--json", "status", "collapsed"))["collapsed"]["state"] == "up"


async def test_a_client_that_goes_away_mid_request_leaves_nothing_behind(workdir):
    async with running_daemons(workdir, "unix", remapd_args=ONE_PAGE_FLAGS) as d:
        async with open_client(d.collapsed.address, COLLAPSED) as watcher:
            async with open_client(d.collapsed.address, COLLAPSED) as leaver:
                await leaver.start(m.WaitScans, n=10**6)
                assert (await watcher.call(m.Status))["clients"] == 2
            # Polled, bounded: the daemon notices the close and drops the waiting request.
            with trio.fail_after(5):
                while (await watcher.call(m.Status))["clients"] != 1:
                    await trio.sleep(0.01)
        assert await d.collapsed.stop() == 0


async def test_remapd_started_first_connects_once_collapsed_is_up(workdir):
    collapsed = DaemonProcess("collapsed", workdir, f"unix:{workdir / 'collapsed.sock'}")
    remapd = DaemonProcess("remapd", workdir, f"unix:{workdir / 'remapd.sock'}", ["--collapsed", collapsed.listen])
    await remapd.start()
    try:
        await remapd.wait_ready()
        async with open_client(remapd.address, REMAPD) as r:
            assert (await r.call(m.Status))["peer"] is False
            await collapsed.start()
            await collapsed.wait_ready()
            with trio.fail_after(20):
                await r.call(m.Sync)
            assert (await r.call(m.Status))["peer"] is True
    finally:
        with trio.CancelScope(shield=True):
            assert await remapd.stop() == 0
            if collapsed.proc is not None:
                assert await collapsed.stop() == 0


def test_huge_rmap_deltas_are_split_into_frames_the_peer_accepts():
    rows = tuple((pfn, -1, 0, 0) for pfn in range(1, 3 * MAX_ROWS_PER_FRAME + 2))
    parts = split_for_frames(m.RmapDelta.of(rows))
    assert [len(p.rows) for p in parts] == [MAX_ROWS_PER_FRAME] * 3 + [1]
    assert tuple(r for p in parts for r in p.rows) == rows
    assert all(len(encode_message(p)) <= MAX_FRAME_BYTES for p in parts)
    with pytest.raises(ValueError):
        encode_message(m.RmapDelta.of(tuple((1 << 40, -1, 0, 0) for _ in range(MAX_FRAME_BYTES // 8))))
    pfns = tuple(range(1, MAX_ROWS_PER_FRAME + 2))
    parts = split_for_frames(m.Reclaim(pfns, (512, 1024)))
    assert [p.pfns for p in parts] == [pfns[:MAX_ROWS_PER_FRAME], pfns[MAX_ROWS_PER_FRAME:]]
    assert [p.split for p in parts] == [(512, 1024), ()]  # the splits go once, with the first frame
    assert split_for_frames(m.MmExit(3)) == [m.MmExit(3)]
