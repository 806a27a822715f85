"""The demo's report: its tables equal results.json, hallucinated shapes are marked where they
are, model output stays text, and the page renders in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import asdict
from html.parser import HTMLParser

import pytest
from demo_eval_helpers import write_eval, write_jsonl
from PIL import Image

from bpo.data import PairWriter, PreferencePair
from bpo.demo.arms import summarize
from bpo.demo.claim import claim
from bpo.demo.report import write_report
from bpo.demo.summary import mark_hallucinations, mean_ci
from bpo.evaluate.chair import chair_scores
from bpo.evaluate.shapeworld import hallucination_metrics
from bpo.report.svg import nice_ticks
from bpo.shapeworld.export import write_llava_dataset
from bpo.shapeworld.world import (
    Scene,
    ShapeObject,
    WorldConfig,
    caption,
    mentioned_shapes,
    render,
)

HOSTILE = "<script>alert(1)</script> a frame"

# Three held-out scenes, drawn by the real renderer.
SCENES = [
    Scene((ShapeObject("circle", "red", 0, 0), ShapeObject("square", "blue", 1, 1)), seed=1),
    Scene((ShapeObject("triangle", "green", 2, 2),), seed=2),
    Scene((ShapeObject("diamond", "yellow", 3, 3), ShapeObject("frame", "white", 0, 3)), seed=3),
]
# Answers per run (one per scene). Worked by hand:
# - base: scene 0 names a cross (absent), scene 1 a bar (absent): CHAIR_i = 2/7.
# - sft seed 0: scene 0 names rings (absent), 4 mentions in all: CHAIR_i = 1/4; seed 1: a bar
#   in scene 1, 6 mentions: CHAIR_i = 1/6. Mean 5/24 = 0.20833, sample sd |1/4 - 1/6| / sqrt(2)
#   = 0.05893: "0.2083 ± 0.0589".
# - bpo: both seeds exact: 0 ± 0.
ANSWERS = {
    "base": [
        "a red circle, a purple cross and a blue square.",
        "a green triangle and a red bar.",
        "a yellow diamond and a white frame.",
    ],
    "sft-s0": ["a red circle and two rings.", "a green triangle.", HOSTILE],
    "sft-s1": [
        "a red circle and a blue square.",
        "a green triangle and a bar.",
        "a yellow diamond and a white frame.",
    ],
    "bpo-s0": [caption(s) for s in SCENES],
    "bpo-s1": [caption(s) for s in SCENES],
}
NEGATIVES = {
    "weaken_t100": {
        "negatives": 3,
        "with_hallucination": 1 / 3,
        "chair_i": 0.25,
        "partner_share": 0.5,
        "partner_chance": 0.2,
    },
    "weaken_t900": {
        "negatives": 3,
        "with_hallucination": 2 / 3,
        "chair_i": 0.5,
        "partner_share": 0.75,
        "partner_chance": 0.2,
    },
    "inject": {
        "negatives": 2,
        "with_hallucination": 1.0,
        "chair_i": 0.4,
        "partner_share": 1.0,
        "partner_chance": 0.25,
        "accepted": 2,
    },
}


def make_run(out, scenes=SCENES):
    """A finished demo's folder as its stages leave it: the held-out dataset, `bpo eval`'s
    answers, judgments and results per model (scored by the product's scorers, POPE answered
    from each caption), `bpo train`'s logs, a pair store; returns results.json.

    scenes: the held-out dataset left on disk (the answers always answer SCENES).
    """
    out.mkdir(exist_ok=True)
    held_out = out / "data" / "held-out"
    write_llava_dataset(SCENES, WorldConfig(), held_out, with_questions=False)
    runs: dict[str, list] = {}
    folders: dict[str, list] = {}
    for name, answers in ANSWERS.items():
        arm, _, seed = name.partition("-s")
        metrics = write_eval(out / "eval" / name, held_out, answers)
        assert metrics["chair_i"] == hallucination_metrics(answers, SCENES)["chair_i"]
        runs.setdefault(arm, []).append({"seed": int(seed), **metrics} if seed else metrics)
        folders.setdefault(arm, []).append(out / "eval" / name)
    if scenes is not SCENES:
        shutil.rmtree(held_out)
        write_llava_dataset(scenes, WorldConfig(), held_out, with_questions=False)
    arms = {arm: summarize(per_seed, folders[arm]) for arm, per_seed in runs.items()}
    for seed in (0, 1):
        lines = [{"step": k, "loss": 2.0 - k / 10} for k in (1, 2, 3)]
        write_jsonl(out / "train" / f"sft-s{seed}" / "metrics.jsonl", lines)
        lines = [
            {
                "step": k,
                "loss": 0.7,
                "rewards/margins": 0.5 * k + seed,
                "rewards/accuracies": 0.25 * k,
            }
            for k in (1, 2, 3)
        ]
        write_jsonl(out / "train" / f"bpo-s{seed}" / "metrics.jsonl", lines)
    (out / "data" / "align" / "images").mkdir(parents=True)
    image = out / "data" / "align" / "images" / "sw_000000.png"
    Image.fromarray(render(SCENES[0], WorldConfig())).save(image)
    with PairWriter(out / "pairs", config={"test": True}) as writer:
        writer.write(
            PreferencePair(
                id="sw_000000",
                image="images/sw_000000.png",
                prompt=[{"role": "user", "content": "<image>\nDescribe the image."}],
                chosen=caption(SCENES[0]),
                rejected="a red circle and a cross.",
                source="inject",
            )
        )
    results = {
        "arms": arms,
        "seeds": [0, 1],
        "claim": claim(arms),
        "checks": {},
        "negatives": NEGATIVES,
        "existence_negatives": {"weaken_t900": {"negatives": 4, "wrong_answer": 0.75}},
        "config": {"seed": 0, "world": asdict(WorldConfig())},
        "versions": {"bpo": "test"},
        "wall_s": 1.0,
    }
    (out / "results.json").write_text(json.dumps(results))
    return results


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = make_run(out)
    html_path, md_path = write_report(out, results)
    return out, results, html_path.read_text(), md_path.read_text()


def test_marks_exactly_the_shapes_the_gold_caption_does_not_name():
    truth = "a red circle and a blue square."
    assert mark_hallucinations("a red circle, a purple cross and a blue square.", truth) == [
        ("a red ", None),
        ("circle", "object"),
        (", a purple ", None),
        ("cross", "hallucinated"),
        (" and a blue ", None),
        ("square", "object"),
        (".", None),
    ]
    assert mark_hallucinations("Two Rings", truth) == [("Two ", None), ("Rings", "hallucinated")]
    # A hyphen compound is one word, as CHAIR tokenizes it: "circle-shaped" names no shape.
    assert mark_hallucinations("a circle-shaped cross", truth) == [
        ("a circle-shaped ", None),
        ("cross", "hallucinated"),
    ]
    assert mentioned_shapes("a circle-shaped cross") == ["cross"]
    # The pieces marked are the mentions CHAIR counts, for every answer of the fixture.
    for answers in ANSWERS.values():
        for answer, scene in zip(answers, SCENES, strict=True):
            pieces = mark_hallucinations(answer, caption(scene))
            counts = chair_scores([mentioned_shapes(answer)], [scene.shapes])
            assert sum(kind is not None for _, kind in pieces) == counts["mentions"]
            assert (
                sum(kind == "hallucinated" for _, kind in pieces)
                == (counts["hallucinated_mentions"])
            )
            assert "".join(text for text, _ in pieces) == answer


def test_markdown_tables_equal_the_results(report):
    """mean [95% interval] of every arm, means as worked by hand in ANSWERS' comment.

    The base (one run) has the scene bootstrap: its scenes hold (hallucinated, mentions) (1, 3),
    (1, 2), (0, 2); a draw of scene 2 alone (odds 1/27 = 3.7% > 2.5%) gives 0, of scene 1 alone
    (also 3.7%) the maximum 1/2: the interval is [0, 0.5]. BPO answers every scene exactly:
    [0, 0]. SFT's bounds are the bootstrap's, read back from results.json.
    """
    _, results, _, md = report
    sft = results["arms"]["sft"]
    low, high = sft["intervals"]["ci"]["chair_i"]
    assert low <= 5 / 24 <= high
    assert f"| sft | 2 | 0.2083 \\[{low:.4f}, {high:.4f}\\] |" in md
    assert "| base | 1 | 0.2857 \\[0.0000, 0.5000\\] |" in md
    assert "| bpo | 2 | 0.0000 \\[0.0000, 0.0000\\] |" in md
    assert mean_ci(sft, "chair_i") == f"0.2083 [{low:.4f}, {high:.4f}]"
    assert "well-formed | repetition | length ratio |" in md  # the scorer judged answer quality
    # POPE per split: BPO's captions are exact, so is its every POPE answer.
    assert "| bpo | 1.000 \\[1.000, 1.000\\] | 1.000 \\[1.000, 1.000\\] | 0.500" in md
    assert "In brackets, 95% intervals (2.5th-97.5th percentiles) of a two-level" in md
    assert "| sft | seed 0 | 0.2500 |" in md and "| sft | seed 1 | 0.1667 |" in md
    assert "| weaken | 900 | 3 | 0.667 | 0.500 | 0.750 | 0.200 |" in md
    assert "| inject | — | 2 | 1.000 | 0.400 | 1.000 | 0.250 |" in md
    assert "| source | noise step | negatives | wrong answer |" in md
    assert "| weaken | 900 | 4 | 0.750 |" in md
    assert "BPO beat SFT on CHAIR_i: 0.0000 \\[0.0000, 0.0000\\] against 0.2083 \\[" in md
    assert "The claim holds" in md
    assert "[pairs.html](pairs.html)" in md


def test_html_marks_hallucinations_and_escapes_model_output(report):
    out, _, page, md = report
    assert '<mark class="hal" title="not in the image">cross</mark>' in page  # base, scene 0
    assert '<mark class="hal" title="not in the image">rings</mark>' in page  # sft s0, scene 0
    assert '<mark class="hal" title="not in the image">bar</mark>' in page  # base, scene 1
    assert page.count('<mark class="hal" title') == 3
    assert "<script" not in page
    assert '&lt;script&gt;alert(1)&lt;/script&gt; a <span class="obj">frame</span>' in page
    assert r"\<script\>alert(1)\</script\> a frame" in md
    assert re.search(r"(?<!\\)[<>]", md) is None  # every angle bracket escaped
    # Scenes 0 and 1 hold a hallucination, scene 2 none: it comes last.
    assert (
        page.index("scene sw_000000 ·")
        < page.index("scene sw_000001 ·")
        < page.index("scene sw_000002 ·")
    )
    assert "The first 2 held-out scenes (of 3)" in page
    # Self-contained: nothing fetched; the pair viewer written next to it and linked.
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    assert '<a href="pairs.html">' in page and (out / "pairs.html").is_file()
    assert page.count("<svg") == 4  # CHAIR_i, margins, accuracies, negatives


def test_reward_plots_draw_one_line_per_dpo_run(report):
    _, _, page, _ = report
    for key in ("rewards/margins", "rewards/accuracies"):
        start = page.index(f"<title>{key} over training</title>")
        svg = page[start : page.index("</svg>", start)]
        lines = svg.count("<polyline")
        assert lines == 2  # bpo seeds 0 and 1; SFT logs carry no rewards
        assert "<title>bpo-s0</title>" in svg and "sft" not in svg


def test_full_run_pools_worlds_and_links_every_pair_viewer(tmp_path):
    """`--run.full`: a folder per world seed, results.json pooling the arms over worlds x seeds,
    with intervals resampling the runs of both worlds and each world's scenes."""
    worlds = {w: make_run(tmp_path / f"world{w}") for w in (0, 1)}
    arms = {}
    for arm in worlds[0]["arms"]:
        runs = [
            {"world": w, **run} for w, r in worlds.items() for run in r["arms"][arm]["per_seed"]
        ]
        labels = [f"{arm}-s{run['seed']}" if "seed" in run else arm for run in runs]
        folders = [
            tmp_path / f"world{run['world']}" / "eval" / label
            for run, label in zip(runs, labels, strict=True)
        ]
        arms[arm] = summarize(runs, folders, [run["world"] for run in runs])
    results = {
        **worlds[0],
        "arms": arms,
        "world_seeds": [0, 1],
        "negatives": {f"world{w}": r["negatives"] for w, r in worlds.items()},
    }
    html_path, md_path = write_report(tmp_path, results)
    page, md = html_path.read_text(), md_path.read_text()
    # 1/4, 1/6, 1/4, 1/6: mean 5/24; t-interval 3.1824 sd / 2, sd sqrt(4 * (1/24)^2 / 3).
    sft = arms["sft"]["intervals"]
    assert (sft["runs"], sft["scenes"]) == (4, 2 * len(SCENES))
    half = 3.1824 * math.sqrt(4 / 24**2 / 3) / 2
    assert sft["t_ci"]["chair_i"] == pytest.approx([5 / 24 - half, 5 / 24 + half])
    assert "within each world" in sft["method"]
    low, high = sft["ci"]["chair_i"]
    assert f"| sft | 4 | 0.2083 \\[{low:.4f}, {high:.4f}\\] |" in md
    assert "| sft | world 1, seed 0 | 0.2500 |" in md
    assert "| world1 | weaken | 900 | 3 | 0.667 |" in md
    for w in (0, 1):
        assert f'<a href="world{w}/pairs.html">' in page
        assert (tmp_path / f"world{w}" / "pairs.html").is_file()
    start = page.index("<title>rewards/margins over training</title>")
    assert page[start : page.index("</svg>", start)].count("<polyline") == 4
    assert "<title>world1/bpo-s1</title>" in page
    assert page.count("data:image/png") == len(SCENES)  # world 0's scenes, side by side


