"""`attention`: bpo's packed rows under SDPA with a 4D float mask vs FlexAttention with a block
mask, at the LLaVA-7B shape: step time, peak memory, and whether both give the same log-probs.

    sdpa_4d_mask     today's path: `bpo.train.logprobs.pair_logps` (the additive (B, 1, L, L)
                     mask; SDPA must then use a kernel that takes an arbitrary bias)
    flex_block_mask  the same packed rows with the language model's attention set to
                     transformers' "flex_attention" and the mask given as a `BlockMask` built
                     from the rows' segments (`block_mask`): the same allowed pairs, and blocks
                     with nothing allowed (the rejected answer against the chosen one, padding)
                     are skipped. Scored like `packed_token_logps` (positions, `logits_to_keep`,
                     fp32 log-softmax), the block mask built inside the step.

A step is one forward and backward of the summed answer log-probs through a LoRA adapter (r=128
on every linear layer of the language model; no optimizer step, which is the same for both),
the median of the steps after a warm-up (FlexAttention compiles its kernels in its first step;
that step's time is recorded apart). On a CPU (the dry run) FlexAttention has no backward, so
both paths run forward only there, in inference mode, and flex is compiled with torch.compile's
`aot_eager` backend (`quick_flex_compile`: seconds, where inductor's CPU code generation takes
~30 s on a small machine); on the GPU it is transformers' own compile (inductor). The vision
tower keeps SDPA.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from gpu import specs
from gpu.runner import Context, attempt

PAIRS = 4
STEPS = {True: 2, False: 5}  # dry run, GPU: steps per path, the first a warm-up
SECONDS = {True: 10.0, False: 25.0}  # least budget to start a path (flex compiles)


def block_allowed(segments: Any, b: Any, q: Any, kv: Any) -> Any:
    """Whether query `q` of row `b` may see key `kv` (broadcasting index tensors): bpo's packed
    rule (`bpo.train.logprobs.block_attention_mask`): earlier keys of the prefix or of the
    query's own answer, never padding, and every token itself."""
    from bpo.train.batch import PAD, PREFIX

    query, key = segments[b, q], segments[b, kv]
    seen = (kv <= q) & ((key == PREFIX) | (key == query)) & (key != PAD) & (query != PAD)
    return seen | (q == kv)


def block_mask(segments: Any) -> Any:
    """The packed rows' FlexAttention `BlockMask` (B, 1, L, L) from their (B, L) segments."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return block_allowed(segments, b, q, kv)

    rows, length = segments.shape
    return create_block_mask(mask_mod, rows, None, length, length, device=segments.device)


def dense_allowed(segments: Any) -> Any:
    """(B, L, L) `block_allowed` at every query and key: what the block mask encodes."""
    import torch

    rows, length = segments.shape
    b = torch.arange(rows, device=segments.device)[:, None, None]
    pos = torch.arange(length, device=segments.device)
    return block_allowed(segments, b, pos[None, :, None], pos[None, None, :])


def set_text_attention(model: Any, implementation: str) -> None:
    """Set the language model's attention implementation (its layers read it at each call)."""
    from bpo.models.family import language_model_name

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_submodule(language_model_name(base))
    configs = {id(m.config): m.config for m in decoder.modules() if hasattr(m, "config")}
    for config in configs.values():
        config._attn_implementation = implementation


def quick_flex_compile(training: bool) -> str:
    """The dry run's FlexAttention compile: transformers' compiled-once wrapper given an
    `aot_eager` compile (no code generation). Returns the backend flex will run with."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as hf_flex

    wrapper = hf_flex.WrappedFlexAttention(training)  # the singleton transformers calls
    if not hasattr(wrapper, "_compiled_flex_attention"):
        return "inductor (transformers' own compile)"
    wrapper._compiled_flex_attention = torch.compile(flex_attention, backend="aot_eager")
    return "aot_eager (dry run)"


def flex_logps(model: Any, batch: Any) -> Any:
    """The packed rows' summed answer log-probs with FlexAttention and the block mask."""
    import torch

    from bpo.train.batch import CHOSEN, REJECTED
    from bpo.train.logprobs import PairLogps, packed_position_ids

    t = batch.tensors
    logits = model(
        input_ids=t["input_ids"],
        attention_mask=block_mask(t["segments"]),
        position_ids=packed_position_ids(model, batch),
        logits_to_keep=t["score_positions"],
        use_cache=False,
        **batch.vision,
        **batch.token_types,
    ).logits
    logps = torch.log_softmax(logits.float(), dim=-1)
    token = logps.gather(-1, t["score_targets"][..., None]).squeeze(-1)  # (B, K)
    branch = t["score_branch"]
    return PairLogps(
        chosen=(token * (branch == CHOSEN)).sum(-1),
        rejected=(token * (branch == REJECTED)).sum(-1),
        chosen_tokens=(branch == CHOSEN).sum(-1),
        rejected_tokens=(branch == REJECTED).sum(-1),
    )


