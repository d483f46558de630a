"""madvise with every advice (issue 9): the vm_flags ones (MADV_NORMAL/RANDOM/SEQUENTIAL,
DONTFORK/DOFORK, WIPEONFORK/KEEPONFORK, DONTDUMP/DODUMP) through madvise_vma_behavior and
madvise_update_vma, their effects (dup_mmap, do_sync_mmap_readahead), MADV_WILLNEED
(madvise_willneed) and MADV_COLD (madvise_cold_or_pageout_pte_range). The figures were observed
on 6.18 with a memfd/tmpfs or ext4 file, mmap, madvise and /proc/self/smaps."""

from __future__ import annotations

import pytest
from helpers import FIXED, H, P, smaps1

from shared.sim.kernel import ADVICE, parse_step
from shared.vm import MADV, VM_FLAGS_ADVICE, Advice

M = 1 << 20
LF = "large-folio"


def vmas(world, pid: int) -> list[tuple[int, int, str]]:
    """(start, end, the madvise letters of VmFlags) of every VMA."""
    keep = ("sr", "rr", "dc", "dd", "wf", "hg", "nh")
    return [
        (e["start"] - FIXED, e["end"] - FIXED, " ".join(f for f in e["VmFlags"].split() if f in keep))
        for e in world.smaps(pid)
    ]


def mapped(world, size=4 * M, shmem=True, fs=None, prot="rw", shared=True):
    world.file_create("f", size, shmem=shmem, **({"fs": fs} if fs else {}))
    world.spawn(1)
    world.mmap(1, FIXED, size, "f", prot=prot, shared=shared)
    return world


def cached(world, name="f"):
    return sorted(i for i, v in world.collapser.by_name[name].entries() if v > 0)


def test_one_table_names_every_advice_with_its_madv_value():
    # The scenario language, thpctl and the model share shared.vm.Advice (include/uapi/asm-generic/mman-common.h).
    assert ADVICE is MADV
    assert MADV["random"] == 1 and MADV["wipeonfork"] == 18 and MADV["collapse"] == 25
    assert {a.value for a in Advice if a.vm_flags} == VM_FLAGS_ADVICE
    assert "cold" not in VM_FLAGS_ADVICE and "dontfork" in VM_FLAGS_ADVICE
    assert parse_step("madvise 1 0x40000000 4K keeponfork").args["advice"] == "keeponfork"


def test_read_hints_split_the_vma_and_merge_back_with_their_letters(world):
    # madvise_update_vma -> vma_modify_flags: [1M, 3M) splits off with rr; sr over part of it
    # splits again; MADV_NORMAL clears both and the three pieces merge into one.
    mapped(world)
    assert world.madvise(1, FIXED + M, 2 * M, "random") == 0
    assert vmas(world, 1) == [(0, M, ""), (M, 3 * M, "rr"), (3 * M, 4 * M, "")]
    assert world.madvise(1, FIXED + M, M, "sequential") == 0
    assert vmas(world, 1) == [(0, M, ""), (M, 2 * M, "sr"), (2 * M, 3 * M, "rr"), (3 * M, 4 * M, "")]
    assert world.madvise(1, FIXED, 4 * M, "normal") == 0
    assert vmas(world, 1) == [(0, 4 * M, "")]


def test_a_flags_split_inside_a_pmd_splits_the_pmd(world):
    # __split_vma -> vma_adjust_trans_huge: a PMD mapping across the new boundary goes (6.18: Rss
    # of the whole 4M shmem mapping fell from 4096 kB to 0 after MADV_RANDOM on [1M, 3M)).
    mapped(world)
    world.sysfs_set("shmem_enabled", "advise")
    world.madvise(1, FIXED, 4 * M, "hugepage")
    world.touch(1, FIXED, 4 * M, write=True)
    assert smaps1(world, 1)["ShmemPmdMapped"] == 4096
    world.madvise(1, FIXED + M, 2 * M, "random")
    assert sum(e["Rss"] for e in world.smaps(1)) == 0
    assert [v[2] for v in vmas(world, 1)] == ["hg", "rr hg", "hg"]


def test_holes_are_enomem_after_the_mapped_parts_changed(world):
    # madvise_walk_vmas: a hole before, inside or after is skipped and reported at the end.
    mapped(world)
    assert world.madvise(1, FIXED + 2 * M, 4 * M, "random") == "ENOMEM"
    assert vmas(world, 1) == [(0, 2 * M, ""), (2 * M, 4 * M, "rr")]
    assert world.madvise(1, FIXED - 2 * M, 4 * M, "random") == "ENOMEM"
    assert vmas(world, 1) == [(0, 4 * M, "rr")]
    assert world.madvise(1, FIXED - 2 * M, M, "dontdump") == "ENOMEM"
    assert vmas(world, 1) == [(0, 4 * M, "rr")]
    with pytest.raises(Exception, match="page-aligned"):
        world.madvise(1, FIXED + 1, M, "random")


