"""The peer link: the one channel between the two daemons, how the core's outbox gets onto it (from
the event that filled it while the channel is idle, else through a pump task), the barrier a reply
waits on, and the remapper's connect loop.

A new peer gets ``core.resync()``, which describes the whole state again; a lost one
``core.peer_lost()``. A reply to a client that made the core send something to the peer waits
for a round trip (a :class:`~shared.protocol.messages.Sync` over the peer channel) before it goes
out: once the client sees the reply, the other daemon has seen the operation's effects too, so a
client may switch daemons between two requests without racing the peer traffic.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import structlog
import trio

from shared.clip import clip
from shared.errors import PeerError
from shared.logs import get_logger
from shared.protocol import messages as m
from shared.protocol.codec import ProtocolError
from shared.protocol.schema import Message
from shared.shell.auth import Secrets
from shared.protocol.framing import MAX_BATCH_MESSAGES, batchable_body, encode_batch, encode_message
from shared.shell.channel import WRITE_BATCH_BYTES, Channel, ChannelError, open_channel, send_quietly
from shared.shell.config import parse_address
from shared.shell.driver import Driver
from shared.shell.transport import connect

log = get_logger("thpsplit.peer")

# Rows per RmapDelta (pfns per Reclaim) in one frame: unmapping or paging out gigabytes at once
# must not make a frame the peer refuses. Rows are additive, so a split changes nothing.
MAX_ROWS_PER_FRAME = m.MAX_RMAP_ROWS


def split_for_frames(msg: Message) -> list[Message]:
    if isinstance(msg, m.RmapDelta) and msg.nrows > MAX_ROWS_PER_FRAME:
        # Slices of each packed column (8-byte pfns, 4-byte deltas; an empty one stays empty).
        n = MAX_ROWS_PER_FRAME
        deltas = (msg.ptes, msg.pmds, msg.pins)
        return [
            m.RmapDelta(msg.pfns[8 * i : 8 * (i + n)], *(c[4 * i : 4 * (i + n)] for c in deltas))
            for i in range(0, msg.nrows, n)
        ]
    if isinstance(msg, m.Reclaim) and len(msg.pfns) > MAX_ROWS_PER_FRAME:
        pfns = msg.pfns
        # The splits (one head per 2 MiB at most) travel whole, with the first frame.
        return [
            m.Reclaim(pfns[i : i + MAX_ROWS_PER_FRAME], msg.split if i == 0 else ())
            for i in range(0, len(pfns), MAX_ROWS_PER_FRAME)
        ]
    return [msg]


# What split_for_frames may cut into several messages.
_SPLIT = frozenset((m.RmapDelta, m.Reclaim))
# A fault's lookups and their answers: the answer tells the lookup and all before it arrived.
_LOOKUPS = frozenset((m.LookupPage, m.LookupPages))
_ANSWERS = frozenset((m.PageAnswer, m.PageAnswers))


class PeerLink:
    """The driver's connection to the other daemon (at most one at a time)."""

    def __init__(self, driver: Driver, peer_role: str, on_connect: Callable[[], None] | None = None):
        self.driver = driver
        self.peer_role = peer_role
        self.on_connect = on_connect
        self.channel: Channel | None = None
        self._barriers: dict[int, trio.Event] = {}
        self._barrier_ids = itertools.count(1)
        # The fault lookups in flight: req -> the driver's ``sent`` count once it went out.
        self._lookups: dict[int, int] = {}
        driver.barrier_after = self.barrier_after
        driver.needs_barrier = self.needs_barrier
        driver.send_now = self.send_now

    # -- the barrier --------------------------------------------------------------------------

    def needs_barrier(self, mark: int) -> bool:
        """Whether the core has sent anything since ``mark`` that the peer is not known to have
        processed (a fault's lookup, once answered, is)."""
        driver = self.driver
        return self.channel is not None and driver.mark() > max(mark, driver.acked)

    async def barrier_after(self, mark: int) -> None:
        """Round trip through the peer if :meth:`needs_barrier`."""
        if self.needs_barrier(mark):
            await self.barrier()

    async def barrier(self, wait_for_peer: bool = False) -> bool:
        """Round trip through the peer: True once it has processed everything sent before.
        False if there is no peer (or it went away), unless ``wait_for_peer``: then wait for
        one and try again."""
        driver = self.driver
        while True:
            while self.channel is None:
                if not wait_for_peer:
                    return False
                await driver.changed()
            bid = next(self._barrier_ids)
            event = self._barriers[bid] = trio.Event()
            driver.core.send(m.Sync(bid))
            driver.settle()
            await event.wait()
            if self._barriers.pop(bid, None) is None:
                return True
            if not wait_for_peer:
                return False

    # -- the connection -----------------------------------------------------------------------

    async def serve(self, ch: Channel) -> None:
        """Run the peer connection until it ends; the hello is done."""
        driver = self.driver
        if self.channel is not None:
            raise ChannelError(f"a {self.peer_role} is already connected", "EBUSY")
        self.channel = ch
        ch.direct_writes = True
        self._lookups.clear()
        driver.peer_connected()
        log.info("peer_connected")
        try:
            if self.on_connect is not None:
                self.on_connect()
            driver.guard(driver.core.resync)
            driver.settle()
            # receive() awaited directly (not ``async for``): one coroutine fewer per message.
            receive = ch.receive
            while True:
                try:
                    msg = await receive()
                except trio.EndOfChannel:
                    break
                # The messages already read are taken together, and what they make the core
                # send goes out after them in one write (a frame of lookups, a frame of answers).
                driver.held = True
                try:
                    self._receive(msg)
                    while (more := ch.receive_nowait()) is not None:
                        self._receive(more)
                finally:
                    driver.held = False
                driver.flush()
        finally:
            self.channel = None
            driver.peer_disconnected()
            log.warning("peer_lost")
            driver.guard(driver.core.peer_lost)
            # Barriers still waiting stay in the table: their waiters see the peer went away.
            for event in self._barriers.values():
                event.set()
            driver.settle()

    def _receive(self, msg: Message) -> None:
        driver = self.driver
        if type(msg) in _ANSWERS:
            # Everything sent up to the lookup has been processed by the peer: a reply that
            # waits for that needs no barrier of its own (Driver.acked).
            seq = self._lookups.pop(msg.req, 0)  # type: ignore[attr-defined]
            if seq > driver.acked:
                driver.acked = seq
        try:
            if isinstance(msg, m.Sync):
                driver.core.send(m.Sync.REPLY(msg.id, None))
            elif isinstance(msg, m.Sync.REPLY):
                event = self._barriers.pop(msg.id, None)
                if event is not None:
                    event.set()
            elif isinstance(msg, m.ErrorReply):
                errno = clip(msg.errno, 32)
                raise ChannelError(f"{self.peer_role} refused: {errno}: {clip(msg.message)}", errno)
            elif not msg.TAG.startswith("peer.") or isinstance(msg, m.PeerHello):
                raise ChannelError(f"{msg.TAG} is not a peer message", reply_to=getattr(msg, "id", 0))
            else:
                try:
                    driver.deliver(msg)
                except PeerError as err:
                    # A forged or corrupt message: this peer is not trusted any more. Closing
                    # the connection answers what it held through peer_lost(); a peer that
                    # comes back is resynchronised from scratch.
                    raise ChannelError(f"{msg.TAG} refused: {clip(str(err))}", "EPROTO") from None
        finally:
            driver.settle()

    async def pump(self) -> None:
        """Move the core's outbox onto the peer channel when :meth:`send_now` could not: what
        the core queued while the channel was busy (every connection's lookups among it) goes
        out as one write of up to :data:`~shared.shell.channel.WRITE_BATCH_BYTES`."""
        driver = self.driver
        while True:
            peer = self.channel
            if peer is None or not driver.core.outbox:
                await driver.sendable()
                continue
            frames = self._take_frames()
            if not frames:
                continue
            try:
                await peer.send_frames(frames)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # serve() sees the end and calls peer_lost()

    def send_now(self) -> bool:
        """Write the core's outbox to an idle peer channel at once, from the event that filled
        it (no wake-up of the pump); True if nothing is left for the pump."""
        peer = self.channel
        if peer is None or not peer.idle():
            return False
        frames = self._take_frames()
        if frames:
            try:
                peer.send_frames_nowait(frames)  # an idle channel takes them whole
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # serve() sees the end and calls peer_lost()
        return not self.driver.core.outbox

    def _take_frames(self) -> list[bytes]:
        """Encode messages from the outbox, up to one write of
        :data:`~shared.shell.channel.WRITE_BATCH_BYTES`: small ones share frames
        (encode_batch), a large one is a frame of its own."""
        driver = self.driver
        outbox = driver.core.outbox
        lookups = self._lookups
        if len(outbox) == 1 and type(outbox[0]) not in _SPLIT:
            # One message (a strict fault's lookup, its answer): a frame of its own, the bytes a
            # batch of one would be, without the batch's depth walk.
            msg = outbox.popleft()
            driver.sent += 1
            if type(msg) in _LOOKUPS:
                lookups[msg.req] = driver.sent  # type: ignore[attr-defined]
            try:
                return [encode_message(msg)]
            except (ProtocolError, ValueError, TypeError, OverflowError):
                log.exception("unsendable_peer_message", tag=msg.TAG)
                return []
        frames: list[bytes] = []
        bodies: list[bytes] = []
        size = 0
        while outbox and size < WRITE_BATCH_BYTES:
            msg = outbox.popleft()
            driver.sent += 1
            if type(msg) in _LOOKUPS:
                lookups[msg.req] = driver.sent  # type: ignore[attr-defined]
            try:
                for part in split_for_frames(msg):
                    body = batchable_body(part)
                    if body is None:
                        if bodies:
                            frames.append(encode_batch(bodies))
                            bodies = []
                        frames.append(encode_message(part))
                        size += len(frames[-1])
                        continue
                    bodies.append(body)
                    size += len(body)
                    if len(bodies) == MAX_BATCH_MESSAGES:
                        frames.append(encode_batch(bodies))
                        bodies = []
            except (ProtocolError, ValueError, TypeError, OverflowError):
                log.exception("unsendable_peer_message", tag=msg.TAG)
        if bodies:
            frames.append(encode_batch(bodies))
        return frames


