"""The demo report's content: its tables, the claim as measured, and the held-out examples.

Everything here reads a finished run: results.json, and the files the product's stages wrote
under each world's folder (the held-out dataset, `bpo eval`'s answers, `bpo train`'s logs).
A hallucinated object is a shape an answer mentions that its scene's gold caption does not: the
gold caption names every object of the scene, so this is CHAIR's exact ground truth.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpo.data.files import read_json_lines
from bpo.data.vocab import word_tokens
from bpo.demo.claim import ablation_sentence, beyond_sentence, claim_sentence
from bpo.demo.intervals import interval_of, mean_of
from bpo.shapeworld.export import read_scenes
from bpo.shapeworld.world import SHAPES, caption, shape_vocabulary

# (results key, column title) of the main table; the POPE table has every strategy.
MAIN_METRICS = (
    ("chair_i", "CHAIR_i"),
    ("chair_s", "CHAIR_s"),
    ("recall", "recall"),
    ("partner_share", "partner share"),
    ("partner_chance", "partner chance"),
)
# Answer quality, in the tables when the judgments carry it (bpo.demo.intervals).
QUALITY_METRICS = (
    ("well_formed", "well-formed"),
    ("repetition", "repetition"),
    ("length_ratio", "length ratio"),
)
POPE_STRATEGIES = ("random", "popular", "adversarial")
POPE_METRICS = (("accuracy", "acc"), ("f1", "F1"), ("yes_ratio", "yes"))
NEGATIVE_COLUMNS = (
    ("negatives", "negatives"),
    ("with_hallucination", "with an absent shape"),
    ("chair_i", "CHAIR_i"),
    ("partner_share", "partner share"),
    ("partner_chance", "partner chance"),
)
EXAMPLE_ARMS = ("base", "sft", "bpo")  # the qualitative columns, those the run has
Table = tuple[list[str], list[list[str]]]


# --- numbers and tables -------------------------------------------------------------------------


def mean_ci(summary: dict[str, Any], key: str, digits: int = 4) -> str:
    """'mean [lo, hi]' of one metric of an arm's summary (its 95% interval); 'mean ± sd' for a
    summary without intervals, the mean alone for one without either."""
    mean = mean_of(summary, key)
    if mean is None:
        return "—"
    text = f"{mean:.{digits}f}"
    interval = interval_of(summary, key)
    if interval is not None:
        return f"{text} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    sd = summary.get("std", {}).get(key)
    return text if sd is None else f"{text} ± {sd:.{digits}f}"


def interval_note(results: dict) -> str:
    """One sentence on how the intervals were computed (each distinct method of the arms)."""
    intervals = [s["intervals"] for s in results["arms"].values() if s.get("intervals")]
    # The arms' two-level method first, then the single run's (the base's).
    intervals.sort(key=lambda i: i["runs"] == 1)
    methods = list(dict.fromkeys(i["method"] for i in intervals))
    if not methods:
        return "No intervals: results.json holds no per-scene statistics; mean ± sd over runs."
    return "In brackets, 95% intervals (2.5th-97.5th percentiles) of " + "; or ".join(methods) + "."


def run_label(run: dict[str, Any]) -> str:
    """Which run a per-seed entry is: 'world 1, seed 2', 'seed 0', or '—' (the base model)."""
    parts = []
    if run.get("world") is not None:
        parts.append(f"world {run['world']}")
    if run.get("seed") is not None:
        parts.append(f"seed {run['seed']}")
    return ", ".join(parts) or "—"


def quality_metrics(results: dict) -> list[tuple[str, str]]:
    """The answer-quality metrics some arm has."""
    arms = results["arms"].values()
    return [(k, t) for k, t in QUALITY_METRICS if any(mean_of(s, k) is not None for s in arms)]


def results_table(results: dict) -> Table:
    """(header, rows): per arm the number of runs and mean [95% interval] of the main metrics
    (and the answer-quality ones the judgments carry)."""
    metrics = [*MAIN_METRICS, *quality_metrics(results)]
    header = ["arm", "runs"] + [title for _, title in metrics]
    rows = [
        [arm, str(len(s.get("per_seed", [])) or 1)] + [mean_ci(s, key) for key, _ in metrics]
        for arm, s in results["arms"].items()
    ]
    return header, rows


def pope_table(results: dict) -> Table:
    """(header, rows): per arm mean [95% interval] of POPE's accuracy, F1 and yes ratio per
    strategy (split)."""
    keys = [(f"pope_{s}_{m}", f"{s} {t}") for s in POPE_STRATEGIES for m, t in POPE_METRICS]
    header = ["arm"] + [title for _, title in keys]
    rows = [[arm] + [mean_ci(s, key, 3) for key, _ in keys] for arm, s in results["arms"].items()]
    return header, rows


def runs_table(results: dict) -> Table:
    """(header, rows): every run of every arm with its main metrics (and the answer-quality
    ones its results carry)."""
    runs = [run for s in results["arms"].values() for run in s.get("per_seed", [])]
    quality = [(k, t) for k, t in QUALITY_METRICS if any(k in run for run in runs)]
    metrics = [*MAIN_METRICS, *quality]
    header = ["arm", "run"] + [title for _, title in metrics]
    rows = []
    for arm, summary in results["arms"].items():
        for run in summary.get("per_seed", []):
            values = [f"{run[k]:.4f}" if k in run else "—" for k, _ in metrics]
            rows.append([arm, run_label(run), *values])
    return header, rows


def _by_world(results: dict, key: str) -> list[tuple[str, str, str, dict]]:
    """(world, source, noise step, stats) of every entry of results.json's `key`: a one-world
    run keys its stats by source ('weaken_t900', 'inject'); a full run nests them under
    'world{seed}'."""
    found = results.get(key, {})
    nested = bool(found) and all(k.startswith("world") for k in found)
    worlds = found.items() if nested else [("", found)]
    entries = []
    for world, by_source in worlds:
        for name, stats in by_source.items():
            source, _, step = name.partition("_t")
            entries.append((world, source, step or "—", stats))
    return entries


def negative_sources(results: dict) -> list[tuple[str, str, str, dict]]:
    """(world, source, noise step, stats) of every caption-negatives entry of results.json."""
    return _by_world(results, "negatives")


def negatives_table(results: dict) -> Table:
    entries = negative_sources(results)
    with_world = any(world for world, *_ in entries)
    header = (["world"] if with_world else []) + ["source", "noise step"]
    header += [title for _, title in NEGATIVE_COLUMNS]
    rows = []
    for world, source, step, stats in entries:
        cells = ([world] if with_world else []) + [source, step]
        for key, _ in NEGATIVE_COLUMNS:
            value = stats.get(key)
            cells.append(
                "—" if value is None else str(value) if key == "negatives" else f"{value:.3f}"
            )
        rows.append(cells)
    return header, rows


def existence_table(results: dict) -> Table:
    """The existence-question negatives per source and noise step: how many, and the share that
    gives the opposite answer to the gold's (a full run: per world)."""
    entries = _by_world(results, "existence_negatives")
    with_world = any(world for world, *_ in entries)
    header = (["world"] if with_world else []) + [
        "source",
        "noise step",
        "negatives",
        "wrong answer",
    ]
    rows = [
        ([world] if with_world else [])
        + [source, step, str(stats["negatives"]), f"{stats['wrong_answer']:.3f}"]
        for world, source, step, stats in entries
    ]
    return header, rows


