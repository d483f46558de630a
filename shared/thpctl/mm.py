"""thpctl mmap/munmap/mremap/madvise/mprotect/mlock/munlock/fault/touch/lock/pin/unpin/uprobe:
address spaces (remapd)."""

from __future__ import annotations

import argparse
from typing import Any

from shared.errors import UserError
from shared.protocol import messages as m
from shared.thpctl.cli import (
    EXIT_FAIL,
    REMAPD,
    Outcome,
    Plan,
    Request,
    address,
    command,
    failed,
    lines,
    milliseconds,
    ok,
    req,
    size,
)
from shared.units import parse_size
from shared.vm import Advice, Prot

# Plain strings: argparse quotes the choices with repr() in its errors.
ADVICE = tuple(a.value for a in Advice)
PROTS = tuple(p.value for p in Prot)
# touch prints its outcome counts in this order.
OUTCOMES = ("hit", "minor", "major", "pmd", "sigsegv", "sigbus")
SIGNALS = ("sigsegv", "sigbus")


def address_or_auto(text: str) -> int | None:
    return None if text == "auto" else parse_size(text)


address_or_auto.__name__ = "address"


def _render_mmap(args: argparse.Namespace, results: list[Any]) -> Outcome:
    return ok(results[0], lines(f"{results[0]['addr']:#x}"))


def _render_result(args: argparse.Namespace, results: list[Any]) -> Outcome:
    """A syscall's 0 or errno name (madvise, mprotect, ...): printed, and exit 1 for an errno."""
    result = results[0]["result"]
    out = Outcome(data=results[0], text=lines(str(result)))
    if result != 0:
        out.status = EXIT_FAIL
    return out


def _render_mremap(args: argparse.Namespace, results: list[Any]) -> Outcome:
    r = results[0]
    if r["result"] != 0:
        out = Outcome(data=r, text=lines(str(r["result"])))
        out.status = EXIT_FAIL
        return out
    return ok(r, lines(f"{r['addr']:#x}"))


def _errno_error(args: argparse.Namespace, err: UserError) -> Outcome:
    # The syscall answers bad arguments with an errno too: print it as the result.
    return failed(err, {"result": err.errno_name}, lines(err.errno_name))


def _render_fault(args: argparse.Namespace, results: list[Any]) -> Outcome:
    result = results[0]["result"]
    out = ok(results[0], lines(result))
    if result in SIGNALS:
        out.status = EXIT_FAIL
        out.error = f"{result.upper()} at {args.addr:#x} in process {args.pid}"
    return out


# touch sends a large range as chunks of this many accesses (the daemon runs them in order, so
# the faults are the same), which lets a terminal show progress as their replies come in.
TOUCH_CHUNK = 8192


def _plan_touch(args: argparse.Namespace) -> list[Request]:
    if args.stride <= 0:
        return [req(REMAPD, m.Touch, pid=args.pid, addr=args.addr, length=args.length, write=args.write, stride=args.stride)]
    chunk = TOUCH_CHUNK * args.stride
    return [
        req(
            REMAPD,
            m.Touch,
            pid=args.pid,
            addr=args.addr + off,
            length=min(chunk, args.length - off),
            write=args.write,
            stride=args.stride,
        )
        for off in range(0, max(args.length, 1), chunk)
    ]


def ordered_counts(counts: dict[str, int]) -> list[tuple[str, int]]:
    """A touch's outcome counts in the order of :data:`OUTCOMES`, then any others by name."""
    order = [o for o in OUTCOMES if o in counts] + sorted(set(counts) - set(OUTCOMES))
    return [(o, counts[o]) for o in order]


def _render_touch(args: argparse.Namespace, results: list[Any]) -> Outcome:
    counts: dict[str, int] = {}
    for chunk in results:
        for outcome, n in chunk.items():
            counts[outcome] = counts.get(outcome, 0) + n
    out = ok(counts, lines(*(f"{o} {n}" for o, n in ordered_counts(counts))))
    bad = {s: counts[s] for s in SIGNALS if counts.get(s)}
    if bad:
        out.status = EXIT_FAIL
        out.error = ", ".join(f"{n} {s.upper()}" for s, n in bad.items()) + f" in process {args.pid}"
    return out


def _render_lock(args: argparse.Namespace, results: list[Any]) -> Outcome:
    r = results[0]
    return ok(r, lines(f"pid {r['pid']} mmap lock held for {r['mode']} until {r['until_ms']:.1f} ms"))


def _render_pin(args: argparse.Namespace, results: list[Any]) -> Outcome:
    r = results[0]
    return ok(r, lines(f"pid {r['pid']} addr {r['addr']:#x} pfn {r['pfn']:#x}"))


