"""The THP rules both actors apply to file and shmem ranges: one ``thp_vma_allowable_order``.

The collapser asks when it allocates a shmem page at fault time and when khugepaged visits a
registered range; the remapper asks for smaps' ``THPeligible``. They must agree, so the rule lives
here once, in the kernel's terms (mm/huge_memory.c ``__thp_vma_allowable_orders``, mm/shmem.c
``shmem_huge_global_enabled``), for PMD order only.
"""

from __future__ import annotations

from shared.knobs import Knobs
from shared.units import HPAGE_PMD_NR, pages


def shmem_huge_global_enabled(knobs: Knobs, i_size: int, index: int, vm_hugepage: bool) -> bool:
    """Whether the sysfs ``shmem_enabled`` policy allows a PMD-order folio holding ``index``.

    ``within_size``: i_size must reach the end of that huge page
    (``round_up(index + 1, HPAGE_PMD_NR)`` pages), as mm/shmem.c checks it.
    """
    policy = knobs.shmem_enabled
    if policy in ("always", "force"):
        return True
    if policy == "within_size":
        end = (index // HPAGE_PMD_NR + 1) * HPAGE_PMD_NR
        return pages(i_size) >= end
    if policy == "advise":
        return vm_hugepage
    return False


def hugepage_pmd_enabled(knobs: Knobs) -> bool:
    """hugepage_pmd_enabled(): some policy allows PMD-size THPs at all (anon or file through
    ``enabled``, shmem through ``shmem_enabled``); khugepaged_enter_vma() registers nothing
    otherwise."""
    return knobs.enabled != "never" or knobs.shmem_enabled not in ("never", "deny")


def thp_vma_allowable_order(
    knobs: Knobs,
    *,
    shmem: bool,
    i_size: int,
    pgoff: int,
    vm_hugepage: bool,
    vm_nohugepage: bool,
    open_for_write: bool,
    large_folio: bool = False,
) -> bool:
    """thp_vma_allowable_order(vma, vm_flags, TVA_ENFORCE_SYSFS, PMD_ORDER) for a file VMA whose
    alignment the caller has checked (``transhuge_vma_suitable``).

    Shmem follows ``shmem_enabled`` at the VMA's ``vm_pgoff``; a regular file is eligible under
    CONFIG_READ_ONLY_THP_FOR_FS when nobody has it open for write and ``enabled`` allows the VMA.
    A regular file on a ``large-folio`` filesystem never is: without that option
    file_thp_enabled() is false and ext4 has no ->huge_fault, so __thp_vma_allowable_orders
    returns 0 (smaps THPeligible 0, no khugepaged, MADV_COLLAPSE EINVAL) although its fault path
    maps PMD-order folios that readahead made (do_set_pmd checks no sysfs policy).
    """
    if vm_nohugepage:
        return False
    if shmem:
        return shmem_huge_global_enabled(knobs, i_size, pgoff, vm_hugepage)
    if large_folio:
        return False
    if open_for_write:
        return False
    return knobs.enabled == "always" or (knobs.enabled == "madvise" and vm_hugepage)
