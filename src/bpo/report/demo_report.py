"""The demo's report: OUT/report.html (one self-contained page) and OUT/report.md (its tables).

The page needs nothing but itself: CSS inline, plots as inline SVG drawn here (no plotting
dependency, and their numbers stay readable in the markup), scene images as PNG data URIs, no
script. It shows the results table (mean ± sample sd per arm over its runs, and every run), the
claim as measured, CHAIR_i per arm with a point per run, `rewards/margins` and
`rewards/accuracies` over the training steps, how often the negatives of each source and noise
step name an absent shape, held-out scenes answered by base, SFT and BPO side by side with every
hallucinated object marked, and a link to the pair viewer (written next to it).

Every piece of text from the run (answers, arm names, config values) goes through `html.escape`
on the page and `_md` in the markdown: answers are model output and must never become markup.

A hallucinated object is a shape an answer mentions that its scene's gold caption does not: the
gold caption names every object of the scene, so this is CHAIR's exact ground truth.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bpo.report.viewer import write_pair_viewer
from bpo.shapeworld.world import SHAPES, Scene, WorldConfig, caption, render, shape_vocabulary

# (results key, column title) of the main table; the POPE table has every strategy.
MAIN_METRICS = (
    ("chair_i", "CHAIR_i"),
    ("chair_s", "CHAIR_s"),
    ("recall", "recall"),
    ("partner_share", "partner share"),
    ("partner_chance", "partner chance"),
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
ARM_COLOURS = {
    "base": "#7f7f7f",
    "sft": "#1f77b4",
    "bpo": "#d62728",
    "bpo_weaken": "#ff7f0e",
    "bpo_inject": "#9467bd",
}
OTHER_COLOURS = ("#2ca02c", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#637939")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1150px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; font-weight: 600; }
.claim { padding: 0.7em 1em; border-radius: 6px; font-size: 1.05em; }
.holds { background: #e8f5e9; border: 1px solid #66bb6a; }
.fails { background: #ffebee; border: 1px solid #ef5350; }
.unknown { background: #fff8e1; border: 1px solid #ffca28; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figcaption { font-size: 0.85em; color: #555; max-width: 560px; }
.example { display: flex; gap: 1em; align-items: flex-start; border: 1px solid #ddd;
           border-radius: 6px; padding: 0.6em; margin-bottom: 0.7em; }
.example img { width: 128px; height: 128px; image-rendering: pixelated; flex: none; }
.answers { display: flex; gap: 0.8em; flex: 1; }
.answer { flex: 1; background: #fafafa; border-radius: 4px; padding: 0.4em; white-space: pre-wrap; }
.answer b { display: block; }
mark.hal { background: #ffcdd2; color: #b71c1c; font-weight: 600; text-decoration: line-through; }
span.obj { background: #c8e6c9; }
.meta { color: #555; font-size: 0.85em; } .warn { color: #b71c1c; }
"""


# ---------------------------------------------------------------------------------------------
# numbers and tables


def mean_sd(summary: dict[str, Any], key: str, digits: int = 4) -> str:
    """'mean ± sd' of one metric of an arm's summary; the mean alone when it had a single run."""
    if key not in summary:
        return "—"
    sd = summary.get("std", {}).get(key)
    text = f"{summary[key]:.{digits}f}"
    return text if sd is None else f"{text} ± {sd:.{digits}f}"


def run_label(run: dict[str, Any]) -> str:
    """Which run a per-seed entry is: 'world 1, seed 2', 'seed 0', or '—' (the base model)."""
    parts = []
    if run.get("world") is not None:
        parts.append(f"world {run['world']}")
    if run.get("seed") is not None:
        parts.append(f"seed {run['seed']}")
    return ", ".join(parts) or "—"