def test_wipeonfork_is_einval_on_a_file_mapping_keeponfork_a_no_op(world):
    # madvise_vma_behavior: MADV_WIPEONFORK only for private anonymous memory; an EINVAL VMA ends
    # the walk before the hole is reported, a range of holes alone is ENOMEM.
    mapped(world, shared=True)
    world.mmap(1, FIXED + 8 * M, 4 * M, "f", shared=False)
    assert world.madvise(1, FIXED, M, "wipeonfork") == "EINVAL"
    assert world.madvise(1, FIXED + 8 * M, M, "wipeonfork") == "EINVAL"
    assert world.madvise(1, FIXED - 2 * M, 3 * M, "wipeonfork") == "EINVAL"
    assert world.madvise(1, FIXED - 2 * M, M, "wipeonfork") == "ENOMEM"
    assert world.madvise(1, FIXED, M, "keeponfork") == 0
    assert vmas(world, 1) == [(0, 4 * M, ""), (8 * M, 12 * M, "")]


def test_dontdump_and_dodump(world):
    mapped(world)
    assert world.madvise(1, FIXED, M, "dontdump") == 0
    assert vmas(world, 1) == [(0, M, "dd"), (M, 4 * M, "")]
    assert world.madvise(1, FIXED, M, "dodump") == 0
    assert vmas(world, 1) == [(0, 4 * M, "")]


def test_fork_leaves_a_dontfork_vma_out_of_the_child(world):
    # dup_mmap skips a VM_DONTCOPY VMA; MADV_DOFORK gives it back to the next child.
    mapped(world)
    world.touch(1, FIXED, 4 * M)
    assert world.madvise(1, FIXED + 3 * M, M, "dontfork") == 0
    assert vmas(world, 1) == [(0, 3 * M, ""), (3 * M, 4 * M, "dc")]
    world.fork(1, 2)
    assert vmas(world, 2) == [(0, 3 * M, "")]
    assert world.madvise(1, FIXED, 4 * M, "dofork") == 0
    world.fork(1, 3)
    assert vmas(world, 3) == [(0, 4 * M, "")]


def test_random_turns_read_around_off_on_a_ro_thp_file(make_world):
    # do_sync_mmap_readahead: VM_RAND_READ returns before any readahead.
    world = mapped(make_world(read_ahead_kb=128), shmem=False, prot="r", shared=False)
    world.madvise(1, FIXED, 4 * M, "random")
    assert world.fault(1, FIXED + 100 * P) == "major"
    assert cached(world) == [100]
    world.madvise(1, FIXED, 4 * M, "normal")
    world.fault(1, FIXED + 300 * P)
    assert cached(world) == [100, *range(284, 316)]


def test_sequential_reads_forward_from_the_fault(make_world):
    # page_cache_sync_ra(ra_pages) from a fault not at index 0: do_page_cache_ra forward.
    world = mapped(make_world(read_ahead_kb=128), shmem=False, prot="r", shared=False)
    world.madvise(1, FIXED, 4 * M, "sequential")
    world.fault(1, FIXED + 256 * P)
    assert cached(world) == list(range(256, 288))


@pytest.mark.parametrize("hint, expect", [("random", (1, 2, 3)), ("sequential", (32, 32, 64)), ("normal", (32, 32, 64))])
def test_large_folio_read_hints_as_on_ext4(make_world, hint, expect):
    # 6.18, ext4 with read_ahead_kb 128: page-cache pages after faults at 1M, 1M + 4K, 1M + 256K.
    world = make_world(read_ahead_kb=128, fault_around_bytes=65536)
    mapped(world, size=8 * M, shmem=False, fs=LF, prot="r", shared=False)
    world.madvise(1, FIXED, 8 * M, hint)
    seen = []
    for off in (M, M + P, M + 64 * P):
        world.fault(1, FIXED + off)
        seen.append(len(cached(world)))
    assert tuple(seen) == expect


def test_random_reads_one_pmd_range_in_a_hugepage_vma(make_world):
    # do_sync_mmap_readahead's VM_HUGEPAGE branch doubles ra->size only without VM_RAND_READ.
    world = mapped(make_world(), size=8 * M, shmem=False, fs=LF, prot="r", shared=False)
    world.madvise(1, FIXED, 8 * M, "hugepage")
    world.madvise(1, FIXED, 8 * M, "random")
    world.fault(1, FIXED + 4 * M)
    assert cached(world) == list(range(1024, 1536))


