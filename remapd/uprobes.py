"""uprobes: a breakpoint replaces one subpage of a file's text with an anon copy in every mapping
(``install_breakpoint`` → ``uprobe_write_opcode``); removing it puts the page back and calls
``collapse_pte_mapped_thp``, as ``uprobe_write_opcode`` does for a page that belongs to a THP."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from remapd.khugepaged import collapse_pte_mapped_thp
from remapd.mm import (
    PTE_ANON,
    PTE_SHMEM,
    PTE_THP,
    Mm,
    Vma,
    pte_make,
)
from shared import messages as m
from shared.actor import Call
from shared.errors import UserError
from shared.units import HPAGE_PMD_NR, HPAGE_PMD_SHIFT, PAGE_SHIFT
from shared.vm import PROT_EXEC, PROT_WRITE

if TYPE_CHECKING:
    from remapd.remapper import Remapper


def valid_vma(vma: Vma) -> bool:
    """uprobes' valid_vma: a private, executable, not writable file mapping."""
    return not vma.shared and (vma.prot & (PROT_WRITE | PROT_EXEC)) == PROT_EXEC


def _targets(r: Remapper, ino: int, index: int) -> list[tuple[Mm, Vma]]:
    return [
        (mm, vma)
        for mm, vma in r._vmas_of(ino)
        if valid_vma(vma) and vma.pgoff <= index < vma.pgoff_at(vma.end)
    ]


def _lock_target(r: Remapper, mm: Mm, vma: Vma, index: int) -> Generator[Any, Any, Vma | None]:
    """mmap_write_lock a target and look its VMA up again, as register_for_each_vma does: while
    we waited the process may have exited, or unmapped or remapped the range. Returns the VMA
    that now maps ``index`` at the same address, locked, or None (and nothing locked)."""
    addr = vma.addr_of(index)
    try:
        yield from r.lock_write(mm)
    except UserError:
        return None  # exited while we waited
    cur = mm.find_vma(addr)
    if cur is None or cur.ino != vma.ino or not valid_vma(cur) or cur.addr_of(index) != addr:
        r.unlock_write(mm)
        return None
    return cur


def uprobe_add(r: Remapper, name: str, offset: int) -> Generator[Any, Any, dict[str, Any]]:
    f = r.file(name)
    if offset < 0 or offset >= max(f.size, 1):
        raise UserError("EINVAL", f"offset {offset:#x} is outside {name}")
    key = (f.ino, offset >> PAGE_SHIFT)
    if key in r.uprobes:
        raise UserError("EEXIST", f"a uprobe is already at {name}+{offset:#x}")
    r.uprobes.add(key)
    done = 0
    for mm, vma in _targets(r, *key):
        vma = yield from _lock_target(r, mm, vma, key[1])
        if vma is None:
            continue
        try:
            if (yield from install_breakpoint(r, mm, vma, key[1])):
                done += 1
        finally:
            r.unlock_write(mm)
    return {"file": name, "offset": offset, "mappings": done}


def uprobe_del(r: Remapper, name: str, offset: int) -> Generator[Any, Any, dict[str, Any]]:
    f = r.file(name)
    key = (f.ino, offset >> PAGE_SHIFT)
    if key not in r.uprobes:
        raise UserError("ENOENT", f"no uprobe at {name}+{offset:#x}")
    r.uprobes.discard(key)
    results = []
    for mm, vma in _targets(r, *key):
        vma = yield from _lock_target(r, mm, vma, key[1])
        if vma is None:
            continue
        try:
            result = yield from remove_breakpoint(r, mm, vma, key[1])
            if result is not None:
                results.append(result.name)
        finally:
            r.unlock_write(mm)
    return {"file": name, "offset": offset, "collapse_pte_mapped_thp": results}


def install_breakpoint(r: Remapper, mm: Mm, vma: Vma, index: int) -> Generator[Any, Any, bool]:
    """Replace the page at ``index`` with an anon copy; the caller holds the mmap write lock.

    GUP with FOLL_SPLIT_PMD splits a PMD mapping first (for a file THP: the PMD is cleared)."""
    addr = vma.addr_of(index)
    pidx, slot = addr >> HPAGE_PMD_SHIFT, (addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)
    if isinstance(mm.pmds.get(pidx), int):
        r._zap_pmd(mm, pidx, split=True)
    table = r._table(mm, pidx)
    pte = table.ptes[slot]
    if pte & PTE_ANON:
        return False
    if not pte:
        reply = yield Call(m.LookupPage(r.new_req(), vma.ino, index, "copy", False, False, False))
        if reply.status != "ok":
            return False
    else:
        r._zap_pte(mm, table, slot)
    new = r._anon_new()
    r._anon_map(new)
    r._ensure_anon_vma(mm, vma)
    r._set_pte(mm, pidx, slot, pte_make(new, PTE_ANON))
    return True


def remove_breakpoint(r: Remapper, mm: Mm, vma: Vma, index: int) -> Generator[Any, Any, Any]:
    """Put the original page back and, if it belongs to a THP, collapse_pte_mapped_thp."""
    addr = vma.addr_of(index)
    pidx, slot = addr >> HPAGE_PMD_SHIFT, (addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)
    table = mm.pmds.get(pidx)
    if isinstance(table, int) or table is None or not table.ptes[slot] & PTE_ANON:
        return None
    reply = yield Call(m.LookupPage(r.new_req(), vma.ino, index, "map", False, False, False))
    r._zap_pte(mm, table, slot)
    if reply.status != "ok":
        return None
    flags = (PTE_THP if reply.thp else 0) | (PTE_SHMEM if reply.shmem else 0)
    r._set_pte(mm, pidx, slot, pte_make(reply.pfn, flags))
    if not reply.thp:
        return None
    return (yield from collapse_pte_mapped_thp(r, mm, addr, bool(r.knobs.install_pmd)))


def uprobe_mmap(r: Remapper, mm: Mm, vma: Vma) -> Generator[Any, Any, None]:
    """A new mapping of probed text gets the breakpoints too (the caller holds the write lock)."""
    if not valid_vma(vma) or not r.uprobes:
        return
    last = vma.pgoff_at(vma.end)
    for ino, index in sorted(r.uprobes):
        if ino == vma.ino and vma.pgoff <= index < last:
            yield from install_breakpoint(r, mm, vma, index)



