"""The demo's stages, each the product's own: `bpo bootstrap`, `bpo train` (with its cached
reference pass, `bpo refs`) and `bpo eval`, configured from the DemoConfig.

The demo writes its alignment and held-out scenes as LLaVA-format datasets (`bpo shapeworld`'s
export) and every stage's config under OUT/configs, so any stage can be rerun from the CLI:

    bpo bootstrap --config OUT/configs/bootstrap.yaml
    bpo train --config OUT/configs/train-bpo-s0.yaml
    bpo eval --config OUT/configs/eval-base.yaml

Nothing here bootstraps, scores or evaluates by itself: the numbers the demo reports are the
ones those commands produce.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from bpo.bootstrap.config import BootstrapConfig, InjectConfig, WeakenConfig, weaken_steps
from bpo.bootstrap.config import check_config as check_bootstrap_config
from bpo.bootstrap.run import run_bootstrap
from bpo.bootstrap.stats import REJECT_PREFIX
from bpo.data import PreferencePair, read_bad_records, read_manifest, read_pairs
from bpo.demo.arms import Arm, arm_seeds, arm_train_config, arms_of
from bpo.demo.config import DemoConfig
from bpo.evaluate.config import BenchmarkConfig, EvalConfig
from bpo.evaluate.config import check_config as check_eval_config
from bpo.evaluate.pope import parse_yes_no
from bpo.evaluate.run import run_eval
from bpo.evaluate.shapeworld import hallucination_metrics
from bpo.generate import GenerateConfig
from bpo.models.load import ModelConfig
from bpo.shapeworld.export import read_scenes, record_id, write_llava_dataset, write_scenes
from bpo.shapeworld.world import CAPTION_PROMPTS, check_world, is_existence_answer
from bpo.train.config import check_config as check_train_config
from bpo.train.run import train

POPE_METRICS = ("accuracy", "f1", "yes_ratio")


@dataclass
class Datasets:
    """Where the demo's exported data lives: LLaVA datasets and the corpus's scenes."""

    align: Path  # the bootstrapped alignment scenes: data.json, images/, scenes.jsonl
    held_out: Path  # the held-out evaluation scenes, the same layout
    corpus: Path  # the text corpus's scenes (scenes.jsonl, no images): POPE's rankings


def write_config(path: Path, config: Any, **top: Any) -> Path:
    """A stage's config as the YAML its CLI verb reads (`run:` plus the verb's other flags)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(json.dumps({**top, "run": asdict(config)}, default=str))
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def model_config(path: Path) -> ModelConfig:
    """A model of the demo: fp32 on the CPU, eager attention (exact, repeatable logits)."""
    return ModelConfig(str(path), dtype="float32", device="cpu", attn_implementation="eager")


def datasets_in(out: Path) -> Datasets:
    """Where a demo writing to `out` puts its datasets."""
    return Datasets(out / "data" / "align", out / "data" / "held-out", out / "data" / "corpus")


def export_datasets(cfg: DemoConfig, world: Any, out: Path) -> Datasets:
    """The alignment scenes to bootstrap from and the held-out scenes, as `bpo shapeworld` data."""
    data = datasets_in(out)
    align = world.align_scenes[: cfg.negatives.scenes]
    prompt = CAPTION_PROMPTS[0]
    write_llava_dataset(
        align,
        cfg.world,
        data.align,
        cfg.seed,
        with_questions=False,
        prompt=prompt,
        existence_share=cfg.negatives.existence_share,
    )
    write_llava_dataset(
        world.eval_scenes, cfg.world, data.held_out, cfg.seed, with_questions=False, prompt=prompt
    )
    data.corpus.mkdir(parents=True, exist_ok=True)
    write_scenes(world.corpus_scenes, data.corpus / "scenes.jsonl")
    return data


# --- bootstrap ----------------------------------------------------------------------------------


def bootstrap_config(cfg: DemoConfig, base: Path, data: Datasets, out: Path) -> BootstrapConfig:
    """`bpo bootstrap` on the alignment scenes: weakened negatives at every noise step, and the
    lexical injector's rewrites (insertions follow the text prior's partners)."""
    n = cfg.negatives
    return BootstrapConfig(
        model=model_config(base),
        data=str(data.align / "data.json"),
        image_root=str(data.align),
        out=str(out),
        weaken=WeakenConfig(
            noise_steps=list(n.noise_steps),
            temperature=n.temperature,
            max_new_tokens=n.max_new_tokens,
            seed=cfg.seed,
            max_length_ratio=n.max_length_ratio,
            min_length_ratio=n.min_length_ratio,
        ),
        inject=inject_config(cfg),
        batch_size=n.batch_size,
        chunk_size=4 * n.batch_size,
    )


def inject_config(cfg: DemoConfig) -> InjectConfig:
    """The lexical injector on the world's vocabulary (its insertions follow the text prior)."""
    edits = cfg.negatives.edit_types
    config = InjectConfig(kind="lexical", vocabulary="shapeworld", seed=cfg.seed)
    return config if edits is None else replace(config, edit_types=list(edits))


