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
import struct
from collections.abc import Sequence
from typing import Annotated, TypedDict

from shared.protocol.schema import (
    COLLAPSED,
    REMAPD,
    Message,
    Packed,
    Range,
    Request,
    message,
    request,
)
from shared.scan_result import ScanResult
from shared.vm import DEFAULT_FS, Advice, FsKind, Prot

# Model time (milliseconds since the actor started) and real durations: finite and bounded.
MAX_MODEL_MS = float(2**53)
# The longest `thpctl lock --hold`: one day.
MAX_HOLD_MS = 86_400_000.0
ModelMs = Annotated[float, Range(0.0, MAX_MODEL_MS)]
HoldMs = Annotated[float, Range(0.0, MAX_HOLD_MS)]
Seconds = Annotated[float, Range(0.0, MAX_MODEL_MS)]

# Integers with the range of their C type, checked by the codec both ways (the model checks the
# rest as the kernel does: alignment, TASK_SIZE, MAX_LFS_FILESIZE, ...). A value outside is a
# protocol error (EINVAL from the client library), not a model error.
MAX_ULONG = 2**64 - 1
MAX_LOFF = 2**63 - 1
# A user address (unsigned long): never negative.
Addr = Annotated[int, Range(0, MAX_ULONG)]
# A length in bytes (size_t).
Length = Annotated[int, Range(0, MAX_ULONG)]
# A file size or offset (loff_t, off_t): 63 bits, never negative.
FileOffset = Annotated[int, Range(0, MAX_LOFF)]


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


# Flags of a :class:`LookupPages` fault.
FAULT_PMD_OK = 1
FAULT_THP_OK = 2
# The largest :class:`LookupPages`: faults, and pages of their fault-around windows together
# (which bounds the answer's rows: its frame stays far below the frame limits).
MAX_BATCH_FAULTS = 8192
MAX_BATCH_WINDOW_PAGES = 32768
# A :class:`PageAnswers` record's status and flags.
ANSWER_STATUS = (PageStatus.OK, PageStatus.SIGBUS, PageStatus.NOMEM)
ANSWER_THP, ANSWER_PMD, ANSWER_MAJOR, ANSWER_SHMEM, ANSWER_ALLOCATED = 1, 2, 4, 8, 16
ANSWER_ORDER_SHIFT = 5  # the folio's order, in the flags' bits above these


class UprobeAction(enum.StrEnum):
    ADD = "add"
    DEL = "del"


# ===============================================================================================
# the peer protocol
# ===============================================================================================

# -- remapper -> collapser ----------------------------------------------------------------------


@message("peer.hello")
class PeerHello(Message):
    """First message on every connection, in both directions: the sender's role,
    :data:`~shared.protocol.schema.PROTOCOL_VERSION`, and a fresh challenge for the other side
    (64 hex digits; :mod:`shared.shell.auth`)."""

    role: str
    protocol: int
    nonce: str = ""


@message("peer.auth")
class PeerAuth(Message):
    """Second message on every connection, in both directions: the sender's proof that it knows
    the connection's secret (HMAC-SHA256 over the hello transcript, 64 hex digits), or empty when
    it holds no secret for it (:mod:`shared.shell.auth`)."""

    proof: str


