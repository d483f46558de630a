"""khugepaged's page-cache half: pacing, hpage_collapse_scan_file and collapse_file (6.x), for
regular files (CONFIG_READ_ONLY_THP_FOR_FS) and shmem, plus shmem's THP allocation at fault."""

from __future__ import annotations

from array import array

import pytest

from collapsed.khugepaged import CollapseControl
from collapsed.pagecache import (
    PG_DIRTY,
    PG_HEAD,
    PG_LOCKED,
    PG_LRU,
    PG_SWAPBACKED,
    PG_UPTODATE,
    PG_WRITEBACK,
)
from shared import messages as m
from shared.scan_result import ScanResult as R
from shared.sim.world import Pending
from shared.units import HPAGE_PMD_NR, HPAGE_PMD_SIZE, PAGE_SIZE

MiB = 1 << 20


def mapped(world, name="f", size=HPAGE_PMD_SIZE, shmem=False, pid=1, prot="r", touch=HPAGE_PMD_NR,
           write=False, small=False):
    """Create ``name``, map it whole in a new process ``pid``, fault its first ``touch`` pages.
    ``small``: write those pages first, so that shmem holds small pages whatever shmem_enabled."""
    world.file_create(name, size, shmem=shmem)
    world.spawn(pid)
    addr = world.mmap(pid, None, size, name, prot=prot)
    assert addr % HPAGE_PMD_SIZE == 0
    if touch:
        if small:
            world.file_write(name, 0, touch * PAGE_SIZE)
        world.touch(pid, addr, touch * PAGE_SIZE, write=write)
    return addr


def scan(world, name="f", start=0, khugepaged=True, pid=1, addr=0) -> R:
    """hpage_collapse_scan_file on [start, start+512), run to completion."""
    c = world.collapser
    cc = CollapseControl(khugepaged, pid, addr)
    return world.start(c, c.khugepaged.hpage_collapse_scan_file(c.by_name[name], start, cc)).result()


def results(world) -> dict[str, int]:
    return dict(world.collapser.khugepaged.results)


def cache(world, name="f") -> dict[int, int]:
    return dict(world.collapser.by_name[name].entries())


# -- khugepaged pacing --------------------------------------------------------------------------------


def test_first_visit_scans_the_new_mapping_at_once(make_world):
    world = make_world(enabled="always")
    mapped(world, size=2 * HPAGE_PMD_SIZE, touch=0)
    k = world.collapser.khugepaged
    # khugepaged_enter_vma wakes the thread; both (empty) ranges are scanned, then the wrap.
    assert k.passes == 1 and k.full_scans == 1
    assert results(world) == {"SCAN_EXCEED_NONE_PTE": 2}
    assert world.vmstat()["thp_scan_exceed_none_pte"] == 2


def test_pages_to_scan_limits_each_pass(make_world):
    world = make_world(enabled="always", pages_to_scan=1024)
    addr = mapped(world, size=4 * HPAGE_PMD_SIZE, touch=0)
    k = world.collapser.khugepaged
    # 1 for the mm visit + 512 per range: two ranges reach 1026 >= 1024.
    assert results(world) == {"SCAN_EXCEED_NONE_PTE": 2} and k.full_scans == 0
    assert k.cursor_addr == addr + 2 * HPAGE_PMD_SIZE
    world.touch(1, addr, 4 * HPAGE_PMD_SIZE)
    world.advance(10_000)
    assert k.passes == 2 and results(world) == {"SCAN_EXCEED_NONE_PTE": 2, "SCAN_SUCCEED": 2}
    assert k.full_scans == 0 and k.pages_collapsed == 2
    world.advance(10_000)
    # The wrap costs little: the first two ranges again fill the budget.
    assert k.full_scans == 1 and k.pages_collapsed == 4
    assert results(world) == {"SCAN_EXCEED_NONE_PTE": 2, "SCAN_SUCCEED": 4}
    assert k.cursor_addr == addr + 2 * HPAGE_PMD_SIZE


def test_small_budget_scans_one_range_per_pass(make_world):
    world = make_world(enabled="always", pages_to_scan=1)
    mapped(world, size=3 * HPAGE_PMD_SIZE, touch=0)
    k = world.collapser.khugepaged
    for n in (1, 2, 3):
        assert sum(results(world).values()) == n and k.full_scans == 0
        world.advance(10_000)
    assert k.full_scans == 1 and sum(results(world).values()) == 3


def test_no_scan_before_scan_sleep_millisecs(make_world):
    world = make_world(enabled="always", scan_sleep_millisecs=500)
    addr = mapped(world, touch=0)
    k = world.collapser.khugepaged
    assert k.passes == 1
    world.touch(1, addr, HPAGE_PMD_SIZE)
    world.advance(499)
    assert k.passes == 1 and k.pages_collapsed == 0 and world.meminfo()["FileHugePages"] == 0
    world.advance(1)
    assert k.passes == 2 and k.pages_collapsed == 1 and world.meminfo()["FileHugePages"] == 2048
    assert world.collapser.next_deadline() == 1000


def test_writing_scan_sleep_millisecs_wakes_khugepaged(make_world):
    world = make_world(enabled="always")
    addr = mapped(world, touch=0)
    world.touch(1, addr, HPAGE_PMD_SIZE)
    world.advance(1000)
    k = world.collapser.khugepaged
    assert k.passes == 1
    world.sysfs_set("khugepaged/scan_sleep_millisecs", 50)
    assert k.passes == 2 and k.pages_collapsed == 1
    world.advance(49)
    assert k.passes == 2
    world.advance(1)
    assert k.passes == 3


