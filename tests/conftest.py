"""Shared fixtures: a fresh in-process world, checked after every operation."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

from shared.knobs import Knobs
from shared.sim.kernel import _MachineLock
from shared.sim.world import World

# CI runs a fixed set of examples (derandomized): a submission lands on what was tested here.
# Locally every run explores new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


# Tests that drive this machine's kernel hold a machine-wide flock for as long as a module's
# session lasts (shared/sim/kernel.py): under pytest-xdist (.ci/test runs two workers) they all go
# to one worker, in order, rather than time out on the lock the other worker holds. A test that
# takes the lock unmarked fails at once, so a new kernel module cannot be left out of the group.
_running: list[pytest.Item] = []
_acquire = _MachineLock.acquire.__func__  # type: ignore[attr-defined]


def _marked_acquire(cls: type[_MachineLock], timeout: float) -> None:
    if _running and _running[0].get_closest_marker("kernel") is None:
        raise AssertionError(f"{_running[0].nodeid} drives the kernel: add pytestmark = pytest.mark.kernel to its module")
    _acquire(cls, timeout)


_MachineLock.acquire = classmethod(_marked_acquire)  # type: ignore[method-assign,assignment]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("kernel") is not None:
            item.add_marker(pytest.mark.xdist_group("kernel"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _running[:] = [item]
    try:
        return (yield)
    finally:
        _running.clear()


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
