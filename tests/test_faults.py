"""Page faults on the remapper: file, shmem, CoW and PMD mappings, fault outcomes, touch,
MADV_POPULATE_*, MADV_DONTNEED, and GUP pins."""

from __future__ import annotations

import pytest
from helpers import FIXED, H, P, cache_pfn, make_file_thp, pte_at

from collapsed.pagecache import PG_DIRTY
from remapd.mm import PTE_ANON, PTE_SHMEM, PTE_THP, PTE_WRITE, PteTable, pte_pfn
from shared.errors import UserError
from shared.units import HPAGE_PMD_NR, HPAGE_PMD_SHIFT


def rss(world, pid: int = 1) -> list[int]:
    return [e["Rss"] for e in world.smaps(pid)]


# -- regular files --------------------------------------------------------------------------------


def test_read_fault_is_major_then_minor_once_cached(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * P, "f")
    vm = world.vmstat()
    assert world.fault(1, a + 100) == "major"
    assert world.fault(1, a + 200) == "hit"  # same page: no fault
    after = world.vmstat()
    assert after["pgmajfault"] == vm["pgmajfault"] + 1
    assert after["pgfault"] == vm["pgfault"] + 2
    pfn = cache_pfn(world, "f", 0)
    mem = world.collapser.mem
    assert pte_pfn(pte_at(world, 1, a)) == pfn
    assert mem.ref[pfn] == 2 and mem.mapcount[pfn] == 1
    # Cached already (by write(2), or by another mapping): minor.
    world.file_write("f", 2 * P, 10)
    assert world.fault(1, a + 2 * P) == "minor"
    world.spawn(2)
    b = world.mmap(2, None, 4 * P, "f")
    assert world.fault(2, b) == "minor"
    assert mem.ref[pfn] == 3 and mem.mapcount[pfn] == 2
    assert world.vmstat()["pgmajfault"] == vm["pgmajfault"] + 1
    assert world.remapper.mms[1].rss["MM_FILEPAGES"] == 2


def test_pmd_mapping_when_the_cache_holds_a_thp(world):
    head = make_file_thp(world, "f", 2 * H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "f")
    mapped = world.vmstat()["thp_file_mapped"]
    assert world.fault(1, a + 77 * P) == "pmd"
    assert world.vmstat()["thp_file_mapped"] == mapped + 1
    mm = world.remapper.mms[1]
    assert mm.pmds[a >> HPAGE_PMD_SHIFT] == pte_at(world, 1, a) and pte_pfn(pte_at(world, 1, a)) == head
    assert mm.nr_ptes == 0 and mm.rss["MM_FILEPAGES"] == HPAGE_PMD_NR
    mem = world.collapser.mem
    assert mem.entire[head] == 1 and mem.ref[head] == HPAGE_PMD_NR + 1
    e = world.smaps(1)[0]
    assert (e["Rss"], e["FilePmdMapped"], e["ShmemPmdMapped"]) == (2048, 2048, 0)
    assert world.meminfo()["FilePmdMapped"] == 2048
    # Anything else in the 2 MiB is already mapped.
    assert world.touch(1, a, H, stride=16 * P) == {"hit": 32}
    assert world.fault(1, a + H) == "major"  # past the THP: a small page


@pytest.mark.parametrize(
    "where",
    ["misaligned", "too_short", "nohugepage", "offset_misaligned"],
)
def test_pte_mapped_subpage_when_no_pmd_fits(world, where):
    head = make_file_thp(world, "f", 2 * H)
    world.spawn(1)
    offset = 0
    if where == "misaligned":
        a = world.mmap(1, FIXED + P, 2 * H, "f")
    elif where == "too_short":
        a = world.mmap(1, FIXED, H - P, "f")
    elif where == "offset_misaligned":
        offset = P
        a = world.mmap(1, FIXED, 2 * H, "f", offset=offset)
    else:
        a = world.mmap(1, FIXED, 2 * H, "f")
        world.madvise(1, a, 2 * H, "nohugepage")
    index = offset // P + 5
    # Only in the VM_NOHUGEPAGE VMA does the THP lie inside the VMA and the PMD's page table:
    # finish_fault maps it whole there (6.18; tests/test_fault_fidelity.py), elsewhere one page.
    nr = HPAGE_PMD_NR if where == "nohugepage" else 1
    mapped = world.vmstat()["thp_file_mapped"]
    assert world.fault(1, a + 5 * P) == "minor"
    assert world.vmstat()["thp_file_mapped"] == mapped
    pte = pte_at(world, 1, a + 5 * P)
    assert pte & PTE_THP and pte_pfn(pte) == head + index
    mem = world.collapser.mem
    assert mem.mapcount[head + index] == 1 and head not in mem.entire
    assert mem.ref[head] == HPAGE_PMD_NR + nr
    e = world.smaps(1)[0]
    assert (e["Rss"], e["FilePmdMapped"]) == (4 * nr, 0)
    assert world.remapper.mms[1].rss["MM_FILEPAGES"] == nr


