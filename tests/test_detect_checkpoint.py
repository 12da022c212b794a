"""Checkpoints are data: what they may hold comes back exactly, anything else is refused
without running it, and a refused checkpoint makes the detector start cold."""

from __future__ import annotations

import array
import asyncio
import os
import pickle
from collections import deque
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import river.stats
from structlog.testing import capture_logs

from conftest import consume_all, wait_for
from nettel.broker import EmbeddedBroker, ensure_topics
from nettel.detect.checkpoint import (
    MAGIC,
    VERSION,
    CheckpointError,
    decode_checkpoint,
    encode_checkpoint,
)
from nettel.detect.fleet import FleetDetector
from nettel.detect.rules import parse_rules
from nettel.ingest.simulate import TrafficSimulator
from nettel.store.alerts import DetectState, DetectStateTable
from nettel.stream.detector import DetectWorker
from test_stream_worker import publish


class _Touch:
    """A pickle payload that creates ``path`` when unpickled (what an attacker would write)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def forged(root: Any) -> bytes:
    """A blob with a well-formed header and an arbitrary node tree."""
    return MAGIC + bytes([VERSION]) + msgspec.msgpack.encode(["little", root])


def test_a_fleet_with_rules_resumes_with_exactly_the_same_alerts() -> None:
    sim = TrafficSimulator(4, seed=3, restart_probability=0.002)
    start = 1_795_392_000_000
    spikes = sim.spikes(3, start + 3_600_000, 3_600_000, factor=30.0)
    events = list(sim.events(start, 2 * 3_600_000, spikes))
    rules = parse_rules('[[rule]]\nname = "burst"\nmetric = "tx_bytes"\nwindow = "10s"\n'
                        'above = 300000\n')  # fmt: skip
    fleet = FleetDetector(rules=rules)
    half = len(events) // 2
    fleet.process_batch(events[:half])
    blob = encode_checkpoint(fleet)
    resumed = decode_checkpoint(blob, FleetDetector)
    straight = fleet.process_batch(events[half:])
    again = resumed.process_batch(events[half:])
    assert straight == again
    assert {a.rule for a in straight} == {"", "burst"}  # model and rule alerts both resumed
    assert encode_checkpoint(resumed) == encode_checkpoint(fleet)  # the same state after


def test_shared_objects_arrays_and_river_statistics_come_back() -> None:
    shared: list[Any] = [1, 2.5, None]
    ewm, quantile, var = river.stats.EWMean(0.3), river.stats.Quantile(0.9), river.stats.Var()
    for v in range(50):
        for s in (ewm, quantile, var):
            s.update(float(v))
    state: dict[Any, Any] = {
        "a": shared, "b": shared, ("k", 1): frozenset({3}), "q": deque([1.0, 2.0], maxlen=4),
        "arr": array.array("f", [1.5, float("nan")]), "big": 2**70, "raw": b"\x00\xff",
        "np": np.arange(12, dtype=np.float32).reshape(3, 4), "scalar": np.float64(2.5),
        "stats": [ewm, quantile, var], "set": {1, 2},
    }  # fmt: skip
    back = decode_checkpoint(encode_checkpoint(state))
    assert back["a"] is back["b"]
    assert (back["q"].maxlen, list(back["q"])) == (4, [1.0, 2.0])
    assert (back["arr"].typecode, back["arr"][0]) == ("f", 1.5)
    assert (back["np"].dtype, back["np"].tolist()) == (np.float32, state["np"].tolist())
    assert (back["big"], back["raw"], back["scalar"]) == (2**70, b"\x00\xff", 2.5)
    assert [s.get() for s in back["stats"]] == [ewm.get(), quantile.get(), var.get()]
    back["stats"][0].update(100.0)
    ewm.update(100.0)
    assert back["stats"][0].get() == ewm.get()


def test_a_pickle_payload_is_refused_without_running(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    payload = pickle.dumps(_Touch(target))
    for blob in (payload, MAGIC + bytes([VERSION]) + payload):
        with pytest.raises(CheckpointError):
            decode_checkpoint(blob)
    assert not target.exists()
    pickle.loads(payload)  # the payload does what it says: the refusal is what saved us
    assert target.exists()


@pytest.mark.parametrize(
    ("root", "why"),
    [
        (["o", 0, "os:system", {}], "not allowed"),
        (["o", 0, "subprocess:Popen", {"args": "touch x"}], "not allowed"),
        (["o", 0, "builtins:eval", {}], "not allowed"),
        (["o", 0, "nettel.detect.baseline:array", {}], "not allowed"),  # an imported alias
        (["o", 0, "nettel.detect.rules:RulesError", {}], "cannot be restored"),
        (["o", 0, "river.stats.nothing:Mean", {}], "not allowed"),
        (["o", 0, "river.anomaly:HalfSpaceTrees", {}], "not allowed"),
        (["o", 0, "nettel.detect.store:BaselineStore", {"__class__": 1}], "attribute name"),
        (["x", 0, "nettel.detect.fleet:FleetDetector", [], b""], "Rust statistics"),
        (["n", 0, "|O", [1], b"\x00" * 8], "dtype"),
        (["a", 0, "u", b"abcd"], "type code"),
        (["l", 5, []], "out of order"),
        (["l", 0, [["r", 0], ["r", 3]]], "reference 3 to nothing"),
        (["zz", 1], "unknown tag"),
        ({"a": 1}, "unexpected value"),
        (["d", 0, [1]], "odd number"),
    ],
)
def test_forged_content_is_refused(root: Any, why: str) -> None:
    with pytest.raises(CheckpointError, match=why):
        decode_checkpoint(forged(root))


def test_unknown_versions_and_garbage_are_refused() -> None:
    good = encode_checkpoint({"x": 1})
    for version in (1, 2, VERSION + 1):  # 1: models as objects; 2: a store without "cycle"
        with pytest.raises(CheckpointError, match=f"version {version} "):
            decode_checkpoint(MAGIC + bytes([version]) + good[5:])
    for blob in (b"", MAGIC, good[:-3], MAGIC + bytes([VERSION]) + b"\xc1"):
        with pytest.raises(CheckpointError):
            decode_checkpoint(blob)


def test_what_cannot_be_data_is_refused_on_writing() -> None:
    with open(os.devnull) as handle:
        for bad in ({"f": len}, [lambda: 0], {"file": handle}, np.array([object()])):
            with pytest.raises(CheckpointError, match="state"):
                encode_checkpoint(bad)


@pytest.mark.broker
async def test_a_forged_checkpoint_starts_that_partition_cold(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """A pickle that would create a file sits in ``detect_state`` for partition 0: it is
    refused (nothing runs), logged, and partition 0 is read again from offset 0 by a
    fresh detector; partition 1 resumes from its own (valid) checkpoint."""
    bootstrap = broker.bootstrap_servers
    await ensure_topics(bootstrap, {"nettel.stats": 3, "nettel.alerts": 3})
    sim = TrafficSimulator(8, seed=2, interval_ms=5000)
    events = list(sim.events(1_795_392_000_000, 300_000, []))
    await publish(bootstrap, events)
    records = await consume_all(bootstrap, "nettel.stats")
    on = [sum(r.partition == p for r in records) for p in range(3)]
    assert min(on) > 10, f"every partition needs events: {on}"
    expected = len(events) - 10  # partition 0 from 0, partition 1 from 10, partition 2 cold
    data = str(tmp_path / "data")
    target = tmp_path / "pwned"
    fleet = FleetDetector()
    DetectStateTable(f"{data}/detect_state").save([
        DetectState(0, 0, 10, 0, -1, pickle.dumps(_Touch(target))),
        DetectState(1, 0, 10, 0, -1, encode_checkpoint(fleet)),
    ])  # fmt: skip
    worker = DetectWorker(bootstrap, data, checkpoint_interval_s=0.2)
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(worker.run(stop))
        await wait_for(lambda: worker.stats.consumed >= expected, 60, "all read")
        stop.set()
        await asyncio.wait_for(task, 30)
    assert not target.exists()
    refused = [e for e in logs if e["event"] == "detect_checkpoint_refused"]
    assert [e["partition"] for e in refused] == [0]
    assert "not a nettel checkpoint" in refused[0]["reason"]
    assert worker.stats.consumed == expected
    saved = DetectStateTable(f"{data}/detect_state").load([0, 1, 2])
    assert decode_checkpoint(saved[0].blob, FleetDetector).identities  # a good one replaced it
