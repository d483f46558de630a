"""The madvise/mmap/VMA path against this machine's kernel (6.18): each test reproduces one
behaviour the differential harness found the model getting wrong (/tmp/conf/DIVERGENCES.md), or a
syscall added for it, and names the kernel function it follows. The kernel's own values, observed
with shared/sim/kernel.py (KernelBackend, tmpfs huge=advise unless said otherwise) on the same
steps, are in the comments; the model must match them.
"""

from __future__ import annotations

import pytest
from helpers import FIXED, P

from shared.errors import UserError
from shared.units import HPAGE_PMD_SHIFT

A = FIXED
M = 1 << 20


def layout(world, pid: int, *fields: str) -> list[tuple]:
    """(start, end, *fields) of every VMA of ``pid``, from smaps."""
    return [(e["start"], e["end"], *(e[f] for f in fields)) for e in world.smaps(pid)]


def flags(world, pid: int) -> list[str]:
    """hg/nh of every VMA ('' for neither)."""
    out = []
    for e in world.smaps(pid):
        vm = e["VmFlags"].split()
        out.append("hg" if "hg" in vm else "nh" if "nh" in vm else "")
    return out


# -- madvise(MADV_HUGEPAGE / MADV_NOHUGEPAGE) -------------------------------------------------------


def test_madvise_hugepage_on_a_vma_that_already_has_it_keeps_the_pmd(make_world):
    """mm/madvise.c madvise_update_vma(): when the new vm_flags equal the VMA's, it returns before
    vma_modify_flags(), so nothing is split (no PMD split at the range's edges) or merged.

    Kernel (tmpfs huge=advise), step by step: the fault maps a PMD (thp_file_alloc +1,
    thp_file_mapped +1); each repeated MADV_HUGEPAGE (4K inside, and 3M from inside to the end)
    returns 0 and leaves one VMA, Rss 2048, ShmemPmdMapped 2048, thp_split_pmd +0. The
    MADV_NOHUGEPAGE of 4K then splits it in three (hg, nh, hg), thp_split_pmd +1, Rss 0 in each.
    """
    world = make_world(shmem_enabled="advise")
    world.file_create("c", 4 * M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, 4 * M, "c", prot="rw", shared=True)
    assert world.madvise(1, A, 4 * M, "hugepage") == 0
    assert world.fault(1, A) == "pmd"
    splits = world.vmstat()["thp_split_pmd"]

    assert world.madvise(1, A + M, 4 * 1024, "hugepage") == 0
    assert world.madvise(1, A + M, 3 * M, "hugepage") == 0
    assert layout(world, 1, "Rss", "ShmemPmdMapped") == [(A, A + 4 * M, 2048, 2048)]
    assert world.vmstat()["thp_split_pmd"] == splits

    assert world.madvise(1, A + M, 4 * 1024, "nohugepage") == 0
    assert layout(world, 1, "Rss") == [(A, A + M, 0), (A + M, A + M + P, 0), (A + M + P, A + 4 * M, 0)]
    assert flags(world, 1) == ["hg", "nh", "hg"]
    assert world.vmstat()["thp_split_pmd"] == splits + 1


def test_madvise_over_vmas_with_and_without_the_flag_changes_only_the_others(make_world):
    """mm/madvise.c madvise_walk_vmas() visits each VMA; madvise_update_vma() skips the one that
    already has the flags, so the PMD mapped in it stays, while the others take the flag and
    merge with it (vma_merge_existing_range).

    Kernel: MADV_NOHUGEPAGE on [A+3M, A+4M) then MADV_HUGEPAGE on [A, A+4M): one hg VMA,
    Rss 2048, ShmemPmdMapped 2048 (the PMD at A kept), thp_split_pmd +0.
    """
    world = make_world(shmem_enabled="advise")
    world.file_create("c", 4 * M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, 4 * M, "c", prot="rw", shared=True)
    assert world.madvise(1, A, 2 * M, "hugepage") == 0
    assert world.fault(1, A) == "pmd"
    assert world.madvise(1, A + 3 * M, M, "nohugepage") == 0
    splits = world.vmstat()["thp_split_pmd"]
    assert world.madvise(1, A, 4 * M, "hugepage") == 0
    assert layout(world, 1, "Rss", "ShmemPmdMapped") == [(A, A + 4 * M, 2048, 2048)]
    assert flags(world, 1) == ["hg"]
    assert world.vmstat()["thp_split_pmd"] == splits
    assert isinstance(world.remapper.mms[1].pmds[A >> HPAGE_PMD_SHIFT], int)


# -- anon_vma identity and VMA merging ----------------------------------------------------------


def test_vmas_whose_anon_vmas_differ_do_not_merge(make_world):
    """mm/vma.c is_mergeable_anon_vma(), through vma_merge_existing_range(): two VMAs that each
    have an anon_vma merge only if it is the same one. Each got its own at its first CoW
    (__anon_vma_prepare: find_mergeable_anon_vma() found no anon_vma_compatible() neighbour,
    since VM_HUGEPAGE differed), so making their flags equal leaves two VMAs. The pieces of a
    split share the anon_vma, so the same flags change merges them back.

    Kernel: after the writes, [A, A+2M) hg and [A+2M, A+4M) each Rss 4, Anonymous 4; the
    MADV_HUGEPAGE of the second leaves two hg VMAs. In the second mapping (one CoW before the
    split), the second MADV_HUGEPAGE merges: one hg VMA [A+8M, A+12M), Rss 4, Anonymous 4.
    """
    world = make_world(shmem_enabled="advise")
    world.file_create("c", 8 * M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, 4 * M, "c", prot="rw", shared=False)
    assert world.madvise(1, A, 2 * M, "hugepage") == 0
    world.touch(1, A, 4 * M, write=True, stride=2 * M)
    assert world.madvise(1, A + 2 * M, 2 * M, "hugepage") == 0
    assert layout(world, 1, "Rss", "Anonymous") == [(A, A + 2 * M, 4, 4), (A + 2 * M, A + 4 * M, 4, 4)]
    assert flags(world, 1) == ["hg", "hg"]

    world.mmap(1, A + 8 * M, 4 * M, "c", prot="rw", shared=False)
    world.fault(1, A + 8 * M, write=True)
    assert world.madvise(1, A + 8 * M, 2 * M, "hugepage") == 0
    assert world.madvise(1, A + 10 * M, 2 * M, "hugepage") == 0
    assert layout(world, 1, "Rss", "Anonymous")[2:] == [(A + 8 * M, A + 12 * M, 4, 4)]