def test_no_pmd_mapping_where_a_pte_table_exists(world):
    head = make_file_thp(world, "f", 2 * H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "f")
    world.madvise(1, a, 2 * H, "nohugepage")
    world.fault(1, a)  # maps the whole THP with PTEs (finish_fault, 6.18)
    world.madvise(1, a + P, H - P, "dontneed")  # keep only the first PTE
    world.madvise(1, a, 2 * H, "hugepage")
    assert world.fault(1, a + P) == "minor"  # the table is there: PTEs, not a PMD
    assert world.collapser.mem.mapcount[head + 1] == 1 and head not in world.collapser.mem.entire


def test_shmem_fault_allocates_a_pmd_page_under_always(make_world):
    world = make_world(shmem_enabled="always")
    world.file_create("s", 2 * H, shmem=True)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "s", prot="rw")
    vm = world.vmstat()
    assert world.fault(1, a + 3 * P, write=True) == "pmd"
    after = world.vmstat()
    assert after["thp_file_alloc"] == vm["thp_file_alloc"] + 1
    assert after["thp_file_mapped"] == vm["thp_file_mapped"] + 1
    assert after["pgmajfault"] == vm["pgmajfault"]
    mm = world.remapper.mms[1]
    assert mm.rss == {"MM_FILEPAGES": 0, "MM_ANONPAGES": 0, "MM_SHMEMPAGES": HPAGE_PMD_NR}
    assert mm.pmds[a >> HPAGE_PMD_SHIFT] & PTE_SHMEM
    e = world.smaps(1)[0]
    assert (e["Rss"], e["ShmemPmdMapped"], e["FilePmdMapped"]) == (2048, 2048, 0)
    assert world.meminfo()["ShmemHugePages"] == 2048 and world.meminfo()["ShmemPmdMapped"] == 2048
    # The second 2 MiB: also huge.
    assert world.fault(1, a + H) == "pmd"
    assert world.collapser.by_name["s"].nr_thps == 2


def test_shmem_fault_small_pages_without_huge_policy_or_room(make_world):
    world = make_world(shmem_enabled="never")
    world.file_create("s", 2 * H, shmem=True)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "s", prot="rw")
    assert world.fault(1, a) == "minor"
    assert world.vmstat()["thp_file_alloc"] == 0
    assert pte_at(world, 1, a) & PTE_SHMEM and not pte_at(world, 1, a) & PTE_THP
    assert world.remapper.mms[1].rss["MM_SHMEMPAGES"] == 1
    world.sysfs_set("shmem_enabled", "always")
    b = world.mmap(1, FIXED + 4 * H, H - P, "s", prot="rw", offset=H)  # too short for a PMD
    assert world.fault(1, b) == "minor"
    assert world.vmstat()["thp_file_alloc"] == 0
    assert world.smaps(1)[1]["ShmemPmdMapped"] == 0


