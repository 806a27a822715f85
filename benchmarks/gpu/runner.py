"""Running the parts: each under a wall-clock budget, a failure recorded and the run going on.

A part is a function `part(ctx) -> dict`. Its record gets `status`: "ok", "error" (with the
exception and its traceback's last lines), "timeout" (its process outlived the budget and was
killed; what it had recorded so far is kept under `partial`) or "not run" (with `why`: the
budget left, or a missing package). Inside a part, a measurement it skips is recorded the same
way (`not_run`).

On the GPU every part runs in a process of its own (`run_isolated`): a hung kernel or a slow
compile cannot eat the other parts' time, and each part starts with the whole GPU's memory. The
dry run calls them in this process (`run_in_process`): on a small CPU, importing torch and
transformers again for every part would cost more than the parts themselves.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu.specs import Run

# Seconds a part's process may run past its budget before it is ended (it checks the budget
# only between measurements), and that an ended process gets to exit before it is killed.
GRACE_S = 10.0


def not_run(why: str) -> dict[str, str]:
    """The record of something skipped, and why."""
    return {"status": "not run", "why": why}


def missing(package: str) -> str | None:
    """Why `package` cannot be used here (its import fails), or None when it imports."""
    try:
        importlib.import_module(package)
    except Exception as exc:  # a broken install raises more than ImportError
        return f"{package} is not importable here ({type(exc).__name__}: {exc})"
    return None


def error_record(exc: BaseException) -> dict[str, Any]:
    """A failure as the results record it: the exception and its traceback's last lines."""
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {
        "status": "error",
        "error": f"{type(exc).__name__}: {exc}"[:2000],
        "traceback": "".join(lines)[-3000:],
    }


@dataclass
class Context:
    """What a part is given: the run (GPU or dry), its deadline, a scratch folder, a log, and
    where its partial record goes (so a part killed at its deadline keeps what it measured)."""

    run: Run
    deadline: float  # time.monotonic() by which the part must be done
    work: Path
    partial_path: Path | None = None
    log: Callable[[str], None] = print
    record: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        """Seconds left of the part's budget."""
        return self.deadline - time.monotonic()

    def has(self, seconds: float) -> bool:
        """Whether `seconds` of the budget are left (a measurement's estimated need)."""
        return self.left() >= seconds

    def save(self, key: str, value: Any) -> Any:
        """Record `value` under `key` at once (and in the partial file); return it."""
        self.record[key] = value
        if self.partial_path is not None:
            write_json(self.partial_path, self.record)
        return value


def write_json(path: Path, data: Any) -> None:
    """Write `data` as JSON atomically: a kill leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def free_memory() -> None:
    """Drop what the last measurement left: Python garbage and the CUDA allocator's cache."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def attempt(ctx: Context, key: str, seconds: float, measure: Callable[[], dict]) -> dict:
    """Run one measurement of a part if `seconds` of its budget are left, recording under `key`
    its result (status "ok"), its failure, or why it was skipped."""
    if not ctx.has(seconds):
        return ctx.save(key, not_run(f"budget: {ctx.left():.0f} s left, ~{seconds:.0f} s needed"))
    start = time.monotonic()
    try:
        result = {"status": "ok", **measure()}
    except Exception as exc:
        result = error_record(exc)
    finally:
        free_memory()
    result["wall_s"] = round(time.monotonic() - start, 2)
    return ctx.save(key, result)


def run_in_process(part: Callable[[Context], dict], ctx: Context) -> dict[str, Any]:
    """Call a part here; its exceptions become an "error" record with what it measured before."""
    start = time.monotonic()
    try:
        ctx.record.update(part(ctx))
        record = {"status": "ok", **ctx.record}
    except Exception as exc:
        record = {**error_record(exc), **({"partial": ctx.record} if ctx.record else {})}
    finally:
        free_memory()
    record["wall_s"] = round(time.monotonic() - start, 2)
    return record


def run_isolated(
    argv: list[str], budget_s: float, partial: Path, log: Path, grace_s: float = GRACE_S
) -> dict[str, Any]:
    """Run a part's own process (`verify.py --part NAME`) for at most `budget_s` (+ `grace_s`
    to exit); its output goes to `log`, its record to `partial`, read back here."""
    partial.unlink(missing_ok=True)
    start = time.monotonic()
    with log.open("a") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=budget_s + grace_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            code = None
    wall = round(time.monotonic() - start, 2)
    record = json.loads(partial.read_text()) if partial.exists() else {}
    if code is None:
        why = f"killed after {wall:.0f} s"
        return {"status": "timeout", "why": why, "partial": record, "wall_s": wall}
    if code != 0 or "status" not in record:
        why = f"its process exited with {code}; see log.txt"
        return {"status": "error", "error": why, "partial": record, "wall_s": wall}
    return {**record, "wall_s": wall}


def kill_group(proc: subprocess.Popen) -> None:
    """End a process started in a session of its own, and every process it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def teeing(log: Path) -> Iterator[None]:
    """Copy this process's Python-level stdout and stderr into `log` (the in-process dry run)."""

    class Tee:
        def __init__(self, stream: Any, file: Any) -> None:
            self.stream, self.file = stream, file

        def write(self, text: str) -> int:
            self.file.write(text)
            return self.stream.write(text)

        def flush(self) -> None:
            self.file.flush()
            self.stream.flush()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.stream, name)

    with log.open("a") as file:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(out, file), Tee(err, file)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err
