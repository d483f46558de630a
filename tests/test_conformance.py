"""The differential conformance harness (shared/sim/conformance.py, issue 9).

Two halves. The harness itself, everywhere: a fake kernel (the model with a planted divergence)
against the model shows that a divergence is reported at the right step with a replay command,
that a known difference is masked, that a stale "open" entry is flagged, that vmstat noise and a
khugepaged pass are told apart from divergences, and what the model does not support is skipped.
Then the real thing, where the kernel allows (root, THP, shmem THP on a tmpfs it mounts; one
clear skip reason elsewhere): every known difference's reproducer still diverges as listed, and
random sequences (hypothesis; derandomized under CI) in both modes and both tmpfs ``huge=``
settings show no divergence outside the table. The knobs the session changes are compared with a
snapshot of every THP knob afterwards, and no mount or worker process is left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from shared.sim import conformance as conf
from shared.sim.conformance import (
    KNOWN,
    Harness,
    KernelSession,
    Known,
    ModelBackend,
    RandomDraw,
    Settings,
    check_known,
    generate,
    parse_steps_text,
    sequences,
    steps_text,
)
from shared.sim.kernel import THP, BackendError, Step, SysfsGuard, parse_step, read_knob
from shared.sim.world import World

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parent.parent
BASE = "file create c --size 4M --shmem; proc spawn 1; mmap 1 0x40000000 4M --file c --prot rw --shared; "
SEQ = BASE + "touch 1 0x40000000 4M --stride 64K; madvise 1 0x40000000 4K dontneed; fault 1 0x40000000"


class FakeKernel(ModelBackend):
    """The model standing in for the kernel, with a planted divergence (``plant``), extra vmstat
    (``vmstat_bump``: per run, added to thp_split_pmd at the planted step) and khugepaged scans."""

    name = "kernel"

    def __init__(self, plant: Any = None, bumps: list[int] | None = None, scans_at: str | None = None):
        super().__init__(Settings())
        self.plant = plant
        self.bumps = list(bumps or [])
        self.bump = 0
        self.scans_at = scans_at
        self.scans = 0

    def start(self) -> None:
        super().start()
        self.bump = 0
        self.scans = 0
        self._next_bump = self.bumps.pop(0) if self.bumps else 0

    def step(self, step: Step) -> dict[str, Any]:
        out = super().step(step)
        if step.op == "madvise" and step.args["advice"] == "dontneed":
            self.bump = self._next_bump
        if self.scans_at and step.line().startswith(self.scans_at):
            self.scans += 1
        return self.plant(step, out) if self.plant else out

    def observe(self) -> dict[str, Any]:
        obs = super().observe()
        obs["vmstat"] = {**obs["vmstat"], "thp_split_pmd": obs["vmstat"].get("thp_split_pmd", 0) + self.bump}
        obs["khugepaged"] = {"full_scans": self.scans, "pages_collapsed": 0}
        return obs


def einval_on_dontneed(step: Step, out: dict[str, Any]) -> dict[str, Any]:
    if step.op == "madvise" and step.args["advice"] == "dontneed":
        return {"result": "EINVAL"}
    return out


def dontneed_known(table: tuple[Known, ...] = ()) -> tuple[Known, ...]:
    planted = Known(
        "#99",
        "open",
        "the planted divergence",
        "test",
        matcher=lambda d: d.step.op == "madvise" and d.step.args["advice"] == "dontneed",
        reproducer=BASE + "madvise 1 0x40000000 4K dontneed",
        number=99,
    )
    return (*table, planted)


# -- the harness, without a kernel -------------------------------------------------------------


def test_a_planted_divergence_is_reported_at_its_step_with_a_replay_command():
    h = Harness(FakeKernel(einval_on_dontneed), known=())
    steps = parse_steps_text(SEQ)
    r = h.run(steps, seed=7)
    assert r.unexpected
    div = r.divergence
    assert div is not None and div.index == 4 and div.step.line() == "madvise 1 0x40000000 4K dontneed"
    assert r.agreed == [conf.family(s) for s in steps[:4]]
    report = div.report()
    assert "UNEXPECTED divergence (huge=advise, seed 7) at step 5 of 5: madvise 1 0x40000000 4K dontneed" in report
    assert "result: kernel EINVAL, model 0" in report
    # The replay command is one line and gives back exactly the steps up to the divergence.
    (line,) = [ln for ln in report.splitlines() if "replay:" in ln]
    argv = shlex.split(line.split("replay: ", 1)[1])
    assert argv[:2] == ["thpctl", "conformance"] and argv[argv.index("--huge") + 1] == "advise"
    assert parse_steps_text(argv[argv.index("--steps-text") + 1]) == steps[:5]


def test_smaps_and_vmstat_differences_show_both_sides():
    def lose_rss(step: Step, out: dict[str, Any]) -> dict[str, Any]:
        return out

    class RssKernel(FakeKernel):
        def observe(self) -> dict[str, Any]:
            obs = super().observe()
            for rows in obs["smaps"].values():
                for row in rows:
                    row["Rss"] += 4
            return obs

    r = Harness(RssKernel(lose_rss), known=()).run(parse_steps_text(SEQ))
    div = r.divergence
    assert div is not None and div.index == 2  # the mmap: the first step with a VMA
    assert div.aspects() == {"smaps.Rss"}
    text = div.report()
    assert "kernel  0x40000000-0x40400000 rw-s off=0x0 Rss=4 " in text
    assert "model   0x40000000-0x40400000 rw-s off=0x0 Rss=0 " in text


def test_a_known_difference_is_masked_and_counted():
    h = Harness(FakeKernel(einval_on_dontneed), known=dontneed_known())
    r = h.run(parse_steps_text(SEQ))
    assert r.divergence is not None and not r.unexpected
    assert r.divergence.known is not None and r.divergence.known.id == "#99"
    fig = conf.Figures("step", "advise")
    fig.add(r)
    assert fig.known == {"#99": 1} and not fig.unexpected
    assert fig.families["madvise dontneed"]["known"] == 1
    assert "madvise dontneed" in fig.render() and "#99 1" in fig.render()


def test_check_known_flags_an_open_entry_that_now_agrees():
    # The model against itself: the planted entry's reproducer no longer diverges.
    table = dontneed_known()

    def on(kernel: FakeKernel) -> Any:
        return lambda s: Harness(kernel, s, known=table)

    fixed = check_known(on(FakeKernel()), table=table)
    (verdict,) = [c for c in fixed if c.known.id == "#99"]
    assert verdict.stale and verdict.verdict == "now agrees: remove it from the table"
    still = check_known(on(FakeKernel(einval_on_dontneed)), table=table)
    assert [c.verdict for c in still] == ["diverges as listed"]

    def differently(step: Step, out: dict[str, Any]) -> dict[str, Any]:
        return {"result": "EPERM"} if step.op == "mmap" else out

    other = check_known(on(FakeKernel(differently)), table=table)
    assert other[0].stale and other[0].verdict == "diverges differently"
    assert check_known(lambda s: None, table=table)[0].verdict == "not checkable"


def test_an_unexpected_divergence_that_does_not_come_back_is_noise():
    runs = []

    def once(step: Step, out: dict[str, Any]) -> dict[str, Any]:
        if step.op == "madvise":
            runs.append(1)
            if len(runs) == 1:
                return {"result": "EINVAL"}
        return out

    r = Harness(FakeKernel(once), known=()).run(parse_steps_text(SEQ))
    assert r.noise and r.divergence is None and "result: kernel EINVAL, model 0" in r.noise_report
    fig = conf.Figures("step", "advise")
    fig.add(r)
    assert fig.noise == 1 and fig.noise_reports == [r.noise_report] and fig.families["madvise dontneed"]["noise"] == 1


def test_check_known_does_not_take_noise_for_agreement():
    calls = []

    def every_other(step: Step, out: dict[str, Any]) -> dict[str, Any]:
        if step.op == "madvise":
            calls.append(1)
            if len(calls) % 2:
                return {"result": "EINVAL"}
        return out

    unmatched = (Known("#98", "open", "t", "t", matcher=lambda d: False, reproducer=BASE + "madvise 1 0x40000000 4K dontneed"),)
    (check,) = check_known(lambda s: Harness(FakeKernel(every_other), s, known=unmatched), table=unmatched)
    assert check.verdict == "not checkable" and check.detail.startswith("noise three times")
    assert len(calls) == 6  # three runs, each confirmed once
    calls.clear()
    calls.append(1)  # the first run's madvise is now an even call: it agrees at once
    (check,) = check_known(lambda s: Harness(FakeKernel(every_other), s, known=unmatched), table=unmatched)
    assert check.verdict == "now agrees: remove it from the table"


def test_vmstat_only_divergence_that_does_not_come_back_is_noise():
    h = Harness(FakeKernel(bumps=[1, 0]), known=())  # +1 thp_split_pmd on the first run only
    r = h.run(parse_steps_text(SEQ))
    assert r.noise and r.divergence is None
    h = Harness(FakeKernel(bumps=[1, 1]), known=())  # it comes back: a divergence
    r = h.run(parse_steps_text(SEQ))
    assert r.unexpected and r.divergence is not None
    assert r.divergence.aspects() == {"vmstat.thp_split_pmd"}
    no_vmstat = Harness(FakeKernel(bumps=[1, 1]), Settings(vmstat=False), known=())
    assert no_vmstat.run(parse_steps_text(SEQ)).divergence is None


def test_a_khugepaged_pass_during_a_step_makes_the_sequence_inconclusive():
    r = Harness(FakeKernel(scans_at="touch"), known=()).run(parse_steps_text(SEQ))
    assert r.divergence is None and r.inconclusive.startswith("#14: khugepaged ran 1 full scan(s) during step 4")


def test_shrinking_keeps_the_divergence_and_drops_what_it_does_not_need():
    steps = parse_steps_text(
        BASE + "fault 1 0x40000000; proc fork 1 2; touch 2 0x40000000 2M --write; file write c 0 8K; "
        "madvise 1 0x40000000 4K dontneed; fault 1 0x40001000"
    )
    h = Harness(FakeKernel(einval_on_dontneed), known=())
    div = h.run(steps).divergence
    assert div is not None
    small = h.shrink(div)
    assert [s.line() for s in small.steps] == ["madvise 1 0x40000000 4K dontneed"]  # ESRCH vs EINVAL: still
    assert small.signature() == div.signature()


def test_the_model_against_itself_agrees_on_random_sequences():
    h = Harness(FakeKernel(), known=())
    for mode in ("step", "khugepaged"):
        fig = conf.run_seeds(h, range(40), steps=10, mode=mode)
        assert fig.sequences == 40 and fig.agreed == 40, [d.report() for d in fig.unexpected]
        unsupported = {f for f, c in fig.families.items() if c["unsupported"]}
        # Every advice the generator draws is modelled (issue 9: madvise with every advice).
        assert not {f for f in unsupported if f.startswith("madvise")}, unsupported


class ElsewhereKernel(FakeKernel):
    """A kernel whose get_unmapped_area picks other addresses: a moving mremap's VMA lands
    ``SHIFT`` higher than the model's."""

    SHIFT = 0x10000000

    def step(self, step: Step) -> dict[str, Any]:
        out = super().step(step)
        if step.op == "mremap" and out["addr"] not in (None, step.args["addr"]):
            out = {**out, "addr": out["addr"] + self.SHIFT}
        return out

    def observe(self) -> dict[str, Any]:
        obs = super().observe()
        for rows in obs["smaps"].values():
            for row in rows:
                if row["start"] >= 0x7E0000000000:
                    row["start"] += self.SHIFT
                    row["end"] += self.SHIFT
        return obs


