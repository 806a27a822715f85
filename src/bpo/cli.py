"""The `bpo` command line: one verb per pipeline stage, each a thin function over the library.

The functions' signatures are the CLI (jsonargparse): type hints and defaults become flags, nested
dataclasses become dotted flags (`--config.lm.steps 400`), and `--config FILE.yaml` reads the same
schema from YAML. `bpo VERB --print_config` prints a complete YAML to start from.

A recipe (configs/llava-1.5-7b-bpo.yaml) holds the configs of the stages side by side, under
`bootstrap:`, `train:` and `eval:`; `bpo bootstrap|refs|train|eval --recipe FILE` reads the verb's
section as its `--config`, and flags after it override it. `bpo iterate --recipe FILE` reads all
three and the `rounds:` section of a rounds recipe (configs/llava-1.5-7b-bpo-rounds.yaml).

Errors: the console script (`run`) prints a mistake in the input (a bad setting, a missing file,
a store made with another config; `is_user_error` says which errors count) as one line,
`bpo VERB: error: MESSAGE`, with exit status 2, as argparse does for a bad command line; a bug
keeps its traceback (exit status 1), and `BPO_DEBUG=1` shows the traceback of every error.
`main` lets every exception through, for Python callers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

from jsonargparse import auto_cli

from bpo.bootstrap.config import BootstrapConfig
from bpo.cli_args import RECIPE_SECTIONS, _compare_args, _recipe_args  # noqa: F401 (tests)
from bpo.demo.config import DemoConfig
from bpo.evaluate.config import EvalConfig
from bpo.rounds.config import IterateConfig
from bpo.shapeworld.world import WorldConfig
from bpo.train.config import TrainConfig


def demo(
    out: Path = Path("runs/demo"),
    run: DemoConfig = DemoConfig(),  # noqa: B008
    full: bool = False,
) -> None:
    """ShapeWorld end to end on a CPU: base model, bootstrapped pairs, SFT vs BPO, measured.

    Builds a world with a strong text prior and its aligned base model, bootstraps BPO's pairs
    from it, trains the SFT and BPO arms (and the ablations) from the base on the same positives
    with the same steps, and evaluates every arm on held-out scenes (CHAIR, recall, POPE).

    Args:
        out: output folder (results.json, report, models, answers, pairs, cached pretraining).
        run: the run's configuration (seeds, world, model sizes, stages, arms).
        full: also the world seeds of run.full_world_seeds (a world and base model each), every
            seed for the ablation arms, and a noise-step sweep (run.full_noise_steps); slow.
    """
    from bpo.demo.claim import ablation_sentence, beyond_sentence, claim_sentence
    from bpo.demo.run import run_demo
    from bpo.utils.console import console, print_metrics_table, print_negatives_table

    started = time.time()
    if full:
        run = replace(run, full_run=True)
    results = run_demo(run, Path(out), log=console.log)
    print_metrics_table(results["arms"])
    if run.full_run:  # negatives per world
        for world, negatives in results["negatives"].items():
            console.print(world)
            print_negatives_table(negatives)
    else:
        print_negatives_table(results["negatives"])
    for name, checks in results["checks"].items():
        verdict = (
            "reproduced"
            if all(v for k, v in checks.items() if k != "partner_ratio")
            else "NOT reproduced"
        )
        console.print(f"prior-driven hallucination ({name}) {verdict}: {checks}")
    console.print(claim_sentence(results["claim"]))
    if results.get("ablation"):
        console.print("Ablation: " + ablation_sentence(results["ablation"]))
    if results.get("beyond"):
        console.print("Beyond the paper: " + beyond_sentence(results["beyond"]))
    console.print(f"wrote {Path(out) / 'results.json'} in {time.time() - started:.0f}s")


def shapeworld(
    out: Path = Path("runs/shapeworld"),
    scenes: int = 1000,
    seed: int = 0,
    questions: bool = True,
    existence_share: float = 0.0,
    world: WorldConfig = WorldConfig(),  # noqa: B008
) -> None:
    """Write ShapeWorld scenes as a LLaVA-format dataset (data.json, images/, scenes.jsonl).

    Args:
        out: output folder.
        scenes: number of scenes.
        seed: sampling seed.
        questions: add the scenes' questions as further conversation turns.
        existence_share: share of records that are one existence question ("Is there a ring in
            the image?", a present or an absent shape) instead of a caption.
        world: shapes, grid, faintness and noise of the scenes.
    """
    import numpy as np

    from bpo.shapeworld.export import write_llava_dataset
    from bpo.shapeworld.world import check_world, sample_scene

    check_world(world)
    if scenes < 1:  # 0 or fewer wrote an empty dataset that every later stage read as valid
        raise ValueError(f"--scenes is {scenes}; write at least 1 scene")
    if not 0 <= existence_share <= 1:
        raise ValueError(f"--existence_share is {existence_share}; give a share in [0, 1]")
    rng = np.random.default_rng(seed)
    sampled = [sample_scene(rng, world) for _ in range(scenes)]
    path = write_llava_dataset(
        sampled, world, out, seed=seed, with_questions=questions, existence_share=existence_share
    )
    print(json.dumps({"data": str(path), "scenes": scenes}))


def evaluate(run: EvalConfig, out: Path = Path("runs/eval")) -> None:
    """Answer and score the benchmarks of a config: CHAIR, POPE, MM-Vet, LLaVA-Bench, ShapeWorld.

    Writes per-benchmark answers and judgments (JSONL), results.json and results.md under OUT.
    Rerunning into the same OUT reuses the answers and the judge's replies already there.

    Args:
        run: the model (or answer files), benchmarks, generation settings and judge; usually
            `bpo eval --config configs/eval/FILE.yaml`.
        out: output folder.
    """
    from bpo.evaluate.run import run_eval
    from bpo.utils.console import console

    results = run_eval(run, Path(out), log=console.log)
    print((Path(out) / "results.md").read_text(), end="")
    console.print(f"wrote {Path(out) / 'results.json'} in {results['seconds']:.0f}s")


def compare(runs: list[Path]) -> None:
    """Print the results of several `bpo eval` runs side by side (a markdown table).

    Args:
        runs: output folders of `bpo eval` (or their results.json files).
    """
    from bpo.evaluate.run import compare_runs

    print(compare_runs(runs), end="")


def export(
    pairs: Path,
    out: Path,
    image_root: Path | None = None,
    format: Literal["trl"] = "trl",
    allow_incomplete: bool = False,
) -> None:
    """Write a pair store in another trainer's format (TRL: prompt/chosen/rejected/images).

    Only images under the image root that decode are exported; a pair whose image is not is
    left out, counted in the printed `bad_pairs`/`bad_reasons` (the first 20 named on stderr).

    Args:
        pairs: the pair store (a `bpo bootstrap` output folder).
        out: where to save the dataset (`datasets.load_from_disk(out)` reads it).
        image_root: the folder the pairs' image paths are relative to (default: the one the
            store's manifest records).
        format: the target format.
        allow_incomplete: export a store whose bootstrap did not finish (manifest complete: false).
    """
    from bpo.data.export import export_trl
    from bpo.utils.console import console

    summary = export_trl(pairs, out, image_root, allow_incomplete, log=console.log)
    print(json.dumps({"format": format, **summary, "out": str(out)}))


def view(
    pairs: Path,
    out: Path | None = None,
    image_root: Path | None = None,
    limit: int = 500,
    allow_incomplete: bool = False,
):
    """Write a static HTML page showing pairs side by side (image, prompt, chosen, rejected).

    Args:
        pairs: the pair store.
        out: the HTML file (default PAIRS/pairs.html).
        image_root: the folder the pairs' image paths are relative to (images are embedded;
            default: the one the store's manifest records).
        limit: how many pairs to show (at least 1).
        allow_incomplete: show a store whose bootstrap did not finish (manifest complete: false).
    """
    from bpo.report.viewer import write_pair_viewer
    from bpo.utils.console import console

    path = write_pair_viewer(
        pairs,
        out or Path(pairs) / "pairs.html",
        image_root,
        limit,
        allow_incomplete,
        log=console.log,
    )
    print(json.dumps({"html": str(path)}))


def bootstrap(
    run: BootstrapConfig,
    out: Path | None = None,
    num_shards: int | None = None,
    shard_index: int | None = None,
    overwrite: bool = False,
) -> None:
    """Make preference pairs (image-weakened and error-injected negatives) into a pair store.

    Rerunning the same command resumes where a crash or kill stopped. Run shard i of N on each
    machine with --num_shards N --shard_index i, then `bpo merge OUT SHARD_DIR...`.

    Args:
        run: model, data, methods and their parameters; usually `--config configs/bootstrap/X.yaml`.
        out: output folder (overrides run.out).
        num_shards: split the data into this many disjoint shards (overrides run.num_shards).
        shard_index: which shard this run makes, 0-based (overrides run.shard_index).
        overwrite: replace an existing store in the output folder instead of resuming it.
    """
    from dataclasses import replace

    from bpo.bootstrap.run import run_bootstrap
    from bpo.utils.console import console

    overrides = {"out": out and str(out), "num_shards": num_shards, "shard_index": shard_index}
    run = replace(run, **{k: v for k, v in overrides.items() if v is not None})
    started = time.time()
    manifest = run_bootstrap(run, overwrite=overwrite, log=console.log)
    print(json.dumps({"out": run.out, "counts": manifest["counts"]}))
    console.print(f"wrote {run.out} in {time.time() - started:.0f}s")


def merge(
    out: Path, shards: list[Path], overwrite: bool = False, allow_incomplete: bool = False
) -> None:
    """Merge the stores of a sharded `bpo bootstrap` run into one (configs must match).

    Args:
        out: the merged store's folder.
        shards: the shard stores' folders.
        overwrite: replace an existing store in OUT.
        allow_incomplete: merge shards whose run did not finish, or an incomplete set of shards.
    """
    from bpo.bootstrap.run import merge_bootstrap_stores

    manifest = merge_bootstrap_stores(
        shards, out, overwrite=overwrite, allow_incomplete=allow_incomplete
    )
    print(json.dumps({"out": str(out), "counts": manifest["counts"]}))


def train(
    run: TrainConfig,
    out: Path | None = None,
    method: Literal["dpo", "sft"] | None = None,
    resume: bool = False,
) -> None:
    """Train on a pair store with DPO (BPO), or the SFT baseline; LoRA, QLoRA or full weights.

    Writes OUT/metrics.jsonl, checkpoints under OUT/checkpoints (every run.save_steps) and the
    model in Hugging Face format under OUT/model. Multi-GPU: `accelerate launch -m bpo.cli train`.

    Args:
        run: model, pairs, method, LoRA, loss and optimization; usually
            `--config configs/train/X.yaml`.
        out: output folder (overrides run.out).
        method: dpo or sft (overrides run.method): the paper's baseline trains the same model on
            the same pairs with the NLL of the chosen answers only.
        resume: continue from the newest checkpoint in OUT, exactly where it stopped.
    """
    from dataclasses import replace

    from bpo.train.run import train as run_training
    from bpo.utils.console import console

    overrides = {"out": out and str(out), "method": method}
    run = replace(run, **{k: v for k, v in overrides.items() if v is not None})
    started = time.time()
    result = run_training(run, resume=resume, log=console.log)
    if os.environ.get("RANK", "0") != "0":
        return  # under `accelerate launch`/torchrun every process gets here; one reports
    print(json.dumps({"out": run.out, **{k: v for k, v in result.summary.items() if k != "final"}}))
    console.print(f"trained {result.summary['steps']} steps in {time.time() - started:.0f}s")


def refs(run: TrainConfig, recompute: bool = False) -> None:
    """Compute the reference log-probs a `bpo train` config needs, cached in its pair store.

    The reference is the config's starting model, scored as training will score it (same dtype
    and max_length), so `bpo train` with the same config reuses every entry.

    Args:
        run: the training config (model, pairs, image_root, max_length, reference_batch_size).
        recompute: discard the stored entries for this model and settings, compute all anew.
    """
    from bpo.models.load import resolve_device
    from bpo.train.config import check_config
    from bpo.train.model import load_for_training
    from bpo.train.refs import config_reference_logps
    from bpo.utils.console import console

    check_config(run)  # the settings `bpo train` will refuse, refused before the model loads
    if run.pairs is None or run.image_root is None:
        raise ValueError("bpo refs needs run.pairs (a pair store) and run.image_root")
    model, processor = load_for_training(run, resolve_device(run.model.device))
    table = config_reference_logps(run, model, processor, recompute=recompute)
    for key, message in list(table.bad.items())[:20]:
        console.log(f"no reference for {key}: {message}")
    if table.bad and not table.pairs:
        first = "; ".join(list(table.bad.values())[:3])
        raise ValueError(
            f"no pair could be scored ({len(table.bad)} unusable), e.g. {first}; fix the pairs or "
            "the settings the reasons name (model, max_length, image_root) and rerun"
        )
    counts = {k: getattr(table, k) for k in ("reused", "computed", "stale", "truncated")}
    print(
        json.dumps(
            {"refs": str(table.path), "pairs": len(table.pairs), "bad": len(table.bad), **counts}
        )
    )


def iterate(run: IterateConfig, out: Path | None = None) -> None:
    """On-policy BPO rounds: each round bootstraps from the last policy, trains, evaluates.

    Round k writes OUT/round-k/{pairs,train,eval,round.json}; OUT/rounds.json lists every
    round's metrics and the best round by run.rounds.select_metric. Rerunning the same command
    resumes (finished rounds are skipped; each stage resumes as its own verb does).
    docs/rounds.md describes the layout and the LoRA merge between rounds.

    Args:
        run: the bootstrap, train and eval sections and the rounds' settings; usually
            `--recipe configs/llava-1.5-7b-bpo-rounds.yaml`.
        out: output folder (overrides run.out).
    """
    from bpo.rounds.run import run_rounds
    from bpo.utils.console import console

    if out is not None:
        run = replace(run, out=str(out))
    started = time.time()
    summary = run_rounds(run, log=console.log)
    print(json.dumps({"out": run.out, "best": summary["best"]}))
    console.print(f"ran {run.rounds.rounds} rounds in {time.time() - started:.0f}s")


def _verbs() -> dict:
    return {
        "demo": demo,
        "shapeworld": shapeworld,
        "eval": evaluate,
        "compare": compare,
        "bootstrap": bootstrap,
        "merge": merge,
        "refs": refs,
        "train": train,
        "iterate": iterate,
        "export": export,
        "view": view,
    }


def main(argv: list[str] | None = None, exit_on_error: bool = True) -> None:
    """Run one verb; every error propagates (Python callers, tests). The console script is `run`.

    exit_on_error: False makes a command-line mistake (unknown flag, a bad value's type, a
        missing `--config` file) raise argparse.ArgumentError instead of printing the usage.
    """
    auto_cli(
        _verbs(),
        args=_compare_args(_recipe_args(list(argv if argv is not None else sys.argv[1:]))),
        description="bpo: Bootstrapped Preference Optimization for multimodal LLMs. "
        "A mistake in the input is printed as one line (exit status 2); BPO_DEBUG=1 shows its "
        "traceback.",
        exit_on_error=exit_on_error,
    )


def run(argv: list[str] | None = None) -> None:
    """The `bpo` console script: `main`, with a user's error as one line on stderr (exit 2).

    Bugs (see `is_user_error`) keep their traceback (exit 1), and BPO_DEBUG=1 keeps it for all.
    """
    args = list(argv if argv is not None else sys.argv[1:])
    if os.environ.get("BPO_DEBUG", "") not in ("", "0"):
        main(args)
        return
    from argparse import ArgumentError

    try:
        main(args, exit_on_error=False)
    except Exception as error:
        if not (isinstance(error, ArgumentError) or is_user_error(error)):
            raise
        verb = next((a for a in args if a in _verbs()), None)
        prog = f"bpo {verb}" if verb else "bpo"
        # jsonargparse indents the details of a type error on further lines: one line here.
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"{prog}: error: {message or type(error).__name__}", file=sys.stderr)
        raise SystemExit(2) from None


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is the user's to fix (printed as one line) rather than a bug (a traceback).

    - An exception type bpo defines (StoreError, ConfigMismatchError, DirectoryBusyError,
      EncodeError, UnsupportedModelError, EndpointError, VllmUnavailableError, ...): each is
      raised with a message that names the record, the file or the fix.
    - An OSError: a missing or unreadable file, a full disk, a refused connection; the state of
      the machine, whichever library noticed it.
    - A ValueError that a `raise` statement in bpo's own code raised: the config checks. Not any
      ValueError: numpy, torch and transformers raise it for shapes and arguments a caller got
      wrong, and Python for `a, b = x` or `int("x")` in our code; those are bugs' symptoms.
    """
    if type(error).__module__.split(".")[0] == "bpo" or isinstance(error, OSError):
        return True
    return isinstance(error, ValueError) and _raised_by_bpo(error)


def _raised_by_bpo(error: BaseException) -> bool:
    """Whether the innermost frame of the traceback is a `raise` statement in a bpo module."""
    import linecache

    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame
    if frame.f_globals.get("__name__", "").split(".")[0] != "bpo":
        return False
    return linecache.getline(frame.f_code.co_filename, tb.tb_lineno).lstrip().startswith("raise")


if __name__ == "__main__":
    run()