@message("peer.lookup_page")
class LookupPage(Message):
    """A fault's page-cache lookup (filemap_fault / shmem_fault).

    ``pmd_ok``: the remapper could map a PMD here (PMD none, VMA covers the aligned range with
    matching alignment, not VM_NOHUGEPAGE). ``vm_hugepage``: the VMA has VM_HUGEPAGE (shmem advise).
    ``around``: other indices whose PTEs are empty in the fault-around window (do_fault_around):
    those the cache holds, uptodate and unlocked, are mapped too and come back in the answer.
    ``thp_ok``: the VMA allows a PMD-order folio here whatever its page table holds, the CoW
    source of a private write fault included (not VM_NOHUGEPAGE, VMA covers the aligned range with
    matching alignment: shmem_allowable_huge_orders, shmem_suitable_orders): shmem allocates one
    on it. Added within protocol 2 with a default: a sender that predates it sends only
    ``pmd_ok``, which implies it. ``exec_end``: for a VM_EXEC VMA the file index where the VMA
    ends (do_sync_mmap_readahead reads forward from the fault up to it, not around), else 0;
    added within protocol 3 with a default. ``rand_read``/``seq_read``: the VMA has VM_RAND_READ /
    VM_SEQ_READ (MADV_RANDOM / MADV_SEQUENTIAL: no read-around, or a forward read); added within
    protocol 4 with a default.
    """

    req: int
    ino: int
    index: int
    purpose: Purpose
    write: bool
    pmd_ok: bool
    vm_hugepage: bool
    around: tuple[int, ...] = ()
    thp_ok: bool = False
    exec_end: int = 0
    rand_read: bool = False
    seq_read: bool = False


@message("peer.lookup_pages")
class LookupPages(Message):
    """A populate's or a touch's read faults in one VMA, looked up in order as one step (GUP's
    populate runs them inside one mmap_lock read section, with no khugepaged work between them).

    ``faults`` holds four integers per fault, flat (a batch holds thousands: flat integers cost
    the codec least): the fault's page index, its fault-around window ``[lo, hi)`` in page indices
    (``index, index + 1`` without fault-around), and flags :data:`FAULT_PMD_OK` /
    :data:`FAULT_THP_OK` as :class:`LookupPage`'s ``pmd_ok`` / ``thp_ok``. ``present``: the
    indices of those windows already mapped when the batch was planned. The collapser runs the
    faults as the remapper would one after the other: a fault whose index an earlier one of the
    batch mapped (its fault-around) is a hit and is not looked up; the others are
    :class:`LookupPage` s (purpose map, read) whose ``around`` is their window minus what is mapped
    by then. It stops after a fault whose page is PMD-order (the remapper may map it whole, which
    the window arithmetic does not follow) or that failed with NOMEM (it made no page table),
    with ``stop_at_sigbus`` (a populate) after a SIGBUS, and before a fault whose page is locked
    unless it is the first (which waits for the unlock, as one fault does)."""

    req: int
    ino: int
    vm_hugepage: bool
    faults: tuple[int, ...]
    present: tuple[int, ...] = ()
    stop_at_sigbus: bool = False


# Rows of one RmapDelta: a bigger batch is split into several (shared.shell.peer), and a
# receiver refuses one above it.
MAX_RMAP_ROWS = 65536
# Its columns: pfns as 64-bit integers, the deltas as 32-bit ones (counts are atomic_t).
RMAP_PFN = "<q"
RMAP_DELTA = "<i"
RmapPfns = Annotated[bytes, Packed(RMAP_PFN, MAX_RMAP_ROWS)]
RmapDeltas = Annotated[bytes, Packed(RMAP_DELTA, MAX_RMAP_ROWS)]
RmapRow = tuple[int, int, int, int]
# Pages one UnmapMapping names: those of one folio, or of the 2 MiB a collapse replaces.
MAX_UNMAP_PFNS = 512


@message("peer.rmap_delta")
class RmapDelta(Message):
    """Mapping changes made by the remapper: rows of (pfn, pte mappings, pmd mappings, pins),
    applied in order. Each unit of mapping or pin carries one page reference, as the kernel's rmap
    does.

    Columnar (version 5): ``pfns`` packs the rows' pfns (little-endian 64-bit), ``ptes``, ``pmds``
    and ``pins`` their deltas (little-endian 32-bit); a delta column is either one integer per
    pfn or empty, meaning all zeros (a zapped range sends only ``pfns`` and ``ptes``). The
    receiver refuses a column of another length."""

    pfns: RmapPfns
    ptes: RmapDeltas = b""
    pmds: RmapDeltas = b""
    pins: RmapDeltas = b""

    @classmethod
    def of(cls, rows: Sequence[RmapRow]) -> RmapDelta:
        """The message carrying ``rows``."""
        pfns, *deltas = zip(*rows) if rows else ((), (), (), ())
        return cls(_pack(RMAP_PFN, pfns), *(_pack(RMAP_DELTA, d) if any(d) else b"" for d in deltas))

    @property
    def nrows(self) -> int:
        return len(self.pfns) // 8

    @property
    def rows(self) -> tuple[RmapRow, ...]:
        """The rows as tuples (columns of consistent lengths only: the receiver checks first)."""
        n = self.nrows
        deltas = (_unpack(RMAP_DELTA, c, n) for c in (self.ptes, self.pmds, self.pins))
        return tuple(zip(_unpack(RMAP_PFN, self.pfns, n), *deltas))


