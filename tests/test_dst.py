"""Deterministic simulation testing (shared/sim/dst.py): a few hundred seeds of a random workload
with faults on the peer link and daemon crashes, every step checked; that a seed replays
identically; that the checks catch the rule-breaking a byte stream never does; and, at the end,
a regression test for each defect the simulation found in the model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import CheckedWorld

from remapd.uprobes import uprobe_add, uprobe_del
from shared.knobs import Knobs
from shared.protocol import messages as m
from shared.sim import dst
from shared.sim.dst import C2R, R2C, LinkWorld
from shared.sim.invariants import check
from shared.sim.world import Pending

MB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The suite's share of the seeds; `python -m shared.sim.dst --seeds 0:N` runs any number.
SEEDS = range(200)
STEPS = 120


def test_a_few_hundred_seeds_hold_every_invariant_under_faults():
    results = dst.run_seeds(SEEDS, STEPS)
    figures = dst.summary(results)
    failed = [f"{r.violation.splitlines()[0]}\n  reproduce: {r.command()}" for r in results if r.violation]
    assert not failed, "\n".join(failed)
    # Every kind of fault struck, and the workload did its work: collapses, cuts while one was
    # in flight, requests answered and refused.
    faults = figures["faults"]
    kinds = [k for k in dst.FAULT_KINDS if k != "restore"]
    for kind in (*kinds, "cut_mid_collapse", "restored_collapser", "restored_remapper"):
        assert faults.get(kind, 0) > 0, (kind, faults)
    assert figures["collapses"] > 0 and figures["full_checks"] > len(SEEDS) * 10


def test_a_seed_replays_identically_whatever_the_hash_seed():
    a = dst.run_seed(11, 200)
    b = dst.run_seed(11, 200)
    assert (a.trace, a.faults, a.ops, a.delivered) == (b.trace, b.faults, b.ops, b.delivered)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": ROOT}
    code = "from shared.sim import dst; r = dst.run_seed(11, 200); print(r.delivered, sorted(r.faults.items()), r.trace[-1])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == f"{a.delivered} {sorted(a.faults.items())} {a.trace[-1]}"


@pytest.mark.parametrize("unsafe", ["reorder", "duplicate"])
def test_the_checks_catch_what_a_byte_stream_never_does(unsafe):
    """Reordering within a direction, or duplicating a message that is not idempotent (an
    RmapDelta, a request), breaks the model within a few seeds: the checks are sharp enough to
    see what the protocol's FIFO, exactly-once link rules out."""
    caught = next((r for r in (dst.run_seed(s, 200, unsafe=[unsafe]) for s in range(40)) if r.violation), None)
    assert caught is not None, f"no seed caught unsafe {unsafe}"
    assert f"--unsafe {unsafe}" in caught.command()


