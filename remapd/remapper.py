"""The remapper actor: processes, their address spaces and page tables, faults, and khugepaged's
second half, composed from parts that own their state and call each other through public methods:

* :class:`~remapd.pagetable.PageTables` — PTE/PMD install and zap, with rmap, mm counters and the
  per-PMD mark (:mod:`remapd.rmap` batches file-page rmap rows and keeps anon pages);
* :class:`~remapd.address_space.AddressSpace` — mmap, munmap, madvise, fork's and exit's VMA work;
* :class:`~remapd.fault.FaultPath` — handle_mm_fault and GUP pins;
* :class:`~remapd.khugepaged.Khugepaged` — retract_page_tables, collapse_pte_mapped_thp, the retry
  policies, MADV_COLLAPSE;
* :class:`~remapd.uprobes.Uprobes` — breakpoints in file text;
* :class:`~remapd.files.Files` and :class:`~remapd.mm.MmapLocks` — the file mirror with its rmap,
  and mmap_lock for tasks.

Sans-IO: see :mod:`shared.actor`. Operations that may wait (for the mmap lock, for the page cache)
are generators; the shell or the in-process world spawns them and gets their result.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Generator
from typing import Any

from remapd import audit
from remapd.address_space import AddressSpace
from remapd.fault import FaultPath
from remapd.files import Files
from remapd.khugepaged import REMAP_SLEEP_KNOB, REMAP_WAKE, Khugepaged
from remapd.mm import ANON_PFN_BASE, Mm, MmapLocks, find_mm
from remapd.pagetable import PageTables
from remapd.procfs import Procfs
from remapd.rmap import AnonPages, RmapBatch
from remapd.uprobes import Uprobes
from shared.actor import Actor, Sleep
from shared.errors import UserError
from shared.knobs import Knobs
from shared.protocol import Message
from shared.protocol import messages as m
from shared.scan_result import ScanResult as R
from shared.units import PAGE_SIZE

PID_MAX = 4194304
# Bound once: the classes of the replies every fault receives.
_PAGE_ANSWER, _PAGE_ANSWERS = m.PageAnswer, m.PageAnswers

# The kernel's vmstat events the remapper counts, and ours under a prefix the kernel never uses:
# thpsplit_cow_fault counts copy-on-write copies (do_cow_fault, wp_page_copy), which the kernel
# does not count apart from pgfault.
VM_EVENTS = ("pgfault", "thp_file_mapped", "thp_split_pmd", "thpsplit_cow_fault")


class Remapper(Actor):
    """The actor: owns the processes (``mms``), the knobs and vmstat, builds the parts around
    them, and routes to them the operations and the collapser's messages (:meth:`deliver`)."""

    def __init__(self, knobs: Knobs | None = None, start_threads: bool = True):
        super().__init__()
        self.knobs = knobs or Knobs()
        self.mms: dict[int, Mm] = {}
        self.vm: Counter[str] = Counter({name: 0 for name in VM_EVENTS})
        self.files = Files()
        self.rmap = RmapBatch()
        self.anon = AnonPages()
        self.locks = MmapLocks(self.notify)
        self.pagetables = PageTables(self.rmap, self.anon, self.vm)
        self.faults = FaultPath(
            self, self.knobs, self.mms, self.files, self.locks, self.pagetables, self.rmap, self.anon, self.vm
        )
        self.khugepaged = Khugepaged(self, self.knobs, self.mms, self.files, self.locks, self.pagetables)
        self.uprobes = Uprobes(
            self, self.knobs, self.files, self.locks, self.pagetables, self.anon, self.khugepaged
        )
        self.address_space = AddressSpace(
            self, self.mms, self.files, self.locks, self.pagetables, self.faults, self.khugepaged, self.uprobes
        )
        # Set by remapd.snapshot.restore: the task that revalidates the restored file mappings,
        # started by the first resync.
        self.after_restore: Callable[[], Generator[Any, Any, None]] | None = None
        self.procfs = Procfs(self, self.mms, self.files, self.knobs, self.anon, self.pagetables.marked)
        self.procfs.stats = self.khugepaged.stats
        if start_threads:
            self.spawn(self.khugepaged.remap_thread(), name="remap")

    @property
    def marked(self) -> set[tuple[int, int]]:
        """(pid, pmd index) of every marked PTE table."""
        return self.pagetables.marked

    @property
    def stats(self) -> Counter[str]:
        """What the retry policies did (see :class:`~remapd.khugepaged.Khugepaged`)."""
        return self.khugepaged.stats

    # -- outbox: rmap rows always travel ahead of whatever is sent next ------------------------

    def send(self, msg: Message) -> None:
        self.flush()
        self.outbox.append(msg)

    def flush(self) -> None:
        if self.rmap.pfns:  # its rows, read directly: every burst of task steps ends here
            self.outbox.append(self.rmap.take())

    # -- peer messages ------------------------------------------------------------------------

    def deliver(self, msg: Message) -> None:
        if type(msg) is _PAGE_ANSWER or type(msg) is _PAGE_ANSWERS:
            # The hot path, tested first: a fault's or a batch's answer, a reply like the others
            # below (no request of the collapser's is either).
            self.deliver_reply(msg.req, msg)
        elif isinstance(msg, m.FileInfo):
            self.files.file_info(msg)
        elif isinstance(msg, m.UnmapMapping):
            self.address_space.unmap_mapping_range(msg)
            self.send(m.Unmapped(msg.req))
        elif isinstance(msg, m.Retract):
            self.send(self.khugepaged.retract_page_tables(msg))
        elif isinstance(msg, m.CollapsePteMapped):
            self.spawn(self.khugepaged.handle_collapse_pte_mapped(msg), name="collapse_pte_mapped")
        elif isinstance(msg, m.VisitMm):
            self.spawn(self.khugepaged.handle_visit_mm(msg), name="visit_mm")
        elif isinstance(msg, m.KnobsChanged):
            for name, value in msg.values.items():
                self.knobs.set(name, str(value))
            if REMAP_SLEEP_KNOB in msg.values:
                self.notify(REMAP_WAKE)  # as scan_sleep_millisecs_store() wakes khugepaged
        else:
            req = getattr(msg, "req", None)  # a reply to one of our calls
            if req is not None:
                self.deliver_reply(req, msg)
            elif isinstance(msg, m.Mkclean):  # rare: tested after the replies, which are not
                self.faults.page_mkclean(msg.ino, msg.indices)
        self.flush()

    # -- losing and regaining the peer --------------------------------------------------------

    def peer_lost(self) -> None:
        """The collapser is gone, and its page cache with it: every file page mapping and pin
        goes (anon pages stay), waiting faults fail with SIGBUS, nothing queued for it is sent."""
        for mm in self.mms.values():
            self.pagetables.zap_file_pages(mm)
            for page, pfns in list(mm.pins.items()):
                kept = [p for p in pfns if p >= ANON_PFN_BASE]
                if kept:
                    mm.pins[page] = kept
                else:
                    del mm.pins[page]
        self.rmap.clear()
        self.go_offline(_answer_for_lost_peer)
        self.rmap.clear()
        self.outbox.clear()

    def resync(self) -> None:
        """A collapser (new or back) is connected: name every file we know by its identity (a
        restarted collapser recreates them), and re-register every mapping's write open and
        khugepaged range. The names go first: the collapser settles every identity before it
        reads an inode number of ours."""
        self.go_online()
        for f in self.files.values():
            self.send(m.FileInfo(f.ino, f.name, f.size, f.shmem, f.gen, f.fs))
        self.address_space.resync()
        if self.after_restore is not None:
            task, self.after_restore = self.after_restore, None
            self.spawn(task(), name="revalidate")

    # -- lookups ------------------------------------------------------------------------------

    def mm(self, pid: int) -> Mm:
        """The live mm of ``pid``, or ESRCH."""
        return find_mm(self.mms, pid)

    # -- mmap lock ----------------------------------------------------------------------------

    def hold_lock(self, pid: int, hold_ms: float, write: bool) -> Generator[Any, Any, dict[str, Any]]:
        """An application thread takes the mmap lock and keeps it for ``hold_ms`` of model time."""
        mm = self.mm(pid)
        if hold_ms < 0:
            raise UserError("EINVAL", "hold time must not be negative")
        yield from (self.locks.mmap_write_lock(mm) if write else self.locks.mmap_read_lock(mm))
        until = self.now + hold_ms
        self.spawn(self._release_later(mm, until, write), name="lock_hold")
        return {"pid": pid, "mode": "write" if write else "read", "until_ms": until}

    def _release_later(self, mm: Mm, until: float, write: bool) -> Generator[Any, Any, None]:
        yield Sleep(until)
        if write:
            self.locks.mmap_write_unlock(mm)
        else:
            self.locks.mmap_read_unlock(mm)

    # -- process lifecycle --------------------------------------------------------------------

    def spawn_process(self, pid: int) -> dict[str, Any]:
        if not 0 < pid < PID_MAX:
            raise UserError("EINVAL", f"pid {pid} out of range 1..{PID_MAX - 1}")
        if pid in self.mms:
            raise UserError("EEXIST", f"process {pid} exists")
        if len(self.mms) >= self.knobs.max_threads():
            # copy_process: nr_threads >= max_threads. Bounds the model's memory as the kernel's.
            raise UserError("EAGAIN", f"{len(self.mms)} processes: threads-max for thpsplit/mem_total_mb {self.knobs.mem_total_mb}")
        self.mms[pid] = Mm(pid)
        return {"pid": pid}

    def exit_process(self, pid: int) -> dict[str, Any]:
        """exit_mmap, then drop khugepaged's slot; tasks waiting for the lock see the mm exit."""
        mm = self.mm(pid)
        mm.exiting = True
        self.address_space.exit_mmap(mm)
        self.send(m.MmExit(pid))
        del self.mms[pid]
        self.locks.wake_all(mm)
        return {"pid": pid}

    def fork(self, pid: int, child: int) -> Generator[Any, Any, dict[str, Any]]:
        """dup_mmap under the parent's mmap write lock."""
        parent = self.mm(pid)
        yield from self.locks.mmap_write_lock(parent)
        try:
            self.spawn_process(child)
            self.address_space.dup_mmap(parent, self.mms[child])
        finally:
            self.locks.mmap_write_unlock(parent)
        return {"pid": child, "parent": pid}

    # -- operations the parts carry out -------------------------------------------------------

    def mmap(
        self,
        pid: int,
        addr: int | None,
        length: int,
        name: str,
        offset: int = 0,
        prot: str = "r",
        shared: bool = True,
        reopen: bool = False,
    ) -> Generator[Any, Any, dict[str, Any]]:
        return self.address_space.mmap(pid, addr, length, name, offset, prot, shared, reopen)

    def munmap(self, pid: int, addr: int, length: int) -> Generator[Any, Any, dict[str, Any]]:
        return self.address_space.munmap(pid, addr, length)

    def madvise(self, pid: int, addr: int, length: int, advice: str) -> Generator[Any, Any, dict[str, Any]]:
        return self.address_space.madvise(pid, addr, length, advice)

    def mprotect(self, pid: int, addr: int, length: int, prot: str) -> Generator[Any, Any, dict[str, Any]]:
        return self.address_space.mprotect(pid, addr, length, prot)

    def mremap(
        self,
        pid: int,
        addr: int,
        old_length: int,
        new_length: int,
        to: int | None = None,
        maymove: bool = False,
        dontunmap: bool = False,
    ) -> Generator[Any, Any, dict[str, Any]]:
        return self.address_space.mremap(pid, addr, old_length, new_length, to, maymove, dontunmap)

    def mlock(self, pid: int, addr: int, length: int, onfault: bool = False) -> Generator[Any, Any, dict[str, Any]]:
        return self.address_space.mlock(pid, addr, length, onfault)

    def munlock(self, pid: int, addr: int, length: int) -> Generator[Any, Any, dict[str, Any]]:
        return self.address_space.munlock(pid, addr, length)

    def fault(self, pid: int, addr: int, write: bool = False) -> dict[str, Any] | Generator[Any, Any, dict[str, Any]]:
        return self.faults.fault(pid, addr, write)

    def touch(
        self, pid: int, addr: int, length: int, write: bool = False, stride: int = PAGE_SIZE
    ) -> dict[str, Any] | Generator[Any, Any, dict[str, Any]]:
        return self.faults.touch(pid, addr, length, write, stride)

    def pin(self, pid: int, addr: int) -> Generator[Any, Any, dict[str, Any]]:
        return self.faults.pin(pid, addr)

    def unpin(self, pid: int, addr: int) -> dict[str, Any]:
        return self.faults.unpin(pid, addr)

    def uprobe_add(self, name: str, offset: int) -> Generator[Any, Any, dict[str, Any]]:
        return self.uprobes.uprobe_add(name, offset)

    def uprobe_del(self, name: str, offset: int) -> Generator[Any, Any, dict[str, Any]]:
        return self.uprobes.uprobe_del(name, offset)

    # -- reports ------------------------------------------------------------------------------

    def smaps(self, pid: int) -> Generator[Any, Any, list[dict[str, Any]]]:
        """Per-VMA /proc/PID/smaps fields (kB), as task_mmu.c computes them (remapd/procfs.py)."""
        return self.procfs.smaps(pid)

    def vmstat(self) -> dict[str, int]:
        return {**self.procfs.vmstat(), **self.vm}

    def check(self) -> Generator[Any, Any, dict[str, Any]]:
        """``thpctl check``: see :mod:`remapd.audit`."""
        return audit.check(self)

    def status(self, pid: int) -> dict[str, Any]:
        mm = self.mm(pid)
        return {
            "pid": pid,
            "vmas": len(mm.vmas),
            "locked_vm": mm.locked_vm,
            "nr_ptes": mm.nr_ptes,
            "rss": dict(mm.rss),
            "marked": sum(1 for p, _ in self.marked if p == pid),
            "pte_mapped_thp": list(mm.pte_mapped_thp),
            "lock": {"readers": mm.lock.readers, "writer": mm.lock.writer},
        }


