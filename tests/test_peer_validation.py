"""The collapser refuses what a broken or hostile remapper sends (issue 14, item 6).

Every peer message is checked against the model before it changes anything: a refused one
raises PeerError out of ``Collapser.deliver`` (the daemon then closes that peer connection) and
leaves the model exactly as it was. Each family of forged messages below is delivered to a world
with mapped, pinned, PMD-mapped, cached-only and freed pages; the state is compared before and
after, and the invariant checker must still pass.
"""

from __future__ import annotations

import dataclasses
import struct
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import FIXED, H, P, make_file_thp

from collapsed.pagecache import BULK_ROWS, PG_LOCKED
from collapsed.peer_checks import MAX_AUDIT_ROWS, MAX_QUERY_PFNS
from shared import messages as m
from shared.actor import Call
from shared.errors import PeerError, UserError
from shared.units import MAX_LFS_FILESIZE, MAX_PAGE_INDEX, TASK_SIZE

DATA = FIXED + 4 * H


@pytest.fixture
def state(world) -> SimpleNamespace:
    """A PMD-mapped THP (lib), a shared writable mapping with PTE-mapped and pinned pages
    (data), a cached page nobody maps, a freed pfn, a registered range."""
    c = world.collapser
    head = make_file_thp(world, "lib")
    world.spawn(1)
    world.mmap(1, FIXED, H, "lib")
    world.madvise(1, FIXED, H, "hugepage")
    assert world.fault(1, FIXED) == "pmd"
    world.file_create("data", 16 * P)
    world.mmap(1, DATA, 16 * P, "data", prot="rw", shared=True)
    world.touch(1, DATA, 4 * P)
    world.pin(1, DATA)
    world.file_write("data", 10 * P, P)
    world.file_create("gone", P)
    world.file_write("gone", 0, P)
    freed = c.by_name["gone"].get(0)
    world.file_truncate("gone", 0)
    world.file_create("s", 4 * P, shmem=True)
    data = c.by_name["data"]
    s = SimpleNamespace(
        thp=head,
        mapped=data.get(0),  # one PTE, one pin
        cached=data.get(10),  # in the cache, mapped by nobody
        freed=freed,
        n=len(c.mem.ref),
        lib=c.by_name["lib"].ino,
        data=data.ino,
    )
    assert c.mem.entire[s.thp] == 1 and c.mem.mapcount[s.mapped] == 1 and c.mem.pins[s.mapped] == 1
    assert c.mem.mapcount[s.cached] == 0 and not c.mem.allocated(s.freed) and s.freed < s.n
    assert data.writecount == 1 and c.by_name["lib"].writecount == 0
    assert c.khugepaged.slots[1].ranges
    return s


def snapshot(world) -> dict[str, Any]:
    """Everything a peer message could change in the collapser."""
    c = world.collapser
    mem = c.mem
    return {
        "arrays": tuple(bytes(a) for a in (mem.ref, mem.mapcount, mem.flags, mem.index, mem.ino)),
        "entire": dict(mem.entire),
        "pins": dict(mem.pins),
        "allocated": mem.nr_allocated,
        "free": (list(mem._free_small), list(mem._free_blocks)),
        "files": {
            ino: (f.name, f.size, f.shmem, f.nrpages, f.nrswap, f.writecount, f.collapse_pmd, f.nr_thps,
                  {k: bytes(v) for k, v in f.chunks.items()})
            for ino, f in c.files.items()
        },
        "slots": {pid: dict(slot.ranges) for pid, slot in c.khugepaged.slots.items()},
        "knobs": dataclasses.asdict(c.knobs),
        "peer_locked": set(c.peer_locked),
        "outbox": list(c.outbox),
        "calls": c.pending_calls(),
    }


def refused(world, msg, match: str) -> PeerError:
    before = snapshot(world)
    with pytest.raises(PeerError, match=match) as err:
        world.collapser.deliver(msg)
    assert snapshot(world) == before
    if not world.collapser.outbox and not world.collapser.pending_calls():
        world.check()
    return err.value


