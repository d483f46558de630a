"""docker-compose.yml, Dockerfile and .dockerignore: valid, and wired the way the demo needs.

The compose file is validated against the compose specification's JSON schema as vendored by
check-jsonschema (no network at test time), and against `docker compose config` where a compose
v2 plugin is installed. The rest checks what issue 8 asks of the stack: three services, the
daemons on TCP with ready-file healthchecks, dependencies on health, remapd pointed at collapsed by
service name, the demo secret, images never pulled. `.ci/compose` runs the stack for real.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DAEMONS = ("collapsed", "remapd")

ruamel_yaml = pytest.importorskip("ruamel.yaml", reason="check-jsonschema (the test extra) brings ruamel.yaml")
jsonschema = pytest.importorskip("jsonschema", reason="check-jsonschema (the test extra) brings jsonschema")
builtin_schemas = pytest.importorskip(
    "check_jsonschema.builtin_schemas", reason="check-jsonschema vendors the compose-spec schema"
)


def load_yaml(text: str) -> dict:
    return ruamel_yaml.YAML(typ="safe", pure=True).load(text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def validator():
    schema = builtin_schemas.get_builtin_schema("vendor.compose-spec")
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\})")


def resolve(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's interpolation for the forms the file uses: ${VAR}, ${VAR:-default}, $$."""
    env = env or {}

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group("name")) or (m.group("default") or "")

    return _VAR.sub(sub, value)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the list form, KEY=VALUE
        env = dict(item.split("=", 1) for item in env)
    return {k: resolve(str(v)) for k, v in env.items()}


def command(service: dict) -> list[str]:
    cmd = service["command"]
    return [resolve(str(c)) for c in cmd] if isinstance(cmd, list) else resolve(cmd).split()


def errors(validator, document: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


# ---- the compose specification ----------------------------------------------------------------


def test_compose_file_matches_the_compose_spec(compose, validator):
    assert errors(validator, compose) == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c["services"]["collapsed"].__setitem__("healthchek", {"test": ["CMD", "true"]}),
        lambda c: c["services"]["remapd"].__setitem__("depends_on", {"collapsed": {"condition": "healthy"}}),
        lambda c: c["services"]["demo"].__setitem__("pull_policy", "sometimes"),
        lambda c: c["services"]["collapsed"].__setitem__("environment", 42),
        lambda c: c.__setitem__("service", c.pop("services")),
    ],
    ids=["misspelt-key", "bad-condition", "bad-pull-policy", "bad-type", "misspelt-top-level"],
)
def test_the_schema_check_rejects_a_broken_file(compose, validator, breakage):
    broken = copy.deepcopy(compose)
    breakage(broken)
    assert errors(validator, broken)


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI")
def test_docker_compose_config_accepts_the_file():
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip("no docker compose v2 plugin (.ci/compose installs one)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("THPSPLIT_", "COMPOSE_"))}
    out = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True, text=True, env=env, cwd=ROOT, check=False,
    )
    assert out.returncode == 0, out.stderr


# ---- what the demo stack needs ----------------------------------------------------------------


def test_three_services(compose):
    assert set(compose["services"]) == {"collapsed", "remapd", "demo"}


def test_one_image_built_once_and_never_pulled(compose):
    services = compose["services"]
    builders = [name for name, s in services.items() if "build" in s]
    assert builders, "no service builds the image"
    images = {resolve(s["image"]) for s in services.values()}
    assert len(images) == 1, f"the services run different images: {images}"
    for name, s in services.items():
        if "build" not in s:
            assert s.get("pull_policy") == "never", f"{name} would try to pull {s['image']}"
    for name in builders:
        build = services[name]["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        assert (ROOT / context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")).is_file()
        args = build.get("args", {}) if isinstance(build, dict) else {}
        assert resolve(str(args.get("BASE_IMAGE", ""))) == "python:3.11-slim", "BASE_IMAGE must default to the official slim image"
        assert "PIP_CERT" in args


def _listen_port(address: str) -> str:
    m = re.fullmatch(r"tcp:0\.0\.0\.0:(\d+)", address)
    assert m, f"{address!r} is not a TCP listener on every interface"
    return m.group(1)


def test_daemons_listen_on_tcp_and_find_each_other_by_service_name(compose):
    s = compose["services"]
    collapsed_port = _listen_port(environment(s["collapsed"])["THPSPLIT_COLLAPSED"])
    remapd_port = _listen_port(environment(s["remapd"])["THPSPLIT_REMAPD"])
    assert environment(s["remapd"])["THPSPLIT_COLLAPSED"] == f"tcp:collapsed:{collapsed_port}"
    demo_env = environment(s["demo"])
    assert demo_env["THPSPLIT_COLLAPSED"] == f"tcp:collapsed:{collapsed_port}"
    assert demo_env["THPSPLIT_REMAPD"] == f"tcp:remapd:{remapd_port}"


