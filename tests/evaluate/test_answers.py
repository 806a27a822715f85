"""`bpo eval` generating its answers with a tiny model: resumed, refused when settings change."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bpo.cli import main
from bpo.evaluate.answers import AnswersMismatchError
from bpo.evaluate.config import BenchmarkConfig, EvalConfig
from bpo.evaluate.run import run_eval
from bpo.models.load import ModelConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapeworld_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapeworld")
    main(["shapeworld", "--out", str(out), "--scenes", "3", "--seed", "2"])
    return out


def tiny_config(model_folder: Path, data: Path, max_new_tokens: int = 5) -> EvalConfig:
    return EvalConfig(
        model=ModelConfig(
            str(model_folder), dtype="float32", device="cpu", attn_implementation="eager"
        ),
        benchmarks=[
            BenchmarkConfig(name="shapeworld_chair", data=str(data), label="chair"),
            BenchmarkConfig(
                name="shapeworld_pope",
                data=str(data),
                label="pope",
                pope_strategies=["adversarial"],
                pope_per_image=1,
                max_new_tokens=max_new_tokens,
            ),
        ],
    )


def test_generated_answers_are_resumed_not_regenerated(
    tiny_llava_folder, shapeworld_data, tmp_path
):
    """Run once; cut the answers file to its first line plus half a line (a crash mid-write);
    rerun: the file is byte-for-byte what the first run wrote (greedy answers, question order).
    A stored answer is reused as stored, not regenerated: edited, it is what gets scored."""
    out = tmp_path / "run"
    config = tiny_config(tiny_llava_folder, shapeworld_data)
    first = run_eval(config, out, log=lambda _: None)
    answers = out / "pope" / "answers.jsonl"
    original = answers.read_text()
    lines = original.splitlines(keepends=True)
    assert len(lines) == 6  # 3 scenes x (1 yes + 1 no question)
    answers.write_text(lines[0] + lines[1][:10])
    second = run_eval(config, out, log=lambda _: None)
    assert answers.read_text() == original
    assert second["benchmarks"] == first["benchmarks"]

    edited = [json.loads(line) for line in lines]
    edited[0]["answer"] = "No."
    answers.write_text("".join(json.dumps(r) + "\n" for r in edited))
    run_eval(config, out, log=lambda _: None)
    record = json.loads((out / "pope" / "judgments.jsonl").open().readline())
    assert (record["answer"], record["prediction"]) == ("No.", "no")


def test_answers_made_with_other_settings_are_not_mixed(
    tiny_llava_folder, shapeworld_data, tmp_path
):
    out = tmp_path / "run"
    run_eval(tiny_config(tiny_llava_folder, shapeworld_data), out, log=lambda _: None)
    with pytest.raises(AnswersMismatchError, match="holds answers made with other settings"):
        run_eval(
            tiny_config(tiny_llava_folder, shapeworld_data, max_new_tokens=7),
            out,
            log=lambda _: None,
        )


def test_eval_verb_reads_a_yaml_config(tiny_llava_folder, shapeworld_data, tmp_path, capsys):
    """`bpo eval --config FILE` with the same schema; prints the table and writes the run."""
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"out: {tmp_path / 'cli-run'}\n"
        "run:\n"
        "  model:\n"
        f"    name_or_path: {tiny_llava_folder}\n"
        "    dtype: float32\n    device: cpu\n    attn_implementation: eager\n"
        "  generation:\n    max_new_tokens: 4\n"
        "  benchmarks:\n"
        f"  - name: shapeworld_chair\n    data: {shapeworld_data}\n    limit: 2\n"
    )
    main(["eval", "--config", str(config)])
    assert "| shapeworld_chair | chair_i |" in capsys.readouterr().out
    results = json.loads((tmp_path / "cli-run" / "results.json").read_text())
    assert results["benchmarks"]["shapeworld_chair"]["responses"] == 2
    assert results["model"] == str(tiny_llava_folder)
    assert set(results["versions"]) >= {"bpo", "torch", "transformers"}


@pytest.mark.slow  # the stand-in engine decodes with full forward passes (about 20 s)
def test_the_vllm_backend_answers_like_transformers(
    tiny_llava_folder, shapeworld_data, tmp_path, monkeypatch
):
    """`generation.backend: vllm` runs through a VllmGenerator (here over the stand-in engine of
    tests/fake_vllm.py, which runs the tiny model on exactly the prompts and images it is
    handed): its greedy answers and scores equal the transformers backend's."""
    import fake_vllm

    fake_vllm.install(monkeypatch)
    base = tiny_config(tiny_llava_folder, shapeworld_data)
    expected = run_eval(base, tmp_path / "hf", log=lambda _: None)
    vllm = dataclasses.replace(
        base, generation=dataclasses.replace(base.generation, backend="vllm")
    )
    got = run_eval(vllm, tmp_path / "vllm", log=lambda _: None)
    assert got["benchmarks"] == expected["benchmarks"]
    for bench in ("chair", "pope"):
        hf = (tmp_path / "hf" / bench / "answers.jsonl").read_text()
        assert (tmp_path / "vllm" / bench / "answers.jsonl").read_text() == hf
    (engine,) = fake_vllm.FakeLLM.instances
    assert engine.kwargs["model"] == str(tiny_llava_folder)
    assert len(engine.calls) >= 2  # one call per benchmark chunk at least


def test_one_question_asked_twice_is_generated_once(tiny_llava_folder, shapeworld_data, tmp_path):
    """The popular and adversarial strategies draw the same positives (one seeded generator per
    strategy, consumed the same way), so POPE asks some questions of an image twice. Greedy, they
    are generated once and each question id gets that answer; sampled, each is its own request.
    The answers equal those of a run that asks every question alone (batch size 1)."""
    from bpo.evaluate.benchmarks import read_items
    from bpo.generate import TransformersGenerator

    config = tiny_config(tiny_llava_folder, shapeworld_data)
    pope = dataclasses.replace(config.benchmarks[1], pope_strategies=["popular", "adversarial"])
    config = dataclasses.replace(config, benchmarks=[pope])
    items = read_items(pope)
    unique = {(str(item.image), item.prompt) for item in items}
    assert len(items) == 12 and len(unique) < len(items)  # 3 scenes x 2 strategies x (yes + no)
    asked: list[int] = []
    generate = TransformersGenerator.generate

    def counting(self, requests, *args, **kwargs):
        asked.append(len(requests))
        return generate(self, requests, *args, **kwargs)

    TransformersGenerator.generate = counting
    try:
        run_eval(config, tmp_path / "greedy", log=lambda _: None)
        assert sum(asked) == len(unique)
        asked.clear()
        sampled = dataclasses.replace(
            config, generation=dataclasses.replace(config.generation, do_sample=True)
        )
        run_eval(sampled, tmp_path / "sampled", log=lambda _: None)
        assert sum(asked) == len(items)
    finally:
        TransformersGenerator.generate = generate
    alone = dataclasses.replace(
        config, generation=dataclasses.replace(config.generation, batch_size=1)
    )
    run_eval(alone, tmp_path / "alone", log=lambda _: None)

    def answers(folder: Path) -> dict[str, str]:
        lines = (folder / "pope" / "answers.jsonl").read_text().splitlines()
        return {(r := json.loads(line))["question_id"]: r["answer"] for line in lines}

    greedy = answers(tmp_path / "greedy")
    assert sorted(greedy) == sorted(item.question_id for item in items)
    assert greedy == answers(tmp_path / "alone")
