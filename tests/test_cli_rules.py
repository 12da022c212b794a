"""Custom rules files through the CLI: checked on demand, refused at start when bad."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

NETTEL = str(Path(sys.executable).with_name("nettel"))

GOOD = """
[[rule]]
name = "api-syn-flood"
metric = "syn_recv"
above = 200
service = "api"

[[rule]]
name = "big-sender"
metric = "tx_bytes"
above = 500_000_000
window = "5m"
"""

BAD = """
[[rule]]
name = "ok"
metric = "tx_bytes"
above = 10

[[rule]]
name = "typo"
metric = "tx_bytez"
above = 10
"""


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NETTEL, *args], capture_output=True, text=True, timeout=60,
                          env=env, check=False)  # fmt: skip


def test_rules_check_accepts_a_good_file_and_names_line_and_reason_of_a_bad_one(
    tmp_path: Path,
) -> None:
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    ok = run("rules", "check", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "2 rule(s), valid" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD)
    no = run("rules", "check", str(bad))
    assert no.returncode != 0
    assert "line 9" in no.stderr, no.stderr
    assert "tx_bytez" in no.stderr


def test_a_bad_rules_file_stops_detect_and_up_before_anything_starts(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD)
    env = {"PATH": "/usr/bin:/bin", "NETTEL_RULES_FILE": str(bad),
           "NETTEL_DATA_DIR": str(tmp_path / "data"),
           "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}  # fmt: skip
    for command in ("detect", "up"):
        proc = run(command, env=env)
        assert proc.returncode == 2, (command, proc.stderr)
        assert "line 9" in proc.stderr
    assert not (tmp_path / "data").exists()
