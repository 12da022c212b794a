"""Windows a lost broker log still had open, rebuilt from the ``samples`` table.

The embedded broker keeps its log in memory: when nettel is killed, the log goes with
it, and so do the events of every window the stream worker had not written yet. Those
events were also appended to ``samples`` (every flush, before the windows), with their
log ``epoch`` and ``offset``. So when a worker starts on a fresh log, each earlier
epoch's partitions whose ``samples`` point is past the ``minute`` table's replay point
are replayed from ``samples`` exactly as they would be from the log (the replay point
skips what was written), every rebuilt window is written as a partial row, and the
epoch's point is moved to the end of its samples, all in one commit: so ``samples``,
``minute`` and, once rolled, ``hour`` and ``day`` agree again, and a crash during the
recovery only means it is done again.

Events never appended to ``samples`` are gone with the log here; the ingest side counts
them again from the last durable reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from nettel.models import ReplayPoint, WindowAggregate
from nettel.store.minute import MinuteTable, PartitionPoint
from nettel.store.samples import SamplesTable
from nettel.stream.windows import PartitionWindows

log = structlog.get_logger(__name__)

#: How many epochs before the current one are looked at. Only the last epoch of a
#: killed run can be left unwritten (rotations write everything first), and an earlier
#: one only if recoveries were killed too.
EPOCHS_LOOKED_BACK = 16


@dataclass(frozen=True, slots=True)
class Recovered:
    """What one recovery wrote: per epoch, the partitions and how much."""

    epoch: int
    partitions: list[int]
    samples: int
    rows: int


def rebuild(samples: SamplesTable, epoch: int, partition: int, point: ReplayPoint | None,
            end: int, grace_ms: int) -> tuple[list[WindowAggregate], ReplayPoint, int]:  # fmt: skip
    """The rows the samples of ``partition`` at offsets from ``point``'s resume offset
    to ``end`` add (every window sealed), the point to store with them, and how many
    samples were read."""
    start = 0 if point is None else point.resume_offset
    windows = PartitionWindows(grace_ms, replay=point)
    events = samples.unwritten(epoch, partition, start, end)
    for offset, ev in events:
        windows.add(ev, offset)  # accepted once: the same sequence is accepted again
    windows.seal()
    rows = windows.close_ready()
    for row in rows:
        row.partition = partition
    time_ms = windows.event_time_ms
    return rows, ReplayPoint(end, time_ms, end, time_ms), len(events)


def recover_lost_logs(
    minute: MinuteTable, samples: SamplesTable, *, writer: str, topic: str, epoch: int,
    partitions: Sequence[int], grace_ms: int,
) -> list[Recovered]:  # fmt: skip
    """Write what earlier epochs' logs held in open windows for ``partitions`` (blocking).

    ``epoch`` is the current log's, which began empty with the caller.
    """
    epochs = [e for e in range(epoch - 1, epoch - 1 - EPOCHS_LOOKED_BACK, -1) if e >= 1]
    ends = samples.stored_offsets_of_epochs(writer, topic, partitions, epochs)
    if not ends:
        return []
    points = minute.replay_points_of_epochs(writer, topic, partitions, epochs)
    done: list[Recovered] = []
    for old in sorted({e for e, _ in ends}):
        rows: list[WindowAggregate] = []
        moved: list[PartitionPoint] = []
        read = 0
        for (e, p), end in sorted(ends.items()):
            point = points.get((e, p))
            if e != old or (point is not None and point.resume_offset >= end):
                continue
            more, new_point, n = rebuild(samples, e, p, point, end, grace_ms)
            rows += more
            read += n
            moved.append(PartitionPoint(topic, p, new_point))
        if not moved:
            continue
        minute.append(rows, moved, writer=writer, epoch=old)
        recovered = Recovered(old, [m.partition for m in moved], read, len(rows))
        log.warning("stream_lost_log_recovered", epoch=old, partitions=recovered.partitions,
                    samples=read, rows=len(rows))  # fmt: skip
        done.append(recovered)
    return done