def _pack(fmt: str, values: tuple[int, ...]) -> bytes:
    return struct.pack(f"<{len(values)}{fmt[1]}", *values)


def _unpack(fmt: str, column: bytes, n: int) -> tuple[int, ...]:
    return struct.unpack(f"<{n}{fmt[1]}", column) if column else (0,) * n


@message("peer.mark_dirty")
class MarkDirty(Message):
    """A write through a shared mapping dirtied this page (set_page_dirty)."""

    pfn: int


@message("peer.register_range")
class RegisterRange(Message):
    """A file VMA khugepaged visits once its mm is on khugepaged's list ([start, end) maps ``ino``
    from ``pgoff``). Sent again whenever the VMA changes; the scan re-checks eligibility each
    visit. ``entered``: the mm is on the list (MMF_VM_HUGEPAGE: a khugepaged_enter_vma() call
    found a VMA of it eligible), so khugepaged scans it; until then its ranges are only kept."""

    pid: int
    start: int
    end: int
    ino: int
    pgoff: int
    vm_hugepage: bool
    vm_nohugepage: bool
    entered: bool = True


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
    """MADV_PAGEOUT: try to reclaim these pages and folios (a head for a large one), which the
    remapper found mapped by the caller alone and unmapped; split the folios of ``split`` (heads),
    which the range covers in part and the remapper unmapped everywhere (split_folio)."""

    pfns: tuple[int, ...]
    split: tuple[int, ...] = ()


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


@message("peer.punch_hole")
class PunchHole(Message):
    """MADV_REMOVE: vfs_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) on [offset,
    offset+length) of ``ino``, as ``file punch`` does; answered by :class:`Punched`."""

    req: int
    ino: int
    offset: int
    length: int


@message("peer.willneed")
class WillNeed(Message):
    """MADV_WILLNEED on a regular file: vfs_fadvise(POSIX_FADV_WILLNEED) of the ``nr`` pages
    from ``index`` of ``ino`` (force_page_cache_ra); answered by :class:`ReadAhead`."""

    req: int
    ino: int
    index: int
    nr: int


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


@message("peer.page_query")
class PageQuery(Message):
    """The /proc reports' question (smaps, pagemap, kpageflags): for each pfn its kpageflags bits
    and its mapcount (folio_precise_page_mapcount: the subpage's PTE mappings plus the folio's PMD
    mappings), and for each (ino, start, end) the indices of shmem swap entries there. Changes
    nothing; answered with :class:`PageInfo`."""

    req: int
    pfns: tuple[int, ...]
    swap_ranges: tuple[tuple[int, int, int], ...] = ()


# -- collapser -> remapper ----------------------------------------------------------------------


