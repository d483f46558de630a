"""The kernel backend's knob journal: a run killed while it held the machine lock (SIGKILL, a
SIGTERM'd pytest) restores nothing, so the next holder of the lock puts back the THP knobs it
left changed, from the journal beside the lock, and unmounts the tmpfs it left mounted. Its own
module, so that no fixture of another holds the lock while the dead run is played."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shared.sim.kernel import (
    KNOB_JOURNAL,
    SysfsGuard,
    _MachineLock,
    read_knob,
    thp_available,
)

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parent.parent
KNOB = "khugepaged/scan_sleep_millisecs"


def test_knobs_and_mounts_a_killed_run_left_are_put_back_by_the_next_holder():
    reason = thp_available()
    if reason:
        pytest.skip(f"kernel backend: {reason}")
    # A fixture that left the lock taken (a guard entered twice) would keep the dead run out.
    assert _MachineLock.depth == 0, "this process still holds the machine lock"
    before = read_knob(KNOB)
    other = "12345" if before != "12345" else "23456"
    dead = textwrap.dedent(f"""
        import os, signal, subprocess, tempfile
        from shared.sim.kernel import SysfsGuard
        guard = SysfsGuard(lock_timeout=30).__enter__()
        guard.set({KNOB!r}, {other!r})
        point = tempfile.mkdtemp(prefix="thpsplit-kernel-")
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", point], check=True)
        print(point, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    run = subprocess.run([sys.executable, "-c", dead], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=400)
    assert run.returncode == -9, run.stderr
    point = run.stdout.strip()
    assert read_knob(KNOB) == other and os.path.exists(KNOB_JOURNAL)
    with open("/proc/mounts") as f:
        assert point in f.read()
    with SysfsGuard():
        assert read_knob(KNOB) == before
        with open("/proc/mounts") as f:
            assert point not in f.read()
    assert not os.path.exists(KNOB_JOURNAL) and not os.path.exists(point)
