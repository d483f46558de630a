"""--state-dir (issue 13): each daemon's model state saved atomically at shutdown and
periodically, restored at start, validated on load; a restart of both keeps the modelled world.
In-process: what a snapshot keeps and repairs (a collapse in flight rolls back; a remapper's
mappings are revalidated against the collapser's cache). Real daemons: smaps equal across a
restart of both, a refused snapshot, periodic snapshots surviving kill -9."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest import CheckedWorld
from helpers import ONE_PAGE_FLAGS, ok

from collapsed import snapshot as csnap
from collapsed.pagecache import PG_LOCKED
from remapd import snapshot as rsnap
from shared import persist
from shared.knobs import Knobs
from shared.persist import SnapshotError
from shared.protocol import messages as m
from shared.sim.dst import LinkWorld
from shared.sim.invariants import check
from shared.thpctl.launch import running_daemons

MB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


def through_the_file(module, actor) -> dict:
    """``actor``'s snapshot as the file format stores and reads it."""
    return persist.decode(persist.encode(module.DAEMON, module.snapshot(actor)), module.DAEMON)


def busy_world(**knobs) -> CheckedWorld:
    """Files (one dirty, one shmem), two processes, PMD mappings, a pin, a uprobe, a CoW page."""
    w = CheckedWorld(Knobs(**{"enabled": "always", "scan_sleep_millisecs": 10, "read_ahead_kb": 0,
                              "fault_around_bytes": 4096, "shmem_enabled": "advise", **knobs}))
    w.file_create("lib", 4 * MB)
    w.file_create("data", 2 * MB)
    w.file_create("shm", 2 * MB, shmem=True)
    w.file_write("data", 0, MB)
    for pid in (1, 2):
        w.spawn(pid)
        a = w.mmap(pid, None, 4 * MB, "lib", prot="rx", shared=False)
        w.touch(pid, a, 4 * MB)
        s = w.mmap(pid, None, 2 * MB, "shm", prot="rw")
        w.touch(pid, s, MB, write=True)
        d = w.mmap(pid, None, 2 * MB, "data", prot="rw", shared=False)
        w.touch(pid, d, 64 * 1024, write=True)
    w.wait_scans(3)
    w.pin(1, a + 4096)
    w.uprobe("add", "lib", 0x3000)
    return w


def view(w) -> tuple:
    return ([w.smaps(pid) for pid in sorted(w.remapper.mms)], w.file_ls(), w.remapper.knobs, sorted(w.remapper.marked))


# -- in-process -----------------------------------------------------------------------------


def test_restoring_both_keeps_the_world_and_its_pmd_mappings():
    w = busy_world()
    before = view(w)
    assert any(e["FilePmdMapped"] for e in w.smaps(2))
    cstate, rstate = through_the_file(csnap, w.collapser), through_the_file(rsnap, w.remapper)
    w.restart_collapser(reconnect=False, state=cstate)
    w.restart_remapper(reconnect=False, state=rstate)
    w.connect()
    assert view(w) == before
    assert w.collapser.mem.pins and w.remapper.uprobes.probes


def test_the_folios_a_split_left_keep_their_orders_across_a_restore():
    """A punch inside a shmem THP splits it non-uniformly (truncate_inode_partial_folio ->
    try_folio_split): the folios of orders 0-8 it leaves, their mappings and the pool must come
    back as they were, each folio whole in the cache with one reference per page."""
    w = CheckedWorld(Knobs(shmem_enabled="advise"))
    w.file_create("shm", 2 * MB, shmem=True)
    w.spawn(1)
    a = w.mmap(1, None, 2 * MB, "shm", prot="rw")
    assert w.madvise(1, a, 2 * MB, "hugepage") == 0
    assert w.fault(1, a, write=True) == "pmd"
    w.file_punch("shm", 0x81000, 0x1000)
    w.touch(1, a, 2 * MB)
    orders = sorted(set(w.collapser.mem.order[p] for p in range(len(w.collapser.mem.order))))
    assert any(0 < o < 9 for o in orders), orders
    before = (view(w), w.collapser.mem.order.tobytes(), w.vmstat()["nr_shmem_hugepages"])
    cstate, rstate = through_the_file(csnap, w.collapser), through_the_file(rsnap, w.remapper)
    w.restart_collapser(reconnect=False, state=cstate)
    w.restart_remapper(reconnect=False, state=rstate)
    w.connect()
    assert (view(w), w.collapser.mem.order.tobytes(), w.vmstat()["nr_shmem_hugepages"]) == before


