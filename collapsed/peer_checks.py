"""What the collapser checks in every message from the remapper before it touches any state.

The remapper is a separate process on a socket: a broken or hostile one must not be able to
corrupt the page cache (free a cached page through a forged ``RmapDelta``, so that two files
share one physical page; index the page arrays with a negative pfn, which Python would take from
the end; unlock a page some other operation holds). :func:`check` raises
:class:`~shared.errors.PeerError` for a message the model refuses, before the message changes
anything; :meth:`collapsed.collapser.Collapser.deliver` runs it first, so a refused message
leaves the model exactly as it was and the daemon closes that peer connection.

Types are the codec's business (every field arrives with its annotated type); this module checks
values against the model: pfns in range and referring to live pages (page-cache pages where the
message needs one), counts the peer gives back never more than it holds, indices and addresses
within what the kernel allows, names and sizes a file may have, knob values sysfs accepts, and
replies that answer a request of their kind.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from collapsed.fileops import file_name_problem
from collapsed.pagecache import PG_ALLOCATED, File, pte_drops, sum_by, view
from shared import messages as m
from shared.errors import PeerError
from shared.knobs import KnobError
from shared.message import Message
from shared.scan_result import ScanResult
from shared.units import (
    HPAGE_PMD_NR,
    MAX_LFS_FILESIZE,
    MAX_PAGE_INDEX,
    PAGE_SIZE,
    TASK_SIZE,
)

if TYPE_CHECKING:
    from collapsed.collapser import Collapser

# refcount, mapcount, entire_mapcount and pins are atomic_t in the kernel: a count the peer would
# take past this is refused (as try_get_page refuses a refcount about to overflow).
MAX_COUNT = (1 << 31) - 1
# do_fault_around's window lies within one PMD: at most this many other indices.
MAX_AROUND = HPAGE_PMD_NR
PURPOSES = frozenset(("map", "copy", "pin"))
# A LookupPages batch: its faults, and the pages of their windows together (what the answer's
# fault-around rows may hold).
MAX_BATCH_FAULTS = m.MAX_BATCH_FAULTS
MAX_BATCH_WINDOW_PAGES = m.MAX_BATCH_WINDOW_PAGES
_SCAN_RESULTS = frozenset(int(r) for r in ScanResult)

# The reply each of the collapser's requests expects.
_REPLY_TO: dict[type[Message], type[Message]] = {
    m.UnmapMapping: m.Unmapped,
    m.Retract: m.Retracted,
    m.CollapsePteMapped: m.CollapsePteMappedResult,
    m.VisitMm: m.VisitMmDone,
}


def check(c: Collapser, msg: Message) -> None:
    """Refuse ``msg`` from the remapper with :class:`PeerError` if it does not fit the model.

    Changes nothing.
    """
    if (
        type(msg) is m.LookupPage
        and not msg.around
        and 0 <= msg.index <= MAX_PAGE_INDEX
        and msg.purpose in PURPOSES
    ):
        return  # the hot path: a fault without fault-around (in full below otherwise)
    checker = _CHECKS.get(type(msg))
    if checker is None:
        raise PeerError(f"{msg.TAG} is not a message the remapper sends")
    checker(c, msg)


# -- helpers ------------------------------------------------------------------------------------


def _pfn(c: Collapser, pfn: int, what: str) -> None:
    if not 0 < pfn < len(c.mem.ref):
        raise PeerError(f"{what}: pfn {pfn} is outside memory (1..{len(c.mem.ref) - 1})")


def _cached(c: Collapser, pfn: int) -> File | None:
    """The file whose page cache holds ``pfn`` at the page's own index, or None (a free page,
    one on its way in or out of the cache, one that left it)."""
    mem = c.mem
    flags = mem.flags[pfn]
    if not flags & PG_ALLOCATED:
        return None
    head = mem.head(pfn)
    f = c.cache.files.get(mem.ino[head])
    if f is None or f.get(mem.index[pfn]) != pfn:
        return None
    return f


def _live_cached_page(c: Collapser, pfn: int, what: str) -> None:
    _pfn(c, pfn, what)
    if _cached(c, pfn) is None:
        raise PeerError(f"{what}: pfn {pfn} is not a page in the page cache")


def _index(index: int, what: str) -> None:
    if not 0 <= index <= MAX_PAGE_INDEX:
        raise PeerError(f"{what}: page index {index} is outside 0..{MAX_PAGE_INDEX}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- remapper -> collapser: notices and requests ------------------------------------------------


def _lookup_page(c: Collapser, msg: m.LookupPage) -> None:
    _index(msg.index, "lookup_page")
    if msg.purpose not in PURPOSES:
        raise PeerError(f"lookup_page: purpose {_short(msg.purpose)} is not one of map, copy, pin")
    around = msg.around
    if around:
        if len(around) > MAX_AROUND:
            raise PeerError(f"lookup_page: {len(around)} fault-around indices (at most {MAX_AROUND})")
        # (A repeated index would only give the remapper two mappings of a page to hand back.)
        if min(around) < 0 or max(around) > MAX_PAGE_INDEX:
            raise PeerError(f"lookup_page: a fault-around page index is outside 0..{MAX_PAGE_INDEX}")
    if not 0 <= msg.exec_end <= MAX_PAGE_INDEX + 1:
        raise PeerError(f"lookup_page: exec_end {_short(msg.exec_end)} is outside 0..{MAX_PAGE_INDEX + 1}")


def _lookup_pages(c: Collapser, msg: m.LookupPages) -> None:
    """Four integers per fault; every fault's index and window inside the page index range, the
    window within one PMD's worth of pages and holding its fault; the batch no longer than a
    remapper plans one."""
    faults = msg.faults
    if len(faults) % 4 or len(faults) > 4 * MAX_BATCH_FAULTS:
        raise PeerError(f"lookup_pages: {len(faults)} integers for faults (4 each, at most {MAX_BATCH_FAULTS})")
    if len(msg.present) > MAX_BATCH_WINDOW_PAGES:
        raise PeerError(f"lookup_pages: {len(msg.present)} present indices (at most {MAX_BATCH_WINDOW_PAGES})")
    indices, los, his, flags = faults[0::4], faults[1::4], faults[2::4], faults[3::4]
    # Every fault's checks at once, in C (a touch sends a batch); the loop only finds which
    # fault failed them.
    if faults and not (
        min(los) >= 0
        and max(his) <= MAX_PAGE_INDEX + 1
        and all(map(operator.le, los, indices))
        and all(map(operator.lt, indices, his))
        and max(map(operator.sub, his, los)) <= MAX_AROUND
        and min(flags) >= 0
        and max(flags) <= 3
    ):
        for pos in range(0, len(faults), 4):
            index, lo, hi, flag = faults[pos : pos + 4]
            if not (0 <= lo <= index < hi <= MAX_PAGE_INDEX + 1 and hi - lo <= MAX_AROUND and 0 <= flag <= 3):
                raise PeerError(f"lookup_pages: bad fault {_short((index, lo, hi, flag))}")
    pages = sum(his) - sum(los)
    if pages > MAX_BATCH_WINDOW_PAGES:
        raise PeerError(f"lookup_pages: windows of {pages} pages (at most {MAX_BATCH_WINDOW_PAGES})")


def _rmap_delta(c: Collapser, msg: m.RmapDelta) -> None:
    """Each row gives or takes back mappings and pins, each holding one reference. Rows apply in
    order, so the counts are followed row by row: the peer may give back only what it holds at
    that point (summed over the rows before it in this message), may add only to pages in the
    page cache (a mapping of anything else would be a page the cache does not own), and may put
    a PMD mapping only on a PMD-order page."""
    rows = msg.nrows
    for name, column in (("ptes", msg.ptes), ("pmds", msg.pmds), ("pins", msg.pins)):
        if column and len(column) != 4 * rows:
            raise PeerError(f"rmap_delta: {len(column)} bytes of {name} for {rows} pfns (4 each, or none)")
    mem = c.mem
    mapcount = mem.mapcount
    n = len(mem.ref)
    drops = pte_drops(msg)
    if drops is not None:
        # A zapped range: the counts only fall, so it is sound if each page's final count is.
        # Otherwise the rows below find the first bad one.
        pfns, deltas = drops
        if not np.count_nonzero((pfns <= 0) | (pfns >= n)):
            distinct, sums = sum_by(pfns, deltas)
            if not np.count_nonzero(view(mapcount)[distinct] + sums < 0):
                return
    pte_held: dict[int, int] = {}
    pmd_held: dict[int, int] = {}
    pin_held: dict[int, int] = {}
    refs: dict[int, int] = {}
    for pfn, pte, pmd, pin in msg.rows:
        if not 0 < pfn < n:
            raise PeerError(f"rmap_delta: pfn {pfn} is outside memory (1..{n - 1})")
        if pte < 0 and not pmd and not pin:
            # The common row, a PTE zapped: only the subpage's mapcount matters.
            held = pte_held.get(pfn, mapcount[pfn]) + pte
            if held < 0:
                raise PeerError(f"rmap_delta: pfn {pfn} would have {held} PTE mappings")
            pte_held[pfn] = held
            continue
        head = mem.head(pfn)
        if (pte > 0 or pmd > 0 or pin > 0) and _cached(c, pfn) is None:
            raise PeerError(f"rmap_delta: maps or pins pfn {pfn}, which is not a page in the page cache")
        if pte:
            held = pte_held.get(pfn, mapcount[pfn]) + pte
            if not 0 <= held <= MAX_COUNT:
                raise PeerError(f"rmap_delta: pfn {pfn} would have {held} PTE mappings")
            pte_held[pfn] = held
        if pmd:
            if not mem.pmd_mappable(head):
                raise PeerError(f"rmap_delta: PMD mapping of pfn {pfn}, which is not a PMD-order page")
            held = pmd_held.get(head, mem.entire.get(head, 0)) + pmd
            if not 0 <= held <= MAX_COUNT:
                raise PeerError(f"rmap_delta: THP {head} would have {held} PMD mappings")
            pmd_held[head] = held
        if pin:
            held = pin_held.get(head, mem.pins.get(head, 0)) + pin
            if not 0 <= held <= MAX_COUNT:
                raise PeerError(f"rmap_delta: page {head} would have {held} pins")
            pin_held[head] = held
        delta = pte + pmd + pin
        if delta > 0:
            ref = refs.get(head, mem.ref[head]) + delta
            if ref > MAX_COUNT:
                raise PeerError(f"rmap_delta: page {head}'s refcount would overflow")
            refs[head] = ref


def _mark_dirty(c: Collapser, msg: m.MarkDirty) -> None:
    # Sent while the remapper maps the page, so the page cache still holds it.
    _live_cached_page(c, msg.pfn, "mark_dirty")


def _register_range(c: Collapser, msg: m.RegisterRange) -> None:
    start, end = msg.start, msg.end
    if not 0 <= start < end <= TASK_SIZE or start % PAGE_SIZE or end % PAGE_SIZE:
        raise PeerError(f"register_range: [{start:#x}, {end:#x}) is not a page-aligned user range")
    if msg.ino <= 0:
        raise PeerError(f"register_range: inode {msg.ino}")
    # Only the sign: a range past MAX_LFS_FILESIZE (which mmap's file_mmap_ok would refuse) is
    # harmless to the scan, which finds nothing there, and the remapper registers its ranges
    # again on every reconnection, so refusing one would drop the link for good.
    if msg.pgoff < 0:
        raise PeerError(f"register_range: pgoff {msg.pgoff} is negative")


def _nothing(c: Collapser, msg: Message) -> None:
    """UnregisterRange, MmExit, SetCollapsePmd: keys the model only looks up."""


def _write_open(c: Collapser, msg: m.WriteOpen) -> None:
    if msg.delta not in (1, -1):
        raise PeerError(f"write_open: delta {msg.delta} (an open or a close is ±1)")
    f = c.cache.files.get(msg.ino)
    if f is not None and f.writecount + msg.delta < 0:
        raise PeerError(f"write_open: {f.name!r} is not open for write")


def _reclaim(c: Collapser, msg: m.Reclaim) -> None:
    # Only the range is checked: the remapper sends the pfns after unmapping them, and another
    # operation may free a page (or even reuse its pfn) before the message is handled, which
    # reclaim tolerates by looking at each page afresh.
    for pfn in (*msg.pfns, *msg.split):
        _pfn(c, pfn, "reclaim")


def _lock_folio(c: Collapser, msg: m.LockFolio) -> None:
    _index(msg.index, "lock_folio")


def _unlock_folio(c: Collapser, msg: m.UnlockFolio) -> None:
    if msg.pfn not in c.peer_locked:
        raise PeerError(f"unlock_folio: pfn {msg.pfn} is not a folio locked for the remapper")


def _madv_collapse(c: Collapser, msg: m.MadvCollapse) -> None:
    if not 0 <= msg.pgoff <= MAX_PAGE_INDEX - (HPAGE_PMD_NR - 1) or msg.pgoff % HPAGE_PMD_NR:
        raise PeerError(f"madv_collapse: pgoff {msg.pgoff} does not start a PMD-aligned range of a file")


def _knobs_changed(c: Collapser, msg: m.KnobsChanged) -> None:
    for name, value in msg.values.items():
        try:
            c.knobs.validate(name, str(value))
        except KnobError as err:
            raise PeerError(f"knobs: {_short(name)}: {err}") from None


def _file_info(c: Collapser, msg: m.FileInfo) -> None:
    if msg.ino <= 0:
        raise PeerError(f"file_info: inode {msg.ino}")
    problem = file_name_problem(msg.name)
    if problem is not None:
        raise PeerError(f"file_info: name {_short(msg.name)} is {problem}")
    if not -1 <= msg.size <= MAX_LFS_FILESIZE:
        raise PeerError(f"file_info: size {msg.size} is outside -1..{MAX_LFS_FILESIZE}")


# -- remapper -> collapser: replies -------------------------------------------------------------


def _reply(c: Collapser, msg: Any) -> None:
    """A reply to an unknown ``req`` is ignored (the protocol allows late replies); one to a
    request of ours must be of that request's kind, with values the waiting task can use."""
    request = c.pending_request(msg.req)
    if request is None:
        return
    expected = _REPLY_TO.get(type(request))
    if type(msg) is not expected:
        raise PeerError(f"{msg.TAG} answers request {msg.req}, a {request.TAG}")
    if isinstance(msg, m.CollapsePteMappedResult) and msg.result not in _SCAN_RESULTS:
        raise PeerError(f"{msg.TAG}: {msg.result} is not a scan result")
    if isinstance(msg, m.Retracted) and min(msg.retracted, msg.installed, msg.deferred, msg.skipped) < 0:
        raise PeerError(f"{msg.TAG}: negative counts")


