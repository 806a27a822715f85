"""DPO training, end to end and per step: `bpo train` vs TRL's DPOTrainer, side by side in one run.

Both sides train LoRA adapters on the same LLaVA-shaped model (built from config, random init, same
seed), on the same preference pairs, with the same batch size, LoRA config, optimizer (AdamW, lr
1e-5 constant), gradient clipping (1.0), precision and gradient-checkpointing setting, for the same
number of epochs (default 2) over the same pairs. Each side runs in its own process, so its peak
memory is its own.

- bpo: `bpo.train.run.train` (the Python API behind `bpo train`) on in-memory pairs. One row
  per pair, `[image + prompt | chosen | rejected]`, with a block attention mask
  (`bpo.train.logprobs.pair_logps`): the image and prompt are encoded once for both answers. The
  reference log-probs are computed once before training (`bpo.train.data.score_pairs`: the same
  packed rows, forward only, in inference mode, in batches of the training batch size), so the
  step runs no reference forward. DPO sigmoid loss, beta 0.1.
- trl: `trl.DPOTrainer.train()` with its defaults for a `peft_config` and a vision dataset:
  chosen and rejected as two full rows (image and prompt repeated), and the reference log-probs
  from a forward with the adapter disabled, every step.
- trl-noref (a third row, for honesty): TRL with its reference forward removed, as if its
  reference log-probs were precomputed (at no cost: its end-to-end time holds no reference
  pass). TRL refuses `precompute_ref_log_probs=True` for vision datasets, so the benchmark passes
  constant reference log-probs through the collator and sets the trainer's
  `precompute_ref_logps`; only its timing matters.

Settings both sides use: fp32 on CPU (bf16 weights on GPU), no autocast (TRL's default bf16=True
is turned off), gradient checkpointing off (TRL's default is on; `--gradient-checkpointing` turns
it on for both), eager attention on CPU (torch's CPU SDPA backward with a float mask was 2-2.5x
slower on both sides' rows here), SDPA on GPU; LoRA r=32, alpha=64, dropout 0 on the language model's q/k/v/o/gate/up/down
projections (vision tower and projector frozen; the table prints both sides' trainable parameter
counts, which must match).

Timings. Each side's work is cut into turns (`throughput.measure.Gate`): bpo's reference pass,
then one turn per step, from before its batch is fetched (image processing, tokenization,
collation) to the end of the optimizer step. On a CPU the turns are interleaved: every process
built and idle, then bpo's reference pass alone, then one step of each side a round, the order
rotating, only one side working at a time; `--sequential` runs the sides one after the other, as
on a GPU, where one model at a time fits. Trainer set-up (LoRA wrapping, optimizer) is untimed on
both sides.
- end to end: a side's turns summed, i.e. the time to train the epochs including bpo's reference
  pass and TRL's per-step reference forwards. The speedup is the median over rounds of TRL's
  turn / (bpo's turn + its reference pass / steps), paired per round so that drifting machine
  load cancels; `end_to_end_speedup_totals` is the plain ratio of the sums.
- step only: TRL's step from `on_step_begin` to `on_step_end` (forward, backward, clipping,
  optimizer step), bpo's `Trainer.train_step` (the same span). The speedup is the median over the
  rounds after the warm-up of TRL's step / bpo's; pairs/s = batch size / the median step.
- the reference pass per step: bpo's pass per pair over its median step per pair.
- in CPU time: the same figures from the process's CPU time (`time.process_time`), printed as a
  check on machine load: waiting for a core adds wall time, not CPU time.
- peak memory: CPU, the process's peak RSS (VmHWM, reset once the model is built) minus its RSS
  then; GPU, torch.cuda.max_memory_allocated minus the allocation once the model is built.
- ideal: the matmul FLOP-count ratio, end to end and step only, with and without gradient
  checkpointing (derived in `throughput/summary.py`): 1.96x and 2.45x at this shape, 2.18x step
  only with checkpointing.

Run: python benchmarks/train_throughput.py         (CPU, 1 thread a side, 2 epochs of 10 steps;
                                                    prints each target and PASS/FAIL)
     python benchmarks/train_throughput.py --epochs 1 --steps-per-epoch 4 --warmup 1   (~1 min)
     python benchmarks/train_throughput.py --gpu   (LLaVA-1.5-7B-shaped, bf16, one CUDA GPU;
                                                    fewer Llama layers if memory is short)
     python benchmarks/train_throughput.py --gpu --dry-run   (print the settings, build nothing)
     python benchmarks/train_throughput.py --gpu --device cpu --text-layers 1 --vision-layers 1 \
         --batch-size 1 --warmup 0 --epochs 1 --steps-per-epoch 1   (the GPU path on a CPU)
     python benchmarks/train_throughput.py --family qwen2_5_vl   (CPU; the same comparison on
         a Qwen2.5-VL-shaped model, `shapes.py`: 392 px / 14 px patches merged 2x2 -> 196 image
         tokens, windowed ViT 2x192, Qwen2 4x384 with 2 key/value heads and M-RoPE)
The code: throughput/build.py (model, data, settings), measure.py (memory, turns, results),
sides.py (the two trainers), driver.py (processes), summary.py (ideals, ratios, targets, table).
The last line is a JSON object: end_to_end_speedup, step_speedup, peak_mem_ratio,
ref_pass_per_step, the ideals, the same against the trl-noref row, and the settings that matter.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import shapes  # benchmarks/shapes.py, next to this script
from throughput.build import CPU_SPECS, GPU_SPEC, Settings, write_images
from throughput.driver import SIDES, child, fit_text_layers, run_interleaved, run_sequential
from throughput.summary import report

COMMAND = "python benchmarks/train_throughput.py"


def parse_args() -> argparse.Namespace:
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
    parser.add_argument("--epochs", type=int, default=2, help="epochs over the pairs, every side")
    parser.add_argument(
        "--steps-per-epoch", type=int, default=10, help="steps an epoch (pairs = batch x this)"
    )
    parser.add_argument(
        "--warmup", type=int, help="first steps left out of the step-only median (CPU 2, GPU 3)"
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="run the sides one after the other, not with their turns interleaved (GPU: always)",
    )
    parser.add_argument("--text-layers", type=int, help="Llama layers (CPU 4; GPU 32 or what fits)")
    parser.add_argument("--vision-layers", type=int, help="CLIP layers (CPU 2, GPU 24)")
    parser.add_argument("--answer-words", type=int, default=62, help="~tokens per answer - 2")
    parser.add_argument("--prompt-words", type=int, default=14, help="~prompt tokens - 7")
    parser.add_argument("--lora-r", type=int, default=32, help="LoRA rank; alpha is 2r")
    parser.add_argument(
        "--negatives-per-sample",
        type=int,
        default=2,
        help="pairs per image + prompt + chosen (BPO's recipe: a weakened and an injected one)",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    parser.add_argument("--attn", choices=["sdpa", "eager"], help="CPU eager, GPU sdpa")
    parser.add_argument(
        "--threads", type=int, help="torch threads per side (CPU 1, the targets' setting; GPU all)"
    )
    parser.add_argument(
        "--device", help="override the device (e.g. --gpu --device cpu: a smoke test)"
    )
    parser.add_argument("--sides", default=",".join(SIDES), help=f"from {','.join(SIDES)}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--gate", help=argparse.SUPPRESS)
    return parser.parse_args()


def make_settings(args: argparse.Namespace) -> Settings:
    """The run's settings from the arguments (on a GPU, the Llama layers that fit)."""
    import torch

    device = args.device or ("cuda:0" if args.gpu else "cpu")
    if device.startswith("cuda") and not args.dry_run and not torch.cuda.is_available():
        raise SystemExit(f"device {device} needs CUDA; torch.cuda.is_available() is False here")
    if args.gpu and args.family != "llava":
        raise SystemExit(f"--family {args.family} has a CPU shape only; --gpu is LLaVA-1.5-7B's")
    if args.epochs < 1 or args.steps_per_epoch < 1:
        raise SystemExit("--epochs and --steps-per-epoch must be at least 1")
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
    if warmup >= args.epochs * args.steps_per_epoch:
        raise SystemExit(
            f"--warmup {warmup} leaves no step to measure in {args.epochs} x "
            f"{args.steps_per_epoch} steps; lower --warmup or raise --steps-per-epoch"
        )
    return Settings(
        spec=spec,
        device=device,
        dtype="bfloat16" if args.gpu else "float32",
        batch_size=args.batch_size,
        steps_per_epoch=args.steps_per_epoch,
        epochs=args.epochs,
        warmup=warmup,
        prompt_words=args.prompt_words,
        answer_words=args.answer_words,
        answer_jitter=6,
        negatives_per_sample=args.negatives_per_sample,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lr=1e-5,
        beta=0.1,
        gradient_checkpointing=args.gradient_checkpointing,
        attn=args.attn or ("sdpa" if args.gpu else "eager"),
        # One thread on a CPU: the sides' processes then never spin threads against each other.
        threads=args.threads or (torch.get_num_threads() if args.gpu else 1),
        seed=0,
    )