def test_peer_error_is_not_a_user_error():
    assert not issubclass(PeerError, UserError) and issubclass(PeerError, Exception)


# -- RmapDelta: the forged free of a cached page, and every other miscount ---------------------


@pytest.mark.parametrize(
    "rows, match",
    [
        pytest.param(lambda s: ((-1, 1, 0, 0),), "outside memory", id="negative-pfn"),
        pytest.param(lambda s: ((-s.n + s.cached, -1, 0, 0),), "outside memory", id="negative-alias-of-a-page"),
        pytest.param(lambda s: ((0, 1, 0, 0),), "outside memory", id="pfn-0"),
        pytest.param(lambda s: ((s.n, 1, 0, 0),), "outside memory", id="pfn-past-memory"),
        pytest.param(lambda s: ((s.cached, -1, 0, 0),), "PTE mappings", id="free-a-cached-page"),
        pytest.param(lambda s: ((s.mapped, -1, 0, 0), (s.mapped, -1, 0, 0)), "PTE mappings", id="unmap-twice"),
        pytest.param(lambda s: ((s.cached, -1, 0, 0), (s.cached, 1, 0, 0)), "PTE mappings", id="unmap-before-map"),
        pytest.param(lambda s: ((s.mapped, -(1 << 31), 0, 0),), "PTE mappings", id="huge-unmap"),
        pytest.param(lambda s: ((s.mapped, (1 << 31) - 1, 0, 0),), "PTE mappings", id="mapcount-overflow"),
        pytest.param(lambda s: ((s.thp, 0, (1 << 31) - 1, 0),), "PMD mappings", id="entire-overflow"),
        pytest.param(lambda s: ((s.cached, 0, 1, 0),), "not a PMD-order page", id="pmd-on-small-page"),
        pytest.param(lambda s: ((s.thp, 0, -2, 0),), "PMD mappings", id="pmd-unmap-twice"),
        pytest.param(lambda s: ((s.thp + 3, 0, -1, 0), (s.thp, 0, -1, 0)), "PMD mappings", id="pmd-via-tail"),
        pytest.param(lambda s: ((s.mapped, 0, 0, -2),), "pins", id="unpin-twice"),
        pytest.param(lambda s: ((s.cached, 0, 0, -1),), "pins", id="unpin-unpinned"),
        pytest.param(lambda s: ((s.freed, 1, 0, 0),), "not a page in the page cache", id="map-a-free-page"),
        pytest.param(lambda s: ((s.freed, 0, 0, 1),), "not a page in the page cache", id="pin-a-free-page"),
        pytest.param(lambda s: ((s.freed, -1, 0, 0),), "PTE mappings", id="unmap-a-free-page"),
        # A zapped range long enough for the array path, which must find the same faults.
        pytest.param(lambda s: ((s.mapped, -1, 0, 0),) * BULK_ROWS, "PTE mappings", id="bulk-unmap-many-times"),
        pytest.param(
            lambda s: ((s.mapped, -1, 0, 0),) + ((s.n, -1, 0, 0),) * BULK_ROWS, "outside memory", id="bulk-past-memory"
        ),
        pytest.param(
            lambda s: ((s.mapped, -1, 0, 0), (s.thp, 0, -1, 0), (s.cached, -1, 0, 0)),
            "PTE mappings",
            id="good-rows-then-a-bad-one",
        ),
    ],
)
def test_forged_rmap_delta_is_refused(world, state, rows, match):
    refused(world, m.RmapDelta.of(rows(state)), match)


