"""Load (issue 13): 100 concurrent clients, each pipelining 150 mixed requests to both daemons,
all answered exactly once, each connection's requests taking effect in order (benchmarks/load.py
says how both are checked; `python benchmarks/load.py` runs 100 x 3,000)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from load import run_load

from shared.thpctl.launch import running_daemons


async def test_a_hundred_clients_get_every_answer_once_and_in_order(workdir):
    async with running_daemons(workdir) as d:
        figures = await run_load(d.collapsed.address, d.remapd.address, clients=100, requests=150, window=8)
    summary = figures.summary()
    print(summary)
    assert (summary["lost"], summary["duplicated"], summary["errors"], summary["order_violations"]) == (0, 0, 0, 0), (
        figures.problems[:10]
    )
    assert summary["answered"] == summary["requests"] == 15_000
    assert d.collapsed.proc is not None and d.remapd.proc is not None
    assert (d.collapsed.proc.returncode, d.remapd.proc.returncode) == (0, 0)

