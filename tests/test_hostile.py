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