# A /proc report's question: bounded like a frame of rmap rows, about files that exist.
MAX_QUERY_PFNS = 65536


def _page_query(c: Collapser, msg: m.PageQuery) -> None:
    if len(msg.pfns) > MAX_QUERY_PFNS or len(msg.swap_ranges) > MAX_QUERY_PFNS:
        raise PeerError(f"{msg.TAG}: more than {MAX_QUERY_PFNS} pfns or ranges")
    if any(pfn < 0 for pfn in msg.pfns):
        raise PeerError(f"{msg.TAG}: a negative pfn")
    for ino, start, end in msg.swap_ranges:
        if ino not in c.cache.files or not 0 <= start <= end <= MAX_PAGE_INDEX + 1:
            raise PeerError(f"{msg.TAG}: bad range ({ino}, {start}, {end})")


def _punch_hole(c: Collapser, msg: m.PunchHole) -> None:
    # MADV_REMOVE: the file operation checks its range as fallocate does (EINVAL/EFBIG in the
    # answer); here only what would index the model wrongly.
    if msg.offset < 0 or msg.length < 0:
        raise PeerError(f"{msg.TAG}: negative offset or length")


def _willneed(c: Collapser, msg: m.WillNeed) -> None:
    if not 0 <= msg.index <= msg.index + msg.nr <= MAX_PAGE_INDEX + 1:
        raise PeerError(f"{msg.TAG}: bad range {_short(msg.index)} + {_short(msg.nr)}")


