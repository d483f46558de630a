"""Experiments: one workload run under each retry policy, in-process, on the virtual clock.

The workload is the one Song Liu's series and Kirill's reply are about: a shared library's text
mapped by several processes, collapsed by khugepaged while some of those processes' mmap locks are
busy, so that retract_page_tables' trylock fails and the processes fault the new THP back in with
PTEs. What each policy recovers, and when, is the comparison.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from shared.knobs import RETRY_POLICIES, Knobs
from shared.sim.world import World
from shared.units import HPAGE_PMD_SIZE

MB = 1 << 20


@dataclasses.dataclass
class Workload:
    """``procs`` processes map a ``size`` text file; the first ``busy`` of them hold their mmap
    lock for read for ``busy_ms`` around khugepaged's collapse; everything runs ``run_ms``."""

    procs: int = 4
    size: int = 32 * MB
    busy: int = 2
    busy_ms: float = 300.0
    run_ms: float = 5000.0
    scan_sleep_ms: int = 100
    remap_sleep_ms: int = 100


def run_policy(policy: str, w: Workload, install_pmd: int = 1, codec: bool = False) -> dict[str, Any]:
    """Run ``w`` under ``policy``. Like the benchmarks, an experiment measures the model and skips
    the codec round trip the tests put every message through (``codec`` turns it on)."""
    knobs = Knobs(
        retry_policy=policy,
        install_pmd=install_pmd,
        scan_sleep_millisecs=w.scan_sleep_ms,
        remap_sleep_millisecs=w.remap_sleep_ms,
    )
    world = World(knobs, codec=codec)
    world.file_create("libbig.so", w.size)
    addrs = {}
    for pid in range(1, w.procs + 1):
        world.spawn(pid)
        addrs[pid] = world.mmap(pid, None, w.size, "libbig.so", prot="rx", shared=False)
        world.madvise(pid, addrs[pid], w.size, "hugepage")
        world.touch(pid, addrs[pid], w.size)
    # The busy processes' threads hold mmap_lock across the first khugepaged passes.
    for pid in range(1, w.busy + 1):
        world.lock(pid, w.busy_ms)
    world.advance(w.busy_ms)
    # Everyone keeps running its text: faults refill whatever retract left empty.
    for pid in addrs:
        world.touch(pid, addrs[pid], w.size)
    world.advance(w.run_ms)
    for pid in addrs:
        world.touch(pid, addrs[pid], w.size)
    world.check()
    per_proc = {}
    ranges = w.size // HPAGE_PMD_SIZE
    for pid in addrs:
        pmd_kb = sum(e["FilePmdMapped"] for e in world.smaps(pid))
        per_proc[pid] = pmd_kb * 1024 // HPAGE_PMD_SIZE
    vm = world.vmstat()
    r = world.remapper
    return {
        "policy": policy,
        "pmd_mapped": per_proc,
        "pmd_mapped_total": sum(per_proc.values()),
        "possible": ranges * w.procs,
        "thp_collapse_alloc": vm["thp_collapse_alloc"],
        "thp_file_mapped": vm["thp_file_mapped"],
        "retract_deferred": r.stats["retract_deferred"],
        "nr_ptes": sum(mm.nr_ptes for mm in r.mms.values()),
        "model_ms": world.now,
    }


def compare(
    w: Workload | None = None,
    policies: tuple[str, ...] = RETRY_POLICIES,
    install_pmd: int = 1,
    codec: bool = False,
) -> list[dict[str, Any]]:
    w = w or Workload()
    return [run_policy(p, w, install_pmd, codec) for p in policies]


def render(rows: list[dict[str, Any]]) -> str:
    header = f"{'policy':<12} {'PMD-mapped':>12} {'deferred':>9} {'thp_file_mapped':>16} {'PTE tables':>11}"
    lines = [header, "-" * len(header)]
    for row in rows:
        won = f"{row['pmd_mapped_total']}/{row['possible']}"
        lines.append(
            f"{row['policy']:<12} {won:>12} {row['retract_deferred']:>9} {row['thp_file_mapped']:>16} {row['nr_ptes']:>11}"
        )
    return "\n".join(lines)
