"""The labelling queue against a real Redis: dedupe, priority, bound, leases, labels, waiting."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from conftest import REDIS_URL, TINY_CLASSES, grey_png

from models.labels import LabelStore
from models.queue import (
    Guess,
    LabellingQueue,
    LabelOutcome,
    TaskRecord,
    TaskStatus,
    UnknownClassError,
)


def record_for(image: bytes, uncertainty: float) -> TaskRecord:
    return TaskRecord(
        id=hashlib.sha256(image).hexdigest(),
        content_type="image/png",
        model_name="tiny",
        model_version=1,
        guesses=[Guess(label="dark", probability=0.5), Guess(label="light", probability=0.5)],
        entropy=uncertainty * 0.69,
        normalized_entropy=uncertainty,
    )


def queue(prefix: str, **options: float) -> LabellingQueue:
    return LabellingQueue.from_url(REDIS_URL, prefix, **options)


def push_greys(q: LabellingQueue, levels: range | list[int]) -> list[str]:
    """Queue one grey image per level, uncertainty rising with the level; returns the ids."""
    ids = []
    for level in levels:
        image = grey_png(level)
        q.push(record_for(image, level / 256), image)
        ids.append(hashlib.sha256(image).hexdigest())
    return ids


def test_same_image_twice_is_one_task_with_two_hits(queue_prefix: str) -> None:
    q = queue(queue_prefix)
    image = grey_png(128)
    assert q.push(record_for(image, 0.3), image) is True
    assert q.push(record_for(image, 0.9), image) is False
    assert q.depth() == 1
    (task,) = q.claim("ann")
    assert task.hits == 2
    assert task.record.normalized_entropy == 0.3  # the record is the first sighting's
    assert q.client.zscore(q.keys.pending, task.record.id) is None


def test_repeat_sighting_raises_priority(queue_prefix: str) -> None:
    q = queue(queue_prefix)
    low, high = grey_png(10), grey_png(20)
    q.push(record_for(low, 0.2), low)
    q.push(record_for(high, 0.5), high)
    q.push(record_for(low, 0.8), low)
    assert [t.record.id for t in q.claim("ann", limit=2)][0] == hashlib.sha256(low).hexdigest()


def test_a_newer_model_version_replaces_the_priority(queue_prefix: str) -> None:
    q = queue(queue_prefix)
    image, other = grey_png(10), grey_png(20)
    q.push(record_for(image, 0.9), image)
    q.push(record_for(other, 0.5), other)
    newer = record_for(image, 0.1).model_copy(update={"model_version": 2})
    q.push(newer, image)
    first, second = q.claim("ann", limit=2)
    assert first.record.id == hashlib.sha256(other).hexdigest()
    assert (second.record.model_version, second.record.normalized_entropy) == (2, 0.1)


def test_claims_most_uncertain_first(queue_prefix: str) -> None:
    q = queue(queue_prefix)
    ids = push_greys(q, [40, 200, 120, 90])
    claimed = [t.record.id for t in q.claim("ann", limit=3)]
    assert claimed == [ids[1], ids[2], ids[3]]
    assert q.depth() == 1


def test_full_queue_drops_the_least_uncertain_and_counts_it(queue_prefix: str) -> None:
    q = queue(queue_prefix, max_tasks=3)
    ids = push_greys(q, [50, 10, 200, 30, 100])
    assert q.depth() == 3
    assert q.stats().dropped == 2
    assert q.image(ids[1]) is None and q.task(ids[1]) is None  # level 10 was dropped
    assert [t.record.id for t in q.claim("ann", limit=5)] == [ids[2], ids[4], ids[0]]


def test_image_is_stored_under_a_ttl(queue_prefix: str) -> None:
    q = queue(queue_prefix)
    (task_id,) = push_greys(q, [128])
    assert q.image(task_id) == grey_png(128)
    assert q.client.ttl(q.keys.image(task_id)) > 7 * 24 * 3600


def test_claimed_task_is_invisible_until_its_lease_ends(queue_prefix: str) -> None:
    q = queue(queue_prefix, lease_seconds=0.3)
    (task_id,) = push_greys(q, [128])
    (task,) = q.claim("crashes")
    assert task.status is TaskStatus.CLAIMED and task.labeller == "crashes"
    assert q.claim("other") == []
    time.sleep(0.4)
    (again,) = q.claim("other")
    assert again.record.id == task_id and again.labeller == "other"
    assert q.stats().lease_expired == 1


def test_stats_count_an_expired_lease_as_pending_before_any_claim(queue_prefix: str) -> None:
    q = queue(queue_prefix, lease_seconds=0.3)
    push_greys(q, [120, 128])
    q.claim("crashes")
    held = q.stats()
    assert (held.pending, held.claimed, held.lease_expired) == (1, 1, 0)
    time.sleep(0.4)
    expired = q.stats()
    assert (expired.pending, expired.claimed, expired.lease_expired) == (2, 0, 1)
    q.claim("other", limit=2)  # moves the expired lease for real: counted once, not twice
    claimed = q.stats()
    assert (claimed.pending, claimed.claimed, claimed.lease_expired) == (0, 2, 1)


def test_pending_lists_waiting_tasks_with_images_and_claims_none(queue_prefix: str) -> None:
    q = queue(queue_prefix)
    low, mid, high = push_greys(q, [10, 100, 200])
    q.claim("ann")  # takes the most uncertain one
    listed = q.pending(limit=5)
    assert [(task.record.id, image) for task, image in listed] == [
        (mid, grey_png(100)), (low, grey_png(10))
    ]
    assert [task.record.id for task, _ in q.pending(limit=1)] == [mid]
    assert q.stats().pending == 2


def test_label_after_lease_expiry_is_accepted_while_unlabelled(queue_prefix: str) -> None:
    q = queue(queue_prefix, lease_seconds=0.1)
    (task_id,) = push_greys(q, [128])
    q.claim("slow")
    time.sleep(0.2)
    assert q.label(task_id, "dark", "slow", TINY_CLASSES) == (LabelOutcome.RECORDED, "dark")
    assert q.claim("other") == []


def test_same_label_twice_is_one_record(queue_prefix: str) -> None:
    q = queue(queue_prefix)
    (task_id,) = push_greys(q, [128])
    q.claim("ann")
    assert q.label(task_id, "light", "ann", TINY_CLASSES) == (LabelOutcome.RECORDED, "light")
    assert q.label(task_id, "light", "ann", TINY_CLASSES) == (LabelOutcome.DUPLICATE, "light")
    assert q.label(task_id, "dark", "bob", TINY_CLASSES) == (LabelOutcome.CONFLICT, "light")
    assert LabelStore(q.client, queue_prefix).count() == 1
    stats = q.stats()
    assert (stats.pending, stats.claimed, stats.labelled) == (0, 0, 1)
    task = q.task(task_id)
    assert task is not None and task.status is TaskStatus.LABELLED and task.label == "light"


def test_labelled_image_seen_again_is_not_queued_again(queue_prefix: str) -> None:
    q = queue(queue_prefix)
    (task_id,) = push_greys(q, [128])
    q.label(task_id, "dark", "ann", TINY_CLASSES)
    assert push_greys(q, [128]) == [task_id]
    assert q.depth() == 0


def test_unknown_class_and_unknown_task_are_refused(queue_prefix: str) -> None:
    q = queue(queue_prefix)
    (task_id,) = push_greys(q, [128])
    with pytest.raises(UnknownClassError, match="use one of: dark, light"):
        q.label(task_id, "purple", "ann", TINY_CLASSES)
    assert q.label("0" * 64, "dark", "ann", TINY_CLASSES) == (LabelOutcome.UNKNOWN_TASK, None)
    assert LabelStore(q.client, queue_prefix).count() == 0


def test_release_returns_the_task_at_once_and_only_by_its_holder(queue_prefix: str) -> None:
    q = queue(queue_prefix)
    (task_id,) = push_greys(q, [128])
    q.claim("ann")
    assert q.release(task_id, "bob") is False
    assert q.claim("bob") == []
    assert q.release(task_id, "ann") is True
    assert [t.record.id for t in q.claim("bob")] == [task_id]


def test_wait_blocks_until_a_task_is_pushed(queue_prefix: str) -> None:
    q = queue(queue_prefix)
    pusher = threading.Timer(0.3, push_greys, (queue(queue_prefix), [128]))
    started = time.monotonic()
    pusher.start()
    tasks = q.wait_and_claim("ann", timeout=10)
    assert len(tasks) == 1
    assert 0.25 < time.monotonic() - started < 2


def test_wait_wakes_when_a_lease_expires(queue_prefix: str) -> None:
    holder = queue(queue_prefix, lease_seconds=0.5)
    push_greys(holder, [128])
    holder.claim("crashes")
    started = time.monotonic()
    assert len(queue(queue_prefix).wait_and_claim("ann", timeout=10)) == 1
    assert 0.4 < time.monotonic() - started < 2


def test_wait_gives_up_after_its_timeout(queue_prefix: str) -> None:
    started = time.monotonic()
    assert queue(queue_prefix).wait_and_claim("ann", timeout=0.3) == []
    assert 0.25 < time.monotonic() - started < 2


def test_concurrent_claimers_never_share_a_task_and_lose_none(queue_prefix: str) -> None:
    ids = push_greys(queue(queue_prefix), range(1, 61))
    claims: list[tuple[str, str]] = []

    def work(labeller: str) -> list[LabelOutcome]:
        q = queue(queue_prefix)  # own connection pool, as a separate labeller would have
        outcomes = []
        while tasks := q.claim(labeller, limit=3):
            for task in tasks:
                claims.append((labeller, task.record.id))
                outcomes.append(q.label(task.record.id, "dark", labeller, TINY_CLASSES)[0])
        return outcomes

    with ThreadPoolExecutor(8) as pool:
        outcomes = [o for result in pool.map(work, [f"l{i}" for i in range(8)]) for o in result]

    claimed_ids = [task_id for _, task_id in claims]
    assert sorted(claimed_ids) == sorted(ids)  # each task claimed exactly once
    assert len({labeller for labeller, _ in claims}) > 1
    assert outcomes == [LabelOutcome.RECORDED] * len(ids)
    assert LabelStore(redis.Redis.from_url(REDIS_URL), queue_prefix).count() == len(ids)


def test_crashed_labellers_lose_nothing(queue_prefix: str) -> None:
    ids = push_greys(queue(queue_prefix), range(1, 31))
    labelled: list[str] = []

    def work(labeller: str, crash_every: int) -> None:
        q = queue(queue_prefix, lease_seconds=0.3)
        seen = 0
        while tasks := q.wait_and_claim(labeller, limit=2, timeout=1.0):
            for task in tasks:
                seen += 1
                if crash_every and seen % crash_every == 0:
                    continue  # walks away holding the lease
                assert q.label(task.record.id, "light", labeller, TINY_CLASSES)[0] == (
                    LabelOutcome.RECORDED
                )
                labelled.append(task.record.id)

    workers = [threading.Thread(target=work, args=(f"l{i}", 2 if i < 2 else 0)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    assert sorted(labelled) == sorted(ids)
    stats = queue(queue_prefix).stats()
    assert (stats.pending, stats.claimed, stats.labelled) == (0, 0, len(ids))
    assert stats.lease_expired > 0