def test_a_moved_mapping_is_compared_at_the_models_address_in_the_process_and_its_children():
    moved = "mremap 1 0x40000000 1M 2M --maymove; "
    h = Harness(ElsewhereKernel(), known=())
    r = h.run(parse_steps_text(BASE + moved + "proc fork 1 2; touch 2 0x40100000 1M"))
    assert r.divergence is None and len(r.agreed) == 6
    # An errno from mremap is a result like any other: refused in place, it is compared as such.
    r = h.run(parse_steps_text(BASE + "mremap 1 0x40000000 1M 2M"))
    assert r.divergence is None and h._model().step(parse_step("mremap 1 0x40000000 1M 2M"))["result"] == "ENOMEM"


def test_unsupported_steps_are_detected_from_the_world():
    class Lacking(World):  # a model without these syscalls, as before it gained them
        mprotect = None
        mlock = None

    m = ModelBackend(world_factory=lambda knobs: Lacking(knobs, codec=False))
    assert m.unsupported(parse_step("mprotect 1 0x40000000 4K r")) == "mprotect is not modelled (World has no mprotect)"
    assert m.unsupported(parse_step("madvise 1 0x40000000 4K willneed")) is None
    assert m.unsupported(parse_step("madvise 1 0x40000000 4K hugepage")) is None
    assert m.unsupported(parse_step("mmap 1 0x40000000 4K --file c --prot wx")) == "prot wx is not modelled"

    calls = []

    class Gained(World):
        def mprotect(self, pid: int, addr: int, length: int, prot: str) -> int:
            calls.append((pid, addr, length, prot))
            return 0

        def mlock(self, pid: int, addr: int, length: int) -> int:
            return 0

    g = ModelBackend(world_factory=lambda knobs: Gained(knobs, codec=False))
    step = parse_step("mprotect 1 0x40000000 4K r")
    assert g.unsupported(step) is None
    assert g.step(step) == {"result": 0} and calls == [(1, 0x40000000, 4096, "r")]
    assert g.unsupported(parse_step("mlock 1 0x40000000 4K")) is None
    assert g.unsupported(parse_step("mlock 1 0x40000000 4K --onfault")) == "the model's mlock has no onfault"


