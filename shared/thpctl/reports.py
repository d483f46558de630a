"""thpctl smaps/vmstat/meminfo/sysfs/wait-scans/sync/status: what the kernel would report."""

from __future__ import annotations

import argparse
from typing import Any

from shared.errors import UserError
from shared.knobs import SPECS
from shared.protocol import messages as m
from shared.thpctl.cli import (
    COLLAPSED,
    EXIT_FAIL,
    REMAPD,
    Outcome,
    Request,
    command,
    count,
    ok,
    pairs,
    plain,
    req,
    seconds,
)
from shared.thpctl.render import (
    render_meminfo,
    render_smaps,
    render_sysfs,
    render_vmstat,
)


def _render_vmstat(args: argparse.Namespace, results: list[Any]) -> Outcome:
    counters = dict(results[0])
    counters.update(results[1])
    return ok(counters, render_vmstat(counters))


def _render_sysfs_get(args: argparse.Namespace, results: list[Any]) -> Outcome:
    entries = results[0]
    data = {name: e["value"] for name, e in entries.items()}
    return ok(data, render_sysfs(entries, single=args.knob is not None))


def _plan_wait_scans(args: argparse.Namespace) -> list[Request]:
    request = req(COLLAPSED, m.WaitScans, n=args.n)
    request.timeout = args.timeout
    if args.timeout is not None:
        request.timeout_message = f"khugepaged did not finish {args.n} full scans within {args.timeout:g} s"
    return [request]


def _plan_status(args: argparse.Namespace) -> list[Request]:
    out = []
    for daemon in _daemons(args.daemon):
        request = req(daemon, m.Status)
        request.tolerate = True  # a daemon that is down is part of the answer
        out.append(request)
    return out


def _status_value(key: str, value: Any) -> str:
    if key == "peer":
        return "connected" if value else "not connected"
    if key == "uptime_s":
        return f"{value:.1f}"
    if key == "model_ms":
        return f"{value:.0f}"
    return plain(value)


def _render_status(args: argparse.Namespace, results: list[Any]) -> Outcome:
    """A dict keyed by daemon, whatever was asked; a daemon that cannot be reached is shown down
    (``{"state": "down", "errno": ..., "message": ...}``). Exit 1 only if every daemon asked is down."""
    data: dict[str, Any] = {}
    text = ""
    for daemon, status in zip(_daemons(args.daemon), results, strict=True):
        if isinstance(status, UserError):
            data[daemon] = {"state": "down", "errno": status.errno_name, "message": status.message}
            text += f"{daemon}: down ({status.errno_name}: {status.message})\n"
            continue
        data[daemon] = {"state": "up", **{k: v for k, v in status.items() if k != "daemon"}}
        text += f"{daemon}: up\n" + "".join(
            f"  {k} {_status_value(k, v)}\n" for k, v in status.items() if k != "daemon"
        )
    out = ok(data, text)
    if all(isinstance(s, UserError) for s in results):
        out.status = EXIT_FAIL
        out.error = "ECONNREFUSED: no daemon is reachable"
    return out


def _render_check(args: argparse.Namespace, results: list[Any]) -> Outcome:
    result = results[0]
    text = f"checked {result['pages']} mapped or pinned pages, {result['files']} files: "
    if result["ok"]:
        return ok(result, text + "consistent\n")
    out = ok(result, text + f"{len(result['problems'])} problems\n" + "".join(f"  {p}\n" for p in result["problems"]))
    out.status = 1
    out.error = f"{result['problems'][0]}"
    return out


def _daemons(which: str) -> list[str]:
    return [COLLAPSED, REMAPD] if which == "both" else [which]


def register(sub: Any) -> None:
    p = command(
        sub,
        "smaps",
        "/proc/PID/smaps: every VMA with Rss, FilePmdMapped, THPeligible ...",
        lambda a: [req(REMAPD, m.Smaps, pid=a.pid)],
        lambda a, r: ok(r[0], render_smaps(r[0])),
        "smaps 1",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")

    command(
        sub,
        "vmstat",
        "/proc/vmstat: the THP and fault counters of both daemons",
        lambda a: [req(COLLAPSED, m.Vmstat), req(REMAPD, m.Vmstat)],
        _render_vmstat,
        "vmstat",
    )

    command(
        sub,
        "meminfo",
        "/proc/meminfo: page cache and FileHugePages, FilePmdMapped, ShmemHugePages ...",
        lambda a: [req(COLLAPSED, m.Meminfo)],
        lambda a, r: ok(r[0], render_meminfo(r[0])),
        "meminfo",
    )

    group = sub.add_parser("sysfs", help="the knobs under /sys/kernel/mm/transparent_hugepage")
    gsub = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = command(
        gsub,
        "get",
        "print KNOB (or every knob) as reading its sysfs file would",
        lambda a: [req(COLLAPSED, m.SysfsGet, name=a.knob)],
        _render_sysfs_get,
        "sysfs get khugepaged/full_scans",
    )
    p.add_argument("knob", nargs="?", metavar="KNOB", help=", ".join(SPECS))
    p = command(
        gsub,
        "set",
        "write VALUE to KNOB (both daemons); refused with EINVAL as sysfs would",
        lambda a: [req(REMAPD, m.SysfsSet, name=a.knob, value=a.value)],
        lambda a, r: ok(r[0]),
        "sysfs set khugepaged/scan_sleep_millisecs 100",
    )
    p.add_argument("knob", metavar="KNOB", help="the knob's path under /sys/kernel/mm/transparent_hugepage")
    p.add_argument("value", metavar="VALUE", help="what to write to it")

    p = command(
        sub,
        "wait-scans",
        "return once khugepaged's full_scans has grown by N",
        _plan_wait_scans,
        lambda a, r: ok(r[0], pairs(r[0])),
        "wait-scans 2 --timeout 10",
        barrier=True,
    )
    p.add_argument("n", type=count, metavar="N", help="how many more full scans to wait for")
    p.add_argument("--timeout", type=seconds, metavar="SECONDS", help="give up (exit 1) after SECONDS (default: wait)")

    p = command(
        sub,
        "sync",
        "return once each daemon's peer has processed everything sent to it (waits for the "
        "daemons to be connected)",
        lambda a: [req(d, m.Sync) for d in _daemons(a.daemon)],
        lambda a, r: ok(None),
        "sync",
        barrier=True,
    )
    p.add_argument("daemon", nargs="?", choices=(COLLAPSED, REMAPD, "both"), default="both", help="which daemon")

    command(
        sub,
        "check",
        "debug: remapd's page tables, pins and files checked against collapsed's pages and "
        "cache (exit 1 with the problems; EAGAIN while a collapse is in flight: retry)",
        lambda a: [req(REMAPD, m.Check)],
        _render_check,
        "check",
        barrier=True,
    )

    p = command(
        sub,
        "status",
        "each daemon's state (up or down), peer connection, clients, uptime and size; exits 1 "
        "only when every daemon asked is down",
        _plan_status,
        _render_status,
        "status",
    )
    p.add_argument("daemon", nargs="?", choices=(COLLAPSED, REMAPD, "both"), default="both", help="which daemon")
