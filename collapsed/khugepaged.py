"""khugepaged's first half: the scan of registered file ranges, ``hpage_collapse_scan_file`` and
``collapse_file`` (mm/khugepaged.c, 6.x semantics), and MADV_COLLAPSE's page-cache half.

Where the kernel would touch page tables (``try_to_unmap`` of the old pages, ``retract_page_tables``,
``collapse_pte_mapped_thp``) the collapser sends a request to the remapper and waits for the answer:
that is the split Kirill proposed. ``try_to_unmap`` is one batched request per collapse, sent after
the pages are locked and isolated, so the refcount check comes after every page's lock/LRU checks.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import Counter
from collections.abc import Generator, Sequence
from typing import Any, NamedTuple

import numpy as np

from collapsed.fileops import FileOps
from collapsed.pagecache import (
    PG_DIRTY,
    PG_HEAD,
    PG_LOCKED,
    PG_LRU,
    PG_SWAPBACKED,
    PG_TAIL,
    PG_UPTODATE,
    PG_WRITEBACK,
    File,
    PageCache,
    view,
)
from shared import messages as m
from shared.actor import Actor, Call, Sleep, Wait
from shared.knobs import Knobs
from shared.scan_result import ScanResult as R
from shared.thp import thp_vma_allowable_order
from shared.tracepoints import NO_PFN, get_logger, mm_pointer
from shared.units import HPAGE_PMD_NR, HPAGE_PMD_SIZE, PAGE_SHIFT

log = get_logger("collapsed.khugepaged")

# What ends khugepaged's two sleeps early (see shared.knobs.KHUGEPAGED_SLEEP_KNOBS).
SCAN_SLEEP_WAKE = "khugepaged_sleep_expire"
ALLOC_SLEEP_WAKE = "khugepaged_wait"


@dataclasses.dataclass
class Range:
    """A registered file VMA (khugepaged_enter_vma): [start, end) maps ``ino`` from ``pgoff``."""

    start: int
    end: int
    ino: int
    pgoff: int
    vm_hugepage: bool
    vm_nohugepage: bool

    def pgoff_at(self, addr: int) -> int:
        return self.pgoff + ((addr - self.start) >> PAGE_SHIFT)


@dataclasses.dataclass
class MmSlot:
    pid: int
    ranges: dict[int, Range] = dataclasses.field(default_factory=dict)
    starts: list[int] = dataclasses.field(default_factory=list)


class Ready(NamedTuple):
    """A range whose 512 slots hold small pages that collapse_file may isolate in one go, as
    :meth:`Khugepaged._scan_range` found them."""

    pfns: np.ndarray  # in index order
    flags: np.ndarray  # theirs, and their refcounts, before the isolation
    refs: np.ndarray
    mapped: np.ndarray  # those mapped with a PTE: try_to_unmap's work


@dataclasses.dataclass
class CollapseControl:
    """struct collapse_control: who is collapsing (khugepaged or MADV_COLLAPSE) and for whom."""

    is_khugepaged: bool
    pid: int
    addr: int


class Khugepaged:
    """The scan state (mm slots, cursor, pages_collapsed, full_scans) and the kthread.

    Collapses pages of ``cache``; ``fileops`` flushes a dirty page it meets and unmaps the pages
    it collapses. ``actor`` is the runtime it runs in: its clock paces the scan, its requests to
    the remapper unmap, retract and visit mms. ``vm`` is the actor's vmstat event counters.
    """

    def __init__(self, actor: Actor, cache: PageCache, fileops: FileOps, knobs: Knobs, vm: Counter[str]) -> None:
        self.actor = actor
        self.cache = cache
        self.fileops = fileops
        self.knobs = knobs
        self.vm = vm
        self.slots: dict[int, MmSlot] = {}  # every mm with a file VMA, entered or not
        self.order: list[int] = []  # khugepaged's mm list: the entered mms, in order of entry
        self.cursor_pid: int | None = None
        self.cursor_addr = 0
        self.pages_collapsed = 0
        self.full_scans = 0
        self.passes = 0
        self.results: dict[str, int] = {}

    # -- registration (khugepaged_enter_vma / collect_mm_slot) --------------------------------

    def register(self, msg: m.RegisterRange) -> None:
        slot = self.slots.get(msg.pid)
        if slot is None:
            slot = self.slots[msg.pid] = MmSlot(msg.pid)
        if msg.start not in slot.ranges:
            bisect.insort(slot.starts, msg.start)
        slot.ranges[msg.start] = Range(msg.start, msg.end, msg.ino, msg.pgoff, msg.vm_hugepage, msg.vm_nohugepage)
        if not msg.entered or msg.pid in self.order:
            return
        # __khugepaged_enter: the mm joins the list; khugepaged is woken when it was empty.
        wakeup = not self.order
        self.order.append(msg.pid)
        if wakeup:
            # The wakeup runs the kthread at once: the VMA must be in the slot by then, as
            # khugepaged_enter_vma comes after the VMA is linked.
            self.actor.notify("khugepaged_work")

    def unregister(self, pid: int, start: int) -> None:
        slot = self.slots.get(pid)
        if slot is not None and slot.ranges.pop(start, None) is not None:
            slot.starts.remove(start)

    def mm_exit(self, pid: int) -> None:
        if self.slots.pop(pid, None) is not None and pid in self.order:
            self.order.remove(pid)
            if self.cursor_pid == pid:
                self.cursor_pid = None

    # -- the kthread --------------------------------------------------------------------------

    def thread(self) -> Generator[Any, Any, None]:
        """khugepaged(): scan a pass, sleep scan_sleep_millisecs (a knob write wakes it early)."""
        while True:
            if not self.order:
                yield Wait("khugepaged_work")
                continue
            yield from self.do_scan()
            yield Sleep(self.actor.now + self.knobs.scan_sleep_millisecs, wake=SCAN_SLEEP_WAKE)

    def do_scan(self) -> Generator[Any, Any, None]:
        """khugepaged_do_scan: spend ``pages_to_scan`` progress; one alloc-failure sleep per pass."""
        pages = self.knobs.pages_to_scan
        progress = 0
        wait = True
        pass_through_head = 0
        self.passes += 1
        self.cache.lru_add_drain()  # lru_add_drain_all() at the start of every pass
        while True:
            if self.cursor_pid is None:
                pass_through_head += 1
            if self.order and pass_through_head < 2:
                got, result = yield from self.scan_mm_slot(pages - progress)
                progress += got
            else:
                progress = pages
            if progress >= pages:
                return
            if result == R.SCAN_ALLOC_HUGE_PAGE_FAIL:
                if not wait:
                    return
                wait = False
                yield Sleep(self.actor.now + self.knobs.alloc_sleep_millisecs, wake=ALLOC_SLEEP_WAKE)

    def _eligible(self, r: Range, f: File) -> bool:
        """hugepage_vma_check: thp_vma_allowable_order with TVA_ENFORCE_SYSFS for the range's VMA."""
        return thp_vma_allowable_order(
            self.knobs,
            shmem=f.shmem,
            i_size=f.size,
            pgoff=r.pgoff,
            vm_hugepage=r.vm_hugepage,
            vm_nohugepage=r.vm_nohugepage,
            open_for_write=f.writecount > 0,
            large_folio=f.large_folio,
        )

    def scan_mm_slot(self, pages: int) -> Generator[Any, Any, tuple[int, R]]:
        """khugepaged_scan_mm_slot: continue at the cursor; a scanned file range ends the visit."""
        result = R.SCAN_FAIL
        if self.cursor_pid is None or self.cursor_pid not in self.slots:
            self.cursor_pid = self.order[0]
            self.cursor_addr = 0
        slot = self.slots[self.cursor_pid]
        progress = 1
        if self.knobs.retry_policy == "mm-slot":
            yield Call(m.VisitMm(self.actor.new_req(), slot.pid))
            if slot.pid not in self.slots:
                self._next_slot(slot.pid)
                return progress, result
        i = bisect.bisect_right(slot.starts, self.cursor_addr) - 1
        for start in slot.starts[max(i, 0) :]:
            r = slot.ranges[start]
            f = self.cache.files.get(r.ino)
            if f is None or not self._eligible(r, f):
                progress += 1
                continue
            hstart = max((r.start + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1), self.cursor_addr)
            hend = r.end & ~(HPAGE_PMD_SIZE - 1)
            if hstart >= hend or (r.start >> PAGE_SHIFT) % HPAGE_PMD_NR != r.pgoff % HPAGE_PMD_NR:
                progress += 1
                continue
            addr = hstart
            pgoff = r.pgoff_at(addr)
            cc = CollapseControl(True, slot.pid, addr)
            result = yield from self.hpage_collapse_scan_file(f, pgoff, cc)
            if result == R.SCAN_PTE_MAPPED_HUGEPAGE:
                result = yield from self._pte_mapped(f, pgoff, cc)
            if result == R.SCAN_SUCCEED:
                self.pages_collapsed += 1
            self.cursor_addr = addr + HPAGE_PMD_SIZE
            progress += HPAGE_PMD_NR
            return progress, result
        self._next_slot(slot.pid)
        return progress, result

    def _next_slot(self, pid: int) -> None:
        idx = self.order.index(pid) if pid in self.order else -1
        if idx + 1 < len(self.order):
            self.cursor_pid = self.order[idx + 1]
        else:
            self.cursor_pid = None
            self.full_scans += 1
        self.cursor_addr = 0

    def _pte_mapped(self, f: File, pgoff: int, cc: CollapseControl) -> Generator[Any, Any, R]:
        """What each retry policy does when the scan finds the THP already in the page cache."""
        cache = self.cache
        new_req = self.actor.new_req
        policy = self.knobs.retry_policy
        if policy == "lockless":
            # 6.6+: collapse_pte_mapped_thp(mm, addr, false) right away, under mmap_read_lock.
            reply = yield Call(m.CollapsePteMapped(new_req(), cc.pid, cc.addr))
            result = R(reply.result)
            return R.SCAN_SUCCEED if result == R.SCAN_PMD_MAPPED else result
        if policy == "per-mapping" and f.collapse_pmd:
            # The seed's v6: test_and_clear_bit(AS_COLLAPSE_PMD) by the first THP the scan meets.
            f.collapse_pmd = False
            head = cache.mem.head(f.get(pgoff))
            if cache.trylock(head):
                reply = yield Call(m.Retract(new_req(), f.ino, pgoff, head))
                cache.unlock(head)
                if reply.retracted:
                    return R.SCAN_SUCCEED
        return R.SCAN_PTE_MAPPED_HUGEPAGE

    # -- hpage_collapse_scan_file -------------------------------------------------------------

    def hpage_collapse_scan_file(self, f: File, start: int, cc: CollapseControl) -> Generator[Any, Any, R]:
        """Look at the 512 slots from ``start`` without locking anything; if they qualify (the
        ``max_ptes_*`` limits apply to khugepaged only), ``collapse_file`` them."""
        mem = self.cache.mem
        k = self.knobs
        present = swap = 0
        result = R.SCAN_SUCCEED
        scan_pfn = -1
        ready = None
        quick = self._scan_range(f, start)
        if quick is not None:
            present, scan_pfn, ready = quick
        for index in range(start, start + HPAGE_PMD_NR if quick is None else start):
            value = f.get(index)
            if value == 0:
                continue
            if value < 0:
                swap += 1
                if cc.is_khugepaged and swap > k.max_ptes_swap:
                    result = R.SCAN_EXCEED_SWAP_PTE
                    self.vm["thp_scan_exceed_swap_pte"] += 1
                    break
                continue
            head = mem.head(value)
            if index != max(start, mem.index[head]):
                continue  # a large folio is one multi-index entry, met once
            scan_pfn = value
            if mem.pmd_mappable(head):
                pmd_order_at_start = mem.index[head] == start
                result = R.SCAN_PTE_MAPPED_HUGEPAGE if pmd_order_at_start else R.SCAN_PAGE_COMPOUND
                break
            if not mem.flags[head] & PG_LRU:
                result = R.SCAN_PAGE_LRU
                break
            # folio_expected_ref_count: a reference per page from the cache and per mapping.
            nr = mem.folio_nr(head)
            if mem.ref[head] != nr + mem.total_mapcount(head):
                result = R.SCAN_PAGE_COUNT
                break
            present += nr
        if result == R.SCAN_SUCCEED:
            if cc.is_khugepaged and present < HPAGE_PMD_NR - k.max_ptes_none:
                result = R.SCAN_EXCEED_NONE_PTE
                self.vm["thp_scan_exceed_none_pte"] += 1
            else:
                result = yield from self.collapse_file(f, start, cc, ready)
        log.debug(
            "mm_khugepaged_scan_file",
            mm=mm_pointer(cc.pid),
            scan_pfn=mem.head(scan_pfn) if scan_pfn > 0 else NO_PFN,
            filename=f.name,
            present=present,
            swap=swap,
            result=result.trace,
        )
        self._count(result)
        return result

    def _scan_range(self, f: File, start: int) -> tuple[int, int, Ready | None] | None:
        """The scan's loop in one go when it cannot stop early: no swap entry, and every page
        present is small, on the LRU and has no extra reference. (present, the last pfn seen,
        and whether collapse_file's page loop may isolate the range in one go); None leaves the
        range to the loop, which finds where it stops.

        The isolation's checks are made here too, on the same gathered flags: collapse_file
        runs them right after this scan, with nothing in between that could change these pages
        (the huge page it allocates first is another block)."""
        if start & (HPAGE_PMD_NR - 1):
            return None
        chunk = f.chunks.get(start >> 9)
        if chunk is None:
            return 0, -1, None
        values = view(chunk)
        present = values > 0
        n = int(np.count_nonzero(present))
        if n == HPAGE_PMD_NR:
            pfns = values.copy()
        elif np.count_nonzero(values < 0):
            return None
        elif not n:
            return 0, -1, None
        else:
            pfns = values[present]
        del values
        mem = self.cache.mem
        flags = view(mem.flags)[pfns]
        # The scan's checks of the flags (small pages on the LRU) and, for a range without a
        # hole, collapse_file's of each locked page (not locked by another, PG_uptodate, neither
        # dirty nor under writeback but for shmem) in one pass; the scan's alone if that fails.
        refuse = PG_HEAD | PG_TAIL | PG_LOCKED | (0 if f.shmem else PG_DIRTY | PG_WRITEBACK)
        need = PG_LRU | PG_UPTODATE
        isolable = n == HPAGE_PMD_NR and not np.count_nonzero((flags & (refuse | need)) != need)
        if not isolable and np.count_nonzero((flags & (PG_HEAD | PG_TAIL | PG_LRU)) != PG_LRU):
            return None
        refs = view(mem.ref)[pfns]
        maps = view(mem.mapcount)[pfns]
        if np.count_nonzero(refs != maps + 1):
            return None
        last = int(pfns[-1])
        # The isolation's last check: every page still this file's.
        if not isolable or np.count_nonzero(view(mem.ino)[pfns] != f.ino):
            return n, last, None
        return n, last, Ready(pfns, flags, refs, pfns[maps != 0])

    def _isolate(self, ready: Ready) -> np.ndarray:
        """collapse_file's page loop for a range :meth:`_scan_range` found ready: lock, isolate
        from the LRU and take the two references of all 512 pages at once."""
        mem = self.cache.mem
        pfns = ready.pfns
        view(mem.flags)[pfns] = (ready.flags | PG_LOCKED) & (~PG_LRU & 0xFFFF)
        view(mem.ref)[pfns] = ready.refs + 2
        return pfns

    def _count(self, result: R) -> None:
        self.results[result.name] = self.results.get(result.name, 0) + 1

    # -- collapse_file ------------------------------------------------------------------------

    def collapse_file(
        self, f: File, start: int, cc: CollapseControl, ready: Ready | None = None
    ) -> Generator[Any, Any, R]:
        """``ready``: what the scan just before found (:meth:`_scan_range`), if it found the range
        ready to isolate in one go."""
        cache = self.cache
        mem = cache.mem
        end = start + HPAGE_PMD_NR
        direct = (not cc.is_khugepaged) or bool(self.knobs.khugepaged_defrag)
        new = cache.alloc_huge(direct)
        if not new:
            self.vm["thp_collapse_alloc_failed"] += 1
            result = R.SCAN_ALLOC_HUGE_PAGE_FAIL
            self._trace_collapse(f, 0, 0, cc, result)
            return result
        self.vm["thp_collapse_alloc"] += 1
        mem.flags[new] |= PG_LOCKED | (PG_SWAPBACKED if f.shmem else 0)
        mem.index[new] = start
        mem.ino[new] = f.ino

        nr_none = 0
        result = R.SCAN_SUCCEED
        quick = None if ready is None else self._isolate(ready)
        pagelist: list[int] = []
        index = start if quick is None else end
        while index < end:
            value = f.get(index)
            if f.shmem:
                if value == 0:
                    if index == start and not any(f.get(i) for i in range(start, end)):
                        result = R.SCAN_TRUNCATED
                        break
                    nr_none += 1
                    index += 1
                    continue
                if value < 0:
                    # shmem_get_folio(SGP_NOALLOC): swap it in; the new page comes back locked.
                    pfn = cache.add_small_page(f, index)
                    if not pfn:
                        result = R.SCAN_FAIL  # memory is full: shmem_get_folio fails
                        break
                    self.vm["pswpin"] += 1
                    cache.lru_add_drain()
                    cache.trylock(pfn)
                else:
                    pfn = value
                    if not cache.trylock(mem.head(pfn)):
                        result = R.SCAN_PAGE_LOCK
                        break
            else:
                if value <= 0:
                    # page_cache_sync_readahead + lru_add_drain + filemap_lock_folio.
                    if index >= f.nr_pages_size:
                        # Readahead stops at EOF, so filemap_lock_folio finds nothing.
                        result = R.SCAN_FAIL
                        break
                    pfn = cache.add_small_page(f, index)
                    if not pfn:
                        result = R.SCAN_FAIL  # memory is full: readahead brought nothing
                        break
                    cache.lru_add_drain()
                    cache.trylock(pfn)
                else:
                    pfn = value
                    head = mem.head(pfn)
                    if mem.flags[head] & PG_DIRTY:
                        self.fileops.start_writeback(f)  # filemap_flush: a one-off async writeback
                        result = R.SCAN_FAIL
                        break
                    if mem.flags[head] & PG_WRITEBACK:
                        result = R.SCAN_FAIL
                        break
                    if not cache.trylock(head):
                        result = R.SCAN_PAGE_LOCK
                        break
            head = mem.head(pfn)
            # The page is locked from here on.
            if not mem.flags[head] & PG_UPTODATE:
                result = R.SCAN_FAIL
            elif mem.pmd_mappable(head):
                result = R.SCAN_PTE_MAPPED_HUGEPAGE if mem.index[head] == start else R.SCAN_PAGE_COMPOUND
            elif mem.ino[head] != f.ino:
                result = R.SCAN_TRUNCATED
            elif not f.shmem and mem.flags[head] & (PG_DIRTY | PG_WRITEBACK):
                result = R.SCAN_FAIL
            elif not mem.flags[head] & PG_LRU:
                result = R.SCAN_DEL_PAGE_LRU
            if result != R.SCAN_SUCCEED:
                cache.unlock(head)
                break
            # folio_isolate_lru + the collapse's own get: the "2 +" of the refcount check below.
            mem.flags[head] &= ~PG_LRU
            mem.ref[head] += 2
            pagelist.append(head)
            # A large folio (a split left one) is taken whole: collapse_file's
            # index += folio_nr_pages(folio).
            index = mem.index[head] + mem.folio_nr(head)

        # The isolated pages (heads), as an array for the steps below; folios that a split left
        # larger than a page take the per-folio path.
        pfns = quick if quick is not None else np.array(pagelist, dtype=np.int64)
        large = quick is None and any(mem.order[p] for p in pagelist)
        if result == R.SCAN_SUCCEED and len(pfns):
            mapped: Sequence[int] | np.ndarray
            if ready is not None:
                mapped = ready.mapped
            else:
                mapped = tuple(
                    pfn
                    for p in pagelist
                    if mem.total_mapcount(p)
                    for pfn in range(p, p + mem.folio_nr(p))
                    if mem.mapcount[pfn]
                )
            if len(mapped):
                # try_to_unmap(folio) for every mapped folio, as one request to the remapper.
                yield from self.fileops.unmap_range(f, start, end, mapped, even_cows=False)
            # Only the cache's references and ours (the "2 +") are left on each folio.
            if ready is not None:
                refs_ok = not np.count_nonzero(view(mem.ref)[pfns] != 3)
            else:
                refs_ok = all(mem.ref[p] == 2 + mem.folio_nr(p) for p in pagelist)
            if not refs_ok:
                result = R.SCAN_PAGE_COUNT
        if result == R.SCAN_SUCCEED and not f.shmem and f.writecount > 0:
            result = R.SCAN_FAIL  # inode_is_open_for_write after filemap_nr_thps_inc
        if result == R.SCAN_SUCCEED and nr_none:
            # The XA_RETRY_ENTRY pass: a hole someone filled while we waited is SCAN_PAGE_FILLED.
            holes = sum(1 for i in range(start, end) if f.get(i) == 0)
            if holes != nr_none:
                result = R.SCAN_PAGE_FILLED

        if result != R.SCAN_SUCCEED:
            for p in pfns.tolist():
                mem.ref[p] -= 2
                cache.lru_add(p)
                cache.unlock(p)
            mem.flags[new] &= ~PG_LOCKED
            mem.ino[new] = 0
            cache.put(new)
            taken = (sum(mem.folio_nr(p) for p in pagelist) if large else len(pfns)) + nr_none
            self._trace_collapse(f, new, end if taken == HPAGE_PMD_NR else index, cc, result)
            return result

        # Success: copy, publish the multi-index entry (it takes every slot of the old pages,
        # so theirs need no clearing first), free the old pages, retract.
        if large:
            for p in pagelist:
                nr = mem.folio_nr(p)
                f.nrpages -= nr
                view(mem.ino)[p : p + nr] = 0
        else:
            f.nrpages -= len(pfns)
            view(mem.ino)[pfns] = 0
        mem.ref[new] = 1
        cache.add_huge_page(f, start, new, dirty=f.shmem)  # collapse_file: folio_mark_dirty for shmem
        if large:
            for p in pagelist:
                cache.unlock(p)
                cache.put(p, 2 + mem.folio_nr(p))
        else:
            cache.unlock_pages(pfns)
            cache.put_small_pages(pfns, 3)
        reply = yield Call(m.Retract(self.actor.new_req(), f.ino, start, new))
        log.debug("retract_page_tables", ino=f.ino, pgoff=start, retracted=reply.retracted,
                  installed=reply.installed, deferred=reply.deferred, skipped=reply.skipped)
        result = R.SCAN_SUCCEED if cc.is_khugepaged else R.SCAN_PTE_MAPPED_HUGEPAGE
        cache.unlock(new)
        self._trace_collapse(f, new, end, cc, result)
        return result

    def _trace_collapse(self, f: File, hpfn: int, index: int, cc: CollapseControl, result: R) -> None:
        log.info(
            "mm_khugepaged_collapse_file",
            mm=mm_pointer(cc.pid),
            hpage_pfn=hpfn or NO_PFN,
            index=index,
            addr=cc.addr,
            is_shmem=int(f.shmem),
            filename=f.name,
            nr=HPAGE_PMD_NR,
            result=result.trace,
        )

    # -- MADV_COLLAPSE, page-cache half -------------------------------------------------------

    def madvise_collapse_file(self, msg: m.MadvCollapse) -> Generator[Any, Any, None]:
        """The page-cache half of mm/khugepaged.c ``madvise_collapse`` for one aligned 2 MiB of a
        file VMA: ``lru_add_drain_all``, then ``hpage_collapse_scan_file`` + ``collapse_file`` under
        a non-khugepaged collapse_control (no ``max_ptes_*`` limits, direct compaction).

        The syscall's entry point is the remapper's ``madvise_collapse``: it walks the VMAs, sends
        one :class:`~shared.messages.MadvCollapse` per aligned range, and on
        ``SCAN_PTE_MAPPED_HUGEPAGE`` (the kernel's collapse_file result for MADV_COLLAPSE) maps the
        new THP with ``collapse_pte_mapped_thp``."""
        f = self.cache.files.get(msg.ino)
        if f is None:
            result = R.SCAN_TRUNCATED
        else:
            self.cache.lru_add_drain()  # lru_add_drain_all()
            cc = CollapseControl(False, msg.pid, msg.addr)
            result = yield from self.hpage_collapse_scan_file(f, msg.pgoff, cc)
        self.actor.send(m.CollapseResult(msg.req, result))
