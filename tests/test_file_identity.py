"""Issue 14, item 4: files keep their identity (inode number and generation) across a collapsed
restart, so a new collapsed's inode 1 is never taken for the old one's.

Before the fix, files were matched by inode number only: a restarted collapsed that created a
file before remapd reconnected gave it inode 1, remapd kept treating inode 1 as its old ``lib``,
process 1's ``lib`` mapping faulted in the new file's pages, and ``lib`` was gone from ``file ls``.
The invariant checker passed, because it compared inode numbers too.
"""

from __future__ import annotations

import os
import signal

import pytest
from conftest import CheckedWorld
from helpers import ONE_PAGE_FLAGS, ok

from remapd.mm import pte_pfn
from shared.knobs import Knobs
from shared.sim.invariants import check
from shared.thpctl.launch import running_daemons

MB = 1 << 20
ADDR = 0x7E0000000000


def files_by_name(world) -> dict[str, tuple[int, int, int]]:
    """name -> (ino, generation, pages cached), as collapsed sees its files."""
    return {f.name: (f.ino, f.gen, f.nrpages) for f in world.collapser.files.values()}


def mapped_files(world, pid: int) -> set[str]:
    """The names of the collapser's files whose pages ``pid`` maps."""
    mem = world.collapser.mem
    names = set()
    for entry in world.remapper.mms[pid].pmds.values():
        pfns = [pte_pfn(entry)] if isinstance(entry, int) else [pte_pfn(pte) for _, pte in entry.present()]
        for pfn in pfns:
            names.add(world.collapser.files[mem.ino[mem.head(pfn)]].name)
    return names


def test_a_file_created_before_resync_is_not_taken_for_the_old_one(world):
    world.file_create("lib", 4 * MB)
    world.spawn(1)
    world.mmap(1, ADDR, 4 * MB, "lib", prot="r")
    world.touch(1, ADDR, 4 * MB, stride=64 * 4096)

    # collapsed dies; a new one serves a client before remapd reconnects.
    world.restart_collapser(reconnect=False)
    world.file_create("other", 4 * MB)
    assert files_by_name(world)["other"][0] == 1  # the new boot's first inode number
    world.connect()

    files = files_by_name(world)
    assert set(files) == {"lib", "other"}
    # lib keeps its identity; other, which no remapper had heard of, moved to a fresh number.
    assert files["lib"][:2] == (1, 1) and files["other"][1] == 2 and files["other"][0] != 1
    assert [e["name"] for e in world.smaps(1)] == ["lib"]
    assert world.touch(1, ADDR, 4 * MB, stride=64 * 4096) == {"major": 16}
    assert mapped_files(world, 1) == {"lib"}
    files = files_by_name(world)
    assert files["lib"][2] == 16 and files["other"][2] == 0
    # A new mapping of "other" by name maps other.
    world.mmap(1, ADDR + 8 * MB, 2 * MB, "other", prot="r")
    world.fault(1, ADDR + 8 * MB)
    assert mapped_files(world, 1) == {"lib", "other"}


def test_a_name_taken_meanwhile_leaves_the_mapped_file_as_deleted(world):
    world.file_create("lib", 2 * MB)
    world.spawn(1)
    world.mmap(1, ADDR, 2 * MB, "lib", prot="r")
    world.restart_collapser(reconnect=False)
    world.file_create("lib", 1 * MB)  # a new file under the old name: another inode
    world.connect()
    files = files_by_name(world)
    assert set(files) == {"lib", "lib (deleted)"}
    assert files["lib (deleted)"][:2] == (1, 1) and files["lib"][1] == 2
    assert [e["name"] for e in world.smaps(1)] == ["lib (deleted)"]
    assert world.fault(1, ADDR + 1536 * 1024) == "major"  # beyond the new lib's 1 MiB: the old one
    # mmap by name maps the new file.
    world.mmap(1, ADDR + 4 * MB, 1 * MB, "lib", prot="r")
    assert [e["name"] for e in world.smaps(1)] == ["lib (deleted)", "lib"]


