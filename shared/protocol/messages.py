"""Every message: the peer protocol between the collapser and the remapper, and the client
requests with their typed results, which are also each actor's operation table
(docs/protocol.md).

Peer requests carry ``req`` (unique per sender); the answer carries the same ``req``. Messages
without ``req`` are one-way notices. A channel is FIFO: a notice sent before a reply arrives
before it, which is what keeps the two halves' views of refcounts and mappings in step.

Mapping accounting: the collapser owns ``struct page`` (refcount, mapcount); the remapper owns page
tables. A lookup answered for mapping already counts the new mapping; every later change the
remapper makes (unmap, failed install, PMD install) travels as :class:`RmapDelta` rows, sent ahead of
whatever the remapper sends next, so a reply never overtakes the accounting it depends on.

Closed sets are enums (:class:`Purpose`, :class:`PageStatus`, :class:`UprobeAction`,
:class:`~shared.vm.Advice`, :class:`~shared.vm.Prot`, :class:`~shared.scan_result.ScanResult`).
They are ``StrEnum``/``IntEnum``: a field accepts the plain string or int when sent, travels as it,
and is decoded to the member, which still equals the plain value.
"""

from __future__ import annotations

import enum
from typing import Annotated, TypedDict

from shared.protocol.schema import (
    COLLAPSED,
    REMAPD,
    Message,
    Range,
    Request,
    message,
    request,
)
from shared.scan_result import ScanResult
from shared.vm import Advice, Prot

# Model time (milliseconds since the actor started) and real durations: finite and bounded.
MAX_MODEL_MS = float(2**53)
# The longest `thpctl lock --hold`: one day.
MAX_HOLD_MS = 86_400_000.0
ModelMs = Annotated[float, Range(0.0, MAX_MODEL_MS)]
HoldMs = Annotated[float, Range(0.0, MAX_HOLD_MS)]
Seconds = Annotated[float, Range(0.0, MAX_MODEL_MS)]


class Purpose(enum.StrEnum):
    """Why the remapper looks a page up (:class:`LookupPage`)."""

    MAP = "map"  # a fault: account the mapping before answering
    COPY = "copy"  # CoW source or uprobe original: a transient reference, dropped when answered
    PIN = "pin"  # GUP: a pin


class PageStatus(enum.StrEnum):
    """How a :class:`LookupPage` ended."""

    OK = "ok"
    SIGBUS = "sigbus"  # the index is at or beyond EOF
    NOMEM = "nomem"


class UprobeAction(enum.StrEnum):
    ADD = "add"
    DEL = "del"


# ===============================================================================================
# the peer protocol
# ===============================================================================================

# -- remapper -> collapser ----------------------------------------------------------------------


@message("peer.hello")
class PeerHello(Message):
    """First message on every connection, in both directions: the sender's role and
    :data:`~shared.protocol.schema.PROTOCOL_VERSION`."""

    role: str
    protocol: int


@message("peer.lookup_page")
class LookupPage(Message):
    """A fault's page-cache lookup (filemap_fault / shmem_fault).

    ``pmd_ok``: the remapper could map a PMD here (PMD none, VMA covers the aligned range with
    matching alignment, not VM_NOHUGEPAGE). ``vm_hugepage``: the VMA has VM_HUGEPAGE (shmem advise).
    ``around``: other indices whose PTEs are empty in the fault-around window (do_fault_around):
    those the cache holds, uptodate and unlocked, are mapped too and come back in the answer.
    """

    req: int
    ino: int
    index: int
    purpose: Purpose
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


@message("peer.remap")
class Remap(Message):
    """A remapper restored from a snapshot names the file pages its restored page tables and
    pins hold, before it maps them again: rows of (pfn, ino, index, kind), kind 0 a PTE, 1 a PMD
    (pfn the THP's head, index its first), 2 a pin. The collapser accounts each row whose page is
    still the one cached at that index of that file (unlocked; for a PMD, a PMD-order page), as a
    fault's lookup would, and answers :class:`Remapped`. At most 65,536 rows a request."""

    req: int
    rows: tuple[tuple[int, int, int, int], ...]


# -- collapser -> remapper ----------------------------------------------------------------------


