"""The `ray:` section of `bpo bootstrap`: checked at config time, kept out of the store's config."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
from bootstrap_helpers import config_for

from bpo.bootstrap.config import check_config, store_config
from bpo.generate.ray_cluster import RayConfig, RayUnavailableError, cluster_address


@pytest.fixture
def config(tiny_llava_folder):
    return config_for(tiny_llava_folder, Path("data.json"), Path("out"), ray=RayConfig())


def test_without_ray_the_section_fails_at_config_time_with_the_install_line(config, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(RayUnavailableError, match=r"pip install 'bpo\[ray\]'"):
        check_config(config)
    check_config(replace(config, ray=None))  # a local run does not need ray


@pytest.mark.parametrize(
    ("ray", "message"),
    [
        (RayConfig(replicas=0), r"ray\.replicas must be at least 1, got 0"),
        (RayConfig(cpus_per_replica=0), r"ray\.cpus_per_replica must be > 0"),
        (RayConfig(max_restarts=-1), r"ray\.max_restarts must be >= 0, got -1"),
        (RayConfig(address="auto", num_cpus=2), r"ray\.num_cpus sizes a local cluster.*'auto'"),
    ],
)
def test_a_setting_that_cannot_run_is_named(config, ray, message):
    with pytest.raises(ValueError, match=message):
        check_config(replace(config, ray=ray))


def test_vllm_on_ray_needs_a_gpu_per_tensor_parallel_rank(config, monkeypatch):
    """tensor_parallel_size 2 on 1 GPU a replica cannot place an engine."""
    monkeypatch.setattr("bpo.bootstrap.config.check_backend", lambda _backend: None)
    vllm = replace(config.vllm, tensor_parallel_size=2)
    ray = RayConfig(gpus_per_replica=1)
    with pytest.raises(ValueError, match=r"gpus_per_replica >= vllm\.tensor_parallel_size \(2\)"):
        check_config(replace(config, backend="vllm", vllm=vllm, ray=ray))
    check_config(replace(config, backend="vllm", vllm=vllm, ray=RayConfig(gpus_per_replica=2)))


def test_the_store_config_does_not_record_ray_so_either_run_resumes_the_other(config):
    assert store_config(config) == store_config(replace(config, ray=None))
    assert "ray" not in store_config(config)


def test_the_address_comes_from_the_config_then_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(RayConfig()) is None  # a local cluster
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address(RayConfig()) == "10.0.0.1:6379"
    assert cluster_address(RayConfig(address="ray://head:10001")) == "ray://head:10001"
