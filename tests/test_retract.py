"""retract_page_tables and the per-PMD mark: what the remapper does to each mapping when the
collapser publishes a new THP (kernel-notes §2.3, §3.2, §8.1–8.3; the seed mail).
"""

from __future__ import annotations

from collections import Counter

import pytest
from helpers import HOLD, QUARTER, TICK, smaps1

from remapd.mm import PteTable
from shared.units import HPAGE_PMD_SHIFT, HPAGE_PMD_SIZE, PAGE_SIZE


def new_world(make_world, **knobs):
    knobs = {"enabled": "always", "scan_sleep_millisecs": TICK, "remap_sleep_millisecs": TICK, **knobs}
    world = make_world(**knobs)
    world.file_create("f", HPAGE_PMD_SIZE)
    return world


def map_file(world, pid, **kw):
    if pid not in world.remapper.mms:
        world.spawn(pid)
    return world.mmap(pid, None, HPAGE_PMD_SIZE, "f", **kw)


@pytest.mark.parametrize("install_pmd", [1, 0])
def test_install_pmd_knob(make_world, install_pmd):
    world = new_world(make_world, install_pmd=install_pmd)
    a1 = map_file(world, 1)
    a2 = map_file(world, 2)
    world.touch(1, a1, HPAGE_PMD_SIZE, stride=QUARTER)
    world.fault(2, a2)
    faults = world.vmstat()["pgfault"]
    world.advance(TICK)
    assert world.collapser.khugepaged.pages_collapsed == 1
    assert world.remapper.stats["retracted"] == 2
    assert world.vmstat()["pgfault"] == faults  # nothing faulted in between
    for pid in (1, 2):
        assert world.remapper.mms[pid].nr_ptes == 0
    if install_pmd:
        # The remapper maps the PMD right after retracting, in every mm it retracted.
        assert world.vmstat()["thp_file_mapped"] == 2
        for pid in (1, 2):
            assert smaps1(world, pid)["FilePmdMapped"] == 2048
        assert world.meminfo()["FilePmdMapped"] == 2048
        assert world.fault(1, a1 + PAGE_SIZE) == "hit"
    else:
        # The kernel's way: the PMD is none and the next fault maps the THP with do_set_pmd.
        assert world.vmstat()["thp_file_mapped"] == 0
        for pid in (1, 2):
            assert smaps1(world, pid)["Rss"] == 0
        assert world.meminfo()["FilePmdMapped"] == 0
        assert world.fault(1, a1 + PAGE_SIZE) == "pmd"
        assert world.vmstat()["thp_file_mapped"] == 1
        assert smaps1(world, 1)["FilePmdMapped"] == 2048
        assert smaps1(world, 2)["Rss"] == 0


def test_retract_per_mm_only_the_locked_one_defers(make_world):
    world = new_world(make_world)
    a1 = map_file(world, 1)
    a2 = map_file(world, 2)
    world.fault(1, a1)
    world.fault(2, a2)
    world.lock(2, HOLD)
    world.advance(TICK)
    stats = world.remapper.stats
    assert (stats["retracted"], stats["retract_deferred"]) == (1, 1)
    assert smaps1(world, 1)["FilePmdMapped"] == 2048
    assert smaps1(world, 2)["FilePmdMapped"] == 0
    assert world.remapper.marked == {(2, a2 >> HPAGE_PMD_SHIFT)}
    world.advance(2 * TICK)
    assert smaps1(world, 2)["FilePmdMapped"] == 2048
    assert world.remapper.marked == set()


