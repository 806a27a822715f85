"""The demo's trained arms: SFT and BPO (DPO on the bootstrapped pairs) from the aligned base.

Every arm starts from the same base model, sees the same positives (the alignment scenes' gold
captions, the pairs' chosen answers) and runs the same number of optimizer steps at the same
learning rate; only the objective and the negatives differ:
- `sft`: the NLL of the chosen answers (the paper's baseline);
- `bpo`: DPO on both negative sources (image-weakened and error-injected);
- `bpo_weaken`, `bpo_inject`: DPO on one source (the ablations);
- `bpo_weaken_t{t}`: DPO on the image-weakened negatives of noise step t only (the sweep).
Each arm is trained once per seed (the seed moves the adapter's initialisation and the data
order, not the data) and evaluated on the held-out scenes like the base model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from PIL import Image

from bpo.data.records import PreferencePair
from bpo.models.load import ModelConfig
from bpo.train.config import LoraSettings, LossSettings, TrainConfig
from bpo.train.trainer import PairDataset, reference_logps, train

# Which pairs each arm trains on: None means every source.
ARM_SOURCES: dict[str, tuple[str, ...] | None] = {
    "sft": None,
    "bpo": None,
    "bpo_weaken": ("weaken",),
    "bpo_inject": ("inject",),
}
MAIN_ARMS = ("sft", "bpo")  # the comparison the claim is about: every seed, always
SWEEP_PREFIX = "bpo_weaken_t"  # bpo_weaken_t{t}: weakened negatives of noise step t only


def sweep_step(arm: str) -> int | None:
    """The noise step of a sweep arm (`bpo_weaken_t500` -> 500), else None."""
    suffix = arm.removeprefix(SWEEP_PREFIX)
    return int(suffix) if arm.startswith(SWEEP_PREFIX) and suffix.isdigit() else None


@dataclass
class ArmsConfig:
    """How the demo trains its arms; the seeds are fixed here, before the run."""

    arms: tuple[str, ...] = ("sft", "bpo", "bpo_weaken", "bpo_inject")
    seeds: tuple[int, ...] = (0, 1, 2)  # every seed for sft and bpo
    ablation_seeds: tuple[int, ...] = (0,)  # the other arms (`bpo demo --full true`: all)
    steps: int = 150  # optimizer steps, the same for every arm
    batch_size: int = 16  # pairs per step
    # Tuned on training seeds 10..12 and held-out scenes 2000..3999 (disjoint from a run's): the
    # lr is SFT's best (lowest CHAIR_i with recall within 0.02 of its best; full: 1e-3..1e-2,
    # LoRA r8: 2e-3..2e-2 gave 1e-2); full fine-tuning gave both arms a lower CHAIR_i than LoRA.
    lr: float = 5e-3  # a 0.2M-parameter model needs a far larger step than a 7B one
    finetune: Literal["lora", "full"] = "full"
    lora_r: int = 8  # adapter rank (alpha = 2r), with finetune="lora"
    beta: float = 0.5  # DPO's KL strength (on mean per-token log-probs, see below)
    # NLL anchor on the chosen answers (RPO): without it DPO lowers the gold's likelihood too and
    # shortens captions, which costs recall; 2 kept recall within 0.02 of SFT's where 1 did not.
    rpo_alpha: float = 2.0
    # Length-normalized DPO: a summed log-prob rewards short answers, which costs recall.
    average_log_prob: bool = True
    warmup_ratio: float = 0.05


def check_arms(config: ArmsConfig, noise_steps: Sequence[int]) -> None:
    """Refuse unknown arms, sweep arms of steps the negatives do not have, and empty seeds."""
    for arm in config.arms:
        step = sweep_step(arm)
        if arm not in ARM_SOURCES and step is None:
            raise ValueError(
                f"unknown arm {arm!r}; choose from {', '.join(ARM_SOURCES)} or "
                f"{SWEEP_PREFIX}T for a noise step T of negatives.noise_steps"
            )
        if step is not None and step not in noise_steps:
            raise ValueError(
                f"arm {arm!r} needs weakened negatives at step {step}, but negatives.noise_steps "
                f"is {list(noise_steps)}; add {step} there"
            )
    if not config.seeds or not config.ablation_seeds:
        raise ValueError("training.seeds and training.ablation_seeds need at least one seed each")


def arm_seeds(arm: str, config: ArmsConfig) -> tuple[int, ...]:
    return config.seeds if arm in MAIN_ARMS else config.ablation_seeds


def arm_train_config(arm: str, seed: int, config: ArmsConfig, base_path: str) -> TrainConfig:
    """The `bpo train` config of one arm and seed (in memory: nothing written)."""
    return TrainConfig(
        model=ModelConfig(base_path, dtype="float32", device="cpu", attn_implementation="eager"),
        out=None,
        method="sft" if arm == "sft" else "dpo",
        sources=None,  # `arm_pairs` selects them
        finetune=config.finetune,
        lora=LoraSettings(r=config.lora_r, alpha=2 * config.lora_r, dropout=0.0, merge=True),
        loss=LossSettings(
            beta=config.beta,
            rpo_alpha=config.rpo_alpha,
            average_log_prob=config.average_log_prob,
        ),
        lr=config.lr,
        warmup_ratio=config.warmup_ratio,
        epochs=10**6,  # the step count decides
        max_steps=config.steps,
        batch_size=config.batch_size,
        seed=seed,
        trackers=[],
    )


def with_base_references(
    base: Any, processor: Any, pairs: Sequence[PreferencePair], images: Mapping[str, Image.Image]
) -> list[PreferencePair]:
    """The pairs with the base model's log-probs as their references, scored once: every DPO arm
    and seed starts from the same base, so its reference is the same (pairs it cannot score are
    left out, as training would leave them out)."""
    refs, _ = reference_logps(base, PairDataset(pairs, processor, images=images), batch_size=8)
    return [
        replace(p, ref_chosen_logp=refs[p.key][0], ref_rejected_logp=refs[p.key][1])
        for p in pairs
        if p.key in refs
    ]


def arm_pairs(arm: str, pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    """The pairs an arm trains on (SFT uses their chosen answers only)."""
    step = sweep_step(arm)
    if step is not None:
        return [p for p in pairs if p.source == "weaken" and p.meta.get("noise_step") == step]
    sources = ARM_SOURCES[arm]
    return [p for p in pairs if sources is None or p.source in sources]


def train_arm(
    base: Any,
    processor: Any,
    pairs: Sequence[PreferencePair],
    images: Mapping[str, Image.Image],
    arm: str,
    seed: int,
    config: ArmsConfig,
    base_path: str,
    on_step: Callable[[int, dict], None] | None = None,
) -> tuple[Any, list[dict]]:
    """(trained model, metrics history) of one arm and seed; `base` itself is left untouched."""
    model = copy.deepcopy(base)  # peft adapts a model in place
    result = train(
        arm_train_config(arm, seed, config, base_path),
        model,
        processor,
        arm_pairs(arm, pairs),
        images,
        on_step=on_step,
        log=lambda _msg: None,
    )
    return result.model, result.history


def summarize(per_seed: list[dict[str, float]]) -> dict[str, Any]:
    """Mean of every numeric metric over the seeds, their sample std under `std`, and the seeds."""
    ids = ("seed", "world")  # which run it was, not a metric
    names = [k for k, v in per_seed[0].items() if isinstance(v, int | float) and k not in ids]
    means = {k: sum(run[k] for run in per_seed) / len(per_seed) for k in names}
    spread: dict[str, float] = {}
    if len(per_seed) > 1:
        for k in names:
            var = sum((run[k] - means[k]) ** 2 for run in per_seed) / (len(per_seed) - 1)
            spread[k] = math.sqrt(var)
    return {**means, "std": spread, "per_seed": per_seed}


@dataclass
class ArmRun:
    """One trained arm and seed: its evaluation metrics, answers and training history."""

    arm: str
    seed: int
    metrics: dict[str, float]
    answers: list[str]
    history: list[dict] = field(default_factory=list)
