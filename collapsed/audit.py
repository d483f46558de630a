"""``thpctl check``, collapsed's half: remapd names every file page it maps or pins
(:class:`~shared.protocol.messages.Audit`, see ``remapd/audit.py``), and the collapser checks them
against its pages and page cache: each mapped page is allocated, is the page cached at that index
of that file, and counts exactly those mappings and pins; nothing else counts any; every page's
refcount is its cache references plus its mappings and pins; the cache's own counts hold; no
page is left locked or unreachable; and both sides name the same files with the same identity.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from collapsed.pagecache import PG_LOCKED
from shared.protocol import messages as m

if TYPE_CHECKING:
    from collapsed.collapser import Collapser

MAX_PROBLEMS = 50


def audit(c: Collapser, msg: m.Audit) -> m.Audited:
    if c.pending_calls():
        return m.Audited(msg.req, (), busy=True)
    problems: list[str] = []
    _rows(c, msg.rows, problems)
    if msg.last:
        _whole(c, msg, problems)
    return m.Audited(msg.req, tuple(problems[:MAX_PROBLEMS]))


def _rows(c: Collapser, rows: tuple[tuple[int, int, int, int, int, int], ...], problems: list[str]) -> None:
    mem = c.mem
    pins: Counter[int] = Counter()
    for pfn, ino, index, ptes, pmds, pinned in rows:
        if not mem.allocated(pfn):
            problems.append(f"pfn {pfn} is mapped or pinned by remapd but free")
            continue
        head = mem.head(pfn)
        f = c.files.get(ino)
        # Only pinned and truncated or punched out of the cache since: the pin keeps the page.
        pinned_off_cache = not ptes and not pmds and not mem.ino[head]
        misplaced = mem.ino[head] != ino or mem.index[pfn] != index or f is None or f.get(index) != pfn
        if misplaced and not pinned_off_cache:
            problems.append(
                f"pfn {pfn} is mapped as index {index} of ino {ino}; it is index {mem.index[pfn]} of ino {mem.ino[head]}"
                + ("" if f is not None and f.get(index) == pfn else ", not cached there")
            )
        if mem.mapcount[pfn] != ptes:
            problems.append(f"pfn {pfn}: mapcount {mem.mapcount[pfn]}, remapd maps it with {ptes} PTEs")
        if pmds or head == pfn and mem.entire.get(head):
            if pmds and (pfn != head or not mem.pmd_mappable(head)):
                problems.append(f"pfn {pfn} is mapped with a PMD but is not a THP's head")
            elif mem.entire.get(head, 0) != pmds:
                problems.append(f"THP {head}: entire_mapcount {mem.entire.get(head, 0)}, remapd maps {pmds} PMDs")
        pins[head] += pinned
    for head, n in pins.items():
        if mem.pins.get(head, 0) != n:
            problems.append(f"pfn {head}: {mem.pins.get(head, 0)} pins counted, remapd holds {n}")


def _whole(c: Collapser, msg: m.Audit, problems: list[str]) -> None:
    mem = c.mem
    ptes, pmds, pins = msg.totals
    counted = (len(mem.mapcount) - mem.mapcount.count(0), sum(mem.entire.values()), sum(mem.pins.values()))
    mapped = sum(mem.mapcount)
    if (mapped, counted[1], counted[2]) != (ptes, pmds, pins):
        problems.append(
            f"pages count {mapped} PTE mappings, {counted[1]} PMD mappings and {counted[2]} pins; "
            f"remapd holds {ptes}, {pmds} and {pins}"
        )
    if any(n < 0 for n in mem.mapcount) or any(n < 0 for n in (*mem.entire.values(), *mem.pins.values())):
        problems.append("a negative mapcount or pin count")
    theirs = {ino: (gen, name, size, shmem, writers) for ino, gen, name, size, shmem, writers in msg.files}
    for f in c.files.values():
        mirror = theirs.pop(f.ino, None)
        if mirror is None:
            problems.append(f"{f.name!r} (ino {f.ino}) is unknown to remapd")
        elif mirror[:4] != (f.gen, f.name, f.size, f.shmem):
            problems.append(f"ino {f.ino} is {(f.gen, f.name, f.size, f.shmem)} here, {mirror[:4]} to remapd")
        elif not f.shmem and mirror[4] != f.writecount:
            problems.append(f"{f.name}: i_writecount {f.writecount}, remapd has {mirror[4]} writers")
    for ino, mirror in theirs.items():
        problems.append(f"remapd's {mirror[1]!r} (ino {ino}) is unknown here")
    # The cache: counts, references, locks, leaks.
    reachable: set[int] = set()
    cache_refs: Counter[int] = Counter()
    swap = 0
    for f in c.files.values():
        nrpages = thps = nrswap = 0
        for index, value in f.entries():
            if value < 0:
                nrswap += 1
                continue
            nrpages += 1
            if not mem.allocated(value):
                problems.append(f"{f.name}[{index}] holds free pfn {value}")
                continue
            head = mem.head(value)
            cache_refs[head] += 1
            reachable.add(head)
            thps += value == head and mem.pmd_mappable(head)
        if (nrpages, thps, nrswap) != (f.nrpages, f.nr_thps, f.nrswap):
            problems.append(f"{f.name}: counts {(f.nrpages, f.nr_thps, f.nrswap)}, holds {(nrpages, thps, nrswap)}")
        swap += nrswap
    if swap != c.cache.nr_swap_entries:
        problems.append(f"{c.cache.nr_swap_entries} swap entries counted, {swap} held")
    mapped_heads = {mem.head(p) for p, n in enumerate(mem.mapcount) if n}
    for head in reachable | mapped_heads | set(mem.entire) | set(mem.pins):
        subs = range(head, head + mem.folio_nr(head))
        expected = cache_refs[head] + sum(mem.mapcount[p] for p in subs) + mem.entire.get(head, 0) + mem.pins.get(head, 0)
        if mem.ref[head] != expected:
            problems.append(f"pfn {head}: refcount {mem.ref[head]}, {expected} references held")
        if mem.flags[head] & PG_LOCKED:
            problems.append(f"pfn {head} left locked")
        reachable.add(head)
    held = sum(mem.folio_nr(h) for h in reachable)
    if mem.nr_allocated != held:
        problems.append(f"{mem.nr_allocated} pages allocated, {held} reachable (a leak)")


__all__ = ["audit"]
