"""Semantically absurd requests (issue 13, "Hostile input"): what a client may ask is bounded the
way the kernel bounds it, with the kernel's errors, so no request or run of requests exhausts the
daemons' memory: processes stop at threads-max (fork's EAGAIN), VMAs per process at
vm.max_map_count (ENOMEM), anonymous copies at the modelled memory (a fault's VM_FAULT_OOM),
addresses at the 47-bit user address space (ENOMEM for mmap, EINVAL for munmap), file sizes at
MAX_LFS_FILESIZE (tests/test_limits.py), page-cache pages at the modelled memory
(tests/test_bounded_work.py). A mapping itself costs the same whatever its length.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from helpers import FIXED, H, P

from remapd import address_space
from shared.errors import UserError
from shared.units import MAX_LFS_FILESIZE, TASK_SIZE

TIB = 1 << 40


def errno_of(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        call(*args, **kwargs)
    return err.value.errno_name


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_tib_mapped_by_each_of_100k_processes_stops_at_threads_max(make_world):
    world = make_world(mem_total_mb=256)
    world._checking = False  # the checker once at the end, not after each of 100,000 steps
    limit = world.remapper.knobs.max_threads()
    assert limit == (256 << 20) // (8 * 16 << 10) == 2048  # set_max_threads: RAM / 8 / THREAD_SIZE
    world.file_create("huge", TIB)
    before = rss_kb()
    outcomes: Counter[str] = Counter()
    for pid in range(1, 100_001):
        try:
            world.remapper.spawn_process(pid)
        except UserError as err:
            outcomes[err.errno_name] += 1
            continue
        outcomes["spawned"] += 1
        world.mmap(pid, None, TIB, "huge", shared=True)
    assert outcomes == {"spawned": limit, "EAGAIN": 100_000 - limit}
    assert errno_of(world.fork, 1, 200_000) == "EAGAIN"
    # Every process maps its TiB; touching a page of each costs a page, not a TiB.
    smaps = world.smaps(limit)
    assert [vma["Size"] for vma in smaps] == [TIB >> 10]
    assert [world.touch(pid, smaps[0]["start"], P) for pid in (1, limit)] == [{"major": 1}, {"minor": 1}]
    grown_mb = (rss_kb() - before) >> 10
    assert grown_mb < 64, f"{limit} processes of a TiB each took {grown_mb} MB"
    # One gone, one more may come.
    world.exit(limit)
    world.spawn(100_001)
    world._checking = True
    world.check()


@pytest.mark.parametrize(
    "call, errno",
    [
        pytest.param(lambda w: w.mmap(1, None, TASK_SIZE, "f"), "ENOMEM", id="mmap-the-whole-address-space"),
        pytest.param(lambda w: w.mmap(1, TASK_SIZE, P, "f"), "ENOMEM", id="mmap-at-2^47"),
        pytest.param(lambda w: w.mmap(1, TASK_SIZE - P, 2 * P, "f"), "ENOMEM", id="mmap-across-2^47"),
        pytest.param(lambda w: w.mmap(1, (1 << 64) - P, P, "f"), "ENOMEM", id="mmap-at-2^64-4096"),
        pytest.param(lambda w: w.mmap(1, FIXED, TIB, "f", offset=MAX_LFS_FILESIZE + 1 - P), "EOVERFLOW", id="mmap-past-the-largest-offset"),
        pytest.param(lambda w: w.munmap(1, TASK_SIZE, P), "EINVAL", id="munmap-at-2^47"),
        pytest.param(lambda w: w.file_create("g", MAX_LFS_FILESIZE + 1), "EINVAL", id="file-of-2^63-bytes"),
        pytest.param(lambda w: w.file_write("f", MAX_LFS_FILESIZE - P, 2 * P), "EINVAL", id="write-past-2^63"),
        pytest.param(lambda w: w.file_truncate("f", MAX_LFS_FILESIZE + 1), "EINVAL", id="truncate-to-2^63"),
    ],
)
def test_absurd_sizes_and_addresses_get_the_kernels_error_and_change_nothing(world, call, errno):
    world.file_create("f", TIB)
    world.spawn(1)
    world.mmap(1, FIXED, TIB, "f")
    before = (world.smaps(1), world.file_ls())
    assert errno_of(call, world) == errno
    assert (world.smaps(1), world.file_ls()) == before


def test_a_file_of_max_lfs_filesize_mapped_whole_costs_what_is_touched(world):
    world.file_create("f", MAX_LFS_FILESIZE)
    world.spawn(1)
    # file_mmap_ok: the mapping's last page ends a page short of 2^63 at most.
    got = world.mmap(1, None, TIB, "f", offset=MAX_LFS_FILESIZE + 1 - TIB - P)
    assert world.touch(1, got + TIB - P, P) == {"major": 1}
    assert world.collapser.by_name["f"].nrpages == 1


def test_anonymous_copies_stop_at_the_modelled_memory(make_world):
    """Writes to private mappings make CoW copies in remapd; past mem_total_mb's pages a fault
    answers nomem (VM_FAULT_OOM), as a page-cache allocation does, and nothing else changes.
    Unmapping frees copies, and faults succeed again."""
    world = make_world(mem_total_mb=4)  # 1,024 pages
    world._checking = False
    world.file_create("f", 64 * P)
    world.spawn(1)
    for i in range(32):  # 32 private writable mappings of the same 64 pages: 2,048 copies asked
        world.mmap(1, FIXED + i * H, 64 * P, "f", prot="rw", shared=False)
    outcomes: Counter[str] = Counter()
    for i in range(32):
        outcomes.update(world.touch(1, FIXED + i * H, 64 * P, write=True))
    assert outcomes["nomem"] == 2048 - 1024 and len(world.remapper.anon.mapcount) == 1024
    world._checking = True
    world.check()
    assert world.touch(1, FIXED, P, write=True) == {"hit": 1}  # a copy made before
    assert world.touch(1, FIXED + 31 * H, P, write=True) == {"nomem": 1}
    world.munmap(1, FIXED, H)
    assert world.touch(1, FIXED + 31 * H, P, write=True) == {"minor": 1}


def test_vmas_per_process_stop_at_max_map_count(world, monkeypatch):
    """vm.max_map_count (65,530; 16 here): a split or mmap that would pass it is ENOMEM before
    anything changes, so alternating mprotects over a huge mapping cannot grow a process's VMAs
    without bound."""
    monkeypatch.setattr(address_space, "MAX_MAP_COUNT", 16)
    world.file_create("f", TIB)
    world.spawn(1)
    world.mmap(1, FIXED, TIB, "f", prot="rw")
    results: Counter[int | str] = Counter()
    for i in range(1, 40, 2):
        before = world.smaps(1)
        result = world.mprotect(1, FIXED + i * P, P, "r")
        results[result] += 1
        if result:
            assert world.smaps(1) == before  # refused before the split
    mm = world.remapper.mms[1]
    # Each mprotect inside a VMA splits it in three: 1, 3, ..., 15, and the next would pass 16.
    assert len(mm.vmas) == 15 and results == {0: 7, "ENOMEM": 13}
    assert errno_of(world.munmap, 1, FIXED + 60 * P, P) == "ENOMEM"  # would split one in three
    assert world.mremap(1, FIXED, P, P, to=FIXED + 2 * TIB)["result"] == "ENOMEM"  # move_vma's check
    assert world.madvise(1, FIXED + 62 * P, P, "hugepage") == "ENOMEM"
    assert world.mlock(1, FIXED + 62 * P, P) == "ENOMEM"
    while len(mm.vmas) <= 16:
        world.mmap(1, None, P, "f")
    assert errno_of(world.mmap, 1, None, P, "f") == "ENOMEM"  # do_mmap: map_count > max
    world.munmap(1, FIXED, TIB)
    assert world.mprotect(1, FIXED + TIB, P, "r") == "ENOMEM"  # a hole, as before
