"""The invariant checker: everything the two halves hold must agree.

Run it on a quiet model (no message in flight), e.g. after every :class:`shared.sim.world.World`
operation. It raises ``AssertionError`` naming the first broken rule. It checks:

* every page-cache slot points at a live page of that file at that index; counts (nrpages, swap
  entries per file and in all, THPs) match the slots;
* refcount = cache references (1, or 512 for a THP) + PTE mappings + PMD mappings + pins, for
  every page; mapcount and entire_mapcount match the page tables exactly;
* every PTE and PMD maps, at its address, the page the VMA's file offset says it should, and
  lies inside a VMA; a PMD maps only a PMD-order page whose index is 512-aligned; a file PTE is
  writable only in a shared writable VMA, and dirty only if writable; a regular file's writable
  PTE maps a dirty page (write-notify, mkclean at writeback);
* mm counters and nr_ptes match the tables; each table's counts and mark agree with its
  entries; anon mapcounts match; VMAs are sorted, disjoint, merged where identical, and
  the file rmap (i_mmap) and write counts match them;
* nothing is left locked, and no freed page is reachable.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from collapsed.pagecache import PG_DIRTY, PG_HEAD, PG_LOCKED
from remapd.mm import (
    PTE_ANON,
    PTE_DIRTY,
    PTE_SHMEM,
    PTE_WRITE,
    PteTable,
    pte_belongs,
    pte_pfn,
)
from shared.units import HPAGE_PMD_NR, HPAGE_PMD_SHIFT, HPAGE_PMD_SIZE, PAGE_SHIFT

if TYPE_CHECKING:
    from collapsed.collapser import Collapser
    from remapd.remapper import Remapper


def check(c: Collapser, r: Remapper) -> None:
    assert not c.outbox and not r.outbox, "messages in flight"
    mem = c.mem
    pte_maps: Counter[int] = Counter()
    pmd_maps: Counter[int] = Counter()
    anon_maps: Counter[int] = Counter()
    writers: Counter[int] = Counter()

    # -- the virtual side ---------------------------------------------------------------------
    seen_vmas = set()
    for pid, mm in r.mms.items():
        assert not mm.exiting, f"pid {pid}: exiting mm still listed"
        prev = None
        for vma in mm.vmas:
            assert vma.start < vma.end, f"pid {pid}: empty {vma}"
            assert vma.start % 4096 == 0 and vma.end % 4096 == 0, f"pid {pid}: unaligned {vma}"
            if prev is not None:
                assert prev.end <= vma.start, f"pid {pid}: {prev} overlaps {vma}"
                mergeable = prev.end == vma.start and prev.same_flags(vma) and prev.pgoff_at(prev.end) == vma.pgoff
                assert not mergeable, f"pid {pid}: {prev} and {vma} should have merged"
            prev = vma
            assert r.files.i_mmap.get(vma.ino, {}).get(id(vma)) == (mm, vma), f"pid {pid}: {vma} not in i_mmap"
            seen_vmas.add(id(vma))
            f = r.files.get(vma.ino)
            if vma.writes_file and f is not None and not f.shmem:
                writers[vma.ino] += 1
        assert mm.starts == [v.start for v in mm.vmas], f"pid {pid}: VMA index out of order"
        rss: Counter[str] = Counter()
        tables = 0
        for pidx, entry in mm.pmds.items():
            base = pidx << HPAGE_PMD_SHIFT
            if isinstance(entry, int):
                head = pte_pfn(entry)
                vma = mm.find_vma(base)
                assert vma is not None and vma.end >= base + HPAGE_PMD_SIZE, f"pid {pid}: PMD at {base:#x} outside a VMA"
                assert mem.allocated(head) and mem.flags[head] & PG_HEAD, f"pid {pid}: PMD at {base:#x} maps non-THP {head}"
                assert mem.index[head] % HPAGE_PMD_NR == 0, f"pid {pid}: PMD maps misaligned THP"
                assert mem.ino[head] == vma.ino and mem.index[head] == vma.pgoff_at(base), (
                    f"pid {pid}: PMD at {base:#x} maps the wrong THP"
                )
                pmd_maps[head] += 1
                rss["MM_SHMEMPAGES" if entry & PTE_SHMEM else "MM_FILEPAGES"] += HPAGE_PMD_NR
                continue
            assert isinstance(entry, PteTable)
            tables += 1
            nr = foreign = 0
            for slot, pte in entry.present():
                nr += 1
                foreign += not pte_belongs(pte, slot)
                addr = base + (slot << PAGE_SHIFT)
                vma = mm.find_vma(addr)
                assert vma is not None, f"pid {pid}: PTE at {addr:#x} outside any VMA"
                pfn = pte_pfn(pte)
                if pte & PTE_ANON:
                    assert pfn in r.anon.mapcount, f"pid {pid}: PTE at {addr:#x} maps freed anon page"
                    anon_maps[pfn] += 1
                    rss["MM_ANONPAGES"] += 1
                    continue
                assert mem.allocated(pfn), f"pid {pid}: PTE at {addr:#x} maps freed pfn {pfn}"
                # A private mapping's file PTEs are read-only (CoW); a shared one's are writable
                # only where the VMA is (vm_page_prot); the dirty bit only on a writable PTE.
                assert not pte & PTE_WRITE or vma.writes_file, f"pid {pid}: writable file PTE at {addr:#x} in {vma}"
                assert not pte & PTE_DIRTY or pte & PTE_WRITE, f"pid {pid}: dirty read-only PTE at {addr:#x}"
                if pte & PTE_WRITE and not pte & PTE_SHMEM:
                    # A regular file is write-notified: writable only after a write fault dirtied
                    # the page, and read-only again once writeback takes the dirty bit (mkclean).
                    assert pte & PTE_DIRTY and mem.flags[mem.head(pfn)] & PG_DIRTY, (
                        f"pid {pid}: writable PTE at {addr:#x} of a clean page of a regular file"
                    )
                assert mem.ino[mem.head(pfn)] == vma.ino and mem.index[pfn] == vma.pgoff_at(addr), (
                    f"pid {pid}: PTE at {addr:#x} maps pfn {pfn} (ino {mem.ino[mem.head(pfn)]} index "
                    f"{mem.index[pfn]}), not the file page for its offset ({vma})"
                )
                pte_maps[pfn] += 1
                rss["MM_SHMEMPAGES" if pte & PTE_SHMEM else "MM_FILEPAGES"] += 1
            assert nr == entry.nr and foreign == entry.nr_foreign, f"pid {pid}: table {pidx:#x} counts off"
            assert entry.mark == ((pid, pidx) in r.marked), f"pid {pid}: table {pidx:#x} mark index off"
            if entry.mark:
                assert entry.nr_foreign == 0, f"pid {pid}: marked table {pidx:#x} holds a foreign page"
        assert tables == mm.nr_ptes, f"pid {pid}: nr_ptes {mm.nr_ptes} != {tables} tables"
        for key, value in mm.rss.items():
            assert value == rss[key], f"pid {pid}: {key} {value} != {rss[key]} mapped"
    for pid, pidx in r.marked:
        mm = r.mms.get(pid)
        assert mm is not None and isinstance(mm.pmds.get(pidx), PteTable), f"marked ({pid}, {pidx:#x}) has no table"
    for ino, vmas in r.files.i_mmap.items():
        for key in vmas:
            assert key in seen_vmas, f"i_mmap of {ino} holds an unlinked VMA"
    assert dict(anon_maps) == {p: n for p, n in r.anon.mapcount.items() if n}, "anon mapcounts disagree"
    for pfn, n in r.anon.mapcount.items():
        assert n or r.anon.pins.get(pfn), f"anon page {pfn} unmapped, unpinned, not freed"

    # -- the page cache -----------------------------------------------------------------------
    cached: set[int] = set()
    swap_entries = 0
    for f in c.files.values():
        nrpages = nrswap = thps = 0
        for index, value in f.entries():
            if value < 0:
                nrswap += 1
                continue
            nrpages += 1
            assert mem.allocated(value), f"{f.name}[{index}] holds freed pfn {value}"
            head = mem.head(value)
            assert mem.ino[head] == f.ino and mem.index[value] == index, f"{f.name}[{index}] holds a page of elsewhere"
            if mem.flags[head] & PG_HEAD:
                if value == head:
                    thps += 1
            cached.add(head)
        assert nrpages == f.nrpages, f"{f.name}: nrpages {f.nrpages} != {nrpages}"
        assert nrswap == f.nrswap, f"{f.name}: swap entries {f.nrswap} != {nrswap}"
        swap_entries += nrswap
        assert thps == f.nr_thps, f"{f.name}: nr_thps {f.nr_thps} != {thps}"
        if not f.shmem:
            assert f.writecount == writers[f.ino], f"{f.name}: i_writecount {f.writecount} != {writers[f.ino]}"
        assert r.files.get(f.ino) is not None and r.files[f.ino].size == f.size, f"{f.name}: remapper's size disagrees"
    assert c.cache.nr_swap_entries == swap_entries, f"{c.cache.nr_swap_entries} swap entries counted, {swap_entries} held"

    heads = set(cached) | {mem.head(p) for p in pte_maps} | set(pmd_maps) | set(mem.pins) | set(mem.entire)
    for head in heads:
        assert mem.allocated(head), f"pfn {head} is referenced but free"
        thp = bool(mem.flags[head] & PG_HEAD)
        subpages = range(head, head + HPAGE_PMD_NR) if thp else (head,)
        for pfn in subpages:
            assert mem.mapcount[pfn] == pte_maps[pfn], f"pfn {pfn}: mapcount {mem.mapcount[pfn]} != {pte_maps[pfn]} PTEs"
        assert mem.entire.get(head, 0) == pmd_maps[head], f"pfn {head}: entire_mapcount != {pmd_maps[head]} PMDs"
        expected = (
            (HPAGE_PMD_NR if thp else 1) * (head in cached)
            + sum(pte_maps[p] for p in subpages)
            + pmd_maps[head]
            + mem.pins.get(head, 0)
        )
        assert mem.ref[head] == expected, f"pfn {head}: refcount {mem.ref[head]} != {expected}"
        assert not mem.flags[head] & PG_LOCKED, f"pfn {head} left locked"
    expected_allocated = sum(HPAGE_PMD_NR if mem.flags[h] & PG_HEAD else 1 for h in heads)
    assert mem.nr_allocated == expected_allocated, (
        f"{mem.nr_allocated} pages allocated but {expected_allocated} reachable (leak)"
    )
