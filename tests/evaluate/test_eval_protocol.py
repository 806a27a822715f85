"""Per-benchmark judge settings and the reference protocol files, end to end through `bpo eval`
on the tiny local fixtures and a real local HTTP judge."""

from __future__ import annotations

import hashlib
import json

import pytest
from test_eval_run import benchmarks, offline_config  # noqa: F401 (a fixture)

from bpo.endpoint import EndpointConfig
from bpo.evaluate.benchmarks import JudgeSettings
from bpo.evaluate.config import BenchmarkConfig, EvalConfig, check_config
from bpo.evaluate.run import OWN_PROMPTS_MARK, compare_runs, run_eval

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MMVET_PROMPT = (
    "Grade the prediction from 0.0 to 1.0.\nQuestion | Ground truth | Prediction | Correctness"
)
RULES = {
    f"llava_bench_{c}": {"role": "Assistant", "prompt": f"Rule for {c}: two scores first."}
    for c in ("conv", "detail", "complex")
}
OBJECTS_PROMPT = "List the objects.\nQ: {question}\nA: {answer}\nReply with a JSON list."


def judged_only(data, url: str, **bench_options) -> EvalConfig:
    """The MM-Vet and LLaVA-Bench benchmarks of the shared fixtures; options per benchmark."""
    config = offline_config(data, url)
    config.benchmarks = [b for b in config.benchmarks if b.name in ("mmvet", "llava_bench")]
    for bench in config.benchmarks:
        for option, value in bench_options.get(bench.name, {}).items():
            setattr(bench, option, value)
    config.judge.api_key_env = None
    return config


def grade_or_review(body) -> tuple[int, str, dict]:
    """A grade for a grading request, a review for a review request (told apart by the text)."""
    text = body["messages"][-1]["content"]
    return 200, ("8 6\nfine" if "Assistant 1]" in text else "0.5"), {}


def test_each_benchmark_asks_with_its_references_settings(benchmarks, judge_server, tmp_path):  # noqa: F811
    """MM-Vet's evaluator asks at temperature 0.0 for 3 tokens, LLaVA's review script at 0.2 for
    up to 1024; the `judge:` section's own 0.0 / 512 apply to neither. A benchmark's `judge:`
    override (model "grader-2", temperature 0.1) wins for its requests alone."""
    judge_server.reply = grade_or_review
    run_eval(judged_only(benchmarks, judge_server.url), tmp_path / "a", log=lambda _: None)
    seen = {
        (s.body["model"], s.body["temperature"], s.body["max_tokens"]) for s in judge_server.seen
    }
    assert seen == {("judge-model", 0.0, 3), ("judge-model", 0.2, 1024)}
    assert len(judge_server.seen) == 6

    judge_server.seen.clear()
    override = {"mmvet": {"judge": JudgeSettings(model="grader-2", temperature=0.1)}}
    results = run_eval(
        judged_only(benchmarks, judge_server.url, **override), tmp_path / "b", log=lambda _: None
    )
    bodies = [s.body for s in judge_server.seen]
    grading = [b for b in bodies if "Assistant 1]" not in b["messages"][-1]["content"]]
    assert {(b["model"], b["temperature"], b["max_tokens"]) for b in grading} == {
        ("grader-2", 0.1, 3)
    }
    assert len(bodies) == 6  # the override is a new cache key; LLaVA-Bench's replies are not
    assert results["protocol"]["mmvet"]["judge"] == {
        "model": "grader-2",
        "temperature": 0.1,
        "max_tokens": 3,
        "parse_retries": 4,
    }
    assert results["protocol"]["mmvet"]["reference_judge"] == "gpt-4-0613"


def test_reference_prompt_files_are_asked_as_the_reference_scripts_ask(
    benchmarks,  # noqa: F811
    judge_server,
    tmp_path,
):
    """MM-Vet: one user message, the prompt then the row "Solve it. | 3  <AND>  -2 | x = 3 | "
    (spaces around <AND>, as its evaluator adds them). LLaVA-Bench: the rule of
    llava_bench_{category} after [Context], [Question] and both answers, with LLaVA's system
    message. results.json names the files and their SHA-256; results.md marks no number."""
    judge_server.reply = grade_or_review
    mmvet_file, rule_file = tmp_path / "mmvet_prompt.txt", tmp_path / "rule.json"
    mmvet_file.write_text(MMVET_PROMPT)
    rule_file.write_text(json.dumps(RULES))
    options = {
        "mmvet": {"judge_prompt": str(mmvet_file)},
        "llava_bench": {"judge_prompt": str(rule_file)},
    }
    out = tmp_path / "run"
    results = run_eval(
        judged_only(benchmarks, judge_server.url, **options), out, log=lambda _: None
    )
    texts = [s.body["messages"] for s in judge_server.seen]
    assert [
        {"role": "user", "content": f"{MMVET_PROMPT}\nSolve it. | 3  <AND>  -2 | x = 3 | "}
    ] in texts
    detail = next(m for m in texts if "Rule for detail" in m[-1]["content"])
    assert detail[0] == {
        "role": "system",
        "content": "You are a helpful and precise assistant for checking the quality of the answer.",
    }
    assert detail[1]["content"] == (
        "[Context]\nA dog on grass.\n\n[Question]\nDescribe it.\n\n"
        "[Assistant 1]\nreference 1\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nmine 1\n\n[End of Assistant 2]\n\n"
        "[System]\nRule for detail: two scores first.\n\n"
    )
    protocol = results["protocol"]
    assert protocol["mmvet"]["prompts"] == protocol["llava_bench"]["prompts"] == "file"
    assert protocol["mmvet"]["prompt_sha256"] == hashlib.sha256(MMVET_PROMPT.encode()).hexdigest()
    assert protocol["llava_bench"]["prompt_file"] == str(rule_file)
    assert OWN_PROMPTS_MARK not in (out / "results.md").read_text()