@message("peer.page")
class PageAnswer(Message):
    """Answer to :class:`LookupPage`.

    ``pfn`` is the (sub)page for the index; ``head`` its compound head (== pfn for a small page);
    ``thp`` whether it is PMD-order; ``pmd`` whether the mapping was accounted as a PMD mapping;
    ``major`` whether it had to be read in (or allocated); ``around``: (index, pfn, thp) of the
    fault-around pages, each already accounted as a PTE mapping. ``allocated``: the lookup filled
    a shmem hole with this folio, so fault-around (which runs first) did not see it and
    finish_fault maps it (a large one whole only where every PTE of it is none). ``order``: the
    folio's (0 small, 9 PMD-order; a split leaves the orders between), which finish_fault maps
    whole. Both added within protocol 2 with a default. A SIGBUS answer past EOF may carry
    ``around`` too: fault-around runs before ->fault refuses the page.
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
    allocated: bool = False
    order: int = 0


@message("peer.page_answers")
class PageAnswers(Message):
    """Answer to :class:`LookupPages`: ``done`` faults of the batch were run (the rest were not
    looked up and changed nothing). ``answers`` holds, flat, one record for each of them that was
    looked up, in order: its position in the batch, the status (:data:`ANSWER_STATUS` index),
    ``pfn``, ``head``, flags (:data:`ANSWER_THP`, ``_PMD``, ``_MAJOR``, ``_SHMEM``,
    ``_ALLOCATED``, and the folio's order from bit :data:`ANSWER_ORDER_SHIFT`), the number of fault-around pages and, for each, its index, pfn and whether
    it is part of a THP (0/1): a :class:`PageAnswer` each. A fault run without a record was a
    hit."""

    req: int
    done: int
    answers: tuple[int, ...] = ()


def around_pages(flat: Sequence[int]) -> tuple[tuple[int, int, bool], ...]:
    """A :class:`PageAnswers` record's fault-around pages, flat (index, pfn, 0/1 for each), as
    :attr:`PageAnswer.around` holds them: (index, pfn, thp)."""
    it = iter(flat)
    return tuple(zip(it, it, map(bool, it)))


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

    ``pfns``: only PTEs/PMDs mapping these pages (collapse_file's try_to_unmap, a folio split's
    unmap_folio), packed as an RmapDelta's pfns (version 5: the 512 of a collapse were an array
    of ints); empty means all (unmap_mapping_range). ``even_cows``: also zap private CoW copies
    (truncate).
    """

    req: int
    ino: int
    start: int
    end: int
    pfns: Annotated[bytes, Packed(RMAP_PFN, MAX_UNMAP_PFNS)]
    even_cows: bool


@message("peer.unmapped")
class Unmapped(Message):
    """Answer to :class:`UnmapMapping` (the zapped mappings went ahead as :class:`RmapDelta`)."""

    req: int


@message("peer.punched")
class Punched(Message):
    """Answer to :class:`PunchHole`: the hole is punched (the unmaps went ahead)."""

    req: int


@message("peer.read_ahead")
class ReadAhead(Message):
    """Answer to :class:`WillNeed`: the readahead is done."""

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


@message("peer.page_info")
class PageInfo(Message):
    """Answer to :class:`PageQuery`: ``pages`` rows (pfn, kpageflags, mapcount) for the asked pfns
    below ``max_pfn`` (the end of the collapser's memory, where /proc/kpageflags ends), in order;
    ``swapped`` the swap entries' indices of each asked range."""

    req: int
    pages: tuple[tuple[int, int, int], ...]
    max_pfn: int = 0
    swapped: tuple[tuple[int, ...], ...] = ()


# -- both ways ----------------------------------------------------------------------------------


@message("peer.file_info")
class FileInfo(Message):
    """The remapper's mirror of a file: created, resized (``size``), or removed (``size`` = -1).

    ``gen``: the collapser boot that made the file (its inode generation). ``(ino, gen)`` is the
    file's identity: inode numbers restart with a collapsed that restarts, so a number alone may
    name another file after a restart. Sent by the remapper on resync, it claims the file it
    maps; the collapser keeps a claim of an earlier boot under that identity (and moves a file of
    its own that took the number meanwhile, see docs/protocol.md). ``fs``: a regular file's
    filesystem kind (the remapper's THP eligibility and MADV_COLLAPSE depend on it); added
    within protocol 3 with a default."""

    ino: int
    name: str
    size: int
    shmem: bool
    gen: int = 0
    fs: FsKind = DEFAULT_FS


@message("peer.mkclean")
class Mkclean(Message):
    """folio_clear_dirty_for_io -> folio_mkclean: these pages of regular file ``ino`` (by index)
    were mapped when writeback took their dirty bit. The remapper write-protects every PTE
    mapping them, so the next write through a shared mapping is a write-protect fault that
    dirties the page again (page_mkwrite). Added within protocol 2."""

    ino: int
    indices: tuple[int, ...]


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
    fs: str
    nrpages: int
    thps: int
    swap: int
    dirty: int
    open_for_write: int


class WriteResult(FileStat):
    """write(2)'s answer: the file after it, and how many bytes went in (fewer than asked for
    when the modelled memory ran out: a short write, as generic_perform_write returns)."""

    written: int


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


class SyscallResult(TypedDict):
    result: int | str  # 0 or the errno name


class RemapResult(TypedDict):
    result: int | str  # 0 or the errno name
    addr: int | None  # the mapping's address after the call (None on error)


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


class MapsEntry(TypedDict):
    """One line of /proc/PID/maps: the VMA's range, permissions, file offset, device, inode and
    path (``/thpsplit/NAME`` for a regular file, ``/dev/shm/NAME`` for shmem; ``name`` is the
    file's own name)."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    ino: int
    name: str
    path: str


# /proc/PID/smaps: the VMA's maps fields, then the kB fields in the kernel's order (6.18
# show_smap/__show_smap), THPeligible and VmFlags.
SmapsEntry = TypedDict(
    "SmapsEntry",
    {
        "start": int,
        "end": int,
        "perms": str,
        "offset": int,
        "dev": str,
        "ino": int,
        "name": str,
        "path": str,
        "Size": int,
        "KernelPageSize": int,
        "MMUPageSize": int,
        "Rss": int,
        "Pss": int,
        "Pss_Dirty": int,
        "Shared_Clean": int,
        "Shared_Dirty": int,
        "Private_Clean": int,
        "Private_Dirty": int,
        "Referenced": int,
        "Anonymous": int,
        "KSM": int,
        "LazyFree": int,
        "AnonHugePages": int,
        "ShmemPmdMapped": int,
        "FilePmdMapped": int,
        "Shared_Hugetlb": int,
        "Private_Hugetlb": int,
        "Swap": int,
        "SwapPss": int,
        "Locked": int,
        "THPeligible": int,
        "VmFlags": str,
    },
)

# /proc/PID/smaps_rollup: the span of the VMAs, then the sums (with Pss_Anon, Pss_File, Pss_Shmem).
SmapsRollup = TypedDict(
    "SmapsRollup",
    {
        "start": int,
        "end": int,
        "Rss": int,
        "Pss": int,
        "Pss_Dirty": int,
        "Pss_Anon": int,
        "Pss_File": int,
        "Pss_Shmem": int,
        "Shared_Clean": int,
        "Shared_Dirty": int,
        "Private_Clean": int,
        "Private_Dirty": int,
        "Referenced": int,
        "Anonymous": int,
        "KSM": int,
        "LazyFree": int,
        "AnonHugePages": int,
        "ShmemPmdMapped": int,
        "FilePmdMapped": int,
        "Shared_Hugetlb": int,
        "Private_Hugetlb": int,
        "Swap": int,
        "SwapPss": int,
        "Locked": int,
    },
)


class PageFlags(TypedDict):
    """/proc/kpageflags and /proc/kpagecount from ``pfn`` on: one u64 of KPF_* bits and one
    mapcount per page (fewer than asked at the end of memory, as a read there is short)."""

    pfn: int
    flags: list[int]
    counts: list[int]


class PmdMapRow(TypedDict):
    """``thpctl map``: a VMA and one letter per 2 MiB range it overlaps (from ``start`` rounded
    down to 2 MiB): P PMD-mapped, M a PTE table marked for a collapse retry, T other PTE-mapped
    THP subpages, s small pages only, . nothing mapped."""

    start: int
    end: int
    perms: str
    path: str
    cells: str


class ProcessTop(TypedDict):
    """One process in ``thpctl top`` (kB): file RSS, how much of it a PMD maps, how much is THP
    subpages mapped by PTEs, and the marked PTE tables."""

    pid: int
    vmas: int
    size_kb: int
    rss_kb: int
    pmd_kb: int
    pte_thp_kb: int
    marked: int
    lock: str


class TopStats(TypedDict):
    """``thpctl top``'s remapd half: per process, and the retry machinery's counters."""

    processes: list[ProcessTop]
    counters: dict[str, int]


class TraceEvent(TypedDict):
    """One event of a daemon's log as ``thpctl trace`` streams it: when (seconds since the daemon
    started), the daemon, the event's name and its fields."""

    ts: Seconds
    daemon: str
    task: str  # the thread that logged it, as trace_pipe's "comm-pid" (khugepaged-1234)
    event: str
    fields: dict[str, int | str]


