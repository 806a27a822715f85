"""The demo's on-policy arm: BPO in rounds (`bpo iterate`), each round's weakened negatives
sampled from the previous round's policy.

One `bpo iterate` run per training seed, into OUT/rounds/{arm}-s{seed}: the demo's own bootstrap,
`bpo train` (the BPO arm's settings) and `bpo eval` (the held-out scenes) configs, with the
arm's total optimizer steps split evenly over the rounds, so the rounds train as many steps as
single-round BPO and SFT. Every round's checkpoint is evaluated on the held-out scenes and
reported as its own row (`{arm}_r{k}`); `bpo iterate` also names the best round by CHAIR_i in
rounds.json, but the demo reports every round rather than pick one on the scenes it reports.
The injected negatives are the lexical injector's, the same every round (`inject_model: base`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from bpo.demo.arms import Arm, arm_train_config
from bpo.demo.config import DemoConfig
from bpo.demo.stages import (
    Datasets,
    bootstrap_config,
    eval_config,
    metrics_of,
    write_config,
)
from bpo.rounds.config import IterateConfig, RoundsSettings
from bpo.rounds.run import run_rounds
from bpo.rounds.stages import round_paths

SELECT_METRIC = "shapeworld_chair.chair_i"


def round_arm_name(arm: Arm, k: int) -> str:
    """The results' name of round k of a rounds arm."""
    return f"{arm.name}_r{k}"


def rounds_config(
    cfg: DemoConfig, arm: Arm, seed: int, base: Path, data: Datasets, folder: Path
) -> IterateConfig:
    """The `bpo iterate` config of one rounds arm and seed, writing into `folder`."""
    training = cfg.training
    per_round = replace(training, steps=max(1, training.steps // training.rounds))
    train = arm_train_config(arm, seed, per_round, base, Path(), data.align, folder)
    return IterateConfig(
        bootstrap=bootstrap_config(cfg, base, data, folder),
        train=train,
        eval=eval_config(cfg, base, data, f"{arm.name}-s{seed}"),
        rounds=RoundsSettings(rounds=training.rounds, select_metric=SELECT_METRIC),
        out=str(folder),
    )


def train_rounds_arm(
    cfg: DemoConfig, arm: Arm, seed: int, base: Path, data: Datasets, out: Path
) -> list[tuple[int, dict[str, float], Path]]:
    """`bpo iterate` of one rounds arm and seed; [(round, its flat metrics, its eval folder)]."""
    folder = out / "rounds" / f"{arm.name}-s{seed}"
    shutil.rmtree(folder, ignore_errors=True)  # the demo's own output, made anew each run
    config = rounds_config(cfg, arm, seed, base, data, folder)
    write_config(out / "configs" / f"iterate-{arm.name}-s{seed}.yaml", config)
    run_rounds(config, log=lambda _msg: None, progress=False)
    done = []
    for k in range(1, cfg.training.rounds + 1):
        evaluated = round_paths(folder, k).eval
        results: dict[str, Any] = json.loads((evaluated / "results.json").read_text("utf-8"))
        done.append((k, metrics_of(results), evaluated))
    return done
