"""Filesystem kinds of regular files (issue 9): ``ro-thp`` (CONFIG_READ_ONLY_THP_FOR_FS, the
2019 design) and ``large-folio`` (ext4 on 6.18: PMD-order folios from readahead, no collapse).

The model tests run everywhere; the last ones compare the large-folio kind with a real ext4 file
on a loop device the kernel backend mounts itself (root, THP, loop and mkfs.ext4; otherwise
skipped with the reason)."""

from __future__ import annotations

import json

import pytest
from helpers import FIXED, H, ONE_PAGE_FLAGS, P, ok, smaps1, thpctl

from shared.sim import conformance as conf
from shared.sim import kernel as kmod
from shared.sim.kernel import BackendError, ScenarioError, parse_step
from shared.thpctl.launch import running_daemons
from shared.vm import FsKind

pytestmark = pytest.mark.kernel

LF = "large-folio"


def lf_world(make_world, size=2 * H, prot="r", hugepage=True, **knobs):
    world = make_world(**knobs)
    world.file_create("f", size, fs=LF)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "f", prot=prot, shared=False)
    if hugepage:
        assert world.madvise(1, a, 2 * H, "hugepage") == 0
    return world, a


def cached(world, name="f"):
    return sorted(i for i, v in world.collapser.by_name[name].entries() if v > 0)


def test_default_kind_is_ro_thp_and_file_ls_names_the_kind(make_world):
    world = make_world()
    world.file_create("a", H)
    world.file_create("b", H, fs=LF)
    world.file_create("s", H, shmem=True)
    kinds = {f["name"]: f["fs"] for f in world.file_ls()}
    assert kinds == {"a": FsKind.RO_THP, "b": LF, "s": ""}
    assert world.remapper.files.by_name["b"].large_folio
    assert not world.remapper.files.by_name["a"].large_folio


def test_vm_hugepage_fault_maps_a_pmd_from_readahead_even_with_readahead_off(make_world):
    # do_sync_mmap_readahead: VM_HUGEPAGE reads two PMD ranges with page_cache_ra_order(PMD
    # order) "even if readahead is disabled"; filemap_fault finds the folio, finish_fault's
    # do_set_pmd maps it. Readahead's folios count in nr_file_hugepages, with no thp_file_alloc.
    world, a = lf_world(make_world, read_ahead_kb=0)
    assert world.fault(1, a + 5 * P) == "pmd"
    assert world.fault(1, a + H) == "pmd"
    s = smaps1(world, 1)
    assert (s["Rss"], s["FilePmdMapped"], s["THPeligible"]) == (4096, 4096, 0)
    vm = world.vmstat()
    assert (vm["nr_file_hugepages"], vm["thp_file_mapped"], vm["thp_file_alloc"]) == (2, 2, 0)


def test_ro_thp_vm_hugepage_fault_reads_small_pages(make_world):
    world = make_world(read_ahead_kb=0)
    world.file_create("f", 2 * H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "f", prot="r", shared=False)
    world.madvise(1, a, 2 * H, "hugepage")
    assert world.fault(1, a) == "major"
    assert world.vmstat()["nr_file_hugepages"] == 0
    assert smaps1(world, 1)["THPeligible"] == 1


def test_madv_collapse_is_einval_and_khugepaged_leaves_a_large_folio_file(make_world):
    # __thp_vma_allowable_orders: no ->huge_fault and file_thp_enabled() false without
    # CONFIG_READ_ONLY_THP_FOR_FS, so madvise_collapse() answers EINVAL and khugepaged_enter_vma
    # / hugepage_vma_check refuse the VMA; smaps says THPeligible 0.
    world, a = lf_world(make_world, hugepage=False)
    world.madvise(1, a, 2 * H, "hugepage")
    world.touch(1, a, 2 * H, stride=64 * 1024)
    assert world.madvise(1, a, 2 * H, "collapse") == "EINVAL"
    world.sysfs_set("khugepaged/scan_sleep_millisecs", 10)
    world.wait_scans(2)
    assert world.vmstat()["thp_collapse_alloc"] == 0


