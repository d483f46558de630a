"""The memory the model may use and the work one request does are bounded (issue 14, item 3).

``file create big --size 0; file write big 0 1T`` froze collapsed for ~15 minutes and took
~11 GB. The collapser now models a physical memory of ``thpsplit/mem_total_mb``: an allocation
past it fails as the page allocator's would (a write ends short, or fails with ENOMEM when it
wrote nothing; a fault answers nomem; a collapse cannot allocate its huge page), and the model
stays consistent.
"""

from __future__ import annotations

import pytest
from helpers import FIXED, H, P

from shared.errors import UserError
from shared.knobs import Knobs

MB = 1 << 20


def core_write(world, name: str, offset: int, length: int) -> dict:
    """A write straight to the core: a short write's ``written`` is not in the protocol's
    FileStat yet, so the codec round trip of World.file_write would refuse the reply."""
    c = world.collapser
    return world.call(c, c.file_write(name, offset, length))


def fill(world, name: str = "fill") -> int:
    """Use up the modelled memory; returns how many pages that took."""
    world.file_create(name, 0)
    st = core_write(world, name, 0, 1 << 40)
    assert st["written"] == st["nrpages"] * P
    return st["nrpages"]


def test_the_knob_defaults_to_8_gib_and_sysfs_bounds_it():
    k = Knobs()
    assert k.mem_total_mb == 8192
    assert k.validate("thpsplit/mem_total_mb", "4") == 4
    for bad in ("3", str(1 << 17), "-1"):
        with pytest.raises(ValueError):
            k.validate("thpsplit/mem_total_mb", bad)


def test_a_1t_write_ends_short_within_the_memory_size(make_world):
    world = make_world(mem_total_mb=64)
    c = world.collapser
    world.file_create("big", 0)
    st = core_write(world, "big", 0, 1 << 40)
    total = 64 * MB // P
    assert st["nrpages"] == total and st["written"] == total * P and st["size"] == total * P
    assert len(c.mem.ref) <= total + 512  # block 0 is never handed out
    assert world.remapper.files[c.by_name["big"].ino].size == total * P
    world.check()
    # Full: a write that needs a page gets ENOMEM and changes nothing; one over cached pages
    # needs no memory.
    with pytest.raises(UserError) as err:
        core_write(world, "big", total * P + 100, P)
    assert err.value.errno_name == "ENOMEM"
    assert c.by_name["big"].size == total * P
    assert "written" not in core_write(world, "big", 0, 2 * P)
    world.check()


def test_freed_memory_is_used_again(make_world):
    world = make_world(mem_total_mb=16)
    first = fill(world)
    size = len(world.collapser.mem.ref)
    world.file_truncate("fill", 0)
    assert fill(world, "again") == first
    assert len(world.collapser.mem.ref) == size
    world.check()


def test_a_short_write_starting_inside_a_page(make_world):
    world = make_world(mem_total_mb=4)
    world.file_create("f", 0)
    world.file_create("hog", 0)
    core_write(world, "hog", 0, (1024 - 3) * P)  # three pages left
    st = core_write(world, "f", 100, 10 * P)
    assert st["nrpages"] == 3 and st["written"] == 3 * P - 100 and st["size"] == 3 * P
    world.check()


def test_a_fault_with_memory_full_answers_nomem_and_maps_nothing(make_world):
    world = make_world(mem_total_mb=4, fault_around_bytes=65536)
    c = world.collapser
    world.file_create("f", 16 * P)
    world.file_write("f", 0, 8 * P)  # cached, so fault-around maps them
    fill(world)
    world.spawn(1)
    a = world.mmap(1, FIXED, 16 * P, "f")
    majors = world.vmstat()["pgmajfault"]
    assert world.fault(1, a + 9 * P) == "nomem"
    f = c.by_name["f"]
    assert all(c.mem.mapcount[f.get(i)] == 0 for i in range(8))
    assert world.vmstat()["pgmajfault"] == majors
    world.check()
    # Memory back: the same fault maps the page (and the pages around it).
    world.file_truncate("fill", 0)
    assert world.fault(1, a + 9 * P) == "major"
    assert c.mem.mapcount[f.get(0)] == 1
    world.check()


def test_a_shmem_fault_with_memory_full_answers_nomem(make_world):
    world = make_world(mem_total_mb=4, shmem_enabled="always")
    world.file_create("s", H, shmem=True)
    fill(world)
    world.spawn(1)
    a = world.mmap(1, FIXED, H, "s", prot="rw")
    assert world.fault(1, a, write=True) == "nomem"
    assert world.vmstat()["thp_file_fallback"] == 1  # no block for a huge page, nor a small one
    world.check()


def test_madv_collapse_with_memory_full_is_enomem(make_world):
    world = make_world(mem_total_mb=4)
    world.file_create("f", H)
    world.spawn(1)
    a = world.mmap(1, FIXED, H, "f")
    world.touch(1, a, H)
    fill(world)
    assert world.madvise(1, a, H, "collapse") == "ENOMEM"
    assert world.vmstat()["thp_collapse_alloc_failed"] == 1
    world.check()


def test_collapse_file_that_cannot_read_a_missing_page_fails(make_world):
    """collapse_file reads in the holes of a regular file's range; with memory full that
    readahead brings nothing and filemap_lock_folio fails: SCAN_FAIL, all rolled back."""
    world = make_world(mem_total_mb=4)  # two blocks
    world.file_create("f", H)
    world.spawn(1)
    a = world.mmap(1, FIXED, H, "f")
    world.touch(1, a, H // 2)  # half of the range cached, in the first block
    world.file_create("hog", 0)
    core_write(world, "hog", 0, H // 2)  # the rest of the first block
    # One block left: the huge page gets it, and the holes find no memory.
    assert world.madvise(1, a, H, "collapse") == "EINVAL"
    assert world.collapser.khugepaged.results == {"SCAN_FAIL": 1}
    assert world.vmstat()["thp_collapse_alloc"] == 1
    f = world.collapser.by_name["f"]
    assert f.nr_thps == 0 and f.nrpages == 256
    world.check()
