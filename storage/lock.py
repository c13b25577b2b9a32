"""An exclusive lock on an output, so that two writers never write one store or training run at once.

Every writer of an output holds a lock file in it for as long as it runs: `teacher-cache build` (`.lock`; in a build
shared by several workers each worker locks only its own part, `.lock-worker-IIIII`, as the workers write one store
together), `teacher-cache merge` (`.lock` of the store it writes or finishes) and `student-train` (`.lock` in its
--output, taken by rank 0). The lock is taken before the output is checked, so no second writer can start between
the check and the first write, and it is removed when the writer ends, also when it fails.

The lock file is JSON: the owner's host, pid, process start time (from /proc where there is one, to tell a reused
pid apart), command and when it was taken. A lock whose owner was on this host and no longer runs is stale: it is
taken over, with a warning. A lock of a live process, or of another host (which cannot be checked from here),
refuses the second writer, naming the owner and the lock file to delete if that process is gone.

On local paths the lock file is created with O_CREAT | O_EXCL, which is atomic. On fsspec URLs it is created with
the filesystem's exclusive mode (`pipe_file(mode="create")`): atomic where the filesystem makes it a conditional
write (memory, and recent s3fs and gcsfs); fsspec's default for other filesystems checks, then writes, so there the
lock is a best effort that leaves a window of one round trip. Two writers that find the same stale lock at the same
moment take it over one at a time, under a second lock (`.lock.break`).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path

from storage.fs import Location

log = logging.getLogger(__name__)

# The lock of a whole output; workers of one build lock `.lock-worker-IIIII` instead. Every name starting with it is
# a lock file, which checks of whether an output is empty ignore.
LOCK_NAME = ".lock"
_KEYS = ("host", "pid", "start_time", "command", "since")


class LockError(RuntimeError):
    """An output is locked by another writer, or its lock file is damaged."""


def lock_name(worker_index: int | None = None) -> str:
    """The lock file of a whole output, or of one worker's part of a shared build."""
    return LOCK_NAME if worker_index is None else f"{LOCK_NAME}-worker-{worker_index:05d}"


def is_lock_file(name: str) -> bool:
    """Whether an entry of an output's directory is a lock file (not data of the output)."""
    return name.startswith(LOCK_NAME)


class OutputLock:
    """Holds the lock file `name` in `location` while its `with` block runs.

    Entering creates the output's directory if needed (and removes it again on exit when it is still empty).

    Raises:
        LockError: on entering, another writer holds the lock, or the lock file is damaged.
    """

    def __init__(self, location: Location, name: str = LOCK_NAME):
        self.location = location
        self.name = name
        self._created_root = False

    @property
    def path(self) -> str:
        return f"{self.location}/{self.name}"

    def __enter__(self) -> OutputLock:
        self._created_root = self.location.local and not self.location.exists()
        self.location.makedirs()
        self._take()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.location.remove_file(self.name)
        if self._created_root:
            with suppress(OSError):  # not empty: the output holds what this writer wrote
                os.rmdir(self.location.root)

    def _take(self) -> None:
        if self._create():
            return
        holder = self._holder()
        if holder is not None and not _is_stale(holder):
            raise LockError(self._refusal(holder))
        if holder is not None:
            with OutputLock(self.location, f"{self.name}.break"):  # one writer at a time takes a stale lock over
                holder = self._holder()
                if holder is not None and _is_stale(holder):
                    log.warning("taking over %s: its writer, pid %d on %s (%s), which took it at %s, no longer runs",
                                self.path, holder["pid"], holder["host"], holder["command"], holder["since"])
                    self.location.remove_file(self.name)
        if not self._create():  # another writer took the lock meanwhile
            raise LockError(self._refusal(self._holder()))

    def _create(self) -> bool:
        """Create the lock file with this process as its owner; False when it exists already."""
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": process_start_time(os.getpid()),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            self.location.create_exclusive(self.name, json.dumps(record).encode())
        except FileExistsError:
            return False
        return True

    def _holder(self) -> dict | None:
        """The owner recorded in the lock file; None when the file is gone (its writer has just finished)."""
        try:
            data = self.location.read_bytes(self.name)
        except FileNotFoundError:
            return None
        if not data:  # created an instant ago, its owner not yet written: a writer that started at the same moment
            raise LockError(self._refusal(None))
        try:
            holder = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            holder = None
        if (not isinstance(holder, dict) or any(key not in holder for key in _KEYS)
                or not isinstance(holder["pid"], int) or holder["pid"] <= 0):
            raise LockError(
                f"Lock file {self.path} is damaged: expected JSON naming its writer ({', '.join(_KEYS)}), found "
                f"{data[:200]!r}. If no other process writes to {self.location}, delete it and rerun."
            )
        return holder

    def _refusal(self, holder: dict | None) -> str:
        if holder is None:
            return f"{self.location} is locked by another writer that started at the same moment ({self.path})."
        here = holder["host"] == socket.gethostname()
        return (
            f"{self.location} is locked by another writer: `{holder['command']}`, pid {holder['pid']} on host "
            f"{holder['host']}, since {holder['since']} (lock file {self.path})"
            + ("." if here else "; it runs on another host, so whether it still runs cannot be checked from here.")
            + f" Wait for it to finish, or write to another output. If that process is gone (e.g. its node crashed), "
            f"delete {self.path} and rerun."
        )


def process_start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat); None without /proc or
    without such a process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count the fields after its ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _is_stale(holder: dict) -> bool:
    """True when the lock's writer was on this host and no longer runs (its pid is gone, or now another process's)."""
    if holder["host"] != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a process of another user: it exists
        pass
    started = process_start_time(holder["pid"])
    return None not in (started, holder["start_time"]) and started != holder["start_time"]
