"""The demo's report: OUT/report.html (one self-contained page) and OUT/report.md (its tables).

The page needs nothing but itself: CSS inline, plots as inline SVG (`bpo.report.svg`), scene
images as PNG data URIs read from the held-out dataset, no script. It shows the results table
(per arm the mean over its runs and its 95% interval, `bpo.demo.intervals`; POPE per split;
answer quality when judged; every run), the claim as measured, CHAIR_i per arm
with a point per run, `rewards/margins` and `rewards/accuracies` over the training steps, how
often the negatives of each source and noise step name an absent shape, held-out scenes answered
by base, SFT and BPO side by side with every hallucinated object marked, and a link to the pair
viewer (written next to it).

Every piece of text from the run (answers, arm names, config values) goes through `html.escape`
on the page and `_md` in the markdown: answers are model output and must never become markup.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path

from bpo.demo.summary import (
    Example,
    arm_of_log,
    claim_text,
    existence_table,
    interval_note,
    mark_hallucinations,
    negative_sources,
    negatives_table,
    pick_examples,
    pope_table,
    results_table,
    run_folders,
    run_label,
    runs_table,
    train_logs,
)
from bpo.report.svg import grouped_bars, line_plot, strip_plot
from bpo.report.viewer import write_pair_viewer
from bpo.shapeworld.world import SHAPES

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


def arm_colour(arm: str, arms: Sequence[str]) -> str:
    if arm in ARM_COLOURS:
        return ARM_COLOURS[arm]
    others = [a for a in arms if a not in ARM_COLOURS]
    return OTHER_COLOURS[others.index(arm) % len(OTHER_COLOURS)] if arm in others else "#333"


def chair_plot(results: dict) -> str:
    arms = list(results["arms"])
    groups = {}
    for arm, s in results["arms"].items():
        runs = [(run_label(r), r["chair_i"]) for r in s.get("per_seed", []) if "chair_i" in r]
        groups[arm] = (s["chair_i"], s.get("std", {}).get("chair_i"), runs)
    colours = {arm: arm_colour(arm, arms) for arm in arms}
    title = "CHAIR_i per arm (bar: mean; whisker: ± sd; dots: runs)"
    return strip_plot(title, "CHAIR_i", groups, colours)


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
        image = f'<img alt="held-out scene {html.escape(example.id)}" src="data:image/png;base64,{data}">'
    answers = "".join(
        f'<div class="answer"><b>{html.escape(label)}</b>{_marked_html(text, example.truth, shapes)}</div>'
        for label, text in example.answers.items()
    )
    return (
        f'<div class="example">{image}<div style="flex:1"><div class="meta">scene {example.id} · '
        f"gold: {html.escape(example.truth)}</div>"
        f'<div class="answers">{answers}</div></div></div>'
    )


def _meta_line(results: dict) -> str:
    seeds = ", ".join(str(s) for s in results.get("seeds", []))
    worlds = results.get("world_seeds")
    meta = f"seeds {seeds}" + (f" · world seeds {', '.join(map(str, worlds))}" if worlds else "")
    meta += f" · wall time {results.get('wall_s', '?')} s · "
    return meta + " · ".join(f"{k} {v}" for k, v in results.get("versions", {}).items())


def _html_page(
    results: dict,
    plots: list[str],
    picked: list[Example],
    note: str,
    viewers: list[tuple[object, str]],
    shapes: Sequence[str],
) -> str:
    claim_class, claim = claim_text(results)
    links = "".join(
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
        f'<p class="meta">{html.escape(_meta_line(results))}</p>',
        f'<p class="claim {claim_class}" id="claim">{html.escape(claim)}</p>',
        "<h2>Results</h2><p class='meta'>Held-out scenes; the mean over each arm's runs. "
        f"{html.escape(interval_note(results))} "
        "CHAIR_i: share of mentioned shapes absent from the image (lower is better); partner "
        "share: share of those that are the text prior's partner of a present shape, against "
        "its chance level.</p>",
        _html_table(*results_table(results), "results"),
        "<h3>POPE (per split)</h3>",
        _html_table(*pope_table(results), "pope"),
        "<h3>Every run</h3>",
        _html_table(*runs_table(results), "runs"),
        "<h2>Plots</h2><div class='plots'>",
        "".join(f"<figure>{svg}</figure>" for svg in plots),
        "</div>",
        "<h2>Negatives</h2><p class='meta'>How many bootstrapped negatives really name a shape "
        "absent from their scene, per source and noise step.</p>",
        _html_table(*negatives_table(results), "negatives"),
        "<p class='meta'>Existence questions: how many negatives answer the opposite of the "
        "gold answer.</p>",
        _html_table(*existence_table(results), "existence"),
        "<h2>Held-out scenes, side by side</h2>",
        f"<p class='meta'>{html.escape(note)} "
        "<mark class='hal'>marked</mark>: a shape not in the image; "
        "<span class='obj'>green</span>: a shape that is.</p>",
        "".join(_example_html(e, shapes) for e in picked),
        "<h2>Preference pairs</h2>",
        f"<ul>{links}</ul>" if viewers else "<p class='meta'>No pair store found.</p>",
        "</body></html>",
    ]
    return "".join(sections)


def _markdown(
    results: dict,
    picked: list[Example],
    note: str,
    viewers: list[tuple[object, str]],
    shapes: Sequence[str],
) -> str:
    md = [
        "# bpo demo: ShapeWorld report",
        "",
        _md(_meta_line(results)),
        "",
        _md(claim_text(results)[1]),
        "",
        "## Results (mean [95% interval] over runs)",
        "",
        _md(interval_note(results)),
        "",
        _md_table(*results_table(results)),
        "",
        "### POPE (per split)",
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
        "Existence questions: how many negatives answer the opposite of the gold answer.",
        "",
        _md_table(*existence_table(results)),
        "",
        "## Held-out scenes (hallucinated shapes in **~~bold strike~~**)",
        "",
        _md(note),
        "",
    ]
    for example in picked:
        md.append(f"- scene {_md(example.id)}, gold: {_md(example.truth)}")
        md += [
            f"  - {_md(label)}: {_marked_md(text, example.truth, shapes)}"
            for label, text in example.answers.items()
        ]
    md += ["", "Plots and images: [report.html](report.html)."]
    md += [f"Pairs: [{href}]({href})." for _, href in viewers]
    return "\n".join(md) + "\n"


def write_report(out: str | Path, results: dict, examples: int = 8) -> tuple[Path, Path]:
    """Write OUT/report.html, OUT/report.md and the pair viewer(s); return the first two.

    Reads results.json's numbers and each world folder's held-out dataset, answers, training
    logs and pair store.
    examples: how many held-out scenes to show answered side by side (of the first world).
    """
    out = Path(out)
    shapes = tuple(results.get("config", {}).get("world", {}).get("shapes", SHAPES))
    folders = run_folders(out, results)
    first_world, first_folder = folders[0]
    picked, note = pick_examples(first_folder, results, first_world, examples, shapes)
    logs, viewers = {}, []
    for world, folder in folders:
        prefix = "" if world is None else f"world{world}/"
        logs.update({prefix + name: lines for name, lines in train_logs(folder).items()})
        if (folder / "pairs" / "manifest.json").is_file():
            image_root = folder / "data" / "align"
            page = write_pair_viewer(folder / "pairs", folder / "pairs.html", image_root=image_root)
            viewers.append((world, page.relative_to(out).as_posix()))
    arms = list(results["arms"])
    plots = [chair_plot(results), *reward_plots(logs, arms)]
    negatives_svg = negatives_plot(results)
    if negatives_svg:
        plots.append(negatives_svg)
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(_html_page(results, plots, picked, note, viewers, shapes), "utf-8")
    md_path.write_text(_markdown(results, picked, note, viewers, shapes), "utf-8")
    return html_path, md_path
