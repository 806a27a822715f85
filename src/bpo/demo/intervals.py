"""95% intervals of the demo's metrics: a two-level bootstrap over training seeds and scenes.

Every metric the demo reports is a ratio of sums over the held-out scenes, so each evaluated
model is reduced to a matrix of per-scene counts (`SceneStats`, read from `bpo eval`'s
judgments) and a metric is `sum(numerator counts) / sum(denominator counts)`:

| metric                      | numerator                 | denominator              |
|-----------------------------|---------------------------|--------------------------|
| chair_i                     | hallucinated mentions     | mentions                 |
| chair_s                     | answers with one          | answers                  |
| recall                      | unique correct shapes     | ground-truth shapes      |
| partner_share               | partner hits              | hallucinated mentions    |
| partner_chance              | summed chance of a hit    | hallucinated mentions    |
| pope_{split}_accuracy       | tp + tn                   | tp + fp + tn + fn        |
| pope_{split}_f1             | 2 tp                      | 2 tp + fp + fn           |
| pope_{split}_yes_ratio      | tp + fp                   | tp + fp + tn + fn        |
| well_formed, repetition     | well-formed / repeating   | answers                  |
| repeated_mentions           | repeated mentions         | mentions                 |
| length_ratio                | words                     | gold caption words       |

(a zero denominator gives 0, as the scorers do; F1 = 2PR / (P + R) = 2tp / (2tp + fp + fn)).
The answer-quality rows exist when the judgments carry `well_formed`, `repeated`, `words` and
`gold_words`.

The bootstrap, in B replicates: draw the arm's R runs with replacement and, independently, the
S held-out scenes with replacement (multinomial counts W, shape (B, S)); each drawn run's metrics
are computed on the drawn scenes (W @ its count matrix), then averaged over the drawn runs; the
interval is the 2.5th and 97.5th percentiles. The scene draws come from a generator keyed by a
fixed seed (and the world), never by the arm, so every seed and every arm of a replicate sees the
same scenes: arms are compared on the same resampled test sets. One run (the base model) gets the
scene-only bootstrap. In a full run the runs of every world form the seed level, and the scenes
are drawn within each world (its own held-out set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bpo.data.files import read_json_lines
from bpo.evaluate.chair import response_counts
from bpo.shapeworld.metrics import partner_counts
from bpo.shapeworld.world import PARTNERS, SHAPES

REPLICATES = 1000
BOOTSTRAP_SEED = 0
PERCENTILES = (2.5, 97.5)  # the 95% interval
CHAIR_FILE = Path("shapeworld_chair") / "judgments.jsonl"
POPE_FILE = Path("shapeworld_pope") / "judgments.jsonl"
POPE_SPLITS = ("random", "popular", "adversarial")
POPE_COUNTS = ("tp", "fp", "tn", "fn")
CHAIR_COLUMNS = (
    "answers",
    "mentions",
    "hallucinated",
    "with_hallucination",
    "recalled",
    "truth",
    "partner_hits",
    "partner_chance",
)
# Judgment field -> its count columns: a metric of answer quality needs every record to carry it.
QUALITY_FIELDS = {
    "well_formed": ("well_formed",),
    "repeated": ("repeating", "repeated"),  # answers with a repeat; repeated mentions
    "words": ("words",),
    "gold_words": ("gold_words",),
}
# t_{0.975, df} for df = 1..30 (scipy.stats.t.ppf(0.975, df), to 4 decimals).
T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
Z_975 = 1.959963984540054

# metric -> ({numerator column: coefficient}, {denominator column: coefficient})
Ratio = tuple[dict[str, float], dict[str, float]]
RATIOS: dict[str, Ratio] = {
    "chair_i": ({"hallucinated": 1}, {"mentions": 1}),
    "chair_s": ({"with_hallucination": 1}, {"answers": 1}),
    "recall": ({"recalled": 1}, {"truth": 1}),
    "partner_share": ({"partner_hits": 1}, {"hallucinated": 1}),
    "partner_chance": ({"partner_chance": 1}, {"hallucinated": 1}),
    "well_formed": ({"well_formed": 1}, {"answers": 1}),
    "repetition": ({"repeating": 1}, {"answers": 1}),
    "repeated_mentions": ({"repeated": 1}, {"mentions": 1}),
    "length_ratio": ({"words": 1}, {"gold_words": 1}),
}
for _split in POPE_SPLITS:
    _tp, _fp, _tn, _fn = (f"pope_{_split}_{c}" for c in POPE_COUNTS)
    RATIOS[f"pope_{_split}_accuracy"] = ({_tp: 1, _tn: 1}, {_tp: 1, _fp: 1, _tn: 1, _fn: 1})
    RATIOS[f"pope_{_split}_f1"] = ({_tp: 2}, {_tp: 2, _fp: 1, _fn: 1})
    RATIOS[f"pope_{_split}_yes_ratio"] = ({_tp: 1, _fp: 1}, {_tp: 1, _fp: 1, _tn: 1, _fn: 1})


@dataclass(frozen=True)
class SceneStats:
    """One evaluated model's counts: a row per held-out scene, a column per count."""

    ids: tuple[str, ...]  # the scenes, in the CHAIR judgments' order
    columns: tuple[str, ...]
    values: np.ndarray  # (S, K) float64


