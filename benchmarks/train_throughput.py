"""DPO training throughput: `bpo train`'s step vs TRL's DPOTrainer, side by side in one run.

Both sides train LoRA adapters on the same LLaVA-shaped model (built from config, random init, same
seed), on the same preference pairs, with the same batch size, LoRA config, optimizer (AdamW, lr
1e-5 constant), gradient clipping (1.0), precision and gradient-checkpointing setting, for the same
number of optimizer steps after the same warm-up. Each side runs in its own process, so its peak
memory is its own.

- bpo: `bpo.train.run.train` (the Python API behind `bpo train`) on in-memory pairs. One row
  per pair, `[image + prompt | chosen | rejected]`, with a block attention mask
  (`bpo.train.logprobs.pair_logps`): the image and prompt are encoded once for both answers. The
  reference log-probs are computed once before training (timed apart, not in the step), so the
  step runs no reference forward. DPO sigmoid loss, beta 0.1.
- trl: `trl.DPOTrainer.train()` with its defaults for a `peft_config` and a vision dataset:
  chosen and rejected as two full rows (image and prompt repeated), and the reference log-probs
  from a forward with the adapter disabled, every step.
- trl-noref (a second TRL row, for honesty): TRL with its reference forward removed, as if its
  reference log-probs were precomputed. TRL refuses `precompute_ref_log_probs=True` for vision
  datasets, so the benchmark passes constant reference log-probs through the collator and sets
  the trainer's `precompute_ref_logps`; only its timing matters. bpo's speed-up over this row is
  what the shared prefix alone buys.

Settings both sides use: fp32 on CPU (bf16 weights on GPU), no autocast (TRL's default bf16=True
is turned off), gradient checkpointing off (TRL's default is on; `--gradient-checkpointing` turns
it on for both), eager attention on CPU (torch's CPU SDPA backward with a float mask was 2-2.5x
slower on both sides' rows here), SDPA on GPU; LoRA r=32, alpha=64, dropout 0 on the language
model's q/k/v/o/gate/up/down projections (vision tower and projector frozen; the table prints
both sides' trainable parameter counts, which must match).

Timings: TRL's step from `on_step_begin` to `on_step_end` (forward, backward, clipping, optimizer
step; not its collator's image processing), bpo's `Trainer.train_step` (the same span; its batch
is collated before). pairs/s = batch_size / the median measured step. On a CPU the sides' steps
are interleaved (every process built and waiting, then one step of each in turn, the order
rotating), so a busy shared machine slows every side alike; `--sequential` runs them one after
the other, as on a GPU, where one model at a time fits. Peak memory: CPU, the process's peak RSS
(VmHWM, reset once the model is built) minus its RSS then; GPU, torch.cuda.max_memory_allocated
minus the allocation once the model is built.

ideal_speedup is the ratio of matmul FLOPs per pair (2 x parameters per token; forward only for
the frozen vision tower and projector; backward = 1 forward for the language model, as LoRA's
frozen weights need input gradients only; attention's quadratic term and padding ignored):

    F_lm(T, S) = 2 N_lm T + 2 N_head S      (T tokens through the decoder, S of them scored)
    F_vis      = 2 N_vision V + 2 N_proj I    (V tower positions: LLaVA patches + CLS, Qwen
                                            patches; I image tokens: LLaVA patches, Qwen /4)
    TRL        = 4 F_vis + 3 F_lm(2P + C + R, C + R)   (policy fwd + bwd, ref fwd; 2 rows a pair)
    TRL no-ref = 2 F_vis + 2 F_lm(2P + C + R, C + R)
    bpo        =   F_vis + 2 F_lm( P + C + R, C + R)   (one row a pair, no ref forward)

with P the prefix (image + prompt) tokens and C, R the answers' tokens, means over the data. With
the vision tower and the head negligible, TRL / bpo = 3 (P + A) / (P + 2A) for answers of A
tokens: 2.45 at P = 221, A = 64.

Run: python benchmarks/train_throughput.py         (CPU, ~1-2 min; target speedup >= 2.3 and
                                                    peak_mem_ratio <= 0.8 on a 2-core CPU)
     python benchmarks/train_throughput.py --gpu   (LLaVA-1.5-7B-shaped, bf16, one CUDA GPU;
                                                    fewer Llama layers if memory is short)
     python benchmarks/train_throughput.py --gpu --dry-run   (print the settings, build nothing)
     python benchmarks/train_throughput.py --gpu --device cpu --text-layers 1 --vision-layers 1 \
         --batch-size 1 --warmup 0 --steps 1   (the GPU model's code path on a CPU, ~2 min)
     python benchmarks/train_throughput.py --family qwen2_5_vl   (CPU; the same comparison on
         a Qwen2.5-VL-shaped model, `shapes.py`: 392 px / 14 px patches merged 2x2 -> 196 image
         tokens, windowed ViT 2x192, Qwen2 4x384 with 2 key/value heads and M-RoPE; ~3 min)
The last line is a JSON object: pairs_per_s_bpo, pairs_per_s_trl, speedup, peak_mem_ratio,
ideal_speedup, the same against the trl-noref row, and the settings that matter.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import shapes  # benchmarks/shapes.py, next to this script

COMMAND = "python benchmarks/train_throughput.py"
SIDES = ("bpo", "trl", "trl-noref")
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class ModelSpec:
    """A LLaVA-shaped model (CLIP vision tower + 2-layer MLP projector + Llama), or with
    `family="qwen2_5_vl"` a Qwen2.5-VL-shaped one (`shapes.py`: windowed ViT, 2x2 patch merger,
    Qwen2 with M-RoPE)."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    vision_feature_layer: int  # LLaVA-1.5 takes the penultimate layer's patches
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    vocab_size: int  # at least the tokenizer's size; real LLaVA-1.5 has 32064
    family: str = "llava"
    merge: int = 1  # merge x merge patches become one image token (Qwen: 2)
    text_kv_heads: int = 0  # Qwen's; LLaVA's Llama has as many as text_heads

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_tokens(self) -> int:
        return self.patches // self.merge**2

    @property
    def vision_positions(self) -> int:
        """Positions the vision tower runs over: CLIP adds a CLS position to the patches."""
        return self.patches + (1 if self.family == "llava" else 0)


