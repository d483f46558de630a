"""khugepaged's second half, on the remapper: ``retract_page_tables``, ``collapse_pte_mapped_thp``,
the retry policies, and MADV_COLLAPSE's page-table half. The first half (the page-cache scan and
``collapse_file``) is the collapser's, in ``collapsed/khugepaged.py``.

Retry policies (``thpsplit/retry_policy``) differ in what a failed mmap_lock trylock leaves behind
and in who comes back for it:

=============  ==========================================  =====================================
policy         on trylock failure in retract_page_tables   retried by
=============  ==========================================  =====================================
per-pmd        mark the PTE table (Kirill)                  the remapper's own pass over marks
mm-slot        mm's pte_mapped_thp[8] (v5.4), else dropped  khugepaged's next visit to the mm
per-mapping    the file's AS_COLLAPSE_PMD bit (seed v6)     the first THP the scan meets
lockless       cannot fail (6.6+: no mmap_lock needed)      the scan's SCAN_PTE_MAPPED_HUGEPAGE
none           nothing: a pte-mapped THP for good           nobody
=============  ==========================================  =====================================

The remapper answers khugepaged's requests (``Retract``, ``CollapsePteMapped``, ``VisitMm``) here,
runs its own pass over marked tables (:meth:`Khugepaged.remap_thread`), and drives MADV_COLLAPSE
(:meth:`Khugepaged.madvise_collapse`), asking the collapser for the page-cache half of each range.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator
from typing import Any

from remapd.files import Files
from remapd.mm import PTE_ANON, Mm, MmapLocks, PteTable, Vma, pte_pfn
from remapd.pagetable import PageTables
from shared.actor import Actor, Call, Sleep
from shared.errors import UserError
from shared.knobs import Knobs
from shared.protocol import messages as m
from shared.scan_result import ScanResult as R
from shared.scan_result import madvise_collapse_errno
from shared.tracepoints import get_logger, mm_pointer
from shared.units import HPAGE_PMD_NR, HPAGE_PMD_SHIFT, HPAGE_PMD_SIZE

log = get_logger("remapd.khugepaged")

MAX_PTE_MAPPED_THP = 8

# Notified to cut the remapper's sleep short when its sleep knob changes.
REMAP_WAKE = "remap_wake"
REMAP_SLEEP_KNOB = "thpsplit/remap_sleep_millisecs"

# madvise_collapse() carries on past these results (the kernel's "whitelisted" set).
_MADV_CONTINUE = {
    R.SCAN_PMD_NULL,
    R.SCAN_PTE_NON_PRESENT,
    R.SCAN_PTE_UFFD_WP,
    R.SCAN_PAGE_RO,
    R.SCAN_LACK_REFERENCED_PAGE,
    R.SCAN_PAGE_NULL,
    R.SCAN_PAGE_COUNT,
    R.SCAN_PAGE_LOCK,
    R.SCAN_PAGE_COMPOUND,
    R.SCAN_PAGE_LRU,
    R.SCAN_DEL_PAGE_LRU,
}


class Khugepaged:
    """remapd's half of khugepaged. ``stats`` counts what the retry policies did (retracts
    deferred, marks tried, mm-slot entries dropped) for the tests and the experiment."""

    def __init__(
        self,
        actor: Actor,
        knobs: Knobs,
        mms: dict[int, Mm],
        files: Files,
        locks: MmapLocks,
        pagetables: PageTables,
    ):
        self.actor = actor
        self.knobs = knobs
        self.mms = mms
        self.files = files
        self.locks = locks
        self.pagetables = pagetables
        self.stats: Counter[str] = Counter()

    # -- khugepaged's requests and the remapper's own pass ------------------------------------

    def handle_collapse_pte_mapped(self, msg: m.CollapsePteMapped) -> Generator[Any, Any, None]:
        """khugepaged met a pte-mapped THP in this mm (SCAN_PTE_MAPPED_HUGEPAGE): map it with a
        PMD under the mmap read lock, and answer even if the process exits meanwhile."""
        mm = self.mms.get(msg.pid)
        if mm is None or mm.exiting:
            self.actor.send(m.CollapsePteMappedResult(msg.req, R.SCAN_ANY_PROCESS))
            return
        try:
            yield from self.locks.mmap_read_lock(mm)
        except UserError:
            self.actor.send(m.CollapsePteMappedResult(msg.req, R.SCAN_ANY_PROCESS))
            return
        try:
            result = yield from self.collapse_pte_mapped_thp(mm, msg.addr, bool(self.knobs.install_pmd))
        finally:
            self.locks.mmap_read_unlock(mm)
        self.actor.send(m.CollapsePteMappedResult(msg.req, result))

    def handle_visit_mm(self, msg: m.VisitMm) -> Generator[Any, Any, None]:
        """khugepaged visits the mm's slot: the mm-slot policy retries its queued addresses."""
        mm = self.mms.get(msg.pid)
        if mm is not None:
            yield from self.khugepaged_collapse_pte_mapped_thps(mm)
        self.actor.send(m.VisitMmDone(msg.req))

    def remap_thread(self) -> Generator[Any, Any, None]:
        """The remapper's kthread: every remap_sleep_millisecs (or when that knob changes), a pass
        over marked tables under the per-pmd policy."""
        while True:
            yield Sleep(self.actor.now + self.knobs.remap_sleep_millisecs, wake=REMAP_WAKE)
            if self.knobs.retry_policy == "per-pmd" and self.pagetables.marked:
                yield from self.remap_marked_tables()

    def retract_page_tables(self, msg: m.Retract) -> m.Retracted:
        """For every VMA mapping ``pgoff`` of the file: free its PTE table for the new THP and, with
        ``install_pmd``, map the THP with a PMD where do_set_pmd would (:meth:`Vma.can_set_pmd`).
        Runs with the THP locked by the collapser."""
        policy = self.knobs.retry_policy
        install = bool(self.knobs.install_pmd)
        shmem = self.files.is_shmem(msg.ino)
        retracted = installed = deferred = skipped = 0
        for mm, vma in self.files.mappings(msg.ino):
            addr = vma.addr_of(msg.pgoff)
            pidx = addr >> HPAGE_PMD_SHIFT
            entry = mm.pmds.get(pidx)
            if (
                vma.anon_vma is not None  # MAP_PRIVATE written to: the PMD mapping would be split again
                or addr & (HPAGE_PMD_SIZE - 1)
                or addr < vma.start
                or vma.end < addr + HPAGE_PMD_SIZE
                or not isinstance(entry, PteTable)  # no page table to retract (or already huge)
                or mm.exiting
            ):
                skipped += 1
                continue
            if policy != "lockless" and not mm.lock.try_write():
                deferred += 1
                self._defer(mm, vma, pidx, entry)
                continue
            try:
                if not self._prepare_pmd_for_collapse(mm, pidx, entry, msg.head):
                    skipped += 1  # something foreign is mapped there: fall back
                    continue
                self.pagetables.pte_free(mm, pidx)
                retracted += 1
                log.debug("retract", mm=mm_pointer(mm.pid), addr=addr, hpage_pfn=msg.head)
                # The PMD only where a fault's do_set_pmd would map it: not in a VM_NOHUGEPAGE
                # VMA, whose table is retracted all the same (retract_page_tables does not look
                # at the VMA's THP flags).
                if install and vma.can_set_pmd(addr):
                    self.pagetables.do_set_pmd(mm, pidx, msg.head, shmem, accounted=False)
                    installed += 1
            finally:
                if policy != "lockless":
                    self.locks.mmap_write_unlock(mm)
        self.stats["retracted"] += retracted
        self.stats["retract_deferred"] += deferred
        return m.Retracted(msg.req, retracted, installed, deferred, skipped)

    def _prepare_pmd_for_collapse(self, mm: Mm, pidx: int, table: PteTable, head: int) -> bool:
        """The seed's prepare_pmd_for_collapse: every present PTE must map subpage i at slot i; then
        drop those mappings (rmap, refcount, mm counter)."""
        present = list(table.present())
        for slot, pte in present:
            if pte & PTE_ANON or pte_pfn(pte) != head + slot:
                return False
        for slot, _ in present:
            self.pagetables.zap_pte(mm, table, slot)
        return True

    def _defer(self, mm: Mm, vma: Vma, pidx: int, table: PteTable) -> None:
        policy = self.knobs.retry_policy
        addr = pidx << HPAGE_PMD_SHIFT
        if policy == "per-pmd":
            self.pagetables.set_mark(mm, pidx, table, "trylock")
        elif policy == "mm-slot":
            # khugepaged_add_pte_mapped_thp (v5.4): silently dropped once the array is full.
            if len(mm.pte_mapped_thp) < MAX_PTE_MAPPED_THP:
                mm.pte_mapped_thp.append(addr)
            else:
                self.stats["pte_mapped_thp_dropped"] += 1
        elif policy == "per-mapping":
            self.actor.send(m.SetCollapsePmd(vma.ino))

    def _vma_thp_allowed(self, vma: Vma) -> bool:
        """thp_vma_allowable_order with no sysfs enforcement (tva_flags 0), as collapse_pte_mapped_thp
        and MADV_COLLAPSE use it: VM_NOHUGEPAGE, shmem ``deny`` or a regular file open for write
        refuse."""
        if vma.nohugepage:
            return False
        f = self.files.get(vma.ino)
        if f is None:
            return False
        if f.shmem:
            return self.knobs.shmem_enabled != "deny"
        if f.large_folio:
            return False  # file_thp_enabled(): no CONFIG_READ_ONLY_THP_FOR_FS
        return not self.files.open_for_write(vma.ino)

    def collapse_pte_mapped_thp(self, mm: Mm, addr: int, install_pmd: bool) -> Generator[Any, Any, R]:
        """6.x ``collapse_pte_mapped_thp(mm, addr, install_pmd)``; the caller holds the mmap lock."""
        haddr = addr & ~(HPAGE_PMD_SIZE - 1)
        pidx = haddr >> HPAGE_PMD_SHIFT
        vma = mm.find_vma(haddr)
        if vma is None or not (vma.start <= haddr and haddr + HPAGE_PMD_SIZE <= vma.end):
            return R.SCAN_VMA_CHECK
        if isinstance(mm.pmds.get(pidx), int):
            return R.SCAN_PMD_MAPPED
        if not self._vma_thp_allowed(vma) or not vma.pmd_suitable(haddr):
            return R.SCAN_VMA_CHECK
        reply = yield Call(m.LockFolio(self.actor.new_req(), vma.ino, vma.pgoff_at(haddr)))
        head = reply.pfn
        if not head:
            return R.SCAN_PAGE_NULL
        try:
            if reply.order != 9:
                return R.SCAN_PAGE_COMPOUND
            if mm.exiting or mm.find_vma(haddr) is not vma:
                return R.SCAN_ANY_PROCESS if mm.exiting else R.SCAN_VMA_CHECK
            entry = mm.pmds.get(pidx)
            if isinstance(entry, int):
                return R.SCAN_PMD_MAPPED
            if entry is not None:
                # Step 1: every present PTE must be folio_page(folio, i) at slot i ("uprobe, debugger,
                # or MAP_PRIVATE may change the page table").
                present = list(entry.present())
                for slot, pte in present:
                    if pte & PTE_ANON or pte_pfn(pte) != head + slot:
                        return R.SCAN_FAIL
                for slot, _ in present:
                    self.pagetables.zap_pte(mm, entry, slot)
                self.pagetables.pte_free(mm, pidx)
            if install_pmd:
                shmem = self.files.is_shmem(vma.ino)
                self.pagetables.do_set_pmd(mm, pidx, head, shmem, accounted=False)
            return R.SCAN_SUCCEED
        finally:
            self.actor.send(m.UnlockFolio(head))

    def khugepaged_collapse_pte_mapped_thps(self, mm: Mm) -> Generator[Any, Any, None]:
        """v5.4: on khugepaged's visit, write-trylock the mm and retry every queued address once."""
        if not mm.pte_mapped_thp:
            return
        if not mm.lock.try_write():
            self.stats["pte_mapped_thp_busy"] += 1  # -EBUSY: the array waits for the next visit
            return
        try:
            queued = len(mm.pte_mapped_thp)
            if not mm.exiting:
                for addr in list(mm.pte_mapped_thp[:queued]):
                    result = yield from self.collapse_pte_mapped_thp(mm, addr, bool(self.knobs.install_pmd))
                    self.stats[f"pte_mapped_thp_{result.name}"] += 1
            del mm.pte_mapped_thp[:queued]
        finally:
            self.locks.mmap_write_unlock(mm)

    def remap_marked_tables(self) -> Generator[Any, Any, None]:
        """Kirill's remapper pass: try marked PTE tables (up to pages_to_scan worth of collapses).

        An mm whose lock is held costs no budget and is passed over for the rest of the pass: its
        other tables would fail the same trylock, and charging for them would let one busy process
        with many marks starve every other process's marks."""
        budget = max(1, self.knobs.pages_to_scan // HPAGE_PMD_NR)
        busy: set[int] = set()
        for pid, pidx in sorted(self.pagetables.marked):
            if budget <= 0:
                break
            if pid in busy:
                continue
            mm = self.mms.get(pid)
            table = mm.pmds.get(pidx) if mm is not None else None
            if mm is None or mm.exiting or not isinstance(table, PteTable) or not table.mark:
                self.pagetables.marked.discard((pid, pidx))
                continue
            if not mm.lock.try_write():
                self.stats["remap_trylock_failed"] += 1
                busy.add(pid)
                continue  # the mark stays: try again next pass
            budget -= 1
            try:
                addr = pidx << HPAGE_PMD_SHIFT
                result = yield from self.collapse_pte_mapped_thp(mm, addr, bool(self.knobs.install_pmd))
            finally:
                self.locks.mmap_write_unlock(mm)
            self.stats[f"remap_{result.name}"] += 1
            table = mm.pmds.get(pidx)
            if isinstance(table, PteTable) and table.mark:
                self.pagetables.clear_mark(mm, pidx, table, result.trace)

    def madvise_collapse(self, mm: Mm, start: int, end: int) -> Generator[Any, Any, int | str]:
        """MADV_COLLAPSE: per VMA, each aligned 2 MiB is collapsed in the page cache by the collapser,
        then ``collapse_pte_mapped_thp(install_pmd=true)`` here, in the caller's mm only.

        Returns 0 or the errno name."""
        vmas = mm.overlapping(start, end)
        if not vmas:
            return "ENOMEM"
        covered = sum(min(v.end, end) - max(v.start, start) for v in vmas)
        for vma in vmas:
            s, e = max(vma.start, start), min(vma.end, end)
            hstart = (s + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1)
            hend = e & ~(HPAGE_PMD_SIZE - 1)
            # thp_vma_allowable_order(TVA_FORCED_COLLAPSE): the VMA must allow a THP and hold an
            # aligned PMD somewhere (__thp_vma_allowable_orders outside the fault path); the
            # first VMA that fails ends the walk (madvise_walk_vmas), before any later one is
            # collapsed and before a hole is reported.
            if not self._vma_thp_allowed(vma) or not vma.thp_suitable():
                return "EINVAL"
            if hstart > hend:
                return "EINVAL"  # the kernel's (hend - hstart) wraps: observed on 6.18
            last_fail = R.SCAN_FAIL
            thps = 0
            for addr in range(hstart, hend, HPAGE_PMD_SIZE):
                cur = mm.find_vma(addr)
                if cur is None or mm.exiting:
                    last_fail = R.SCAN_VMA_NULL
                    break
                if not self._vma_thp_allowed(cur) or not cur.pmd_suitable(addr):
                    last_fail = R.SCAN_ADDRESS_RANGE  # hugepage_vma_revalidate
                    break
                reply = yield Call(m.MadvCollapse(self.actor.new_req(), mm.pid, addr, cur.ino, cur.pgoff_at(addr)))
                result = R(reply.result)
                if result == R.SCAN_PTE_MAPPED_HUGEPAGE:
                    yield from self.locks.mmap_read_lock(mm)
                    try:
                        result = yield from self.collapse_pte_mapped_thp(mm, addr, True)
                    finally:
                        self.locks.mmap_read_unlock(mm)
                if result in (R.SCAN_SUCCEED, R.SCAN_PMD_MAPPED):
                    thps += 1
                    continue
                last_fail = result
                if result not in _MADV_CONTINUE:
                    break
            if thps != (hend - hstart) >> HPAGE_PMD_SHIFT:
                # madvise_walk_vmas returns the first VMA's error: later VMAs are left alone.
                return madvise_collapse_errno(last_fail)
        return "ENOMEM" if covered != end - start else 0
