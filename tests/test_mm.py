"""The remapper's address-space side: processes, mmap/munmap/madvise, VMA split and merge, PMD
splits at VMA boundaries, mm counters, smaps, THPeligible and the mmap lock."""

from __future__ import annotations

import pytest
from helpers import FIXED, H, P, cache_pfn, make_file_thp, pte_at

from collapsed.pagecache import PG_HEAD
from remapd.address_space import MMAP_BASE
from remapd.mm import PTE_ANON, PTE_THP, PTE_WRITE, PteTable, pte_pfn
from shared.errors import UserError
from shared.units import HPAGE_PMD_NR, HPAGE_PMD_SHIFT


def errno_of(excinfo) -> str:
    return excinfo.value.errno_name



def vmas(world, pid: int) -> list[tuple[int, int, int]]:
    return [(v.start, v.end, v.pgoff) for v in world.remapper.mms[pid].vmas]


# -- spawn / exit / fork --------------------------------------------------------------------------


def test_spawn_errors(world):
    world.spawn(1)
    with pytest.raises(UserError) as e:
        world.spawn(1)
    assert errno_of(e) == "EEXIST"
    for bad in (0, -3):
        with pytest.raises(UserError) as e:
            world.spawn(bad)
        assert errno_of(e) == "EINVAL"
    assert list(world.remapper.mms) == [1]


@pytest.mark.parametrize(
    "op",
    [
        lambda w: w.exit(7),
        lambda w: w.fork(7, 8),
        lambda w: w.mmap(7, None, P, "f"),
        lambda w: w.munmap(7, FIXED, P),
        lambda w: w.madvise(7, FIXED, P, "hugepage"),
        lambda w: w.fault(7, FIXED),
        lambda w: w.touch(7, FIXED, P),
        lambda w: w.pin(7, FIXED),
        lambda w: w.unpin(7, FIXED),
        lambda w: w.smaps(7),
        lambda w: w.lock(7, 10).result(),
    ],
)
def test_unknown_pid_is_esrch(world, op):
    world.file_create("f", P)
    with pytest.raises(UserError) as e:
        op(world)
    assert errno_of(e) == "ESRCH"
    assert 8 not in world.remapper.mms


def test_exit_twice_and_fork_onto_existing_pid(world):
    world.spawn(1)
    world.spawn(2)
    with pytest.raises(UserError) as e:
        world.fork(1, 2)
    assert errno_of(e) == "EEXIST"
    world.exit(2)
    with pytest.raises(UserError) as e:
        world.exit(2)
    assert errno_of(e) == "ESRCH"
    world.spawn(2)  # the pid is free again
    assert sorted(world.remapper.mms) == [1, 2]


def test_exit_releases_every_mapping_and_pin(make_world):
    world = make_world(shmem_enabled="always")
    thp = make_file_thp(world, "big", 2 * H)
    world.file_create("small", 8 * P)
    world.file_create("shm", 2 * H, shmem=True)
    world.spawn(1)
    big = world.mmap(1, FIXED, 2 * H, "big")
    small = world.mmap(1, None, 8 * P, "small", prot="rw", shared=False)
    shm = world.mmap(1, None, 2 * H, "shm", prot="rw")
    assert world.fault(1, big) == "pmd"
    world.touch(1, big + H, 4 * P)
    world.touch(1, small, 4 * P)
    world.touch(1, small + 4 * P, 2 * P, write=True)  # anon CoW copies
    assert world.fault(1, shm, write=True) == "pmd"
    world.pin(1, big + 3 * P)
    world.pin(1, small)
    world.pin(1, small + 4 * P)  # an anon page
    mem = world.collapser.mem
    assert mem.pins and world.remapper.anon.mapcount and world.remapper.anon.pins

    world.exit(1)

    assert 1 not in world.remapper.mms
    assert not mem.entire and not mem.pins
    assert not world.remapper.anon.mapcount and not world.remapper.anon.pins
    assert mem.ref[thp] == HPAGE_PMD_NR
    assert not any(mem.mapcount[thp : thp + HPAGE_PMD_NR])
    for name in ("big", "small", "shm"):
        f = world.collapser.by_name[name]
        for _, pfn in f.entries():
            head = mem.head(pfn)
            assert mem.ref[head] == (HPAGE_PMD_NR if mem.flags[head] & PG_HEAD else 1)
            assert mem.mapcount[pfn] == 0
    # What was only mapped is still cached: a new process refaults it minor.
    world.spawn(2)
    b = world.mmap(2, None, 8 * P, "small")
    assert world.fault(2, b) == "minor"


