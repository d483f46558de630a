"""The collapser actor: composes the page cache, the file operations and khugepaged's first half,
and answers the remapper's side of the peer protocol itself (fault lookups, folio locks, losing
and regaining the peer) plus the page-cache half of vmstat and meminfo.

Sans-IO: no sockets, no clock of its own. See :mod:`shared.actor` for how it is driven.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Generator, Sequence
from functools import partial
from itertools import chain, compress, filterfalse, groupby, repeat
from operator import and_, eq, lt
from typing import Any

from collapsed import peer_checks, procfs
from collapsed.audit import audit
from collapsed.fileops import FileOps
from collapsed.khugepaged import ALLOC_SLEEP_WAKE, SCAN_SLEEP_WAKE, Khugepaged
from collapsed.pagecache import (
    PG_LOCKED,
    PG_READAHEAD,
    PG_UPTODATE,
    File,
    PageCache,
    PhysMem,
)
from shared import messages as m
from shared.actor import Actor, Wait
from shared.knobs import KHUGEPAGED_SLEEP_KNOBS, KHUGEPAGED_START_STOP_KNOBS, Knobs
from shared.message import Message
from shared.scan_result import ScanResult
from shared.thp import shmem_huge_global_enabled
from shared.units import HPAGE_PMD_NR, HPAGE_PMD_ORDER, PAGE_SHIFT, PAGE_SIZE
from shared.vm import DEFAULT_FS, FsKind

# A fault lookup's answers (looked up once: faults are hot).
_OK, _SIGBUS, _NOMEM = m.PageStatus.OK, m.PageStatus.SIGBUS, m.PageStatus.NOMEM
MAP = m.Purpose.MAP
_STATUS_CODE = {status: code for code, status in enumerate(m.ANSWER_STATUS)}
FAULT_PMD_OK, FAULT_THP_OK = m.FAULT_PMD_OK, m.FAULT_THP_OK
# A PageAnswer's fields after ``req``: status, pfn, head, thp, pmd, major, shmem, around, allocated,
# order; ``around`` flat, as a PageAnswers record carries it (index, pfn, thp as 0/1 for each page).
PageAnswerFields = tuple[m.PageStatus, int, int, bool, bool, bool, bool, list[int], bool, int]
_SIGBUS_ANSWER: PageAnswerFields = (_SIGBUS, 0, 0, False, False, False, False, [], False, 0)
_NOMEM_ANSWER: PageAnswerFields = (_NOMEM, 0, 0, False, False, False, False, [], False, 0)
# The flags fault-around looks at: it maps a page with PG_uptodate alone of them.
_AROUND_FLAGS = PG_LOCKED | PG_READAHEAD | PG_UPTODATE
# Whether a folio of each order is PMD-order, as a PageAnswers record's 0/1.
_PMD_ORDER_FLAG = tuple(int(order == HPAGE_PMD_ORDER) for order in range(HPAGE_PMD_ORDER + 1))

# What a daemon passes as ``resched_pages``: ~10 ms of a write's work between two yields.
RESCHED_PAGES = 4096

# The block device's io_pages: max_sectors_kb 1280 (BLK_DEF_MAX_SECTORS_CAP, a loop device's and
# most disks' default) in pages. MADV_WILLNEED reads up to it when asked for more than read_ahead_kb.
IO_PAGES = 1280 * 1024 // PAGE_SIZE

# peer_lost() answers the calls waiting on the remapper at most this many rounds (each answer may
# lead a task to its next call; none loops on them, so a few rounds always suffice).
_MAX_LOST_PEER_ROUNDS = 100

# Bound once, as in remapd/fault.py: faults are hot.

# peer_lost() answers the calls waiting on the remapper at most this many rounds (each answer may
# lead a task to its next call; none loops on them, so a few rounds always suffice).
_MAX_LOST_PEER_ROUNDS = 100

# The vmstat event counters this side owns, in /proc/vmstat order (mm/vmstat.c vmstat_text).
VM_EVENTS = (
    "pgmajfault",
    "drop_pagecache",
    "pswpin",
    "pswpout",
    "thp_collapse_alloc",
    "thp_collapse_alloc_failed",
    "thp_file_alloc",
    "thp_file_fallback",
    "thp_file_fallback_charge",
    "thp_split_page",
    "thp_split_page_failed",
    "thp_scan_exceed_none_pte",
    "thp_scan_exceed_swap_pte",
    "thp_scan_exceed_share_pte",
)


class Collapser(Actor):
    """Owns files, pages and khugepaged's scan. Peer messages go in through :meth:`deliver`;
    client operations are the ``file_*`` methods, :meth:`drop_caches`, :meth:`vmstat` and
    :meth:`meminfo`.

    The parts, each given what it works on: ``mem`` (``struct page`` arrays and the allocator),
    ``cache`` (files, slots and page operations over ``mem``), ``fileops`` (file operations over
    ``cache``) and ``khugepaged`` (the scan and collapse over both). ``vm`` is the vmstat event
    counters all of them count into.
    """

    def __init__(
        self,
        knobs: Knobs | None = None,
        seed: int = 0,
        start_khugepaged: bool = True,
        resched_pages: int | None = None,
        boot: int = 1,
    ):
        """``resched_pages``: the long loops of file operations, drop_caches and reclaim give the
        CPU away (cond_resched) after this many pages, so a daemon serves others between the
        chunks of one huge request; each yield lets a jiffy (RESCHED_MS) of model time pass from
        the second in a burst on. None (in-process worlds on a virtual clock): a request runs to
        its end at once, as every World operation expects. Daemons pass :data:`RESCHED_PAGES`.

        ``boot``: this boot's identity, the generation of the files it makes (a daemon draws a
        random one at every start; an in-process world counts its restarts)."""
        super().__init__()
        self.knobs = knobs or Knobs()
        self.vm: Counter[str] = Counter({name: 0 for name in VM_EVENTS})
        self.mem = PhysMem(seed, lambda: self.knobs.mem_total_mb << (20 - PAGE_SHIFT))
        self.cache = PageCache(self.mem, self.knobs, self.notify, self._waits.keys)
        self.boot = boot
        self.cache.gen = boot
        self.fileops = FileOps(self, self.cache, self.knobs, self.vm, resched_pages)
        self.khugepaged = Khugepaged(self, self.cache, self.fileops, self.knobs, self.vm)
        # Bumped when the remapper is lost: a lookup begun for the old one must not account.
        self.peer_epoch = 0
        # Folios locked on the remapper's behalf (LockFolio answered, UnlockFolio not yet seen):
        # their heads. The remapper's collapse_pte_mapped_thp holds them; if it dies holding
        # one, peer_lost() unlocks it, as a dying task's locks would be released.
        self.peer_locked: set[int] = set()
        if start_khugepaged:
            self.spawn(self.khugepaged.thread(), name="khugepaged")

    @property
    def files(self) -> dict[int, File]:
        """Every file, by inode number."""
        return self.cache.files

    @property
    def by_name(self) -> dict[str, File]:
        """Every file, by name."""
        return self.cache.by_name

    # -- client operations (what the daemon and the in-process world call; FileOps does them) -

    def file_create(self, name: str, size: int, shmem: bool, fs: FsKind = DEFAULT_FS) -> dict[str, Any]:
        return self.fileops.create(name, size, shmem, fs)

    def file_write(self, name: str, offset: int, length: int) -> Generator[Any, Any, dict[str, Any]]:
        return self.fileops.write(name, offset, length)

    def file_sync(self, name: str) -> dict[str, Any]:
        return self.fileops.sync(name)

    def file_truncate(self, name: str, size: int) -> Generator[Any, Any, dict[str, Any]]:
        return self.fileops.truncate(name, size)

    def file_punch(self, name: str, offset: int, length: int) -> Generator[Any, Any, dict[str, Any]]:
        return self.fileops.punch_hole(name, offset, length)

    def file_ls(self) -> list[dict[str, Any]]:
        return self.fileops.ls()

    def drop_caches(self) -> Generator[Any, Any, dict[str, int]]:
        self.vm["drop_pagecache"] += 1
        return self.fileops.drop_caches()

    # -- peer messages ------------------------------------------------------------------------

    def deliver(self, msg: Message) -> None:
        """Handle one message from the remapper.

        Raises:
            PeerError: the message does not fit the model (:mod:`collapsed.peer_checks`); it
            changed nothing, and the connection to that remapper must be closed.
        """
        peer_checks.check(self, msg)
        if isinstance(msg, m.LookupPage):
            if self.lookup_page(msg) is not None:
                self.spawn(self._after_unlock(partial(self.lookup_page, msg)), name="lookup")
        elif isinstance(msg, m.LookupPages):
            if self.lookup_pages(msg) is not None:
                self.spawn(self._after_unlock(partial(self.lookup_pages, msg)), name="lookup_batch")
        elif isinstance(msg, m.RmapDelta):
            self.cache.apply_rmap_delta(msg)
        elif isinstance(msg, m.MarkDirty):
            self.cache.set_dirty(self.mem.head(msg.pfn))
        elif isinstance(msg, m.RegisterRange):
            self.khugepaged.register(msg)
        elif isinstance(msg, m.UnregisterRange):
            self.khugepaged.unregister(msg.pid, msg.start)
        elif isinstance(msg, m.MmExit):
            self.khugepaged.mm_exit(msg.pid)
        elif isinstance(msg, m.WriteOpen):
            self.fileops.write_open(msg.ino, msg.delta)
        elif isinstance(msg, m.SetCollapsePmd):
            f = self.cache.files.get(msg.ino)
            if f is not None:
                f.collapse_pmd = True
        elif isinstance(msg, m.Reclaim):
            self.spawn(self.fileops.reclaim(msg.pfns, msg.split), name="reclaim")
        elif isinstance(msg, m.LockFolio):
            self.spawn(self._lock_folio(msg), name="lock_folio")
        elif isinstance(msg, m.UnlockFolio):
            self.peer_locked.discard(msg.pfn)
            self.cache.unlock(msg.pfn)
        elif isinstance(msg, m.MadvCollapse):
            self.spawn(self.khugepaged.madvise_collapse_file(msg), name="madv_collapse")
        elif isinstance(msg, m.PunchHole):
            self.spawn(self._punch_hole(msg), name="punch_hole")
        elif isinstance(msg, m.WillNeed):
            self._willneed(msg)
        elif isinstance(msg, m.KnobsChanged):
            for name, value in msg.values.items():
                self.knobs.set(name, str(value))  # every value was validated first
            if not KHUGEPAGED_SLEEP_KNOBS.isdisjoint(msg.values):
                self.notify(SCAN_SLEEP_WAKE)
                self.notify(ALLOC_SLEEP_WAKE)
            elif not KHUGEPAGED_START_STOP_KNOBS.isdisjoint(msg.values):
                self.notify(ALLOC_SLEEP_WAKE)
        elif isinstance(msg, m.FileInfo):
            self._adopt_file(msg)
        elif isinstance(msg, m.Audit):
            self.send(audit(self, msg))
        elif isinstance(msg, m.Remap):
            self.send(m.Remapped(msg.req, tuple(self._remap(*row) for row in msg.rows)))
        elif isinstance(msg, m.PageQuery):
            self.send(procfs.page_info(self, msg))
        elif (req := getattr(msg, "req", None)) is not None:
            self.deliver_reply(req, msg)  # a reply to one of our requests
        self.flush()

    def pending_request(self, req: int) -> Message | None:
        """Our request ``req`` to the remapper, while it waits for the reply."""
        entry = self._calls.get(req)
        return entry[1] if entry is not None else None

    # -- losing and regaining the peer --------------------------------------------------------

    def peer_lost(self) -> None:
        """The remapper is gone, and every mapping and pin it held with it: drop their
        accounting, release the folio locks it held (waking whoever sleeps on them), answer
        whatever waited on it, forget its mm slots and write opens."""
        self.peer_epoch += 1
        self.cache.forget_mappings()
        for pid in list(self.khugepaged.slots):
            self.khugepaged.mm_exit(pid)
        locked, self.peer_locked = self.peer_locked, set()
        for head in sorted(locked):
            self.cache.unlock(head)
        # From here on a call to the remapper is answered at once (see Actor.go_offline): the
        # loop below finds nothing left waiting.
        self.go_offline(_answer_for_lost_peer)
        # An answered call may lead its task to the next one (collapse_file's Unmapped, then its
        # Retract): answer until nothing waits on the remapper, so nothing is left waiting for a
        # reply to a request the outbox is about to drop.
        for _ in range(_MAX_LOST_PEER_ROUNDS):
            if not self.pending_calls():
                break
            self.fail_calls(_answer_for_lost_peer)
        self.outbox.clear()

    def resync(self) -> None:
        """A remapper (new or back) is connected: tell it every file."""
        self.go_online()
        for f in list(self.cache.files.values()):
            self.send(m.FileInfo(f.ino, f.name, f.size, f.shmem, f.gen, f.fs))

    # -- file identities across restarts -------------------------------------------------------

    def _adopt_file(self, msg: m.FileInfo) -> None:
        """A remapper names a file it maps, by identity (ino, gen). The same identity here: known
        already. Otherwise the file is one of an earlier boot of ours (we restarted; the remapper
        outlived us): recreate it under that identity, empty, as its pages died with that boot.
        A file of this boot that took the number meanwhile moves to a fresh one first: no
        remapper knows it yet (its mirror of the number is the claimed file), so nothing maps
        it. A name taken meanwhile by a new file leaves the old one as ``NAME (deleted)``, as
        /proc shows a mapped file that was replaced."""
        cache = self.cache
        if msg.size < 0 or msg.ino <= 0:
            return
        f = cache.files.get(msg.ino)
        if f is not None and f.gen == msg.gen:
            return
        if f is not None:
            self._renumber(f)
        name = msg.name
        while name in cache.by_name:
            name += " (deleted)"
        cache.add_file(File(msg.ino, name, msg.size, msg.shmem, gen=msg.gen, fs=msg.fs))
        self.send(m.FileInfo(msg.ino, name, msg.size, msg.shmem, msg.gen, msg.fs))

    def _renumber(self, f: File) -> None:
        """Move ``f`` (a file no remapper knows) to a fresh inode number, its pages with it."""
        cache = self.cache
        new = cache.next_ino
        while new in cache.files:
            new += 1
        del cache.files[f.ino]
        f.ino = new
        cache.add_file(f)
        mem = self.mem
        for _, value in f.entries():
            if value > 0:
                mem.ino[value] = new
        self.send(m.FileInfo(f.ino, f.name, f.size, f.shmem, f.gen, f.fs))

    def _remap(self, pfn: int, ino: int, index: int, kind: int) -> bool:
        """A mapping a remapper restored from a snapshot names (see :class:`~shared.messages.Remap`):
        account it if its page is still the one cached there, unlocked."""
        mem = self.mem
        f = self.cache.files.get(ino)
        if f is None or index < 0 or f.get(index) != pfn or not mem.allocated(pfn):
            return False
        head = mem.head(pfn)
        if mem.flags[head] & PG_LOCKED:
            return False
        if kind == 0:
            self.cache.apply_rmap(((pfn, 1, 0, 0),))
        elif kind == 1:
            if pfn != head or not mem.pmd_mappable(head) or index % HPAGE_PMD_NR:
                return False
            self.cache.apply_rmap(((head, 0, 1, 0),))
        elif kind == 2:
            self.cache.apply_rmap(((pfn, 0, 0, 1),))
        else:
            return False
        return True

    def _punch_hole(self, msg: m.PunchHole) -> Generator[Any, Any, None]:
        """MADV_REMOVE's fallocate(PUNCH_HOLE), the same as a client's ``file punch``."""
        f = self.cache.files.get(msg.ino)
        if f is not None:
            yield from self.fileops.punch_hole(f.name, msg.offset, msg.length)
        self.send(m.Punched(msg.req))

    def _willneed(self, msg: m.WillNeed) -> None:
        """MADV_WILLNEED on a regular file: vfs_fadvise(POSIX_FADV_WILLNEED) ->
        force_page_cache_ra, which reads at most read_ahead_kb, or up to the device's io_pages
        when asked for more (ractl_max_pages), in small pages (do_page_cache_ra: ext4's minimum
        folio order is 0)."""
        f = self.cache.files.get(msg.ino)
        if f is not None and not f.shmem:
            ra_pages = self.knobs.read_ahead_kb * 1024 // PAGE_SIZE
            self._do_page_cache_ra(f, msg.index, min(msg.nr, max(ra_pages, IO_PAGES)))
        self.send(m.ReadAhead(msg.req))

    # -- fault lookups (filemap_fault / shmem_fault) ------------------------------------------

    def _after_unlock(self, attempt: Callable[[], int | None]) -> Generator[Any, Any, None]:
        """A lookup (or a batch) that met a locked page: the fault waits for the unlock, then
        ``attempt`` looks again (the page it waited for may be gone), until it answers."""
        epoch = self.peer_epoch
        while (locked := attempt()) is not None:
            yield Wait(("page", locked))
            if self.peer_epoch != epoch:
                return

    def lookup_page(self, msg: m.LookupPage) -> int | None:
        """One attempt at a fault lookup: answers and returns None, or returns the locked page
        the fault has to wait for (the common case answers without a task: faults are hot)."""
        answer = self.find_page(
            msg.ino, msg.index, msg.purpose, msg.write, msg.pmd_ok, msg.vm_hugepage, msg.around, msg.thp_ok,
            msg.exec_end, msg.rand_read, msg.seq_read,
        )
        if isinstance(answer, int):
            return answer
        status, pfn, head, thp, pmd, major, shmem, flat, allocated, order = answer
        around = m.around_pages(flat)
        self.send(m.PageAnswer(msg.req, status, pfn, head, thp, pmd, major, shmem, around, allocated, order))
        return None

    def lookup_pages(self, msg: m.LookupPages) -> int | None:
        """A batch of read faults, run in order as one step (see :class:`LookupPages`): each
        fault's fault-around is its window minus what is mapped by then, which the batch follows
        as the remapper's page table would. Answers and returns None; or, when the batch's first
        fault meets a locked page, changes nothing and returns that page, which the fault waits
        for, as one fault would (without a task in the common case, as :meth:`lookup_page`). A
        locked page behind other faults ends the batch there."""
        mapped = set(msg.present)
        out: list[int] = []
        ino, vm_hugepage, stop_at_sigbus = msg.ino, msg.vm_hugepage, msg.stop_at_sigbus
        faults = msg.faults
        done = len(faults) // 4  # unless the batch stops early
        # Most faults of a touch find their page mapped by an earlier one's fault-around: only
        # the index is read for them.
        for pos, index in enumerate(faults[0::4]):
            if index in mapped:
                continue
            lo, hi, flags = faults[4 * pos + 1 : 4 * pos + 4]
            around: Sequence[int] = ()
            if hi - lo > 1:
                around = list(filterfalse(mapped.__contains__, range(lo, hi)))
                around.remove(index)  # the fault's own page, not mapped (just checked)
            answer = self.find_page(
                ino, index, MAP, False, bool(flags & FAULT_PMD_OK), vm_hugepage, around, bool(flags & FAULT_THP_OK)
            )
            if isinstance(answer, int):
                if not pos:
                    return answer
                # The faults before it are done: answer them first, so that what they mapped
                # is mapped while this one sleeps; the remapper sends the rest again.
                self.send(m.PageAnswers(msg.req, pos, tuple(out)))
                return None
            status, pfn, head, thp, pmd, major, shmem, around_mapped, allocated, order = answer
            out += (
                pos,
                _STATUS_CODE[status],
                pfn,
                head,
                thp | pmd << 1 | major << 2 | shmem << 3 | allocated << 4 | order << m.ANSWER_ORDER_SHIFT,
                len(around_mapped) // 3,
            )
            out += around_mapped
            # A large folio may be mapped whole; a fault that failed made no page table.
            if order or status == _NOMEM or (stop_at_sigbus and status == _SIGBUS):
                done = pos + 1
                break
            if status == _OK:
                mapped.add(index)
            mapped.update(around_mapped[::3])  # past EOF too (do_read_fault)
        self.send(m.PageAnswers(msg.req, done, tuple(out)))
        return None

    def find_page(
        self,
        ino: int,
        index: int,
        purpose: str,
        write: bool,
        pmd_ok: bool,
        vm_hugepage: bool,
        around_indices: Sequence[int],
        thp_ok: bool,
        exec_end: int = 0,
        rand_read: bool = False,
        seq_read: bool = False,
    ) -> int | PageAnswerFields:
        """filemap_fault / shmem_fault for one lookup: the fields of its :class:`PageAnswer` after
        ``req`` (the mapping already accounted), or the locked page the fault must wait for.
        ``rand_read``/``seq_read``: the VMA's VM_RAND_READ/VM_SEQ_READ (readahead hints)."""
        mem = self.mem
        cache = self.cache
        f = cache.files.get(ino)
        if f is None:
            return _SIGBUS_ANSWER
        if index >= f.nr_pages_size:
            # do_read_fault: do_fault_around maps the window's cached pages below EOF before
            # ->fault (shmem_fault, filemap_fault) answers SIGBUS for the page itself.
            if not around_indices or purpose != MAP:
                return _SIGBUS_ANSWER
            return (_SIGBUS, 0, 0, False, False, False, f.shmem, self._fault_around(f, around_indices), False, 0)
        value = f.get(index)
        if value > 0 and mem.flags[mem.head(value)] & PG_LOCKED:
            return mem.head(value)
        # do_fault_around runs first: it maps what the cache holds around the fault.
        fault_around = bool(around_indices) and purpose == MAP
        reads = value == 0 and f.large_folio
        around = self._fault_around(f, around_indices) if fault_around and not reads else []
        major = allocated = False
        if value > 0:
            pfn = value
            # do_async_mmap_readahead: none under VM_RAND_READ (the mark stays).
            if f.large_folio and mem.flags[mem.head(value)] & PG_READAHEAD and not rand_read:
                self._async_mmap_readahead(f, index, value)
        elif value < 0:
            pfn = cache.add_small_page(f, index)
            if pfn:
                self.vm["pswpin"] += 1
            major = True
        elif f.shmem:
            # shmem_get_folio_gfp: the folio's size depends on the VMA and the page cache only
            # (pmd_ok implies thp_ok; an older remapper sends pmd_ok alone).
            pfn = self._shmem_alloc(f, index, thp_ok or pmd_ok, vm_hugepage)
            allocated = True
        elif f.large_folio:
            # The readahead runs before the page is looked up again, so the fault finds the
            # folio it made (filemap_fault: do_sync_mmap_readahead, then
            # __filemap_get_folio(FGP_CREAT) for a page readahead did not bring).
            self._sync_mmap_readahead(f, index, vm_hugepage, exec_end, rand_read, seq_read)
            pfn = f.get(index) or cache.add_small_page(f, index)
            major = True
            if fault_around:
                # The read dropped mmap_lock (maybe_unlock_mmap_for_io): VM_FAULT_RETRY, and the
                # retried fault's do_fault_around maps what readahead brought.
                around = self._fault_around(f, around_indices)
        else:
            pfn = cache.add_small_page(f, index)
            if pfn:
                self._read_around(f, index, vm_hugepage, bool(exec_end), rand_read, seq_read)
            major = True
        if not pfn:
            # Memory is full: VM_FAULT_OOM. The fault-around mappings go back with the answer
            # (the remapper maps nothing for a failed lookup).
            for around_pfn in around[1::3]:
                cache.apply_rmap(((around_pfn, -1, 0, 0),))
            return _NOMEM_ANSWER
        if major:
            self.vm["pgmajfault"] += 1
        head = mem.head(pfn)
        thp = mem.pmd_mappable(head)
        pmd = False
        if purpose == "map":
            # A regular file's THP is PMD-mapped only inside i_size (finish_fault, 6.18).
            if thp and pmd_ok and (f.shmem or mem.index[head] + HPAGE_PMD_NR <= f.nr_pages_size):
                pmd = True
                cache.apply_rmap(((head, 0, 1, 0),))
            else:
                cache.apply_rmap(((pfn, 1, 0, 0),))
            if write:
                cache.set_dirty(head)
        elif purpose == "pin":
            cache.apply_rmap(((pfn, 0, 0, 1),))
        return (_OK, pfn, head, thp, pmd, major, f.shmem, around, allocated, mem.order[head])

    def _fault_around(self, f: File, indices: Sequence[int]) -> list[int]:
        """filemap_map_pages: map the cached, uptodate, unlocked pages among ``indices`` that lie
        inside i_size (its window ends at the file's last page): index, pfn and 1 for a THP's
        subpage (else 0) of each, flat. The remapper maps the rest of a large folio itself
        (filemap_map_folio_range)."""
        mem = self.mem
        flags, mapcount, ref, orders = mem.flags, mem.mapcount, mem.ref, mem.order
        out: list[int] = []
        if not indices:
            return out
        eof = f.nr_pages_size
        if max(indices) >= eof:
            indices = [index for index in indices if index < eof]
            if not indices:
                return out
        # f.get and mem.head written out, a window's pages looked up in their xarray chunk
        # (one, unless the window straddles a 2 MiB boundary of the file), at once, in C.
        chunks = f.chunks
        key = min(indices) >> 9
        by_chunk = [(key, indices)] if max(indices) >> 9 == key else groupby(indices, lambda i: i >> 9)
        pmd_order = _PMD_ORDER_FLAG
        for key, pages in by_chunk:
            chunk = chunks.get(key)
            if chunk is None:
                continue
            group = list(pages)
            values = list(map(chunk.__getitem__, map(and_, group, repeat(HPAGE_PMD_NR - 1))))
            if min(values) <= 0:  # holes (or swap entries): the cached pages only
                cached = list(map(lt, repeat(0), values))
                group, values = list(compress(group, cached)), list(compress(values, cached))
                if not values:
                    continue
            if not any(map(orders.__getitem__, values)) and all(
                map(eq, map(and_, map(flags.__getitem__, values), repeat(_AROUND_FLAGS)), repeat(PG_UPTODATE))
            ):
                # The common case: every page small, uptodate, unlocked and without
                # PG_readahead, so each is mapped, its own head.
                for value in values:
                    mapcount[value] += 1
                    ref[value] += 1
                out += chain.from_iterable(zip(group, values, repeat(0)))
                continue
            for index, value in zip(group, values):
                head = value & ~((1 << orders[value]) - 1)
                page_flags = flags[head]
                if page_flags & (PG_LOCKED | PG_READAHEAD) or not page_flags & PG_UPTODATE:
                    continue
                # apply_rmap's row (value, 1, 0, 0): a PTE mapping and its reference on the head.
                mapcount[value] += 1
                ref[head] += 1
                out += (index, value, pmd_order[orders[head]])
        return out

    def _read_around(
        self, f: File, index: int, vm_hugepage: bool, exec_: bool, rand_read: bool, seq_read: bool
    ) -> None:
        """do_sync_mmap_readahead for a major fault on a regular file: with VM_HUGEPAGE two PMD
        ranges from the aligned index ("even if readahead is disabled"; one under VM_RAND_READ);
        nothing under VM_RAND_READ (but in a VM_EXEC VMA); under VM_SEQ_READ read_ahead_kb
        forward from the fault (page_cache_sync_ra); else read-around of read_ahead_kb centred on
        the fault. Pages arrive uptodate; the mmap_miss heuristic is not modelled."""
        if vm_hugepage:
            self._do_page_cache_ra(f, index & ~(HPAGE_PMD_NR - 1), HPAGE_PMD_NR << (not rand_read))
            return
        size = self.knobs.read_ahead_kb * 1024 // PAGE_SIZE
        if size <= 1 or (rand_read and not exec_):
            return
        self._do_page_cache_ra(f, index if seq_read else max(0, index - size // 2), size)

    def _do_page_cache_ra(self, f: File, start: int, nr: int) -> None:
        """do_page_cache_ra in small pages: read the pages of [start, start + nr) below EOF that
        the cache does not hold; no PG_readahead, file_ra_state untouched."""
        for i in range(start, min(start + nr, f.nr_pages_size)):
            if f.get(i) == 0 and not self.cache.add_small_page(f, i):
                return  # memory is full: readahead is best effort

    # -- readahead of a large-folio file (mm/filemap.c, mm/readahead.c, 6.18) -------------------
    # The ro-thp kind keeps the simpler _read_around: small pages, no PG_readahead.

    def _sync_mmap_readahead(
        self, f: File, index: int, vm_hugepage: bool, exec_end: int, rand_read: bool, seq_read: bool
    ) -> None:
        """do_sync_mmap_readahead for a page missing from a large-folio file: with VM_HUGEPAGE
        two PMD ranges from the aligned index in PMD-order folios, even with readahead off (one
        under VM_RAND_READ, which gets PG_readahead); nothing under VM_RAND_READ but in a
        VM_EXEC VMA; under VM_SEQ_READ
        page_cache_sync_ra(ra_pages): at index 0 a window of read_ahead_kb, all of it async
        (its first page gets PG_readahead), elsewhere read_ahead_kb forward from the fault
        (do_page_cache_ra: the cached run before it is shorter than the request, so the
        readahead state stays); in a VM_EXEC VMA forward from the fault to the VMA's end,
        read_ahead_kb at most, with no async part; else read_ahead_kb centred on the fault with
        its last quarter async. The mmap_miss heuristic (readahead off after 100 misses) is not
        modelled."""
        ra = f.ra
        ra_pages = self.knobs.read_ahead_kb * 1024 // PAGE_SIZE
        if vm_hugepage:
            # file_ra_state's start is left as it was (size, async_size and order are set); one
            # PMD range only under VM_RAND_READ.
            ra[1], ra[2] = HPAGE_PMD_NR << (not rand_read), HPAGE_PMD_NR
            self._page_cache_ra_order(f, index & ~(HPAGE_PMD_NR - 1), HPAGE_PMD_ORDER)
            return
        if (rand_read and not exec_end) or not ra_pages:
            return
        if seq_read:
            if index:
                self._do_page_cache_ra(f, index, ra_pages)
                return
            ra[0], ra[1], ra[2] = 0, ra_pages, ra_pages
        elif exec_end:
            ra[0] = index
            ra[1] = max(1, min(index + ra_pages, exec_end) - index)
            ra[2] = 0
        else:
            ra[0] = max(0, index - ra_pages // 2)
            ra[1], ra[2] = ra_pages, ra_pages // 4
        self._page_cache_ra_order(f, ra[0], 0)

    def _async_mmap_readahead(self, f: File, index: int, value: int) -> None:
        """do_async_mmap_readahead -> page_cache_async_ra: a fault found a PG_readahead folio.
        The mark goes; at the expected index the window moves on (ramped up), elsewhere it
        restarts after the next hole within read_ahead_kb; the next window's folios are two
        orders above the last window's (file_ra_state's order; small pages here below PMD
        order), its end aligned to them, all of it async."""
        ra_pages = self.knobs.read_ahead_kb * 1024 // PAGE_SIZE
        if not ra_pages:
            return  # the mark stays: readahead is off
        nr = self._ra_clear(f, index, value)
        ra = f.ra
        expected = (ra[0] + ra[1] - ra[2]) // nr * nr
        if index == expected:
            ra[0] += ra[1]
            ra[1] = max(ra[1], _next_ra_size(ra[1], ra_pages))
            ra[2] = ra[1]
        else:
            start = index + 1
            while start < index + 1 + ra_pages and f.get(start) > 0:
                start += 1
            if start - index > ra_pages:
                return
            ra[0] = start
            ra[1] = _next_ra_size(start - index + ra_pages, ra_pages)
            ra[2] = ra[1]
        order = ra[3] + 2
        align = 1 << min(order, (ra_pages & -ra_pages).bit_length() - 1)
        end = ra[0] + ra[1]
        aligned_end = end // align * align
        if aligned_end > ra[0]:
            ra[1] -= end - aligned_end
        ra[2] = ra[1]
        self._page_cache_ra_order(f, ra[0], order)

    def _page_cache_ra_order(self, f: File, start: int, order: int) -> None:
        """page_cache_ra_order over f.ra's size from ``start``, limited to i_size: naturally
        aligned folios of ``order`` (lower at an unaligned start and at EOF); the folio holding
        start + size - async_size gets PG_readahead. A PMD-order folio needs its whole range
        free of cached pages and a huge page; the first folio that cannot be added (-EEXIST,
        -ENOMEM) ends the loop and the rest is read in small pages (do_page_cache_ra, which
        skips cached pages and marks only a page it adds). Folios below PMD order are small
        pages here, marked together. No vmstat event: nr_file_hugepages only."""
        cache = self.cache
        size, async_size = f.ra[1], f.ra[2]
        limit = min(f.nr_pages_size, start + size) - 1
        mark = start + size - async_size
        new_order = min(HPAGE_PMD_ORDER, order, max(size, 1).bit_length() - 1)
        f.ra[3] = new_order
        index = start
        # Too small for large folios: straight to do_page_cache_ra.
        while size >= 4 and index <= limit:
            o = new_order
            if index & ((1 << o) - 1):
                o = (index & -index).bit_length() - 1
            while o > 0 and index + (1 << o) - 1 > limit:
                o -= 1
            nr = 1 << o
            if any(f.get(i) for i in range(index, index + nr)):
                break  # -EEXIST
            if o == HPAGE_PMD_ORDER:
                head = cache.alloc_huge(True)
                if not head:
                    break
                self.mem.flags[head] |= PG_UPTODATE
                cache.add_huge_page(f, index, head)
                cache.pages_read += HPAGE_PMD_NR
            else:
                for i in range(index, index + nr):
                    if not cache.add_small_page(f, i):
                        return  # memory is full: readahead is best effort
            if index <= mark < index + nr:
                self._ra_mark(f, index, nr)
            index += nr
        else:
            if size >= 4:
                return
        for i in range(index, min(start + size, f.nr_pages_size)):
            if f.get(i) == 0:
                if not cache.add_small_page(f, i):
                    return
                if i == mark:
                    self._ra_mark(f, i, 1)

    def _ra_mark(self, f: File, index: int, nr: int) -> None:
        """folio_set_readahead on the folio of ``nr`` pages at ``index``."""
        flags = self.mem.flags
        value = f.get(index)
        if nr == HPAGE_PMD_NR:
            flags[self.mem.head(value)] |= PG_READAHEAD
            return
        for i in range(index, index + nr):
            flags[f.get(i)] |= PG_READAHEAD
        if nr > 1:
            f.ra_marks[index] = nr

    def _ra_clear(self, f: File, index: int, value: int) -> int:
        """folio_clear_readahead on the folio holding ``index``; its size in pages."""
        mem = self.mem
        head = mem.head(value)
        if mem.folio_nr(head) > 1:
            mem.flags[head] &= ~PG_READAHEAD
            return mem.folio_nr(head)
        for start, nr in list(f.ra_marks.items()):
            if start <= index < start + nr:
                del f.ra_marks[start]
                for i in range(start, start + nr):
                    v = f.get(i)
                    if v > 0:
                        mem.flags[v] &= ~PG_READAHEAD
                return nr
        mem.flags[value] &= ~PG_READAHEAD
        return 1

    def _shmem_alloc(self, f: File, index: int, thp_ok: bool, vm_hugepage: bool) -> int:
        """shmem_get_folio_gfp for a hole: a PMD-order folio when the VMA allows one here
        (``thp_ok``: shmem_allowable_huge_orders, thp_vma_suitable_orders), shmem_enabled does,
        and no page of its range is cached (shmem_suitable_orders). 0 when memory is full."""
        start = index & ~(HPAGE_PMD_NR - 1)
        if thp_ok and shmem_huge_global_enabled(self.knobs, f.size, start, vm_hugepage):
            chunk = f.chunk(start)
            if chunk is None or not any(chunk):
                k = self.knobs
                direct = k.defrag == "always" or (k.defrag in ("madvise", "defer+madvise") and vm_hugepage)
                head = self.cache.alloc_huge(direct)
                if head:
                    self.mem.flags[head] |= PG_UPTODATE
                    self.cache.add_huge_page(f, start, head)
                    self.vm["thp_file_alloc"] += 1
                    return head + (index - start)
                self.vm["thp_file_fallback"] += 1
        return self.cache.add_small_page(f, index)

    def _lock_folio(self, msg: m.LockFolio) -> Generator[Any, Any, None]:
        """folio_lock for the remapper's collapse_pte_mapped_thp: sleep until the folio at the
        index is ours, answer its head and order (0, 0 when the index holds no page any more)."""
        mem = self.mem
        epoch = self.peer_epoch
        while True:
            f = self.cache.files.get(msg.ino)
            value = f.get(msg.index) if f is not None else 0
            if value <= 0:
                self.send(m.FolioAnswer(msg.req, 0, 0))
                return
            head = mem.head(value)
            if self.cache.trylock(head):
                break
            yield Wait(("page", head))
            if self.peer_epoch != epoch:
                return
        self.peer_locked.add(head)
        self.send(m.FolioAnswer(msg.req, head, mem.order[head]))

    # -- reports ------------------------------------------------------------------------------

    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo's lines the model has, in kB (:func:`collapsed.procfs.meminfo`)."""
        return procfs.meminfo(self)

    def vmstat(self) -> dict[str, int]:
        """This side's /proc/vmstat lines (:func:`collapsed.procfs.vmstat`)."""
        return procfs.vmstat(self)


def _next_ra_size(cur: int, max_pages: int) -> int:
    """get_next_ra_size (mm/readahead.c): ramp a readahead window up towards max_pages."""
    if cur < max_pages // 16:
        return 4 * cur
    if cur <= max_pages // 2:
        return 2 * cur
    return max_pages


def _answer_for_lost_peer(request: Message) -> Message:
    """What a request to a remapper that is gone resolves to: nothing was mapped any more."""
    if isinstance(request, m.UnmapMapping):
        return m.Unmapped(request.req)
    if isinstance(request, m.Retract):
        return m.Retracted(request.req, 0, 0, 0, 0)
    if isinstance(request, m.CollapsePteMapped):
        return m.CollapsePteMappedResult(request.req, ScanResult.SCAN_ANY_PROCESS)
    if isinstance(request, m.VisitMm):
        return m.VisitMmDone(request.req)
    raise TypeError(f"no answer for {request!r}")