def test_rmap_delta_columns_of_another_length_are_refused(world, state):
    """Version 5's columns: each delta column holds one integer per pfn, or none (all zeros)."""
    pfns = struct.pack("<2q", state.mapped, state.mapped)
    refused(world, m.RmapDelta(pfns, struct.pack("<i", -1)), "4 bytes of ptes for 2 pfns")
    refused(world, m.RmapDelta(pfns, b"", b"", struct.pack("<3i", 0, 0, 1)), "12 bytes of pins for 2 pfns")
    refused(world, m.RmapDelta(b"", b"", struct.pack("<i", 1)), "4 bytes of pmds for 0 pfns")


def test_rmap_rows_that_stay_within_what_the_peer_holds_apply(world, state):
    c = world.collapser
    before = snapshot(world)
    # A PTE zapped and mapped again, a PMD split to PTEs and back: all within what it holds.
    c.deliver(m.RmapDelta.of(((state.mapped, -1, 0, 0), (state.mapped, 1, 0, 0))))
    c.deliver(m.RmapDelta.of(((state.thp, 0, -1, 0), (state.thp, 0, 1, 0))))
    assert snapshot(world) == before
    world.check()


# -- fault lookups and folio locks --------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        pytest.param(lambda s: m.LookupPage(1, s.data, -1, "map", False, False, False), "index", id="negative"),
        pytest.param(
            lambda s: m.LookupPage(1, s.data, MAX_PAGE_INDEX + 1, "map", False, False, False), "index", id="past-max"
        ),
        pytest.param(lambda s: m.LookupPage(1, s.data, 1 << 64, "pin", False, False, False), "index", id="64-bit"),
        pytest.param(lambda s: m.LookupPage(1, s.data, 3, "steal", False, False, False), "purpose", id="purpose"),
        pytest.param(
            lambda s: m.LookupPage(1, s.data, 3, "map", False, False, False, (2, -1)), "index", id="around-negative"
        ),
        pytest.param(
            lambda s: m.LookupPage(1, s.data, 3, "map", False, False, False, (2, MAX_PAGE_INDEX + 1)),
            "index",
            id="around-past-max",
        ),
        pytest.param(
            lambda s: m.LookupPage(1, s.data, 3, "map", False, False, False, tuple(range(600, 1200))),
            "fault-around",
            id="around-too-many",
        ),
    ],
)
def test_forged_lookup_page_is_refused(world, state, make, match):
    refused(world, make(state), match)


@pytest.mark.parametrize("index", [-1, -512, MAX_PAGE_INDEX + 1, 1 << 70])
def test_forged_lock_folio_is_refused(world, state, index):
    refused(world, m.LockFolio(77, state.lib, index), "lock_folio")


@pytest.mark.parametrize(
    "pfn",
    [
        pytest.param(lambda s: s.thp, id="unlocked-thp"),
        pytest.param(lambda s: s.cached, id="unlocked-page"),
        pytest.param(lambda s: -1, id="negative"),
        pytest.param(lambda s: 0, id="zero"),
        pytest.param(lambda s: s.n + 512, id="past-memory"),
    ],
)
def test_forged_unlock_folio_is_refused(world, state, pfn):
    refused(world, m.UnlockFolio(pfn(state)), "not a folio locked for the remapper")


def test_unlock_folio_only_releases_what_the_remapper_locked(world, state):
    """The remapper's lock is released once; a page that collapse_file holds stays locked."""
    c, r = world.collapser, world.remapper
    c.deliver(m.LockFolio(88, state.lib, 0))
    assert c.outbox.pop() == m.FolioAnswer(88, state.thp, 9)
    c.deliver(m.UnlockFolio(state.thp))
    refused(world, m.UnlockFolio(state.thp), "not a folio locked")
    # MADV_COLLAPSE over data's PTE-mapped pages: collapse_file locks them and waits for the
    # remapper's try_to_unmap. A forged unlock of one of them is refused meanwhile.
    world.file_create("small", H)
    world.mmap(1, FIXED + 2 * H, H, "small")
    world.touch(1, FIXED + 2 * H, H)
    old = c.by_name["small"].get(5)
    world._checking = False
    r.spawn(r.madvise(1, FIXED + 2 * H, H, "collapse"))
    while not any(isinstance(msg, m.UnmapMapping) for msg in c.outbox):
        if c.outbox:
            r.deliver(c.outbox.popleft())
        else:
            c.deliver(r.outbox.popleft())
    assert c.mem.flags[old] & PG_LOCKED
    refused(world, m.UnlockFolio(old), "not a folio locked")
    assert c.mem.flags[old] & PG_LOCKED
    world._checking = True
    world.settle()
    assert c.mem.is_thp(c.by_name["small"].get(0))