# Remap kinds (remapd/snapshot.py): a PTE, a PMD, a pin.
_REMAP_KINDS = (0, 1, 2)


def _remap(c: Collapser, msg: m.Remap) -> None:
    """A restored remapper's mappings: each accepted row adds a mapping or a pin (one reference),
    so the rows are bounded as a frame of rmap rows and their sums may not overflow a count.
    Whether a row names the page cached there is the collapser's answer, not a refusal: a
    remapper restored across a collapser restart names pfns this memory may not even have."""
    rows = msg.rows
    if len(rows) > MAX_QUERY_PFNS:
        raise PeerError(f"{msg.TAG}: {len(rows)} rows (at most {MAX_QUERY_PFNS})")
    mem = c.mem
    n = len(mem.ref)
    added: tuple[Counter[int], Counter[int], Counter[int]] = (Counter(), Counter(), Counter())
    refs: Counter[int] = Counter()
    for pfn, _ino, _index, kind in rows:
        if kind not in _REMAP_KINDS:
            raise PeerError(f"{msg.TAG}: kind {kind} is none of 0 (PTE), 1 (PMD), 2 (pin)")
        if 0 < pfn < n:
            head = mem.head(pfn)
            added[kind][pfn if kind == 0 else head] += 1
            refs[head] += 1
    ptes, pmds, pins = added
    if (
        any(mem.mapcount[pfn] + k > MAX_COUNT for pfn, k in ptes.items())
        or any(mem.entire.get(head, 0) + k > MAX_COUNT for head, k in pmds.items())
        or any(mem.pins.get(head, 0) + k > MAX_COUNT for head, k in pins.items())
        or any(mem.ref[head] + k > MAX_COUNT for head, k in refs.items())
    ):
        raise PeerError(f"{msg.TAG}: a page's counts would overflow")


