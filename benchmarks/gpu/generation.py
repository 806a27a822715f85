"""`generation`: image-weakened negatives at the LLaVA-7B shape, batch 32 vs one at a time.

Both sides call `bpo.bootstrap.weaken.weakened_answers` through the transformers backend of
`bpo.generate` on the same bf16 model, requests and `WeakenConfig` (noise step 900 of the
sigmoid schedule, temperature 1, top-p 1, keyed per request): batched, one
`TransformersGenerator` of batch size 32 over 32 requests; per sample, a batch-1 generator in a
loop over the first few of them (`indices=[i]` keys each as the batched call does), as
`benchmarks/weaken_throughput.py` does on a CPU. A random-init model rarely ends an answer early,
so answers run to `max_new_tokens` and tokens/s compares like with like. Each side runs once
after a short warm-up. In bf16 a padded batch need not reproduce the per-sample logits bit for
bit, so equal answers are counted (`identical_answers`), not required.
"""

from __future__ import annotations

import time
from typing import Any

from gpu import specs
from gpu.runner import Context, attempt

BATCH = 32
PER_SAMPLE = {True: 2, False: 6}  # requests the per-sample loop runs: dry run, GPU
MAX_NEW_TOKENS = {True: 8, False: 64}
SECONDS = {True: 5.0, False: 15.0}


def requests(settings: Any) -> list[Any]:
    """BATCH requests: the benchmark's noise images with its made-up questions."""
    from throughput.build import load_images, make_pairs, write_images

    from bpo.generate import GenerationRequest

    write_images(settings)
    images = load_images(settings)
    return [
        GenerationRequest([{"role": "user", "content": p["question"]}], images[i])
        for i, p in enumerate(make_pairs(settings)[:BATCH])
    ]


def timed(generate: Any, device: str) -> tuple[float, list[list[Any]]]:
    """(seconds, answers) of one call, the device synchronized around it."""
    from throughput.measure import sync

    sync(device)
    start = time.perf_counter()
    answers = generate()
    sync(device)
    return time.perf_counter() - start, answers


def run(ctx: Context) -> dict[str, Any]:
    """One model, both sides; per-sample first (the shorter), each recorded as it finishes."""
    from bpo.bootstrap.config import WeakenConfig
    from bpo.bootstrap.weaken import weakened_answers
    from bpo.generate import TransformersGenerator

    dry = ctx.run.dry
    work = ctx.work / "generation"
    work.mkdir(parents=True, exist_ok=True)
    settings = specs.settings(ctx.run, "llava", work, batch_size=BATCH, steps_per_epoch=1)
    model, processor = specs.build(settings)
    model.eval()
    items = requests(settings)
    config = WeakenConfig(
        noise_steps=[900], temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS[dry], seed=0
    )
    batched = TransformersGenerator(model, processor, batch_size=BATCH)
    single = TransformersGenerator(model, processor, batch_size=1)
    weakened_answers(batched, items[:2], config)  # warm-up: allocator, kernels, lazy imports
    weakened_answers(single, items[:1], config)
    count, need = PER_SAMPLE[dry], SECONDS[dry]
    answers: dict[str, list] = {}

    def side(name: str, generate: Any, n_requests: int) -> dict[str, Any]:
        seconds, result = timed(generate, settings.device)
        answers[name] = result
        tokens = sum(len(a.token_ids) for row in result for a in row)
        return {
            "requests": n_requests,
            "seconds": round(seconds, 3),
            "generated_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2),
            "samples_per_s": round(n_requests / seconds, 3),
        }

    out: dict[str, Any] = {
        "shape": specs.describe(settings.spec),
        "dtype": settings.dtype,
        "noise_step": 900,
        "max_new_tokens": config.max_new_tokens,
    }
    items_per_sample = items[:count]
    out["per_sample"] = attempt(
        ctx,
        "per_sample",
        need,
        lambda: side("per_sample", lambda: _loop(single, items_per_sample, config), count),
    )
    out[f"batch_{BATCH}"] = attempt(
        ctx,
        f"batch_{BATCH}",
        need,
        lambda: side("batched", lambda: weakened_answers(batched, items, config), len(items)),
    )
    if len(answers) == 2:
        pairs = zip(answers["per_sample"], answers["batched"][:count], strict=True)
        same = sum(a[0].token_ids == b[0].token_ids for a, b in pairs)
        out["identical_answers"] = f"{same} of {count}"
        one, many = out["per_sample"], out[f"batch_{BATCH}"]
        out["batch_speedup_tokens_per_s"] = round(many["tokens_per_s"] / one["tokens_per_s"], 3)
    return out


def _loop(generator: Any, items: list[Any], config: Any) -> list[list[Any]]:
    """The per-sample side: one request a call, keyed by its index as in the batched call."""
    from bpo.bootstrap.weaken import weakened_answers

    return [weakened_answers(generator, [r], config, indices=[i])[0] for i, r in enumerate(items)]
