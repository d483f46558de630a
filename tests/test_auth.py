"""Who may connect (issue 8, issue 13 "Access", issue 14 item 6), with real daemon processes:
the shared secrets checked by challenge-response in the hello, the peer's own secret, the one
peer slot, and the daemons' refusal to listen beyond loopback without them."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import trio
from helpers import ONE_PAGE_FLAGS, next_message, raw_hello

from shared.errors import UserError
from shared.protocol import messages as m
from shared.shell.auth import Secrets
from shared.shell.config import parse_address
from shared.shell.transport import connect
from shared.thpctl.cli import amain
from shared.thpctl.client import COLLAPSED, REMAPD, ConnectError, Session, open_client
from shared.thpctl.launch import running_daemons

CLIENT_SECRET = "client-secret-0123456789abcdef"
PEER_SECRET = "peer-secret-fedcba9876543210"
BOTH = {"THPSPLIT_SECRET": CLIENT_SECRET, "THPSPLIT_PEER_SECRET": PEER_SECRET}
NO_SECRETS = {k: "" for k in ("THPSPLIT_SECRET", "THPSPLIT_SECRET_FILE", "THPSPLIT_PEER_SECRET", "THPSPLIT_PEER_SECRET_FILE")}


@pytest.fixture(autouse=True)
def no_secrets_of_our_own(monkeypatch):
    # The test process (thpctl in-process, the client library) starts without secrets.
    for name in NO_SECRETS:
        monkeypatch.delenv(name, raising=False)


async def thpctl(d, *argv: str, secret_file: Path | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    extra = ["--secret-file", str(secret_file)] if secret_file else []
    status = await amain([*d.thpctl_args, *extra, "--deadline", "30", *argv], out, err)
    return status, out.getvalue(), err.getvalue()


def log_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def start_fails(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **NO_SECRETS, **env},
        check=False,
    )


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        # Reachable from other machines: every role it takes needs its secret.
        (["collapsed", "--listen", "tcp:0.0.0.0:0"], {}, "needs the shared secrets"),
        (["collapsed", "--listen", "tcp:0.0.0.0:0"], {"THPSPLIT_SECRET": CLIENT_SECRET}, "THPSPLIT_PEER_SECRET"),
        (["remapd", "--listen", "tcp:0.0.0.0:0"], {}, "needs the shared secrets"),
        # A client secret without a peer secret would let a client in as the peer.
        (["collapsed", "--listen", "tcp:127.0.0.1:0"], {"THPSPLIT_SECRET": CLIENT_SECRET}, "could connect as the peer"),
        # The peer link to another machine needs the peer secret.
        (["remapd", "--listen", "tcp:127.0.0.1:0", "--collapsed", "tcp:collapsed.example:7070"], {}, "peer secret"),
        # One secret for both roles is no separation at all.
        (["collapsed"], {"THPSPLIT_SECRET": CLIENT_SECRET, "THPSPLIT_PEER_SECRET": CLIENT_SECRET}, "must differ"),
        (["collapsed"], {"THPSPLIT_SECRET": "short"}, "at least 16"),
        (["collapsed"], {"THPSPLIT_SECRET": CLIENT_SECRET, "THPSPLIT_SECRET_FILE": "/x"}, "not both"),
        (["collapsed", "--secret-file", "/nonexistent/secret"], {}, "cannot read the secret file"),
    ],
)
def test_a_daemon_refuses_to_start_without_the_secrets_it_needs(tmp_path, argv, env, says):
    run = start_fails([*argv, "--ready-file", str(tmp_path / "ready")], {"THPSPLIT_RUNTIME_DIR": str(tmp_path / "rt"), **env})
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and says in run.stderr, run.stderr
    assert not (tmp_path / "ready").exists()


async def test_over_tcp_beyond_loopback_clients_and_the_peer_prove_their_secrets(workdir):
    (workdir / "secret").write_text(CLIENT_SECRET + "\n")
    (workdir / "peer-secret").write_text(PEER_SECRET + "\n")
    (workdir / "wrong").write_text("not-the-secret-at-all\n")
    async with running_daemons(workdir, "tcp", host="0.0.0.0", remapd_args=ONE_PAGE_FLAGS, env=BOTH) as d:
        secret = workdir / "secret"
        assert (await thpctl(d, "sync", secret_file=secret))[0] == 0  # remapd is connected
        status, out, err = await thpctl(d, "--json", "status", secret_file=secret)
        assert status == 0 and '"peer": true' in out, err
        await thpctl(d, "file", "create", "f", "--size", "2M", secret_file=secret)
        # Without the secret, with a wrong one, or with the peer's: EACCES, one line.
        for secret_file, says in (
            (None, "authentication required"),
            (workdir / "wrong", "authentication failed"),
            (workdir / "peer-secret", "authentication failed"),
        ):
            status, out, err = await thpctl(d, "file", "ls", secret_file=secret_file)
            assert (status, out) == (1, "") and err.count("\n") == 1, err
            assert "EACCES" in err and says in err, err
        # A client that knows the client secret still cannot say it is the peer.
        stream = await connect(parse_address(d.collapsed.address))
        _, hello, refusal = await raw_hello(stream, "remapd", CLIENT_SECRET.encode())
        assert hello.role == "collapsed" and isinstance(refusal, m.ErrorReply) and refusal.errno == "EACCES"
        assert await next_message(stream, _) is None
        await stream.aclose()
        # The real remapd holds the slot: a second one with the peer secret is turned away.
        stream = await connect(parse_address(d.collapsed.address))
        decoder, _, auth = await raw_hello(stream, "remapd", PEER_SECRET.encode())
        assert isinstance(auth, m.PeerAuth) and len(auth.proof) == 64  # collapsed proved itself too
        assert await next_message(stream, decoder) == m.ErrorReply(0, "EBUSY", "a remapd is already connected")
        await stream.aclose()
        # The client library: right secret in, none out.
        async with open_client(d.remapd.address, REMAPD, Secrets(CLIENT_SECRET.encode())) as r:
            assert (await r.call(m.Status))["peer"] is True
        with pytest.raises(ConnectError) as info:
            async with open_client(d.remapd.address, REMAPD, Secrets()):
                pass
        assert info.value.errno_name == "EACCES"
    assert (d.collapsed.proc.returncode, d.remapd.proc.returncode) == (0, 0)
    events = log_events(workdir / "collapsed.log")
    assert [e["level"] for e in events if e["event"] == "listening_beyond_loopback"] == ["warning"]
    refused = [e for e in events if e["event"] == "hello_failed"]
    assert refused and all(e["errno"] == "EACCES" and e["level"] == "warning" and "remote" in e for e in refused)


async def test_when_the_peer_dies_the_next_one_must_authenticate_to_take_its_place(workdir):
    async with running_daemons(workdir, "tcp", remapd_args=ONE_PAGE_FLAGS, env=BOTH) as d:
        secrets = Secrets(CLIENT_SECRET.encode())
        async with Session(d.collapsed.address, d.remapd.address, secrets) as s:
            await s.call(m.FileCreate, name="f", size=2 << 20)
            assert d.remapd.proc is not None
            d.remapd.proc.kill()
            await d.remapd.proc.wait()
        # The slot is free, but an impostor without the peer secret does not get it.
        stream = await connect(parse_address(d.collapsed.address))
        _, _, refusal = await raw_hello(stream, "remapd", None)
        assert isinstance(refusal, m.ErrorReply) and refusal.errno == "EACCES"
        assert "THPSPLIT_PEER_SECRET" in refusal.message
        await stream.aclose()
        async with open_client(d.collapsed.address, COLLAPSED, secrets) as c:
            assert (await c.call(m.Status))["peer"] is False
        # The real one comes back, authenticates, and is resynchronised.
        await d.remapd.start()
        await d.remapd.wait_ready()
        async with open_client(d.remapd.address, REMAPD, secrets) as r:
            with trio.fail_after(20):
                await r.call(m.Sync)
            assert (await r.call(m.Status))["peer"] is True


async def test_a_client_with_a_secret_does_not_trust_a_daemon_without_one(workdir):
    async with running_daemons(workdir, "unix", remapd_args=ONE_PAGE_FLAGS) as d:
        with pytest.raises(UserError) as info:
            async with open_client(d.collapsed.address, COLLAPSED, Secrets(CLIENT_SECRET.encode())) as c:
                await c.call(m.Status)
        assert info.value.errno_name == "EACCES" and "did not prove" in info.value.message
        # Without secrets on either side, a Unix socket needs none.
        async with open_client(d.collapsed.address, COLLAPSED, Secrets()) as c:
            assert (await c.call(m.Status))["daemon"] == "collapsed"


async def test_loopback_tcp_works_without_secrets_and_checks_them_when_set(workdir):
    async with (
        running_daemons(workdir, "tcp", remapd_args=ONE_PAGE_FLAGS) as d,
        open_client(d.collapsed.address, COLLAPSED, Secrets()) as c,
    ):
        with trio.fail_after(20):
            await c.call(m.Sync)  # answered once remapd is connected
        assert (await c.call(m.Status))["peer"] is True
    peer_only = {"THPSPLIT_PEER_SECRET": PEER_SECRET}
    async with running_daemons(workdir / "p", "tcp", remapd_args=ONE_PAGE_FLAGS, env=peer_only) as d:
        # Clients need nothing on loopback, and still cannot be the peer: that role has a secret.
        async with open_client(d.collapsed.address, COLLAPSED, Secrets()) as c:
            with trio.fail_after(20):
                await c.call(m.Sync)
            assert (await c.call(m.Status))["peer"] is True
        stream = await connect(parse_address(d.collapsed.address))
        _, _, refusal = await raw_hello(stream, "remapd", None)
        assert isinstance(refusal, m.ErrorReply) and refusal.errno == "EACCES"
        await stream.aclose()


def test_daemon_help_names_the_secret_flags_and_variables():
    for daemon in ("collapsed", "remapd"):
        out = subprocess.run([sys.executable, "-m", daemon, "--help"], capture_output=True, text=True, timeout=30, check=True).stdout
        for word in ("--secret-file", "--peer-secret-file", "THPSPLIT_SECRET", "THPSPLIT_PEER_SECRET_FILE"):
            assert word in out, (daemon, word)



async def test_thpctl_refuses_an_unusable_secret_in_one_line(workdir, monkeypatch):
    d = types.SimpleNamespace(thpctl_args=["--collapsed", f"unix:{workdir}/c.sock", "--remapd", f"unix:{workdir}/r.sock"])
    status, out, err = await thpctl(d, "status", secret_file=workdir / "missing")
    assert (status, out) == (2, "") and err.count("\n") == 1 and "cannot read the secret file" in err
    monkeypatch.setenv("THPSPLIT_SECRET", "short")
    status, _, err = await thpctl(d, "status")
    assert status == 2 and "at least 16" in err