def test_mismatched_scenes_show_no_images(tmp_path):
    """Answer files that do not answer the held-out dataset's scenes: no example is guessed."""
    results = make_run(tmp_path, scenes=SCENES[:2])
    html_path, _ = write_report(tmp_path, results)
    page = html_path.read_text()
    assert "data:image/png" not in page
    assert "do not match the held-out scenes" in page


def test_example_images_are_the_held_out_dataset_s_files(report):
    """The scene images shown are the PNG files `bpo eval` read, byte for byte."""
    out, _, page, _ = report
    shown = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    files = {
        (out / "data" / "held-out" / "images" / f"sw_{i:06d}.png").read_bytes() for i in range(3)
    }
    assert {base64.b64decode(data) for data in shown} == files


def test_nice_ticks():
    assert nice_ticks(0.0, 0.23) == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    assert nice_ticks(1, 150) == [0, 50, 100, 150]
    assert nice_ticks(0.0, 0.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


# -------------------------------------------------------------------------------------------
# The page in a real browser.

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Appended to a copy of the page: once it has loaded, write what the browser sees into the DOM.
PROBE = """<script>window.addEventListener("load", () => {
  const rows = document.querySelectorAll("#results tbody tr").length;
  const imgs = [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight,
                                              i.getBoundingClientRect().width]);
  const svgs = [...document.querySelectorAll("svg")].map(s => s.getBoundingClientRect().width);
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({rows, imgs, svgs});
  document.body.appendChild(pre);
});</script>"""


def find_chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    reason = "no headless Chromium found; apt-get install chromium"
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the browser test)")
    pytest.skip(reason)