# -- notices naming pages -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "pfn, match",
    [
        pytest.param(lambda s: -1, "outside memory", id="negative"),
        pytest.param(lambda s: 0, "outside memory", id="zero"),
        pytest.param(lambda s: s.n, "outside memory", id="past-memory"),
        pytest.param(lambda s: s.freed, "not a page in the page cache", id="free-page"),
    ],
)
def test_forged_mark_dirty_is_refused(world, state, pfn, match):
    refused(world, m.MarkDirty(pfn(state)), match)


@pytest.mark.parametrize(
    "pfns",
    [
        pytest.param(lambda s: (-1,), id="negative"),
        pytest.param(lambda s: (0,), id="zero"),
        pytest.param(lambda s: (s.cached, s.n), id="past-memory"),
        pytest.param(lambda s: (s.cached, -s.n + s.cached), id="negative-alias"),
    ],
)
def test_forged_reclaim_is_refused(world, state, pfns):
    refused(world, m.Reclaim(pfns(state)), "outside memory")


def test_reclaim_of_a_page_freed_meanwhile_is_no_error(world, state):
    """The remapper sends Reclaim after unmapping the pages, so a page may be gone (or its pfn
    reused) by the time the message is handled: that race is tolerated, not refused."""
    world.collapser.deliver(m.Reclaim((state.freed,)))
    world.check()


# -- khugepaged's registrations, write opens, MADV_COLLAPSE -------------------------------------


@pytest.mark.parametrize(
    "fields, match",
    [
        pytest.param({"start": DATA, "end": DATA}, "user range", id="empty"),
        pytest.param({"start": DATA + 2 * H, "end": DATA}, "user range", id="reversed"),
        pytest.param({"start": DATA + 1}, "user range", id="unaligned-start"),
        pytest.param({"end": DATA + H - 1}, "user range", id="unaligned-end"),
        pytest.param({"start": -H, "end": H}, "user range", id="negative"),
        pytest.param({"start": TASK_SIZE - H, "end": TASK_SIZE + H}, "user range", id="past-task-size"),
        pytest.param({"pgoff": -1}, "pgoff", id="negative-pgoff"),
        pytest.param({"ino": 0}, "inode", id="inode-0"),
    ],
)
def test_forged_register_range_is_refused(world, state, fields, match):
    base = {"pid": 1, "start": DATA, "end": DATA + H, "ino": state.data, "pgoff": 0,
            "vm_hugepage": True, "vm_nohugepage": False, "entered": True}
    refused(world, m.RegisterRange(**{**base, **fields}), match)


def test_a_range_past_the_largest_file_is_registered_and_finds_nothing(world, state):
    """Not refused (the remapper registers its ranges again at every reconnection): the scan
    visits it and finds no page there."""
    c = world.collapser
    c.deliver(m.RegisterRange(1, DATA + 2 * H, DATA + 3 * H, state.lib, 1 << 60, True, False, True))
    before = c.khugepaged.results.get("SCAN_EXCEED_NONE_PTE", 0)
    world.advance(30_000)
    assert c.khugepaged.results.get("SCAN_EXCEED_NONE_PTE", 0) > before
    world.check()


@pytest.mark.parametrize(
    "file, delta",
    [("data", 0), ("data", 2), ("data", -2), ("lib", -1), ("data", 1 << 40)],
)
def test_forged_write_open_is_refused(world, state, file, delta):
    refused(world, m.WriteOpen(world.collapser.by_name[file].ino, delta), "write_open")


