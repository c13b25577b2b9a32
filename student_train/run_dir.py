"""The run's output directory: the checks before a run writes to it, its lock, and the metrics file a resumed run
cuts back to its checkpoint.

Rank 0 holds the output's lock (`storage/lock.py`) from before the output is checked until the run ends, so two runs
never write one directory; the checks name an output that is a file or cannot be written before any model loads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from storage.fs import Location
from storage.lock import OutputLock
from student_train.distributed import World

log = logging.getLogger(__name__)


def output_lock(output: Path, world: World) -> contextlib.AbstractContextManager:
    """The lock of the run's --output, held by rank 0 from before the output is checked to the end of the run."""
    if not world.is_main:
        return contextlib.nullcontext()
    check_writable(output)  # before the lock creates the directory
    return OutputLock(Location(output))


def check_writable(output: Path) -> None:
    """--output must name a directory, existing or to create, where this process can write.

    Raises:
        ValueError: it, or the nearest of its parents that exists, is a file or cannot be written.
    """
    existing = next(path for path in (output, *output.parents) if path.exists())
    if not existing.is_dir():
        raise ValueError(f"--output {output}: {existing} is a file, and --output names the run's directory; choose "
                         "another --output, or move the file away.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output {output}: {existing} is not writable (a read-only filesystem, or no write "
                         "permission); choose an --output where this user can write.")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records a run wrote after its last checkpoint (the resumed run writes them again), and a last line
    that a kill cut short in the middle of its writing.

    Raises:
        RuntimeError: a line before the last is not a JSON record.
    """
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise RuntimeError(f"{path}, line {number}: expected a JSON record, found {line[:80]!r} ({error}); "
                                   "repair or delete that line, then resume again.") from None
            log.warning("%s: dropping its last line, cut short by an interrupted write: %r", path, line[:80])
            continue
        if (record["eval"]["step"] if "eval" in record else record["step"]) <= step:
            kept.append(line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)
