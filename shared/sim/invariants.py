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
  entries; anon mapcounts match; VMAs are sorted, disjoint, merged where the kernel would
  merge them (is_mergeable_vma, is_mergeable_anon_vma), an anon page only in a VMA with an
  anon_vma, and the file rmap (i_mmap) and write counts match them;
* nothing is left locked (no folio stays locked for the remapper), and no freed page is
  reachable; no file is larger than MAX_LFS_FILESIZE; every cached page is on the LRU or in the
  add batch (only a collapse, with the page locked, takes one off);
* files are matched by identity, inode number and generation: with the link up, every file on
  either side is on the other with the same identity, name, size and kind (so a PTE that maps a
  page of its VMA's inode number maps a page of the very file the VMA maps); with the link down,
  the remapper maps no file page at all.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from collapsed.pagecache import (
    HPAGE_PMD_ORDER,
    PG_ALLOCATED,
    PG_DIRTY,
    PG_LOCKED,
    PG_LRU,
)
from remapd.mm import (
    PTE_ANON,
    PTE_DIRTY,
    PTE_SHMEM,
    PTE_WRITE,
    PteTable,
    mergeable_neighbours,
    pte_belongs,
    pte_pfn,
)
from shared.units import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SHIFT,
    HPAGE_PMD_SIZE,
    MAX_LFS_FILESIZE,
    PAGE_SHIFT,
)

if TYPE_CHECKING:
    from collapsed.collapser import Collapser
    from remapd.mm import Vma
    from remapd.remapper import Remapper


