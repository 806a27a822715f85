"""The figures: FLOP-count ideals, the paired ratios, the targets, the table and the JSON line.

Ideal ratios count matmul FLOPs per pair (2 x parameters per token; attention's quadratic term
and padding ignored). The frozen vision tower and projector run forward only; the language
model's LoRA step is a forward plus a backward of about one forward (its frozen weights need
input gradients only, LoRA's own weights are small):

    D(T) = 2 N_lm T               (T tokens through the decoder layers)
    H(S) = 2 N_head S             (S scored tokens through the LM head)
    F_vis = 2 N_vision V + 2 N_proj I   (V tower positions: LLaVA patches + CLS, Qwen patches;
                                         I image tokens: LLaVA patches, Qwen / 4)
    step(T, S) = k D(T) + 2 H(S)  with k = 2, or k = 3 with gradient checkpointing: the decoder
                                  layers' forward runs again inside the backward (the LM head
                                  is not checkpointed, and no gradient reaches the frozen tower,
                                  so neither is recomputed)
    ref(T, S)  = D(T) + H(S)      (a forward)

    TRL        = 4 F_vis + step(2P + C + R, C + R) + ref(2P + C + R, C + R)   (2 rows a pair,
                                                    policy and reference vision both times)
    TRL no-ref = 2 F_vis + step(2P + C + R, C + R)
    bpo        =   F_vis + step( P + C + R, C + R)   (one row a pair, no reference forward)
    bpo's pass = (F_vis + ref(P + C + nR, C + nR)) / n   (once, before training: a sample's n
                                                    pairs in one row, `bpo.train.groups`)

with P the prefix (image + prompt) tokens and C, R the answers' tokens, means over the data.
With the tower and the head negligible and answers of A tokens, step-only TRL / bpo is
(k + 1)(2P + 2A) / (k (P + 2A)): 3 (P + A) / (P + 2A) = 2.45 at P = 221, A = 64, and with
checkpointing 8 (P + A) / (3 (P + 2A)) = 2.18 (the recompute adds a forward to both sides, and
bpo's share of it is the larger). End to end over E epochs bpo also pays its pass once:
E TRL / (E bpo + pass), with n = 2 pairs a sample (the default data: BPO's recipe gives each
gold answer one weakened and one injected negative) 2 x 1710 / (2 x 698 + 206.5) = 2.13 at that
shape for 2 epochs, and 2 x 1710 / (2 x 698 + 349) = 1.96 with one pair a sample (in units of
2 N_lm; measured steps cost more than two forwards, so the measured pass is cheaper than this).
"""

from __future__ import annotations

import json
import statistics
from typing import Any

from throughput.build import ModelSpec, Settings
from throughput.driver import TURNS_BEFORE_STEPS

# The settings of the default CPU LLaVA run (`python benchmarks/train_throughput.py`), which the
# targets below are set for.
DEFAULTS = {
    "epochs": 2,
    "steps_per_epoch": 10,
    "batch_size": 4,
    "gradient_checkpointing": False,
    "threads": 1,
    "attn": "eager",
}
# The done-when targets, for the default CPU LLaVA run.
TARGETS = {
    "end_to_end_speedup": (">=", 2.0),  # 2 epochs, bpo's reference pass included
    "step_speedup": (">=", 2.3),  # paired per round
    "peak_mem_ratio": ("<=", 0.75),
    "ref_pass_per_step": ("<=", 0.35),  # the pass per pair / a training step per pair
}


def flops_per_pair(
    tokens: dict[str, float],
    counts: dict[str, int],
    spec: ModelSpec,
    checkpointing: bool,
    per_sample: int = 1,
) -> dict[str, float]:
    """Matmul FLOPs per pair of each side's step and of bpo's reference pass (module doc);
    per_sample: pairs per sample, which the pass scores in one row."""
    p, c, r = tokens["prefix"], tokens["chosen"], tokens["rejected"]
    vis = 2 * counts["vision"] * spec.vision_positions + 2 * counts["projector"] * spec.image_tokens
    k = 3 if checkpointing else 2

    def step(t: float, s: float) -> float:
        return k * 2 * counts["lm"] * t + 2 * 2 * counts["head"] * s

    def forward(t: float, s: float) -> float:
        return 2 * counts["lm"] * t + 2 * counts["head"] * s

    two_rows, one_row, scored = 2 * p + c + r, p + c + r, c + r
    return {
        "trl": 4 * vis + step(two_rows, scored) + forward(two_rows, scored),
        "trl-noref": 2 * vis + step(two_rows, scored),
        "bpo": vis + step(one_row, scored),
        "bpo_pass": (vis + forward(p + c + per_sample * r, c + per_sample * r)) / per_sample,
    }


def ideal_ratios(flops: dict[str, float], epochs: int) -> dict[str, tuple[float, float]]:
    """TRL's FLOPs over each side's: (end to end over `epochs`, step only)."""
    trl = flops["trl"]
    out = {}
    for side in ("bpo", "trl", "trl-noref"):
        once = flops["bpo_pass"] if side == "bpo" else 0.0
        out[side] = (epochs * trl / (epochs * flops[side] + once), trl / flops[side])
    return out


