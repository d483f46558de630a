"""thpctl replay / import procfs / record / workload: traces in and out (docs/TRACES.md).

* ``replay FILE [--timing original|fast|SCALE] [--in-process]``: play a trace into the running
  daemons through the client (each event's request, pipelined per daemon as ``run`` does; with
  ``original`` or a SCALE the events go out at their time, scaled; ``fast`` as fast as the
  daemons answer), or with ``--in-process`` into a fresh in-process World on the virtual clock.
  The whole file is validated before anything is sent. Prints what happened and the PMD
  mappings at the end.
* ``import procfs PID|DIR [-o FILE]``: a process's file and shmem mappings and residency as a
  trace (shared/sim/procfs_import.py).
* ``record [-o FILE] -- CMD ...``: a real command's page faults and mappings (root, tracefs;
  shared/sim/record.py).
* ``workload NAME [--seed N] [-p K=V] [-o FILE]``: a generated workload's trace (``--list``: every
  workload and its parameters).

A bad trace is reported with its file, line and field (``t.jsonl:12: field 'pid': expected an
integer, got a string``) and exit status 2, as a bad command line; an unreadable file is 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import trio

from shared.errors import UserError
from shared.protocol import messages as m
from shared.protocol.schema import Request
from shared.sim import experiment as ex
from shared.sim.procfs_import import RESIDENCY, ProcfsError, import_procfs
from shared.sim.trace import (
    TIMINGS,
    TraceError,
    TraceReader,
    replay,
    validate_file,
    write_trace,
)
from shared.thpctl.cli import (
    COLLAPSED,
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    REMAPD,
    emit,
    ok,
)
from shared.thpctl.client import ROUTES, Pending, Session
from shared.thpctl.recording import OP_OF
from shared.units import HPAGE_PMD_SIZE

REQUEST_OF: dict[str, type[Request[Any]]] = {op: cls for cls, op in OP_OF.items()}
# Before these, and after them, everything sent must have been answered.
BARRIERS = ("wait_scans",)
FINAL_VMSTAT = ("thp_collapse_alloc", "thp_file_alloc", "thp_file_mapped", "thp_split_pmd", "nr_file_hugepages",
                "nr_file_pmdmapped", "nr_shmem_pmdmapped")


def timing(text: str) -> str | float:
    if text in TIMINGS:
        return text
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


timing.__name__ = "timing (original, fast or a scale >= 0)"


def _scale(t: str | float) -> float | None:
    return None if t == "fast" else 1.0 if t == "original" else float(t)


class _Pids:
    """The processes a trace leaves alive (for the final smaps)."""

    def __init__(self) -> None:
        self.alive: dict[int, None] = {}

    def note(self, ev: dict[str, Any], ok: bool) -> None:
        if not ok:
            return
        if ev["op"] == "spawn":
            self.alive[ev["pid"]] = None
        elif ev["op"] == "fork":
            self.alive[ev["child"]] = None
        elif ev["op"] == "exit":
            self.alive.pop(ev["pid"], None)


def _final(smaps_by_pid: Mapping[int, Sequence[Mapping[str, Any]]], vmstat: Mapping[str, int]) -> dict[str, Any]:
    per_pid = {}
    for pid, entries in smaps_by_pid.items():
        kb = sum(e["FilePmdMapped"] + e.get("ShmemPmdMapped", 0) for e in entries)
        per_pid[str(pid)] = {"pmd_mapped_kb": kb, "pmd_ranges": kb * 1024 // HPAGE_PMD_SIZE,
                             "rss_kb": sum(e["Rss"] for e in entries)}
    return {
        "pmd_mapped_ranges": sum(p["pmd_ranges"] for p in per_pid.values()),
        "pmd_mapped_kb": sum(p["pmd_mapped_kb"] for p in per_pid.values()),
        "processes": per_pid,
        "vmstat": {k: vmstat[k] for k in FINAL_VMSTAT if k in vmstat},
    }


def replay_in_process(path: str, how: str | float) -> dict[str, Any]:
    """Replay ``path`` into a fresh World (no codec round trip, as the experiments)."""
    from shared.sim.world import World

    world = World(codec=False)
    pids = _Pids()
    events: list[dict[str, Any]] = []
    reader = TraceReader(path)

    def stream() -> Any:
        for ev in reader:
            events.append(ev)
            yield ev

    def progress(i: int, out: dict[str, Any]) -> None:
        pids.note(events[-1], "error" not in out)

    t0 = time.perf_counter()
    try:
        # The header's knobs first (as replay() does with a path), then the events as they stream.
        for name, value in (reader.header.get("sysfs") or {}).items():
            world.sysfs_set(name, value)
        res = replay(stream(), world, how, apply_sysfs=False, keep_outcomes=False, progress=progress)
    finally:
        reader.close()
    wall = time.perf_counter() - t0
    smaps = {pid: world.smaps(pid) for pid in pids.alive if pid in world.remapper.mms}
    c = res.counts
    return {
        "file": path, "mode": "in-process", "timing": how, "events": c["events"], "ops": c["ops"],
        "errors": c["errors"], "faults": c["faults"], "waited": c["waited"], "pending": c["pending"],
        "model_ms": [res.start_ms, res.end_ms], "wall_s": round(wall, 3),
        "final": _final(smaps, world.vmstat()),
    }


async def replay_live(session: Session, path: str, how: str | float) -> dict[str, Any]:
    """Send ``path``'s events to the daemons (see the module docstring)."""
    scale = _scale(how)
    reader = TraceReader(path)
    ops: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    pids = _Pids()
    inflight: list[tuple[dict[str, Any], Pending]] = []
    lag = 0.0

    async def collect() -> None:
        for ev, pending in inflight:
            try:
                value = await pending.result()
            except UserError as err:
                errors[err.errno_name] += 1
                pids.note(ev, False)
                continue
            pids.note(ev, True)
            if ev["op"] == "fault" and isinstance(value, dict):
                faults[value["result"]] += 1
            elif ev["op"] == "touch" and isinstance(value, dict):
                faults.update(value)
        inflight.clear()

    t_wall = time.perf_counter()
    try:
        for name, value in (reader.header.get("sysfs") or {}).items():
            await session.call(m.SysfsSet, name=name, value=str(value))
        t0 = trio.current_time()
        for ev in reader:
            op = ev["op"]
            ops[op] += 1
            if op == "mark":
                continue
            if scale is not None:
                due = t0 + ev["t_ms"] * scale / 1000
                if due > trio.current_time():
                    await collect()
                    await trio.sleep_until(due)
                lag = max(lag, (trio.current_time() - due) * 1000)
            cls = REQUEST_OF[op]
            fields = {k: v for k, v in ev.items() if k not in ("t_ms", "op")}
            if op == "sysfs_set":
                fields["value"] = str(fields["value"])
            daemon = ROUTES.get(cls, COLLAPSED if cls is m.WaitScans else REMAPD)
            if inflight and (op in BARRIERS or any(ROUTES.get(type(p.msg)) != daemon for _, p in inflight)):
                await collect()
            try:
                pending = await session.start(cls, daemon, **fields)
            except UserError as err:  # refused before it was sent (a value the protocol refuses)
                if err.errno_name in ("ECONNREFUSED", "ECONNRESET"):
                    raise
                errors[err.errno_name] += 1
                continue
            inflight.append((ev, pending))
            if op in BARRIERS:
                await collect()
        await collect()
    finally:
        reader.close()
    wall = time.perf_counter() - t_wall
    smaps = {}
    for pid in pids.alive:
        try:
            smaps[pid] = await session.call(m.Smaps, pid=pid)
        except UserError:
            continue
    vmstat = await session.vmstat()
    return {
        "file": path, "mode": "daemons", "timing": how, "events": sum(ops.values()), "ops": dict(sorted(ops.items())),
        "errors": dict(sorted(errors.items())), "faults": dict(sorted(faults.items())),
        "max_lag_ms": round(lag, 3) if scale is not None else None, "wall_s": round(wall, 3),
        "final": _final(smaps, vmstat),
    }


