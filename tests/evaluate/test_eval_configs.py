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


ALL_BENCHMARKS = [
    "object_halbench",
    "pope",
    "mmvet",
    "llava_bench",
    "amber_generative",
    "amber_discriminative",
    "mmhal",
]


def parse_run(path: Path) -> EvalConfig:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--out", type=str)
    parser.add_argument("--run", type=EvalConfig)
    return parser.instantiate(parser.parse_path(str(path))).run


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("llava-1.5-7b.yaml", "llava-hf/llava-1.5-7b-hf"),
        ("qwen2.5-vl-7b.yaml", "Qwen/Qwen2.5-VL-7B-Instruct"),
    ],
)
def test_the_model_configs_cover_all_seven_benchmarks(name, model):
    """The paper's four, AMBER's two tasks and MMHal-Bench, AMBER scored with the reference's
    matcher (NLTK nouns, en_core_web_lg similarity above 0.8), on the same data for both models."""
    run = parse_run(CONFIGS / name)
    assert run.model.name_or_path == model
    assert [b.name for b in run.benchmarks] == ALL_BENCHMARKS
    assert run.judge.api_key_env == "OPENAI_API_KEY"
    generative = run.benchmarks[4]
    assert (generative.amber_nouns, generative.amber_similarity, generative.amber_threshold) == (
        "nltk",
        "spacy:en_core_web_lg",
        0.8,
    )
    assert run.benchmarks[5].amber_dimensions == ["existence", "attribute", "relation"]


def test_both_model_configs_read_the_same_data():
    """Runs compared side by side must score the same questions the same way."""
    llava, qwen = (parse_run(CONFIGS / n) for n in ("llava-1.5-7b.yaml", "qwen2.5-vl-7b.yaml"))
    assert llava.benchmarks == qwen.benchmarks and llava.judge == qwen.judge


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