def results_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per arm the number of runs and mean ± sd of the main metrics."""
    header = ["arm", "runs"] + [title for _, title in MAIN_METRICS]
    rows = [
        [arm, str(len(s.get("per_seed", [])) or 1)] + [mean_sd(s, key) for key, _ in MAIN_METRICS]
        for arm, s in results["arms"].items()
    ]
    return header, rows


def pope_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per arm mean ± sd of POPE's accuracy, F1 and yes ratio per strategy."""
    keys = [(f"pope_{s}_{m}", f"{s} {t}") for s in POPE_STRATEGIES for m, t in POPE_METRICS]
    header = ["arm"] + [title for _, title in keys]
    rows = [[arm] + [mean_sd(s, key, 3) for key, _ in keys] for arm, s in results["arms"].items()]
    return header, rows


def runs_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): every run of every arm with its main metrics."""
    header = ["arm", "run"] + [title for _, title in MAIN_METRICS]
    rows = []
    for arm, summary in results["arms"].items():
        for run in summary.get("per_seed", []):
            values = [f"{run[k]:.4f}" if k in run else "—" for k, _ in MAIN_METRICS]
            rows.append([arm, run_label(run), *values])
    return header, rows


def negative_sources(results: dict) -> list[tuple[str, str, str, dict]]:
    """(world, source, noise step, stats) of every negatives entry of results.json.

    A one-world run keys its stats by source ('weaken_t900', 'inject'); a full run nests them
    under 'world{seed}'.
    """
    entries = []
    negatives = results.get("negatives", {})
    nested = bool(negatives) and all(
        isinstance(v, dict) and all(isinstance(x, dict) for x in v.values())
        for v in negatives.values()
    )
    worlds = negatives.items() if nested else [("", negatives)]
    for world, by_source in worlds:
        for key, stats in by_source.items():
            source, _, step = key.partition("_t")
            entries.append((world, source, step if step else "—", stats))
    return entries


def negatives_table(results: dict) -> tuple[list[str], list[list[str]]]:
    entries = negative_sources(results)
    with_world = any(world for world, *_ in entries)
    header = (["world"] if with_world else []) + ["source", "noise step"]
    header += [title for _, title in NEGATIVE_COLUMNS]
    rows = []
    for world, source, step, stats in entries:
        cells = [world] if with_world else []
        cells += [source, step]
        for key, _ in NEGATIVE_COLUMNS:
            value = stats.get(key)
            cells.append(
                "—" if value is None else str(value) if key == "negatives" else f"{value:.3f}"
            )
        rows.append(cells)
    return header, rows


def claim_sentence(results: dict) -> tuple[str, str]:
    """(css class, sentence): whether BPO beat SFT on CHAIR_i, and the claim's verdict if any."""
    arms = results["arms"]
    parts = []
    if "bpo" in arms and "sft" in arms:
        bpo, sft = arms["bpo"]["chair_i"], arms["sft"]["chair_i"]
        verb = "beat" if bpo < sft else "did not beat"
        runs = len(arms["bpo"].get("per_seed", [])) or 1
        parts.append(
            f"As measured, BPO {verb} SFT on CHAIR_i: {mean_sd(arms['bpo'], 'chair_i')} against "
            f"{mean_sd(arms['sft'], 'chair_i')} (mean ± sd over {runs} run(s); lower is better)."
        )
        if "base" in arms:
            parts.append(f"The base model: {mean_sd(arms['base'], 'chair_i')}.")
    claim = results.get("claim")
    if claim is None:
        return "unknown", " ".join(parts) or "The run has no bpo and sft arms to compare."
    holds = claim.get("holds")
    if holds is None:
        parts.append(f"The claim was not tested: {claim.get('reason', 'no reason given')}.")
        return "unknown", " ".join(parts)
    failed = [name for name, ok in claim.get("checks", {}).items() if not ok]
    if holds:
        parts.append("The claim holds: every check passed (" + ", ".join(claim["checks"]) + ").")
    else:
        parts.append("The claim does not hold: failed " + ", ".join(failed) + ".")
    return ("holds" if holds else "fails"), " ".join(parts)


# ---------------------------------------------------------------------------------------------
# answers, hallucinated objects, scenes