def test_nohugepage_over_three_vmas_keeps_apart_those_with_other_anon_vmas(make_world):
    """mm/vma.c can_vma_merge_right(): a range that could merge with both neighbours does so only
    if their own anon_vmas do not differ; mm/vma.c is_mergeable_anon_vma() otherwise.

    Kernel: [A, A+1M) none, [A+1M, A+3M) hg, [A+3M, A+4M) none, each written once (three
    anon_vmas), then MADV_NOHUGEPAGE over all of it: three nh VMAs, Rss 4 and Anonymous 4 each.
    """
    world = make_world(shmem_enabled="advise")
    world.file_create("c", 4 * M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, 4 * M, "c", prot="rw", shared=False)
    assert world.madvise(1, A + M, 2 * M, "hugepage") == 0
    for addr in (A, A + M, A + 3 * M):
        world.fault(1, addr, write=True)
    assert world.madvise(1, A, 4 * M, "nohugepage") == 0
    assert layout(world, 1, "Rss", "Anonymous") == [
        (A, A + M, 4, 4),
        (A + M, A + 3 * M, 4, 4),
        (A + 3 * M, A + 4 * M, 4, 4),
    ]
    assert flags(world, 1) == ["nh", "nh", "nh"]


def test_a_fork_child_keeps_its_anon_vmas_apart(make_world):
    """mm/rmap.c anon_vma_fork() gives each child VMA whose parent VMA has an anon_vma one of its
    own, chained to the parent's; mm/vma.c is_mergeable_anon_vma() then refuses to merge it with
    a neighbour without one (vma_is_fork_child: the chain is not singular), and two child VMAs
    split from one parent VMA have different anon_vmas. The parent merges the same ranges.

    Kernel: after the fork, MADV_HUGEPAGE on [A+2M, A+4M) and [A+10M, A+12M) in the child leaves
    its four VMAs ([A, A+2M) hg Rss 4 Anonymous 4, [A+2M, A+4M) hg Rss 0, the same at A+8M);
    the same two calls in the parent leave two VMAs, [A, A+4M) and [A+8M, A+12M), Rss 4 each.
    """
    world = make_world(shmem_enabled="advise")
    world.file_create("c", 8 * M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, 4 * M, "c", prot="rw", shared=False)
    assert world.madvise(1, A, 2 * M, "hugepage") == 0
    world.fault(1, A, write=True)  # an anon_vma for [A, A+2M) only
    world.mmap(1, A + 8 * M, 4 * M, "c", prot="rw", shared=False)
    world.fault(1, A + 8 * M, write=True)  # one anon_vma, then shared by both halves
    assert world.madvise(1, A + 8 * M, 2 * M, "hugepage") == 0
    world.fork(1, 2)

    for pid in (2, 1):
        assert world.madvise(pid, A + 2 * M, 2 * M, "hugepage") == 0
        assert world.madvise(pid, A + 10 * M, 2 * M, "hugepage") == 0
    assert layout(world, 2, "Rss", "Anonymous") == [
        (A, A + 2 * M, 4, 4),
        (A + 2 * M, A + 4 * M, 0, 0),
        (A + 8 * M, A + 10 * M, 4, 4),
        (A + 10 * M, A + 12 * M, 0, 0),
    ]
    assert flags(world, 2) == ["hg"] * 4
    assert layout(world, 1, "Rss", "Anonymous") == [(A, A + 4 * M, 4, 4), (A + 8 * M, A + 12 * M, 4, 4)]


# -- vm_file: which open file a mapping maps ------------------------------------------------------


def test_mappings_of_different_opens_of_a_file_never_merge(make_world):
    """mm/vma.c is_mergeable_vma() compares vm_file, the struct file, not the inode: mappings
    of two open(2)s of one file stay apart, and a 2 MiB range they share cannot get a PMD.
    ``mmap`` maps the process's one open file of the name (inherited across fork) unless
    ``reopen`` asks for an open of its own.

    Kernel (KernelBackend, whose workers keep one fd per file and open a new one for
    --reopen): [A, A+1M) fd, [A+1M, A+2M) and [A+2M, A+3M) each a new open, [A+3M, A+4M) fd:
    four VMAs; after MADV_HUGEPAGE and a touch per MiB each has Rss 4, no PMD. A mapping of the
    fd at A+4M merges with [A+3M, A+4M) and its fault maps a PMD (Rss 2052, ShmemPmdMapped
    2048). A child maps the inherited fd at A+6M: after MADV_HUGEPAGE it merges with the
    inherited [A+3M, A+6M).
    """
    world = make_world(shmem_enabled="advise")
    world.file_create("c", 8 * M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, M, "c", prot="rw")
    world.mmap(1, A + M, M, "c", offset=M, prot="rw", reopen=True)
    world.mmap(1, A + 2 * M, M, "c", offset=2 * M, prot="rw", reopen=True)
    world.mmap(1, A + 3 * M, M, "c", offset=3 * M, prot="rw")
    assert world.madvise(1, A, 4 * M, "hugepage") == 0
    world.touch(1, A, 4 * M, stride=M)
    assert layout(world, 1, "Rss", "ShmemPmdMapped") == [(A + i * M, A + (i + 1) * M, 4, 0) for i in range(4)]

    world.mmap(1, A + 4 * M, 2 * M, "c", offset=4 * M, prot="rw")
    assert world.madvise(1, A + 4 * M, 2 * M, "hugepage") == 0
    assert world.fault(1, A + 4 * M) == "pmd"
    assert layout(world, 1, "Rss", "ShmemPmdMapped")[3] == (A + 3 * M, A + 6 * M, 2052, 2048)

    world.fork(1, 2)
    world.mmap(2, A + 6 * M, 2 * M, "c", offset=6 * M, prot="rw")
    assert world.madvise(2, A + 6 * M, 2 * M, "hugepage") == 0
    assert [(s, e) for s, e in layout(world, 2)] == [
        (A, A + M),
        (A + M, A + 2 * M),
        (A + 2 * M, A + 3 * M),
        (A + 3 * M, A + 8 * M),
    ]


# -- MADV_COLLAPSE --------------------------------------------------------------------------------