@message("peer.page")
class PageAnswer(Message):
    """Answer to :class:`LookupPage`.

    ``pfn`` is the (sub)page for the index; ``head`` its compound head (== pfn for a small page);
    ``thp`` whether it is PMD-order; ``pmd`` whether the mapping was accounted as a PMD mapping;
    ``major`` whether it had to be read in (or allocated); ``around``: (index, pfn, thp) of the
    fault-around pages, each already accounted as a PTE mapping.
    """

    req: int
    status: PageStatus
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


@message("peer.audit")
class Audit(Message):
    """``thpctl check``: what the remapper maps, for the collapser to check against its pages:
    rows of (pfn, ino, index, ptes, pmds, pins), one per mapped or pinned page (PMDs on a THP's
    head), at most 65,536 a request and never splitting a THP's block. The last request
    (``last``) also carries the totals of the three counts and every file the remapper mirrors,
    (ino, gen, name, size, shmem, writers), so the collapser can tell that nothing else is
    mapped and that the two sides name the same files (and count the same writers)."""

    req: int
    rows: tuple[tuple[int, int, int, int, int, int], ...]
    last: bool
    totals: tuple[int, int, int] = (0, 0, 0)
    files: tuple[tuple[int, int, str, int, bool, int], ...] = ()


@message("peer.audited")
class Audited(Message):
    """Answer to :class:`Audit`: what disagrees (empty: all agrees); ``busy`` when the collapser
    had a request of its own to the remapper in flight (a collapse), so could not judge."""

    req: int
    problems: tuple[str, ...]
    busy: bool = False


@message("peer.remapped")
class Remapped(Message):
    """Answer to :class:`Remap`: for each row, whether it was accounted (the remapper maps it
    again, or hands the accounting back if its page table changed meanwhile)."""

    req: int
    accepted: tuple[bool, ...]


@message("peer.collapse_result")
class CollapseResult(Message):
    """Answer to :class:`MadvCollapse`: the kernel's scan result code."""

    req: int
    result: ScanResult


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
    result: ScanResult


@message("peer.visit")
class VisitMm(Message):
    """khugepaged visits this mm's slot (mm-slot policy: khugepaged_collapse_pte_mapped_thps)."""

    req: int
    pid: int


# -- both ways ----------------------------------------------------------------------------------


@message("peer.file_info")
class FileInfo(Message):
    """The remapper's mirror of a file: created, resized (``size``), or removed (``size`` = -1).

    ``gen``: the collapser boot that made the file (its inode generation). ``(ino, gen)`` is the
    file's identity: inode numbers restart with a collapsed that restarts, so a number alone may
    name another file after a restart. Sent by the remapper on resync, it claims the file it
    maps; the collapser keeps a claim of an earlier boot under that identity (and moves a file of
    its own that took the number meanwhile, see docs/protocol.md)."""

    ino: int
    name: str
    size: int
    shmem: bool
    gen: int = 0


@message("peer.knobs")
class KnobsChanged(Message):
    """Knob values (by sysfs name) applied on the other side, to apply here too."""

    values: dict[str, int | str]


# ===============================================================================================
# the client protocol: thpctl (and the client library) <-> either daemon
#
# A client opens with PeerHello(role="client") and the daemon answers with its own PeerHello.
# Every request carries ``id`` (unique per connection, chosen by the client); the daemon answers
# each with the request's reply class (``REPLY``: ``id`` and the typed ``result``) or with
# ErrorReply(id, errno, message). A daemon runs one connection's requests in the order sent, as
# one thread's syscalls; replies go out when ready, not necessarily in that order, so clients
# match them by id. Requests a daemon does not serve are refused with EOPNOTSUPP. The daemons
# also send Sync to each other over the peer channel, as the barrier that makes a reply wait
# until the peer has seen everything the operation sent it.
#
# Each request below is also a row of its actors' operation table (``@request``: who serves it,
# the core method that runs it, the in-process world's method); see shared/protocol/schema.py.
# ===============================================================================================


@message("client.error")
class ErrorReply(Message):
    """A refused request (``errno`` as the kernel names it), or a protocol error (``id`` 0 when
    the offending frame had no readable id; the connection is closed after it)."""

    id: int
    errno: str
    message: str


