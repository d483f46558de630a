"""MADV_COLLAPSE on regular files and shmem (kernel-notes §3.3): the page-cache collapse by the
collapser, then collapse_pte_mapped_thp(install_pmd=true) in the caller's mm, and the errno
table of madvise_collapse_errno."""

from __future__ import annotations

from collections import Counter

import pytest
from helpers import QUARTER, smaps1

from shared.scan_result import ScanResult as R
from shared.scan_result import madvise_collapse_errno
from shared.units import HPAGE_PMD_SHIFT, HPAGE_PMD_SIZE, PAGE_SIZE

KINDS = pytest.mark.parametrize("shmem", [False, True], ids=["file", "shmem"])


def pmd_kb(world, pid, shmem):
    return smaps1(world, pid)["ShmemPmdMapped" if shmem else "FilePmdMapped"]


def mapped(make_world, shmem=False, pages=1, **knobs):
    """File "f" (2 MiB) mapped shared read-only in pid 1, with ``pages`` pages faulted in."""
    world = make_world(**knobs)
    world.file_create("f", HPAGE_PMD_SIZE, shmem=shmem)
    world.spawn(1)
    addr = world.mmap(1, None, HPAGE_PMD_SIZE, "f")
    for i in range(pages):
        world.fault(1, addr + i * PAGE_SIZE)
    return world, addr


@KINDS
def test_collapse_ignores_sysfs_enabled_and_max_ptes_none(make_world, shmem):
    world, addr = mapped(make_world, shmem, enabled="never", shmem_enabled="never", max_ptes_none=0)
    assert smaps1(world, 1)["Rss"] == 4
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "collapse") == 0
    assert pmd_kb(world, 1, shmem) == 2048
    vm = world.vmstat()
    assert (vm["thp_collapse_alloc"], vm["thp_file_mapped"]) == (1, 1)
    info = world.meminfo()
    key = "ShmemHugePages" if shmem else "FileHugePages"
    assert info[key] == 2048
    assert world.collapser.khugepaged.pages_collapsed == 0  # a khugepaged counter only


@KINDS
def test_an_already_pmd_mapped_range_returns_0(make_world, shmem):
    world, addr = mapped(make_world, shmem)
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "collapse") == 0
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "collapse") == 0
    vm = world.vmstat()
    assert (vm["thp_collapse_alloc"], vm["thp_file_mapped"]) == (1, 1)


def test_a_retracted_range_gets_its_pmd_from_the_page_cache(make_world):
    """The selftest's madvise_retracted_page_tables: khugepaged collapsed and retracted with no
    PMD installed; MADV_COLLAPSE only maps the THP that is already in the page cache."""
    world, addr = mapped(make_world, install_pmd=0, enabled="always", scan_sleep_millisecs=1000)
    world.advance(1000)
    assert world.collapser.khugepaged.pages_collapsed == 1
    assert addr >> HPAGE_PMD_SHIFT not in world.remapper.mms[1].pmds
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "collapse") == 0
    vm = world.vmstat()
    assert (vm["thp_collapse_alloc"], vm["thp_file_mapped"]) == (1, 1)
    assert smaps1(world, 1)["FilePmdMapped"] == 2048


@pytest.mark.parametrize("install_pmd", [1, 0])
def test_other_mappings_get_their_pmd(make_world, install_pmd):
    world, a1 = mapped(make_world, install_pmd=install_pmd)
    world.spawn(2)
    a2 = world.mmap(2, None, HPAGE_PMD_SIZE, "f")
    world.touch(2, a2, HPAGE_PMD_SIZE, stride=QUARTER)
    assert world.madvise(1, a1, HPAGE_PMD_SIZE, "collapse") == 0
    assert smaps1(world, 1)["FilePmdMapped"] == 2048
    if install_pmd:
        assert smaps1(world, 2)["FilePmdMapped"] == 2048  # retract installed it
        assert world.vmstat()["thp_file_mapped"] == 2
    else:
        assert smaps1(world, 2)["Rss"] == 0  # retracted, PMD none
        assert world.vmstat()["thp_file_mapped"] == 1
        assert world.fault(2, a2) == "pmd"
        assert world.vmstat()["thp_file_mapped"] == 2


def test_the_callers_own_read_lock_does_not_stop_it(make_world):
    """The caller's retract is deferred (an application thread holds the lock for read), but
    collapse_pte_mapped_thp needs only the read lock, so the PMD is installed anyway."""
    world, addr = mapped(make_world)
    world.lock(1, 10_000)
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "collapse") == 0
    assert world.remapper.stats["retract_deferred"] == 1
    assert smaps1(world, 1)["FilePmdMapped"] == 2048
    assert world.remapper.marked == set()


