"""The package layers, as code: every import arrow in the tree is checked against the rules.

* ``shared`` (the leaf: units, errors, knobs, THP rules, scan results, the protocol, the sans-IO
  actor runtime, logging) imports nothing of ours above it and no trio.
* The actors' models (``collapsed.*``, ``remapd.*``) import the leaf only, never each other, never
  trio; their daemons (``daemon``, ``__main__``) may add the trio shell.
* ``shared.shell`` (channels, transports, driver, server, configuration) imports the leaf only.
* ``shared.sim`` (the in-process world, the invariant checker, experiments) is the one shared
  package that may import both actors; it uses no trio and no shell.
* ``shared.thpctl`` (client library, renderers, demo, CLI) imports no actor and no server code; it
  may use the client half of the shell (channel, transport, config) and the simulator.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("collapsed", "remapd", "shared")
ACTORS = ("collapsed", "remapd")
DAEMON_MODULES = {f"{a}.{m}" for a in ACTORS for m in ("daemon", "__main__")}
SERVER_MODULES = ("shared.shell.driver", "shared.shell.server", "shared.shell.peer")


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer(module: str) -> str:
    for name in ("shared.shell", "shared.sim", "shared.thpctl"):
        if under(module, name):
            return name
    if module in DAEMON_MODULES:
        return "daemon"
    if under(module, "collapsed") or under(module, "remapd"):
        return "model"
    return "shared"


def imports_of(source: str, module: str) -> set[str]:
    """Every module ``source`` imports, at any depth (function-level imports count too)."""
    found: set[str] = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def violations(module: str, imported: set[str]) -> list[str]:
    """The forbidden arrows among ``module``'s imports."""
    out = []
    own = layer(module)
    own_actor = next((a for a in ACTORS if under(module, a)), None)
    for target in sorted(imported):
        target_actor = next((a for a in ACTORS if under(target, a)), None)
        ours = under(target, "shared") or target_actor is not None
        reason = None
        if under(target, "trio") and own in ("shared", "model", "shared.sim"):
            reason = "trio in a sans-IO module"
        elif own_actor and target_actor and target_actor != own_actor:
            reason = "one actor imports the other"
        elif not ours:
            continue
        elif own == "shared" and layer(target) != "shared":
            reason = "the shared leaf imports a layer above it"
        elif own == "model" and layer(target) not in ("shared", "model"):
            reason = "a model module imports the shell, the simulator or the client"
        elif own == "daemon" and layer(target) in ("shared.sim", "shared.thpctl"):
            reason = "a daemon imports the simulator or the client"
        elif own == "shared.shell" and layer(target) not in ("shared", "shared.shell"):
            reason = "the shell imports an actor, the simulator or the client"
        elif own == "shared.sim" and layer(target) in ("shared.shell", "shared.thpctl", "daemon"):
            reason = "the simulator imports the shell, the client or a daemon"
        elif own == "shared.thpctl" and (target_actor is not None or any(under(target, s) for s in SERVER_MODULES)):
            reason = "the client imports an actor or server code"
        if reason:
            out.append(f"{module} -> {target}: {reason}")
    return out


def modules() -> list[tuple[str, Path]]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out.append((".".join(parts), path))
    return out


def test_every_module_keeps_its_layer() -> None:
    found = []
    for module, path in modules():
        found += violations(module, imports_of(path.read_text(), module))
    assert found == []


def test_the_layers_are_all_populated() -> None:
    # A rule over an empty layer proves nothing: each layer must hold modules.
    layers = {layer(module) for module, _ in modules()}
    assert layers == {"shared", "model", "daemon", "shared.shell", "shared.sim", "shared.thpctl"}


@pytest.mark.parametrize(
    ("module", "source", "reason"),
    [
        ("remapd.fault", "from collapsed.pagecache import PG_LOCKED", "one actor imports the other"),
        ("collapsed.khugepaged", "import remapd.mm", "one actor imports the other"),
        ("collapsed.daemon", "from remapd.remapper import Remapper", "one actor imports the other"),
        ("shared.units", "from remapd.mm import PTE_ANON", "the shared leaf imports a layer above it"),
        ("shared.knobs", "def f():\n    from shared.sim.world import World", "the shared leaf imports"),
        ("shared.actor", "import trio", "trio in a sans-IO module"),
        ("remapd.khugepaged", "import trio", "trio in a sans-IO module"),
        ("shared.sim.world", "import trio", "trio in a sans-IO module"),
        ("remapd.fault", "from shared.shell.driver import Driver", "a model module imports the shell"),
        ("collapsed.collapser", "from shared.sim import invariants", "a model module imports"),
        ("shared.shell.driver", "from collapsed.collapser import Collapser", "the shell imports an actor"),
        ("shared.shell.server", "from shared.thpctl.client import Session", "the shell imports"),
        ("shared.sim.world", "from shared.shell.channel import Channel", "the simulator imports the shell"),
        ("shared.thpctl.client", "from shared.shell.driver import Driver", "the client imports an actor or server"),
        ("shared.thpctl.mm", "from remapd.address_space import mmap", "the client imports an actor"),
        ("shared.thpctl.cli", "from .. import shell\nfrom ..shell.server import Server", "the client imports"),
        ("remapd.daemon", "from shared.sim.world import World", "a daemon imports the simulator"),
    ],
)
def test_the_checker_catches_each_forbidden_arrow(module: str, source: str, reason: str) -> None:
    found = violations(module, imports_of(source, module))
    assert found and all(reason in v for v in found), found


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("remapd.daemon", "from shared.shell.server import Server\nimport trio"),
        ("shared.thpctl.client", "from shared.shell.channel import Channel\nimport trio"),
        ("shared.thpctl.experiment", "from shared.sim.experiment import compare"),
        ("shared.sim.invariants", "from collapsed.pagecache import PG_LOCKED\nfrom remapd.mm import PTE_ANON"),
        ("remapd.fault", "from shared.actor import Call\nfrom remapd.mm import Vma"),
    ],
)
def test_the_checker_allows_the_permitted_arrows(module: str, source: str) -> None:
    assert violations(module, imports_of(source, module)) == []
