"""The collapser's page cache: file operations, writeback, truncation, reclaim, huge allocation."""

from __future__ import annotations

import pytest

from collapsed.pagecache import (
    PG_DIRTY,
    PG_HEAD,
    PG_SWAPBACKED,
    PG_UPTODATE,
    PG_WRITEBACK,
)
from shared.errors import UserError
from shared.units import HPAGE_PMD_NR, HPAGE_PMD_SIZE, PAGE_SIZE

MiB = 1 << 20


def slots(world, name: str) -> dict[int, int]:
    return dict(world.collapser.by_name[name].entries())


def flags_of(world, name: str, index: int) -> int:
    c = world.collapser
    return c.mem.flags[c.mem.head(c.by_name[name].get(index))]


def shmem_thp(world, name: str = "s", size: int = HPAGE_PMD_SIZE, pid: int = 1) -> tuple[int, int]:
    """A shmem file whose first 2 MiB is one THP allocated at fault, PMD-mapped in ``pid``."""
    world.sysfs_set("shmem_enabled", "always")
    world.file_create(name, size, shmem=True)
    world.spawn(pid)
    addr = world.mmap(pid, None, size, name, prot="rw")
    assert world.fault(pid, addr) == "pmd"
    head = world.collapser.by_name[name].get(0)
    assert world.collapser.mem.flags[head] & PG_HEAD
    return addr, head


# -- file_create ----------------------------------------------------------------------------------


def test_file_create_returns_stat_and_tells_remapper(world):
    st = world.file_create("f", 5 * PAGE_SIZE + 1)
    assert st == {
        "name": "f", "ino": 1, "size": 5 * PAGE_SIZE + 1, "shmem": False, "fs": "ro-thp", "nrpages": 0,
        "thps": 0, "swap": 0, "dirty": 0, "open_for_write": 0,
    }
    assert world.file_create("g", 0, shmem=True)["ino"] == 2
    assert world.remapper.files.by_name["f"].size == 5 * PAGE_SIZE + 1
    assert world.remapper.files.by_name["g"].shmem
    assert world.collapser.by_name["f"].nr_pages_size == 6


@pytest.mark.parametrize("name", ["", "a/b", "a\0b", "x" * 256])
def test_file_create_bad_name_is_einval(world, name):
    with pytest.raises(UserError) as err:
        world.file_create(name, PAGE_SIZE)
    assert err.value.errno_name == "EINVAL"
    assert not world.collapser.files and not world.remapper.files


def test_file_create_longest_name_is_fine(world):
    assert world.file_create("x" * 255, 0)["name"] == "x" * 255


def test_file_create_duplicate_is_eexist_and_negative_size_einval(world):
    world.file_create("f", PAGE_SIZE)
    with pytest.raises(UserError) as err:
        world.file_create("f", 2 * PAGE_SIZE, shmem=True)
    assert err.value.errno_name == "EEXIST"
    assert world.collapser.by_name["f"].size == PAGE_SIZE and not world.collapser.by_name["f"].shmem
    with pytest.raises(UserError) as err:
        world.file_create("g", -1)
    assert err.value.errno_name == "EINVAL"
    assert list(world.collapser.by_name) == ["f"]


# -- write ------------------------------------------------------------------------------------------


def test_write_dirties_pages_and_extends_size(world):
    world.file_create("f", 0)
    st = world.file_write("f", 3 * PAGE_SIZE + 100, PAGE_SIZE)  # straddles pages 3 and 4
    assert st["size"] == 4 * PAGE_SIZE + 100
    assert st["nrpages"] == 2 and st["dirty"] == 2
    assert sorted(slots(world, "f")) == [3, 4]
    assert world.remapper.files.by_name["f"].size == 4 * PAGE_SIZE + 100
    for i in (3, 4):
        assert flags_of(world, "f", i) & (PG_DIRTY | PG_UPTODATE) == PG_DIRTY | PG_UPTODATE
        assert world.collapser.mem.ref[slots(world, "f")[i]] == 1
    assert world.meminfo()["Cached"] == 8


