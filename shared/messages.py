"""Every message the collapser and the remapper exchange (the peer protocol).

Requests carry ``req`` (unique per sender); the answer carries the same ``req``. Messages without
``req`` are one-way notices. A channel is FIFO: a notice sent before a reply arrives before it,
which is what keeps the two halves' views of refcounts and mappings in step (docs/protocol.md).

Mapping accounting: the collapser owns ``struct page`` (refcount, mapcount); the remapper owns page
tables. A lookup answered for mapping already counts the new mapping; every later change the
remapper makes (unmap, failed install, PMD install) travels as :class:`RmapDelta` rows, sent ahead of
whatever the remapper sends next, so a reply never overtakes the accounting it depends on.
"""

from __future__ import annotations

from typing import Any

from shared.message import Message, message

# -- remapper -> collapser ----------------------------------------------------------------------


@message("peer.hello")
class PeerHello(Message):
    """First message on the peer channel, in both directions."""

    role: str
    protocol: int


@message("peer.lookup_page")
class LookupPage(Message):
    """A fault's page-cache lookup (filemap_fault / shmem_fault).

    ``purpose``: ``"map"`` (account the mapping before answering), ``"copy"`` (CoW source or uprobe
    original: a transient reference only, dropped when answered) or ``"pin"`` (GUP: a pin).
    ``pmd_ok``: the remapper could map a PMD here (PMD none, VMA covers the aligned range with
    matching alignment, not VM_NOHUGEPAGE). ``vm_hugepage``: the VMA has VM_HUGEPAGE (shmem advise).
    ``around``: other indices whose PTEs are empty in the fault-around window (do_fault_around):
    those the cache holds, uptodate and unlocked, are mapped too and come back in the answer.
    """

    req: int
    ino: int
    index: int
    purpose: str
    write: bool
    pmd_ok: bool
    vm_hugepage: bool
    around: tuple[int, ...] = ()


@message("peer.rmap_delta")
class RmapDelta(Message):
    """Mapping changes made by the remapper: rows of (pfn, pte mappings, pmd mappings, pins).

    Each unit of mapping or pin carries one page reference, as the kernel's rmap does.
    """

    rows: tuple[tuple[int, int, int, int], ...]


@message("peer.mark_dirty")
class MarkDirty(Message):
    """A write through a shared mapping dirtied this page (set_page_dirty)."""

    pfn: int


@message("peer.register_range")
class RegisterRange(Message):
    """khugepaged_enter_vma: a file VMA khugepaged should visit ([start, end) maps ``ino`` from
    ``pgoff``). Sent again whenever the VMA changes; the scan re-checks eligibility each visit."""

    pid: int
    start: int
    end: int
    ino: int
    pgoff: int
    vm_hugepage: bool
    vm_nohugepage: bool


@message("peer.unregister_range")
class UnregisterRange(Message):
    pid: int
    start: int


@message("peer.mm_exit")
class MmExit(Message):
    """The mm is gone: drop its khugepaged slot."""

    pid: int


@message("peer.write_open")
class WriteOpen(Message):
    """i_writecount change: a shared writable mapping opened (+1) or closed (-1) the file for write."""

    ino: int
    delta: int


@message("peer.set_collapse_pmd")
class SetCollapsePmd(Message):
    """The per-mapping policy's AS_COLLAPSE_PMD bit (the seed's v6 patch): set on trylock failure."""

    ino: int


@message("peer.reclaim")
class Reclaim(Message):
    """MADV_PAGEOUT: try to reclaim these pages (the remapper already unmapped its own PTEs)."""

    pfns: tuple[int, ...]


@message("peer.lock_folio")
class LockFolio(Message):
    """filemap_lock_folio for collapse_pte_mapped_thp: lock and return the folio at ``index``."""

    req: int
    ino: int
    index: int


@message("peer.unlock_folio")
class UnlockFolio(Message):
    pfn: int


