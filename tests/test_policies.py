"""Retry policies: what a failed mmap_lock trylock in retract_page_tables leaves behind, and who
comes back for it (remapd/khugepaged.py's policy table; kernel-notes §1, §3.2, §8.2).

Every scenario starts the same way: khugepaged collapses the page cache while an application
thread holds the process's mmap lock for read, so the retract is deferred; the process re-faults
and the THP is pte-mapped (smaps FilePmdMapped 0). Then each policy shows its own outcome.
"""

from __future__ import annotations

import pytest
from helpers import HOLD, QUARTER, TICK, smaps1

from remapd.mm import PteTable
from shared.units import HPAGE_PMD_SHIFT, HPAGE_PMD_SIZE, PAGE_SIZE


def deferred(make_world, policy, nr=1, hold=HOLD, prot="r", shared=True, **knobs):
    """Collapse ``nr`` PMD ranges of file "f" while pid 1's mmap lock is read-held; re-fault
    each range so every one is a pte-mapped THP. Returns (world, addr).

    The re-fault maps the whole THP with PTEs at once: finish_fault (mm/memory.c, 6.18) maps a
    large folio whole when it lies inside the VMA and the PMD's page table and every PTE of it is
    none, which try_to_unmap of the old pages left so."""
    world = make_world(
        enabled="always",
        retry_policy=policy,
        scan_sleep_millisecs=TICK,
        remap_sleep_millisecs=TICK,
        **knobs,
    )
    world.file_create("f", nr * HPAGE_PMD_SIZE)
    world.spawn(1)
    addr = world.mmap(1, None, nr * HPAGE_PMD_SIZE, "f", prot=prot, shared=shared)
    world.touch(1, addr, nr * HPAGE_PMD_SIZE, stride=HPAGE_PMD_SIZE)
    world.lock(1, hold)
    world.advance(TICK)
    stats = world.remapper.stats
    assert world.collapser.khugepaged.pages_collapsed == nr
    assert (stats["retract_deferred"], stats["retracted"]) == (nr, 0)
    assert world.touch(1, addr, nr * HPAGE_PMD_SIZE, stride=QUARTER) == {"minor": nr, "hit": 3 * nr}
    entry = smaps1(world, 1)
    assert (entry["Rss"], entry["FilePmdMapped"]) == (2048 * nr, 0)
    return world, addr


def pmd_mapped(world, pid, addr):
    return isinstance(world.remapper.mms[pid].pmds.get(addr >> HPAGE_PMD_SHIFT), int)


@pytest.mark.parametrize("install_pmd", [1, 0])
def test_per_pmd_remapper_collapses_once_the_lock_is_free(make_world, install_pmd):
    world, addr = deferred(make_world, "per-pmd", install_pmd=install_pmd)
    pidx = addr >> HPAGE_PMD_SHIFT
    table = world.remapper.mms[1].pmds[pidx]
    assert isinstance(table, PteTable) and table.mark
    assert world.remapper.marked == {(1, pidx)}

    world.advance(TICK)  # t=2000: the lock is still held
    assert world.remapper.stats["remap_trylock_failed"] >= 1
    assert world.remapper.marked == {(1, pidx)}
    assert smaps1(world, 1)["FilePmdMapped"] == 0

    world.advance(TICK)  # t=3000: the lock went at 2500
    assert world.remapper.stats["remap_SCAN_SUCCEED"] == 1
    assert world.remapper.marked == set()
    if install_pmd:
        assert pmd_mapped(world, 1, addr)
        assert smaps1(world, 1)["FilePmdMapped"] == 2048
        assert world.vmstat()["thp_file_mapped"] == 1
    else:
        assert pidx not in world.remapper.mms[1].pmds
        assert smaps1(world, 1)["Rss"] == 0
        assert world.vmstat()["thp_file_mapped"] == 0
        assert world.fault(1, addr + PAGE_SIZE) == "pmd"
        assert smaps1(world, 1)["FilePmdMapped"] == 2048
        assert world.vmstat()["thp_file_mapped"] == 1


