"""The bit layouts of /proc/PID/pagemap and /proc/kpageflags (Documentation/admin-guide/mm/
pagemap.rst, include/uapi/linux/kernel-page-flags.h), which both actors fill in and thpctl decodes.

A pagemap entry is a u64 per virtual page: bit 63 present, 62 swapped, 61 file-page or
shared-anon, 58 guard region, 57 uffd-wp, 56 exclusively mapped, 55 soft-dirty, bits 0-54 the PFN
(of a present page). A kpageflags entry is a u64 of KPF_* bits per physical page.
"""

from __future__ import annotations

PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_GUARD_REGION = 1 << 58
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63

# KPF_* bit numbers: the stable ones (uapi) and, from 32, the kernel-hacking ones.
KPF_BITS = {
    "LOCKED": 0,
    "ERROR": 1,
    "REFERENCED": 2,
    "UPTODATE": 3,
    "DIRTY": 4,
    "LRU": 5,
    "ACTIVE": 6,
    "SLAB": 7,
    "WRITEBACK": 8,
    "RECLAIM": 9,
    "BUDDY": 10,
    "MMAP": 11,
    "ANON": 12,
    "SWAPCACHE": 13,
    "SWAPBACKED": 14,
    "COMPOUND_HEAD": 15,
    "COMPOUND_TAIL": 16,
    "HUGE": 17,
    "UNEVICTABLE": 18,
    "HWPOISON": 19,
    "NOPAGE": 20,
    "KSM": 21,
    "THP": 22,
    "OFFLINE": 23,
    "ZERO_PAGE": 24,
    "IDLE": 25,
    "PGTABLE": 26,
    "RESERVED": 32,
    "MLOCKED": 33,
    "MAPPEDTODISK": 34,
    "PRIVATE": 35,
    "PRIVATE_2": 36,
    "OWNER_PRIVATE": 37,
    "ARCH": 38,
    "UNCACHED": 39,
    "SOFTDIRTY": 40,
    "ARCH_2": 41,
}

KPF_LOCKED = 1 << KPF_BITS["LOCKED"]
KPF_UPTODATE = 1 << KPF_BITS["UPTODATE"]
KPF_DIRTY = 1 << KPF_BITS["DIRTY"]
KPF_LRU = 1 << KPF_BITS["LRU"]
KPF_WRITEBACK = 1 << KPF_BITS["WRITEBACK"]
KPF_BUDDY = 1 << KPF_BITS["BUDDY"]
KPF_MMAP = 1 << KPF_BITS["MMAP"]
KPF_ANON = 1 << KPF_BITS["ANON"]
KPF_SWAPBACKED = 1 << KPF_BITS["SWAPBACKED"]
KPF_COMPOUND_HEAD = 1 << KPF_BITS["COMPOUND_HEAD"]
KPF_COMPOUND_TAIL = 1 << KPF_BITS["COMPOUND_TAIL"]
KPF_NOPAGE = 1 << KPF_BITS["NOPAGE"]
KPF_THP = 1 << KPF_BITS["THP"]
KPF_RESERVED = 1 << KPF_BITS["RESERVED"]

# page-types' one-letter symbols (tools/mm/page-types.c), for thpctl's text output.
KPF_SYMBOLS = {
    "LOCKED": "L",
    "ERROR": "E",
    "REFERENCED": "R",
    "UPTODATE": "U",
    "DIRTY": "D",
    "LRU": "l",
    "ACTIVE": "A",
    "SLAB": "S",
    "WRITEBACK": "W",
    "RECLAIM": "I",
    "BUDDY": "B",
    "MMAP": "M",
    "ANON": "a",
    "SWAPCACHE": "s",
    "SWAPBACKED": "b",
    "COMPOUND_HEAD": "H",
    "COMPOUND_TAIL": "T",
    "HUGE": "G",
    "UNEVICTABLE": "u",
    "HWPOISON": "X",
    "NOPAGE": "n",
    "KSM": "x",
    "THP": "t",
    "OFFLINE": "o",
    "ZERO_PAGE": "z",
    "IDLE": "i",
    "PGTABLE": "g",
    "RESERVED": "r",
    "MLOCKED": "m",
    "MAPPEDTODISK": "d",
    "PRIVATE": "P",
    "PRIVATE_2": "p",
    "OWNER_PRIVATE": "O",
    "ARCH": "h",
    "UNCACHED": "c",
    "SOFTDIRTY": "f",
    "ARCH_2": "H",
}

# How many entries one pagemap or kpageflags request carries at most (256 MiB of pagemap).
MAX_ENTRIES = 1 << 16


def kpf_names(flags: int) -> list[str]:
    """The KPF_* names set in ``flags``, by bit number."""
    return [name for name, bit in KPF_BITS.items() if flags >> bit & 1]


def page_types_symbols(flags: int) -> str:
    """``flags`` as page-types prints them: one symbol per bit, ``_`` for a clear one."""
    return "".join(KPF_SYMBOLS[name] if flags >> bit & 1 else "_" for name, bit in KPF_BITS.items() if bit < 27)


__all__ = [
    "KPF_BITS",
    "MAX_ENTRIES",
    "PM_FILE",
    "PM_MMAP_EXCLUSIVE",
    "PM_PFN_MASK",
    "PM_PRESENT",
    "PM_SOFT_DIRTY",
    "PM_SWAP",
    "kpf_names",
    "page_types_symbols",
]