def test_eof_tail_is_read_in_small_pages(make_world):
    # page_cache_ra_order lowers the order where a folio would pass EOF (ext4 then has an
    # order-8 folio for 1 MiB; folios below PMD order are small pages in the model): a PMD only
    # for the range wholly below EOF.
    world, a = lf_world(make_world, size=3 * H // 2)
    assert world.fault(1, a) == "pmd"
    assert world.fault(1, a + H) == "minor"
    assert cached(world) == list(range(768))
    assert world.vmstat()["nr_file_hugepages"] == 1


def test_a_cached_page_in_the_range_ends_pmd_readahead(make_world):
    # ra_alloc_folio's -EEXIST ends the large folios; do_page_cache_ra reads the rest small.
    world, a = lf_world(make_world, hugepage=False, read_ahead_kb=0)
    assert world.fault(1, a + 3 * P) == "major"
    world.madvise(1, a, 2 * H, "hugepage")
    assert world.fault(1, a + 4 * P) == "major"
    assert world.fault(1, a + H) == "minor"
    assert world.vmstat()["nr_file_hugepages"] == 0
    assert cached(world) == list(range(1024))


def test_a_2m_aligned_write_makes_a_thp_that_a_fault_maps_without_madvise(make_world):
    # write_begin asks __filemap_get_folio for the chunk's order (fgf_set_order); do_set_pmd
    # maps a PMD-order folio in any suitable VMA, VM_HUGEPAGE or not (vma_thp_disabled only).
    world = make_world(read_ahead_kb=0)
    world.file_create("f", 2 * H, fs=LF)
    world.file_write("f", 0, H)
    world.file_write("f", H, 64 * 1024)
    assert world.vmstat()["nr_file_hugepages"] == 1
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "f", prot="r", shared=False)
    assert world.fault(1, a + 7 * P) == "pmd"
    assert world.fault(1, a + H) == "minor"
    world.madvise(1, a, 2 * H, "nohugepage")
    world.madvise(1, a, H, "dontneed")
    # VM_NOHUGEPAGE: vma_thp_disabled() refuses the PMD; the folio is mapped whole with PTEs.
    assert world.fault(1, a) == "minor"
    assert smaps1(world, 1)["Rss"] == 2048 + 4


def test_read_around_marks_its_async_quarter_and_fault_around_skips_the_mark(make_world):
    # do_sync_mmap_readahead's read-around: ra_pages (32) centred on the fault, async_size 8:
    # the page at start + 24 gets PG_readahead, which next_uptodate_folio skips, so fault-around
    # maps 15 of its 16 pages (as ext4 on 6.18 shows).
    world, a = lf_world(make_world, hugepage=False, read_ahead_kb=128, fault_around_bytes=65536)
    assert world.fault(1, a + 256 * P) == "major"
    assert cached(world) == list(range(240, 272))
    assert smaps1(world, 1)["Rss"] == 60
    # A fault on the mark: page_cache_async_ra at the expected index moves the window on by 32
    # pages; the mark goes, and the next window's first (order-2) folio carries the new one.
    assert world.fault(1, a + 264 * P) == "minor"
    assert cached(world) == list(range(240, 304))
    assert smaps1(world, 1)["Rss"] == 64


def test_exec_mapping_reads_forward_to_the_vma_end_with_no_mark(make_world):
    # The VM_EXEC branch (6.16+): from the fault, read_ahead_kb at most, not past the VMA; no
    # async part, so nothing is marked and fault-around maps the whole window.
    world, a = lf_world(make_world, prot="rx", hugepage=False, read_ahead_kb=128, fault_around_bytes=65536)
    assert world.fault(1, a + 256 * P) == "major"
    assert cached(world) == list(range(256, 288))
    assert smaps1(world, 1)["Rss"] == 64
    assert world.fault(1, a + 1023 * P) == "major"
    assert cached(world)[-1] == 1023


def test_the_scenario_language_takes_fs():
    step = parse_step("file create c --size 4M --fs large-folio")
    assert step is not None and step.args["fs"] == LF
    assert step.line() == "file create c --size 4M --fs large-folio"
    assert parse_step("file create c --size 4M").args["fs"] == "ro-thp"
    with pytest.raises(ScenarioError):
        parse_step("file create c --size 4M --fs xfs")
    with pytest.raises(ScenarioError):
        parse_step("file create c --size 4M --shmem --fs large-folio")


