"""Every shipped eval config parses against the `bpo eval` schema, so configs never rot."""

from __future__ import annotations

from pathlib import Path

import pytest
from jsonargparse import ArgumentParser

from bpo.endpoint import EndpointConfig
from bpo.evaluate.config import BenchmarkConfig, EvalConfig, check_config
from bpo.generate.config import GenerateConfig
from bpo.models.load import ModelConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "eval"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_eval_configs_match_the_schema(path):
    """Parsed as `bpo eval --config PATH` parses it: unknown keys and bad values fail here."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--out", type=str)
    parser.add_argument("--run", type=EvalConfig)
    run = parser.instantiate(parser.parse_path(str(path))).run
    assert isinstance(run.model, ModelConfig) and run.model.trust_remote_code is False
    assert isinstance(run.generation, GenerateConfig)
    assert run.benchmarks and all(isinstance(b, BenchmarkConfig) for b in run.benchmarks)
    assert run.judge is None or isinstance(run.judge, EndpointConfig)
    check_config(run)  # every judged benchmark has a judge, every benchmark a source of answers


def test_the_paper_config_lists_the_papers_benchmarks():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--out", type=str)
    parser.add_argument("--run", type=EvalConfig)
    run = parser.instantiate(parser.parse_path(str(CONFIGS / "llava-1.5-7b.yaml"))).run
    assert [b.name for b in run.benchmarks] == ["object_halbench", "pope", "mmvet", "llava_bench"]
    assert run.judge.api_key_env == "OPENAI_API_KEY"


def test_an_unknown_key_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  benchmarks:\n  - name: pope\n    data: x\n    splitt: test\n")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--run", type=EvalConfig)
    with pytest.raises(Exception, match="splitt"):
        parser.parse_path(str(path))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"dtype": "float33"}, r"model\.dtype: unknown dtype 'float33'; use 'auto' or one of"),
        ({"device": "gpu"}, r"model\.device 'gpu' is not a device"),
    ],
)
def test_model_settings_are_refused_before_answers_are_stored(tmp_path, model, message):
    """The loader used to refuse them at the first generation, after answers.meta.json had
    recorded the model's settings, so the corrected rerun met "other settings" there."""
    from bpo.cli import main
    from bpo.evaluate.run import run_eval

    main(["shapeworld", "--out", str(tmp_path / "sw"), "--scenes", "2", "--questions", "false"])
    bench = BenchmarkConfig(name="shapeworld_chair", data=str(tmp_path / "sw"))
    config = EvalConfig(benchmarks=[bench], model=ModelConfig("no-such/model", **model))
    with pytest.raises(ValueError, match=message):
        check_config(config)
    with pytest.raises(ValueError, match=message):
        run_eval(config, tmp_path / "eval", log=lambda _msg: None, progress=False)
    assert not (tmp_path / "eval").exists()
