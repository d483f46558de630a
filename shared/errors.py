"""The one error type the model raises for bad input: an errno name and a one-line message."""

from __future__ import annotations


class UserError(Exception):
    """A request the model refuses (unknown pid, unmapped address, bad size, ...).

    Raised inside a model operation, it ends that operation only: the actor hands it to the
    operation's caller as the result, and the model is left as it was before the operation.
    """

    def __init__(self, errno_name: str, message: str):
        super().__init__(f"{errno_name}: {message}")
        self.errno_name = errno_name
        self.message = message


class PeerError(Exception):
    """The peer actor sent something the model refuses: a pfn that is no live page, a count it
    does not hold, an index or address out of range, a reply of the wrong kind.

    Raised by an actor's ``deliver`` before the message changes any state, so the model is left
    exactly as it was. It is not a :class:`UserError`: no client asked for anything, and the
    peer cannot be trusted with the connection any more. The daemon that receives it must close
    that peer connection (``peer_lost()`` then drops what the peer held).
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