def test_large_folio_generator_speaks_the_scenario_language():
    steps = conf.generate(conf.RandomDraw(3), 12, "large-folio")
    assert steps[0].op == "file create" and steps[0].args["fs"] == LF
    assert all(s.op != "mmap" or s.args["prot"] in ("r", "rx") for s in steps)
    assert conf.parse_steps_text(conf.steps_text(steps)) == steps
    # the model against itself agrees
    h = conf.Harness(conf.ModelBackend(conf.Settings()), conf.Settings())
    for seed in range(20):
        r = h.run(conf.generate(conf.RandomDraw(seed), 12, "large-folio"))
        assert r.divergence is None, r.divergence.report()


async def test_thpctl_file_create_fs_reaches_both_daemons(tmp_path):
    # FileCreate.fs to collapsed, FileInfo.fs on to remapd: readahead's PMD at the first fault,
    # and the remapper's MADV_COLLAPSE refusal.
    async with running_daemons(tmp_path, "unix", remapd_args=ONE_PAGE_FLAGS) as d:
        assert "file large-folio" in await ok(d, "file", "create", "lf", "--size", "4M", "--fs", "large-folio")
        await ok(d, "file", "create", "rt", "--size", "4K")
        files = {f["name"]: f["fs"] for f in json.loads(await ok(d, "--json", "file", "ls"))}
        assert files == {"lf": "large-folio", "rt": "ro-thp"}
        await ok(d, "proc", "spawn", "1")
        a = int(await ok(d, "mmap", "1", "auto", "4M", "--file", "lf", "--prot", "rx", "--private"), 16)
        assert (await ok(d, "madvise", "1", hex(a), "4M", "hugepage")).strip() == "0"
        assert (await ok(d, "fault", "1", hex(a))).strip() == "pmd"
        assert (await thpctl(d, "madvise", "1", hex(a), "4M", "collapse"))[:2] == (1, "EINVAL\n")


# -- against the kernel: ext4 on a loop device ---------------------------------------------------


@pytest.fixture(scope="module")
def ext4_session():
    reason = conf.kernel_unavailable() or kmod.ext4_unavailable()
    if reason:
        pytest.skip(f"large-folio conformance against ext4: {reason}")
    try:
        s = conf.KernelSession(("advise",)).__enter__()
    except BackendError as err:
        pytest.skip(f"large-folio conformance against ext4: {err}")
    roots = [kb.root for kb in s.backends.values()]
    try:
        yield s
    finally:
        s.__exit__(None, None, None)
    with open("/proc/mounts") as f:
        left = [line for line in f if any(root in line for root in roots)]
    assert not left, f"the session's ext4 or tmpfs mount is left: {left}"


KERNEL_CASES = {
    "hugepage-pmd-at-first-fault": "file create c --size 4M --fs large-folio; proc spawn 1; "
    "mmap 1 0x40000000 4M --file c --prot rx --private; madvise 1 0x40000000 4M hugepage; "
    "fault 1 0x40000000; fault 1 0x40200000; madvise 1 0x40000000 4M collapse",
    "read-around-mark": "file create c --size 4M --fs large-folio; proc spawn 1; "
    "mmap 1 0x40000000 4M --file c --prot r --private; fault 1 0x40100000; fault 1 0x40108000",
    "exec-read-forward": "file create c --size 4M --fs large-folio; proc spawn 1; "
    "mmap 1 0x40000000 4M --file c --prot rx --shared; fault 1 0x40100000; fault 1 0x401ff000",
    "folio-before-vma": "file create c --size 4M --fs large-folio; proc spawn 1; "
    "mmap 1 0x40000000 4M --file c --prot r --shared; munmap 1 0x402e6000 4K; madvise 1 0x402e7000 1124K hugepage; "
    "fault 1 0x40300000; fault 1 0x40301000; fault 1 0x40310000",
    "folio-across-page-tables": "file create c --size 4M --fs large-folio; file write c 2M 2M; proc spawn 1; "
    "mmap 1 0x40100000 4M --file c --prot rx --shared; fault 1 0x4047f000; fault 1 0x404ff000; fault 1 0x403ff000",
    "folio-at-eof-vma-ends-inside": "file create c --size 4M --fs large-folio; proc spawn 1; "
    "mmap 1 0x40000000 4M --file c --prot rx --shared; madvise 1 0x40000000 4M hugepage; "
    "munmap 1 0x4033b000 792K; fault 1 0x40200000; fault 1 0x40280000",
    "folio-at-eof-window-only": "file create c --size 4M --fs large-folio; file write c 2M 2M; proc spawn 1; "
    "mmap 1 0x40000000 4M --file c --prot r --shared; madvise 1 0x40000000 4M nohugepage; "
    "fault 1 0x40200000; madvise 1 0x40200000 2044K dontneed; fault 1 0x40300000",
    "written-folio-will-not-split": "file create c --size 4M --fs large-folio; file write c 2M 2M; proc spawn 1; "
    "mmap 1 0x40000000 4M --file c --prot r --shared; madvise 1 0x40000000 4M hugepage; fault 1 0x40000000; "
    "fault 1 0x40200000; file truncate c 3M; fault 1 0x40200000; fault 1 0x402ff000; fault 1 0x40300000",
    "write-2m-then-fault": "file create c --size 4M --fs large-folio; file write c 0 2M; proc spawn 1; "
    "mmap 1 0x40000000 4M --file c --prot r --shared; fault 1 0x40000000; madvise 1 0x40000000 4M nohugepage; "
    "madvise 1 0x40000000 4M dontneed; fault 1 0x40000000",
}


