"""Fixtures shared across test folders: one tiny LLaVA, and every family's tiny model, saved once
per test run."""

from __future__ import annotations

from pathlib import Path

import pytest

from bpo.models.tiny import TinyLlavaConfig, build_tiny_llava, save_tiny_llava
from family_helpers import TinyFamilyFolders

# Words the tiny tokenizer learns: the prompts and answers the evaluation tests use.
TINY_TEXTS = [
    "a red circle and a blue square .",
    "a green triangle , a yellow diamond and a white ring .",
    "Describe the image. What is in the image? Is there a circle in the image? yes no",
    "Is there a square in the image? Is there an apple in the image? a dog and a cat .",
] * 4


@pytest.fixture(scope="session")
def tiny_llava_folder(tmp_path_factory) -> Path:
    """A tiny LLaVA (model + processor) saved with save_pretrained, loadable offline."""
    config = TinyLlavaConfig()
    model, processor = build_tiny_llava(TINY_TEXTS, config, seed=0)
    return save_tiny_llava(model, processor, tmp_path_factory.mktemp("tiny_llava"), config)


@pytest.fixture(scope="session")
def tiny_families(tmp_path_factory) -> TinyFamilyFolders:
    """A function family name -> saved tiny model folder; each family is built once per run."""
    return TinyFamilyFolders(tmp_path_factory.mktemp("tiny_families"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny-model work on one torch thread, then restore the setting.

    A tiny model gains nothing from a second thread, and when another process keeps the cores
    busy, torch's spinning worker threads make generation tens of times slower.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster of 2 CPUs, started once for every Ray test; yields its address
    (a subprocess joins it with RAY_ADDRESS). ray is in the dev extra."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