def claim_text(results: dict) -> tuple[str, str]:
    """(css class, text): BPO against SFT on CHAIR_i (mean [95% interval]), then the claim's
    verdict."""
    arms = results["arms"]
    parts = []
    if "bpo" in arms and "sft" in arms:
        verb = "beat" if arms["bpo"]["chair_i"] < arms["sft"]["chair_i"] else "did not beat"
        runs = len(arms["bpo"].get("per_seed", [])) or 1
        spread = "[95% interval]" if interval_of(arms["bpo"], "chair_i") else "± sd"
        parts.append(
            f"As measured, BPO {verb} SFT on CHAIR_i: {mean_ci(arms['bpo'], 'chair_i')} against "
            f"{mean_ci(arms['sft'], 'chair_i')} (mean {spread} over {runs} run(s); lower is "
            "better)."
        )
        if "base" in arms:
            parts.append(f"The base model: {mean_ci(arms['base'], 'chair_i')}.")
    claim = results.get("claim") or {"holds": None, "reason": "no claim in results.json"}
    parts.append(claim_sentence(claim))
    if results.get("ablation"):
        parts.append("Ablation: " + ablation_sentence(results["ablation"]))
    if results.get("beyond"):
        parts.append("Beyond the paper: " + beyond_sentence(results["beyond"]))
    css = {True: "holds", False: "fails", None: "unknown"}[claim.get("holds")]
    return css, " ".join(parts)


# --- answers, hallucinated objects, scenes ------------------------------------------------------