def test_a_collapse_in_flight_at_the_snapshot_is_rolled_back():
    w = LinkWorld(Knobs(enabled="always", scan_sleep_millisecs=10, read_ahead_kb=0, fault_around_bytes=4096))
    w.file_create("lib", 2 * MB)
    w.spawn(1)
    a = w.mmap(1, None, 2 * MB, "lib", prot="rx", shared=False)
    w.touch(1, a, 2 * MB)
    pool = w.collapser.knobs.free_huge_pages
    w.manual = True
    w.advance(20)  # khugepaged's pass: collapse_file sends try_to_unmap and waits
    assert isinstance(w.collapser.outbox[-1], m.UnmapMapping)
    c = w.collapser
    assert c.knobs.free_huge_pages == pool - 1 and any(c.mem.flags[p] & PG_LOCKED for p in range(len(c.mem.flags)))
    state = through_the_file(csnap, c)
    w.manual = False
    w.remapper.knobs.enabled = "never"  # pushed to the new collapser: no new collapse at once
    w.restart_collapser(state=state)  # the collapser dies mid-collapse; its snapshot comes back
    check(w.collapser, w.remapper)
    c = w.collapser
    assert c.knobs.free_huge_pages == pool  # the new THP went back to the pool
    assert c.by_name["lib"].nrpages == 512 and c.by_name["lib"].nr_thps == 0  # the old pages stayed
    assert w.touch(1, a, 2 * MB) == {"minor": 512}  # the cache survived the restart
    w.sysfs_set("enabled", "always")
    w.wait_scans(2)  # and the collapse succeeds on the restored cache
    assert c.by_name["lib"].nr_thps == 1 and c.knobs.free_huge_pages == pool - 1


def test_a_written_page_cleaned_while_remapd_was_down_comes_back_write_protected():
    """DST seed 323: a restored PTE kept the write and dirty bits of the snapshot, but writeback
    had cleaned the page since (folio_mkclean would have write-protected the PTE): a writable PTE
    of a clean page, whose next write would not dirty it. It comes back read-only and clean."""
    w = CheckedWorld(Knobs(read_ahead_kb=0, fault_around_bytes=4096, writeback_millisecs=10))
    w.file_create("data", 64 * 1024)
    w.spawn(1)
    a = w.mmap(1, None, 64 * 1024, "data", prot="rw", shared=True)
    assert w.touch(1, a, 4096, write=True) == {"major": 1}
    rstate = through_the_file(rsnap, w.remapper)
    w.restart_remapper()  # remapd dies; its mapping goes
    w.file_sync("data")
    w.advance(20)  # written back: clean
    assert w.collapser.by_name["data"].nrpages == 1 and not w.vmstat()["nr_dirty"]
    w.restart_remapper(state=rstate)  # back from the snapshot: the page is still cached, mapped again
    assert w.smaps(1)[0]["Rss"] == 4
    assert w.touch(1, a, 4096) == {"hit": 1}
    assert w.touch(1, a, 4096, write=True) == {"minor": 1}  # a write-protect fault dirties it again
    assert w.vmstat()["nr_dirty"] == 1


