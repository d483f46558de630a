"""Daemon benchmarks: both daemons as processes on Unix sockets, driven through the client.

Run: ``.venv/bin/python benchmarks/bench_daemons.py [--mib N]``. Faults inside one ``touch``
request cross the peer channel (one LookupPage/PageAnswer exchange each); single ``fault``
requests add a client round trip each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.protocol import messages as m  # noqa: E402
from shared.thpctl.client import Session  # noqa: E402
from shared.thpctl.launch import running_daemons  # noqa: E402

MIB = 1 << 20
PAGE = 4096


async def bench(size: int, requests: int) -> None:
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
                dt = time.perf_counter() - t
                print(f"pages touched, kernel defaults:        {n / dt:>10,.0f} /s  ({n:,} in {dt:.2f} s) {counts}")
                # From here on one page per fault: each costs a peer round trip.
                await s.call(m.SysfsSet, name="thpsplit/read_ahead_kb", value="0")
                await s.call(m.SysfsSet, name="thpsplit/fault_around_bytes", value=str(PAGE))
                await s.call(m.ProcSpawn, pid=2)
                addr2 = (await s.call(m.Mmap, pid=2, addr=None, length=size, name="data"))["addr"]
                t = time.perf_counter()
                await s.call(m.Touch, pid=2, addr=addr2, length=size)
                dt = time.perf_counter() - t
                print(f"faults across the peer socket (minor): {n / dt:>10,.0f} /s  (one page each)")
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
                dt = time.perf_counter() - t
                print(f"faults, {procs} processes on {procs} connections: {n / dt:>10,.0f} /s")
                t = time.perf_counter()
                for i in range(requests):
                    await s.call(m.Fault, pid=1, addr=addr + (i % n) * PAGE)
                dt = time.perf_counter() - t
                print(f"fault requests, one at a time:         {requests / dt:>10,.0f} /s  ({dt / requests * 1e6:.0f} us each)")
                t = time.perf_counter()
                pending = [await s.start(m.Fault, pid=1, addr=addr + (i % n) * PAGE) for i in range(requests)]
                for p in pending:
                    await p.result()
                dt = time.perf_counter() - t
                print(f"fault requests, pipelined:             {requests / dt:>10,.0f} /s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="size of the modelled file (MiB)")
    parser.add_argument("--requests", type=int, default=5000, help="single fault requests to time")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, file of {args.mib} MiB")
    trio.run(bench, args.mib * MIB, args.requests)


if __name__ == "__main__":
    main()