def test_write_inside_size_keeps_size_and_redirties_clean_page(world):
    world.file_create("f", 10 * PAGE_SIZE)
    world.spawn(1)
    addr = world.mmap(1, None, 10 * PAGE_SIZE, "f")
    assert world.fault(1, addr + 2 * PAGE_SIZE) == "major"  # read in: clean
    assert not flags_of(world, "f", 2) & PG_DIRTY
    pfn = slots(world, "f")[2]
    st = world.file_write("f", 2 * PAGE_SIZE, 10)
    assert st["size"] == 10 * PAGE_SIZE and st["nrpages"] == 1 and st["dirty"] == 1
    assert slots(world, "f")[2] == pfn  # the cached page is written, not replaced
    assert flags_of(world, "f", 2) & PG_DIRTY


def test_write_zero_length_and_errors(world):
    world.file_create("f", PAGE_SIZE)
    assert world.file_write("f", 8 * PAGE_SIZE, 0)["size"] == PAGE_SIZE
    assert not slots(world, "f")
    for offset, length in ((-1, 1), (0, -1)):
        with pytest.raises(UserError) as err:
            world.file_write("f", offset, length)
        assert err.value.errno_name == "EINVAL"
    with pytest.raises(UserError) as err:
        world.file_write("nope", 0, 1)
    assert err.value.errno_name == "ENOENT"


# -- sync and the writeback window -----------------------------------------------------------------


def test_sync_holds_pages_under_writeback_for_writeback_millisecs(make_world):
    world = make_world(writeback_millisecs=250)
    world.file_create("f", 0)
    world.file_write("f", 0, 3 * PAGE_SIZE)
    world.advance(1000)
    st = world.file_sync("f")
    assert st["dirty"] == 0
    mem = world.collapser.mem
    pfns = list(slots(world, "f").values())
    for pfn in pfns:
        assert mem.flags[pfn] & (PG_DIRTY | PG_WRITEBACK) == PG_WRITEBACK
        assert mem.ref[pfn] == 1  # folio_start_writeback takes no reference
    world.advance(249)
    assert all(mem.flags[p] & PG_WRITEBACK for p in pfns)
    world.advance(1)
    for pfn in pfns:
        assert not mem.flags[pfn] & (PG_DIRTY | PG_WRITEBACK)
    # A second sync of a clean file starts nothing.
    world.file_sync("f")
    assert not any(mem.flags[p] & PG_WRITEBACK for p in pfns)
    assert world.collapser.next_deadline() is None or world.collapser.next_deadline() > world.now


def test_sync_leaves_shmem_dirty(world):
    world.file_create("s", 0, shmem=True)
    world.file_write("s", 0, 2 * PAGE_SIZE)
    assert world.file_sync("s")["dirty"] == 2
    for i in (0, 1):
        f = flags_of(world, "s", i)
        assert f & PG_DIRTY and f & PG_SWAPBACKED and not f & PG_WRITEBACK


def test_page_redirtied_during_writeback_stays_dirty(world):
    world.file_create("f", 0)
    world.file_write("f", 0, PAGE_SIZE)
    world.file_sync("f")
    world.file_write("f", 0, PAGE_SIZE)
    assert flags_of(world, "f", 0) & (PG_DIRTY | PG_WRITEBACK) == PG_DIRTY | PG_WRITEBACK
    world.advance(world.collapser.knobs.writeback_millisecs)
    assert flags_of(world, "f", 0) & (PG_DIRTY | PG_WRITEBACK) == PG_DIRTY
    assert world.collapser.mem.ref[slots(world, "f")[0]] == 1


# -- truncate and punch ------------------------------------------------------------------------------


def test_truncate_drops_pages_past_eof(world):
    world.file_create("f", 0)
    world.file_write("f", 0, 8 * PAGE_SIZE)
    allocated = world.collapser.mem.nr_allocated
    st = world.file_truncate("f", 3 * PAGE_SIZE + 1)  # page 3 still holds a byte
    assert st["size"] == 3 * PAGE_SIZE + 1 and st["nrpages"] == 4
    assert sorted(slots(world, "f")) == [0, 1, 2, 3]
    assert world.collapser.mem.nr_allocated == allocated - 4
    assert world.remapper.files.by_name["f"].size == 3 * PAGE_SIZE + 1


def test_truncate_up_adds_no_pages(world):
    world.file_create("f", 0)
    world.file_write("f", 0, PAGE_SIZE)
    st = world.file_truncate("f", 4 * MiB)
    assert st["size"] == 4 * MiB and st["nrpages"] == 1
    with pytest.raises(UserError) as err:
        world.file_truncate("f", -1)
    assert err.value.errno_name == "EINVAL"