@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_large_folio_agrees_with_ext4(ext4_session, case):
    r = ext4_session.harness(conf.Settings()).run(conf.parse_steps_text(KERNEL_CASES[case]))
    assert r.divergence is None, r.divergence.report()


def test_random_large_folio_sequences_agree_with_ext4(ext4_session):
    h = ext4_session.harness(conf.Settings())
    fig = conf.run_seeds(h, range(12), 10, "large-folio", shrink=False)
    assert not fig.unexpected, fig.render()


def test_fault_around_maps_nothing_of_a_pmd_folio_that_starts_before_the_vma(make_world):
    # filemap_map_pages meets a PMD-order folio that holds the file's last page, with the PMD
    # none: 6.18 maps none of the window (its off-by-one i_size test skips filemap_map_pmd, so
    # no page table is installed), the fault maps its one page. The next fault finds the page
    # table and maps its window.
    world = make_world(read_ahead_kb=0, fault_around_bytes=65536)
    world.file_create("f", 2 * H, fs=LF)
    world.file_write("f", H, H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "f", prot="r")
    world.munmap(1, a + H + 4 * P, P)
    b = a + H + 5 * P
    def rss() -> int:
        return next(e["Rss"] for e in world.smaps(1) if e["start"] == b)

    assert world.fault(1, a + H + 256 * P) == "minor"
    assert rss() == 4
    assert world.fault(1, a + H + 257 * P) == "minor"
    assert rss() == 64


@pytest.mark.parametrize("size, window", [(2 * H, 4), (3 * H, 64)])
def test_fault_around_refuses_the_folio_that_holds_the_last_page(make_world, size, window):
    # mm/filemap.c filemap_map_pages (6.18): "file_end >= folio_next_index(folio)", file_end
    # the last page's index, fails for a folio that ends right at EOF. The first folio the scan
    # finds is that one: filemap_map_pmd is skipped, with the PMD none pte_offset_map_lock()
    # finds no table and fault-around maps nothing; the fault maps its page. A file one PMD
    # longer leaves the folio inside i_size: the window is mapped (ext4: 4 kB and 64 kB, the
    # major fault at the start of a folio the VMA ends inside).
    world = make_world(read_ahead_kb=0, fault_around_bytes=65536)
    world.file_create("f", size, fs=LF)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "f", prot="r")
    assert world.madvise(1, a, 2 * H, "hugepage") == 0
    world.munmap(1, a + 827 * P, 2 * H - 827 * P)  # the VMA ends inside the folio
    assert world.fault(1, a + H) == "major"
    assert smaps1(world, 1)["Rss"] == window
    assert world.fault(1, a + H + 128 * P) == "minor"
    assert smaps1(world, 1)["Rss"] == window + 64