def mark_hallucinations(
    answer: str, truth: str, shapes: Sequence[str] = SHAPES
) -> list[tuple[str, str | None]]:
    """The answer cut into (text, kind) pieces: kind 'hallucinated' for a shape the gold caption
    `truth` does not name, 'object' for one it names, None for other text.

    Words are read as CHAIR reads them (`word_tokens`, singularized, looked up in the ShapeWorld
    vocabulary, which has no two-word phrases), so the pieces marked are exactly the mentions
    `chair_scores` counts; each token is found in the answer after the previous one.
    """
    vocabulary = shape_vocabulary(tuple(shapes))
    present = {category for _, category in vocabulary.mentions(truth)}
    pieces: list[tuple[str, str | None]] = []
    last = cursor = 0
    lowered = answer.lower()
    for token in word_tokens(lowered):
        start = lowered.find(token, cursor)
        if start < 0:  # a token the tokenizer respelled (quotes): no object word
            continue
        cursor = start + len(token)
        category = vocabulary.synonyms.get(vocabulary.singular(token))
        if category is None:
            continue
        if start > last:
            pieces.append((answer[last:start], None))
        pieces.append((answer[start:cursor], "object" if category in present else "hallucinated"))
        last = cursor
    if last < len(answer):
        pieces.append((answer[last:], None))
    return pieces


def run_folders(out: Path, results: dict) -> list[tuple[Any, Path]]:
    """(world seed or None, folder) of each world: OUT itself, or OUT/world{seed} in a full run."""
    if results.get("world_seeds"):
        return [(w, out / f"world{w}") for w in results["world_seeds"]]
    return [(None, out)]


def answers_of(folder: Path, label: str) -> dict[str, str] | None:
    """{scene id: caption} of one evaluated model ('base', 'bpo-s0'), from `bpo eval`'s answers."""
    path = folder / "eval" / label / "shapeworld_chair" / "answers.jsonl"
    if not path.is_file():
        return None
    return {str(r["question_id"]): r["answer"] for _, r in read_json_lines(path, appended=True)}


@dataclass
class Example:
    """One held-out scene: its gold caption, image (PNG bytes or None) and each column's answer."""

    id: str
    truth: str
    png: bytes | None
    answers: dict[str, str]  # column label -> answer


def example_columns(folder: Path, results: dict, world: Any) -> dict[str, dict[str, str]]:
    """{column label: answers} of the base, SFT and BPO models (each arm's first seed)."""
    columns = {}
    for arm in EXAMPLE_ARMS:
        summary = results["arms"].get(arm)
        if summary is None:
            continue
        runs = [r for r in summary.get("per_seed", [{}]) if r.get("world") == world] or [{}]
        seed = runs[0].get("seed")
        label = arm if seed is None else f"{arm}-s{seed}"
        answers = answers_of(folder, label)
        if answers is not None:
            columns[arm if seed is None else f"{arm} (seed {seed})"] = answers
    return columns


def pick_examples(
    folder: Path, results: dict, world: Any, count: int, shapes: Sequence[str]
) -> tuple[list[Example], str]:
    """The first `count` held-out scenes where some shown answer hallucinates (then the rest, in
    order, if too few); and a note on how they were chosen or why images are missing."""
    columns = example_columns(folder, results, world)
    held_out = folder / "data" / "held-out"
    if not columns:
        return [], "no answer files found"
    if not (held_out / "scenes.jsonl").is_file():
        return [], f"no held-out scenes at {held_out}"
    records = [r for _, r in read_json_lines(held_out / "scenes.jsonl", appended=False)]
    scenes = read_scenes(held_out / "scenes.jsonl")
    ids = [r["id"] for r in records]
    if any(set(answers) != set(ids) for answers in columns.values()):
        return [], "Not shown: the answer files do not match the held-out scenes."
    truths = [caption(scene) for scene in scenes]

    def hallucinates(k: int) -> bool:
        return any(
            kind == "hallucinated"
            for answers in columns.values()
            for _, kind in mark_hallucinations(answers[ids[k]], truths[k], shapes)
        )

    flagged = [k for k in range(len(ids)) if hallucinates(k)]
    chosen = (flagged + sorted(set(range(len(ids))) - set(flagged)))[:count]
    shown = min(count, len(flagged))
    if shown == 0:
        note = f"None of these models names an absent shape here; the first {len(chosen)} scenes."
    else:
        note = (
            f"The first {shown} held-out scenes (of {len(ids)}) where at least one of these "
            "models names an absent shape"
            + (", then the first others." if shown < len(chosen) else ".")
        )
    examples = []
    for k in chosen:
        image = held_out / records[k]["image"]
        png = image.read_bytes() if image.is_file() else None
        answers = {label: answers[ids[k]] for label, answers in columns.items()}
        examples.append(Example(ids[k], truths[k], png, answers))
    return examples, note


def train_logs(folder: Path) -> dict[str, list[dict]]:
    """{'arm-s{seed}': metric lines} from each `bpo train` run under folder/train."""
    logs = {}
    for path in sorted((folder / "train").glob("*/metrics.jsonl")):
        logs[path.parent.name] = [line for _, line in read_json_lines(path, appended=True)]
    return logs


def arm_of_log(name: str) -> str:
    """'bpo_weaken-s2' -> 'bpo_weaken'."""
    return re.sub(r"-s\d+$", "", name)