def test_generated_sequences_are_deterministic_and_speak_thpctl_run():
    for mode in ("step", "khugepaged"):
        for seed in range(30):
            a, b = generate(RandomDraw(seed), 12, mode), generate(RandomDraw(seed), 12, mode)
            assert a == b
            assert parse_steps_text(steps_text(a)) == a
            assert a[0].line() == "file create c --size 4M --shmem"
            if mode == "khugepaged":
                ops = [s.op for s in a]
                assert ops[1] == "sysfs set" and ops.count("sysfs set") == 1
                i = ops.index("wait-scans")
                assert set(ops[i + 1 :]) == {"touch"}
    with_none = conf.with_max_ptes_none(generate(RandomDraw(3), 5, "khugepaged"), 0)
    assert [s.args["value"] for s in with_none if s.op == "sysfs set"] == [0]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequences(steps=8))
def test_hypothesis_sequences_are_valid_scenarios(steps: list[Step]):
    assert steps[0].op == "file create" and parse_steps_text(steps_text(steps)) == steps


def test_the_known_table_is_consistent_with_the_readme():
    readme = " ".join((ROOT / "README.md").read_text().split())
    ids = [k.id for k in KNOWN]
    assert len(ids) == len(set(ids))
    for k in KNOWN:
        assert k.status in ("deliberate", "open", "harness"), k.id
        assert k.reproducer or k.unreachable, f"{k.id}: a reproducer, or why none can show it"
        if k.reproducer:
            parse_steps_text(k.reproducer)
        if k.status == "open":
            assert k.number is not None and k.id == f"#{k.number}"
        if k.status == "deliberate":
            assert k.readme and " ".join(k.readme.split()) in readme, f"{k.id}: its README entry is gone"


