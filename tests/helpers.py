"""Small helpers the model tests share: geometry shorthands and views into the model's state."""

from __future__ import annotations

import io

from collapsed.pagecache import PG_HEAD
from shared.protocol import PROTOCOL_VERSION
from shared.protocol import messages as m
from shared.protocol.framing import FrameDecoder, encode_message
from shared.shell.auth import CONNECT, new_nonce, proof
from shared.thpctl.cli import amain
from shared.units import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SHIFT,
    HPAGE_PMD_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
)

P = PAGE_SIZE
H = HPAGE_PMD_SIZE
QUARTER = HPAGE_PMD_SIZE // 4
# A 2 MiB-aligned address well below where mmap(NULL) places things.
FIXED = 0x40000000
# Daemon tests count faults and pages one by one: readahead and fault-around off (remapd owns the
# knobs and pushes them to collapsed).
ONE_PAGE_FLAGS = ("--read-ahead-kb", "0", "--fault-around-bytes", "4096")
# khugepaged and the remapper both wake every TICK ms in the policy tests; HOLD spans two passes.
TICK = 1000
HOLD = 2500


def pte_at(world, pid: int, addr: int) -> int:
    """The PTE (or PMD entry) mapping ``addr`` in ``pid``, 0 if none."""
    entry = world.remapper.mms[pid].pmds.get(addr >> HPAGE_PMD_SHIFT)
    if entry is None or isinstance(entry, int):
        return entry or 0
    return entry.ptes[(addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)]


def cache_pfn(world, name: str, index: int) -> int:
    return world.collapser.by_name[name].get(index)


def smaps1(world, pid: int) -> dict:
    """The smaps entry of a process with exactly one VMA."""
    (entry,) = world.smaps(pid)
    return entry


def make_file_thp(world, name: str, size: int = 2 * H) -> int:
    """A regular file whose first 2 MiB is one PMD-order page in the page cache (MADV_COLLAPSE in a
    helper process that then exits); returns the THP's head pfn."""
    world.file_create(name, size)
    world.spawn(999)
    a = world.mmap(999, FIXED, H, name)
    world.touch(999, a, H, stride=64 * P)
    assert world.madvise(999, a, H, "collapse") == 0
    world.exit(999)
    head = cache_pfn(world, name, 0)
    assert world.collapser.mem.flags[head] & PG_HEAD
    assert world.collapser.mem.ref[head] == HPAGE_PMD_NR  # the cache's references only
    return head


async def thpctl(d, *argv: str) -> tuple[int, str, str]:
    """thpctl in-process against the daemons ``d`` (from running_daemons): status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    # A reply that never comes fails the test instead of hanging it.
    status = await amain([*d.thpctl_args, "--deadline", "30", *argv], out, err)
    return status, out.getvalue(), err.getvalue()


async def ok(d, *argv: str) -> str:
    status, out, err = await thpctl(d, *argv)
    assert (status, err) == (0, ""), (argv, out, err)
    return out


async def next_message(stream, decoder):
    """The next message on a raw stream, or None at end of stream."""
    while (msg := decoder.next_message()) is None:
        data = await stream.receive_some()
        if not data:
            return None
        decoder.feed(data)
    return msg


async def raw_hello(stream, role: str = "client", secret: bytes | None = None):
    """The hello of a raw connection, as a client (or ``role``) holding ``secret`` says it:
    returns (decoder, the daemon's hello or refusal, the daemon's peer.auth or refusal or None)."""
    nonce = new_nonce()
    await stream.send_all(encode_message(m.PeerHello(role, PROTOCOL_VERSION, nonce)))
    decoder = FrameDecoder()
    theirs = await next_message(stream, decoder)
    if not isinstance(theirs, m.PeerHello):
        return decoder, theirs, None
    mine = proof(secret, CONNECT, role, theirs.role, nonce, theirs.nonce) if secret is not None else ""
    await stream.send_all(encode_message(m.PeerAuth(mine)))
    return decoder, theirs, await next_message(stream, decoder)
