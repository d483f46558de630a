"""``import procfs`` (issue 11): the kernel's maps/smaps formats, and a live process of our own
rebuilt in the model with its layout and, VMA by VMA, its resident set."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.knobs import Knobs
from shared.sim import procfs_import as pi
from shared.sim.procfs_import import (
    ProcfsError,
    build_trace,
    compare_rss,
    parse_maps,
    parse_smaps,
    read_procfs,
)
from shared.sim.trace import dumps_trace, loads_trace, replay
from tests.conftest import ONE_PAGE_AT_A_TIME, CheckedWorld

PAD = 73  # where the kernel puts the name: column 72, then one space


def line(start: int, end: int, perms: str, offset: int, dev: str, inode: int, name: str = "") -> str:
    head = f"{start:08x}-{end:08x} {perms} {offset:08x} {dev} {inode} "
    if not name:
        return head
    return head.ljust(PAD - 1) + " " + name if len(head) < PAD - 1 else head + " " + name


SAMPLE = "\n".join(
    [
        line(0x400000, 0x401000, "r--p", 0, "fe:00", 11, "/usr/bin/my app"),
        line(0x401000, 0x403000, "r-xp", 0x1000, "fe:00", 11, "/usr/bin/my app"),
        line(0x600000, 0x800000, "rw-p", 0, "00:00", 0, "[heap]"),
        line(0x7F0000000000, 0x7F0000200000, "rw-s", 0, "00:01", 2048, "/dev/zero (deleted)"),
        line(0x7F0000200000, 0x7F0000201000, "rw-s", 0, "00:01", 2049, "/dev/zero (deleted)"),
        line(0x7F0000300000, 0x7F0000304000, "r--s", 0x2000, "00:17", 7, "/memfd:pool (deleted)"),
        line(0x7F0000400000, 0x7F0000401000, "---p", 0x3000, "fe:00", 12, "/lib/libz.so.1"),
        line(0x7F0000401000, 0x7F0000402000, "r--p", 0x4000, "fe:00", 12, "/lib/libz.so.1"),
        line(0x7F0000402000, 0x7F0000403000, "r--p", 0, "fe:00", 99, "/opt/b/libz.so.1"),
        line(0x7F0000500000, 0x7F0000501000, "rw-p", 0, "00:00", 0),
        line(0x7F0000600000, 0x7F0000601000, "rw-s", 0, "00:06", 5, "/dev/dri/card0"),
        line(0x7F0000700000, 0x7F0000702000, "r--s", 0, "00:19", 8, "/run/shm-like/data"),
        line(0x7F0000800000, 0x7F0000801000, "rw-s", 0, "00:01", 9, "[anon_shmem:jit]"),
        line(0x7FFF00000000, 0x7FFF00021000, "rw-p", 0, "00:00", 0, "[stack]"),
        line(0x7FFF00100000, 0x7FFF00102000, "r-xp", 0, "00:00", 0, "[vdso]"),
        line(0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000, "--xp", 0, "00:00", 0, "[vsyscall]"),
    ]
)
MOUNTINFO = "25 24 0:25 / /run/shm-like rw,relatime - tmpfs tmpfs rw\n27 1 254:0 / / rw - ext4 /dev/vda rw\n"


def test_maps_lines_parse_as_the_kernel_prints_them() -> None:
    entries = parse_maps(SAMPLE + "\n")
    assert len(entries) == 16
    app = entries[1]
    assert (app.start, app.end, app.perms, app.offset, app.dev, app.inode, app.path) == (
        0x401000, 0x403000, "r-xp", 0x1000, "fe:00", 11, "/usr/bin/my app")
    assert entries[3].path == "/dev/zero" and entries[3].deleted
    assert entries[9].path == "" and entries[15].path == "[vsyscall]"
    # A name that starts with spaces keeps them: the kernel's column says where it starts.
    odd = parse_maps(line(0x1000, 0x2000, "r--p", 0, "fe:00", 1, "  lead.so"))[0]
    assert odd.path == "  lead.so"
    # A copy whose padding was squeezed still parses.
    assert parse_maps("00400000-00401000 r--p 00000000 fe:00 11 /usr/bin/my app")[0].path == "/usr/bin/my app"
    # Long fields leave no padding: one space after the inode, one before the name.
    long = line(0x7FFFFFFFE000, 0x7FFFFFFFF000, "r--p", 0x123456789, "103:1f", 123456789012, "/x y")
    assert parse_maps(long)[0].path == "/x y" and parse_maps(long)[0].major == 0x103


def test_classification_and_the_rebuilt_layout() -> None:
    entries = parse_maps(SAMPLE)
    fstypes = pi.parse_mountinfo(MOUNTINFO)
    assert fstypes[(0, 25)] == "tmpfs"
    kinds = [pi.classify(e, {(0, 0x19): "tmpfs"}) for e in entries]
    assert kinds == ["file", "file", "anon", "shmem", "shmem", "shmem", "prot_none", "file", "file", "anon",
                     "device", "shmem", "shmem", "anon", "special", "special"]
    layout = pi.Layout(entries, 42, "sample", {(0, 0x19): "tmpfs"}, False, [])
    trace = build_trace(layout)
    meta = trace.header["meta"]
    assert meta["skipped"] == {"anon": 3, "device": 1, "prot_none": 1, "special": 2}
    creates = {e["name"]: (e["size"], e["shmem"]) for e in trace.events if e["op"] == "file_create"}
    assert creates == {
        "my app": (0x3000, False),  # the largest offset + length
        "zero": (0x200000, True),
        "zero~2": (0x1000, True),  # another inode: another shared-memory object
        "memfd:pool": (0x6000, True),
        "libz.so.1": (0x5000, False),
        "libz.so.1~2": (0x1000, False),  # same name, another file
        "data": (0x2000, True),  # on a tmpfs mount
        "anon_shmem:jit": (0x1000, True),
    }
    assert meta["files"]["zero~2"] == {"path": "/dev/zero", "dev": "00:01", "inode": 2049, "shmem": True,
                                       "deleted": True, "size": 0x1000}
    maps = [(e["addr"], e["length"], e["offset"], e["prot"], e["shared"], e["name"]) for e in trace.events if e["op"] == "mmap"]
    assert maps[:2] == [(0x400000, 0x1000, 0, "r", False, "my app"), (0x401000, 0x2000, 0x1000, "rx", False, "my app")]
    assert (0x7F0000300000, 0x4000, 0x2000, "r", True, "memfd:pool") in maps
    assert len(maps) == 9 and all(e["pid"] == 42 for e in trace.events if "pid" in e)
    assert not any(e["op"] == "touch" for e in trace.events)  # maps alone: no Rss


SMAPS = f"""{line(0x40000000, 0x40400000, "r-xp", 0, "fe:00", 5, "/srv/big.so")}
Size:               4096 kB
KernelPageSize:        4 kB
Rss:                 264 kB
Anonymous:             0 kB
FilePmdMapped:         0 kB
THPeligible:    1
VmFlags: rd ex mr mw me hg
{line(0x40400000, 0x40410000, "rw-p", 0x400000, "fe:00", 5, "/srv/big.so")}
Size:                 64 kB
Rss:                  24 kB
Anonymous:             8 kB
ProtectionKey:         0
VmFlags: rd wr mr mw me ac nh
{line(0x40500000, 0x40510000, "r--p", 0, "fe:00", 6, "/srv/other.so")}
Size:                 64 kB
Rss:                  16 kB
VmFlags: rd mr mw me rr dd
"""


def test_smaps_gives_residency_and_hugepage_advice() -> None:
    entries = parse_smaps(SMAPS)
    assert [e.rss_kb for e in entries] == [264, 24, 16]
    assert entries[0].vmflags[-1] == "hg" and entries[0].fields["THPeligible"] == 1
    assert entries[1].fields["ProtectionKey"] == 0 and entries[1].anon_kb == 8
    layout = pi.Layout(entries, 7, "sample", {}, True, [])
    evs = build_trace(layout).events
    advice = [(e["addr"], e["advice"]) for e in evs if e["op"] == "madvise"]
    # Every madvise letter of VmFlags comes back as its advice (shared.vm.VMFLAG_ADVICE).
    assert advice == [(0x40000000, "hugepage"), (0x40400000, "nohugepage"), (0x40500000, "random"), (0x40500000, "dontdump")]
    touches = [(e["addr"], e["length"], e["write"], e["stride"]) for e in evs if e["op"] == "touch"]
    assert touches == [
        (0x40000000, 264 * 1024, False, 4096),
        (0x40400000, 8192, True, 4096),  # the CoW'd pages, written
        (0x40402000, 16 * 1024, False, 4096),
        (0x40500000, 16 * 1024, False, 4096),
    ]
    spread = [(e["addr"], e["length"], e["stride"]) for e in build_trace(layout, "spread").events if e["op"] == "touch"]
    assert spread[0] == (0x40000000, 66 * 15 * 4096, 15 * 4096)  # 66 pages, one every 15 of 1024
    assert spread[-1] == (0x40500000, 16 * 4096, 4 * 4096)
    with pytest.raises(ValueError, match="residency"):
        build_trace(layout, "middle")


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        ("00400000-00401000 r--p 00000000 fe:00 11 /a\ngarbage here\n", "smaps:2", "not an smaps line"),
        ("Rss: 4 kB\n", "smaps:1", "before any mapping"),
        ("00401000-00400000 r--p 00000000 fe:00 11 /a\n", "smaps:1", "bad range"),
        ("00400000-00401000 rwxq 00000000 fe:00 11 /a\n", "smaps:1", "not an smaps line"),
    ],
)
def test_bad_input_names_its_line(text: str, where: str, words: str) -> None:
    with pytest.raises(ProcfsError) as info:
        parse_smaps(text)
    assert str(info.value).startswith(where) and words in str(info.value)
    with pytest.raises(ProcfsError, match=r"maps:2: not a maps line"):
        parse_maps("00400000-00401000 r--p 00000000 fe:00 11 /a\nRss: 4 kB\n")


def test_read_procfs_errors(tmp_path: Path) -> None:
    with pytest.raises(ProcfsError, match="neither 'maps' nor 'smaps'"):
        read_procfs(tmp_path)
    with pytest.raises(ProcfsError, match="not a directory"):
        read_procfs(tmp_path / "nope")
    with pytest.raises(ProcfsError, match="no process"):
        read_procfs(4194303)
    (tmp_path / "maps").write_text(SAMPLE)
    layout = read_procfs(tmp_path)
    assert layout.pid == 1 and not layout.has_smaps and "no smaps" in layout.warnings[0]


# -- a live process ---------------------------------------------------------------------------


@pytest.fixture
def live_python():
    """A Python that imported a few extension modules and sleeps; killed at teardown."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import json, decimal, ctypes, sqlite3, time; print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def file_vmas(pid: int) -> list[tuple[int, int, str, int, str]]:
    """The test's own reading of /proc/PID/maps (plain split, independent of the importer):
    (start, end, perms, offset, path) of every file mapping that is not PROT_NONE or a device."""
    out = []
    for text in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = text.split(maxsplit=5)
        path = parts[5] if len(parts) == 6 else ""
        if path.startswith("/") and not path.startswith("/dev/") and parts[1][:3] != "---":
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, parts[1], int(parts[2], 16), path))
    return out


