"""Every shipped YAML config parses against the schema it claims, so configs never rot."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from bpo.models.load import ModelConfig
from bpo.shapeworld.demo import DemoConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "models").glob("*.yaml")), ids=lambda p: p.name)
def test_model_configs_match_the_model_schema(path):
    raw = yaml.safe_load(path.read_text())
    known = {f.name for f in fields(ModelConfig)}
    assert set(raw) <= known, f"{path.name}: unknown keys {set(raw) - known}"
    config = ModelConfig(**raw)
    assert config.trust_remote_code is False  # never shipped on
    assert "/" in config.name_or_path


def test_shipped_demo_config_is_the_default_run():
    """configs/shapeworld-demo.yaml is `bpo demo --print_config`: parsing it gives the defaults."""
    parser = ArgumentParser()
    parser.add_argument("--out", type=str)
    parser.add_argument("--run", type=DemoConfig)
    parsed = parser.parse_path(str(CONFIGS / "shapeworld-demo.yaml"))
    run = parser.instantiate(parsed).run
    assert run == DemoConfig()
