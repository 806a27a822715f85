"""`bpo iterate` end to end on a tiny ShapeWorld setup: three rounds, killed twice and resumed,
give the stores, the training logs and the metrics of an uninterrupted run, byte for byte.

Each run writes to the relative folder `runs` inside its own working directory, so the paths the
stores record (a weakened negative's generator is its policy's folder) are the same in both.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import yaml
from rounds_helpers import STEPS, tiny_iterate_config, write_shapeworld

from bpo.bootstrap.config import InjectConfig
from bpo.cli import main
from bpo.data import read_manifest, read_pairs
from bpo.rounds.run import run_rounds

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROUNDS = 3


class Killed(Exception):
    """Stands in for a kill: raised from a hook in the middle of a round."""


@pytest.fixture(scope="module")
def shapeworld(tmp_path_factory) -> tuple[Path, Path]:
    return write_shapeworld(tmp_path_factory.mktemp("shapeworld"))


def store_files(store: Path) -> dict[str, bytes]:
    """A store's pair shards and bad records (the manifest holds times and versions)."""
    files = [*sorted(store.glob("pairs-*.jsonl")), store / "bad_records.jsonl"]
    return {f.name: f.read_bytes() for f in files if f.exists()}


def outputs(run: Path) -> dict[str, bytes]:
    """Every file whose content a resume must reproduce: stores, training logs, models, metrics."""
    found = {"rounds.json": (run / "rounds.json").read_bytes()}
    for k in range(1, ROUNDS + 1):
        root = run / f"round-{k}"
        for folder in ("pairs", "weaken"):
            for name, data in store_files(root / folder).items():
                found[f"round-{k}/{folder}/{name}"] = data
        for name in ("train/metrics.jsonl", "train/model/model.safetensors"):
            found[f"round-{k}/{name}"] = (root / name).read_bytes()
        results = json.loads((root / "eval" / "results.json").read_text())
        found[f"round-{k}/benchmarks"] = json.dumps(results["benchmarks"]).encode()
    return found


def test_killed_and_resumed_rounds_equal_an_uninterrupted_run(
    tiny_llava_folder, shapeworld, tmp_path, monkeypatch
):
    align, held = shapeworld
    config = tiny_iterate_config(tiny_llava_folder, align, held, "runs")

    # Uninterrupted, through the CLI: `bpo iterate --config FILE`.
    (tmp_path / "whole").mkdir()
    monkeypatch.chdir(tmp_path / "whole")
    Path("iterate.yaml").write_text(yaml.safe_dump(json.loads(json.dumps({"run": asdict(config)}))))
    main(["iterate", "--config", "iterate.yaml"])
    whole = tmp_path / "whole" / "runs"

    # Killed in round 2's training after step 2 (its checkpoint written), then after round 3's
    # bootstrap; each time resumed by running the same config again.
    (tmp_path / "killed").mkdir()
    monkeypatch.chdir(tmp_path / "killed")
    logs: list[str] = []

    def kill_at_step(k: int, step: int, _line: dict) -> None:
        if (k, step) == (2, 2):
            raise Killed

    with pytest.raises(Killed):
        run_rounds(config, log=logs.append, on_step=kill_at_step, progress=False)
    assert json.loads(Path("runs/round-1/round.json").read_text())["complete"] is True
    assert json.loads(Path("runs/round-2/round.json").read_text())["complete"] is False

    def kill_before_round_3_trains(message: str) -> None:
        logs.append(message)
        if message.startswith("round 3: training"):
            raise Killed

    with pytest.raises(Killed):
        run_rounds(config, log=kill_before_round_3_trains, progress=False)
    assert "round 1: complete (runs/round-1/round.json), skipped" in logs
    assert any("resumed from runs/round-2/train/checkpoints/step-00000002" in m for m in logs)
    summary = run_rounds(config, log=logs.append, progress=False)
    assert "round 3: pairs reused from runs/round-3/weaken" in logs
    killed = tmp_path / "killed" / "runs"

    assert outputs(killed) == outputs(whole)
    assert summary == json.loads((whole / "rounds.json").read_text())

    # The best round is the one with the lowest CHAIR_i in its own results.json (the earliest on
    # a tie), and rounds.json points at its checkpoint.
    chair = [
        json.loads((whole / f"round-{k}/eval/results.json").read_text())["benchmarks"][
            "shapeworld_chair"
        ]["chair_i"]
        for k in range(1, ROUNDS + 1)
    ]
    best = chair.index(min(chair)) + 1
    assert summary["best"] == {
        "round": best,
        "checkpoint": f"runs/round-{best}/train/model",
        "value": min(chair),
    }
    assert [r["select_value"] for r in summary["rounds"]] == chair

    # A finished run rerun does nothing: every round is skipped, rounds.json is unchanged.
    logs.clear()
    assert run_rounds(config, log=logs.append, progress=False) == summary
    assert [m for m in logs if m.endswith("skipped")] == [
        f"round {k}: complete (runs/round-{k}/round.json), skipped" for k in range(1, ROUNDS + 1)
    ]
    check_round_provenance(whole, str(tiny_llava_folder))

    # Other settings for rounds already run are refused, before any work.
    other = replace(config, train=replace(config.train, lr=0.02))
    with pytest.raises(ValueError, match=r"round-1/round.json: the round was run with other "):
        run_rounds(other, log=logs.append, progress=False)
    # Another select metric re-chooses among the rounds run, from their results.json.
    rounds = replace(config.rounds, select_metric="shapeworld_chair.recall", select_mode="max")
    rechosen = run_rounds(replace(config, rounds=rounds), log=logs.append, progress=False)
    recall = [
        json.loads((killed / f"round-{k}/eval/results.json").read_text())["benchmarks"][
            "shapeworld_chair"
        ]["recall"]
        for k in range(1, ROUNDS + 1)
    ]
    assert [r["select_value"] for r in rechosen["rounds"]] == recall
    assert rechosen["best"]["round"] == recall.index(max(recall)) + 1