def test_truncate_unmaps_mapped_pages_first(world):
    world.file_create("f", 16 * PAGE_SIZE)
    world.spawn(1)
    world.spawn(2)
    a1 = world.mmap(1, None, 16 * PAGE_SIZE, "f")
    a2 = world.mmap(2, None, 16 * PAGE_SIZE, "f", prot="rw")
    world.touch(1, a1, 16 * PAGE_SIZE)
    world.touch(2, a2, 16 * PAGE_SIZE, write=True)
    pfn = slots(world, "f")[10]
    assert world.collapser.mem.mapcount[pfn] == 2
    world.file_truncate("f", 4 * PAGE_SIZE)
    assert sorted(slots(world, "f")) == [0, 1, 2, 3]
    assert not world.collapser.mem.allocated(pfn)
    assert world.smaps(1)[0]["Rss"] == 16 and world.smaps(2)[0]["Rss"] == 16
    assert world.fault(1, a1 + 10 * PAGE_SIZE) == "sigbus"
    assert world.fault(1, a1 + 3 * PAGE_SIZE) == "hit"


def test_truncate_removes_private_cow_copies_too(world):
    world.file_create("f", 4 * PAGE_SIZE)
    world.spawn(1)
    addr = world.mmap(1, None, 4 * PAGE_SIZE, "f", prot="rw", shared=False)
    assert world.fault(1, addr + 3 * PAGE_SIZE, write=True) == "major"
    assert world.smaps(1)[0]["Anonymous"] == 4
    world.file_truncate("f", PAGE_SIZE)
    assert world.smaps(1)[0]["Rss"] == 0
    assert not world.remapper.anon.mapcount


def test_truncate_cutting_a_thp_splits_it(world):
    addr, head = shmem_thp(world, size=HPAGE_PMD_SIZE)
    assert world.meminfo()["ShmemHugePages"] == 2048
    free = world.collapser.knobs.free_huge_pages
    world.file_truncate("s", MiB + 1)
    f = world.collapser.by_name["s"]
    vm = world.vmstat()
    assert vm["thp_split_page"] == 1 and vm["thp_split_page_failed"] == 0
    assert f.nr_thps == 0 and f.nrpages == 257
    assert sorted(slots(world, "s")) == list(range(257))
    mem = world.collapser.mem
    # shmem splits non-uniformly at the page holding the new EOF (try_folio_split): an order-8
    # folio below it, then the two order-0 pages 256 and 257; 257 and up are truncated.
    assert not mem.is_thp(head) and mem.order[head] == 8 and mem.ref[head] == 256
    assert mem.flags[head] & PG_SWAPBACKED
    assert mem.order[head + 256] == 0 and mem.ref[head + 256] == 1
    assert not mem.allocated(head + 300)
    assert world.meminfo()["ShmemHugePages"] == 0 and world.meminfo()["ShmemPmdMapped"] == 0
    # The PMD went with the unmap; the order-8 folio refaults whole (finish_fault).
    assert world.smaps(1)[0]["Rss"] == 0
    assert world.fault(1, addr + 5 * PAGE_SIZE) == "minor"
    assert world.smaps(1)[0]["Rss"] == 1024
    assert world.fault(1, addr + 300 * PAGE_SIZE) == "sigbus"
    # The block is small pages now: it does not go back to the huge pool.
    assert world.collapser.knobs.free_huge_pages == free


def test_truncate_cutting_a_collapsed_file_thp_splits_it(make_world):
    world = make_world(enabled="always")
    world.file_create("f", HPAGE_PMD_SIZE)
    world.spawn(1)
    addr = world.mmap(1, None, HPAGE_PMD_SIZE, "f")
    world.touch(1, addr, HPAGE_PMD_SIZE)
    world.wait_scans(1)
    assert world.smaps(1)[0]["FilePmdMapped"] == 2048
    world.file_truncate("f", MiB)
    f = world.collapser.by_name["f"]
    assert world.vmstat()["thp_split_page"] == 1 and world.vmstat()["thp_split_pmd"] == 1  # unmap cut the PMD
    assert f.nr_thps == 0 and f.nrpages == 256
    assert world.meminfo()["FileHugePages"] == 0 and world.meminfo()["FilePmdMapped"] == 0
    assert world.smaps(1)[0]["Rss"] == 0
    assert world.fault(1, addr + 255 * PAGE_SIZE) == "minor"