def test_retract_skips_a_vma_with_anon_vma(make_world):
    """A MAP_PRIVATE mapping written to has an anon_vma: retract leaves its table alone."""
    world = new_world(make_world)
    a1 = map_file(world, 1, prot="rw", shared=False)
    a2 = map_file(world, 2)
    assert world.fault(1, a1 + PAGE_SIZE, write=True) == "major"  # do_cow_fault
    world.fault(1, a1)
    world.fault(2, a2)
    world.advance(TICK)
    assert world.remapper.stats["retracted"] == 1  # pid 2 only
    table = world.remapper.mms[1].pmds[a1 >> HPAGE_PMD_SHIFT]
    assert isinstance(table, PteTable)
    assert table.nr == 1 and table.nr_foreign == 1  # the CoW copy; the file page was unmapped
    entry = smaps1(world, 1)
    assert (entry["Rss"], entry["Anonymous"], entry["FilePmdMapped"]) == (4, 4, 0)
    assert smaps1(world, 2)["FilePmdMapped"] == 2048
    # Re-faults make it a pte-mapped THP around the anon page; nothing ever collapses it.
    assert world.touch(1, a1, HPAGE_PMD_SIZE, stride=QUARTER) == {"minor": 4}
    world.wait_scans(3)
    entry = smaps1(world, 1)
    assert (entry["Rss"], entry["Anonymous"], entry["FilePmdMapped"]) == (20, 4, 0)
    assert world.remapper.marked == set()


def test_a_foreign_page_clears_the_mark_and_the_table_is_never_collapsed(make_world):
    """Kirill: store the bit in the page table's struct page, "clearing it if we've mapped
    anything that doesn't belong there from the fault path" (here: a CoW write)."""
    world = new_world(make_world)
    addr = map_file(world, 1, prot="rw", shared=False)
    world.fault(1, addr)
    world.lock(1, HOLD)
    world.advance(TICK)
    pidx = addr >> HPAGE_PMD_SHIFT
    table = world.remapper.mms[1].pmds[pidx]
    assert world.remapper.stats["retract_deferred"] == 1
    assert table.mark and world.remapper.marked == {(1, pidx)}
    # The first re-fault maps the whole THP (finish_fault over an empty table, 6.18).
    assert world.touch(1, addr, HPAGE_PMD_SIZE, stride=QUARTER) == {"minor": 1, "hit": 3}
    assert table.mark  # subpage i at slot i belongs

    assert world.fault(1, addr + QUARTER, write=True) == "minor"  # wp_page_copy
    assert not table.mark and table.nr_foreign == 1
    assert world.remapper.marked == set()

    world.advance(5 * TICK)  # the lock went long ago; the remapper has nothing to try
    assert world.remapper.mms[1].pmds[pidx] is table
    assert not any(k.startswith("remap_SCAN") for k in world.remapper.stats)
    entry = smaps1(world, 1)
    assert (entry["Rss"], entry["Anonymous"], entry["FilePmdMapped"]) == (2048, 4, 0)


def test_a_fault_that_maps_a_subpage_in_place_sets_the_mark(make_world):
    world = new_world(make_world, retry_policy="none")
    addr = map_file(world, 1)
    world.fault(1, addr)
    world.lock(1, HOLD)
    world.advance(TICK)
    pidx = addr >> HPAGE_PMD_SHIFT
    # With policy none the deferral marks nothing; the fault path does.
    assert world.remapper.marked == set()
    world.fault(1, addr + PAGE_SIZE)
    assert world.remapper.marked == {(1, pidx)}
    world.advance(HOLD)
    world.munmap(1, addr, HPAGE_PMD_SIZE)  # free_pgtables drops the table and its mark
    assert world.remapper.marked == set()


def test_a_new_mapping_gets_the_pmd_while_the_old_stays_pte_mapped(make_world):
    """Kirill: "Even if only the first step is successful, it's still useful: the new mapping
    of the file will get huge page, even if the old is still PTE-mapped." """
    world = new_world(make_world, retry_policy="none")
    a1 = map_file(world, 1)
    world.fault(1, a1)
    world.lock(1, HOLD)
    world.advance(TICK)
    assert world.remapper.stats["retract_deferred"] == 1
    # The first re-fault maps the whole THP with PTEs (finish_fault over an empty table, 6.18).
    assert world.touch(1, a1, HPAGE_PMD_SIZE, stride=QUARTER) == {"minor": 1, "hit": 3}

    a2 = map_file(world, 2)
    assert world.fault(2, a2 + 5 * PAGE_SIZE) == "pmd"
    assert smaps1(world, 2)["FilePmdMapped"] == 2048
    old = smaps1(world, 1)
    assert (old["Rss"], old["FilePmdMapped"]) == (2048, 0)
    assert world.vmstat()["thp_file_mapped"] == 1
    info = world.meminfo()
    assert (info["FileHugePages"], info["FilePmdMapped"]) == (2048, 2048)