def test_a_link_cut_without_a_restart_keeps_every_identity(world):
    world.file_create("a", 2 * MB)
    world.spawn(1)
    world.mmap(1, ADDR, 2 * MB, "a", prot="r")
    world.disconnect()
    world.file_create("b", 2 * MB)  # on the same collapsed while the link is down
    world.connect()
    assert files_by_name(world) == {"a": (1, 1, 0), "b": (2, 1, 0)}
    assert world.fault(1, ADDR) == "major"


def test_the_checker_compares_identities_not_inode_numbers(world):
    world.file_create("lib", 2 * MB)
    # The remapper's mirror of inode 1 claims another generation: same number, another file.
    world.remapper.files[1].gen = 7
    with pytest.raises(AssertionError, match="generation"):
        check(world.collapser, world.remapper)


def test_restarts_in_a_row_keep_identities(make_world):
    world: CheckedWorld = make_world()
    world.file_create("lib", 2 * MB)
    world.spawn(1)
    world.mmap(1, ADDR, 2 * MB, "lib", prot="r")
    for round_ in range(3):
        world.restart_collapser(reconnect=False)
        world.file_create(f"x{round_}", 2 * MB)
        world.connect()
        assert world.fault(1, ADDR) == "major"
        assert mapped_files(world, 1) == {"lib"}
    assert sorted(files_by_name(world)) == ["lib", "x0", "x1", "x2"]
    assert world.collapser.files[1].name == "lib"


def test_a_restarted_collapser_is_a_new_boot():
    world = CheckedWorld(Knobs(read_ahead_kb=0, fault_around_bytes=4096))
    world.restart_collapser()
    assert world.collapser.boot == 2 and world.connected


async def test_a_restarted_collapsed_does_not_map_a_new_file_into_old_mappings(workdir):
    """The issue's reproduction with real daemons: kill -9 collapsed, restart it and create a
    file before remapd's backoff reconnects (remapd is stopped meanwhile, so it cannot)."""
    async with running_daemons(workdir, remapd_args=ONE_PAGE_FLAGS) as d:
        await ok(d, "file", "create", "lib", "--size", "4M")
        await ok(d, "proc", "spawn", "1")
        await ok(d, "mmap", "1", hex(ADDR), "4M", "--file", "lib", "--prot", "r")
        assert await ok(d, "touch", "1", hex(ADDR), "4M", "--stride", "256K") == "major 16\n"
        assert d.remapd.proc is not None and d.collapsed.proc is not None
        os.kill(d.remapd.proc.pid, signal.SIGSTOP)
        try:
            d.collapsed.proc.kill()
            assert await d.collapsed.proc.wait() == -signal.SIGKILL
            await d.collapsed.start()
            await d.collapsed.wait_ready()
            out = await ok(d, "--json", "file", "create", "other", "--size", "4M")
            assert '"ino": 1' in out
        finally:
            os.kill(d.remapd.proc.pid, signal.SIGCONT)
        await ok(d, "--deadline", "20", "sync")
        ls = {line.split()[0]: line.split() for line in (await ok(d, "file", "ls")).splitlines()[1:]}
        assert set(ls) == {"lib", "other"}
        assert ls["lib"][1] == "1" and ls["other"][1] != "1"
        smaps = await ok(d, "smaps", "1")
        assert smaps.splitlines()[0].split()[-1] == "/thpsplit/lib"
        assert await ok(d, "touch", "1", hex(ADDR), "4M", "--stride", "256K") == "major 16\n"
        ls = {line.split()[0]: line.split() for line in (await ok(d, "file", "ls")).splitlines()[1:]}
        # The faults filled lib's page cache, not other's (the NRPAGES column).
        assert ls["lib"][4] == "16" and ls["other"][4] == "0"
