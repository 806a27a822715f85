"""Every stage from the CLI on every model family's tiny model: bootstrap, refs, train, eval.

For each family bpo serves (the first-class ones and the second-tier ones it does not refuse),
`bpo.cli.main` runs each stage from a YAML config the way a user does, on one small LLaVA-format
dataset (images of two sizes, a multi-turn record) and a small ShapeWorld benchmark:

- `bpo bootstrap` with image-weakened negatives at two noise steps and rewrites by the model's own
  LM (`inject: kind: self`), at `batch_size: 4`; then lexical rewrites alone into another store;
- `bpo refs` on the first store; `bpo train` with LoRA and with full fine-tuning (DPO, 2 steps);
- `bpo eval` of the trained LoRA adapter on ShapeWorld's CHAIR and POPE.

The stages of one family run once, in order, and are shared by its tests (`FamilyRun`), so a
family's table row reads off the test names. The refused families (Mllama, PaliGemma) stop
`bpo bootstrap` before any pair is written, with a message naming the family.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig

from bpo.cli import main
from bpo.data import read_bad_records, read_llava, read_manifest, read_pairs, split_records
from bpo.models import load_model_and_processor
from bpo.models.family import UnsupportedModelError, family_of
from bpo.models.tiny_families import BUILT, FIRST_CLASS

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# The built second-tier families bpo serves, and those it refuses at load.
SECOND_TIER_SERVED = ("aya_vision", "glm4v", "qwen3_5")
REFUSED = ("mllama", "paligemma")
FAMILIES = (*FIRST_CLASS, *SECOND_TIER_SERVED)

NOISE_STEPS = [500, 900]
SCENES = 2  # ShapeWorld benchmark scenes
STEPS = 2  # optimizer steps of each training run

# Gold answers in the words the tiny tokenizers learned (tests/family_helpers.py's TEXTS).
ANSWERS = [
    "a red circle and a blue square .",
    "a green triangle and a yellow square .",
    "a blue circle and a red triangle .",
    "a purple square and a green circle .",
    "a yellow triangle and a blue square .",
]


def _image(path: Path, size: tuple[int, int], left: tuple, right: tuple) -> str:
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    image.save(path)
    return f"images/{path.name}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """data.json: 6 records (5 one-turn, 1 two-turn: 7 samples), images of two sizes."""
    root = tmp_path_factory.mktemp("family_data")
    (root / "images").mkdir()
    small = _image(root / "images" / "small.png", (40, 30), (255, 0, 0), (0, 0, 255))
    large = _image(root / "images" / "large.png", (64, 48), (0, 255, 0), (255, 255, 0))
    records = [
        {
            "id": f"r{i}",
            "image": small if i % 2 == 0 else large,
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": answer},
            ],
        }
        for i, answer in enumerate(ANSWERS)
    ]
    records.append(
        {
            "id": "multi",
            "image": large,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the image?"},
                {"from": "gpt", "value": "a green circle and a yellow triangle ."},
                {"from": "human", "value": "How many shapes are there?"},
                {"from": "gpt", "value": "a red square and a blue circle ."},
            ],
        }
    )
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def samples(data) -> int:
    """How many samples (assistant turns) the dataset holds."""
    found, bad = split_records(read_llava(data, image_root=data.parent))
    assert bad == [] and len(found) == 7
    return len(found)


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Path:
    """A ShapeWorld export of 2 scenes: CHAIR's captions and POPE's questions."""
    out = tmp_path_factory.mktemp("family_bench") / "sw"
    flags = ["--scenes", str(SCENES), "--seed", "1", "--questions", "false"]
    main(["shapeworld", "--out", str(out), *flags])
    return out


def _write(path: Path, config: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


class FamilyRun:
    """One family's stages, each run on first use through `bpo.cli.main` and remembered (its
    output folder, or the error it raised, raised again for every test that needs it)."""

    def __init__(self, name: str, model: Path, data: Path, root: Path):
        self.name, self.root, self.data = name, root, data
        self.model = {"name_or_path": str(model), "dtype": "float32", "device": "cpu"}
        self._done: dict[str, tuple[Any, BaseException | None]] = {}

    def _once(self, stage: str, run: Callable[[], Any]) -> Any:
        if stage not in self._done:
            try:
                self._done[stage] = (run(), None)
            except Exception as error:  # the stage's own failure, for each test that needs it
                self._done[stage] = (None, error)
        result, error = self._done[stage]
        if error is not None:
            raise error
        return result

    def _bootstrap(self, stage: str, weaken: dict | None, inject: dict) -> Path:
        out = self.root / stage
        run = {
            "model": self.model,
            "data": str(self.data),
            "out": str(out),
            "weaken": weaken,
            "inject": inject,
            "batch_size": 4,
            "chunk_size": 8,
        }
        main(["bootstrap", "--config", _write(self.root / f"{stage}.yaml", {"run": run})])
        return out

    def bootstrap_self(self) -> Path:
        """Weakened negatives at two noise steps and the model's own rewrites, one store."""
        weaken = {"noise_steps": NOISE_STEPS, "temperature": 1.0, "max_new_tokens": 12, "seed": 0}
        # Random tiny models write anything: bounds wide enough that rewrites survive.
        inject = {
            "kind": "self",
            "max_new_tokens": 16,
            "temperature": 1.0,
            "top_p": 1.0,
            "min_ratio": 0.0,
            "max_ratio": 50.0,
        }
        return self._once("pairs", lambda: self._bootstrap("pairs", weaken, inject))

    def bootstrap_lexical(self) -> Path:
        inject = {"kind": "lexical", "vocabulary": "shapeworld"}
        return self._once("pairs-lexical", lambda: self._bootstrap("pairs-lexical", None, inject))

    def train_config(self, finetune: str) -> str:
        run = {
            "model": self.model,
            "pairs": str(self.bootstrap_self()),
            "image_root": str(self.data.parent),
            "out": str(self.root / f"train-{finetune}"),
            "method": "dpo",
            "finetune": finetune,
            "lora": {"r": 4, "alpha": 8, "merge": False},
            "lr": 1e-3,
            "warmup_ratio": 0.0,  # both steps update the weights
            "max_steps": STEPS,
            "batch_size": 2,
            "save_steps": STEPS,
            "trackers": [],
            "reference_batch_size": 4,
        }
        return _write(self.root / f"train-{finetune}.yaml", {"run": run})

    def train(self, finetune: str) -> Path:
        def run() -> Path:
            main(["train", "--config", self.train_config(finetune)])
            return self.root / f"train-{finetune}"

        return self._once(f"train-{finetune}", run)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tiny_families, data, tmp_path_factory) -> FamilyRun:
    """The family's stages over its tiny model (one family at a time: tests group by it)."""
    folder = tiny_families(request.param)
    assert family_of(AutoConfig.from_pretrained(folder)).unsupported is None
    return FamilyRun(request.param, folder, data, tmp_path_factory.mktemp(request.param))