def test_first_madv_hugepage_on_shmem_does_not_register_the_mm(make_world):
    """Conformance #15. hugepage_madvise() calls khugepaged_enter_vma(vma, new flags) before the
    VMA changes, and for shmem 6.18's __thp_vma_allowable_orders() -> shmem_allowable_huge_orders()
    reads vma->vm_flags, still without VM_HUGEPAGE: under shmem_enabled=advise the mm is not put
    on khugepaged's list, so khugepaged never scans it. A second MADV_HUGEPAGE registers it; so
    does a merge (vma_merge_existing_range() calls khugepaged_enter_vma() on the merged VMA), and
    fork passes the registration on (khugepaged_fork). A regular file is checked under the new
    flags. (Kernel: file write c 0 4M; mmap 4M shared; madvise hugepage; touch; wait-scans 2:
    Rss 4096, ShmemPmdMapped 0; with the madvise twice, nr_shmem_hugepages +2.)"""
    world = make_world(shmem_enabled="advise")
    world.file_create("s", 2 * HPAGE_PMD_SIZE, shmem=True)
    world.file_write("s", 0, 2 * HPAGE_PMD_SIZE)
    world.spawn(1)
    addr = world.mmap(1, None, 2 * HPAGE_PMD_SIZE, "s", prot="rw")
    k = world.collapser.khugepaged
    world.madvise(1, addr, 2 * HPAGE_PMD_SIZE, "hugepage")
    world.advance(100_000)
    assert k.order == [] and k.passes == 0 and world.collapser.by_name["s"].nr_thps == 0
    world.fork(1, 2)
    world.madvise(1, addr, 2 * HPAGE_PMD_SIZE, "hugepage")  # flags unchanged: still called
    assert k.order == [1] and k.pages_collapsed == 2  # the wakeup's pass
    world.fork(1, 3)
    assert k.order == [1, 3]  # 2 forked before 1 entered

    world.spawn(4)
    addr = world.mmap(4, None, 2 * HPAGE_PMD_SIZE, "s", prot="rw")
    world.madvise(4, addr, HPAGE_PMD_SIZE, "hugepage")  # splits the VMA: not registered
    assert k.order == [1, 3]
    world.madvise(4, addr + HPAGE_PMD_SIZE, HPAGE_PMD_SIZE, "hugepage")  # merges: registered
    assert k.order == [1, 3, 4]

    world.file_create("f", HPAGE_PMD_SIZE)
    world.spawn(5)
    addr = world.mmap(5, None, HPAGE_PMD_SIZE, "f")
    assert k.order == [1, 3, 4]  # enabled=madvise, no VM_HUGEPAGE yet
    world.madvise(5, addr, HPAGE_PMD_SIZE, "hugepage")
    assert k.order == [1, 3, 4, 5]


def test_only_the_sleep_knobs_end_khugepaged_scan_sleep(make_world):
    """Conformance #17. scan_sleep_millisecs_store() and alloc_sleep_millisecs_store()
    (mm/khugepaged.c) set khugepaged_sleep_expire = 0 and wake khugepaged; the other knobs only
    store a value, and enabled_store()/shmem_enabled_store()'s start_stop_khugepaged() wakes the
    wait queue but khugepaged_wait_work() goes back to sleep: khugepaged_should_wakeup() is false.
    (Kernel: sysfs set khugepaged/max_ptes_none 255 with a registered mm: full_scans unchanged.)"""
    world = make_world(enabled="always", shmem_enabled="advise")
    addr = mapped(world, touch=0)
    world.touch(1, addr, HPAGE_PMD_SIZE)
    k = world.collapser.khugepaged
    assert k.passes == 1 and k.pages_collapsed == 0
    for knob, value in (
        ("khugepaged/max_ptes_none", 255),
        ("khugepaged/max_ptes_swap", 0),
        ("khugepaged/max_ptes_shared", 0),
        ("khugepaged/pages_to_scan", 8192),
        ("khugepaged/defrag", 0),
        ("defrag", "always"),
        ("enabled", "always"),
        ("shmem_enabled", "always"),
        ("hugepages-2048kB/enabled", "always"),
        ("thpsplit/remap_sleep_millisecs", 5),
    ):
        world.sysfs_set(knob, value)
        assert k.passes == 1, knob
    world.sysfs_set("khugepaged/alloc_sleep_millisecs", 60000)
    assert k.passes == 2 and k.pages_collapsed == 1


def test_enabled_write_ends_khugepaged_alloc_sleep(make_world):
    """start_stop_khugepaged() (enabled_store, shmem_enabled_store) calls wake_up_interruptible()
    while an mm is registered, and khugepaged_alloc_sleep() is a plain schedule_timeout() on that
    wait queue: the write ends it; a max_ptes_none write does not."""
    world = make_world(enabled="always", free_huge_pages=0)
    addr = mapped(world, size=2 * HPAGE_PMD_SIZE, touch=0)
    world.touch(1, addr, 2 * HPAGE_PMD_SIZE)
    world.advance(10_000)
    k = world.collapser.khugepaged
    assert results(world)["SCAN_ALLOC_HUGE_PAGE_FAIL"] == 1  # asleep for alloc_sleep_millisecs
    world.sysfs_set("khugepaged/max_ptes_none", 100)
    assert results(world)["SCAN_ALLOC_HUGE_PAGE_FAIL"] == 1
    world.sysfs_set("enabled", "always")
    assert results(world)["SCAN_ALLOC_HUGE_PAGE_FAIL"] == 2
    assert k.passes == 2


def test_full_scans_counts_wraps_over_every_mm(make_world):
    world = make_world(enabled="always")
    world.file_create("f", HPAGE_PMD_SIZE)
    for pid in (1, 2, 3):
        world.spawn(pid)
        world.mmap(pid, None, HPAGE_PMD_SIZE, "f")
    k = world.collapser.khugepaged
    assert k.order == [1, 2, 3]
    # Only the first registration woke khugepaged: that pass saw pid 1 alone, then wrapped.
    assert k.full_scans == 1 and results(world) == {"SCAN_EXCEED_NONE_PTE": 1}
    world.advance(10_000)
    assert k.full_scans == 2 and results(world) == {"SCAN_EXCEED_NONE_PTE": 4}
    world.wait_scans(2)
    assert k.full_scans == 4 and results(world) == {"SCAN_EXCEED_NONE_PTE": 10}
    assert world.now == 30_000


