"""`bpo eval` end to end on answer files: local benchmark folders, a local judge, `bpo compare`."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from bpo.cli import main
from bpo.endpoint import EndpointConfig
from bpo.evaluate.config import BenchmarkConfig, EvalConfig
from bpo.evaluate.run import compare_runs, markdown_table, run_eval

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = "sk-runner-test-9f8e7d6c5b4a"


def png(colour=(255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def benchmarks(tmp_path) -> dict[str, Path]:
    """Release-layout folders of POPE, Object HalBench (+ COCO annotations), MM-Vet, LLaVA-Bench,
    and one answers file per benchmark."""
    root = tmp_path / "data"
    (root / "coco").mkdir(parents=True)
    (root / "coco" / "COCO_val2014_000000000001.jpg").write_bytes(png())
    # POPE: random 1-4, adversarial 1-2.
    write_jsonl(
        root / "pope" / "coco_pope_random.json",
        [
            {
                "question_id": 1,
                "image": "a.jpg",
                "text": "Is there a dog in the image?",
                "label": "yes",
            },
            {
                "question_id": 2,
                "image": "a.jpg",
                "text": "Is there a cat in the image?",
                "label": "no",
            },
            {
                "question_id": 3,
                "image": "b.jpg",
                "text": "Is there a car in the image?",
                "label": "yes",
            },
            {
                "question_id": 4,
                "image": "b.jpg",
                "text": "Is there a bus in the image?",
                "label": "no",
            },
        ],
    )
    write_jsonl(
        root / "pope" / "coco_pope_adversarial.json",
        [
            {
                "question_id": 1,
                "image": "a.jpg",
                "text": "Is there a dog in the image?",
                "label": "yes",
            },
            {
                "question_id": 2,
                "image": "a.jpg",
                "text": "Is there a frisbee in the image?",
                "label": "no",
            },
        ],
    )
    # Object HalBench: image 1 by base64, image 2 by path.
    encoded = base64.b64encode(png((0, 255, 0)) * 8).decode()
    write_jsonl(
        root / "objhal" / "obj_halbench.jsonl",
        [
            {"image_id": 1, "question": "Describe the image in detail.", "image": encoded},
            {"image_id": 2, "question": "What is going on?", "image": "two.png"},
        ],
    )
    (root / "objhal" / "two.png").write_bytes(png())
    instances = {
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 18},
            {"id": 2, "image_id": 2, "category_id": 1},
        ],
    }
    captions = {
        "annotations": [
            {"id": 3, "image_id": 1, "caption": "A dog sleeps on a sofa."},
            {"id": 4, "image_id": 2, "caption": "A man riding a bike."},
        ]
    }
    (root / "coco" / "instances.json").write_text(json.dumps(instances))
    (root / "coco" / "captions.json").write_text(json.dumps(captions))
    # MM-Vet.
    (root / "mmvet" / "images").mkdir(parents=True)
    (root / "mmvet" / "images" / "v1_0.png").write_bytes(png())
    mmvet = {
        "v1_0": {
            "imagename": "v1_0.png",
            "question": "What fruit?",
            "answer": "apple",
            "capability": ["rec"],
        },
        "v1_1": {
            "imagename": "v1_0.png",
            "question": "Solve it.",
            "answer": "3 <AND> -2",
            "capability": ["ocr", "math"],
        },
        "v1_2": {
            "imagename": "v1_0.png",
            "question": "Who?",
            "answer": "a chef",
            "capability": ["rec"],
        },
    }
    (root / "mmvet" / "mm-vet.json").write_text(json.dumps(mmvet))
    # LLaVA-Bench.
    bench = root / "llava_bench"
    write_jsonl(
        bench / "questions.jsonl",
        [
            {"question_id": 0, "image": "001.jpg", "text": "What is it?", "category": "conv"},
            {"question_id": 1, "image": "001.jpg", "text": "Describe it.", "category": "detail"},
            {"question_id": 2, "image": "001.jpg", "text": "Why?", "category": "complex"},
        ],
    )
    write_jsonl(bench / "context.jsonl", [{"image": "001.jpg", "caption": "A dog on grass."}])
    write_jsonl(
        bench / "answers_gpt4.jsonl",
        [{"question_id": i, "text": f"reference {i}"} for i in range(3)],
    )
    answers = {
        "pope": write_jsonl(
            root / "answers" / "pope.jsonl",
            [
                {"question_id": "random/1", "answer": "Yes"},
                {"question_id": "random/2", "answer": "Yes, there is a cat."},
                {"question_id": "random/3", "answer": "No."},
                {"question_id": "random/4", "answer": "No, there is not."},
                {"question_id": "adversarial/1", "answer": "Yes"},
                {"question_id": "adversarial/2", "answer": "Yes"},
            ],
        ),
        "objhal": write_jsonl(
            root / "answers" / "objhal.jsonl",
            [
                {"question_id": "1", "answer": "Two dogs on a sofa next to a cat."},
                {"question_id": "2", "answer": "A man rides a bicycle."},
            ],
        ),
        "mmvet": write_jsonl(
            root / "answers" / "mmvet.jsonl",
            [
                {"question_id": "v1_0", "answer": "an apple"},
                {"question_id": "v1_1", "answer": "x = 3"},
                {"question_id": "v1_2", "answer": "no idea"},
            ],
        ),
        "llava_bench": write_jsonl(
            root / "answers" / "llava_bench.jsonl",
            [{"question_id": str(i), "answer": f"mine {i}"} for i in range(3)],
        ),
    }
    return {"root": root, **{f"answers_{k}": v for k, v in answers.items()}}


def scripted_judge(body) -> tuple[int, str, dict]:
    """Grades by the model answer in the prompt; reviews by the question's reference."""
    text = body["messages"][-1]["content"]
    if "| Grade:" in text:
        answer = text.rsplit("| Answer: ", 1)[1].split(" | Grade:")[0]
        return 200, {"an apple": "1.0", "x = 3": "0.5"}.get(answer, "I cannot say."), {}
    if "[Assistant 1]" in text:
        if "reference 2" in text:
            return 200, "Both are fine.", {}
        return (
            200,
            {"reference 0": "8 6\nok", "reference 1": "10 5\nok"}[
                text.split("[Assistant 1]\n")[1].split("\n")[0]
            ],
            {},
        )
    raise AssertionError(f"unexpected judge request: {text[:80]}")


