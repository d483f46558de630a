"""Page and huge-page geometry (x86-64 with 4 KiB pages), and the size/number parser users type."""

from __future__ import annotations

import re

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
HPAGE_PMD_ORDER = 9
HPAGE_PMD_NR = 1 << HPAGE_PMD_ORDER
HPAGE_PMD_SHIFT = PAGE_SHIFT + HPAGE_PMD_ORDER
HPAGE_PMD_SIZE = 1 << HPAGE_PMD_SHIFT

# Largest address a modelled process may map: 47-bit user address space, as x86-64 4-level paging.
TASK_SIZE = 1 << 47

# Largest file size (include/linux/fs.h MAX_LFS_FILESIZE on 64-bit: LLONG_MAX), and the index of
# the page holding its last byte: no page of any file lies beyond it.
MAX_LFS_FILESIZE = (1 << 63) - 1
MAX_PAGE_INDEX = MAX_LFS_FILESIZE >> PAGE_SHIFT

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_NUMBER = re.compile(r"^(0[xX][0-9a-fA-F]+|[0-9]+)([KkMmGgTt]?)(?:[iI]?[bB])?$")


def parse_size(text: str) -> int:
    """Parse ``4096``, ``0x1000``, ``2M``, ``1G``, ``64KiB`` into bytes.

    Raises:
        ValueError: with a one-line message naming the bad text.
    """
    m = _NUMBER.match(text.strip())
    if not m:
        raise ValueError(f"not a size: {text!r} (use decimal, 0x-hex, with an optional K/M/G suffix)")
    base = int(m.group(1), 0)
    return base * _SUFFIX[m.group(2).upper()]


def pages(nbytes: int) -> int:
    """Number of pages needed to hold ``nbytes``."""
    return (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT
