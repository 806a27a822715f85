"""Each round's stage configs, derived from the stage sections of an `IterateConfig`.

Round k (1-based) lives in OUT/round-k/:

    pairs/           the pair store round k trains on (`bpo bootstrap`'s, or the join below)
    weaken/          only when round 1's injected negatives are reused (inject_model "base",
                     k >= 2): this round's weakened negatives; pairs/ joins them with round 1's
                     injected ones (`bpo.rounds.pairs`)
    train/           `bpo train` of round k-1's policy on pairs/; train/model is the checkpoint
    eval/            `bpo eval` of the checkpoint
    configs/         bootstrap.yaml, train.yaml, eval.yaml: each stage's config as its verb reads
                     it, so one stage of one round can be rerun alone
    round.json       provenance and metrics; `complete: true` once the round is done

Round 0's policy is `train.model`; round k's policy is OUT/round-k/train/model (merged full
weights under LoRA). Seeds are the sections' own in every round: bootstrap's noise and sampling
and train's adapter init, dropout and data order are keyed by sample index and step, so a round
differs from the one before only by its starting policy and its pairs, and any round reruns alone
from its configs/.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from bpo.bootstrap.config import BootstrapConfig
from bpo.bootstrap.config import check_config as check_bootstrap_config
from bpo.data.files import write_atomic
from bpo.evaluate.config import EvalConfig
from bpo.evaluate.config import check_config as check_eval_config
from bpo.models.config import ModelConfig
from bpo.rounds.config import IterateConfig, check_config
from bpo.train.config import TrainConfig
from bpo.train.config import check_config as check_train_config


@dataclass(frozen=True)
class RoundPaths:
    """The folders and files of round k under OUT."""

    root: Path

    @property
    def pairs(self) -> Path:
        return self.root / "pairs"

    @property
    def weaken(self) -> Path:
        return self.root / "weaken"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def checkpoint(self) -> Path:
        return self.train / "model"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def record(self) -> Path:
        return self.root / "round.json"


def round_paths(out: str | Path, k: int) -> RoundPaths:
    return RoundPaths(Path(out) / f"round-{k}")


def policy_path(config: IterateConfig, k: int) -> str:
    """Round k's starting model (round k-1's policy): `train.model` for round 1."""
    if k == 1:
        return config.train.model.name_or_path
    return str(round_paths(config.out, k - 1).checkpoint)


def joins_injection(config: IterateConfig, k: int) -> bool:
    """Whether round k reuses round 1's injected negatives, made by the base model.

    With inject_model "base" the rewriter is the same model with the same keyed seeds in every
    round, so its rewrites would come out the same again; round 1's are reused instead of being
    made (or paid for, with an endpoint) once per round.
    """
    inject = config.bootstrap.inject
    return k > 1 and config.rounds.inject_model == "base" and inject is not None


def _starting(model: ModelConfig, k: int, policy: str) -> ModelConfig:
    """A stage's model settings, loading round k's policy (a local folder after round 1)."""
    if k == 1:
        return replace(model, name_or_path=policy)
    return replace(model, name_or_path=policy, revision=None)


def bootstrap_config(config: IterateConfig, k: int) -> BootstrapConfig:
    """Round k's `bpo bootstrap`: negatives from round k-1's policy."""
    boot, paths = config.bootstrap, round_paths(config.out, k)
    joined = joins_injection(config, k)
    return replace(
        boot,
        model=_starting(boot.model, k, policy_path(config, k)),
        out=str(paths.weaken if joined else paths.pairs),
        inject=None if joined else boot.inject,
    )


def train_config(config: IterateConfig, k: int) -> TrainConfig:
    """Round k's `bpo train`: round k-1's policy (also the reference) on this round's pairs;
    a LoRA adapter is saved merged, so the checkpoint is a plain model (RoundsSettings.lora)."""
    train, paths = config.train, round_paths(config.out, k)
    lora = replace(train.lora, merge=True) if train.finetune == "lora" else train.lora
    return replace(
        train,
        model=_starting(train.model, k, policy_path(config, k)),
        pairs=str(paths.pairs),
        out=str(paths.train),
        lora=lora,
        allow_incomplete=False,
    )


def eval_config(config: IterateConfig, k: int) -> EvalConfig:
    """Round k's `bpo eval`: the round's checkpoint, named after the round."""
    evaluate, paths = config.eval, round_paths(config.out, k)
    name = f"{evaluate.name}-round-{k}" if evaluate.name else f"round-{k}"
    model = replace(evaluate.model, name_or_path=str(paths.checkpoint), revision=None)
    return replace(evaluate, model=model, name=name)


def write_round_configs(config: IterateConfig, k: int) -> None:
    """OUT/round-k/configs/{bootstrap,train,eval}.yaml, as `bpo VERB --config` reads them."""
    paths = round_paths(config.out, k)
    stages: dict[str, dict[str, Any]] = {
        "bootstrap": {"run": asdict(bootstrap_config(config, k))},
        "train": {"run": asdict(train_config(config, k))},
        "eval": {"out": str(paths.eval), "run": asdict(eval_config(config, k))},
    }
    paths.configs.mkdir(parents=True, exist_ok=True)
    for name, data in stages.items():
        plain = json.loads(json.dumps(data, default=str))  # tuples as lists, as YAML reads them
        text = yaml.safe_dump(plain, sort_keys=False)
        write_atomic(paths.configs / f"{name}.yaml", text)


@contextmanager
def _section(name: str) -> Iterator[None]:
    """Re-raise a stage's ValueError saying which section of the rounds' config it judged."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"`{name}:` section: {error}") from error


def check_stages(config: IterateConfig) -> None:
    """`check_config`, then each stage's own checks on round 1's configs and on a later round's
    (which may bootstrap without injection): a setting a stage refuses fails before round 1."""
    check_config(config)
    for k in sorted({1, min(2, config.rounds.rounds)}):
        with _section("bootstrap"):
            check_bootstrap_config(bootstrap_config(config, k))
        with _section("train"):
            check_train_config(train_config(config, k))
        with _section("eval"):
            check_eval_config(eval_config(config, k))