def test_no_mm_no_scan(world):
    k = world.collapser.khugepaged
    world.advance(100_000)
    assert k.passes == 0 and k.full_scans == 0 and world.collapser.next_deadline() is None


def test_alloc_sleep_after_huge_page_allocation_failure(make_world):
    world = make_world(enabled="always", free_huge_pages=0, alloc_sleep_millisecs=60_000)
    world.file_create("f", HPAGE_PMD_SIZE)
    addrs = {}
    for pid in (1, 2):
        world.spawn(pid)
        addrs[pid] = world.mmap(pid, None, HPAGE_PMD_SIZE, "f")
    world.touch(1, addrs[1], HPAGE_PMD_SIZE)
    k = world.collapser.khugepaged
    scanned = sum(results(world).values())
    world.advance(10_000)  # the pass: pid 1 fails to allocate, then khugepaged sleeps
    assert results(world)["SCAN_ALLOC_HUGE_PAGE_FAIL"] == 1
    assert sum(results(world).values()) == scanned + 1
    world.advance(59_999)
    assert sum(results(world).values()) == scanned + 1
    world.advance(1)
    # Same pass, after the sleep: pid 2's range fails too, and the second failure ends the pass.
    assert results(world)["SCAN_ALLOC_HUGE_PAGE_FAIL"] == 2
    assert k.passes == 2 and k.cursor_pid == 2
    assert world.vmstat()["thp_collapse_alloc_failed"] == 2
    # Then the ordinary sleep; with huge pages back, the next pass collapses.
    world.collapser.knobs.free_huge_pages = 1
    world.advance(9_999)
    assert k.passes == 2
    world.advance(1)
    assert k.passes == 3 and k.pages_collapsed == 1 and world.vmstat()["thp_collapse_alloc"] == 1


def test_alloc_failure_sleep_stretches_the_pass(make_world):
    world = make_world(enabled="always", free_huge_pages=0, alloc_sleep_millisecs=1000, scan_sleep_millisecs=5000)
    mapped(world)
    k = world.collapser.khugepaged
    assert k.full_scans == 1
    world.advance(5000)
    assert k.results["SCAN_ALLOC_HUGE_PAGE_FAIL"] == 1 and k.passes == 2
    world.advance(999)
    assert k.full_scans == 1  # still asleep inside the pass
    world.advance(1)
    assert k.full_scans == 2  # the pass went on and wrapped
    world.advance(4999)
    assert k.passes == 2
    world.advance(1)
    assert k.passes == 3 and k.results["SCAN_ALLOC_HUGE_PAGE_FAIL"] == 2


# -- hpage_collapse_scan_file results -----------------------------------------------------------------


@pytest.mark.parametrize("shmem", [False, True])
def test_scan_succeed(make_world, shmem):
    world = make_world(enabled="always", shmem_enabled="always")
    addr = mapped(world, shmem=shmem, touch=0, prot="rw" if shmem else "r")
    if shmem:
        world.file_write("f", 0, HPAGE_PMD_SIZE)  # small pages: a fault would allocate a THP
    world.touch(1, addr, HPAGE_PMD_SIZE)
    assert results(world) == {"SCAN_EXCEED_NONE_PTE": 1}  # the visit at mmap
    world.wait_scans(1)
    assert results(world) == {"SCAN_EXCEED_NONE_PTE": 1, "SCAN_SUCCEED": 1}
    assert world.collapser.khugepaged.pages_collapsed == 1
    key = "ShmemPmdMapped" if shmem else "FilePmdMapped"
    assert world.smaps(1)[0][key] == 2048


def test_scan_exceed_none_pte(make_world):
    world = make_world(enabled="always", max_ptes_none=10)
    addr = mapped(world, touch=HPAGE_PMD_NR - 11)
    world.wait_scans(1)
    assert results(world) == {"SCAN_EXCEED_NONE_PTE": 2}  # the visit at mmap, and this one
    assert world.vmstat()["thp_scan_exceed_none_pte"] == 2
    assert world.collapser.by_name["f"].nrpages == HPAGE_PMD_NR - 11
    # Exactly max_ptes_none holes is allowed; collapse_file reads the holes in.
    world.touch(1, addr, (HPAGE_PMD_NR - 10) * PAGE_SIZE)
    world.wait_scans(1)
    assert results(world)["SCAN_SUCCEED"] == 1
    assert world.collapser.by_name["f"].nrpages == HPAGE_PMD_NR


def test_madv_collapse_ignores_max_ptes_none(make_world):
    world = make_world(max_ptes_none=0)
    mapped(world, touch=1)
    world.collapser.cache.lru_add_drain()
    assert scan(world, khugepaged=True) == R.SCAN_EXCEED_NONE_PTE
    # MADV_COLLAPSE's success is SCAN_PTE_MAPPED_HUGEPAGE: the caller installs the PMD.
    assert scan(world, khugepaged=False) == R.SCAN_PTE_MAPPED_HUGEPAGE
    assert world.collapser.by_name["f"].nr_thps == 1


def shmem_with_swap(world, nswap: int) -> int:
    world.file_create("s", HPAGE_PMD_SIZE, shmem=True)
    world.file_write("s", 0, HPAGE_PMD_SIZE)
    world.spawn(1)
    addr = world.mmap(1, None, HPAGE_PMD_SIZE, "s", prot="rw")
    world.touch(1, addr, nswap * PAGE_SIZE)
    world.madvise(1, addr, nswap * PAGE_SIZE, "pageout")
    assert world.collapser.by_name["s"].nrswap == nswap
    return addr


