"""Trace files (issue 11): the format's validation names line and field, reading is incremental,
writing is canonical and deterministic, and replay applies events to a World with the timing
asked for."""

from __future__ import annotations

import io
import json
import shlex

import pytest

from shared.knobs import Knobs
from shared.sim import trace as tr
from shared.sim.trace import (
    MAX_LINE_BYTES,
    Trace,
    TraceError,
    TraceReader,
    dumps_trace,
    event,
    loads_trace,
    make_header,
    read_trace,
    replay,
    to_run_line,
    validate_event,
    write_trace,
)
from shared.sim.world import World
from tests.conftest import ONE_PAGE_AT_A_TIME, CheckedWorld

MB = 1 << 20
FIXED = 0x40000000
HEADER = '{"thpsplit_trace":1}\n'


def setup_events(size: int = 4 * MB) -> list[dict]:
    return [
        event("file_create", 0, name="lib.so", size=size),
        event("spawn", 0, pid=1),
        event("mmap", 0, pid=1, addr=FIXED, length=size, name="lib.so", prot="rx", shared=False),
        event("madvise", 0, pid=1, addr=FIXED, length=size, advice="hugepage"),
    ]


def bad(lines: list[str], header: str = HEADER) -> TraceError:
    with pytest.raises(TraceError) as info:
        loads_trace(header + "".join(line + "\n" for line in lines), name="t.jsonl")
    return info.value


# -- the format ---------------------------------------------------------------------------------


def test_writer_output_is_canonical_and_reads_back_identically() -> None:
    evs = [*setup_events(), {"t_ms": 1.5, "op": "fault", "pid": 1, "addr": FIXED}, {"t_ms": 2, "op": "mark", "label": "end"}]
    text = dumps_trace(evs, make_header("test", seed=7, params={"n": 1}))
    lines = text.splitlines()
    assert json.loads(lines[0]) == {"thpsplit_trace": 1, "source": "test", "seed": 7, "params": {"n": 1}}
    # Defaults are written out, fields in the documented order, no spaces.
    assert lines[5] == '{"t_ms":1.5,"op":"fault","pid":1,"addr":1073741824,"write":false}'
    again = loads_trace(text)
    assert again.header["seed"] == 7
    assert again.events == [validate_event(e) for e in evs]
    assert dumps_trace(again.events, again.header) == text


