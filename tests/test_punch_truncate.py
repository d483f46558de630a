"""Hole punching and truncation of shmem, against what this machine's Linux 6.18 does (issue 9's
divergences #4, #5, #9, #16, #21 and MADV_COLLAPSE after a split). Each scenario runs with the
conformance harness's model settings (tmpfs huge=advise, fault-around 64 KiB, install_pmd=0) and
asserts the figures the kernel gave for the same steps (``thpctl conformance --replay``).

The kernel functions reproduced: shmem_fallocate (mm/shmem.c: unmap_mapping_range with
even_cows=0, not clipped to i_size), shmem_setattr -> shmem_truncate_range -> shmem_undo_range
(mm/shmem.c) -> truncate_inode_partial_folio (mm/truncate.c) -> try_folio_split ->
__split_unmapped_folio (mm/huge_memory.c, a non-uniform split), finish_fault and
filemap_map_pages (mm/memory.c, mm/filemap.c: a large folio mapped whole), and collapse_file's
large-folio entries (mm/khugepaged.c).
"""

from __future__ import annotations

from typing import Any

import pytest

from collapsed.pagecache import PhysMem
from shared.sim.conformance import ModelBackend, Settings, parse_steps_text
from tests.conftest import CheckedWorld

A = 0x4000_0000
SETUP = "file create c --size 4M --shmem; proc spawn 1; "
HUGE = "mmap 1 0x40000000 4M --file c --prot rw --shared; madvise 1 0x40000000 4M hugepage; "


class Model:
    """The harness's model side, its invariants checked after every step."""

    def __init__(self) -> None:
        self.backend = ModelBackend(Settings(huge="advise"), world_factory=lambda k: CheckedWorld(k, codec=False))
        self.backend.start()
        self.world = self.backend.world

    def run(self, text: str) -> Any:
        """Run the steps; the last one's result."""
        out: Any = None
        for step in parse_steps_text(text):
            out = self.backend.step(step)["result"]
        return out

    def rss(self, pid: int = 1) -> list[int]:
        return [row["Rss"] for row in self.world.smaps(pid)]

    def vm(self, name: str) -> int:
        return int(self.world.vmstat().get(name, 0))

    def nrpages(self) -> int:
        return int(self.world.file_ls()[0]["nrpages"])

    def orders(self, start: int, end: int) -> list[tuple[int, int]]:
        """(index, order) of every folio of file c in [start, end)."""
        f = self.world.collapser.by_name["c"]
        mem = self.world.collapser.mem
        return [(i, mem.order[v]) for i, v in f.entries(start, end) if v > 0 and mem.head(v) == v]


@pytest.fixture
def model() -> Model:
    return Model()


def test_non_uniform_split_halves_around_the_page():
    # __split_unmapped_folio, non-uniform at page 3: halves kept whole down to page 3's order-0.
    mem = PhysMem()
    head = mem.alloc_huge(1, True, 0)
    mem.ref[head] = 512
    pieces = mem.split_folio(head, head + 3)
    assert pieces[:4] == [(head, 1), (head + 2, 0), (head + 3, 0), (head + 4, 2)]
    assert [o for _, o in pieces] == [1, 0, 0, 2, 3, 4, 5, 6, 7, 8]
    assert sum(1 << o for _, o in pieces) == 512
    for new, order in pieces:
        assert mem.ref[new] == 1 << order and mem.head(new + (1 << order) - 1) == new
    # An order-4 folio freed goes back as 16 small pages: the block is carved for good.
    mem.ref[head + 16] = 0
    mem.free(head + 16)
    assert mem.nr_allocated == 512 - 16 and not mem.allocated(head + 20)


def test_punch_keeps_private_cow_pages(model):
    # #4: shmem_fallocate(PUNCH_HOLE) unmaps with even_cows=0; truncation (shmem_setattr) with 1.
    model.run(SETUP + "mmap 1 0x40000000 4M --file c --prot rw --private; touch 1 0x40000000 4M --write; "
              "file punch c 0 4M")
    row = model.world.smaps(1)[0]
    assert (row["Rss"], row["Anonymous"]) == (4096, 4096)
    model.run("file truncate c 0")
    assert model.rss() == [0]