def turns(result: dict[str, Any], side: str) -> tuple[float, list[float]]:
    """(time of the turns before the first step, each step's turn) of a side's result."""
    before = TURNS_BEFORE_STEPS[side]
    return sum(result["spans"][:before]), result["spans"][before:]


def paired_ratios(trl: dict, other: dict, side: str, warmup: int) -> tuple[float, float]:
    """(end to end, step only) TRL / side, each the median over rounds of a ratio of turns
    taken back to back, which cancels slow drifts in machine load.

    End to end, a round's ratio is TRL's turn over the side's turn plus an equal share of its
    turns before the steps (bpo's reference pass spread over its steps); step only, the steps
    themselves, after the warm-up.
    """
    _, trl_turns = turns(trl, "trl")
    before, side_turns = turns(other, side)
    share = before / len(side_turns)
    e2e = statistics.median(t / (b + share) for t, b in zip(trl_turns, side_turns, strict=True))
    pairs = zip(trl["step_times"][warmup:], other["step_times"][warmup:], strict=True)
    return e2e, statistics.median(t / b for t, b in pairs)


def cpu_time_figures(bpo: dict, trl: dict, settings: Settings) -> dict[str, float]:
    """The same three figures in process CPU time (a check on machine load: a process waiting
    for a core adds wall time, not CPU time): end to end as the ratio of totals, step only paired
    per round, and the reference pass per step."""
    trl_steps, bpo_steps = (r["step_cpu_times"][settings.warmup :] for r in (trl, bpo))
    steps = zip(trl_steps, bpo_steps, strict=True)
    step = statistics.median(bpo_steps) / settings.batch_size
    return {
        "end_to_end_speedup_cpu": trl["end_to_end_cpu_s"] / bpo["end_to_end_cpu_s"],
        "step_speedup_cpu": statistics.median(t / b for t, b in steps),
        "ref_pass_per_step_cpu": bpo["ref_pass_cpu_s"] / settings.pairs / step,
    }


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _figures(results: dict[str, dict], settings: Settings, paired: bool) -> dict[str, dict]:
    """Per side: end to end (s, speedup, ideal), step only (s, pairs/s, speedup, ideal)."""
    bpo, trl = results["bpo"], results["trl"]
    flops = flops_per_pair(
        bpo["tokens"],
        bpo["params"],
        settings.spec,
        settings.gradient_checkpointing,
        settings.negatives_per_sample,
    )
    ideals = ideal_ratios(flops, settings.epochs)
    out = {}
    for side, r in results.items():
        if paired and side != "trl":
            e2e, step = paired_ratios(trl, r, side, settings.warmup)
        else:  # one side after the other: the ratio of totals, and of median steps
            e2e = trl["end_to_end_s"] / r["end_to_end_s"]
            step = trl["s_per_step"] / r["s_per_step"]
        out[side] = {"e2e": e2e, "step": step, "ideal_e2e": ideals[side][0]}
        out[side]["ideal_step"] = ideals[side][1]
    return out


def _target_lines(summary: dict[str, Any]) -> list[str]:
    """One line per target: the figure, the target, PASS or FAIL."""
    lines = []
    for name, (op, bound) in TARGETS.items():
        value = summary[name]
        ok = value >= bound if op == ">=" else value <= bound
        summary.setdefault("targets", {})[name] = {"value": value, "target": f"{op} {bound}"}
        summary["targets"][name]["pass"] = ok
        lines.append(
            f"  {name:<20} {value:6.3f}  target {op} {bound:<5} {'PASS' if ok else 'FAIL'}"
        )
    return lines


