"""The protocol between the two actors and their clients (docs/protocol.md).

* :mod:`~shared.protocol.schema`: how a message, a request (with its reply class and its row in
  an actor's operation table) and a float range are declared; ``PROTOCOL_VERSION``.
* :mod:`~shared.protocol.messages`: every message, the enums of their closed sets, the typed
  results of the client requests.
* :mod:`~shared.protocol.codec`: messages to plain msgpack-able data and back, validated.
* :mod:`~shared.protocol.framing`: length-prefixed msgpack frames with hard limits.
"""

from __future__ import annotations

from shared.protocol.codec import ProtocolError, from_wire, to_wire
from shared.protocol.schema import (
    ACTORS,
    CLIENT,
    COLLAPSED,
    PROTOCOL_VERSION,
    REMAPD,
    Message,
    Op,
    Reply,
    Request,
)

__all__ = [
    "ACTORS",
    "CLIENT",
    "COLLAPSED",
    "PROTOCOL_VERSION",
    "REMAPD",
    "Message",
    "Op",
    "ProtocolError",
    "Reply",
    "Request",
    "from_wire",
    "to_wire",
]