class TraceBatch(TypedDict):
    """A reply of a trace subscription: events in order, and how many were dropped before them
    because the client read too slowly (the queue is bounded)."""

    events: list[TraceEvent]
    dropped: int


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
        "khugepaged/passes": int,  # wake-ups that scanned (khugepaged_do_scan)
        "khugepaged/scans": int,  # 2 MiB ranges scanned (hpage_collapse_scan_file calls)
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
    """creat(2) and ftruncate(2) to ``size``: a shmem file, or a regular file on a filesystem of
    kind ``fs`` (:class:`~shared.vm.FsKind`; ignored for shmem). ``fs`` was added within
    protocol 3 with a default."""

    id: int
    name: str
    size: FileOffset
    shmem: bool = False
    fs: FsKind = DEFAULT_FS


@request("client.file_write", COLLAPSED, run="file_write")
class FileWrite(Request[WriteResult]):
    id: int
    name: str
    offset: FileOffset
    length: FileOffset


@request("client.file_sync", COLLAPSED, run="file_sync")
class FileSync(Request[FileStat]):
    id: int
    name: str


@request("client.file_truncate", COLLAPSED, run="file_truncate")
class FileTruncate(Request[FileStat]):
    id: int
    name: str
    size: FileOffset


@request("client.file_punch", COLLAPSED, run="file_punch")
class FilePunch(Request[FileStat]):
    """fallocate(FALLOC_FL_PUNCH_HOLE) on [offset, offset+length)."""

    id: int
    name: str
    offset: FileOffset
    length: FileOffset


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
    """``addr`` None: the kernel picks (mmap(NULL, ...)). The mapping's file is the process's
    one open file of ``name`` (opened at its first mmap of it, inherited across fork), or with
    ``reopen`` a new open(2) of its own: VMAs merge only within one open file (vm_file)."""

    id: int
    pid: int
    addr: Addr | None
    length: Length
    name: str
    offset: FileOffset = 0
    prot: Prot = Prot.R
    shared: bool = True
    reopen: bool = False