def mark_hallucinations(
    answer: str, truth: str, shapes: Sequence[str] = SHAPES
) -> list[tuple[str, str | None]]:
    """The answer cut into (text, kind) pieces: kind 'hallucinated' for a shape the gold caption
    `truth` does not name, 'object' for one it names, None for other text.

    Words are read as CHAIR reads them (letter runs, singularized, looked up in the ShapeWorld
    vocabulary, which has no two-word phrases), so the pieces marked are exactly the mentions
    `chair_scores` counts.
    """
    vocabulary = shape_vocabulary(tuple(shapes))
    present = {category for _, category in vocabulary.mentions(truth)}
    pieces: list[tuple[str, str | None]] = []
    last = 0
    for match in re.finditer(r"[A-Za-z]+", answer):
        category = vocabulary.synonyms.get(vocabulary.singular(match.group().lower()))
        if category is None:
            continue
        if match.start() > last:
            pieces.append((answer[last : match.start()], None))
        pieces.append((match.group(), "object" if category in present else "hallucinated"))
        last = match.end()
    if last < len(answer):
        pieces.append((answer[last:], None))
    return pieces


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def answers_path(folder: Path, arm: str, seed: int | None) -> Path:
    """Where the demo wrote an arm's held-out answers (the base model has no seed)."""
    if arm == "base" or seed is None:
        return folder / f"answers-{arm}.jsonl"
    return folder / f"answers-{arm}-s{seed}.jsonl"


def run_folders(out: Path, results: dict) -> list[tuple[Any, Path]]:
    """(world seed or None, folder) of each world: OUT itself, or OUT/world{seed} in a full run."""
    if results.get("world_seeds"):
        return [(w, out / f"world{w}") for w in results["world_seeds"]]
    return [(None, out)]


def world_config_from(config: dict) -> WorldConfig:
    """The WorldConfig a results.json `config` was run with (JSON turned its tuples to lists)."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.get("world", {}).items()}
    return WorldConfig(**fields)


def rebuild_eval_scenes(config: dict, world_seed: int | None = None) -> list[Scene]:
    """The held-out scenes of a finished run, sampled again from its config (a few seconds)."""
    from bpo.shapeworld.demo import DemoConfig, build_world  # torch and transformers: lazily

    sizes = ("corpus_size", "tower_scenes", "align_scenes", "eval_scenes")
    cfg = DemoConfig(
        seed=config["seed"] if world_seed is None else world_seed,
        world=world_config_from(config),
        **{k: config[k] for k in sizes if k in config},
    )
    return build_world(cfg).eval_scenes


@dataclass
class Example:
    """One held-out scene: its gold caption, image (PNG bytes or None) and each column's answer."""

    id: int
    truth: str
    png: bytes | None
    answers: dict[str, str]  # column label -> answer


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def pick_examples(
    folder: Path,
    results: dict,
    world: Any,
    scenes: Sequence[Scene] | None,
    world_config: WorldConfig,
    count: int,
    shapes: Sequence[str],
) -> tuple[list[Example], str]:
    """The first `count` held-out scenes where some shown answer hallucinates (then the rest, in
    order, if too few); and a note on how they were chosen or why images are missing."""
    columns: dict[str, list[dict]] = {}
    for arm in EXAMPLE_ARMS:
        summary = results["arms"].get(arm)
        if summary is None:
            continue
        runs = [r for r in summary.get("per_seed", [{}]) if r.get("world") == world] or [{}]
        seed = runs[0].get("seed")
        path = answers_path(folder, arm, seed)
        if path.is_file():
            label = arm if arm == "base" or seed is None else f"{arm} (seed {seed})"
            columns[label] = read_jsonl(path)
    if not columns:
        return [], "no answer files found"
    n = min(len(rows) for rows in columns.values())

    def hallucinates(i: int) -> bool:
        return any(
            kind == "hallucinated"
            for rows in columns.values()
            for _, kind in mark_hallucinations(rows[i]["answer"], rows[i]["truth"], shapes)
        )

    flagged = [i for i in range(n) if hallucinates(i)]
    others = sorted(set(range(n)) - set(flagged))
    chosen = (flagged + others)[:count]
    shown = min(count, len(flagged))
    if shown == 0:
        note = f"None of these models names an absent shape here; the first {len(chosen)} scenes."
    else:
        note = (
            f"The first {shown} held-out scenes (of {n}) where at least one of these models "
            "names an absent shape" + (", then the first others." if shown < len(chosen) else ".")
        )
    truths = next(iter(columns.values()))
    if scenes is not None and [caption(s) for s in scenes[:n]] != [r["truth"] for r in truths[:n]]:
        note += " Images not shown: the scenes given do not match the answer files' gold captions."
        scenes = None
    examples = [
        Example(
            id=int(truths[i]["id"]),
            truth=truths[i]["truth"],
            png=None if scenes is None else _png(render(scenes[i], world_config)),
            answers={label: rows[i]["answer"] for label, rows in columns.items()},
        )
        for i in chosen
    ]
    return examples, note


