"""The collapser's model state as a snapshot (plain msgpack data, arrays as bytes), and a new
collapser built from one.

What is saved is what the collapser owns for itself: the physical memory's per-page arrays and
allocator, every file with its page-cache slots and shmem swap entries, writeback in progress,
the huge page pool and the other knobs, vmstat and khugepaged's counters. What belongs to the
remapper is not saved: mappings and pins (their counts and the references they hold) die with a
connection, and a restored collapser starts with none; a restored remapper names its mappings
again (``Remap``), and the collapser accounts those that still match its cache.

Restoring rebuilds every page's refcount from the cache alone (one reference per slot) and
repairs what a task in flight left behind, since tasks are not saved: page locks are dropped,
pages a collapse had isolated go back to the LRU, and a page nothing caches any more (the new
THP of a collapse not yet published, a page a truncate had removed) is freed, its huge page back
in the pool: a collapse in flight at the snapshot is rolled back, or completed if it had
published its THP. Restoring checks the snapshot against itself as it goes and raises
:class:`~shared.persist.SnapshotError` at the first inconsistency, before anything is used.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterable, Mapping
from typing import Any

from collapsed.collapser import Collapser
from collapsed.khugepaged import Khugepaged
from collapsed.pagecache import (
    PG_ALLOCATED,
    PG_HEAD,
    PG_LOCKED,
    PG_LRU,
    PG_TAIL,
    PG_WRITEBACK,
    File,
)
from shared.knobs import KnobError, Knobs
from shared.persist import SnapshotError
from shared.units import HPAGE_PMD_NR, HPAGE_PMD_ORDER

DAEMON = "collapsed"
_NR = HPAGE_PMD_NR


def snapshot(c: Collapser) -> dict[str, Any]:
    """Everything :func:`restore` needs, as plain data (safe to encode in another thread)."""
    mem = c.mem
    now = c.now
    return {
        "boot": c.boot,
        "knobs": c.knobs.writable_items(),
        "vm": dict(c.vm),
        "mem": {
            "nr_blocks": mem.nr_blocks,
            "flags": mem.flags.tobytes(),
            "index": mem.index.tobytes(),
            "ino": mem.ino.tobytes(),
            "order": mem.order.tobytes(),
            "free_blocks": list(mem._free_blocks),
            "free_small": list(mem._free_small),
            "small_block": [mem._small_block_next, mem._small_block_end],
            "rng": _rng_state(mem._rng),
        },
        "files": [
            {
                "ino": f.ino,
                "gen": f.gen,
                "name": f.name,
                "size": f.size,
                "shmem": f.shmem,
                "collapse_pmd": f.collapse_pmd,
                "chunks": [[key, chunk.tobytes()] for key, chunk in f.chunks.items()],
            }
            for f in c.cache.files.values()
        ],
        "next_ino": c.cache.next_ino,
        "next_swap": c.cache._next_swap,
        "writeback": [[max(done - now, 0.0), head] for done, head in c.fileops.writeback],
        "khugepaged": {
            "pages_collapsed": c.khugepaged.pages_collapsed,
            "full_scans": c.khugepaged.full_scans,
            "passes": c.khugepaged.passes,
            "results": dict(c.khugepaged.results),
        },
    }


def restore(
    state: Mapping[str, Any],
    knobs: Knobs | None = None,
    boot: int = 1,
    seed: int = 0,
    keep: Iterable[str] = (),
    resched_pages: int | None = None,
) -> Collapser:
    """A new collapser holding ``state``'s world. ``knobs``: the values to start from (the
    command line's); the snapshot's replace them except those named in ``keep``.
    ``resched_pages``: as :class:`~collapsed.collapser.Collapser`'s.

    Errors:
        SnapshotError: the state is malformed or contradicts itself.
    """
    try:
        return _restore(state, knobs or Knobs(), boot, seed, set(keep), resched_pages)
    except SnapshotError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, AttributeError) as err:
        raise SnapshotError(f"{DAEMON} snapshot: malformed ({type(err).__name__}: {err})") from None


def merged_knobs(saved: Mapping[str, Any], given: Knobs, keep: set[str]) -> Knobs:
    """The snapshot's knob values, except those in ``keep``, which ``given`` decides."""
    knobs = Knobs()
    try:
        for name, value in saved.items():
            knobs.set(name, str(value))
    except KnobError as err:
        raise SnapshotError(f"snapshot: bad knob ({err})") from None
    for name in keep:
        knobs.set(name, str(given.get(name)))
    return knobs