@request("client.munmap", REMAPD, run="munmap")
class Munmap(Request[MappedRange]):
    id: int
    pid: int
    addr: Addr
    length: Length


@request("client.madvise", REMAPD, run="madvise", unwrap="result")
class Madvise(Request[MadviseResult]):
    id: int
    pid: int
    addr: Addr
    length: Length
    advice: Advice


@request("client.mprotect", REMAPD, run="mprotect", unwrap="result")
class Mprotect(Request[SyscallResult]):
    """mprotect(2) of [addr, addr+length): 0 or the errno name; bad arguments are refused."""

    id: int
    pid: int
    addr: int
    length: int
    prot: Prot


@request("client.mremap", REMAPD, run="mremap")
class Mremap(Request[RemapResult]):
    """mremap(2) of [addr, addr+old_length) to ``new_length`` bytes. ``to``: MREMAP_FIXED at
    that address; ``maymove``: MREMAP_MAYMOVE (implied by ``to`` and ``dontunmap``);
    ``dontunmap``: MREMAP_DONTUNMAP. Errors are results, as for madvise."""

    id: int
    pid: int
    addr: int
    old_length: int
    new_length: int
    to: int | None = None
    maymove: bool = False
    dontunmap: bool = False


@request("client.mlock", REMAPD, run="mlock", unwrap="result")
class Mlock(Request[SyscallResult]):
    """mlock(2), or mlock2(MLOCK_ONFAULT) with ``onfault``: 0 or the errno name."""

    id: int
    pid: int
    addr: int
    length: int
    onfault: bool = False


