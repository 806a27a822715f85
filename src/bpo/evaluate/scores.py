"""Scoring a benchmark's answers: (metrics, one record per question) for POPE, CHAIR and the judged.

Every scorer takes the benchmark's items and `{question_id: answer}` and returns the metrics
results.json holds and the records judgments.jsonl holds. MM-Vet and LLaVA-Bench are scored by one
skeleton, `score_judged`: each is a `JudgedBenchmark`, which says how to ask the judge about one
item (messages, reply parser), how to score the parsed replies, and which fields a record carries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bpo.data import vocab
from bpo.endpoint import ChatClient, Messages, Reply
from bpo.evaluate import chair, judges, pope
from bpo.evaluate.datasets import EvalItem

Scored = tuple[dict[str, Any], list[dict[str, Any]]]


def judgment_fields(reply: Reply) -> dict[str, Any]:
    """What a record keeps of the judge's reply, so a person can audit each judgment."""
    return {
        "judge_reply": reply.raw,
        "judge_attempts": reply.attempts,
        "judge_cached": reply.cached,
        "judge_error": reply.error,
    }


# --- POPE -------------------------------------------------------------------------------------


def score_pope(items: Sequence[EvalItem], answers: dict[str, str]) -> Scored:
    """POPE metrics over all questions and per strategy, and one record per question."""
    records, by_strategy = [], {}
    for item in items:
        predicted = pope.parse_yes_no(answers[item.question_id])
        strategy = item.fields["strategy"]
        by_strategy.setdefault(strategy, ([], []))
        by_strategy[strategy][0].append(predicted)
        by_strategy[strategy][1].append(item.fields["label"])
        records.append(
            {
                "question_id": item.question_id,
                "answer": answers[item.question_id],
                "prediction": "yes" if predicted else "no",
                "label": "yes" if item.fields["label"] else "no",
                "strategy": strategy,
            }
        )
    predictions = [r["prediction"] == "yes" for r in records]
    labels = [r["label"] == "yes" for r in records]
    metrics = {"all": pope.pope_metrics(predictions, labels)}
    for strategy, (p, y) in sorted(by_strategy.items()):
        metrics[strategy] = pope.pope_metrics(p, y)
    return metrics, records


# --- CHAIR ------------------------------------------------------------------------------------


def chair_records(
    items: Sequence[EvalItem],
    answers: dict[str, str],
    mentions: list[list[str]],
    truth: list[set[str]],
) -> Scored:
    """CHAIR scores of the mentions, and a record per answer naming what it hallucinated."""
    records = []
    for item, said, true in zip(items, mentions, truth, strict=True):
        records.append(
            {
                "question_id": item.question_id,
                "answer": answers[item.question_id],
                "mentions": said,
                "hallucinated": [m for m in said if m not in true],
                "ground_truth": sorted(true),
            }
        )
    return chair.chair_scores(mentions, truth), records


def score_object_halbench(
    items: Sequence[EvalItem],
    answers: dict[str, str],
    coco_instances: Sequence[str],
    coco_captions: Sequence[str],
    client: ChatClient | None = None,
    prompt: judges.PromptFile | None = None,
) -> Scored:
    """CHAIR against COCO ground truth (segmentations + captions).

    client: None extracts the mentioned objects from the words (CHAIR's rules); a judge client
        has the judge list them, as RLHF-V's judged Object HalBench does: an answer of three
        words or fewer lists none and is not asked about; the names map to COCO categories as
        `vocab.objects_to_categories` maps them.
    prompt: the extraction prompt file to ask with instead of bpo's.
    """
    image_ids = [item.fields["image_id"] for item in items]
    truth_by_image = chair.coco_ground_truth(coco_instances, coco_captions, image_ids)
    truth = [truth_by_image.get(i, set()) for i in image_ids]
    texts = [answers[item.question_id] for item in items]
    if client is None:
        mentions = [vocab.extract_objects(text) for text in texts]
        metrics, records = chair_records(items, answers, mentions, truth)
    else:
        asked = [i for i, text in enumerate(texts) if not judges.is_short_answer(text)]
        prompts = [judges.object_messages(items[i].prompt, texts[i], prompt) for i in asked]
        replies = dict(zip(asked, client.ask_all(prompts, judges.parse_object_list), strict=True))
        objects = [replies[i].value if i in replies else [] for i in range(len(items))]
        mentions = [vocab.objects_to_categories(names or []) for names in objects]
        metrics, records = chair_records(items, answers, mentions, truth)
        for i, (record, names) in enumerate(zip(records, objects, strict=True)):
            record["objects"] = names
            if i in replies:
                record.update(judgment_fields(replies[i]))
            else:
                record["short_answer"] = True
        metrics["unparsable"] = sum(r.value is None for r in replies.values())
        metrics["short_answers"] = len(items) - len(asked)
    for record, item in zip(records, items, strict=True):
        record["image_id"] = item.fields["image_id"]
    return metrics, records