@pytest.mark.parametrize("nswap, result", [(64, "SCAN_SUCCEED"), (65, "SCAN_EXCEED_SWAP_PTE")])
def test_scan_exceed_swap_pte_shmem(make_world, nswap, result):
    world = make_world(shmem_enabled="advise")
    addr = shmem_with_swap(world, nswap)  # not eligible without VM_HUGEPAGE: not registered
    world.madvise(1, addr, HPAGE_PMD_SIZE, "hugepage")  # 6.18: the first one registers nothing
    assert results(world) == {}
    world.madvise(1, addr, HPAGE_PMD_SIZE, "hugepage")  # the mm enters; khugepaged wakes
    assert results(world) == {result: 1}
    f = world.collapser.by_name["s"]
    vm = world.vmstat()
    if result == "SCAN_SUCCEED":
        assert vm["pswpin"] == 64 and f.nrswap == 0 and f.nr_thps == 1 and vm["thpsplit_nr_swap_entries"] == 0
        assert vm["thp_scan_exceed_swap_pte"] == 0
    else:
        assert vm["thp_scan_exceed_swap_pte"] == 1 and vm["pswpin"] == 0 and f.nrswap == 65
        assert vm["thp_collapse_alloc"] == 0


def test_madv_collapse_ignores_max_ptes_swap(make_world):
    world = make_world(max_ptes_swap=0)
    shmem_with_swap(world, 3)
    world.collapser.cache.lru_add_drain()
    assert scan(world, "s") == R.SCAN_EXCEED_SWAP_PTE
    assert scan(world, "s", khugepaged=False) == R.SCAN_PTE_MAPPED_HUGEPAGE
    assert world.vmstat()["pswpin"] == 3 and world.collapser.by_name["s"].nr_thps == 1


def test_scan_pte_mapped_hugepage(make_world):
    world = make_world(shmem_enabled="always")
    addr = mapped(world, "s", shmem=True, touch=1, prot="rw")  # the fault allocates the THP
    assert world.smaps(1)[0]["ShmemPmdMapped"] == 2048 and world.vmstat()["thp_file_alloc"] == 1
    world.wait_scans(1)
    # per-pmd: khugepaged leaves the PTE-mapped case to the remapper; nothing was collapsed.
    assert results(world) == {"SCAN_EXCEED_NONE_PTE": 1, "SCAN_PTE_MAPPED_HUGEPAGE": 1}
    assert world.collapser.khugepaged.pages_collapsed == 0
    assert scan(world, "s", addr=addr) == R.SCAN_PTE_MAPPED_HUGEPAGE
    assert scan(world, "s", addr=addr, khugepaged=False) == R.SCAN_PTE_MAPPED_HUGEPAGE
    assert world.vmstat()["thp_collapse_alloc"] == 0


def test_lockless_policy_counts_an_already_pmd_mapped_thp_as_collapsed(make_world):
    # 6.6+: SCAN_PTE_MAPPED_HUGEPAGE goes to collapse_pte_mapped_thp at once; SCAN_PMD_MAPPED
    # becomes SCAN_SUCCEED, and pages_collapsed counts it.
    world = make_world(shmem_enabled="always", retry_policy="lockless")
    mapped(world, "s", shmem=True, touch=1, prot="rw")
    k = world.collapser.khugepaged
    before = k.pages_collapsed
    world.wait_scans(1)
    assert k.pages_collapsed == before + 1
    # hpage_collapse_scan_file's own results:
    assert results(world) == {"SCAN_EXCEED_NONE_PTE": 1, "SCAN_PTE_MAPPED_HUGEPAGE": 1}
    assert world.vmstat()["thp_collapse_alloc"] == 0


def test_scan_page_compound_only_for_a_misaligned_start(make_world):
    # Every THP here is PMD-order at a 512-aligned index and khugepaged/MADV_COLLAPSE only scan
    # aligned ranges, so SCAN_PAGE_COMPOUND (the kernel's mTHP case) needs a misaligned call.
    world = make_world(shmem_enabled="always")
    mapped(world, "s", size=2 * HPAGE_PMD_SIZE, shmem=True, touch=1, prot="rw")
    assert scan(world, "s", start=256) == R.SCAN_PAGE_COMPOUND
    assert scan(world, "s", start=0) == R.SCAN_PTE_MAPPED_HUGEPAGE


@pytest.mark.parametrize("shmem", [False, True])
def test_scan_page_count_for_a_gup_pin(make_world, shmem):
    world = make_world(enabled="always", shmem_enabled="always")
    addr = mapped(world, shmem=shmem, small=shmem)
    world.pin(1, addr + 100 * PAGE_SIZE)
    world.wait_scans(1)
    assert results(world) == {"SCAN_EXCEED_NONE_PTE": 1, "SCAN_PAGE_COUNT": 1}
    assert world.vmstat()["thp_collapse_alloc"] == 0  # the scan stops before allocating
    assert world.collapser.by_name["f"].nr_thps == 0


@pytest.mark.parametrize("shmem", [False, True])
def test_scan_page_lru_for_a_page_still_in_the_lru_batch(make_world, shmem):
    world = make_world(enabled="always", shmem_enabled="always")
    addr = mapped(world, shmem=shmem, touch=14, small=shmem)  # fewer than the 15 of a folio_batch
    pfn = cache(world)[0]
    assert not world.collapser.mem.flags[pfn] & PG_LRU
    assert scan(world, addr=addr) == R.SCAN_PAGE_LRU
    # khugepaged's own pass drains the batch first, so it collapses.
    world.wait_scans(1)
    assert results(world)["SCAN_SUCCEED"] == 1


def test_a_full_lru_batch_reaches_the_lru(make_world):
    world = make_world(enabled="always", max_ptes_none=511)
    addr = mapped(world, touch=15)
    assert all(world.collapser.mem.flags[p] & PG_LRU for p in cache(world).values())
    assert scan(world, addr=addr) == R.SCAN_SUCCEED


@pytest.mark.parametrize("shmem", [False, True])
def test_scan_page_lock(make_world, shmem):
    world = make_world(enabled="always")
    addr = mapped(world, shmem=shmem, touch=HPAGE_PMD_NR)
    c = world.collapser
    c.cache.lru_add_drain()
    pfn = cache(world)[300]
    world._checking = False  # the invariant checker rightly objects to a page left locked
    assert c.cache.trylock(pfn)
    try:
        assert scan(world, addr=addr) == R.SCAN_PAGE_LOCK
    finally:
        c.cache.unlock(pfn)
        world._checking = True
    world.check()
    # The pages locked before the locked one were unlocked and put back.
    assert not any(c.mem.flags[p] & PG_LOCKED for p in cache(world).values())
    assert world.vmstat()["thp_collapse_alloc"] == 1 and c.knobs.free_huge_pages == 1024
    c.cache.lru_add_drain()
    assert scan(world, addr=addr) == R.SCAN_SUCCEED