def test_madv_collapse_of_a_vma_that_cannot_hold_a_pmd_is_einval(make_world):
    """mm/khugepaged.c madvise_collapse() starts with thp_vma_allowable_order(...,
    TVA_FORCED_COLLAPSE, PMD_ORDER); mm/huge_memory.c __thp_vma_allowable_orders() (outside the
    fault path) refuses a VMA in which no 2 MiB-aligned PMD fits before vm_end
    (thp_vma_suitable_order on vm_end - HPAGE_PMD_SIZE). madvise_walk_vmas() returns the first
    VMA's error at once: later VMAs are not collapsed, and a hole before it is not ENOMEM.

    Kernel (tmpfs huge=never, the file written): a 1M VMA at A: EINVAL. A 1M VMA at A+4M and
    the range [A+2M, A+6M): EINVAL. VMAs [A, A+1M) and [A+1M, A+4M) hg, the range [A, A+4M):
    EINVAL and nothing allocated (thp_collapse_alloc +0); [A+2M, A+3M) inside a suitable VMA: 0
    (no aligned 2 MiB in the range, nothing to do); [A+2M+4K, +8K): EINVAL (hend < hstart);
    [A+1M, A+4M): 0, one THP collapsed and PMD-mapped (thp_collapse_alloc +1).
    """
    world = make_world(shmem_enabled="never")
    world.file_create("c", 8 * M, shmem=True)
    world.file_write("c", 0, 8 * M)
    world.spawn(1)
    world.mmap(1, A, M, "c", prot="rw")
    assert world.madvise(1, A, M, "collapse") == "EINVAL"
    world.munmap(1, A, M)
    world.mmap(1, A + 4 * M, M, "c", prot="r", shared=False)
    assert world.madvise(1, A + 2 * M, 4 * M, "collapse") == "EINVAL"
    world.munmap(1, A + 4 * M, M)

    world.mmap(1, A, 4 * M, "c", prot="rw")
    assert world.madvise(1, A + M, 3 * M, "hugepage") == 0
    allocs = world.vmstat()["thp_collapse_alloc"]
    assert world.madvise(1, A, 4 * M, "collapse") == "EINVAL"
    assert world.vmstat()["thp_collapse_alloc"] == allocs
    assert world.madvise(1, A + 2 * M, M, "collapse") == 0
    assert world.madvise(1, A + 2 * M + P, 2 * P, "collapse") == "EINVAL"
    assert world.madvise(1, A + M, 3 * M, "collapse") == 0
    assert world.vmstat()["thp_collapse_alloc"] == allocs + 1
    assert layout(world, 1, "Rss", "ShmemPmdMapped")[1] == (A + M, A + 4 * M, 2048, 2048)


def test_install_pmd_never_maps_a_pmd_into_a_nohugepage_vma(make_world):
    """mm/khugepaged.c retract_page_tables() frees the emptied page table of every VMA mapping
    the new THP, VM_NOHUGEPAGE or not, and maps nothing; collapse_pte_mapped_thp(install_pmd)
    maps the PMD only in the mm that called MADV_COLLAPSE. The model's install_pmd=1 (its
    documented default) maps the PMD at retract time too, but only where do_set_pmd would
    (mm/memory.c do_set_pmd refuses when vma_thp_disabled(): VM_NOHUGEPAGE).

    Kernel (tmpfs huge=advise): after the collapse, [A, A+2M) Rss 2048, ShmemPmdMapped 2048;
    the nh VMA at A+4M Rss 0 (its table retracted); thp_file_mapped +1, thp_collapse_alloc +1.
    Its next fault maps no PMD (the kernel maps the whole THP with PTEs there, Rss 2048: the
    fault path's divergence 7, not checked here).
    """
    world = make_world(shmem_enabled="advise", install_pmd=1)
    world.file_create("c", 4 * M, shmem=True)
    world.file_write("c", 0, P)
    world.spawn(1)
    world.mmap(1, A, 2 * M, "c", prot="rw")
    world.mmap(1, A + 4 * M, 2 * M, "c", prot="rw")
    assert world.madvise(1, A + 4 * M, 2 * M, "nohugepage") == 0
    world.fault(1, A + 4 * M)
    before = world.vmstat()
    assert world.madvise(1, A, 2 * M, "collapse") == 0
    after = world.vmstat()
    assert layout(world, 1, "Rss", "ShmemPmdMapped") == [(A, A + 2 * M, 2048, 2048), (A + 4 * M, A + 6 * M, 0, 0)]
    assert after["thp_file_mapped"] - before["thp_file_mapped"] == 1
    assert after["thp_collapse_alloc"] - before["thp_collapse_alloc"] == 1
    assert (A + 4 * M) >> HPAGE_PMD_SHIFT not in world.remapper.mms[1].pmds
    assert world.fault(1, A + 4 * M) != "pmd"
    assert layout(world, 1, "ShmemPmdMapped")[1] == (A + 4 * M, A + 6 * M, 0)


# -- mprotect -------------------------------------------------------------------------------------


def _pte(world, pid: int, addr: int) -> int:
    table = world.remapper.mms[pid].pmds[addr >> HPAGE_PMD_SHIFT]
    return table.ptes[(addr >> 12) & 511]


def test_mprotect_write_protects_ptes_and_makes_shmem_and_exclusive_anon_ones_writable_again(make_world):
    """mm/mprotect.c change_pte_range(): pte_modify() with the new vm_page_prot takes the write bit
    away from every PTE of a VMA that may no longer write (the invariant checker: no writable
    file PTE where the VMA does not write the file); made writable again, shared shmem PTEs
    take vm_page_prot's write bit (shmem wants no write-notify) and, under
    MM_CP_TRY_CHANGE_WRITABLE, a private mapping's exclusive anon PTEs become writable
    (can_change_private_pte_writable): a write after the round trip is a hit, no fault."""
    from remapd.mm import PTE_WRITE

    world = make_world()
    world.file_create("c", 4 * M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, 2 * M, "c", prot="rw", shared=True)
    world.mmap(1, A + 2 * M, 2 * M, "c", offset=2 * M, prot="rw", shared=False)
    assert world.touch(1, A, 4 * M, write=True, stride=M) == {"minor": 4}
    for prot in ("none", "r"):
        assert world.mprotect(1, A, 4 * M, prot) == 0
        assert not _pte(world, 1, A) & PTE_WRITE and not _pte(world, 1, A + 2 * M) & PTE_WRITE
        assert world.fault(1, A, write=True) == "sigsegv"
    assert world.mprotect(1, A, 4 * M, "rw") == 0
    assert _pte(world, 1, A) & PTE_WRITE and _pte(world, 1, A + 2 * M) & PTE_WRITE
    assert world.touch(1, A, 4 * M, write=True, stride=M) == {"hit": 4}