# --- per-scene counts from the judgments ---------------------------------------------------------


def chair_row(mentions: Sequence[str], truth: set[str]) -> list[float]:
    """CHAIR_COLUMNS of one answer, as `chair_scores` and `partner_scores` count it."""
    said, wrong, recalled, truth_size = response_counts(mentions, truth)
    _, hits, chance = partner_counts(mentions, truth, PARTNERS, SHAPES)
    return [1, said, wrong, wrong > 0, recalled, truth_size, hits, chance]


def _chair_stats(path: Path) -> tuple[list[str], list[str], list[list[float]]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; the intervals read `bpo eval`'s shapeworld_chair judgments "
            "(evaluate the model with that benchmark)"
        )
    records = [record for _, record in read_json_lines(path, appended=False)]
    ids = [str(r["question_id"]) for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: a scene is judged twice; rerun `bpo eval` into a fresh folder")
    quality = [f for f in QUALITY_FIELDS if records and all(f in r for r in records)]
    rows = []
    for r in records:
        row = chair_row(r["mentions"], set(r["ground_truth"]))
        extra = {
            "well_formed": [bool(r.get("well_formed"))],
            "repeated": [(r.get("repeated") or 0) > 0, r.get("repeated") or 0],
            "words": [r.get("words")],
            "gold_words": [r.get("gold_words")],
        }
        rows.append(row + [float(v) for f in quality for v in extra[f]])
    return ids, [c for f in quality for c in QUALITY_FIELDS[f]], rows


def _pope_stats(path: Path, index: dict[str, int], chair: Path) -> tuple[list[str], np.ndarray]:
    """(columns, (S, 4 x splits) counts): each question counted in its scene's row."""
    records = list(read_json_lines(path, appended=False))
    splits = [s for s in POPE_SPLITS if any(r["strategy"] == s for _, r in records)]
    columns = [f"pope_{s}_{c}" for s in splits for c in POPE_COUNTS]
    counts = np.zeros((len(index), len(columns)))
    for number, r in records:
        scene = str(r["question_id"]).rsplit(":", 2)[0]
        if scene not in index:
            raise ValueError(
                f"{path} line {number}: question {r['question_id']} is about scene {scene}, "
                f"which {chair} does not judge; evaluate both benchmarks on the same scenes"
            )
        if r["strategy"] not in splits:
            continue  # a strategy other than POPE's three: no metric of ours reads it
        said, truth = r["prediction"] == "yes", r["label"] == "yes"
        kind = ("tp" if truth else "fp") if said else ("fn" if truth else "tn")
        counts[index[scene], columns.index(f"pope_{r['strategy']}_{kind}")] += 1
    return columns, counts


def read_scene_stats(folder: str | Path) -> SceneStats:
    """The per-scene counts of one `bpo eval` folder: CHAIR's (with the answer-quality fields
    when every judgment carries them) and, when it was run, POPE's per split."""
    folder = Path(folder)
    ids, quality, rows = _chair_stats(folder / CHAIR_FILE)
    columns = list(CHAIR_COLUMNS) + quality
    values = np.asarray(rows, dtype=np.float64).reshape(len(ids), len(columns))
    if (folder / POPE_FILE).is_file():
        index = {scene: k for k, scene in enumerate(ids)}
        pope_columns, counts = _pope_stats(folder / POPE_FILE, index, folder / CHAIR_FILE)
        columns += pope_columns
        values = np.concatenate([values, counts], axis=1)
    return SceneStats(tuple(ids), tuple(columns), values)


# --- metrics from summed counts ----------------------------------------------------------------


def ratio_matrices(columns: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(metrics, numerator (K, M), denominator (K, M)) of every metric these columns define."""
    names = [m for m, (num, den) in RATIOS.items() if set(num) | set(den) <= set(columns)]
    numerator = np.zeros((len(columns), len(names)))
    denominator = np.zeros((len(columns), len(names)))
    for j, name in enumerate(names):
        num, den = RATIOS[name]
        for column, coefficient in num.items():
            numerator[columns.index(column), j] = coefficient
        for column, coefficient in den.items():
            denominator[columns.index(column), j] = coefficient
    return names, numerator, denominator


def ratio_metrics(sums: np.ndarray, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """{metric: value} from summed counts `sums` (..., K); a zero denominator gives 0."""
    names, numerator, denominator = ratio_matrices(list(columns))
    num, den = sums @ numerator, sums @ denominator  # (..., M)
    values = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return {name: values[..., j] for j, name in enumerate(names)}


def full_sample_metrics(stats: SceneStats) -> dict[str, float]:
    """Every metric of one evaluated model on all its scenes (results.json's numbers)."""
    return {k: float(v) for k, v in ratio_metrics(stats.values.sum(axis=0), stats.columns).items()}


# --- the bootstrap -----------------------------------------------------------------------------


def draw_counts(n: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """(replicates, n) multinomial counts: how often each of n items a draw of n picks."""
    picks = rng.integers(0, n, size=(replicates, n), dtype=np.int64)
    picks += n * np.arange(replicates, dtype=np.int64)[:, None]  # row b counts in [b n, (b+1) n)
    flat = picks.ravel()
    return np.bincount(flat, minlength=replicates * n).reshape(replicates, n).astype(np.float64)


def _scene_rng(seed: int, world: int | None) -> np.random.Generator:
    # Keyed by the fixed seed and the world only: every arm draws the same scenes.
    key = [seed, 0] if world is None else [seed, 1, world % 2**32]
    return np.random.default_rng(key)


def t_quantile(df: int) -> float:
    """t_{0.975, df}: the table to df 30, then the Cornish-Fisher expansion (error < 1e-4)."""
    if df < 1:
        raise ValueError(f"the t quantile needs df >= 1, not {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def t_intervals(per_run: dict[str, np.ndarray]) -> dict[str, list[float]] | None:
    """mean ± t_{0.975, n-1} sd / sqrt(n) over the runs; None for a single run."""
    n = len(next(iter(per_run.values()))) if per_run else 0
    if n < 2:
        return None
    t = t_quantile(n - 1)
    out = {}
    for name, values in per_run.items():
        mean, half = float(values.mean()), t * float(values.std(ddof=1)) / math.sqrt(n)
        out[name] = [mean - half, mean + half]
    return out


def method_text(runs: int, worlds: int, replicates: int) -> str:
    """The interval method in words, as the report and the claim state it."""
    if runs == 1:
        return f"a percentile bootstrap over the held-out scenes ({replicates} replicates; one run)"
    seeds = "the runs of every world" if worlds > 1 else "the seeds"
    scenes = "the held-out scenes within each world" if worlds > 1 else "the held-out scenes"
    return (
        f"a two-level percentile bootstrap ({replicates} replicates) resampling {seeds} and "
        f"{scenes} with replacement, one scene draw for every seed and arm"
    )


def _common_columns(stats: Sequence[SceneStats]) -> list[str]:
    shared = set.intersection(*(set(s.columns) for s in stats))
    return [c for c in stats[0].columns if c in shared]


def _check_scenes(stats: Sequence[SceneStats], worlds: Sequence, labels: Sequence[str]) -> None:
    first: dict[Any, int] = {}
    for k, (s, world) in enumerate(zip(stats, worlds, strict=True)):
        j = first.setdefault(world, k)
        if s.ids != stats[j].ids:
            raise ValueError(
                f"{labels[k]} and {labels[j]} judge different held-out scenes; the intervals "
                "resample one scene set per world: evaluate every model on the same scenes"
            )


def bootstrap_intervals(
    stats: Sequence[SceneStats],
    worlds: Sequence[int | None] | None = None,
    replicates: int = REPLICATES,
    seed: int = BOOTSTRAP_SEED,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The intervals of one arm from its runs' per-scene counts.

    worlds: each run's world (None: one world); runs of a world share its scenes and their draws.
    labels: how errors name the runs (their folders).
    """
    if not stats:
        raise ValueError("an arm needs at least one evaluated run for its intervals")
    worlds = list(worlds) if worlds is not None else [None] * len(stats)
    labels = list(labels) if labels is not None else [f"run {k}" for k in range(len(stats))]
    _check_scenes(stats, worlds, labels)
    columns = _common_columns(stats)
    keep = [[s.columns.index(c) for c in columns] for s in stats]
    runs, k = len(stats), len(columns)
    sums = np.empty((replicates, runs, k))  # (B, R, K): each run's counts on the drawn scenes
    for world in dict.fromkeys(worlds):
        members = [r for r in range(runs) if worlds[r] == world]
        weights = draw_counts(len(stats[members[0]].ids), replicates, _scene_rng(seed, world))
        matrix = np.concatenate([stats[r].values[:, keep[r]] for r in members], axis=1)
        sums[:, members, :] = (weights @ matrix).reshape(replicates, len(members), k)
    if runs > 1:
        run_weights = draw_counts(runs, replicates, np.random.default_rng([seed, 2])) / runs
    else:
        run_weights = np.ones((replicates, 1))
    totals = np.stack([s.values[:, keep[r]].sum(axis=0) for r, s in enumerate(stats)])
    per_run = ratio_metrics(totals, columns)  # {metric: (R,)}: each run on all its scenes
    drawn = ratio_metrics(sums, columns)  # {metric: (B, R)}
    ci = {}
    for name, values in drawn.items():
        replicate = (run_weights * values).sum(axis=1)  # (B,): mean over the drawn runs
        low, high = np.percentile(replicate, PERCENTILES)
        ci[name] = [float(low), float(high)]
    return {
        "method": method_text(runs, len(set(worlds)), replicates),
        "replicates": replicates,
        "seed": seed,
        "runs": runs,
        "scenes": sum(len(stats[worlds.index(w)].ids) for w in dict.fromkeys(worlds)),
        "mean": {name: float(v.mean()) for name, v in per_run.items()},
        "ci": ci,
        "t_ci": t_intervals(per_run),
    }


def arm_intervals(
    folders: Sequence[str | Path],
    worlds: Sequence[int | None] | None = None,
    replicates: int = REPLICATES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """{"method", "mean", "ci": {metric: [lo, hi]}, "t_ci": {...} or None, ...} of one arm from
    its runs' `bpo eval` folders (one per seed; in a full run, per world and seed)."""
    stats = [read_scene_stats(folder) for folder in folders]
    return bootstrap_intervals(stats, worlds, replicates, seed, [str(f) for f in folders])


# --- reading an arm's summary ------------------------------------------------------------------


def mean_of(summary: dict[str, Any], key: str) -> float | None:
    """An arm's mean of `key`: the summary's own (results.json's metrics averaged), else the
    intervals' (metrics only the judgments hold), else None."""
    value = summary.get(key)
    if isinstance(value, int | float):
        return value
    return (summary.get("intervals") or {}).get("mean", {}).get(key)


def interval_of(summary: dict[str, Any], key: str) -> list[float] | None:
    """An arm's 95% bootstrap interval of `key`, or None."""
    return (summary.get("intervals") or {}).get("ci", {}).get(key)