# An audit's requests: as many rows as a Remap, plus the rest of the THP block the last row opened.
MAX_AUDIT_ROWS = MAX_QUERY_PFNS + HPAGE_PMD_NR


def _audit(c: Collapser, msg: m.Audit) -> None:
    """Only the size of a request: an audit changes nothing, and whatever its rows claim (a pfn
    outside memory, a negative count) is a disagreement the answer names, which is its purpose."""
    if len(msg.rows) > MAX_AUDIT_ROWS:
        raise PeerError(f"{msg.TAG}: {len(msg.rows)} rows (at most {MAX_AUDIT_ROWS})")


_CHECKS: dict[type[Message], Callable[[Collapser, Any], None]] = {
    m.Remap: _remap,
    m.Audit: _audit,
    m.PageQuery: _page_query,
    m.PunchHole: _punch_hole,
    m.WillNeed: _willneed,
    m.LookupPage: _lookup_page,
    m.LookupPages: _lookup_pages,
    m.RmapDelta: _rmap_delta,
    m.MarkDirty: _mark_dirty,
    m.RegisterRange: _register_range,
    m.UnregisterRange: _nothing,
    m.MmExit: _nothing,
    m.WriteOpen: _write_open,
    m.SetCollapsePmd: _nothing,
    m.Reclaim: _reclaim,
    m.LockFolio: _lock_folio,
    m.UnlockFolio: _unlock_folio,
    m.MadvCollapse: _madv_collapse,
    m.KnobsChanged: _knobs_changed,
    m.FileInfo: _file_info,
    m.Unmapped: _reply,
    m.Retracted: _reply,
    m.CollapsePteMappedResult: _reply,
    m.VisitMmDone: _reply,
}
