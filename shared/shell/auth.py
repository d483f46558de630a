"""Shared secrets and the challenge-response of the hello.

Who may connect (docs/protocol.md, "Hello and authentication"):

* A **client** proves it knows the client secret (``THPSPLIT_SECRET``, or the file named by
  ``THPSPLIT_SECRET_FILE``, or ``--secret-file``), which thpctl users and the daemons share.
* The **peer** (remapd connecting to collapsed) proves it knows the peer secret
  (``THPSPLIT_PEER_SECRET``, ``THPSPLIT_PEER_SECRET_FILE``, ``--peer-secret-file``), which only the
  two daemons hold. A separate secret, because the peer is trusted with what no client may do: it
  reports mappings and page references the collapser acts on (freeing pages), holds page locks,
  sets knobs, and holds the one peer slot. With one secret for both roles every client could say
  ``role: remapd`` and be all of that.
* The daemon proves it knows the same secret back (mutual), so a client or a remapd that holds
  a secret never talks to an impostor that took the daemon's address.

The proof is ``HMAC-SHA256(secret, transcript)`` over a transcript of the protocol version, the
direction (``connect`` for the side that connected, ``accept`` for the listener), both roles and
both sides' fresh 256-bit nonces, sender's first. The secret never crosses the wire, a proof is
good for one connection only (the other side's nonce is new each time: no replay), and the
direction and the role order keep a listener's proof from being reflected back to it. The
listener checks the connecting side's proof before it sends its own.

When a side has no secret for the connection's role it sends an empty proof and checks nothing:
that is the local case, a Unix socket (mode 0600, in a 0700 directory) or TCP on loopback. A
listener reachable from other machines refuses to start without the secrets of every role it
takes (:func:`startup_problem`). What this does not give: confidentiality or integrity of the
traffic after the hello. Across a network you do not trust, carry the connection over TLS or a
VPN; the compose network is internal to its containers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets as _random
from collections.abc import Collection, Mapping

from shared.protocol.schema import CLIENT, PROTOCOL_VERSION
from shared.shell.config import Address

ENV_SECRET = "THPSPLIT_SECRET"
ENV_SECRET_FILE = "THPSPLIT_SECRET_FILE"
ENV_PEER_SECRET = "THPSPLIT_PEER_SECRET"
ENV_PEER_SECRET_FILE = "THPSPLIT_PEER_SECRET_FILE"
# A secret shorter than this is refused: `openssl rand -hex 32` makes a good one.
MIN_SECRET_BYTES = 16
# Largest secret file read (a secret is a line, not a document).
MAX_SECRET_BYTES = 4096
NONCE_BYTES = 32
NONCE_HEX = 2 * NONCE_BYTES
PROOF_HEX = 2 * hashlib.sha256().digest_size
# The two directions of a hello: the side that connected, and the listener.
CONNECT = "connect"
ACCEPT = "accept"


class SecretError(ValueError):
    """A secret that cannot be used (unreadable file, too short, both forms set, ...)."""


@dataclasses.dataclass(frozen=True)
class Secrets:
    """The secrets one process holds: ``client`` for the client role, ``peer`` for the peer's."""

    client: bytes | None = None
    peer: bytes | None = None

    def for_role(self, role: str) -> bytes | None:
        """The secret that authenticates a connection whose connecting side has ``role``."""
        return self.client if role == CLIENT else self.peer

    def __repr__(self) -> str:  # never print a secret, even in a traceback
        return f"Secrets(client={'set' if self.client else None}, peer={'set' if self.peer else None})"


def _env_hint(role_is_client: bool) -> str:
    if role_is_client:
        return f"${ENV_SECRET} (or ${ENV_SECRET_FILE})"
    return f"${ENV_PEER_SECRET} (or ${ENV_PEER_SECRET_FILE})"


def secret_hint(role: str) -> str:
    """Where a process gets the secret of ``role`` from, for error messages."""
    return _env_hint(role == CLIENT)


def _read_secret_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
    except OSError as err:
        raise SecretError(f"cannot read the {what} file {path}: {err.strerror or err}") from None
    if len(data) > MAX_SECRET_BYTES:
        raise SecretError(f"the {what} file {path} holds more than {MAX_SECRET_BYTES} bytes")
    return data