def test_the_family_lists_cover_every_built_family():
    assert set(FAMILIES) | set(REFUSED) == set(BUILT)
    assert not set(FAMILIES) & set(REFUSED)


def _rejects(store: Path) -> list:
    bad = list(read_bad_records(store))
    assert [b.message for b in bad if not b.reason.startswith("rejected_")] == []  # no bad input
    return bad


def test_bootstrap_weaken_and_self_inject(family, samples):
    """Every request of both methods is a pair or a counted reject, and both make pairs."""
    store = family.bootstrap_self()
    manifest = read_manifest(store)
    pairs, rejects = list(read_pairs(store)), _rejects(store)
    requests = {"weaken": samples * len(NOISE_STEPS), "inject": samples}
    assert manifest["complete"] is True
    assert manifest["counts"]["pairs"] == len(pairs)
    assert len(pairs) + len(rejects) == sum(requests.values())
    assert manifest["bad_records"]["total"] == len(rejects)
    for source, wanted in requests.items():
        made = sum(p.source == source for p in pairs)
        lost = sum(b.reason.startswith(f"rejected_{source}_") for b in rejects)
        assert made + lost == wanted, source
        assert manifest["counts"]["by_source"].get(source, 0) == made
        assert made > 0, f"{family.name}: no {source} pair survived ({lost} rejected)"
    weakened = [p for p in pairs if p.source == "weaken"]
    assert {p.meta["noise_step"] for p in weakened} <= set(NOISE_STEPS)
    injected = [p for p in pairs if p.source == "inject"]
    assert {p.meta["kind"] for p in injected} == {"self"}
    assert all(p.rejected != p.chosen and p.rejected_tokens > 0 for p in pairs)


def test_bootstrap_lexical_inject(family, samples):
    store = family.bootstrap_lexical()
    manifest = read_manifest(store)
    pairs, rejects = list(read_pairs(store)), _rejects(store)
    assert manifest["complete"] is True
    assert len(pairs) + len(rejects) == samples
    assert pairs and {p.source for p in pairs} == {"inject"}
    assert {p.meta["generator"] for p in pairs} == {"lexical:shapeworld"}