def test_scan_fail_dirty_page_starts_writeback_then_collapses(make_world):
    world = make_world(enabled="always", writeback_millisecs=100)
    world.file_create("f", HPAGE_PMD_SIZE)
    world.file_write("f", 0, HPAGE_PMD_SIZE)
    world.spawn(1)
    addr = world.mmap(1, None, HPAGE_PMD_SIZE, "f")  # the visit at mmap finds the dirty pages
    assert results(world) == {"SCAN_FAIL": 1}
    mem = world.collapser.mem
    pages = list(cache(world).values())
    # filemap_flush: the whole file went under writeback, not just the first dirty page.
    assert all(mem.flags[p] & (PG_DIRTY | PG_WRITEBACK) == PG_WRITEBACK for p in pages)
    assert world.collapser.by_name["f"].nr_thps == 0 and world.vmstat()["thp_collapse_alloc"] == 1
    assert world.collapser.knobs.free_huge_pages == 1024  # the new page went back
    world.touch(1, addr, HPAGE_PMD_SIZE)
    world.wait_scans(1)
    assert results(world) == {"SCAN_FAIL": 1, "SCAN_SUCCEED": 1}


def test_scan_fail_page_under_writeback(make_world):
    world = make_world(enabled="always", writeback_millisecs=1000)
    addr = mapped(world)
    world.file_write("f", 0, PAGE_SIZE)
    world.file_sync("f")
    world.file_write("f", PAGE_SIZE, PAGE_SIZE)
    world.collapser.cache.lru_add_drain()
    mem = world.collapser.mem
    assert scan(world, addr=addr) == R.SCAN_FAIL
    # Page 0 stopped it before page 1: only a dirty page triggers filemap_flush.
    assert mem.flags[cache(world)[0]] & (PG_DIRTY | PG_WRITEBACK) == PG_WRITEBACK
    assert mem.flags[cache(world)[1]] & (PG_DIRTY | PG_WRITEBACK) == PG_DIRTY
    world.file_sync("f")
    world.advance(1000)
    world.collapser.cache.lru_add_drain()
    assert scan(world, addr=addr) == R.SCAN_SUCCEED


def test_scan_fail_file_open_for_write(make_world):
    world = make_world(enabled="always")
    addr = mapped(world, prot="rw")  # a shared writable mapping: i_writecount 1
    assert world.collapser.by_name["f"].writecount == 1
    world.advance(60_000)
    # khugepaged_enter_vma refuses the VMA (file_thp_enabled): the mm is not even registered.
    assert results(world) == {} and world.collapser.khugepaged.order == []
    world.collapser.cache.lru_add_drain()
    assert scan(world, addr=addr) == R.SCAN_FAIL  # collapse_file's own check after locking
    assert world.collapser.by_name["f"].nr_thps == 0
    assert world.collapser.knobs.free_huge_pages == 1024


def test_shmem_collapses_dirty_pages_under_a_writable_mapping(make_world):
    # The SCAN_FAIL cases above are regular-file rules: shmem is always dirty and writable.
    world = make_world(shmem_enabled="always")
    addr = mapped(world, "s", shmem=True, prot="rw", touch=HPAGE_PMD_NR, write=True, small=True)
    assert world.collapser.by_name["s"].writecount == 0  # shmem does not count i_writecount here
    world.collapser.cache.lru_add_drain()
    assert scan(world, "s", addr=addr) == R.SCAN_SUCCEED
    assert world.smaps(1)[0]["ShmemPmdMapped"] == 2048
    assert world.vmstat()["pswpout"] == 0


def test_scan_fail_regular_file_shorter_than_the_range(make_world):
    # Readahead stops at EOF, so filemap_lock_folio finds no page to read in: SCAN_FAIL.
    world = make_world(enabled="always")
    world.file_create("f", HPAGE_PMD_SIZE - PAGE_SIZE)
    world.spawn(1)
    addr = world.mmap(1, None, HPAGE_PMD_SIZE, "f")
    assert world.touch(1, addr, HPAGE_PMD_SIZE - PAGE_SIZE) == {"major": HPAGE_PMD_NR - 1}
    world.wait_scans(1)
    assert results(world) == {"SCAN_EXCEED_NONE_PTE": 1, "SCAN_FAIL": 1}
    assert world.collapser.by_name["f"].nrpages == HPAGE_PMD_NR - 1
    assert world.collapser.knobs.free_huge_pages == 1024


def test_scan_truncated_shmem_range_with_no_page(make_world):
    world = make_world(shmem_enabled="always", max_ptes_none=511)
    addr = mapped(world, "s", size=2 * HPAGE_PMD_SIZE, shmem=True, touch=0, prot="rw")
    assert scan(world, "s", start=HPAGE_PMD_NR, khugepaged=True) == R.SCAN_EXCEED_NONE_PTE
    assert scan(world, "s", start=HPAGE_PMD_NR, khugepaged=False) == R.SCAN_TRUNCATED
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "collapse") == "EINVAL"
    assert world.collapser.khugepaged.results["SCAN_TRUNCATED"] == 2
    assert world.collapser.by_name["s"].nrpages == 0 and world.collapser.knobs.free_huge_pages == 1024


@pytest.mark.parametrize("shmem", [False, True])
def test_scan_alloc_huge_page_fail(make_world, shmem):
    world = make_world(enabled="always", shmem_enabled="always", free_huge_pages=0)
    addr = mapped(world, shmem=shmem, small=shmem)
    world.collapser.cache.lru_add_drain()
    assert scan(world, addr=addr) == R.SCAN_ALLOC_HUGE_PAGE_FAIL
    assert world.vmstat()["thp_collapse_alloc_failed"] == 1
    assert scan(world, addr=addr, khugepaged=False) == R.SCAN_ALLOC_HUGE_PAGE_FAIL
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "collapse") == "ENOMEM"


