"""The demo workload, in-process: Kirill's scenario step by step, then the policies side by side.

Run it with ``bash .ci/demo`` (or ``python -m shared.demo``).
"""

from __future__ import annotations

import sys

from remapd.report import render_smaps
from shared.experiment import Workload, compare, render
from shared.knobs import Knobs
from shared.world import World

MB = 1 << 20


def _pmd(world: World, pid: int) -> int:
    return sum(e["FilePmdMapped"] for e in world.smaps(pid))


def scenario(out=sys.stdout) -> None:
    w = World(Knobs(scan_sleep_millisecs=100, remap_sleep_millisecs=100))
    w.file_create("libbig.so", 4 * MB)
    for pid in (1, 2):
        w.spawn(pid)
    a = w.mmap(1, None, 4 * MB, "libbig.so", prot="rx", shared=False)
    b = w.mmap(2, None, 4 * MB, "libbig.so", prot="rx", shared=False)
    for pid, addr in ((1, a), (2, b)):
        w.madvise(pid, addr, 4 * MB, "hugepage")
        w.touch(pid, addr, 4 * MB)
    print("1. Two processes map a 4 MiB text file (MADV_HUGEPAGE) and fault it in with PTEs.", file=out)
    w.lock(1, 150)
    print("2. A thread of process 1 holds its mmap_lock while khugepaged collapses the file:", file=out)
    w.advance(150)
    print(f"   collapse_file built {w.vmstat()['thp_collapse_alloc']} THPs; retract_page_tables'"
          f" trylock failed for process 1 ({w.remapper.stats['retract_deferred']} PMDs deferred),"
          f" process 2 got PMDs: FilePmdMapped {_pmd(w, 2)} kB.", file=out)
    w.touch(1, a, 4 * MB)
    print(f"3. Process 1 faults the new THPs back in with PTEs (pte-mapped THP): FilePmdMapped {_pmd(w, 1)} kB,"
          f" {len([k for k in w.remapper.marked if k[0] == 1])} PTE tables marked for retry.", file=out)
    w.advance(200)
    print(f"4. The remapper's pass over marked tables (policy per-pmd) maps them with PMDs:"
          f" FilePmdMapped {_pmd(w, 1)} kB.", file=out)
    w.spawn(3)
    c = w.mmap(3, None, 4 * MB, "libbig.so", prot="rx", shared=False)
    w.touch(3, c, 4 * MB)
    print(f"5. A new mapping gets PMDs at its first faults: FilePmdMapped {_pmd(w, 3)} kB.\n", file=out)
    print("smaps of process 1:", file=out)
    print(render_smaps(w.smaps(1)), file=out)
    vm = w.vmstat()
    print("vmstat:", file=out)
    for key in ("thp_collapse_alloc", "thp_file_mapped", "nr_file_hugepages", "nr_file_pmdmapped"):
        print(f"{key} {vm[key]}", file=out)
    mi = w.meminfo()
    print("meminfo:", file=out)
    for key in ("FileHugePages", "FilePmdMapped"):
        print(f"{key + ':':<16}{mi[key]:>8} kB", file=out)
    w.check()


def main() -> int:
    print("== thpsplit: Kirill's split, step by step ==\n")
    scenario()
    work = Workload()
    print(f"\n== Retry policies side by side: {work.procs} processes map a {work.size // MB} MiB text file;"
          f" {work.busy} keep mmap_lock busy while khugepaged collapses it ==\n")
    print(render(compare(work)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