def offline_config(data: dict[str, Path], server_url: str) -> EvalConfig:
    root = data["root"]
    return EvalConfig(
        name="answers-run",
        benchmarks=[
            BenchmarkConfig(
                name="pope",
                data=str(root / "pope"),
                image_root=str(root / "coco"),
                answers=str(data["answers_pope"]),
            ),
            BenchmarkConfig(
                name="object_halbench",
                data=str(root / "objhal" / "obj_halbench.jsonl"),
                answers=str(data["answers_objhal"]),
                coco_instances=[str(root / "coco" / "instances.json")],
                coco_captions=[str(root / "coco" / "captions.json")],
            ),
            BenchmarkConfig(
                name="mmvet", data=str(root / "mmvet"), answers=str(data["answers_mmvet"])
            ),
            BenchmarkConfig(
                name="llava_bench",
                data=str(root / "llava_bench"),
                answers=str(data["answers_llava_bench"]),
            ),
        ],
        judge=EndpointConfig(
            base_url=server_url,
            model="judge-model",
            api_key_env="BPO_RUNNER_KEY",
            backoff_s=0.01,
            parse_retries=1,
            concurrency=2,
        ),
    )


def test_answer_files_scored_with_a_local_judge(benchmarks, judge_server, tmp_path, monkeypatch):
    """Every metric here is worked by hand.

    POPE random: predictions Y Y N N vs labels Y N Y N -> tp 1, fp 1, fn 1, tn 1: accuracy 1/2,
    precision 1/2, recall 1/2, yes_ratio 1/2. adversarial: Y Y vs Y N -> accuracy 1/2, recall 1,
    yes_ratio 1. all six: tp 2, fp 2, fn 1, tn 1 -> accuracy 1/2, precision 1/2, recall 2/3.
    Object HalBench: 1 {dog, couch}: dog, couch, cat (cat wrong); 2 {person, bicycle}: person,
    bicycle -> chair_s 1/2, chair_i 1/5, recall 4/4.
    MM-Vet: v1_0 rec 1.0, v1_1 ocr+math 0.5, v1_2 rec unparsable (asked 5 times, MM-Vet's
    tries) and so 0.0 -> total 100 * 1.5 / 3 = 50, rec 100 * (1.0 + 0.0) / 2 = 50, ocr 50,
    math 50, one unparsable (v1_2).
    LLaVA-Bench: conv (8, 6), detail (10, 5), complex unparsable -> conv 75, detail 50,
    overall 100 * 5.5 / 9 = 61.1..."""
    monkeypatch.setenv("BPO_RUNNER_KEY", KEY)
    judge_server.reply = scripted_judge
    out = tmp_path / "run"
    results = run_eval(offline_config(benchmarks, judge_server.url), out, log=lambda _: None)[
        "benchmarks"
    ]

    pope = results["pope"]
    assert pope["random"]["accuracy"] == pytest.approx(1 / 2)
    assert pope["random"]["precision"] == pytest.approx(1 / 2)
    assert pope["random"]["yes_ratio"] == pytest.approx(1 / 2)
    assert pope["adversarial"]["recall"] == pytest.approx(1.0)
    assert pope["adversarial"]["yes_ratio"] == pytest.approx(1.0)
    assert (pope["all"]["tp"], pope["all"]["fp"], pope["all"]["fn"], pope["all"]["tn"]) == (
        2,
        2,
        1,
        1,
    )
    assert pope["all"]["recall"] == pytest.approx(2 / 3)

    chair = results["object_halbench"]
    assert chair["chair_s"] == pytest.approx(1 / 2)
    assert chair["chair_i"] == pytest.approx(1 / 5)
    assert chair["recall"] == pytest.approx(1.0)
    records = [json.loads(line) for line in (out / "object_halbench" / "judgments.jsonl").open()]
    assert records[0]["hallucinated"] == ["cat"] and records[0]["ground_truth"] == ["couch", "dog"]

    mmvet = results["mmvet"]
    assert mmvet["total"] == pytest.approx(50.0)
    assert mmvet["capability"] == {"math": 50.0, "ocr": 50.0, "rec": 50.0}
    assert (mmvet["unparsable"], mmvet["unparsable_ids"]) == (1, ["v1_2"])

    bench = results["llava_bench"]
    assert bench["conv"]["relative"] == pytest.approx(75.0)
    assert bench["detail"]["relative"] == pytest.approx(50.0)
    assert bench["overall"]["relative"] == pytest.approx(100 * 5.5 / 9)
    assert (bench["unparsable"], bench["unparsable_ids"]) == (1, ["2"])

    # 3 grades + 4 re-asks of v1_2 (MM-Vet's 5 tries); 3 reviews, asked once each (LLaVA's).
    assert len(judge_server.seen) == 10
    assert all(s.headers["Authorization"] == f"Bearer {KEY}" for s in judge_server.seen)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {p.relative_to(out).as_posix() for p in written} >= {
        "results.json",
        "results.md",
        "judge_cache/judgments.jsonl",
        "mmvet/answers.jsonl",
        "mmvet/judgments.jsonl",
        "pope/answers.jsonl",
    }
    for path in written:
        assert KEY not in path.read_text(errors="replace"), f"the API key leaked into {path}"

    # A rerun asks the judge only what did not parse before, and scores the same.
    again = run_eval(offline_config(benchmarks, judge_server.url), out, log=lambda _: None)
    assert len(judge_server.seen) == 10 + 5 + 1
    assert again["benchmarks"]["mmvet"]["total"] == pytest.approx(50.0)