@request("client.munlock", REMAPD, run="munlock", unwrap="result")
class Munlock(Request[SyscallResult]):
    """munlock(2): 0 or the errno name."""

    id: int
    pid: int
    addr: int
    length: int


@request("client.fault", REMAPD, run="fault", unwrap="result")
class Fault(Request[FaultResult]):
    id: int
    pid: int
    addr: Addr
    write: bool = False


@request("client.touch", REMAPD, run="touch")
class Touch(Request[dict[str, int]]):
    """Fault every ``stride`` bytes; the result counts each outcome."""

    id: int
    pid: int
    addr: Addr
    length: Length
    write: bool = False
    stride: Length = 4096


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
    addr: Addr


@request("client.unpin", REMAPD, run="unpin")
class Unpin(Request[Pinned]):
    id: int
    pid: int
    addr: Addr


@request("client.uprobe", REMAPD, world="uprobe")
class Uprobe(Request[UprobeResult]):
    id: int
    action: UprobeAction
    name: str
    offset: FileOffset


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


# -- requests: the /proc and sysfs views of issue 12 (remapd asks collapsed for page state) ------


@request("client.maps", REMAPD, run="procfs.maps", world="maps")
class Maps(Request[list[MapsEntry]]):
    """/proc/PID/maps."""

    id: int
    pid: int


@request("client.smaps_rollup", REMAPD, run="procfs.smaps_rollup", world="smaps_rollup")
class SmapsRollupRequest(Request[SmapsRollup]):
    """/proc/PID/smaps_rollup."""

    id: int
    pid: int


@request("client.proc_status", REMAPD, run="procfs.status", world="proc_status")
class ProcStatus(Request[dict[str, int]]):
    """/proc/PID/status: the memory lines (kB: VmSize, VmRSS, RssAnon, RssFile, RssShmem, ...) and
    Pid, Threads, THP_enabled."""

    id: int
    pid: int


@request("client.pagemap", REMAPD, run="procfs.pagemap", world="pagemap")
class Pagemap(Request[list[int]]):
    """/proc/PID/pagemap: one u64 per page of [addr, addr+length), at most MAX_ENTRIES pages."""

    id: int
    pid: int
    addr: int
    length: int


@request("client.kpageflags", REMAPD, run="procfs.kpageflags", world="kpageflags")
class KPageFlags(Request[PageFlags]):
    """/proc/kpageflags and /proc/kpagecount for ``count`` pages from ``pfn`` (at most MAX_ENTRIES)."""

    id: int
    pfn: int
    count: int = 1


@request("client.pmd_map", REMAPD, run="procfs.pmd_map", world="pmd_map")
class PmdMap(Request[list[PmdMapRow]]):
    """What each 2 MiB range of each VMA of ``pid`` holds (``thpctl map``)."""

    id: int
    pid: int


@request("client.top", REMAPD, run="procfs.top", world="top")
class Top(Request[TopStats]):
    """``thpctl top``'s figures of every process."""

    id: int


@request("client.trace", (COLLAPSED, REMAPD), world=None)
class Trace(Request[TraceBatch]):
    """Subscribe to the daemon's log events (``events`` empty: all): replies stream, each a batch,
    until the client closes the connection. Events wait in a bounded queue; when the client reads
    too slowly the newest are dropped and counted in the next batch's ``dropped``."""

    id: int
    events: tuple[str, ...] = ()