def train_logs(folder: Path) -> dict[str, list[dict]]:
    """{'arm-s{seed}': metric lines} from folder/train/*.jsonl."""
    train = folder / "train"
    return {p.stem: read_jsonl(p) for p in sorted(train.glob("*.jsonl"))} if train.is_dir() else {}


def arm_of_log(name: str) -> str:
    """'bpo_weaken-s2' -> 'bpo_weaken'."""
    return re.sub(r"-s\d+$", "", name)


# ---------------------------------------------------------------------------------------------
# plots (inline SVG)


def arm_colour(arm: str, arms: Sequence[str]) -> str:
    if arm in ARM_COLOURS:
        return ARM_COLOURS[arm]
    others = [a for a in arms if a not in ARM_COLOURS]
    return OTHER_COLOURS[others.index(arm) % len(OTHER_COLOURS)] if arm in others else "#333"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (steps of 1, 2, 2.5 or 5 times a power of ten)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = 0.0, 1.0
    if high - low < 1e-12:  # one value: a range that starts at 0 when the value is 0
        pad = abs(high) * 0.1 or 1.0
        low, high = (low, low + pad) if low == 0 else (low - pad, high + pad)
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step + 1e-9)
    last = math.ceil(high / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


@dataclass
class Frame:
    """A plot's data ranges and its place on the SVG canvas."""

    x_low: float
    x_high: float
    y_low: float
    y_high: float
    width: int = 540
    height: int = 300
    left: int = 58
    right: int = 130  # room for the legend
    top: int = 28
    bottom: int = 44

    def x(self, value: float) -> float:
        span = (self.x_high - self.x_low) or 1.0
        return self.left + (value - self.x_low) / span * (self.width - self.left - self.right)

    def y(self, value: float) -> float:
        span = (self.y_high - self.y_low) or 1.0
        return (
            self.height
            - self.bottom
            - (value - self.y_low) / span * (self.height - self.top - self.bottom)
        )


def _text(
    x: float, y: float, text: str, anchor: str = "middle", size: int = 11, extra: str = ""
) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" {extra}>'
        f"{html.escape(text)}</text>"
    )


def _axes(frame: Frame, y_ticks: list[float], title: str, y_label: str) -> list[str]:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{frame.width}" height="{frame.height}" '
        f'viewBox="0 0 {frame.width} {frame.height}" font-family="sans-serif" role="img">',
        f"<title>{html.escape(title)}</title>",
        _text(frame.width / 2 - frame.right / 2 + frame.left / 2, 16, title, size=13),
    ]
    for tick in y_ticks:
        y = frame.y(tick)
        parts.append(
            f'<line x1="{frame.left}" x2="{frame.width - frame.right}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#e5e5e5"/>'
        )
        parts.append(_text(frame.left - 6, y + 4, f"{tick:.4g}", anchor="end", size=10))
    bottom = frame.height - frame.bottom
    parts.append(
        f'<line x1="{frame.left}" x2="{frame.width - frame.right}" y1="{bottom}" y2="{bottom}" '
        'stroke="#333"/>'
    )
    parts.append(
        f'<line x1="{frame.left}" x2="{frame.left}" y1="{frame.top}" y2="{bottom}" stroke="#333"/>'
    )
    mid = (frame.top + bottom) / 2
    parts.append(_text(14, mid, y_label, extra=f'transform="rotate(-90 14 {mid:.1f})"'))
    return parts