def test_exit_releases_write_open_and_khugepaged_slot(world):
    world.file_create("f", 2 * H)
    world.spawn(1)
    world.mmap(1, None, 2 * H, "f", prot="rw")
    assert world.collapser.by_name["f"].writecount == 1
    assert 1 in world.collapser.khugepaged.slots
    world.exit(1)
    assert world.collapser.by_name["f"].writecount == 0
    assert 1 not in world.collapser.khugepaged.slots


def test_fork_copies_vmas_and_ptes_only_where_anon_vma(world):
    world.file_create("f", 16 * P)
    world.spawn(1)
    shared = world.mmap(1, FIXED, 4 * P, "f", offset=0, prot="rw")
    private = world.mmap(1, FIXED + H, 4 * P, "f", offset=8 * P, prot="rw", shared=False)
    clean = world.mmap(1, FIXED + 2 * H, 4 * P, "f", offset=12 * P, shared=False)
    world.touch(1, shared, 4 * P)
    world.touch(1, private, 2 * P)  # file pages 8, 9
    world.fault(1, private + 2 * P, write=True)  # anon copy of page 10: anon_vma
    world.touch(1, clean, 4 * P)  # read only: no anon_vma
    mem = world.collapser.mem
    before = mem.ref[cache_pfn(world, "f", 8)]

    world.fork(1, 2)

    child = world.remapper.mms[2]
    assert vmas(world, 2) == vmas(world, 1)
    assert [v.anon_vma is not None for v in child.vmas] == [False, True, False]
    assert [v.fork_child for v in child.vmas] == [False, True, False]  # anon_vma_fork
    smaps = {e["start"]: e for e in world.smaps(2)}
    assert smaps[shared]["Rss"] == 0
    assert smaps[clean]["Rss"] == 0
    assert smaps[private]["Rss"] == 12 and smaps[private]["Anonymous"] == 4
    assert child.rss == {"MM_FILEPAGES": 2, "MM_ANONPAGES": 1, "MM_SHMEMPAGES": 0}
    assert child.nr_ptes == 1
    page8 = cache_pfn(world, "f", 8)
    assert mem.ref[page8] == before + 1 and mem.mapcount[page8] == 2
    # The shared VMA still counts as open for write, once per process.
    assert world.collapser.by_name["f"].writecount == 2


def test_fork_makes_anon_pages_copy_on_write(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * P, "f", prot="rw", shared=False)
    assert world.fault(1, a, write=True) == "major"
    anon = pte_pfn(pte_at(world, 1, a))
    assert pte_at(world, 1, a) & PTE_WRITE

    world.fork(1, 2)

    r = world.remapper
    assert r.anon.mapcount[anon] == 2
    assert pte_pfn(pte_at(world, 2, a)) == anon
    assert not pte_at(world, 1, a) & PTE_WRITE and not pte_at(world, 2, a) & PTE_WRITE
    cows = world.vmstat()["thpsplit_cow_fault"]
    assert world.fault(2, a, write=True) == "minor"  # the child copies
    assert world.vmstat()["thpsplit_cow_fault"] == cows + 1
    assert pte_pfn(pte_at(world, 2, a)) != anon and r.anon.mapcount[anon] == 1
    assert world.fault(1, a, write=True) == "minor"  # the parent is alone now: reuse
    assert world.vmstat()["thpsplit_cow_fault"] == cows + 1
    assert pte_pfn(pte_at(world, 1, a)) == anon and pte_at(world, 1, a) & PTE_WRITE
    world.exit(1)
    assert anon not in r.anon.mapcount and len(r.anon.mapcount) == 1


