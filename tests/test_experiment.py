"""thpctl experiment and the engine under it (issue 11): determinism across seeds and processes,
Kirill's objection, the measurements themselves (time to PMD, eligible ranges), the files it
writes (JSON against its schema, CSV, a PNG of the expected shape), sweeps, the Dask engine, and
the README's table."""

from __future__ import annotations

import csv
import io
import json
import re
import struct
from pathlib import Path

import pytest

from shared.knobs import Knobs
from shared.sim import experiment as ex
from shared.sim.trace import write_trace
from shared.thpctl.cli import amain
from tests.conftest import CheckedWorld

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20
H = 2 * MB
BASE = 0x40000000

# A small text workload: 2 MiB ranges x 3 processes that come and go, lock holders, 3 s.
SMALL_TEXT = ["-p", "scale=1/32", "-p", "procs=3", "-p", "duration_ms=3000", "-p", "scan_sleep_ms=100",
              "-p", "lock_fraction=0.3", "-p", "lock_hold_ms=150", "-p", "lifetime_ms=1500",
              "-p", "access_interval_ms=10", "-p", "startup_bytes=1M"]
# Kirill's case: two processes map an 8 MiB text; one holds its mmap lock while it is collapsed.
KIRILL = ["busy-lock", "-p", "procs=2", "-p", "size=8M", "-p", "busy=1"]


