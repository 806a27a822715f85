"""A bootstrap run's chunks made by model replicas on a Ray cluster (the `ray:` section).

The driver (`bpo.bootstrap.run`) reads the data, skips what the store holds and cuts the rest
into the chunks a local run would make; each replica builds the run's `Bootstrapper` once (one
model) and makes whole chunks with `chunk_outputs`, the local run's own call. The chunks come
back in order and the driver alone writes them, so the store is the local run's, file for file:
pairs are keyed by each sample's global index (`bpo.generate.stream_seed`), not by which replica
or batch made them. Ray restarts a replica that dies and remakes its chunk; `ordered_map` gives
each chunk once and the writer refuses a key twice, so a retry writes no duplicate. A killed
driver leaves a prefix of the store, which the same command resumes.

Every node needs bpo installed and the data file and images at the same paths (shared storage).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from bpo.bootstrap.chunk import Bootstrapper, Item, Unit, chunk_outputs, make_backend
from bpo.bootstrap.config import BootstrapConfig
from bpo.data import BadRecord, PreferencePair
from bpo.generate.ray_cluster import ordered_map


class ChunkWorker:
    """One model replica: the run's Bootstrapper, built once, making one chunk per call."""

    def __init__(self, config: BootstrapConfig, image_root: str):
        import torch

        # Ray sizes the actor's CPUs; torch would otherwise start a thread per core of the node.
        torch.set_num_threads(max(1, int(config.ray.cpus_per_replica)))
        self.image_root = Path(image_root)
        self.bootstrapper = Bootstrapper(config, *make_backend(config, None, None))

    def __call__(self, items: list[Item]) -> list[PreferencePair | BadRecord]:
        return chunk_outputs(self.bootstrapper, items, self.image_root)


def ray_outputs(
    config: BootstrapConfig, units: Iterable[Unit], image_root: Path
) -> Iterator[tuple[Unit, list[PreferencePair | BadRecord]]]:
    """Each unit with its chunk's records, made on the cluster, in the units' order.

    The units are read to the end first (the dataset is built from all of them); units without
    items (only bad records or skipped samples) need no replica.
    """
    units = list(units)
    chunks = [unit.items for unit in units if unit.items]
    outputs = ordered_map(chunks, ChunkWorker, (config, str(image_root)), config.ray)
    for unit in units:
        yield unit, next(outputs) if unit.items else []