@pytest.mark.parametrize("pgoff", [-512, 5, 511, MAX_PAGE_INDEX, (MAX_PAGE_INDEX + 1) & ~511])
def test_forged_madv_collapse_is_refused(world, state, pgoff):
    refused(world, m.MadvCollapse(5, 1, FIXED, state.lib, pgoff), "madv_collapse")


# -- files and knobs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, match",
    [
        pytest.param({"ino": 0}, "inode", id="inode-0"),
        pytest.param({"ino": -3}, "inode", id="negative-inode"),
        pytest.param({"name": ""}, "empty", id="empty-name"),
        pytest.param({"name": "a/b"}, "contains '/'", id="slash"),
        pytest.param({"name": "a\nb"}, "contains", id="newline"),
        pytest.param({"name": "nul\0"}, "contains", id="nul"),
        pytest.param({"name": ".."}, "directory entry", id="dotdot"),
        pytest.param({"name": "x" * 256}, "longer than", id="too-long"),
        pytest.param({"size": -2}, "size", id="negative-size"),
        pytest.param({"size": MAX_LFS_FILESIZE + 1}, "size", id="size-2^63"),
    ],
)
def test_forged_file_info_is_refused(world, state, fields, match):
    base = {"ino": 40, "name": "new", "size": P, "shmem": False}
    err = refused(world, m.FileInfo(**{**base, **fields}), match)
    assert len(err.message) < 200  # a 1 MiB name is not echoed back


@pytest.mark.parametrize(
    "values, match",
    [
        pytest.param({"no/such": 1}, "no such knob", id="unknown"),
        pytest.param({"enabled": "sometimes"}, "not one of", id="bad-choice"),
        pytest.param({"khugepaged/max_ptes_none": 512}, "outside", id="out-of-range"),
        pytest.param({"khugepaged/scan_sleep_millisecs": -1}, "not a decimal number", id="negative"),
        pytest.param({"khugepaged/full_scans": 3}, "read-only", id="read-only"),
        pytest.param({"thpsplit/install_pmd": "yes"}, "decimal", id="not-a-number"),
        pytest.param({"enabled": "always", "defrag": "bogus"}, "defrag", id="half-good"),
    ],
)
def test_forged_knobs_are_refused(world, state, values, match):
    refused(world, m.KnobsChanged(values), match)


# -- replies and messages the remapper never sends ----------------------------------------------


def _pending_unmap(world) -> int:
    """A truncate of the mapped data file, stopped at its unmap request (nothing delivered)."""
    c = world.collapser
    c.spawn(c.file_truncate("data", 0))
    (req,) = [msg.req for msg in c.outbox if isinstance(msg, m.UnmapMapping)]
    return req


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(lambda req: m.Retracted(req, 0, 0, 0, 0), id="retracted"),
        pytest.param(lambda req: m.VisitMmDone(req), id="visit-done"),
        pytest.param(lambda req: m.CollapsePteMappedResult(req, 1), id="collapse-result"),
    ],
)
def test_a_reply_of_the_wrong_kind_is_refused(world, state, reply):
    req = _pending_unmap(world)
    refused(world, reply(req), "answers request")
    world.settle()  # the real answer still comes
    assert world.collapser.by_name["data"].nrpages == 0


def test_a_collapse_result_must_be_a_scan_result(world, state):
    c = world.collapser
    got = []

    def waits():
        got.append((yield Call(m.CollapsePteMapped(c.new_req(), 1, FIXED))))

    c.spawn(waits())
    req = c.outbox[-1].req
    refused(world, m.CollapsePteMappedResult(req, 9999), "not a scan result")
    refused(world, m.Retracted(req, 0, 0, 0, 0), "answers request")
    c.deliver(m.CollapsePteMappedResult(req, 1))
    assert got == [m.CollapsePteMappedResult(req, 1)]
    c.outbox.clear()


