"""`train_throughput`: bpo's trainer vs TRL's DPOTrainer on both 7B shapes, one after the other.

Each side is `benchmarks/train_throughput.py`'s own (`throughput.sides`): bpo is
`bpo.train.run.train` on in-memory pairs (one packed row a pair, reference log-probs from one
forward-only pass before training), TRL is `DPOTrainer.train()` (two full rows a pair and a
reference forward every step); same model, pairs, batch, LoRA (r=128, alpha=256 on the language
model's q/k/v/o/gate/up/down, as the paper), AdamW lr 1e-5 constant, clip 1.0, bf16 weights and
no autocast, SDPA, gradient checkpointing off. Here the sides run in this process, the model
built anew for each (`specs.build_model`, the 7B shapes); TRL is recorded "not run" where it does
not import (on the GPU machine it comes as a carried wheel).

Per side: pairs/s step only (batch / the median step after the warm-up) and end to end (the
pairs trained / every turn summed: bpo's reference pass, then fetching, collating and stepping
each batch; TRL's reference forwards are inside its steps), peak `torch.cuda.max_memory_allocated`
(absolute, and above the built model), the mean tokens a pair, trainable parameters. Per shape:
TRL / bpo for both, and the FLOP-count ideal ratios (`throughput.summary`). A side that runs out
of memory makes the shape run again with gradient checkpointing on both sides, budget allowing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from throughput.build import write_images

from gpu import specs
from gpu.runner import Context, attempt, error_record, missing, not_run

# Seconds one side needs at least (build + pass + steps): the dry run's toys, the GPU's 7B.
SIDE_SECONDS = {True: 5.0, False: 35.0}


def run(ctx: Context) -> dict[str, Any]:
    """Both shapes, Qwen first (the larger memory), each recorded as it finishes."""
    return {shape: ctx.save(shape, compare(ctx, shape)) for shape in ("qwen", "llava")}


def compare(ctx: Context, shape: str) -> dict[str, Any]:
    """Both sides at one shape; again with gradient checkpointing if a side ran out of memory."""
    out: dict[str, Any] = {}
    first_try = None
    for checkpointing in (False, True):
        settings = specs.settings(
            ctx.run, shape, ctx.work / f"train_{shape}", gradient_checkpointing=checkpointing
        )
        (ctx.work / f"train_{shape}").mkdir(parents=True, exist_ok=True)
        write_images(settings)
        need = SIDE_SECONDS[ctx.run.dry]
        sides = {
            "bpo": attempt(ctx, f"{shape}_bpo", need, lambda s=settings: bpo_side(s)),
            "trl": attempt(ctx, f"{shape}_trl", need, lambda s=settings: trl_side(s)),
        }
        out = {"gradient_checkpointing": checkpointing, **sides}
        if checkpointing or not any(_out_of_memory(side) for side in sides.values()):
            break
        first_try = sides  # out of memory: again with checkpointing, this kept in the record
    if first_try is not None:
        out["without_checkpointing"] = first_try
    ctx.record.pop(f"{shape}_bpo", None)  # kept in the shape's record from here
    ctx.record.pop(f"{shape}_trl", None)
    out["shape"] = specs.describe(settings.spec)
    out["settings"] = _settings_record(settings)
    out |= ratios(out["bpo"], out["trl"], settings)
    return out


def _out_of_memory(side: dict[str, Any]) -> bool:
    """torch's OutOfMemoryError, or bpo's BatchOutOfMemoryError naming the batch."""
    return side["status"] == "error" and "OutOfMemoryError" in side.get("error", "")


@contextlib.contextmanager
def library_sides() -> Iterator[Any]:
    """`throughput.sides` with this run's model builder, and whatever its bpo side patches on
    bpo's Trainer (timing hooks) put back afterwards, so sides can run one after the other in a
    process."""
    from throughput import sides

    from bpo.train import refs as bpo_refs
    from bpo.train import run as bpo_run

    trainer = bpo_run.Trainer
    saved = (sides.build_model, trainer.train_step, trainer.fit, bpo_refs.score_pairs)
    sides.build_model = specs.build_model
    try:
        yield sides
    finally:
        sides.build_model, trainer.train_step, trainer.fit, bpo_refs.score_pairs = saved


def bpo_side(settings: Any) -> dict[str, Any]:
    """bpo's side (`throughput.sides.run_bpo`), its result in the record's units."""
    from throughput.measure import Gate

    with library_sides() as sides:
        return side_record(sides.run_bpo(settings, Gate(None, settings.device)), settings)


def trl_side(settings: Any) -> dict[str, Any]:
    """TRL's DPOTrainer side (`throughput.sides.run_trl`), or why it cannot run here."""
    why = missing("trl")
    if why:
        return not_run(why)
    from throughput.measure import Gate

    with library_sides() as sides:
        return side_record(sides.run_trl(settings, False, Gate(None, settings.device)), settings)


