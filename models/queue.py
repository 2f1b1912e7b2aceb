"""The labelling queue in Redis, shared by the service (producer), labellers and the trainer.

Every key lives under `{prefix}:q:v1:`; docs/queue.md is the versioned description of the keys
and record shapes for consumers that read Redis directly. Each operation that touches more than
one key is one Lua script, so several service replicas and labellers can share one Redis:
a task is claimed by one labeller at a time and never lost.

A task id is the sha256 of the image bytes, so the same image queued twice is one task.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import cast

import redis
from pydantic import BaseModel, Field

from models.errors import UnknownClassError

QUEUE_SCHEMA = "v1"
DEFAULT_PREFIX = "halflabel"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_MAX_TASKS = 10_000
DEFAULT_LEASE_SECONDS = 300.0
IMAGE_TTL_SECONDS = 30 * 24 * 3600
LABELLED_TASK_TTL_SECONDS = IMAGE_TTL_SECONDS  # how long a labelled image stays deduplicated
TASK_ID_PATTERN = r"^[0-9a-f]{64}$"


class Guess(BaseModel):
    """One of the model's top guesses for a queued input."""

    label: str
    probability: float


class TaskRecord(BaseModel):
    """What the service knew about an input when it queued it."""

    id: str = Field(pattern=TASK_ID_PATTERN, description="sha256 of the image bytes")
    content_type: str
    model_name: str
    model_version: int
    guesses: list[Guess]
    entropy: float
    normalized_entropy: float = Field(ge=0, le=1)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class TaskStatus(StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    LABELLED = "labelled"


class Task(BaseModel):
    """A task as stored: the record plus its place in the labelling life cycle."""

    record: TaskRecord
    status: TaskStatus
    hits: int = Field(description="How many times the service saw this image")
    labeller: str | None = None
    lease_expires_at: datetime | None = None
    label: str | None = None


class LabelOutcome(StrEnum):
    """What happened to a label: new record, repeat of the same label, or refused."""

    RECORDED = "recorded"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"  # the task already has a different label
    UNKNOWN_TASK = "unknown_task"
    IMAGE_EXPIRED = "image_expired"


class QueueKeys:
    """Every Redis key the queue uses, derived from one prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.base = f"{prefix}:q:{QUEUE_SCHEMA}"
        self.pending = f"{self.base}:pending"
        self.leases = f"{self.base}:leases"
        self.wakeup = f"{self.base}:wakeup"
        self.labels = f"{self.base}:labels"
        self.counters = f"{self.base}:counters"

    def task(self, task_id: str) -> str:
        return f"{self.base}:task:{task_id}"

    def image(self, task_id: str) -> str:
        return f"{self.base}:image:{task_id}"


# The Redis server's clock in Unix ms, so every replica agrees on when a lease ends.
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# New task: store record + image, rank it, wake one waiting labeller; over capacity, drop the
# least uncertain. Known task: count the hit; while it waits, a newer version of the model
# replaces the record and priority (its opinion is the one that matters now), and within one
# version the higher uncertainty is kept.
_PUSH = """
local pending, task, image, wakeup, counters = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, score, record, bytes = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local ttl, max_tasks, base = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
if redis.call('EXISTS', task) == 1 then
  redis.call('HINCRBY', task, 'hits', 1)
  local current = redis.call('ZSCORE', pending, id)
  if not current then return 0 end
  local seen, now = cjson.decode(redis.call('HGET', task, 'record')), cjson.decode(record)
  local newer = seen.model_name == now.model_name and seen.model_version < now.model_version
  if newer or tonumber(current) < score then
    redis.call('ZADD', pending, score, id)
    redis.call('HSET', task, 'priority', score)
  end
  if newer then redis.call('HSET', task, 'record', record) end
  return 0
end
redis.call('HSET', task, 'record', record, 'hits', 1, 'status', 'pending', 'priority', score)
redis.call('SET', image, bytes, 'EX', ttl)
redis.call('ZADD', pending, score, id)
redis.call('LPUSH', wakeup, id)
redis.call('LTRIM', wakeup, 0, max_tasks - 1)
while redis.call('ZCARD', pending) > max_tasks do
  local victim = redis.call('ZPOPMIN', pending)[1]
  redis.call('DEL', base .. ':task:' .. victim, base .. ':image:' .. victim)
  redis.call('HINCRBY', counters, 'dropped', 1)
end
return 1
"""

# Return expired leases to the queue, then claim up to `limit` of the most uncertain tasks.
# Tasks whose image expired are discarded.
_CLAIM = _NOW_MS + """
local pending, leases, wakeup, counters = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local limit, lease_ms, labeller, base = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
for _, id in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now)) do
  local task = base .. ':task:' .. id
  redis.call('ZREM', leases, id)
  if redis.call('HGET', task, 'status') == 'claimed' then
    redis.call('HSET', task, 'status', 'pending')
    redis.call('HDEL', task, 'labeller', 'lease_expires_ms')
    redis.call('ZADD', pending, redis.call('HGET', task, 'priority'), id)
    redis.call('HINCRBY', counters, 'lease_expired', 1)
  end
