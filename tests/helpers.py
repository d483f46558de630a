"""Small helpers the model tests share: geometry shorthands and views into the model's state."""

from __future__ import annotations

from shared.units import HPAGE_PMD_NR, HPAGE_PMD_SHIFT, HPAGE_PMD_SIZE, PAGE_SHIFT, PAGE_SIZE

P = PAGE_SIZE
H = HPAGE_PMD_SIZE
QUARTER = HPAGE_PMD_SIZE // 4
# A 2 MiB-aligned address well below where mmap(NULL) places things.
FIXED = 0x40000000
# khugepaged and the remapper both wake every TICK ms in the policy tests; HOLD spans two passes.
TICK = 1000
HOLD = 2500


def pte_at(world, pid: int, addr: int) -> int:
    """The PTE (or PMD entry) mapping ``addr`` in ``pid``, 0 if none."""
    entry = world.remapper.mms[pid].pmds.get(addr >> HPAGE_PMD_SHIFT)
    if entry is None or isinstance(entry, int):
        return entry or 0
    return entry.ptes[(addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)]


def cache_pfn(world, name: str, index: int) -> int:
    return world.collapser.by_name[name].get(index)


def smaps1(world, pid: int) -> dict:
    """The smaps entry of a process with exactly one VMA."""
    (entry,) = world.smaps(pid)
    return entry
