"""Generation on a Ray cluster: the `ray:` section of a generating stage, and an ordered map of
units of work over a pool of model replicas (Ray Data actors).

Each replica is one Ray actor that builds its worker once (it loads the model) and then takes
units one at a time; the units stream through a Ray Dataset and their outputs come back to the
caller in the units' order, whatever replica made them and however often Ray retried one. The
caller writes them, so there is one writer and its files are those of a run in one process.

Nothing here imports ray at module level (the CLI's schemas import this module); `require_ray`
says how to install it.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

INSTALL = "pip install 'bpo[ray]'"


@dataclass
class RayConfig:
    """Where and how wide a stage runs on Ray: the `ray:` section (null: in this process)."""

    # A running cluster ("auto", "ray://head:10001", "10.0.0.1:6379"). null: $RAY_ADDRESS if it
    # is set, else a local cluster on this machine sized by num_cpus / num_gpus.
    address: str | None = None
    num_cpus: int | None = None  # local cluster only: CPUs it may use (null: all of them)
    num_gpus: int | None = None  # local cluster only: GPUs it may use (null: all of them)
    replicas: int = 1  # model replicas, one Ray actor each
    cpus_per_replica: float = 1.0  # also the torch threads a CPU replica uses
    # 1 per GPU replica of the transformers backend; vllm.tensor_parallel_size for the vLLM one.
    gpus_per_replica: float = 0.0
    # Times Ray restarts a replica whose process died; its unfinished unit is made again.
    max_restarts: int = 3


class RayUnavailableError(ImportError):
    """The ray package is not installed where a `ray:` section asks for it."""


def require_ray() -> ModuleType:
    """The ray module with Ray Data, or a RayUnavailableError that says how to get it."""
    try:
        import ray
        import ray.data  # a bare `pip install ray` lacks Ray Data's dependencies
    except ImportError as error:
        raise RayUnavailableError(
            f"the `ray:` section needs Ray Data, which does not import here ({error}); "
            f"install it with {INSTALL} (or pip install 'ray[data]'), or remove the `ray:` "
            "section to run in this process"
        ) from error
    return ray


def check_ray_config(
    config: RayConfig,
    what: str = "ray",
    backend: str = "transformers",
    tensor_parallel: int = 1,
    section: str = "",
) -> None:
    """Raise ValueError naming the `ray.` setting that cannot run (RayUnavailableError first).

    backend, tensor_parallel: the stage's generation backend and vLLM tensor-parallel size (one
        engine per replica needs that many GPUs); section: where the stage keeps them
        ("generation." in an eval config, "" in a bootstrap config), for the message.
    """
    require_ray()
    if backend == "vllm" and config.gpus_per_replica < tensor_parallel:
        raise ValueError(
            f"{section}backend 'vllm' on Ray needs {what}.gpus_per_replica >= "
            f"{section}vllm.tensor_parallel_size ({tensor_parallel}), got "
            f"{config.gpus_per_replica}: one engine per replica"
        )
    if config.replicas < 1:
        raise ValueError(f"{what}.replicas must be at least 1, got {config.replicas}")
    if config.cpus_per_replica <= 0 or config.gpus_per_replica < 0:
        raise ValueError(
            f"{what}.cpus_per_replica must be > 0 and {what}.gpus_per_replica >= 0; got "
            f"{config.cpus_per_replica} and {config.gpus_per_replica}"
        )
    if config.max_restarts < 0:
        raise ValueError(f"{what}.max_restarts must be >= 0, got {config.max_restarts}")
    for name in ("num_cpus", "num_gpus"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ValueError(f"{what}.{name} must be >= 0 or null, got {value}")
        if value is not None and cluster_address(config) is not None:
            raise ValueError(
                f"{what}.{name} sizes a local cluster, but the run joins the cluster at "
                f"{cluster_address(config)!r}, which has its own; remove {what}.{name}"
            )


def cluster_address(config: RayConfig) -> str | None:
    """The cluster a run joins: `address`, else $RAY_ADDRESS; None starts a local cluster."""
    return config.address or os.environ.get("RAY_ADDRESS") or None


def connect(config: RayConfig) -> None:
    """Join the configured cluster, or start a local one; a Ray already initialized is kept."""
    ray = require_ray()
    if ray.is_initialized():
        return
    address = cluster_address(config)
    if address is not None:
        ray.init(address=address)
    else:
        ray.init(num_cpus=config.num_cpus, num_gpus=config.num_gpus)


class _Replica:
    """A Ray Data actor: builds the worker once, then maps pickled units to pickled outputs.

    Units travel pickled so they reach the worker exactly as they left (Arrow would turn nested
    records into its own column types).
    """

    def __init__(self, make_worker: Callable[..., Callable[[Any], Any]], args: Sequence[Any]):
        self.worker = make_worker(*args)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        outputs = [pickle.dumps(self.worker(pickle.loads(unit))) for unit in batch["unit"]]
        return {
            "position": np.asarray(batch["position"]),
            "output": np.array(outputs, dtype=object),
        }


def ordered_map(
    units: Sequence[Any],
    make_worker: Callable[..., Callable[[Any], Any]],
    args: Sequence[Any],
    config: RayConfig,
) -> Iterator[Any]:
    """`make_worker(*args)(unit)` of every unit, made by `config.replicas` actors, in order.

    Each replica calls `make_worker(*args)` once. Outputs are held back until every earlier one
    has come, and a unit Ray made twice (a retried replica) is given once. The units are put in
    the object store up front (their text, not their images).
    """
    ray = require_ray()
    if not units:
        return
    connect(config)
    items = [{"position": i, "unit": pickle.dumps(unit)} for i, unit in enumerate(units)]
    # One unit a block, so the replicas take units one by one and stay evenly busy.
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _Replica,
        fn_constructor_args=(make_worker, tuple(args)),
        batch_size=1,
        # One chunk in flight per replica: a queued chunk never waits behind a busy replica
        # while another idles, and a lost replica takes one chunk down with it, not several.
        compute=ray.data.ActorPoolStrategy(size=config.replicas, max_tasks_in_flight_per_actor=1),
        num_cpus=config.cpus_per_replica,
        num_gpus=config.gpus_per_replica or None,
        # Ray Data's own default retries a dying replica forever; a chunk that kills every
        # replica (out of memory) should stop the run instead.
        max_restarts=config.max_restarts,
        max_task_retries=config.max_restarts,
    )
    waiting: dict[int, bytes] = {}
    given = 0
    rows = iter(dataset.iter_rows())
    try:
        for row in rows:
            position = int(row["position"])
            if position >= given:
                waiting.setdefault(position, row["output"])
            while given in waiting:
                yield pickle.loads(waiting.pop(given))
                given += 1
    finally:
        if hasattr(rows, "close"):  # stops the dataset's replicas when the caller stops early
            rows.close()
    if given != len(units):
        raise RuntimeError(
            f"Ray returned {given} of {len(units)} units' outputs; rerun the same command to resume"
        )