@message("peer.madv_collapse")
class MadvCollapse(Message):
    """MADV_COLLAPSE's page-cache half: hpage_collapse_scan_file + collapse_file, no max_ptes_*."""

    req: int
    pid: int
    addr: int
    ino: int
    pgoff: int


@message("peer.visit_mm")
class VisitMmDone(Message):
    """Answer to :class:`VisitMm`."""

    req: int


# -- collapser -> remapper ----------------------------------------------------------------------


@message("peer.page")
class PageAnswer(Message):
    """Answer to :class:`LookupPage`.

    ``status``: ``"ok"``, ``"sigbus"`` (index at or beyond EOF), ``"nomem"``.
    ``pfn`` is the (sub)page for the index; ``head`` its compound head (== pfn for a small page);
    ``thp`` whether it is PMD-order; ``pmd`` whether the mapping was accounted as a PMD mapping;
    ``major`` whether it had to be read in (or allocated); ``around``: (index, pfn, thp) of the
    fault-around pages, each already accounted as a PTE mapping.
    """

    req: int
    status: str
    pfn: int = 0
    head: int = 0
    thp: bool = False
    pmd: bool = False
    major: bool = False
    shmem: bool = False
    around: tuple[tuple[int, int, bool], ...] = ()


@message("peer.folio")
class FolioAnswer(Message):
    """Answer to :class:`LockFolio`: ``pfn`` is the locked head, 0 when there was no folio."""

    req: int
    pfn: int
    order: int


@message("peer.collapse_result")
class CollapseResult(Message):
    """Answer to :class:`MadvCollapse`: the kernel's scan result code."""

    req: int
    result: int


@message("peer.unmap_mapping")
class UnmapMapping(Message):
    """Zap every mapping of file pages in [start, end) of ``ino`` (try_to_unmap / truncate).

    ``pfns``: only PTEs/PMDs mapping these pages (collapse_file's try_to_unmap); empty means all
    (unmap_mapping_range). ``even_cows``: also zap private CoW copies (truncate).
    """

    req: int
    ino: int
    start: int
    end: int
    pfns: tuple[int, ...]
    even_cows: bool


@message("peer.unmapped")
class Unmapped(Message):
    """Answer to :class:`UnmapMapping` (the zapped mappings went ahead as :class:`RmapDelta`)."""

    req: int


@message("peer.retract")
class Retract(Message):
    """retract_page_tables(mapping, pgoff) for the new PMD-order folio at ``head`` (locked)."""

    req: int
    ino: int
    pgoff: int
    head: int


@message("peer.retracted")
class Retracted(Message):
    """Answer to :class:`Retract`: how many VMAs had their table retracted, got a PMD installed,
    were deferred (trylock failed) or were skipped."""

    req: int
    retracted: int
    installed: int
    deferred: int
    skipped: int


@message("peer.collapse_pte_mapped")
class CollapsePteMapped(Message):
    """Run collapse_pte_mapped_thp(mm, addr) (the 6.x scan's answer to SCAN_PTE_MAPPED_HUGEPAGE)."""

    req: int
    pid: int
    addr: int


@message("peer.collapse_pte_mapped_result")
class CollapsePteMappedResult(Message):
    req: int
    result: int


@message("peer.visit")
class VisitMm(Message):
    """khugepaged visits this mm's slot (mm-slot policy: khugepaged_collapse_pte_mapped_thps)."""

    req: int
    pid: int


@message("peer.file_info")
class FileInfo(Message):
    """The remapper's mirror of a file: created, resized (``size``), or removed (``size`` = -1)."""

    ino: int
    name: str
    size: int
    shmem: bool


@message("peer.knobs")
class KnobsChanged(Message):
    values: dict[str, Any]


