"""Every shipped YAML config parses against the schema it claims, so configs never rot.

The schemas are taken from `bpo.cli`, the entry point that parses these files, so a test here
parses what `bpo VERB --config FILE` (or `--recipe FILE`) parses."""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from bpo.cli import BootstrapConfig, DemoConfig, EvalConfig, TrainConfig
from bpo.models.load import ModelConfig

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
    parser.add_argument("--full", type=bool)
    parsed = parser.parse_path(str(CONFIGS / "shapeworld-demo.yaml"))
    run = parser.instantiate(parsed).run
    assert run == DemoConfig()
    # Every setting is written out, so a user reading the file sees each one (a key left out
    # would parse to its default as well).
    written = yaml.safe_load((CONFIGS / "shapeworld-demo.yaml").read_text())["run"]
    assert _keys(written) == _keys(asdict(DemoConfig()))


def _keys(tree: dict, prefix: str = "") -> set[str]:
    """The dotted paths of every leaf of a nested dict."""
    out = set()
    for name, value in tree.items():
        path = prefix + name
        out |= _keys(value, path + ".") if isinstance(value, dict) else {path}
    return out


RECIPES = sorted(CONFIGS.glob("*-bpo.yaml"))
TRAIN_CONFIGS = sorted((CONFIGS / "train").glob("*.yaml")) + RECIPES


def stage_config(path: Path, stage: str) -> dict:
    """What `bpo STAGE --config PATH` reads, or `bpo STAGE --recipe PATH` for a recipe."""
    raw = yaml.safe_load(path.read_text())
    return raw[stage] if path in RECIPES else raw


def parse_stage(path: Path, stage: str, schema: type):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--out", type=str)
    parser.add_argument("--run", type=schema)
    return parser.instantiate(parser.parse_object(stage_config(path, stage))).run


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_train_configs_match_the_train_schema(path):
    """Each parses as `bpo train` reads it: every key known, every value of its field's type."""
    from bpo.train.config import check_config

    raw = stage_config(path, "train")
    known = {f.name for f in fields(TrainConfig)}
    assert set(raw["run"]) <= known, f"{path.name}: unknown keys {set(raw['run']) - known}"
    run = parse_stage(path, "train", TrainConfig)
    check_config(run)
    assert run.model.trust_remote_code is False
    assert run.pairs and run.image_root


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_bootstrap_and_eval_sections_match_their_schemas(path):
    """A recipe's `bootstrap:` and `eval:` sections parse as those verbs read them, and pass
    their stage's checks (the ones `bpo bootstrap` and `bpo eval` make before any work)."""
    from bpo.bootstrap.config import check_config as check_bootstrap
    from bpo.evaluate.config import check_config as check_eval

    assert set(yaml.safe_load(path.read_text())) == {"bootstrap", "train", "eval"}
    raw = stage_config(path, "bootstrap")["run"]
    known = {f.name for f in fields(BootstrapConfig)}
    assert set(raw) <= known, f"{path.name}: unknown keys {set(raw) - known}"
    boot = parse_stage(path, "bootstrap", BootstrapConfig)
    check_bootstrap(boot)
    assert boot.model.trust_remote_code is False and boot.data and boot.image_root
    assert boot.weaken.noise_steps == [900] and boot.inject.kind == "self"
    assert (boot.weaken.min_length_ratio, boot.weaken.max_length_ratio) == (None, None)
    evaluate = parse_stage(path, "eval", EvalConfig)
    check_eval(evaluate)
    assert evaluate.judge.api_key_env == "OPENAI_API_KEY"


def test_paper_configs_spell_out_the_papers_recipe():
    """LoRA r=32, alpha=256, dropout 0.05, lr 2e-6, beta 0.1, 2 epochs, cosine with 3% warmup,
    bf16, max length 2048, 32 pairs per step on 8 GPUs."""
    for size in ("7b", "13b"):
        run = parse_stage(CONFIGS / f"llava-1.5-{size}-bpo.yaml", "train", TrainConfig)
        assert run.model.name_or_path == f"llava-hf/llava-1.5-{size}-hf"
        assert (run.lora.r, run.lora.alpha, run.lora.dropout) == (32, 256, 0.05)
        assert (run.lr, run.loss.beta, run.epochs, run.scheduler) == (2e-6, 0.1, 2, "cosine")
        assert (run.warmup_ratio, run.precision, run.max_length) == (0.03, "bf16", 2048)
        assert run.effective_batch * 8 == 32 and run.projector_lr is None


VERB_CONFIGS = [
    *(("bootstrap", p) for p in sorted((CONFIGS / "bootstrap").glob("*.yaml"))),
    *(("train", p) for p in sorted((CONFIGS / "train").glob("*.yaml"))),
    *(("eval", p) for p in sorted((CONFIGS / "eval").glob("*.yaml"))),
    ("demo", CONFIGS / "shapeworld-demo.yaml"),
]


@pytest.mark.parametrize(("verb", "path"), VERB_CONFIGS, ids=lambda v: getattr(v, "name", v))
def test_every_shipped_config_parses_through_the_cli(verb, path, capsys):
    """`bpo VERB --config FILE --print_config`, the real entry point, reads every key of the
    file and prints the resolved config: the file's values survive the round trip."""
    from bpo.cli import main

    with pytest.raises(SystemExit) as exited:
        main([verb, "--config", str(path), "--print_config"])
    assert exited.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(path.read_text())

    def contains(full, part, where=""):
        if isinstance(part, dict):
            for key, value in part.items():
                assert key in full, f"{path.name}: {where}{key} lost"
                contains(full[key], value, f"{where}{key}.")
        elif isinstance(part, list) and part and isinstance(part[0], dict):
            assert len(full) == len(part), f"{path.name}: {where} length"
            for k, (a, b) in enumerate(zip(full, part, strict=True)):
                contains(a, b, f"{where}{k}.")
        else:
            assert full == part, f"{path.name}: {where.rstrip('.')}"

    contains(printed, written)


def test_the_shapeworld_train_config_reads_what_the_demo_writes():
    """configs/train/shapeworld.yaml trains on the default demo's output: its base model, its
    pair store, and the alignment scenes the pairs' image paths are relative to."""
    from bpo.demo.stages import datasets_in

    out = Path(yaml.safe_load((CONFIGS / "shapeworld-demo.yaml").read_text())["out"])
    run = parse_stage(CONFIGS / "train" / "shapeworld.yaml", "train", TrainConfig)
    assert Path(run.model.name_or_path) == out / "base"
    assert Path(run.pairs) == out / "pairs"
    assert Path(run.image_root) == datasets_in(out).align