# -- results ------------------------------------------------------------------------------------


class FileStat(TypedDict):
    name: str
    ino: int
    size: int
    shmem: bool
    nrpages: int
    thps: int
    swap: int
    dirty: int
    open_for_write: int


class Dropped(TypedDict):
    dropped_pages: int


class Process(TypedDict):
    pid: int


class Forked(TypedDict):
    pid: int
    parent: int


class MappedRange(TypedDict):
    addr: int
    length: int


class MadviseResult(TypedDict):
    result: int | str  # 0 or the errno name


class FaultResult(TypedDict):
    result: str  # hit, minor, major, pmd, sigsegv, sigbus (or nomem)


class LockHeld(TypedDict):
    pid: int
    mode: str  # read or write
    until_ms: ModelMs


class Pinned(TypedDict):
    pid: int
    addr: int
    pfn: int


class _UprobeTarget(TypedDict):
    file: str
    offset: int


class UprobeResult(_UprobeTarget, total=False):
    mappings: int  # add: the mappings that got the breakpoint
    collapse_pte_mapped_thp: list[str]  # del: the result of each collapse it ran


SmapsEntry = TypedDict(
    "SmapsEntry",
    {
        "start": int,
        "end": int,
        "perms": str,
        "offset": int,
        "ino": int,
        "name": str,
        "Size": int,
        "KernelPageSize": int,
        "MMUPageSize": int,
        "Rss": int,
        "Anonymous": int,
        "AnonHugePages": int,
        "ShmemPmdMapped": int,
        "FilePmdMapped": int,
        "Shared_Hugetlb": int,
        "Private_Hugetlb": int,
        "Swap": int,
        "Locked": int,
        "THPeligible": int,
        "VmFlags": str,
    },
)


class CheckResult(TypedDict):
    ok: bool
    problems: list[str]  # the first few, one line each
    pages: int  # file pages mapped or pinned, checked against collapsed's
    files: int


class SysfsEntry(TypedDict):
    value: int | str
    text: str  # what reading the sysfs file shows


class _DaemonStatus(TypedDict):
    daemon: str
    peer: bool
    clients: int
    uptime_s: Seconds
    model_ms: ModelMs


_Figures = TypedDict(
    "_Figures",
    {
        "files": int,
        # collapsed
        "mm_slots": int,
        "khugepaged/pages_collapsed": int,
        "khugepaged/full_scans": int,
        # remapd
        "processes": list[int],
        "marked_tables": int,
    },
    total=False,
)


class DaemonStatus(_DaemonStatus, _Figures):
    """What ``thpctl status`` shows: the shell's figures, then the daemon's model's."""


# -- requests: every daemon ---------------------------------------------------------------------


@request("client.sync", (COLLAPSED, REMAPD), world=None)
class Sync(Request[None]):
    """Answered once the daemon's peer has processed everything the daemon sent it before
    (waits for a peer to be connected)."""

    id: int


@request("client.status", (COLLAPSED, REMAPD), world=None)
class Status(Request[DaemonStatus]):
    id: int


# -- requests: collapsed ------------------------------------------------------------------------


@request("client.file_create", COLLAPSED, run="file_create")
class FileCreate(Request[FileStat]):
    id: int
    name: str
    size: int
    shmem: bool = False


@request("client.file_write", COLLAPSED, run="file_write")
class FileWrite(Request[FileStat]):
    id: int
    name: str
    offset: int
    length: int


@request("client.file_sync", COLLAPSED, run="file_sync")
class FileSync(Request[FileStat]):
    id: int
    name: str


@request("client.file_truncate", COLLAPSED, run="file_truncate")
class FileTruncate(Request[FileStat]):
    id: int
    name: str
    size: int


@request("client.file_punch", COLLAPSED, run="file_punch")
class FilePunch(Request[FileStat]):
    """fallocate(FALLOC_FL_PUNCH_HOLE) on [offset, offset+length)."""

    id: int
    name: str
    offset: int
    length: int


@request("client.file_ls", COLLAPSED, run="file_ls")
class FileLs(Request[list[FileStat]]):
    id: int