def test_shmem_retract_maps_shmem_pmd(make_world):
    world = make_world(shmem_enabled="always", scan_sleep_millisecs=TICK)
    world.file_create("s", HPAGE_PMD_SIZE, shmem=True)
    world.spawn(1)
    addr = world.mmap(1, None, HPAGE_PMD_SIZE, "s", prot="rw")
    world.file_write("s", 0, PAGE_SIZE)  # a small page: write(2) does not allocate huge
    assert world.fault(1, addr) == "minor"
    assert smaps1(world, 1)["ShmemPmdMapped"] == 0
    world.advance(TICK)
    entry = smaps1(world, 1)
    assert (entry["ShmemPmdMapped"], entry["FilePmdMapped"]) == (2048, 0)
    assert world.meminfo()["ShmemHugePages"] == 2048


def run_faults_during_collapse(make_world, seed):
    """pid 1 has a PTE table and four faults in flight, pid 2 none and four faults in flight,
    when khugepaged's pass collapses the file: every fault waits for the page lock, without
    holding its mmap_lock."""
    world = new_world(make_world, seed=seed, remap_sleep_millisecs=TICK + TICK // 2)
    a1 = map_file(world, 1)
    a2 = map_file(world, 2)
    world.fault(1, a1)
    r = world.remapper
    outcomes: list[str] = []
    for pid, addr in ((1, a1), (2, a2)):
        for off in range(0, HPAGE_PMD_SIZE, QUARTER):
            r.spawn(r.fault(pid, addr + off + PAGE_SIZE), lambda v: outcomes.append(v["result"]))
    world.advance(TICK)
    assert world.collapser.khugepaged.pages_collapsed == 1
    first = (Counter(outcomes), smaps1(world, 1)["FilePmdMapped"], smaps1(world, 2)["FilePmdMapped"],
             set(r.marked), dict(r.stats))
    world.advance(TICK)
    return first, smaps1(world, 1), smaps1(world, 2), world.vmstat()


@pytest.mark.parametrize("seed", range(6))
def test_faults_during_a_khugepaged_collapse_under_seeds(make_world, seed):
    first, s1, s2, vm = run_faults_during_collapse(make_world, seed)
    outcomes, pmd1, pmd2, marked, stats = first
    # Faults waiting on the page lock do not hold mmap_lock (the page-cache lookup runs without
    # it), so pid 1's retract was not deferred: the remapper installed its PMD and the waiting
    # faults found it. pid 2 had no table, so its first fault mapped the PMD.
    assert outcomes == Counter({"hit": 7, "pmd": 1})
    assert (pmd1, pmd2) == (2048, 2048)
    assert stats.get("retract_deferred", 0) == 0 and not marked
    assert s1["FilePmdMapped"] == s2["FilePmdMapped"] == 2048
    assert vm["thp_file_mapped"] == 2
    assert (first, s1, s2, vm) == run_faults_during_collapse(make_world, None)


def test_a_fault_that_waited_out_a_lockless_retract_maps_the_pmd(make_world):
    world = new_world(make_world, retry_policy="lockless", install_pmd=0)
    a1 = map_file(world, 1)
    a2 = map_file(world, 2)
    world.fault(1, a1)
    world.fault(2, a2)  # pid 2 has a table, so its next lookup asks for a PTE
    r = world.remapper
    out = {}
    r.spawn(r.madvise(1, a1, HPAGE_PMD_SIZE, "collapse"), lambda v: out.update(madv=v["result"]))
    r.spawn(r.fault(2, a2 + QUARTER), lambda v: out.update(fault=v["result"]))
    world.settle()
    assert out["madv"] == 0
    assert world.remapper.stats["retracted"] == 2
    assert (out["fault"], smaps1(world, 2)["FilePmdMapped"]) == ("pmd", 2048)
