"""The labelling queue in Redis: key names and record shapes shared by service and trainer.

Keys (all under one prefix, `halflabel` by default; see docs/queue.md):
- `{prefix}:q:v1:pending`   sorted set of task ids, score = normalized entropy (most uncertain first)
- `{prefix}:q:v1:task:{id}` hash: the task record (TaskRecord fields, JSON-encoded values)
- `{prefix}:q:v1:image:{id}` the image bytes, under a TTL longer than the task's life

A task id is the sha256 of the image bytes, so the same image queued twice is one task.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import redis
from pydantic import BaseModel, Field

QUEUE_SCHEMA = "v1"
DEFAULT_PREFIX = "halflabel"
DEFAULT_MAX_TASKS = 10_000
IMAGE_TTL_SECONDS = 30 * 24 * 3600


class Guess(BaseModel):
    """One of the model's top guesses for a queued input."""

    label: str
    probability: float


class TaskRecord(BaseModel):
    """What the service knew about an input when it queued it."""

    id: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the image bytes")
    content_type: str
    model_name: str
    model_version: int
    guesses: list[Guess]
    entropy: float
    normalized_entropy: float = Field(ge=0, le=1)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class QueueKeys:
    """Every Redis key the queue uses, derived from one prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.base = f"{prefix}:q:{QUEUE_SCHEMA}"
        self.pending = f"{self.base}:pending"
        self.dropped = f"{self.base}:dropped"

    def task(self, task_id: str) -> str:
        return f"{self.base}:task:{task_id}"

    def image(self, task_id: str) -> str:
        return f"{self.base}:image:{task_id}"


# New task: store record + image, rank it; over capacity, drop the least uncertain.
# Known task: count the hit and keep the higher uncertainty.
_PUSH = """
local pending, task, image, dropped = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, score, fields, bytes = ARGV[1], tonumber(ARGV[2]), cjson.decode(ARGV[3]), ARGV[4]
local ttl, max_tasks, base = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
if redis.call('EXISTS', task) == 1 then
  redis.call('HINCRBY', task, 'hits', 1)
  local current = redis.call('ZSCORE', pending, id)
  if current and tonumber(current) < score then redis.call('ZADD', pending, score, id) end
  return 0
end
for k, v in pairs(fields) do redis.call('HSET', task, k, v) end
redis.call('HSET', task, 'hits', 1, 'status', 'pending')
redis.call('SET', image, bytes, 'EX', ttl)
redis.call('ZADD', pending, score, id)
while redis.call('ZCARD', pending) > max_tasks do
  local victim = redis.call('ZPOPMIN', pending)[1]
  redis.call('DEL', base .. ':task:' .. victim, base .. ':image:' .. victim)
  redis.call('INCR', dropped)
end
return 1
"""


class LabellingQueue:
    """Producer side of the queue: push uncertain inputs, deduplicated and bounded."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = DEFAULT_PREFIX,
        max_tasks: int = DEFAULT_MAX_TASKS,
    ) -> None:
        self.client = client
        self.keys = QueueKeys(prefix)
        self.max_tasks = max_tasks
        self._push = client.register_script(_PUSH)

    def push(self, record: TaskRecord, image: bytes) -> bool:
        """Queue an input; True if it is a new task, False if it raised a known one's hit count."""
        fields = {k: _encode(v) for k, v in record.model_dump(mode="json").items()}
        keys = [self.keys.pending, self.keys.task(record.id), self.keys.image(record.id)]
        args = [record.id, record.normalized_entropy, _json(fields), image]
        args += [IMAGE_TTL_SECONDS, self.max_tasks, self.keys.base]
        return bool(self._push(keys=[*keys, self.keys.dropped], args=args))

    def depth(self) -> int:
        """Number of tasks waiting to be claimed."""
        return int(self.client.zcard(self.keys.pending))


def _encode(value: object) -> str:
    return value if isinstance(value, str) else _json(value)


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))
