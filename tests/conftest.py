"""Shared fixtures: a fresh in-process world, checked after every operation."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

from shared.knobs import Knobs
from shared.sim.world import World

# CI runs a fixed set of examples (derandomized): a submission lands on what was tested here.
# Locally every run explores new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


class CheckedWorld(World):
    """A World that runs the invariant checker after every operation and every clock advance."""

    def settle(self) -> None:
        super().settle()
        if getattr(self, "_checking", True) and hasattr(self, "remapper"):
            self.check()


# Unit tests count faults and pages one by one: readahead and fault-around off unless a test
# turns them on (tests/test_readahead.py does).
ONE_PAGE_AT_A_TIME = {"read_ahead_kb": 0, "fault_around_bytes": 4096}


@pytest.fixture
def world() -> CheckedWorld:
    return CheckedWorld(Knobs(**ONE_PAGE_AT_A_TIME))


@pytest.fixture
def make_world():
    def make(seed: int | None = None, **knobs) -> CheckedWorld:
        return CheckedWorld(Knobs(**{**ONE_PAGE_AT_A_TIME, **knobs}), seed=seed)

    return make


@pytest.fixture
def workdir(tmp_path: Path):
    """A directory for daemon sockets and logs. sun_path holds 108 bytes: a long test name in
    tmp_path could overflow it, so long paths are swapped for a short temporary one."""
    if len(str(tmp_path / "collapsed.sock")) < 100:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="thp-"))
    yield short
    shutil.rmtree(short, ignore_errors=True)
