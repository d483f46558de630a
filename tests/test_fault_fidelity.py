"""The fault path against this machine's Linux 6.18: each test reproduces one kernel behaviour the
differential harness (shared/sim/kernel.py) found the model missing, with the kernel's own values
in its comments (observed with ``KernelBackend(huge="advise")``: a private tmpfs mounted
``huge=advise``, which is the model's ``shmem_enabled=advise``; fault_around_bytes 65536, the
default, which this kernel's lockdown keeps us from changing).
"""

from __future__ import annotations

from helpers import FIXED, H, P, cache_pfn, pte_at

from collapsed.pagecache import PG_DIRTY, PG_HEAD
from remapd.mm import PTE_DIRTY, PTE_WRITE
from shared.protocol import messages as m
from shared.protocol.codec import from_wire, to_wire

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


def test_read_fault_past_eof_maps_the_window_below_eof_first(make_world):
    """Conformance #20. do_read_fault() (mm/memory.c) calls do_fault_around() before __do_fault():
    filemap_map_pages() maps the window's cached pages up to EOF, and only then does
    shmem_fault() answer SIGBUS for the page itself. A write fault has no fault-around.
    (Kernel: file write c 0 4100K; mmap 1 0x40000000 8M --prot r --shared; fault 1 0x40403000
    -> sigbus, Rss 4.)"""
    world = shmem_world(make_world, fault_around_bytes=64 * KB)
    world.file_write("c", 0, 4100 * KB)  # 1025 pages: the last cached index is 1024
    a = world.mmap(1, A, 4 * H, "c", prot="rw")
    assert world.fault(1, a + 0x403000, write=True) == "sigbus"
    assert rss(world) == [0]
    assert world.fault(1, a + 0x403000) == "sigbus"
    assert rss(world) == [4]
    assert mapped(world, a + 0x400000, a + 0x410000) == [0]
    assert world.fault(1, a + 0x400000) == "hit"
    world.munmap(1, a, 4 * H)
    world.check()


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


# -- a cached large folio that cannot be PMD-mapped -----------------------------------------------


def collapsed_shmem(world) -> int:
    """Process 1 maps c's first 2 MiB shared and MADV_COLLAPSEs it (one page written first, as
    the kernel reproducer does); returns the THP's head pfn."""
    world.file_write("c", 0, 4 * KB)
    a = world.mmap(1, A, H, "c", prot="rw")
    assert world.madvise(1, a, H, "collapse") == 0
    return cache_pfn(world, "c", 0)