# CPU: 196 image tokens (224 / 16) and a small Llama: bpo's step (4 pairs) takes ~0.5 s on 2 cores.
# The vision tower is small next to the language model, as CLIP ViT-L is next to Llama-7B.
CPU_SPEC = ModelSpec(224, 16, 192, 2, 4, 768, -2, 384, 4, 6, 1024, 1024)
# LLaVA-1.5-7B: CLIP ViT-L/14-336 (576 image tokens) + Llama-2-7B (vicuna) sizes.
GPU_SPEC = ModelSpec(336, 14, 1024, 24, 16, 4096, -2, 4096, 32, 32, 11008, 32064)
# `--family`: the CPU shape of each (`shapes.py` builds the non-LLaVA ones).
CPU_SPECS = {"llava": CPU_SPEC, "qwen2_5_vl": ModelSpec(**shapes.QWEN2_5_VL_CPU_FIELDS)}


@dataclass
class Settings:
    """Everything a side needs to rebuild the same model and data in its own process."""

    spec: ModelSpec
    device: str
    dtype: str
    pairs: int
    batch_size: int
    warmup: int
    steps: int
    prompt_words: int
    answer_words: int
    answer_jitter: int  # answers are answer_words +- jitter words long
    lora_r: int
    lora_alpha: int
    lr: float
    beta: float
    gradient_checkpointing: bool
    attn: str
    threads: int
    seed: int
    data_dir: str = ""


# ---------------------------------------------------------------------------------------------
# Data and model, built identically in every process


def word_list(count: int, seed: int) -> list[str]:
    """Distinct pronounceable words; the tokenizer learns each as one token."""
    rng = random.Random(seed)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: set[str] = set()
    while len(words) < count:
        syllables = rng.randint(2, 3)
        words.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)))
    return sorted(words)