def test_mm_slot_retries_on_the_next_visit_and_keeps_the_entry_on_ebusy(make_world):
    world, addr = deferred(make_world, "mm-slot")
    mm = world.remapper.mms[1]
    assert mm.pte_mapped_thp == [addr]

    world.advance(TICK)  # t=2000: khugepaged visits, the write trylock fails: -EBUSY
    assert world.remapper.stats["pte_mapped_thp_busy"] >= 1
    assert mm.pte_mapped_thp == [addr]
    assert smaps1(world, 1)["FilePmdMapped"] == 0

    world.advance(TICK)  # t=3000: retried once, then the array is emptied
    assert world.remapper.stats["pte_mapped_thp_SCAN_SUCCEED"] == 1
    assert mm.pte_mapped_thp == []
    assert smaps1(world, 1)["FilePmdMapped"] == 2048
    assert world.vmstat()["thp_file_mapped"] == 1


def test_mm_slot_retries_only_once(make_world):
    """The array is emptied after one try, whatever collapse_pte_mapped_thp returned."""
    world, addr = deferred(make_world, "mm-slot", prot="rw", shared=False)
    assert world.fault(1, addr, write=True) == "minor"  # a CoW copy in the pte-mapped THP
    world.advance(2 * TICK)
    stats = world.remapper.stats
    assert stats["pte_mapped_thp_SCAN_FAIL"] == 1
    assert world.remapper.mms[1].pte_mapped_thp == []
    world.wait_scans(3)
    assert stats["pte_mapped_thp_SCAN_FAIL"] == 1
    assert smaps1(world, 1)["FilePmdMapped"] == 0


def test_mm_slot_drops_the_ninth_address(make_world):
    # pages_to_scan covers all nine ranges in one khugepaged pass.
    world, addr = deferred(make_world, "mm-slot", nr=9, hold=1500, pages_to_scan=9 * 512 + 64)
    mm = world.remapper.mms[1]
    assert world.remapper.stats["pte_mapped_thp_dropped"] == 1
    assert mm.pte_mapped_thp == [addr + i * HPAGE_PMD_SIZE for i in range(8)]

    world.wait_scans(3)
    assert mm.pte_mapped_thp == []
    assert world.remapper.stats["pte_mapped_thp_SCAN_SUCCEED"] == 8
    assert all(pmd_mapped(world, 1, addr + i * HPAGE_PMD_SIZE) for i in range(8))
    last = mm.pmds[(addr >> HPAGE_PMD_SHIFT) + 8]
    assert isinstance(last, PteTable) and last.nr == 512  # nobody comes back for it
    entry = smaps1(world, 1)
    assert (entry["FilePmdMapped"], entry["Rss"]) == (8 * 2048, 9 * 2048)


def test_per_mapping_bit_is_retried_by_the_next_scan_that_meets_the_thp(make_world):
    world, addr = deferred(make_world, "per-mapping")
    f = world.collapser.by_name["f"]
    assert f.collapse_pmd

    world.advance(TICK)  # t=2000: test_and_clear_bit, retract, trylock fails again, bit set again
    assert world.remapper.stats["retract_deferred"] == 2
    assert f.collapse_pmd
    assert smaps1(world, 1)["FilePmdMapped"] == 0

    world.advance(TICK)  # t=3000: the seed's prepare_pmd_for_collapse drops the 4 PTEs
    assert world.remapper.stats["retracted"] == 1
    assert not f.collapse_pmd
    assert world.collapser.khugepaged.pages_collapsed == 2
    assert smaps1(world, 1)["FilePmdMapped"] == 2048


def test_lockless_never_defers(make_world):
    world = make_world(enabled="always", retry_policy="lockless", scan_sleep_millisecs=TICK)
    world.file_create("f", HPAGE_PMD_SIZE)
    world.spawn(1)
    addr = world.mmap(1, None, HPAGE_PMD_SIZE, "f")
    world.fault(1, addr)
    world.lock(1, 100 * TICK)
    world.advance(TICK)
    assert world.remapper.mms[1].lock.readers == 1
    stats = world.remapper.stats
    assert (stats["retracted"], stats["retract_deferred"]) == (1, 0)
    assert smaps1(world, 1)["FilePmdMapped"] == 2048
    assert world.touch(1, addr, HPAGE_PMD_SIZE, stride=QUARTER) == {"hit": 4}


def test_none_leaves_a_pte_mapped_thp_for_good(make_world):
    world, addr = deferred(make_world, "none")
    world.wait_scans(5)
    assert world.now > 5 * TICK
    assert smaps1(world, 1)["FilePmdMapped"] == 0
    assert isinstance(world.remapper.mms[1].pmds[addr >> HPAGE_PMD_SHIFT], PteTable)
    assert world.collapser.khugepaged.pages_collapsed == 1
    assert world.collapser.khugepaged.results["SCAN_PTE_MAPPED_HUGEPAGE"] >= 5
    assert world.vmstat()["thp_file_mapped"] == 0