def rss_by_start(pid: int) -> dict[int, int]:
    out, start = {}, None
    for text in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if "-" in text.split(" ", 1)[0] and not text.endswith(" kB"):
            start = int(text.split("-", 1)[0], 16)
        elif text.startswith("Rss:"):
            out[start] = int(text.split()[1])
    return out


def test_import_rebuilds_a_live_process_layout(live_python: int, tmp_path: Path) -> None:
    pid = live_python
    expected = file_vmas(pid)
    assert len(expected) >= 30  # python, libpython, libc, ld.so, the extension modules, their libraries
    trace = pi.import_procfs(pid)
    maps = [e for e in trace.events if e["op"] == "mmap"]
    assert len(maps) == len(expected) == trace.header["meta"]["vmas"]
    perms = {"r": "r-", "rw": "rw", "rx": "r-x", "rwx": "rwx"}
    got = [(e["addr"], e["addr"] + e["length"], perms[e["prot"]].ljust(3, "-") + ("s" if e["shared"] else "p"),
            e["offset"]) for e in maps]
    assert got == [x[:4] for x in expected]
    # One model file per library, named after it, sized to cover its mappings.
    names = {e["name"] for e in maps}
    paths = {x[4] for x in expected}
    assert len(names) == len(paths)
    assert any(n.startswith("_sqlite3.cpython") for n in names) and any(n.startswith("libc.so") for n in names)
    files = trace.header["meta"]["files"]
    for e in maps:
        assert e["offset"] + e["length"] <= files[e["name"]]["size"]
    assert {f["path"] for f in files.values()} == paths
    # Saved copies import to the same events.
    saved = tmp_path / "copy"
    saved.mkdir()
    for name in ("maps", "smaps", "mountinfo"):
        shutil.copy(f"/proc/{pid}/{name}", saved / name)
    again = pi.import_procfs(saved, pid=pid)
    assert again.events == trace.events and again.header["meta"]["warnings"] == []
    # The trace round-trips through the file format.
    assert loads_trace(dumps_trace(trace.events, trace.header)).events == trace.events


