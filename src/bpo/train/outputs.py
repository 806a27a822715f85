"""One writer per output folder: `bpo train` and `bpo eval` hold OUT/.lock while they run.

Two runs into one --out would interleave metrics.jsonl lines and checkpoints, or write every
answer twice. The lock is `bpo.data.files.lock_directory` (the pair store's and the refs pass's);
its holder also writes who it is into the lock file, so the run refused can say which run holds
the folder. (The note would sit better in `lock_directory` itself; `bpo.evaluate` imports it from
here, a layer below it, until then.)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from bpo.data.files import LOCK, lock_directory


def _holder_note(verb: str) -> str:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"`{verb}` (pid {os.getpid()} on {socket.gethostname()}, started {started})"


def _read_holder(directory: Path) -> str:
    try:
        note = (directory / LOCK).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        note = ""
    return note or "another run"


@contextmanager
def lock_output(directory: str | Path, verb: str) -> Iterator[None]:
    """Hold DIRECTORY's lock while the block runs; DirectoryBusyError naming the holder if taken.

    A folder this call created and that holds only the lock at the end (the run failed before
    writing anything) is removed again, so a refused or failed run leaves nothing behind.

    Args:
        verb: what is writing, for the message another run gets ("bpo train").
    """
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    # Read before trying: the holder wrote its note when it took the lock.
    holder = _read_holder(directory)
    # Refused, the folder stays: the run holding it may have made it a moment ago.
    handle = lock_directory(
        directory, busy=f"it is held by {holder}; wait for it to finish, or choose another --out"
    )
    try:
        handle.truncate(0)
        handle.write(_holder_note(verb).encode("utf-8") + b"\n")
        handle.flush()
        yield
    finally:
        if created:
            _remove_if_empty(directory)  # while still held: no other run can have begun in it
        handle.close()


def _remove_if_empty(directory: Path) -> None:
    if [p.name for p in directory.iterdir()] == [LOCK]:
        (directory / LOCK).unlink()
        directory.rmdir()
