"""MMHal-Bench: the release read in its layout, the rating parser, the scores worked by hand, and
the judge asked through a real local HTTP server.

The fixture (tests/evaluate/fixtures/mmhal/response_template.json) is 5 records in the release's
format: types attribute, counting, attribute, counting, other.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bpo.endpoint import ChatClient, EndpointConfig
from bpo.evaluate import mmhal
from bpo.evaluate.config import BenchmarkConfig, EvalConfig
from bpo.evaluate.judges import PromptFile
from bpo.evaluate.run import run_eval
from bpo.evaluate.scores import score_judged

FIXTURE = Path(__file__).parent / "fixtures" / "mmhal"
# The judge's reply to each model answer: ratings 5, 2, 3, none (two ratings), 6.
REPLIES = {
    "The frisbee is red.": "Accurate and detailed.\nRating: 5, very informative, no hallucination",
    "There are three cats.": "Wrong count.\nrating: 2",
    "It is a car.": "Says little.\nRATING: 3",
    "Four apples.": "Either Rating: 1 or Rating: 4, I cannot decide.",
    "A train station, as the sign reads.": "Good reasoning.\nRating: 6",
}
ANSWERS = dict(enumerate(REPLIES))


def test_the_release_is_read_in_its_layout(tmp_path):
    """Question ids are positions; the image is the last part of image_src under images/."""
    items = mmhal.read_mmhal(str(FIXTURE))
    assert [i.question_id for i in items] == ["0", "1", "2", "3", "4"]
    assert items[1].prompt == "How many cats are there?"
    assert items[1].image == (FIXTURE / "images" / "c1.jpg").resolve()
    assert items[1].fields == {
        "question_type": "counting",
        "gt_answer": "There are two cats.",
        "image_content": ["Cat"],
    }
    moved = mmhal.read_mmhal(str(FIXTURE / "response_template.json"), image_root=str(tmp_path))
    assert moved[0].image == (tmp_path / "a1.jpg").resolve()


def test_an_image_name_that_leaves_the_image_root_is_refused(tmp_path):
    shutil.copy(FIXTURE / "response_template.json", tmp_path)
    records = json.loads((tmp_path / "response_template.json").read_text())
    records[2]["image_src"] = "https://example.org/photos/.."
    (tmp_path / "response_template.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"response_template\.json item 2: .*outside --image-root"):
        mmhal.read_mmhal(str(tmp_path))


def test_a_path_that_is_neither_a_folder_nor_a_dataset_id_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local folder or file nor a Hugging"):
        mmhal.read_mmhal(str(tmp_path / "missing" / "folder"))


@pytest.mark.parametrize(
    ("reply", "rating"),
    [
        ("The answer is fine.\nRating: 4, somewhat informative", 4),
        ("rating: 0", 0),
        ("RATING: 6", 6),
        ("Rating: 2 (hallucinates). I repeat, Rating: 2.", 2),  # one rating, said twice
    ],
)
def test_a_rating_is_the_one_rating_n_in_the_reply(reply, rating):
    assert mmhal.parse_mmhal_rating(reply) == rating


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ("I would give it a 5.", "no rating"),
        ("Rating: 7", "no rating"),
        ("Rating: 1 or Rating: 4", r"several ratings \[1, 4\]"),
        ("Rating:5", "no rating"),  # the reference needs the space after the colon
    ],
)
def test_a_reply_without_exactly_one_rating_does_not_parse(reply, message):
    with pytest.raises(ValueError, match=message):
        mmhal.parse_mmhal_rating(reply)


def test_scores_per_type_with_an_unparsable_rating_counted_as_zero():
    """Ratings 5, 2, 3, None, 6 of types attribute, counting, attribute, counting, other.

    None scores 0 as in the reference: overall (5 + 2 + 3 + 0 + 6) / 5 = 3.2, below 3: 2 and 0
    -> hallucination rate 2/5. attribute: 5, 3 -> 4.0, rate 0; counting: 2, 0 -> 1.0, rate 1;
    other: 6 -> 6.0, rate 0."""
    scores = mmhal.mmhal_scores(
        [5, 2, 3, None, 6], ["attribute", "counting", "attribute", "counting", "other"]
    )
    assert scores["overall"] == pytest.approx(
        {"average_score": 3.2, "hallucination_rate": 0.4, "questions": 5}
    )
    assert list(scores["type"]) == ["attribute", "counting", "other"]
    assert scores["type"]["attribute"] == pytest.approx(
        {"average_score": 4.0, "hallucination_rate": 0.0, "questions": 2}
    )
    assert scores["type"]["counting"] == pytest.approx(
        {"average_score": 1.0, "hallucination_rate": 1.0, "questions": 2}
    )
    assert scores["type"]["other"]["average_score"] == 6.0
    assert scores["unparsable"] == 1


def rating_judge(body) -> tuple[int, str, dict]:
    """Replies by the model answer the request quotes."""
    text = body["messages"][-1]["content"]
    answer = text.split("### LMM Answer to Rate\n", 1)[1].strip()
    return 200, REPLIES[answer], {}


def test_ratings_from_a_judge_over_http(judge_server, tmp_path):
    """The judge is a real HTTP server on 127.0.0.1; the request carries the four inputs; with
    the reference's one ask per answer (parse_retries 0), question 3 is asked once, scores 0 and
    is named. Metrics as in the hand-worked case above: 3.2 and 0.4."""
    judge_server.reply = rating_judge
    config = EndpointConfig(
        base_url=judge_server.url, api_key_env=None, backoff_s=0.01, **mmhal.JUDGE_DEFAULTS
    )
    items = mmhal.read_mmhal(str(FIXTURE))
    answers = {item.question_id: ANSWERS[int(item.question_id)] for item in items}
    with ChatClient(config, cache_dir=tmp_path / "cache") as client:
        metrics, records = score_judged(mmhal.MMHAL, items, answers, client)
    assert len(judge_server.seen) == 5
    first = judge_server.seen[0].body
    assert first["temperature"] == 0.0 and first["max_tokens"] == 1024
    # Requests arrive in any order: question 0's is the one about the frisbee.
    (text,) = [t for t in map(judge_server.user_text, range(5)) if "the frisbee?" in t]
    assert "### Image Contents\nDog, Frisbee\n" in text
    assert "### Question\nWhat colour is the frisbee?\n" in text
    assert "### Human Answer\nThe frisbee is red.\n" in text
    assert metrics["overall"]["average_score"] == pytest.approx(3.2)
    assert metrics["overall"]["hallucination_rate"] == pytest.approx(0.4)
    assert metrics["type"]["counting"]["average_score"] == pytest.approx(1.0)
    assert (metrics["unparsable"], metrics["unparsable_ids"]) == (1, ["3"])
    assert [r["rating"] for r in records] == [5, 2, 3, None, 6]
    assert records[3]["judge_attempts"] == 1 and records[3]["judge_error"]
    assert list(records[0])[:5] == ["question_id", "question_type", "answer", "gt_answer", "rating"]


# --- `bpo eval` end to end ----------------------------------------------------------------------


def mmhal_config(tmp_path: Path, url: str, **bench) -> EvalConfig:
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        "".join(json.dumps({"question_id": str(q), "answer": a}) + "\n" for q, a in ANSWERS.items())
    )
    return EvalConfig(
        name="mmhal-run",
        benchmarks=[
            BenchmarkConfig(name="mmhal", data=str(FIXTURE), answers=str(answers), **bench)
        ],
        # The section's parse_retries (2) and max_tokens (512) give way to MMHal's defaults.
        judge=EndpointConfig(base_url=url, api_key_env=None, backoff_s=0.01),
    )


def test_bpo_eval_rates_mmhal_with_its_reference_settings(judge_server, tmp_path):
    """The run asks each answer once at temperature 0 (MMHal's defaults over the judge section's),
    scores as worked by hand above, and records the protocol: bpo's prompt, gpt-4-0314 as the
    reference's judge."""
    judge_server.reply = rating_judge
    summary = run_eval(
        mmhal_config(tmp_path, judge_server.url), tmp_path / "run", log=lambda _: None
    )
    metrics = summary["benchmarks"]["mmhal"]
    assert metrics["overall"] == pytest.approx(
        {"average_score": 3.2, "hallucination_rate": 0.4, "questions": 5}
    )
    assert metrics["type"]["attribute"]["average_score"] == pytest.approx(4.0)
    assert metrics["unparsable_ids"] == ["3"]
    assert len(judge_server.seen) == 5
    assert {(s.body["temperature"], s.body["max_tokens"]) for s in judge_server.seen} == {
        (0.0, 1024)
    }
    protocol = summary["protocol"]["mmhal"]
    assert (protocol["prompts"], protocol["reference_judge"]) == ("bpo", "gpt-4-0314")
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| mmhal | overall/average_score | 3.20" in table
    assert "| mmhal | type/counting/hallucination_rate | 1.0000" in table


