"""The demo's bootstrapping: BPO's two kinds of negatives from the aligned base model.

Positives are the alignment set's own gold captions (the paper's setting: its positives were in
LLaVA's SFT mix). Negatives:
- weaken: the base model's caption *sampled* from the image noised by the diffusion forward
  process at step t (one set per noise step asked for);
- inject: the gold caption with one lexical error (a swapped, inserted or deleted shape, or a
  changed colour), insertions following the text prior's partners.
Because ShapeWorld's ground truth is exact, we can say how many negatives really contain a
hallucinated object, and how many of those hallucinations are the prior's partner shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from bpo.bootstrap.generate import GenerationRequest
from bpo.bootstrap.inject import InjectionStats, InjectionVocabulary, inject_errors
from bpo.bootstrap.weaken import WeakenConfig, weakened_answers
from bpo.data import PairWriter, PreferencePair
from bpo.shapeworld.metrics import hallucination_metrics
from bpo.shapeworld.world import CAPTION_PROMPTS, Scene, WorldConfig, caption, render


@dataclass
class NegativesConfig:
    """How the demo bootstraps pairs from its alignment set."""

    scenes: int = 500  # alignment scenes whose gold captions are the positives
    # weaken at each step (sigmoid schedule; the paper uses t = 900): stats per step, pairs for all.
    # Moderate steps: here t <= 300 leaves the image half legible, so the model's own captions
    # carry its text prior (partner share ~0.5-0.55, chance ~0.34); at t = 900 the image is gone,
    # the captions ramble (twice the gold's length) and the partner share is at chance.
    noise_steps: tuple[int, ...] = (100, 300, 500)
    temperature: float = 1.0
    max_new_tokens: int = 40
    batch_size: int = 64
    # Keep a weakened negative only if its token count is at most this multiple of its gold
    # caption's (None: keep all). Noised images make long rambling captions, and DPO against long
    # negatives teaches the model to say less (recall falls) rather than to look.
    max_length_ratio: float | None = 1.5


STATS_KEYS = ("chair_s", "chair_i", "partner_share", "partner_chance")


def negative_stats(texts: list[str], scenes: list[Scene]) -> dict:
    """How wrong the negatives are: `with_hallucination` is the share holding an absent shape."""
    metrics = hallucination_metrics(texts, scenes)
    return {
        "negatives": len(texts),
        "with_hallucination": metrics["chair_s"],
        "chair_i": metrics["chair_i"],
        "partner_share": metrics["partner_share"],
        "partner_chance": metrics["partner_chance"],
    }


def _prompt() -> list[dict[str, str]]:
    return [{"role": "user", "content": f"<image>\n{CAPTION_PROMPTS[0]}"}]


def _pair(index: int, scene: Scene, rejected: str, source: str, meta: dict, tokenizer):
    def count(text: str) -> int:
        return len(tokenizer(" " + text, add_special_tokens=False)["input_ids"])

    gold = caption(scene)
    return PreferencePair(
        id=f"sw{index:06d}",
        image=f"images/sw{index:06d}.png",
        prompt=_prompt(),
        chosen=gold,
        rejected=rejected,
        source=source,
        meta=meta,
        chosen_tokens=count(gold),
        rejected_tokens=count(rejected),
    )


def _length_ok(pair: PreferencePair, max_ratio: float | None) -> bool:
    """Whether the rejected answer is at most `max_ratio` times the chosen one (in tokens)."""
    return max_ratio is None or pair.rejected_tokens <= max_ratio * pair.chosen_tokens


def weaken_negatives(model, processor, scenes, wcfg: WorldConfig, cfg: NegativesConfig, t, seed):
    """One sampled caption per scene from its image noised at step `t`."""
    images = [Image.fromarray(render(scene, wcfg)) for scene in scenes]
    requests = [GenerationRequest(_prompt(), image) for image in images]
    config = WeakenConfig(
        noise_step=t, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=seed
    )
    answers = weakened_answers(model, processor, requests, config, batch_size=cfg.batch_size)
    return [samples[0].text.strip() for samples in answers], asdict(config)


def save_images(scenes, wcfg: WorldConfig, image_root: Path) -> None:
    """The scenes' images as image_root/images/sw{index}.png, the paths the pairs name."""
    (image_root / "images").mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        Image.fromarray(render(scene, wcfg)).save(image_root / "images" / f"sw{i:06d}.png")


def bootstrap_pairs(
    model, processor, scenes, wcfg, cfg: NegativesConfig, seed: int, out: Path, image_root: Path
) -> dict:
    """Write the pair store at `out` (images under `image_root`); return the negatives' stats."""
    scenes = scenes[: cfg.scenes]
    save_images(scenes, wcfg, image_root)
    stats: dict[str, dict] = {}
    config = {"demo_negatives": asdict(cfg), "seed": seed, "world": asdict(wcfg)}
    tokenizer = processor.tokenizer
    with PairWriter(out, config=config, overwrite=True) as writer:
        for k, t in enumerate(cfg.noise_steps):
            texts, meta = weaken_negatives(model, processor, scenes, wcfg, cfg, t, seed)
            kept_scenes, kept = [], []
            for i, (scene, text) in enumerate(zip(scenes, texts, strict=True)):
                pair = _pair(i, scene, text, "weaken", {**meta, "sample_index": k}, tokenizer)
                if not _length_ok(pair, cfg.max_length_ratio):
                    writer.count(f"weaken_rejected/t{t}/too_long")
                    continue
                writer.write(pair)
                kept_scenes.append(scene)
                kept.append(text)
            # The statistics of the negatives kept, those the pairs hold (the pair store's
            # manifest counts the dropped ones under weaken_rejected/t{t}/too_long).
            stats[f"weaken_t{t}"] = negative_stats(kept, kept_scenes)
        counts = InjectionStats()
        vocabulary = InjectionVocabulary.shapeworld()
        accepted_scenes, accepted = [], []
        for i, scene in enumerate(scenes):
            injection = inject_errors(caption(scene), vocabulary, seed=seed * 1_000_003 + i,
                                      stats=counts)  # fmt: skip
            if injection.text is None:
                writer.count(f"inject_rejected/{injection.reason}")
                continue
            accepted_scenes.append(scene)
            accepted.append(injection.text)
            meta = {"edits": [e["type"] for e in injection.edits], "sample_index": 0}
            writer.write(_pair(i, scene, injection.text, "inject", meta, tokenizer))
        stats["inject"] = {**negative_stats(accepted, accepted_scenes), **counts.as_dict()}
    return stats
