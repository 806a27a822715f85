"""What the results say about where they were made: machine, Python, library versions, GPU."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "trl",
    "datasets",
    "numpy",
    "pyarrow",
    "deepspeed",
    "bitsandbytes",
)


def package_versions() -> dict[str, str | None]:
    """Each package's installed version (from its metadata, no import); None when absent."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def imported_distributions() -> list[str]:
    """The distributions whose modules this process has imported (what the wheel list must
    cover on the GPU machine; `benchmarks/gpu/wheels.py`)."""
    import sys

    owners = importlib.metadata.packages_distributions()
    tops = {name.split(".")[0] for name in list(sys.modules)}
    return sorted({dist for top in tops for dist in owners.get(top, [])})


def git_commit(repo: Path) -> str | None:
    """The checkout's commit, or None where the copy has no git history (the GPU machine's)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def cuda_info() -> dict[str, Any]:
    """torch's CUDA build and, with a GPU, its name, memory and compute capability."""
    import torch

    info: dict[str, Any] = {
        "torch_cuda": torch.version.cuda,
        "available": torch.cuda.is_available(),
    }
    if info["available"]:
        props = torch.cuda.get_device_properties(0)
        info |= {
            "device": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "devices": torch.cuda.device_count(),
        }
    return info


def machine_info(repo: Path) -> dict[str, Any]:
    """The run's header: date, host, CPUs, Python, packages, CUDA, commit."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "cuda": cuda_info(),
        "commit": git_commit(repo),
    }