def test_punch_past_eof_zaps_the_pmd_whole(model):
    # #5: shmem_fallocate clips neither the unmap nor shmem_truncate_range to i_size: the PMD of a
    # THP reaching past EOF is zapped whole (zap_huge_pmd), and the folio goes whole.
    model.run("file create c --size 3M --shmem; proc spawn 1; " + HUGE + "fault 1 0x40200000")
    model.run("file punch c 2M 2M")
    assert model.vm("thp_split_pmd") == 0 and model.vm("thp_split_page") == 0
    assert model.nrpages() == 0 and model.rss() == [0]


def test_truncate_to_the_same_size_splits_the_thp_across_eof(model):
    # #9: shmem_setattr calls shmem_truncate_range(newsize, -1) when the size does not grow; the
    # THP across EOF is split at it (unmap_folio splits the PMD), the pages past EOF go, and the
    # order-8 folio left maps whole at the next fault (finish_fault).
    model.run("file create c --size 3M --shmem; proc spawn 1; " + HUGE + "fault 1 0x40200000; fault 1 0x40380000")
    model.run("file truncate c 3M")
    assert (model.vm("thp_split_pmd"), model.vm("thp_split_page"), model.vm("nr_shmem_hugepages")) == (1, 1, 0)
    assert model.nrpages() == 256 and model.orders(512, 1024) == [(512, 8)]
    assert model.run("fault 1 0x40380000") == "sigbus"
    assert model.run("fault 1 0x40200000") == "minor"
    assert model.rss() == [1024]


def test_truncate_inside_a_thp_leaves_an_order8_folio_and_a_page(model):
    # #9: truncate to 1M + 4K splits at page 257; pages 257 and up go: an order-8 folio and page
    # 256 are left, two write faults map them (1028 kB), the rest is past EOF.
    model.run(SETUP + HUGE + "fault 1 0x40000000 --write; file truncate c 1052672")
    assert model.orders(0, 512) == [(0, 8), (256, 0)]
    assert model.run("touch 1 0x40000000 2M --write --stride 64K") == {"minor": 2, "hit": 15, "sigbus": 15}
    assert model.rss() == [1028]


def test_unaligned_punch_splits_the_thp_at_its_page(model):
    # #16: shmem_undo_range takes a sub-page range through shmem_get_partial_folio and
    # truncate_inode_partial_folio, which zeroes the bytes and splits the large folio there.
    model.run(SETUP + HUGE + "fault 1 0x40000000; file punch c 100 10")
    assert (model.vm("thp_split_pmd"), model.vm("thp_split_page"), model.vm("nr_shmem_hugepages")) == (1, 1, 0)
    assert model.nrpages() == 512 and model.rss() == [0]
    assert model.orders(0, 512) == [(0, 0), (1, 0), (2, 1), (4, 2), (8, 3), (16, 4), (32, 5), (64, 6), (128, 7), (256, 8)]
    # Fault-around maps the five folios of its 16-page window; a touch then faults once per folio.
    model.run("fault 1 0x40000000")
    assert model.rss() == [64]
    assert model.run("touch 1 0x40000000 2M") == {"hit": 507, "minor": 5}


def test_punch_inside_a_thp_splits_at_both_ends_of_the_hole(model):
    # #21: the punched page splits the THP at it, then truncate_inode_partial_folio splits the
    # folio holding the page after the hole there too (split_at2); the folios left map whole.
    model.run(SETUP + HUGE + "fault 1 0x40200000 --write; file punch c 3580K 4K")
    assert model.nrpages() == 511 and model.vm("thp_split_page") == 1
    assert (895, 0) not in model.orders(512, 1024) and (896, 0) in model.orders(512, 1024)
    model.run("fault 1 0x40328000 --write")
    assert model.rss() == [256]  # the order-6 folio [768, 832)
    model.run("fault 1 0x40200000")
    assert model.rss() == [1280]
    assert model.run("touch 1 0x40200000 2M") == {"hit": 504, "minor": 8}


def test_madv_collapse_from_a_forked_child_after_a_split(model):
    # collapse_file takes each large folio the split left as one entry (index +=
    # folio_nr_pages, refcount 2 + nr): MADV_COLLAPSE succeeds and maps the new THP in the caller.
    model.run(SETUP + HUGE + "fault 1 0x40000000; file punch c 4K 4K; proc fork 1 2")
    assert model.run("madvise 2 0x40000000 2M collapse") == 0
    assert model.world.smaps(2)[0]["ShmemPmdMapped"] == 2048 and model.rss(1) == [0]
    assert model.vm("nr_shmem_hugepages") == 1 and model.nrpages() == 512
    assert model.run("fault 1 0x40000000") == "pmd"