def report(
    results: dict[str, dict[str, Any]], settings: Settings, gpu: bool, sequential: bool
) -> dict[str, Any]:
    """Print the table, the notes, the targets and the final JSON line; return the summary."""
    bpo, trl = results["bpo"], results["trl"]
    figures = _figures(results, settings, paired=not sequential)
    how = "paired per round" if not sequential else "ratio of totals"
    print()
    print(
        f"{'':<11}{f'end to end ({settings.epochs} epoch(s))':^27}|{'step only':^33}|"
        f"\n{'side':<11}{'s':>8}{'speedup':>10}{'ideal':>8} |{'s/step':>8}{'pairs/s':>9}"
        f"{'speedup':>9}{'ideal':>7}{'peak mem':>12}{'trainable':>11}   tokens/pair: prefix "
        "chosen rejected, padded row"
    )
    for side, r in results.items():
        f, t = figures[side], r["tokens"]
        print(
            f"{side:<11}{r['end_to_end_s']:8.1f}{f['e2e']:9.2f}x{f['ideal_e2e']:7.2f}x |"
            f"{r['s_per_step']:8.3f}{r['pairs_per_s']:9.2f}{f['step']:8.2f}x{f['ideal_step']:6.2f}x"
            f"{mib(r['peak_mem_bytes']):>12}{r['params']['trainable']:>11,}   {t['prefix']:.1f} "
            f"{t['chosen']:.1f} {t['rejected']:.1f}, {t['row_padded']:.0f}"
            + (" x2" if side != "bpo" else "")
        )
    ref_per_pair = bpo["ref_pass_s"] / settings.pairs
    ref_per_step = ref_per_pair / (bpo["s_per_step"] / settings.batch_size)
    gc = "on" if settings.gradient_checkpointing else "off"
    print(
        f"end to end: each side's turns summed: bpo's reference pass, then per step fetching and "
        f"collating the batch and the step ({settings.total_steps} steps); TRL's reference "
        f"forwards are inside its steps. speedup: over TRL's default, {how}; step only: the "
        f"median step after {settings.warmup} warm-up. ideal: the FLOP-count ratio "
        f"(throughput/summary.py; gradient checkpointing {gc}). peak mem: above the memory once "
        "the model is built ("
        + ("torch.cuda.max_memory_allocated" if settings.device.startswith("cuda") else "peak RSS")
        + ")."
    )
    print(
        f"bpo's reference pass (timed alone, nothing else running): {bpo['ref_pass_s']:.2f} s for "
        f"{settings.pairs} pairs, {1000 * ref_per_pair:.0f} ms/pair = {ref_per_step:.2f} of a "
        f"training step per pair ({1000 * bpo['s_per_step'] / settings.batch_size:.0f} ms/pair)"
    )
    cpu = cpu_time_figures(bpo, trl, settings)
    if not settings.device.startswith("cuda"):
        print(
            f"in process CPU time (what machine load changes least): end to end "
            f"{cpu['end_to_end_speedup_cpu']:.2f}x, step only {cpu['step_speedup_cpu']:.2f}x, "
            f"reference pass {cpu['ref_pass_per_step_cpu']:.2f} of a step per pair"
        )
    summary: dict[str, Any] = {
        "end_to_end_speedup": round(figures["bpo"]["e2e"], 3),
        "end_to_end_speedup_totals": round(trl["end_to_end_s"] / bpo["end_to_end_s"], 3),
        "ideal_end_to_end_speedup": round(figures["bpo"]["ideal_e2e"], 3),
        "end_to_end_s_bpo": round(bpo["end_to_end_s"], 2),
        "end_to_end_s_trl": round(trl["end_to_end_s"], 2),
        "step_speedup": round(figures["bpo"]["step"], 3),
        "step_speedup_medians": round(trl["s_per_step"] / bpo["s_per_step"], 3),
        "ideal_step_speedup": round(figures["bpo"]["ideal_step"], 3),
        "pairs_per_s_bpo": round(bpo["pairs_per_s"], 3),
        "pairs_per_s_trl": round(trl["pairs_per_s"], 3),
        "peak_mem_ratio": round(bpo["peak_mem_bytes"] / trl["peak_mem_bytes"], 3),
        "ref_pass_s": round(bpo["ref_pass_s"], 3),
        "ref_pass_per_step": round(ref_per_step, 3),
    }
    if not settings.device.startswith("cuda"):
        summary |= {name: round(value, 3) for name, value in cpu.items()}
    if "trl-noref" in results:
        noref = results["trl-noref"]
        if sequential:
            e2e, step = noref["end_to_end_s"], noref["s_per_step"]
            e2e, step = e2e / bpo["end_to_end_s"], step / bpo["s_per_step"]
        else:
            e2e, step = paired_ratios(noref, bpo, "bpo", settings.warmup)
        summary["end_to_end_speedup_vs_trl_noref"] = round(e2e, 3)
        summary["step_speedup_vs_trl_noref"] = round(step, 3)
        summary["peak_mem_ratio_vs_trl_noref"] = round(
            bpo["peak_mem_bytes"] / noref["peak_mem_bytes"], 3
        )
    summary["peak_mem_mib_bpo"] = round(bpo["peak_mem_bytes"] / 2**20, 1)
    summary["peak_mem_mib_trl"] = round(trl["peak_mem_bytes"] / 2**20, 1)
    summary |= {"device": bpo["device"], "family": settings.spec.family}
    summary |= {"text_layers": settings.spec.text_layers, "epochs": settings.epochs}
    summary["gradient_checkpointing"] = settings.gradient_checkpointing
    summary["interleaved"] = not sequential
    if not gpu and settings.spec.family == "llava":
        changed = [
            f"{k} {getattr(settings, k)}" for k, v in DEFAULTS.items() if getattr(settings, k) != v
        ]
        changed += ["sides one after the other"] if sequential else []
        note = f"; this run changed {', '.join(changed)}" if changed else ""
        print(f"targets (set for the default CPU LLaVA run{note}):")
        print("\n".join(_target_lines(summary)))
    print(json.dumps(summary))
    return summary