end
local claimed = {}
while #claimed < limit do
  local popped = redis.call('ZPOPMAX', pending)
  if #popped == 0 then break end
  local id = popped[1]
  local task, image = base .. ':task:' .. id, base .. ':image:' .. id
  if redis.call('EXISTS', image) == 1 then
    redis.call('HSET', task, 'status', 'claimed', 'labeller', labeller,
      'lease_expires_ms', now + lease_ms)
    redis.call('ZADD', leases, now + lease_ms, id)
    claimed[#claimed + 1] = id
  else
    redis.call('DEL', task)
    redis.call('HINCRBY', counters, 'image_expired', 1)
  end
end
-- Wake-up tokens only matter while something waits; clearing them here cannot lose a wake-up
-- because a later push adds a fresh one.
if redis.call('ZCARD', pending) == 0 then redis.call('DEL', wakeup) end
return claimed
"""

# Record a label once: the first label of an unlabelled task wins, whoever holds its lease and
# whether or not the lease has run out; the same label again is a duplicate, not a new record.
_LABEL = _NOW_MS + """
local task, image, pending, leases = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local labels, counters = KEYS[5], KEYS[6]
local id, label, labeller, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local status = redis.call('HGET', task, 'status')
if not status then return {'unknown_task', ''} end
if status == 'labelled' then
  local existing = redis.call('HGET', task, 'label')
  if existing == label then return {'duplicate', existing} end
  return {'conflict', existing}
end
local bytes = redis.call('GET', image)
if not bytes then return {'image_expired', ''} end
local entry = redis.call('XADD', labels, '*', 'schema', 'v1', 'task_id', id, 'label', label,
  'labeller', labeller, 'labelled_at_ms', now, 'record', redis.call('HGET', task, 'record'),
  'image', bytes)
redis.call('ZREM', pending, id)
redis.call('ZREM', leases, id)
redis.call('HSET', task, 'status', 'labelled', 'label', label, 'labeller', labeller,
  'label_entry', entry)
redis.call('HDEL', task, 'lease_expires_ms')
redis.call('EXPIRE', task, ttl)
redis.call('DEL', image)
redis.call('HINCRBY', counters, 'labelled', 1)
return {'recorded', label}
"""

# Give a claimed task back before its lease ends (only its holder can).
_RELEASE = """
local task, pending, leases, wakeup = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, labeller = ARGV[1], ARGV[2]
if redis.call('HGET', task, 'status') ~= 'claimed' then return 0 end
if redis.call('HGET', task, 'labeller') ~= labeller then return 0 end
redis.call('ZREM', leases, id)
redis.call('HSET', task, 'status', 'pending')
redis.call('HDEL', task, 'labeller', 'lease_expires_ms')
redis.call('ZADD', pending, redis.call('HGET', task, 'priority'), id)
redis.call('LPUSH', wakeup, id)
return 1
"""

# Counts as of now: a lease past its expiry already counts as pending and lease_expired, though
# only the next claim moves it (so stats stay a read, and agree with what that claim will do).
_STATS = _NOW_MS + """
local pending, leases, counters = KEYS[1], KEYS[2], KEYS[3]
local expired = redis.call('ZCOUNT', leases, '-inf', now)
return {redis.call('ZCARD', pending) + expired, redis.call('ZCARD', leases) - expired, expired,
  redis.call('HGETALL', counters)}
"""


class QueueStats(BaseModel):
    """Counts of the queue's tasks and what happened to them."""

    pending: int
    claimed: int
    labelled: int
    dropped: int = Field(description="Tasks dropped because the queue was full")
    lease_expired: int = Field(description="Claims whose lease ran out before a label")
    image_expired: int


class LabellingQueue:
    """The queue: the service pushes uncertain inputs; labellers claim, fetch, label, release."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = DEFAULT_PREFIX,
        max_tasks: int = DEFAULT_MAX_TASKS,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.keys = QueueKeys(prefix)
        self.max_tasks = max_tasks
        self.lease_seconds = lease_seconds
        self._push = client.register_script(_PUSH)
        self._claim = client.register_script(_CLAIM)
        self._label = client.register_script(_LABEL)
        self._release = client.register_script(_RELEASE)
        self._stats = client.register_script(_STATS)

    @classmethod
    def from_url(cls, url: str, prefix: str = DEFAULT_PREFIX, **options: float) -> LabellingQueue:
        """A queue on the Redis server at `url`, e.g. `redis://127.0.0.1:6379/0`."""
        return cls(redis.Redis.from_url(url), prefix, **options)  # type: ignore[arg-type]

    def push(self, record: TaskRecord, image: bytes) -> bool:
        """Queue an input; True if it is a new task, False if it raised a known one's hit count."""
        keys = [self.keys.pending, self.keys.task(record.id), self.keys.image(record.id)]
        keys += [self.keys.wakeup, self.keys.counters]
        args: list[str | bytes | float] = [record.id, record.normalized_entropy]
        args += [record.model_dump_json(), image, IMAGE_TTL_SECONDS, self.max_tasks, self.keys.base]
        return bool(self._push(keys=keys, args=args))

    def claim(self, labeller: str, limit: int = 1) -> list[Task]:
        """Lease up to `limit` of the most uncertain tasks to `labeller`, most uncertain first."""
        keys = [self.keys.pending, self.keys.leases, self.keys.wakeup, self.keys.counters]
        lease_ms = int(self.lease_seconds * 1000)
        ids = self._claim(keys=keys, args=[limit, lease_ms, labeller, self.keys.base])
        tasks = (self.task(task_id.decode()) for task_id in ids)
        return [task for task in tasks if task is not None]

    def wait_and_claim(self, labeller: str, limit: int = 1, timeout: float = 30.0) -> list[Task]:
        """Like `claim`, but block up to `timeout` seconds for a task instead of returning none.

        Blocks on the wake-up list a push or release writes to, and on the next lease expiry;
        it never polls.
        """
        deadline = time.monotonic() + timeout
        while not (tasks := self.claim(labeller, limit)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            wait = min(remaining, self._seconds_to_next_lease_expiry())
            # BLPOP takes whole or fractional seconds; 0 would mean forever.
            self.client.blpop([self.keys.wakeup], timeout=max(wait, 0.01))
        return tasks

    def task(self, task_id: str) -> Task | None:
        """The stored task, or None if there is no such task."""
        return _parse_task(self.client.hgetall(self.keys.task(task_id)))  # type: ignore[arg-type]

    def pending(self, limit: int) -> list[tuple[Task, bytes]]:
        """Up to `limit` waiting tasks with their images, most uncertain first; claims nothing.

        A task labelled, dropped or expired between the two reads is left out.
        """
        ranked = cast(list[bytes], self.client.zrevrange(self.keys.pending, 0, limit - 1))
        ids = [task_id.decode() for task_id in ranked]
        with self.client.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hgetall(self.keys.task(task_id))
                pipe.get(self.keys.image(task_id))
            replies = pipe.execute()
        pairs = zip(replies[::2], replies[1::2], strict=True)
        found = ((_parse_task(raw), image) for raw, image in pairs)
        return [(task, image) for task, image in found if task is not None and image is not None]

    def image(self, task_id: str) -> bytes | None:
        """The image bytes of a task not yet labelled, or None once labelled or expired."""
        return self.client.get(self.keys.image(task_id))  # type: ignore[return-value]

    def label(
        self, task_id: str, label: str, labeller: str, classes: tuple[str, ...] | list[str]
    ) -> tuple[LabelOutcome, str | None]:
        """Record `label` for a task into the label store, at most once.

        `classes` are the classes of the model that queued the task. Returns the outcome and the
        label the task now has (the earlier one on a conflict).
        """
        if label not in classes:
            raise UnknownClassError(
                f"label {label!r} is not a class of this model; use one of: {', '.join(classes)}"
            )
        keys = [self.keys.task(task_id), self.keys.image(task_id), self.keys.pending]
        keys += [self.keys.leases, self.keys.labels, self.keys.counters]
        outcome, current = self._label(
            keys=keys, args=[task_id, label, labeller, LABELLED_TASK_TTL_SECONDS]
        )
        return LabelOutcome(outcome.decode()), current.decode() or None

    def release(self, task_id: str, labeller: str) -> bool:
        """Give a claimed task back to the queue now; False unless `labeller` holds it."""
        keys = [self.keys.task(task_id), self.keys.pending, self.keys.leases, self.keys.wakeup]
        return bool(self._release(keys=keys, args=[task_id, labeller]))

    def depth(self) -> int:
        """Number of tasks waiting to be claimed."""
        return int(self.client.zcard(self.keys.pending))

    def stats(self) -> QueueStats:
        """Queue depth, claims in flight, and lifetime counters, with leases past their expiry
        counted as pending (and lease_expired) at once."""
        keys = [self.keys.pending, self.keys.leases, self.keys.counters]
        pending, claimed, expired, flat = self._stats(keys=keys)
        counts = {k.decode(): int(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}
        return QueueStats(
            pending=pending,
            claimed=claimed,
            labelled=counts.get("labelled", 0),
            dropped=counts.get("dropped", 0),
            lease_expired=counts.get("lease_expired", 0) + expired,
            image_expired=counts.get("image_expired", 0),
        )

    def _seconds_to_next_lease_expiry(self) -> float:
        earliest = cast(
            list[tuple[bytes, float]], self.client.zrange(self.keys.leases, 0, 0, withscores=True)
        )
        if not earliest:
            return float("inf")
        server_seconds, micros = self.client.time()
        now_ms = int(server_seconds) * 1000 + int(micros) / 1000
        return max((earliest[0][1] - now_ms) / 1000, 0.0)


def _parse_task(raw: dict[bytes, bytes]) -> Task | None:
    fields = {key.decode(): value.decode() for key, value in raw.items()}
    if "record" not in fields:
        return None
    lease_ms = fields.get("lease_expires_ms")
    return Task(
        record=TaskRecord.model_validate_json(fields["record"]),
        status=TaskStatus(fields["status"]),
        hits=int(fields["hits"]),
        labeller=fields.get("labeller"),
        lease_expires_at=datetime.fromtimestamp(int(lease_ms) / 1000, UTC) if lease_ms else None,
        label=fields.get("label"),
    )
