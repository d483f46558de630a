"""Losing the remapper while it holds a folio lock (issue 14, item 5).

``collapse_pte_mapped_thp`` runs on the remapper between its ``LockFolio`` (answered by
``FolioAnswer`` with the folio locked) and its ``UnlockFolio``. If the remapper dies in between,
the collapser must release that lock in ``peer_lost()``, waking whoever sleeps on it: before the
fix a fault on the page and ``file truncate f 0`` waited for good and the checker reported the
page left locked.
"""

from __future__ import annotations

from helpers import FIXED, H, P, make_file_thp

from collapsed.pagecache import PG_LOCKED
from shared import messages as m
from shared.scan_result import ScanResult as R


def _lock_for_remapper(world, name: str, index: int) -> int:
    """Deliver a LockFolio by hand, as the remapper's collapse_pte_mapped_thp sends it, and lose
    the answer on its way (the remapper dies before reading it). Returns the locked head."""
    c = world.collapser
    c.deliver(m.LockFolio(10_000, c.by_name[name].ino, index))
    answer = c.outbox.pop()
    assert isinstance(answer, m.FolioAnswer) and answer.req == 10_000 and answer.pfn
    assert c.mem.flags[answer.pfn] & PG_LOCKED
    return answer.pfn


def test_restart_releases_a_folio_locked_for_the_remapper(world):
    head = make_file_thp(world, "lib")
    world._checking = False  # the lock is held on purpose until the restart
    assert _lock_for_remapper(world, "lib", 0) == head
    world.spawn(1)
    addr = world.mmap(1, FIXED, H, "lib")
    fault = world.start(world.remapper, world.remapper.fault(1, addr + 5 * P))
    truncate = world.start(world.collapser, world.collapser.file_truncate("lib", 0))
    world.advance(10_000)
    assert not fault.done and not truncate.done  # both sleep on the folio lock

    world.restart_remapper()
    world._checking = True
    assert not world.collapser.mem.flags[head] & PG_LOCKED
    assert truncate.done and truncate.result()["nrpages"] == 0
    assert world.collapser.peer_locked == set()
    world.check()


def test_after_the_restart_a_fault_maps_the_released_folio(world):
    head = make_file_thp(world, "lib")
    world._checking = False
    _lock_for_remapper(world, "lib", 7)
    world.restart_remapper()
    world._checking = True
    world.check()
    world.spawn(1)
    addr = world.mmap(1, FIXED, H, "lib")
    assert world.fault(1, addr + 7 * P) in ("minor", "pmd")
    # The page lock is free for the new remapper's own collapse_pte_mapped_thp.
    world.madvise(1, addr, H, "hugepage")
    assert world.madvise(1, addr, H, "collapse") == 0
    assert world.smaps(1)[0]["FilePmdMapped"] == H // 1024
    assert not world.collapser.mem.flags[head] & PG_LOCKED


def test_remapper_dies_inside_collapse_pte_mapped_thp(world):
    """The real sequence: MADV_COLLAPSE on a range whose THP is already cached answers
    SCAN_PTE_MAPPED_HUGEPAGE; the remapper's collapse_pte_mapped_thp sends LockFolio; the
    collapser locks and answers; the remapper dies before the answer reaches it."""
    world.file_create("lib", 2 * H)
    world.spawn(1)
    addr = world.mmap(1, FIXED, H, "lib")
    world.fault(1, addr)  # a PTE table at the PMD: later faults map PTEs
    # Another process collapses the range while process 1's mmap lock is busy: the retract is
    # deferred, the THP stays PTE-mapped in process 1.
    world.lock(1, 1000, write=True)
    world.spawn(2)
    b = world.mmap(2, FIXED, H, "lib")
    world.touch(2, b, H, stride=64 * P)
    assert world.madvise(2, b, H, "collapse") == 0
    world.exit(2)
    world.advance(2000)
    world.touch(1, addr, H, stride=64 * P)
    assert world.smaps(1)[0]["FilePmdMapped"] == 0
    head = world.collapser.by_name["lib"].get(0)
    world._checking = False
    c, r = world.collapser, world.remapper
    r.spawn(r.madvise(1, addr, H, "collapse"))
    seen = []
    # Deliver by hand until the collapser has answered a LockFolio.
    while not any(isinstance(msg, m.FolioAnswer) for msg in c.outbox):
        if c.outbox:
            msg = c.outbox.popleft()
            seen.append(msg)
            r.deliver(msg)
        else:
            c.deliver(r.outbox.popleft())
    assert any(isinstance(x, m.CollapseResult) and x.result == R.SCAN_PTE_MAPPED_HUGEPAGE for x in seen)
    assert c.peer_locked == {head} and c.mem.flags[head] & PG_LOCKED
    truncate = world.start(c, c.file_truncate("lib", H // 2))
    world.restart_remapper()
    world._checking = True
    assert truncate.done
    assert not world.collapser.mem.flags[head] & PG_LOCKED
    world.check()


def test_unlock_folio_forgets_the_lock(world):
    head = make_file_thp(world, "lib")
    world._checking = False
    _lock_for_remapper(world, "lib", 0)
    world.collapser.deliver(m.UnlockFolio(head))
    assert world.collapser.peer_locked == set()
    world._checking = True
    world.restart_remapper()
    world.check()


def test_remapper_dies_while_collapse_file_waits_for_the_unmap(world):
    """collapse_file's try_to_unmap is answered "nothing mapped" when the remapper goes; the
    collapse then goes on to its Retract, which must be answered as well (it was left waiting
    for a reply to a request the outbox had dropped, with the new THP locked)."""
    world.file_create("lib", H)
    world.spawn(1)
    addr = world.mmap(1, FIXED, H, "lib")
    world.touch(1, addr, H)
    world._checking = False
    c, r = world.collapser, world.remapper
    r.spawn(r.madvise(1, addr, H, "collapse"))
    while not any(isinstance(msg, m.UnmapMapping) for msg in c.outbox):
        if c.outbox:
            r.deliver(c.outbox.popleft())
        else:
            c.deliver(r.outbox.popleft())
    world.restart_remapper()
    world._checking = True
    assert c.pending_calls() == 0
    head = c.by_name["lib"].get(0)
    assert c.mem.is_thp(head) and not c.mem.flags[head] & PG_LOCKED
    world.check()