def sdpa_logps(model: Any, batch: Any) -> Any:
    from bpo.train.logprobs import pair_logps

    return pair_logps(model, batch)


def timed_steps(model: Any, batch: Any, score: Any, steps: int, backward: bool) -> dict:
    """`steps` steps of `score` (the first a warm-up): times, peak memory, the last log-probs."""
    import torch
    from throughput.measure import PeakMemory, sync

    device = str(batch.tensors["input_ids"].device)
    memory = PeakMemory(device)
    memory.reset()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode(not backward):
            logps = score(model, batch)
            if backward:
                (logps.chosen.sum() + logps.rejected.sum()).backward()
        sync(device)
        times.append(time.perf_counter() - start)
    delta, peak = memory.peak_above_baseline()
    model.zero_grad(set_to_none=True)
    return {
        "mode": "forward+backward" if backward else "forward (inference mode)",
        "first_step_s": round(times[0], 4),
        "s_per_step": round(statistics.median(times[1:] or times), 4),
        "step_times_s": [round(t, 4) for t in times],
        "peak_mem_mib": round(delta / 2**20, 1),
        "peak_total_mib": round(peak / 2**20, 1),
        "logps": (logps.chosen.detach().double().cpu(), logps.rejected.detach().double().cpu()),
    }


def run(ctx: Context) -> dict[str, Any]:
    """Both paths on one LoRA-wrapped LLaVA-7B-shaped model and one batch, SDPA first."""
    import torch
    from peft import get_peft_model
    from throughput.build import lora_config

    from bpo.train.logprobs import block_attention_mask

    work = ctx.work / "attention"
    work.mkdir(parents=True, exist_ok=True)
    settings = specs.settings(ctx.run, "llava", work, batch_size=PAIRS, steps_per_epoch=1)
    model, processor = specs.build(settings)
    batch = specs.pair_batches(settings, processor, PAIRS)[0].to(settings.device)
    model = get_peft_model(model, lora_config(settings))
    model.train()
    backward = not ctx.run.dry
    steps, need = STEPS[ctx.run.dry], SECONDS[ctx.run.dry]
    allowed = dense_allowed(batch.tensors["segments"])
    bpo_mask = block_attention_mask(batch.tensors["segments"], torch.float32)[:, 0] == 0
    out: dict[str, Any] = {
        "shape": specs.describe(settings.spec),
        "pairs": len(batch),
        "row_length": batch.tensors["input_ids"].shape[1],
        "block_mask_equals_bpo_mask": bool(torch.equal(allowed, bpo_mask)),
        "allowed_share": round(float(allowed.float().mean()), 4),
        "flex_compile": (
            quick_flex_compile(model.training) if ctx.run.dry else "inductor (transformers' own)"
        ),
    }
    ctx.record.update(out)  # kept if flex's compile outlives the budget
    logps = {}
    for name, score, implementation in (
        ("sdpa_4d_mask", sdpa_logps, "sdpa"),
        ("flex_block_mask", flex_logps, "flex_attention"),
    ):
        set_text_attention(model, implementation)

        def measure(score=score, name=name) -> dict:
            result = timed_steps(model, batch, score, steps, backward)
            logps[name] = result.pop("logps")
            return result

        out[name] = attempt(ctx, name, need, measure)
    set_text_attention(model, "sdpa")
    if len(logps) == 2:
        (a_c, a_r), (b_c, b_r) = logps["sdpa_4d_mask"], logps["flex_block_mask"]
        diff = max(float((a_c - b_c).abs().max()), float((a_r - b_r).abs().max()))
        out["max_abs_diff_flex_vs_sdpa"] = diff
    if all(out[n].get("status") == "ok" for n in ("sdpa_4d_mask", "flex_block_mask")):
        sdpa, flex = out["sdpa_4d_mask"], out["flex_block_mask"]
        out["flex_speedup"] = round(sdpa["s_per_step"] / flex["s_per_step"], 3)
        out["flex_mem_ratio"] = round(flex["peak_mem_mib"] / max(sdpa["peak_mem_mib"], 1e-9), 3)
    return out