def test_judged_records_keep_their_fields_in_order(benchmarks, judge_server, tmp_path, monkeypatch):
    """judgments.jsonl of MM-Vet and LLaVA-Bench, field by field and in order: question_id, the
    benchmark's own fields, then what the judge said. v1_2's grade never parsed: asked 5 times
    (MM-Vet's parse_retries 4 wins over the judge section's 1), grade None, last reply kept."""
    monkeypatch.setenv("BPO_RUNNER_KEY", KEY)
    judge_server.reply = scripted_judge
    out = tmp_path / "run"
    run_eval(offline_config(benchmarks, judge_server.url), out, log=lambda _: None)
    mmvet = [json.loads(line) for line in (out / "mmvet" / "judgments.jsonl").open()]
    assert list(mmvet[0].items()) == [
        ("question_id", "v1_0"),
        ("answer", "an apple"),
        ("ground_truth", "apple"),
        ("capability", ["rec"]),
        ("grade", 1.0),
        ("judge_reply", "1.0"),
        ("judge_attempts", 1),
        ("judge_cached", False),
        ("judge_error", None),
    ]
    unparsed = mmvet[2]
    assert (unparsed["grade"], unparsed["judge_reply"], unparsed["judge_attempts"]) == (
        None,
        "I cannot say.",
        5,
    )
    assert unparsed["judge_error"]
    llava = [json.loads(line) for line in (out / "llava_bench" / "judgments.jsonl").open()]
    assert list(llava[1].items()) == [
        ("question_id", "1"),
        ("category", "detail"),
        ("answer", "mine 1"),
        ("reference_score", 10.0),
        ("model_score", 5.0),
        ("judge_reply", "10 5\nok"),
        ("judge_attempts", 1),
        ("judge_cached", False),
        ("judge_error", None),
    ]
    assert (llava[2]["reference_score"], llava[2]["model_score"]) == (None, None)


