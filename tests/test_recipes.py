"""The paper's recipes (configs/llava-1.5-*-bpo.yaml) drive bootstrap, train and eval end to end.

The end-to-end test runs each shipped recipe through the real CLI (`bpo.cli.main`) in a scratch
folder, so the recipe's own relative output folders are the ones that chain. Only the model (a
tiny LLaVA), the data (ShapeWorld in LLaVA JSON; ShapeWorld CHAIR and POPE instead of COCO), the
precision (fp32 on a CPU) and the sizes are overridden on the command line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from bpo.cli import _recipe_args, main
from bpo.data import read_bad_records, read_llava, read_manifest, read_pairs, split_records

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = [CONFIGS / "llava-1.5-7b-bpo.yaml", CONFIGS / "llava-1.5-13b-bpo.yaml"]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_stages_chain_through_their_folders(path):
    """bootstrap's pairs are train's; train's model is eval's; one base model, one image root."""
    recipe = load(path)
    assert set(recipe) == {"bootstrap", "train", "eval"}
    boot, train, evaluate = (recipe[k]["run"] for k in ("bootstrap", "train", "eval"))
    assert train["pairs"] == boot["out"]
    assert evaluate["model"]["name_or_path"] == f"{train['out']}/model"
    assert train["image_root"] == boot["image_root"]
    size = path.stem.split("-")[2]  # "7b" / "13b"
    assert boot["model"]["name_or_path"] == train["model"]["name_or_path"]
    assert train["model"]["name_or_path"] == f"llava-hf/llava-1.5-{size}-hf"
    assert recipe["eval"]["out"].startswith(str(Path(train["out"]).parent))
    # The paper's negatives: noise step 900 of the sigmoid schedule at T = 1; the model's own LM.
    weaken, inject = boot["weaken"], boot["inject"]
    assert isinstance(weaken, dict) and isinstance(inject, dict)  # neither method is off (null)
    assert (weaken["noise_steps"], weaken["schedule"], weaken["temperature"]) == (
        [900],
        "sigmoid",
        1,
    )
    assert inject["kind"] == "self"
    names = [b["name"] for b in evaluate["benchmarks"]]
    assert names == ["object_halbench", "pope", "mmvet", "llava_bench"]


def test_recipe_flag_becomes_the_sections_config(tmp_path):
    """`--recipe F` (or `--recipe=F`) is replaced, in place, by `--config` with the verb's
    section as JSON; refs reads train's; anchors are resolved; other verbs are untouched."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "bootstrap: {run: {out: &p runs/p}}\ntrain: {run: {pairs: *p}}\neval: {out: e}\n"
    )
    assert _recipe_args(["train", "--recipe", str(recipe), "--run.lr", "1"]) == [
        "train",
        "--config",
        '{"run": {"pairs": "runs/p"}}',
        "--run.lr",
        "1",
    ]
    assert _recipe_args(["refs", f"--recipe={recipe}"]) == [
        "refs",
        "--config",
        '{"run": {"pairs": "runs/p"}}',
    ]
    assert _recipe_args(["eval", "--out", "x", "--recipe", str(recipe)])[3:] == [
        "--config",
        '{"out": "e"}',
    ]
    assert _recipe_args(["merge", "--recipe", "x"]) == ["merge", "--recipe", "x"]
    recipe.write_text("train: {run: {pairs: p}}\n")
    with pytest.raises(SystemExit, match=r"has no `bootstrap:` section \(it has: train\)"):
        _recipe_args(["bootstrap", "--recipe", str(recipe)])
    with pytest.raises(SystemExit, match="is not a file"):
        _recipe_args(["train", "--recipe", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_print_config_shows_the_stage_with_overrides(path, capsys):
    """Flags after --recipe override the section, as they would a --config file."""
    with pytest.raises(SystemExit) as exited:
        main(["train", "--recipe", str(path), "--run.batch_size", "2", "--print_config"])
    assert exited.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["run"]
    train = load(path)["train"]["run"]
    assert printed["batch_size"] == 2 and printed["lr"] == train["lr"] == 2e-6
    assert printed["pairs"] == load(path)["bootstrap"]["run"]["out"]


def test_bootstrap_flags_turn_a_method_off_and_set_noise_steps(capsys):
    """`--run.inject null` turns injection off; `--run.weaken.noise_steps` takes a list."""
    path = RECIPES[0]
    flags = ["--run.inject", "null", "--run.weaken.noise_steps", "[500, 900]"]
    with pytest.raises(SystemExit) as exited:
        main(["bootstrap", "--recipe", str(path), *flags, "--print_config"])
    assert exited.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["run"]
    assert printed["inject"] is None and printed["weaken"]["noise_steps"] == [500, 900]
    assert printed["weaken"]["seed"] == load(path)["bootstrap"]["run"]["weaken"]["seed"]


SAMPLES = 6  # bootstrap.run.limit
BATCH = 2  # train.run.batch_size


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_bootstrap_train_eval(path, tiny_llava_folder, tmp_path, monkeypatch, capsys):
    """bootstrap -> train -> eval with the recipe's own output folders: pairs of both sources
    (every sample made or its reject counted), the trained adapter saved after the computed
    number of steps, loaded by eval over its base, and results.json with CHAIR and POPE."""
    monkeypatch.chdir(tmp_path)
    recipe = load(path)
    main(["shapeworld", "--out", "sw", "--scenes", "4"])
    main(["shapeworld", "--out", "sw-eval", "--scenes", "2", "--seed", "1", "--questions", "false"])
    tiny = [
        "--run.model.name_or_path",
        str(tiny_llava_folder),
        "--run.model.dtype",
        "float32",
        "--run.model.device",
        "cpu",
    ]

    main(
        [
            "bootstrap",
            "--recipe",
            str(path),
            *tiny,
            "--run.data",
            "sw/data.json",
            "--run.image_root",
            "sw",
            "--run.limit",
            str(SAMPLES),
            "--run.weaken.max_new_tokens",
            "8",
            "--run.inject.max_new_tokens",
            "12",
            "--run.batch_size",
            "4",
            "--run.chunk_size",
            "4",
        ]
    )
    store = Path(recipe["bootstrap"]["run"]["out"])
    samples, _ = split_records(read_llava("sw/data.json", image_root="sw"))
    assert len(samples) > SAMPLES  # the limit cut the file
    pairs, rejects = list(read_pairs(store)), list(read_bad_records(store))
    manifest = read_manifest(store)
    for source in ("weaken", "inject"):
        made = sum(p.source == source for p in pairs)
        lost = sum(b.reason.startswith(f"rejected_{source}_") for b in rejects)
        assert made + lost == SAMPLES, source
        assert manifest["counts"]["by_source"].get(source, 0) == made
    assert {p.source for p in pairs} == {"weaken", "inject"}
    assert manifest["complete"] is True
    noise = next(p.meta for p in pairs if p.source == "weaken")
    assert (noise["noise_step"], noise["temperature"]) == (900, 1.0)

    main(
        [
            "train",
            "--recipe",
            str(path),
            *tiny,
            "--run.image_root",
            "sw",
            "--run.batch_size",
            str(BATCH),
            "--run.precision",
            "fp32",
            "--run.num_workers",
            "0",
            "--run.reference_batch_size",
            "4",
        ]
    )
    train_out = Path(recipe["train"]["run"]["out"])
    summary = json.loads((train_out / "summary.json").read_text())
    epochs = recipe["train"]["run"]["epochs"]
    assert (summary["pairs"], summary["bad_pairs"]) == (len(pairs), 0)
    assert summary["steps"] == epochs * math.ceil(len(pairs) / BATCH)
    model_dir = train_out / "model"
    adapter = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_llava_folder)
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (32, 256, 0.05)
    # The folder holds the adapter alone (no config.json, no base weights), and it trained.
    assert not (model_dir / "config.json").exists()
    lora_b = [
        w for k, w in load_file(model_dir / "adapter_model.safetensors").items() if "lora_B" in k
    ]
    assert lora_b and any(bool(w.abs().max() > 0) for w in lora_b)  # initialised at zero

    benchmarks = [
        {"name": "shapeworld_chair", "data": "sw-eval"},
        {
            "name": "shapeworld_pope",
            "data": "sw-eval",
            "pope_per_image": 1,
            "pope_strategies": ["random"],
        },
    ]
    capsys.readouterr()
    main(
        [
            "eval",
            "--recipe",
            str(path),
            "--run.model.dtype",
            "float32",
            "--run.model.device",
            "cpu",
            "--run.generation.batch_size",
            "4",
            "--run.generation.max_new_tokens",
            "8",
            "--run.benchmarks",
            json.dumps(benchmarks),
        ]
    )
    eval_out = Path(recipe["eval"]["out"])
    results = json.loads((eval_out / "results.json").read_text())
    assert results["model"] == str(model_dir) == recipe["eval"]["run"]["model"]["name_or_path"]
    chair = results["benchmarks"]["shapeworld_chair"]
    assert chair["responses"] == 2 and 0 <= chair["chair_i"] <= 1
    pope = results["benchmarks"]["shapeworld_pope"]["all"]
    assert pope["questions"] == 4  # 2 scenes x (1 yes + 1 no) questions
    assert pope["accuracy"] == (pope["tp"] + pope["tn"]) / 4 and pope["tp"] + pope["fn"] == 2
    assert "| shapeworld_chair | chair_i |" in capsys.readouterr().out
