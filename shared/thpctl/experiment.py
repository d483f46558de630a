"""thpctl experiment: retry policies compared on one event stream, in-process (no daemons).

    thpctl experiment WORKLOAD|TRACE ... [--policies P,P] [--seeds N] [--duration D]
                      [-p K=V] [--sweep K=V,V,...] [--out DIR] [--jobs N] [--engine local|dask]

Each policy replays the identical event stream — a named workload (busy-lock, text,
shmem, uprobe, churn) or a trace file (recorded, imported or generated) — on the
model's virtual clock (shared/sim/experiment.py), so a sweep takes seconds to minutes whatever
model time it covers, and every run is deterministic. The table shows, per policy: eligible
2 MiB ranges, PMD-mapped at the end, time to PMD (p50/p99), pte-mapped THPs left, retract
attempts, trylock failures, retries, wasted scans, huge page allocations and the model's cost;
--out DIR writes results.json, runs.csv, summary.csv, cost.json and experiment.png.

Without a workload and without any of the options above, it prints the README's policy table
for the busy-lock scenario, shaped by --procs --size --busy --busy-ms --run-ms --install-pmd
(which are busy-lock's parameters in either form).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, TextIO

from shared.knobs import RETRY_POLICIES
from shared.sim import experiment as ex
from shared.thpctl.cli import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    Outcome,
    RawHelpFormatter,
    emit,
    isatty,
    milliseconds,
    ok,
    progress_bar,
    size,
)
from shared.thpctl.client import Session


def policies(text: str) -> tuple[str, ...]:
    names = tuple(p for p in text.split(",") if p)
    bad = [p for p in names if p not in RETRY_POLICIES]
    if bad or not names:
        raise ValueError(text)
    return names


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"


def duration(text: str) -> float:
    return ex.parse_duration(text)


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise ValueError(text)
    return key, value


key_value.__name__ = "KEY=VALUE"


def sweep_spec(text: str) -> tuple[str, tuple[str, ...]]:
    key, value = key_value(text)
    values = tuple(v for v in value.split(",") if v)
    if not values:
        raise ValueError(text)
    return key, values


sweep_spec.__name__ = "KEY=V1,V2,..."

# The busy-lock parameters the first form of the command took as options.
LEGACY = ("procs", "size", "busy", "busy_ms", "run_ms", "install_pmd")
NEW_STYLE = ("seeds", "duration", "param", "sweep", "out", "jobs", "engine", "scheduler", "samples", "no_plot", "check")


def _legacy_table(args: argparse.Namespace) -> Outcome:
    w = ex.Workload()
    work = ex.Workload(
        procs=args.procs if args.procs is not None else w.procs,
        size=args.size if args.size is not None else w.size,
        busy=args.busy if args.busy is not None else w.busy,
        busy_ms=args.busy_ms if args.busy_ms is not None else w.busy_ms,
        run_ms=args.run_ms if args.run_ms is not None else w.run_ms,
    )
    if not 0 <= work.busy <= work.procs or work.procs < 1:
        return Outcome(error="EINVAL: need 1 <= --procs and 0 <= --busy <= --procs", status=EXIT_USAGE)
    rows = ex.compare(work, args.policies, install_pmd=args.install_pmd if args.install_pmd is not None else 1)
    return ok(rows, ex.render(rows) + "\n")


def _legacy_params(args: argparse.Namespace) -> dict[str, str]:
    """The busy-lock options as -p parameters (and the install_pmd knob)."""
    out: dict[str, str] = {}
    for key in ("procs", "size", "busy", "busy_ms"):
        if getattr(args, key) is not None:
            out[key] = str(getattr(args, key))
    if args.run_ms is not None:
        busy_ms = args.busy_ms if args.busy_ms is not None else ex.BusyLockParams.busy_ms
        out["duration_ms"] = str(busy_ms + args.run_ms)
    if args.install_pmd is not None:
        out["thpsplit/install_pmd"] = str(args.install_pmd)
    return out


def _progress(total: int, stdout: TextIO, stderr: TextIO) -> Any:
    """A progress bar on stderr, only when both stdout and stderr are terminals."""
    if total < 2 or not (isatty(stdout) and isatty(stderr)):
        return None
    bar = progress_bar("experiment", stderr)
    bar.start()
    bar.add_task("", total=total)
    return bar


def run_experiment(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> Outcome:
    legacy_given = [k for k in LEGACY if getattr(args, k) is not None]
    params = dict(args.param)
    sources = list(args.sources) or ["busy-lock"]
    if legacy_given:
        if any(s != "busy-lock" for s in sources):
            flags = ", ".join("--" + k.replace("_", "-") for k in legacy_given)
            return Outcome(error=f"{flags}: busy-lock's options; for another workload use -p KEY=VALUE",
                           status=EXIT_USAGE)
        params = {**_legacy_params(args), **params}
    try:
        plan = ex.make_plan(
            sources,
            policies=args.policies,
            seeds=args.seeds or 1,
            duration_ms=args.duration,
            params=params,
            sweep=dict(args.sweep),
            samples=args.samples or ex.DEFAULT_SAMPLES,
            check=args.check,
        )
    except ex.ExperimentError as err:
        return Outcome(error=str(err), status=EXIT_USAGE)
    jobs = args.jobs or 1
    bar = _progress(len(plan.runs), stdout, stderr)

    def done(i: int, result: dict[str, Any]) -> None:
        if bar is not None:
            bar.update(bar.task_ids[0], advance=1,
                       description=f"{result['source']} {result['policy']} seed {result['seed']}")

    t0 = time.perf_counter()
    try:
        results = ex.execute(plan.runs, jobs=jobs, engine=args.engine or "local", scheduler=args.scheduler,
                             on_done=done)
    except ex.ExperimentError as err:
        return Outcome(error=str(err), status=EXIT_USAGE)
    finally:
        if bar is not None:
            bar.stop()
    wall = time.perf_counter() - t0
    info = {"jobs": jobs, "engine": args.engine or "local", "n_runs": len(results), "total_wall_s": round(wall, 3)}
    doc = ex.results_document(plan, results)
    cost = ex.cost_summary(results)
    text = ex.render_table(doc["summary"], cost)
    events = sum(r["events"] for r in results)
    text += (f"{len(results)} runs, {events} events in {wall:.1f} s wall "
             f"({info['engine']}, {jobs} job{'s' if jobs > 1 else ''})\n")
    outcome = ok({**doc, "cost": {"summary": cost, **info}}, text)
    if args.out:
        try:
            paths = ex.write_outputs(args.out, plan, results, info, plot=not args.no_plot)
        except OSError as err:
            outcome.error, outcome.status = f"--out {args.out}: {err.strerror or err}", EXIT_FAIL
            return outcome
        outcome.text += "wrote " + ", ".join(str(p) for p in paths.values()) + "\n"
        if not args.no_plot and "png" not in paths:
            outcome.error = "no experiment.png: matplotlib is not installed (pip install 'thpsplit[plot]')"
    return outcome


async def _runner(session: Session, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    new_style = any(getattr(args, k) not in (None, False, []) for k in NEW_STYLE)
    if not args.sources and not new_style:
        outcome = _legacy_table(args)
    else:
        outcome = run_experiment(args, stdout, stderr)
    emit(outcome, args.json, stdout, stderr, args.name)
    return outcome.status if outcome.status else EXIT_OK


EPILOG = """\
examples:
  thpctl experiment                                   the busy-lock table of the README
  thpctl experiment text --seeds 3 --out results/     the text workload, 3 seeds, files in results/
  thpctl experiment text -p scale=1/8 -p procs=4 --duration 20s --policies per-pmd,per-mapping
  thpctl experiment text --sweep khugepaged/max_ptes_none=0,255,511 --jobs 4
  thpctl experiment trace.jsonl --duration 2m         a recorded/imported/generated trace
  thpctl experiment text --engine dask --jobs 8       on a Dask LocalCluster (pip install 'thpsplit[dask]')

