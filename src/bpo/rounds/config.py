"""The `bpo iterate` schema: the stage sections of a recipe plus a `rounds:` section.

An `IterateConfig` holds the three stage configs as `bpo bootstrap`, `bpo train` and `bpo eval`
read them, and `RoundsSettings`. Each round derives its own stage configs from them
(`bpo.rounds.stages`): the folders (`bootstrap.out`, `train.pairs`, `train.out`, the evaluated
model) are the round's, and the model each stage starts from is the previous round's policy; every
other setting is the section's, the same in every round. Nothing here imports torch.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from bpo.bootstrap.config import BootstrapConfig
from bpo.evaluate.config import EvalConfig
from bpo.train.config import TrainConfig


@dataclass
class RoundsSettings:
    """The `rounds:` settings: how many rounds, which one is kept, who injects errors.

    `lora: merge` — with LoRA (`train.finetune: lora`) each round's adapter is merged into full
    weights when it is saved (`train.lora.merge` is set for every round; HF format, safetensors),
    and that folder is round k+1's starting model and reference. The next round's reference must
    be a plain model with an identity of its own (its reference log-probs are cached under that
    model's fingerprint, and a new adapter cannot stack on an unmerged one the trainer would have
    to hold frozen); and generating the next round's negatives from merged weights is faster
    than through an adapter, in batched transformers generation and in vLLM alike. QLoRA cannot
    be merged into its 4-bit base, so rounds refuse it.
    """

    rounds: int = 3  # how many rounds; round k bootstraps from round k-1's policy
    # The metric the best round is chosen by: a dotted path into the `benchmarks` of each round's
    # results.json, BENCHMARK.METRIC[.SUB...] with the benchmark's key (its label, else its
    # name), e.g. "shapeworld_chair.chair_i", "object_halbench.chair_i", "pope.adversarial.f1".
    select_metric: str = ""
    select_mode: Literal["min", "max"] = "min"  # min: lower is better (CHAIR); max: F1, accuracy
    # Who rewrites the gold answers with errors. "base": the injected negatives do not change
    # between rounds (round 1 makes them with the base model; later rounds reuse them, see
    # docs/rounds.md); "policy": each round's own policy rewrites them (`inject.kind: self`).
    inject_model: Literal["base", "policy"] = "base"
    lora: Literal["merge"] = "merge"  # see the class docstring


@dataclass
class IterateConfig:
    """A `bpo iterate` run: the stage sections, the rounds' settings and the output folder."""

    bootstrap: BootstrapConfig  # `out` is each round's; `model` is each round's starting policy
    train: TrainConfig  # `model` is round 1's starting model (round 0's policy)
    eval: EvalConfig  # `model` settings apply to each round's checkpoint
    rounds: RoundsSettings = field(default_factory=RoundsSettings)
    out: str = "runs/rounds"  # OUT/round-k/{pairs,train,eval}, OUT/rounds.json


def recipe_config(sections: dict[str, Any]) -> dict[str, Any]:
    """What `bpo iterate --config` reads, from a recipe's bootstrap/train/eval/rounds sections.

    The stage sections hold `run:` (and eval's `out:`, unused here: each round evaluates into its
    own folder); the `rounds:` section holds `out:` (OUT) and `run:` (RoundsSettings).
    """
    run = {name: sections[name].get("run", {}) for name in ("bootstrap", "train", "eval")}
    rounds = sections["rounds"]
    run["rounds"] = rounds.get("run", {})
    if "out" in rounds:
        run["out"] = rounds["out"]
    return {"run": run}


def _check_choices(section: Any, prefix: str) -> None:
    """Every Literal field holds one of its choices (YAML and the CLI check; Python may not)."""
    hints = typing.get_type_hints(type(section))
    for f in fields(section):
        choices = typing.get_args(hints[f.name])
        if typing.get_origin(hints[f.name]) is Literal and getattr(section, f.name) not in choices:
            raise ValueError(
                f"{prefix}{f.name} must be one of {', '.join(map(repr, choices))}, got "
                f"{getattr(section, f.name)!r}"
            )