class DomReader(HTMLParser):
    """The result tables' rows, the images' sources and the probe's text from a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.result_rows = 0
        self.table: str | None = None
        self.in_probe = False
        self.probe = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.table = attrs.get("id")
        elif tag == "tr" and self.table == "results":
            self.result_rows += 1
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "pre" and attrs.get("id") == "probe":
            self.in_probe = True

    def handle_endtag(self, tag):
        if tag == "table":
            self.table = None
        elif tag == "pre":
            self.in_probe = False

    def handle_data(self, data):
        if self.in_probe:
            self.probe += data


def test_report_renders_in_headless_chromium(report, tmp_path):
    """Chromium loads the page: the results table has its rows, every scene image decodes (in
    the browser and here) and is laid out, every plot has a size."""
    chromium = find_chromium()
    out, results, page, _ = report
    probed = out / "report-probe.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    command = [
        chromium,
        "--headless=new",
        "--disable-gpu",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,2000",
        "--virtual-time-budget=5000",
        "--dump-dom",
        probed.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = DomReader()
    dom.feed(done.stdout)
    assert dom.result_rows == 1 + len(results["arms"])  # header + one per arm
    assert len(dom.images) == len(SCENES)
    side = WorldConfig().image_size
    for src in dom.images:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.format == "PNG" and image.size == (side, side)
    probe = json.loads(dom.probe)
    assert probe["rows"] == len(results["arms"])
    assert probe["imgs"] == [[True, side, side, 128]] * len(SCENES)
    assert len(probe["svgs"]) == 4 and all(width > 300 for width in probe["svgs"])
