"""`logprobs_bf16`: bpo's packed pair log-probs against the model's own plain forward, in bf16.

For each 7B shape, one batch of pairs is scored three ways, forward only:
    packed  `bpo.train.logprobs.pair_logps`: one row `[prefix | chosen | rejected]` a pair with
            the block mask (what training runs)
    plain   `naive_pair_logps`: the model's own forward on two padded rows a pair (prefix +
            chosen, prefix + rejected), a 2-D padding mask, full logits
    alone   the same plain forward, one pair at a time (each collated alone: no padding)
and the results record the largest |packed - plain| over the summed answers, and the plain
forward's own disagreement with itself at another batch shape, |plain - alone| (the floor: what
bf16 kernels of other shapes change with nothing else different).

Tolerance. bf16 keeps 8 significant bits, ~2.4 decimal digits. An answer here sums ~100 token
log-probs of ~-10 nats (random weights: near uniform over a 32k-152k vocabulary), ~-1000 in all,
so one bf16 rounding of the sum is ~4 nats; but the log-softmax runs in fp32 on bf16 logits, and
token errors of either sign mostly cancel in the sum. 0.05 nats per summed answer (5e-4 a token,
the rounding of a bf16 logit of ~0.1) is the bound below which a packed/plain difference cannot
be told from rounding, far below what a wrong mask, position or image feature gives (nats a
token), and 0.005 in the DPO margin at beta 0.1. Deep bf16 stacks can drift past one rounding,
so a shape also passes when its difference is at most twice its own floor:
    within = max |packed - plain| <= max(0.05, 2 x max |plain - alone|)
The dry run (fp32) must agree to 1e-4 (tests/benchmarks/test_gpu_verify.py).
"""

from __future__ import annotations

from typing import Any

from gpu import specs
from gpu.runner import Context, attempt

TOLERANCE_NATS = 0.05
FLOOR_FACTOR = 2.0
PAIRS = 4  # one batch
SECONDS_PER_SHAPE = {True: 5.0, False: 20.0}  # dry run, GPU: build + three forwards


def run(ctx: Context) -> dict[str, Any]:
    """Both shapes, each recorded as it finishes."""
    out: dict[str, Any] = {"tolerance_nats": TOLERANCE_NATS, "floor_factor": FLOOR_FACTOR}
    need = SECONDS_PER_SHAPE[ctx.run.dry]
    for shape in ("llava", "qwen"):
        out[shape] = attempt(ctx, shape, need, lambda shape=shape: compare(ctx, shape))
    return out


def max_diff(a: Any, b: Any) -> float:
    """Largest |a - b| over both answers of every pair (PairLogps)."""
    chosen = (a.chosen.double() - b.chosen.double()).abs().max()
    rejected = (a.rejected.double() - b.rejected.double()).abs().max()
    return float(max(chosen, rejected))


def stacked(parts: list[Any]) -> Any:
    """PairLogps of single pairs joined into one, in order."""
    import dataclasses

    import torch

    from bpo.train.logprobs import PairLogps

    # The weighted fields are None without a dense preference: only the set ones are joined.
    names = [f.name for f in dataclasses.fields(PairLogps) if getattr(parts[0], f.name) is not None]
    return PairLogps(**{name: torch.cat([getattr(p, name) for p in parts]) for name in names})


def compare(ctx: Context, shape: str) -> dict[str, Any]:
    """One shape: the three scorings of one batch and the verdict."""
    import torch

    from bpo.train.logprobs import naive_pair_logps, pair_logps

    work = ctx.work / f"logprobs_{shape}"
    work.mkdir(parents=True, exist_ok=True)
    settings = specs.settings(ctx.run, shape, work, batch_size=PAIRS, steps_per_epoch=1)
    model, processor = specs.build(settings)
    model.eval()
    batch = specs.pair_batches(settings, processor, PAIRS)[0].to(settings.device)
    singles = [b.to(settings.device) for b in specs.pair_batches(settings, processor, 1)]
    with torch.no_grad():
        packed = pair_logps(model, batch)
        plain = naive_pair_logps(model, batch)
        alone = stacked([naive_pair_logps(model, one) for one in singles])
    diff, floor = max_diff(packed, plain), max_diff(plain, alone)
    bound = max(TOLERANCE_NATS, FLOOR_FACTOR * floor)
    t = batch.tensors
    per_token = max(
        float(((packed.chosen - plain.chosen).abs() / plain.chosen_tokens).max()),
        float(((packed.rejected - plain.rejected).abs() / plain.rejected_tokens).max()),
    )
    return {
        "shape": specs.describe(settings.spec),
        "dtype": settings.dtype,
        "pairs": len(batch),
        "tokens_per_pair": {
            "prefix": float(t["prefix_lengths"].float().mean()),
            "chosen": float(t["chosen_lengths"].float().mean()),
            "rejected": float(t["rejected_lengths"].float().mean()),
        },
        "mean_chosen_logp": float(plain.chosen.float().mean()),
        "max_abs_diff_packed_vs_plain": diff,
        "max_rel_diff_packed_vs_plain": diff / float(plain.chosen.abs().min()),
        "max_abs_diff_per_token": per_token,
        "floor_plain_vs_alone": floor,
        "bound_nats": bound,
        "within": diff <= bound,
    }
