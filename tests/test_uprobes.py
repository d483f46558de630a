"""uprobes on file THP text: a breakpoint is an anon copy of one subpage, which splits a PMD
mapping and blocks collapse; removing it restores the page and calls collapse_pte_mapped_thp
(kernel-notes §1.2, §6.5)."""

from __future__ import annotations

import pytest
from helpers import QUARTER, smaps1

from remapd.mm import PteTable
from remapd.uprobes import uprobe_add
from shared.errors import UserError
from shared.units import HPAGE_PMD_SHIFT, HPAGE_PMD_SIZE, PAGE_SIZE

TICK = 1000
PROBE = 5 * PAGE_SIZE


def text_world(make_world, **knobs):
    knobs = {"enabled": "always", "scan_sleep_millisecs": TICK, "remap_sleep_millisecs": TICK, **knobs}
    world = make_world(**knobs)
    world.file_create("text", HPAGE_PMD_SIZE)
    world.spawn(1)
    addr = world.mmap(1, None, HPAGE_PMD_SIZE, "text", prot="rx", shared=False)
    return world, addr


def pmd_mapped_text(make_world, **knobs):
    world, addr = text_world(make_world, **knobs)
    world.fault(1, addr)
    world.advance(TICK)
    if not isinstance(world.remapper.mms[1].pmds.get(addr >> HPAGE_PMD_SHIFT), int):
        assert world.fault(1, addr) == "pmd"
    assert smaps1(world, 1)["FilePmdMapped"] == 2048
    return world, addr


def test_installing_a_uprobe_splits_the_pmd(make_world):
    world, addr = pmd_mapped_text(make_world)
    assert world.uprobe("add", "text", PROBE) == {"file": "text", "offset": PROBE, "mappings": 1}
    assert world.vmstat()["thp_split_pmd"] == 1
    entry = smaps1(world, 1)
    assert (entry["Rss"], entry["Anonymous"], entry["FilePmdMapped"]) == (4, 4, 0)
    assert world.remapper.mms[1].vmas[0].anon_vma
    # The rest of the range refaults as PTEs of the same THP, around the anon page.
    assert world.touch(1, addr, HPAGE_PMD_SIZE, stride=QUARTER) == {"minor": 4}
    table = world.remapper.mms[1].pmds[addr >> HPAGE_PMD_SHIFT]
    assert (table.nr, table.nr_foreign, table.mark) == (5, 1, False)


@pytest.mark.parametrize("install_pmd", [1, 0])
def test_a_uprobe_blocks_collapse_and_removing_it_recollapses(make_world, install_pmd):
    world, addr = text_world(make_world, install_pmd=install_pmd)
    world.uprobe("add", "text", PROBE)
    assert world.touch(1, addr, HPAGE_PMD_SIZE, stride=QUARTER) == {"major": 4}
    world.advance(TICK)
    # The page cache is collapsed, but retract skips the VMA: it has an anon_vma.
    assert world.collapser.khugepaged.pages_collapsed == 1
    assert world.remapper.stats["retracted"] == 0
    assert world.touch(1, addr, HPAGE_PMD_SIZE, stride=QUARTER) == {"minor": 4}
    world.wait_scans(2)
    pidx = addr >> HPAGE_PMD_SHIFT
    assert isinstance(world.remapper.mms[1].pmds[pidx], PteTable)
    entry = smaps1(world, 1)
    assert (entry["Rss"], entry["Anonymous"], entry["FilePmdMapped"]) == (20, 4, 0)

    mapped = world.vmstat()["thp_file_mapped"]
    assert world.uprobe("del", "text", PROBE) == {
        "file": "text",
        "offset": PROBE,
        "collapse_pte_mapped_thp": ["SCAN_SUCCEED"],
    }
    entry = smaps1(world, 1)
    assert entry["Anonymous"] == 0
    if install_pmd:
        assert entry["FilePmdMapped"] == 2048
        assert world.vmstat()["thp_file_mapped"] == mapped + 1
    else:
        assert pidx not in world.remapper.mms[1].pmds
        assert entry["Rss"] == 0
        assert world.fault(1, addr + PROBE) == "pmd"
        assert smaps1(world, 1)["FilePmdMapped"] == 2048
        assert world.vmstat()["thp_file_mapped"] == mapped + 1