def test_numbers_judged_with_bpos_prompts_are_marked(benchmarks, judge_server, tmp_path):  # noqa: F811
    """Without prompt files both benchmarks are bpo-protocol only: results.md marks their numbers
    (mmvet total 100 * 0.5 = 50.00) and explains the mark; compare marks them the same way,
    but not the unjudged POPE column of another run."""
    judge_server.reply = grade_or_review
    out = tmp_path / "run"
    results = run_eval(judged_only(benchmarks, judge_server.url), out, log=lambda _: None)
    assert results["protocol"]["mmvet"]["prompts"] == "bpo"
    table = (out / "results.md").read_text()
    assert f"| mmvet | total | 50.00{OWN_PROMPTS_MARK} |" in table
    assert "bpo protocol only" in table.splitlines()[-1]
    assert f"| mmvet | total | 50.00{OWN_PROMPTS_MARK} |" in compare_runs([out])


def test_the_judge_lists_objects_from_a_prompt_file_and_short_answers_are_not_asked(
    benchmarks,  # noqa: F811
    judge_server,
    tmp_path,
):
    """RLHF-V's extraction prompt, filled, as one system message at temperature 0.2 with up to
    512 tokens. "A man rides a bicycle." has 5 words and is asked; "Two dogs." (2 words) is a
    short answer: no request, no objects. Image 2 (person, bicycle): the judge lists "man",
    "bicycle", "dog bed" -> person, bicycle (dog bed names nothing): chair_i 0, chair_s 0."""
    judge_server.reply = lambda body: (200, '["man", "bicycle", "dog bed"]', {})
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        json.dumps({"question_id": "1", "answer": "Two dogs."})
        + "\n"
        + json.dumps({"question_id": "2", "answer": "A man rides a bicycle."})
        + "\n"
    )
    prompt = tmp_path / "objects.txt"
    prompt.write_text(OBJECTS_PROMPT)
    root = benchmarks["root"]
    config = offline_config(benchmarks, judge_server.url)
    config.judge.api_key_env = None
    config.benchmarks = [
        BenchmarkConfig(
            name="object_halbench",
            data=str(root / "objhal" / "obj_halbench.jsonl"),
            answers=str(answers),
            coco_instances=[str(root / "coco" / "instances.json")],
            coco_captions=[str(root / "coco" / "captions.json")],
            judge_objects=True,
            judge_prompt=str(prompt),
        )
    ]
    results = run_eval(config, tmp_path / "run", log=lambda _: None)
    (seen,) = judge_server.seen
    assert seen.body["messages"] == [
        {
            "role": "system",
            "content": "List the objects.\nQ: What is going on?\nA: A man rides a bicycle.\n"
            "Reply with a JSON list.",
        }
    ]
    assert (seen.body["temperature"], seen.body["max_tokens"]) == (0.2, 512)
    metrics = results["benchmarks"]["object_halbench"]
    assert (metrics["short_answers"], metrics["mentions"], metrics["chair_s"]) == (1, 2, 0.0)
    assert results["protocol"]["object_halbench"]["prompts"] == "file"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"judge_prompt": "/no/such/rule.json"}, "judge_prompt /no/such/rule.json is not a file"),
        ({"judge": JudgeSettings(temperature=3.0)}, "judge.temperature is 3.0; use 0 to 2"),
        ({"judge": JudgeSettings(max_tokens=0)}, "judge.max_tokens is 0; use at least 1"),
    ],
)
def test_judge_settings_that_cannot_run_fail_at_check_time(options, message):
    bench = BenchmarkConfig(name="llava_bench", data="x", answers="a", **options)
    config = EvalConfig(benchmarks=[bench], judge=EndpointConfig(api_key_env=None))
    with pytest.raises(ValueError, match=message):
        check_config(config)


def test_judge_options_on_word_read_object_halbench_are_refused():
    bench = BenchmarkConfig(
        name="object_halbench", data="x", answers="a", coco_instances=["i.json"], judge_prompt="p"
    )
    with pytest.raises(ValueError, match="judge_prompt set, but without judge_objects"):
        check_config(EvalConfig(benchmarks=[bench]))
