"""Daemon benchmarks: both daemons as processes on Unix sockets, driven through the client, each
figure printed beside the transport's ceiling measured in the same run.

Run: ``.venv/bin/python benchmarks/bench_daemons.py [--mib N] [--repeat N]``. The ceiling is
benchmarks/bench_ceiling.py (a minimal trio + msgpack echo and relay on the same socket type).
A ``touch`` sends its read faults to the collapser in batches (one LookupPages exchange per
batch); a single ``fault`` request is a strict round trip client -> remapd -> collapsed and back.
With ``--repeat`` every figure, ceiling and daemons alike, is the best of N runs: other work on
the machine only ever slows a run down.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ceiling import Ceiling, measure  # noqa: E402

from shared.protocol import messages as m  # noqa: E402
from shared.thpctl.client import Session  # noqa: E402
from shared.thpctl.launch import running_daemons  # noqa: E402

MIB = 1 << 20
PAGE = 4096


async def bench(size: int, requests: int) -> dict[str, float]:
    """Events per second through the daemons, by figure name (see ``report``)."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="thpsplit-bench-") as workdir:
        async with running_daemons(workdir, "unix") as d:
            async with Session(d.collapsed.address, d.remapd.address) as s:
                await s.call(m.SysfsSet, name="khugepaged/scan_sleep_millisecs", value="600000")
                await s.call(m.FileCreate, name="data", size=size)
                await s.call(m.ProcSpawn, pid=1)
                addr = (await s.call(m.Mmap, pid=1, addr=None, length=size, name="data"))["addr"]
                n = size // PAGE
                t = time.perf_counter()
                counts = await s.call(m.Touch, pid=1, addr=addr, length=size)
                out["touch"] = n / (time.perf_counter() - t)
                out["touch_counts"] = counts  # type: ignore[assignment]
                # From here on one page per fault: every page is a lookup of its own.
                await s.call(m.SysfsSet, name="thpsplit/read_ahead_kb", value="0")
                await s.call(m.SysfsSet, name="thpsplit/fault_around_bytes", value=str(PAGE))
                await s.call(m.ProcSpawn, pid=2)
                addr2 = (await s.call(m.Mmap, pid=2, addr=None, length=size, name="data"))["addr"]
                t = time.perf_counter()
                await s.call(m.Touch, pid=2, addr=addr2, length=size)
                out["touch_one_page"] = n / (time.perf_counter() - t)
                procs = 8
                per = size // procs
                addrs = {}
                for pid in range(10, 10 + procs):
                    await s.call(m.ProcSpawn, pid=pid)
                    addrs[pid] = (await s.call(m.Mmap, pid=pid, addr=None, length=per, name="data"))["addr"]

                async def toucher(pid: int) -> None:
                    async with Session(d.collapsed.address, d.remapd.address) as own:
                        await own.call(m.Touch, pid=pid, addr=addrs[pid], length=per)

                t = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for pid in addrs:
                        nursery.start_soon(toucher, pid)
                out["touch_8"] = n / (time.perf_counter() - t)
                # Single faults on pages nobody maps yet: every one is a page-cache lookup.
                await s.call(m.ProcSpawn, pid=3)
                addr3 = (await s.call(m.Mmap, pid=3, addr=None, length=size, name="data"))["addr"]
                t = time.perf_counter()
                for i in range(requests):
                    await s.call(m.Fault, pid=3, addr=addr3 + (i % n) * PAGE)
                out["strict"] = requests / (time.perf_counter() - t)
                await s.call(m.ProcSpawn, pid=4)
                addr4 = (await s.call(m.Mmap, pid=4, addr=None, length=size, name="data"))["addr"]
                t = time.perf_counter()
                pending = [await s.start(m.Fault, pid=4, addr=addr4 + (i % n) * PAGE) for i in range(requests)]
                for p in pending:
                    await p.result()
                out["pipelined"] = requests / (time.perf_counter() - t)
    return out


# (figure, label, unit, the ceiling it is held against, target ratio or None)
FIGURES = (
    ("touch", "touch, kernel defaults", "pages/s", "two_batched", 0.40),
    ("touch_one_page", "touch, one page per fault", "pages/s", "two_batched", None),
    ("touch_8", "touch, 8 processes, 8 connections", "pages/s", "two_batched", None),
    ("strict", "fault requests, one at a time", "faults/s", "two_strict", 0.80),
    ("pipelined", "fault requests, pipelined", "faults/s", "two_per_write", None),
)


def report(ceiling: Ceiling, daemons: dict[str, float]) -> None:
    print("ceiling (events/s):")
    for name, value in ceiling.rows():
        print(f"  {name + ':':<34}{value:>12,.0f}")
    print("daemons:")
    for key, label, unit, against, target in FIGURES:
        value, limit = daemons[key], getattr(ceiling, against)
        goal = f"  (target {target:.0%})" if target is not None else ""
        print(
            f"  {label + ':':<38}{value:>10,.0f} {unit:<8} {against.replace('_', ' ')} ceiling "
            f"{limit:>9,.0f}  = {value / limit:>4.0%}{goal}"
        )
    print(f"  touch outcomes: {daemons['touch_counts']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="size of the modelled file (MiB)")
    parser.add_argument("--requests", type=int, default=5000, help="single fault requests to time")
    parser.add_argument("--repeat", type=int, default=1, help="best of this many runs of every figure")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, file of {args.mib} MiB, best of {args.repeat}")
    ceilings: list[Ceiling] = []
    runs: list[dict[str, float]] = []
    for _ in range(args.repeat):
        ceilings.append(measure())
        runs.append(trio.run(bench, args.mib * MIB, args.requests))
    best = Ceiling(*(max(getattr(c, f) for c in ceilings) for f in Ceiling.__dataclass_fields__))
    daemons = {k: max(r[k] for r in runs) if k != "touch_counts" else runs[0][k] for k in runs[0]}
    report(best, daemons)


if __name__ == "__main__":
    main()