@pytest.mark.parametrize("size, rss", [(2 * H, 4 + 64), (3 * H, 2048)])
def test_fault_around_maps_the_folio_at_eof_only_around_the_fault(make_world, size, rss):
    # mm/filemap.c filemap_map_folio_range (6.18) maps a large folio whole only if "file_end >=
    # folio_next_index(folio)": the folio holding the last page gets just the window, around
    # the one page left mapped in its table (ext4: 68 kB for a 4 MiB file, 2048 for 6 MiB).
    world = make_world(fault_around_bytes=65536)
    world.file_create("f", size, fs=LF)
    world.file_write("f", H, H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "f", prot="r")
    assert world.madvise(1, a, 2 * H, "nohugepage") == 0
    assert world.fault(1, a + H) == "minor"
    assert smaps1(world, 1)["Rss"] == 2048  # finish_fault on a new table: whole
    assert world.madvise(1, a + H, H - P, "dontneed") == 0
    assert world.fault(1, a + H + 256 * P) == "minor"
    assert smaps1(world, 1)["Rss"] == rss


@pytest.mark.parametrize("written, nrpages", [(False, 512), (True, 1024)])
def test_a_truncate_that_cannot_split_the_folio_unmaps_it(make_world, written, nrpages):
    # mm/truncate.c truncate_inode_partial_folio -> try_folio_split_or_unmap (6.18): a regular
    # file's folio that would not split is unmapped (try_to_unmap); a clean one then leaves the
    # cache whole (truncate_inode_folio), a dirty one stays, its pages past EOF too. A pin
    # fails can_split_folio; a written folio fails __folio_split's filemap_release_folio (ext4's
    # dirty buffers) even unpinned. ext4 (a vmsplice'd page for the pin): 512 and 1024 pages.
    world = make_world(fault_around_bytes=65536)
    world.file_create("f", 2 * H, fs=LF)
    if written:
        world.file_write("f", H, H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "f", prot="r")
    assert world.madvise(1, a, 2 * H, "hugepage") == 0
    assert world.fault(1, a) == "pmd" and world.fault(1, a + H) == "pmd"
    if not written:
        world.pin(1, a + H + P)
    world.file_truncate("f", H + H // 2)
    assert world.vmstat()["thp_split_page_failed"] == 1
    assert world.file_ls()[0]["nrpages"] == nrpages
    assert [(e["Rss"], e["FilePmdMapped"]) for e in world.smaps(1)] == [(2048, 2048)]


def test_a_vma_that_starts_at_the_folio_faults_around_it_as_usual(make_world):
    # The folio starts where the VMA does: do_set_pmd refuses (the VMA ends inside the PMD, or
    # maps it 1 MiB off its alignment), yet fault-around maps its window (ext4 on 6.18).
    world = make_world(read_ahead_kb=0, fault_around_bytes=65536)
    world.file_create("f", 2 * H, fs=LF)
    world.file_write("f", 0, H)
    world.spawn(1)
    a = world.mmap(1, FIXED + H // 2, H // 2, "f", prot="r")
    assert world.fault(1, a + 77 * P) == "minor"
    assert smaps1(world, 1)["Rss"] == 64
    world.spawn(2)
    b = world.mmap(2, FIXED, H // 4, "f", prot="r")
    assert world.fault(2, b) == "minor"
    assert smaps1(world, 2)["Rss"] == 64


def test_fault_around_maps_nothing_of_a_pmd_folio_begun_in_an_earlier_page_table(make_world):
    # A VMA that maps the file 1 MiB off its alignment: the folio's second half lies in the next
    # page table, where fault-around with the PMD none maps none of it; the next fault there
    # maps its window (ext4 on 6.18).
    world = make_world(read_ahead_kb=0, fault_around_bytes=65536)
    world.file_create("f", 2 * H, fs=LF)
    world.file_write("f", H, H)
    world.spawn(1)
    a = world.mmap(1, FIXED + H // 2, 2 * H, "f", prot="rx")
    assert world.fault(1, a + (512 + 383) * P) == "minor"
    assert smaps1(world, 1)["Rss"] == 4
    assert world.fault(1, a + (512 + 511) * P) == "minor"
    assert smaps1(world, 1)["Rss"] == 4 + 64
    # In the folio's first page table: none of the window either, as the VMA maps some of the
    # folio in another page table.
    assert world.fault(1, a + (512 + 255) * P) == "minor"
    assert smaps1(world, 1)["Rss"] == 4 + 64 + 4