def test_the_reference_template_from_a_file_is_filled_as_the_reference_fills_it(
    judge_server, tmp_path
):
    """A judge_prompt file's four {} take the contents joined by ", ", the question, the human
    answer and the answer, sent as one user message; results.json names the file."""
    template = tmp_path / "mmhal_template.txt"
    template.write_text("Contents: {}\nQuestion: {}\nHuman: {}\n### LMM Answer to Rate\n{}\n")
    judge_server.reply = rating_judge
    config = mmhal_config(tmp_path, judge_server.url, judge_prompt=str(template))
    summary = run_eval(config, tmp_path / "run", log=lambda _: None)
    # Requests arrive in any order (concurrency 8): find question 0's by its contents.
    (first,) = [
        s.body for s in judge_server.seen if "Dog, Frisbee" in s.body["messages"][0]["content"]
    ]
    assert first["messages"] == [
        {
            "role": "user",
            "content": "Contents: Dog, Frisbee\nQuestion: What colour is the frisbee?\n"
            "Human: The frisbee is red.\n### LMM Answer to Rate\nThe frisbee is red.\n",
        }
    ]
    assert summary["benchmarks"]["mmhal"]["overall"]["average_score"] == pytest.approx(3.2)
    assert summary["protocol"]["mmhal"]["prompts"] == "file"


def test_a_template_that_does_not_format_is_named(tmp_path):
    prompt = PromptFile(str(tmp_path / "t.txt"), "Rate {answer} please")
    with pytest.raises(ValueError, match=r"t\.txt: an MMHal-Bench template holds four \{\}"):
        mmhal.mmhal_file_messages(prompt, ["Dog"], "q", "gt", "a")
