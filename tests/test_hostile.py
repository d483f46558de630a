"""What a hostile or careless client can do to the daemons, and what they must survive (issue 14).

Each test drives real daemon processes: the bugs lived in the trio shell and its interplay with
the model, where the in-process world cannot see them.
"""

from __future__ import annotations

import trio
from helpers import ONE_PAGE_FLAGS, ok

from shared.thpctl.launch import running_daemons


async def test_zero_sleep_knobs_leave_the_daemons_responsive(workdir):
    # The kernel accepts 0 for both sleeps: khugepaged and the remapper then run back to back.
    # The daemons must keep answering, keep scanning, and still stop on SIGTERM.
    async with running_daemons(workdir, remapd_args=ONE_PAGE_FLAGS) as d:
        await ok(d, "sysfs", "set", "thpsplit/remap_sleep_millisecs", "0")
        await ok(d, "sysfs", "set", "khugepaged/scan_sleep_millisecs", "0")
        await ok(d, "file", "create", "lib", "--size", "4M")
        await ok(d, "proc", "spawn", "1")
        addr = (await ok(d, "mmap", "1", "auto", "4M", "--file", "lib", "--prot", "rx", "--private")).strip()
        await ok(d, "madvise", "1", addr, "4M", "hugepage")
        with trio.fail_after(20):
            await ok(d, "touch", "1", addr, "4M")
            await ok(d, "wait-scans", "3", "--timeout", "15")
            assert "FilePmdMapped:      4096 kB" in await ok(d, "smaps", "1")
            status = await ok(d, "status")
            assert "collapsed:" in status and "remapd:" in status
    # running_daemons stops both with SIGTERM; a wedged daemon ignores it and is killed after
    # the stop timeout, so exit status 0 means neither was wedged.
    assert d.remapd.proc is not None and d.collapsed.proc is not None
    assert (d.remapd.proc.returncode, d.collapsed.proc.returncode) == (0, 0)


def test_a_touch_over_a_huge_hole_costs_what_is_mapped(world):
    # thpctl touch 1 0x10000 100T used to fault 2.7e10 times, one by one (hours, inline).
    from helpers import FIXED, H

    world.file_create("lib", 2 * H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "lib", prot="r")
    before = world.vmstat()["pgfault"]
    counts = world.touch(1, 0x10000, 100 << 40)
    pages = (100 << 40) // 4096
    assert counts["sigsegv"] + counts["major"] == pages
    assert counts["major"] == 2 * H // 4096  # readahead off in tests: every mapped page faults
    assert world.vmstat()["pgfault"] - before == pages
    # A write to a read-only VMA refuses the whole VMA the same way, and beyond TASK_SIZE too.
    assert world.touch(1, a, 2 * H, write=True, stride=4096) == {"sigsegv": 2 * H // 4096}
    assert world.touch(1, -(1 << 40), 1 << 40, stride=1 << 20) == {"sigsegv": 1 << 20}
    assert world.touch(1, 1 << 47, 1 << 40, stride=1 << 20) == {"sigsegv": 1 << 20}


def test_munmap_of_a_negative_address_is_einval(world):
    # __do_munmap: a start beyond TASK_SIZE (here -4096 as unsigned) is -EINVAL.
    from shared.errors import UserError

    world.spawn(1)
    try:
        world.munmap(1, -4096, 4096)
    except UserError as err:
        assert err.errno_name == "EINVAL"
    else:
        raise AssertionError("munmap(-4096) succeeded")


def test_mmap_past_the_largest_file_offset_is_eoverflow(world):
    # file_mmap_ok: an offset + length beyond MAX_LFS_FILESIZE (e.g. offset 2^63 - 4096, 8K).
    from shared.errors import UserError

    world.file_create("lib", 4096)
    world.spawn(1)
    try:
        world.mmap(1, None, 8192, "lib", offset=(1 << 63) - 4096)
    except UserError as err:
        assert err.errno_name == "EOVERFLOW"
    else:
        raise AssertionError("the mapping was accepted")
    assert world.smaps(1) == []
