"""Resumable checkpoints: what a killed run needs to continue as if it had never stopped.

Layout of OUT/checkpoints/step-NNNNNNNN/ (written as step-N.tmp, renamed when complete, so a kill
leaves the previous checkpoint usable):

    state.json              step, epoch, micro-batch position, truncated and bad pairs, the
                            metrics history, the config (minus settings a resume may change) and
                            the fingerprint of the training pairs (a resume must find them again)
    scheduler.pt            the learning-rate schedule
    trainable.safetensors   the trainable weights   } one process or DDP: whole copies
    optimizer.pt            the optimizer state     }
    accelerate/             accelerator.save_state  } DeepSpeed or FSDP: each process its part
    rng-<process>.json      each process's Python, NumPy, torch (and CUDA) RNG state (dropout)

A save that fails (a full disk says only "basic_ios::clear: iostream error" through torch.save)
removes its .tmp folder, so the previous checkpoint stays the newest, and says so plainly.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from bpo.train.config import TrainConfig

# Settings that may change between a run and its resume: they do not change what is trained.
RESUMABLE_CHANGES = ("out", "save_steps", "save_total_limit", "trackers", "num_workers")
# Below this much free space, a failed write is taken for a full disk: the partly written files
# have used up what was left, and torch's own message ("iostream error") does not say ENOSPC.
FULL_DISK_BYTES = 64 << 20


class DiskFullError(OSError):
    """A save ran out of space; the message names what was being saved and the fix."""


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The parameters that train, detached on the CPU, by name."""
    return {
        n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad
    }


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON."""
    state = {
        "python": random.getstate(),
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def resume_config(config: TrainConfig) -> dict[str, Any]:
    """The config a resume must match, as it reads back from JSON."""
    kept = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    return json.loads(json.dumps(kept))


def check_resume_config(path: Path, stored: dict[str, Any], config: TrainConfig) -> None:
    """Raise ValueError listing the differences when `config` is not the one `path` was saved with."""
    from bpo.data.store import config_differences

    now = resume_config(config)
    # A setting added to the schema after the checkpoint was written matches at its default.
    defaults = {
        f.name: json.loads(json.dumps(f.default))
        for f in fields(TrainConfig)
        if f.default is not MISSING
    }
    now = {k: v for k, v in now.items() if k in stored or v != defaults.get(k, MISSING)}
    if now != stored:
        diffs = config_differences(stored, now)
        raise ValueError(
            f"{path} was written with a different config ({'; '.join(diffs)}); resume with "
            "the same config, or start over in a new --out"
        )


def check_resume_pairs(path: Path, stored: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Raise ValueError when the checkpoint was trained on other pairs than the run has now."""
    if stored is None:  # written before checkpoints recorded their pairs: nothing to compare
        return
    if stored != now:
        raise ValueError(
            f"{path} was trained on other pairs: {stored['count']} pairs (fingerprint "
            f"{stored['sha256']}), but run.pairs with run.sources and run.noise_steps now gives "
            f"{now['count']} (fingerprint {now['sha256']}); the store was rebuilt or edited, so "
            "the saved data position would continue on different pairs. Train in a new --out, "
            f"or delete {path.parent.parent} to start over without --resume"
        )


def _is_disk_full(exc: BaseException, path: Path) -> bool:
    if getattr(exc, "errno", None) == errno.ENOSPC or "no space left" in str(exc).lower():
        return True
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return existing is not None and shutil.disk_usage(existing).free < FULL_DISK_BYTES


@contextmanager
def reporting_full_disk(path: Path, what: str, partial: Path | None = None) -> Iterator[None]:
    """Re-raise a failed save as DiskFullError when the disk is full, removing `partial` (a
    half-written folder) either way, so that what was saved before stays the newest."""
    try:
        yield
    except Exception as exc:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        if not _is_disk_full(exc, path):
            raise
        error = DiskFullError(
            f"no space left on device while saving {what} {path}; free space or change --out"
        )
        error.errno = errno.ENOSPC
        raise error from exc


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder under OUT/checkpoints, or None."""
    found = sorted((out / "checkpoints").glob("step-*[0-9]/state.json"))  # not a .tmp one
    return found[-1].parent if found else None


def save_checkpoint(
    directory: Path,
    progress: dict[str, Any],
    config: TrainConfig,
    accelerator: Any,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    *,
    split: bool,
) -> Path:
    """Write DIRECTORY/step-N atomically; every process calls it. Returns the folder.

    Args:
        progress: "step", "epoch", "micro", "truncated", "bad", "history", "pairs" (into
            state.json).
        split: optimizer states (ZeRO) or weights too (ZeRO-3, FSDP) are split across processes,
            so every process writes its part through accelerator.save_state.
    """
    acc = accelerator
    final = directory / f"step-{progress['step']:08d}"
    tmp = final.with_name(final.name + ".tmp")
    with reporting_full_disk(final, "checkpoint", tmp if acc.is_main_process else None):
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if not split:
                save_file(trainable_state(acc.unwrap_model(model)), tmp / "trainable.safetensors")
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        acc.wait_for_everyone()
        if split:  # untested here: needs GPUs and deepspeed
            acc.save_state(str(tmp / "accelerate"))
            acc.wait_for_everyone()
        # Each process's RNG (dropout) state, so a resume draws the same masks.
        (tmp / f"rng-{acc.process_index}.json").write_text(json.dumps(rng_state()))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {**progress, "config": resume_config(config)}
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            shutil.rmtree(final, ignore_errors=True)  # a step saved before (save_steps changed)
            tmp.rename(final)
            prune_checkpoints(directory, config.save_total_limit)
    acc.wait_for_everyone()
    return final


def prune_checkpoints(directory: Path, keep: int | None) -> None:
    """Delete all but the newest `keep` checkpoints (None: keep all)."""
    if keep is not None:
        for old in sorted(directory.glob("step-*[0-9]"))[:-keep]:
            shutil.rmtree(old)


def load_checkpoint(
    path: Path,
    config: TrainConfig,
    accelerator: Any,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    pairs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote into the objects given; returns its `progress`.

    Args:
        pairs: `bpo.train.fingerprint.pairs_fingerprint` of the run's training pairs; refused
            when the checkpoint recorded others.
    """
    state = json.loads((path / "state.json").read_text())
    check_resume_config(path, state.pop("config"), config)
    if pairs is not None:
        check_resume_pairs(path, state.get("pairs"), pairs)
    if (path / "accelerate").is_dir():  # written under DeepSpeed or FSDP
        accelerator.load_state(str(path / "accelerate"))
    else:
        weights = load_file(path / "trainable.safetensors")
        params = dict(accelerator.unwrap_model(model).named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(json.loads((path / f"rng-{accelerator.process_index}.json").read_text()))
    return state