def test_truncate_removes_a_whole_thp_past_eof_without_splitting(world):
    world.sysfs_set("shmem_enabled", "always")
    world.file_create("s", 2 * HPAGE_PMD_SIZE, shmem=True)
    world.spawn(1)
    addr = world.mmap(1, None, 2 * HPAGE_PMD_SIZE, "s", prot="rw")
    assert world.touch(1, addr, 2 * HPAGE_PMD_SIZE, stride=HPAGE_PMD_SIZE) == {"pmd": 2}
    free = world.collapser.knobs.free_huge_pages
    world.file_truncate("s", HPAGE_PMD_SIZE)
    assert world.vmstat()["thp_split_page"] == 0
    assert world.collapser.by_name["s"].nr_thps == 1
    assert world.collapser.knobs.free_huge_pages == free + 1
    assert world.smaps(1)[0]["ShmemPmdMapped"] == 2048


def test_truncate_does_not_split_a_pinned_thp(world):
    addr, head = shmem_thp(world)
    world.pin(1, addr + 7 * PAGE_SIZE)
    world.file_truncate("s", MiB)
    vm = world.vmstat()
    assert vm["thp_split_page_failed"] == 1 and vm["thp_split_page"] == 0
    f = world.collapser.by_name["s"]
    assert f.nr_thps == 1 and f.nrpages == HPAGE_PMD_NR
    mem = world.collapser.mem
    assert mem.flags[head] & PG_HEAD and mem.pins == {head: 1}
    assert mem.ref[head] == HPAGE_PMD_NR + 1  # unmapped: the cache and the pin
    assert world.smaps(1)[0]["Rss"] == 0
    world.unpin(1, addr + 7 * PAGE_SIZE)
    assert mem.ref[head] == HPAGE_PMD_NR and not mem.pins


def test_truncate_waits_for_writeback(make_world):
    world = make_world(writeback_millisecs=300)
    world.file_create("f", 0)
    world.file_write("f", 0, 4 * PAGE_SIZE)
    world.file_sync("f")
    c = world.collapser
    pending = world.start(c, c.file_truncate("f", PAGE_SIZE))
    assert not pending.done and world.remapper.files.by_name["f"].size == PAGE_SIZE
    assert sorted(slots(world, "f")) == [0, 1, 2, 3]
    world.advance(299)
    assert not pending.done
    world.advance(1)
    assert pending.result()["nrpages"] == 1 and sorted(slots(world, "f")) == [0]


def test_punch_removes_whole_pages_and_keeps_size(world):
    world.file_create("f", 0)
    world.file_write("f", 0, 8 * PAGE_SIZE)
    # Partial pages at either end are zeroed, not removed: pages 2, 3, 4 go.
    st = world.file_punch("f", 2 * PAGE_SIZE - 1, 3 * PAGE_SIZE + 2)
    assert sorted(slots(world, "f")) == [0, 1, 5, 6, 7]
    assert st["nrpages"] == 5 and st["size"] == 8 * PAGE_SIZE
    assert world.file_punch("f", 5 * PAGE_SIZE + 1, PAGE_SIZE)["nrpages"] == 5
    assert world.file_punch("f", 6 * PAGE_SIZE, 100 * PAGE_SIZE)["nrpages"] == 3
    for offset, length in ((-1, PAGE_SIZE), (0, 0)):
        with pytest.raises(UserError) as err:
            world.file_punch("f", offset, length)
        assert err.value.errno_name == "EINVAL"


def test_punch_drops_shmem_swap_entries(world):
    world.file_create("s", 4 * PAGE_SIZE, shmem=True)
    world.spawn(1)
    addr = world.mmap(1, None, 4 * PAGE_SIZE, "s", prot="rw")
    world.touch(1, addr, 4 * PAGE_SIZE, write=True)
    world.madvise(1, addr, 4 * PAGE_SIZE, "pageout")
    c = world.collapser
    f = c.by_name["s"]
    assert f.nrswap == 4 and c.cache.nr_swap_entries == 4
    world.file_punch("s", PAGE_SIZE, 2 * PAGE_SIZE)
    assert sorted(slots(world, "s")) == [0, 3] and f.nrswap == 2 and c.cache.nr_swap_entries == 2
    assert world.vmstat()["thpsplit_nr_swap_entries"] == 2