def test_mprotect_splits_vmas_and_pmds_at_its_edges_and_keeps_covered_pmds(make_world):
    """mm/mprotect.c do_mprotect_pkey() / mprotect_fixup(): a VMA that already has the
    protection is left alone; otherwise vma_modify_flags() splits it at the range's edges
    (vma_adjust_trans_huge splits a PMD an unaligned edge cuts) and merges the result with its
    neighbours, and change_protection() keeps a PMD the range covers whole. A hole at the start
    is ENOMEM before anything changes; a later hole is ENOMEM after the VMAs before it changed.

    Kernel (tmpfs huge=advise), a 4M rw shared hg VMA with both PMDs mapped:
    mprotect 4K rw: nothing changes. mprotect [A+1M, +4K) r: three VMAs, Rss 0 / 0 / 2048,
    thp_split_pmd +1. mprotect [A+2M, A+4M) r: [A+1M+4K, A+2M) rw and [A+2M, A+4M) r with its
    PMD (Rss 2048, ShmemPmdMapped 2048); a write there is SIGSEGV. mprotect [A, A+4M) rw: one
    VMA again, PMD kept. Unaligned start: EINVAL; length 0: 0; [A-1M, A+1M): ENOMEM, nothing
    changed; [A+2M, A+6M) none: ENOMEM, [A+2M, A+4M) is ---s with its PMD; a read there is
    SIGSEGV; back to rw: one VMA, and a write to the PMD is a hit.
    """
    world = make_world(shmem_enabled="advise")
    world.file_create("c", 8 * M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, 4 * M, "c", prot="rw")
    world.madvise(1, A, 4 * M, "hugepage")
    assert world.fault(1, A) == world.fault(1, A + 2 * M) == "pmd"
    splits = world.vmstat()["thp_split_pmd"]

    assert world.mprotect(1, A, P, "rw") == 0
    assert layout(world, 1, "Rss") == [(A, A + 4 * M, 4096)]
    assert world.mprotect(1, A + M, P, "r") == 0
    assert layout(world, 1, "perms", "Rss") == [
        (A, A + M, "rw-s", 0),
        (A + M, A + M + P, "r--s", 0),
        (A + M + P, A + 4 * M, "rw-s", 2048),
    ]
    assert world.vmstat()["thp_split_pmd"] == splits + 1
    assert world.mprotect(1, A + 2 * M, 2 * M, "r") == 0
    assert layout(world, 1, "perms", "Rss", "ShmemPmdMapped")[2:] == [
        (A + M + P, A + 2 * M, "rw-s", 0, 0),
        (A + 2 * M, A + 4 * M, "r--s", 2048, 2048),
    ]
    assert world.fault(1, A + 2 * M, write=True) == "sigsegv"
    assert world.mprotect(1, A, 4 * M, "rw") == 0
    assert layout(world, 1, "perms", "Rss", "ShmemPmdMapped") == [(A, A + 4 * M, "rw-s", 2048, 2048)]
    assert world.vmstat()["thp_split_pmd"] == splits + 1

    assert world.mprotect(1, A, 0, "r") == 0
    assert world.mprotect(1, A - M, 2 * M, "r") == "ENOMEM"
    assert layout(world, 1, "perms") == [(A, A + 4 * M, "rw-s")]
    assert world.mprotect(1, A + 2 * M, 4 * M, "none") == "ENOMEM"
    assert layout(world, 1, "perms", "Rss", "ShmemPmdMapped") == [
        (A, A + 2 * M, "rw-s", 0, 0),
        (A + 2 * M, A + 4 * M, "---s", 2048, 2048),
    ]
    assert world.fault(1, A + 2 * M) == "sigsegv"
    assert world.mprotect(1, A + 2 * M, 2 * M, "rw") == 0
    assert layout(world, 1, "perms", "Rss") == [(A, A + 4 * M, "rw-s", 2048)]
    assert world.fault(1, A + 2 * M, write=True) == "hit"


def test_mprotect_bad_arguments_are_einval(world):
    """do_mprotect_pkey(): an unaligned start or an unknown protection is EINVAL."""
    world.file_create("c", 4 * M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, 2 * M, "c", prot="rw")
    for addr, prot in ((A + 1, "r"), (A, "bogus")):
        with pytest.raises(UserError) as e:
            world.mprotect(1, addr, P, prot)
        assert e.value.errno_name == "EINVAL"


def test_a_private_mapping_once_writable_stays_accounted(make_world):
    """mm/mprotect.c mprotect_fixup() gives a private mapping made writable VM_ACCOUNT and never
    takes it back from a file mapping; mm/mmap.c accountable_mapping() sets it on a private
    writable mmap. VM_ACCOUNT is one of the flags is_mergeable_vma() compares.

    Kernel: two private r mmaps at A and A+2M merge; mprotect [A+2M, A+4M) rw then r leaves two
    VMAs, r--p and r--p ac; mprotect [A, A+4M) rw then r: one VMA r--p ac; a private r mmap of
    the next 2M at A+4M stays apart from it (no ac); a private rw mmap shows ac.
    """
    world = make_world(shmem_enabled="advise")
    world.file_create("c", 8 * M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, 2 * M, "c", prot="r", shared=False)
    world.mmap(1, A + 2 * M, 2 * M, "c", offset=2 * M, prot="r", shared=False)
    assert layout(world, 1, "perms") == [(A, A + 4 * M, "r--p")]
    assert world.mprotect(1, A + 2 * M, 2 * M, "rw") == 0
    assert world.mprotect(1, A + 2 * M, 2 * M, "r") == 0
    assert layout(world, 1, "perms", "VmFlags") == [
        (A, A + 2 * M, "r--p", "rd mr mw me"),
        (A + 2 * M, A + 4 * M, "r--p", "rd mr mw me ac"),
    ]
    assert world.mprotect(1, A, 4 * M, "rw") == 0
    assert world.mprotect(1, A, 4 * M, "r") == 0
    assert layout(world, 1, "VmFlags") == [(A, A + 4 * M, "rd mr mw me ac")]
    world.mmap(1, A + 4 * M, 2 * M, "c", offset=4 * M, prot="r", shared=False)
    assert layout(world, 1, "VmFlags")[1] == (A + 4 * M, A + 6 * M, "rd mr mw me")
    world.mmap(1, A + 8 * M, 2 * M, "c", prot="rw", shared=False)
    assert layout(world, 1, "VmFlags")[2] == (A + 8 * M, A + 10 * M, "rd wr mr mw me ac")


def test_a_cow_reuses_the_anon_vma_of_a_neighbour_that_differs_only_in_protection(make_world):
    """mm/rmap.c __anon_vma_prepare() -> mm/vma.c find_mergeable_anon_vma(): a VMA's first
    anon page takes the next VMA's anon_vma, else the previous one's, when that neighbour is
    anon_vma_compatible() (the same file, contiguous, flags equal but for VM_READ/WRITE/EXEC)
    and its chain is singular. Sharing one anon_vma, the two merge once their protections agree
    (is_mergeable_anon_vma); with VM_HUGEPAGE differing instead they got two and stay apart.

    Kernel: [A, A+2M) rw and [A+2M, A+4M) rwx, a write in each (either order), mprotect of the
    second to rw: one VMA, Rss 8, Anonymous 8. The same with MADV_HUGEPAGE on the second half
    instead of rwx, then MADV_HUGEPAGE on the first: two VMAs, Rss 4 each.
    """
    world = make_world(shmem_enabled="advise")
    world.file_create("c", 8 * M, shmem=True)
    world.spawn(1)
    for base, order in ((A, (0, 2 * M)), (A + 8 * M, (2 * M, 0))):
        world.mmap(1, base, 4 * M, "c", prot="rw", shared=False)
        assert world.mprotect(1, base + 2 * M, 2 * M, "rwx") == 0
        for off in order:
            world.fault(1, base + off, write=True)
        assert world.mprotect(1, base + 2 * M, 2 * M, "rw") == 0
    assert layout(world, 1, "Rss", "Anonymous") == [(A, A + 4 * M, 8, 8), (A + 8 * M, A + 12 * M, 8, 8)]

    world.mmap(1, A + 16 * M, 4 * M, "c", prot="rw", shared=False)
    world.madvise(1, A + 18 * M, 2 * M, "hugepage")
    world.fault(1, A + 16 * M, write=True)
    world.fault(1, A + 18 * M, write=True)
    world.madvise(1, A + 16 * M, 2 * M, "hugepage")
    assert layout(world, 1, "Rss", "Anonymous")[2:] == [(A + 16 * M, A + 18 * M, 4, 4), (A + 18 * M, A + 20 * M, 4, 4)]