def make_pairs(settings: Settings) -> list[dict[str, Any]]:
    """Preference pairs as plain dicts: id, question, chosen, rejected (answers differ a little)."""
    rng = random.Random(settings.seed)
    words = word_list(200, settings.seed)
    pairs = []
    for i in range(settings.pairs):
        question = " ".join(rng.choice(words) for _ in range(settings.prompt_words)) + "?"
        n = settings.answer_words + rng.randint(-settings.answer_jitter, settings.answer_jitter)
        chosen = [rng.choice(words) for _ in range(n)]
        rejected = list(chosen)
        for j in rng.sample(range(n), k=max(1, n // 4)):  # a hallucinated quarter
            rejected[j] = rng.choice(words)
        extra = rng.randint(-settings.answer_jitter, settings.answer_jitter)
        rejected = rejected[: n + extra] if extra < 0 else rejected + rng.sample(words, extra)
        pairs.append(
            {
                "id": f"pair_{i}",
                "question": question,
                "chosen": " ".join(chosen) + ".",
                "rejected": " ".join(rejected) + ".",
            }
        )
    return pairs


def build_processor(spec: ModelSpec, seed: int):
    """A LlavaProcessor (LLaVA-1.5 chat template) with a BPE tokenizer trained on the words, or
    the family's processor (`shapes.py`) with one trained on the same text."""
    from bpo.models.tiny import TinyLlavaConfig, train_bpe_tokenizer
    from bpo.models.tiny import build_processor as tiny_processor

    words = word_list(200, seed)
    rng = random.Random(seed)
    texts = [" ".join(rng.sample(words, 40)) for _ in range(400)]
    texts += ["USER: ASSISTANT:", "?", "."] * 50
    if spec.family == "qwen2_5_vl":
        return shapes.build_qwen2_5_vl_processor(spec, texts)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=1024)
    config = TinyLlavaConfig(image_size=spec.image_size, patch_size=spec.patch_size)
    # CLIP's normalization; the images are noise, so the values only need to be sane.
    config.image_mean = (0.48145466, 0.4578275, 0.40821073)
    config.image_std = (0.26862954, 0.26130258, 0.27577711)
    return tiny_processor(config, tokenizer)


def build_model(settings: Settings, processor):
    """A randomly initialised model of `settings.spec`, on its device: LLaVA here, others from
    `shapes.py`."""
    import torch

    spec = settings.spec
    if spec.family == "qwen2_5_vl":
        dtype = getattr(torch, settings.dtype)
        return shapes.build_qwen2_5_vl(
            spec, processor, settings.device, dtype, settings.attn, settings.seed
        )
    return build_llava(settings, processor)


def build_llava(settings: Settings, processor):
    """A randomly initialised LlavaForConditionalGeneration of `settings.spec`, on its device."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    spec, tokenizer = settings.spec, processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=max(len(tokenizer), spec.vocab_size),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token),
        image_seq_length=spec.image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=spec.vision_feature_layer,
    )
    config._attn_implementation = settings.attn
    torch.manual_seed(settings.seed)
    dtype = getattr(torch, settings.dtype)
    # Initialise on the target device: a 7B model's random init takes minutes on a CPU.
    with torch.device(settings.device):
        model = Llava._from_config(config, dtype=dtype)
    return model


def load_images(settings: Settings) -> list:
    from PIL import Image

    return [
        Image.open(Path(settings.data_dir) / f"{i}.png").convert("RGB")
        for i in range(settings.pairs)
    ]


def write_images(settings: Settings) -> None:
    """Noise images at the model's resolution (the processor then only normalizes them)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(settings.seed)
    size = settings.spec.image_size
    for i in range(settings.pairs):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(Path(settings.data_dir) / f"{i}.png")


def lora_config(settings: Settings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )


# ---------------------------------------------------------------------------------------------
# Memory


class PeakMemory:
    """Peak memory above the moment `reset` is called: CUDA allocator or process RSS."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.baseline = 0

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        self.baseline = _status_kib("VmRSS") * 1024
        try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False

    def peak_above_baseline(self) -> tuple[int, int]:
        """(peak - baseline, peak) in bytes."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.hwm_reset:
            peak = _status_kib("VmHWM") * 1024
        else:  # without the reset this also counts any peak before the baseline
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak - self.baseline, peak


def _status_kib(field_name: str) -> int:
    match = re.search(rf"{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


# ---------------------------------------------------------------------------------------------
# The sides


class Gate:
    """A child's turn-taking with the driver when steps are interleaved: one side at a time.

    Before each step the child says READY and waits for GO; after it, it says DONE. The sides'
    steps then alternate, so a busy shared machine slows each side alike. Without control
    pipes (sequential runs) it does nothing.
    """

    def __init__(self, fds: str | None = None) -> None:
        self.reader = self.writer = None
        if fds:
            read_fd, write_fd = (int(fd) for fd in fds.split(","))
            self.reader, self.writer = os.fdopen(read_fd, "r"), os.fdopen(write_fd, "w")

    def _say(self, word: str) -> None:
        if self.writer is not None:
            self.writer.write(word + "\n")
            self.writer.flush()

    def wait_turn(self) -> None:
        self._say("READY")
        if self.reader is not None and self.reader.readline().strip() != "GO":
            raise SystemExit("the driver went away")

    def done(self) -> None:
        self._say("DONE")


GATE = Gate()


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_bpo(settings: Settings) -> dict[str, Any]:
    """`bpo.train.run.train` (the Python API behind `bpo train`), its steps timed."""
    # Imported before the memory baseline, as TRL's side imports them with trl.
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers.optimization  # noqa: F401

    import bpo.utils.console  # noqa: F401
    from bpo.data.records import PreferencePair
    from bpo.models.load import ModelConfig
    from bpo.train import refs as bpo_refs
    from bpo.train import run as bpo_run
    from bpo.train.config import LoraSettings, LossSettings, TrainConfig

    processor = build_processor(settings.spec, settings.seed)
    images = load_images(settings)
    model = build_model(settings, processor)
    memory = PeakMemory(settings.device)
    memory.reset()

    times: list[float] = []
    tokens: list[dict[str, float]] = []
    ref_pass: list[float] = []
    train_step = bpo_run.Trainer.train_step
    score_pairs = bpo_refs.score_pairs

    def timed_step(self, micro_batches, *args, **kwargs):
        GATE.wait_turn()
        sync(settings.device)
        start = time.perf_counter()
        line = train_step(self, micro_batches, *args, **kwargs)
        sync(settings.device)
        times.append(time.perf_counter() - start)
        GATE.done()
        tokens.append(_bpo_tokens(micro_batches[0].batch))
        return line

    def timed_refs(*args, **kwargs):
        start = time.perf_counter()
        out = score_pairs(*args, **kwargs)
        sync(settings.device)
        ref_pass.append(time.perf_counter() - start)
        return out

    # Timing hooks only: the step itself is the library's, unchanged.
    bpo_run.Trainer.train_step = timed_step
    bpo_refs.score_pairs = timed_refs  # the name `training_pairs` scores in-memory pairs with

    pairs = [
        PreferencePair(
            id=p["id"],
            image=f"{i}.png",
            prompt=[{"role": "user", "content": "<image>\n" + p["question"]}],
            chosen=p["chosen"],
            rejected=p["rejected"],
            source="benchmark",
        )
        for i, p in enumerate(make_pairs(settings))
    ]
    config = TrainConfig(
        model=ModelConfig(name_or_path="<in memory>"),
        out=None,
        lora=LoraSettings(r=settings.lora_r, alpha=settings.lora_alpha, dropout=0.0),
        loss=LossSettings(beta=settings.beta),
        lr=settings.lr,
        scheduler="constant",
        warmup_ratio=0.0,
        max_grad_norm=1.0,
        max_steps=settings.warmup + settings.steps,
        batch_size=settings.batch_size,
        precision="fp32",  # no autocast; the weights are already in the benchmark's dtype
        gradient_checkpointing=settings.gradient_checkpointing,
        seed=settings.seed,
        trackers=[],
    )
    images_by_path = {f"{i}.png": image for i, image in enumerate(images)}
    result = bpo_run.train(config, model, processor, pairs, images_by_path, log=lambda _: None)
    delta, peak = memory.peak_above_baseline()
    counts = _param_counts(result.model)
    out = _result(settings, times, delta, peak, tokens, counts, result.history[-1]["loss"])
    out["ref_pass_s"] = sum(ref_pass)
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
    for i, p in enumerate(make_pairs(settings)):
        content = [{"type": "image", "text": None}, {"type": "text", "text": p["question"]}]
        row = {
            "prompt": [{"role": "user", "content": content}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": p["chosen"]}]}],
            "rejected": [
                {"role": "assistant", "content": [{"type": "text", "text": p["rejected"]}]}
            ],
            "images": [images[i]],
        }
        if with_refs:
            row["ref_chosen_logps"] = 0.0
            row["ref_rejected_logps"] = 0.0
        rows.append(row)
    return Dataset.from_list(rows)


def run_trl(settings: Settings, no_ref: bool) -> dict[str, Any]:
    """TRL's DPOTrainer.train() with a LoRA config; no_ref: reference forward removed."""
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    processor = build_processor(settings.spec, settings.seed)
    dataset = trl_dataset(settings, with_refs=no_ref)
    model = build_model(settings, processor)
    memory = PeakMemory(settings.device)
    memory.reset()

    total = settings.warmup + settings.steps
    times: list[float] = []
    tokens: list[dict[str, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            GATE.wait_turn()
            sync(settings.device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(settings.device)
            times.append(time.perf_counter() - self.start)
            GATE.done()

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

    on_cpu = not settings.device.startswith("cuda")
    args = DPOConfig(
        output_dir=str(Path(settings.data_dir) / f"trl_out_{'noref' if no_ref else 'ref'}"),
        per_device_train_batch_size=settings.batch_size,
        max_steps=total,
        learning_rate=settings.lr,
        lr_scheduler_type="constant",
        beta=settings.beta,
        max_grad_norm=1.0,
        optim="adamw_torch",
        gradient_checkpointing=settings.gradient_checkpointing,
        # bf16=False: no autocast; the weights are already in the benchmark's dtype, as on bpo's side.
        bf16=False,
        use_cpu=on_cpu,
        max_length=None,
        remove_unused_columns=not no_ref,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=settings.seed,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
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
    counts = _param_counts(trainer.model)
    return _result(settings, times, delta, peak, tokens, counts, float(output.training_loss))


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


def _param_counts(model) -> dict[str, int]:
    """Parameters doing matmuls per token: vision tower, projector, decoder layers, LM head
    (Qwen: `visual.merger` is the projector, the rest of `visual` the tower)."""
    counts = {"vision": 0, "projector": 0, "lm": 0, "head": 0, "trainable": 0}
    for name, p in model.named_parameters():
        counts["trainable"] += p.numel() if p.requires_grad else 0
        if "lora_" in name or "embed_tokens" in name or "position_embedding" in name:
            continue
        if "multi_modal_projector" in name or "visual.merger" in name:
            counts["projector"] += p.numel()
        elif "vision_tower" in name or "visual." in name:
            counts["vision"] += p.numel()
        elif "lm_head" in name:
            counts["head"] += p.numel()
        elif "language_model" in name:
            counts["lm"] += p.numel()
    return counts


def _result(settings, times, delta, peak, tokens, counts, loss) -> dict[str, Any]:
    measured = times[settings.warmup :]
    # The median step: robust to a stray slow step on a shared machine; the mean is also kept.
    median = statistics.median(measured)
    return {
        "pairs_per_s": settings.batch_size / median,
        "s_per_step": median,
        "s_per_step_mean": statistics.fmean(measured),
        "steps_measured": len(measured),
        "step_times": measured,
        "peak_mem_bytes": delta,
        "peak_total_bytes": peak,
        "tokens": {k: sum(t[k] for t in tokens) / len(tokens) for k in tokens[0]},
        "params": counts,
        "loss": loss,
        "device": _device_name(settings),
    }


def _device_name(settings: Settings) -> str:
    import torch

    if settings.device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(settings.device))
    return f"cpu, {torch.get_num_threads()} threads"


def ideal_speedups(
    tokens: dict[str, float], counts: dict[str, int], spec: ModelSpec
) -> tuple[float, float]:
    """TRL's step FLOPs over bpo's per pair, with and without TRL's reference forward (the
    token-count model of the module docstring)."""
    p, c, r = tokens["prefix"], tokens["chosen"], tokens["rejected"]
    vis = 2 * counts["vision"] * spec.vision_positions + 2 * counts["projector"] * spec.image_tokens

    def lm(t: float, s: float) -> float:
        return 2 * counts["lm"] * t + 2 * counts["head"] * s

    trl = 4 * vis + 3 * lm(2 * p + c + r, c + r)  # policy fwd + bwd and ref fwd, 2 rows a pair
    trl_noref = 2 * vis + 2 * lm(2 * p + c + r, c + r)
    bpo = vis + 2 * lm(p + c + r, c + r)  # one packed row a pair
    return trl / bpo, trl_noref / bpo


# ---------------------------------------------------------------------------------------------
# The driver


def child(side: str, settings_json: str, gate: str | None) -> None:
    global GATE
    GATE = Gate(gate)
    raw = json.loads(settings_json)
    settings = Settings(**{**raw, "spec": ModelSpec(**raw["spec"])})
    import torch

    torch.set_num_threads(settings.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        result = run_bpo(settings) if side == "bpo" else run_trl(settings, side == "trl-noref")
    except torch.OutOfMemoryError:
        print(
            f"OOM: {side} ran out of GPU memory; retry with fewer --text-layers, a smaller "
            "--batch-size or --gradient-checkpointing (the same settings apply to every side)",
            file=sys.stderr,
        )
        raise
    print("RESULT " + json.dumps(result), flush=True)


def _command(side: str, settings: Settings) -> list[str]:
    settings_json = json.dumps(asdict(settings))
    return [sys.executable, __file__, "--child", side, "--settings", settings_json]


def _read_result(side: str, log: Path, returncode: int) -> dict[str, Any]:
    """A finished child's last 'RESULT {...}' line; its log and an exit if it failed."""
    text = log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if returncode != 0 or not lines:
        sys.stderr.write(text[-10000:])
        raise SystemExit(f"side {side!r} failed (exit {returncode}); its output is above")
    return json.loads(lines[-1][len("RESULT ") :])


def run_sequential(sides: list[str], settings: Settings, logs: Path) -> dict[str, dict]:
    """Each side in a fresh process, one after the other (for GPUs: one model in memory)."""
    results = {}
    for side in sides:
        print(f"running {side} ...", flush=True)
        log = logs / f"{side}.log"
        with log.open("w") as out:
            proc = subprocess.run(_command(side, settings), stdout=out, stderr=subprocess.STDOUT)
        results[side] = _read_result(side, log, proc.returncode)
    return results


def run_interleaved(sides: list[str], settings: Settings, logs: Path) -> dict[str, dict]:
    """All sides' processes at once, their steps taken in turn (the order rotates each round)."""
    procs, gates = {}, {}
    for side in sides:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        out = (logs / f"{side}.log").open("w")
        command = [*_command(side, settings), "--gate", f"{to_child_r},{from_child_w}"]
        procs[side] = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, pass_fds=(to_child_r, from_child_w)
        )
        os.close(to_child_r)
        os.close(from_child_w)
        gates[side] = (os.fdopen(to_child_w, "w"), os.fdopen(from_child_r, "r"))

    def expect(side: str, word: str) -> None:
        line = gates[side][1].readline().strip()
        if line != word:
            procs[side].wait()
            _read_result(side, logs / f"{side}.log", procs[side].returncode or 1)
            raise SystemExit(f"side {side!r} said {line!r} where the driver expected {word!r}")

    print(f"running {', '.join(sides)} (steps interleaved) ...", flush=True)
    for side in sides:  # every side built and ready for its first step
        expect(side, "READY")
    total = settings.warmup + settings.steps
    for step in range(total):
        k = step % len(sides)
        for side in sides[k:] + sides[:k]:
            gates[side][0].write("GO\n")
            gates[side][0].flush()
            expect(side, "DONE")
            if step < total - 1:
                expect(side, "READY")  # its next batch collated: it is idle again
    results = {}
    for side in sides:
        procs[side].wait()
        results[side] = _read_result(side, logs / f"{side}.log", procs[side].returncode)
    return results


def fit_text_layers(spec: ModelSpec, batch_size: int, gradient_checkpointing: bool) -> int:
    """Llama layers that fit TRL's step (the larger) in this GPU's memory; a rough estimate.

    Per layer: the bf16 weights, plus, without checkpointing, ~0.3 MiB of saved activations per
    token (LoRA keeps fp32 copies of its inputs) over TRL's 2 rows per pair; 85% of free memory.
    """
    import torch

    free, _ = torch.cuda.mem_get_info(0)
    per_layer_weights = 2 * (
        4 * spec.text_hidden**2 + 3 * spec.text_hidden * spec.text_intermediate
    )
    tokens = 2 * batch_size * (spec.image_tokens + 24 + 70)
    per_token = 0.35 * 2**20 * spec.text_hidden / 4096
    activations = 0 if gradient_checkpointing else tokens * per_token
    fixed = 2 * 2 * spec.vocab_size * spec.text_hidden + 2 * 2**30  # embeddings, head, vision
    layers = int((0.85 * free - fixed) // (per_layer_weights + activations))
    return max(1, min(spec.text_layers, layers))


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="LLaVA-1.5-7B-shaped, bf16, on cuda:0")
    parser.add_argument(
        "--family",
        default="llava",
        choices=sorted(CPU_SPECS),
        help="the CPU model's shape: LLaVA (default) or Qwen2.5-VL (shapes.py)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the settings and exit")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, help="measured steps (CPU 8, GPU 10)")
    parser.add_argument("--warmup", type=int, help="unmeasured first steps (CPU 2, GPU 3)")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="run the sides one after the other, not with their steps interleaved (GPU: always)",
    )
    parser.add_argument("--text-layers", type=int, help="Llama layers (CPU 4; GPU 32 or what fits)")
    parser.add_argument("--vision-layers", type=int, help="CLIP layers (CPU 2, GPU 24)")
    parser.add_argument("--answer-words", type=int, default=62, help="~tokens per answer - 2")
    parser.add_argument("--prompt-words", type=int, default=14, help="~prompt tokens - 7")
    parser.add_argument("--lora-r", type=int, default=32, help="LoRA rank; alpha is 2r")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    parser.add_argument("--attn", choices=["sdpa", "eager"], help="CPU eager, GPU sdpa")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument(
        "--device", help="override the device (e.g. --gpu --device cpu: a smoke test)"
    )
    parser.add_argument("--sides", default=",".join(SIDES), help=f"from {','.join(SIDES)}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--gate", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.settings, args.gate)
        return
    sides = [s for s in args.sides.split(",") if s]
    if set(sides) - set(SIDES) or "bpo" not in sides or "trl" not in sides:
        raise SystemExit(f"--sides must include bpo and trl, from {', '.join(SIDES)}; got {sides}")

    import torch

    device = args.device or ("cuda:0" if args.gpu else "cpu")
    if device.startswith("cuda") and not args.dry_run and not torch.cuda.is_available():
        raise SystemExit(f"device {device} needs CUDA; torch.cuda.is_available() is False here")
    if args.gpu and args.family != "llava":
        raise SystemExit(f"--family {args.family} has a CPU shape only; --gpu is LLaVA-1.5-7B's")
    spec = GPU_SPEC if args.gpu else CPU_SPECS[args.family]
    if args.vision_layers:
        spec = replace(spec, vision_layers=args.vision_layers)
    if args.text_layers:
        spec = replace(spec, text_layers=args.text_layers)
    elif device.startswith("cuda") and not args.dry_run:
        layers = fit_text_layers(spec, args.batch_size, args.gradient_checkpointing)
        if layers < spec.text_layers:
            print(
                f"GPU memory: {spec.text_layers} Llama layers would not fit TRL's step; "
                f"using {layers} (--text-layers to choose)"
            )
            spec = replace(spec, text_layers=layers)
    warmup = args.warmup if args.warmup is not None else (3 if args.gpu else 2)
    steps = args.steps if args.steps is not None else (10 if args.gpu else 8)
    settings = Settings(
        spec=spec,
        device=device,
        dtype="bfloat16" if args.gpu else "float32",
        pairs=args.batch_size * (warmup + steps),
        batch_size=args.batch_size,
        warmup=warmup,
        steps=steps,
        prompt_words=args.prompt_words,
        answer_words=args.answer_words,
        answer_jitter=6,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lr=1e-5,
        beta=0.1,
        gradient_checkpointing=args.gradient_checkpointing,
        attn=args.attn or ("sdpa" if args.gpu else "eager"),
        threads=args.threads or torch.get_num_threads(),
        seed=0,
    )
    print(f"command: {COMMAND} {' '.join(sys.argv[1:])}".rstrip())
    shape = (
        shapes.describe_qwen2_5_vl(spec)
        if spec.family == "qwen2_5_vl"
        else f"LLaVA-shaped, random init: CLIP {spec.vision_layers}x{spec.vision_hidden} "
        f"({spec.image_size}px/{spec.patch_size} -> {spec.image_tokens} image tokens), Llama "
        f"{spec.text_layers}x{spec.text_hidden} (mlp {spec.text_intermediate}, vocab "
        f"{spec.vocab_size})"
    )
    print(f"model: {shape}; {settings.dtype} weights on {device}, {settings.attn} attention")
    print(
        f"both sides: LoRA r={settings.lora_r} alpha={settings.lora_alpha} dropout 0 on the "
        f"language model's q/k/v/o/gate/up/down; batch {settings.batch_size} pairs; AdamW lr "
        f"{settings.lr}, constant, clip 1.0; gradient checkpointing "
        f"{'on' if settings.gradient_checkpointing else 'off'}; no autocast; {warmup} warm-up + "
        f"{steps} measured steps (median), {settings.threads} torch threads"
    )
    if args.dry_run:
        print(json.dumps(asdict(settings), indent=1))
        return

    # One GPU holds one side's model at a time; on a CPU the interleaved steps share the noise.
    sequential = args.sequential or device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="bpo_bench_") as tmp:
        settings.data_dir = tmp
        write_images(settings)
        run = run_sequential if sequential else run_interleaved
        results = run(sides, settings, Path(tmp))
    report(results, settings, args.gpu, sequential)


def report(
    results: dict[str, dict[str, Any]], settings: Settings, gpu: bool, sequential: bool
) -> None:
    """The table, the notes and the final JSON line."""
    bpo, trl = results["bpo"], results["trl"]
    on_cuda = settings.device.startswith("cuda")
    ideal, ideal_noref = ideal_speedups(bpo["tokens"], bpo["params"], settings.spec)
    print()
    print(
        f"{'side':<11}{'pairs/s':>9}{'s/step':>8}{'peak mem':>12}{'speedup':>9}{'ideal':>7}"
        f"{'trainable':>11}   tokens/pair: prefix chosen rejected, padded row"
    )
    ideals = {"bpo": ideal, "trl": 1.0, "trl-noref": ideal / ideal_noref}
    for side, r in results.items():
        t = r["tokens"]
        print(
            f"{side:<11}{r['pairs_per_s']:9.2f}{r['s_per_step']:8.3f}{mib(r['peak_mem_bytes']):>12}"
            f"{trl['s_per_step'] / r['s_per_step']:8.2f}x{ideals[side]:6.2f}x"
            f"{r['params']['trainable']:>11,}   {t['prefix']:.1f} {t['chosen']:.1f} "
            f"{t['rejected']:.1f}, {t['row_padded']:.0f}" + (" x2" if side != "bpo" else "")
        )
    print(
        "speedup: over TRL's default step; ideal: the FLOP-count ratio (module docstring). "
        "peak mem: above the memory once the model is built ("
        + ("torch.cuda.max_memory_allocated" if on_cuda else "peak RSS")
        + f"). bpo's one-time reference pass (not in the step): {bpo['ref_pass_s']:.1f} s for "
        f"{settings.pairs} pairs."
    )
    summary: dict[str, Any] = {
        "pairs_per_s_bpo": round(bpo["pairs_per_s"], 3),
        "pairs_per_s_trl": round(trl["pairs_per_s"], 3),
        "speedup": round(bpo["pairs_per_s"] / trl["pairs_per_s"], 3),
        "peak_mem_ratio": round(bpo["peak_mem_bytes"] / trl["peak_mem_bytes"], 3),
        "ideal_speedup": round(ideal, 3),
    }
    if not sequential:
        # Each round's steps ran back to back, so their ratio cancels slow drifts in machine load.
        paired = statistics.median(
            t / b for t, b in zip(trl["step_times"], bpo["step_times"], strict=True)
        )
        summary["speedup_paired"] = round(paired, 3)
    if "trl-noref" in results:
        noref = results["trl-noref"]
        summary["pairs_per_s_trl_noref"] = round(noref["pairs_per_s"], 3)
        summary["speedup_vs_trl_noref"] = round(bpo["pairs_per_s"] / noref["pairs_per_s"], 3)
        summary["ideal_speedup_vs_trl_noref"] = round(ideal_noref, 3)
        summary["peak_mem_ratio_vs_trl_noref"] = round(
            bpo["peak_mem_bytes"] / noref["peak_mem_bytes"], 3
        )
    summary["peak_mem_mib_bpo"] = round(bpo["peak_mem_bytes"] / 2**20, 1)
    summary["peak_mem_mib_trl"] = round(trl["peak_mem_bytes"] / 2**20, 1)
    summary["device"] = bpo["device"]
    summary["family"] = settings.spec.family
    summary["text_layers"] = settings.spec.text_layers
    summary["gradient_checkpointing"] = settings.gradient_checkpointing
    summary["interleaved"] = not sequential
    if not gpu and settings.spec.family == "llava":  # the target is for the CPU LLaVA model
        ok = summary["speedup"] >= 2.3 and summary["peak_mem_ratio"] <= 0.8
        print(
            f"target (2-core CPU): speedup >= 2.3 and peak_mem_ratio <= 0.8: {'met' if ok else 'NOT met'}"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
