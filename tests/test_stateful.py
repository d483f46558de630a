"""Random sequences of every operation, with the invariant checker after each step.

The machine drives a CheckedWorld (the checker runs after every settle, i.e. after every
operation and every timer that fires), so any step that leaves refcounts, mapcounts, counters
or mappings disagreeing fails here with hypothesis' shrunk reproduction.
"""

from __future__ import annotations

import hypothesis.strategies as st
from conftest import CheckedWorld
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from shared.errors import UserError
from shared.knobs import RETRY_POLICIES, Knobs
from shared.units import HPAGE_PMD_SIZE, PAGE_SIZE

MB = 1 << 20
FILES = ("a", "b", "s")  # "s" is shmem
PIDS = (1, 2, 3)
# A few fixed addresses (aligned, misaligned by a page, overlapping) besides kernel-chosen ones.
ADDRS = (None, 0x200000000, 0x200000000 + PAGE_SIZE, 0x200400000, 0x300000000)


class ModelMachine(RuleBasedStateMachine):
    @initialize(
        policy=st.sampled_from(RETRY_POLICIES),
        install=st.sampled_from((0, 1)),
        seed=st.one_of(st.none(), st.integers(0, 3)),
        sizes=st.tuples(*(st.integers(1, 6 * MB) for _ in FILES)),
    )
    def setup(self, policy: str, install: int, seed: int | None, sizes: tuple[int, ...]) -> None:
        knobs = Knobs(
            enabled="always",
            shmem_enabled="advise",
            scan_sleep_millisecs=100,
            alloc_sleep_millisecs=500,
            remap_sleep_millisecs=100,
            retry_policy=policy,
            install_pmd=install,
            free_huge_pages=6,
        )
        self.world = world = CheckedWorld(knobs, seed=seed)
        self.pending = []
        # Start from files that exist and processes that map them, so most steps do something.
        for name, size in zip(FILES, sizes):
            world.file_create(name, size, shmem=name == "s")
        for pid in PIDS[:2]:
            world.spawn(pid)
            for name in FILES:
                addr = world.mmap(pid, None, 4 * MB, name, prot="rx" if name == "a" else "rw", shared=name != "a")
                world.madvise(pid, addr, 4 * MB, "hugepage")

    def _do(self, actor_name: str, make) -> None:
        world = self.world
        try:
            op = make()
        except UserError:
            return
        actor = world.collapser if actor_name == "c" else world.remapper
        pending = world.start(actor, op)
        if not pending.done:
            self.pending.append(pending)
        elif isinstance(pending.value, UserError):
            return

    # -- files --------------------------------------------------------------------------------

    @rule(name=st.sampled_from(FILES), size=st.integers(0, 6 * MB))
    def create(self, name, size):
        self._do("c", lambda: self.world.collapser.file_create(name, size, name == "s"))

    @rule(name=st.sampled_from(FILES), offset=st.integers(0, 5 * MB), length=st.integers(0, 3 * MB))
    def write(self, name, offset, length):
        self._do("c", lambda: self.world.collapser.file_write(name, offset, length))

    @rule(name=st.sampled_from(FILES))
    def sync(self, name):
        self._do("c", lambda: self.world.collapser.file_sync(name))

    @rule(name=st.sampled_from(FILES), size=st.integers(0, 6 * MB))
    def truncate(self, name, size):
        self._do("c", lambda: self.world.collapser.file_truncate(name, size))

    @rule(name=st.sampled_from(FILES), offset=st.integers(0, 5 * MB), length=st.integers(1, 3 * MB))
    def punch(self, name, offset, length):
        self._do("c", lambda: self.world.collapser.file_punch(name, offset, length))

    @rule()
    def drop_caches(self):
        self._do("c", lambda: self.world.collapser.drop_caches())

    # -- processes ----------------------------------------------------------------------------

    @rule(pid=st.sampled_from(PIDS))
    def spawn(self, pid):
        self._do("r", lambda: self.world.remapper.spawn_process(pid))

    @rule(pid=st.sampled_from(PIDS))
    def exit(self, pid):
        self._do("r", lambda: self.world.remapper.exit_process(pid))

    @rule(pid=st.sampled_from(PIDS), child=st.sampled_from(PIDS))
    def fork(self, pid, child):
        self._do("r", lambda: self.world.remapper.fork(pid, child))

    @rule(
        pid=st.sampled_from(PIDS),
        addr=st.sampled_from(ADDRS),
        length=st.sampled_from((PAGE_SIZE, 64 * 1024, HPAGE_PMD_SIZE, HPAGE_PMD_SIZE + PAGE_SIZE, 4 * MB)),
        name=st.sampled_from(FILES),
        offset=st.sampled_from((0, PAGE_SIZE, HPAGE_PMD_SIZE)),
        prot=st.sampled_from(("r", "rw", "rx")),
        shared=st.booleans(),
        reopen=st.booleans(),
    )
    def mmap(self, pid, addr, length, name, offset, prot, shared, reopen):
        self._do("r", lambda: self.world.remapper.mmap(pid, addr, length, name, offset, prot, shared, reopen))

    def _some_addr(self, data, pid):
        mm = self.world.remapper.mms.get(pid)
        if mm is None or not mm.vmas:
            return 0x200000000
        vma = data.draw(st.sampled_from(mm.vmas))
        return vma.start + data.draw(st.integers(0, (vma.end - vma.start) // PAGE_SIZE)) * PAGE_SIZE

    @rule(data=st.data(), pid=st.sampled_from(PIDS), length=st.sampled_from((PAGE_SIZE, 3 * PAGE_SIZE, HPAGE_PMD_SIZE)))
    def munmap(self, data, pid, length):
        addr = self._some_addr(data, pid)
        self._do("r", lambda: self.world.remapper.munmap(pid, addr, length))

    @rule(
        data=st.data(),
        pid=st.sampled_from(PIDS),
        length=st.sampled_from((PAGE_SIZE, HPAGE_PMD_SIZE, 4 * MB)),
        advice=st.sampled_from(
            (
                "hugepage",
                "nohugepage",
                "collapse",
                "dontneed",
                "populate_read",
                "populate_write",
                "pageout",
                "free",
                "remove",
            )
        ),
    )
    def madvise(self, data, pid, length, advice):
        addr = self._some_addr(data, pid)
        if advice in ("hugepage", "collapse"):
            addr &= ~(HPAGE_PMD_SIZE - 1)
        self._do("r", lambda: self.world.remapper.madvise(pid, addr, length, advice))

    @rule(
        data=st.data(),
        pid=st.sampled_from(PIDS),
        length=st.sampled_from((PAGE_SIZE, HPAGE_PMD_SIZE, 4 * MB)),
        prot=st.sampled_from(("none", "r", "rw", "rx", "rwx")),
    )
    def mprotect(self, data, pid, length, prot):
        addr = self._some_addr(data, pid)
        self._do("r", lambda: self.world.remapper.mprotect(pid, addr, length, prot))

    @rule(
        data=st.data(),
        pid=st.sampled_from(PIDS),
        length=st.sampled_from((PAGE_SIZE, 64 * 1024, HPAGE_PMD_SIZE)),
        lock=st.booleans(),
        onfault=st.booleans(),
    )
    def mlock(self, data, pid, length, lock, onfault):
        addr = self._some_addr(data, pid)
        if lock:
            self._do("r", lambda: self.world.remapper.mlock(pid, addr, length, onfault))
        else:
            self._do("r", lambda: self.world.remapper.munlock(pid, addr, length))

    @rule(
        data=st.data(),
        pid=st.sampled_from(PIDS),
        old=st.sampled_from((0, PAGE_SIZE, HPAGE_PMD_SIZE, 4 * MB)),
        new=st.sampled_from((PAGE_SIZE, HPAGE_PMD_SIZE, 4 * MB)),
        to=st.sampled_from((None, *ADDRS)),
        maymove=st.booleans(),
        dontunmap=st.booleans(),
    )
    def mremap(self, data, pid, old, new, to, maymove, dontunmap):
        addr = self._some_addr(data, pid)
        self._do("r", lambda: self.world.remapper.mremap(pid, addr, old, new, to, maymove, dontunmap))

    @rule(data=st.data(), pid=st.sampled_from(PIDS), write=st.booleans(), pages=st.integers(1, 600))
    def touch(self, data, pid, write, pages):
        addr = self._some_addr(data, pid)
        self._do("r", lambda: self.world.remapper.touch(pid, addr, pages * PAGE_SIZE, write))

    @rule(data=st.data(), pid=st.sampled_from(PIDS))
    def pin(self, data, pid):
        addr = self._some_addr(data, pid)
        self._do("r", lambda: self.world.remapper.pin(pid, addr))

    @rule(pid=st.sampled_from(PIDS))
    def unpin(self, pid):
        mm = self.world.remapper.mms.get(pid)
        if mm is not None and mm.pins:
            addr = sorted(mm.pins)[0]
            self._do("r", lambda: self.world.remapper.unpin(pid, addr))

    @rule(pid=st.sampled_from(PIDS), hold=st.integers(0, 400), write=st.booleans())
    def lock(self, pid, hold, write):
        self._do("r", lambda: self.world.remapper.hold_lock(pid, hold, write))

    @rule(name=st.sampled_from(FILES), page=st.integers(0, 1100), add=st.booleans())
    def uprobe(self, name, page, add):
        from remapd.uprobes import uprobe_add, uprobe_del

        fn = uprobe_add if add else uprobe_del
        self._do("r", lambda: fn(self.world.remapper, name, page * PAGE_SIZE))

    # -- knobs, time, restarts ----------------------------------------------------------------

    @rule(
        knob=st.sampled_from(
            (
                ("thpsplit/retry_policy", RETRY_POLICIES),
                ("thpsplit/install_pmd", (0, 1)),
                ("khugepaged/max_ptes_none", (0, 256, 511)),
                ("shmem_enabled", ("always", "within_size", "advise", "never")),
                ("enabled", ("always", "madvise", "never")),
                ("thpsplit/free_huge_pages", (0, 4)),
                ("thpsplit/read_ahead_kb", (0, 16, 128)),
                ("thpsplit/fault_around_bytes", (4096, 16384, 65536)),
            )
        ),
        data=st.data(),
    )
    def sysfs(self, knob, data):
        name, values = knob
        self.world.sysfs_set(name, data.draw(st.sampled_from(values)))

    @rule(ms=st.sampled_from((1, 50, 150, 1000)))
    def advance(self, ms):
        self.world.advance(ms)
        self.pending = [p for p in self.pending if not p.done]

    @precondition(lambda self: not self.pending)
    @rule()
    def restart_collapser(self):
        self.world.restart_collapser()

    @invariant()
    def quiet_and_consistent(self):
        if hasattr(self, "world"):
            self.world.check()

    def teardown(self):
        if hasattr(self, "world"):
            # Whatever waited on locks or time finishes once enough model time has passed.
            self.world.advance(5000)
            assert all(p.done for p in self.pending), "an operation never finished"


TestModel = ModelMachine.TestCase
TestModel.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
