"""thpctl's command line itself: help and defaults, --version, completion, usage errors (exit 2),
--json errors, status with a daemon down, error prefixes, no Python reprs in text output."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import ONE_PAGE_FLAGS, ok, thpctl

from shared.thpctl.cli import amain, build_parser
from shared.thpctl.launch import running_daemons


@pytest.fixture
async def d(tmp_path: Path):
    short = len(str(tmp_path / "collapsed.sock")) < 100
    workdir = tmp_path if short else Path(tempfile.mkdtemp(prefix="thp-"))
    async with running_daemons(workdir, "unix", remapd_args=ONE_PAGE_FLAGS) as daemons:
        yield daemons
    if not short:
        shutil.rmtree(workdir, ignore_errors=True)


async def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = await amain(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


def _parsers(parser: argparse.ArgumentParser, path: str = "thpctl"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_option_and_argument_has_help_and_shows_its_default() -> None:
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.dest == "help":
                continue
            if not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []
    help_text = next(p for n, p in _parsers(build_parser()) if n == "thpctl touch").format_help()
    assert "(default: 4096)" in help_text
    assert "(default: False)" not in help_text  # flags show no default


async def test_version_and_completion(capsys) -> None:
    status, _, _ = await run("--version")
    assert status == 0 and capsys.readouterr().out.startswith("thpctl ")
    status, _, _ = await run("--print-completion", "bash")
    out = capsys.readouterr().out
    assert status == 0 and "thpctl" in out and "wait-scans" in out


async def test_usage_errors_exit_2_with_one_line(monkeypatch) -> None:
    status, out, err = await run("wait-scans", "-1")
    assert (status, out) == (2, "") and err == "thpctl wait-scans: argument N: EINVAL: -1 is negative\n"
    status, out, err = await run("fault", "1", "0xffffffffffffffffff")
    assert (status, out) == (2, "") and err.count("\n") == 1
    assert "EINVAL" in err and "client." not in err and "does not fit in 64 bits" in err
    status, out, err = await run("--json", "munmap", "1", "lots", "4K")
    assert status == 2 and json.loads(out) == {
        "error": {"errno": "EINVAL", "message": "thpctl munmap: argument ADDR: invalid address value: 'lots'"}
    }
    monkeypatch.setenv("THPSPLIT_DEADLINE", "abc")
    status, out, err = await run("status")
    assert (status, out) == (2, "") and err == "thpctl: $THPSPLIT_DEADLINE: invalid seconds value: 'abc'\n"


async def test_status_of_daemons_that_are_down_is_a_document_and_exit_1() -> None:
    status, out, err = await run(
        "--collapsed", "unix:/nonexistent/c.sock", "--remapd", "unix:/nonexistent/r.sock", "--json", "status"
    )
    doc = json.loads(out)
    assert status == 1 and set(doc) == {"collapsed", "remapd"}
    assert doc["collapsed"]["state"] == "down" and doc["collapsed"]["errno"] == "ECONNREFUSED"
    assert err == "thpctl status: ECONNREFUSED: no daemon is reachable\n"


async def test_status_shows_a_daemon_down_and_the_other_up(d) -> None:
    status, out, err = await run("--collapsed", d.collapsed.address, "--remapd", "unix:/nonexistent/r.sock", "status")
    assert (status, err) == (0, "")
    assert out.startswith("collapsed: up\n  peer connected\n  clients 1\n")
    assert "remapd: down (ECONNREFUSED: cannot reach remapd at unix:/nonexistent/r.sock" in out
    doc = json.loads(await ok(d, "--json", "status", "remapd"))
    assert list(doc) == ["remapd"] and doc["remapd"]["state"] == "up"


async def test_text_output_has_no_python_reprs(d) -> None:
    await ok(d, "proc", "spawn", "1")
    await ok(d, "proc", "spawn", "2")
    out = await ok(d, "status")
    assert "peer connected" in out and "processes 1,2" in out
    for bad in ("True", "False", "[", "{", "'"):
        assert bad not in out, out
    model_ms = next(line for line in out.splitlines() if "model_ms" in line)
    assert "." not in model_ms


async def test_errors_start_with_the_command_not_the_file_name(d) -> None:
    status, out, err = await thpctl(d, "file", "write", "nosuch", "0", "4K")
    assert (status, out) == (1, "") and err == "thpctl file write: ENOENT: no file 'nosuch'\n"
    status, out, err = await thpctl(d, "file", "create", "", "--size", "4K")
    assert status == 1 and err.startswith("thpctl file create: EINVAL: bad file name")
    status, out, err = await thpctl(d, "uprobe", "add", "nosuch", "0x10")
    assert status == 1 and err.startswith("thpctl uprobe: ENOENT: ")
    status, out, err = await thpctl(d, "--json", "file", "sync", "nosuch")
    assert status == 1 and json.loads(out) == {"error": {"errno": "ENOENT", "message": "no file 'nosuch'"}}


async def test_a_large_touch_goes_as_chunks_with_the_same_counts(d):
    await ok(d, "file", "create", "big", "--size", "40M")
    await ok(d, "proc", "spawn", "1")
    addr = (await ok(d, "mmap", "1", "auto", "40M", "--file", "big")).strip()
    args = build_parser().parse_args(["touch", "1", addr, "40M"])
    assert [r.fields["length"] for r in args.plan(args)] == [32 << 20, 8 << 20]
    assert await ok(d, "touch", "1", addr, "40M") == "major 10240\n"
    assert await ok(d, "touch", "1", addr, "40M") == "hit 10240\n"


def test_progress_shows_on_a_terminal_after_a_second(monkeypatch) -> None:
    from shared.thpctl import cli

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    clock = [100.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    tty = Terminal()
    args = argparse.Namespace(prog="thpctl touch")
    with cli.progress(args, tty):
        args.tick(0, 4)
        assert tty.getvalue() == ""  # under a second: nothing
        clock[0] += 1.5
        args.tick(2, 4)
    assert "thpctl touch" in tty.getvalue() and "2/4" in tty.getvalue()
    quiet = io.StringIO()  # not a terminal: no bar, no tick
    with cli.progress(args, quiet):
        assert getattr(args, "tick", None) is None
    assert quiet.getvalue() == ""