def _legend(frame: Frame, items: Sequence[tuple[str, str]]) -> list[str]:
    parts = []
    x = frame.width - frame.right + 12
    for k, (label, colour) in enumerate(items):
        y = frame.top + 8 + 16 * k
        parts.append(f'<rect x="{x}" y="{y - 8}" width="10" height="10" fill="{colour}"/>')
        parts.append(_text(x + 15, y + 1, label, anchor="start"))
    return parts


def strip_plot(
    title: str,
    y_label: str,
    groups: dict[str, tuple[float, float | None, list[tuple[str, float]]]],
    colours: dict[str, str],
) -> str:
    """Per category: a bar at the mean, a whisker of ± sd, and a point per run (labelled)."""
    values = [v for mean, sd, pts in groups.values() for v in [mean, *(p for _, p in pts)]]
    values += [mean + (sd or 0) for mean, sd, _ in groups.values()]
    ticks = nice_ticks(min(0.0, *values), max(values) if values else 1.0)
    names = list(groups)
    # Many arms (a noise-step sweep): a wider plot, names slanted so they do not overlap.
    slant = len(names) > 5
    width = max(540, 78 + 64 * len(names))
    frame = Frame(-0.5, len(names) - 0.5, ticks[0], ticks[-1], width, 330 if slant else 300,
                  right=20, bottom=90 if slant else 44)  # fmt: skip
    parts = _axes(frame, ticks, title, y_label)
    for k, name in enumerate(names):
        mean, sd, points = groups[name]
        colour = colours[name]
        x = frame.x(k)
        half = 0.3 * (frame.x(1) - frame.x(0))
        parts.append(
            f'<rect class="mean" x="{x - half:.1f}" y="{frame.y(max(mean, 0)):.1f}" '
            f'width="{2 * half:.1f}" height="{abs(frame.y(0) - frame.y(mean)):.1f}" '
            f'fill="{colour}" fill-opacity="0.25" stroke="{colour}">'
            f"<title>{html.escape(f'{name}: mean {mean:.4f}')}</title></rect>"
        )
        if sd:
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{frame.y(mean - sd):.1f}" '
                f'y2="{frame.y(mean + sd):.1f}" stroke="{colour}" stroke-width="2"/>'
            )
        for j, (label, value) in enumerate(points):
            offset = (j - (len(points) - 1) / 2) * min(2 * half / max(len(points), 1), 10)
            parts.append(
                f'<circle class="run" cx="{x + offset:.1f}" cy="{frame.y(value):.1f}" r="4" '
                f'fill="{colour}" stroke="white"><title>{html.escape(f"{name}, {label}: {value:.4f}")}'
                "</title></circle>"
            )
        y = frame.height - frame.bottom + 16
        if slant:
            extra = f'transform="rotate(-35 {x:.1f} {y:.1f})"'
            parts.append(_text(x + 4, y, name, anchor="end", extra=extra))
        else:
            parts.append(_text(x, y, name))
    parts.append("</svg>")
    return "".join(parts)


def line_plot(
    title: str,
    y_label: str,
    series: list[tuple[str, str, list[tuple[float, float]]]],
    legend: Sequence[tuple[str, str]],
    y_include: Sequence[float] = (),
) -> str:
    """One polyline per (label, colour, points); `legend` as (label, colour); the y axis spans
    the data and `y_include`."""
    xs = [x for *_, pts in series for x, _ in pts]
    ys = [y for *_, pts in series for _, y in pts] + list(y_include)
    y_ticks = nice_ticks(min(ys), max(ys))
    x_ticks = nice_ticks(min(xs), max(xs))
    frame = Frame(x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1])
    parts = _axes(frame, y_ticks, title, y_label)
    for tick in x_ticks:
        parts.append(_text(frame.x(tick), frame.height - frame.bottom + 15, f"{tick:.4g}", size=10))
    parts.append(_text(frame.x((x_ticks[0] + x_ticks[-1]) / 2), frame.height - 6, "optimizer step"))
    for label, colour, points in series:
        path = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in points)
        parts.append(
            f'<polyline class="series" points="{path}" fill="none" stroke="{colour}" '
            f'stroke-width="1.6" stroke-opacity="0.85"><title>{html.escape(label)}</title></polyline>'
        )
    parts += _legend(frame, legend)
    parts.append("</svg>")
    return "".join(parts)