def test_a_restored_remapper_keeps_only_the_mappings_the_cache_still_holds():
    w = CheckedWorld(Knobs(enabled="always", scan_sleep_millisecs=10, read_ahead_kb=0, fault_around_bytes=4096))
    w.file_create("lib", 4 * MB)
    w.spawn(1)
    a = w.mmap(1, None, 4 * MB, "lib", prot="r")
    w.touch(1, a, 4 * MB)
    w.wait_scans(2)
    w.pin(1, a + 3 * MB)
    (entry,) = w.smaps(1)
    assert (entry["Rss"], entry["FilePmdMapped"]) == (4096, 4096)
    rstate = through_the_file(rsnap, w.remapper)
    # Meanwhile the live collapser loses half the cache the snapshot's tables map.
    w.restart_remapper()  # an empty remapd connects: every mapping and pin goes
    w.file_truncate("lib", 2 * MB)
    w.restart_remapper(state=rstate)  # the old remapd comes back from its snapshot
    check(w.collapser, w.remapper)
    (entry,) = w.smaps(1)
    # The first THP is cached still: mapped again with its PMD; the truncated one, and the pin
    # on it, are gone (a fault there is now beyond EOF).
    assert (entry["Rss"], entry["FilePmdMapped"]) == (2048, 2048)
    assert not w.remapper.mms[1].pins and not w.collapser.mem.pins
    assert w.fault(1, a + 3 * MB) == "sigbus"
    assert w.touch(1, a, 2 * MB) == {"hit": 512}


def test_a_restored_process_whose_lock_is_held_refaults_rather_than_wait_holding_pages():
    """Found by the simulation (seed 157 of 2000): the revalidation waited for a process's mmap
    lock (an application thread held it) with the collapser's accounting of its pages in hand,
    which the checker sees as mappings nobody maps. Like a fault, it hands them back instead."""
    w = CheckedWorld(Knobs(read_ahead_kb=0, fault_around_bytes=4096))
    w.file_create("lib", 2 * MB)
    w.spawn(1)
    a = w.mmap(1, None, 2 * MB, "lib", prot="r")
    w.touch(1, a, 2 * MB)
    rstate = through_the_file(rsnap, w.remapper)
    w.restart_remapper(reconnect=False, state=rstate)
    held = w.start(w.remapper, w.remapper.hold_lock(1, 100.0, True))
    assert held.done
    w.connect()  # the revalidation's answer finds the lock taken: the pages go back
    assert w.smaps(1)[0]["Rss"] == 0
    w.advance(150)
    assert w.touch(1, a, 2 * MB) == {"minor": 512}


def test_a_snapshot_of_an_older_boot_meets_files_created_since():
    w = busy_world()
    cstate = through_the_file(csnap, w.collapser)
    w.file_create("late", 2 * MB)  # after the snapshot: a new inode of this boot
    w.spawn(3)
    late = w.mmap(3, None, 2 * MB, "late")
    w.restart_collapser(reconnect=False, state=cstate)
    w.file_create("other", MB)  # takes late's number on the restored collapser
    w.connect()
    files = {f["name"]: f for f in w.file_ls()}
    assert files["late"]["ino"] != files["other"]["ino"]
    assert w.fault(3, late) == "major"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[: len(data) // 2], "not a thpsplit snapshot"),
        (lambda data: b"garbage" * 10, "not a thpsplit snapshot"),
        (lambda data: data.replace(b"lib", b"lix", 1), "damaged"),
    ],
)
def test_a_damaged_snapshot_is_refused(damage, message):
    w = CheckedWorld()
    w.file_create("lib", MB)
    data = persist.encode("collapsed", csnap.snapshot(w.collapser))
    with pytest.raises(SnapshotError, match=message):
        persist.decode(damage(data), "collapsed")


def test_a_foreign_or_newer_snapshot_is_refused():
    w = CheckedWorld()
    with pytest.raises(SnapshotError, match="a snapshot of 'remapd', not of collapsed"):
        persist.decode(persist.encode("remapd", rsnap.snapshot(w.remapper)), "collapsed")
    import msgpack  # type: ignore[import-untyped]

    newer = msgpack.packb({"format": persist.FORMAT, "version": persist.VERSION + 1, "daemon": "collapsed"})
    with pytest.raises(SnapshotError, match="version 2, this daemon reads version 1"):
        persist.decode(newer, "collapsed")


def test_a_snapshot_that_contradicts_itself_is_refused_before_use():
    w = busy_world()
    state = through_the_file(csnap, w.collapser)
    state["files"][1]["name"] = state["files"][0]["name"]  # two files, one name
    with pytest.raises(SnapshotError, match="repeated file"):
        csnap.restore(state)
    rstate = through_the_file(rsnap, w.remapper)
    rstate["mms"][0]["vmas"][0][3] = 99  # a mapping of a file nobody knows
    with pytest.raises(SnapshotError, match="bad VMA"):
        rsnap.restore(rstate)


