"""The benchmark table and the config check: names, defaults and settings refused before any work."""

from __future__ import annotations

from typing import get_args

import pytest

from bpo.endpoint import EndpointConfig
from bpo.evaluate.benchmarks import (
    BENCHMARKS,
    POPE_SUFFIX,
    BenchmarkConfig,
    BenchmarkName,
    needs_judge,
    question_text,
)
from bpo.evaluate.config import EvalConfig, check_config
from bpo.evaluate.datasets import EvalItem
from bpo.evaluate.run import run_eval

JUDGE = EndpointConfig(base_url="http://127.0.0.1:9/v1", api_key_env=None)


def test_the_schemas_names_are_the_tables():
    """The Literal the YAML schema checks and the table the runner reads name the same benchmarks,
    in the same order (the order `--help` and the error messages list them in)."""
    assert get_args(BenchmarkName) == tuple(BENCHMARKS)


@pytest.mark.parametrize(
    ("name", "judge_objects", "judged"),
    [
        ("pope", False, False),
        ("object_halbench", False, False),
        ("object_halbench", True, True),
        ("mmvet", False, True),
        ("llava_bench", False, True),
        ("shapeworld_chair", False, False),
        ("shapeworld_pope", False, False),
    ],
)
def test_which_benchmarks_need_the_judge(name, judge_objects, judged):
    bench = BenchmarkConfig(name=name, data="x", judge_objects=judge_objects)
    assert needs_judge(bench) is judged


def test_pope_asks_for_one_word_unless_the_config_says_otherwise():
    """Both POPE benchmarks append LLaVA-1.5's suffix and answer in 16 tokens; the others ask
    the question as it is; a config's own suffix (even an empty one) wins."""
    item = EvalItem("q", "Is there a dog in the image?")
    assert question_text(BenchmarkConfig(name="pope", data="x"), item) == (
        f"Is there a dog in the image?\n{POPE_SUFFIX}"
    )
    assert question_text(BenchmarkConfig(name="mmvet", data="x"), item) == item.prompt
    bare = BenchmarkConfig(name="shapeworld_pope", data="x", prompt_suffix="")
    assert question_text(bare, item) == item.prompt
    assert BENCHMARKS["pope"].max_new_tokens == BENCHMARKS["shapeworld_pope"].max_new_tokens == 16
    assert BENCHMARKS["mmvet"].max_new_tokens is None


def refused(bench: BenchmarkConfig, **config) -> str:
    with pytest.raises(ValueError) as caught:
        check_config(EvalConfig(benchmarks=[bench], **config))
    return str(caught.value)


def test_an_unknown_benchmark_fails_at_check_time_naming_the_known_ones(tmp_path):
    """Before any file is read or folder written: the data path here does not exist."""
    bench = BenchmarkConfig(name="chairs", data=str(tmp_path / "missing"), answers="a.jsonl")
    assert refused(bench) == (
        "unknown benchmark 'chairs'; use one of pope, object_halbench, mmvet, llava_bench, "
        "shapeworld_chair, shapeworld_pope" + "".join(f", {n}" for n in list(BENCHMARKS)[6:])
    )
    with pytest.raises(ValueError, match="unknown benchmark 'chairs'"):
        run_eval(EvalConfig(benchmarks=[bench]), tmp_path / "run", log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_an_option_the_benchmark_does_not_read_is_refused():
    """pope_rank_scenes and judge_objects set on COCO POPE would be silently ignored."""
    bench = BenchmarkConfig(
        name="pope", data="x", answers="a", pope_rank_scenes="s.jsonl", judge_objects=True
    )
    assert refused(bench) == (
        "benchmark pope: pope does not read judge_objects, pope_rank_scenes (of the "
        "benchmark-specific options it reads image_root, split); remove them"
    )
    chair = BenchmarkConfig(name="shapeworld_chair", data="x", answers="a", image_root="imgs")
    assert "shapeworld_chair does not read image_root" in refused(chair)
    # An option left at its default is not "set", whatever the benchmark.
    check_config(
        EvalConfig(benchmarks=[BenchmarkConfig(name="mmvet", data="x", answers="a")], judge=JUDGE)
    )


@pytest.mark.parametrize(
    ("bench", "message"),
    [
        (
            BenchmarkConfig(name="object_halbench", data="x", answers="a"),
            r"benchmark object_halbench needs `coco_instances` \(and `coco_captions`\)",
        ),
        (
            BenchmarkConfig(
                name="shapeworld_pope", data="x", answers="a", pope_strategies=["rare"]
            ),
            r"pope_strategies \['rare'\] must be some of random, popular, adversarial",
        ),
        (
            BenchmarkConfig(name="shapeworld_pope", data="x", answers="a", pope_strategies=[]),
            r"pope_strategies \[\] must be some of",
        ),
        (
            BenchmarkConfig(name="shapeworld_pope", data="x", answers="a", pope_per_image=0),
            "pope_per_image is 0; ask at least 1 question per image",
        ),
        (
            BenchmarkConfig(name="pope", data="x", answers="a", limit=0),
            "benchmark pope: limit is 0; use a positive number or null",
        ),
        (
            BenchmarkConfig(name="mmvet", data="x", answers="a", label="mm"),
            "benchmark mm needs a judge: add a `judge:` section",
        ),
        (
            BenchmarkConfig(name="pope", data="x"),
            "benchmark pope has no `answers:` file and the config no `model:`",
        ),
    ],
)
def test_settings_that_cannot_run_fail_at_check_time(bench, message):
    with pytest.raises(ValueError, match=message):
        check_config(EvalConfig(benchmarks=[bench]))


def test_generation_settings_are_checked_too():
    bench = BenchmarkConfig(name="pope", data="x", answers="a")
    config = EvalConfig(benchmarks=[bench])
    config.generation.batch_size = 0
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        check_config(config)