def bootstrap_pairs(
    cfg: DemoConfig, loaded: tuple[Any, Any], base: Path, data: Datasets, out: Path
) -> tuple[Path, dict[str, dict]]:
    """Run `bpo bootstrap` into OUT/pairs (from the base model in memory, the same weights as
    OUT/base); return the store and its negatives' statistics against the exact scenes."""
    config = bootstrap_config(cfg, base, data, out / "pairs")
    write_config(out / "configs" / "bootstrap.yaml", config)
    run_bootstrap(config, overwrite=True, model_and_processor=loaded, progress=True)
    return Path(config.out), negative_stats(Path(config.out), data.align, config.weaken)


def negative_stats(store: Path, align: Path, weaken: WeakenConfig) -> dict[str, dict]:
    """How wrong the negatives are, per source and noise step, against the exact scenes.

    Caption negatives: `with_hallucination` is the share naming a shape absent from the scene.
    Existence-question negatives (gold "ring yes." or "ring no."), under "existence": `wrong_answer` is
    the share whose answer is the opposite of the gold's. Rejects per reason (the store's, by
    pair key) beside them.
    """
    scenes = {record_id(i): scene for i, scene in enumerate(read_scenes(align / "scenes.jsonl"))}
    records = json.loads((align / "data.json").read_text(encoding="utf-8"))
    asks = {r["id"] for r in records if is_existence_answer(r["conversations"][-1]["value"])}
    steps = weaken_steps(weaken)

    def group(sample: str, source: str, sample_index: int) -> str:
        name = f"weaken_t{steps[sample_index]}" if source == "weaken" else source
        return f"existence/{name}" if sample in asks else name

    made: dict[str, list[PreferencePair]] = defaultdict(list)
    for pair in read_pairs(store):
        made[group(pair.id, pair.source, pair.meta["sample_index"])].append(pair)
    rejects: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for bad in read_bad_records(store):
        if not bad.reason.startswith(REJECT_PREFIX):
            continue  # a record that could not be read: no negative was made for it
        sample, source, index = bad.id.rsplit(":", 2)  # a rejected negative's id: its pair key
        reason = bad.reason.removeprefix(f"{REJECT_PREFIX}{source}_")
        rejects[group(sample, source, int(index))][reason] += 1
    order = [f"weaken_t{t}" for t in weaken.noise_steps] + ["inject"]
    stats: dict[str, dict] = {}
    for key in order:
        pairs = made.get(key, [])
        metrics = hallucination_metrics([p.rejected for p in pairs], [scenes[p.id] for p in pairs])
        stats[key] = {
            "negatives": len(pairs),
            "with_hallucination": metrics["chair_s"],
            "chair_i": metrics["chair_i"],
            "partner_share": metrics["partner_share"],
            "partner_chance": metrics["partner_chance"],
            "rejected": dict(sorted(rejects.get(key, {}).items())),
        }
    existence = {}
    for key in order:
        pairs = made.get(f"existence/{key}", [])
        wrong = sum(parse_yes_no(p.rejected) != parse_yes_no(p.chosen) for p in pairs)
        existence[key] = {
            "negatives": len(pairs),
            "wrong_answer": wrong / len(pairs) if pairs else 0.0,
            "rejected": dict(sorted(rejects.get(f"existence/{key}", {}).items())),
        }
    manifest = read_manifest(store)
    stats["inject"]["accepted"] = manifest["counts"]["by_source"].get("inject", 0)
    if any(entry["negatives"] or entry["rejected"] for entry in existence.values()):
        stats["existence"] = existence
    return stats


# --- train ----------------------------------------------------------------------------------


def train_arm(
    cfg: DemoConfig,
    arm: Arm,
    seed: int,
    base: Path,
    pairs: Path,
    data: Datasets,
    out: Path,
    on_step: Callable[[int, dict], None] | None = None,
) -> tuple[Path, list[dict]]:
    """`bpo train` of one arm and seed into OUT/train/{arm}-s{seed}; (its model, its metrics)."""
    name = f"{arm.name}-s{seed}"
    folder = out / "train" / name
    shutil.rmtree(folder, ignore_errors=True)  # the demo's own output, made anew each run
    config = arm_train_config(arm, seed, cfg.training, base, pairs, data.align, folder)
    write_config(out / "configs" / f"train-{name}.yaml", config)
    result = train(config, on_step=on_step, log=lambda _msg: None)
    return folder / "model", result.history


# --- evaluate -------------------------------------------------------------------------------


def eval_config(cfg: DemoConfig, model: Path, data: Datasets, name: str) -> EvalConfig:
    """`bpo eval` of one model on the held-out scenes: CHAIR (with the partner share) and POPE,
    its popular and adversarial questions ranked by the text corpus (the statistics the LM
    learned, as COCO's annotations are for LLaVA)."""
    held_out = str(data.held_out)
    return EvalConfig(
        name=name,
        model=model_config(model),
        generation=GenerateConfig(
            batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens
        ),
        benchmarks=[
            BenchmarkConfig(name="shapeworld_chair", data=held_out),
            BenchmarkConfig(
                name="shapeworld_pope",
                data=held_out,
                prompt_suffix="",  # the world's own question, as the model was aligned on it
                max_new_tokens=6,
                pope_per_image=cfg.pope_per_image,
                seed=cfg.seed,
                pope_rank_scenes=str(data.corpus / "scenes.jsonl"),
            ),
        ],
    )


