"""The `bpo train` schema: one dataclass tree read by the CLI, the YAML configs and Python alike.

Defaults follow the paper's LLaVA-1.5 recipe where it has one (LoRA r=32, alpha=256, dropout 0.05,
lr 2e-6, beta 0.1, 2 epochs, cosine schedule with 3% warmup); the `train:` section of the recipes
configs/llava-1.5-*-bpo.yaml spells it out, configs/train/shapeworld.yaml scales it down to a CPU.
"""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from bpo.models.config import ModelConfig

# The keys of `bpo.train.losses.LOSSES`; the schema cannot import the losses (they import it).
# docs/dpo-vs-trl.md sets each beside TRL 1.16's loss of the same name.
LossType = Literal["sigmoid", "cdpo", "robust", "ipo", "ipo_sum", "hinge"]
SMOOTHED_LOSSES = ("cdpo", "robust")  # the loss types that read `label_smoothing`
# Loss types whose margin compares mean per-token log-ratios whatever `average_log_prob` says.
LENGTH_NORMALIZED_LOSSES = ("ipo",)
NOISE_STEPS = 1000  # T of the diffusion schedule the weakened pairs were made with
# The keys of `bpo.models.noise.SCHEDULES` (the schema does not import torch).
NOISE_SCHEDULES = ("linear", "sigmoid")


@dataclass
class LoraSettings:
    """The `lora:` section: the adapter trained when `finetune` is "lora" or "qlora"."""

    r: int = 32  # adapter rank
    alpha: int = 256  # scaling numerator: the update is (alpha / r) * B @ A
    # On the adapter's input, the paper's 0.05. TRL 1.16's DPOTrainer zeroes every dropout
    # (disable_dropout=True); 0 here matches it (docs/dpo-vs-trl.md).
    dropout: float = 0.05
    # Names of linear layers inside the language model to adapt ("q_proj", "down_proj"...);
    # null: every linear layer of the language model. The vision tower, the projector and the
    # LM head are never targeted (the projector trains through `projector_lr`).
    target_modules: list[str] | None = None
    merge: bool = False  # save the adapter merged into the base weights (a plain HF model)


@dataclass
class LossSettings:
    """The `loss:` section: DPO's options (see `bpo.train.losses.preference_loss`)."""

    beta: float = 0.1  # strength of the implicit KL penalty towards the reference
    # sigmoid: DPO; cdpo: conservative DPO; robust: robust DPO (TRL's `robust`); ipo: IPO on mean
    # per-token log-ratios (TRL's `ipo`); ipo_sum: IPO on summed log-probs; hinge: SLiC.
    loss_type: LossType = "sigmoid"
    # The assumed chance a pair's labels are flipped; read only by `cdpo` and `robust`.
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0  # weight of the chosen answers' per-token NLL (RPO); 0: plain DPO
    # How the RPO NLL averages tokens. per_pair: each chosen answer's NLL per token, then the mean
    # over pairs; batch_tokens: every chosen token of the forward batch pooled (TRL's `sft` term).
    rpo_nll: Literal["per_pair", "batch_tokens"] = "per_pair"
    average_log_prob: bool = False  # score answers by mean per-token log-prob instead of the sum
    # The image-contrast term (mDPO, CHiP): the chosen answer on the clean image is preferred over
    # the same answer on the noised image, -log sigmoid(image_beta * (d_clean - d_noised)) with
    # d = policy - reference log-prob of the chosen answer; added with this weight. 0: off.
    image_weight: float = 0.0
    image_beta: float | None = None  # the term's beta; null: `beta`
    # How pairs not made by weakening are noised for the term (a weakened pair is scored on the
    # very noised image its negative was sampled from, read from its meta); their noise is keyed
    # by run.seed and the pair's key.
    image_noise_step: int = 500  # 0-based step of the diffusion schedule, in [0, 999]
    image_schedule: str = "sigmoid"  # the beta schedule: "linear" or "sigmoid"
    # A dense preference (RLHF-V's dense DPO): in the preference terms, the tokens the two answers
    # share (`bpo.train.batch.shared_token_weights`) count with this weight and those where they
    # differ with 1. 1: plain DPO; 0: only the tokens that differ.
    shared_token_weight: float = 1.0