def test_cached_thp_in_a_nohugepage_vma_is_mapped_whole_with_ptes(make_world):
    """mm/filemap.c filemap_map_pages() -> filemap_map_folio_range(): fault-around maps a large
    folio whole when it lies inside the VMA and one page table (do_set_pmd refused the PMD:
    vma_thp_disabled() for VM_NOHUGEPAGE). mm/memory.c finish_fault() does the same for a fault
    that does not fault around (a shared write fault, do_shared_fault), when every PTE of the
    folio is none (pte_range_none)."""
    world = shmem_world(make_world, fault_around_bytes=64 * KB)
    head = collapsed_shmem(world)
    # Kernel: ...; madvise 1 A 2M collapse; proc spawn 2; mmap 2 A 2M --file c --prot rw
    # --shared; madvise 2 A 2M nohugepage; fault 2 0x40100000 -> minor, process 2 Rss 2048,
    # ShmemPmdMapped 0 (and thp_file_mapped unchanged).
    world.spawn(2)
    b = world.mmap(2, A, H, "c", prot="rw")
    world.madvise(2, b, H, "nohugepage")
    mapped = world.vmstat()["thp_file_mapped"]
    assert world.fault(2, A + H // 2) == "minor"
    e = world.smaps(2)[0]
    assert (e["Rss"], e["ShmemPmdMapped"]) == (2048, 0)
    assert world.vmstat()["thp_file_mapped"] == mapped
    mem = world.collapser.mem
    assert all(mem.mapcount[head + i] == 1 for i in range(512))
    assert world.touch(2, b, H, stride=64 * KB) == {"hit": 32}
    # Kernel: the same with fault 2 0x40100000 --write (no fault-around: finish_fault) -> minor,
    # Rss 2048; fault 2 0x40000000 --write -> hit.
    world.spawn(3)
    c = world.mmap(3, A, H, "c", prot="rw")
    world.madvise(3, c, H, "nohugepage")
    assert world.fault(3, A + H // 2, write=True) == "minor"
    assert world.smaps(3)[0]["Rss"] == 2048
    assert world.fault(3, A, write=True) == "hit"
    # finish_fault does not look at fault_around_bytes: with fault-around off (one page; this
    # kernel's lockdown keeps debugfs from setting it) a read fault maps the whole folio too.
    world.sysfs_set("thpsplit/fault_around_bytes", "4096")
    world.spawn(4)
    d = world.mmap(4, A, H, "c", prot="r")
    world.madvise(4, d, H, "nohugepage")
    assert world.fault(4, A + H // 2) == "minor"
    assert world.smaps(4)[0]["Rss"] == 2048


def test_fault_around_maps_a_split_pmd_thp_whole_around_a_cow_page(make_world):
    """mm/filemap.c filemap_map_folio_range(): fault-around maps every none PTE of the folio and
    skips the present ones (here a private CoW copy), as long as the folio lies inside the VMA
    and the page table. Without fault-around (fault_around_bytes 4096) finish_fault() would need
    every PTE none (pte_range_none) and maps the one page instead."""
    world = shmem_world(make_world, fault_around_bytes=64 * KB)
    # Kernel: mmap 1 A 2M --file c --prot rw --private; madvise 1 A 2M hugepage; fault 1 A ->
    # pmd; fault 1 0x40080000 --write -> minor (thp_split_pmd 1, Rss 4, Anonymous 4);
    # fault 1 0x40100000 -> minor, Rss 2048, Anonymous 4; fault 1 0x40080000 -> hit.
    a = world.mmap(1, A, H, "c", prot="rw", shared=False)
    world.madvise(1, a, H, "hugepage")
    assert world.fault(1, a) == "pmd"
    assert world.fault(1, a + H // 4, write=True) == "minor"
    assert [(e["Rss"], e["Anonymous"]) for e in world.smaps(1)] == [(4, 4)]
    assert world.fault(1, a + H // 2) == "minor"
    assert [(e["Rss"], e["Anonymous"]) for e in world.smaps(1)] == [(2048, 4)]
    assert world.fault(1, a + H // 4) == "hit"
    table = world.remapper.mms[1].pmds[a >> 21]
    assert table.nr == 512 and table.nr_foreign == 1 and not table.mark
    # The same without fault-around: finish_fault finds the CoW PTE and maps one page.
    world.sysfs_set("thpsplit/fault_around_bytes", "4096")
    world.madvise(1, a + H // 2, H // 2, "dontneed")
    assert world.fault(1, a + H // 2) == "minor"
    assert [(e["Rss"], e["Anonymous"]) for e in world.smaps(1)] == [(1024 + 4, 4)]


def test_a_thp_that_starts_before_the_vma_is_mapped_one_page_per_fault(make_world):
    """mm/memory.c finish_fault(): the whole folio only if it lies inside the VMA (``vma_off <
    idx`` falls back to one page), and fault-around (filemap_map_folio_range's
    folio_within_vma()) keeps to its window."""
    world = shmem_world(make_world, fault_around_bytes=64 * KB)
    # Kernel: mmap 1 A 2M --file c --prot rw --shared; madvise 1 A 2M hugepage; fault 1 A -> pmd;
    # munmap 1 A 4K (thp_split_pmd 1, Rss 0); fault 1 0x40100000 --write -> minor, Rss 4;
    # fault 1 0x40001000 --write -> minor, Rss 8.
    a = world.mmap(1, A, H, "c", prot="rw")
    world.madvise(1, a, H, "hugepage")
    assert world.fault(1, a) == "pmd"
    world.munmap(1, a, P)
    assert rss(world) == [0]
    assert world.fault(1, A + H // 2, write=True) == "minor"
    assert rss(world) == [4]
    assert world.fault(1, A + P, write=True) == "minor"
    assert rss(world) == [8]


def test_a_regular_file_thp_past_eof_is_neither_pmd_mapped_nor_mapped_whole(make_world):
    """mm/memory.c finish_fault() and mm/filemap.c filemap_map_pages() (6.18, "mm/memory: do not
    populate page table entries beyond i_size"): a regular file's large folio that reaches past
    i_size gets no PMD and is not mapped whole (``needs_fallback``, ``can_map_large``), so an
    access past EOF still raises SIGBUS; fault-around stops at the file's last page. (Shmem is
    exempt.) Here the THP outlives a truncate into it because it was written: __folio_split's
    filemap_release_folio cannot free ext4's dirty buffers, and truncate_inode_partial_folio
    keeps a dirty folio it could not split (a clean one, say pinned, would leave the cache).
    (Retry policy ``none``: the remapper's own pass over marked tables stays out of it.)"""
    world = make_world(retry_policy="none")
    world.file_create("f", H, fs="large-folio")
    world.file_write("f", 0, H)  # write_begin: one PMD-order folio
    head = cache_pfn(world, "f", 0)
    world.file_truncate("f", H // 2)
    assert world.collapser.mem.flags[head] & PG_HEAD  # kept whole: the split was refused
    world.spawn(1)
    a = world.mmap(1, A, H, "f")
    assert world.fault(1, a + 5 * P) == "minor"
    assert rss(world) == [4] and not world.smaps(1)[0]["FilePmdMapped"]
    assert world.fault(1, a + H // 2) == "sigbus"
    world.sysfs_set("thpsplit/fault_around_bytes", "65536")
    assert world.fault(1, a + H // 2 - P) == "minor"
    assert rss(world) == [4 + 64]  # the window [240, 256), cut at EOF; not the whole THP


# -- shmem's folio size at fault: the VMA and the page cache, never the page table ----------------


def test_private_cow_write_fault_allocates_the_pmd_size_folio(make_world):
    """mm/memory.c do_cow_fault() -> __do_fault() -> mm/shmem.c shmem_fault() ->
    shmem_get_folio_gfp(): the sizes it may allocate (shmem_allowable_huge_orders,
    shmem_suitable_orders) depend on the VMA (VM_HUGEPAGE under huge=advise, the aligned range
    inside it) and the page cache only, so a private write fault into a hole fills it with a
    PMD-order folio and copies one page of it; no PMD is mapped (the fault maps the copy)."""
    world = shmem_world(make_world, fault_around_bytes=64 * KB)
    # Kernel: mmap 1 A 4M --file c --prot rw --private; madvise 1 A 4M hugepage;
    # fault 1 A --write -> minor, Rss 4, Anonymous 4, thp_file_alloc 1, nr_shmem_hugepages 1,
    # 512 pages cached; fault 1 0x40001000 -> minor, Rss 2048, Anonymous 4 (fault-around maps
    # the rest of the THP around the copy); fault 1 0x40200000 --write -> minor, Rss 2052,
    # Anonymous 8, thp_file_alloc 2.
    a = world.mmap(1, A, 2 * H, "c", prot="rw", shared=False)
    world.madvise(1, a, 2 * H, "hugepage")
    assert world.fault(1, a, write=True) == "minor"
    assert [(e["Rss"], e["Anonymous"]) for e in world.smaps(1)] == [(4, 4)]
    assert world.vmstat()["thp_file_alloc"] == 1 and world.vmstat()["nr_shmem_hugepages"] == 1
    assert world.collapser.by_name["c"].nrpages == 512
    assert world.fault(1, a + P) == "minor"
    assert [(e["Rss"], e["Anonymous"]) for e in world.smaps(1)] == [(2048, 4)]
    assert world.fault(1, a + H, write=True) == "minor"
    assert [(e["Rss"], e["Anonymous"]) for e in world.smaps(1)] == [(2052, 8)]
    assert world.vmstat()["thp_file_alloc"] == 2 and world.vmstat()["thp_file_mapped"] == 0


def test_shmem_allocates_the_pmd_size_folio_over_an_existing_page_table(make_world):
    """mm/shmem.c shmem_get_folio_gfp(): the PMD-order folio is allocated although a page table
    is already there (do_set_pmd then refuses the PMD), and mm/memory.c finish_fault() maps it
    whole with PTEs, every PTE of it being none."""
    world = shmem_world(make_world, fault_around_bytes=64 * KB)
    # Kernel: mmap 1 A 4M --file c --prot rw --shared; fault 1 A -> minor, Rss 4;
    # file punch c 0 4K (Rss 0, the page table stays); madvise 1 A 4M hugepage; fault 1 A ->
    # minor, Rss 2048, ShmemPmdMapped 0, thp_file_alloc 1; fault 1 0x40100000 --write -> hit.
    a = world.mmap(1, A, 2 * H, "c", prot="rw")
    assert world.fault(1, a) == "minor"
    world.file_punch("c", 0, P)
    assert rss(world) == [0]
    world.madvise(1, a, 2 * H, "hugepage")
    assert world.fault(1, a) == "minor"
    e = world.smaps(1)[0]
    assert (e["Rss"], e["ShmemPmdMapped"]) == (2048, 0)
    assert world.vmstat()["thp_file_alloc"] == 1 and world.vmstat()["thp_file_mapped"] == 0
    assert world.fault(1, a + H // 2, write=True) == "hit"


def test_a_pte_mapped_shmem_thp_past_eof_makes_those_accesses_succeed(make_world):
    """mm/shmem.c shmem_get_folio_gfp() allocates a PMD-order folio that reaches past i_size
    (huge=advise, VM_HUGEPAGE), and finish_fault() maps it whole: shmem is exempt from the
    i_size rule ("for long time intentionally mapped with PMDs across i_size"), so the accesses
    past EOF that it covers hit a PTE instead of raising SIGBUS."""
    world = shmem_world(make_world, size=3 * H // 2, fault_around_bytes=64 * KB)
    # Kernel: file create c --size 3M --shmem; mmap 1 A 4M --file c --prot rw --shared;
    # fault 1 0x40200000 -> minor; file punch c 2M 4K; madvise 1 A 4M hugepage;
    # fault 1 0x40200000 -> minor, Rss 2048, thp_file_alloc 1; fault 1 0x40380000 -> hit (past
    # EOF); fault 1 0x40380000 --write -> hit; touch 1 0x40200000 2M --stride 256K -> {hit: 8}.
    a = world.mmap(1, A, 2 * H, "c", prot="rw")
    assert world.fault(1, a + H) == "minor"
    world.file_punch("c", H, P)
    world.madvise(1, a, 2 * H, "hugepage")
    assert world.fault(1, a + H) == "minor"
    assert rss(world) == [2048] and world.vmstat()["thp_file_alloc"] == 1
    assert world.fault(1, a + H + 3 * H // 4) == "hit"
    assert world.fault(1, a + H + 3 * H // 4, write=True) == "hit"
    assert world.touch(1, a + H, H, stride=H // 8) == {"hit": 8}
    # Where nothing maps it, past EOF is still SIGBUS (shmem_get_folio_gfp's i_size check).
    world.spawn(2)
    b = world.mmap(2, A, 2 * H, "c", prot="rw")
    world.madvise(2, b, 2 * H, "nohugepage")
    assert world.fault(2, b + H + 3 * H // 4) == "sigbus"


def test_no_thp_at_fault_in_a_nohugepage_vma_even_under_always(make_world):
    """mm/shmem.c shmem_allowable_huge_orders(): vma_thp_disabled() (VM_NOHUGEPAGE) allows no
    huge order, whatever huge= says, for shared and for private (CoW) faults alike."""
    world = make_world(shmem_enabled="always", fault_around_bytes=64 * KB)
    world.file_create("c", 2 * H, shmem=True)
    world.spawn(1)
    # Kernel (tmpfs huge=always): mmap 1 A 4M --file c --prot rw --shared; madvise 1 A 4M
    # nohugepage; fault 1 A -> minor, Rss 4; mmap 1 0x40400000 4M --file c --prot rw --private;
    # madvise ... nohugepage; fault 1 0x40600000 --write -> minor, Anonymous 4; thp_file_alloc 0.
    a = world.mmap(1, A, 2 * H, "c", prot="rw")
    world.madvise(1, a, 2 * H, "nohugepage")
    assert world.fault(1, a) == "minor"
    b = world.mmap(1, A + 2 * H, 2 * H, "c", prot="rw", shared=False)
    world.madvise(1, b, 2 * H, "nohugepage")
    assert world.fault(1, b + H, write=True) == "minor"
    assert [(e["Rss"], e["Anonymous"]) for e in world.smaps(1)] == [(4, 0), (4, 4)]
    assert world.vmstat()["thp_file_alloc"] == 0


def test_private_cow_write_over_a_hole_with_a_page_table_allocates_the_thp(make_world):
    """mm/memory.c do_cow_fault() -> shmem_fault(): neither the page table nor the CoW decides
    the folio size; fault-around then maps the THP around the copy (filemap_map_folio_range)."""
    world = make_world(shmem_enabled="always", fault_around_bytes=64 * KB)
    world.file_create("c", 2 * H, shmem=True)
    world.spawn(1)
    # Kernel (tmpfs huge=always): mmap 1 A 4M --file c --prot rw --private; madvise 1 A 4M
    # nohugepage; fault 1 A -> minor (a small page); file punch c 0 4K; madvise 1 A 4M hugepage;
    # fault 1 0x40001000 --write -> minor, Rss 4, Anonymous 4, thp_file_alloc 1;
    # fault 1 0x40002000 -> minor, Rss 2048, Anonymous 4.
    a = world.mmap(1, A, 2 * H, "c", prot="rw", shared=False)
    world.madvise(1, a, 2 * H, "nohugepage")
    assert world.fault(1, a) == "minor"
    world.file_punch("c", 0, P)
    world.madvise(1, a, 2 * H, "hugepage")
    assert world.fault(1, a + P, write=True) == "minor"
    assert [(e["Rss"], e["Anonymous"]) for e in world.smaps(1)] == [(4, 4)]
    assert world.vmstat()["thp_file_alloc"] == 1
    assert world.fault(1, a + 2 * P) == "minor"
    assert [(e["Rss"], e["Anonymous"]) for e in world.smaps(1)] == [(2048, 4)]


def test_a_new_thp_over_a_cow_page_is_mapped_by_finish_fault_one_page(make_world):
    """mm/memory.c do_read_fault(): fault-around runs before ->fault, so a folio that
    shmem_fault() allocates for this fault is mapped by finish_fault(), which maps a large folio
    whole only if every PTE of it is none (pte_range_none) and else maps the one page; the next
    read fault finds it cached and fault-around (filemap_map_folio_range) maps the rest around
    the CoW copy."""
    world = shmem_world(make_world, fault_around_bytes=64 * KB)
    # Kernel: mmap 1 A 4M --file c --prot rw --private; madvise 1 A 4M hugepage;
    # fault 1 0x40001000 --write -> minor (thp_file_alloc 1, Anonymous 4); file punch c 0 2M
    # (the private copy stays: shmem_fallocate unmaps with even_cows=0); fault 1 A -> minor,
    # Rss 8, thp_file_alloc 2; fault 1 0x40002000 -> minor, Rss 2048, Anonymous 4.
    a = world.mmap(1, A, 2 * H, "c", prot="rw", shared=False)
    world.madvise(1, a, 2 * H, "hugepage")
    assert world.fault(1, a + P, write=True) == "minor"
    # The punch, keeping private copies as shmem_fallocate(PUNCH_HOLE) does.
    c = world.collapser
    world.call(c, c.fileops.truncate_range(c.by_name["c"], 0, 512, even_cows=False))
    assert [(e["Rss"], e["Anonymous"]) for e in world.smaps(1)] == [(4, 4)]
    assert world.fault(1, a) == "minor"
    assert [(e["Rss"], e["Anonymous"]) for e in world.smaps(1)] == [(8, 4)]
    assert world.vmstat()["thp_file_alloc"] == 2
    assert world.fault(1, a + 2 * P) == "minor"
    assert [(e["Rss"], e["Anonymous"]) for e in world.smaps(1)] == [(2048, 4)]


def test_the_new_peer_fields_keep_protocol_2_wire_compatible():
    """LookupPage.thp_ok and PageAnswer.allocated were added within protocol 2, at the end and
    with defaults: a message from a peer that predates them decodes, to the old behaviour."""
    old_lookup = ["peer.lookup_page", {"req": 1, "ino": 2, "index": 3, "purpose": "map", "write": False,
                                       "pmd_ok": True, "vm_hugepage": False, "around": [4, 5]}]
    msg = from_wire(old_lookup)
    assert isinstance(msg, m.LookupPage) and msg.thp_ok is False and msg.around == (4, 5)
    old_answer = ["peer.page", {"req": 1, "status": "ok", "pfn": 7, "head": 7, "thp": False, "pmd": False,
                                "major": True, "shmem": False, "around": []}]
    msg = from_wire(old_answer)
    assert isinstance(msg, m.PageAnswer) and msg.allocated is False and msg.major is True
    new = m.LookupPage(1, 2, 3, m.Purpose.COPY, True, False, True, (), True)
    assert from_wire(to_wire(new)) == new


def test_a_write_after_writeback_faults_again_on_a_regular_file(make_world):
    """mm/page-writeback.c folio_clear_dirty_for_io() -> mm/rmap.c folio_mkclean(): writeback
    write-protects the PTEs of a page it cleans, so with write-notify (vma_wants_writenotify) the
    next write through a shared mapping is a write-protect fault that dirties the page again
    (page_mkwrite). Kernel, ext4 on a loop device here, per page of a MAP_SHARED
    PROT_READ|PROT_WRITE mapping: first write 1 minor fault, second write 0, fsync, third write 1."""
    world = make_world(fault_around_bytes=4096, writeback_millisecs=100)
    world.file_create("f", 8 * P)
    world.file_write("f", 0, 8 * P)
    world.spawn(1)
    a = world.mmap(1, A, 8 * P, "f", prot="rw")
    pfn = cache_pfn(world, "f", 3)
    mem = world.collapser.mem
    assert world.fault(1, a + 3 * P, write=True) == "minor"
    assert world.fault(1, a + 3 * P, write=True) == "hit"
    world.file_sync("f")
    world.advance(200)  # writeback ends: the page is clean, its PTE read-only
    assert not mem.flags[pfn] & PG_DIRTY
    assert not pte_at(world, 1, a + 3 * P) & PTE_WRITE
    assert world.fault(1, a + 3 * P) == "hit"  # still mapped
    assert world.fault(1, a + 3 * P, write=True) == "minor"
    assert mem.flags[pfn] & PG_DIRTY
    assert world.fault(1, a + 3 * P, write=True) == "hit"


# -- zap_pte_range's PT reclaim ------------------------------------------------------------------


def test_dontneed_frees_the_pte_tables_it_empties(make_world):
    """Conformance #22. MADV_DONTNEED zaps with zap_details.reclaim_pt (CONFIG_PT_RECLAIM=y here):
    zap_pte_range() frees a PTE table whose whole PMD range it zapped and left empty
    (reclaim_pt_is_enabled, try_get_and_clear_pmd in mm/pt_reclaim.c). The PMD is none again, so
    the next fault can map a THP with a PMD (do_set_pmd needs pmd_none). A zap of part of a PMD
    range keeps the table. (Kernel: mmap 4M shared; fault 0x40200000; madvise 4M dontneed;
    madvise 4M hugepage; file punch c 2M 2M; fault 0x40200000 -> ShmemPmdMapped 2048.)"""
    world = shmem_world(make_world)
    world.mmap(1, A, 2 * H, "c", prot="rw")
    world.fault(1, A + H)
    world.fault(1, A)
    mm = world.remapper.mms[1]
    assert mm.nr_ptes == 2
    assert world.madvise(1, A, H - P, "dontneed") == 0
    assert mm.nr_ptes == 2  # a part of the first PMD: its table stays
    assert world.madvise(1, A, 2 * H, "dontneed") == 0
    assert mm.nr_ptes == 0 and not mm.pmds
    assert world.madvise(1, A, 2 * H, "hugepage") == 0
    world.file_punch("c", H, H)
    assert world.fault(1, A + H) == "pmd"
    assert [e["ShmemPmdMapped"] for e in world.smaps(1)] == [2048]
    world.check()