def test_scan_del_page_lru_needs_a_direct_collapse_file(make_world):
    # hpage_collapse_scan_file checks PG_LRU itself and nothing yields between that and
    # collapse_file's isolation, so khugepaged never sees SCAN_DEL_PAGE_LRU; call collapse_file
    # directly.
    world = make_world(shmem_enabled="always")
    world.file_create("s", HPAGE_PMD_SIZE, shmem=True)
    world.file_write("s", 0, 3 * PAGE_SIZE)
    c = world.collapser
    f = c.by_name["s"]
    assert not c.mem.flags[f.get(0)] & PG_LRU
    got = world.start(c, c.khugepaged.collapse_file(f, 0, CollapseControl(True, 0, 0))).result()
    assert got == R.SCAN_DEL_PAGE_LRU
    assert f.nrpages == 3 and f.nr_thps == 0 and c.knobs.free_huge_pages == 1024


def _start_collapse_and_hold_the_unmap(world, name, addr):
    """Start hpage_collapse_scan_file; stop when collapse_file has asked the remapper to unmap its pages."""
    c = world.collapser
    pending = Pending()
    scan = c.khugepaged.hpage_collapse_scan_file(c.by_name[name], 0, CollapseControl(True, 1, addr))
    c.spawn(scan, pending.set)
    assert [type(msg) for msg in c.outbox] == [m.UnmapMapping]
    return pending


def test_scan_page_filled_when_a_fault_fills_a_shmem_hole(make_world):
    world = make_world()
    world.file_create("s", HPAGE_PMD_SIZE, shmem=True)
    world.file_write("s", 0, 10 * PAGE_SIZE)
    world.spawn(1)
    addr = world.mmap(1, None, HPAGE_PMD_SIZE, "s", prot="rw")
    world.touch(1, addr, 10 * PAGE_SIZE)
    c, r = world.collapser, world.remapper
    c.cache.lru_add_drain()
    pending = _start_collapse_and_hold_the_unmap(world, "s", addr)
    fault = Pending()
    r.spawn(r.fault(1, addr + 100 * PAGE_SIZE), fault.set)
    c.deliver(r.outbox.popleft())  # the fault's lookup reaches the page cache first
    assert cache(world, "s")[100] > 0
    world.settle()
    assert pending.result() == R.SCAN_PAGE_FILLED and fault.result() == {"result": "minor"}
    f = c.by_name["s"]
    assert f.nr_thps == 0 and f.nrpages == 11 and c.knobs.free_huge_pages == 1024
    # try_to_unmap is not undone: the collapse's pages refault.
    assert world.smaps(1)[0]["Rss"] == 4
    assert world.touch(1, addr, 10 * PAGE_SIZE) == {"minor": 10}


def test_scan_fail_when_the_file_is_opened_for_write_during_the_unmap(make_world):
    world = make_world(enabled="always")
    addr = mapped(world)
    c, r = world.collapser, world.remapper
    c.cache.lru_add_drain()
    world.spawn(2)
    pending = _start_collapse_and_hold_the_unmap(world, "f", addr)
    mmap = Pending()
    r.spawn(r.mmap(2, None, PAGE_SIZE, "f", 0, "rw", True), mmap.set)
    world.settle()
    assert mmap.done and c.by_name["f"].writecount == 1
    assert pending.result() == R.SCAN_FAIL
    assert c.by_name["f"].nr_thps == 0 and c.knobs.free_huge_pages == 1024


def test_scan_page_count_when_pinned_during_the_unmap(make_world):
    world = make_world(enabled="always")
    addr = mapped(world)
    c, r = world.collapser, world.remapper
    c.cache.lru_add_drain()
    pending = _start_collapse_and_hold_the_unmap(world, "f", addr)
    pin = Pending()
    r.spawn(r.pin(1, addr + 5 * PAGE_SIZE), pin.set)  # GUP-fast on the still-present PTE
    world.settle()
    assert pin.done and pending.result() == R.SCAN_PAGE_COUNT
    pfn = cache(world)[5]
    assert c.mem.pins == {pfn: 1} and c.mem.ref[pfn] == 2  # cache + pin; the PTE was unmapped
    assert c.by_name["f"].nr_thps == 0 and c.knobs.free_huge_pages == 1024


# -- rollback ----------------------------------------------------------------------------------------


def _snapshot(c, name):
    mem = c.mem
    f = c.by_name[name]
    n = len(mem.flags)
    return {
        "slots": {k: array("q", v) for k, v in f.chunks.items()},
        "counters": (f.nrpages, f.nrswap, f.nr_thps, f.size, f.writecount),
        "ref": array("l", mem.ref[:n]),
        "mapcount": array("l", mem.mapcount[:n]),
        "flags": array("H", mem.flags[:n]),
        "index": array("q", mem.index[:n]),
        "ino": array("l", mem.ino[:n]),
        "entire": dict(mem.entire),
        "pins": dict(mem.pins),
        "free_huge_pages": c.knobs.free_huge_pages,
        "nr_allocated": mem.nr_allocated,
        "n": n,
    }