def grouped_bars(
    title: str,
    y_label: str,
    groups: list[str],
    bars: list[tuple[str, str, list[list[float]]]],
) -> str:
    """Per group a bar per (label, colour, values per group): the mean, with a point per value."""
    values = [v for *_, per_group in bars for vs in per_group for v in vs]
    ticks = nice_ticks(0.0, max(values) if values else 1.0)
    frame = Frame(-0.5, len(groups) - 0.5, ticks[0], ticks[-1], width=600, right=175)
    parts = _axes(frame, ticks, title, y_label)
    band = frame.x(1) - frame.x(0)
    width = 0.8 * band / max(len(bars), 1)
    for g, group in enumerate(groups):
        for b, (label, colour, per_group) in enumerate(bars):
            vs = per_group[g]
            if not vs:
                continue
            mean = sum(vs) / len(vs)
            x = frame.x(g) - 0.4 * band + b * width
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{frame.y(mean):.1f}" width="{width - 2:.1f}" '
                f'height="{frame.y(0) - frame.y(mean):.1f}" fill="{colour}">'
                f"<title>{html.escape(f'{group}, {label}: {mean:.3f}')}</title></rect>"
            )
            if len(vs) > 1:
                for v in vs:
                    parts.append(
                        f'<circle cx="{x + width / 2 - 1:.1f}" cy="{frame.y(v):.1f}" r="3" '
                        'fill="#222"/>'
                    )
        parts.append(_text(frame.x(g), frame.height - frame.bottom + 16, group))
    parts += _legend(frame, [(label, colour) for label, colour, _ in bars])
    parts.append("</svg>")
    return "".join(parts)


def chair_plot(results: dict) -> str:
    arms = list(results["arms"])
    groups = {}
    for arm, s in results["arms"].items():
        runs = [(run_label(r), r["chair_i"]) for r in s.get("per_seed", []) if "chair_i" in r]
        groups[arm] = (s["chair_i"], s.get("std", {}).get("chair_i"), runs)
    colours = {arm: arm_colour(arm, arms) for arm in arms}
    return strip_plot("CHAIR_i per arm (bar: mean; whisker: ± sd; dots: runs)", "CHAIR_i",
                      groups, colours)  # fmt: skip


def reward_plots(logs: dict[str, list[dict]], arms: Sequence[str]) -> list[str]:
    """rewards/margins and rewards/accuracies over steps: a line per run (DPO arms only)."""
    plots = []
    for key, include in (("rewards/margins", (0.0,)), ("rewards/accuracies", (0.0, 1.0))):
        series, legend = [], {}
        for name, lines in logs.items():
            points = [(line["step"], line[key]) for line in lines if key in line and "step" in line]
            if not points:
                continue
            arm = arm_of_log(name.split("/")[-1])
            colour = arm_colour(arm, arms)
            series.append((name, colour, points))
            legend[arm] = colour
        if series:
            legend_items = list(legend.items())
            plots.append(line_plot(f"{key} over training", key, series, legend_items, include))
    return plots


def negatives_plot(results: dict) -> str | None:
    entries = negative_sources(results)
    if not entries:
        return None
    labels = list(dict.fromkeys(f"{s} t={t}" if t != "—" else s for _, s, t, _ in entries))
    bars = []
    for key, title, colour in (
        ("with_hallucination", "name an absent shape", "#ef6c00"),
        ("chair_i", "CHAIR_i", "#6a1b9a"),
    ):
        per_group: list[list[float]] = [[] for _ in labels]
        for _, source, step, stats in entries:
            label = f"{source} t={step}" if step != "—" else source
            if stats.get(key) is not None:
                per_group[labels.index(label)].append(stats[key])
        bars.append((title, colour, per_group))
    return grouped_bars("Hallucinated objects in the negatives", "share", labels, bars)