# -- mlock / munlock ------------------------------------------------------------------------------


def test_mlock_locks_populates_and_smaps_locked_is_the_locked_pss(make_world):
    """mm/mlock.c do_mlock(): apply_vma_lock_flags() gives each VMA in the page-widened range
    VM_LOCKED (mlock_fixup splits and merges it), then __mm_populate() ->
    populate_vma_page_range() faults it in: write faults in a private writable VMA (CoW copies),
    read faults elsewhere, none for VM_LOCKONFAULT. fs/proc/task_mmu.c smaps_account(): Locked
    is the Pss of a VM_LOCKED VMA, a page mapped N times counting 1/N.

    Kernel (tmpfs huge=advise, fault_around_bytes 64K): mlock 1M of a 4M shared mapping: VMA
    [A, A+1M) rw-s lo, Rss 1024, Locked 1024. A second process maps and touches the first 512K
    (fault-around: 8 faults): Locked 768. mlock of [A+8M+256, +8K) in a private rw mapping:
    [A+8M, A+8M+12K) lo, Rss 12, Anonymous 12, Locked 12. mlock --onfault of a private r
    mapping of a written 1M: lo lf, Rss 0; a fault there maps 16 pages: Rss 64, Locked 64.
    munlock of all of
    them: the VMAs merge back, Locked 0, Rss kept.
    """
    world = make_world(shmem_enabled="advise", fault_around_bytes=65536)
    world.file_create("c", 8 * M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, 4 * M, "c", prot="rw")
    assert world.mlock(1, A, M) == 0
    assert layout(world, 1, "Rss", "Locked", "VmFlags") == [
        (A, A + M, 1024, 1024, "rd wr sh mr mw me ms lo"),
        (A + M, A + 4 * M, 0, 0, "rd wr sh mr mw me ms"),
    ]
    assert world.remapper.status(1)["locked_vm"] == 256
    world.spawn(2)
    world.mmap(2, A, M, "c", prot="rw")
    assert world.touch(2, A, 512 * 1024) == {"minor": 8, "hit": 120}
    assert layout(world, 1, "Locked")[0] == (A, A + M, 768)

    world.mmap(1, A + 8 * M, 2 * M, "c", prot="rw", shared=False)
    assert world.mlock(1, A + 8 * M + 256, 8 * 1024) == 0
    assert layout(world, 1, "Rss", "Anonymous", "Locked")[2:] == [
        (A + 8 * M, A + 8 * M + 3 * P, 12, 12, 12),
        (A + 8 * M + 3 * P, A + 10 * M, 0, 0, 0),
    ]
    world.file_write("c", 4 * M, M)
    world.mmap(1, A + 12 * M, M, "c", offset=4 * M, prot="r", shared=False)
    assert world.mlock(1, A + 12 * M, M, onfault=True) == 0
    assert layout(world, 1, "Rss", "VmFlags")[4] == (A + 12 * M, A + 13 * M, 0, "rd mr mw me lo lf")
    world.fault(1, A + 12 * M)
    assert layout(world, 1, "Rss", "Locked")[4] == (A + 12 * M, A + 13 * M, 64, 64)

    for start, length in ((A, 4 * M), (A + 8 * M, 2 * M), (A + 12 * M, M)):
        assert world.munlock(1, start, length) == 0
    assert layout(world, 1, "Rss", "Locked") == [
        (A, A + 4 * M, 1024, 0),
        (A + 8 * M, A + 10 * M, 12, 0),
        (A + 12 * M, A + 13 * M, 64, 0),
    ]
    assert world.remapper.status(1)["locked_vm"] == 0


def test_mlock_of_a_hole_protnone_or_past_eof_is_enomem(make_world):
    """mm/mlock.c apply_vma_lock_flags(): a hole is ENOMEM, the VMAs before it locked but, as
    do_mlock() returns before __mm_populate(), not faulted in. populate_vma_page_range() never
    faults PROT_NONE in and a page past EOF is SIGBUS: both -EFAULT, which
    __mlock_posix_error_return() makes ENOMEM, the VMA staying VM_LOCKED.

    Kernel (tmpfs huge=advise, 1M file): mlock of a 2M shared mapping: ENOMEM, lo, Rss 1024.
    mlock [A+4M, A+7M) over 1M VMAs at A+4M and A+6M: ENOMEM, the first lo with Rss 0, the
    second unlocked. mlock of a hole: ENOMEM. mlock of a PROT_NONE VMA: ENOMEM, lo. munlock
    [A, A+16M): ENOMEM, every VMA before the first hole unlocked.
    """
    world = make_world(shmem_enabled="advise")
    world.file_create("c", M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, 2 * M, "c", prot="rw")
    assert world.mlock(1, A, 2 * M) == "ENOMEM"
    assert layout(world, 1, "Rss", "Locked", "VmFlags") == [(A, A + 2 * M, 1024, 1024, "rd wr sh mr mw me ms lo")]
    world.mmap(1, A + 4 * M, M, "c", prot="r")
    world.mmap(1, A + 6 * M, M, "c", prot="r")
    assert world.mlock(1, A + 4 * M, 3 * M) == "ENOMEM"
    assert layout(world, 1, "Rss", "VmFlags")[1:] == [
        (A + 4 * M, A + 5 * M, 0, "rd sh mr mw me ms lo"),
        (A + 6 * M, A + 7 * M, 0, "rd sh mr mw me ms"),
    ]
    assert world.mlock(1, A + 8 * M, M, onfault=True) == "ENOMEM"
    world.mmap(1, A + 8 * M, M, "c", prot="none")
    assert world.mlock(1, A + 8 * M, M) == "ENOMEM"
    assert layout(world, 1, "VmFlags")[3] == (A + 8 * M, A + 9 * M, "sh mr mw me ms lo")
    assert world.munlock(1, A, 16 * M) == "ENOMEM"
    assert [("lo" in e["VmFlags"].split()) for e in world.smaps(1)] == [False, True, False, True]