async def thpctl(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = await amain(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


async def ok(*argv: str) -> str:
    status, out, err = await thpctl(*argv)
    assert status == 0, (argv, out, err)
    return out


# -- determinism ------------------------------------------------------------------------------


async def test_same_seeds_give_byte_identical_results_whatever_the_jobs(tmp_path: Path) -> None:
    common = ["experiment", "text", *SMALL_TEXT, "--policies", "per-pmd,per-mapping,none", "--seeds", "2", "--samples", "20"]
    await ok(*common, "--out", str(tmp_path / "a"), "--jobs", "1", "--no-plot")
    await ok(*common, "--out", str(tmp_path / "b"), "--jobs", "2", "--no-plot")
    await ok(*common, "--out", str(tmp_path / "c"), "--jobs", "1", "--no-plot")
    for name in ("results.json", "runs.csv", "summary.csv"):
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name
    runs = json.loads((tmp_path / "a" / "results.json").read_text())["runs"]
    assert [(r["policy"], r["seed"]) for r in runs] == [(p, s) for p in ("per-pmd", "per-mapping", "none") for s in (0, 1)]
    # The seed is the workload's: another seed, another stream (and so other figures).
    assert runs[0]["events"] != runs[1]["events"] or runs[0]["coverage"] != runs[1]["coverage"]
    # Every policy saw the identical stream.
    assert len({r["events"] for r in runs if r["seed"] == 0}) == 1


# -- Kirill's objection -----------------------------------------------------------------------


async def test_per_mapping_recovers_fewer_pmd_ranges_than_per_pmd(tmp_path: Path) -> None:
    doc = json.loads(await ok("--json", "experiment", *KIRILL, "--policies", "per-pmd,per-mapping,none"))
    runs = {r["policy"]: r for r in doc["runs"]}
    pmd, per_mapping, none = runs["per-pmd"], runs["per-mapping"], runs["none"]
    assert pmd["eligible"] == per_mapping["eligible"] == none["eligible"] == 8  # 4 ranges x 2 processes
    # The busy process's 4 ranges come back pte-mapped under every policy ...
    assert pmd["retract_deferred"] == 4 and none["pte_mapped_thp"] == 4
    # ... per-pmd's marks recover them all; per-mapping's one bit recovers one range per setting.
    assert pmd["pmd_mapped"] == 8 and pmd["pte_mapped_thp"] == 0 and pmd["retry_detail"]["remap_pass"] > 0
    assert per_mapping["pmd_mapped"] < pmd["pmd_mapped"]
    assert per_mapping["pte_mapped_thp"] > 0 and per_mapping["retry_detail"]["per_mapping_retract"] > 0
    assert none["pmd_mapped"] == 4 and none["retries"] == 0
    assert [row["pmd_mapped"] for row in doc["runs"]] == [8, per_mapping["pmd_mapped"], 4]


async def test_the_default_is_the_readme_table() -> None:
    out = await ok("experiment")
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"\n( +policy +PMD-mapped +deferred.*?)\n\n", readme, re.DOTALL)
    assert block is not None
    expected = "\n".join(line[4:] for line in block.group(1).splitlines())
    assert out == expected + "\n"


# -- what is measured -------------------------------------------------------------------------


def _hand_trace(path: Path) -> None:
    """pid 1 faults a 2 MiB text in at 0 ms; khugepaged (every 100 ms) collapses it at 100 ms
    and retract maps it with a PMD; pid 2 maps it at 500 ms and gets the PMD at its first fault."""
    events = [{"t_ms": 0.0, "op": "file_create", "name": "lib", "size": H}]
    for t, pid in ((0.0, 1), (500.0, 2)):
        events += [
            {"t_ms": t, "op": "spawn", "pid": pid},
            {"t_ms": t, "op": "mmap", "pid": pid, "addr": BASE, "length": H, "name": "lib", "prot": "rx", "shared": False},
            {"t_ms": t, "op": "madvise", "pid": pid, "addr": BASE, "length": H, "advice": "hugepage"},
            {"t_ms": t, "op": "touch", "pid": pid, "addr": BASE, "length": H},
        ]
    events.append({"t_ms": 1000.0, "op": "mark", "label": "end"})
    header = {"thpsplit_trace": 1, "sysfs": {"khugepaged/scan_sleep_millisecs": 100,
                                             "thpsplit/remap_sleep_millisecs": 100}}
    write_trace(path, events, header)


def test_time_to_pmd_and_coverage_on_a_hand_made_trace(tmp_path: Path) -> None:
    trace = tmp_path / "hand.jsonl"
    _hand_trace(trace)
    plan = ex.make_plan([str(trace)], policies=["per-pmd"], duration_ms=1000, samples=10)
    (run,) = ex.execute(plan.runs)
    assert run["kind"] == "trace" and run["virtual_ms"] == 1000
    assert (run["eligible"], run["pmd_mapped"], run["pmd_mapped_pct"]) == (2, 2, 100.0)
    assert run["time_to_pmd_n"] == 2 and run["time_to_pmd_untimed"] == 0
    assert (run["time_to_pmd_p50_ms"], run["time_to_pmd_p99_ms"]) == (0.0, 100.0)
    assert run["thp_collapse_alloc"] == 1 and run["retract_attempts"] == 1 and run["wasted_scans"] > 0
    cov = {t: (pmd, eligible) for t, pmd, eligible in run["coverage"]}
    assert cov[0.0] == (0, 1) and cov[100.0] == (1, 1) and cov[400.0] == (1, 1) and cov[500.0] == (2, 2)
    assert len(run["coverage"]) == 11


def test_census_counts_as_smaps_judges_eligibility() -> None:
    """Eligible ranges: THPeligible VMAs (as smaps says), aligned, below EOF, in live processes."""
    w = CheckedWorld(Knobs(read_ahead_kb=0, fault_around_bytes=4096))
    w.file_create("text", 5 * MB)  # 2 whole ranges below EOF, the third is cut by it
    w.file_create("data", 4 * MB)
    w.spawn(1)
    w.mmap(1, BASE, 6 * MB, "text", prot="rx", shared=False)
    w.madvise(1, BASE, 6 * MB, "hugepage")
    w.mmap(1, BASE + 64 * MB, 4 * MB, "data", prot="rw", shared=True)  # open for write: not eligible
    w.madvise(1, BASE + 64 * MB, 4 * MB, "hugepage")
    w.touch(1, BASE, H)
    w.touch(1, BASE + 64 * MB, 4 * MB)
    c = ex.census(w, detail=True)
    smaps = {e["start"]: e for e in w.smaps(1)}
    assert smaps[BASE]["THPeligible"] == 1 and smaps[BASE + 64 * MB]["THPeligible"] == 0
    assert (c["eligible_all"], c["eligible"], c["pmd_mapped"], c["pte_mapped_thp"]) == (2, 1, 0, 0)
    assert w.madvise(1, BASE, H, "collapse") == 0
    c = ex.census(w, detail=True)
    assert (c["eligible"], c["pmd_mapped"]) == (1, 1)
    w.exit(1)
    assert ex.census(w)["eligible_all"] == 0


# -- the files --------------------------------------------------------------------------------


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_out_dir_json_csv_and_png(tmp_path: Path) -> None:
    import jsonschema

    out = tmp_path / "out"
    policies = ("per-pmd", "mm-slot", "per-mapping", "lockless", "none")
    text = await ok("experiment", *KIRILL, "--seeds", "2", "--out", str(out), "--samples", "30")
    assert "busy-lock: 2 seeds (0..1), mean ±stdev" in text and "wrote " in text
    assert sorted(p.name for p in out.iterdir()) == ["cost.json", "experiment.png", "results.json", "runs.csv",
                                                     "summary.csv"]
    doc = json.loads((out / "results.json").read_text())
    schema = json.loads((ROOT / "docs" / "experiment-results.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(doc, schema)
    assert len(doc["runs"]) == 10 and len(doc["summary"]) == 5
    assert all(len(r["coverage"]) == 31 for r in doc["runs"])
    assert "cost" not in json.dumps(doc["runs"])  # wall time lives apart: the results stay reproducible
    cost = json.loads((out / "cost.json").read_text())
    assert len(cost["runs"]) == 10 and all(r["wall_s"] > 0 for r in cost["runs"])

    rows = list(csv.DictReader(io.StringIO((out / "runs.csv").read_text())))
    assert list(rows[0]) == list(ex.RUN_COLUMNS) and len(rows) == 10
    assert [(r["policy"], int(r["seed"])) for r in rows] == [(p, s) for p in policies for s in (0, 1)]
    assert {r["policy"]: int(r["pmd_mapped"]) for r in rows}["per-pmd"] == 8
    summary = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert [r["policy"] for r in summary] == list(policies)
    assert float(summary[0]["pmd_mapped_pct_mean"]) == 100.0 and summary[0]["pmd_mapped_pct_sd"] == "0.0"

    data = (out / "experiment.png").read_bytes()
    width, height = _png_size(data)
    assert 800 <= width <= 2000 and 200 <= height <= 1000 and 10_000 < len(data) < 500_000

    from matplotlib.image import imread

    from shared.sim.plot import POLICY_COLOURS, plot_experiment

    fig = plot_experiment(doc["summary"])
    coverage, final, work = fig.axes[:3]
    lines = coverage.get_lines()
    assert [ln.get_label() for ln in lines] == list(policies)
    assert [ln.get_color() for ln in lines] == [POLICY_COLOURS[p] for p in policies]
    assert len(final.patches) == 5 and len(work.patches) == 5 * 5
    # Each policy's colour is drawn in the PNG itself.
    pixels = (imread(str(out / "experiment.png"))[:, :, :3] * 255).round().astype(int).reshape(-1, 3)
    drawn = {tuple(p) for p in pixels.tolist()}
    for p in policies:
        rgb = tuple(int(POLICY_COLOURS[p][i:i + 2], 16) for i in (1, 3, 5))
        assert rgb in drawn, p


# -- sweeps and engines -----------------------------------------------------------------------


async def test_a_sweep_over_a_knob_and_a_parameter_runs_every_combination_in_order(tmp_path: Path) -> None:
    doc = json.loads(await ok("--json", "experiment", "busy-lock", "-p", "size=8M", "-p", "busy=1", "--policies", "per-pmd,none",
                              "--sweep", "khugepaged/pages_to_scan=512,4096", "--sweep", "procs=2,3",
                              "--jobs", "2", "--samples", "5"))
    runs = doc["runs"]
    assert [(r["variant"], r["policy"]) for r in runs] == [
        (f"khugepaged/pages_to_scan={k},procs={n}", p) for k in (512, 4096) for n in (2, 3) for p in ("per-pmd", "none")
    ]
    assert all(r["knobs"]["khugepaged/pages_to_scan"] == int(r["variant"].split("=")[1].split(",")[0]) for r in runs)
    assert [r["eligible"] for r in runs[:4]] == [8, 8, 12, 12]
    # One huge page per pass at 512 pages a pass: the last range is collapsed later.
    slow, fast = runs[0], runs[4]
    assert slow["time_to_pmd_p99_ms"] > fast["time_to_pmd_p99_ms"]
    assert len(doc["summary"]) == 8 and doc["config"]["sweep"] == {"khugepaged/pages_to_scan": ["512", "4096"],
                                                                   "procs": ["2", "3"]}


async def test_the_dask_engine_gives_the_local_results(tmp_path: Path) -> None:
    pytest.importorskip("dask.distributed")
    common = ["experiment", *KIRILL, "--policies", "per-pmd,per-mapping", "--seeds", "2", "--samples", "5", "--no-plot"]
    await ok(*common, "--out", str(tmp_path / "local"))
    await ok(*common, "--out", str(tmp_path / "dask"), "--engine", "dask", "--jobs", "2")
    assert (tmp_path / "local" / "results.json").read_bytes() == (tmp_path / "dask" / "results.json").read_bytes()
    cost = json.loads((tmp_path / "dask" / "cost.json").read_text())
    assert (cost["engine"], cost["jobs"], cost["n_runs"], len(cost["runs"])) == ("dask", 2, 4, 4)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["experiment", "nope"], "nope: no such workload or trace file"),
        (["experiment", "text", "-p", "colour=red"], "unknown parameter 'colour'"),
        (["experiment", "text", "-p", "khugepaged/max_ptes_none=600"], "khugepaged/max_ptes_none"),
        (["experiment", "text", "-p", "thpsplit/retry_policy=none"], "use --policies"),
        (["experiment", "text", "--policies", "per-pmd,bogus"], "--policies"),
        (["experiment", "text", "--procs", "3"], "busy-lock's options"),
        (["experiment", "text", "--duration", "-1s"], "--duration"),
        (["experiment", "text", "--sweep", "procs"], "--sweep"),
        (["experiment", "text", "--engine", "ray"], "--engine"),
        (["experiment", "--busy", "3", "--procs", "2"], "--busy"),
    ],
)
async def test_bad_experiments_are_usage_errors(argv: list[str], words: str) -> None:
    status, out, err = await thpctl(*argv)
    assert status == 2 and out == "" and err.count("\n") == 1 and words in err, err


async def test_a_bad_trace_names_its_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"thpsplit_trace":1}\n{"t_ms":0,"op":"spawn","pid":1}\n{"t_ms":1,"op":"spawn","pid":"2"}\n')
    status, _, err = await thpctl("experiment", str(bad))
    assert status == 2 and f"{bad}:3: field 'pid': expected an integer, got a string" in err
    status, _, err = await thpctl("experiment", str(bad), "-p", "procs=2")
    assert status == 2
