"""The sides: `bpo train` and TRL's DPOTrainer, each training `epochs` epochs over the same pairs
in its own process, timed per step (step only) and per turn (end to end, see `Gate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from throughput.build import (
    Settings,
    bpo_pairs,
    build_model,
    build_processor,
    load_images,
    lora_config,
    make_pairs,
)
from throughput.measure import Gate, PeakMemory, StepClock, param_counts, side_result


def run_bpo(settings: Settings, gate: Gate) -> dict[str, Any]:
    """`bpo.train.run.train` (the Python API behind `bpo train`), its reference pass and steps
    timed.

    Turns: the reference pass (nothing else runs meanwhile), then one turn per step: fetching
    and collating its batch, and the step. Setting up the trainer (LoRA, optimizer) between
    them is untimed, as TRL's trainer set-up is.
    """
    # Imported before the memory baseline, as TRL's side imports them with trl.
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers.optimization  # noqa: F401

    import bpo.utils.console  # noqa: F401
    from bpo.models.load import ModelConfig
    from bpo.train import refs as bpo_refs
    from bpo.train import run as bpo_run
    from bpo.train.config import LoraSettings, LossSettings, TrainConfig

    processor = build_processor(settings.spec, settings.seed)
    images = load_images(settings)
    model = build_model(settings, processor)
    memory = PeakMemory(settings.device)
    memory.reset()

    clock, passes = StepClock(settings.device), StepClock(settings.device)
    tokens: list[dict[str, float]] = []
    train_step, fit = bpo_run.Trainer.train_step, bpo_run.Trainer.fit
    score_pairs = bpo_refs.score_pairs

    def timed_refs(*args, **kwargs):
        gate.wait_turn()
        passes.start()
        out = score_pairs(*args, **kwargs)
        passes.stop()
        gate.done()
        return out

    def gated_fit(self, *args, **kwargs):
        gate.wait_turn()  # the first step's turn starts before its batch is fetched
        return fit(self, *args, **kwargs)

    def timed_step(self, micro_batches, *args, **kwargs):
        clock.start()
        line = train_step(self, micro_batches, *args, **kwargs)
        clock.stop()
        gate.done()
        tokens.append(_bpo_tokens(micro_batches[0].batch))
        if len(clock.times) < settings.total_steps:
            gate.wait_turn()  # the next turn fetches the next batch
        return line

    # Timing hooks only: the pass and the step are the library's, unchanged.
    bpo_run.Trainer.train_step = timed_step
    bpo_run.Trainer.fit = gated_fit
    bpo_refs.score_pairs = timed_refs  # the name `training_pairs` scores in-memory pairs with

    pairs = bpo_pairs(settings)
    config = TrainConfig(
        model=ModelConfig(name_or_path="<in memory>"),
        out=None,
        lora=LoraSettings(r=settings.lora_r, alpha=settings.lora_alpha, dropout=0.0),
        loss=LossSettings(beta=settings.beta),
        lr=settings.lr,
        scheduler="constant",
        warmup_ratio=0.0,
        max_grad_norm=1.0,
        epochs=settings.epochs,
        max_steps=settings.total_steps,
        batch_size=settings.batch_size,
        # The pass in training's batches: a forward of them fits wherever the step does, and on
        # a CPU batches of 4 ran faster per pair than the default 8.
        reference_batch_size=settings.batch_size,
        precision="fp32",  # no autocast; the weights are already in the benchmark's dtype
        gradient_checkpointing=settings.gradient_checkpointing,
        seed=settings.seed,
        trackers=[],
    )
    images_by_path = {f"{i}.png": image for i, image in enumerate(images)}
    result = bpo_run.train(config, model, processor, pairs, images_by_path, log=lambda _: None)
    delta, peak = memory.peak_above_baseline()
    counts = param_counts(result.model)
    loss = result.history[-1]["loss"]
    out = side_result(settings, clock, gate, delta, peak, tokens, counts, loss)
    out["ref_pass_s"], out["ref_pass_cpu_s"] = sum(passes.times), sum(passes.cpu_times)
    return out


def _bpo_tokens(batch) -> dict[str, float]:
    """Mean tokens per pair in a packed batch: prefix, chosen, rejected, and the padded row."""
    t = batch.tensors
    return {
        "prefix": t["prefix_lengths"].float().mean().item(),
        "chosen": t["chosen_lengths"].float().mean().item(),
        "rejected": t["rejected_lengths"].float().mean().item(),
        "row_padded": t["input_ids"].shape[1],
    }


def trl_dataset(settings: Settings, with_refs: bool):
    """The same pairs in TRL's conversational vision format (as `bpo export --format trl`)."""
    from datasets import Dataset

    images = load_images(settings)
    rows = []
    for p in make_pairs(settings):
        content = [{"type": "image", "text": None}, {"type": "text", "text": p["question"]}]
        row = {
            "prompt": [{"role": "user", "content": content}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": p["chosen"]}]}],
            "rejected": [
                {"role": "assistant", "content": [{"type": "text", "text": p["rejected"]}]}
            ],
            "images": [images[p["image"]]],
        }
        if with_refs:
            row["ref_chosen_logps"] = 0.0
            row["ref_rejected_logps"] = 0.0
        rows.append(row)
    return Dataset.from_list(rows)


def _trl_args(settings: Settings, no_ref: bool):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(Path(settings.data_dir) / f"trl_out_{'noref' if no_ref else 'ref'}"),
        per_device_train_batch_size=settings.batch_size,
        num_train_epochs=settings.epochs,
        max_steps=settings.total_steps,
        learning_rate=settings.lr,
        lr_scheduler_type="constant",
        beta=settings.beta,
        max_grad_norm=1.0,
        optim="adamw_torch",
        gradient_checkpointing=settings.gradient_checkpointing,
        # bf16=False: no autocast; the weights are already in the benchmark's dtype, as on bpo's side.
        bf16=False,
        use_cpu=not settings.device.startswith("cuda"),
        max_length=None,
        remove_unused_columns=not no_ref,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=settings.seed,
    )