def test_fork_does_not_inherit_mlock(make_world):
    """kernel/fork.c dup_mmap() clears VM_LOCKED and VM_LOCKONFAULT in the child's copies and
    merges nothing, so a VMA split by mlock stays split in the child, though its halves now
    match (a later change merges them, as anywhere).

    Kernel: mlock [A, A+1M) of a 4M shared mapping, fork: the child has [A, A+1M) and
    [A+1M, A+4M), neither lo, Rss 0; the parent keeps lo, Rss 1024, Locked 1024.
    """
    world = make_world(shmem_enabled="advise")
    world.file_create("c", 4 * M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, 4 * M, "c", prot="rw")
    assert world.mlock(1, A, M) == 0
    world.fork(1, 2)
    assert layout(world, 2, "Rss", "Locked", "VmFlags") == [
        (A, A + M, 0, 0, "rd wr sh mr mw me ms"),
        (A + M, A + 4 * M, 0, 0, "rd wr sh mr mw me ms"),
    ]
    assert world.remapper.status(2)["locked_vm"] == 0
    assert layout(world, 1, "Rss", "Locked")[0] == (A, A + M, 1024, 1024)


def test_dontneed_and_pageout_of_a_locked_vma_are_einval(make_world):
    """mm/madvise.c madvise_dontneed_free_valid_vma() refuses VM_LOCKED for MADV_DONTNEED and
    can_madv_lru_vma() for MADV_PAGEOUT: EINVAL, the mapping kept; VMAs the walk met before it
    are done.

    Kernel: a private rw mapping with [A, A+12K) mlocked (Rss 12): MADV_DONTNEED and
    MADV_PAGEOUT of its first page: EINVAL, Rss 12.
    """
    world = make_world(shmem_enabled="advise")
    world.file_create("c", 4 * M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, 2 * M, "c", prot="rw", shared=False)
    assert world.mlock(1, A + 256, 8 * 1024) == 0
    assert world.madvise(1, A, P, "dontneed") == "EINVAL"
    assert world.madvise(1, A, P, "pageout") == "EINVAL"
    assert layout(world, 1, "Rss")[0] == (A, A + 3 * P, 12)
    world.mmap(1, A - M, M, "c", prot="rw")
    world.touch(1, A - M, M, stride=64 * 1024)
    assert world.madvise(1, A - M, 2 * M, "dontneed") == "EINVAL"
    assert layout(world, 1, "Rss")[0] == (A - M, A, 0)


def test_mprotect_of_a_locked_private_vma_to_writable_breaks_cow_at_once(make_world):
    """mm/mprotect.c mprotect_fixup(): a private VM_LOCKED VMA that becomes writable is
    populated with write faults (populate_vma_page_range with FOLL_WRITE), so its file pages
    become anon copies at once.

    Kernel (fault_around_bytes 64K, a 1M file): a private r mapping mlocked (Rss 1024,
    Anonymous 0), mprotect rw: Rss 1024, Anonymous 1024, Locked 1024, VmFlags ... lo ac.
    """
    world = make_world(shmem_enabled="advise", fault_around_bytes=65536)
    world.file_create("c", M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, M, "c", prot="r", shared=False)
    assert world.mlock(1, A, M) == 0
    assert layout(world, 1, "Rss", "Anonymous") == [(A, A + M, 1024, 0)]
    assert world.mprotect(1, A, M, "rw") == 0
    assert layout(world, 1, "Rss", "Anonymous", "Locked", "VmFlags") == [
        (A, A + M, 1024, 1024, 1024, "rd wr mr mw me lo ac")
    ]


# -- MADV_FREE and MADV_REMOVE --------------------------------------------------------------------


def test_madv_free_of_a_file_mapping_is_einval(make_world):
    """mm/madvise.c madvise_free_single_vma() works on anonymous VMAs only: on a file or shmem
    mapping, shared or private (with CoW copies or not), MADV_FREE is EINVAL and nothing
    changes; over holes alone it is ENOMEM.

    Kernel: a private rw mapping with one CoW copy, and a shared rw one touched: EINVAL, Rss 4
    and 2048 kept; a hole: ENOMEM.
    """
    world = make_world(shmem_enabled="never", fault_around_bytes=65536)
    world.file_create("c", 8 * M, shmem=True)
    world.file_write("c", 0, 8 * M)
    world.spawn(1)
    world.mmap(1, A, 2 * M, "c", prot="rw", shared=False)
    world.fault(1, A, write=True)
    world.mmap(1, A + 2 * M, 2 * M, "c", offset=2 * M, prot="rw")
    world.touch(1, A + 2 * M, 2 * M, stride=64 * 1024)
    assert world.madvise(1, A, 2 * M, "free") == "EINVAL"
    assert world.madvise(1, A + 2 * M, 2 * M, "free") == "EINVAL"
    assert layout(world, 1, "Rss", "Anonymous") == [(A, A + 2 * M, 4, 4), (A + 2 * M, A + 4 * M, 2048, 0)]
    assert world.madvise(1, A + 6 * M, P, "free") == "ENOMEM"


def test_madv_remove_punches_the_file_behind_a_shared_mapping(make_world):
    """mm/madvise.c madvise_remove(): a VM_LOCKED VMA is EINVAL, one that is not shared and
    may-write (vma_is_shared_maywrite: a MAP_SHARED mapping of a file open read-write, even
    PROT_READ) EACCES; otherwise vfs_fallocate(PUNCH_HOLE | KEEP_SIZE) on the file range it
    maps, which unmaps the range from every process and frees its pages.

    Kernel (tmpfs huge=never, the 8M file written): remove of 64K of a touched shared rw
    mapping: 0, Rss 2048 -> 1984; of a private mapping: EACCES; of 64K inside a shared r
    mapping: 0, Rss 1984; over [A+2M, A+6M) after a fork whose child touched the r mapping: 0,
    Rss 0 in both processes; mlock of 64K then remove: EINVAL, the locked 64K kept; a hole:
    ENOMEM.
    """
    world = make_world(shmem_enabled="never", fault_around_bytes=65536)
    world.file_create("c", 8 * M, shmem=True)
    world.file_write("c", 0, 8 * M)
    world.spawn(1)
    world.mmap(1, A, 2 * M, "c", prot="rw", shared=False)
    world.mmap(1, A + 2 * M, 2 * M, "c", offset=2 * M, prot="rw")
    world.touch(1, A + 2 * M, 2 * M, stride=64 * 1024)
    assert world.madvise(1, A + 2 * M, 64 * 1024, "remove") == 0
    assert layout(world, 1, "Rss")[1] == (A + 2 * M, A + 4 * M, 1984)
    nrpages = {f["name"]: f["nrpages"] for f in world.file_ls()}["c"]
    assert nrpages == 2048 - 16
    assert world.madvise(1, A, 64 * 1024, "remove") == "EACCES"
    world.mmap(1, A + 4 * M, 2 * M, "c", offset=4 * M, prot="r")
    world.touch(1, A + 4 * M, 2 * M, stride=64 * 1024)
    assert world.madvise(1, A + 4 * M + 64 * 1024, 64 * 1024, "remove") == 0
    assert layout(world, 1, "Rss")[2] == (A + 4 * M, A + 6 * M, 1984)
    world.fork(1, 2)
    world.touch(2, A + 4 * M, 2 * M, stride=64 * 1024)
    assert world.madvise(1, A + 2 * M, 4 * M, "remove") == 0
    assert [rss for _, _, rss in layout(world, 1, "Rss")[1:]] == [0, 0]
    assert [rss for _, _, rss in layout(world, 2, "Rss")[1:]] == [0, 0]
    assert world.mlock(1, A + 2 * M, 64 * 1024) == 0
    assert world.madvise(1, A + 2 * M, 4 * M, "remove") == "EINVAL"
    assert layout(world, 1, "Rss", "Locked")[1] == (A + 2 * M, A + 2 * M + 64 * 1024, 64, 64)
    assert world.madvise(1, A + 6 * M, P, "remove") == "ENOMEM"