def test_willneed_reads_a_regular_file_up_to_io_pages(make_world):
    # vfs_fadvise(POSIX_FADV_WILLNEED) -> force_page_cache_ra: read_ahead_kb (32 pages) at most,
    # or the device's io_pages (320 with max_sectors_kb 1280) when asked for more; 6.18 read 16,
    # 320 and 320 (ENOMEM: the range passes the mapping's end) pages of an ext4 file.
    for length, expect, result in ((64 * 1024, 16, 0), (4 * M, 320, 0), (8 * M, 320, "ENOMEM")):
        world = mapped(make_world(read_ahead_kb=128), size=8 * M, shmem=False, fs=LF, prot="r", shared=False)
        assert world.madvise(1, FIXED + M, length, "willneed") == result
        assert cached(world) == list(range(256, 256 + expect))
        assert smaps1(world, 1)["Rss"] == 0


def test_willneed_allocates_nothing_for_shmem(world):
    # madvise_willneed -> shmem_swapin_range: holes stay holes (6.18, memfd: Rss and page count
    # unchanged).
    mapped(world)
    assert world.madvise(1, FIXED, 4 * M, "willneed") == 0
    assert cached(world) == [] and smaps1(world, 1)["Rss"] == 0


def test_cold_splits_a_large_folio_it_covers_in_part_and_leaves_a_whole_one(world):
    # madvise_cold_or_pageout_pte_range: the split of a partly covered large folio is common to
    # MADV_COLD and MADV_PAGEOUT; split_folio unmaps it and a file folio is not mapped again.
    # 6.18 (tmpfs huge=advise): Rss 4096 -> 2048 kB, the page cache kept all 1024 pages.
    mapped(world)
    world.sysfs_set("shmem_enabled", "advise")
    world.madvise(1, FIXED, 4 * M, "hugepage")
    world.touch(1, FIXED, 4 * M, write=True)
    assert world.madvise(1, FIXED + M, 64 * 1024, "cold") == 0
    s = smaps1(world, 1)
    assert (s["Rss"], s["ShmemPmdMapped"]) == (2048, 2048)
    assert world.madvise(1, FIXED + 2 * M, 2 * M, "cold") == 0
    assert smaps1(world, 1)["ShmemPmdMapped"] == 2048
    assert len(cached(world)) == 1024
    world.touch(1, FIXED, 4 * M)
    assert smaps1(world, 1)["ShmemPmdMapped"] == 2048  # the first THP is small pages now


def test_cold_and_willneed_errnos(world):
    # can_madv_lru_vma: MADV_COLD refuses a VM_LOCKED VMA; MADV_WILLNEED does not care.
    mapped(world)
    world.mlock(1, FIXED + 4 * M - P, P)
    assert world.madvise(1, FIXED, 4 * M, "cold") == "EINVAL"
    assert world.madvise(1, FIXED, 4 * M, "willneed") == 0
    assert world.madvise(1, FIXED, 8 * M, "willneed") == "ENOMEM"


def test_the_flags_survive_a_snapshot_and_an_older_snapshot_has_none(world):
    # remapd's snapshot keeps Vma.flags; one written before they existed (rows of 14) restores
    # with none set, and a bit outside them is refused.
    from remapd import snapshot as rsnap
    from shared import persist

    def saved():
        return persist.decode(persist.encode(rsnap.DAEMON, rsnap.snapshot(world.remapper)), rsnap.DAEMON)

    def rows(state, fn):
        return {**state, "mms": [{**mm, "vmas": [fn(row) for row in mm["vmas"]]} for mm in state["mms"]]}

    mapped(world)
    world.restart_remapper(reconnect=False, state=rows(saved(), lambda row: row[:14]))
    world.connect()
    assert vmas(world, 1) == [(0, 4 * M, "")]
    world.madvise(1, FIXED + M, M, "random")
    world.madvise(1, FIXED + 3 * M, M, "dontfork")
    before = vmas(world, 1)
    state = saved()
    world.restart_remapper(reconnect=False, state=state)
    world.connect()
    assert vmas(world, 1) == before == [(0, M, ""), (M, 2 * M, "rr"), (2 * M, 3 * M, ""), (3 * M, 4 * M, "dc")]
    with pytest.raises(persist.SnapshotError, match="unknown flags"):
        world.restart_remapper(reconnect=False, state=rows(state, lambda row: [*row[:14], 1]))
