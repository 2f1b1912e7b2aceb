"""The on-disk spool of inputs on their way to the labelling queue.

Every input answered `queued_for_labelling: true` is a file here first, and its file is removed
only once Redis has it, so a service stopped or killed while Redis is away loses nothing: the
next start pushes what is left, oldest first. One file per input (the record as a JSON line,
then the image bytes), written under a temporary name and renamed, so a reader never sees half
an entry; files are never changed once written.

Durability: an entry is in the page cache before the answer is sent, so it survives the process
being stopped or killed at any moment; `sync` (the pusher calls it every second) fsyncs entries
still waiting, so a power loss or kernel crash loses at most about a second of them, Redis's
`appendfsync everysec` policy. Delivery is at least once: a crash between Redis taking an entry
and its file being removed pushes it again, which the queue counts as one more hit of the task.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from models.errors import HalflabelError
from models.queue import TaskRecord

SUFFIX = ".task"
LOCK_FILE = ".lock"
WORKER_PREFIX = "worker-"


class SpoolError(HalflabelError):
    """The spool directory cannot be used."""


class Spool:
    """A bounded directory of entries for one worker process; entries come out oldest first.

    `root` (HALFLABEL_SPOOL_DIR) belongs to one service (`held`). Each of the service's worker
    processes takes the first `worker-<n>` directory in it that no process holds, so no two write
    the same files and a worker restarted after a crash takes back the one it left; it also takes
    over the entries of every other directory no process holds (left by a run with more workers),
    so what a stopped service spooled is pushed whatever number of workers it restarts with.
    """

    def __init__(self, root: Path, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.directory, self._lock = _claim(root)
        for other in root.glob(f"{WORKER_PREFIX}*"):
            if other != self.directory:
                _adopt(other, self.directory)
        for path in root.glob(f"*{SUFFIX}"):  # spooled into the root, before worker directories
            with contextlib.suppress(FileNotFoundError):  # another worker took it first
                path.rename(self.directory / path.name)
        for leftover in self.directory.glob(f".*{SUFFIX}.tmp"):  # renames a crash interrupted
            leftover.unlink()
        paths = sorted(self.directory.glob(f"*{SUFFIX}"))
        self._entries = deque((path, path.stat().st_size) for path in paths)
        self._bytes = sum(size for _, size in self._entries)
        self._unsynced: list[Path] = []
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, record: TaskRecord, image: bytes) -> str | None:
        """Write an entry; None when written, else why not (spool full, or the disk refused)."""
        data = record.model_dump_json().encode() + b"\n" + image
        if len(self._entries) >= self.max_entries:
            return f"the spool holds its maximum of {self.max_entries} inputs"
        if self._bytes + len(data) > self.max_bytes:
            return f"the spool would exceed its {self.max_bytes} bytes"
        # Names sort in the order entries were written, across restarts too.
        name = f"{time.time_ns():020d}-{next(self._sequence):06d}-{record.id[:16]}{SUFFIX}"
        path, temporary = self.directory / name, self.directory / f".{name}.tmp"
        try:
            temporary.write_bytes(data)
            temporary.rename(path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            return f"the spool directory refused the write: {exc.strerror}"
        self._entries.append((path, len(data)))
        self._bytes += len(data)
        self._unsynced.append(path)
        return None

    def oldest(self) -> Path | None:
        return self._entries[0][0] if self._entries else None

    def remove_oldest(self) -> None:
        path, size = self._entries.popleft()
        path.unlink(missing_ok=True)
        self._bytes -= size

    def take_unsynced(self) -> list[Path]:
        """The entries written since the last call, for `sync` (which may run in a thread)."""
        unsynced, self._unsynced = self._unsynced, []
        return unsynced

    def sync(self, paths: list[Path]) -> None:
        """fsync these entries (those already pushed and removed are skipped) and the directory."""
        synced = False
        for path in paths:
            try:
                descriptor = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(descriptor)
                synced = True
            finally:
                os.close(descriptor)
        if synced:
            directory = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def close(self) -> None:
        """Release the directory for the next process."""
        os.close(self._lock)


def read_entry(path: Path) -> tuple[TaskRecord, bytes]:
    """An entry's record and image; ValueError when the file is not an entry."""
    record, _, image = path.read_bytes().partition(b"\n")
    return TaskRecord.model_validate_json(record), image


@contextlib.contextmanager
def held(root: Path) -> Iterator[None]:
    """Hold `root` for this service while inside; SpoolError if another service holds it."""
    lock = _try_lock(root)
    if lock is None:
        raise SpoolError(
            f"the spool directory {root} is in use by another service process; "
            "give each service its own HALFLABEL_SPOOL_DIR"
        )
    try:
        yield
    finally:
        os.close(lock)


def _claim(root: Path) -> tuple[Path, int]:
    """The first worker directory of `root` no process holds, and its lock."""
    index = 0
    while (lock := _try_lock(root / f"{WORKER_PREFIX}{index}")) is None:
        index += 1
    return root / f"{WORKER_PREFIX}{index}", lock


def _adopt(other: Path, directory: Path) -> None:
    """Move the entries of `other` into `directory`, unless a process holds `other`."""
    lock = _try_lock(other)
    if lock is None:
        return
    try:
        for path in other.glob(f"*{SUFFIX}"):
            path.rename(directory / path.name)  # names keep their order: they start with the time
    finally:
        os.close(lock)


def _try_lock(directory: Path) -> int | None:
    """Lock `directory` (creating it) for this process; None when another process holds it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise SpoolError(
            f"cannot use the spool directory {directory}: {exc.strerror}; "
            "set HALFLABEL_SPOOL_DIR to a writable directory"
        ) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return None
    return lock