def check_settings(settings: RoundsSettings) -> None:
    """Raise ValueError naming the `rounds.` setting that cannot run."""
    _check_choices(settings, "rounds.")
    if isinstance(settings.rounds, bool) or not isinstance(settings.rounds, int):
        raise ValueError(f"rounds.rounds must be an integer, got {settings.rounds!r}")
    if settings.rounds < 1:
        raise ValueError(f"rounds.rounds is {settings.rounds}; run at least 1 round")
    if not settings.select_metric.strip():
        raise ValueError(
            "rounds.select_metric is empty; name the metric that picks the best round as "
            "BENCHMARK.METRIC of results.json, e.g. shapeworld_chair.chair_i"
        )


def _check_eval(config: IterateConfig) -> None:
    evaluate = config.eval
    if evaluate.model is None:
        raise ValueError(
            "eval.model is null; rounds evaluate each round's checkpoint, so give eval a "
            "`model:` section (its name_or_path is replaced by the round's checkpoint)"
        )
    given = [b.key for b in evaluate.benchmarks if b.answers is not None]
    if given:
        raise ValueError(
            f"eval benchmark {given[0]} reads an `answers:` file, which would score every round "
            "the same; remove `answers:` so each round's checkpoint answers"
        )
    keys = [b.key for b in evaluate.benchmarks]
    bench = config.rounds.select_metric.split(".", 1)[0]
    if bench not in keys or "." not in config.rounds.select_metric:
        raise ValueError(
            f"rounds.select_metric {config.rounds.select_metric!r} must be BENCHMARK.METRIC "
            f"with BENCHMARK one of the eval's benchmarks ({', '.join(keys) or 'none'})"
        )


def _check_models(config: IterateConfig) -> None:
    boot, train = config.bootstrap.model.name_or_path, config.train.model.name_or_path
    if boot != train:
        raise ValueError(
            f"bootstrap.model.name_or_path {boot!r} differs from train.model.name_or_path "
            f"{train!r}; round 1 bootstraps from and trains the same model (round 0's policy), "
            "so set both to it"
        )
    if config.train.finetune == "qlora":
        raise ValueError(
            "train.finetune 'qlora' cannot run rounds: each round's adapter is merged into the "
            "next round's starting model, and a 4-bit base cannot take the merge; use "
            "finetune 'lora' or 'full'"
        )
    if config.bootstrap.num_shards != 1:
        raise ValueError(
            f"bootstrap.num_shards is {config.bootstrap.num_shards}; rounds make each round's "
            "whole store in one run (a `ray:` section spreads it over a cluster); set 1"
        )


def _check_injection(config: IterateConfig) -> None:
    inject, weaken = config.bootstrap.inject, config.bootstrap.weaken
    if config.rounds.inject_model == "policy" and (inject is None or inject.kind != "self"):
        kind = "null" if inject is None else repr(inject.kind)
        raise ValueError(
            f"rounds.inject_model 'policy' has the policy rewrite the answers, but "
            f"bootstrap.inject is {kind}; set bootstrap.inject.kind 'self', or inject_model 'base'"
        )
    if weaken is None and config.rounds.inject_model == "base" and config.rounds.rounds > 1:
        raise ValueError(
            "bootstrap.weaken is null and rounds.inject_model is 'base', so every round would "
            "train on round 1's pairs; enable weaken, or set inject_model 'policy'"
        )


def check_config(config: IterateConfig) -> None:
    """The rounds' settings and how the stage sections fit them; no file read, no model loaded.

    `bpo.rounds.stages.check_stages` adds each stage's own checks on the configs a round derives.
    """
    check_settings(config.rounds)
    if not str(config.out).strip():
        raise ValueError("out is empty; give the folder the rounds are written to")
    _check_eval(config)
    _check_models(config)
    _check_injection(config)