def _render_replay(doc: dict[str, Any]) -> str:
    errors = sum(doc["errors"].values())
    lines = [f"replayed {doc['events']} events from {doc['file']} ({doc['mode']}, timing {doc['timing']}): "
             f"{errors} refused" + (f" ({', '.join(f'{k} {v}' for k, v in doc['errors'].items())})" if errors else "")]
    lines.append("ops: " + ", ".join(f"{k} {v}" for k, v in doc["ops"].items()))
    if doc["faults"]:
        lines.append("faults: " + ", ".join(f"{k} {v}" for k, v in doc["faults"].items()))
    if doc["mode"] == "in-process":
        lines.append(f"model time {doc['model_ms'][0]:g}..{doc['model_ms'][1]:g} ms; {doc['waited']} events waited "
                     f"for an mmap_lock; wall {doc['wall_s']:.2f} s")
    else:
        lag = f", at most {doc['max_lag_ms']:.1f} ms late" if doc["max_lag_ms"] is not None else ""
        lines.append(f"wall {doc['wall_s']:.2f} s{lag}")
    f = doc["final"]
    lines.append(f"PMD-mapped at the end: {f['pmd_mapped_ranges']} ranges ({f['pmd_mapped_kb']} kB) in "
                 f"{len(f['processes'])} processes; " + ", ".join(f"{k} {v}" for k, v in f["vmstat"].items()))
    return "".join(line + "\n" for line in lines)


