"""The madvise/mmap/VMA path against this machine's kernel (6.18): each test reproduces one
behaviour the differential harness found the model getting wrong (/tmp/conf/DIVERGENCES.md), or a
syscall added for it, and names the kernel function it follows. The kernel's own values, observed
with shared/sim/kernel.py (KernelBackend, tmpfs huge=advise unless said otherwise) on the same
steps, are in the comments; the model must match them.
"""

from __future__ import annotations

from helpers import FIXED, P

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
