"""The random operation sequences of test_stateful, with the collapser yielding every few pages
(as a daemon's does) and the remapper dying and coming back between steps.

Chunked loops add interleavings inside writes, truncates, punches, drop_caches and reclaim; a
restarted remapper drops every mapping, pin and folio lock the old one held. The invariant
checker runs after every step; every operation must still finish.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis.stateful import precondition, rule
from test_stateful import ModelMachine

# Small, so that the files here (a few MiB) cross many chunk boundaries.
CHUNK = 8


class HardenedMachine(ModelMachine):
    def _do(self, actor_name: str, make) -> None:
        # restart_collapser makes a new collapser: it yields too.
        self.world.collapser.fileops.resched_pages = CHUNK
        super()._do(actor_name, make)

    @precondition(lambda self: not self.pending)
    @rule()
    def restart_remapper(self):
        self.world.restart_remapper()


TestHardened = HardenedMachine.TestCase
TestHardened.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
