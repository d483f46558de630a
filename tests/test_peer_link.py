"""The peer link and the driver around a stand-in core: what the shell does when the core refuses
a peer message (PeerError), and how it reports a core that stays busy while the peer is gone."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
import trio
import trio.testing

from shared.errors import PeerError
from shared.protocol import messages as m
from shared.protocol.schema import CLIENT, COLLAPSED, REMAPD, Message
from shared.shell import driver as driver_mod
from shared.shell import peer as peer_mod
from shared.shell import server as server_mod
from shared.shell.channel import open_channel
from shared.shell.driver import Driver
from shared.shell.peer import PeerLink
from shared.shell.server import Server


class RecordingLog:
    """Stands in for a module's structlog logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str):
        def record(event: str, **fields: Any) -> None:
            self.events.append((level, event, fields))

        return record

    def named(self, event: str) -> list[tuple[str, str, dict[str, Any]]]:
        return [e for e in self.events if e[1] == event]


@pytest.fixture
def logs(monkeypatch) -> RecordingLog:
    log = RecordingLog()
    for module in (driver_mod, peer_mod, server_mod):
        monkeypatch.setattr(module, "log", log)
    return log


class StandInCore:
    """Refuses MmExit of a negative pid as the collapser refuses a forged message."""

    def __init__(self) -> None:
        self.now = 0.0
        self.outbox: deque[Message] = deque()
        self.delivered: list[Message] = []
        self.lost = 0
        self.resynced = 0
        self.calls = 0

    def advance(self, now: float) -> None:
        self.now = max(self.now, now)

    def next_deadline(self) -> float | None:
        return None

    def spawn(self, gen: Any, done: Any = None, name: str = "") -> None:
        raise AssertionError("not used")

    def send(self, msg: Message) -> None:
        self.outbox.append(msg)

    def deliver(self, msg: Message) -> None:
        if isinstance(msg, m.MmExit) and msg.pid < 0:
            raise PeerError(f"mm_exit: pid {msg.pid} is no process")
        if isinstance(msg, m.MmExit) and msg.pid == 0:
            raise RuntimeError("a bug in the model")
        self.delivered.append(msg)

    def pending_calls(self) -> int:
        return self.calls

    def peer_lost(self) -> None:
        self.lost += 1
        self.outbox.clear()

    def resync(self) -> None:
        self.resynced += 1


async def test_a_peer_message_the_core_refuses_closes_that_peer_connection(logs):
    core = StandInCore()
    driver = Driver(core, COLLAPSED)
    link = PeerLink(driver, peer_role=REMAPD)
    server = Server(driver, link, {REMAPD, CLIENT}, {})
    ours, theirs = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._connection, ours)
            async with open_channel(theirs) as ch:
                await ch.handshake(REMAPD, {COLLAPSED})
                await ch.send(m.MmExit(7))
                await ch.send(m.MmExit(0))  # a bug in the core: logged, the link stays
                await ch.send(m.MmExit(-1))  # refused: the link goes
                await ch.send(m.MmExit(8))  # never delivered
                reply = await ch.receive()
                assert reply == m.ErrorReply(0, "EPROTO", "peer.mm_exit refused: mm_exit: pid -1 is no process")
                with pytest.raises(trio.EndOfChannel):
                    await ch.receive()
    assert core.delivered == [m.MmExit(7)]
    assert (core.resynced, core.lost) == (1, 1) and not driver.connected and link.channel is None
    assert [(level, e) for level, e, _ in logs.events if e in ("model_error", "protocol_error")] == [
        ("exception", "model_error"),
        ("warning", "protocol_error"),
    ]
    assert logs.named("protocol_error")[0][2]["errno"] == "EPROTO"


async def test_the_next_peer_after_a_refused_one_is_served_and_resynced(logs):
    core = StandInCore()
    driver = Driver(core, COLLAPSED)
    link = PeerLink(driver, peer_role=REMAPD)
    server = Server(driver, link, {REMAPD, CLIENT}, {})
    for pid in (-1, 5):
        ours, theirs = trio.testing.memory_stream_pair()
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server._connection, ours)
                async with open_channel(theirs) as ch:
                    await ch.handshake(REMAPD, {COLLAPSED})
                    await ch.send(m.MmExit(pid))
                    if pid < 0:
                        assert isinstance(await ch.receive(), m.ErrorReply)
                    else:
                        while core.delivered != [m.MmExit(5)]:
                            await trio.sleep(0.001)
    assert core.resynced == 2 and core.lost == 2


async def test_a_core_that_stays_busy_without_its_peer_is_reported_once_per_loss(logs):
    core = StandInCore()
    driver = Driver(core, REMAPD)
    core.calls = 1  # a retry loop that calls the absent peer again whenever it is answered
    for _ in range(50):
        driver.settle()
    assert [level for level, e, _ in logs.events if e == "peer_lost_not_quiet"] == ["warning"]
    # Once the peer is back and lost again, the next loss is reported again, once.
    driver.peer_connected()
    driver.peer_disconnected()
    for _ in range(50):
        driver.settle()
    assert len(logs.named("peer_lost_not_quiet")) == 2
    assert not [e for e in logs.events if e[0] == "error"]