def test_every_op_round_trips_and_has_a_run_line() -> None:
    examples = {
        "file_create": {'name': "f", 'size': 8192, 'shmem': True},
        "file_write": {'name': "f", 'offset': 0, 'length': 4096},
        "file_sync": {'name': "f"},
        "file_truncate": {'name': "f", 'size': 4096},
        "file_punch": {'name': "f", 'offset': 0, 'length': 4096},
        "drop_caches": {},
        "spawn": {'pid': 1},
        "exit": {'pid': 1},
        "fork": {'pid': 1, 'child': 2},
        "mmap": {'pid': 1, 'addr': None, 'length': 4096, 'name': "my lib.so", 'offset': 4096, 'prot': "rw", 'shared': False},
        "munmap": {'pid': 1, 'addr': FIXED, 'length': 4096},
        "mremap": {'pid': 1, 'addr': FIXED, 'old_length': 4096, 'new_length': 8192, 'to': FIXED + (1 << 21),
                   'maymove': True, 'dontunmap': False},
        "madvise": {'pid': 1, 'addr': FIXED, 'length': 4096, 'advice': "pageout"},
        "fault": {'pid': 1, 'addr': FIXED, 'write': True},
        "touch": {'pid': 1, 'addr': FIXED, 'length': 8192, 'write': True, 'stride': 8192},
        "lock": {'pid': 1, 'hold_ms': 2.5, 'write': True},
        "pin": {'pid': 1, 'addr': FIXED},
        "unpin": {'pid': 1, 'addr': FIXED},
        "uprobe": {'action': "add", 'name': "f", 'offset': 100},
        "sysfs_set": {'name': "khugepaged/max_ptes_none", 'value': 0},
        "wait_scans": {'n': 2},
        "mark": {'label': "phase 2"},
    }
    assert set(examples) == set(tr.OPS)
    evs = [event(op, i, **fields) for i, (op, fields) in enumerate(examples.items())]
    assert loads_trace(dumps_trace(evs)).events == evs
    # The run lines are what thpctl's own parser accepts, with the same values.
    from shared.thpctl.cli import build_parser

    parser = build_parser()
    for ev in evs:
        line = to_run_line(ev)
        if ev["op"] == "mark":
            assert line is None
            continue
        args = parser.parse_args(shlex.split(line))
        for key in ("pid", "child", "offset", "length", "n", "action", "old_length", "new_length", "to", "maymove"):
            if key in ev and hasattr(args, key):
                assert getattr(args, key) == ev[key], (line, key)
    mmap = parser.parse_args(shlex.split(to_run_line(evs[9])))
    assert (mmap.file, mmap.prot, mmap.private, mmap.addr) == ("my lib.so", "rw", True, None)


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ('{"t_ms":0,"op":"frobnicate","pid":1}', "op", "unknown op 'frobnicate'"),
        ('{"t_ms":0,"pid":1}', "op", "missing field"),
        ('{"op":"spawn","pid":1}', "t_ms", "missing field"),
        ('{"t_ms":0,"op":"fault","addr":4096}', "pid", "missing field for op 'fault'"),
        ('{"t_ms":0,"op":"spawn","pid":1,"colour":"red"}', "colour", "unknown field for op 'spawn'"),
        ('{"t_ms":0,"op":"spawn","pid":"1"}', "pid", "expected an integer, got a string"),
        ('{"t_ms":0,"op":"spawn","pid":true}', "pid", "expected an integer, got a boolean"),
        ('{"t_ms":0,"op":"fault","pid":1,"addr":4096.0}', "addr", "expected an integer, got a number"),
        ('{"t_ms":0,"op":"spawn","pid":0}', "pid", "outside 1..4194303"),
        ('{"t_ms":0,"op":"file_create","name":"f","size":-1}', "size", "must not be negative"),
        ('{"t_ms":0,"op":"file_create","name":"f","size":9223372036854775808}', "size", "outside"),
        ('{"t_ms":0,"op":"fault","pid":1,"addr":18446744073709551616}', "addr", "outside"),
        ('{"t_ms":0,"op":"file_create","name":"a/b","size":1}', "name", "bad file name"),
        ('{"t_ms":0,"op":"file_create","name":"","size":1}', "name", "bad file name"),
        ('{"t_ms":0,"op":"fault","pid":1,"addr":0,"write":1}', "write", "expected true or false"),
        ('{"t_ms":0,"op":"madvise","pid":1,"addr":0,"length":1,"advice":"mergeable"}', "advice", "not one of"),
        ('{"t_ms":0,"op":"mmap","pid":1,"addr":0,"length":1,"name":"f","prot":"x"}', "prot", "not one of"),
        ('{"t_ms":0,"op":"lock","pid":1,"hold_ms":-1}', "hold_ms", "must not be negative"),
        ('{"t_ms":-0.5,"op":"spawn","pid":1}', "t_ms", "must not be negative"),
        ('{"t_ms":"soon","op":"spawn","pid":1}', "t_ms", "expected a number"),
        ('{"t_ms":1e300,"op":"spawn","pid":1}', "t_ms", "too large"),
        ('{"t_ms":0,"op":"touch","pid":1,"addr":0,"length":1,"stride":0}', "stride", "outside 1.."),
        ('{"t_ms":0,"op":"sysfs_set","name":"enabled","value":"sometimes"}', "value", "sometimes"),
        ('{"t_ms":0,"op":"sysfs_set","name":"khugepaged/full_scans","value":1}', "name", "read-only"),
        ('{"t_ms":0,"op":"sysfs_set","name":"nope","value":1}', "name", "no such knob"),
        ('{"t_ms":0,"op":"uprobe","action":"toggle","name":"f","offset":0}', "action", "not one of"),
    ],
)
def test_a_bad_event_names_its_line_and_field(line: str, field: str | None, words: str) -> None:
    ok = '{"t_ms":0,"op":"spawn","pid":1}'
    err = bad([ok, ok, line])
    assert err.line == 4 and err.source == "t.jsonl"
    if field is not None:
        assert err.field == field
        assert f"field {field!r}" in str(err)
    assert str(err).startswith("t.jsonl:4: ")
    assert words in str(err)