def test_punch_inside_a_thp_splits_it_and_keeps_the_rest(world):
    addr, head = shmem_thp(world)
    c = world.collapser
    f = c.by_name["s"]
    world.file_punch("s", 100 * PAGE_SIZE, 100 * PAGE_SIZE)
    assert world.vmstat()["thp_split_page"] == 1
    assert f.nrpages == HPAGE_PMD_NR - 100 and f.nr_thps == 0
    assert f.get(99) == head + 99 and f.get(100) == 0 and f.get(200) == head + 200
    assert not c.mem.allocated(head + 150) and c.mem.allocated(head + 200)


# -- drop_caches ------------------------------------------------------------------------------------


def test_drop_caches_evicts_only_clean_unmapped_unpinned_file_pages(world):
    world.file_create("f", 8 * PAGE_SIZE)
    world.file_create("s", 2 * PAGE_SIZE, shmem=True)
    world.spawn(1)
    addr = world.mmap(1, None, 8 * PAGE_SIZE, "f")
    world.touch(1, addr, 8 * PAGE_SIZE)  # pages 0..7 read in, mapped, clean
    world.madvise(1, addr + 4 * PAGE_SIZE, 4 * PAGE_SIZE, "dontneed")  # 4..7 unmapped
    world.pin(1, addr + 6 * PAGE_SIZE)
    world.madvise(1, addr + 6 * PAGE_SIZE, PAGE_SIZE, "dontneed")  # 6: pinned only
    world.file_write("f", 5 * PAGE_SIZE, 1)  # 5: dirty
    world.file_write("s", 0, 2 * PAGE_SIZE)  # shmem: never dropped
    assert world.drop_caches() == {"dropped_pages": 2}
    assert sorted(slots(world, "f")) == [0, 1, 2, 3, 5, 6]
    assert sorted(slots(world, "s")) == [0, 1]
    # Under writeback is no better than dirty.
    world.file_sync("f")
    assert world.drop_caches() == {"dropped_pages": 0}
    world.advance(world.collapser.knobs.writeback_millisecs)
    assert world.drop_caches() == {"dropped_pages": 1}
    assert sorted(slots(world, "f")) == [0, 1, 2, 3, 6]
    assert world.meminfo()["Cached"] == (5 + 2) * 4 and world.meminfo()["Shmem"] == 2 * 4  # Cached counts shmem too


def test_unpin_releases_the_page_reference_at_once(world):
    world.file_create("f", PAGE_SIZE)
    world.spawn(1)
    addr = world.mmap(1, None, PAGE_SIZE, "f")
    world.pin(1, addr)
    world.madvise(1, addr, PAGE_SIZE, "dontneed")
    pfn = slots(world, "f")[0]
    assert world.collapser.mem.ref[pfn] == 2
    world.unpin(1, addr)
    assert world.collapser.mem.pins == {} and world.collapser.mem.ref[pfn] == 1
    assert world.drop_caches() == {"dropped_pages": 1}


def test_drop_caches_evicts_a_clean_unmapped_file_thp_whole(make_world):
    world = make_world(enabled="always")
    world.file_create("f", HPAGE_PMD_SIZE)
    world.spawn(1)
    addr = world.mmap(1, None, HPAGE_PMD_SIZE, "f")
    world.touch(1, addr, HPAGE_PMD_SIZE)
    world.wait_scans(1)
    assert world.meminfo()["FileHugePages"] == 2048
    assert world.drop_caches() == {"dropped_pages": 0}  # PMD-mapped
    free = world.collapser.knobs.free_huge_pages
    world.munmap(1, addr, HPAGE_PMD_SIZE)
    assert world.drop_caches() == {"dropped_pages": HPAGE_PMD_NR}
    assert world.meminfo()["FileHugePages"] == 0 and world.meminfo()["Cached"] == 0
    assert world.collapser.knobs.free_huge_pages == free + 1
    assert world.collapser.mem.nr_allocated == 0


