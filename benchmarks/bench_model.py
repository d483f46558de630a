"""Model benchmarks: fault rate, page-cache memory per page, collapse rate, framing rate.

Run: ``.venv/bin/python benchmarks/bench_model.py [--gib N]``. Prints one line per figure;
docs/benchmarks.md records results with the machine they came from. The worlds here skip the
codec round trip the tests put every message through (``World(codec=False)``): the model's own
cost is measured here, the codec's by the framing figures.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.protocol.framing import FrameDecoder, encode_message  # noqa: E402
from shared.knobs import Knobs  # noqa: E402
from shared.protocol.messages import LookupPage  # noqa: E402
from shared.sim.world import World  # noqa: E402
from shared.units import HPAGE_PMD_SIZE, PAGE_SIZE  # noqa: E402

GIB = 1 << 30


def bench_faults(size: int) -> None:
    # One page per fault: the cost of the fault path itself.
    w = World(Knobs(scan_sleep_millisecs=1 << 30, read_ahead_kb=0, fault_around_bytes=PAGE_SIZE), codec=False)
    w.file_create("data", size)
    w.spawn(1)
    addr = w.mmap(1, None, size, "data")
    t = time.perf_counter()
    counts = w.touch(1, addr, size)
    dt = time.perf_counter() - t
    n = size // PAGE_SIZE
    print(f"faults (major, PTE, 1 process):   {n / dt:>12,.0f} /s  ({n:,} faults in {dt:.2f} s) {counts}")
    t = time.perf_counter()
    w.touch(1, addr, size)
    dt = time.perf_counter() - t
    print(f"accesses to mapped pages (hit):   {n / dt:>12,.0f} /s")
    w.spawn(2)
    addr2 = w.mmap(2, None, size, "data")
    t = time.perf_counter()
    w.touch(2, addr2, size)
    dt = time.perf_counter() - t
    print(f"faults (minor, cached page):      {n / dt:>12,.0f} /s")
    w = World(Knobs(scan_sleep_millisecs=1 << 30), codec=False)
    w.file_create("data", size)
    w.spawn(1)
    addr = w.mmap(1, None, size, "data")
    t = time.perf_counter()
    counts = w.touch(1, addr, size)
    dt = time.perf_counter() - t
    print(f"pages mapped, kernel defaults:    {n / dt:>12,.0f} /s  (read-around 128K, fault-around 64K: {counts})")


def bench_memory(size: int) -> None:
    gc.collect()
    tracemalloc.start()
    w = World(Knobs(scan_sleep_millisecs=1 << 30, fault_around_bytes=PAGE_SIZE), codec=False)
    w.file_create("data", size)
    w.file_write("data", 0, size)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    n = size // PAGE_SIZE
    print(f"page-cache memory per 4 KiB page: {current / n:>12,.1f} B  ({n:,} pages, {current / 2**20:.1f} MiB)")
    gc.collect()
    tracemalloc.start()
    w.spawn(1)
    addr = w.mmap(1, None, size, "data")
    before, _ = tracemalloc.get_traced_memory()
    w.touch(1, addr, size)
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"page-table memory per mapped page: {(after - before) / n:>11,.1f} B")


def bench_collapse(size: int) -> None:
    w = World(Knobs(scan_sleep_millisecs=10, pages_to_scan=1 << 20, free_huge_pages=1 << 20, enabled="always"), codec=False)
    w.file_create("data", size)
    w.spawn(1)
    addr = w.mmap(1, None, size, "data", prot="rx", shared=False)
    w.touch(1, addr, size)
    t = time.perf_counter()
    w.wait_scans(1)
    dt = time.perf_counter() - t
    n = w.collapser.khugepaged.pages_collapsed
    pmd = sum(e["FilePmdMapped"] for e in w.smaps(1)) // 2048
    print(f"collapse_file + retract + PMD:    {n / dt:>12,.0f} THP/s ({n} THPs, {pmd} PMD-mapped, {dt:.2f} s)")


def bench_framing(n: int = 200_000) -> None:
    msg = LookupPage(1, 7, 123456, "map", False, True, False)
    t = time.perf_counter()
    blob = b"".join(encode_message(LookupPage(i, 7, i, "map", False, True, False)) for i in range(n))
    enc = time.perf_counter() - t
    dec = FrameDecoder()
    t = time.perf_counter()
    dec.feed(blob)
    got = 0
    while dec.next_message() is not None:
        got += 1
    dt = time.perf_counter() - t
    assert got == n, got
    print(f"frames encoded:                   {n / enc:>12,.0f} /s  ({len(blob) / n:.0f} B each, e.g. {msg.TAG})")
    print(f"frames decoded + validated:       {n / dt:>12,.0f} /s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the modelled file (GiB)")
    args = parser.parse_args()
    size = int(args.gib * GIB) // HPAGE_PMD_SIZE * HPAGE_PMD_SIZE
    print(f"python {sys.version.split()[0]}, file of {size / GIB:g} GiB")
    bench_faults(size)
    bench_memory(size)
    bench_collapse(min(size, GIB // 4))
    bench_framing()


if __name__ == "__main__":
    main()
