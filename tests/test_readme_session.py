"""The README's session is a script (docs/examples/session.sh) that runs top to bottom against
real daemons, and the README shows exactly its lines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from shared.thpctl.launch import running_daemons

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docs" / "examples" / "session.sh"
MARKER = "# --- session ---"


def session_lines() -> list[str]:
    text = SCRIPT.read_text()
    return text.split(MARKER + "\n", 1)[1].splitlines()


def test_the_readme_shows_the_script() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    start = readme.index("A session, end to end ([docs/examples/session.sh](docs/examples/session.sh)):")
    block = []
    for line in readme[start + 2 :]:
        if not line.startswith("    "):
            break
        block.append(line[4:])
    assert block == session_lines()


async def test_the_session_runs_top_to_bottom(tmp_path: Path) -> None:
    short = len(str(tmp_path / "collapsed.sock")) < 100
    workdir = tmp_path if short else Path(tempfile.mkdtemp(prefix="thp-"))
    bindir = workdir / "bin"
    bindir.mkdir()
    wrapper = bindir / "thpctl"
    wrapper.write_text(f'#!/bin/sh\ncd "{ROOT}" && exec "{sys.executable}" -m shared.thpctl "$@"\n')
    wrapper.chmod(0o755)
    async with running_daemons(workdir, "unix") as d:
        env = {
            **os.environ,
            "PATH": f"{bindir}:{os.environ['PATH']}",
            "THPSPLIT_COLLAPSED": d.collapsed.address,
            "THPSPLIT_REMAPD": d.remapd.address,
        }
        p = await trio.to_thread.run_sync(
            lambda: subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120, check=False)
        )
    if not short:
        shutil.rmtree(workdir, ignore_errors=True)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "FilePmdMapped:      4096 kB" in out  # khugepaged collapsed both 2 MiB ranges
    assert "file-thp-pmd-aligned-2048kB:        4096 kB (100%)" in out
    assert " PP\n" in out and "present,file,exclusive" in out
    assert "thp_collapse_alloc 2" in out and "collapsed: up" in out
