"""``record`` (issue 11): the trace-line parser and the translation on recorded-looking input
(no root needed), then real commands recorded on this machine (root, tracefs: skipped with the
reason otherwise), checked to validate, to hold faults inside file mappings, to replay into a
checked world, and to leave no tracing instance (or mount) behind."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from pathlib import Path

import pytest

from shared.knobs import Knobs
from shared.sim import record as rec
from shared.sim.procfs_import import parse_smaps
from shared.sim.record import (
    FdInfo,
    Raw,
    RecordError,
    Snapshot,
    parse_trace_line,
    translate,
)
from shared.sim.trace import dumps_trace, loads_trace, replay
from tests.conftest import CheckedWorld

pytestmark = pytest.mark.kernel

# -- parsing the instance's trace text (lines as this machine's 6.18 prints them) ----------------

LINES = {
    "fault": "         python3-16186   (  16186) [000] d....   944.146577: page_fault_user: "
    "address=0x7f517a59db70 ip=0x7f517a59db70 error_code=0x14",
    "enter": "         python3-16186   (  16186) [000] .....   937.886142: sys_mmap(addr: 0x7f7de376e000, "
    "len: 0x156000, prot: 5, flags: 0x812, fd: 3, off: 0x26000)",
    "anon": "         python3-16186   (  16186) [000] .....   937.886075: sys_mmap(addr: 0, len: 0x2000, prot: 3, "
    "flags: 0x22, fd: 0xffffffff, off: 0)",
    "exit": "         python3-16186   (  16186) [000] .....   937.886153: sys_mmap -> 0x7f7de376e000",
    "error": "         python3-16186   (  16186) [000] .....   937.886153: sys_mmap -> 0xfffffffffffffff4",
    "fork": "         python3-17392   (  17392) [000] .....   951.108083: sched_process_fork: comm=bash pid=17392 "
    "child_comm=bash child_pid=17411",
    "pexit": "            bash-17411   (  17411) [000] .....   951.108397: sched_process_exit: comm=bash pid=17411 "
    "prio=120 group_dead=true",
    "dashes": "  my-tool-v2-300   (    299) [001] .N...   12.000001: sys_munmap(addr: 0x7f7de392a000, len: 0x87f7)",
}


def test_trace_lines_parse() -> None:
    f = parse_trace_line(LINES["fault"])
    assert (f.ts_us, f.tid, f.tgid, f.kind) == (944_146_577, 16186, 16186, "fault")
    assert f.args == {"address": 0x7F517A59DB70, "error_code": 0x14}
    e = parse_trace_line(LINES["enter"])
    assert (e.kind, e.name) == ("enter", "mmap")
    assert e.args == {"addr": 0x7F7DE376E000, "len": 0x156000, "prot": 5, "flags": 0x812, "fd": 3, "off": 0x26000}
    assert parse_trace_line(LINES["anon"]).args["fd"] == 0xFFFFFFFF
    assert parse_trace_line(LINES["exit"]).args == {"ret": 0x7F7DE376E000}
    assert parse_trace_line(LINES["error"]).args == {"ret": -12}
    assert parse_trace_line(LINES["fork"]).args == {"parent": 17392, "child": 17411}
    assert parse_trace_line(LINES["pexit"]).args == {"pid": 17411, "group_dead": True}
    d = parse_trace_line(LINES["dashes"])
    assert (d.tid, d.tgid, d.name, d.ts_us) == (300, 299, "munmap", 12_000_001)
    assert parse_trace_line("# tracer: nop") is None and parse_trace_line("") is None
    assert parse_trace_line("CPU:1 [LOST 42 EVENTS]").args == {"count": 42}
    assert parse_trace_line("  x-1 (1) [000] ..... 1.000000: sched_switch: prev_comm=x").kind == "other"


# -- translation ------------------------------------------------------------------------------

LIB = 0x7F0000000000


def smaps_line(start: int, end: int, perms: str, offset: int, inode: int, path: str, flags: str = "rd mr mw me") -> str:
    head = f"{start:x}-{end:x} {perms} {offset:08x} fe:00 {inode} "
    return f"{head.ljust(72)} {path}\nRss: 0 kB\nVmFlags: {flags}\n" if path else f"{head}\nRss: 0 kB\nVmFlags: {flags}\n"


EXEC_SMAPS = (
    smaps_line(0x400000, 0x401000, "r--p", 0, 10, "/usr/bin/app")
    + smaps_line(0x401000, 0x403000, "r-xp", 0x1000, 10, "/usr/bin/app", "rd ex mr mw me hg")
    + smaps_line(0x600000, 0x621000, "rw-p", 0, 0, "[heap]")
    + smaps_line(0x7FFF0000, 0x7FFF1000, "r-xp", 0, 0, "[vdso]")
)


def raw(ts: int, kind: str, name: str, tid: int = 100, tgid: int | None = 100, **args) -> Raw:
    return Raw(ts, tid, tgid, kind, name, args)


def scenario(keep_alive: bool = False, fd_known: bool = True):
    snaps = [
        Snapshot(1_000, 100, "exec", parse_smaps(EXEC_SMAPS)),
        # At exit, the library mapped at 2_000 is still there: a late name for it.
        Snapshot(9_000, 100, "exit", parse_smaps(smaps_line(LIB, LIB + 0x4000, "r-xp", 0x2000, 20, "/lib/libx.so"))),
    ]
    fds = [FdInfo(1_990, 100, 3, "/lib/libx.so", 0xFE, 0, 20, 0x9000)] if fd_known else [FdInfo(1_990, 100, 3, None)]
    raws = [
        raw(500, "fault", "page_fault_user", address=0x400123, error_code=4),  # before the exec: not ours
        raw(1_500, "fault", "page_fault_user", address=0x401abc, error_code=0x14),  # exec fetch in text
        raw(1_600, "fault", "page_fault_user", address=0x600010, error_code=6),  # heap
        raw(2_000, "enter", "mmap", addr=0, len=0x3800, prot=5, flags=0x802, fd=3, off=0x2000),
        raw(2_010, "exit", "mmap", ret=LIB),
        raw(2_100, "fault", "page_fault_user", address=LIB + 0x1234, error_code=6),  # write
        raw(2_200, "enter", "mprotect", start=LIB, len=0x1000, prot=1),  # narrower: ignored
        raw(2_300, "enter", "madvise", start=LIB - 0x1000, len_in=0x3000, behavior=14),
        raw(2_400, "enter", "mmap", addr=0x402000, len=0x1000, prot=3, flags=0x32, fd=0xFFFFFFFF, off=0),
        raw(2_410, "exit", "mmap", ret=0x402000),  # anonymous MAP_FIXED over the app's text
        raw(2_500, "enter", "mmap", addr=0, len=0x1000, prot=3, flags=0x22, fd=0xFFFFFFFF, off=0),
        raw(2_510, "exit", "mmap", ret=0x7E0000000000),  # plain anonymous: nothing to do
        raw(2_600, "enter", "mmap", addr=0, len=0x1000, prot=1, flags=2, fd=7, off=0),
        raw(2_610, "exit", "mmap", ret=-9),  # EBADF: nothing
        raw(3_000, "fork", "sched_process_fork", parent=100, child=101),
        raw(3_001, "fork", "sched_process_fork", parent=100, child=102),  # a thread
        raw(3_100, "fault", "page_fault_user", tid=101, tgid=101, address=0x401000, error_code=4),
        raw(3_200, "fault", "page_fault_user", tid=102, tgid=100, address=0x400000, error_code=4),
        raw(3_300, "enter", "munmap", tid=101, tgid=101, addr=LIB, len=0x4000),
        raw(4_000, "pexit", "sched_process_exit", tid=102, tgid=100, pid=102, group_dead=False),
        raw(4_100, "pexit", "sched_process_exit", tid=101, tgid=101, pid=101, group_dead=True),
        raw(4_200, "enter", "mprotect", start=LIB, len=0x1000, prot=7),  # wider: the mmap gets rwx
        Raw(0, 0, None, "lost", "lost", {"count": 3}),
        raw(5_000, "pexit", "sched_process_exit", pid=100, group_dead=True),
    ]
    return translate(raws, snaps, fds, tgid_of={102: 100}, keep_alive=keep_alive)


def test_translation_of_a_recorded_run() -> None:
    events, files, stats = scenario()
    ops = [(e["t_ms"], e["op"], {k: v for k, v in e.items() if k not in ("t_ms", "op")}) for e in events]
    assert ops == [
        (0, "file_create", {"name": "app", "size": 0x3000, "shmem": False}),
        (0, "file_create", {"name": "libx.so", "size": 0x9000, "shmem": False}),
        (0.0, "spawn", {"pid": 100}),
        (0.0, "mmap", {"pid": 100, "addr": 0x400000, "length": 0x1000, "name": "app", "offset": 0, "prot": "r", "shared": False}),
        (0.0, "mmap", {"pid": 100, "addr": 0x401000, "length": 0x2000, "name": "app", "offset": 0x1000, "prot": "rx", "shared": False}),
        (0.0, "madvise", {"pid": 100, "addr": 0x401000, "length": 0x2000, "advice": "hugepage"}),
        (0.5, "fault", {"pid": 100, "addr": 0x401000, "write": False}),
        (1.01, "mmap", {"pid": 100, "addr": LIB, "length": 0x4000, "name": "libx.so", "offset": 0x2000, "prot": "rwx", "shared": False}),
        (1.1, "fault", {"pid": 100, "addr": LIB + 0x1000, "write": True}),
        (1.3, "madvise", {"pid": 100, "addr": LIB, "length": 0x2000, "advice": "hugepage"}),  # clipped to the mapping
        (1.41, "munmap", {"pid": 100, "addr": 0x402000, "length": 0x1000}),
        (2.0, "fork", {"pid": 100, "child": 101}),
        (2.1, "fault", {"pid": 101, "addr": 0x401000, "write": False}),
        (2.2, "fault", {"pid": 100, "addr": 0x400000, "write": False}),  # a thread's fault is its process's
        (2.3, "munmap", {"pid": 101, "addr": LIB, "length": 0x4000}),
        (3.1, "exit", {"pid": 101}),
        (4.0, "exit", {"pid": 100}),
    ]
    assert files["libx.so"] == {"path": "/lib/libx.so", "dev": "fe:00", "inode": 20, "shmem": False,
                                "deleted": False, "size": 0x9000}
    assert stats["faults"] == 6 and stats["faults_in_file_mappings"] == 4
    assert stats["faults_before_exec"] == 1 and stats["faults_elsewhere"] == 1
    assert stats["lost_events"] == 3 and stats["prot_widened"] == 1
    # The whole thing is a valid trace that replays without a refusal.
    trace = loads_trace(dumps_trace(events))
    res = replay(trace, CheckedWorld(Knobs()))
    assert res.counts["errors"] == {} and set(res.counts["faults"]) <= {"major", "minor", "hit"}


def test_translation_keep_alive_and_late_names() -> None:
    events, _, stats = scenario(keep_alive=True, fd_known=False)
    assert not any(e["op"] == "exit" for e in events)
    # The fd could not be read: the exit snapshot named the mapping (same address, same offset).
    assert any(e["op"] == "mmap" and e["name"] == "libx.so" for e in events)
    assert stats["mmap_resolved_late"] == 1
    with pytest.raises(RecordError, match="no exec"):
        translate([], [])


def test_translation_of_mremap() -> None:
    """mremap of a file mapping is ``mremap`` with the call's own arguments (old and new length,
    MREMAP_MAYMOVE/FIXED/DONTUNMAP); where the kernel moved it, MREMAP_FIXED at the address it
    returned, since the model would choose its own. The mapping's new place is followed (faults
    there are in the file), a failed call does nothing, and an anonymous mapping moved over a
    file mapping unmaps it. The trace replays to the same layout."""
    lib2, lib3, anon = LIB + 0x100000, LIB + 0x200000, 0x7E0000000000
    snaps = [Snapshot(1_000, 100, "exec", parse_smaps(EXEC_SMAPS))]
    fds = [FdInfo(1_990, 100, 3, "/lib/libx.so", 0xFE, 0, 20, 0x9000)]
    raws = [
        raw(2_000, "enter", "mmap", addr=0, len=0x4000, prot=1, flags=1, fd=3, off=0x2000),
        raw(2_010, "exit", "mmap", ret=LIB),
        raw(2_100, "enter", "mremap", addr=LIB, old_len=0x4000, new_len=0x2000, flags=0, new_addr=0),
        raw(2_110, "exit", "mremap", ret=LIB),  # shrunk in place
        raw(2_200, "enter", "mremap", addr=LIB, old_len=0x2000, new_len=0x6000, flags=1, new_addr=0),
        raw(2_210, "exit", "mremap", ret=lib2),  # grown by a move
        raw(2_300, "fault", "page_fault_user", address=lib2 + 0x5000, error_code=4),
        raw(2_310, "fault", "page_fault_user", address=LIB + 0x1000, error_code=4),  # gone from here
        raw(2_400, "enter", "mremap", addr=lib2, old_len=0x1000, new_len=0x3000, flags=1, new_addr=0),
        raw(2_410, "exit", "mremap", ret=-12),  # ENOMEM: nothing
        raw(2_500, "enter", "mremap", addr=lib2, old_len=0x2000, new_len=0x2000, flags=7, new_addr=lib3),
        raw(2_510, "exit", "mremap", ret=lib3),  # MREMAP_DONTUNMAP: the old VMA stays
        raw(2_600, "enter", "mremap", addr=anon, old_len=0x1000, new_len=0x1000, flags=3, new_addr=lib3),
        raw(2_610, "exit", "mremap", ret=lib3),  # an anonymous page over the file mapping
        raw(2_700, "fault", "page_fault_user", address=lib3 + 0x1000, error_code=4),
    ]
    events, _, stats = translate(raws, snaps, fds)
    ops = [(e["op"], {k: v for k, v in e.items() if k not in ("t_ms", "op")}) for e in events
           if e["op"] in ("mremap", "munmap", "fault")]
    assert ops == [
        ("mremap", {"pid": 100, "addr": LIB, "old_length": 0x4000, "new_length": 0x2000, "to": None,
                    "maymove": False, "dontunmap": False}),
        ("mremap", {"pid": 100, "addr": LIB, "old_length": 0x2000, "new_length": 0x6000, "to": lib2,
                    "maymove": True, "dontunmap": False}),
        ("fault", {"pid": 100, "addr": lib2 + 0x5000, "write": False}),
        ("mremap", {"pid": 100, "addr": lib2, "old_length": 0x2000, "new_length": 0x2000, "to": lib3,
                    "maymove": True, "dontunmap": True}),
        ("munmap", {"pid": 100, "addr": lib3, "length": 0x1000}),
        ("fault", {"pid": 100, "addr": lib3 + 0x1000, "write": False}),
    ]
    assert stats["mremap_of_file_mapping"] == 3 and stats["faults_elsewhere"] == 1
    assert next(e for e in events if e["op"] == "file_create" and e["name"] == "libx.so")["size"] == 0x9000
    world = CheckedWorld(Knobs())
    res = replay(loads_trace(dumps_trace(events)), world)
    assert res.counts["errors"] == {}
    assert [(e["start"], e["end"]) for e in world.smaps(100) if e["start"] >= LIB] == [
        (lib2, lib2 + 0x6000), (lib3 + 0x1000, lib3 + 0x2000)]


# -- recording for real -----------------------------------------------------------------------

REASON = rec.unavailable()
needs_root = pytest.mark.skipif(REASON is not None, reason=f"record cannot run here: {REASON}")


@contextlib.contextmanager
def tracefs_view():
    """tracefs mounted for a look (unmounted again if it was not)."""
    path = rec.TRACEFS
    mounted = rec._tracefs_mounted(path)
    libc = rec._libc()
    if not mounted:
        assert libc.mount(b"nodev", str(path).encode(), b"tracefs", 0, None) == 0
    try:
        yield path
    finally:
        if not mounted:
            assert libc.umount2(str(path).encode(), 0) == 0


def our_instances() -> list[str]:
    with tracefs_view() as path:
        return sorted(p.name for p in (path / "instances").iterdir() if p.name.startswith(rec.INSTANCE_PREFIX))


@pytest.fixture
def clean_tracefs():
    """Each recording test must leave tracefs as it found it: mounted or not, no instance of ours."""
    before_mounted = rec._tracefs_mounted(rec.TRACEFS)
    before = our_instances()
    yield
    assert rec._tracefs_mounted(rec.TRACEFS) == before_mounted
    assert our_instances() == before == []


def replay_checked(trace, timing="original"):
    """Replay into a CheckedWorld that runs the invariant checker after every 5th event and at
    the end (after every step, a real command's hundreds of faults over dozens of libraries
    take seconds)."""
    world = CheckedWorld(Knobs())
    world._checking = False
    res = replay(trace, world, timing, progress=lambda i, _: i % 5 == 0 and world.check())
    world.check()
    return res


@pytest.fixture
def devnull():
    fd = os.open(os.devnull, os.O_WRONLY)
    yield fd
    os.close(fd)


@needs_root
def test_record_a_python_and_replay_it(clean_tracefs, devnull) -> None:
    result = rec.record([sys.executable, "-c", "import json, decimal"], stdout=devnull)
    assert result.exit_status == 0 and result.warnings == []
    trace = loads_trace(dumps_trace(result.trace.events, result.trace.header))  # validates
    assert trace.header["source"] == "record" and trace.header["clock"] == "real"
    files = trace.header["meta"]["files"]
    paths = {f["path"] for f in files.values()}
    assert os.path.realpath(sys.executable) in paths
    assert any("_decimal" in p for p in paths)  # mmap'd by the dynamic loader at import time
    faults = [e for e in trace.events if e["op"] == "fault"]
    assert len(faults) > 50 and result.stats["faults_in_file_mappings"] == len(faults)
    assert result.stats["lost_events"] == 0 and result.stats.get("mmap_unresolved", 0) == 0
    res = replay_checked(trace)
    assert res.counts["errors"] == {} and res.counts["pending"] == 0
    assert set(res.counts["faults"]) <= {"major", "minor", "hit"}
    assert sum(res.counts["faults"].values()) == len(faults)


@needs_root
def test_record_follows_children_and_threads(clean_tracefs, devnull) -> None:
    script = "import os, threading; t = threading.Thread(target=len, args=([],)); t.start(); t.join(); os.system('/bin/true')"
    result = rec.record([sys.executable, "-c", script], stdout=devnull, keep_alive=True)
    ops = [e["op"] for e in result.trace.events]
    assert ops.count("fork") >= 2  # the shell, and /bin/true under it (threads are not forks)
    assert ops.count("spawn") >= 3  # python, then each child's exec: a new image
    assert "exit" in ops  # the exec'd children's old images; with keep_alive, no process exits
    spawned = {e["pid"] for e in result.trace.events if e["op"] == "spawn"}
    assert any(e["op"] == "fault" and e["pid"] != result.trace.events[ops.index("spawn")]["pid"] and e["pid"] in spawned
               for e in result.trace.events)
    res = replay_checked(loads_trace(dumps_trace(result.trace.events, result.trace.header)), "fast")
    assert res.counts["errors"] == {}


@needs_root
def test_record_cleans_up_after_failures(clean_tracefs, devnull) -> None:
    with pytest.raises(RecordError, match="No such file or directory"):
        rec.record(["/nonexistent/command"])
    result = rec.record(["sleep", "10"], timeout_s=0.3)
    assert result.exit_status == -9
    assert any(e["op"] == "spawn" for e in result.trace.events)


def test_record_refuses_without_a_command() -> None:
    with pytest.raises(RecordError, match="no command"):
        rec.record([])
    if REASON is not None:
        with pytest.raises(RecordError, match=REASON[:20]):
            rec.record(["true"])


@needs_root
def test_the_cli(clean_tracefs, tmp_path: Path, capfd) -> None:
    out = tmp_path / "ls.jsonl"
    assert rec.main(["-o", str(out), "--", "/bin/ls", str(tmp_path)]) == 0
    err = capfd.readouterr().err
    assert "in file mappings" in err
    trace = loads_trace(out.read_text())
    assert any(e["op"] == "fault" for e in trace.events)
    assert rec.main(["-o", str(out), "--", "/nonexistent"]) == 1
    assert "No such file" in capfd.readouterr().err


def test_libc_helpers_are_loadable() -> None:
    libc = rec._libc()
    assert isinstance(libc, ctypes.CDLL)
    prog, buf = rec._seccomp_program()
    assert prog.len == 7 and len(buf.raw) == 7 * 8  # struct sock_filter: 8 bytes each
