"""The `bpo demo` schema: everything the ShapeWorld experiment does, fixed before it runs.

`configs/shapeworld-demo.yaml` is this schema's defaults, written out (`bpo demo --print_config`);
every stage of the run is a product stage configured from it (`bpo.demo.stages`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bpo.models.config import TinyLlavaConfig
from bpo.shapeworld.world import WorldConfig
from bpo.train.config import LossType


@dataclass
class StageConfig:
    """One training stage of the base model: optimizer steps, batch size and peak learning rate."""

    steps: int
    batch_size: int
    lr: float


@dataclass
class NegativesConfig:
    """How the demo bootstraps pairs from its alignment set (one `bpo bootstrap` run)."""

    scenes: int = 700  # alignment scenes whose gold answers are the positives
    # Share of those scenes asked one existence question ("Is there a ring in the image?", a
    # present or an absent shape) instead of a caption: pairs for POPE-style answers too.
    existence_share: float = 0.3
    # Weakened negatives at each step (sigmoid schedule; the paper uses t = 900). Moderate steps:
    # here t <= 300 leaves the image half legible, so the model's own captions carry its text
    # prior (partner share ~0.5-0.55, chance ~0.34); at t = 900 the image is gone, the captions
    # ramble (twice the gold's length) and the partner share is at chance.
    noise_steps: tuple[int, ...] = (100, 300, 500)
    temperature: float = 1.0
    max_new_tokens: int = 40
    batch_size: int = 64
    # Keep a weakened negative only if its token count is at most this multiple of its gold
    # caption's (None: keep all). Noised images make long rambling captions, and DPO against long
    # negatives teaches the model to say less (recall falls) rather than to look.
    max_length_ratio: float | None = 1.5
    # Keep a weakened negative only if it has at least this multiple of its gold caption's tokens
    # (None: keep all). docs/shapeworld-tuning.md has what 1.0 (no negative shorter than its
    # gold) measured.
    min_length_ratio: float | None = None
    # The lexical injector's edit types (None: every one, `bpo.bootstrap.config.EDIT_TYPES`).
    edit_types: tuple[str, ...] | None = None


@dataclass
class ArmsConfig:
    """How the demo trains its arms; the seeds are fixed here, before the run."""

    # Beyond the paper (`bpo_image`, `bpo_rounds`): not in the default run, which they would take
    # past 10 minutes; `--full true` adds them, or name them here.
    arms: tuple[str, ...] = ("sft", "bpo", "bpo_weaken", "bpo_inject")
    # A BPO arm per noise step, on the weakened negatives of that step only (`--full true`).
    sweep_steps: tuple[int, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds of sft and bpo
    ablation_seeds: tuple[int, ...] = (0, 1, 2)  # of the other arms
    steps: int = 300  # optimizer steps, the same for every arm (docs/shapeworld-tuning.md)
    batch_size: int = 16  # pairs per step
    # Tuned on training seeds 10..12 and held-out scenes 2000..3999 (disjoint from a run's): the
    # lr is SFT's best (lowest CHAIR_i with recall within 0.02 of its best; full: 1e-3..1e-2,
    # LoRA r8: 2e-3..2e-2 gave 1e-2); full fine-tuning gave both arms a lower CHAIR_i than LoRA.
    lr: float = 5e-3  # a 0.2M-parameter model needs a far larger step than a 7B one
    finetune: Literal["lora", "full"] = "full"
    lora_r: int = 8  # adapter rank (alpha = 2r), with finetune="lora"
    # The preference loss (`loss.loss_type` of `bpo train`: sigmoid is DPO) and its label
    # smoothing (cdpo, robust).
    loss_type: LossType = "sigmoid"
    label_smoothing: float = 0.0
    beta: float = 0.5  # DPO's KL strength (on mean per-token log-probs, see below)
    # NLL anchor on the chosen answers (RPO): without it DPO lowers the gold's likelihood too and
    # shortens captions, which costs recall. With the dense preference below, 2 still cost
    # recall and 4 the CHAIR_i gain; 3 kept both, at 300 steps on two tuning worlds (the tuning
    # record's ninth rule).
    rpo_alpha: float = 3.0
    # Length-normalized DPO: a summed log-prob rewards short answers, which costs recall.
    average_log_prob: bool = True
    warmup_ratio: float = 0.05
    # The DPO arms' weight of the tokens a pair's answers share (`loss.shared_token_weight` of
    # `bpo train`, a dense preference); 1: plain DPO. 0: the preference sees only the tokens
    # where the answers differ; with plain DPO, BPO's captions broke 1.5-6 points more often
    # than SFT's on every setting tried.
    shared_token_weight: float = 0.0
    # `bpo_image`: BPO plus the image-contrast term (the gold answer preferred on the clean image
    # over the noised one) at this weight; `loss.image_weight` of `bpo train`.
    image_weight: float = 1.0
    # `bpo_rounds`: BPO in this many on-policy rounds (`bpo iterate`), `steps // rounds` steps
    # each, so the rounds train about as many steps in all as every other arm.
    rounds: int = 3


@dataclass
class DemoConfig:
    """Everything `bpo demo` does, fixed before the run (seeds included)."""

    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    model: TinyLlavaConfig = field(default_factory=TinyLlavaConfig)
    corpus_size: int = 20000  # text-only captions carrying the co-occurrence prior
    tower_scenes: int = 4000  # images for the vision tower's pretraining
    align_scenes: int = 3000  # the unbiased image-text alignment set
    eval_scenes: int = 1500  # held-out scenes for the hallucination metrics
    # Shares of alignment examples that are existence questions (present or absent shape, equal
    # odds) and other questions (colour, count); the rest are captions.
    existence_fraction: float = 0.3
    qa_fraction: float = 0.15
    lm: StageConfig = field(default_factory=lambda: StageConfig(800, 64, 3e-3))
    tower: StageConfig = field(default_factory=lambda: StageConfig(400, 64, 2e-3))
    projector: StageConfig = field(default_factory=lambda: StageConfig(500, 32, 3e-3))
    full: StageConfig = field(default_factory=lambda: StageConfig(60, 32, 5e-4))
    # Share of corpus texts whose prompt carries the scene as a grid description (some cells
    # unknown): they teach the LM to read a scene from context and fill gaps from its prior.
    grid_fraction: float = 0.6
    unknown_prob: float = 0.3
    # Share of grid-prompted corpus texts that ask whether a shape is there (answered by the
    # scene, so the prior decides where the grid leaves a cell unknown) instead of a caption.
    corpus_qa_fraction: float = 0.5
    replay_weight: float = 2.0  # text-corpus replay during the full stage
    max_new_tokens: int = 40  # caption length limit at evaluation
    pope_per_image: int = 1  # POPE: yes-questions per image (and as many no-questions)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    training: ArmsConfig = field(default_factory=ArmsConfig)  # the SFT and BPO arms
    eval_batch_size: int = 100
    # Evaluate each model in a second process while the next arm trains (two cores at work, one
    # torch thread each); false evaluates in the main process, between the trainings.
    eval_in_background: bool = True
    # Torch threads. On an idle 2-core machine 2 threads were ~1.25x faster per step
    # (benchmarks/threads.py), but on cores shared with other work OpenMP threads spin-wait on
    # ops this small and ran many times slower than 1; 1 is the safe default.
    threads: int = 1
    # `bpo demo --full true`: the whole run once per world seed (each its own world and base
    # model), every arm on every seed, and a noise-step sweep (negatives and a BPO arm per step).
    full_run: bool = False
    full_world_seeds: tuple[int, ...] = (0, 1, 2)
    full_noise_steps: tuple[int, ...] = (100, 300, 500, 700, 900)
