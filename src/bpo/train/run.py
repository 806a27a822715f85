"""`bpo train`: DPO (BPO) or the SFT baseline on preference pairs, an accelerate loop.

Features:
- LoRA, QLoRA or full fine-tuning of the language model (`bpo.train.model`).
- The reference is the frozen starting model, scored once before any weight is wrapped or trained
  (`bpo.train.refs`: cached in the pair store, or in memory); training runs no reference forward.
- fp32/bf16/fp16 autocast, gradient accumulation, gradient checkpointing, warmup then a cosine
  (or linear, or constant) schedule applied to every parameter group.
- `max_length` counts image tokens and cuts answers, never the image or the prompt; truncated
  pairs are counted and reported; null is the model's context, capped (`bpo.train.limits`). A
  batch that runs out of memory is named, pairs and settings. A pair whose image is missing or
  broken, or that cannot be encoded, is reported with its key and counted, and the run goes on
  without it.
- Metrics under TRL's names, one JSON line per logged step in OUT/metrics.jsonl and to
  accelerate's trackers (TensorBoard by default).
- An optional image-contrast term (`loss.image_weight`, `bpo.train.image_noise`): the chosen
  answer scored once more on the pair's noised image, against its cached reference score.
- Checkpoints every `save_steps` (`bpo.train.checkpoint`); `resume=True` continues from the newest
  one and gives the weights and metric lines an uninterrupted run gives. The data order is a
  seeded shuffle per epoch, recomputed, not stored; so a resume on other pairs (a rebuilt store)
  is refused. One run per OUT: it is locked while a run writes it (`bpo.train.outputs`).
- Output under OUT/model in Hugging Face format (safetensors, with the processor): the adapter,
  the adapter merged into the base (`lora.merge`), or the full weights.
- DDP, DeepSpeed ZeRO-2/3 or FSDP from one launcher (`bpo.train.distributed`).

Assumptions: a LLaVA-style model (`vision_tower`, `multi_modal_projector`, `language_model`
submodules) whose forward takes a 4D mask and per-row `logits_to_keep` (see
`bpo.train.logprobs`); the pairs fit in memory as text (images are loaded per batch).

Run:
    bpo train --config configs/train/shapeworld.yaml
    bpo train --config configs/train/shapeworld.yaml --method sft --out runs/train/sft
    bpo train --config configs/train/shapeworld.yaml --resume true     # after a kill
    # 8 GPUs, R = configs/llava-1.5-7b-bpo.yaml: DDP, or the paper's DeepSpeed ZeRO-2
    accelerate launch --config_file configs/accelerate/ddp.yaml -m bpo.cli train --recipe R
    accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml -m bpo.cli train ...
    torchrun --nproc_per_node 2 -m bpo.cli train --config X.yaml    # DDP on CPUs too (gloo)
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from bpo.data.files import write_atomic
from bpo.data.records import PreferencePair
from bpo.train import checkpoint, distributed
from bpo.train.batch import PairBatch, pad_token_id
from bpo.train.config import TrainConfig, check_config, flat_config
from bpo.train.data import Collated, Collator, check_store, epoch_batches, row_lengths, run_dataset
from bpo.train.fingerprint import pairs_fingerprint
from bpo.train.image_noise import image_noise
from bpo.train.limits import naming_out_of_memory, resolve_max_length
from bpo.train.logprobs import chosen_logps, noised_chosen_logps, pair_logps
from bpo.train.losses import IMAGE_METRICS, NoisedChosen, nll_loss, preference_loss
from bpo.train.model import load_for_training, param_groups, setup_trainable
from bpo.train.outputs import lock_output
from bpo.train.refs import training_pairs

MAX_BAD_MESSAGES = 20
TRAIN_MEMORY_FIX = (
    "lower run.max_length (longer answers are cut and counted as truncated), or run.batch_size "
    "(raise run.grad_accum to keep the effective batch), or set run.gradient_checkpointing: true"
)
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@dataclass
class TrainResult:
    """What `train` returns: the trained model, every metrics line, and the run's summary."""

    model: Any  # the trained model (adapter merged when lora.merge), in eval mode
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """The training state (model, optimizer, schedule, data position, counts) and its loop."""

    def __init__(self, config, model, processor, dataset, refs, accelerator, log):
        from transformers import get_scheduler

        self.config, self.dataset, self.log, self.accelerator = config, dataset, log, accelerator
        self.out = Path(config.out) if config.out is not None else None
        optimizer = torch.optim.AdamW(
            param_groups(model, config), betas=config.adam_betas, weight_decay=config.weight_decay
        )
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.backward_scale = distributed.backward_scale(accelerator, config.grad_accum)
        self.collate = Collator(pad_token_id(processor), refs)
        # Row lengths for length-grouped batches, from the text once per run (None: plain order).
        self.lengths = row_lengths(dataset.pairs, processor) if config.group_by_length else None
        world = accelerator.num_processes
        micro_per_epoch = len(epoch_batches(len(dataset), config.batch_size, 0, 0, 0, world))
        steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
        self.total_steps = config.max_steps or config.epochs * steps_per_epoch
        self.scheduler = get_scheduler(
            config.scheduler if config.scheduler != "constant" else "constant_with_warmup",
            self.optimizer,
            num_warmup_steps=math.ceil(config.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.step, self.epoch, self.micro = 0, 0, 0  # optimizer steps done; next micro-batch
        self.pairs_id = pairs_fingerprint(dataset.pairs)  # what the data position indexes
        self.truncated: set[str] = set()
        self.bad: dict[str, str] = {}  # key -> reason
        self.history: list[dict[str, Any]] = []
        # The metrics every process reduces, in one fixed order: processes must all-reduce
        # tensors of the same size even when one of them scored no pair in a step.
        self.metric_names = ["loss", "logps/chosen"]
        if config.method == "dpo":
            self.metric_names += [*REWARD_METRICS, "logps/rejected"]
            if config.loss.rpo_alpha > 0:
                self.metric_names.append("nll")
            if config.loss.image_weight > 0:
                self.metric_names += IMAGE_METRICS
        self.spare: PairBatch | None = None  # the last usable batch (see `_no_pair_loss`)

    # -- one optimizer step: forward and backward over `grad_accum` micro-batches ---------------

    def loss(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-pair losses (B,) and batch-mean metrics of the configured method."""
        if self.config.method == "sft":
            logps = chosen_logps(self.model, batch)
            losses = nll_loss(logps.chosen, logps.chosen_tokens)  # per token, per pair
            return losses, {"logps/chosen": logps.chosen.detach().mean()}
        logps = pair_logps(self.model, batch)  # one vision + prefix pass for both answers
        t = batch.tensors
        noised = None
        if self.config.loss.image_weight > 0:  # a second pass: the noised image's own prefix
            policy = noised_chosen_logps(self.model, batch).preference_chosen
            noised = NoisedChosen(policy, t["ref_noised_chosen_logps"], t["has_image"])
        return preference_loss(
            logps, t["ref_chosen_logps"], t["ref_rejected_logps"], self.config.loss, noised
        )

    def train_step(self, micro_batches: list[Collated], planned_pairs: int) -> dict[str, float]:
        """Accumulate gradients over the micro-batches, clip, step; the step's mean metrics."""
        acc = self.accelerator
        sums: dict[str, Any] = defaultdict(float)
        scored = 0
        for i, collated in enumerate(micro_batches):
            self.count(collated)
            last = i == len(micro_batches) - 1
            with distributed.accumulating(acc, self.model, last), acc.autocast():
                if collated.batch is None:  # every pair of the micro-batch is unusable
                    loss = self._no_pair_loss()
                    if loss is not None:
                        acc.backward(loss)
                    continue
                batch = self.spare = collated.batch.to(acc.device)
                stage = f"training step {self.step + 1}"
                with naming_out_of_memory(batch, stage, self.config.max_length, TRAIN_MEMORY_FIX):
                    losses, metrics = self.loss(batch)  # (B,), {name: batch mean}
                    # The step's loss is the mean over the pairs it planned to see.
                    acc.backward(losses.sum() / planned_pairs * self.backward_scale)
                scored += len(batch)
                sums["loss"] += losses.detach().sum()
                for name, value in metrics.items():
                    sums[name] += value * len(batch)
        grad_norm = None
        if self.config.max_grad_norm is not None:  # under DeepSpeed: the norm the engine clipped
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            grad_norm = acc.clip_grad_norm_(params, self.config.max_grad_norm)
        lrs = [group["lr"] for group in self.optimizer.param_groups]  # the rates this step used
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        line = self._step_means(sums, scored)
        line["lr"] = lrs[0]
        if len(lrs) > 1:
            line["lr/projector"] = lrs[1]
        if grad_norm is not None:  # DeepSpeed may not report one
            line["grad_norm"] = float(grad_norm)
        return line

    def _step_means(self, sums: dict[str, Any], scored: int) -> dict[str, float]:
        """The metrics' means over every pair scored in the step, on all processes."""
        values = [sums.get(name, 0.0) for name in self.metric_names] + [scored]
        totals = torch.stack([_as_tensor(v).to(self.accelerator.device) for v in values])
        totals = self.accelerator.reduce(totals, "sum").tolist()
        pairs = max(totals[-1], 1.0)
        return {name: t / pairs for name, t in zip(self.metric_names, totals[:-1], strict=True)}

    def _no_pair_loss(self) -> Tensor | None:
        """The loss of a micro-batch with no usable pair: None (skip it) on one process.

        Under DDP every process must run a forward through the wrapped model and a backward, or
        the gradient all-reduce waits forever; so a usable batch runs, its loss times zero.
        """
        if self.accelerator.num_processes == 1:
            return None
        if self.spare is None:
            self.spare = self._first_usable_batch()
        losses, _ = self.loss(self.spare)
        return losses.sum() * 0.0

    def _first_usable_batch(self) -> PairBatch:
        """A batch of the dataset's first pair that encodes (a stand-in with no effect)."""
        for index in range(len(self.dataset)):
            collated = self.collate([self.dataset[index]])
            if collated.batch is not None:
                return collated.batch.to(self.accelerator.device)
        raise ValueError("no pair of the training set is usable (see the pairs reported above)")

    def count(self, collated: Collated) -> None:
        """Count (and report the first few) bad and truncated pairs, each once."""
        for bad in collated.bad:
            if bad.key not in self.bad:
                self.bad[bad.key] = bad.reason
                if len(self.bad) <= MAX_BAD_MESSAGES:
                    self.log(f"skipping {bad.message}")
        batch = collated.batch
        if batch is not None:
            cut = [k for k, t in zip(batch.keys, batch.extra["truncated"], strict=True) if t]
            if cut and not self.truncated:
                self.log(
                    f"pair {cut[0]}: an answer was cut to max_length={self.config.max_length}; "
                    "truncated pairs are counted"
                )
            self.truncated.update(cut)

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, on_step: Callable[[int, dict], None] | None = None) -> None:
        """Train until `total_steps`, from the current position (0 or a loaded checkpoint)."""
        from bpo.utils.console import progress_bar

        cfg, acc = self.config, self.accelerator
        self.model.train()
        remaining, shown = self.total_steps - self.step, acc.is_local_main_process
        with progress_bar(f"training ({cfg.method})", remaining, shown) as advance:
            while self.step < self.total_steps:
                rank, world = acc.process_index, acc.num_processes
                batches = epoch_batches(
                    len(self.dataset),
                    cfg.batch_size,
                    cfg.seed,
                    self.epoch,
                    rank,
                    world,
                    self.lengths,
                    cfg.grad_accum,
                )
                # Its own generator: a loader otherwise draws its seed from the global RNG, and a
                # resumed run would then draw one more time than an uninterrupted one (dropout).
                loader = torch.utils.data.DataLoader(
                    self.dataset,
                    batch_sampler=batches[self.micro :],
                    collate_fn=self.collate,
                    num_workers=cfg.num_workers,
                    generator=torch.Generator().manual_seed(cfg.seed),
                )
                micro_batches = iter(loader)
                while self.micro < len(batches) and self.step < self.total_steps:
                    group = batches[self.micro : self.micro + cfg.grad_accum]
                    step_batches = [next(micro_batches) for _ in group]
                    line = self.train_step(step_batches, sum(len(b) for b in group))
                    self.step += 1
                    self.micro += len(group)
                    epoch = round(self.epoch + self.micro / len(batches), 6)  # fractional
                    line = {"step": self.step, "epoch": epoch, **line}
                    self._after_step(line, on_step)
                    advance(self.step, line.get("loss"), line.get("rewards/accuracies"))
                if self.micro >= len(batches):
                    self.epoch, self.micro = self.epoch + 1, 0

    def _after_step(self, line: dict[str, Any], on_step: Callable | None) -> None:
        cfg = self.config
        if self.step % cfg.log_steps == 0 or self.step == self.total_steps:
            self.history.append(line)
            if self.out is not None and self.accelerator.is_main_process:
                with (self.out / "metrics.jsonl").open("a", encoding="utf-8") as f:
                    f.write(json.dumps(line) + "\n")
            self.accelerator.log({k: v for k, v in line.items() if k != "step"}, step=self.step)
        if cfg.save_steps and self.out is not None and self.step % cfg.save_steps == 0:
            self.save_checkpoint()
        if on_step is not None:
            on_step(self.step, line)

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write OUT/checkpoints/step-N (atomically: a kill leaves the previous one usable)."""
        progress = {"step": self.step, "epoch": self.epoch, "micro": self.micro}
        progress |= {"truncated": sorted(self.truncated), "bad": self.bad, "history": self.history}
        progress["pairs"] = self.pairs_id
        parts = (self.accelerator, self.model, self.optimizer, self.scheduler)
        split = distributed.state_is_split(self.accelerator)
        return checkpoint.save_checkpoint(
            self.out / "checkpoints", progress, self.config, *parts, split=split
        )

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything `save_checkpoint` wrote; the metrics log is cut back to its step."""
        state = checkpoint.load_checkpoint(
            path,
            self.config,
            self.accelerator,
            self.model,
            self.optimizer,
            self.scheduler,
            pairs=self.pairs_id,
        )
        self.step, self.epoch, self.micro = state["step"], state["epoch"], state["micro"]
        self.truncated, self.bad = set(state["truncated"]), state["bad"]
        self.history = state["history"]
        if self.accelerator.is_main_process:
            # Lines a killed run logged after this checkpoint are logged again by the resume.
            log_path = self.out / "metrics.jsonl"
            write_atomic(log_path, "".join(json.dumps(line) + "\n" for line in self.history))
        self.log(f"resumed from {path} at step {self.step}")


def _ref_scores(pair: PreferencePair, noised: bool) -> tuple[float, ...]:
    """A pair's reference log-probs in the Collator's order (`bpo.train.data.REF_TENSORS`)."""
    scores = (pair.ref_chosen_logp, pair.ref_rejected_logp)
    return (*scores, pair.ref_noised_chosen_logp) if noised else scores


def _as_tensor(value: Any) -> Tensor:
    return value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))