def test_object_halbench_with_judge_listed_objects(benchmarks, judge_server, tmp_path):
    """The judge lists the objects; they map to COCO categories one name at a time:
    1 ["dogs", "sofa", "cat"] -> dog, couch, cat vs {dog, couch}; 2 ["man", "bicycle"] ->
    person, bicycle vs {person, bicycle}: chair_s 1/2, chair_i 1/5, as from the words."""
    lists = {
        "Two dogs on a sofa next to a cat.": '["dogs", "sofa", "cat"]',
        "A man rides a bicycle.": 'Objects:\n["man", "bicycle"]',
    }

    def reply(body):
        answer = body["messages"][-1]["content"].split("[Answer]\n")[1]
        return 200, lists[answer], {}

    judge_server.reply = reply
    root = benchmarks["root"]
    config = EvalConfig(
        benchmarks=[
            BenchmarkConfig(
                name="object_halbench",
                data=str(root / "objhal" / "obj_halbench.jsonl"),
                answers=str(benchmarks["answers_objhal"]),
                coco_instances=[str(root / "coco" / "instances.json")],
                coco_captions=[str(root / "coco" / "captions.json")],
                judge_objects=True,
            )
        ],
        judge=EndpointConfig(base_url=judge_server.url, api_key_env=None),
    )
    metrics = run_eval(config, tmp_path / "run", log=lambda _: None)["benchmarks"][
        "object_halbench"
    ]
    assert metrics["chair_s"] == pytest.approx(1 / 2)
    assert metrics["chair_i"] == pytest.approx(1 / 5)
    assert metrics["unparsable"] == 0
    record = json.loads(
        (tmp_path / "run" / "object_halbench" / "judgments.jsonl").open().readline()
    )
    assert record["objects"] == ["dogs", "sofa", "cat"] and record["hallucinated"] == ["cat"]


