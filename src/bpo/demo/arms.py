"""The demo's trained arms: SFT and BPO (DPO on the bootstrapped pairs) from the aligned base.

Every arm starts from the same base model, sees the same positives (the alignment scenes' gold
captions, the pairs' chosen answers) and runs the same number of optimizer steps at the same
learning rate; only the objective and the negatives differ:
- `sft`: the NLL of the chosen answers (the paper's baseline);
- `bpo`: DPO on both negative sources (image-weakened and error-injected);
- `bpo_weaken`, `bpo_inject`: DPO on one source (the ablations);
- the sweep: DPO on the weakened negatives of one noise step only (`sweep_steps`);
- beyond the paper: `bpo_image`, BPO plus the image-contrast term (`image_weight`), and
  `bpo_rounds`, BPO in on-policy rounds (`bpo.demo.rounds`).
Each arm is a `bpo train` config (`TrainConfig`) per seed: the seed moves the data order and any
adapter's initialisation, not the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bpo.demo.config import ArmsConfig
from bpo.demo.intervals import arm_intervals
from bpo.models.load import ModelConfig
from bpo.train.config import LoraSettings, LossSettings, TrainConfig


@dataclass(frozen=True)
class Arm:
    """What one arm trains on, and how: its method and which pairs (None: all)."""

    name: str
    method: Literal["sft", "dpo"]
    sources: tuple[str, ...] | None = None
    noise_steps: tuple[int, ...] | None = None
    main: bool = False  # an arm of the claim: trained on every seed
    image: bool = False  # adds the image-contrast term (ArmsConfig.image_weight)
    rounds: bool = False  # trains in on-policy rounds (ArmsConfig.rounds), one row per round


ARMS = {
    "sft": Arm("sft", "sft", main=True),
    "bpo": Arm("bpo", "dpo", main=True),
    "bpo_weaken": Arm("bpo_weaken", "dpo", sources=("weaken",)),
    "bpo_inject": Arm("bpo_inject", "dpo", sources=("inject",)),
    "bpo_image": Arm("bpo_image", "dpo", image=True),
    "bpo_rounds": Arm("bpo_rounds", "dpo", rounds=True),
}
BEYOND_ARMS = ("bpo_image", "bpo_rounds")  # not the paper's; `--full true` adds them


def sweep_arm(step: int) -> Arm:
    """DPO on the weakened negatives of noise step `step` alone."""
    return Arm(f"bpo_weaken_t{step}", "dpo", sources=("weaken",), noise_steps=(step,))


def arms_of(config: ArmsConfig) -> list[Arm]:
    """The arms a config asks for, the sweep's last."""
    return [ARMS[name] for name in config.arms] + [sweep_arm(t) for t in config.sweep_steps]


def check_arms(config: ArmsConfig, noise_steps: tuple[int, ...]) -> None:
    """Refuse unknown arms, sweep steps the negatives do not have, and empty seeds."""
    unknown = [name for name in config.arms if name not in ARMS]
    if unknown:
        raise ValueError(
            f"unknown arms {unknown}; choose from {', '.join(ARMS)} (a noise-step sweep is "
            "training.sweep_steps)"
        )
    missing = [t for t in config.sweep_steps if t not in noise_steps]
    if missing:
        raise ValueError(
            f"training.sweep_steps {missing} are not among negatives.noise_steps "
            f"{list(noise_steps)}; add them there"
        )
    if any(ARMS[name].rounds for name in config.arms) and not 1 <= config.rounds <= config.steps:
        raise ValueError(
            f"training.rounds is {config.rounds} with training.steps {config.steps}; the rounds "
            "split the steps, so give 1 <= rounds <= steps"
        )
    if not config.seeds or not config.ablation_seeds:
        raise ValueError("training.seeds and training.ablation_seeds need at least one seed each")


def arm_seeds(arm: Arm, config: ArmsConfig) -> tuple[int, ...]:
    return config.seeds if arm.main else config.ablation_seeds


def arm_train_config(
    arm: Arm, seed: int, config: ArmsConfig, base: Path, pairs: Path, image_root: Path, out: Path
) -> TrainConfig:
    """The `bpo train` config of one arm and seed."""
    return TrainConfig(
        model=ModelConfig(str(base), dtype="float32", device="cpu", attn_implementation="eager"),
        pairs=str(pairs),
        image_root=str(image_root),
        out=str(out),
        method=arm.method,
        sources=list(arm.sources) if arm.sources else None,
        noise_steps=list(arm.noise_steps) if arm.noise_steps else None,
        finetune=config.finetune,
        lora=LoraSettings(r=config.lora_r, alpha=2 * config.lora_r, dropout=0.0, merge=True),
        loss=LossSettings(
            beta=config.beta,
            loss_type=config.loss_type,
            label_smoothing=config.label_smoothing,
            rpo_alpha=config.rpo_alpha,
            average_log_prob=config.average_log_prob,
            image_weight=config.image_weight if arm.image else 0.0,
            shared_token_weight=config.shared_token_weight if arm.method == "dpo" else 1.0,
        ),
        lr=config.lr,
        warmup_ratio=config.warmup_ratio,
        epochs=10**6,  # the step count decides
        max_steps=config.steps,
        batch_size=config.batch_size,
        # A plain seeded shuffle: ShapeWorld's rows differ by at most ~20 tokens, so length
        # grouping saves little padding (benchmarks/padding_waste.py), while it fills a batch with
        # scenes of one size (a caption's length follows its shape count), a less mixed gradient
        # in a few hundred steps; the demo's reported numbers are measured with this order.
        group_by_length=False,
        keep_encoded_pairs=True,  # ~2,000 small pairs, read about three times each
        seed=seed,
        trackers=[],
    )


def summarize(
    per_seed: list[dict[str, float]],
    folders: Sequence[str | Path] | None = None,
    worlds: Sequence[int | None] | None = None,
) -> dict[str, Any]:
    """Mean of every numeric metric over the seeds, their sample std under `std`, and the seeds.

    folders: the runs' `bpo eval` folders, in `per_seed`'s order: their 95% intervals
        (`bpo.demo.intervals.arm_intervals`) go under `intervals`.
    worlds: each run's world in a full run (its scenes are resampled within it).
    """
    ids = ("seed", "world")  # which run it was, not a metric
    names = [k for k, v in per_seed[0].items() if isinstance(v, int | float) and k not in ids]
    means = {k: sum(run[k] for run in per_seed) / len(per_seed) for k in names}
    spread: dict[str, float] = {}
    if len(per_seed) > 1:
        for k in names:
            var = sum((run[k] - means[k]) ** 2 for run in per_seed) / (len(per_seed) - 1)
            spread[k] = math.sqrt(var)
    summary = {**means, "std": spread, "per_seed": per_seed}
    if folders is not None:
        if len(folders) != len(per_seed):
            raise ValueError(f"{len(per_seed)} runs but {len(folders)} eval folders")
        summary["intervals"] = arm_intervals(folders, worlds)
    return summary