def run_trl(settings: Settings, no_ref: bool, gate: Gate) -> dict[str, Any]:
    """TRL's DPOTrainer.train() with a LoRA config; no_ref: reference forward removed.

    Turns: one per step, from before its batch is fetched (TRL's collator processes the images
    there) to the step's end; the reference forward is inside TRL's step.
    """
    import torch
    from transformers import TrainerCallback
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    processor = build_processor(settings.spec, settings.seed)
    dataset = trl_dataset(settings, with_refs=no_ref)
    model = build_model(settings, processor)
    memory = PeakMemory(settings.device)
    memory.reset()

    clock = StepClock(settings.device)
    tokens: list[dict[str, float]] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            gate.wait_turn()  # the first turn starts before the first batch is fetched

        def on_step_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.stop()
            gate.done()
            if len(clock.times) < settings.total_steps:
                gate.wait_turn()

    class Collator(DataCollatorForVisionPreference):
        """TRL's collator; records the token counts and passes constant refs through (no_ref)."""

        def torch_call(self, examples):
            refs = [
                (e.pop("ref_chosen_logps", 0.0), e.pop("ref_rejected_logps", 0.0)) for e in examples
            ]
            out = super().torch_call(examples)
            if no_ref:
                out["ref_chosen_logps"] = torch.tensor([r[0] for r in refs])
                out["ref_rejected_logps"] = torch.tensor([r[1] for r in refs])
            tokens.append(_trl_tokens(out))
            return out

    trainer = DPOTrainer(
        model=model,
        args=_trl_args(settings, no_ref),
        train_dataset=dataset,
        processing_class=processor,
        peft_config=lora_config(settings),
        data_collator=Collator(processor=processor),
        callbacks=[StepTimer()],
    )
    if no_ref:
        trainer.precompute_ref_logps = True  # refused at __init__ for vision data; see module doc
    output = trainer.train()
    delta, peak = memory.peak_above_baseline()
    counts = param_counts(trainer.model)
    loss = float(output.training_loss)
    return side_result(settings, clock, gate, delta, peak, tokens, counts, loss)


def _trl_tokens(out: dict[str, Any]) -> dict[str, float]:
    """Mean tokens per pair in TRL's batch (2 rows per pair: prompt + chosen, prompt + rejected)."""
    completion = out["completion_mask"]
    rows = completion.shape[0] // 2
    lengths = completion.sum(dim=1).float()
    prefix = (out["attention_mask"].sum(dim=1) - completion.sum(dim=1)).float()
    return {
        "prefix": prefix.mean().item(),
        "chosen": lengths[:rows].mean().item(),
        "rejected": lengths[rows:].mean().item(),
        "row_padded": out["input_ids"].shape[1],
    }