def check(c: Collapser, r: Remapper, connected: bool = True) -> None:
    """``connected``: whether the peer link is up (the two sides' files then agree)."""
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
                mergeable = mergeable_neighbours(prev, vma) and vma.start not in mm.unmerged
                assert not mergeable, f"pid {pid}: {prev} and {vma} should have merged"
            prev = vma
            assert vma.mm is mm, f"pid {pid}: {vma} has the wrong vm_mm"
            if vma.anon_vma is not None:
                assert 0 < vma.anon_vma <= mm.anon_vmas, f"pid {pid}: {vma} has an anon_vma never made"
            assert vma.anon_vma is not None or not vma.fork_child, f"pid {pid}: {vma} has a chain, no anon_vma"
            assert r.files.i_mmap.get(vma.ino, {}).get(id(vma)) == (mm, vma), f"pid {pid}: {vma} not in i_mmap"
            seen_vmas.add(id(vma))
            mirror = r.files.get(vma.ino)
            if vma.writes_file and mirror is not None and not mirror.shmem:
                writers[vma.ino] += 1
        assert mm.starts == [v.start for v in mm.vmas], f"pid {pid}: VMA index out of order"
        locked = sum((v.end - v.start) >> PAGE_SHIFT for v in mm.vmas if v.locked)
        assert mm.locked_vm == locked, f"pid {pid}: locked_vm {mm.locked_vm} != {locked} pages in VM_LOCKED VMAs"
        assert all(v.locked for v in mm.vmas if v.lockonfault), f"pid {pid}: VM_LOCKONFAULT without VM_LOCKED"
        rss: Counter[str] = Counter()
        tables = 0
        for pidx, entry in mm.pmds.items():
            base = pidx << HPAGE_PMD_SHIFT
            if isinstance(entry, int):
                head = pte_pfn(entry)
                assert connected, f"pid {pid}: PMD at {base:#x} maps file pfn {head} with the peer gone"
                pmd_vma = mm.find_vma(base)
                assert pmd_vma is not None and pmd_vma.end >= base + HPAGE_PMD_SIZE, f"pid {pid}: PMD at {base:#x} outside a VMA"
                assert mem.allocated(head) and mem.pmd_mappable(head), f"pid {pid}: PMD at {base:#x} maps non-THP {head}"
                assert mem.index[head] % HPAGE_PMD_NR == 0, f"pid {pid}: PMD maps misaligned THP"
                assert mem.ino[head] == pmd_vma.ino and mem.index[head] == pmd_vma.pgoff_at(base), (
                    f"pid {pid}: PMD at {base:#x} maps the wrong THP"
                )
                pmd_maps[head] += 1
                rss["MM_SHMEMPAGES" if entry & PTE_SHMEM else "MM_FILEPAGES"] += HPAGE_PMD_NR
                continue
            assert isinstance(entry, PteTable)
            tables += 1
            nr = foreign = 0
            last_vma: Vma | None = None
            pte_flags = mem.flags
            for slot, pte in entry.present():
                nr += 1
                foreign += not pte_belongs(pte, slot)
                addr = base + (slot << PAGE_SHIFT)
                if last_vma is None or not last_vma.start <= addr < last_vma.end:
                    last_vma = mm.find_vma(addr)
                assert last_vma is not None, f"pid {pid}: PTE at {addr:#x} outside any VMA"
                vma = last_vma
                pfn = pte_pfn(pte)
                if pte & PTE_ANON:
                    assert pfn in r.anon.mapcount, f"pid {pid}: PTE at {addr:#x} maps freed anon page"
                    assert vma.anon_vma is not None, f"pid {pid}: anon page at {addr:#x} in {vma} without anon_vma"
                    anon_maps[pfn] += 1
                    rss["MM_ANONPAGES"] += 1
                    continue
                assert connected, f"pid {pid}: PTE at {addr:#x} maps file pfn {pfn} with the peer gone"
                assert 0 < pfn < len(pte_flags) and pte_flags[pfn] & PG_ALLOCATED, f"pid {pid}: PTE at {addr:#x} maps freed pfn {pfn}"
                head = mem.head(pfn)
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
                assert mem.ino[head] == vma.ino and mem.index[pfn] == vma.pgoff + ((addr - vma.start) >> PAGE_SHIFT), (
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
        marked_mm = r.mms.get(pid)
        assert marked_mm is not None and isinstance(marked_mm.pmds.get(pidx), PteTable), f"marked ({pid}, {pidx:#x}) has no table"
    for ino, mapped in r.files.i_mmap.items():
        for vma_key in mapped:
            assert vma_key in seen_vmas, f"i_mmap of {ino} holds an unlinked VMA"
    assert dict(anon_maps) == {p: n for p, n in r.anon.mapcount.items() if n}, "anon mapcounts disagree"
    for pfn, n in r.anon.mapcount.items():
        assert n or r.anon.pins.get(pfn), f"anon page {pfn} unmapped, unpinned, not freed"

    # -- the page cache -----------------------------------------------------------------------
    cached: set[int] = set()
    swap_entries = 0
    assert not c.peer_locked, f"folios {sorted(c.peer_locked)} left locked for the remapper"
    lru_batch = set(c.cache._lru_batch)
    for f in c.files.values():
        assert 0 <= f.size <= MAX_LFS_FILESIZE, f"{f.name}: size {f.size} out of range"
        nrpages = nrswap = thps = 0
        # The per-slot rules, with the page arrays read directly: this loop visits every cached
        # page after every operation of every model test.
        page_flags, page_ino, page_index, page_order = mem.flags, mem.ino, mem.index, mem.order
        nflags = len(page_flags)
        for chunk_key, chunk in f.chunks.items():
            chunk_base = chunk_key << 9
            for slot, value in enumerate(chunk):
                if not value:
                    continue
                index = chunk_base + slot
                if value < 0:
                    nrswap += 1
                    continue
                nrpages += 1
                assert 0 < value < nflags and page_flags[value] & PG_ALLOCATED, f"{f.name}[{index}] holds freed pfn {value}"
                head = value & ~((1 << page_order[value]) - 1)
                assert page_ino[head] == f.ino and page_index[value] == index, f"{f.name}[{index}] holds a page of elsewhere"
                assert page_flags[head] & (PG_LRU | PG_LOCKED) or head in lru_batch, f"{f.name}[{index}]: page {head} is off the LRU"
                if value == head and page_order[head] == HPAGE_PMD_ORDER:
                    thps += 1
                cached.add(head)
        assert nrpages == f.nrpages, f"{f.name}: nrpages {f.nrpages} != {nrpages}"
        assert nrswap == f.nrswap, f"{f.name}: swap entries {f.nrswap} != {nrswap}"
        swap_entries += nrswap
        assert thps == f.nr_thps, f"{f.name}: nr_thps {f.nr_thps} != {thps}"
        if not f.shmem and connected:
            assert f.writecount == writers[f.ino], f"{f.name}: i_writecount {f.writecount} != {writers[f.ino]}"
        if connected:
            rf = r.files.get(f.ino)
            assert rf is not None, f"{f.name} (ino {f.ino}) unknown to the remapper"
            assert (rf.gen, rf.name, rf.shmem) == (f.gen, f.name, f.shmem), (
                f"ino {f.ino} is {f.name!r} of generation {f.gen} here but {rf.name!r} of generation "
                f"{rf.gen} to the remapper"
            )
            assert rf.size == f.size, f"{f.name}: remapper's size disagrees"
    if connected:
        for ino in r.files:
            assert ino in c.files, f"the remapper's {r.files[ino].name!r} (ino {ino}) is unknown here"
    assert c.cache.nr_swap_entries == swap_entries, f"{c.cache.nr_swap_entries} swap entries counted, {swap_entries} held"

    # Every mapcount is exactly its PTE mappings: those PTEs map, and no other page has one
    # (counted over the whole array at C speed rather than per subpage).
    head_ptes: Counter[int] = Counter()
    for pfn, n in pte_maps.items():
        assert mem.mapcount[pfn] == n, f"pfn {pfn}: mapcount {mem.mapcount[pfn]} != {n} PTEs"
        head_ptes[mem.head(pfn)] += n
    stray = len(mem.mapcount) - mem.mapcount.count(0) - sum(1 for n in pte_maps.values() if n)
    if stray:
        bad = next(p for p, n in enumerate(mem.mapcount) if n and not pte_maps.get(p))
        raise AssertionError(f"pfn {bad}: mapcount {mem.mapcount[bad]} != 0 PTEs")
    heads = set(cached) | set(head_ptes) | set(pmd_maps) | set(mem.pins) | set(mem.entire)
    for head in heads:
        assert mem.allocated(head), f"pfn {head} is referenced but free"
        assert mem.entire.get(head, 0) == pmd_maps[head], f"pfn {head}: entire_mapcount != {pmd_maps[head]} PMDs"
        # The page cache holds one reference per page of a folio (folio_ref_add(folio, nr)).
        expected = (
            mem.folio_nr(head) * (head in cached)
            + head_ptes[head]
            + pmd_maps[head]
            + mem.pins.get(head, 0)
        )
        assert mem.ref[head] == expected, f"pfn {head}: refcount {mem.ref[head]} != {expected}"
        assert not mem.flags[head] & PG_LOCKED, f"pfn {head} left locked"
    expected_allocated = sum(mem.folio_nr(h) for h in heads)
    assert mem.nr_allocated == expected_allocated, (
        f"{mem.nr_allocated} pages allocated but {expected_allocated} reachable (leak)"
    )
