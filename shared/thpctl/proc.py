"""thpctl proc ...: modelled processes (served by remapd)."""

from __future__ import annotations

from typing import Any

from shared.protocol import messages as m
from shared.thpctl.cli import REMAPD, command, ok, req
from shared.thpctl.render import render_status


def register(sub: Any) -> None:
    group = sub.add_parser("proc", help="processes (remapd)")
    gsub = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)

    p = command(
        gsub,
        "spawn",
        "create process PID with an empty address space",
        lambda a: [req(REMAPD, m.ProcSpawn, pid=a.pid)],
        lambda a, r: ok(r[0]),
        "proc spawn 1",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")

    p = command(
        gsub,
        "exit",
        "exit process PID: unmap everything, drop its pins and its khugepaged slot",
        lambda a: [req(REMAPD, m.ProcExit, pid=a.pid)],
        lambda a, r: ok(r[0]),
        "proc exit 1",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")

    p = command(
        gsub,
        "fork",
        "fork PID into CHILD (dup_mmap: VMAs copied, file page tables left to refault)",
        lambda a: [req(REMAPD, m.ProcFork, pid=a.pid, child=a.child)],
        lambda a, r: ok(r[0]),
        "proc fork 1 2",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")
    p.add_argument("child", type=int, metavar="CHILD", help="the new process's pid")

    p = command(
        gsub,
        "status",
        "/proc/PID/status: VmSize, VmRSS, RssAnon, RssFile, RssShmem, VmPTE ... (kB)",
        lambda a: [req(REMAPD, m.ProcStatus, pid=a.pid)],
        lambda a, r: ok(r[0], render_status(r[0])),
        "proc status 1",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")