@dataclass
class TrainConfig:
    """A `bpo train` run: `run:` in configs/train/*.yaml, `train: run:` in configs/*-bpo.yaml."""

    model: ModelConfig  # the starting model; also the frozen reference
    pairs: str | None = None  # pair store folder (`bpo bootstrap` output); None in the Python API
    image_root: str | None = None  # the pairs' image paths are relative to it
    # Train on a store whose bootstrap did not finish (manifest.json complete: false); by default
    # such a store is refused, so a killed run is never mistaken for the whole data set.
    allow_incomplete: bool = False
    out: str | None = "runs/train"  # None (Python API): write nothing, keep the history in memory
    method: Literal["dpo", "sft"] = "dpo"  # sft: NLL of the chosen answers only (the baseline)
    sources: list[str] | None = None  # only pairs of these sources ("weaken", "inject"); None: all
    # Only pairs whose meta.noise_step is one of these (weakened pairs made at those steps); None:
    # all. Pairs without a noise step (injected ones) are then left out.
    noise_steps: list[int] | None = None
    finetune: Literal["lora", "qlora", "full"] = "lora"  # full: every language-model weight
    lora: LoraSettings = field(default_factory=LoraSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    lr: float = 2e-6  # peak learning rate of the language model (its adapter, or its weights)
    projector_lr: float | None = None  # null: projector frozen; a number: it trains at this lr
    train_vision_tower: bool = False  # the paper keeps the vision tower frozen
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"  # after the warmup
    warmup_ratio: float = 0.03  # share of the optimizer steps spent warming up linearly from 0
    max_grad_norm: float | None = 1.0  # gradient clipping; null: none
    epochs: int = 2
    max_steps: int | None = None  # optimizer steps; overrides `epochs` when set
    batch_size: int = 1  # pairs per device per forward pass
    grad_accum: int = 1  # forward passes per optimizer step
    # Batch pairs of similar packed-row length (each epoch's shuffle sorted within mega-batches,
    # then the batches shuffled): far less padding. false: a plain seeded shuffle.
    group_by_length: bool = True
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast of the forward (accelerate)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory
    # Tokens per answer branch, image tokens included; longer answers are cut (and counted).
    # null: the model's context length, at most 4096 (`bpo.train.limits`).
    max_length: int | None = None
    seed: int = 0  # adapter init, dropout, the per-epoch data shuffle, unweakened pairs' noise
    num_workers: int = 0  # DataLoader workers that load images and tokenize
    # Keep every pair's encoding (vision tensors, token ids) in memory once read: epochs after the
    # first skip image loading and tokenization. For small pair sets trained several epochs; each
    # DataLoader worker keeps its own copy, so it pays with num_workers 0.
    keep_encoded_pairs: bool = False
    save_steps: int | None = None  # a resumable checkpoint every N optimizer steps; null: none
    save_total_limit: int | None = 2  # keep only the newest N checkpoints; null: all
    log_steps: int = 1  # a metrics line every N optimizer steps
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # accelerate trackers
    reference_batch_size: int = 8  # pairs per forward while precomputing reference log-probs

    @property
    def effective_batch(self) -> int:
        """Pairs per optimizer step on one process; multiply by the number of processes."""
        return self.batch_size * self.grad_accum


def check_config(config: TrainConfig) -> None:
    """Raise ValueError naming the field and the fix for settings that cannot train.

    Cheap and model-free: `train` and `bpo refs` call it before loading anything, so a bad setting
    fails in a second, not after the reference pass.
    """
    _check_choices(config, "")
    _check_choices(config.loss, "loss.")
    _check_counts(config)
    _check_optimizer(config)
    check_loss(config.loss)
    if config.loss.image_weight > 0 and config.method != "dpo":
        raise ValueError(
            f"loss.image_weight {config.loss.image_weight} adds the image-contrast term to DPO, "
            f"but method is {config.method!r}; set loss.image_weight to 0 or method to 'dpo'"
        )
    if dense_weight(config.loss) is not None and config.method != "dpo":
        raise ValueError(
            f"loss.shared_token_weight {config.loss.shared_token_weight} weighs DPO's tokens, but "
            f"method is {config.method!r}; set loss.shared_token_weight to 1 or method to 'dpo'"
        )
    _check_selection(config)
    if config.finetune != "full" and (config.lora.r < 1 or config.lora.alpha <= 0):
        raise ValueError(f"lora.r and lora.alpha must be positive, got {config.lora}")
    if config.lora.merge and config.finetune == "qlora":
        raise ValueError(
            "lora.merge with finetune 'qlora' would merge into 4-bit weights; train with "
            "finetune 'lora', or merge the saved adapter into a bf16 base yourself"
        )


def _check_choices(section: Any, prefix: str) -> None:
    """Every Literal-typed field of `section` holds one of its choices.

    YAML and the CLI check them already; Python callers may pass anything.
    """
    hints = typing.get_type_hints(type(section))
    for f in fields(section):
        hint = hints[f.name]
        if typing.get_origin(hint) is Literal and getattr(section, f.name) not in (
            choices := typing.get_args(hint)
        ):
            raise ValueError(
                f"{prefix}{f.name} must be one of {', '.join(map(repr, choices))}, got "
                f"{getattr(section, f.name)!r}"
            )


def _check_counts(config: TrainConfig) -> None:
    positive = {
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "epochs": config.epochs,
        "log_steps": config.log_steps,
        "reference_batch_size": config.reference_batch_size,
    }
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    for name in ("max_steps", "save_steps", "save_total_limit", "max_length"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1 or null, got {value}")
    if config.num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {config.num_workers}")


def _check_optimizer(config: TrainConfig) -> None:
    if not 0 <= config.warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {config.warmup_ratio}")
    if config.lr < 0 or (config.projector_lr is not None and config.projector_lr < 0):
        raise ValueError(
            f"lr and projector_lr must be >= 0, got {config.lr} and {config.projector_lr}"
        )
    if config.weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {config.weight_decay}")
    if len(config.adam_betas) != 2 or not all(0 <= b < 1 for b in config.adam_betas):
        raise ValueError(f"adam_betas must be two numbers in [0, 1), got {config.adam_betas}")
    if config.max_grad_norm is not None and config.max_grad_norm <= 0:
        raise ValueError(
            f"max_grad_norm must be > 0, got {config.max_grad_norm}; set it to null for no clipping"
        )


def check_loss(loss: LossSettings) -> None:
    """Raise ValueError for loss settings `bpo.train.losses.preference_loss` cannot use."""
    if not loss.beta > 0:  # also refuses NaN
        raise ValueError(f"loss.beta must be > 0, got {loss.beta}")
    if not 0 <= loss.label_smoothing < 0.5:
        raise ValueError(
            f"loss.label_smoothing must be in [0, 0.5), got {loss.label_smoothing} (0.5 would make "
            "every label a coin flip)"
        )
    if loss.label_smoothing and loss.loss_type not in SMOOTHED_LOSSES:
        raise ValueError(
            "loss.label_smoothing is read only by loss.loss_type 'cdpo' (conservative DPO) and "
            f"'robust' (robust DPO), not {loss.loss_type!r}; set label_smoothing to 0 or choose "
            "one of those loss types"
        )
    if loss.average_log_prob and loss.loss_type in LENGTH_NORMALIZED_LOSSES:
        raise ValueError(
            f"loss.average_log_prob would normalize loss.loss_type {loss.loss_type!r} twice: it "
            "already compares mean per-token log-ratios; set average_log_prob to false"
        )
    if not loss.rpo_alpha >= 0:
        raise ValueError(f"loss.rpo_alpha must be >= 0 (0: plain DPO), got {loss.rpo_alpha}")
    if not 0 <= loss.shared_token_weight <= 1:  # also refuses NaN
        raise ValueError(
            "loss.shared_token_weight must be in [0, 1] (1: plain DPO, 0: only the tokens where "
            f"the answers differ), got {loss.shared_token_weight}"
        )
    _check_image_term(loss)


def dense_weight(loss: LossSettings) -> float | None:
    """The dense preference's weight of shared tokens, None when it is off (weight 1)."""
    return None if loss.shared_token_weight == 1 else float(loss.shared_token_weight)


def _check_image_term(loss: LossSettings) -> None:
    if not loss.image_weight >= 0:  # also refuses NaN
        raise ValueError(
            f"loss.image_weight must be >= 0 (0: no image-contrast term), got {loss.image_weight}"
        )
    if loss.image_beta is not None and not loss.image_beta > 0:
        raise ValueError(f"loss.image_beta must be > 0 or null (use beta), got {loss.image_beta}")
    step = loss.image_noise_step
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < NOISE_STEPS:
        raise ValueError(
            f"loss.image_noise_step must be an integer in [0, {NOISE_STEPS - 1}] (a 0-based step "
            f"of the diffusion schedule), got {step!r}"
        )
    if loss.image_schedule not in NOISE_SCHEDULES:
        raise ValueError(
            f"loss.image_schedule must be one of {', '.join(NOISE_SCHEDULES)}, got "
            f"{loss.image_schedule!r}"
        )


def _check_selection(config: TrainConfig) -> None:
    sources = config.sources
    if sources is not None and (not sources or not all(isinstance(s, str) and s for s in sources)):
        raise ValueError(f"sources must be a non-empty list of source names or null, got {sources}")
    steps = config.noise_steps
    if steps is None:
        return
    in_range = all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < NOISE_STEPS for t in steps
    )
    if not steps or not in_range:
        raise ValueError(
            f"noise_steps must be a non-empty list of integers in [0, {NOISE_STEPS - 1}] or null "
            f"(all pairs), got {steps}"
        )


def flat_config(config: TrainConfig) -> dict[str, Any]:
    """The config as one level of scalars, as TensorBoard's hparams need."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            ok = isinstance(value, (int, float, str, bool))
            flat[prefix.rstrip(".")] = value if ok else json.dumps(value)

    walk("", asdict(config))
    return flat