def _answer_for_lost_peer(request: Message) -> Message:
    """What a request to a collapser that is gone resolves to."""
    if isinstance(request, m.LookupPage):
        return m.PageAnswer(request.req, m.PageStatus.SIGBUS)
    if isinstance(request, m.LookupPages):
        # Every fault of the batch fails as one alone would (a populate stops at the first).
        n = 1 if request.stop_at_sigbus else len(request.faults) // 4
        sigbus = m.ANSWER_STATUS.index(m.PageStatus.SIGBUS)
        return m.PageAnswers(request.req, n, tuple(x for pos in range(n) for x in (pos, sigbus, 0, 0, 0, 0)))
    if isinstance(request, m.LockFolio):
        return m.FolioAnswer(request.req, 0, 0)
    if isinstance(request, m.MadvCollapse):
        return m.CollapseResult(request.req, R.SCAN_FAIL)
    if isinstance(request, m.Remap):
        return m.Remapped(request.req, ())
    if isinstance(request, m.Audit):
        return m.Audited(request.req, ("collapsed went away during the check",))
    if isinstance(request, m.PageQuery):
        return m.PageInfo(request.req, ())
    if isinstance(request, m.PunchHole):
        return m.Punched(request.req)  # the page cache is gone with the collapser
    if isinstance(request, m.WillNeed):
        return m.ReadAhead(request.req)
    raise TypeError(f"no answer for {request!r}")