def test_a_pinned_thp_across_the_new_eof_stays_whole(model):
    # truncate_inode_partial_folio: try_folio_split fails (can_split_folio: the pin), and a dirty
    # (shmem) folio then stays whole, pages past EOF included; shmem_undo_range stops there.
    model.run(SETUP + HUGE + "fault 1 0x40000000 --write")
    model.world.pin(1, A + 4096)
    model.run("file truncate c 1M")
    assert model.vm("thp_split_page_failed") == 1 and model.vm("thp_split_page") == 0
    assert model.nrpages() == 512 and model.orders(0, 512) == [(0, 9)]
    assert model.world.smaps(1)[0]["ShmemPmdMapped"] == 0


def test_a_pinned_thp_keeps_its_mappings_outside_the_hole(model):
    # __folio_split checks can_split_folio before unmap_folio: a pinned THP is not split, and
    # only the hole's own unmap_mapping_range touched its mappings (a PTE-mapped one elsewhere
    # keeps the rest; its PMD mapping in the first VMA was split by that unmap).
    model.run(SETUP + HUGE + "fault 1 0x40000000; mmap 1 0x40400000 2M --file c --prot rw --shared; "
              "madvise 1 0x40400000 2M nohugepage; fault 1 0x40400000")
    assert model.rss() == [2048, 2048]
    model.world.pin(1, A)
    model.run("file punch c 8K 4K")
    assert model.vm("thp_split_page_failed") == 1 and model.vm("thp_split_pmd") == 1
    assert model.rss() == [0, 2044] and model.orders(0, 512) == [(0, 9)]


def test_a_private_write_fault_past_eof_still_prepares_the_anon_vma(model):
    # do_cow_fault calls vmf_anon_prepare before __do_fault: the SIGBUS past EOF comes after the
    # VMA got its anon_vma, so fork (vma_needs_copy) copies the parent's file PTEs to the child.
    model.run(SETUP + "mmap 1 0x40000000 4M --file c --prot rw --private; file truncate c 1028K; "
              "touch 1 0x40000000 4M")
    assert model.run("fault 1 0x4018c000 --write") == "sigbus"
    model.run("proc fork 1 3")
    assert model.rss(3) == [1028]


def test_a_split_drops_the_new_folios_past_eof(model):
    # __folio_split removes from the page cache every new folio (but the first) that starts at or
    # past EOF. MADV_COLLAPSE filled the THP past the 1 MiB EOF; a 1-byte punch past EOF splits
    # it, and the 256 pages past EOF go (the kernel: nrpages 512 -> 256).
    model.run(SETUP + "file write c 0 4K; mmap 1 0x40000000 4M --file c --prot rw --shared; file truncate c 1M; "
              "madvise 1 0x40000000 4M collapse")
    assert model.nrpages() == 512
    model.run("file punch c 1320K 1")
    assert model.nrpages() == 256 and model.orders(0, 512) == [(0, 8)]


@pytest.mark.parametrize(
    "offset, length, rss",
    [
        # 6.18, memfd of 4 MiB mapped private and read whole (each figure from /proc/self/pagemap).
        (0, 1, 0),  # holelen 0: unmap_mapping_pages(0, 0) runs to ULONG_MAX, every page goes
        (1, 1, 4),  # unmap_start 4096, a negative holelen: page 1 to the end goes, page 0 stays
        (100, 200, 4),
        (4095, 1, 4096),  # ends at 4096: round_down gives 4095 < 4096, nothing is unmapped
        (20485, 10, 4096),  # inside page 5: the ordinary empty range
        (20480, 4096, 4092),  # page 5 whole: that page alone
    ],
)
def test_a_hole_ending_inside_page_0_unmaps_to_the_end_of_the_file(model, offset, length, rss):
    # shmem_fallocate: unmap_end = round_down(offset + len, PAGE_SIZE) - 1 is -1 for a hole that
    # ends inside page 0, and the (u64) comparison with unmap_start lets it through.
    model.run(SETUP + "mmap 1 0x40000000 4M --file c --prot rw --private; touch 1 0x40000000 4M; "
              f"file punch c {offset} {length}")
    assert model.rss() == [rss]
    assert model.nrpages() == (1023 if length == 4096 else 1024)