def test_write_to_a_private_mapping_copies_to_anon(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * P, "f", prot="rw", shared=False)
    mm = world.remapper.mms[1]
    assert not mm.vmas[0].anon_vma
    cows = world.vmstat()["thpsplit_cow_fault"]
    assert world.fault(1, a, write=True) == "major"  # read in, then copied
    assert world.vmstat()["thpsplit_cow_fault"] == cows + 1
    pte = pte_at(world, 1, a)
    assert pte & PTE_ANON and pte & PTE_WRITE
    assert mm.vmas[0].anon_vma
    assert mm.rss == {"MM_FILEPAGES": 0, "MM_ANONPAGES": 1, "MM_SHMEMPAGES": 0}
    e = world.smaps(1)[0]
    assert (e["Rss"], e["Anonymous"]) == (4, 4)
    pfn = cache_pfn(world, "f", 0)
    mem = world.collapser.mem
    assert mem.ref[pfn] == 1 and mem.mapcount[pfn] == 0 and not mem.flags[pfn] & PG_DIRTY
    # Read first, then write: the file PTE is replaced by a copy.
    assert world.fault(1, a + P) == "major"
    assert world.fault(1, a + P, write=True) == "minor"
    assert world.vmstat()["thpsplit_cow_fault"] == cows + 2
    assert mem.mapcount[cache_pfn(world, "f", 1)] == 0
    assert mm.rss["MM_ANONPAGES"] == 2 and mm.rss["MM_FILEPAGES"] == 0
    assert world.fault(1, a + P, write=True) == "hit"  # writable already


def test_write_to_a_private_pmd_mapping_splits_it(world):
    head = make_file_thp(world, "f", 2 * H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "f", prot="rw", shared=False)
    assert world.fault(1, a) == "pmd"
    splits = world.vmstat()["thp_split_pmd"]
    assert world.fault(1, a + 3 * P, write=True) == "minor"
    assert world.vmstat()["thp_split_pmd"] == splits + 1
    mem = world.collapser.mem
    assert head not in mem.entire and mem.ref[head] == HPAGE_PMD_NR
    mm = world.remapper.mms[1]
    assert mm.rss == {"MM_FILEPAGES": 0, "MM_ANONPAGES": 1, "MM_SHMEMPAGES": 0}
    assert world.smaps(1)[0]["Anonymous"] == 4
    # A read elsewhere refaults a subpage with a PTE (the table exists now).
    assert world.fault(1, a) == "minor"
    assert pte_pfn(pte_at(world, 1, a)) == head


def test_write_to_a_shared_mapping_dirties_the_page(world):
    world.file_create("f", 4 * P)
    world.file_sync("f")
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * P, "f", prot="rw")
    mem = world.collapser.mem
    f = world.collapser.by_name["f"]
    assert world.fault(1, a, write=True) == "major"
    assert mem.flags[cache_pfn(world, "f", 0)] & PG_DIRTY
    assert pte_at(world, 1, a) & PTE_WRITE and not pte_at(world, 1, a) & PTE_ANON
    # Read first: clean; the write-protect fault (page_mkwrite) dirties it.
    assert world.fault(1, a + P) == "major"
    assert not mem.flags[cache_pfn(world, "f", 1)] & PG_DIRTY
    assert world.fault(1, a + P, write=True) == "minor"
    assert mem.flags[cache_pfn(world, "f", 1)] & PG_DIRTY
    assert world.collapser.fileops.stat(f)["dirty"] == 2
    assert world.vmstat()["thpsplit_cow_fault"] == 0
    assert world.remapper.mms[1].rss == {"MM_FILEPAGES": 2, "MM_ANONPAGES": 0, "MM_SHMEMPAGES": 0}


def test_write_through_a_shared_shmem_pmd_keeps_it(make_world):
    world = make_world(shmem_enabled="always")
    world.file_create("s", 2 * H, shmem=True)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "s", prot="rw")
    assert world.fault(1, a) == "pmd"  # a read fault allocates and maps the huge page
    splits = world.vmstat()["thp_split_pmd"]
    assert world.fault(1, a + 9 * P, write=True) == "hit"
    assert world.vmstat()["thp_split_pmd"] == splits
    assert world.smaps(1)[0]["ShmemPmdMapped"] == 2048