# ---------------------------------------------------------------------------------------------
# the two files


def _html_table(header: list[str], rows: list[list[str]], table_id: str) -> str:
    head = "".join(
        f'<th class="name">{html.escape(h)}</th>' if k == 0 else f"<th>{html.escape(h)}</th>"
        for k, h in enumerate(header)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="name">{html.escape(c)}</td>' if k == 0 else f"<td>{html.escape(c)}</td>"
            for k, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _md(text: str) -> str:
    """Text safe in a markdown table cell or list item: markup characters backslash-escaped.

    CommonMark takes a backslash before any ASCII punctuation as the character itself, so
    `\\<script>` shows as text; `_` inside a word is no emphasis and stays bare for terminals.
    """
    text = re.sub(r"([\\`*\[\]|<>&~])", r"\\\1", text)
    text = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", text)
    return text.replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |"]
    lines.append("|" + "|".join([":--"] + ["--:"] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _marked_html(answer: str, truth: str, shapes: Sequence[str]) -> str:
    out = []
    for text, kind in mark_hallucinations(answer, truth, shapes):
        if kind == "hallucinated":
            out.append(f'<mark class="hal" title="not in the image">{html.escape(text)}</mark>')
        elif kind == "object":
            out.append(f'<span class="obj">{html.escape(text)}</span>')
        else:
            out.append(html.escape(text))
    return "".join(out)


def _marked_md(answer: str, truth: str, shapes: Sequence[str]) -> str:
    return "".join(
        f"**~~{_md(text)}~~**" if kind == "hallucinated" else _md(text)
        for text, kind in mark_hallucinations(answer, truth, shapes)
    )


def _example_html(example: Example, shapes: Sequence[str]) -> str:
    if example.png is None:
        image = '<div class="meta">(image not available)</div>'
    else:
        data = base64.b64encode(example.png).decode("ascii")
        image = f'<img alt="held-out scene {example.id}" src="data:image/png;base64,{data}">'
    answers = "".join(
        f'<div class="answer"><b>{html.escape(label)}</b>{_marked_html(text, example.truth, shapes)}</div>'
        for label, text in example.answers.items()
    )
    return (
        f'<div class="example">{image}<div style="flex:1"><div class="meta">scene {example.id} · '
        f"gold: {html.escape(example.truth)}</div>"
        f'<div class="answers">{answers}</div></div></div>'
    )


def write_report(
    out: str | Path,
    results: dict,
    eval_scenes: Sequence[Scene] | None = None,
    world_config: WorldConfig | None = None,
    examples: int = 8,
) -> tuple[Path, Path]:
    """Write OUT/report.html, OUT/report.md and OUT/pairs.html (the pair viewer); return the first two.

    eval_scenes, world_config: the held-out scenes the answers are of (of the first world in a
        full run) and how to render them; when not given, they are sampled again from
        `results["config"]`, which takes a few seconds.
    examples: how many held-out scenes to show answered side by side.
    """
    out = Path(out)
    config = results.get("config", {})
    shapes = tuple(config.get("world", {}).get("shapes", SHAPES))
    world_config = world_config or world_config_from(config)
    folders = run_folders(out, results)
    first_world, first_folder = folders[0]
    scenes_note = ""
    if eval_scenes is None and config:
        try:
            eval_scenes = rebuild_eval_scenes(config, first_world)
        except (KeyError, TypeError, ValueError) as error:
            scenes_note = f" (scenes could not be rebuilt from results.json's config: {error})"
    picked, pick_note = pick_examples(
        first_folder, results, first_world, eval_scenes, world_config, examples, shapes
    )
    logs = {}
    for world, folder in folders:
        prefix = "" if world is None else f"world{world}/"
        logs.update({prefix + name: lines for name, lines in train_logs(folder).items()})
    viewers = []
    for world, folder in folders:
        if (folder / "pairs" / "manifest.json").is_file():
            page = write_pair_viewer(folder / "pairs", folder / "pairs.html", image_root=folder)
            viewers.append((world, page.relative_to(out).as_posix()))

    arms = list(results["arms"])
    claim_class, claim_text = claim_sentence(results)
    plots = [chair_plot(results), *reward_plots(logs, arms)]
    negatives_svg = negatives_plot(results)
    if negatives_svg:
        plots.append(negatives_svg)
    seeds = ", ".join(str(s) for s in results.get("seeds", []))
    worlds = results.get("world_seeds")
    meta = f"seeds {seeds}" + (f" · world seeds {', '.join(map(str, worlds))}" if worlds else "")
    meta += f" · wall time {results.get('wall_s', '?')} s · " + " · ".join(
        f"{k} {v}" for k, v in results.get("versions", {}).items()
    )
    link_html = "".join(
        f'<li><a href="{html.escape(href)}">{html.escape(href)}</a>'
        + (f" (world {html.escape(str(w))})" if w is not None else "")
        + "</li>"
        for w, href in viewers
    )
    sections = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>bpo demo report</title><style>{STYLE}</style></head><body>",
        "<h1>bpo demo: ShapeWorld report</h1>",
        f'<p class="meta">{html.escape(meta)}</p>',
        f'<p class="claim {claim_class}" id="claim">{html.escape(claim_text)}</p>',
        "<h2>Results</h2><p class='meta'>Held-out scenes; mean ± sample sd over each arm's runs. "
        "CHAIR_i: share of mentioned shapes absent from the image (lower is better); partner "
        "share: share of those that are the text prior's partner of a present shape, against "
        "its chance level.</p>",
        _html_table(*results_table(results), "results"),
        "<h3>POPE</h3>",
        _html_table(*pope_table(results), "pope"),
        "<h3>Every run</h3>",
        _html_table(*runs_table(results), "runs"),
        "<h2>Plots</h2><div class='plots'>",
        "".join(f"<figure>{svg}</figure>" for svg in plots),
        "</div>",
        "<h2>Negatives</h2><p class='meta'>How many bootstrapped negatives really name a shape "
        "absent from their scene, per source and noise step.</p>",
        _html_table(*negatives_table(results), "negatives"),
        "<h2>Held-out scenes, side by side</h2>",
        f"<p class='meta'>{html.escape(pick_note + scenes_note)} "
        "<mark class='hal'>marked</mark>: a shape not in the image; "
        "<span class='obj'>green</span>: a shape that is.</p>",
        "".join(_example_html(e, shapes) for e in picked),
        "<h2>Preference pairs</h2>",
        f"<ul>{link_html}</ul>" if viewers else "<p class='meta'>No pair store found.</p>",
        "</body></html>",
    ]
    html_path = out / "report.html"
    html_path.write_text("".join(sections), encoding="utf-8")

    md = [
        "# bpo demo: ShapeWorld report",
        "",
        _md(meta),
        "",
        _md(claim_text),
        "",
        "## Results (mean ± sd over runs)",
        "",
        _md_table(*results_table(results)),
        "",
        "### POPE",
        "",
        _md_table(*pope_table(results)),
        "",
        "### Every run",
        "",
        _md_table(*runs_table(results)),
        "",
        "## Negatives",
        "",
        _md_table(*negatives_table(results)),
        "",
        "## Held-out scenes (hallucinated shapes in **~~bold strike~~**)",
        "",
        _md(pick_note),
        "",
    ]
    for example in picked:
        md.append(f"- scene {example.id}, gold: {_md(example.truth)}")
        md += [f"  - {_md(label)}: {_marked_md(text, example.truth, shapes)}"
               for label, text in example.answers.items()]  # fmt: skip
    md += ["", "Plots and images: [report.html](report.html)."]
    md += [f"Pairs: [{href}]({href})." for _, href in viewers]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return html_path, md_path