@pytest.mark.parametrize("shmem", [False, True])
def test_rollback_leaves_the_page_cache_exactly_as_before(make_world, shmem):
    world = make_world(enabled="always", shmem_enabled="never")
    name = "s" if shmem else "f"
    world.file_create(name, HPAGE_PMD_SIZE, shmem=shmem)
    world.spawn(1)
    addr = world.mmap(1, None, HPAGE_PMD_SIZE, name)
    # shmem keeps holes (collapse_file would zero-fill them); a regular file is read in whole.
    world.touch(1, addr, (200 if shmem else HPAGE_PMD_NR) * PAGE_SIZE)
    world.pin(1, addr + 150 * PAGE_SIZE)
    world.madvise(1, addr, HPAGE_PMD_SIZE, "dontneed")  # unmapped, so try_to_unmap has nothing to undo
    c = world.collapser
    c.cache.lru_add_drain()
    before = _snapshot(c, name)
    f = c.by_name[name]
    got = world.start(c, c.khugepaged.collapse_file(f, 0, CollapseControl(True, 1, addr))).result()
    assert got == R.SCAN_PAGE_COUNT
    assert world.vmstat()["thp_collapse_alloc"] == 1
    c.cache.lru_add_drain()  # folio_putback_lru goes through the per-CPU batch, as the kernel's
    after = _snapshot(c, name)
    n = before["n"]
    # A block allocated for the new page may have grown mem_map; it must be all free now.
    assert not any(after["flags"][n:]) and not any(after["ref"][n:])
    for key in ("ref", "mapcount", "flags", "index", "ino"):
        after[key] = after[key][:n]
    after["n"] = n
    assert after == before


# -- the success path ---------------------------------------------------------------------------------


def test_success_regular_file(make_world):
    world = make_world(enabled="always")
    addr = mapped(world, touch=300)  # collapse_file reads in the other 212
    c = world.collapser
    old = list(cache(world).values())
    world.wait_scans(1)
    f = c.by_name["f"]
    head = f.get(0)
    mem = c.mem
    assert mem.flags[head] & (PG_HEAD | PG_UPTODATE) == PG_HEAD | PG_UPTODATE
    assert not mem.flags[head] & (PG_SWAPBACKED | PG_DIRTY | PG_LOCKED)
    assert all(f.get(i) == head + i for i in range(HPAGE_PMD_NR))
    assert not any(mem.allocated(p) for p in old)
    assert mem.nr_allocated == HPAGE_PMD_NR
    assert f.nrpages == HPAGE_PMD_NR and f.nr_thps == 1
    assert mem.ref[head] == HPAGE_PMD_NR + 1 and mem.entire == {head: 1}  # cache + the PMD
    vm = world.vmstat()
    assert vm["thp_collapse_alloc"] == 1 and vm["nr_file_hugepages"] == 1 and vm["nr_file_pmdmapped"] == 1
    assert vm["thp_file_mapped"] == 1 and vm["thp_file_alloc"] == 0
    assert c.khugepaged.pages_collapsed == 1 and c.knobs.free_huge_pages == 1023
    info = world.meminfo()
    assert info["FileHugePages"] == 2048 and info["FilePmdMapped"] == 2048 and info["ShmemHugePages"] == 0
    s = world.smaps(1)[0]
    assert s["FilePmdMapped"] == 2048 and s["Rss"] == 2048 and s["ShmemPmdMapped"] == 0
    assert world.fault(1, addr + 400 * PAGE_SIZE) == "hit"


def test_success_without_install_pmd_maps_at_next_fault(make_world):
    world = make_world(enabled="always", install_pmd=0)
    addr = mapped(world)
    world.wait_scans(1)
    assert world.meminfo()["FileHugePages"] == 2048
    assert world.smaps(1)[0]["FilePmdMapped"] == 0 and world.smaps(1)[0]["Rss"] == 0
    assert world.vmstat()["thp_file_mapped"] == 0
    assert world.fault(1, addr + 7 * PAGE_SIZE) == "pmd"
    assert world.smaps(1)[0]["FilePmdMapped"] == 2048 and world.vmstat()["thp_file_mapped"] == 1


def test_success_shmem_zero_fills_holes(make_world):
    world = make_world(shmem_enabled="always")
    world.file_create("s", HPAGE_PMD_SIZE, shmem=True)
    world.spawn(1)
    addr = world.mmap(1, None, HPAGE_PMD_SIZE, "s", prot="rw")
    world.file_write("s", 0, 100 * PAGE_SIZE)
    world.touch(1, addr, 50 * PAGE_SIZE)
    c = world.collapser
    f = c.by_name["s"]
    old = list(cache(world, "s").values())
    assert f.nrpages == 100 and world.meminfo()["Shmem"] == 400
    world.wait_scans(1)
    assert results(world)["SCAN_SUCCEED"] == 1
    head = f.get(0)
    mem = c.mem
    flags = PG_HEAD | PG_UPTODATE | PG_SWAPBACKED | PG_DIRTY
    assert mem.flags[head] & flags == flags
    assert f.nrpages == HPAGE_PMD_NR and f.nr_thps == 1  # 412 holes filled
    assert not any(mem.allocated(p) for p in old) and mem.nr_allocated == HPAGE_PMD_NR
    info = world.meminfo()
    assert info["Shmem"] == 2048 and info["ShmemHugePages"] == 2048 and info["ShmemPmdMapped"] == 2048
    assert info["FileHugePages"] == 0
    vm = world.vmstat()
    assert vm["nr_shmem_hugepages"] == 1 and vm["thp_collapse_alloc"] == 1 and vm["thp_file_mapped"] == 1
    assert world.smaps(1)[0]["ShmemPmdMapped"] == 2048
    assert c.khugepaged.pages_collapsed == 1


def test_success_retracts_every_mapping(make_world):
    world = make_world(enabled="always")
    mapped(world)
    world.spawn(2)
    a2 = world.mmap(2, None, HPAGE_PMD_SIZE, "f")
    world.touch(2, a2, 10 * PAGE_SIZE)
    world.wait_scans(1)
    head = world.collapser.by_name["f"].get(0)
    assert world.collapser.mem.entire == {head: 2}
    assert world.smaps(1)[0]["FilePmdMapped"] == 2048 and world.smaps(2)[0]["FilePmdMapped"] == 2048
    assert world.vmstat()["thp_file_mapped"] == 2 and world.meminfo()["FilePmdMapped"] == 2048