# -- mremap ---------------------------------------------------------------------------------------


def test_mremap_shrinks_grows_in_place_and_moves_pmds_whole_when_aligned(make_world):
    """mm/mremap.c: a shrink unmaps the tail (a whole PMD is unmapped, not split); a grow
    extends the VMA in place when the space after it is free (vma_merge_extend merges it with
    the next VMA), else ENOMEM without MREMAP_MAYMOVE; move_vma() moves the page tables
    (move_page_tables: move_huge_pmd moves a PMD whole when both addresses are PMD-aligned,
    else split_huge_pmd clears a file THP's PMD first) and unmaps the old range.

    Kernel (tmpfs huge=advise), a 4M shared hg mapping with two PMDs: 4M -> 4M: the address,
    nothing changes; -> 6M in place: [A, A+6M), Rss 4096; -> 4M; -> 2M: Rss 2048,
    nr_shmem_pmdmapped -1, thp_split_pmd +0; 2M -> 4M --to A+8M: [A+8M, A+12M) Rss 2048,
    ShmemPmdMapped 2048 (the PMD moved); 2M of it --to A+17M (unaligned): [A+10M, A+12M) left,
    [A+17M, A+19M) Rss 0, thp_split_pmd +1. A grow blocked by a neighbour: ENOMEM. New length
    0, an unaligned address: EINVAL; no VMA at the address: EFAULT.
    """
    world = make_world(shmem_enabled="advise")
    world.file_create("c", 16 * M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, 4 * M, "c", prot="rw")
    world.madvise(1, A, 4 * M, "hugepage")
    assert world.touch(1, A, 4 * M, stride=2 * M) == {"pmd": 2}
    splits = world.vmstat()["thp_split_pmd"]
    assert world.mremap(1, A, 4 * M, 4 * M) == {"result": 0, "addr": A}
    assert world.mremap(1, A, 4 * M, 6 * M) == {"result": 0, "addr": A}
    assert layout(world, 1, "Rss") == [(A, A + 6 * M, 4096)]
    assert world.mremap(1, A, 6 * M, 4 * M)["result"] == 0
    assert world.mremap(1, A, 4 * M, 2 * M)["result"] == 0
    assert layout(world, 1, "Rss", "ShmemPmdMapped") == [(A, A + 2 * M, 2048, 2048)]
    assert world.vmstat()["thp_split_pmd"] == splits

    assert world.mremap(1, A, 2 * M, 4 * M, to=A + 8 * M) == {"result": 0, "addr": A + 8 * M}
    assert layout(world, 1, "Rss", "ShmemPmdMapped") == [(A + 8 * M, A + 12 * M, 2048, 2048)]
    assert world.mremap(1, A + 8 * M, 2 * M, 2 * M, to=A + 17 * M)["result"] == 0
    assert layout(world, 1, "Rss") == [(A + 10 * M, A + 12 * M, 0), (A + 17 * M, A + 19 * M, 0)]
    assert world.vmstat()["thp_split_pmd"] == splits + 1

    world.mmap(1, A + 19 * M, M, "c", offset=8 * M, prot="rw")
    assert world.mremap(1, A + 17 * M, 2 * M, 4 * M) == {"result": "ENOMEM", "addr": None}
    assert world.mremap(1, A + 17 * M, P, 0)["result"] == "EINVAL"
    assert world.mremap(1, A + 17 * M + 1, P, P)["result"] == "EINVAL"
    assert world.mremap(1, A + 40 * M, M, M)["result"] == "EFAULT"
    assert world.mremap(1, A + 8 * M, 2 * M, 4 * M, maymove=True)["result"] == "EFAULT"


def test_mremap_moves_ptes_pins_anon_pages_and_whole_ranges_of_vmas(make_world):
    """mm/mremap.c move_vma() / move_page_tables(): PTEs move with their pages (file pages and
    CoW copies, Rss and Anonymous kept, mapcounts unchanged); copy_vma() merges the moved VMA
    with a compatible neighbour at its new place; with MREMAP_FIXED and an unchanged size every
    VMA in the range moves, gaps kept (remap_move, 6.17+); a VM_LOCKED VMA's new tail is
    faulted in; MREMAP_DONTUNMAP leaves the old VMA in place, emptied and without VM_LOCKED
    (all of it, unsplit); an old length of 0 maps a shared mapping again (MREMAP_MAYMOVE
    needed: ENOMEM without).

    Kernel (tmpfs huge=never, the file written, fault_around_bytes 64K): a 4M private rw
    mapping touched every 64K and written every 256K of its first 1M (Rss 4096, Anonymous 16)
    moved --to A+17M: same Rss and Anonymous there; grown to 6M --to A+32M: Rss 4096. Its first
    2M mlocked (Anonymous 2048: the populate's write faults) cannot grow in place past the
    rest (ENOMEM); with the rest unmapped it grows to 3M: [A+32M, A+35M) lo, Rss 3072,
    Anonymous 3072. [A+48M, +1M) rw and [A+50M, +1M) r moved 3M --to A+52M:
    [A+52M, +1M) and [A+54M, +1M); the first --to A+56M with DONTUNMAP: both VMAs. DONTUNMAP of
    512K of a locked private 2M: the old VMA whole, not lo, Rss 1536; the new one lo, Rss 512.
    Shared mapping 0 -> 1M --to A+60M: a second VMA.
    """
    world = make_world(shmem_enabled="never", fault_around_bytes=65536)
    world.file_create("c", 16 * M, shmem=True)
    world.file_write("c", 0, 16 * M)
    world.spawn(1)
    world.mmap(1, A, 4 * M, "c", prot="rw", shared=False)
    world.touch(1, A, 4 * M, stride=64 * 1024)
    world.touch(1, A, M, write=True, stride=256 * 1024)
    assert layout(world, 1, "Rss", "Anonymous") == [(A, A + 4 * M, 4096, 16)]
    world.pin(1, A)
    assert world.mremap(1, A, 4 * M, 4 * M, to=A + 17 * M)["result"] == 0
    assert layout(world, 1, "Rss", "Anonymous") == [(A + 17 * M, A + 21 * M, 4096, 16)]
    assert world.remapper.mms[1].pins.keys() == {A + 17 * M}
    assert world.mremap(1, A + 17 * M, 4 * M, 6 * M, to=A + 32 * M)["result"] == 0
    assert world.mlock(1, A + 32 * M, 2 * M) == 0
    assert world.mremap(1, A + 32 * M, 2 * M, 3 * M) == {"result": "ENOMEM", "addr": None}
    world.munmap(1, A + 34 * M, 4 * M)
    assert world.mremap(1, A + 32 * M, 2 * M, 3 * M) == {"result": 0, "addr": A + 32 * M}
    assert layout(world, 1, "Rss", "Anonymous", "VmFlags")[0] == (A + 32 * M, A + 35 * M, 3072, 3072, "rd wr mr mw me lo ac")

    world.mmap(1, A + 48 * M, M, "c", prot="rw")
    world.mmap(1, A + 50 * M, M, "c", offset=2 * M, prot="r")
    assert world.mremap(1, A + 48 * M, 3 * M, 3 * M, to=A + 52 * M)["result"] == 0
    assert [(s, e) for s, e in layout(world, 1)][1:] == [(A + 52 * M, A + 53 * M), (A + 54 * M, A + 55 * M)]
    assert world.mremap(1, A + 52 * M, M, M, to=A + 56 * M, dontunmap=True)["result"] == 0
    assert [(s, e) for s, e in layout(world, 1)][1:] == [
        (A + 52 * M, A + 53 * M),
        (A + 54 * M, A + 55 * M),
        (A + 56 * M, A + 57 * M),
    ]

    world.mmap(1, A + 64 * M, 2 * M, "c", prot="rw", shared=False)
    assert world.mlock(1, A + 64 * M, 2 * M) == 0
    assert world.mremap(1, A + 65 * M, 512 * 1024, 512 * 1024, to=A + 68 * M, dontunmap=True)["result"] == 0
    assert layout(world, 1, "Rss", "Locked", "VmFlags")[-2:] == [
        (A + 64 * M, A + 66 * M, 1536, 0, "rd wr mr mw me ac"),
        (A + 68 * M, A + 68 * M + 512 * 1024, 512, 512, "rd wr mr mw me lo ac"),
    ]
    assert world.mremap(1, A + 52 * M, 0, M, to=A + 60 * M) == {"result": 0, "addr": A + 60 * M}
    assert world.mremap(1, A + 52 * M, 0, M) == {"result": "ENOMEM", "addr": None}
    assert [(s, e) for s, e in layout(world, 1)][4] == (A + 60 * M, A + 61 * M)
    assert world.mremap(1, A + 64 * M, 0, M, to=A + 72 * M)["result"] == "EINVAL"  # private