def test_a_uprobe_clears_the_mark_of_a_pte_mapped_thp(make_world):
    world, addr = text_world(make_world)
    world.fault(1, addr)
    world.lock(1, TICK + TICK // 2)
    world.advance(TICK)
    assert world.remapper.stats["retract_deferred"] == 1
    world.touch(1, addr, HPAGE_PMD_SIZE, stride=QUARTER)
    pidx = addr >> HPAGE_PMD_SHIFT
    assert world.remapper.marked == {(1, pidx)}
    world.advance(TICK // 2)  # the lock is free, the remapper has not run yet
    world.uprobe("add", "text", PROBE)
    assert world.remapper.marked == set()
    world.advance(3 * TICK)
    assert smaps1(world, 1)["FilePmdMapped"] == 0
    assert not any(k.startswith("remap_SCAN") for k in world.remapper.stats)
    world.uprobe("del", "text", PROBE)
    assert smaps1(world, 1)["FilePmdMapped"] == 2048


def test_every_mapping_gets_the_breakpoint_and_gets_its_pmd_back(make_world):
    world, a1 = pmd_mapped_text(make_world)
    world.uprobe("add", "text", PROBE)
    world.spawn(2)
    a2 = world.mmap(2, None, HPAGE_PMD_SIZE, "text", prot="rx", shared=False)
    assert smaps1(world, 2)["Anonymous"] == 4  # uprobe_mmap
    world.touch(1, a1, HPAGE_PMD_SIZE, stride=QUARTER)
    world.touch(2, a2, HPAGE_PMD_SIZE, stride=QUARTER)
    result = world.uprobe("del", "text", PROBE)
    assert result["collapse_pte_mapped_thp"] == ["SCAN_SUCCEED", "SCAN_SUCCEED"]
    for pid in (1, 2):
        entry = smaps1(world, pid)
        assert (entry["Anonymous"], entry["FilePmdMapped"]) == (0, 2048)


def test_removing_a_uprobe_from_small_pages_collapses_nothing(make_world):
    world, addr = text_world(make_world, enabled="never")
    world.uprobe("add", "text", PROBE)
    world.touch(1, addr, HPAGE_PMD_SIZE, stride=QUARTER)
    result = world.uprobe("del", "text", PROBE)
    assert result["collapse_pte_mapped_thp"] == []
    entry = smaps1(world, 1)
    assert (entry["Rss"], entry["Anonymous"], entry["FilePmdMapped"]) == (20, 0, 0)


def test_uprobes_skip_shared_and_writable_mappings(make_world):
    world = make_world()
    world.file_create("text", HPAGE_PMD_SIZE)
    world.spawn(1)
    world.mmap(1, None, HPAGE_PMD_SIZE, "text", prot="rx", shared=True)
    world.mmap(1, 0x40000000, HPAGE_PMD_SIZE, "text", prot="rw", shared=False)
    assert world.uprobe("add", "text", PROBE)["mappings"] == 0
    assert all(e["Anonymous"] == 0 for e in world.smaps(1))


@pytest.mark.parametrize(
    ("action", "offset", "errno"),
    [("add", HPAGE_PMD_SIZE, "EINVAL"), ("add", PROBE, "EEXIST"), ("del", 0, "ENOENT")],
)
def test_uprobe_errors(make_world, action, offset, errno):
    world, _ = text_world(make_world)
    world.uprobe("add", "text", PROBE)
    with pytest.raises(UserError) as err:
        world.uprobe(action, "text", offset)
    assert err.value.errno_name == errno


def test_a_mapping_unmapped_while_the_uprobe_waited_for_its_lock_is_skipped(make_world):
    """register_for_each_vma looks the VMA up again under the lock: a munmap that got the lock
    first must not leave a breakpoint page outside any VMA."""
    world, a1 = text_world(make_world)
    world.spawn(2)
    world.mmap(2, None, HPAGE_PMD_SIZE, "text", prot="rx", shared=False)
    r = world.remapper
    world.lock(1, TICK)
    unmap = world.start(r, r.munmap(1, a1, HPAGE_PMD_SIZE))
    add = world.start(r, uprobe_add(r, "text", PROBE))
    assert not unmap.done and not add.done
    world.advance(TICK)
    assert add.result()["mappings"] == 1
    assert r.mms[1].pmds == {} and r.mms[1].nr_ptes == 0
    assert smaps1(world, 2)["Anonymous"] == 4


def test_a_process_that_exits_while_the_uprobe_waits_is_skipped(make_world):
    world, _ = text_world(make_world)
    world.spawn(2)
    world.mmap(2, None, HPAGE_PMD_SIZE, "text", prot="rx", shared=False)
    r = world.remapper
    world.lock(1, TICK, write=True)
    add = world.start(r, uprobe_add(r, "text", PROBE))
    world.exit(1)
    world.advance(TICK)
    assert add.result()["mappings"] == 1
    assert smaps1(world, 2)["Anonymous"] == 4