def test_fork_copies_a_pinned_anon_page_for_the_child(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * P, "f", prot="rw", shared=False)
    world.fault(1, a, write=True)
    anon = world.pin(1, a)["pfn"]
    world.fork(1, 2)
    # copy_present_page: the parent keeps its writable page; the child has its own.
    assert pte_at(world, 1, a) & PTE_WRITE and pte_pfn(pte_at(world, 1, a)) == anon
    assert pte_pfn(pte_at(world, 2, a)) != anon and pte_at(world, 2, a) & PTE_WRITE
    cows = world.vmstat()["thpsplit_cow_fault"]
    assert world.fault(1, a, write=True) == "hit"
    assert world.vmstat()["thpsplit_cow_fault"] == cows


def test_fork_never_copies_file_pmds(world):
    make_file_thp(world, "f", 2 * H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "f", prot="rw", shared=False)
    assert world.fault(1, a) == "pmd"
    world.fault(1, a + H, write=True)  # gives the VMA an anon_vma
    head = cache_pfn(world, "f", 0)
    world.fork(1, 2)
    child = world.remapper.mms[2]
    assert child.vmas[0].anon_vma
    assert a >> HPAGE_PMD_SHIFT not in child.pmds
    assert world.collapser.mem.entire[head] == 1
    assert child.rss["MM_FILEPAGES"] == 0 and child.rss["MM_ANONPAGES"] == 1
    assert world.fault(2, a) == "pmd"  # the child refaults it
    assert world.collapser.mem.entire[head] == 2


# -- mmap -----------------------------------------------------------------------------------------


def test_mmap_fixed_replaces_what_was_there(world):
    world.file_create("f", 8 * P)
    world.file_create("g", 8 * P)
    world.spawn(1)
    assert world.mmap(1, FIXED, 4 * P, "f") == FIXED
    world.touch(1, FIXED, 4 * P)
    page1 = cache_pfn(world, "f", 1)
    mem = world.collapser.mem
    assert mem.mapcount[page1] == 1

    assert world.mmap(1, FIXED + P, P, "g", offset=5 * P) == FIXED + P

    g = world.collapser.by_name["g"].ino
    assert vmas(world, 1) == [(FIXED, FIXED + P, 0), (FIXED + P, FIXED + 2 * P, 5), (FIXED + 2 * P, FIXED + 4 * P, 2)]
    assert world.remapper.mms[1].vmas[1].ino == g
    assert mem.mapcount[page1] == 0 and mem.ref[page1] == 1
    assert [e["Rss"] for e in world.smaps(1)] == [4, 0, 8]
    assert world.remapper.mms[1].rss["MM_FILEPAGES"] == 3


def test_mmap_adjacent_compatible_mappings_merge(world):
    world.file_create("f", 8 * P)
    world.spawn(1)
    world.mmap(1, FIXED, 2 * P, "f")
    world.mmap(1, FIXED + 2 * P, 2 * P, "f", offset=2 * P)
    assert vmas(world, 1) == [(FIXED, FIXED + 4 * P, 0)]
    # Not file-contiguous, or different protection: no merge.
    world.mmap(1, FIXED + 4 * P, P, "f", offset=7 * P)
    world.mmap(1, FIXED + 5 * P, P, "f", offset=0, prot="rw")
    assert len(world.remapper.mms[1].vmas) == 3