@pytest.mark.parametrize("install_pmd", [0, 1])
def test_madv_collapse_collapses_and_maps_in_the_caller(make_world, install_pmd):
    world = make_world(max_ptes_none=0, install_pmd=install_pmd)  # max_ptes_none: ignored
    addr = mapped(world, touch=3)
    world.spawn(2)
    a2 = world.mmap(2, None, HPAGE_PMD_SIZE, "f")
    world.touch(2, a2, 3 * PAGE_SIZE)
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "collapse") == 0
    f = world.collapser.by_name["f"]
    assert f.nr_thps == 1 and f.nrpages == HPAGE_PMD_NR
    assert world.smaps(1)[0]["FilePmdMapped"] == 2048
    # Other mappings are retracted; thpsplit's install_pmd also maps them at once.
    assert world.smaps(2)[0]["FilePmdMapped"] == world.smaps(2)[0]["Rss"] == 2048 * install_pmd
    vm = world.vmstat()
    assert vm["thp_collapse_alloc"] == 1 and vm["thp_file_mapped"] == 1 + install_pmd
    assert world.collapser.khugepaged.pages_collapsed == 0  # khugepaged's counter only
    assert world.madvise(1, addr, HPAGE_PMD_SIZE, "collapse") == 0  # already PMD-mapped
    assert world.vmstat()["thp_collapse_alloc"] == 1


def test_khugepaged_skips_shmem_when_shmem_enabled_never(make_world):
    world = make_world(shmem_enabled="never")
    world.file_create("s", HPAGE_PMD_SIZE, shmem=True)
    world.file_write("s", 0, HPAGE_PMD_SIZE)
    world.spawn(1)
    world.mmap(1, None, HPAGE_PMD_SIZE, "s")
    world.madvise(1, world.smaps(1)[0]["start"], HPAGE_PMD_SIZE, "hugepage")
    world.advance(60_000)
    assert results(world) == {} and world.collapser.by_name["s"].nr_thps == 0
    assert world.collapser.khugepaged.order == []  # khugepaged_enter_vma: shmem_enabled refuses


# -- shmem THP allocation at fault ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy, size, advise, huge",
    [
        ("always", HPAGE_PMD_SIZE, False, True),
        ("force", HPAGE_PMD_SIZE, False, True),
        ("within_size", HPAGE_PMD_SIZE, False, True),
        ("within_size", HPAGE_PMD_SIZE - PAGE_SIZE, False, False),
        ("advise", HPAGE_PMD_SIZE, False, False),
        ("advise", HPAGE_PMD_SIZE, True, True),
        ("never", HPAGE_PMD_SIZE, True, False),
        ("deny", HPAGE_PMD_SIZE, True, False),
    ],
)
def test_shmem_fault_allocates_thp_per_shmem_enabled(make_world, policy, size, advise, huge):
    world = make_world(shmem_enabled=policy)
    world.file_create("s", size, shmem=True)
    world.spawn(1)
    addr = world.mmap(1, None, HPAGE_PMD_SIZE, "s", prot="rw")
    if advise:
        world.madvise(1, addr, HPAGE_PMD_SIZE, "hugepage")
    got = world.fault(1, addr + 3 * PAGE_SIZE)
    f = world.collapser.by_name["s"]
    vm = world.vmstat()
    assert vm["thp_file_fallback"] == 0
    if huge:
        assert got == "pmd" and vm["thp_file_alloc"] == 1
        assert f.nr_thps == 1 and f.nrpages == HPAGE_PMD_NR
        assert world.meminfo()["ShmemHugePages"] == 2048 and world.smaps(1)[0]["ShmemPmdMapped"] == 2048
        assert world.collapser.knobs.free_huge_pages == 1023
    else:
        assert got == "minor" and vm["thp_file_alloc"] == 0
        assert f.nr_thps == 0 and f.nrpages == 1 and sorted(cache(world, "s")) == [3]


def test_shmem_fault_thp_only_where_the_pmd_can_map_it(make_world):
    world = make_world(shmem_enabled="always", max_ptes_none=0)  # no khugepaged collapse meanwhile
    world.file_create("s", 2 * HPAGE_PMD_SIZE, shmem=True)
    world.spawn(1)
    # Offset by one page from PMD alignment: no PMD can map the file's 2 MiB chunks.
    addr = world.mmap(1, 0x40000000 + PAGE_SIZE, HPAGE_PMD_SIZE, "s", prot="rw")
    assert world.fault(1, addr) == "minor"
    assert world.vmstat()["thp_file_alloc"] == 0
    # An aligned mapping of a chunk that already holds a small page gets no THP either.
    a2 = world.mmap(1, None, 2 * HPAGE_PMD_SIZE, "s", prot="rw")
    assert world.fault(1, a2 + 5 * PAGE_SIZE) == "minor"
    assert world.fault(1, a2 + HPAGE_PMD_SIZE) == "pmd"
    assert world.vmstat()["thp_file_alloc"] == 1


def test_shmem_fault_falls_back_without_free_huge_pages(make_world):
    world = make_world(shmem_enabled="always", free_huge_pages=0)
    world.file_create("s", HPAGE_PMD_SIZE, shmem=True)
    world.spawn(1)
    addr = world.mmap(1, None, HPAGE_PMD_SIZE, "s", prot="rw")
    assert world.touch(1, addr, 3 * PAGE_SIZE) == {"minor": 3}
    vm = world.vmstat()
    # Each fault into a still-empty chunk tries; later ones see the small page and do not.
    assert vm["thp_file_fallback"] == 1 and vm["thp_file_alloc"] == 0
    assert world.collapser.by_name["s"].nrpages == 3 and world.meminfo()["ShmemHugePages"] == 0


def test_shmem_fault_thp_under_fragmentation_needs_defrag(make_world):
    world = make_world(shmem_enabled="always", fragmentation=100, defrag="never")
    world.file_create("s", 2 * HPAGE_PMD_SIZE, shmem=True)
    world.spawn(1)
    addr = world.mmap(1, None, 2 * HPAGE_PMD_SIZE, "s", prot="rw")
    assert world.fault(1, addr) == "minor"
    world.sysfs_set("defrag", "always")
    assert world.fault(1, addr + HPAGE_PMD_SIZE) == "pmd"
    vm = world.vmstat()
    assert vm["thp_file_fallback"] == 1 and vm["thp_file_alloc"] == 1
