"""The sysfs knobs under /sys/kernel/mm/transparent_hugepage, plus thpsplit's own.

Both actors hold a :class:`Knobs`; a change is validated here (``EINVAL`` as sysfs refuses it)
and then applied to both. Defaults are the kernel's (6.x, ``enabled=madvise`` as on these machines).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from shared.clip import clip, quote
from shared.errors import UserError

ENABLED_CHOICES = ("always", "madvise", "never")
# hugepages-2048kB/enabled and shmem_enabled: the per-size (mTHP) controls of PMD order.
PER_SIZE_ENABLED_CHOICES = ("always", "inherit", "madvise", "never")
PER_SIZE_SHMEM_CHOICES = ("always", "inherit", "within_size", "advise", "never")
# hugepages-2048kB/stats/*: mm/huge_memory.c's per-order counters (6.18), as sysfs lists them.
MTHP_STATS = (
    "anon_fault_alloc",
    "anon_fault_fallback",
    "anon_fault_fallback_charge",
    "nr_anon",
    "nr_anon_partially_mapped",
    "shmem_alloc",
    "shmem_fallback",
    "shmem_fallback_charge",
    "split",
    "split_deferred",
    "split_failed",
    "swpin",
    "swpin_fallback",
    "swpin_fallback_charge",
    "swpout",
    "swpout_fallback",
    "zswpout",
)
PER_SIZE = "hugepages-2048kB"
DEFRAG_CHOICES = ("always", "defer", "defer+madvise", "madvise", "never")
SHMEM_ENABLED_CHOICES = ("always", "within_size", "advise", "never", "deny", "force")
RETRY_POLICIES = ("per-pmd", "mm-slot", "per-mapping", "lockless", "none")

# max_ptes_* accept 0..HPAGE_PMD_NR-1, as khugepaged's sysfs store functions do.
_MAX_PTES = 511
# What kstrtoul(buf, 10, ...) takes: ASCII decimal digits after an optional plus sign. Python's
# int() would also take "1_0", non-ASCII digits ("١٠") and surrounding whitespace.
_DECIMAL = re.compile(r"\+?[0-9]+", re.ASCII)
# More digits than any knob's range needs: refused without converting (kstrtoul's ERANGE).
_MAX_DIGITS = 24


class KnobError(ValueError):
    """A write sysfs would refuse; ``errno_name`` is what the kernel returns."""

    def __init__(self, message: str, errno_name: str = "EINVAL"):
        super().__init__(message)
        self.errno_name = errno_name


@dataclasses.dataclass(frozen=True)
class _Spec:
    kind: str  # "choice", "int", "bool", "const" (a fixed value, read-only)
    choices: tuple[str, ...] = ()
    lo: int = 0
    hi: int = 1 << 62
    writable: bool = True


SPECS: dict[str, _Spec] = {
    "enabled": _Spec("choice", ENABLED_CHOICES),
    "defrag": _Spec("choice", DEFRAG_CHOICES),
    "shmem_enabled": _Spec("choice", SHMEM_ENABLED_CHOICES),
    "hpage_pmd_size": _Spec("const", writable=False),
    # Anon THP only (the huge zero page, the underused-THP shrinker): kept, no effect on files.
    "use_zero_page": _Spec("bool"),
    "shrink_underused": _Spec("bool"),
    # Anon THP (enabled) and anon shmem (shmem_enabled) only; tmpfs files follow shmem_enabled.
    f"{PER_SIZE}/enabled": _Spec("choice", PER_SIZE_ENABLED_CHOICES),
    f"{PER_SIZE}/shmem_enabled": _Spec("choice", PER_SIZE_SHMEM_CHOICES),
    "khugepaged/pages_to_scan": _Spec("int", lo=1, hi=(1 << 32) - 1),
    "khugepaged/scan_sleep_millisecs": _Spec("int", lo=0, hi=(1 << 32) - 1),
    "khugepaged/alloc_sleep_millisecs": _Spec("int", lo=0, hi=(1 << 32) - 1),
    "khugepaged/max_ptes_none": _Spec("int", lo=0, hi=_MAX_PTES),
    "khugepaged/max_ptes_swap": _Spec("int", lo=0, hi=_MAX_PTES),
    "khugepaged/max_ptes_shared": _Spec("int", lo=0, hi=_MAX_PTES),
    "khugepaged/defrag": _Spec("bool"),
    "khugepaged/pages_collapsed": _Spec("int", writable=False),
    "khugepaged/full_scans": _Spec("int", writable=False),
    **{f"{PER_SIZE}/stats/{name}": _Spec("int", writable=False) for name in MTHP_STATS},
    "thpsplit/retry_policy": _Spec("choice", RETRY_POLICIES),
    "thpsplit/install_pmd": _Spec("bool"),
    "thpsplit/free_huge_pages": _Spec("int", lo=0, hi=1 << 40),
    "thpsplit/fragmentation": _Spec("int", lo=0, hi=100),
    "thpsplit/remap_sleep_millisecs": _Spec("int", lo=0, hi=(1 << 32) - 1),
    "thpsplit/writeback_millisecs": _Spec("int", lo=0, hi=(1 << 32) - 1),
    "thpsplit/swap": _Spec("bool"),
    # /sys/block/<dev>/queue/read_ahead_kb (regular files) and debugfs fault_around_bytes.
    "thpsplit/read_ahead_kb": _Spec("int", lo=0, hi=1 << 20),
    "thpsplit/fault_around_bytes": _Spec("int", lo=0, hi=2 << 20),
    # The modelled physical memory (MemTotal), in MiB: at least two 2 MiB blocks; at most 64 GiB,
    # whose model state (~45 bytes a page) is ~0.7 GB.
    "thpsplit/mem_total_mb": _Spec("int", lo=4, hi=1 << 16),
}


# Knob writes that wake khugepaged. scan_sleep_millisecs_store() and alloc_sleep_millisecs_store()
# (mm/khugepaged.c) reset khugepaged_sleep_expire and wake it out of either sleep; enabled_store(),
# thpsize_enabled_store() and the two shmem_enabled stores call start_stop_khugepaged(), whose
# wake_up_interruptible() only ends the alloc sleep: khugepaged_wait_work()'s scan sleep waits
# for khugepaged_should_wakeup(), which the sleep knobs alone make true. Every other knob just
# stores its value, to be read at the next pass.
KHUGEPAGED_SLEEP_KNOBS = frozenset({"khugepaged/scan_sleep_millisecs", "khugepaged/alloc_sleep_millisecs"})
KHUGEPAGED_START_STOP_KNOBS = frozenset(
    {"enabled", "shmem_enabled", f"{PER_SIZE}/enabled", f"{PER_SIZE}/shmem_enabled"}
)

# set_max_threads' inputs (kernel/fork.c, x86-64 without KASAN).
THREAD_SIZE = 16 << 10
MIN_THREADS = 20


@dataclasses.dataclass
class Knobs:
    """Current knob values. Attribute names are the sysfs paths with ``/`` → ``_``, minus prefixes."""

    enabled: str = "madvise"
    defrag: str = "madvise"
    shmem_enabled: str = "never"
    hpage_pmd_size: int = 2 << 20
    use_zero_page: int = 1
    shrink_underused: int = 1
    per_size_enabled: str = "inherit"
    per_size_shmem_enabled: str = "inherit"
    pages_to_scan: int = 4096
    scan_sleep_millisecs: int = 10000
    alloc_sleep_millisecs: int = 60000
    max_ptes_none: int = 511
    max_ptes_swap: int = 64
    max_ptes_shared: int = 256
    khugepaged_defrag: int = 1
    retry_policy: str = "per-pmd"
    install_pmd: int = 1
    # 2 GiB of huge pages free: enough for demos, small enough to run out in experiments.
    free_huge_pages: int = 1024
    # Percentage of huge allocations without direct compaction that fail to fragmentation.
    fragmentation: int = 0
    # The remapper's own pace through marked PTE tables (per-pmd policy); khugepaged's by default.
    remap_sleep_millisecs: int = 10000
    # How long a page stays under writeback after sync or pageout before it is clean.
    writeback_millisecs: int = 100
    # A swap device is active (total_swap_pages): reclaim writes dirty shmem pages to swap;
    # without one, shmem_writeout() re-dirties them and they stay in the page cache.
    swap: int = 1
    # A major fault on a regular file reads this much around the page (mmap read-around).
    read_ahead_kb: int = 128
    # A read fault maps the cached pages of this aligned window too (do_fault_around).
    fault_around_bytes: int = 65536
    # Physical memory the collapser models, in MiB: an allocation past it fails (ENOMEM, a
    # short write, a fault's VM_FAULT_OOM). 8 GiB = 2M pages, ~90 MB of model state.
    mem_total_mb: int = 8192

    def max_threads(self) -> int:
        """kernel.threads-max as set_max_threads sizes it for mem_total_mb: kernel stacks
        (THREAD_SIZE, 16 KiB on x86-64) in an eighth of memory, at least MIN_THREADS (20). fork
        past it is EAGAIN; one modelled process is one thread."""
        return max((self.mem_total_mb << 20) // (8 * THREAD_SIZE), MIN_THREADS)

    def fault_around_pages(self) -> int:
        """fault_around_bytes as the kernel uses it: a power of two of pages, at least 1."""
        pages = max(self.fault_around_bytes // 4096, 1)
        return 1 << (pages.bit_length() - 1)

    def get(self, name: str) -> Any:
        return getattr(self, _attr(name))

    def validate(self, name: str, text: str) -> Any:
        """Parse ``text`` for knob ``name`` as sysfs would: a number is plain ASCII decimal
        digits (an optional leading ``+``, as kstrtoul takes), surrounding whitespace ignored
        (``echo`` adds a newline).

        Raises:
            KnobError: unknown knob (ENOENT), read-only (EACCES), or a value sysfs refuses (EINVAL).
        """
        spec = SPECS.get(name)
        if spec is None:
            raise KnobError(f"no such knob: {clip(name)}", "ENOENT")
        if not spec.writable:
            raise KnobError(f"{name} is read-only", "EACCES")
        text = str(text).strip()
        if spec.kind == "choice":
            if text not in spec.choices:
                raise KnobError(f"{name}: {quote(text)} is not one of {', '.join(spec.choices)}")
            return text
        lo, hi = (0, 1) if spec.kind == "bool" else (spec.lo, spec.hi)
        if not _DECIMAL.fullmatch(text):
            raise KnobError(f"{name}: {quote(text)} is not a decimal number")
        if len(text) > _MAX_DIGITS:
            raise KnobError(f"{name}: {quote(text)} is outside {lo}..{hi}")
        value = int(text, 10)
        if not lo <= value <= hi:
            raise KnobError(f"{name}: {value} is outside {lo}..{hi}")
        return value

    def set(self, name: str, text: str) -> Any:
        value = self.validate(name, text)
        setattr(self, _attr(name), value)
        return value

    def render(self, name: str) -> str:
        """The text ``cat`` of the sysfs file prints (choices with the current one in brackets)."""
        spec = SPECS[name]
        value = self.get(name)
        if spec.kind == "choice":
            return " ".join(f"[{c}]" if c == value else c for c in spec.choices)
        return str(value)

    def writable_items(self) -> dict[str, Any]:
        return {n: self.get(n) for n, s in SPECS.items() if s.writable}


_ATTRS = {
    "khugepaged/defrag": "khugepaged_defrag",
    f"{PER_SIZE}/enabled": "per_size_enabled",
    f"{PER_SIZE}/shmem_enabled": "per_size_shmem_enabled",
}


def _attr(name: str) -> str:
    if name in _ATTRS:
        return _ATTRS[name]
    if name not in SPECS:
        raise KnobError(f"no such knob: {clip(name)}", "ENOENT")
    return name.rsplit("/", 1)[-1]


def sysfs_entries(knobs: Knobs, name: str | None, counters: Mapping[str, int] | None) -> dict[str, Any]:
    """What reading sysfs shows: ``{knob: {"value": v, "text": file content}}`` for ``name`` or
    every knob. ``counters`` holds the read-only khugepaged counters (None: not served here).

    Raises:
        UserError: ENOENT for an unknown knob, EOPNOTSUPP for a counter this daemon lacks.
    """
    names = [name] if name is not None else list(SPECS)
    out: dict[str, Any] = {}
    for knob in names:
        spec = SPECS.get(knob)
        if spec is None:
            raise UserError("ENOENT", f"no such knob: {clip(knob)}")
        if not spec.writable and spec.kind != "const":
            if counters is None:
                if name is None:
                    continue
                raise UserError("EOPNOTSUPP", f"{knob} is served by collapsed")
            out[knob] = {"value": counters[knob], "text": str(counters[knob])}
        else:
            out[knob] = {"value": knobs.get(knob), "text": knobs.render(knob)}
    return out
