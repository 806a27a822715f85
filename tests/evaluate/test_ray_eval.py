"""`bpo eval` generating its answers on a real local Ray cluster (2 replicas of the tiny LLaVA).

The oracle is the same config run in this process: the Ray run's answers files must be the same
bytes (the answers, in question order), its results the same numbers, and a Ray run cut short
(its answers file left with one line and half of the next, as a kill leaves it) must resume to
the same file. Greedy answers do not depend on which replica made them; sampled ones are keyed by
question id, so they do not either.
"""

from __future__ import annotations

import dataclasses

import pytest

from bpo.cli import main
from bpo.evaluate.config import BenchmarkConfig, EvalConfig, check_config
from bpo.evaluate.run import run_eval
from bpo.generate.ray_cluster import RayConfig
from bpo.models.config import ModelConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_llava_folder) -> EvalConfig:
    data = tmp_path_factory.mktemp("shapeworld")
    main(["shapeworld", "--out", str(data), "--scenes", "6", "--seed", "4"])
    model = ModelConfig(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
    )
    return EvalConfig(
        model=model,
        benchmarks=[
            BenchmarkConfig(name="shapeworld_chair", data=str(data), label="chair"),
            BenchmarkConfig(name="shapeworld_pope", data=str(data), label="pope", pope_per_image=1),
        ],
        # batch 1: a chunk is 8 questions, so 6 captions and 36 POPE questions make several
        # chunks, spread over both replicas.
        generation=dataclasses.replace(EvalConfig().generation, batch_size=1, max_new_tokens=12),
    )


def test_a_ray_run_writes_the_answers_of_a_local_run_and_resumes_to_them(
    config, ray_cluster, tmp_path
):
    local = run_eval(config, tmp_path / "local", log=lambda _: None)
    on_ray = dataclasses.replace(config, ray=RayConfig(replicas=2, cpus_per_replica=1))
    check_config(on_ray)
    got = run_eval(on_ray, tmp_path / "ray", log=lambda _: None)
    assert got["benchmarks"] == local["benchmarks"]
    for label in ("chair", "pope"):
        expected = (tmp_path / "local" / label / "answers.jsonl").read_bytes()
        assert (tmp_path / "ray" / label / "answers.jsonl").read_bytes() == expected
        # 6 captions; POPE: 6 scenes x 3 strategies x (1 present + 1 absent shape)
        assert expected.count(b"\n") == (6 if label == "chair" else 36)

    # A kill mid-write: the first line and a half of the POPE answers left, for both runs. The
    # second line is the same question as the first under another strategy (answered once), so
    # the resumed file must keep the uninterrupted run's record order, not regroup what is left.
    for run, run_config in (("local", config), ("ray", on_ray)):
        answers = tmp_path / run / "pope" / "answers.jsonl"
        original = answers.read_text()
        lines = original.splitlines(keepends=True)
        answers.write_text(lines[0] + lines[1][:7])
        (tmp_path / run / "results.json").unlink()
        resumed = run_eval(run_config, tmp_path / run, log=lambda _: None)
        assert answers.read_text() == original, run
        assert resumed["benchmarks"] == local["benchmarks"]


def test_a_ray_section_without_ray_fails_at_config_time(config, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'bpo\[ray\]'"):
        check_config(dataclasses.replace(config, ray=RayConfig()))
    check_config(config)  # a local run does not need ray