def test_a_reply_to_an_unknown_request_is_ignored(world, state):
    before = snapshot(world)
    world.collapser.deliver(m.Unmapped(123_456))
    world.collapser.deliver(m.Retracted(123_457, 1, 1, 0, 0))
    assert snapshot(world) == before


# -- Remap and Audit (a restored remapper, thpctl check) ----------------------------------------


@pytest.mark.parametrize(
    "rows, match",
    [
        pytest.param(lambda s: ((s.cached, s.data, 10, 3),), "kind 3", id="unknown-kind"),
        pytest.param(lambda s: ((s.cached, s.data, 10, -1),), "kind -1", id="negative-kind"),
        pytest.param(lambda s: ((s.cached, s.data, 10, 0),) * (MAX_QUERY_PFNS + 1), "rows", id="too-many-rows"),
    ],
)
def test_forged_remap_is_refused(world, state, rows, match):
    refused(world, m.Remap(1, rows(state)), match)


def test_a_remap_row_the_cache_does_not_hold_is_answered_not_refused(world, state):
    """A remapper restored across a collapsed restart names pfns of the old memory: the answer
    says which rows were accounted, and only the one naming the page cached there is."""
    c = world.collapser
    before = snapshot(world)
    rows = (
        (state.n + 5, state.data, 10, 0),  # past this memory
        (-3, state.data, 10, 0),  # would index from the end
        (state.freed, state.data, 10, 0),  # free
        (state.cached, state.lib, 10, 0),  # another file
        (state.cached, state.data, 11, 1),  # another index, and no THP
        (state.cached, state.data, 10, 0),  # the page cached there
    )
    c.deliver(m.Remap(7, rows))
    assert c.outbox.pop() == m.Remapped(7, (False, False, False, False, False, True))
    assert c.mem.mapcount[state.cached] == 1 and c.mem.ref[state.cached] == 2
    c.deliver(m.RmapDelta.of(((state.cached, -1, 0, 0),)))  # the remapper hands it back
    c.outbox.clear()
    assert snapshot(world) == before


def test_an_audit_names_what_it_cannot_match_and_refuses_only_its_size(world, state):
    c = world.collapser
    before = snapshot(world)
    c.deliver(m.Audit(3, ((state.n + 5, state.data, 0, 1, 0, 0), (-1, state.data, 0, 1, 0, 0)), last=False))
    reply = c.outbox.pop()
    assert isinstance(reply, m.Audited) and reply.req == 3 and not reply.busy
    assert reply.problems == (
        f"pfn {state.n + 5} is mapped or pinned by remapd but free",
        "pfn -1 is mapped or pinned by remapd but free",
    )
    assert snapshot(world) == before
    rows = ((state.mapped, state.data, 0, 1, 0, 1),) * (MAX_AUDIT_ROWS + 1)
    refused(world, m.Audit(4, rows, last=True), "rows")


@pytest.mark.parametrize(
    "msg",
    [
        m.PageAnswer(1, "ok", 5, 5),
        m.FolioAnswer(1, 5, 0),
        m.UnmapMapping(1, 1, 0, 10, b"", True),
        m.Retract(1, 1, 0, 512),
        m.CollapseResult(1, 1),
        m.Remapped(1, (True,)),
        m.Audited(1, ()),
        m.PeerHello("remapd", 1),
    ],
    ids=lambda msg: msg.TAG,
)
def test_a_message_the_remapper_never_sends_is_refused(world, state, msg):
    refused(world, msg, "not a message the remapper sends")


@pytest.mark.parametrize("name", ["..", ".", "a\nb", "a/b", "", "x" * 256])
def test_a_client_cannot_create_a_name_the_remapper_could_not_report(world, name):
    with pytest.raises(UserError) as err:
        world.file_create(name, P)
    assert err.value.errno_name == "EINVAL" and len(err.value.message) < 200