def test_enomem_when_no_huge_page_is_free(make_world):
    world, addr = mapped(make_world, free_huge_pages=0)
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "collapse") == "ENOMEM"
    assert world.vmstat()["thp_collapse_alloc_failed"] == 1
    assert smaps1(world, 1)["Rss"] == 4


@KINDS
def test_eagain_on_a_gup_pin(make_world, shmem):
    world, addr = mapped(make_world, shmem)
    world.pin(1, addr)
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "collapse") == "EAGAIN"
    assert world.collapser.khugepaged.results == {"SCAN_PAGE_COUNT": 1}
    world.unpin(1, addr)
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "collapse") == 0


@KINDS
def test_einval_on_nohugepage(make_world, shmem):
    world, addr = mapped(make_world, shmem)
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "nohugepage") == 0
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "collapse") == "EINVAL"
    assert world.vmstat()["thp_collapse_alloc"] == 0


def test_einval_on_shmem_deny(make_world):
    world, addr = mapped(make_world, shmem=True, shmem_enabled="deny")
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "collapse") == "EINVAL"


def test_einval_on_shmem_with_no_page_present(make_world):
    """Observed on 6.18: "at least one page must currently be backed by physical memory"."""
    world, addr = mapped(make_world, shmem=True, pages=0)
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "collapse") == "EINVAL"
    assert world.collapser.khugepaged.results == {"SCAN_TRUNCATED": 1}
    assert world.meminfo()["ShmemHugePages"] == 0


def test_a_regular_file_with_no_page_present_is_read_in(make_world):
    world, addr = mapped(make_world, pages=0)
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "collapse") == 0
    assert world.vmstat()["pgmajfault"] == 0  # collapse_file's readahead is not a fault
    assert smaps1(world, 1)["FilePmdMapped"] == 2048


@KINDS
def test_ranges_without_a_whole_aligned_extent(make_world, shmem):
    """6.18: hstart == hend collapses nothing and returns 0; hstart > hend wraps: EINVAL."""
    world, addr = mapped(make_world, shmem)
    assert world.madvise(1, addr + PAGE_SIZE, PAGE_SIZE, "collapse") == "EINVAL"
    assert world.madvise(1, addr, PAGE_SIZE, "collapse") == 0
    assert world.madvise(1, addr, HPAGE_PMD_SIZE - PAGE_SIZE, "collapse") == 0
    assert world.vmstat()["thp_collapse_alloc"] == 0
    assert pmd_kb(world, 1, shmem) == 0


def test_enomem_when_part_of_the_range_is_unmapped(make_world):
    world, addr = mapped(make_world)
    assert world.madvise(1, addr, 2 * HPAGE_PMD_SIZE, "collapse") == "ENOMEM"
    assert smaps1(world, 1)["FilePmdMapped"] == 2048  # the mapped part was still collapsed


@pytest.mark.parametrize("pinned", [0, 1])
def test_the_walk_stops_at_the_first_vma_that_fails(make_world, pinned):
    """Each VMA is collapsed on its own (madvise_walk_vmas): an EAGAIN in the first one leaves the
    second alone; an EAGAIN in the second comes after the first was collapsed."""
    world = make_world()
    world.spawn(1)
    base = 0x40000000
    for i, name in enumerate("fg"):
        world.file_create(name, HPAGE_PMD_SIZE)
        world.mmap(1, base + i * HPAGE_PMD_SIZE, HPAGE_PMD_SIZE, name)
        world.fault(1, base + i * HPAGE_PMD_SIZE)
    world.pin(1, base + pinned * HPAGE_PMD_SIZE)
    assert world.madvise(1, base, 2 * HPAGE_PMD_SIZE, "collapse") == "EAGAIN"
    collapsed = [e["FilePmdMapped"] == 2048 for e in world.smaps(1)]
    assert collapsed == ([False, False] if pinned == 0 else [True, False])


def test_ebusy_is_not_reachable_without_uffd_or_memcg(make_world):
    """EBUSY needs SCAN_EXCEED_NONE_PTE (only via a userfaultfd_missing VMA, for MADV_COLLAPSE)
    or SCAN_CGROUP_CHARGE_FAIL; the model has neither, so holes never give EBUSY."""
    assert madvise_collapse_errno(R.SCAN_EXCEED_NONE_PTE) == "EBUSY"
    assert madvise_collapse_errno(R.SCAN_CGROUP_CHARGE_FAIL) == "EBUSY"
    world, addr = mapped(make_world, shmem=True, max_ptes_none=0)
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "collapse") == 0