def check_round_provenance(run: Path, base: str) -> None:
    """Round k weakens with round k-1's policy and reuses round 1's injected pairs (made by the
    base model); each checkpoint is a merged, plain model; round.json records where all came
    from."""
    first = [p for p in read_pairs(run / "round-1" / "pairs") if p.source == "inject"]
    for k in range(1, ROUNDS + 1):
        root = run / f"round-{k}"
        policy = base if k == 1 else f"runs/round-{k - 1}/train/model"
        pairs = list(read_pairs(root / "pairs"))
        weakened = [p for p in pairs if p.source == "weaken"]
        assert weakened and {p.meta["generator"] for p in weakened} == {policy}
        assert [p for p in pairs if p.source == "inject"] == first
        assert read_manifest(root / "pairs")["complete"] is True
        model = root / "train" / "model"
        assert (model / "config.json").is_file() and not (model / "adapter_config.json").exists()
        record = json.loads((root / "round.json").read_text())
        assert (record["round"], record["policy"], record["complete"]) == (k, policy, True)
        assert record["checkpoint"] == f"runs/round-{k}/train/model"
        assert record["injected_pairs_from"] == "runs/round-1/pairs"
        assert record["train"]["steps"] == STEPS and record["train"]["pairs"] == len(pairs)
        assert record["select_value"] == record["metrics"]["shapeworld_chair.chair_i"]
        train = yaml.safe_load((root / "configs" / "train.yaml").read_text())["run"]
        assert (train["model"]["name_or_path"], train["pairs"]) == (policy, f"runs/round-{k}/pairs")
    assert not (run / "round-1" / "weaken").exists()


def test_policy_injection_rewrites_with_each_rounds_policy(
    tiny_llava_folder, shapeworld, tmp_path, monkeypatch
):
    """inject_model "policy": round 2's rewrites come from round 1's checkpoint, in the round's
    own bootstrap store (no weaken/ folder, nothing joined)."""
    align, held = shapeworld
    monkeypatch.chdir(tmp_path)
    config = tiny_iterate_config(
        tiny_llava_folder, align, held, "runs", rounds=2, inject_model="policy"
    )
    inject = InjectConfig(kind="self", max_new_tokens=8, min_ratio=0.0, max_ratio=100.0)
    config = replace(
        config,
        bootstrap=replace(config.bootstrap, inject=inject),
        train=replace(config.train, max_steps=1),
    )
    run_rounds(config, log=lambda _m: None, progress=False)
    for k, policy in ((1, str(tiny_llava_folder)), (2, "runs/round-1/train/model")):
        manifest = read_manifest(Path(f"runs/round-{k}/pairs"))
        assert manifest["config"]["model"]["name_or_path"] == policy
        assert manifest["config"]["inject"]["kind"] == "self"
        made = manifest["counts"]["by_source"].get("inject", 0)
        rejected = sum(n for r, n in manifest["bad_records"]["by_reason"].items() if "inject" in r)
        assert made + rejected == 4  # every sample rewritten, or its reject counted
        generators = {
            p.meta["generator"] for p in read_pairs(f"runs/round-{k}/pairs") if p.source == "inject"
        }
        assert generators == {policy}  # the tiny model's rewrites pass the relaxed bounds
        assert not Path(f"runs/round-{k}/weaken").exists()