# Replaying Rss from the start of each VMA: with readahead and fault-around off the model maps
# exactly the pages touched; with the defaults, a read fault also maps the cached pages of its
# 64 KiB fault-around window, so a VMA can come back with up to 60 KiB (15 pages) more, never less.
EXACT = 0
FAULT_AROUND_KB = 60


@pytest.mark.parametrize(("knobs", "slack_kb"), [(ONE_PAGE_AT_A_TIME, EXACT), ({}, FAULT_AROUND_KB)])
def test_replaying_the_import_gives_each_vma_its_rss(live_python: int, knobs: dict, slack_kb: int) -> None:
    pid = live_python
    layout = read_procfs(pid)
    original = rss_by_start(pid)
    trace = build_trace(layout)
    world = CheckedWorld(Knobs(**knobs))
    res = replay(trace, world, "fast")
    assert res.counts["errors"] == {} and "sigsegv" not in res.counts["faults"]
    rows = compare_rss(layout.entries, world.smaps(pid), layout.fstypes)
    assert sum(r["vmas"] for r in rows) == len(file_vmas(pid))  # every original VMA is in a group
    total = 0
    for r in rows:
        want = sum(kb for start, kb in original.items() if r["start"] <= start < r["end"])
        assert r["rss_kb"] == want
        assert want <= r["replayed_kb"] <= want + slack_kb * r["vmas"], r
        total += want
    assert total > 1024  # a few MiB of text and data really were resident


def test_the_cli(live_python: int, tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.jsonl"
    assert pi.main([str(live_python), "-o", str(out), "--pid", "3"]) == 0
    assert "VMAs of" in capsys.readouterr().err
    trace = loads_trace(out.read_text())
    assert trace.header["source"] == "procfs" and trace.events[len(trace.header["meta"]["files"])] == {
        "t_ms": 0, "op": "spawn", "pid": 3}
    assert pi.main([str(tmp_path / "missing")]) == 1
    assert "not a directory" in capsys.readouterr().err