async def _replay(session: Session, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    try:
        validate_file(args.file)  # everything checked before anything is sent
    except TraceError as err:
        stderr.write(f"thpctl replay: {err}\n")
        return EXIT_USAGE
    except OSError as err:
        stderr.write(f"thpctl replay: {args.file}: {err.strerror or err}\n")
        return EXIT_FAIL
    try:
        if args.in_process:
            doc = replay_in_process(args.file, args.timing)
        else:
            doc = await replay_live(session, args.file, args.timing)
    except UserError as err:
        stderr.write(f"thpctl replay: {err.errno_name}: {err.message}\n")
        return EXIT_FAIL
    emit(ok(doc, _render_replay(doc)), args.json, stdout, stderr, "thpctl replay")
    return EXIT_OK


# -- writing a trace --------------------------------------------------------------------------


def _write(trace_header: dict[str, Any], events: Any, out: str | None, stdout: TextIO) -> int:
    try:
        return write_trace(out if out else stdout, events, trace_header)
    except BrokenPipeError:
        raise
    except OSError as err:
        if out is None:
            raise
        raise _WriteError(f"{out}: {err.strerror or err}") from None


class _WriteError(Exception):
    """The output file could not be written (its name and the reason)."""


async def _import_procfs(session: Session, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    try:
        trace = import_procfs(args.target, pid=args.pid, residency=args.residency)
        n = _write(trace.header, trace.events, args.out, stdout)
    except (ProcfsError, TraceError, ValueError, _WriteError) as err:
        stderr.write(f"thpctl import procfs: {err}\n")
        return EXIT_FAIL
    meta = trace.header["meta"]
    stderr.writelines(f"thpctl import procfs: warning: {w}\n" for w in meta.get("warnings", ()))
    summary = {"file": args.out, "events": n, "vmas": meta.get("vmas"), "files": len(meta.get("files", {})),
               "rss_kb": meta.get("rss_kb"), "skipped": meta.get("skipped")}
    text = (f"{args.out or 'stdout'}: {n} events; {summary['vmas']} VMAs of {summary['files']} files, "
            f"{summary['rss_kb']} kB resident; skipped {summary['skipped']}\n")
    emit(ok(summary, text), args.json, stdout if args.out else stderr, stderr, "thpctl import procfs")
    return EXIT_OK


async def _record(session: Session, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from shared.sim.record import RecordError, record

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        stderr.write("thpctl record: no command (thpctl record [-o FILE] -- CMD ...)\n")
        return EXIT_USAGE
    try:
        # In this thread: the recorder is the tracer (ptrace ties tracees to the tracing thread).
        result = record(command, timeout_s=args.timeout, keep_alive=args.keep_alive, buffer_kb=args.buffer_kb)
        n = _write(result.trace.header, result.trace.events, args.out, stdout)
    except (RecordError, _WriteError) as err:
        stderr.write(f"thpctl record: {err}\n")
        return EXIT_FAIL
    stderr.writelines(f"thpctl record: warning: {w}\n" for w in result.warnings)
    s = result.stats
    summary = {"file": args.out, "events": n, "exit_status": result.exit_status, "stats": s}
    text = (f"{args.out}: {n} events; {s.get('faults', 0)} user faults, {s.get('faults_in_file_mappings', 0)} in "
            f"file mappings; command exit status {result.exit_status}\n")
    emit(ok(summary, text), args.json, stdout, stderr, "thpctl record")
    return EXIT_OK


async def _workload(session: Session, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    if args.list:
        doc = {name: dataclasses.asdict(ex._param_class(name)()) for name in ex.workload_names()}
        stdout.write(json.dumps(doc, indent=None if args.json else 2) + "\n")
        return EXIT_OK
    if not args.name:
        stderr.write("thpctl workload: a workload name, or --list\n")
        return EXIT_USAGE
    try:
        params = {k: ex.parse_param(args.name, k, v) for k, v in args.param}
        w = ex.generate(args.name, args.seed, **params)
    except ex.ExperimentError as err:
        stderr.write(f"thpctl workload: {err}\n")
        return EXIT_USAGE
    try:
        n = _write(w.header, w.events(), args.out, stdout)
    except _WriteError as err:
        stderr.write(f"thpctl workload: {err}\n")
        return EXIT_FAIL
    if args.out:
        emit(ok({"file": args.out, "events": n, "header": w.header}, f"{args.out}: {n} events\n"), args.json, stdout,
             stderr, "thpctl workload")
    return EXIT_OK


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(text)
    return key, value


_key_value.__name__ = "KEY=VALUE"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "replay",
        help="play a trace into the daemons (or in-process with --in-process)",
        description="Play a trace (recorded, imported or generated) into the running daemons, at its "
        "original timing, scaled (SCALE: 0.5 is twice as fast), or as fast as they answer; or in-process "
        "into a fresh model on the virtual clock. The header's knobs are applied first. The file is "
        "validated before anything is sent.",
        epilog="examples: thpctl replay text.jsonl --timing fast | thpctl replay text.jsonl --in-process",
    )
    p.add_argument("file", metavar="FILE", help="the trace (JSON lines)")
    p.add_argument("--timing", type=timing, default="original", metavar="original|fast|SCALE",
                   help="original: at the trace's times; fast: as fast as answered; SCALE: times scaled")
    p.add_argument("--in-process", action="store_true", help="into an in-process model, not the daemons")
    p.set_defaults(runner=_replay, name="thpctl replay")

    imp = sub.add_parser("import", help="import a trace from elsewhere: import procfs PID|DIR",
                         description="Turn something outside thpsplit into a trace.")
    isub = imp.add_subparsers(dest="kind", metavar="KIND", required=True)
    p = isub.add_parser(
        "procfs",
        help="a process's file and shmem mappings and residency (/proc/PID/{maps,smaps})",
        description="Read /proc/PID/maps, smaps and mountinfo of a live process (or saved copies in a "
        "directory) and write a trace that rebuilds its file-backed and shmem mappings, their sizes, "
        "permissions, offsets, MADV_HUGEPAGE and residency (Rss).",
        epilog="example: thpctl import procfs $(pidof hhvm) -o hhvm.jsonl",
    )
    p.add_argument("target", metavar="PID|DIR", help="a live process, or a directory with saved maps/smaps")
    p.add_argument("-o", "--out", metavar="FILE", help="write the trace here (default: stdout)")
    p.add_argument("--pid", type=int, metavar="N", help="the pid in the model (default: the process's own)")
    p.add_argument("--residency", choices=RESIDENCY, default="start",
                   help="where the resident pages go in each VMA (default: from its start)")
    p.set_defaults(runner=_import_procfs, name="thpctl import procfs")

    p = sub.add_parser(
        "record",
        help="record a command's page faults and mappings on this machine as a trace (root)",
        description="Run CMD and record its user page faults and file mappings with a tracefs instance "
        "of its own (root, x86-64, tracefs with exceptions:page_fault_user and the syscalls tracepoints); "
        "the instance is removed afterwards.",
        epilog="example: thpctl record -o ls.jsonl -- ls -l /usr/lib",
    )
    p.add_argument("-o", "--out", metavar="FILE", default="thpsplit-record.jsonl", help="where to write the trace")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="kill the command after this long")
    p.add_argument("--keep-alive", action="store_true", help="leave the exits out (the replay ends with every "
                   "process still mapped)")
    p.add_argument("--buffer-kb", type=int, default=8192, metavar="KB", help="ring buffer per CPU")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the command to run and record")
    p.set_defaults(runner=_record, name="thpctl record")

    p = sub.add_parser(
        "workload",
        help="write a generated workload's trace (busy-lock, text, shmem, uprobe, churn)",
        description="Generate a workload's events as a trace: the same seed and parameters give the same "
        "bytes. docs/TRACES.md describes each workload and its parameters.",
        epilog="example: thpctl workload text --seed 3 -p scale=1/16 -p procs=4 -o text.jsonl",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help=", ".join(ex.workload_names()))
    p.add_argument("--seed", type=int, default=0, help="the workload generator's seed")
    p.add_argument("-p", "--param", type=_key_value, action="append", default=[], metavar="K=V",
                   help="a parameter (sizes take K/M/G, scale takes 1/64)")
    p.add_argument("-o", "--out", metavar="FILE", help="write here (default: stdout)")
    p.add_argument("--list", action="store_true", help="every workload's parameters and defaults (JSON)")
    p.set_defaults(runner=_workload, name="thpctl workload")


__all__ = ["register", "replay_in_process", "replay_live"]