def side_record(result: dict[str, Any], settings: Any) -> dict[str, Any]:
    """A side's figures: pairs/s both ways, seconds, memory, tokens, parameters, loss."""
    trained = settings.total_steps * settings.batch_size
    out = {
        "pairs_per_s_step": round(result["pairs_per_s"], 3),
        "pairs_per_s_end_to_end": round(trained / result["end_to_end_s"], 3),
        "s_per_step": round(result["s_per_step"], 4),
        "step_times_s": [round(t, 4) for t in result["step_times"]],
        "end_to_end_s": round(result["end_to_end_s"], 3),
        "peak_mem_mib": round(result["peak_mem_bytes"] / 2**20, 1),
        "peak_total_mib": round(result["peak_total_bytes"] / 2**20, 1),
        "tokens_per_pair": {k: round(v, 1) for k, v in result["tokens"].items()},
        "params": result["params"],
        "loss": result["loss"],
        "device": result["device"],
    }
    if "ref_pass_s" in result:
        out["ref_pass_s"] = round(result["ref_pass_s"], 3)
    return out


def ratios(bpo: dict[str, Any], trl: dict[str, Any], settings: Any) -> dict[str, Any]:
    """TRL / bpo step only and end to end, the memory ratio, and the FLOP-count ideals."""
    if bpo["status"] != "ok" or trl["status"] != "ok":
        return {"speedup": not_run("needs both sides measured")}
    from throughput.summary import flops_per_pair, ideal_ratios

    try:
        flops = flops_per_pair(
            bpo["tokens_per_pair"],
            bpo["params"],
            settings.spec,
            settings.gradient_checkpointing,
            settings.negatives_per_sample,
        )
        ideal_e2e, ideal_step = ideal_ratios(flops, settings.epochs)["bpo"]
    except Exception as exc:  # the ideals are a reading aid; the measured ratios stand alone
        ideal_e2e = ideal_step = error_record(exc)["error"]
    return {
        "speedup": {
            "step": round(bpo["pairs_per_s_step"] / trl["pairs_per_s_step"], 3),
            "end_to_end": round(trl["end_to_end_s"] / bpo["end_to_end_s"], 3),
            "peak_mem_ratio": round(bpo["peak_mem_mib"] / trl["peak_mem_mib"], 3),
            "ideal_step": ideal_step if isinstance(ideal_step, str) else round(ideal_step, 3),
            "ideal_end_to_end": ideal_e2e if isinstance(ideal_e2e, str) else round(ideal_e2e, 3),
        }
    }


def _settings_record(settings: Any) -> dict[str, Any]:
    names = ("batch_size", "steps_per_epoch", "epochs", "warmup", "negatives_per_sample")
    names += ("lora_r", "lora_alpha", "attn", "dtype", "device", "prompt_words", "answer_words")
    return {name: getattr(settings, name) for name in names}
