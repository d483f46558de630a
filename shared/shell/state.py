"""``--state-dir``: a daemon's model state saved to disk periodically and at shutdown, and read
back at start (:mod:`shared.persist` holds the file format and the atomic write).

The state is taken in the trio thread, between two events, so it is one consistent moment of the
model; encoding and writing (with its fsyncs) run in a worker thread, so a large page cache does
not stall the daemon. At shutdown the final snapshot is taken after requests in flight had their
grace period and while the peer link is still up (remapd's page tables are still whole then).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from shared import persist
from shared.knobs import KnobError, Knobs
from shared.logs import get_logger
from shared.shell.config import KNOB_NAMES, knob_env, knobs_from

log = get_logger("thpsplit.state")

ENV_STATE_DIR = "THPSPLIT_STATE_DIR"
ENV_SNAPSHOT_INTERVAL = "THPSPLIT_SNAPSHOT_INTERVAL"
SNAPSHOT_INTERVAL_S = 60.0


def add_state_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        default=os.environ.get(ENV_STATE_DIR) or None,
        help=f"keep the modelled world in DIR across restarts: a snapshot at shutdown and every "
        f"--snapshot-interval seconds, restored at start (${ENV_STATE_DIR}; default: none, a "
        "restart starts empty)",
    )
    parser.add_argument(
        "--snapshot-interval",
        metavar="SECONDS",
        type=float,
        default=float(os.environ.get(ENV_SNAPSHOT_INTERVAL) or SNAPSHOT_INTERVAL_S),
        help=f"seconds between snapshots with --state-dir; 0: only at shutdown "
        f"(${ENV_SNAPSHOT_INTERVAL}; default {SNAPSHOT_INTERVAL_S:g})",
    )


def explicit_knobs(args: argparse.Namespace) -> set[str]:
    """The knobs given on the command line or in the environment: they override a snapshot's."""
    return {
        name
        for name in KNOB_NAMES
        if getattr(args, "knob:" + name, None) is not None or os.environ.get(knob_env(name)) is not None
    }


_Core = TypeVar("_Core")


def restore_from(
    args: argparse.Namespace, daemon: str, restore: Callable[[dict[str, Any], Knobs, set[str]], _Core]
) -> tuple[StateDir | None, _Core | None]:
    """With --state-dir: where ``daemon``'s snapshots go, and the core ``restore`` builds from
    the snapshot there (with the knobs the command line gives and which of them it gave
    explicitly), if there is one.

    Errors:
        SnapshotError: the snapshot is unusable; nothing was applied.
    """
    if not args.state_dir:
        return None, None
    state = StateDir(args.state_dir, daemon, args.snapshot_interval)
    saved = state.load()
    if saved is None:
        return state, None
    try:
        knobs = knobs_from(args)
    except KnobError:
        return state, None  # daemon_main reports the bad knob and exits
    return state, restore(saved, knobs, explicit_knobs(args))


class StateDir:
    """Where one daemon keeps its snapshot, and how often it writes it."""

    def __init__(self, directory: str, daemon: str, interval_s: float):
        self.directory = Path(directory)
        self.daemon = daemon
        self.interval_s = interval_s
        # What to save: set by the daemon to its model's snapshot function.
        self.take: Callable[[], dict[str, Any]] = dict
        self.saved = 0
        self.restored = False  # set when the daemon started from the snapshot

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None (no snapshot yet).

        Errors:
            SnapshotError: the snapshot cannot be used (said in one line).
        """
        state = persist.load(self.directory, self.daemon)
        self.restored = state is not None
        return state

    async def save(self) -> None:
        t0 = time.perf_counter()
        state = self.take()
        took = time.perf_counter() - t0
        size = await trio.to_thread.run_sync(persist.save, self.directory, self.daemon, state)
        self.saved += 1
        log.info(
            "snapshot_saved",
            path=str(persist.snapshot_path(self.directory, self.daemon)),
            bytes=size,
            state_ms=round(took * 1000, 1),
            total_ms=round((time.perf_counter() - t0) * 1000, 1),
        )

    async def periodically(self) -> None:
        """Save every ``interval_s`` (never, if 0); a failed save is logged and retried next time."""
        path = str(persist.snapshot_path(self.directory, self.daemon))
        log.info("snapshot_restored" if self.restored else "state_dir_empty", path=path)
        if self.interval_s <= 0:
            await trio.sleep_forever()
        while True:
            await trio.sleep(self.interval_s)
            await self.save_logged()

    async def save_logged(self) -> None:
        try:
            await self.save()
        except OSError as err:
            log.error("snapshot_failed", path=str(self.directory), error=err.strerror or str(err))


__all__ = ["ENV_SNAPSHOT_INTERVAL", "ENV_STATE_DIR", "StateDir", "add_state_flags", "explicit_knobs"]
