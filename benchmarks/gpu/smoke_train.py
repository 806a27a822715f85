"""One short `bpo train` run for the accelerate smoke test, on a model built here in memory.

`accelerate launch --config_file configs/accelerate/<X>.yaml benchmarks/gpu/smoke_train.py ...`
runs `bpo.train.run.train` (the entry `bpo train` calls) under that launcher: DPO with a LoRA
adapter, 4 steps of 2 pairs, a checkpoint every 2 steps, the adapter saved under OUT/model;
`--resume` continues OUT from its newest checkpoint. `--qlora` (no launcher) saves the model first
and trains a 4-bit base loaded from it. Prints one line, `SMOKE {summary}`.

The model: LLaVA-7B's widths with 2 CLIP and 2 Llama layers, bf16 on the GPU (the dry run: the toy
LLaVA, fp32 on the CPU); the pairs: `throughput.build.make_pairs`'.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for entry in (REPO / "benchmarks", REPO / "src"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from gpu import specs  # noqa: E402

STEPS, SAVE_STEPS, PAIRS_A_STEP = 4, 2, 2


def smoke_settings(dry: bool, data_dir: Path):
    run = specs.Run(dry)
    spec = replace(run.spec("llava"), vision_layers=2, text_layers=2)
    return specs.settings(
        run,
        "llava",
        data_dir,
        spec=spec,
        batch_size=PAIRS_A_STEP,
        steps_per_epoch=STEPS,
        lora_r=8,
        lora_alpha=16,
    )


def train_config(settings, out: Path, model_path: str, finetune: str):
    from bpo.models.config import ModelConfig
    from bpo.train.config import LoraSettings, LossSettings, TrainConfig

    gpu = settings.device.startswith("cuda")
    return TrainConfig(
        model=ModelConfig(name_or_path=model_path, device=settings.device),
        out=str(out),
        finetune=finetune,
        lora=LoraSettings(r=settings.lora_r, alpha=settings.lora_alpha, dropout=0.0),
        loss=LossSettings(beta=settings.beta),
        lr=1e-4,  # large enough that the metrics move within 4 steps
        scheduler="constant",
        warmup_ratio=0.0,
        max_grad_norm=1.0,  # the accelerate DeepSpeed config's gradient_clipping
        max_steps=STEPS,
        batch_size=PAIRS_A_STEP,
        reference_batch_size=PAIRS_A_STEP,
        precision="bf16" if gpu else "fp32",
        save_steps=SAVE_STEPS,
        save_total_limit=None,
        trackers=[],
        seed=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--qlora", action="store_true")
    args = parser.parse_args()

    from bpo.train.run import train

    out = Path(args.out)
    data = out.parent / f"{out.name}_data"
    data.mkdir(parents=True, exist_ok=True)
    settings = smoke_settings(args.dry_run, data)
    model, processor = specs.build(settings)
    pairs, images = specs.preference_pairs(settings)
    if args.qlora:
        saved = data / "model"
        model.save_pretrained(saved, safe_serialization=True)
        processor.save_pretrained(saved)
        del model
        config = train_config(settings, out, str(saved), "qlora")
        result = train(config, None, None, pairs, images, log=print)
    else:
        config = train_config(settings, out, "<in memory>", "lora")
        result = train(config, model, processor, pairs, images, resume=args.resume, log=print)
    print("SMOKE " + json.dumps(result.summary, default=str), flush=True)


if __name__ == "__main__":
    main()
