"""mmap read-around (do_sync_mmap_readahead) and fault-around (do_fault_around)."""

from __future__ import annotations

from helpers import FIXED, H, P, pte_at, smaps1

KB = 1024


def file_world(make_world, size=4 * H, **knobs):
    world = make_world(**knobs)
    world.file_create("f", size)
    world.spawn(1)
    return world


def cached(world, name="f"):
    return sorted(i for i, v in world.collapser.by_name[name].entries() if v > 0)


def test_a_major_fault_reads_around_the_page(make_world):
    world = file_world(make_world, read_ahead_kb=128)
    a = world.mmap(1, FIXED, 4 * H, "f")
    assert world.fault(1, a + 100 * P) == "major"
    # ra_pages = 32, centred: [100 - 16, 100 + 16).
    assert cached(world) == list(range(84, 116))
    assert world.vmstat()["pgmajfault"] == 1
    assert world.fault(1, a + 90 * P) == "minor"  # cached, not mapped yet
    assert smaps1(world, 1)["Rss"] == 8


def test_read_around_is_clipped_at_the_start_and_at_eof(make_world):
    world = file_world(make_world, size=40 * P, read_ahead_kb=128)
    a = world.mmap(1, FIXED, 40 * P, "f")
    world.fault(1, a + 3 * P)
    assert cached(world) == list(range(0, 32))
    world.fault(1, a + 39 * P)
    assert cached(world) == list(range(0, 40))


def test_read_ahead_kb_zero_reads_only_the_page(make_world):
    world = file_world(make_world, read_ahead_kb=0)
    a = world.mmap(1, FIXED, 4 * H, "f")
    world.fault(1, a + 100 * P)
    assert cached(world) == [100]


def test_vm_hugepage_reads_two_pmd_ranges_even_with_readahead_off(make_world):
    world = file_world(make_world, read_ahead_kb=0)
    a = world.mmap(1, FIXED, 4 * H, "f")
    world.madvise(1, a, 4 * H, "hugepage")
    assert world.fault(1, a + 700 * P) == "major"
    assert cached(world) == list(range(512, 1536))
    assert world.vmstat()["pgmajfault"] == 1


def test_shmem_faults_allocate_one_page_no_read_around(make_world):
    world = make_world(read_ahead_kb=128)
    world.file_create("s", 4 * H, shmem=True)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * H, "s", prot="rw")
    assert world.fault(1, a + 100 * P) == "minor"
    assert cached(world, "s") == [100]


def test_fault_around_maps_the_cached_pages_of_the_aligned_window(make_world):
    world = file_world(make_world, fault_around_bytes=64 * KB)
    world.file_write("f", 0, 4 * H)
    world.file_sync("f")
    world.advance(1000)  # writeback ends: clean pages
    a = world.mmap(1, FIXED, 4 * H, "f")
    assert world.fault(1, a + 21 * P) == "minor"
    # The 16-page window holding page 21 is [16, 32): all mapped by the one fault.
    assert smaps1(world, 1)["Rss"] == 64
    assert all(pte_at(world, 1, a + i * P) for i in range(16, 32))
    assert not pte_at(world, 1, a + 15 * P) and not pte_at(world, 1, a + 32 * P)
    assert world.fault(1, a + 31 * P) == "hit"
    assert world.vmstat()["pgfault"] == 2


def test_fault_around_stays_inside_the_vma_and_skips_what_is_not_cached(make_world):
    world = file_world(make_world, fault_around_bytes=64 * KB)
    world.file_write("f", 0, 20 * P)
    a = world.mmap(1, FIXED, 18 * P, "f")  # the VMA ends at page 18
    world.file_punch("f", 17 * P, P)  # page 17 is a hole now
    world.fault(1, a + 16 * P)
    assert [i for i in range(18) if pte_at(world, 1, a + i * P)] == [16]
    world.fault(1, a + 2 * P)
    assert [i for i in range(18) if pte_at(world, 1, a + i * P)] == list(range(0, 17))


def test_write_faults_do_not_fault_around(make_world):
    world = file_world(make_world, fault_around_bytes=64 * KB)
    world.file_write("f", 0, H)
    a = world.mmap(1, FIXED, H, "f", prot="rw")
    world.fault(1, a, write=True)
    assert smaps1(world, 1)["Rss"] == 4


def test_fault_around_skips_a_locked_page(make_world):
    world = file_world(make_world, fault_around_bytes=64 * KB)
    world.file_write("f", 0, H)
    a = world.mmap(1, FIXED, H, "f")
    c = world.collapser
    locked = c.by_name["f"].get(5)
    assert c.cache.trylock(locked)
    world._checking = False  # the checker rightly objects to a page left locked
    world.fault(1, a)
    assert not pte_at(world, 1, a + 5 * P)
    assert smaps1(world, 1)["Rss"] == 15 * 4
    c.cache.unlock(locked)
    world._checking = True
    world.check()


def test_fault_around_maps_thp_subpages_and_marks_the_table(make_world):
    world = file_world(make_world, size=H, fault_around_bytes=64 * KB)
    world.spawn(2)
    b = world.mmap(2, FIXED, H, "f")
    world.touch(2, b, H)
    assert world.madvise(2, b, H, "collapse") == 0
    world.exit(2)
    a = world.mmap(1, FIXED, H, "f")
    world.madvise(1, a, H, "nohugepage")  # no PMD here: the THP is mapped by PTEs
    assert world.fault(1, a + 40 * P) == "minor"
    table = world.remapper.mms[1].pmds[a >> 21]
    # The window [32, 48) meets the THP, which lies inside the VMA and the PMD: fault-around maps
    # it whole (filemap_map_folio_range, 6.18; ext4 here: Rss 2048 after one read fault in a
    # VM_NOHUGEPAGE mapping). Subpage i at slot i, so the per-PMD mark is set for the remapper.
    assert table.nr == 512 and table.nr_foreign == 0 and table.mark


def test_a_read_fault_on_cached_shmem_maps_64k_as_the_real_kernel_does(make_world):
    # Observed on this machine's 6.18 kernel: memfd of 4 MiB written, mmap shared read-only, one
    # read at page 21 -> smaps Rss 64 kB (fault_around_bytes 65536, the default).
    world = make_world(fault_around_bytes=64 * KB)
    world.file_create("t", 4 * H, shmem=True)
    world.file_write("t", 0, 4 * H)
    world.spawn(1)
    a = world.mmap(1, None, 4 * H, "t", prot="r", shared=True)
    assert world.fault(1, a + 21 * P) == "minor"
    assert smaps1(world, 1)["Rss"] == 64