@pytest.mark.parametrize(
    ("result", "errno"),
    [
        (R.SCAN_ALLOC_HUGE_PAGE_FAIL, "ENOMEM"),
        (R.SCAN_PAGE_COUNT, "EAGAIN"),
        (R.SCAN_PAGE_LOCK, "EAGAIN"),
        (R.SCAN_PAGE_LRU, "EAGAIN"),
        (R.SCAN_DEL_PAGE_LRU, "EAGAIN"),
        (R.SCAN_PAGE_FILLED, "EAGAIN"),
        (R.SCAN_TRUNCATED, "EINVAL"),
        (R.SCAN_FAIL, "EINVAL"),
    ],
)
def test_madvise_collapse_errno_table(result, errno):
    assert madvise_collapse_errno(result) == errno


def run_concurrent(make_world, seed, shmem):
    """pid 1 MADV_COLLAPSEs while pid 2 (half of it faulted as small pages) faults four more
    pages and pid 3 (nothing mapped yet) faults four: all in flight at once."""
    world = make_world(seed=seed, shmem_enabled="never")
    world.file_create("f", HPAGE_PMD_SIZE, shmem=shmem)
    addrs = {}
    for pid in (1, 2, 3):
        world.spawn(pid)
        addrs[pid] = world.mmap(pid, None, HPAGE_PMD_SIZE, "f")
    world.touch(1, addrs[1], HPAGE_PMD_SIZE // 2, stride=QUARTER)
    world.touch(2, addrs[2], HPAGE_PMD_SIZE // 2, stride=QUARTER // 2)
    r = world.remapper
    out: dict[str, object] = {}
    faults: Counter[tuple[int, str]] = Counter()
    r.spawn(r.madvise(1, addrs[1], HPAGE_PMD_SIZE, "collapse"), lambda v: out.update(madv=v["result"]))
    for off in range(PAGE_SIZE, HPAGE_PMD_SIZE, QUARTER):
        for pid in (2, 3):
            r.spawn(r.fault(pid, addrs[pid] + off), lambda v, pid=pid: faults.update([(pid, v["result"])]))
    world.settle()
    assert r.pending_calls() == 0 and world.collapser.pending_calls() == 0
    out["faults"] = faults
    out["smaps"] = [{k: smaps1(world, pid)[k] for k in ("Rss", "FilePmdMapped", "ShmemPmdMapped")} for pid in (1, 2, 3)]
    out["marked"] = sorted(pid for pid, _ in r.marked)
    out["meminfo"] = world.meminfo()
    return out


@pytest.mark.parametrize("seed", range(6))
def test_faults_during_madv_collapse_file(make_world, seed):
    out = run_concurrent(make_world, seed, shmem=False)
    assert out["madv"] == 0
    # Faults do not hold mmap_lock while they wait on the page cache, so pid 2's retract went
    # through: its waiting faults find the PMD the remapper installed. pid 3 had no table: its
    # first fault mapped the PMD, the others found it.
    assert out["faults"] == Counter({(2, "hit"): 4, (3, "pmd"): 1, (3, "hit"): 3})
    assert [(s["Rss"], s["FilePmdMapped"]) for s in out["smaps"]] == [(2048, 2048)] * 3
    assert out["marked"] == []
    assert out == run_concurrent(make_world, None, shmem=False)


@pytest.mark.parametrize("seed", range(6))
def test_faults_during_madv_collapse_shmem(make_world, seed):
    out = run_concurrent(make_world, seed, shmem=True)
    # pid 3's faults filled holes the collapse was counting on: SCAN_PAGE_FILLED.
    assert out["madv"] == "EAGAIN"
    assert out["meminfo"]["ShmemHugePages"] == 0
    assert [s["ShmemPmdMapped"] for s in out["smaps"]] == [0, 0, 0]
    assert out == run_concurrent(make_world, None, shmem=True)


def test_shmem_madv_collapse_matches_the_real_kernel(make_world):
    # Observed on this machine's 6.18 kernel (shmem_enabled never): a 4 MiB memfd with one page
    # written, mapped shared at a 2 MiB-aligned address and never touched; MADV_COLLAPSE of the
    # first 2 MiB returns 0 and smaps shows Rss = ShmemPmdMapped = 2048 kB; of the second (no page
    # present) EINVAL; of the first again 0.
    world = make_world(shmem_enabled="never")
    world.file_create("c", 2 * HPAGE_PMD_SIZE, shmem=True)
    world.file_write("c", 0, PAGE_SIZE)
    world.spawn(1)
    a = world.mmap(1, 0x40000000, 2 * HPAGE_PMD_SIZE, "c", prot="rw", shared=True)
    assert world.madvise(1, a, HPAGE_PMD_SIZE, "collapse") == 0
    entry = smaps1(world, 1)
    assert (entry["Rss"], entry["ShmemPmdMapped"]) == (2048, 2048)
    assert world.madvise(1, a + HPAGE_PMD_SIZE, HPAGE_PMD_SIZE, "collapse") == "EINVAL"
    assert world.madvise(1, a, HPAGE_PMD_SIZE, "collapse") == 0