@pytest.mark.parametrize("daemon", DAEMONS)
def test_daemons_report_ready_and_are_health_checked_on_it(compose, daemon):
    service = compose["services"][daemon]
    argv = " ".join(command(service))
    m = re.search(rf"\b{daemon} .*--ready-file[ =](\S+)", argv)
    assert m, f"{daemon}'s command does not start {daemon} with --ready-file: {argv}"
    ready = m.group(1)
    test = service["healthcheck"]["test"]
    test = " ".join(test) if isinstance(test, list) else test
    assert ready in test, f"{daemon}'s healthcheck does not look at {ready}: {test}"
    assert not service["healthcheck"].get("disable", False)
    assert service.get("restart") in ("unless-stopped", "on-failure", "always")


def _healthy_dependencies(service: dict) -> set[str]:
    deps = service.get("depends_on", {})
    assert isinstance(deps, dict), "depends_on must use the long form, with conditions"
    return {name for name, d in deps.items() if d.get("condition") == "service_healthy"}


def test_dependencies_wait_for_health(compose):
    s = compose["services"]
    assert _healthy_dependencies(s["remapd"]) == {"collapsed"}
    assert _healthy_dependencies(s["demo"]) == {"collapsed", "remapd"}
    assert "depends_on" not in s["collapsed"]


def test_demo_plays_the_story_against_the_daemons(compose):
    argv = command(compose["services"]["demo"])
    assert argv[:3] == ["python", "-m", "shared.thpctl.demo"]
    options = dict(zip(argv[3::2], argv[4::2]))
    env = environment(compose["services"]["demo"])
    assert options["--collapsed"] == env["THPSPLIT_COLLAPSED"]
    assert options["--remapd"] == env["THPSPLIT_REMAPD"]


def test_the_daemons_have_both_secrets_and_the_demo_only_the_client_one(compose):
    services = compose["services"]
    for name in DAEMONS:
        env = environment(services[name])
        assert env.get("THPSPLIT_SECRET") and env.get("THPSPLIT_PEER_SECRET"), f"{name} lacks a secret"
        assert env["THPSPLIT_SECRET"] != env["THPSPLIT_PEER_SECRET"]
        assert "demo" in env["THPSPLIT_SECRET"] and "demo" in env["THPSPLIT_PEER_SECRET"]
        assert len(env["THPSPLIT_SECRET"]) >= 16 and len(env["THPSPLIT_PEER_SECRET"]) >= 16
    demo = environment(services["demo"])
    assert demo.get("THPSPLIT_SECRET") == environment(services["collapsed"])["THPSPLIT_SECRET"]
    # The client must not be able to pose as the peer: it never gets the peer secret.
    assert "THPSPLIT_PEER_SECRET" not in demo and "THPSPLIT_PEER_SECRET_FILE" not in demo
    # Real secrets from the environment replace the demo values.
    for var in ("THPSPLIT_SECRET", "THPSPLIT_PEER_SECRET"):
        raw = services["collapsed"]["environment"][var]
        assert resolve(raw, {var: "s3cret-from-the-environment"}) == "s3cret-from-the-environment"
    text = COMPOSE_FILE.read_text()
    assert len(re.findall(r"#.*demo only.*set your own", text, re.IGNORECASE)) == 2, "each demo secret must be marked"


def test_traffic_stays_on_the_compose_network(compose):
    networks = compose.get("networks", {})
    for name, service in compose["services"].items():
        assert "ports" not in service, f"{name} publishes ports on the host"
        assert service.get("network_mode") is None
        for net in service.get("networks", []):
            assert networks[net].get("internal") is True, f"{name} is on {net}, which is not internal"


def _documented_variables(module: str) -> set[str]:
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"\$(THPSPLIT_[A-Z0-9_]+)", out.stdout))


def test_every_thpsplit_variable_is_one_the_programs_read(compose):
    known = _documented_variables("collapsed") | _documented_variables("remapd")
    for name, service in compose["services"].items():
        for var in environment(service):
            if var.startswith("THPSPLIT_"):
                assert var in known, f"{name}: {var} is read by neither daemon"


# ---- Dockerfile and .dockerignore -------------------------------------------------------------


def test_dockerfile_takes_the_base_image_as_an_argument_and_drops_root():
    lines = [l.strip() for l in (ROOT / "Dockerfile").read_text().splitlines() if l.strip() and not l.lstrip().startswith("#")]
    assert lines[0] == "ARG BASE_IMAGE=python:3.11-slim"
    assert lines[1] == "FROM ${BASE_IMAGE}"
    assert any(re.match(r"ARG PIP_CERT\b", l) for l in lines)
    assert any("pip install" in l for l in lines)
    users = [l.split()[1] for l in lines if l.startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert any(l.startswith("CMD ") for l in lines)


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = {l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")}
    for entry in (".git", ".venv", "**/__pycache__", ".env", "*.crt"):
        assert entry in ignored, f".dockerignore lacks {entry}"
