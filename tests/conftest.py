"""Shared fixtures: a fresh in-process world, checked after every operation."""

from __future__ import annotations

import pytest

from shared.knobs import Knobs
from shared.world import World


class CheckedWorld(World):
    """A World that runs the invariant checker after every operation and every clock advance."""

    def settle(self) -> None:
        super().settle()
        if getattr(self, "_checking", True) and hasattr(self, "remapper"):
            self.check()


@pytest.fixture
def world() -> CheckedWorld:
    return CheckedWorld()


@pytest.fixture
def make_world():
    def make(seed: int | None = None, **knobs) -> CheckedWorld:
        return CheckedWorld(Knobs(**knobs), seed=seed)

    return make
