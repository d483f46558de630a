"""The demo (issue 8): `python -m shared.thpctl.demo` starts its own daemons by default (the main
job, `bash .ci/demo`) or attaches to running ones with --collapsed/--remapd (the compose demo's
service); either way it ends with one grep-able tally line."""

from __future__ import annotations

import os
import re
import sys

import trio

from shared.protocol import messages as m
from shared.shell.auth import Secrets
from shared.thpctl.client import Session
from shared.thpctl.launch import running_daemons

TALLY = re.compile(r"tally: pmd_mapped_kb=(\d+) thp_file_mapped=(\d+) collapses=(\d+)")
SECRETS = {"THPSPLIT_SECRET": "demo-test-client-secret-0123", "THPSPLIT_PEER_SECRET": "demo-test-peer-secret-4567"}


async def demo(*argv: str, env: dict[str, str]) -> trio.Process:
    return await trio.run_process(
        [sys.executable, "-m", "shared.thpctl.demo", *argv],
        capture_stdout=True,
        capture_stderr=True,
        env={**os.environ, **env},
        check=False,
    )


async def test_the_demo_attaches_to_running_daemons_and_ends_with_a_tally(workdir):
    # As in the compose stack: TCP, the client secret for the demo, both secrets for the daemons.
    async with running_daemons(workdir, "tcp", env=SECRETS) as d:
        client_env = {"THPSPLIT_SECRET": SECRETS["THPSPLIT_SECRET"], "THPSPLIT_PEER_SECRET": ""}
        tallies = []
        for _ in range(2):  # a second run against the same daemons takes pids and a file of its own
            with trio.fail_after(60):
                run = await demo("--collapsed", d.collapsed.address, "--remapd", d.remapd.address, env=client_env)
            out = run.stdout.decode()
            assert run.returncode == 0, (out[-2000:], run.stderr.decode())
            assert "Attached to running daemons" in out and "Retry policies" not in out
            last = out.strip().splitlines()[-1]
            match = TALLY.fullmatch(last)
            assert match, last
            tallies.append(tuple(map(int, match.groups())))
        # Three processes, each 8 MiB PMD-mapped; four 2 MiB collapses, counted per run.
        assert tallies == [(3 * 8192, tallies[0][1], 4)] * 2 and tallies[0][1] > 0
        async with Session(d.collapsed.address, d.remapd.address, Secrets(SECRETS["THPSPLIT_SECRET"].encode())) as s:
            assert (await s.call(m.Status, "remapd"))["processes"] == [1, 2, 3, 4, 5, 6]
            assert sorted(f["name"] for f in await s.call(m.FileLs)) == ["libbig-2.so", "libbig.so"]
    assert (d.collapsed.proc.returncode, d.remapd.proc.returncode) == (0, 0)


async def test_the_demo_fails_in_one_line_without_daemons(workdir):
    run = await demo("--collapsed", f"unix:{workdir}/none.sock", "--remapd", f"unix:{workdir}/none2.sock", env={})
    err = run.stderr.decode()
    assert run.returncode == 1 and err.count("\n") == 1 and err.startswith("demo: FAILED: ECONNREFUSED"), err
    run = await demo("--collapsed", "unix:/x.sock", env={})
    assert run.returncode == 2 and "--collapsed and --remapd go together" in run.stderr.decode()


async def test_the_demo_help_offers_attaching():
    run = await demo("--help", env={})
    assert run.returncode == 0 and "--collapsed" in run.stdout.decode() and "--remapd" in run.stdout.decode()