-p and --sweep take a workload parameter (thpctl workload --list) or a sysfs knob
(khugepaged/max_ptes_none, thpsplit/install_pmd, ...); --sweep multiplies: policies x workloads x
seeds x every combination of swept values. Seeds are 0..N-1 (a trace's events do not depend on
the seed). --duration takes 90s, 2m, 500ms or seconds; a trace runs to its last event (at least
60 s) unless told.
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "experiment",
        help="compare retry policies in-process on a workload or trace: table, JSON, CSV, plot",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=RawHelpFormatter,
    )
    p.add_argument("sources", nargs="*", metavar="WORKLOAD|TRACE",
                   help=f"a workload ({', '.join(ex.workload_names())}) or a trace file")
    p.add_argument("--policies", type=policies, default=RETRY_POLICIES, metavar="P,P",
                   help=f"comma-separated, from {','.join(RETRY_POLICIES)} (default: all)")
    p.add_argument("--seeds", type=positive_int, metavar="N", help="run seeds 0..N-1 (default 1)")
    p.add_argument("--duration", type=duration, metavar="D", help="virtual run time: 60s, 2m, 500ms")
    p.add_argument("-p", "--param", type=key_value, action="append", default=[], metavar="K=V",
                   help="a workload parameter or a sysfs knob (repeatable)")
    p.add_argument("--sweep", type=sweep_spec, action="append", default=[], metavar="K=V,V",
                   help="run every value of a parameter or knob (repeatable: the product)")
    p.add_argument("--out", metavar="DIR", help="write results.json, runs.csv, summary.csv, cost.json, experiment.png")
    p.add_argument("--jobs", type=positive_int, metavar="N", help="parallel runs (local processes or Dask workers)")
    p.add_argument("--engine", choices=ex.ENGINES, help="local (default: concurrent.futures) or dask")
    p.add_argument("--scheduler", metavar="ADDR", help="a Dask scheduler's address (default: a LocalCluster)")
    p.add_argument("--samples", type=positive_int, metavar="N", help="coverage samples per run (default 100)")
    p.add_argument("--no-plot", action="store_true", help="with --out: no experiment.png")
    p.add_argument("--check", action="store_true", help="run the model's invariant checker at the end of each run")
    legacy = p.add_argument_group("busy-lock's parameters (the table of the README without a workload)")
    legacy.add_argument("--procs", type=int, metavar="N", help="processes mapping the file")
    legacy.add_argument("--size", type=size, metavar="SIZE", help="the text file's size")
    legacy.add_argument("--busy", type=int, metavar="N", help="processes holding their mmap lock")
    legacy.add_argument("--busy-ms", type=milliseconds, metavar="MS", help="how long each busy one holds it")
    legacy.add_argument("--run-ms", type=milliseconds, metavar="MS", help="model time to run")
    legacy.add_argument("--install-pmd", type=int, choices=(0, 1), help="thpsplit/install_pmd")
    p.set_defaults(runner=_runner, name="thpctl experiment")

