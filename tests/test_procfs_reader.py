"""NetnsReader skips the TCP table walk only when no state can have changed.

A child process in a network namespace of its own opens, accepts and closes
connections on command; after each step the reader's states must equal what iproute2's
ss (netlink, not procfs) sees, and walks are skipped only while nothing moves.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import msgspec
import pytest

from conftest import require, ss_tcp_states
from nettel.ingest.procfs import NetnsReader

CHILD = r"""
import os, socket, sys
os.system("ip link set lo up")
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 9000)); srv.listen()
conns = {}
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "connect":
        c = socket.create_connection(("127.0.0.1", 9000)); a, _ = srv.accept()
        conns["client"], conns["server"] = c, a
    elif cmd in ("close-client", "close-server"):
        conns.pop(cmd.split("-")[1]).close()
    print("done", flush=True)
"""


class NetnsChild:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["unshare", "--net", sys.executable, "-c", CHILD],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def do(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "done"
        time.sleep(0.2)  # let FINs and ACKs cross

    def close(self) -> None:
        self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def child() -> Iterator[NetnsChild]:
    require(os.geteuid() == 0, "creating a network namespace needs root")
    require(shutil.which("unshare") is not None and shutil.which("ss") is not None,
            "unshare (util-linux) and ss (iproute2) are needed")  # fmt: skip
    c = NetnsChild()
    try:
        yield c
    finally:
        c.close()


def states(reader: NetnsReader, pid: int) -> dict[str, int]:
    tcp = reader.read(pid).tcp
    return {k: v for k, v in msgspec.structs.asdict(tcp).items() if v}


@pytest.mark.parametrize("netlink", [True, False], ids=["netlink", "procfs"])
def test_states_follow_every_change_and_walks_are_skipped_only_when_still(
    child: NetnsChild, netlink: bool
) -> None:
    pid = child.proc.pid
    reader = NetnsReader(netlink=netlink)
    assert reader.method == ("netlink" if netlink else "procfs")
    assert states(reader, pid) == ss_tcp_states(pid) == {"listen": 1}
    walks = reader.walks
    assert states(reader, pid) == {"listen": 1}
    assert reader.walks == walks, "nothing moved: the walk must be skipped"

    child.do("connect")
    assert states(reader, pid) == ss_tcp_states(pid) == {"listen": 1, "established": 2}
    walks = reader.walks
    assert states(reader, pid) == {"listen": 1, "established": 2}
    assert reader.walks == walks

    child.do("close-client")  # client FIN_WAIT2 (transient), server CLOSE_WAIT
    expected = ss_tcp_states(pid)
    assert expected == {"listen": 1, "fin_wait2": 1, "close_wait": 1}
    assert states(reader, pid) == expected
    walks = reader.walks
    assert states(reader, pid) == expected
    assert reader.walks == walks + 1, "a transient state must be walked every time"

    child.do("close-server")  # client TIME_WAIT
    expected = ss_tcp_states(pid)
    assert expected == {"listen": 1, "time_wait": 1}
    assert states(reader, pid) == expected
