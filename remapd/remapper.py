"""The remapper actor's core: processes, VMAs, page tables, faults, and khugepaged's second half
(``retract_page_tables``, ``collapse_pte_mapped_thp``, the retry policies, uprobes, MADV_COLLAPSE).

Sans-IO: see :mod:`shared.actor`. Operations that may wait (for the mmap lock, for the page cache)
are generators; the shell or the in-process world spawns them and gets their result.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator
from typing import Any

from remapd.address_space import AddressSpaceOps
from remapd.khugepaged import (
    collapse_pte_mapped_thp,
    khugepaged_collapse_pte_mapped_thps,
    remap_marked_tables,
    retract_page_tables,
)
from remapd.fault import FaultPath
from remapd.mm import (
    ANON_PFN_BASE,
    PTE_ANON,
    PTE_WRITE,
    Mm,
    PteTable,
    Vma,
    pte_make,
    pte_pfn,
)
from remapd.pagetable import PageTableOps
from remapd.report import smaps
from shared import messages as m
from shared.actor import Actor, Sleep, Wait
from shared.errors import UserError
from shared.knobs import Knobs
from shared.logs import get_logger
from shared.message import Message
from shared.scan_result import ScanResult as R
from shared.units import (
    HPAGE_PMD_SHIFT,
    PAGE_SHIFT,
)
from shared.vm import PROT_WRITE

log = get_logger("remapd")

PID_MAX = 4194304

# The kernel's vmstat events the remapper counts, and ours under a prefix the kernel never uses:
# thpsplit_cow_fault counts copy-on-write copies (do_cow_fault, wp_page_copy), which the kernel
# does not count apart from pgfault.
VM_EVENTS = ("pgfault", "thp_file_mapped", "thp_split_pmd", "thpsplit_cow_fault")


class FileMirror:
    """What the remapper knows of a file: the collapser's FileInfo notices."""

    __slots__ = ("ino", "name", "size", "shmem")

    def __init__(self, ino: int, name: str, size: int, shmem: bool):
        self.ino = ino
        self.name = name
        self.size = size
        self.shmem = shmem


