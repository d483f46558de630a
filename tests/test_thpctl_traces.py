"""thpctl replay / import procfs / record / workload and --record (issue 11): a trace replayed
into the live daemons ends as it does in-process, what thpctl sends records as a trace that
replays, and bad traces are named by line and field."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.sim import record as rec
from shared.sim import workloads as wl
from shared.sim.trace import dumps_trace, loads_trace, read_trace, write_trace
from shared.thpctl.cli import amain
from shared.thpctl.launch import running_daemons
from tests.helpers import thpctl as thpctl_at

MB = 1 << 20
BASE = 0x40000000


async def thpctl(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = await amain(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


async def ok(*argv: str) -> str:
    status, out, err = await thpctl(*argv)
    assert status == 0, (argv, out, err)
    return out


def small_trace(path: Path) -> None:
    """Two processes map an 8 MiB text with MADV_HUGEPAGE and fault it in; khugepaged (every
    100 ms) gets three full scans; they fault it again. Nothing in it depends on how long
    anything takes, so the daemons and the model end alike."""
    events: list[dict] = [{"t_ms": 0.0, "op": "file_create", "name": "libt.so", "size": 8 * MB}]
    for pid in (1, 2):
        events += [
            {"t_ms": 0.0, "op": "spawn", "pid": pid},
            {"t_ms": 0.0, "op": "mmap", "pid": pid, "addr": BASE, "length": 8 * MB, "name": "libt.so", "prot": "rx",
             "shared": False},
            {"t_ms": 0.0, "op": "madvise", "pid": pid, "addr": BASE, "length": 8 * MB, "advice": "hugepage"},
        ]
    events += [{"t_ms": float(pid), "op": "touch", "pid": pid, "addr": BASE, "length": 8 * MB} for pid in (1, 2)]
    events.append({"t_ms": 3.0, "op": "wait_scans", "n": 3})
    events += [{"t_ms": 4.0, "op": "touch", "pid": pid, "addr": BASE, "length": 8 * MB, "stride": 65536}
               for pid in (1, 2)]
    events.append({"t_ms": 5.0, "op": "fault", "pid": 1, "addr": 0x10000})  # nothing there: SIGSEGV
    events.append({"t_ms": 6.0, "op": "mark", "label": "end"})
    write_trace(path, events, {"thpsplit_trace": 1, "sysfs": {"khugepaged/scan_sleep_millisecs": 100,
                                                              "thpsplit/remap_sleep_millisecs": 100}})


async def test_replay_into_the_daemons_ends_as_in_process(workdir: Path) -> None:
    trace = workdir / "small.jsonl"
    small_trace(trace)
    here = json.loads(await ok("--json", "replay", str(trace), "--in-process", "--timing", "fast"))
    async with running_daemons(workdir) as d:
        status, out, err = await thpctl_at(d, "--json", "replay", str(trace), "--timing", "fast")
        assert (status, err) == (0, ""), out
        live = json.loads(out)
        # The daemons kept the state the trace built.
        status, smaps, _ = await thpctl_at(d, "smaps", "2")
    assert live["mode"] == "daemons" and here["mode"] == "in-process"
    assert live["events"] == here["events"] == 14 and live["errors"] == here["errors"] == {}
    assert live["final"] == here["final"]
    assert here["final"]["pmd_mapped_ranges"] == 8 and here["final"]["pmd_mapped_kb"] == 16384
    assert here["final"]["vmstat"]["thp_collapse_alloc"] == 4
    assert live["faults"]["sigsegv"] == here["faults"]["sigsegv"] == 1
    assert status == 0 and re.search(r"\nFilePmdMapped: +8192 kB\n", smaps)
    text = await ok("replay", str(trace), "--in-process", "--timing", "fast")
    assert "PMD-mapped at the end: 8 ranges (16384 kB) in 2 processes" in text


async def test_replay_timing_in_the_daemons(workdir: Path) -> None:
    """Original timing, scaled: events go out at their (scaled) time, never early."""
    trace = workdir / "timed.jsonl"
    events = [{"t_ms": 0.0, "op": "file_create", "name": "f", "size": 2 * MB},
              {"t_ms": 0.0, "op": "spawn", "pid": 1},
              {"t_ms": 200.0, "op": "spawn", "pid": 2},
              {"t_ms": 400.0, "op": "mark", "label": "end"}]
    write_trace(trace, events, {"thpsplit_trace": 1})
    async with running_daemons(workdir) as d:
        status, out, err = await thpctl_at(d, "--json", "replay", str(trace), "--timing", "0.5")
        doc = json.loads(out)
    assert (status, err) == (0, "") and doc["timing"] == 0.5 and 0.1 <= doc["wall_s"] < 2 and doc["max_lag_ms"] < 100
    assert sorted(doc["final"]["processes"]) == ["1", "2"]


async def test_record_round_trip(workdir: Path) -> None:
    """thpctl --record FILE run SCRIPT against the daemons; the file is a trace that replays
    in-process to the same PMD mappings the daemons showed."""
    script = workdir / "session.txt"
    script.write_text(
        "sysfs set khugepaged/scan_sleep_millisecs 100\n"
        "file create lib.so --size 4M\n"
        "proc spawn 7\n"
        "mmap 7 auto 4M --file lib.so --prot rx --private\n"
        "smaps 7\n"
    )
    rec_file = workdir / "rec.jsonl"
    async with running_daemons(workdir) as d:
        await _ok_at(d, "--record", str(rec_file), "run", str(script))
        first = read_trace(rec_file)
        addr = next(e for e in first.events if e["op"] == "mmap")["addr"]
        assert addr is not None and addr % (2 * MB) == 0  # the address the daemon chose
        rest = workdir / "rest.txt"
        rest.write_text(f"madvise 7 {addr:#x} 4M hugepage\ntouch 7 {addr:#x} 4M\nwait-scans 2\ntouch 7 {addr:#x} 4M\n"
                        f"vmstat\n")
        await _ok_at(d, "--record", str(rec_file), "run", str(rest))
        second = read_trace(rec_file)
        smaps = await _ok_at(d, "--json", "smaps", "7")
    live_kb = sum(e["FilePmdMapped"] for e in json.loads(smaps))
    assert live_kb == 4096
    # One thpctl run, one trace: the second recording replaced the first.
    h = first.header
    assert h["source"] == "thpctl" and h["clock"] == "real" and h["meta"]["skipped"] == {"client.smaps": 1}
    assert [e["op"] for e in first.events] == ["sysfs_set", "file_create", "spawn", "mmap"]
    assert [e["op"] for e in second.events] == ["madvise", "touch", "wait_scans", "touch"]
    assert second.header["meta"] == {"command": "thpctl run", "skipped": {"client.vmstat": 2}}
    times = [e["t_ms"] for e in second.events]
    assert times == sorted(times) and times[0] == 0.0 and times[-1] > 50  # real time: the scans took a while
    both = workdir / "both.jsonl"
    write_trace(both, [*first.events, *({**e, "t_ms": e["t_ms"] + first.events[-1]["t_ms"]} for e in second.events)],
                {"thpsplit_trace": 1})
    doc = json.loads(await ok("--json", "replay", str(both), "--in-process"))
    assert doc["errors"] == {} and doc["final"]["pmd_mapped_kb"] == live_kb


async def _ok_at(d, *argv: str) -> str:
    status, out, err = await thpctl_at(d, *argv)
    assert (status, err) == (0, ""), (argv, out, err)
    return out


async def test_record_needs_a_writable_file(tmp_path: Path) -> None:
    status, _, err = await thpctl("--record", str(tmp_path / "no" / "such" / "dir.jsonl"), "vmstat")
    assert status == 2 and "--record" in err and "cannot write" in err


# -- bad traces -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "where"),
    [
        (['{"t_ms":0,"op":"spawn","pid":"1"}'], ":2: field 'pid': expected an integer, got a string"),
        (['{"t_ms":0,"op":"spawn","pid":1}', '{"t_ms":0,"op":"mmap","pid":1,"addr":0,"length":-1,"name":"x"}'],
         ":3: field 'length': must not be negative (got -1)"),
        (['{"t_ms":5,"op":"spawn","pid":1}', '{"t_ms":4,"op":"exit","pid":1}'], ":3: field 't_ms': time goes backwards"),
        (['{"t_ms":0,"op":"fly","pid":1}'], ":2: field 'op': unknown op 'fly'"),
        (['{"t_ms":0,"op":"spawn","pid":1,"colour":2}'], ":2: field 'colour': unknown field for op 'spawn'"),
    ],
)
async def test_replay_refuses_a_bad_trace_before_sending_anything(tmp_path: Path, lines: list[str], where: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"thpsplit_trace":1}\n' + "".join(line + "\n" for line in lines))
    # No daemon runs at this address: nothing may be sent before the trace is checked.
    status, out, err = await thpctl("--remapd", f"unix:{tmp_path}/none.sock", "--collapsed", f"unix:{tmp_path}/none2.sock",
                                    "replay", str(bad))
    assert status == 2 and out == "" and err.startswith(f"thpctl replay: {bad}{where}") and err.count("\n") == 1


async def test_replay_usage_and_file_errors(tmp_path: Path) -> None:
    status, _, err = await thpctl("replay", str(tmp_path / "missing.jsonl"), "--in-process")
    assert status == 1 and "No such file" in err
    status, _, err = await thpctl("replay", "x.jsonl", "--timing", "soon")
    assert status == 2 and "--timing" in err
    v2 = tmp_path / "v2.jsonl"
    v2.write_text('{"thpsplit_trace":2}\n')
    status, _, err = await thpctl("replay", str(v2), "--in-process")
    assert status == 2 and "unsupported trace version 2" in err


# -- workload, import procfs, record ----------------------------------------------------------


async def test_workload_writes_the_generators_bytes(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    text = await ok("workload", "text", "--seed", "3", "-p", "scale=1/64", "-p", "procs=2", "-p", "duration_ms=500",
                    "-o", str(out))
    assert text == f"{out}: {len(out.read_text().splitlines()) - 1} events\n"
    w = wl.generate("text", 3, scale=1 / 64, procs=2, duration_ms=500)
    assert out.read_text() == dumps_trace(w.events(), w.header)
    stdout = await ok("workload", "busy-lock", "-p", "procs=2")
    trace = loads_trace(stdout)
    assert trace.header["source"] == "workload:busy-lock" and trace.header["params"]["procs"] == 2
    listing = json.loads(await ok("workload", "--list"))
    assert list(listing) == ["busy-lock", "text", "shmem", "uprobe", "churn"]
    status, _, err = await thpctl("workload", "text", "-p", "colour=1")
    assert status == 2 and "unknown parameter 'colour'" in err
    status, _, err = await thpctl("workload")
    assert status == 2


@pytest.fixture
def live_python():
    code = "import json, decimal, sqlite3, time; print('ready', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def test_import_procfs_through_thpctl_and_replay(live_python: int, tmp_path: Path) -> None:
    out = tmp_path / "py.jsonl"
    text = await ok("import", "procfs", str(live_python), "-o", str(out))
    assert text.startswith(f"{out}: ") and "VMAs of" in text
    trace = read_trace(out)
    assert trace.header["source"] == "procfs" and trace.events[0]["op"] == "file_create"
    paths = {f["path"] for f in trace.header["meta"]["files"].values()}
    assert any("python" in p for p in paths)
    assert sum(e["op"] == "mmap" for e in trace.events) >= 5
    doc = json.loads(await ok("--json", "replay", str(out), "--in-process", "--timing", "fast"))
    assert doc["errors"] == {} and list(doc["final"]["processes"]) == [str(live_python)]
    assert doc["final"]["processes"][str(live_python)]["rss_kb"] > 1000
    # Without -o the trace is the output.
    assert loads_trace(await ok("import", "procfs", str(live_python))).events == trace.events
    status, _, err = await thpctl("import", "procfs", str(tmp_path / "nothing"))
    assert status == 1 and "not a directory" in err


REASON = rec.unavailable()


@pytest.mark.skipif(REASON is not None, reason=f"record cannot run here: {REASON}")
async def test_record_a_command_through_thpctl_and_replay(tmp_path: Path) -> None:
    out = tmp_path / "ls.jsonl"
    text = await ok("record", "-o", str(out), "--keep-alive", "--", "/bin/ls", str(tmp_path))
    assert text.startswith(f"{out}: ") and "in file mappings" in text and "exit status 0" in text
    trace = read_trace(out)
    assert trace.header["source"] == "record" and any(e["op"] == "fault" for e in trace.events)
    doc = json.loads(await ok("--json", "replay", str(out), "--in-process", "--timing", "fast"))
    assert doc["errors"] == {} and doc["faults"].get("sigsegv", 0) == 0 and doc["final"]["processes"]
    status, _, err = await thpctl("record", "-o", str(out))
    assert status == 2 and "no command" in err