def test_mremap_of_old_length_zero_onto_its_own_address_is_efault_after_the_unmap(make_world):
    """mm/mremap.c mremap_to(): MREMAP_FIXED unmaps the target first, then looks the VMA up at
    the old address again (vma_lookup); with old_length 0 and the target at that address the
    unmap took it, so -EFAULT, and the page stays unmapped. Kernel (a 64K shared memfd mapping
    at X, mremap(X, 0, 4096, MAYMOVE|FIXED, X)): EFAULT, maps [X+4K, X+64K) pgoff 1."""
    world = make_world()
    world.file_create("c", 2 * M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, 64 * 1024, "c", prot="rw")
    assert world.mremap(1, A, 0, 4096, to=A) == {"result": "EFAULT", "addr": None}
    assert [(s, e) for s, e in layout(world, 1)] == [(A + 4096, A + 64 * 1024)]


def test_mremap_that_maps_nothing_new_may_span_vmas(make_world):
    """mm/mremap.c check_prep_vma(): only a grow or a move must stay inside the VMA at the
    address (EFAULT otherwise); an unchanged size returns the address and a shrink unmaps the
    tail whatever VMAs it covers. With MREMAP_FIXED the shrunk length is what must fit.

    Kernel: a 4M private rw mapping whose first 2M is r: 4M -> 4M (with or without
    MREMAP_MAYMOVE): the address; 4M -> 3M: [A, A+2M) and [A+2M, A+3M); 3M -> 4M --maymove:
    EFAULT; 3M -> 1M: [A, A+1M); 3M -> 3M --to A+16M moves it; 2M -> 1M --to A+32M from there:
    [A+32M, A+33M); 4M -> 2M --to A+48M: EFAULT.
    """
    world = make_world(shmem_enabled="never")
    world.file_create("c", 16 * M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, 4 * M, "c", prot="rw", shared=False)
    assert world.mprotect(1, A, 2 * M, "r") == 0
    assert world.mremap(1, A, 4 * M, 4 * M) == {"result": 0, "addr": A}
    assert world.mremap(1, A, 4 * M, 4 * M, maymove=True) == {"result": 0, "addr": A}
    assert world.mremap(1, A, 4 * M, 3 * M) == {"result": 0, "addr": A}
    assert [(s, e) for s, e in layout(world, 1)] == [(A, A + 2 * M), (A + 2 * M, A + 3 * M)]
    assert world.mremap(1, A, 3 * M, 4 * M, maymove=True)["result"] == "EFAULT"
    assert world.mremap(1, A, 3 * M, M) == {"result": 0, "addr": A}
    assert world.mremap(1, A, 3 * M, 3 * M, to=A + 16 * M)["result"] == 0
    assert world.mremap(1, A + 16 * M, 2 * M, M, to=A + 32 * M) == {"result": 0, "addr": A + 32 * M}
    assert [(s, e) for s, e in layout(world, 1)] == [(A + 32 * M, A + 33 * M)]
    assert world.mremap(1, A + 32 * M, 4 * M, 2 * M, to=A + 48 * M)["result"] == "EFAULT"


def test_mremap_fixed_move_of_several_vmas_leaves_what_is_opposite_a_gap(make_world):
    """mm/mremap.c remap_move() (6.17+): with MREMAP_FIXED and an unchanged size each VMA in
    the range moves by the same distance, replacing only what was at its own target; a mapping
    opposite a gap in the source stays.

    Kernel: [A, A+4M) shared rw with [A+0x3d3000, +~846K) unmapped, a second open's r mapping
    at [A+4M, A+8M); mremap [A+2M, A+4M) --to A+4M: [A+4M, A+0x5d3000) rw and
    [A+0x5d3000, A+8M) r (the r mapping's part opposite the gap kept).
    """
    world = make_world(shmem_enabled="advise")
    world.file_create("c", 8 * M, shmem=True)
    world.spawn(1)
    world.mmap(1, A, 4 * M, "c", prot="rw")
    world.munmap(1, A + 0x3D3000, 866503)
    world.mmap(1, A + 4 * M, 4 * M, "c", prot="r", reopen=True)
    assert world.mremap(1, A + 2 * M, 2 * M, 2 * M, to=A + 4 * M) == {"result": 0, "addr": A + 4 * M}
    assert layout(world, 1, "perms") == [
        (A, A + 2 * M, "rw-s"),
        (A + 4 * M, A + 0x5D3000, "rw-s"),
        (A + 0x5D3000, A + 8 * M, "r--s"),
    ]
