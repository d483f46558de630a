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

from shared import messages as m
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
    assert core_write(world, "big", 0, 2 * P)["written"] == 2 * P  # all of it: not a short write
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


# -- long loops give the CPU away between chunks (cond_resched) ---------------------------------

CHUNK = 64


def resched_world(make_world, **knobs):
    """A world whose collapser yields every CHUNK pages, as a daemon's does (RESCHED_PAGES): in
    one burst a loop does a chunk, goes on past the sleep that is already due, does a second,
    and then waits a jiffy of model time (shared.actor.RESCHED_MS)."""
    world = make_world(**knobs)
    world.collapser.fileops.resched_pages = CHUNK
    return world


def test_daemons_pass_a_bounded_chunk():
    from collapsed.collapser import RESCHED_PAGES, Collapser

    assert 0 < RESCHED_PAGES <= 4096
    assert Collapser(resched_pages=RESCHED_PAGES).fileops.resched_pages == RESCHED_PAGES
    assert Collapser().fileops.resched_pages is None


def test_a_long_write_spans_several_bursts(make_world):
    world = resched_world(make_world)
    c = world.collapser
    world.file_create("f", 0)
    f = c.by_name["f"]
    write = world.start(c, c.file_write("f", 0, 1000 * P))
    assert not write.done
    # Two chunks in the first burst; i_size (and the remapper's) covers what is written.
    assert f.nrpages == 2 * CHUNK and f.size == 2 * CHUNK * P
    assert world.remapper.files[f.ino].size == 2 * CHUNK * P
    world.advance(1)
    assert not write.done and f.nrpages == 4 * CHUNK
    world.advance(10)
    assert write.done and write.result()["nrpages"] == 1000 and f.size == 1000 * P


def test_a_fault_during_a_long_write_sees_what_is_written_so_far(make_world):
    world = resched_world(make_world)
    c = world.collapser
    world.file_create("f", 0)
    world.spawn(1)
    a = world.mmap(1, FIXED, 1000 * P, "f")
    write = world.start(c, c.file_write("f", 0, 1000 * P))
    assert world.fault(1, a + 10 * P) == "minor"  # written and cached
    assert world.fault(1, a + 900 * P) == "sigbus"  # past i_size until the write gets there
    world.advance(10)
    assert write.done and world.fault(1, a + 900 * P) == "minor"


def test_a_truncate_waits_for_a_long_write_to_finish(make_world):
    """The inode lock: a truncate arriving between the write's chunks runs after it, as in the
    kernel, rather than in its middle (which would leave the write's later pages past EOF)."""
    world = resched_world(make_world)
    c = world.collapser
    world.file_create("f", 0)
    f = c.by_name["f"]
    write = world.start(c, c.file_write("f", 0, 1000 * P))
    truncate = world.start(c, c.file_truncate("f", 0))
    punch = world.start(c, c.file_punch("f", 0, 8 * P))
    assert not truncate.done and not punch.done
    world.advance(10)
    assert write.result()["size"] == 1000 * P and write.result()["nrpages"] == 1000
    world.advance(10)
    assert truncate.done and punch.done
    assert (f.size, f.nrpages, f.chunks) == (0, 0, {})
    world.check()


def test_a_long_write_still_sleeps_on_a_locked_page(make_world):
    world = resched_world(make_world)
    c = world.collapser
    world.file_create("f", 1000 * P)
    world.file_write("f", 300 * P, P)
    world._checking = False  # page 300 stays locked (for the remapper) a while
    c.deliver(m.LockFolio(1, c.by_name["f"].ino, 300))
    (answer,) = [msg for msg in c.outbox if isinstance(msg, m.FolioAnswer)]
    c.outbox.remove(answer)
    write = world.start(c, c.file_write("f", 0, 1000 * P))
    world.advance(100)
    f = c.by_name["f"]
    assert not write.done and f.nrpages == 301  # pages 0..299, and the locked one
    c.deliver(m.UnlockFolio(answer.pfn))
    world._checking = True
    world.advance(10)
    assert write.done and f.nrpages == 1000
    world.check()


def test_a_long_truncate_and_drop_caches_span_several_bursts(make_world):
    world = resched_world(make_world)
    c = world.collapser
    world.file_create("f", 0)
    world.start(c, c.file_write("f", 0, 1000 * P))
    world.advance(10)
    world.file_sync("f")
    world.advance(1000)  # clean now
    truncate = world.start(c, c.file_truncate("f", 500 * P))
    assert not truncate.done
    world.advance(10)
    assert truncate.done and c.by_name["f"].nrpages == 500
    drop = world.start(c, c.drop_caches())
    assert not drop.done
    world.advance(10)
    assert drop.result() == {"dropped_pages": 500}
    world.check()


def test_reclaim_of_many_pages_spans_several_bursts(make_world):
    world = resched_world(make_world)
    c = world.collapser
    world.file_create("f", 1000 * P)
    world.spawn(1)
    a = world.mmap(1, FIXED, 1000 * P, "f")
    world.touch(1, a, 1000 * P)  # read in: clean pages
    assert world.madvise(1, a, 1000 * P, "pageout") == 0
    f = c.by_name["f"]
    assert 0 < f.nrpages < 1000
    world.advance(10)
    assert f.nrpages == 0
    world.check()