@pytest.mark.parametrize(("policy", "recovered"), [("per-mapping", 1), ("per-pmd", 2)])
def test_two_deferred_ranges_of_one_file(make_world, policy, recovered):
    """Kirill: "Who said it's the only PMD range that's subject to collapse? The bit has to be
    per-PMD, not per-mapping." """
    world, addr = deferred(make_world, policy, nr=2)
    world.wait_scans(4)
    assert world.now > HOLD
    mapped = [pmd_mapped(world, 1, addr + i * HPAGE_PMD_SIZE) for i in range(2)]
    assert mapped == [True] * recovered + [False] * (2 - recovered)
    assert smaps1(world, 1)["FilePmdMapped"] == recovered * 2048


def test_switching_to_lockless_collapses_under_the_read_lock(make_world):
    """6.6+: collapse_pte_mapped_thp runs under mmap_read_lock, so the scan's
    SCAN_PTE_MAPPED_HUGEPAGE maps the PMD even while the application still reads."""
    world, addr = deferred(make_world, "none", hold=100 * TICK)
    world.wait_scans(2)
    assert smaps1(world, 1)["FilePmdMapped"] == 0
    world.sysfs_set("thpsplit/retry_policy", "lockless")  # wakes khugepaged
    assert world.remapper.mms[1].lock.readers == 1
    assert smaps1(world, 1)["FilePmdMapped"] == 2048
    assert world.collapser.khugepaged.pages_collapsed == 2


def test_switching_to_per_pmd_picks_up_marks_set_by_faults(make_world):
    world, addr = deferred(make_world, "none")
    pidx = addr >> HPAGE_PMD_SHIFT
    world.advance(HOLD)
    assert world.remapper.marked == {(1, pidx)}  # the re-fault marked it; nobody acted
    assert smaps1(world, 1)["FilePmdMapped"] == 0
    world.sysfs_set("thpsplit/retry_policy", "per-pmd")  # wakes the remapper
    assert world.remapper.marked == set()
    assert smaps1(world, 1)["FilePmdMapped"] == 2048


def test_a_busy_process_does_not_starve_other_marks(make_world):
    """Eight marked tables of a process that keeps its lock must not use up the remapper's
    budget (pages_to_scan / 512 = 8 tables) before another process's mark is tried."""
    world = make_world(enabled="always", scan_sleep_millisecs=TICK, remap_sleep_millisecs=TICK)
    world.file_create("a", 8 * HPAGE_PMD_SIZE)
    world.file_create("b", HPAGE_PMD_SIZE)
    world.spawn(1)
    world.spawn(2)
    a = world.mmap(1, None, 8 * HPAGE_PMD_SIZE, "a")
    b = world.mmap(2, None, HPAGE_PMD_SIZE, "b")
    world.touch(1, a, 8 * HPAGE_PMD_SIZE, stride=HPAGE_PMD_SIZE)
    world.fault(2, b)
    world.lock(1, 1000 * TICK)
    world.lock(2, 2 * TICK + 500)
    world.advance(2 * TICK)
    assert len(world.remapper.marked) == 9
    world.advance(3 * TICK)
    assert pmd_mapped(world, 2, b)
    assert len(world.remapper.marked) == 8
    assert smaps1(world, 1)["FilePmdMapped"] == 0


def test_lockless_khugepaged_survives_an_exit_during_collapse_pte_mapped_thp(make_world):
    world = make_world(enabled="always", retry_policy="lockless", scan_sleep_millisecs=TICK)
    world.file_create("f", HPAGE_PMD_SIZE)
    world.file_create("g", HPAGE_PMD_SIZE)
    world.spawn(1)
    addr = world.mmap(1, None, HPAGE_PMD_SIZE, "f")
    world.fault(1, addr)
    world.advance(TICK)  # collapsed; every later scan of the range sends CollapsePteMapped
    world.lock(1, 5 * TICK, write=True)
    world.advance(TICK)  # the request waits for pid 1's mmap lock
    world.exit(1)
    world.advance(5 * TICK)
    world.spawn(2)
    b = world.mmap(2, None, HPAGE_PMD_SIZE, "g")
    world.fault(2, b)
    world.wait_scans(2, limit_ms=100 * TICK)
    assert smaps1(world, 2)["FilePmdMapped"] == 2048