def test_the_command_line_prints_figures_and_the_reproducing_command():
    env = {**os.environ, "PYTHONPATH": ROOT}
    ok = subprocess.run(
        [sys.executable, "-m", "shared.sim.dst", "--seeds", "0:3", "--steps", "60"],
        env=env, capture_output=True, text=True, cwd=ROOT, check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "violations: 0" in ok.stdout and "faults:" in ok.stdout
    seed = next(s for s in range(40) if dst.run_seed(s, 200, unsafe=["duplicate"]).violation)  # 1 today
    bad = subprocess.run(
        [sys.executable, "-m", "shared.sim.dst", "--seed", str(seed), "--steps", "200", "--unsafe", "duplicate"],
        env=env, capture_output=True, text=True, cwd=ROOT, check=False,
    )
    assert bad.returncode == 1
    assert f"reproduce: python -m shared.sim.dst --seed {seed} --steps 200 --unsafe duplicate" in bad.stdout
    assert "VIOLATION" in bad.stdout


# -- what the simulation found --------------------------------------------------------------


def test_a_long_request_while_the_peer_is_gone_finishes():
    """Found by the simulation (seed 8): Remapper.peer_lost() answered the waiting calls, a
    resumed touch made its next call, and peer_lost's outbox.clear() then dropped that call's
    message while the call stayed waiting: the touch never finished (and with the driver's
    64 rounds of peer_lost per event, could not finish before the peer came back). Now a call
    made while the peer is gone is answered at once (Actor.go_offline)."""
    w = CheckedWorld(Knobs(read_ahead_kb=0, fault_around_bytes=4096))
    w.file_create("f", 4 * MB)
    w.spawn(1)
    addr = w.mmap(1, None, 4 * MB, "f")
    w.disconnect()
    touch = w.start(w.remapper, w.remapper.touch(1, addr, 4 * MB))
    assert touch.done and touch.result() == {"sigbus": 1024}
    assert not w.remapper.pending_calls()
    w.connect()
    assert w.touch(1, addr, 4 * MB) == {"major": 1024}


def _probe_world() -> tuple[LinkWorld, int]:
    w = LinkWorld(Knobs(read_ahead_kb=0, fault_around_bytes=4096))
    w.file_create("a", 2 * MB)
    w.spawn(1)
    addr = w.mmap(1, 0x40000000, 2 * MB, "a", prot="rx", shared=False)
    w.manual = True
    return w, addr


def _uprobe(w: LinkWorld, action: str) -> Pending:
    fn = uprobe_add if action == "add" else uprobe_del
    return w.perform(
        w.request(m.Uprobe, action, "a", 0), w.remapper, fn=lambda action, name, offset: fn(w.remapper, name, offset), waits=True
    )


def test_a_breakpoint_install_racing_the_process_exit_installs_nothing():
    """Found by the simulation (seed 50): install_breakpoint looked the original page up, the
    process exited meanwhile, and the anon breakpoint page went into the dead mm's tables."""
    w, _ = _probe_world()
    probe = _uprobe(w, "add")
    assert isinstance(w.remapper.outbox[-1], m.LookupPage)  # the copy's lookup is in flight
    w.perform(w.request(m.ProcExit, 1), w.remapper, waits=True)
    w.drain()
    w.manual = False
    check(w.collapser, w.remapper)
    assert probe.done and probe.result()["mappings"] == 0
    assert not w.remapper.anon.mapcount


def test_a_breakpoint_removal_racing_the_process_exit_hands_its_mapping_back():
    """The same race on removal: the original page's lookup accounted a mapping for a process
    that exited meanwhile; it is handed back instead of leaking a reference."""
    w, _ = _probe_world()
    _uprobe(w, "add")
    w.drain()
    probe = _uprobe(w, "del")
    assert isinstance(w.remapper.outbox[-1], m.LookupPage)
    w.perform(w.request(m.ProcExit, 1), w.remapper, waits=True)
    w.drain()
    w.manual = False
    check(w.collapser, w.remapper)
    assert probe.done and probe.result()["collapse_pte_mapped_thp"] == []


def test_splitting_a_thp_still_in_the_lru_add_batch_keeps_its_pages_on_the_lru():
    """Found by the simulation (seed 63): a PMD-order shmem folio still in the per-CPU LRU add
    batch was split by truncate; the batch named only the head, so the tails stayed off the LRU
    for good and khugepaged's scan met SCAN_PAGE_LRU there ever after. The checker now also
    requires every cached page to be on the LRU or in the batch."""
    w = CheckedWorld(Knobs(shmem_enabled="always", read_ahead_kb=0, fault_around_bytes=4096))
    w.file_create("s", 4 * MB, shmem=True)
    w.spawn(1)
    addr = w.mmap(1, None, 4 * MB, "s", prot="rw")
    assert w.fault(1, addr) == "pmd"
    w.munmap(1, addr, 4 * MB)
    w.file_truncate("s", MB)  # splits the folio (the checker runs after it)
    assert w.collapser.by_name["s"].nrpages == 256


def test_link_world_delivers_one_message_at_a_time():
    w, addr = _probe_world()
    fault = w.perform(w.request(m.Fault, 1, addr), w.remapper, waits=True)
    assert not fault.done and len(w.remapper.outbox) == 1
    assert isinstance(w.deliver(R2C), m.LookupPage)
    assert isinstance(w.deliver(C2R), m.PageAnswer)
    assert fault.done and fault.result() == {"result": "major"}


def test_a_cow_fault_racing_a_read_fault_on_the_same_page_keeps_one_mapping():
    """Found by the simulation (seed 704 of 1000): a read fault and a write fault on the same
    page of a private mapping both looked it up; the read fault mapped the file page, then the
    write fault's copy-on-write put its anon copy over that PTE, leaking the file page's mapping
    (its mapcount, a reference and MM_FILEPAGES). do_cow_fault's finish_fault finds the PTE no
    longer none and leaves it; the write fault then copies the page it finds there."""
    w = LinkWorld(Knobs(read_ahead_kb=0, fault_around_bytes=4096))
    w.file_create("f", 2 * MB)
    w.spawn(1)
    addr = w.mmap(1, 0x40000000, 2 * MB, "f", prot="rw", shared=False)
    w.manual = True
    read = w.perform(w.request(m.Fault, 1, addr), w.remapper, waits=True)
    write = w.perform(w.request(m.Fault, 1, addr, True), w.remapper, waits=True)
    assert [type(msg) for msg in w.remapper.outbox] == [m.LookupPage, m.LookupPage]
    w.deliver(R2C)
    w.deliver(R2C)
    w.deliver(C2R)  # the read fault maps the file page
    w.deliver(C2R)  # the copy's answer finds the PTE taken
    w.drain()
    w.manual = False
    check(w.collapser, w.remapper)
    assert read.result() == {"result": "major"} and write.result() == {"result": "minor"}
    mm = w.remapper.mms[1]
    assert mm.rss == {"MM_FILEPAGES": 0, "MM_ANONPAGES": 1, "MM_SHMEMPAGES": 0}
