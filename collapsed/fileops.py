"""The collapser's file operations: create, write, sync/writeback, truncate and punch-hole (with
the unmap they need), the read-only-THP drop of an open for write, drop_caches, and reclaim for
MADV_PAGEOUT."""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np

from collapsed.pagecache import (
    PG_DIRTY,
    PG_LOCKED,
    PG_WRITEBACK,
    File,
    PageCache,
)
from shared import messages as m
from shared.actor import Actor, Call, Sleep, Wait
from shared.errors import UserError
from shared.knobs import Knobs
from shared.units import HPAGE_PMD_NR, MAX_LFS_FILESIZE, PAGE_SHIFT, PAGE_SIZE, pages
from shared.vm import DEFAULT_FS, FsKind

# NAME_MAX.
_MAX_NAME = 255
# Past every page index: the end of unmap_mapping_range(holebegin, 0) and of truncation to -1.
_END = pages(MAX_LFS_FILESIZE) + 1


def file_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a file here, or None. One rule for the names clients create and
    the names a remapper reports back after a restart (which must have passed it)."""
    if not name:
        return "empty"
    if len(name) > _MAX_NAME:
        return f"longer than {_MAX_NAME} characters"
    if name in (".", ".."):
        return "a directory entry"
    for bad in ("/", "\0", "\n"):
        if bad in name:
            return f"contains {bad!r}"
    return None


def _check_new_size(size: int) -> None:
    """inode_newsize_ok for truncate(2) (and the size a new file is created with): EINVAL for a
    negative size, EFBIG past s_maxbytes (MAX_LFS_FILESIZE)."""
    if size < 0:
        raise UserError("EINVAL", "size must not be negative")
    if size > MAX_LFS_FILESIZE:
        raise UserError("EFBIG", f"size {size} is larger than {MAX_LFS_FILESIZE}")


class FileOps:
    """write(2), truncate(2), fallocate(PUNCH_HOLE), writeback, drop_caches, reclaim.

    Works on ``cache`` and owns the writeback queue. ``actor`` is the runtime it runs in: its clock
    (writeback ends ``writeback_millisecs`` later, in a task), its outbox (a file's size goes to the
    remapper) and its request ids (unmapping is a request to the remapper). ``vm`` is the actor's
    vmstat event counters (splits, swap-outs).
    """

    def __init__(
        self, actor: Actor, cache: PageCache, knobs: Knobs, vm: Counter[str], resched_pages: int | None = None
    ) -> None:
        self.actor = actor
        self.cache = cache
        self.knobs = knobs
        self.vm = vm
        self.writeback: list[tuple[float, int]] = []  # (done at, head pfn)
        # cond_resched: the long loops (write, truncate, punch, drop_caches, reclaim) give the CPU
        # away after this many pages (None: never, a request runs to its end in one go).
        self.resched_pages = resched_pages

    # -- file operations (client requests) ----------------------------------------------------

    def create(self, name: str, size: int, shmem: bool, fs: FsKind = DEFAULT_FS) -> dict[str, Any]:
        problem = file_name_problem(name)
        if problem is not None:
            shown = name if len(name) <= 64 else name[:61] + "..."
            raise UserError("EINVAL", f"bad file name {shown!r}: {problem}")
        if name in self.cache.by_name:
            raise UserError("EEXIST", f"file {name!r} exists")
        _check_new_size(size)  # creat(2) then ftruncate(2) to the size
        f = File(self.cache.next_ino, name, size, shmem, fs=FsKind(fs))
        self.cache.add_file(f)
        self.actor.send(m.FileInfo(f.ino, name, size, shmem, f.gen, f.fs))
        return self.stat(f)

    def lookup(self, name: str) -> File:
        f = self.cache.by_name.get(name)
        if f is None:
            raise UserError("ENOENT", f"no file {name!r}")
        return f

    def stat(self, f: File) -> dict[str, Any]:
        mem = self.cache.mem
        return {
            "name": f.name,
            "ino": f.ino,
            "size": f.size,
            "shmem": f.shmem,
            "fs": "" if f.shmem else str(f.fs),
            "nrpages": f.nrpages,
            "thps": f.nr_thps,
            "swap": f.nrswap,
            "dirty": sum(1 for _, v in f.entries() if v > 0 and mem.flags[mem.head(v)] & PG_DIRTY),
            "open_for_write": f.writecount,
        }

    def ls(self) -> list[dict[str, Any]]:
        return [self.stat(f) for f in sorted(self.cache.files.values(), key=lambda f: f.name)]

    def write(self, name: str, offset: int, length: int) -> Generator[Any, Any, dict[str, Any]]:
        """write(2), as generic_perform_write under the inode lock: page by page, dirty the page,
        allocating a missing one (a shmem swap entry is read back in); i_size grows with what
        has been written.

        When memory runs out the write ends short, as the kernel's does, keeping what it wrote:
        the result's ``written`` (the bytes that went in) says so, and the write fails with
        ENOMEM only if nothing did.
        """
        f = self.lookup(name)
        if offset < 0 or length < 0:
            raise UserError("EINVAL", "offset and length must not be negative")
        if offset + length > MAX_LFS_FILESIZE:
            # rw_verify_area: pos + count overflows loff_t. (generic_write_check_limits' EFBIG
            # for pos >= s_maxbytes is never reached first: s_maxbytes is MAX_LFS_FILESIZE here.)
            raise UserError("EINVAL", f"the range [{offset}, {offset + length}) passes {MAX_LFS_FILESIZE}")
        if length == 0:
            return {**self.stat(f), "written": 0}
        cache = self.cache
        yield from cache.inode_lock(f)
        try:
            done = yield from self._perform_write(f, offset, offset + length)
        except Exception:
            cache.inode_unlock(f)
            raise
        cache.inode_unlock(f)
        if done <= offset:
            raise UserError("ENOMEM", f"no memory for the page at {offset // PAGE_SIZE * PAGE_SIZE}")
        return {**self.stat(f), "written": done - offset}

    def _perform_write(self, f: File, offset: int, end: int) -> Generator[Any, Any, int]:
        """The page loop of generic_perform_write; returns where the written bytes end."""
        cache = self.cache
        mem = cache.mem
        index = offset >> PAGE_SHIFT
        last = pages(end)
        chunk = self.resched_pages or last
        while True:
            stop = min(last, index + chunk)
            while index < stop:
                value = f.get(index)
                if value > 0:
                    head = mem.head(value)
                    if mem.flags[head] & PG_LOCKED:
                        # i_size covers what is written before anyone else runs (generic_write_end
                        # moves it page by page).
                        self._grow(f, offset, min(end, index << PAGE_SHIFT))
                        yield Wait(("page", head))
                        continue
                    cache.set_dirty(head)
                elif f.large_folio and self._write_begin_pmd(f, index, offset, end):
                    index += HPAGE_PMD_NR
                    continue
                elif not cache.add_small_page(f, index, dirty=True):
                    last = index  # memory is full: the write ends here
                    break
                index += 1
            if index >= last:
                break
            # cond_resched(), between two pages: no page lock is held and i_size covers what is
            # written, so whatever runs now sees the file as if the write were sleeping on a
            # page lock here (faults, khugepaged, the remapper may; another write, truncate or
            # punch of this file waits for the inode lock).
            self._grow(f, offset, min(end, index << PAGE_SHIFT))
            yield Sleep(self.actor.now)
        done = min(end, index << PAGE_SHIFT)
        self._grow(f, offset, done)
        return done

    def _write_begin_pmd(self, f: File, index: int, offset: int, end: int) -> bool:
        """A large-folio filesystem's write_begin for a missing page: generic_perform_write
        writes in chunks of the largest folio size and asks __filemap_get_folio for a folio of
        the chunk's order (fgf_set_order), so a write that covers a whole, PMD-aligned 2 MiB
        with nothing cached there gets one dirty PMD-order folio. Smaller orders (a shorter or
        unaligned chunk) are not modelled: small pages. False when this is not such a chunk or
        no huge page is free (the kernel then tries smaller orders)."""
        pos = index << PAGE_SHIFT
        if index & (HPAGE_PMD_NR - 1) or pos < offset or end - pos < HPAGE_PMD_NR << PAGE_SHIFT:
            return False
        chunk = f.chunk(index)
        if chunk is not None and any(chunk):
            return False
        cache = self.cache
        head = cache.alloc_huge(True)
        if not head:
            return False
        cache.add_huge_page(f, index, head)
        cache.set_dirty(head)
        return True

    def _grow(self, f: File, offset: int, done: int) -> None:
        """i_size_write when the write from ``offset`` has written up to ``done``, past the end."""
        if done > offset and done > f.size:
            self._set_size(f, done)

    def sync(self, name: str) -> dict[str, Any]:
        f = self.lookup(name)
        self.start_writeback(f)
        return self.stat(f)

    def truncate(self, name: str, size: int) -> Generator[Any, Any, dict[str, Any]]:
        """truncate(2): unmap from the new EOF on, then drop the pages there, splitting a large
        folio the new EOF cuts. A shmem file does this whenever the size does not grow, to the
        same size too (shmem_setattr -> shmem_truncate_range(newsize, -1)), so a THP across EOF
        is split even then; a regular file only when it shrinks (truncate_pagecache)."""
        f = self.lookup(name)
        _check_new_size(size)
        yield from self.cache.inode_lock(f)
        try:
            old = f.size
            self._set_size(f, size)
            if size < old or (f.shmem and size == old):
                holebegin = pages(size)
                if old > holebegin << PAGE_SHIFT:
                    # unmap_mapping_range(holebegin, 0, even_cows=1): everything from there on.
                    yield from self.unmap_range(f, holebegin, _END, (), even_cows=True)
                yield from self.undo_range(f, size, None)
        except Exception:
            self.cache.inode_unlock(f)
            raise
        self.cache.inode_unlock(f)
        return self.stat(f)

    def punch_hole(self, name: str, offset: int, length: int) -> Generator[Any, Any, dict[str, Any]]:
        """fallocate(FALLOC_FL_PUNCH_HOLE): drop the pages in the range, zero (and split a large
        folio at) a partial page at either end; i_size stays.

        shmem (shmem_fallocate): unmap the whole pages of the range with even_cows=0, so private
        CoW copies stay mapped, and neither the unmap nor the truncation is clipped to i_size (a
        PMD over a THP that reaches past EOF is zapped whole, never split). A regular file's punch
        is clipped to the end of the page holding EOF and also unmaps CoW copies
        (truncate_pagecache_range). A shmem hole that ends inside the first page unmaps the file
        from its first whole page to the end (the unsigned wrap above, seen on 6.18)."""
        f = self.lookup(name)
        if offset < 0 or length <= 0:
            raise UserError("EINVAL", "punch needs a non-negative offset and a positive length")
        if offset + length > MAX_LFS_FILESIZE:
            # vfs_fallocate: offset + len past s_maxbytes (or wrapping through zero).
            raise UserError("EFBIG", f"the range [{offset}, {offset + length}) passes {MAX_LFS_FILESIZE}")
        yield from self.cache.inode_lock(f)
        try:
            end = offset + length
            if not f.shmem:
                end = min(end, f.nr_pages_size << PAGE_SHIFT)  # ext4_punch_hole: to EOF's page end
            start, stop = pages(offset), end >> PAGE_SHIFT
            if f.shmem and stop == 0:
                # A hole ending inside page 0: shmem_fallocate's unmap_end, round_down(end) - 1,
                # is -1 and passes its unsigned test; unmap_mapping_range then gets a length of
                # 0 or below, which unmap_mapping_pages takes as "to the end of the file".
                stop = _END
            if start < stop:
                yield from self.unmap_range(f, start, stop, (), even_cows=not f.shmem)
            if offset < end:
                yield from self.undo_range(f, offset, end - 1)
        except Exception:
            self.cache.inode_unlock(f)
            raise
        self.cache.inode_unlock(f)
        return self.stat(f)

    def _set_size(self, f: File, size: int) -> None:
        f.size = size
        self.actor.send(m.FileInfo(f.ino, f.name, size, f.shmem, f.gen, f.fs))

    # -- writeback ----------------------------------------------------------------------------

    def start_writeback(self, f: File) -> None:
        """filemap_flush: dirty pages of a regular file go under writeback (clean when it ends)."""
        if f.shmem:
            return
        mem = self.cache.mem
        flags = mem.flags
        done = self.actor.now + self.knobs.writeback_millisecs
        queued = len(self.writeback)
        mapped = []
        for index, value in list(f.entries()):
            head = mem.head(value) if value > 0 else 0
            # A locked page is being truncated or collapsed: writeback leaves it to its owner.
            if head and flags[head] & PG_DIRTY and not flags[head] & (PG_WRITEBACK | PG_LOCKED):
                flags[head] = (flags[head] & ~PG_DIRTY) | PG_WRITEBACK
                self.writeback.append((done, head))
                if mem.total_mapcount(head):
                    mapped.append(index)
        if mapped:
            # folio_mkclean: the mapping PTEs go read-only, so a later write faults and re-dirties.
            self.actor.send(m.Mkclean(f.ino, tuple(mapped)))
        # One task per batch that started now; a sync with nothing dirty starts none.
        if len(self.writeback) > queued:
            self.actor.spawn(self._end_writeback(done), name="writeback")

    def _end_writeback(self, until: float) -> Generator[Any, Any, None]:
        yield Sleep(until)
        actor = self.actor
        flags = self.cache.mem.flags
        still = []
        for done, head in self.writeback:
            if done <= actor.now:
                flags[head] &= ~PG_WRITEBACK
                actor.notify(("writeback", head))
            else:
                still.append((done, head))
        self.writeback = still

    # -- opens for write ----------------------------------------------------------------------

    def write_open(self, ino: int, delta: int) -> None:
        """i_writecount moves by ``delta``. The first open for write of a regular file holding
        read-only THPs drops its whole cache (do_dentry_open on filemap_nr_thps: unmap_mapping_range
        and truncate_inode_pages), so no THP is ever written through."""
        f = self.cache.files.get(ino)
        if f is None:
            return
        f.writecount += delta
        if delta > 0 and f.writecount == delta and f.nr_thps and not f.shmem:
            self.actor.spawn(self._drop_for_write(f), name="drop_for_write")

    def _drop_for_write(self, f: File) -> Generator[Any, Any, None]:
        if f.chunks:
            yield from self.truncate_range(f, 0, (max(f.chunks) + 1) * HPAGE_PMD_NR, even_cows=False)

    # -- truncate_inode_pages_range -----------------------------------------------------------

    def truncate_range(self, f: File, start: int, end: int, even_cows: bool = True) -> Generator[Any, Any, None]:
        """truncate_inode_pages_range on the whole pages [start, end), after unmap_mapping_range."""
        yield from self.unmap_range(f, start, end, (), even_cows=even_cows)
        yield from self.undo_range(f, start << PAGE_SHIFT, (end << PAGE_SHIFT) - 1)

    def undo_range(self, f: File, lstart: int, lend: int | None) -> Generator[Any, Any, None]:
        """shmem_undo_range / truncate_inode_pages_range on the bytes [lstart, lend] (``lend``
        None: -1, to the end): first the folios holding the first and the last byte, through
        truncate_inode_partial_folio (which splits a large one there), then every folio between.
        A folio that would not split narrows the range, as the kernel's ``start``/``end``."""
        mem = self.cache.mem
        first = lstart >> PAGE_SHIFT
        start = pages(lstart)
        end = _END if lend is None else (lend + 1) >> PAGE_SHIFT
        # lend -1 is signed: its page index is -1, and any folio ends after it.
        same_folio = lend is not None and first == lend >> PAGE_SHIFT
        head = yield from self._lock_folio_at(f, first)
        if head:
            index, nr = mem.index[head], mem.folio_nr(head)
            same_folio = lend is None or lend < (index + nr) << PAGE_SHIFT
            if not (yield from self._partial_folio(f, head, lstart, lend)):
                start = index + nr
                if same_folio:
                    end = index
        if not same_folio and lend is not None:
            head = yield from self._lock_folio_at(f, lend >> PAGE_SHIFT)
            if head:
                index = mem.index[head]
                if not (yield from self._partial_folio(f, head, lstart, lend)):
                    end = index
        if start < end:
            yield from self._whole_folios(f, start, end, lstart, lend)

    def _lock_folio_at(self, f: File, index: int) -> Generator[Any, Any, int]:
        """The folio holding page ``index``, locked once writeback has ended (shmem_get_partial_folio,
        __filemap_get_folio(FGP_LOCK)); 0 when there is none (a hole or a swap entry)."""
        cache = self.cache
        mem = cache.mem
        while True:
            value = f.get(index)
            if value <= 0:
                return 0
            head = mem.head(value)
            if mem.flags[head] & PG_WRITEBACK:
                yield Wait(("writeback", head))
                continue
            yield from cache.lock(head)
            if f.get(index) == value and mem.head(value) == head:
                return head
            cache.unlock(head)

    def _partial_folio(self, f: File, head: int, lstart: int, lend: int | None) -> Generator[Any, Any, bool]:
        """truncate_inode_partial_folio on the locked folio ``head``, which it unlocks: a folio
        wholly inside [lstart, lend] goes; a small one is only zeroed; a large one is split at the
        page holding ``lstart`` (or its first page), then the folio holding the page just past
        ``lend`` is split there too. False when the first split failed (the folio is pinned): it
        stays whole (shmem's is dirty)."""
        mem = self.cache.mem
        pos = mem.index[head] << PAGE_SHIFT
        nr = mem.folio_nr(head)
        size = nr << PAGE_SHIFT
        offset = max(0, lstart - pos)
        length = size - offset if lend is None or pos + size <= lend else lend + 1 - pos - offset
        if length == size:
            yield from self._truncate_folio(f, head)
            return True
        cache = self.cache
        if nr > 1:
            if not (yield from self._split_or_unmap(f, head, head + (offset >> PAGE_SHIFT))):
                if not f.shmem and not mem.flags[head] & PG_DIRTY:
                    # A clean folio that would not split leaves the cache whole (its pages
                    # outside the range are read again when needed).
                    yield from self._truncate_folio(f, head)
                    return True
                cache.unlock(head)
                return False
            if offset + length < size:
                # Split again where the range ends, so that the folios inside it can go.
                at = head + ((offset + length) >> PAGE_SHIFT)
                head2 = mem.head(at)
                if mem.folio_nr(head2) > 1 and cache.trylock(head2):
                    yield from self._split_or_unmap(f, head2, at)
                    cache.unlock(head2)
        cache.unlock(head)
        return True

    def _split_or_unmap(self, f: File, head: int, at: int) -> Generator[Any, Any, bool]:
        """try_folio_split_or_unmap (mm/truncate.c, 6.18): a regular file's folio that would not
        split is unmapped, so that it is faulted again with PTEs that respect i_size (shmem's
        keeps its mappings, PMDs across i_size included)."""
        if (yield from self.split_folio(f, head, at)):
            return True
        if not f.shmem:
            yield from self._unmap_folio(f, head)
        return False

    def _unmap_folio(self, f: File, head: int) -> Generator[Any, Any, None]:
        """try_to_unmap: every mapping of the folio's pages (not the CoW copies of them)."""
        mem = self.cache.mem
        lo, nr = mem.index[head], mem.folio_nr(head)
        if mem.total_mapcount(head):
            yield from self.unmap_range(f, lo, lo + nr, range(head, head + nr), even_cows=False)

    def _truncate_folio(self, f: File, head: int) -> Generator[Any, Any, None]:
        """truncate_inode_folio on a locked folio: truncate_cleanup_folio unmaps it if a fault
        mapped it again after the range's unmap (with the folio locked no new mapping can
        appear, so this unmap is the last), then it leaves the cache and is unlocked."""
        mem = self.cache.mem
        if mem.total_mapcount(head):
            lo = mem.index[head]
            yield from self.unmap_range(f, lo, lo + mem.folio_nr(head), (), even_cows=False)
        self.cache.remove_page(f, head)
        self.cache.unlock(head)

    def _whole_folios(
        self, f: File, start: int, end: int, lstart: int, lend: int | None
    ) -> Generator[Any, Any, None]:
        """The loop over [start, end): swap entries are freed, folios truncated; a large folio
        across either end goes through truncate_inode_partial_folio, and after a split the loop
        starts again to pick up the new folios (shmem_undo_range's ``index = start``)."""
        cache = self.cache
        mem = cache.mem
        kept: set[int] = set()  # folios that would not split: one attempt each
        resched = self.resched_pages or -1
        left = resched
        again = True
        while again:
            again = False
            for index, value in list(f.entries(start, end)):
                if not left:
                    left = resched
                    # cond_resched(), between two entries and outside every page lock: each entry
                    # is looked at afresh below, as after the writeback and page-lock sleeps.
                    yield Sleep(self.actor.now)
                left -= 1
                if f.get(index) != value:
                    continue  # went with a folio removed earlier in this loop, or changed meanwhile
                if value < 0:
                    cache.free_swap_entry(f, index)
                    continue
                head = mem.head(value)
                if head in kept:
                    continue
                # Truncate waits for writeback to end (outside the page lock, so the model is
                # never quiet with a page locked), then locks the folio.
                while mem.flags[head] & PG_WRITEBACK and f.get(index) == value and mem.head(value) == head:
                    yield Wait(("writeback", head))
                if f.get(index) != value or mem.head(value) != head:
                    continue
                yield from cache.lock(head)
                if f.get(index) != value or mem.head(value) != head:
                    cache.unlock(head)
                    continue
                first = mem.index[head]
                nr = mem.folio_nr(head)
                if first >= start and first + nr <= end:
                    yield from self._truncate_folio(f, head)
                    continue
                if (yield from self._partial_folio(f, head, lstart, lend)):
                    again = True
                    break
                kept.add(head)

    def split_folio(self, f: File, head: int, at: int) -> Generator[Any, Any, bool]:
        """try_folio_split on the locked folio ``head``: unless something but the page cache and
        the mappings holds it (can_split_folio, checked before the unmap and again after),
        unmap_folio (try_to_unmap with TTU_SPLIT_HUGE_PMD: a PMD mapping is split, which for a
        file folio just clears it; file folios are not remapped after), then split. shmem splits non-uniformly at ``at`` (__split_unmapped_folio), leaving
        large folios of every order below; a regular file's folio without large-folio support
        splits to base pages (non_uniform_split_supported). New folios but the first are
        unlocked. thp_split_page and thp_split_page_failed count PMD-order folios only."""
        mem = self.cache.mem
        nr = mem.folio_nr(head)
        if self._release_refused(f, head) or mem.ref[head] != nr + mem.total_mapcount(head):
            # filemap_release_folio and can_split_folio's racy check run before unmap_folio: a
            # folio that fails them keeps its mappings.
            return self._split(f, head, at)
        yield from self._unmap_folio(f, head)
        return self._split(f, head, at if f.shmem else None)

    def _release_refused(self, f: File, head: int) -> bool:
        """__folio_split's filemap_release_folio fails (-EBUSY): a large-folio file's folio that
        was written has buffer heads, which try_to_free_buffers will not free while they are
        dirty or under writeback (ext4 on 6.18: a written 2 MiB folio stays whole at a
        truncate inside it, its pages past EOF cached)."""
        return f.large_folio and bool(self.cache.mem.flags[head] & (PG_DIRTY | PG_WRITEBACK))

    def _split(self, f: File, head: int, at: int | None) -> bool:
        mem = self.cache.mem
        nr = mem.folio_nr(head)
        pmd_order = nr == HPAGE_PMD_NR
        if (
            self._release_refused(f, head)
            or mem.ref[head] != nr
            or mem.entire.get(head)
            or any(mem.mapcount[head : head + nr])
        ):
            if pmd_order:
                self.vm["thp_split_page_failed"] += 1
            return False
        # A folio still in the per-CPU add batch reaches the LRU first: the batch names only the
        # head, so the new folios would otherwise stay off the LRU for good (lru_add_split_folio).
        self.cache.lru_add_drain()
        pieces = mem.split_folio(head, at)
        eof = f.nr_pages_size
        for new, _ in pieces:
            if new == head:
                continue
            if mem.index[new] >= eof:
                # __folio_split: a new folio wholly past EOF leaves the page cache at once.
                self.cache.remove_page(f, new)
            self.cache.unlock(new)
        if pmd_order:
            f.nr_thps -= 1
            self.vm["thp_split_page"] += 1
        return True

    def split_thp(self, f: File, head: int) -> bool:
        """split_huge_page on an unmapped, locked folio: base pages, each with its own cache
        reference; the caller unlocks ``head``. Fails while anything but the cache holds a
        reference, as can_split_folio does."""
        return self._split(f, head, None)

    def unmap_range(
        self, f: File, start: int, end: int, pfns: Sequence[int] | np.ndarray, even_cows: bool
    ) -> Generator[Any, Any, None]:
        """Ask the remapper to zap mappings of [start, end) (``unmap_mapping_range``), or only
        those of ``pfns`` (``try_to_unmap``), and wait until it has."""
        packed = np.asarray(pfns, dtype=np.dtype(m.RMAP_PFN)).tobytes()
        yield Call(m.UnmapMapping(self.actor.new_req(), f.ino, start, end, packed, even_cows))

    # -- reclaim ------------------------------------------------------------------------------

    def drop_caches(self) -> Generator[Any, Any, dict[str, int]]:
        """echo 1 > drop_caches: evict clean, unmapped, unlocked, unpinned page-cache pages."""
        cache = self.cache
        cache.lru_add_drain()
        mem = cache.mem
        dropped = 0
        resched = self.resched_pages or -1
        left = resched
        for f in list(cache.files.values()):
            for index, value in list(f.entries()):
                if not left:
                    left = resched
                    # cond_resched(): nothing is held; the entry is looked at afresh below.
                    yield Sleep(self.actor.now)
                left -= 1
                if value <= 0 or f.get(index) != value:
                    continue
                head = mem.head(value)
                if not mem.allocated(head) or mem.ino[head] != f.ino:
                    continue
                cache_refs = mem.folio_nr(head)
                if f.shmem or mem.flags[head] & (PG_DIRTY | PG_WRITEBACK | PG_LOCKED):
                    continue
                if mem.ref[head] != cache_refs:
                    continue  # mapped or pinned: invalidate_mapping_pages leaves it
                dropped += cache_refs
                cache.remove_page(f, head)
        return {"dropped_pages": dropped}

    def reclaim(self, pfns: tuple[int, ...], split: tuple[int, ...] = ()) -> Generator[Any, Any, None]:
        """MADV_PAGEOUT's reclaim_pages -> shrink_folio_list (mm/vmscan.c) of pages and folios
        the remapper unmapped. A clean page (a shmem hole a read fault filled) is dropped
        (__remove_mapping), a large folio whole. A dirty shmem folio goes to swap
        (shmem_writeout, split to pages here) or, with no swap device, is re-dirtied and stays
        in the cache; a dirty regular-file page is written back. First the folios of ``split``
        are split (madvise's split_folio of a folio the range covers in part)."""
        cache = self.cache
        mem = cache.mem
        for head in split:
            if not mem.allocated(head) or mem.head(head) != head or mem.folio_nr(head) == 1:
                continue
            f = cache.files.get(mem.ino[head])
            if f is None or not cache.trylock(head):
                continue
            self.split_thp(f, head)  # unlocks the new folios, not head
            cache.unlock(head)
        resched = self.resched_pages or -1
        left = resched
        for pfn in pfns:
            if not left:
                left = resched
                # cond_resched(): nothing is held; each page is looked at afresh below.
                yield Sleep(self.actor.now)
            left -= 1
            if not mem.allocated(pfn):
                continue
            head = mem.head(pfn)
            f = cache.files.get(mem.ino[head])
            if f is None or mem.flags[head] & (PG_LOCKED | PG_WRITEBACK):
                continue
            cache_refs = mem.folio_nr(head)
            if mem.ref[head] != cache_refs:
                continue
            if cache_refs > 1:
                if not f.shmem:
                    continue  # a read-only file THP is dropped whole by drop_caches, not pageout
                if not mem.flags[head] & PG_DIRTY:
                    cache.remove_page(f, head)
                    continue
                if not self.knobs.swap:
                    continue  # shmem_writeout without swap: redirty, before any split
                cache.trylock(head)
                if not self.split_thp(f, head):
                    cache.unlock(head)
                    continue
                cache.unlock(head)
                subs = list(range(head, head + cache_refs))
            else:
                subs = [head]
            for sub in subs:
                self._reclaim_small(f, sub)

    def _reclaim_small(self, f: File, pfn: int) -> None:
        if not self.cache.mem.flags[pfn] & PG_DIRTY:
            self.cache.remove_page(f, pfn)
        elif not f.shmem:
            self.start_writeback(f)
        elif self.knobs.swap:
            self.cache.swap_out(f, pfn)
            self.vm["pswpout"] += 1