# --- judged benchmarks ------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgedBenchmark:
    """What one judged benchmark contributes to `score_judged`.

    messages(item, answer): the judge's request about one answer;
    parse(reply text): the parsed value, raising ValueError when the reply does not parse;
    scores(parsed values, items): the metrics, a value None where the reply did not parse;
    record(item, answer, value): the record's fields between question_id and the judge fields;
    file_messages(item, answer, prompt file): the request when the config names a prompt file
        (None: the benchmark takes no prompt file).
    """

    messages: Callable[[EvalItem, str], Messages]
    parse: Callable[[str], Any]
    scores: Callable[[list[Any], Sequence[EvalItem]], dict[str, Any]]
    record: Callable[[EvalItem, str, Any], dict[str, Any]]
    file_messages: Callable[[EvalItem, str, judges.PromptFile], Messages] | None = None


def score_judged(
    benchmark: JudgedBenchmark,
    items: Sequence[EvalItem],
    answers: dict[str, str],
    client: ChatClient,
    prompt: judges.PromptFile | None = None,
) -> Scored:
    """Ask the judge about every answer, score the parsed replies, and name the unparsable ones.

    prompt: a prompt file to ask with instead of the benchmark's own prompt.
    """
    if prompt is None:
        prompts = [benchmark.messages(item, answers[item.question_id]) for item in items]
    elif benchmark.file_messages is None:
        raise ValueError(f"{prompt.path}: this benchmark takes no judge prompt file; remove it")
    else:
        prompts = [
            benchmark.file_messages(item, answers[item.question_id], prompt) for item in items
        ]
    judged = client.ask_all(prompts, benchmark.parse)
    values = [j.value for j in judged]
    metrics = benchmark.scores(values, items)
    metrics["unparsable_ids"] = [
        item.question_id for item, value in zip(items, values, strict=True) if value is None
    ]
    records = [
        {
            "question_id": item.question_id,
            **benchmark.record(item, answers[item.question_id], j.value),
            **judgment_fields(j),
        }
        for item, j in zip(items, judged, strict=True)
    ]
    return metrics, records


MMVET = JudgedBenchmark(
    messages=lambda item, answer: judges.mmvet_messages(item.prompt, item.fields["answer"], answer),
    parse=judges.parse_mmvet_grade,
    scores=lambda grades, items: judges.mmvet_scores(
        grades, [item.fields["capability"] for item in items]
    ),
    record=lambda item, answer, grade: {
        "answer": answer,
        "ground_truth": item.fields["answer"],
        "capability": item.fields["capability"],
        "grade": grade,
    },
    file_messages=lambda item, answer, prompt: judges.mmvet_messages(
        item.prompt, item.fields["answer"], answer, prompt
    ),
)

LLAVA_BENCH = JudgedBenchmark(
    messages=lambda item, answer: judges.llava_bench_messages(
        item.prompt,
        item.fields["context"],
        item.fields["reference"],
        answer,
        item.fields["category"],
    ),
    parse=judges.parse_review_scores,
    scores=lambda reviews, items: judges.llava_bench_scores(
        reviews, [item.fields["category"] for item in items]
    ),
    # A review is (reference score, model score); an unparsable one leaves both None.
    record=lambda item, answer, review: {
        "category": item.fields["category"],
        "answer": answer,
        "reference_score": review[0] if review else None,
        "model_score": review[1] if review else None,
    },
    file_messages=lambda item, answer, prompt: judges.llava_bench_messages(
        item.prompt,
        item.fields["context"],
        item.fields["reference"],
        answer,
        item.fields["category"],
        judges.read_rules(prompt),
    ),
)
