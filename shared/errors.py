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
    """The peer sent something the model refuses (a forged or corrupt message): the receiving
    daemon closes that peer connection; the model is left as it was."""