class Remapper(PageTableOps, AddressSpaceOps, FaultPath, Actor):
    """Owns processes and page tables. Peer messages go in through :meth:`deliver`."""

    def __init__(self, knobs: Knobs | None = None, start_threads: bool = True):
        super().__init__()
        self.knobs = knobs or Knobs()
        self.mms: dict[int, Mm] = {}
        self.files: dict[int, FileMirror] = {}
        self.by_name: dict[str, FileMirror] = {}
        self.i_mmap: dict[int, dict[int, tuple[Mm, Vma]]] = {}
        self.anon: dict[int, int] = {}  # anon pfn -> mapcount
        self.anon_pins: dict[int, int] = {}
        self._next_anon = ANON_PFN_BASE
        self.marked: set[tuple[int, int]] = set()  # (pid, pmd index) of marked PTE tables
        self.uprobes: set[tuple[int, int]] = set()  # (ino, page index)
        self.vm: Counter[str] = Counter({name: 0 for name in VM_EVENTS})
        self.stats: Counter[str] = Counter()
        self._rows: list[tuple[int, int, int, int]] = []
        if start_threads:
            self.spawn(self._remap_thread(), name="remap")

    # -- outbox: rmap rows always travel ahead of whatever is sent next ------------------------

    def send(self, msg: Message) -> None:
        self.flush()
        self.outbox.append(msg)

    def flush(self) -> None:
        if self._rows:
            self.outbox.append(m.RmapDelta(tuple(self._rows)))
            self._rows = []

    def _row(self, pfn: int, pte: int = 0, pmd: int = 0, pin: int = 0) -> None:
        self._rows.append((pfn, pte, pmd, pin))

    # -- peer messages ------------------------------------------------------------------------

    def deliver(self, msg: Message) -> None:
        if isinstance(msg, m.FileInfo):
            self._file_info(msg)
        elif isinstance(msg, m.UnmapMapping):
            self._unmap_mapping(msg)
            self.send(m.Unmapped(msg.req))
        elif isinstance(msg, m.Retract):
            self.send(retract_page_tables(self, msg))
        elif isinstance(msg, m.CollapsePteMapped):
            self.spawn(self._collapse_pte_mapped_request(msg), name="collapse_pte_mapped")
        elif isinstance(msg, m.VisitMm):
            self.spawn(self._visit_mm(msg), name="visit_mm")
        elif isinstance(msg, m.KnobsChanged):
            for name, value in msg.values.items():
                self.knobs.set(name, str(value))
            self.notify("remap_wake")
        elif hasattr(msg, "req"):
            self.deliver_reply(msg.req, msg)  # type: ignore[attr-defined]
        self.flush()

    def _file_info(self, msg: m.FileInfo) -> None:
        f = self.files.get(msg.ino)
        if f is None:
            f = self.files[msg.ino] = FileMirror(msg.ino, msg.name, msg.size, msg.shmem)
            self.by_name[msg.name] = f
        f.size = msg.size

    # -- losing and regaining the peer --------------------------------------------------------

    def peer_lost(self) -> None:
        """The collapser is gone, and its page cache with it: every file page mapping and pin
        goes (anon pages stay), waiting faults fail with SIGBUS, nothing queued for it is sent."""
        for mm in self.mms.values():
            for pidx, entry in list(mm.pmds.items()):
                if isinstance(entry, int):
                    self._zap_pmd(mm, pidx, split=False)
                    continue
                for slot, pte in list(entry.present()):
                    if not pte & PTE_ANON:
                        self._zap_pte(mm, entry, slot)
            for page, pfns in list(mm.pins.items()):
                kept = [p for p in pfns if p >= ANON_PFN_BASE]
                if kept:
                    mm.pins[page] = kept
                else:
                    del mm.pins[page]
        self._rows.clear()
        self.fail_calls(_answer_for_lost_peer)
        self._rows.clear()
        self.outbox.clear()

    def resync(self) -> None:
        """A collapser (new or back) is connected: name every file we know (a restarted collapser
        recreates them), and re-register every mapping's write open and khugepaged range."""
        for f in self.files.values():
            self.send(m.FileInfo(f.ino, f.name, f.size, f.shmem))
        for mm in self.mms.values():
            for vma in mm.vmas:
                f = self.files.get(vma.ino)
                if vma.writes_file and f is not None and not f.shmem:
                    self.send(m.WriteOpen(vma.ino, 1))
                if self._khugepaged_suitable(vma):
                    self.send(
                        m.RegisterRange(mm.pid, vma.start, vma.end, vma.ino, vma.pgoff, vma.hugepage, vma.nohugepage)
                    )

    # -- lookups ------------------------------------------------------------------------------

    def mm(self, pid: int) -> Mm:
        mm = self.mms.get(pid)
        if mm is None or mm.exiting:
            raise UserError("ESRCH", f"no process {pid}")
        return mm

    def file(self, name: str) -> FileMirror:
        f = self.by_name.get(name)
        if f is None:
            raise UserError("ENOENT", f"no file {name!r}")
        return f

    # -- mmap lock ----------------------------------------------------------------------------

    def lock_read(self, mm: Mm) -> Generator[Any, Any, None]:
        """mmap_read_lock; fails with ESRCH if the process exits while we wait."""
        while not mm.lock.try_read():
            yield Wait(("mmap", mm.pid))
        if mm.exiting:
            self.unlock_read(mm)
            raise UserError("ESRCH", f"process {mm.pid} exited")

    def lock_write(self, mm: Mm) -> Generator[Any, Any, None]:
        """mmap_write_lock; fails with ESRCH if the process exits while we wait."""
        while not mm.lock.try_write():
            yield Wait(("mmap", mm.pid))
        if mm.exiting:
            self.unlock_write(mm)
            raise UserError("ESRCH", f"process {mm.pid} exited")

    def unlock_read(self, mm: Mm) -> None:
        mm.lock.readers -= 1
        if not mm.lock.readers:
            self.notify(("mmap", mm.pid))

    def unlock_write(self, mm: Mm) -> None:
        mm.lock.writer = False
        self.notify(("mmap", mm.pid))

    def hold_lock(self, pid: int, hold_ms: float, write: bool) -> Generator[Any, Any, dict[str, Any]]:
        """An application thread takes the mmap lock and keeps it for ``hold_ms`` of model time."""
        mm = self.mm(pid)
        if hold_ms < 0:
            raise UserError("EINVAL", "hold time must not be negative")
        yield from (self.lock_write(mm) if write else self.lock_read(mm))
        until = self.now + hold_ms
        self.spawn(self._release_later(mm, until, write), name="lock_hold")
        return {"pid": pid, "mode": "write" if write else "read", "until_ms": until}

    def _release_later(self, mm: Mm, until: float, write: bool) -> Generator[Any, Any, None]:
        yield Sleep(until)
        if write:
            self.unlock_write(mm)
        else:
            self.unlock_read(mm)

    # -- process lifecycle --------------------------------------------------------------------

    def spawn_process(self, pid: int) -> dict[str, Any]:
        if not 0 < pid < PID_MAX:
            raise UserError("EINVAL", f"pid {pid} out of range 1..{PID_MAX - 1}")
        if pid in self.mms:
            raise UserError("EEXIST", f"process {pid} exists")
        self.mms[pid] = Mm(pid)
        return {"pid": pid}

    def exit_process(self, pid: int) -> dict[str, Any]:
        """exit_mmap: release pins, zap everything, free page tables, drop the khugepaged slot."""
        mm = self.mm(pid)
        mm.exiting = True
        for pfns in mm.pins.values():
            for pfn in pfns:
                self._unpin(pfn)
        mm.pins.clear()
        for vma in list(mm.vmas):
            self.zap_range(mm, vma.start, vma.end)
            self._unlink(mm, vma)
        for pidx, entry in list(mm.pmds.items()):
            if isinstance(entry, PteTable):
                self._free_table(mm, pidx)
        self.send(m.MmExit(pid))
        del self.mms[pid]
        self.notify(("mmap", pid))
        return {"pid": pid}

    def fork(self, pid: int, child: int) -> Generator[Any, Any, dict[str, Any]]:
        """dup_mmap under the parent's mmap write lock: copy VMAs; page tables are copied only
        where the VMA has an anon_vma (vma_needs_copy), and file PMDs never are (copy_huge_pmd
        leaves them to refault)."""
        parent = self.mm(pid)
        yield from self.lock_write(parent)
        try:
            self.spawn_process(child)
            self._dup_mmap(parent, self.mms[child])
        finally:
            self.unlock_write(parent)
        return {"pid": child, "parent": pid}

    def _dup_mmap(self, parent: Mm, mm: Mm) -> None:
        for vma in parent.vmas:
            self._link(mm, vma.copy(vma.start, vma.end))
            if not vma.anon_vma:
                continue
            for pidx in self._pidx_range(parent, vma.start, vma.end):
                entry = parent.pmds[pidx]
                if not isinstance(entry, PteTable):
                    continue
                base = pidx << HPAGE_PMD_SHIFT
                for slot, pte in list(entry.present()):
                    addr = base + (slot << PAGE_SHIFT)
                    if not vma.start <= addr < vma.end:
                        continue
                    if pte & PTE_ANON and self.anon_pins.get(pte_pfn(pte)):
                        # copy_present_page: a pinned anon page stays the parent's alone (a
                        # later CoW must not move the parent off the page the pin holds).
                        new = self._anon_new()
                        self._anon_map(new)
                        pte = pte_make(new, PTE_ANON | (PTE_WRITE if vma.prot & PROT_WRITE else 0))
                    elif pte & PTE_ANON:
                        # Shared anon pages become copy-on-write in both.
                        pte &= ~PTE_WRITE
                        entry.ptes[slot] = pte
                        self._anon_map(pte_pfn(pte))
                    else:
                        self._row(pte_pfn(pte), pte=1)
                    self._set_pte(mm, pidx, slot, pte)

    # -- requests from the collapser ----------------------------------------------------------

    def _vmas_of(self, ino: int) -> list[tuple[Mm, Vma]]:
        return list(self.i_mmap.get(ino, {}).values())

    def _unmap_mapping(self, msg: m.UnmapMapping) -> None:
        """unmap_mapping_range / try_to_unmap over every VMA mapping [start, end) of the file."""
        pfns = set(msg.pfns) if msg.pfns else None
        for mm, vma in self._vmas_of(msg.ino):
            lo = max(msg.start, vma.pgoff)
            hi = min(msg.end, vma.pgoff_at(vma.end))
            if lo >= hi:
                continue
            self.zap_range(mm, vma.addr_of(lo), vma.addr_of(hi), anon=msg.even_cows, pfns=pfns)

    def _collapse_pte_mapped_request(self, msg: m.CollapsePteMapped) -> Generator[Any, Any, None]:
        mm = self.mms.get(msg.pid)
        if mm is None or mm.exiting:
            self.send(m.CollapsePteMappedResult(msg.req, int(R.SCAN_ANY_PROCESS)))
            return
        try:
            yield from self.lock_read(mm)
        except UserError:  # the process exited while we waited: khugepaged still gets its answer
            self.send(m.CollapsePteMappedResult(msg.req, int(R.SCAN_ANY_PROCESS)))
            return
        try:
            result = yield from collapse_pte_mapped_thp(self, mm, msg.addr, bool(self.knobs.install_pmd))
        finally:
            self.unlock_read(mm)
        self.send(m.CollapsePteMappedResult(msg.req, int(result)))

    def _visit_mm(self, msg: m.VisitMm) -> Generator[Any, Any, None]:
        mm = self.mms.get(msg.pid)
        if mm is not None:
            yield from khugepaged_collapse_pte_mapped_thps(self, mm)
        self.send(m.VisitMmDone(msg.req))

    def _remap_thread(self) -> Generator[Any, Any, None]:
        while True:
            yield Sleep(self.now + self.knobs.remap_sleep_millisecs, wake="remap_wake")
            if self.knobs.retry_policy == "per-pmd" and self.marked:
                yield from remap_marked_tables(self)

    # -- reports ------------------------------------------------------------------------------

    def smaps(self, pid: int) -> list[dict[str, Any]]:
        """Per-VMA /proc/PID/smaps fields (kB), as task_mmu.c computes them."""
        return smaps(self, self.mm(pid))

    def vmstat(self) -> dict[str, int]:
        return dict(self.vm)

    def status(self, pid: int) -> dict[str, Any]:
        mm = self.mm(pid)
        return {
            "pid": pid,
            "vmas": len(mm.vmas),
            "nr_ptes": mm.nr_ptes,
            "rss": dict(mm.rss),
            "marked": sum(1 for p, _ in self.marked if p == pid),
            "pte_mapped_thp": list(mm.pte_mapped_thp),
            "lock": {"readers": mm.lock.readers, "writer": mm.lock.writer},
        }


def _answer_for_lost_peer(request: Message) -> Message:
    """What a request to a collapser that is gone resolves to."""
    if isinstance(request, m.LookupPage):
        return m.PageAnswer(request.req, "sigbus")
    if isinstance(request, m.LockFolio):
        return m.FolioAnswer(request.req, 0, 0)
    if isinstance(request, m.MadvCollapse):
        return m.CollapseResult(request.req, int(R.SCAN_FAIL))
    raise TypeError(f"no answer for {request!r}")