def test_bad_knob_values_are_refused_as_sysfs_would() -> None:
    err = bad(['{"t_ms":0,"op":"sysfs_set","name":"enabled","value":"sometimes"}'])
    assert "'sometimes' is not one of always, madvise, never" in str(err)
    err = bad(['{"t_ms":0,"op":"sysfs_set","name":"khugepaged/max_ptes_none","value":512}'])
    assert "512 is outside 0..511" in str(err)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"t_ms":NaN,"op":"spawn","pid":1}', "non-finite number NaN"),
        ('{"t_ms":Infinity,"op":"spawn","pid":1}', "non-finite number Infinity"),
        ('{"t_ms":0,"op":"spawn","pid":1,"pid":2}', "duplicate key 'pid'"),
        ('{"t_ms":0,"op":"spawn","pid":1} {"t_ms":0}', "extra text"),
        ('{"t_ms":0,"op":"spawn",', "not JSON"),
        ("[1, 2]", "must be a JSON object, got an array"),
        ("", "empty line"),
    ],
)
def test_malformed_lines_are_named(text: str, words: str) -> None:
    err = bad(['{"t_ms":0,"op":"spawn","pid":1}', text])
    assert err.line == 3
    assert words in str(err)


def test_time_must_not_go_backwards() -> None:
    err = bad(['{"t_ms":5,"op":"spawn","pid":1}', '{"t_ms":4.9,"op":"exit","pid":1}'])
    assert (err.line, err.field) == (3, "t_ms")
    assert "backwards" in str(err)
    with pytest.raises(TraceError, match="backwards"):
        dumps_trace([event("spawn", 5, pid=1), event("exit", 1, pid=1)])


@pytest.mark.parametrize(
    ("header", "field", "words"),
    [
        ('{"t_ms":0,"op":"spawn","pid":1}\n', None, "not a thpsplit trace"),
        ('{"thpsplit_trace":2}\n', "thpsplit_trace", "unsupported trace version 2"),
        ('{"thpsplit_trace":"1"}\n', "thpsplit_trace", "expected an integer"),
        ('{"thpsplit_trace":1,"author":"me"}\n', "author", "unknown header field"),
        ('{"thpsplit_trace":1,"clock":"wall"}\n', "clock", "not one of virtual, real"),
        ('{"thpsplit_trace":1,"sysfs":{"enabled":"sometimes"}}\n', "sysfs", "sometimes"),
        ('{"thpsplit_trace":1,"params":[1]}\n', "params", "expected an object"),
    ],
)
def test_a_bad_header_is_named(header: str, field: str | None, words: str) -> None:
    with pytest.raises(TraceError) as info:
        loads_trace(header)
    assert info.value.line == 1 and info.value.field == field
    assert words in str(info.value)


def test_an_empty_file_and_bad_utf8_are_refused() -> None:
    with pytest.raises(TraceError, match="empty file"):
        read_trace(io.BytesIO(b""))
    with pytest.raises(TraceError, match=r":2: not UTF-8"):
        read_trace(io.BytesIO(HEADER.encode() + b'{"t_ms":0,"op":"mark","label":"\xff"}\n'))


def test_line_and_event_limits_hold_while_reading() -> None:
    long_label = "x" * MAX_LINE_BYTES
    err = bad(['{"t_ms":0,"op":"spawn","pid":1}', json.dumps({"t_ms": 0, "op": "mark", "label": long_label})])
    assert err.line == 3 and f"longer than {MAX_LINE_BYTES} bytes" in str(err)
    text = HEADER + '{"t_ms":0,"op":"spawn","pid":1}\n' * 4
    with pytest.raises(TraceError, match=r":5: more than 3 events"):
        loads_trace(text, max_events=3)
    assert len(loads_trace(text, max_events=4)) == 4
    with pytest.raises(TraceError, match="longer than 100 bytes"):
        loads_trace(HEADER + json.dumps({"t_ms": 0, "op": "mark", "label": "y" * 100}) + "\n", max_line=100)