def test_opening_a_file_with_thps_for_write_drops_its_page_cache(world):
    make_file_thp(world, "f", 2 * H)
    world.spawn(1)
    r = world.mmap(1, FIXED + 4 * H, 2 * H, "f")
    assert world.fault(1, r) == "pmd"
    world.mmap(1, FIXED, 2 * H, "f", prot="rw")  # the shared writable mapping opens it for write
    f = world.collapser.by_name["f"]
    assert (f.nr_thps, f.nrpages) == (0, 0)
    assert [e["Rss"] for e in world.smaps(1)] == [0, 0]  # unmap_mapping_range
    assert world.fault(1, FIXED) == "major"


@pytest.mark.parametrize("addr", [FIXED - P, FIXED + 4 * P, 0, (1 << 64) - P, 1 << 47, 1 << 60])
def test_fault_outside_any_vma_is_sigsegv(world, addr):
    world.file_create("f", 4 * P)
    world.spawn(1)
    world.mmap(1, FIXED, 4 * P, "f")
    assert world.fault(1, addr) == "sigsegv"
    assert world.fault(1, addr, write=True) == "sigsegv"
    assert world.remapper.mms[1].rss["MM_FILEPAGES"] == 0


def test_write_to_a_read_only_vma_is_sigsegv(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * P, "f", prot="r")
    b = world.mmap(1, FIXED + H, 2 * P, "f", prot="rx", shared=False)
    assert world.fault(1, a, write=True) == "sigsegv"
    assert world.fault(1, b, write=True) == "sigsegv"
    assert world.remapper.mms[1].nr_ptes == 0
    assert world.fault(1, a) == "major"
    assert world.fault(1, a, write=True) == "sigsegv"  # mapped, still read-only
    assert not world.collapser.mem.flags[cache_pfn(world, "f", 0)] & PG_DIRTY


def test_fault_beyond_eof_is_sigbus(world):
    world.file_create("f", 2 * P + 1)  # three pages cover i_size
    world.spawn(1)
    a = world.mmap(1, FIXED, 8 * P, "f", prot="rw", shared=False)
    assert world.fault(1, a + 2 * P) == "major"
    assert world.fault(1, a + 3 * P) == "sigbus"
    assert world.fault(1, a + 5 * P, write=True) == "sigbus"
    assert world.collapser.by_name["f"].nrpages == 1
    world.file_truncate("f", 4 * P)
    assert world.fault(1, a + 3 * P) == "major"


def test_touch_counts_each_outcome(world):
    world.file_create("f", 6 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 8 * P, "f")
    world.file_write("f", 0, 2 * P)
    counts = world.touch(1, a - 2 * P, 12 * P)
    assert counts == {"sigsegv": 4, "minor": 2, "major": 4, "sigbus": 2}
    assert world.touch(1, a, 6 * P, stride=2 * P) == {"hit": 3}
    assert world.touch(1, a, 0) == {}
    with pytest.raises(UserError) as e:
        world.touch(1, a, P, stride=0)
    assert e.value.errno_name == "EINVAL"


def test_touch_counts_runs_of_hits_up_to_what_is_not_mapped(world):
    """A touch counts accesses to mapped pages in runs (FaultPath._hits): a run ends at a hole,
    at the PMD's end and at the VMA's, every access counts in pgfault, and a write through a
    read-only or clean PTE, or any access while a writer holds mmap_lock, is no hit."""
    world.file_create("f", 2 * H)
    world.file_write("f", 0, 2 * H)
    world.spawn(1)
    a = world.mmap(1, H, 2 * H, "f", prot="rw", shared=True)
    world.touch(1, a, 2 * H, stride=2 * P)  # every other page of both PMD ranges
    world.touch(1, a + H - 4 * P, 8 * P)  # four on each side of the PMD boundary
    before = world.vmstat()["pgfault"]
    # Pages 506..517: 506 mapped, 507 not, 508..515 (over the PMD boundary), 516, not 517.
    assert world.touch(1, a + H - 6 * P, 12 * P) == {"hit": 10, "minor": 2}
    assert world.vmstat()["pgfault"] == before + 12
    # The last four pages mapped: a run reaches the VMA's end and no further.
    world.touch(1, a + 2 * H - 4 * P, 4 * P)
    assert world.touch(1, a + 2 * H - 4 * P, 8 * P) == {"hit": 4, "sigsegv": 4}
    # Writes: read-faulted shared file PTEs are read-only (write-notify), so each write faults.
    assert world.touch(1, a, 4 * P, write=True) == {"minor": 4}
    assert world.touch(1, a, 4 * P, write=True) == {"hit": 4}
    # A writer on mmap_lock: the access waits for it, hit or not.
    held = world.lock(1, 5.0, True)
    touch = world.start(world.remapper, world.remapper.faults.touch(1, a, 4 * P))
    assert not touch.done
    world.advance(5.0)
    assert held.done and touch.result() == {"hit": 4}