@request("client.drop_caches", COLLAPSED, run="drop_caches")
class DropCaches(Request[Dropped]):
    id: int


@request("client.meminfo", COLLAPSED, run="meminfo")
class Meminfo(Request[dict[str, int]]):
    id: int


@request("client.wait_scans", COLLAPSED, world=None)
class WaitScans(Request[dict[str, int]]):
    """Answered once khugepaged's full_scans has grown by ``n`` since the request arrived."""

    id: int
    n: int


# -- requests: remapd ---------------------------------------------------------------------------


@request("client.proc_spawn", REMAPD, run="spawn_process", world="spawn")
class ProcSpawn(Request[Process]):
    id: int
    pid: int


@request("client.proc_exit", REMAPD, run="exit_process", world="exit")
class ProcExit(Request[Process]):
    id: int
    pid: int


@request("client.proc_fork", REMAPD, run="fork")
class ProcFork(Request[Forked]):
    id: int
    pid: int
    child: int


@request("client.mmap", REMAPD, run="mmap", unwrap="addr")
class Mmap(Request[MappedRange]):
    """``addr`` None: the kernel picks (mmap(NULL, ...))."""

    id: int
    pid: int
    addr: int | None
    length: int
    name: str
    offset: int = 0
    prot: Prot = Prot.R
    shared: bool = True


@request("client.munmap", REMAPD, run="munmap")
class Munmap(Request[MappedRange]):
    id: int
    pid: int
    addr: int
    length: int


@request("client.madvise", REMAPD, run="madvise", unwrap="result")
class Madvise(Request[MadviseResult]):
    id: int
    pid: int
    addr: int
    length: int
    advice: Advice


@request("client.fault", REMAPD, run="fault", unwrap="result")
class Fault(Request[FaultResult]):
    id: int
    pid: int
    addr: int
    write: bool = False


@request("client.touch", REMAPD, run="touch")
class Touch(Request[dict[str, int]]):
    """Fault every ``stride`` bytes; the result counts each outcome."""

    id: int
    pid: int
    addr: int
    length: int
    write: bool = False
    stride: int = 4096


@request("client.lock", REMAPD, run="hold_lock", world="lock", waits=True)
class Lock(Request[LockHeld]):
    """An application thread takes the mmap lock and holds it ``hold_ms`` (real milliseconds in
    the daemons, model time in-process), at most :data:`MAX_HOLD_MS`."""

    id: int
    pid: int
    hold_ms: HoldMs
    write: bool = False


@request("client.pin", REMAPD, run="pin")
class Pin(Request[Pinned]):
    id: int
    pid: int
    addr: int


@request("client.unpin", REMAPD, run="unpin")
class Unpin(Request[Pinned]):
    id: int
    pid: int
    addr: int


@request("client.uprobe", REMAPD, world="uprobe")
class Uprobe(Request[UprobeResult]):
    id: int
    action: UprobeAction
    name: str
    offset: int


@request("client.smaps", REMAPD, run="smaps")
class Smaps(Request[list[SmapsEntry]]):
    id: int
    pid: int


@request("client.check", REMAPD, run="check", world="audit")
class Check(Request[CheckResult]):
    """Debug: remapd checks its page tables, pins and file mirror, and collapsed checks them
    against its pages and page cache (the invariant checker's rules, across the two daemons).
    EAGAIN while either has a request to the other in flight: retry on a quiet pair."""

    id: int


@request("client.sysfs_set", REMAPD, world="sysfs_set")
class SysfsSet(Request[dict[str, int | str]]):
    id: int
    name: str
    value: str


# -- requests: both, each its own share ---------------------------------------------------------


@request("client.vmstat", (COLLAPSED, REMAPD), run="vmstat")
class Vmstat(Request[dict[str, int]]):
    """This daemon's share of /proc/vmstat; a client shows the union of both."""

    id: int


@request("client.sysfs_get", (COLLAPSED, REMAPD), route=COLLAPSED, world=None)
class SysfsGet(Request[dict[str, SysfsEntry]]):
    """``name`` None: every knob (collapsed adds khugepaged's read-only counters)."""

    id: int
    name: str | None = None