class CountingStream(io.RawIOBase):
    """An endless trace that counts how much of it has been read."""

    def __init__(self) -> None:
        self.lines = 0
        self._pending = b'{"thpsplit_trace":1}\n'

    def readable(self) -> bool:
        return True

    def readline(self, size: int = -1) -> bytes:
        out = self._pending or b'{"t_ms":0,"op":"spawn","pid":1}\n'
        self._pending = b""
        self.lines += 1
        return out


def test_reading_is_incremental() -> None:
    stream = CountingStream()
    reader = TraceReader(stream, name="endless")
    assert reader.header == {"thpsplit_trace": 1} and stream.lines == 1
    it = iter(reader)
    for _ in range(5):
        next(it)
    assert stream.lines == 6  # one line read per event, nothing ahead
    with pytest.raises(TraceError, match="more than 10 events"):
        list(TraceReader(CountingStream(), max_events=10))


def test_write_trace_to_a_path_leaves_nothing_on_a_bad_event(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    with pytest.raises(TraceError):
        write_trace(path, [event("spawn", 0, pid=1), {"t_ms": 1, "op": "spawn", "pid": -1}])
    assert list(tmp_path.iterdir()) == []
    assert write_trace(path, [event("spawn", 0, pid=1)]) == 1
    assert read_trace(path).events == [event("spawn", 0, pid=1)]


# -- replay -----------------------------------------------------------------------------------


def checked(**knobs) -> CheckedWorld:
    return CheckedWorld(Knobs(**{**ONE_PAGE_AT_A_TIME, **knobs}))


def test_replay_reports_each_outcome() -> None:
    evs = [
        *setup_events(),
        event("fault", 1, pid=1, addr=FIXED),
        event("fault", 2, pid=1, addr=FIXED),
        event("fault", 3, pid=1, addr=FIXED, write=True),  # r-x: no write
        event("fault", 4, pid=1, addr=FIXED + 8 * MB),  # nothing mapped there
        event("touch", 5, pid=1, addr=FIXED + 4096, length=3 * 4096),
        event("mmap", 6, pid=1, addr=FIXED, length=4096, name="missing.so"),
        event("spawn", 7, pid=1),
    ]
    world = checked()
    res = replay(Trace(make_header(), evs), world)
    results = [o.get("result", o.get("error")) for o in res.outcomes]
    assert results[4:8] == ["major", "hit", "sigsegv", "sigsegv"]
    assert results[8] == {"minor": 3}  # VM_HUGEPAGE read-around cached them at the first fault
    assert results[9].startswith("ENOENT")
    assert results[10].startswith("EEXIST")
    assert res.counts["errors"] == {"EEXIST": 1, "ENOENT": 1}
    assert res.counts["faults"] == {"hit": 1, "major": 1, "minor": 3, "sigsegv": 2}
    assert res.counts["events"] == len(evs) and res.counts["ops"]["fault"] == 4
    with pytest.raises(tr.ReplayError, match="event 9 .mmap at 6 ms.: ENOENT"):
        replay(evs, checked(), on_error="raise")


@pytest.mark.parametrize(("timing", "expect"), [("original", [0, 10, 250]), (2.0, [0, 20, 500]), (0.5, [0, 5, 125]), ("fast", [0, 0, 0])])
def test_replay_timing(timing, expect) -> None:
    evs = [event("spawn", 0, pid=1), event("spawn", 10, pid=2), event("mark", 250, label="end")]
    world = checked()
    world.advance(1000)  # replay starts wherever the world's clock is
    res = replay(evs, world, timing)
    assert [o["at_ms"] - 1000 for o in res.outcomes] == expect
    assert (res.start_ms, res.end_ms) == (1000, 1000 + expect[-1])
    with pytest.raises(ValueError, match="timing"):
        replay(evs, checked(), "slow")
    with pytest.raises(ValueError, match="timing"):
        replay(evs, checked(), -1.0)


def test_replay_applies_the_header_knobs_and_khugepaged_runs_on_the_clock() -> None:
    header = make_header("t", sysfs={"khugepaged/scan_sleep_millisecs": 100, "thpsplit/retry_policy": "lockless"})
    evs = [*setup_events(), event("touch", 1, pid=1, addr=FIXED, length=4 * MB), event("mark", 1000, label="end")]
    world = checked()
    res = replay(Trace(header, evs), world)
    assert world.remapper.knobs.retry_policy == "lockless"
    assert sum(e["FilePmdMapped"] for e in world.smaps(1)) == 4096
    assert res.end_ms == 1000
    # Without the knobs, khugepaged still sleeps its default 10 s: nothing collapsed yet.
    world = checked()
    replay(Trace(header, evs), world, apply_sysfs=False)
    assert sum(e["FilePmdMapped"] for e in world.smaps(1)) == 0


def test_operations_wait_for_an_application_thread_holding_mmap_lock() -> None:
    evs = [
        *setup_events(),
        event("lock", 10, pid=1, hold_ms=50, write=True),
        event("fault", 11, pid=1, addr=FIXED),  # needs the lock for read: waits until 60
        event("lock", 70, pid=1, hold_ms=100),  # read hold: faults go on, mmap waits
        event("fault", 71, pid=1, addr=FIXED + 4096),
        event("munmap", 72, pid=1, addr=FIXED, length=4096),
        event("lock", 300, pid=1, hold_ms=10, write=True),
        event("lock", 301, pid=1, hold_ms=10, write=True),  # queues behind the first
        event("fault", 302, pid=1, addr=FIXED + 8192),
    ]
    res = replay(evs, checked())
    at = {o["i"]: (o["at_ms"], o.get("result")) for o in res.outcomes}
    assert at[5] == (11, "major") or at[5][0] == 60
    assert at[5][0] == 60
    assert at[7][0] == 71 and at[8][0] == 170
    assert at[9] == (300, "held") and at[10] == (301, "waiting")
    assert at[11][0] == 320  # both write holds, one after the other
    assert res.counts["waited"] == 3 and res.counts["max_wait_ms"] == 98
    assert res.counts["errors"] == {} and res.counts["pending"] == 0


def test_replay_streams_from_a_file(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    evs = [*setup_events(), *(event("fault", i, pid=1, addr=FIXED + 4096 * i) for i in range(1, 100))]
    write_trace(path, evs, make_header("t"))
    # (An unchecked World: this is about reading, and 99 faults x the checker would be slow.)
    res = replay(path, World(Knobs(**ONE_PAGE_AT_A_TIME)), "fast", keep_outcomes=False)
    assert res.outcomes is None
    assert res.counts["faults"] == {"major": 1, "minor": 98}
    assert res.header == make_header("t")
    # A bad line late in the file stops the replay there, with its line number.
    with open(path, "a") as f:
        f.write('{"t_ms":200,"op":"fault","pid":1}\n')
    with pytest.raises(TraceError, match=r"t.jsonl:105: field 'addr'"):
        replay(path, World(), "fast")


def test_the_cli_validates_and_replays(tmp_path, capsys) -> None:
    path = tmp_path / "t.jsonl"
    write_trace(path, [*setup_events(), event("touch", 1, pid=1, addr=FIXED, length=MB)])
    assert tr.main(["validate", str(path)]) == 0
    assert "valid, 5 events over 1 ms" in capsys.readouterr().out
    assert tr.main(["replay", str(path), "--timing", "fast", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["counts"]["events"] == 5
    path.write_text(HEADER + '{"t_ms":0,"op":"spawn"}\n')
    assert tr.main(["validate", str(path)]) == 2
    assert "t.jsonl:2: field 'pid': missing field" in capsys.readouterr().err