def describe(settings: Settings) -> None:
    """The settings, as the first lines of the output."""
    spec = settings.spec
    shape = (
        shapes.describe_qwen2_5_vl(spec)
        if spec.family == "qwen2_5_vl"
        else f"LLaVA-shaped, random init: CLIP {spec.vision_layers}x{spec.vision_hidden} "
        f"({spec.image_size}px/{spec.patch_size} -> {spec.image_tokens} image tokens), Llama "
        f"{spec.text_layers}x{spec.text_hidden} (mlp {spec.text_intermediate}, vocab "
        f"{spec.vocab_size})"
    )
    print(
        f"model: {shape}; {settings.dtype} weights on {settings.device}, {settings.attn} attention"
    )
    print(
        f"both sides: LoRA r={settings.lora_r} alpha={settings.lora_alpha} dropout 0 on the "
        f"language model's q/k/v/o/gate/up/down; batch {settings.batch_size} pairs; AdamW lr "
        f"{settings.lr}, constant, clip 1.0; gradient checkpointing "
        f"{'on' if settings.gradient_checkpointing else 'off'}; no autocast; {settings.epochs} "
        f"epochs x {settings.steps_per_epoch} steps over {settings.pairs} pairs (step-only median "
        f"after {settings.warmup} warm-up), {settings.threads} torch threads"
    )


def main() -> None:
    args = parse_args()
    if args.child:
        child(args.child, args.settings, args.gate)
        return
    sides = [s for s in args.sides.split(",") if s]
    if set(sides) - set(SIDES) or "bpo" not in sides or "trl" not in sides:
        raise SystemExit(f"--sides must include bpo and trl, from {', '.join(SIDES)}; got {sides}")
    settings = make_settings(args)
    print(f"command: {COMMAND} {' '.join(sys.argv[1:])}".rstrip())
    describe(settings)
    if args.dry_run:
        print(json.dumps(asdict(settings), indent=1))
        return
    # One GPU holds one side's model at a time; on a CPU the interleaved turns share the noise.
    sequential = args.sequential or settings.device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="bpo_bench_") as tmp:
        settings.data_dir = tmp
        write_images(settings)
        run = run_sequential if sequential else run_interleaved
        results = run(sides, settings, Path(tmp))
    report(results, settings, args.gpu, sequential)


if __name__ == "__main__":
    main()
