"""The fault path against this machine's Linux 6.18: each test reproduces one kernel behaviour the
differential harness (shared/sim/kernel.py) found the model missing, with the kernel's own values
in its comments (observed with ``KernelBackend(huge="advise")``: a private tmpfs mounted
``huge=advise``, which is the model's ``shmem_enabled=advise``; fault_around_bytes 65536, the
default, which this kernel's lockdown keeps us from changing).
"""

from __future__ import annotations

from helpers import FIXED, H, P, pte_at

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
