"""The on-disk spool: entries persist across processes in order, bounded, a directory per worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.queue import Guess, TaskRecord
from service.spool import Spool, SpoolError, held, read_entry


def record(n: int) -> TaskRecord:
    return TaskRecord(id=f"{n:064x}", content_type="image/png", model_name="tiny", model_version=1,
                      guesses=[Guess(label="dark", probability=0.5)], entropy=0.69,
                      normalized_entropy=1.0)


def test_entries_come_back_oldest_first_after_a_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_entries=10, max_bytes=10**6)
    records = [record(n) for n in range(3)]
    for n in range(3):
        assert spool.add(records[n], b"image %d\n\x00" % n) is None
    spool.close()
    (spool.directory / f".{'0' * 20}-x.task.tmp").write_bytes(b"half")  # a crash's half rename

    reopened = Spool(tmp_path, max_entries=10, max_bytes=10**6)
    assert reopened.directory == spool.directory
    assert len(reopened) == 3 and not list(tmp_path.glob("*/.*.tmp"))
    for n in range(3):
        oldest = reopened.oldest()
        assert oldest is not None and read_entry(oldest) == (records[n], b"image %d\n\x00" % n)
        reopened.remove_oldest()
        assert not oldest.exists()
    assert reopened.oldest() is None
    reopened.close()


def test_the_spool_refuses_entries_beyond_its_bounds(tmp_path: Path) -> None:
    by_count = Spool(tmp_path / "count", max_entries=1, max_bytes=10**6)
    assert by_count.add(record(0), b"x") is None
    assert by_count.add(record(1), b"x") == "the spool holds its maximum of 1 inputs"
    by_bytes = Spool(tmp_path / "bytes", max_entries=10, max_bytes=1000)
    assert by_bytes.add(record(0), b"x" * 400) is None
    assert "would exceed its 1000 bytes" in str(by_bytes.add(record(1), b"x" * 400))
    by_bytes.remove_oldest()
    assert by_bytes.add(record(1), b"x" * 400) is None  # removing frees the space


def test_sync_skips_entries_already_pushed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_entries=10, max_bytes=10**6)
    spool.add(record(0), b"a")
    spool.add(record(1), b"b")
    spool.remove_oldest()
    spool.sync(spool.take_unsynced())
    assert spool.take_unsynced() == []


def test_workers_write_apart_and_a_restart_takes_over_what_no_worker_holds(tmp_path: Path) -> None:
    first, second = (Spool(tmp_path, max_entries=10, max_bytes=10**6) for _ in range(2))
    assert first.directory != second.directory
    for n in range(4):  # interleaved, as two workers write
        assert (first, second)[n % 2].add(record(n), b"%d" % n) is None
    third = Spool(tmp_path, max_entries=10, max_bytes=10**6)
    assert len(third) == 0  # the others are held: nothing taken from a live worker
    first.close()
    second.close()
    third.close()

    alone = Spool(tmp_path, max_entries=10, max_bytes=10**6)  # fewer workers than last time
    order = []
    while (oldest := alone.oldest()) is not None:
        order.append(read_entry(oldest)[0].id)
        alone.remove_oldest()
    assert order == [record(n).id for n in range(4)]
    assert not list(tmp_path.glob("*/*.task"))


def test_a_root_serves_one_service_at_a_time(tmp_path: Path) -> None:
    with (held(tmp_path), pytest.raises(SpoolError, match="in use by another service process"),
          held(tmp_path)):
        pass
    with held(tmp_path):
        pass


def test_an_unwritable_directory_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpoolError, match="set HALFLABEL_SPOOL_DIR to a writable directory"):
        Spool(blocker / "spool", max_entries=1, max_bytes=1)


def test_entries_spooled_into_the_root_by_an_older_release_are_taken_over(tmp_path: Path) -> None:
    before = Spool(tmp_path, max_entries=10, max_bytes=10**6)
    for n in range(2):
        assert before.add(record(n), b"%d" % n) is None
    before.close()
    for path in before.directory.glob("*.task"):  # where releases without workers kept them
        path.rename(tmp_path / path.name)

    after = Spool(tmp_path, max_entries=10, max_bytes=10**6)
    assert not list(tmp_path.glob("*.task"))
    order = []
    while (oldest := after.oldest()) is not None:
        order.append(read_entry(oldest)[0].id)
        after.remove_oldest()
    assert order == [record(n).id for n in range(2)]