def test_results_table_and_compare(tmp_path):
    """Two runs side by side; a metric one run lacks shows '-'; counts print as integers."""
    for name, value in [("base", 0.25), ("bpo", 0.125)]:
        folder = tmp_path / name
        folder.mkdir()
        results = {"name": name, "benchmarks": {"pope": {"all": {"f1": value, "questions": 8}}}}
        if name == "bpo":
            results["benchmarks"]["chair"] = {"chair_i": 0.5}
        (folder / "results.json").write_text(json.dumps(results))
    assert compare_runs([tmp_path / "base", tmp_path / "bpo" / "results.json"]) == (
        "| benchmark | metric | base | bpo |\n"
        "|---|---|---:|---:|\n"
        "| pope | all/f1 | 0.2500 | 0.1250 |\n"
        "| pope | all/questions | 8 | 8 |\n"
        "| chair | chair_i | - | 0.5000 |\n"
    )
    assert (
        markdown_table({"r": {"mmvet": {"total": 62.5}}}).splitlines()[-1]
        == "| mmvet | total | 62.50 |"
    )


def test_compare_verb_takes_runs_as_words(tmp_path, capsys):
    for name in ["a", "b"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(
            json.dumps({"name": name, "benchmarks": {"pope": {"all": {"f1": 0.5}}}})
        )
    main(["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert capsys.readouterr().out.splitlines()[0] == "| benchmark | metric | a | b |"


def test_a_judged_benchmark_without_a_judge_is_refused(benchmarks, tmp_path):
    config = EvalConfig(
        benchmarks=[
            BenchmarkConfig(name="mmvet", data=str(benchmarks["root"] / "mmvet"), answers="x")
        ]
    )
    with pytest.raises(ValueError, match="benchmark mmvet needs a judge: add a `judge:` section"):
        run_eval(config, tmp_path / "run")


def test_an_answers_file_missing_questions_is_named(benchmarks, tmp_path):
    short = write_jsonl(tmp_path / "short.jsonl", [{"question_id": "random/1", "answer": "yes"}])
    config = EvalConfig(
        benchmarks=[
            BenchmarkConfig(name="pope", data=str(benchmarks["root"] / "pope"), answers=str(short))
        ]
    )
    with pytest.raises(
        ValueError, match=r"no answer for 5 of the 6 questions of pope \(first: \['adversarial/1'"
    ):
        run_eval(config, tmp_path / "run", log=lambda _: None)


def test_damaged_lines_are_named_by_file_and_line(benchmarks, tmp_path):
    """A file handed in is read strictly: a last line cut short is damage too, not a line a
    writer was cut off in (only the run's own answers.jsonl is repaired)."""
    cut = tmp_path / "cut.jsonl"
    cut.write_text('{"question_id": "random/1", "answer": "yes"}\n{"question_id": "rand')
    config = EvalConfig(
        benchmarks=[
            BenchmarkConfig(name="pope", data=str(benchmarks["root"] / "pope"), answers=str(cut))
        ]
    )
    with pytest.raises(
        ValueError,
        match=r"cut\.jsonl line 2: not valid JSON .*; each line must be a JSON object with "
        "question_id and answer",
    ):
        run_eval(config, tmp_path / "run", log=lambda _: None)

    questions = benchmarks["root"] / "pope" / "coco_pope_adversarial.json"
    questions.write_text(questions.read_text() + "{not json\n")
    with pytest.raises(
        ValueError, match=r"coco_pope_adversarial\.json line 3: not valid JSON .*; fix or drop"
    ):
        run_eval(config, tmp_path / "run2", log=lambda _: None)


def test_a_second_run_into_one_out_is_refused_naming_the_first(benchmarks, tmp_path):
    """Two `bpo eval` into one --out wrote every answer twice. While one holds OUT (here the
    test, through the same lock) the other stops before answering anything, naming the holder;
    once it is released the run goes through."""
    from bpo.data.files import DirectoryBusyError
    from bpo.train.outputs import lock_output

    answers = str(benchmarks["answers_pope"])
    config = EvalConfig(
        benchmarks=[
            BenchmarkConfig(name="pope", data=str(benchmarks["root"] / "pope"), answers=answers)
        ]
    )
    out = tmp_path / "run"
    with lock_output(out, "bpo eval"):
        with pytest.raises(DirectoryBusyError, match=r"held by `bpo eval` \(pid \d+ on "):
            run_eval(config, out, log=lambda _: None)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    results = run_eval(config, out, log=lambda _: None)
    assert "pope" in results["benchmarks"] and (out / "results.json").is_file()