def test_the_command_line_without_a_kernel(monkeypatch):
    monkeypatch.setattr(conf, "kernel_unavailable", lambda: "needs root (a test)")
    out, err = io.StringIO(), io.StringIO()
    assert conf.run_cli(conf.build_parser().parse_args(["--seeds", "3"]), out, err) == conf.EXIT_UNAVAILABLE
    assert err.getvalue() == "thpctl conformance: the kernel side cannot run here: needs root (a test)\n"
    err = io.StringIO()
    args = conf.build_parser().parse_args(["--skip-unavailable"])
    assert conf.run_cli(args, out, err) == conf.EXIT_OK and err.getvalue().count("\n") == 1
    err = io.StringIO()
    args = conf.build_parser().parse_args(["--steps-text", "proc spawn 1; frobnicate"])
    assert conf.run_cli(args, out, err) == conf.EXIT_USAGE and "unsupported step 'frobnicate'" in err.getvalue()
    err = io.StringIO()
    args = conf.build_parser().parse_args(["--model-knob", "thpsplit/install_pmd=7"])
    assert conf.run_cli(args, out, err) == conf.EXIT_USAGE


async def test_thpctl_conformance_is_a_command(monkeypatch):
    from shared.thpctl.cli import amain

    monkeypatch.setattr(conf, "kernel_unavailable", lambda: "needs root (a test)")
    out, err = io.StringIO(), io.StringIO()
    assert await amain(["conformance", "--seeds", "1"], out, err) == 77
    assert err.getvalue() == "thpctl conformance: the kernel side cannot run here: needs root (a test)\n"
    out = io.StringIO()
    assert await amain(["conformance", "--skip-unavailable", "--json"], out, io.StringIO()) == 0
    assert json.loads(out.getvalue()) == {"skipped": "needs root (a test)"}
    assert await amain(["conformance", "--mode", "bogus"], out, io.StringIO()) == 2