def test_an_interrupted_write_leaves_the_previous_snapshot(tmp_path, monkeypatch):
    w = CheckedWorld()
    w.file_create("lib", MB)
    first = csnap.snapshot(w.collapser)
    persist.save(tmp_path, "collapsed", first)

    def crash(*args):
        raise OSError(28, "No space left on device")

    # The daemon dies (or the disk fills) at each step of the write in turn.
    for step in ("fsync", "replace"):
        with monkeypatch.context() as patched:
            patched.setattr(os, step, crash)
            with pytest.raises(OSError):
                persist.save(tmp_path, "collapsed", {"other": 1})
        assert persist.load(tmp_path, "collapsed") == persist.decode(persist.encode("collapsed", first), "collapsed")
    # A temporary file left by a daemon killed mid-write is ignored, then cleaned up.
    (tmp_path / ".collapsed.snapshot.tmp-99999").write_bytes(b"half a snap")
    assert persist.load(tmp_path, "collapsed") is not None
    persist.save(tmp_path, "collapsed", first)
    assert [p.name for p in tmp_path.iterdir()] == ["collapsed.snapshot"]


# -- real daemons ---------------------------------------------------------------------------


async def _build(d) -> tuple[str, str]:
    await ok(d, "sysfs", "set", "thpsplit/retry_policy", "lockless")
    await ok(d, "file", "create", "lib", "--size", "4M")
    await ok(d, "file", "create", "shm", "--size", "2M", "--shmem")
    await ok(d, "file", "write", "shm", "0", "1M")
    for pid in ("1", "2"):
        await ok(d, "proc", "spawn", pid)
        a = (await ok(d, "mmap", pid, "auto", "4M", "--file", "lib", "--prot", "rx", "--private")).strip()
        await ok(d, "madvise", pid, a, "4M", "hugepage")
        await ok(d, "touch", pid, a, "4M")
    b = (await ok(d, "mmap", "1", "auto", "2M", "--file", "shm", "--prot", "rw")).strip()
    await ok(d, "touch", "1", b, "2M", "--write")
    await ok(d, "wait-scans", "2", "--timeout", "20")
    await ok(d, "pin", "2", a)
    return a, b


async def _world(d) -> tuple[str, ...]:
    return (
        await ok(d, "smaps", "1"),
        await ok(d, "smaps", "2"),
        await ok(d, "file", "ls"),
        await ok(d, "sysfs", "get", "thpsplit/retry_policy"),
    )


async def test_both_daemons_restarted_with_a_state_dir_keep_the_world(workdir):
    state = workdir / "state"
    c_args = ["--state-dir", str(state)]
    r_args = [*ONE_PAGE_FLAGS, "--state-dir", str(state), "--khugepaged-scan-sleep-millisecs", "10", "--snapshot-interval", "0"]
    async with running_daemons(workdir, collapsed_args=c_args, remapd_args=r_args) as d:
        a, _ = await _build(d)
        before = await _world(d)
        assert "FilePmdMapped:      4096 kB" in before[0]
    # running_daemons stopped remapd first (its tables still whole), then collapsed.
    assert sorted(p.name for p in state.iterdir()) == ["collapsed.snapshot", "remapd.snapshot"]
    async with running_daemons(workdir, collapsed_args=c_args, remapd_args=r_args) as d:
        await ok(d, "--deadline", "20", "sync")
        assert await _world(d) == before
        assert await ok(d, "touch", "1", a, "4M") == "hit 1024\n"  # still PMD-mapped
        assert await ok(d, "unpin", "2", a)
    logs = (workdir / "collapsed.log").read_text() + (workdir / "remapd.log").read_text()
    assert logs.count('"snapshot_restored"') == 2


async def test_without_a_state_dir_a_restart_starts_empty(workdir):
    async with running_daemons(workdir, remapd_args=ONE_PAGE_FLAGS) as d:
        await ok(d, "file", "create", "lib", "--size", "4M")
    async with running_daemons(workdir, remapd_args=ONE_PAGE_FLAGS) as d:
        assert (await ok(d, "file", "ls")).splitlines()[1:] == []


