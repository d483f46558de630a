"""The fault path against this machine's Linux 6.18: each test reproduces one kernel behaviour the
differential harness (shared/sim/kernel.py) found the model missing, with the kernel's own values
in its comments (observed with ``KernelBackend(huge="advise")``: a private tmpfs mounted
``huge=advise``, which is the model's ``shmem_enabled=advise``; fault_around_bytes 65536, the
default, which this kernel's lockdown keeps us from changing).
"""

from __future__ import annotations

from helpers import FIXED, H, P, cache_pfn, pte_at

from collapsed.pagecache import PG_DIRTY
from remapd.mm import PTE_DIRTY, PTE_WRITE

KB = 1024
A = FIXED  # 0x40000000, as in the kernel reproducers


def shmem_world(make_world, size=2 * H, **knobs):
    """A 4 MiB shmem file (tmpfs huge=advise), process 1."""
    world = make_world(shmem_enabled="advise", **knobs)
    world.file_create("c", size, shmem=True)
    world.spawn(1)
    return world


def rss(world, pid: int = 1) -> list[int]:
    return [e["Rss"] for e in world.smaps(pid)]


def mapped(world, start: int, end: int, pid: int = 1) -> list[int]:
    """Page numbers (from ``start``) of [start, end) that have a PTE or a PMD."""
    return [i for i in range((end - start) // P) if pte_at(world, pid, start + i * P)]


# -- do_fault_around ------------------------------------------------------------------------------


def test_fault_around_window_is_shifted_not_shortened_at_a_vma_start(make_world):
    """mm/memory.c do_fault_around(): ``from_pte = max(ALIGN_DOWN(pte_off, nr_pages), pte_off -
    min(pte_off, vma_off))`` raises the window's start to the VMA's, and ``to_pte =
    min3(from_pte + nr_pages, PTRS_PER_PTE, <VMA end>)`` still reaches nr_pages from there: the
    window moves up, it does not shrink. Only the VMA's end and the PMD's cut it."""
    world = shmem_world(make_world, fault_around_bytes=64 * KB)
    world.file_write("c", 0, 2 * H)
    # Kernel: file write c 0 4M; mmap 1 0x40004000 1M --file c --offset 16K --prot r --shared;
    # fault 1 0x40008000 -> minor, Rss 64; touch 1 0x40004000 64K -> {hit: 16};
    # fault 1 0x40044000 -> minor (the 17th page was not mapped), Rss 128.
    a = world.mmap(1, A + 16 * KB, H // 2, "c", offset=16 * KB, prot="r")
    assert world.fault(1, A + 0x8000) == "minor"
    assert rss(world) == [64]
    assert mapped(world, a, a + 32 * P) == list(range(16))
    assert world.touch(1, a, 64 * KB) == {"hit": 16}
    assert world.fault(1, A + 0x44000) == "minor"
    assert rss(world) == [128]


def test_fault_around_window_is_cut_at_the_vma_end_and_at_the_pmd(make_world):
    """mm/memory.c do_fault_around(): the end is cut at the VMA's end and at the PMD (the
    ``PTRS_PER_PTE`` and ``vma_pages`` terms of ``to_pte``); the start never moves down."""
    world = shmem_world(make_world, fault_around_bytes=64 * KB)
    world.file_write("c", 0, 2 * H)
    # Kernel: mmap 1 0x40000000 80K --file c --prot r --shared; fault 1 0x40012000 -> Rss 16
    # (pages 16..19 only); touch 1 0x40000000 80K -> {minor: 1, hit: 19}, Rss 80.
    a = world.mmap(1, A, 80 * KB, "c", prot="r")
    assert world.fault(1, a + 18 * P) == "minor"
    assert rss(world) == [16]
    assert world.touch(1, a, 80 * KB) == {"minor": 1, "hit": 19}
    assert rss(world) == [80]
    # Kernel: mmap 1 0x401fc000 64K --file c --prot r --shared; fault 1 0x401fc000 -> Rss 16 (the
    # 4 pages up to the PMD boundary); touch 1 0x401fc000 64K -> {hit: 15, minor: 1}, Rss 64.
    b = world.mmap(1, A + H - 4 * P, 64 * KB, "c", prot="r")
    assert world.fault(1, b) == "minor"
    assert rss(world)[1] == 16
    assert world.touch(1, b, 64 * KB) == {"hit": 15, "minor": 1}
    assert rss(world)[1] == 64


# -- vm_page_prot of a shared writable mapping ----------------------------------------------------


def test_read_fault_on_shared_writable_shmem_maps_writable_so_a_write_is_no_fault(make_world):
    """mm/mmap.c vma_wants_writenotify(): shmem has no page_mkwrite and cannot write back
    (mapping_can_writeback() is false), so a shared writable shmem VMA's vm_page_prot is writable
    and set_pte_range() (mm/memory.c; filemap_map_pages for fault-around) maps even a read fault's
    page, and every fault-around page, writable: a later write is no fault at all. The PTE is
    clean until that write; the CPU's dirty bit reaches the folio when the page is unmapped,
    which the model does at once (MarkDirty)."""
    world = shmem_world(make_world, fault_around_bytes=64 * KB)
    # Kernel: mmap 1 0x40000000 4M --file c --prot rw --shared; fault 1 0x40000000 -> minor;
    # fault 1 0x40000000 --write -> hit; Rss 4 throughout.
    a = world.mmap(1, A, 2 * H, "c", prot="rw")
    assert world.fault(1, a) == "minor"
    pte = pte_at(world, 1, a)
    assert pte & PTE_WRITE and not pte & PTE_DIRTY
    assert world.fault(1, a, write=True) == "hit"
    assert pte_at(world, 1, a) & PTE_DIRTY
    assert world.collapser.mem.flags[cache_pfn(world, "c", 0)] & PG_DIRTY
    assert world.fault(1, a, write=True) == "hit"
    assert rss(world) == [4]


def test_fault_around_pages_of_shared_writable_shmem_are_writable_too(make_world):
    """mm/filemap.c filemap_map_pages() -> set_pte_range() with the VMA's writable vm_page_prot;
    a private or read-only mapping of the same file still maps them read-only (a private write
    is a CoW fault)."""
    world = shmem_world(make_world, fault_around_bytes=64 * KB)
    world.file_write("c", 0, 64 * KB)
    # Kernel: file write c 0 64K; mmap rw --shared; fault 1 0x40000000 -> minor, Rss 64;
    # touch 1 0x40000000 64K --write -> {hit: 16}.
    a = world.mmap(1, A, 2 * H, "c", prot="rw")
    assert world.fault(1, a) == "minor"
    assert rss(world) == [64]
    assert world.touch(1, a, 64 * KB, write=True) == {"hit": 16}
    # Kernel: mmap 1 0x40400000 4M --file c --prot rw --private; fault 1 0x40400000 -> minor,
    # Rss 64; fault 1 0x40401000 --write -> minor, Anonymous 4.
    b = world.mmap(1, A + 2 * H, 2 * H, "c", prot="rw", shared=False)
    assert world.fault(1, b) == "minor"
    assert not pte_at(world, 1, b + P) & PTE_WRITE
    assert world.fault(1, b + P, write=True) == "minor"
    assert [e["Anonymous"] for e in world.smaps(1)] == [0, 4]


def test_read_fault_on_a_shared_writable_regular_file_still_maps_read_only(world):
    """mm/mmap.c vma_wants_writenotify(): a regular file's mapping can write back (and its
    filesystem has page_mkwrite: generic_file_vm_ops' filemap_page_mkwrite, ext4_page_mkwrite), so
    a read fault maps it read-only and the first write is a write-protect fault (wp_page_shared).
    Kernel, ext4 on a loop device here: a read, then a write of the same page of a MAP_SHARED
    PROT_READ|PROT_WRITE mapping -> 1 minor fault for the write (getrusage); the same on tmpfs -> 0."""
    world.file_create("f", 4 * P)
    world.spawn(1)
    a = world.mmap(1, A, 4 * P, "f", prot="rw")
    assert world.fault(1, a) == "major"
    assert not pte_at(world, 1, a) & PTE_WRITE
    assert world.fault(1, a, write=True) == "minor"
    assert pte_at(world, 1, a) & PTE_WRITE and pte_at(world, 1, a) & PTE_DIRTY
    assert world.fault(1, a, write=True) == "hit"