# -- MADV_POPULATE_*, MADV_DONTNEED ---------------------------------------------------------------


def test_populate_read_and_write(world):
    world.file_create("f", 8 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 8 * P, "f", prot="rw")
    assert world.madvise(1, a, 4 * P, "populate_read") == 0
    assert rss(world) == [16]
    assert world.collapser.fileops.stat(world.collapser.by_name["f"])["dirty"] == 0
    assert world.madvise(1, a + 2 * P, 6 * P, "populate_write") == 0
    assert rss(world) == [32]
    assert world.collapser.fileops.stat(world.collapser.by_name["f"])["dirty"] == 6
    assert all(pte_at(world, 1, a + i * P) & PTE_WRITE for i in range(2, 8))


def test_populate_maps_a_pmd_in_one_fault(world):
    make_file_thp(world, "f", 2 * H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "f")
    faults = world.vmstat()["pgfault"]
    assert world.madvise(1, a, H + 2 * P, "populate_read") == 0
    assert world.vmstat()["pgfault"] == faults + 3
    assert world.smaps(1)[0]["FilePmdMapped"] == 2048


def test_populate_stops_at_a_hole_with_enomem(world):
    # As on 6.18: what comes before the hole is populated, nothing after it.
    world.file_create("f", 3 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 3 * P, "f")
    world.munmap(1, a + P, P)
    assert world.madvise(1, a, 3 * P, "populate_read") == "ENOMEM"
    assert rss(world) == [4, 0]


def test_populate_write_on_a_read_only_vma_is_einval(world):
    # As on 6.18 (check_vma_flags refuses before any fault).
    world.file_create("f", 3 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 3 * P, "f")
    b = world.mmap(1, FIXED + H, 3 * P, "f", shared=False)
    pgfault = world.vmstat()["pgfault"]
    assert world.madvise(1, a, 3 * P, "populate_write") == "EINVAL"
    assert world.madvise(1, b, 3 * P, "populate_write") == "EINVAL"
    assert world.vmstat()["pgfault"] == pgfault and rss(world) == [0, 0]


def test_populate_beyond_eof_is_efault(world):
    world.file_create("f", 3 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 5 * P, "f")
    assert world.madvise(1, a, 5 * P, "populate_read") == "EFAULT"
    assert rss(world) == [12]


def test_dontneed_zaps_and_drops_references(world):
    world.file_create("f", 8 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 8 * P, "f", prot="rw", shared=False)
    world.touch(1, a, 8 * P)
    world.touch(1, a + 6 * P, 2 * P, write=True)
    mem = world.collapser.mem
    pfns = [cache_pfn(world, "f", i) for i in range(8)]
    assert [mem.ref[p] for p in pfns] == [2] * 6 + [1] * 2
    assert len(world.remapper.anon.mapcount) == 2
    assert world.madvise(1, a + 2 * P, 6 * P, "dontneed") == 0
    assert rss(world) == [8]
    assert [mem.ref[p] for p in pfns] == [2] * 2 + [1] * 6
    assert all(mem.mapcount[p] == 0 for p in pfns[2:])
    assert not world.remapper.anon.mapcount
    mm = world.remapper.mms[1]
    assert mm.rss == {"MM_FILEPAGES": 2, "MM_ANONPAGES": 0, "MM_SHMEMPAGES": 0}
    # The anon copies are gone: the file's contents show through again.
    assert world.fault(1, a + 6 * P) == "minor"
    assert not pte_at(world, 1, a + 6 * P) & PTE_ANON
    assert world.madvise(1, a - P, 2 * P, "dontneed") == "ENOMEM"
    assert rss(world) == [8]  # a + 0 was zapped, a + 6P refaulted