# ===============================================================================================
# client protocol: thpctl (and the client library) <-> either daemon
#
# A client opens with PeerHello(role="client") and the daemon answers with its own PeerHello.
# Every request carries ``id`` (unique per connection, chosen by the client); the daemon answers
# each with Reply(id, result) or ErrorReply(id, errno, message). A daemon runs one connection's
# requests in the order sent, as one thread's syscalls; replies go out when ready, not
# necessarily in that order, so clients match them by id. Requests a daemon does not serve are
# refused with EOPNOTSUPP. The daemons also send Sync to
# each other over the peer channel, as the barrier that makes a reply wait until the peer has
# seen everything the operation sent it.
# ===============================================================================================


@message("client.reply")
class Reply(Message):
    id: int
    result: Any


@message("client.error")
class ErrorReply(Message):
    """A refused request (``errno`` as the kernel names it), or a protocol error (``id`` 0 when
    the offending frame had no readable id; the connection is closed after it)."""

    id: int
    errno: str
    message: str


@message("client.sync")
class Sync(Message):
    """Answered once the daemon's peer has processed everything the daemon sent it before
    (waits for a peer to be connected)."""

    id: int


@message("client.status")
class Status(Message):
    id: int


@message("client.file_create")
class FileCreate(Message):
    id: int
    name: str
    size: int
    shmem: bool = False


@message("client.file_write")
class FileWrite(Message):
    id: int
    name: str
    offset: int
    length: int


@message("client.file_sync")
class FileSync(Message):
    id: int
    name: str


@message("client.file_truncate")
class FileTruncate(Message):
    id: int
    name: str
    size: int


@message("client.file_punch")
class FilePunch(Message):
    """fallocate(FALLOC_FL_PUNCH_HOLE) on [offset, offset+length)."""

    id: int
    name: str
    offset: int
    length: int


@message("client.file_ls")
class FileLs(Message):
    id: int


@message("client.drop_caches")
class DropCaches(Message):
    id: int


@message("client.proc_spawn")
class ProcSpawn(Message):
    id: int
    pid: int


@message("client.proc_exit")
class ProcExit(Message):
    id: int
    pid: int


@message("client.proc_fork")
class ProcFork(Message):
    id: int
    pid: int
    child: int


@message("client.mmap")
class Mmap(Message):
    """``addr`` None: the kernel picks (mmap(NULL, ...))."""

    id: int
    pid: int
    addr: int | None
    length: int
    name: str
    offset: int = 0
    prot: str = "r"
    shared: bool = True


@message("client.munmap")
class Munmap(Message):
    id: int
    pid: int
    addr: int
    length: int


@message("client.madvise")
class Madvise(Message):
    id: int
    pid: int
    addr: int
    length: int
    advice: str


@message("client.fault")
class Fault(Message):
    id: int
    pid: int
    addr: int
    write: bool = False


@message("client.touch")
class Touch(Message):
    id: int
    pid: int
    addr: int
    length: int
    write: bool = False
    stride: int = 4096


@message("client.lock")
class Lock(Message):
    """An application thread takes the mmap lock and holds it ``hold_ms`` (real milliseconds)."""

    id: int
    pid: int
    hold_ms: float
    write: bool = False


@message("client.pin")
class Pin(Message):
    id: int
    pid: int
    addr: int


@message("client.unpin")
class Unpin(Message):
    id: int
    pid: int
    addr: int


@message("client.uprobe")
class Uprobe(Message):
    """``action``: "add" or "del"."""

    id: int
    action: str
    name: str
    offset: int


@message("client.smaps")
class Smaps(Message):
    id: int
    pid: int


@message("client.vmstat")
class Vmstat(Message):
    """This daemon's share of /proc/vmstat; a client shows the union of both."""

    id: int


@message("client.meminfo")
class Meminfo(Message):
    id: int


@message("client.sysfs_get")
class SysfsGet(Message):
    """``name`` None: every knob. The result maps knob name to {"value", "text"}."""

    id: int
    name: str | None = None


@message("client.sysfs_set")
class SysfsSet(Message):
    id: int
    name: str
    value: str


@message("client.wait_scans")
class WaitScans(Message):
    """Answered once khugepaged's full_scans has grown by ``n`` since the request arrived."""

    id: int
    n: int
