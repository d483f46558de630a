"""The /proc and sysfs views of issue 12 on the in-process model: smaps' every field (Pss by
mapcount, dirty, shmem swap) as psutil parses it, smaps_rollup, status, pagemap and kpageflags bit
layouts, thpmaps' breakdown computed from our bytes, vmstat/meminfo keys and order, the new sysfs
knobs, and the map's PNG pixels."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
from helpers import FIXED, H, P, make_file_thp

from shared.knobs import MTHP_STATS, Knobs, sysfs_entries
from shared.pageflags import (
    KPF_ANON,
    KPF_BUDDY,
    KPF_COMPOUND_HEAD,
    KPF_COMPOUND_TAIL,
    KPF_DIRTY,
    KPF_MMAP,
    KPF_THP,
    PM_FILE,
    PM_MMAP_EXCLUSIVE,
    PM_PFN_MASK,
    PM_PRESENT,
)
from shared.thpctl import thpmaps
from shared.thpctl.mapview import KINDS, render_png, render_text
from shared.thpctl.render import (
    VMSTAT_ORDER,
    render_maps,
    render_meminfo,
    render_smaps,
    render_smaps_rollup,
    render_status,
)
from shared.vm import SMAPS_FIELDS

KERNEL_SMAPS_ORDER = ["Size", "KernelPageSize", "MMUPageSize", "Rss", "Pss", "Pss_Dirty", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty", "Referenced", "Anonymous", "KSM", "LazyFree", "AnonHugePages", "ShmemPmdMapped", "FilePmdMapped", "Shared_Hugetlb", "Private_Hugetlb", "Swap", "SwapPss", "Locked", "THPeligible"]


def test_smaps_prints_every_field_in_the_kernels_order(world):
    world.file_create("lib", 2 * H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "lib", prot="rx", shared=False)
    world.touch(1, a, H)
    text = render_smaps(world.smaps(1))
    keys = [line.split(":")[0] for line in text.splitlines()[1:-1]]
    assert keys == KERNEL_SMAPS_ORDER
    assert [*SMAPS_FIELDS, "THPeligible"] == KERNEL_SMAPS_ORDER
    live = Path("/proc/self/smaps")
    if live.exists() and "Pss_Dirty" in live.read_text():  # a 6.x kernel: the same order
        first = live.read_text().split("VmFlags")[0].splitlines()[1:]
        # show_smap prints ProtectionKey only where the CPU has protection keys
        # (arch_pkeys_enabled()); the model's machine has none, as README's smaps section says.
        live_keys = [line.split(":")[0] for line in first if not line.startswith("ProtectionKey:")]
        assert live_keys == KERNEL_SMAPS_ORDER
    header = text.splitlines()[0]
    assert header.startswith("40000000-40400000 r-xp 00000000 fe:01 1 ") and header.endswith(" /thpsplit/lib")
    assert header.index("/thpsplit/lib") == 73


def test_pss_divides_shared_pages_by_their_mapcount(world):
    world.file_create("lib", H)
    for pid in (1, 2):
        world.spawn(pid)
        world.mmap(pid, FIXED, H, "lib", prot="r", shared=True)
    world.touch(1, FIXED, H)
    world.touch(2, FIXED, H // 2)
    one, two = world.smaps(1)[0], world.smaps(2)[0]
    # The first MiB is mapped by both (Pss 512 kB each), the second by process 1 only.
    assert (one["Rss"], one["Pss"], one["Shared_Clean"], one["Private_Clean"]) == (2048, 1536, 1024, 1024)
    assert (two["Rss"], two["Pss"], two["Shared_Clean"], two["Private_Clean"]) == (1024, 512, 1024, 0)
    assert one["Referenced"] == 2048 and one["Pss_Dirty"] == 0 and one["Private_Dirty"] == 0


def test_dirty_pages_copies_and_shmem_swap(world):
    world.file_create("data", H)
    world.file_create("shm", H, shmem=True)
    world.spawn(1)
    shared = world.mmap(1, FIXED, H, "data", prot="rw", shared=True)
    private = world.mmap(1, FIXED + H, H, "data", prot="rw", shared=False)
    shm = world.mmap(1, FIXED + 2 * H, H, "shm", prot="rw", shared=True)
    world.touch(1, shared, 16 * P, write=True)  # dirties the page cache pages
    world.touch(1, private, 8 * P, write=True)  # copies: anon, dirty, private
    world.touch(1, shm, 4 * P, write=True)  # dirty: pageout swaps them (a clean page is dropped)
    assert world.madvise(1, shm, 2 * P, "pageout") == 0
    e = {row["start"]: row for row in world.smaps(1)}
    assert (e[shared]["Private_Dirty"], e[shared]["Pss_Dirty"], e[shared]["Anonymous"]) == (64, 64, 0)
    # The private mapping's copies are anon and dirty; the page cache pages under them are the shared ones.
    assert (e[private]["Anonymous"], e[private]["Private_Dirty"], e[private]["Rss"]) == (32, 32, 32)
    assert e[shm]["Swap"] == 8 and e[shm]["Rss"] == 8 and e[shm]["Private_Dirty"] == 8  # shmem is dirty
    assert e[shm]["SwapPss"] == 0  # shmem's swap is not a swap PTE
    assert e[shm]["path"] == "/dev/shm/shm" and e[shm]["dev"] == "00:19"
    rollup = world.smaps_rollup(1)
    assert rollup["Pss_Anon"] == 32 and rollup["Pss_File"] == 64 and rollup["Pss_Shmem"] == 8
    assert rollup["Rss"] == sum(row["Rss"] for row in e.values())
    assert render_smaps_rollup(rollup).splitlines()[0].endswith(" [rollup]")
    status = world.proc_status(1)
    assert (status["VmRSS"], status["RssAnon"], status["RssFile"], status["RssShmem"]) == (104, 32, 64, 8)
    assert status["VmSize"] == 3 * 2048 and status["VmData"] == 2048
    assert "RssShmem:\t       8 kB\n" in render_status(status)
    assert render_maps(world.maps(1)).count("\n") == 3


def test_status_high_water_marks_and_locked_memory(world):
    """fs/proc/task_mmu.c task_mem(): VmHWM is max(hiwater_rss, rss), and the kernel raises
    hiwater_rss before each zap lowers the rss (update_hiwater_rss in unmap_vmas' callers,
    try_to_unmap_one); VmPeak likewise from hiwater_vm, taken before a munmap
    (update_hiwater_vm); VmLck is locked_vm, the pages of VM_LOCKED VMAs."""
    world.file_create("data", 4 * H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 4 * H, "data", prot="r", shared=True)
    world.touch(1, a, 4 * H, stride=P)
    full = world.proc_status(1)
    assert full["VmHWM"] == full["VmRSS"] == 4 * 2048 and full["VmPeak"] == full["VmSize"] == 4 * 2048
    world.munmap(1, a + 2 * H, 2 * H)
    assert world.madvise(1, a, H, "dontneed") == 0
    status = world.proc_status(1)
    assert (status["VmRSS"], status["VmHWM"]) == (2048, 4 * 2048)
    assert (status["VmSize"], status["VmPeak"]) == (2 * 2048, 4 * 2048)
    assert status["VmLck"] == 0
    assert world.mlock(1, a, H) == 0
    assert world.proc_status(1)["VmLck"] == 2048


def test_psutil_parses_our_smaps_and_rollup(world, tmp_path, monkeypatch):
    psutil = pytest.importorskip("psutil")
    from psutil import _pslinux

    world.file_create("lib", 2 * H)
    for pid in (1, 2):
        world.spawn(pid)
        world.mmap(pid, FIXED, 2 * H, "lib", prot="rw", shared=False)
        world.touch(pid, FIXED, H)
    world.touch(1, FIXED + H, 4 * P, write=True)
    proc = tmp_path / "1"
    proc.mkdir()
    smaps = world.smaps(1)
    (proc / "smaps").write_text(render_smaps(smaps))
    (proc / "smaps_rollup").write_text(render_smaps_rollup(world.smaps_rollup(1)))
    monkeypatch.setattr(psutil, "PROCFS_PATH", str(tmp_path))
    p = _pslinux.Process(1)
    p._procfs_path = str(tmp_path)
    uss, pss, swap = p._parse_smaps()
    assert (uss, pss, swap) == p._parse_smaps_rollup()
    private = sum(e["Private_Clean"] + e["Private_Dirty"] for e in smaps)
    assert uss == private * 1024 and pss == sum(e["Pss"] for e in smaps) * 1024 > 0
    fields = "addr perms path rss size pss shared_clean shared_dirty private_clean private_dirty referenced anonymous swap"
    (raw,) = p.memory_maps()
    row = collections.namedtuple("pmmap_ext", fields)(*raw)  # psutil's own names for its tuple
    assert row.path == "/thpsplit/lib" and row.rss == smaps[0]["Rss"] * 1024
    assert row.pss == smaps[0]["Pss"] * 1024 and row.shared_clean == smaps[0]["Shared_Clean"] * 1024
    assert row.private_dirty == 16 * 1024 and row.anonymous == 16 * 1024
    assert row.shared_clean + row.private_clean + row.private_dirty + row.shared_dirty == row.rss


def test_pagemap_and_kpageflags_bits_of_a_pmd_mapped_thp(world):
    head = make_file_thp(world, "lib")
    for pid in (1, 2):
        world.spawn(pid)
        world.mmap(pid, FIXED, H, "lib", prot="r", shared=False)
        world.madvise(pid, FIXED, H, "hugepage")
        assert world.fault(pid, FIXED) == "pmd"
    entries = world.pagemap(1, FIXED, H)
    assert len(entries) == 512
    for i, e in enumerate(entries):
        assert e & PM_PRESENT and e & PM_FILE and not e & PM_MMAP_EXCLUSIVE  # two mappings
        assert e & PM_PFN_MASK == head + i
    smaps = world.smaps(1)[0]
    assert (smaps["FilePmdMapped"], smaps["Pss"], smaps["Shared_Clean"]) == (2048, 1024, 2048)
    got = world.kpageflags(head - 1, 3)
    flags = got["flags"]
    assert got["counts"][1:] == [2, 2]
    assert flags[1] & (KPF_COMPOUND_HEAD | KPF_THP | KPF_MMAP) == KPF_COMPOUND_HEAD | KPF_THP | KPF_MMAP
    assert flags[2] & KPF_COMPOUND_TAIL and not flags[2] & KPF_COMPOUND_HEAD and flags[2] & KPF_THP
    world.exit(2)
    assert world.pagemap(1, FIXED, P)[0] & PM_MMAP_EXCLUSIVE
    # The end of memory is a short read, as /proc/kpageflags is.
    end = len(world.collapser.mem.flags)
    assert len(world.kpageflags(end - 2, 10)["flags"]) == 2


def test_kpageflags_of_anon_and_dirty_pages(world):
    world.file_create("lib", H)
    world.spawn(1)
    world.mmap(1, FIXED, H, "lib", prot="rw", shared=False)
    world.touch(1, FIXED, 2 * P, write=True)
    (cow,) = {e & PM_PFN_MASK for e in world.pagemap(1, FIXED, P)}
    anon = world.kpageflags(cow)["flags"][0]
    assert anon & KPF_ANON and anon & KPF_MMAP and not anon & KPF_THP
    assert not world.pagemap(1, FIXED, P)[0] & PM_FILE
    world.file_write("lib", 0, 4 * P)
    page = world.collapser.by_name["lib"].get(0)
    assert world.kpageflags(page)["flags"][0] & KPF_DIRTY
    world.file_punch("lib", 0, H)
    assert world.kpageflags(page)["flags"][0] == KPF_BUDDY


def _thpmaps_of(world, pid: int) -> dict[str, int]:
    smaps_text = render_smaps(world.smaps(pid))
    pagemaps = {}
    for e in world.smaps(pid):
        pagemaps[(e["start"], e["end"])] = thpmaps.to_bytes(world.pagemap(pid, e["start"], e["end"] - e["start"]))

    def kpageflags(pfn: int) -> int:
        flags = world.kpageflags(pfn)["flags"]
        return flags[0] if flags else 0

    # The tool reads the files' bytes: kpageflags goes through them too.
    _, doc = thpmaps.report({pid: (smaps_text, pagemaps, lambda p: thpmaps.u64s(thpmaps.to_bytes([kpageflags(p)]))[0])})
    out: dict[str, int] = {}
    for vma in doc["processes"][str(pid)]:
        for k, v in vma["stats"].items():
            out[k] = out.get(k, 0) + v
    return out


def test_thpmaps_breakdown_computed_from_our_pagemap_and_kpageflags(world):
    make_file_thp(world, "pmd", 2 * H)
    make_file_thp(world, "pte", 2 * H)
    make_file_thp(world, "part", 2 * H)
    world.spawn(1)
    world.mmap(1, FIXED, H, "pmd", prot="r", shared=False)
    world.madvise(1, FIXED, H, "hugepage")
    assert world.fault(1, FIXED) == "pmd"
    # VM_NOHUGEPAGE: the THP is mapped by PTEs, all of it (a pte-mapped THP).
    world.mmap(1, FIXED + 2 * H, H, "pte", prot="r", shared=False)
    assert world.madvise(1, FIXED + 2 * H, H, "nohugepage") == 0
    world.touch(1, FIXED + 2 * H, H)
    # Half of it: partially mapped (a VMA over half the THP: finish_fault maps a cached large
    # folio whole, but only within the VMA).
    world.mmap(1, FIXED + 4 * H, H // 2, "part", prot="r", shared=False)
    assert world.madvise(1, FIXED + 4 * H, H // 2, "nohugepage") == 0
    world.touch(1, FIXED + 4 * H, H // 2)
    stats = _thpmaps_of(world, 1)
    assert stats["file-thp-pmd-aligned-2048kB"] == 2048
    assert stats["file-thp-pte-aligned-2048kB"] == 2048
    assert stats["file-thp-pte-partial"] == 1024
    assert stats["anon-thp-pmd-aligned-2048kB"] == 0 and stats["file-thp-pte-unaligned-2048kB"] == 0


def test_thpmaps_sees_an_unaligned_pte_mapped_thp(world):
    make_file_thp(world, "lib", 2 * H)
    world.spawn(1)
    # Mapped one page off a 2 MiB boundary: never PMD-suitable, every subpage by a PTE.
    world.mmap(1, FIXED + P, H, "lib", prot="r", shared=False)
    world.touch(1, FIXED + P, H)
    stats = _thpmaps_of(world, 1)
    assert stats["file-thp-pte-unaligned-2048kB"] == 2048 and stats["file-thp-pmd-aligned-2048kB"] == 0


def test_vmstat_and_meminfo_keys_follow_the_kernel(world):
    world.file_create("lib", H)
    world.spawn(1)
    world.mmap(1, FIXED, H, "lib", prot="rw", shared=True)
    world.touch(1, FIXED, 8 * P, write=True)
    vmstat = world.vmstat()
    for key in ("nr_mapped", "nr_dirty", "nr_writeback", "pgpgin", "thp_deferred_split_page", "thp_fault_alloc",
                "thp_fault_fallback", "drop_pagecache", "nr_shmem", "nr_shmem_hugepages", "nr_shmem_pmdmapped",
                "nr_anon_pages", "nr_page_table_pages"):  # fmt: skip
        assert key in vmstat, key
    assert (vmstat["nr_mapped"], vmstat["nr_dirty"], vmstat["pgpgin"]) == (8, 8, 32)
    known = [k for k in vmstat if k in VMSTAT_ORDER]
    assert sorted(known, key=VMSTAT_ORDER.index) == [
        k for k in VMSTAT_ORDER if k in vmstat
    ]
    world.file_sync("lib")
    assert world.vmstat()["nr_writeback"] == 8
    world.drop_caches()
    assert world.vmstat()["drop_pagecache"] == 1
    info = world.collapser.meminfo()
    assert list(info) == ["Cached", "SwapCached", "Dirty", "Writeback", "Mapped", "Shmem", "AnonHugePages",
                          "ShmemHugePages", "ShmemPmdMapped", "FileHugePages", "FilePmdMapped"]  # fmt: skip
    assert "Mapped:               32 kB\n" in render_meminfo(info)


def test_sysfs_has_the_kernels_other_files():
    knobs = Knobs()
    entries = sysfs_entries(knobs, None, {"khugepaged/pages_collapsed": 0, "khugepaged/full_scans": 0,
                                          **{f"hugepages-2048kB/stats/{s}": 0 for s in MTHP_STATS}})  # fmt: skip
    assert entries["hpage_pmd_size"]["text"] == "2097152"
    assert entries["use_zero_page"]["text"] == "1" and entries["shrink_underused"]["text"] == "1"
    assert entries["hugepages-2048kB/enabled"]["text"] == "always [inherit] madvise never"
    assert entries["hugepages-2048kB/shmem_enabled"]["text"] == "always [inherit] within_size advise never"
    assert entries["hugepages-2048kB/stats/split"]["value"] == 0
    from shared.knobs import KnobError

    with pytest.raises(KnobError) as err:
        knobs.set("hpage_pmd_size", "4096")
    assert err.value.errno_name == "EACCES"
    knobs.set("hugepages-2048kB/enabled", "never")
    assert knobs.render("hugepages-2048kB/enabled") == "always inherit madvise [never]"
    assert knobs.render("enabled") == "always [madvise] never"  # its own knob


def test_mthp_stats_count_shmem_allocations(make_world):
    from collapsed.procfs import mthp_stats

    world = make_world(shmem_enabled="always")
    world.file_create("shm", H, shmem=True)
    world.spawn(1)
    world.mmap(1, FIXED, H, "shm", prot="rw", shared=True)
    assert world.fault(1, FIXED) == "pmd"
    assert mthp_stats(world.collapser)["hugepages-2048kB/stats/shmem_alloc"] == 1


def test_map_text_and_png_pixels(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib import image

    rows = [
        {"start": 0x7F0000000000, "end": 0x7F0000000000 + 5 * H, "perms": "r-xp", "path": "/thpsplit/a", "cells": "PMTs."},
        {"start": 0x7F0000C00000 + P, "end": 0x7F0000C00000 + 2 * H, "perms": "r--s", "path": "/dev/shm/b", "cells": "TP"},
    ]
    text = render_text(rows)
    assert "  00007f0000000000 PMTs.\n" in text and "  00007f0000c00000 TP\n" in text
    assert text.endswith("legend: P PMD-mapped  M marked for retry  T pte-mapped THP  s small pages  . empty\n")
    path = tmp_path / "map.png"
    centres = render_png(rows, str(path))
    assert [c for _, _, c in centres] == [KINDS[k][1] for k in "PMTs.TP"]
    pixels = image.imread(str(path))
    for x, y, colour in centres:
        want = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
        got = tuple(round(float(v) * 255) for v in pixels[int(y), int(x)][:3])
        assert got == want, (x, y, colour, got)