# -- pageout (MADV_PAGEOUT) -------------------------------------------------------------------------


def test_pageout_shmem_goes_to_swap_and_faults_back_in(world):
    world.file_create("s", 4 * PAGE_SIZE, shmem=True)
    world.spawn(1)
    addr = world.mmap(1, None, 4 * PAGE_SIZE, "s", prot="rw")
    world.touch(1, addr, 4 * PAGE_SIZE, write=True)
    assert world.madvise(1, addr, 3 * PAGE_SIZE, "pageout") == 0
    f = world.collapser.by_name["s"]
    values = slots(world, "s")
    assert all(values[i] < 0 for i in range(3)) and values[3] > 0
    assert f.nrswap == 3 and f.nrpages == 1
    vm = world.vmstat()
    assert vm["pswpout"] == 3 and vm["thpsplit_nr_swap_entries"] == 3 and vm["pswpin"] == 0
    assert world.meminfo()["Shmem"] == 4
    assert world.smaps(1)[0]["Rss"] == 4
    majors = vm["pgmajfault"]
    assert world.fault(1, addr + PAGE_SIZE) == "major"
    vm = world.vmstat()
    assert vm["pswpin"] == 1 and vm["pgmajfault"] == majors + 1 and vm["thpsplit_nr_swap_entries"] == 2
    assert f.nrswap == 2 and f.nrpages == 2 and slots(world, "s")[1] > 0


def test_pageout_skips_shmem_pages_mapped_elsewhere(world):
    world.file_create("s", 2 * PAGE_SIZE, shmem=True)
    world.spawn(1)
    world.spawn(2)
    a1 = world.mmap(1, None, 2 * PAGE_SIZE, "s", prot="rw")
    a2 = world.mmap(2, None, 2 * PAGE_SIZE, "s", prot="rw")
    world.touch(1, a1, 2 * PAGE_SIZE, write=True)
    world.fault(2, a2)
    world.madvise(1, a1, 2 * PAGE_SIZE, "pageout")
    values = slots(world, "s")
    assert values[0] > 0 and values[1] < 0  # page 0 still mapped by pid 2
    assert world.vmstat()["pswpout"] == 1


def test_pageout_drops_a_clean_shmem_thp_whole_and_splits_a_dirty_one_to_swap(world):
    """shrink_folio_list: try_to_unmap (TTU_SPLIT_HUGE_PMD: thp_split_pmd), then a clean folio
    (read-faulted: zeroes) leaves the cache whole (__remove_mapping), a dirty one goes to swap
    (shmem_writeout, split here). (Kernel, for the clean one: Rss 0, nrpages 0, thp_split_pmd
    +1, no thp_split_page.)"""
    addr, head = shmem_thp(world)
    f = world.collapser.by_name["s"]
    world.madvise(1, addr, HPAGE_PMD_SIZE, "pageout")
    vm = world.vmstat()
    assert vm["thp_split_pmd"] == 1 and vm["thp_split_page"] == 0 and vm["pswpout"] == 0
    assert f.nrpages == 0 and f.nr_thps == 0 and f.nrswap == 0
    assert world.fault(1, addr, write=True) == "pmd"
    world.madvise(1, addr, HPAGE_PMD_SIZE, "pageout")
    vm = world.vmstat()
    assert vm["thp_split_page"] == 1 and vm["pswpout"] == HPAGE_PMD_NR
    assert f.nrswap == HPAGE_PMD_NR and f.nrpages == 0 and f.nr_thps == 0
    assert world.collapser.mem.nr_allocated == 0


def test_pageout_without_swap_keeps_dirty_shmem_and_drops_clean(world):
    """Conformance #10 (b). With no swap device shmem_writeout() re-dirties a dirty folio
    (!total_swap_pages, before any split): unmapped, it stays cached, whole; a clean one is
    dropped. (Kernel: populate_read 2M, populate_write the next 2M, pageout 4M: 512 pages left,
    Rss 0; a dirty PMD-mapped THP paged out maps again by a PMD at the next fault.)"""
    world.sysfs_set("thpsplit/swap", 0)
    addr, head = shmem_thp(world, size=2 * HPAGE_PMD_SIZE)
    f = world.collapser.by_name["s"]
    assert world.fault(1, addr, write=True) == "hit"
    world.file_write("s", HPAGE_PMD_SIZE, 4 * PAGE_SIZE)
    world.sysfs_set("shmem_enabled", "never")
    world.touch(1, addr + HPAGE_PMD_SIZE, 8 * PAGE_SIZE)  # 4 written, 4 read-faulted holes
    world.madvise(1, addr, 2 * HPAGE_PMD_SIZE, "pageout")
    assert [e["Rss"] for e in world.smaps(1)] == [0]
    assert f.nr_thps == 1 and f.nrpages == HPAGE_PMD_NR + 4 and f.nrswap == 0
    assert world.vmstat()["pswpout"] == 0 and world.vmstat()["thp_split_page"] == 0
    assert world.fault(1, addr) == "pmd"