def _restore(
    state: Mapping[str, Any], given: Knobs, boot: int, seed: int, keep: set[str], resched_pages: int | None
) -> Collapser:
    knobs = merged_knobs(state["knobs"], given, keep)
    c = Collapser(knobs, seed=seed, resched_pages=resched_pages, boot=boot)
    mem, cache = c.mem, c.cache
    saved = state["mem"]
    nr_blocks = int(saved["nr_blocks"])
    n = nr_blocks * _NR
    flags, index, ino = array("H"), array("q"), array("l")
    flags.frombytes(saved["flags"])
    index.frombytes(saved["index"])
    ino.frombytes(saved["ino"])
    if not nr_blocks >= 1 or not len(flags) == len(index) == len(ino) == n:
        raise SnapshotError(f"{DAEMON} snapshot: page arrays of {len(flags)}/{len(index)}/{len(ino)} for {nr_blocks} blocks")
    mem.flags, mem.index, mem.ino = flags, index, ino
    # Folio orders (a split leaves orders below 9); a snapshot from before them had PMD-order
    # folios only, each a block whose first page is its head.
    order = array("B")
    if "order" in saved:
        order.frombytes(saved["order"])
    else:
        order.frombytes(bytes(n))
        for block in range(0, n, _NR):
            if flags[block] & PG_HEAD:
                order[block : block + _NR] = array("B", bytes([HPAGE_PMD_ORDER]) * _NR)
    if len(order) != n:
        raise SnapshotError(f"{DAEMON} snapshot: folio orders for {len(order)} pages, not {n}")
    mem.order = order
    mem.ref = array("l", bytes(mem.ref.itemsize * n))
    mem.mapcount = array("l", bytes(mem.mapcount.itemsize * n))
    mem.nr_blocks = nr_blocks
    mem._free_blocks = [_pfn(b, n) for b in saved["free_blocks"]]
    mem._free_small = array("q", [_pfn(p, n) for p in saved["free_small"]])
    mem._small_block_next, mem._small_block_end = (int(v) for v in saved["small_block"])
    if not 0 <= mem._small_block_next <= mem._small_block_end <= n:
        raise SnapshotError(f"{DAEMON} snapshot: small-page cursor outside memory")
    mem._rng.setstate(_rng_from(saved["rng"]))
    for pfn in [*mem._free_blocks, *mem._free_small]:
        if flags[pfn] & PG_ALLOCATED:
            raise SnapshotError(f"{DAEMON} snapshot: pfn {pfn} is both free and in use")

    # Files and their slots; every cached page gets its cache references back.
    cached: set[int] = set()
    lru_batch: list[int] = []
    for entry in state["files"]:
        f = File(int(entry["ino"]), str(entry["name"]), int(entry["size"]), bool(entry["shmem"]), gen=int(entry["gen"]))
        f.collapse_pmd = bool(entry["collapse_pmd"])
        if f.ino <= 0 or f.ino in cache.files or f.name in cache.by_name or f.size < 0 or f.gen <= 0:
            raise SnapshotError(f"{DAEMON} snapshot: bad or repeated file {f.name!r} (ino {f.ino})")
        for key, data in entry["chunks"]:
            chunk = array("q")
            chunk.frombytes(data)
            if len(chunk) != _NR or key < 0:
                raise SnapshotError(f"{DAEMON} snapshot: {f.name}: bad slot chunk {key}")
            f.chunks[int(key)] = chunk
        for slot_index, value in f.entries():
            if value < 0:
                f.nrswap += 1
                continue
            if not 0 < value < n or not flags[value] & PG_ALLOCATED:
                raise SnapshotError(f"{DAEMON} snapshot: {f.name}[{slot_index}] holds free pfn {value}")
            head = value & ~((1 << order[value]) - 1)
            if ino[head] != f.ino or index[value] != slot_index:
                raise SnapshotError(f"{DAEMON} snapshot: {f.name}[{slot_index}] holds a page of elsewhere")
            mem.ref[head] += 1
            f.nrpages += 1
            if value == head and order[head] == HPAGE_PMD_ORDER:
                f.nr_thps += 1
            cached.add(head)
        cache.files[f.ino] = f
        cache.by_name[f.name] = f
    cache.next_ino = max([int(state["next_ino"]), *(f.ino + 1 for f in cache.files.values())])
    cache._next_swap = int(state["next_swap"])
    cache.nr_swap_entries = sum(f.nrswap for f in cache.files.values())
    for head in cached:
        if mem.ref[head] != 1 << order[head]:
            raise SnapshotError(f"{DAEMON} snapshot: large folio {head} is only partly in the cache")
        # Tasks are not saved: the locks they held go, and a page a collapse had isolated
        # goes back to the LRU (through the add batch, as putback_lru_page).
        flags[head] &= ~PG_LOCKED
        if not flags[head] & PG_LRU:
            lru_batch.append(head)
    mem.nr_allocated = sum(1 for p in range(n) if flags[p] & PG_ALLOCATED)
    # Pages nothing caches (a collapse's unpublished THP, a truncated page that mappings held):
    # their holders are gone, so they go too; a huge page returns to the pool.
    for block in range(_NR, n, _NR):
        if flags[block] & PG_HEAD and order[block] == HPAGE_PMD_ORDER and block not in cached:
            flags[block] &= ~PG_LOCKED
            knobs.free_huge_pages += 1
            mem.free(block)
        elif order[block] != HPAGE_PMD_ORDER:
            for pfn in range(block, block + _NR):
                if flags[pfn] & PG_ALLOCATED and pfn not in cached and not flags[pfn] & PG_TAIL:
                    mem.free(pfn)  # a small page, or a split-off folio's head
    cache._lru_batch = lru_batch
    cache.lru_add_drain()

    # Writeback in progress ends when it would have (from now on the restored clock).
    wb: dict[float, list[int]] = {}
    for remaining, head in state["writeback"]:
        head = int(head)
        if head in cached and flags[head] & PG_WRITEBACK:
            wb.setdefault(float(remaining), []).append(head)
    for head in cached:
        if flags[head] & PG_WRITEBACK and not any(head in heads for heads in wb.values()):
            flags[head] &= ~PG_WRITEBACK
    for remaining, heads in sorted(wb.items()):
        c.fileops.writeback.extend((c.now + remaining, h) for h in heads)
        c.spawn(c.fileops._end_writeback(c.now + remaining), name="writeback")

    c.vm.update({k: int(v) for k, v in state["vm"].items()})
    _restore_khugepaged(c.khugepaged, state["khugepaged"])
    return c


def _restore_khugepaged(k: Khugepaged, saved: Mapping[str, Any]) -> None:
    k.pages_collapsed = int(saved["pages_collapsed"])
    k.full_scans = int(saved["full_scans"])
    k.passes = int(saved["passes"])
    k.results = {str(name): int(v) for name, v in saved["results"].items()}


def _pfn(value: Any, n: int) -> int:
    pfn = int(value)
    if not 0 < pfn < n:
        raise SnapshotError(f"{DAEMON} snapshot: pfn {pfn} outside memory")
    return pfn


def _rng_state(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from(saved: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = saved
    return (int(version), tuple(int(x) for x in internal), gauss)


__all__ = ["DAEMON", "merged_knobs", "restore", "snapshot"]