def _one_secret(
    value_env: str, file_env: str, flag_file: str | None, environ: Mapping[str, str], what: str
) -> bytes | None:
    if flag_file:
        raw: bytes | None = _read_secret_file(flag_file, what)
    else:
        value, path = environ.get(value_env), environ.get(file_env)
        if value and path:
            raise SecretError(f"set ${value_env} or ${file_env}, not both")
        if path:
            raw = _read_secret_file(path, what)
        elif value:
            raw = value.encode()
        else:
            raw = None
    if raw is None:
        return None
    secret = raw.strip()  # a file written by `echo` ends with a newline
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretError(
            f"the {what} is {len(secret)} bytes; use at least {MIN_SECRET_BYTES} (e.g. openssl rand -hex 32)"
        )
    return secret


def load_secrets(
    secret_file: str | None = None,
    peer_secret_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    peer: bool = True,
) -> Secrets:
    """The client secret and (``peer``) the peer secret: a ``--*-secret-file`` flag first, then
    ``$THPSPLIT_*SECRET_FILE``, then ``$THPSPLIT_*SECRET``; None where none is set.

    Errors:
        SecretError: a file cannot be read, a secret is shorter than MIN_SECRET_BYTES, both the
        value and the file variable are set, or the two secrets are the same.
    """
    env = os.environ if environ is None else environ
    client = _one_secret(ENV_SECRET, ENV_SECRET_FILE, secret_file, env, "secret")
    peer_secret = (
        _one_secret(ENV_PEER_SECRET, ENV_PEER_SECRET_FILE, peer_secret_file, env, "peer secret") if peer else None
    )
    if client is not None and peer_secret is not None and hmac.compare_digest(client, peer_secret):
        raise SecretError(
            f"${ENV_PEER_SECRET} must differ from ${ENV_SECRET}: with one secret every client could act as the peer"
        )
    return Secrets(client, peer_secret)


def startup_problem(
    secrets: Secrets, listen: Address, accepts: Collection[str], peer_address: Address | None = None
) -> str | None:
    """Why a daemon must not start with these secrets, or None.

    * A listener other machines can reach needs the secret of every role it takes.
    * A listener that takes the peer role and checks the client secret must check the peer's
      too: otherwise a client without the secret would connect as the peer instead.
    * A peer link to another machine needs the peer secret (both sides prove it).
    """
    missing = [
        f"{secret_hint(role)} for {'clients' if role == CLIENT else role}"
        for role in sorted(accepts)
        if secrets.for_role(role) is None
    ]
    if not listen.local and missing:
        return (
            f"listening on {listen}, which other machines can reach, needs the shared secrets: "
            f"set {' and '.join(missing)}, or listen on a Unix socket or 127.0.0.1"
        )
    takes_peer = any(role != CLIENT for role in accepts)
    if takes_peer and secrets.client is not None and secrets.peer is None:
        return (
            f"${ENV_SECRET} is set but {secret_hint('peer')} is not: a client could connect as "
            f"the peer without any secret; give the daemons a peer secret too"
        )
    if peer_address is not None and not peer_address.local and secrets.peer is None:
        return f"the peer link to {peer_address} crosses machines and needs the peer secret: set {secret_hint('peer')}"
    return None


def new_nonce() -> str:
    """A fresh 256-bit challenge, as 64 lowercase hex digits."""
    return _random.token_hex(NONCE_BYTES)


def is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


def proof(key: bytes, direction: str, sender: str, receiver: str, sender_nonce: str, receiver_nonce: str) -> str:
    """HMAC-SHA256 of the hello's transcript under ``key``, as hex: what ``sender`` sends."""
    transcript = "\0".join(
        (f"thpsplit-hello-v{PROTOCOL_VERSION}", direction, sender, receiver, sender_nonce, receiver_nonce)
    )
    return hmac.new(key, transcript.encode(), hashlib.sha256).hexdigest()


def proof_matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


__all__ = [
    "ACCEPT",
    "CONNECT",
    "ENV_PEER_SECRET",
    "ENV_PEER_SECRET_FILE",
    "ENV_SECRET",
    "ENV_SECRET_FILE",
    "MIN_SECRET_BYTES",
    "NONCE_HEX",
    "PROOF_HEX",
    "SecretError",
    "Secrets",
    "is_hex",
    "load_secrets",
    "new_nonce",
    "proof",
    "proof_matches",
    "secret_hint",
    "startup_problem",
]