# -- the real kernel ----------------------------------------------------------------------------

# Sequences per test: a few hundred in all (docs/CONFORMANCE.md has the timing). Since the
# backend runs on one CPU a sequence costs ~1.5x what it did; `thpctl conformance --seeds N`
# runs any number.
EXAMPLES = {("step", "advise"): 200, ("step", "never"): 150, ("khugepaged", "advise"): 80}
MAX_STEPS = 12


def _knob_snapshot() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(THP):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), THP)
            if rel in ("khugepaged/full_scans", "khugepaged/pages_collapsed") or "/stats/" in f"/{rel}":
                continue
            try:
                out[rel] = read_knob(rel)
            except OSError:
                continue
    return out


def _our_mounts(roots: list[str]) -> list[str]:
    """This session's tmpfs mounts still in /proc/mounts (other runs on the machine have their own)."""
    with open("/proc/mounts") as f:
        return [line for line in f if line.split()[1] in roots]


def _processes_under(roots: list[str]) -> list[int]:
    """Live processes whose command line names one of the backends' roots (the zygotes and the
    workers they fork carry it)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(root in cmdline for root in roots):
            found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def session():
    reason = conf.kernel_unavailable()
    if reason:
        pytest.skip(f"conformance against the kernel: {reason}")
    # The machine-wide lock (an outer guard that changes nothing) is held across both snapshots:
    # another backend on this machine may change knobs too, under the same lock.
    outer = SysfsGuard()
    try:
        outer.__enter__()  # entered once: `with outer` again would take the lock twice
    except BackendError as err:  # another run holds the machine for longer than the lock timeout
        pytest.skip(f"conformance against the kernel: {err}")
    with contextlib.ExitStack() as stack:
        stack.push(outer)
        before = _knob_snapshot()
        try:
            s = KernelSession(("advise", "never")).__enter__()
        except BackendError as err:
            pytest.skip(f"conformance against the kernel: {err}")
        roots = [kb.root for kb in s.backends.values()]
        try:
            yield s
        finally:
            s.__exit__(None, None, None)
        after = _knob_snapshot()
    assert after == before, "a THP knob was not put back"
    assert not _our_mounts(roots), "a tmpfs of the kernel backend is still mounted"
    assert not _processes_under(roots), "a worker or zygote of the kernel backend is still running"


@pytest.mark.parametrize("entry", [k for k in KNOWN if k.reproducer], ids=lambda k: k.id)
def test_each_known_difference_still_diverges_as_listed(session, entry):
    (check,) = check_known(session.harness_for, ids=[entry.id])
    if check.verdict.startswith("now agrees"):
        pytest.fail(f"{entry.id} now agrees with the kernel: remove it from KNOWN in shared/sim/conformance.py ({entry.title})")
    assert check.verdict == "diverges as listed", f"{entry.id}: {check.verdict}: {check.detail}"


def _check(session, steps: list[Step], huge: str) -> None:
    r = session.harness(Settings(huge=huge)).run(steps)
    # An AssertionError (not pytest.fail, a BaseException): hypothesis shrinks it and prints it.
    assert not r.unexpected, r.divergence.report() if r.divergence else ""


def _given(mode: str, huge: str) -> Any:
    def decorate(test: Any) -> Any:
        return settings(
            max_examples=EXAMPLES[(mode, huge)],
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )(given(steps=sequences(MAX_STEPS, mode))(test))

    return decorate


@_given("step", "advise")
def test_random_sequences_step_mode_huge_advise(session, steps):
    _check(session, steps, "advise")


@_given("step", "never")
def test_random_sequences_step_mode_huge_never(session, steps):
    _check(session, steps, "never")


@_given("khugepaged", "advise")
def test_random_sequences_khugepaged_mode(session, steps):
    _check(session, steps, "advise")