def test_pageout_leaves_pages_mapped_twice_and_splits_a_folio_it_covers_in_part(world):
    """Conformance #10 (a), (c). madvise_cold_or_pageout_pte_range() (mm/madvise.c) skips a small
    folio whose mapcount is not 1 (two mappings in one mm here) and a large one another mm maps
    (folio_maybe_mapped_shared); a large folio the range covers in part (a PMD cut by the range,
    or fewer than its 512 PTEs in a row) is split (split_folio -> unmap_folio: every mapping of it
    goes, and a file folio is not mapped again), and nothing of it is paged out. (Kernel: a THP
    PTE-mapped over three VMAs, pageout of 64K of one: Rss 0 in all three, thp_split_page +1,
    the 512 pages still cached.)"""
    world.sysfs_set("thpsplit/swap", 0)
    world.file_create("s", 4 * HPAGE_PMD_SIZE, shmem=True)
    world.spawn(1)
    a = world.mmap(1, None, HPAGE_PMD_SIZE, "s", prot="rw")
    b = world.mmap(1, None, HPAGE_PMD_SIZE, "s", prot="rw")
    world.madvise(1, a, HPAGE_PMD_SIZE, "populate_read")
    world.madvise(1, b, HPAGE_PMD_SIZE, "populate_read")
    world.madvise(1, a, HPAGE_PMD_SIZE, "pageout")
    f = world.collapser.by_name["s"]
    assert [e["Rss"] for e in world.smaps(1)] == [2048, 2048] and f.nrpages == HPAGE_PMD_NR
    world.munmap(1, b, HPAGE_PMD_SIZE)
    world.madvise(1, a, HPAGE_PMD_SIZE, "pageout")  # mapped once now, clean: dropped
    assert [e["Rss"] for e in world.smaps(1)] == [0] and f.nrpages == 0

    world.sysfs_set("shmem_enabled", "always")
    c = world.mmap(1, None, 2 * HPAGE_PMD_SIZE, "s", offset=2 * HPAGE_PMD_SIZE, prot="rw")
    assert world.fault(1, c, write=True) == "pmd"
    assert world.fault(1, c + HPAGE_PMD_SIZE, write=True) == "pmd"
    world.spawn(2)
    d = world.mmap(2, None, HPAGE_PMD_SIZE, "s", offset=3 * HPAGE_PMD_SIZE, prot="rw")
    assert world.fault(2, d) == "pmd"
    world.madvise(1, c + HPAGE_PMD_SIZE, 64 * PAGE_SIZE, "pageout")  # shared with pid 2: left
    assert world.vmstat()["thp_split_page"] == 0
    world.madvise(1, c, 16 * PAGE_SIZE, "pageout")  # a part of an exclusive PMD: split
    vm = world.vmstat()
    assert vm["thp_split_page"] == 1 and vm["thp_split_pmd"] == 1 and vm["pswpout"] == 0
    assert f.nr_thps == 1 and f.nrpages == 2 * HPAGE_PMD_NR
    assert sorted(e["Rss"] for e in world.smaps(1)) == [0, 2048] and [e["Rss"] for e in world.smaps(2)] == [2048]

    world.sysfs_set("shmem_enabled", "never")
    world.munmap(2, d, HPAGE_PMD_SIZE)
    world.madvise(1, c + HPAGE_PMD_SIZE + PAGE_SIZE, PAGE_SIZE, "nohugepage")  # the PMD is split
    world.touch(1, c + HPAGE_PMD_SIZE, HPAGE_PMD_SIZE)  # mapped again by PTEs, in three VMAs
    assert sum(e["Rss"] for e in world.smaps(1)) == 2048
    world.madvise(1, c + HPAGE_PMD_SIZE + HPAGE_PMD_SIZE // 2, 16 * PAGE_SIZE, "pageout")
    assert world.vmstat()["thp_split_page"] == 2 and f.nr_thps == 0
    assert sum(e["Rss"] for e in world.smaps(1)) == 0 and f.nrpages == 2 * HPAGE_PMD_NR


def test_pageout_regular_file_drops_clean_and_writes_back_dirty(world):
    world.file_create("f", 2 * PAGE_SIZE)
    world.spawn(1)
    addr = world.mmap(1, None, 2 * PAGE_SIZE, "f", prot="rw")
    world.fault(1, addr)
    world.fault(1, addr + PAGE_SIZE, write=True)
    world.madvise(1, addr, 2 * PAGE_SIZE, "pageout")
    assert sorted(slots(world, "f")) == [1]
    assert flags_of(world, "f", 1) & (PG_DIRTY | PG_WRITEBACK) == PG_WRITEBACK
    assert world.vmstat()["pswpout"] == 0
    world.advance(world.collapser.knobs.writeback_millisecs)
    assert not flags_of(world, "f", 1) & (PG_DIRTY | PG_WRITEBACK)


# -- huge page allocation ---------------------------------------------------------------------------


def test_huge_allocation_charges_and_returns_free_huge_pages(make_world):
    world = make_world(free_huge_pages=2)
    c = world.collapser
    a = c.cache.alloc_huge(direct_compaction=False)
    b = c.cache.alloc_huge(direct_compaction=False)
    assert a and b and a % HPAGE_PMD_NR == 0 and b % HPAGE_PMD_NR == 0 and a != b
    assert c.knobs.free_huge_pages == 0
    assert c.cache.alloc_huge(direct_compaction=True) == 0
    c.cache.put(a)
    assert c.knobs.free_huge_pages == 1 and not c.mem.allocated(a)
    assert c.cache.alloc_huge(direct_compaction=False) == a  # the freed block is reused
    c.cache.put(a)
    c.cache.put(b)
    assert c.mem.nr_allocated == 0


def test_huge_allocation_fails_to_fragmentation_without_direct_compaction(make_world):
    world = make_world(fragmentation=100)
    c = world.collapser
    assert c.cache.alloc_huge(direct_compaction=False) == 0
    assert c.knobs.free_huge_pages == 1024
    head = c.cache.alloc_huge(direct_compaction=True)
    assert head and c.knobs.free_huge_pages == 1023
    c.cache.put(head)


def test_collapse_alloc_fails_with_no_free_huge_pages(make_world):
    world = make_world(enabled="always", free_huge_pages=0)
    world.file_create("f", HPAGE_PMD_SIZE)
    world.spawn(1)
    addr = world.mmap(1, None, HPAGE_PMD_SIZE, "f")
    world.touch(1, addr, HPAGE_PMD_SIZE)
    world.wait_scans(1)
    k = world.collapser.khugepaged
    assert k.results.get("SCAN_ALLOC_HUGE_PAGE_FAIL") == 1
    vm = world.vmstat()
    assert vm["thp_collapse_alloc_failed"] == 1 and vm["thp_collapse_alloc"] == 0
    assert world.meminfo()["FileHugePages"] == 0 and k.pages_collapsed == 0


@pytest.mark.parametrize("khugepaged_defrag, collapses", [(0, False), (1, True)])
def test_collapse_alloc_with_full_fragmentation_needs_khugepaged_defrag(make_world, khugepaged_defrag, collapses):
    world = make_world(enabled="always", fragmentation=100, khugepaged_defrag=khugepaged_defrag)
    world.file_create("f", HPAGE_PMD_SIZE)
    world.spawn(1)
    addr = world.mmap(1, None, HPAGE_PMD_SIZE, "f")
    world.touch(1, addr, HPAGE_PMD_SIZE)
    world.wait_scans(1)
    vm = world.vmstat()
    assert vm["thp_collapse_alloc"] == int(collapses)
    assert vm["thp_collapse_alloc_failed"] == int(not collapses)
    assert world.meminfo()["FileHugePages"] == (2048 if collapses else 0)