# --- Entry point --------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    model: nn.Module | None = None,
    processor: Any = None,
    pairs: Sequence[PreferencePair] | None = None,
    images: Mapping[str, Image.Image] | None = None,
    *,
    resume: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train with DPO (or SFT) and return the trained model, its metrics and a summary.

    Args:
        model, processor: the starting model (also the reference); default: `config.model` loaded.
        pairs: the training pairs; default: the store at `config.pairs`. `config.sources` and
            `config.noise_steps` select among either.
        images: the pairs' images by path (no files needed); default: read under `config.image_root`.
        resume: continue from the newest checkpoint under `config.out`.
        on_step: called as on_step(step, metrics) after each optimizer step and its checkpoint.
        config.out: where the log, checkpoints and model go; None writes nothing.
    """
    check_config(config)  # before anything loads: a bad setting fails in a second
    if resume and config.out is None:
        raise ValueError("resume needs run.out, the folder holding the checkpoints")
    if pairs is None and config.pairs is not None:
        check_store(config.pairs)  # a mistyped run.pairs fails before the model loads
    accelerator = distributed.make_accelerator(config)
    distributed.check_launch(config, accelerator)
    log = log if accelerator.is_main_process else (lambda _msg: None)
    # One run per --out: two would interleave metrics.jsonl and checkpoints. The main process
    # writes OUT, so it holds the lock; the others follow it.
    holds_out = config.out is not None and accelerator.is_main_process
    with lock_output(config.out, "bpo train") if holds_out else nullcontext():
        trainer, processor = _start(
            config, model, processor, pairs, images, accelerator, resume=resume, log=log
        )
        trainer.fit(on_step)
        return _finish(trainer, processor, log)


def _start(
    config: TrainConfig,
    model: nn.Module | None,
    processor: Any,
    pairs: Sequence[PreferencePair] | None,
    images: Mapping[str, Image.Image] | None,
    accelerator: Any,
    *,
    resume: bool,
    log: Callable[[str], None],
) -> tuple[Trainer, Any]:
    """The Trainer at step 0 or at the newest checkpoint, and the processor (both loaded here
    when not given); `trainer.config` has `max_length` resolved."""
    from accelerate.utils import set_seed

    out = Path(config.out) if config.out is not None else None
    if out is not None and not resume and (out / "metrics.jsonl").exists():
        raise FileExistsError(
            f"{out} holds a previous run (metrics.jsonl); pass --resume to continue it, or "
            "choose another --out"
        )
    latest = checkpoint.latest_checkpoint(out) if resume else None
    set_seed(config.seed)  # the adapter's initialisation and dropout
    if model is None:
        model, processor = load_for_training(config, accelerator.device)
    elif not getattr(model, "is_loaded_in_4bit", False):
        model.to(accelerator.device)
    # Before the reference pass: its fingerprint holds max_length, as `bpo refs` resolves it.
    config = resolve_max_length(config, model, log)
    # Before any adapter or trainable weight exists: the reference is the starting model.
    pairs, bad = training_pairs(config, model, processor, pairs, images, accelerator, log)
    if not pairs:
        example = f", e.g. {bad[0].message}" if bad else ""
        raise ValueError(
            f"no usable pairs to train on ({len(bad)} unusable{example}); check the pairs, "
            "run.sources and run.noise_steps"
        )
    dpo, noise = config.method == "dpo", image_noise(config)
    refs = {p.key: _ref_scores(p, noise is not None) for p in pairs} if dpo else None
    dataset = run_dataset(config, pairs, processor, images)
    model = setup_trainable(model, config)
    trainer = Trainer(config, model, processor, dataset, refs, accelerator, log)
    trainer.count(Collated(None, bad))
    if latest is not None:
        trainer.load_checkpoint(latest)
    elif resume:
        log(f"no checkpoint under {out}; starting from step 0")
        if accelerator.is_main_process:
            (out / "metrics.jsonl").unlink(missing_ok=True)  # lines of the run being redone
    if accelerator.log_with:  # filled by init_trackers, which starts them
        accelerator.init_trackers("bpo", config=flat_config(config))
    world = accelerator.num_processes
    log(
        f"{config.method}: {len(dataset)} pairs, {trainer.total_steps} steps, effective batch "
        f"{config.effective_batch * world} ({config.batch_size} x {config.grad_accum} "
        f"accumulation x {world} processes)"
    )
    return trainer, processor


def _finish(trainer: Trainer, processor: Any, log: Callable[[str], None]) -> TrainResult:
    """Unwrap (and merge) the trained model, summarize the run, save both under OUT."""
    config, accelerator, out = trainer.config, trainer.accelerator, trainer.out
    # Sharded weights are gathered (every process takes part); whole copies are saved as they are.
    state_dict = (
        accelerator.get_state_dict(trainer.model) if distributed.is_sharded(accelerator) else None
    )
    final = accelerator.unwrap_model(trainer.model)
    if config.finetune != "full" and config.lora.merge:
        final = final.merge_and_unload()
    final.eval()
    world = accelerator.num_processes
    summary = {
        "method": config.method,
        "steps": trainer.step,
        "pairs": len(trainer.dataset),
        "effective_batch": config.effective_batch * world,
        "processes": world,
        "distributed_type": str(accelerator.distributed_type.value),
        "max_length": config.max_length,
        "truncated_pairs": len(trainer.truncated),
        "bad_pairs": len(trainer.bad),
        "bad_reasons": dict(Counter(trainer.bad.values())),
        "final": trainer.history[-1] if trainer.history else {},
    }
    if trainer.truncated:
        log(f"{len(trainer.truncated)} pairs had an answer cut to max_length={config.max_length}")
    if trainer.bad:
        log(f"{len(trainer.bad)} pairs skipped: {summary['bad_reasons']}")
    if out is not None and accelerator.is_main_process:
        with checkpoint.reporting_full_disk(out / "model", "the trained model"):
            final.save_pretrained(out / "model", safe_serialization=True, state_dict=state_dict)
            processor.save_pretrained(out / "model")
            summary["model"] = str(out / "model")
            write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    accelerator.end_training()
    return TrainResult(final, trainer.history, summary)
