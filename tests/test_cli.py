"""The `bpo` command line lists its verbs and parses configs into the one schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bpo.cli import _recipe_args, main


def test_help_lists_the_verbs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "demo" in text and "shapeworld" in text


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "bpo.cli", "demo", "--print_config"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "eval_scenes: 1500" in result.stdout
    assert "replay_weight:" in result.stdout


def test_shapeworld_verb_writes_a_llava_dataset(tmp_path, capsys):
    """`bpo shapeworld` writes a dataset that the LLaVA reader reads back without bad records."""
    from bpo.data import read_llava, split_records

    main(["shapeworld", "--out", str(tmp_path), "--scenes", "5", "--seed", "3"])
    samples, bad = split_records(read_llava(tmp_path / "data.json", image_root=tmp_path))
    assert bad == []
    assert len({s.id.split("#")[0] for s in samples}) == 5


ROUNDS_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "llava-1.5-7b-bpo-rounds.yaml"


def _printed_run(capsys, args: list[str]) -> dict:
    with pytest.raises(SystemExit) as exited:
        main([*args, "--print_config"])
    assert exited.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_iterate_recipe_reads_the_stage_sections_and_rounds(capsys):
    """`bpo iterate --recipe F` reads bootstrap, train, eval and rounds; flags override them."""
    recipe = yaml.safe_load(ROUNDS_RECIPE.read_text())
    printed = _printed_run(
        capsys, ["iterate", "--recipe", str(ROUNDS_RECIPE), "--run.rounds.rounds", "2"]
    )["run"]
    assert printed["bootstrap"]["data"] == recipe["bootstrap"]["run"]["data"]
    assert printed["train"]["max_steps"] == recipe["train"]["run"]["max_steps"] == 4167
    names = [b["name"] for b in printed["eval"]["benchmarks"]]
    assert names == ["object_halbench", "pope"]
    assert printed["rounds"]["rounds"] == 2  # the flag, over the recipe's 3
    assert printed["rounds"]["select_metric"] == "object_halbench.chair_i"
    assert printed["out"] == recipe["rounds"]["out"]


def test_iterate_config_file_and_out_flag(tmp_path, capsys):
    """`bpo iterate --config FILE` reads the same schema; --out is a flag of its own."""
    recipe = yaml.safe_load(ROUNDS_RECIPE.read_text())
    run = {s: recipe[s]["run"] for s in ("bootstrap", "train", "eval", "rounds")}
    path = tmp_path / "iterate.yaml"
    path.write_text(yaml.safe_dump({"run": {**run, "out": "runs/x"}}))
    printed = _printed_run(capsys, ["iterate", "--config", str(path), "--out", "elsewhere"])
    assert (printed["out"], printed["run"]["out"]) == ("elsewhere", "runs/x")
    assert printed["run"]["rounds"]["inject_model"] == "base"


def test_iterate_recipe_args_and_a_missing_rounds_section(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "bootstrap: {run: {data: d}}\ntrain: {run: {lr: 1}}\neval: {run: {name: e}}\n"
        "rounds: {out: o, run: {rounds: 2}}\n"
    )
    args = _recipe_args(["iterate", "--recipe", str(recipe), "--run.rounds.rounds", "4"])
    assert args[:2] == ["iterate", "--config"] and args[3:] == ["--run.rounds.rounds", "4"]
    assert json.loads(args[2]) == {
        "run": {
            "bootstrap": {"data": "d"},
            "train": {"lr": 1},
            "eval": {"name": "e"},
            "rounds": {"rounds": 2},
            "out": "o",
        }
    }
    recipe.write_text("bootstrap: {run: {}}\ntrain: {run: {}}\neval: {run: {}}\n")
    with pytest.raises(SystemExit, match=r"has no `rounds:` section \(it has: bootstrap, train"):
        _recipe_args(["iterate", "--recipe", str(recipe)])


def test_iterate_setting_error_is_one_line(tmp_path, capsys):
    """A bad rounds setting stops `bpo iterate` before any work, as one line with exit 2."""
    from bpo.cli import run

    with pytest.raises(SystemExit) as exited:
        run(["iterate", "--recipe", str(ROUNDS_RECIPE), "--run.rounds.select_metric", "pope"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "bpo iterate: error: rounds.select_metric 'pope' must be BENCHMARK.METRIC"
    )
    assert "\n" not in err
