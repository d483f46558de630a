"""The sans-IO task runner: effects, time, and a loop that never sleeps."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from shared.actor import RESCHED_MS, Actor, Sleep, Wait


def spinner(actor: Actor, passes: list[float]) -> Generator[Any, Any, None]:
    """khugepaged with scan_sleep_millisecs = 0: a pass, then a sleep that is already due."""
    while True:
        passes.append(actor.now)
        yield Sleep(actor.now + 0)


def test_a_zero_sleep_loop_hands_control_back() -> None:
    actor = Actor()
    passes: list[float] = []
    actor.spawn(spinner(actor, passes))  # returns: the loop does not spin inside one burst
    assert passes == [0.0, 0.0]
    assert actor.next_deadline() == RESCHED_MS
    actor.advance(10 * RESCHED_MS)
    # Two passes per jiffy of model time: bounded work per advance, and time moves on.
    assert len(passes) == 22
    assert passes[-1] == 10 * RESCHED_MS


def test_a_due_sleep_once_in_a_burst_resumes_at_once() -> None:
    # A writeback window of 0 ms completes within the call that started it.
    actor = Actor()
    results: list[str] = []

    def once() -> Generator[Any, Any, str]:
        yield Sleep(actor.now)
        return "done"

    actor.spawn(once(), results.append)
    assert results == ["done"]
    assert actor.next_deadline() is None


def test_a_waiting_task_resumes_on_notify_and_not_before() -> None:
    actor = Actor()
    results: list[str] = []

    def waiter() -> Generator[Any, Any, str]:
        yield Wait("page")
        return "woken"

    actor.spawn(waiter(), results.append)
    actor.advance(1000)
    assert results == []
    actor.notify("page")
    assert results == ["woken"]


def test_khugepaged_with_zero_sleep_makes_progress_on_the_virtual_clock(make_world) -> None:
    from helpers import FIXED, H

    world = make_world(scan_sleep_millisecs=0)
    world.file_create("lib", 2 * H)
    world.spawn(1)
    a = world.mmap(1, FIXED, 2 * H, "lib", prot="rx", shared=False)
    world.madvise(1, a, 2 * H, "hugepage")
    world.touch(1, a, 2 * H)
    world.advance(20)  # returns: khugepaged's passes take at least a jiffy each
    assert world.collapser.khugepaged.full_scans >= 10
    assert world.smaps(1)[0]["FilePmdMapped"] == 4096
