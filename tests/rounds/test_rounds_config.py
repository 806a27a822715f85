"""The rounds' schema: each round's stage configs, the checks, the metric lookup, the selection."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
from rounds_helpers import tiny_iterate_config

from bpo.bootstrap.config import InjectConfig
from bpo.evaluate.config import BenchmarkConfig
from bpo.rounds.config import check_config, recipe_config
from bpo.rounds.select import best_round, flat_metrics, metric_value
from bpo.rounds.stages import bootstrap_config, check_stages, eval_config, train_config

OUT = Path("OUT")


def config(**settings):
    """A valid config over placeholder paths (the checks read no file)."""
    return tiny_iterate_config(Path("base"), Path("align"), Path("held"), OUT, **settings)


def test_best_round_takes_the_lowest_or_highest_and_the_earliest_on_ties():
    """min over {1: 0.30, 2: 0.25, 3: 0.25}: rounds 2 and 3 tie at 0.25, the earlier (2) wins;
    max: round 1 (0.30). A NaN never wins: {1: nan, 2: 0.4} gives 2 under both modes."""
    values = {1: 0.30, 2: 0.25, 3: 0.25}
    assert best_round(values, "min") == 2
    assert best_round(values, "max") == 1
    assert best_round({3: 0.5, 1: 0.5}, "max") == 1  # the earliest, whatever the dict's order
    assert best_round({1: math.nan, 2: 0.4}, "min") == 2
    assert best_round({1: math.nan, 2: 0.4}, "max") == 2
    with pytest.raises(ValueError, match="no round has a select metric"):
        best_round({1: math.nan}, "min")


BENCHMARKS = {
    "shapeworld_chair": {"chair_i": 0.125, "responses": 8, "flag": True},
    "pope": {"adversarial": {"f1": 0.8}, "all": {"accuracy": 0.75}},
}


def test_metric_value_follows_the_dotted_path_into_benchmarks():
    assert metric_value(BENCHMARKS, "shapeworld_chair.chair_i", "r.json") == 0.125
    assert metric_value(BENCHMARKS, "pope.adversarial.f1", "r.json") == 0.8
    assert flat_metrics(BENCHMARKS) == {  # bools are not metrics
        "shapeworld_chair.chair_i": 0.125,
        "shapeworld_chair.responses": 8,
        "pope.adversarial.f1": 0.8,
        "pope.all.accuracy": 0.75,
    }
    with pytest.raises(
        ValueError, match=r"'pope\.random\.f1' is not a number in r\.json; it holds: "
    ):
        metric_value(BENCHMARKS, "pope.random.f1", "r.json")
    with pytest.raises(ValueError, match=r"pope\.adversarial\.f1, pope\.all\.accuracy"):
        metric_value(BENCHMARKS, "pope.adversarial", "r.json")  # a table, not a number
    with pytest.raises(ValueError, match="not a number"):
        metric_value(BENCHMARKS, "shapeworld_chair.flag", "r.json")


def test_round_one_starts_from_train_model_and_later_rounds_from_the_last_checkpoint():
    cfg = config()
    boot1, boot2 = bootstrap_config(cfg, 1), bootstrap_config(cfg, 2)
    assert (boot1.model.name_or_path, boot1.out) == ("base", str(OUT / "round-1" / "pairs"))
    assert boot1.inject == cfg.bootstrap.inject
    # Round 2 weakens from round 1's checkpoint; its injected pairs are round 1's (base model).
    assert boot2.model.name_or_path == str(OUT / "round-1" / "train" / "model")
    assert (boot2.out, boot2.inject) == (str(OUT / "round-2" / "weaken"), None)
    assert boot2.weaken == cfg.bootstrap.weaken  # the same seeds every round
    train3 = train_config(cfg, 3)
    assert train3.model.name_or_path == str(OUT / "round-2" / "train" / "model")
    assert (train3.pairs, train3.out) == (str(OUT / "round-3/pairs"), str(OUT / "round-3/train"))
    assert train3.lora.merge is True and cfg.train.lora.merge is False
    assert (train3.seed, train3.max_steps, train3.lr) == (0, 3, 1e-2)
    evaluate = eval_config(cfg, 3)
    assert evaluate.model.name_or_path == str(OUT / "round-3" / "train" / "model")
    assert evaluate.name == "round-3"
    named = replace(cfg, eval=replace(cfg.eval, name="bpo"))
    assert eval_config(named, 2).name == "bpo-round-2"


def test_policy_injection_bootstraps_both_methods_from_the_policy_every_round():
    cfg = config(inject_model="policy")
    cfg = replace(cfg, bootstrap=replace(cfg.bootstrap, inject=InjectConfig(kind="self")))
    boot2 = bootstrap_config(cfg, 2)
    assert (boot2.out, boot2.inject.kind) == (str(OUT / "round-2" / "pairs"), "self")
    assert boot2.model.name_or_path == str(OUT / "round-1" / "train" / "model")
    check_stages(cfg)


def _with(cfg, section: str, **changes):
    return replace(cfg, **{section: replace(getattr(cfg, section), **changes)})


BAD = [
    (lambda c: _with(c, "rounds", rounds=0), "rounds.rounds is 0; run at least 1 round"),
    (lambda c: _with(c, "rounds", select_metric=" "), "rounds.select_metric is empty"),
    (lambda c: _with(c, "rounds", select_mode="median"), "rounds.select_mode must be one of"),
    (
        lambda c: _with(c, "rounds", select_metric="pope.f1"),
        r"'pope.f1' must be BENCHMARK.METRIC with BENCHMARK one of the eval's benchmarks "
        r"\(shapeworld_chair\)",
    ),
    (lambda c: _with(c, "rounds", select_metric="shapeworld_chair"), "must be BENCHMARK.METRIC"),
    (lambda c: _with(c, "eval", model=None), "eval.model is null"),
    (
        lambda c: _with(
            c, "eval", benchmarks=[BenchmarkConfig("shapeworld_chair", "held", answers="a.jsonl")]
        ),
        "reads an `answers:` file",
    ),
    (lambda c: _with(c, "train", finetune="qlora"), "train.finetune 'qlora' cannot run rounds"),
    (lambda c: _with(c, "bootstrap", num_shards=2), "bootstrap.num_shards is 2"),
    (
        lambda c: _with(c, "bootstrap", model=replace(c.bootstrap.model, name_or_path="other")),
        "bootstrap.model.name_or_path 'other' differs from train.model.name_or_path 'base'",
    ),
    (
        lambda c: _with(c, "rounds", inject_model="policy"),
        "bootstrap.inject is 'lexical'; set bootstrap.inject.kind 'self'",
    ),
    (lambda c: _with(c, "bootstrap", weaken=None), "every round would train on round 1's pairs"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m[:30] for _, m in BAD])
def test_config_errors_name_the_setting(change, message):
    with pytest.raises(ValueError, match=message):
        check_config(change(config()))


def test_one_round_without_weakening_is_allowed():
    """With one round nothing is reused, so injection alone is a plain BPO run."""
    check_config(_with(_with(config(), "bootstrap", weaken=None), "rounds", rounds=1))


def test_stage_errors_name_their_section():
    cfg = _with(config(), "bootstrap", batch_size=0)
    with pytest.raises(ValueError, match="`bootstrap:` section: batch_size must be at least 1"):
        check_stages(cfg)
    cfg = _with(config(), "train", lr=-1.0)
    with pytest.raises(ValueError, match="`train:` section: lr and projector_lr must be >= 0"):
        check_stages(cfg)


def test_recipe_config_puts_each_section_under_run():
    sections = {
        "bootstrap": {"run": {"data": "d"}},
        "train": {"run": {"lr": 1.0}},
        "eval": {"out": "ignored", "run": {"name": "e"}},
        "rounds": {"out": "runs/r", "run": {"rounds": 2}},
    }
    assert recipe_config(sections) == {
        "run": {
            "bootstrap": {"data": "d"},
            "train": {"lr": 1.0},
            "eval": {"name": "e"},
            "rounds": {"rounds": 2},
            "out": "runs/r",
        }
    }