async def connect_peer(
    link: PeerLink, address: str, backoff_min_s: float, backoff_max_s: float, secrets: Secrets | None = None
) -> None:
    """The remapper's side of the peer channel: connect, and again after every loss, waiting
    twice as long after each failed attempt (up to ``backoff_max_s``). With a peer secret in
    ``secrets`` both sides prove it in the hello."""
    addr = parse_address(address)
    delay = backoff_min_s
    with structlog.contextvars.bound_contextvars(peer=str(addr)):
        while True:
            try:
                stream = await connect(addr)
            except OSError as err:
                log.debug("connect_failed", error=err.strerror or str(err), retry_s=delay)
                await trio.sleep(delay)
                delay = min(delay * 2, backoff_max_s)
                continue
            started = trio.current_time()
            async with open_channel(stream) as ch:
                try:
                    await ch.handshake(link.driver.name, accept={link.peer_role}, secrets=secrets)
                    await link.serve(ch)
                except ChannelError as err:
                    log.warning("peer_protocol_error", errno=err.errno, reason=err.reason)
                    await send_quietly(ch, err.reply())
                except trio.EndOfChannel:
                    pass
            if trio.current_time() - started > backoff_max_s:
                delay = backoff_min_s
            await trio.sleep(delay)
            delay = min(delay * 2, backoff_max_s)


__all__ = ["MAX_ROWS_PER_FRAME", "PeerLink", "connect_peer", "split_for_frames"]