def metrics_of(results: dict) -> dict[str, float]:
    """The demo's flat metrics from a `bpo eval` results.json: CHAIR's and POPE's per strategy."""
    benchmarks = results["benchmarks"]
    metrics = dict(benchmarks["shapeworld_chair"])
    for strategy, values in benchmarks["shapeworld_pope"].items():
        if strategy != "all":
            metrics.update({f"pope_{strategy}_{m}": values[m] for m in POPE_METRICS})
    return metrics


def evaluate_model(
    cfg: DemoConfig, model: Path, data: Datasets, out: Path, name: str, progress: bool = True
) -> dict:
    """`bpo eval` of one model into OUT/eval/{name} (made anew); its flat metrics."""
    folder = out / "eval" / name
    shutil.rmtree(folder, ignore_errors=True)  # answers of an earlier model at the same path
    config = eval_config(cfg, model, data, name)
    write_config(out / "configs" / f"eval-{name}.yaml", config, out=str(folder))
    return metrics_of(run_eval(config, folder, log=lambda _msg: None, progress=progress))


def _start_worker(threads: int) -> None:
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()


def _evaluate_quietly(cfg: DemoConfig, model: Path, data: Datasets, out: Path, name: str) -> dict:
    return evaluate_model(cfg, model, data, out, name, progress=False)


class Evaluations:
    """`bpo eval` of each model, in a second process when `cfg.eval_in_background` is on.

    Evaluating takes longer than training an arm, and the demo's torch runs on one thread, so on
    two cores the evaluations run beside the training of the next arms. The worker has the same
    thread count as the main process, so its numbers are those an evaluation there would give.
    `submit` returns a future; with the option off, one already done.
    """

    def __init__(self, cfg: DemoConfig, data: Datasets, out: Path):
        self.cfg, self.data, self.out = cfg, data, out
        self.pool = None
        if cfg.eval_in_background:
            self.pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(max(1, cfg.threads),),
            )

    def submit(self, model: Path, name: str) -> Future:
        if self.pool is not None:
            return self.pool.submit(_evaluate_quietly, self.cfg, model, self.data, self.out, name)
        done: Future = Future()
        done.set_result(evaluate_model(self.cfg, model, self.data, self.out, name))
        return done

    def __enter__(self) -> Evaluations:
        return self

    def __exit__(self, *_exc: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


# --- checked up front -----------------------------------------------------------------------


def check_stages(cfg: DemoConfig) -> None:
    """Run each stage's own check on the configs the demo derives, before any work: a setting
    `bpo bootstrap`, `train` or `eval` refuses used to fail after minutes of pretraining.

    The paths are placeholders: the checks read no file, they judge the settings.
    """
    check_world(cfg.world)
    if not 1 <= cfg.negatives.scenes <= cfg.align_scenes:
        raise ValueError(
            f"negatives.scenes is {cfg.negatives.scenes}; bootstrap from 1 to align_scenes "
            f"({cfg.align_scenes}) alignment scenes"
        )
    check_shares(cfg)
    out = Path("OUT")
    data, base = datasets_in(out), out / "base"
    with _from_demo("`bpo bootstrap` config from `negatives:`"):
        check_bootstrap_config(bootstrap_config(cfg, base, data, out / "pairs"))
    with _from_demo("`bpo train` configs from `training:`"):
        for arm in arms_of(cfg.training):
            for seed in arm_seeds(arm, cfg.training):
                check_train_config(
                    arm_train_config(arm, seed, cfg.training, base, out, data.align, out)
                )
    with _from_demo("`bpo eval` configs from pope_per_image, max_new_tokens and eval_batch_size"):
        check_eval_config(eval_config(cfg, base, data, "base"))


def check_shares(cfg: DemoConfig) -> None:
    """Refuse shares outside [0, 1], and question shares of the alignment set above 1."""
    shares = {
        "existence_fraction": cfg.existence_fraction,
        "qa_fraction": cfg.qa_fraction,
        "corpus_qa_fraction": cfg.corpus_qa_fraction,
        "grid_fraction": cfg.grid_fraction,
        "negatives.existence_share": cfg.negatives.existence_share,
    }
    for name, share in shares.items():
        if not 0 <= share <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {share}")
    if cfg.existence_fraction + cfg.qa_fraction > 1:
        raise ValueError(
            f"existence_fraction {cfg.existence_fraction} + qa_fraction {cfg.qa_fraction} is "
            "more than 1; they are shares of the same alignment examples"
        )


@contextmanager
def _from_demo(source: str) -> Iterator[None]:
    """Re-raise a stage's ValueError saying which demo settings its config came from: the stage
    names its own field (`weaken.noise_steps`), which the demo's config calls otherwise."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"{error}; the demo makes its {source}") from error