def _render_uprobe(args: argparse.Namespace, results: list[Any]) -> Outcome:
    r = results[0]
    rest = {k: v for k, v in r.items() if k not in ("file", "offset")}
    detail = " ".join(f"{k} {','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in rest.items())
    return ok(r, lines(f"{r['file']}+{r['offset']:#x} {detail}".rstrip()))


def _plan_pin(cls: type[m.Pin | m.Unpin]) -> Plan:
    return lambda a: [req(REMAPD, cls, pid=a.pid, addr=a.addr)]


def register(sub: Any) -> None:
    p = command(
        sub,
        "mmap",
        "map LENGTH bytes of file NAME into PID at ADDR (auto: the kernel picks, 2M-aligned "
        "for 2M or more); prints the address",
        lambda a: [
            req(
                REMAPD,
                m.Mmap,
                pid=a.pid,
                addr=a.addr,
                length=a.length,
                name=a.file,
                offset=a.offset,
                prot=a.prot,
                shared=not a.private,
                reopen=a.reopen,
            )
        ],
        _render_mmap,
        "mmap 1 auto 4M --file libfoo.so --prot rx --private",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")
    p.add_argument("addr", type=address_or_auto, metavar="ADDR|auto", help="where to map (auto: the kernel picks)")
    p.add_argument("length", type=size, metavar="LENGTH", help="bytes from the start")
    p.add_argument("--file", required=True, metavar="NAME", help="the file to map")
    p.add_argument("--offset", type=size, default=0, metavar="OFF", help="file offset of the mapping")
    p.add_argument("--prot", choices=PROTS, default="r", help="protection (PROT_READ, +WRITE, +EXEC)")
    share = p.add_mutually_exclusive_group()
    share.add_argument("--shared", action="store_false", dest="private", help="MAP_SHARED (default)")
    share.add_argument("--private", action="store_true", dest="private", help="MAP_PRIVATE")
    p.set_defaults(private=False)
    p.add_argument(
        "--reopen",
        action="store_true",
        help="map a new open(2) of the file rather than the process's one open file of it "
        "(mappings of different opens never merge)",
    )

    p = command(
        sub,
        "munmap",
        "unmap [ADDR, ADDR+LENGTH) in PID",
        lambda a: [req(REMAPD, m.Munmap, pid=a.pid, addr=a.addr, length=a.length)],
        lambda a, r: ok(r[0]),
        "munmap 1 0x7effffc00000 2M",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")
    p.add_argument("addr", type=address, metavar="ADDR", help="virtual address")
    p.add_argument("length", type=size, metavar="LENGTH", help="bytes from the start")

    p = command(
        sub,
        "madvise",
        "madvise(2) on [ADDR, ADDR+LENGTH); prints 0 or the errno name (and exits 1)",
        lambda a: [req(REMAPD, m.Madvise, pid=a.pid, addr=a.addr, length=a.length, advice=a.advice)],
        _render_result,
        "madvise 1 0x7effffc00000 4M collapse",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")
    p.add_argument("addr", type=address, metavar="ADDR", help="virtual address")
    p.add_argument("length", type=size, metavar="LENGTH", help="bytes from the start")
    p.add_argument("advice", choices=ADVICE, metavar="|".join(ADVICE), help="MADV_* without the prefix")
    p.set_defaults(on_error=_errno_error)

    p = command(
        sub,
        "mprotect",
        "mprotect(2) on [ADDR, ADDR+LENGTH); prints 0 or the errno name (and exits 1)",
        lambda a: [req(REMAPD, m.Mprotect, pid=a.pid, addr=a.addr, length=a.length, prot=a.prot)],
        _render_result,
        "mprotect 1 0x7effffc00000 2M r",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")
    p.add_argument("addr", type=address, metavar="ADDR", help="virtual address")
    p.add_argument("length", type=size, metavar="LENGTH", help="bytes from the start")
    p.add_argument("prot", choices=PROTS, metavar="|".join(PROTS), help="the new protection")
    p.set_defaults(on_error=_errno_error)

    p = command(
        sub,
        "mremap",
        "mremap(2) [ADDR, ADDR+OLD) to NEW bytes (--to: MREMAP_FIXED there; --maymove; "
        "--dontunmap); prints the address or the errno name (and exits 1)",
        lambda a: [
            req(
                REMAPD,
                m.Mremap,
                pid=a.pid,
                addr=a.addr,
                old_length=a.old_length,
                new_length=a.new_length,
                to=a.to,
                maymove=a.maymove,
                dontunmap=a.dontunmap,
            )
        ],
        _render_mremap,
        "mremap 1 0x7effffc00000 2M 4M --maymove",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the process")
    p.add_argument("addr", type=address, metavar="ADDR", help="start of the mapping to remap (page aligned)")
    p.add_argument("old_length", type=size, metavar="OLD", help="its length (0: duplicate a shared mapping)")
    p.add_argument("new_length", type=size, metavar="NEW", help="the new length")
    p.add_argument("--to", type=address, default=None, metavar="ADDR", help="MREMAP_FIXED: move to ADDR")
    p.add_argument("--maymove", action="store_true", help="MREMAP_MAYMOVE")
    p.add_argument("--dontunmap", action="store_true", help="MREMAP_DONTUNMAP (keep the old mapping)")
    p.set_defaults(on_error=_errno_error)

    p = command(
        sub,
        "mlock",
        "mlock(2) [ADDR, ADDR+LENGTH) (faults it in), or mlock2(MLOCK_ONFAULT) with --onfault; "
        "prints 0 or the errno name (and exits 1)",
        lambda a: [req(REMAPD, m.Mlock, pid=a.pid, addr=a.addr, length=a.length, onfault=a.onfault)],
        _render_result,
        "mlock 1 0x7effffc00000 2M",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")
    p.add_argument("addr", type=address, metavar="ADDR", help="virtual address")
    p.add_argument("length", type=size, metavar="LENGTH", help="bytes from the start")
    p.add_argument("--onfault", action="store_true", help="MLOCK_ONFAULT: lock pages as they fault in")
    p.set_defaults(on_error=_errno_error)

    p = command(
        sub,
        "munlock",
        "munlock(2) [ADDR, ADDR+LENGTH); prints 0 or the errno name (and exits 1)",
        lambda a: [req(REMAPD, m.Munlock, pid=a.pid, addr=a.addr, length=a.length)],
        _render_result,
        "munlock 1 0x7effffc00000 2M",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")
    p.add_argument("addr", type=address, metavar="ADDR", help="virtual address")
    p.add_argument("length", type=size, metavar="LENGTH", help="bytes from the start")
    p.set_defaults(on_error=_errno_error)

    p = command(
        sub,
        "fault",
        "access ADDR in PID; prints hit, minor, major, pmd, sigsegv or sigbus",
        lambda a: [req(REMAPD, m.Fault, pid=a.pid, addr=a.addr, write=a.write)],
        _render_fault,
        "fault 1 0x7effffc00000 --write",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")
    p.add_argument("addr", type=address, metavar="ADDR", help="virtual address")
    p.add_argument("--write", action="store_true", help="a write access (default: a read)")

    p = command(
        sub,
        "touch",
        "access every STRIDE bytes of [ADDR, ADDR+LENGTH); prints the count of each outcome",
        _plan_touch,
        _render_touch,
        "touch 1 0x7effffc00000 4M --stride 4K",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")
    p.add_argument("addr", type=address, metavar="ADDR", help="virtual address")
    p.add_argument("length", type=size, metavar="LENGTH", help="bytes from the start")
    p.add_argument("--write", action="store_true", help="a write access (default: a read)")
    p.add_argument("--stride", type=size, default=4096, metavar="SIZE", help="bytes between two accesses")

    p = command(
        sub,
        "lock",
        "an application thread takes PID's mmap lock (read, or --write) and holds it MS "
        "milliseconds; returns once it has the lock",
        lambda a: [req(REMAPD, m.Lock, pid=a.pid, hold_ms=a.hold, write=a.write)],
        _render_lock,
        "lock 1 --hold 500 --write",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")
    p.add_argument("--hold", type=milliseconds, required=True, metavar="MS", help="how long to hold it")
    p.add_argument("--write", action="store_true", help="take it for write (default: read)")

    pins: tuple[tuple[str, type[m.Pin | m.Unpin], str], ...] = (
        ("pin", m.Pin, "pin_user_pages on the page at ADDR (faulting it in first)"),
        ("unpin", m.Unpin, "drop a pin taken by 'pin' at ADDR"),
    )
    for name, cls, help in pins:
        p = command(
            sub,
            name,
            help,
            _plan_pin(cls),
            _render_pin,
            f"{name} 1 0x7effffc01000",
        )
        p.add_argument("pid", type=int, metavar="PID", help="the modelled process")
        p.add_argument("addr", type=address, metavar="ADDR", help="virtual address")

    p = command(
        sub,
        "uprobe",
        "add or delete a uprobe at OFFSET in file NAME (a breakpoint in every executable "
        "private mapping of it)",
        lambda a: [req(REMAPD, m.Uprobe, action=a.action, name=a.name, offset=a.offset)],
        _render_uprobe,
        "uprobe add libfoo.so 0x1234",
    )
    p.add_argument("action", choices=("add", "del"), help="add or delete the breakpoint")
    p.add_argument("name", metavar="NAME", help="the file's name")
    p.add_argument("offset", type=size, metavar="OFFSET", help="byte offset in the file")