def test_a_daemon_refuses_to_start_from_an_unusable_snapshot(workdir):
    state = workdir / "state"
    state.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    (state / "collapsed.snapshot").write_bytes(b"\x81\xa6format\xa3foo")
    (state / "remapd.snapshot").write_bytes(persist.encode("collapsed", {}))
    for daemon, why in (("collapsed", "not a thpsplit snapshot"), ("remapd", "a snapshot of 'collapsed', not of remapd")):
        proc = subprocess.run(
            [sys.executable, "-m", daemon, "--listen", f"unix:{workdir}/{daemon}.sock", "--state-dir", str(state)],
            env=env, capture_output=True, text=True, timeout=30, check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert why in proc.stderr and "refusing to start" in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("target, mode", [("dir", 0o777), ("dir", 0o770), ("file", 0o666)])
def test_a_state_dir_or_snapshot_others_may_write_is_refused(tmp_path, target, mode):
    """Whoever may write them decides the world the daemon starts with: refused, as an unsafe
    socket directory is, before anything is read."""
    state = tmp_path / "state"
    persist.save(state, "collapsed", csnap.snapshot(CheckedWorld().collapser))
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "collapsed.snapshot").stat().st_mode) == 0o600
    assert persist.load(state, "collapsed") is not None
    (state if target == "dir" else state / "collapsed.snapshot").chmod(mode)
    with pytest.raises(SnapshotError, match="writable by group or others"):
        persist.load(state, "collapsed")


def test_a_snapshot_of_another_user_is_refused(tmp_path):
    state = tmp_path / "state"
    persist.save(state, "collapsed", csnap.snapshot(CheckedWorld().collapser))
    os.chown(state / "collapsed.snapshot", 65534, 65534)
    with pytest.raises(SnapshotError, match="belongs to uid 65534"):
        persist.load(state, "collapsed")


async def test_periodic_snapshots_survive_kill_9(workdir):
    """A daemon killed with SIGKILL (no shutdown snapshot) comes back from its last periodic one,
    whenever the kill strikes, even in the middle of writing one: what was saved is there, what
    came after the last snapshot may be lost, nothing is half there."""
    state = workdir / "state"
    c_args = ["--state-dir", str(state), "--snapshot-interval", "0.02"]
    async with running_daemons(workdir, collapsed_args=c_args, remapd_args=ONE_PAGE_FLAGS) as d:
        await ok(d, "file", "create", "lib", "--size", "4M")
        await ok(d, "file", "write", "lib", "0", "2M")
        pages = 512
        for delay in (0.0, 0.013, 0.05):
            await ok(d, "file", "write", "lib", str(pages * 4096), "4K")
            with trio.fail_after(20):
                while _saved_pages(state) < pages + 1:  # a snapshot has saved this write
                    await trio.sleep(0.02)
            await ok(d, "file", "write", "lib", str((pages + 1) * 4096), "4K")  # may not be
            await trio.sleep(delay)
            assert d.collapsed.proc is not None
            d.collapsed.proc.send_signal(signal.SIGKILL)
            await d.collapsed.proc.wait()
            assert persist.load(state, "collapsed") is not None  # never a half-written file
            await d.collapsed.start()
            await d.collapsed.wait_ready()
            ls = (await ok(d, "file", "ls")).splitlines()[1].split()
            assert ls[:4] == ["lib", "1", str(4 * MB), "file"]
            assert int(ls[4]) in (pages + 1, pages + 2), (delay, ls)
            pages = int(ls[4])
            await ok(d, "--deadline", "20", "sync")


def _saved_pages(state: Path) -> int:
    """Pages of the first file in collapsed's snapshot (0 without one)."""
    from array import array

    saved = persist.load(state, "collapsed")
    if saved is None or not saved["files"]:
        return 0
    total = 0
    for _, data in saved["files"][0]["chunks"]:
        slots = array("q")
        slots.frombytes(data)
        total += sum(1 for v in slots if v > 0)
    return total


def test_the_daemons_document_the_state_flags():
    for daemon in ("collapsed", "remapd"):
        out = subprocess.run([sys.executable, "-m", daemon, "--help"], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
        assert "--state-dir DIR" in out and "--snapshot-interval SECONDS" in out and "THPSPLIT_STATE_DIR" in out