# -- GUP pins -------------------------------------------------------------------------------------


def test_pin_raises_the_refcount_and_unpin_drops_it(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * P, "f")
    mem = world.collapser.mem
    got = world.pin(1, a + P + 5)  # faults the page in first
    pfn = cache_pfn(world, "f", 1)
    assert got == {"pid": 1, "addr": a + P, "pfn": pfn}
    assert mem.ref[pfn] == 3 and mem.pins[pfn] == 1 and mem.mapcount[pfn] == 1
    world.pin(1, a + P)
    assert mem.ref[pfn] == 4 and mem.pins[pfn] == 2
    assert world.unpin(1, a + P)["pfn"] == pfn
    assert mem.ref[pfn] == 3 and mem.pins[pfn] == 1
    world.unpin(1, a + P)
    assert mem.ref[pfn] == 2 and pfn not in mem.pins
    with pytest.raises(UserError) as e:
        world.unpin(1, a + P)
    assert e.value.errno_name == "EINVAL"
    with pytest.raises(UserError) as e:
        world.unpin(1, a + 2 * P)
    assert e.value.errno_name == "EINVAL"


def test_pin_holds_the_page_through_dontneed(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * P, "f")
    world.pin(1, a)
    pfn = cache_pfn(world, "f", 0)
    world.madvise(1, a, P, "dontneed")
    mem = world.collapser.mem
    assert mem.mapcount[pfn] == 0 and mem.ref[pfn] == 2  # cache + pin
    assert world.drop_caches()["dropped_pages"] == 0  # pinned: stays
    world.unpin(1, a)
    assert mem.ref[pfn] == 1
    assert world.drop_caches()["dropped_pages"] == 1


def test_pin_a_pmd_mapped_subpage_counts_on_the_head(world):
    head = make_file_thp(world, "f", 2 * H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "f")
    got = world.pin(1, a + 7 * P)
    assert got["pfn"] == head + 7
    mem = world.collapser.mem
    assert mem.entire[head] == 1 and mem.pins[head] == 1
    assert mem.ref[head] == HPAGE_PMD_NR + 2
    world.unpin(1, a + 7 * P)
    assert mem.ref[head] == HPAGE_PMD_NR + 1 and head not in mem.pins


def test_pin_an_anon_page(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * P, "f", prot="rw", shared=False)
    world.fault(1, a, write=True)
    anon = world.pin(1, a)["pfn"]
    r = world.remapper
    assert pte_at(world, 1, a) & PTE_ANON and r.anon.pins == {anon: 1}
    assert not world.collapser.mem.pins
    # Unmapped but pinned: the page lives on until the pin goes.
    world.madvise(1, a, P, "dontneed")
    assert r.anon.mapcount == {anon: 0}
    world.unpin(1, a)
    assert r.anon.mapcount == {} and r.anon.pins == {}


def test_pin_unmapped_or_beyond_eof_is_efault(world):
    world.file_create("f", P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * P, "f")
    for addr in (a - P, a + P):
        with pytest.raises(UserError) as e:
            world.pin(1, addr)
        assert e.value.errno_name == "EFAULT"
    assert world.remapper.mms[1].pins == {}


def test_munmap_drops_the_pins_it_covers(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * P, "f")
    world.pin(1, a)
    world.pin(1, a + 2 * P)
    world.munmap(1, a, 2 * P)
    mem = world.collapser.mem
    assert cache_pfn(world, "f", 0) not in mem.pins
    assert mem.pins == {cache_pfn(world, "f", 2): 1}
    assert list(world.remapper.mms[1].pins) == [a + 2 * P]
    with pytest.raises(UserError):
        world.unpin(1, a)


def test_pte_table_bookkeeping_on_faults(world):
    world.file_create("f", 4 * H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * H, "f")
    world.touch(1, a, 4 * H, stride=H)
    world.touch(1, a + P, 3 * P)
    mm = world.remapper.mms[1]
    assert mm.nr_ptes == 4
    table = mm.pmds[a >> HPAGE_PMD_SHIFT]
    assert isinstance(table, PteTable) and table.nr == 4 and table.nr_foreign == 4