@pytest.mark.parametrize("length", [H, 3 * H // 2, 5 * H])
@pytest.mark.parametrize("offset", [0, 3 * P, H - P, H + 7 * P])
def test_mmap_auto_address_is_thp_aligned_with_offset(world, length, offset):
    world.file_create("f", 16 * H)
    world.spawn(1)
    world.mmap(1, None, 3 * P, "f")  # something already up there
    addr = world.mmap(1, None, length, "f", offset=offset)
    assert addr % H == offset % H
    assert addr + length <= MMAP_BASE
    assert world.remapper.mms[1].find_vma(addr).end == addr + length


def test_mmap_auto_address_finds_room_without_overlap(world):
    world.file_create("f", 4 * H)
    world.spawn(1)
    addrs = [world.mmap(1, None, length, "f") for length in (5 * P, H, P, 2 * H, 3 * P)]
    spans = sorted((a, a + n) for a, n in zip(addrs, (5 * P, H, P, 2 * H, 3 * P)))
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start
    assert all(s % P == 0 for s, _ in spans)


def test_mmap_rounds_length_up_to_pages(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, P + 1, "f")
    assert world.smaps(1)[0]["Size"] == 8
    assert world.remapper.mms[1].vmas[0].end == a + 2 * P


@pytest.mark.parametrize(
    "kwargs, errno",
    [
        (dict(name="nope"), "ENOENT"),
        (dict(prot="w"), "EINVAL"),
        (dict(prot="x"), "EINVAL"),
        (dict(offset=100), "EINVAL"),
        (dict(offset=-P), "EINVAL"),
        (dict(addr=FIXED + 1), "EINVAL"),
        (dict(addr=0), "EINVAL"),
        (dict(addr=(1 << 47) - P, length=2 * P), "ENOMEM"),
        (dict(addr=1 << 47), "ENOMEM"),
        (dict(addr=(1 << 64) - P), "ENOMEM"),
        (dict(addr=(1 << 47) + 1), "ENOMEM"),  # the range is checked before the alignment
        (dict(length=0), "EINVAL"),
        (dict(length=-P), "EINVAL"),
        (dict(addr=None, length=1 << 47), "ENOMEM"),
    ],
)
def test_mmap_errors(world, kwargs, errno):
    world.file_create("f", 4 * P)
    world.spawn(1)
    args = dict(addr=FIXED, length=P, name="f", offset=0, prot="r")
    args.update(kwargs)
    with pytest.raises(UserError) as e:
        world.mmap(1, args["addr"], args["length"], args["name"], args["offset"], args["prot"])
    assert errno_of(e) == errno
    assert world.remapper.mms[1].vmas == []


def test_shared_writable_mapping_counts_as_open_for_write(world):
    world.file_create("f", 2 * H)
    world.file_create("s", 2 * H, shmem=True)
    world.spawn(1)
    f = world.collapser.by_name["f"]
    world.mmap(1, FIXED + 8 * H, P, "f", prot="r")  # read-only shared
    world.mmap(1, FIXED + 9 * H, P, "f", prot="rw", shared=False)  # private
    world.mmap(1, FIXED + 10 * H, P, "s", prot="rw")  # shmem: not a regular file
    assert f.writecount == 0
    a = world.mmap(1, FIXED, 2 * H, "f", prot="rw")
    assert f.writecount == 1
    assert world.collapser.fileops.stat(f)["open_for_write"] == 1
    world.munmap(1, a + H, H)
    assert f.writecount == 1
    world.munmap(1, a, H)
    assert f.writecount == 0


# -- munmap / madvise split and merge -------------------------------------------------------------


def test_munmap_middle_splits_in_two(world):
    world.file_create("f", 16 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 16 * P, "f")
    world.touch(1, a, 16 * P)
    world.munmap(1, a + 4 * P, 4 * P)
    assert vmas(world, 1) == [(a, a + 4 * P, 0), (a + 8 * P, a + 16 * P, 8)]
    s = world.smaps(1)
    assert [e["Size"] for e in s] == [16, 32]
    assert [e["offset"] for e in s] == [0, 8 * P]
    assert [e["Rss"] for e in s] == [16, 32]
    assert world.fault(1, a + 5 * P) == "sigsegv"
    assert world.collapser.mem.mapcount[cache_pfn(world, "f", 5)] == 0
    assert world.remapper.mms[1].nr_ptes == 1  # the table still serves both halves


def test_munmap_frees_page_tables_no_vma_uses(world):
    world.file_create("f", 3 * H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 3 * H, "f", prot="r")
    world.madvise(1, a, 3 * H, "nohugepage")
    world.touch(1, a, 3 * H, stride=H)
    mm = world.remapper.mms[1]
    assert mm.nr_ptes == 3
    world.munmap(1, a + H, H)
    assert mm.nr_ptes == 2
    world.munmap(1, a + H // 2, H // 2)
    assert mm.nr_ptes == 2  # [a, a + 1M) still uses the first table
    world.munmap(1, a, 4 * H)
    assert mm.nr_ptes == 0 and mm.vmas == [] and mm.rss["MM_FILEPAGES"] == 0


def test_munmap_of_a_hole_and_bad_arguments(world):
    world.spawn(1)
    assert world.munmap(1, FIXED, H) == {"addr": FIXED, "length": H}
    for addr, length in ((FIXED + 1, P), (FIXED, 0), (FIXED, -P), ((1 << 47) - P, 2 * P)):
        with pytest.raises(UserError) as e:
            world.munmap(1, addr, length)
        assert errno_of(e) == "EINVAL"


def test_madvise_splits_and_neighbours_merge_back(world):
    world.file_create("f", 6 * H)
    world.spawn(1)
    a = world.mmap(1, None, 6 * H, "f")
    mm = world.remapper.mms[1]
    assert len(mm.vmas) == 1

    assert world.madvise(1, a + 2 * H, H, "hugepage") == 0
    assert vmas(world, 1) == [(a, a + 2 * H, 0), (a + 2 * H, a + 3 * H, 1024), (a + 3 * H, a + 6 * H, 1536)]
    flags = [e["VmFlags"].split() for e in world.smaps(1)]
    assert "hg" in flags[1] and "hg" not in flags[0] + flags[2]

    world.madvise(1, a + 2 * H, H, "nohugepage")
    assert len(mm.vmas) == 3
    flags = [e["VmFlags"].split() for e in world.smaps(1)]
    assert "nh" in flags[1] and "hg" not in flags[1]

    world.madvise(1, a, 6 * H, "hugepage")
    assert vmas(world, 1) == [(a, a + 6 * H, 0)]
    assert world.smaps(1)[0]["VmFlags"].split()[-1] == "hg"

    world.madvise(1, a, 3 * H, "nohugepage")
    world.madvise(1, a + 3 * H, 3 * H, "nohugepage")  # now identical to its left neighbour
    assert vmas(world, 1) == [(a, a + 6 * H, 0)]
    assert "nh" in world.smaps(1)[0]["VmFlags"].split()


def test_madvise_over_a_hole_is_enomem_but_applies(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    world.mmap(1, FIXED, P, "f")
    world.mmap(1, FIXED + 2 * P, P, "f", offset=2 * P)
    assert world.madvise(1, FIXED, 3 * P, "hugepage") == "ENOMEM"
    assert all(v.hugepage for v in world.remapper.mms[1].vmas)
    assert world.madvise(1, FIXED, 0, "hugepage") == 0
    for addr, advice in ((FIXED + 1, "hugepage"), (FIXED, "bogus")):
        with pytest.raises(UserError) as e:
            world.madvise(1, addr, P, advice)
        assert errno_of(e) == "EINVAL"


def test_anon_vma_on_one_side_does_not_stop_a_merge(world):
    # As on 6.18: the merged VMA takes the anon_vma (and keeps its anon page mapped).
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * P, "f", prot="rw", shared=False)
    world.madvise(1, a + 2 * P, 2 * P, "hugepage")
    world.fault(1, a, write=True)
    assert [v.anon_vma is not None for v in world.remapper.mms[1].vmas] == [True, False]
    world.madvise(1, a, 2 * P, "hugepage")
    (vma,) = world.remapper.mms[1].vmas
    assert (vma.start, vma.end, vma.anon_vma is not None) == (a, a + 4 * P, True)
    assert world.smaps(1)[0]["Anonymous"] == 4
    # A new mapping next to it merges too.
    world.mmap(1, a + 4 * P, P, "f", offset=4 * P, prot="rw", shared=False)
    world.madvise(1, a + 4 * P, P, "hugepage")
    assert vmas(world, 1) == [(a, a + 5 * P, 0)]


# -- PMD splits at VMA boundaries and partial zaps ------------------------------------------------


@pytest.fixture
def pmd_world(world):
    make_file_thp(world, "f", 2 * H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "f")
    assert world.fault(1, a + 5 * P) == "pmd"
    return world, a


def test_partial_munmap_splits_the_pmd_and_the_rest_refaults_as_ptes(pmd_world):
    world, a = pmd_world
    head = cache_pfn(world, "f", 0)
    mem = world.collapser.mem
    splits = world.vmstat()["thp_split_pmd"]
    world.munmap(1, a + P, P)
    assert world.vmstat()["thp_split_pmd"] == splits + 1
    assert head not in mem.entire and mem.ref[head] == HPAGE_PMD_NR
    mm = world.remapper.mms[1]
    assert mm.rss["MM_FILEPAGES"] == 0
    assert world.fault(1, a + 2 * P) == "minor"
    pte = pte_at(world, 1, a + 2 * P)
    assert pte & PTE_THP and pte_pfn(pte) == head + 2
    assert mem.mapcount[head + 2] == 1 and mem.ref[head] == HPAGE_PMD_NR + 1
    assert [e["FilePmdMapped"] for e in world.smaps(1)] == [0, 0]
    assert mm.rss["MM_FILEPAGES"] == 1


def test_vma_boundary_inside_a_pmd_splits_it(pmd_world):
    world, a = pmd_world
    splits = world.vmstat()["thp_split_pmd"]
    # A boundary on the PMD's edge leaves it alone.
    world.madvise(1, a + H, H, "hugepage")
    assert world.vmstat()["thp_split_pmd"] == splits
    assert isinstance(world.remapper.mms[1].pmds[a >> HPAGE_PMD_SHIFT], int)
    world.madvise(1, a, H // 2, "hugepage")
    assert world.vmstat()["thp_split_pmd"] == splits + 1
    assert len(world.remapper.mms[1].vmas) == 3
    assert world.smaps(1)[0]["Rss"] == 0
    assert world.fault(1, a) == "minor"
    assert isinstance(world.remapper.mms[1].pmds[a >> HPAGE_PMD_SHIFT], PteTable)
    assert [e["FilePmdMapped"] for e in world.smaps(1)] == [0, 0, 0]


def test_dontneed_inside_a_pmd_splits_it_and_whole_pmd_zap_does_not(pmd_world):
    world, a = pmd_world
    head = cache_pfn(world, "f", 0)
    mem = world.collapser.mem
    splits = world.vmstat()["thp_split_pmd"]
    assert world.madvise(1, a + 7 * P, P, "dontneed") == 0
    assert world.vmstat()["thp_split_pmd"] == splits + 1
    # A file PMD split just clears it: the whole 2 MiB is gone, not only the page.
    assert world.smaps(1)[0]["Rss"] == 0 and mem.ref[head] == HPAGE_PMD_NR
    # The VMA still covers the aligned range: the next fault maps the PMD again.
    assert world.fault(1, a + 9 * P) == "pmd"
    assert world.madvise(1, a, H, "dontneed") == 0
    assert world.vmstat()["thp_split_pmd"] == splits + 1
    assert head not in mem.entire


def test_munmap_of_a_whole_pmd_range_does_not_count_a_split(pmd_world):
    world, a = pmd_world
    splits = world.vmstat()["thp_split_pmd"]
    world.munmap(1, a, H)
    assert world.vmstat()["thp_split_pmd"] == splits
    assert world.remapper.mms[1].pmds == {}
    assert world.smaps(1)[0]["Rss"] == 0


# -- counters, smaps, THPeligible -----------------------------------------------------------------


def test_mm_counters_nr_ptes_and_smaps_rss(make_world):
    world = make_world(shmem_enabled="never")
    make_file_thp(world, "big", 2 * H)
    world.file_create("f", 8 * P)
    world.file_create("s", 8 * P, shmem=True)
    world.spawn(1)
    big = world.mmap(1, FIXED, 2 * H, "big")
    f = world.mmap(1, FIXED + 2 * H, 8 * P, "f", prot="rw", shared=False)
    s = world.mmap(1, FIXED + 4 * H, 8 * P, "s", prot="rw")
    world.fault(1, big)
    world.touch(1, f, 3 * P)
    world.touch(1, f + 3 * P, 2 * P, write=True)
    world.touch(1, s, 5 * P, write=True)
    mm = world.remapper.mms[1]
    assert mm.rss == {"MM_FILEPAGES": HPAGE_PMD_NR + 3, "MM_ANONPAGES": 2, "MM_SHMEMPAGES": 5}
    assert mm.nr_ptes == 2  # the PMD mapping needs no table
    by = {e["start"]: e for e in world.smaps(1)}
    assert (by[big]["Rss"], by[big]["FilePmdMapped"]) == (2048, 2048)
    assert (by[f]["Rss"], by[f]["Anonymous"]) == (20, 8)
    assert (by[s]["Rss"], by[s]["ShmemPmdMapped"], by[s]["Anonymous"]) == (20, 0, 0)
    assert world.remapper.status(1)["rss"] == mm.rss
    world.madvise(1, f, 8 * P, "dontneed")
    assert mm.rss["MM_ANONPAGES"] == 0 and mm.rss["MM_FILEPAGES"] == HPAGE_PMD_NR
    assert mm.nr_ptes == 2  # MADV_DONTNEED leaves the tables


def test_smaps_fields_and_perms(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * P, "f", offset=P, prot="rx", shared=False)
    (e,) = world.smaps(1)
    assert (e["start"], e["end"], e["offset"], e["name"]) == (a, a + 4 * P, P, "f")
    assert e["perms"] == "r-xp" and e["Size"] == 16 and e["KernelPageSize"] == 4
    assert e["VmFlags"] == "rd ex mr mw me"
    world.mmap(1, FIXED + H, P, "f", prot="rw")
    assert world.smaps(1)[1]["perms"] == "rw-s"
    assert world.smaps(1)[1]["VmFlags"] == "rd wr sh mr mw me ms"


def _eligible(world, pid=1):
    return [e["THPeligible"] for e in world.smaps(pid)]


def test_thp_eligible_regular_file_per_enabled(world):
    world.file_create("f", 4 * H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * H, "f")
    assert _eligible(world) == [0]  # enabled=madvise without MADV_HUGEPAGE
    world.madvise(1, a, 4 * H, "hugepage")
    assert _eligible(world) == [1]
    world.sysfs_set("enabled", "never")
    assert _eligible(world) == [0]
    world.sysfs_set("enabled", "always")
    world.madvise(1, a, 4 * H, "nohugepage")
    assert _eligible(world) == [0]
    world.madvise(1, a, 4 * H, "hugepage")
    assert _eligible(world) == [1]
    # Another process opening it for write (a shared writable mapping) makes it ineligible.
    world.spawn(2)
    b = world.mmap(2, None, P, "f", prot="rw")
    assert _eligible(world) == [0]
    world.munmap(2, b, P)
    assert _eligible(world) == [1]


def test_thp_eligible_needs_an_aligned_2m_inside_the_vma(make_world):
    world = make_world(enabled="always")
    world.file_create("f", 4 * H)
    world.spawn(1)
    world.mmap(1, FIXED, H - P, "f")  # too short
    world.mmap(1, FIXED + 2 * H + P, 2 * H, "f")  # misaligned against pgoff 0
    world.mmap(1, FIXED + 5 * H + P, 2 * H, "f", offset=P)  # misaligned but congruent
    assert _eligible(world) == [0, 0, 1]


@pytest.mark.parametrize(
    "policy, hugepage, size, expected",
    [
        ("never", True, 4 * H, 0),
        ("always", False, 4 * H, 1),
        ("advise", False, 4 * H, 0),
        ("advise", True, 4 * H, 1),
        ("within_size", False, H, 1),
        ("within_size", False, H - P, 0),
        ("deny", True, 4 * H, 0),
        ("force", False, 4 * H, 1),
    ],
)
def test_thp_eligible_shmem_per_shmem_enabled(make_world, policy, hugepage, size, expected):
    world = make_world(shmem_enabled=policy, enabled="never")
    world.file_create("s", size, shmem=True)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "s", prot="rw")
    if hugepage:
        world.madvise(1, a, 2 * H, "hugepage")
    assert _eligible(world) == [expected]


def test_thp_eligible_shmem_within_size_looks_at_the_vma_offset(make_world):
    world = make_world(shmem_enabled="within_size")
    world.file_create("s", 3 * H - P, shmem=True)
    world.spawn(1)
    world.mmap(1, FIXED, 2 * H, "s", prot="rw", offset=2 * H)
    assert _eligible(world) == [0]  # i_size stops short of the huge page at pgoff 1024
    world.file_truncate("s", 3 * H)
    assert _eligible(world) == [1]


# -- the mmap lock --------------------------------------------------------------------------------


def test_fault_waits_for_a_held_write_lock(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * P, "f")
    held = world.lock(1, 50, write=True)
    assert held.result() == {"pid": 1, "mode": "write", "until_ms": 50}
    assert world.remapper.mms[1].lock.writer
    p = world.start(world.remapper, world.remapper.fault(1, a))
    assert not p.done
    world.advance(49)
    assert not p.done and world.smaps(1)[0]["Rss"] == 0
    world.advance(1)
    assert p.done and p.result() == {"result": "major"}
    assert world.smaps(1)[0]["Rss"] == 4
    assert not world.remapper.mms[1].lock.held()


def test_read_lock_lets_faults_through_but_blocks_munmap(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * P, "f")
    world.lock(1, 30)
    assert world.fault(1, a) == "major"
    p = world.start(world.remapper, world.remapper.munmap(1, a, P))
    assert not p.done
    world.advance(30)
    assert p.result() == {"addr": a, "length": P}
    assert vmas(world, 1) == [(a + P, a + 4 * P, 1)]


def test_lock_waiters_queue_behind_each_other(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * P, "f")
    world.lock(1, 10, write=True)
    second = world.lock(1, 10, write=True)
    assert not second.done
    fault = world.start(world.remapper, world.remapper.fault(1, a))
    world.advance(10)
    assert second.done and second.result()["until_ms"] == 20
    assert not fault.done
    world.advance(10)
    assert fault.result() == {"result": "major"}
    with pytest.raises(UserError) as e:
        world.lock(1, -1).result()
    assert errno_of(e) == "EINVAL"


def test_fork_waits_for_the_parents_mmap_lock(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * P, "f", prot="rw", shared=False)
    world.fault(1, a, write=True)
    world.lock(1, 20)  # dup_mmap needs the write lock: a reader holds it off
    p = world.start(world.remapper, world.remapper.fork(1, 2))
    assert not p.done and 2 not in world.remapper.mms
    world.advance(20)
    assert p.result() == {"pid": 2, "parent": 1}
    assert world.remapper.mms[2].rss["MM_ANONPAGES"] == 1
    assert not world.remapper.mms[1].lock.held()


def test_fork_of_a_parent_that_exits_while_waiting(world):
    world.spawn(1)
    world.lock(1, 20, write=True)
    p = world.start(world.remapper, world.remapper.fork(1, 2))
    world.exit(1)
    world.advance(20)
    with pytest.raises(UserError) as e:
        p.result()
    assert errno_of(e) == "ESRCH"
    assert world.remapper.mms == {}


def test_exit_while_a_fault_waits_for_the_lock(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * P, "f")
    world.lock(1, 10, write=True)
    p = world.start(world.remapper, world.remapper.fault(1, a))
    world.exit(1)
    world.advance(10)
    with pytest.raises(UserError) as e:
        p.result()
    assert errno_of(e) == "ESRCH"
    assert world.collapser.by_name["f"].nrpages == 0  # it never looked the page up


def test_anon_pte_is_not_a_file_mapping(world):
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * P, "f", prot="rw", shared=False)
    world.fault(1, a, write=True)
    entry = world.remapper.mms[1].pmds[a >> HPAGE_PMD_SHIFT]
    assert isinstance(entry, PteTable) and entry.nr_foreign == 1
    assert pte_at(world, 1, a) & PTE_ANON
