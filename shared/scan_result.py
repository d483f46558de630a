"""khugepaged's ``enum scan_result`` as in a 6.x kernel, with each code's tracepoint string."""

from __future__ import annotations

import enum


class ScanResult(enum.IntEnum):
    """Result codes of the scan/collapse paths; values and order are the kernel's (6.x)."""

    SCAN_FAIL = 0
    SCAN_SUCCEED = 1
    SCAN_PMD_NULL = 2
    SCAN_PMD_NONE = 3
    SCAN_PMD_MAPPED = 4
    SCAN_EXCEED_NONE_PTE = 5
    SCAN_EXCEED_SWAP_PTE = 6
    SCAN_EXCEED_SHARED_PTE = 7
    SCAN_PTE_NON_PRESENT = 8
    SCAN_PTE_UFFD_WP = 9
    SCAN_PTE_MAPPED_HUGEPAGE = 10
    SCAN_PAGE_RO = 11
    SCAN_LACK_REFERENCED_PAGE = 12
    SCAN_PAGE_NULL = 13
    SCAN_SCAN_ABORT = 14
    SCAN_PAGE_COUNT = 15
    SCAN_PAGE_LRU = 16
    SCAN_PAGE_LOCK = 17
    SCAN_PAGE_ANON = 18
    SCAN_PAGE_COMPOUND = 19
    SCAN_ANY_PROCESS = 20
    SCAN_VMA_NULL = 21
    SCAN_VMA_CHECK = 22
    SCAN_ADDRESS_RANGE = 23
    SCAN_DEL_PAGE_LRU = 24
    SCAN_ALLOC_HUGE_PAGE_FAIL = 25
    SCAN_CGROUP_CHARGE_FAIL = 26
    SCAN_TRUNCATED = 27
    SCAN_PAGE_HAS_PRIVATE = 28
    SCAN_STORE_FAILED = 29
    SCAN_COPY_MC = 30
    SCAN_PAGE_FILLED = 31

    @property
    def trace(self) -> str:
        """The string ``include/trace/events/huge_memory.h`` prints for this code."""
        return _TRACE[self]


_TRACE = {
    ScanResult.SCAN_FAIL: "failed",
    ScanResult.SCAN_SUCCEED: "succeeded",
    ScanResult.SCAN_PMD_NULL: "pmd_null",
    ScanResult.SCAN_PMD_NONE: "pmd_none",
    ScanResult.SCAN_PMD_MAPPED: "page_pmd_mapped",
    ScanResult.SCAN_EXCEED_NONE_PTE: "exceed_none_pte",
    ScanResult.SCAN_EXCEED_SWAP_PTE: "exceed_swap_pte",
    ScanResult.SCAN_EXCEED_SHARED_PTE: "exceed_shared_pte",
    ScanResult.SCAN_PTE_NON_PRESENT: "pte_non_present",
    ScanResult.SCAN_PTE_UFFD_WP: "pte_uffd_wp",
    ScanResult.SCAN_PTE_MAPPED_HUGEPAGE: "pte_mapped_hugepage",
    ScanResult.SCAN_PAGE_RO: "no_writable_page",
    ScanResult.SCAN_LACK_REFERENCED_PAGE: "lack_referenced_page",
    ScanResult.SCAN_PAGE_NULL: "page_null",
    ScanResult.SCAN_SCAN_ABORT: "scan_aborted",
    ScanResult.SCAN_PAGE_COUNT: "not_suitable_page_count",
    ScanResult.SCAN_PAGE_LRU: "page_not_in_lru",
    ScanResult.SCAN_PAGE_LOCK: "page_locked",
    ScanResult.SCAN_PAGE_ANON: "page_not_anon",
    ScanResult.SCAN_PAGE_COMPOUND: "page_compound",
    ScanResult.SCAN_ANY_PROCESS: "no_process_for_page",
    ScanResult.SCAN_VMA_NULL: "vma_null",
    ScanResult.SCAN_VMA_CHECK: "vma_check_failed",
    ScanResult.SCAN_ADDRESS_RANGE: "not_suitable_address_range",
    ScanResult.SCAN_DEL_PAGE_LRU: "could_not_delete_page_from_lru",
    ScanResult.SCAN_ALLOC_HUGE_PAGE_FAIL: "alloc_huge_page_failed",
    ScanResult.SCAN_CGROUP_CHARGE_FAIL: "ccgroup_charge_failed",
    ScanResult.SCAN_TRUNCATED: "truncated",
    ScanResult.SCAN_PAGE_HAS_PRIVATE: "page_has_private",
    ScanResult.SCAN_STORE_FAILED: "store_failed",
    ScanResult.SCAN_COPY_MC: "copy_poisoned_page",
    ScanResult.SCAN_PAGE_FILLED: "page_filled",
}


# The madvise_collapse_errno() table (6.x): what MADV_COLLAPSE returns for a failed range.
_EAGAIN = {
    ScanResult.SCAN_PAGE_COUNT,
    ScanResult.SCAN_PAGE_LOCK,
    ScanResult.SCAN_PAGE_LRU,
    ScanResult.SCAN_DEL_PAGE_LRU,
    ScanResult.SCAN_PAGE_FILLED,
}
_EBUSY = {ScanResult.SCAN_CGROUP_CHARGE_FAIL, ScanResult.SCAN_EXCEED_NONE_PTE}


def madvise_collapse_errno(result: ScanResult) -> str:
    if result == ScanResult.SCAN_ALLOC_HUGE_PAGE_FAIL:
        return "ENOMEM"
    if result in _EBUSY:
        return "EBUSY"
    if result in _EAGAIN:
        return "EAGAIN"
    return "EINVAL"
