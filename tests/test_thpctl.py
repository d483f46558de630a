"""thpctl against real daemons: every command's output, --json, errors, and run scripts."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio
from helpers import ONE_PAGE_FLAGS, ok, thpctl

from shared.thpctl.cli import amain
from shared.thpctl.launch import running_daemons

MB = 1 << 20


@pytest.fixture
async def d(tmp_path: Path):
    # sun_path holds 108 bytes: a long test name in tmp_path could overflow it.
    short = len(str(tmp_path / "collapsed.sock")) < 100
    workdir = tmp_path if short else Path(tempfile.mkdtemp(prefix="thp-"))
    async with running_daemons(workdir, "unix", remapd_args=ONE_PAGE_FLAGS) as daemons:
        yield daemons
    if not short:
        shutil.rmtree(workdir, ignore_errors=True)


async def fails(d, *argv: str, status: int = 1) -> tuple[str, str]:
    got, out, err = await thpctl(d, *argv)
    assert got == status, (argv, out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return out, err


def run_thpctl(d, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.thpctl", *d.thpctl_args, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def setup_mapping(d, size: str = "4M", prot: str = "rx") -> int:
    await ok(d, "file", "create", "lib", "--size", size)
    await ok(d, "proc", "spawn", "1")
    return int(await ok(d, "mmap", "1", "auto", size, "--file", "lib", "--prot", prot, "--private"), 16)


async def test_bad_input_is_one_line_on_stderr_and_a_nonzero_exit(d):
    # Through the console entry point: no traceback ever reaches the terminal.
    p = await trio.to_thread.run_sync(lambda: run_thpctl(d, "proc", "exit", "99"))
    assert (p.returncode, p.stdout, p.stderr) == (1, "", "thpctl proc exit: ESRCH: no process 99\n")
    p = await trio.to_thread.run_sync(lambda: run_thpctl(d, "file", "create", "x", "--size", "12Q"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "invalid size value: '12Q'" in p.stderr
    p = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "shared.thpctl", "--collapsed", "unix:/nonexistent/c.sock", "file", "ls"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    )
    assert p.returncode == 1 and p.stderr.startswith("thpctl file ls: ECONNREFUSED: cannot reach collapsed at unix:/nonexistent/c.sock")
    assert p.stderr.count("\n") == 1

    await ok(d, "proc", "spawn", "1")
    _, err = await fails(d, "mmap", "1", "auto", "2M", "--file", "nope")
    assert err == "thpctl mmap: ENOENT: no file 'nope'\n"
    _, err = await fails(d, "proc", "spawn", "1")
    assert "EEXIST" in err
    _, err = await fails(d, "munmap", "1", "lots", "4K", status=2)
    assert "invalid address value: 'lots'" in err
    _, err = await fails(d, "touch", "1", "0", "4K", "--stride", "0")
    assert "EINVAL" in err
    _, err = await fails(d, "lock", "5", "--hold", "10")
    assert "ESRCH" in err
    _, err = await fails(d, "nosuchcommand", status=2)
    assert "invalid choice" in err


async def test_mmap_prints_the_address_and_json_the_document(d):
    addr = await setup_mapping(d)
    assert addr % (2 * MB) == 0
    doc = json.loads(await ok(d, "--json", "mmap", "1", "0x600000000000", "2M", "--file", "lib", "--offset", "2M"))
    assert doc == {"addr": 0x600000000000, "length": 2 * MB}
    smaps = json.loads(await ok(d, "--json", "smaps", "1"))
    assert [(e["start"], e["offset"], e["perms"]) for e in smaps] == [
        (0x600000000000, 2 * MB, "r--s"),
        (addr, 0, "r-xp"),
    ]
    # The name starts in column 74, as in the kernel's (64-bit) maps and smaps.
    prefix = "600000000000-600000200000 r--s 00200000 fe:01 1"
    assert (await ok(d, "smaps", "1")).splitlines()[0] == prefix + " " * (73 - len(prefix)) + "/thpsplit/lib"
    await ok(d, "munmap", "1", "0x600000000000", "2M")
    assert len(json.loads(await ok(d, "--json", "smaps", "1"))) == 1


async def test_fault_and_touch_print_outcomes(d):
    addr = await setup_mapping(d)
    assert await ok(d, "touch", "1", hex(addr), "4M", "--stride", "2M") == "major 2\n"
    assert await ok(d, "touch", "1", hex(addr), "4M") == "hit 2\nmajor 1022\n"
    assert await ok(d, "fault", "1", hex(addr + 4096)) == "hit\n"
    # Writing to a read-only mapping.
    out, err = await fails(d, "--json", "touch", "1", hex(addr), "8K", "--write")
    assert json.loads(out) == {"sigsegv": 2} and err == "thpctl touch: 2 SIGSEGV in process 1\n"
    out, err = await fails(d, "fault", "1", "0x1000")
    assert out == "sigsegv\n" and err == "thpctl fault: SIGSEGV at 0x1000 in process 1\n"
    # A mapping longer than its file: SIGBUS past the end.
    await ok(d, "file", "create", "half", "--size", "1M")
    b = int(await ok(d, "mmap", "1", "auto", "2M", "--file", "half"), 16)
    out, err = await fails(d, "touch", "1", hex(b), "2M", "--stride", "512K")
    assert out == "major 2\nsigbus 2\n" and "2 SIGBUS in process 1" in err


async def test_madvise_prints_zero_or_the_errno(d):
    addr = await setup_mapping(d)
    assert await ok(d, "madvise", "1", hex(addr), "4M", "hugepage") == "0\n"
    await ok(d, "touch", "1", hex(addr), "4M")
    assert await ok(d, "madvise", "1", hex(addr), "4M", "collapse") == "0\n"
    smaps = json.loads(await ok(d, "--json", "smaps", "1"))
    assert smaps[0]["FilePmdMapped"] == 4096 and smaps[0]["VmFlags"].split()[-1] == "hg"
    out, err = await fails(d, "madvise", "1", hex(addr + 1), "4K", "hugepage")
    assert out == "EINVAL\n" and "page-aligned" in err
    out, _ = await fails(d, "--json", "madvise", "9", hex(addr), "4K", "dontneed")
    assert json.loads(out) == {"result": "ESRCH"}
    # A range with a hole in it: the advice is applied, and the hole is ENOMEM (no stderr line).
    status, out, err = await thpctl(d, "madvise", "1", hex(addr - 4096), "8K", "nohugepage")
    assert (status, out, err) == (1, "ENOMEM\n", "")


async def test_mprotect_mlock_munlock_mremap_print_zero_the_address_or_the_errno(d):
    addr = await setup_mapping(d, prot="rw")
    assert await ok(d, "mprotect", "1", hex(addr), "2M", "r") == "0\n"
    assert await ok(d, "mlock", "1", hex(addr + 1), "8K", "--onfault") == "0\n"
    smaps = json.loads(await ok(d, "--json", "smaps", "1"))
    assert [e["perms"] for e in smaps] == ["r--p", "r--p", "rw-p"]
    assert smaps[0]["VmFlags"] == "rd mr mw me lo lf ac" and smaps[0]["end"] == addr + 12288  # the range widened to whole pages
    assert await ok(d, "munlock", "1", hex(addr), "4M") == "0\n"
    # An errno the call returns is its result: printed, exit 1, nothing on stderr.
    assert await thpctl(d, "mlock", "1", hex(addr + (8 << 20)), "4K") == (1, "ENOMEM\n", "")
    out, err = await fails(d, "mprotect", "1", hex(addr + 1), "4K", "r")
    assert out == "EINVAL\n" and "page-aligned" in err
    to = addr - (8 << 20)
    assert await ok(d, "mremap", "1", hex(addr), "4M", "4M", "--to", hex(to)) == f"{to:#x}\n"
    assert await thpctl(d, "mremap", "1", hex(addr), "4M", "8M") == (1, "EFAULT\n", "")
    assert json.loads(await ok(d, "--json", "mremap", "1", hex(to), "4M", "2M")) == {"result": 0, "addr": to}


async def test_proc_file_pin_lock_uprobe_commands(d):
    addr = await setup_mapping(d)
    await ok(d, "touch", "1", hex(addr), "4M")
    pin = await ok(d, "pin", "1", hex(addr + 8192 + 5))
    assert pin.startswith(f"pid 1 addr {addr + 8192:#x} pfn 0x")
    assert (await ok(d, "unpin", "1", hex(addr + 8192))) == pin
    _, err = await fails(d, "unpin", "1", hex(addr + 8192))
    assert "EINVAL: no pin at" in err
    assert (await ok(d, "lock", "1", "--hold", "1")).startswith("pid 1 mmap lock held for read until ")
    assert await ok(d, "uprobe", "add", "lib", "0x1234") == "lib+0x1234 mappings 1\n"
    assert json.loads(await ok(d, "--json", "smaps", "1"))[0]["Anonymous"] == 4
    _, err = await fails(d, "uprobe", "add", "lib", "0x1234")
    assert "EEXIST" in err
    await ok(d, "uprobe", "del", "lib", "0x1234")
    assert json.loads(await ok(d, "--json", "proc", "fork", "1", "2")) == {"pid": 2, "parent": 1}
    assert len(json.loads(await ok(d, "--json", "smaps", "2"))) == 1
    await ok(d, "proc", "exit", "2")
    _, err = await fails(d, "smaps", "2")
    assert "ESRCH" in err

    await ok(d, "file", "create", "data", "--size", "1M")
    assert (await ok(d, "file", "write", "data", "0", "8K")).split()[-6:] == ["swap", "0", "dirty", "2", "writers", "0"]
    dropped = json.loads(await ok(d, "--json", "file", "drop-caches"))["dropped_pages"]
    assert dropped == 0  # "data" is dirty, "lib" is mapped
    assert " dirty 0 " in await ok(d, "file", "sync", "data")
    # truncate waits for the writeback sync started (writeback_millisecs) on the cut page.
    truncated = (await ok(d, "file", "truncate", "data", "4K")).split()
    assert truncated[3:5] == ["size", "4096"] and truncated[6:8] == ["nrpages", "1"]
    ls = (await ok(d, "file", "ls")).splitlines()
    assert [row.split()[0] for row in ls] == ["NAME", "data", "lib"]


async def test_vmstat_is_the_union_of_both_daemons_and_meminfo_the_kernels_format(d):
    addr = await setup_mapping(d)
    await ok(d, "touch", "1", hex(addr), "1M")
    vmstat = json.loads(await ok(d, "--json", "vmstat"))
    assert (vmstat["pgfault"], vmstat["pgmajfault"], vmstat["nr_file_pages"]) == (256, 256, 256)
    text = (await ok(d, "vmstat")).splitlines()
    names = [line.split()[0] for line in text]
    # /proc/vmstat order: node stats, then pswpin before pgfault, THP events in kernel order.
    assert names.index("nr_file_pages") < names.index("pswpin") < names.index("pgfault") < names.index("thp_collapse_alloc")
    assert "pgfault 256" in text
    meminfo = await ok(d, "meminfo")
    assert "Cached:             1024 kB\n" in meminfo and "FileHugePages:         0 kB\n" in meminfo


async def test_sysfs_get_prints_like_the_kernel(d):
    assert await ok(d, "sysfs", "get", "defrag") == "always defer defer+madvise [madvise] never\n"
    everything = await ok(d, "sysfs", "get")
    assert "khugepaged/full_scans:" in everything and "thpsplit/retry_policy:[per-pmd] " in everything
    doc = json.loads(await ok(d, "--json", "sysfs", "get"))
    assert doc["khugepaged/max_ptes_none"] == 511 and doc["enabled"] == "madvise"
    assert json.loads(await ok(d, "--json", "sysfs", "set", "khugepaged/pages_to_scan", "8")) == {
        "khugepaged/pages_to_scan": 8
    }
    out, err = await fails(d, "sysfs", "set", "shmem_enabled", "sometimes")
    assert out == "" and err.startswith("thpctl sysfs set: EINVAL: shmem_enabled: 'sometimes' is not one of")


async def test_wait_scans_returns_after_n_passes_or_times_out(d):
    out, err = await fails(d, "wait-scans", "3", "--timeout", "0.2")
    assert err == "thpctl wait-scans: ETIMEDOUT: khugepaged did not finish 3 full scans within 0.2 s\n"
    await setup_mapping(d)  # a registered range: khugepaged has an mm to scan now
    await ok(d, "sysfs", "set", "khugepaged/scan_sleep_millisecs", "5")
    before = json.loads(await ok(d, "--json", "sysfs", "get", "khugepaged/full_scans"))["khugepaged/full_scans"]
    doc = json.loads(await ok(d, "--json", "wait-scans", "3", "--timeout", "20"))
    assert doc["khugepaged/full_scans"] >= before + 3


async def test_run_pipelines_a_script_in_order(d, tmp_path):
    script = tmp_path / "demo.thp"
    script.write_text(
        "# set up a library mapped twice\n"
        "file create lib --size 2M\n"
        "proc spawn 1\n"
        "proc spawn 2\n"
        "mmap 1 0x600000000000 2M --file lib --prot rx --private\n"
        "mmap 2 0x600000000000 2M --file lib --prot rx --private\n"
        "\n"
        "touch 1 0x600000000000 2M   # reads every page\n"
        "touch 2 0x600000000000 2M\n"
        "meminfo\n"
        "madvise 1 0x600000000000 2M collapse\n"
        "smaps 2\n"
    )
    out = await ok(d, "run", str(script))
    lines = out.splitlines()
    assert lines[:6] == [
        "lib ino 1 size 2097152 file nrpages 0 thps 0 swap 0 dirty 0 writers 0",
        "0x600000000000",
        "0x600000000000",
        "major 512",
        "minor 512",
        "Cached:             2048 kB",
    ]
    assert lines[lines.index("Cached:             2048 kB") :].count("0") == 1  # madvise's result
    assert "FilePmdMapped:      2048 kB" in lines


async def test_run_json_and_stop_at_the_first_failure(d, tmp_path):
    script = tmp_path / "s.thp"
    script.write_text("proc spawn 3\nproc spawn 3\nfile create late --size 4K\n")
    status, out, err = await thpctl(d, "--json", "run", str(script))
    assert status == 1
    assert json.loads(out) == [{"pid": 3}, {"error": {"errno": "EEXIST", "message": "process 3 exists"}}]
    assert err == "thpctl run: line 2: proc spawn: EEXIST: process 3 exists\n"
    # The failure came before the switch to collapsed: line 3 never ran.
    assert json.loads(await ok(d, "--json", "file", "ls")) == []
    status, out, err = await thpctl(d, "run", "--keep-going", str(script))
    assert status == 1 and err.count("EEXIST") == 2 and out.startswith("late ino 1 ")

    # A line that does not parse stops the run before anything is sent.
    script.write_text("file create early --size 4K\nmmap 1 auto\n")
    status, out, err = await thpctl(d, "run", str(script))
    assert (status, out) == (2, "") and err.startswith("thpctl run: line 2: thpctl mmap: ")
    assert [f["name"] for f in json.loads(await ok(d, "--json", "file", "ls"))] == ["late"]


async def test_run_reads_stdin_through_the_entry_point(d):
    p = await trio.to_thread.run_sync(
        lambda: run_thpctl(d, "run", "-", stdin="file create s --size 8K --shmem\nsysfs get enabled\nvmstat\n")
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("s ino 1 size 8192 shmem nrpages 0 ")
    assert "always [madvise] never\n" in p.stdout and "\nthp_file_alloc 0\n" in p.stdout


async def test_file_punch_drops_whole_pages_and_keeps_the_size(d):
    await ok(d, "file", "create", "p", "--size", "64K")
    await ok(d, "file", "write", "p", "0", "64K")
    stat = json.loads(await ok(d, "--json", "file", "punch", "p", "4K", "10K"))
    # [4K, 14K) holds two whole pages (4K..12K); the page at 12K..16K is only partly covered.
    assert (stat["nrpages"], stat["size"]) == (14, 65536)


async def test_experiment_runs_in_process_and_shows_kirills_objection():
    # No daemon is needed: the policies run on the model's virtual clock.
    out, err = io.StringIO(), io.StringIO()
    argv = ["--json", "experiment", "--procs", "2", "--size", "8M", "--busy", "1", "--policies", "per-pmd,per-mapping,none"]
    assert await amain(argv, out, err) == 0, err.getvalue()
    rows = {row["policy"]: row for row in json.loads(out.getvalue())}
    assert rows["per-pmd"]["pmd_mapped_total"] == rows["per-pmd"]["possible"] == 8
    # The busy process's 4 ranges: per-mapping's one bit recovers fewer, none recovers nothing.
    assert rows["none"]["pmd_mapped_total"] == 4
    assert 4 < rows["per-mapping"]["pmd_mapped_total"] < 8
    assert await amain(["experiment", "--busy", "3", "--procs", "2"], out, err) == 2
    assert err.getvalue().count("\n") == 1
