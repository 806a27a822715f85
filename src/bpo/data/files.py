"""The file handling every stage shares: JSON Lines, atomic writes, directory locks.

JSON Lines, one policy for a cut last line. bpo appends to some files while it runs (a pair
store's shards, refs files, answer files, reply caches), one whole line per write; a kill can cut
the last line short. In such a file (`appended=True`) readers skip a last line that has no
newline and does not parse, and a writer reopening the file first repairs it
(`truncate_partial_line`: a cut line is removed, a whole one missing only its newline gets it).
Files bpo only reads (datasets, benchmarks, answer files given to it) have no writer, so a line
that does not parse is damage wherever it is. Blank lines are skipped everywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per directory is then on the user.
    fcntl = None

LOCK = ".lock"


class JsonLinesError(ValueError):
    """A line of a JSON Lines file that does not parse."""


@dataclass
class BadLine:
    """Why one line could not be read (not UTF-8, not JSON)."""

    message: str


def _parse(raw: bytes, first: bool) -> Any:
    try:
        return json.loads(raw.decode("utf-8-sig" if first else "utf-8"))
    except UnicodeDecodeError as exc:
        return BadLine(f"not valid UTF-8 ({exc})")
    except json.JSONDecodeError as exc:
        return BadLine(f"not valid JSON ({exc})")


def iter_json_lines(path: str | Path, *, appended: bool) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed value or BadLine) for each non-blank line.

    appended: the file is one bpo appends to, so a last line cut short by a kill is skipped.
    """
    with Path(path).open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            value = _parse(raw, number == 1)
            if isinstance(value, BadLine) and appended and not raw.endswith(b"\n"):
                return  # the line a writer was cut off in; it repairs the file when it reopens
            yield number, value


def read_json_lines(
    path: str | Path,
    *,
    appended: bool,
    fix: str = "fix or delete the line",
    error: type[Exception] = JsonLinesError,
) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each line; a line that does not parse raises `error` naming it.

    fix: what the message tells the user to do about a damaged line.
    """
    for number, value in iter_json_lines(path, appended=appended):
        if isinstance(value, BadLine):
            raise error(f"{path} line {number}: {value.message}; {fix}")
        yield number, value


def json_line(record: Any) -> bytes:
    """One record as a JSON line (UTF-8, no NaN), ready for one write."""
    return (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def append_json_lines(path: str | Path, records: Iterable[Any]) -> None:
    """Append records to a JSON Lines file in one write, flushed (a kill cuts one line at most)."""
    with Path(path).open("ab") as f:
        f.write(b"".join(json_line(record) for record in records))
        f.flush()


def truncate_partial_line(path: str | Path) -> int:
    """Repair a file bpo appends to after a kill; returns the bytes removed.

    A last line without its newline is cut off when it does not parse (half written), and given
    its newline when it does (written whole, the kill came before the newline).
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb+") as f:
        keep, end = 0, size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        if keep == size:
            return 0
        f.seek(keep)
        tail = f.read()
        if not isinstance(_parse(tail, keep == 0), BadLine):
            f.write(b"\n")
            removed = 0
        else:
            f.truncate(keep)
            removed = size - keep
        f.flush()
        os.fsync(f.fileno())
    return removed


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers, and a run resumed after a kill, see the old file or
    the new one, never half of one. The temporary name is per process: several may write at once.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class DirectoryBusyError(RuntimeError):
    """Another process holds the directory's lock."""


def lock_directory(
    directory: Path,
    busy: str = "wait for it or choose another --out",
    error: type[Exception] = DirectoryBusyError,
) -> BinaryIO:
    """Hold an exclusive lock on `directory` (close the handle to release it), so two writers
    never interleave lines in one file; `busy` ends the `error` raised when it is taken."""
    handle = (Path(directory) / LOCK).open("ab")
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise error(f"{directory} is being written by another process; {busy}") from exc
    return handle