def test_refs_scores_every_pair(family, capsys):
    store = family.bootstrap_self()
    pairs = {p.key for p in read_pairs(store)}
    capsys.readouterr()
    main(["refs", "--config", family.train_config("lora")])
    printed = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if '"refs"' in line
    ]
    assert len(printed) == 1
    report = printed[0]
    assert (report["pairs"], report["bad"]) == (len(pairs), 0)
    entries = [json.loads(line) for line in Path(report["refs"]).read_text().splitlines()]
    assert {e["key"] for e in entries} == pairs
    assert all(math.isfinite(e["ref_chosen_logp"] + e["ref_rejected_logp"]) for e in entries)


def _trained(out: Path, pairs: int) -> list[dict]:
    """The run's metric lines, after checking its summary, checkpoint and model folder."""
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["pairs"], summary["bad_pairs"]) == (STEPS, pairs, 0)
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{STEPS:08d}"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    for line in lines:
        assert all(math.isfinite(v) for k, v in line.items() if k not in ("step", "epoch"))
    # The policy starts as the reference: log 2, to the float rounding of the reference pass's
    # group rows (a sample's pairs in one row; ~1e-7 of log-probs near -100, times beta).
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    return lines


def test_train_lora(family):
    out = family.train("lora")
    _trained(out, len(list(read_pairs(family.bootstrap_self()))))
    model = out / "model"
    adapter = json.loads((model / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == family.model["name_or_path"]
    assert not (model / "config.json").exists()  # the adapter alone
    lora_b = [w for k, w in load_file(model / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(bool(w.abs().max() > 0) for w in lora_b)  # initialised at zero
    # It loads back over its base with peft (`bpo eval` loads it through transformers).
    base, _ = load_model_and_processor(family.model["name_or_path"], dtype="float32", device="cpu")
    loaded = PeftModel.from_pretrained(base, str(model))
    trained = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert len(trained) == len(lora_b) and any(bool(p.abs().max() > 0) for p in trained)


def test_train_full(family):
    out = family.train("full")
    lines = _trained(out, len(list(read_pairs(family.bootstrap_self()))))
    assert lines[1]["logps/chosen"] != lines[0]["logps/chosen"]  # the first step moved the weights
    assert (out / "model" / "config.json").is_file()


def test_eval_of_the_lora_adapter(family, benchmark):
    """The adapter folder loads over its base; every question answered; metrics are numbers."""
    adapter = family.train("lora") / "model"
    out = family.root / "eval"
    config = {
        "model": {**family.model, "name_or_path": str(adapter)},
        "generation": {"batch_size": 4, "max_new_tokens": 8},
        "benchmarks": [
            {"name": "shapeworld_chair", "data": str(benchmark)},
            {
                "name": "shapeworld_pope",
                "data": str(benchmark),
                "pope_per_image": 1,
                "pope_strategies": ["random"],
            },
        ],
    }
    path = _write(family.root / "eval.yaml", {"run": config})
    main(["eval", "--config", path, "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == str(adapter)
    expected = {"shapeworld_chair": SCENES, "shapeworld_pope": 2 * SCENES}  # 1 yes + 1 no each
    for bench, questions in expected.items():
        lines = (out / bench / "answers.jsonl").read_text().splitlines()
        answers = {json.loads(line)["question_id"]: json.loads(line)["answer"] for line in lines}
        assert len(answers) == questions and all(isinstance(a, str) for a in answers.values())
    chair = results["benchmarks"]["shapeworld_chair"]
    pope = results["benchmarks"]["shapeworld_pope"]["all"]
    assert chair["responses"] == SCENES and pope["questions"] == 2 * SCENES
    for metrics in (chair, pope):
        assert all(isinstance(v, int | float) and math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("name", REFUSED)
def test_refused_family_stops_bootstrap_before_any_pair(name, tiny_families, data, tmp_path):
    folder = tiny_families(name)
    assert family_of(AutoConfig.from_pretrained(folder)).unsupported
    run = FamilyRun(name, folder, data, tmp_path)
    with pytest.raises(UnsupportedModelError, match=f"model family '{name}' is not supported"):
        run.bootstrap_self()
    store = tmp_path / "pairs"
    assert not store.exists() or list(read_pairs(store)) == []
