"""The label store: a Redis stream of labelled images, consumed by the trainer.

`LabellingQueue.label` appends one entry per labelled task (see docs/queue.md). The trainer
reads the entries it has not acknowledged through the consumer group `trainer` and
acknowledges them only once its dataset snapshot is on disk, so a crash in between loses
nothing: the entries are read again next time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import cast

import redis
from pydantic import BaseModel

from models.queue import DEFAULT_PREFIX, QueueKeys, TaskRecord

TRAINER_GROUP = "trainer"
Entry = tuple[bytes, dict[bytes, bytes]]  # a stream entry as redis-py returns it
_BATCH = 500


class LabelRecord(BaseModel):
    """One entry of the label store: a labelled image and what the model thought of it."""

    entry_id: str
    task_id: str
    label: str
    labeller: str
    labelled_at: datetime
    task: TaskRecord
    image: bytes


class LabelStore:
    """Read the label store: everything (exports) or what the trainer has not yet acknowledged."""

    def __init__(
        self, client: redis.Redis, prefix: str = DEFAULT_PREFIX, group: str = TRAINER_GROUP
    ) -> None:
        self.client = client
        self.stream = QueueKeys(prefix).labels
        self.group = group

    def count(self) -> int:
        """Number of entries in the store."""
        return int(self.client.xlen(self.stream))

    def all(self) -> Iterator[LabelRecord]:
        """Every entry, oldest first."""
        start = "-"
        while entries := cast(
            list[Entry], self.client.xrange(self.stream, min=start, count=_BATCH)
        ):
            yield from map(_parse, entries)
            start = "(" + entries[-1][0].decode()

    def unacknowledged(self, consumer: str = "retrain") -> list[LabelRecord]:
        """Entries the trainer group has not acknowledged: first those an earlier reader took
        and never acknowledged (it crashed), then new ones."""
        self._ensure_group()
        records = self._take_over_pending(consumer)
        while batch := cast(
            list[tuple[bytes, list[Entry]]],
            self.client.xreadgroup(self.group, consumer, {self.stream: ">"}, count=_BATCH),
        ):
            records += map(_parse, batch[0][1])
        return records

    def acknowledge(self, records: Iterable[LabelRecord]) -> int:
        """Mark entries as safely on disk; returns how many were newly acknowledged."""
        ids = [record.entry_id for record in records]
        return int(self.client.xack(self.stream, self.group, *ids)) if ids else 0

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _take_over_pending(self, consumer: str) -> list[LabelRecord]:
        records: list[LabelRecord] = []
        cursor = "0-0"
        while True:
            cursor, entries, *_ = self.client.xautoclaim(
                self.stream, self.group, consumer, min_idle_time=0, start_id=cursor, count=_BATCH
            )
            records += (_parse(entry) for entry in entries if entry[1])
            if cursor in (b"0-0", "0-0"):
                return records


def _parse(entry: Entry) -> LabelRecord:
    entry_id, raw = entry
    fields = {key.decode(): value for key, value in raw.items()}
    return LabelRecord(
        entry_id=entry_id.decode(),
        task_id=fields["task_id"].decode(),
        label=fields["label"].decode(),
        labeller=fields["labeller"].decode(),
        labelled_at=datetime.fromtimestamp(int(fields["labelled_at_ms"]) / 1000, UTC),
        task=TaskRecord.model_validate_json(fields["record"]),
        image=fields["image"],
    )
