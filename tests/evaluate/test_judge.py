"""Judges: reply parsing and scores worked by hand, and the client against a local HTTP server."""

from __future__ import annotations

import pytest

from bpo.endpoint import ChatClient, EndpointConfig, EndpointError, reply_key
from bpo.evaluate.judges import (
    llava_bench_messages,
    llava_bench_scores,
    mmvet_messages,
    mmvet_scores,
    parse_mmvet_grade,
    parse_object_list,
    parse_review_scores,
)

KEY = "sk-test-5e3cr3t-k3y-0123456789"


def config(server, **overrides) -> EndpointConfig:
    """A judge of the local server; tiny backoff so retries cost milliseconds."""
    values = {
        "base_url": server.url,
        "model": "judge-model",
        "api_key_env": "BPO_TEST_JUDGE_KEY",
        "backoff_s": 0.05,
        "max_backoff_s": 0.2,
        "max_retries": 2,
        "parse_retries": 2,
        "concurrency": 4,
        "timeout_s": 10.0,
    }
    return EndpointConfig(**{**values, **overrides})


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("BPO_TEST_JUDGE_KEY", KEY)


# --- parsing and scores -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "grade"),
    [("0.6", 0.6), ("1.0", 1.0), ("0", 0.0), ("Grade: 0.5.", 0.5), ("0.4 because", 0.4)],
)
def test_parse_mmvet_grade(reply, grade):
    assert parse_mmvet_grade(reply) == grade


@pytest.mark.parametrize("reply", ["The answer is right.", "1.5", "", "-0.2"])
def test_unusable_mmvet_grades_raise(reply):
    with pytest.raises(ValueError):
        parse_mmvet_grade(reply)


def test_mmvet_scores_on_a_worked_case():
    """grades 1.0 (rec), 0.5 (ocr+math), None (rec, unparsable: 0.0), 0.0 (math):
    total = 100 * (1.0 + 0.5 + 0.0 + 0.0) / 4 = 37.5; rec = 100 * (1.0 + 0.0) / 2 = 50;
    ocr = 50; math = 100 * (0.5 + 0.0) / 2 = 25; combination math_ocr = 50, rec = 50, math = 0."""
    scores = mmvet_scores([1.0, 0.5, None, 0.0], [["rec"], ["ocr", "math"], ["rec"], ["math"]])
    assert scores["total"] == pytest.approx(37.5)
    assert scores["capability"] == {
        "math": pytest.approx(25.0),
        "ocr": pytest.approx(50.0),
        "rec": pytest.approx(50.0),
    }
    assert scores["combination"] == {
        "math": pytest.approx(0.0),
        "math_ocr": pytest.approx(50.0),
        "rec": pytest.approx(50.0),
    }
    assert (scores["graded"], scores["unparsable"]) == (3, 1)


def test_unparsable_grades_count_as_zero_as_mm_vet_scores_them():
    """18 items graded 1.0 and 2 whose grade never parsed: MM-Vet's evaluator scores those 0.0,
    so total = 100 * 18 / 20 = 90 (leaving them out would say 100)."""
    scores = mmvet_scores([1.0] * 18 + [None] * 2, [["rec"]] * 20)
    assert scores["total"] == pytest.approx(90.0)
    assert scores["capability"] == {"rec": pytest.approx(90.0)}
    assert (scores["graded"], scores["unparsable"]) == (18, 2)


def test_mmvet_scores_with_nothing_graded_are_zero():
    assert mmvet_scores([None], [["ocr"]])["capability"] == {"ocr": 0.0}


@pytest.mark.parametrize(
    ("reply", "scores"),
    [
        ("8 6\nAssistant 1 is more precise.", (8.0, 6.0)),
        ("7, 9.5", (7.0, 9.5)),
        ("\n10 1\n", (10.0, 1.0)),
    ],
)
def test_parse_review_scores(reply, scores):
    assert parse_review_scores(reply) == scores


@pytest.mark.parametrize("reply", ["Assistant 1: 8, Assistant 2: 6", "8", "8 6 7", "0 5", "11 3"])
def test_unusable_reviews_raise(reply):
    with pytest.raises(ValueError):
        parse_review_scores(reply)


def test_llava_bench_scores_on_a_worked_case():
    """(reference, model) per question: conv (8, 6), conv (6, 6), detail (10, 5), complex None.
    conv: 100 * mean(6, 6) / mean(8, 6) = 100 * 6 / 7 = 85.714...; detail: 100 * 5 / 10 = 50;
    complex: no parsed review -> 0 with 0 reviews; overall: 100 * (17/3) / (24/3) = 70.833...
    The unparsable review is excluded, not averaged in as -1."""
    scores = llava_bench_scores(
        [(8, 6), (6, 6), (10, 5), None], ["conv", "conv", "detail", "complex"]
    )
    assert scores["conv"]["relative"] == pytest.approx(600 / 7)
    assert scores["detail"]["relative"] == pytest.approx(50.0)
    assert scores["complex"] == {"relative": 0.0, "model": 0.0, "reference": 0.0, "reviews": 0}
    assert scores["overall"]["relative"] == pytest.approx(100 * 17 / 24)
    assert scores["overall"]["reviews"] == 3
    assert scores["unparsable"] == 1


def test_parse_object_list_as_rlhf_v_reads_replies():
    """The whole reply as JSON; else, when it holds '["', its last line as JSON. So a list after
    a preamble line parses, and a list inside a sentence on one line does not."""
    assert parse_object_list('["dog", "traffic light"]') == ["dog", "traffic light"]
    assert parse_object_list('Here they are:\n["dog", "cat"]') == ["dog", "cat"]
    assert parse_object_list("[]") == []
    for bad in ["dog, cat", '["dog", 3]', "[dog]", 'Objects: ["dog"]', '{"objects": ["dog"]}']:
        with pytest.raises(ValueError):
            parse_object_list(bad)


def test_prompts_carry_the_item():
    grading = mmvet_messages("What is x?", "3 <AND> -2", "x = 3")[-1]["content"]
    assert "Question: What is x? | Ground truth: 3 <AND> -2 | Answer: x = 3 | Grade:" in grading
    review = llava_bench_messages("Q?", "a dog on grass", "REF", "MINE", "detail")[-1]["content"]
    assert review.index("[Assistant 1]\nREF") < review.index("[Assistant 2]\nMINE")
    assert "a dog on grass" in review and "detailed description" in review


# --- the client against a real local server ---------------------------------------------------


def test_a_correct_grade_is_parsed_and_the_request_is_well_formed(judge_server):
    judge_server.reply = lambda body: (200, "0.6", {})
    messages = mmvet_messages("What is x?", "3 <AND> -2", "x = 3")
    with ChatClient(config(judge_server)) as client:
        judgment = client.ask(messages, parse_mmvet_grade)
    assert (judgment.value, judgment.attempts, judgment.cached, judgment.error) == (
        0.6,
        1,
        False,
        None,
    )
    (seen,) = judge_server.seen
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    assert seen.body["model"] == "judge-model"
    assert seen.body["messages"] == messages
    assert seen.body["temperature"] == 0.0


def test_an_unparsable_grade_is_asked_again_warmer_then_reported(judge_server):
    """parse_retries=2: three replies, at temperature 0, 0.5, 1.0; none parses -> value None."""
    judge_server.reply = lambda body: (200, "I cannot grade this.", {})
    with ChatClient(config(judge_server)) as client:
        judgment = client.ask(mmvet_messages("Q", "A", "B"), parse_mmvet_grade)
    assert judgment.value is None
    assert judgment.attempts == 3
    assert judgment.raw == "I cannot grade this."
    assert judgment.error.startswith("unparsable after 3 replies")
    assert [s.body["temperature"] for s in judge_server.seen] == [0.0, 0.5, 1.0]


def test_a_reply_that_parses_on_the_second_ask_is_used(judge_server):
    replies = iter(["Let me think.", "0.5"])
    judge_server.reply = lambda body: (200, next(replies), {})
    with ChatClient(config(judge_server)) as client:
        judgment = client.ask(mmvet_messages("Q", "A", "B"), parse_mmvet_grade)
    assert (judgment.value, judgment.attempts) == (0.5, 2)


def test_429_is_retried_after_a_backoff(judge_server):
    """The first request is refused with 429; the retry waits at least backoff_s (0.05 s)."""
    statuses = iter([429, 200])

    def reply(body):
        status = next(statuses)
        return (status, "0.9" if status == 200 else '{"error": "rate limited"}', {})

    judge_server.reply = reply
    with ChatClient(config(judge_server)) as client:
        judgment = client.ask(mmvet_messages("Q", "A", "B"), parse_mmvet_grade)
        assert client.requests == 2
    assert judgment.value == 0.9
    first, second = judge_server.seen
    assert second.at - first.at >= 0.05


def test_retry_after_is_honoured(judge_server):
    statuses = iter([503, 200])
    judge_server.reply = lambda body: (
        s := next(statuses),
        "1.0" if s == 200 else "busy",
        {"Retry-After": "0.15"},
    )
    with ChatClient(config(judge_server)) as client:
        assert client.ask(mmvet_messages("Q", "A", "B"), parse_mmvet_grade).value == 1.0
    first, second = judge_server.seen
    assert second.at - first.at >= 0.15


def test_a_server_that_keeps_failing_raises_after_the_retries(judge_server):
    judge_server.reply = lambda body: (500, "internal error", {})
    with (
        ChatClient(config(judge_server)) as client,
        pytest.raises(EndpointError, match="failed 3 times"),
    ):
        client.ask(mmvet_messages("Q", "A", "B"), parse_mmvet_grade)
    assert len(judge_server.seen) == 3  # max_retries=2: one try and two retries


def test_an_auth_error_is_not_retried_and_the_key_is_redacted(judge_server):
    """A 401 will not change on retry: one request, a clear error, and the key the server echoes
    back is replaced by *** in the message."""
    judge_server.reply = lambda body: (401, f'{{"error": "bad key {KEY}"}}', {})
    with ChatClient(config(judge_server)) as client, pytest.raises(EndpointError) as error:
        client.ask(mmvet_messages("Q", "A", "B"), parse_mmvet_grade)
    assert len(judge_server.seen) == 1
    assert "HTTP 401" in str(error.value) and "BPO_TEST_JUDGE_KEY" in str(error.value)
    assert KEY not in str(error.value) and "***" in str(error.value)


def test_a_cached_judgment_is_reused_by_a_new_client(judge_server, tmp_path):
    judge_server.reply = lambda body: (200, "0.7", {})
    messages = mmvet_messages("Q", "A", "B")
    with ChatClient(config(judge_server), cache_dir=tmp_path) as client:
        assert client.ask(messages, parse_mmvet_grade).value == 0.7
    judge_server.reply = lambda body: (200, "0.1", {})  # a second ask would answer differently
    with ChatClient(config(judge_server), cache_dir=tmp_path) as client:
        again = client.ask(messages, parse_mmvet_grade)
    assert (again.value, again.cached, again.attempts) == (0.7, True, 0)
    assert len(judge_server.seen) == 1
    # Another judge model is another judgment: not served from the cache.
    with ChatClient(config(judge_server, model="other"), cache_dir=tmp_path) as client:
        assert client.ask(messages, parse_mmvet_grade).value == 0.1
    assert reply_key("judge-model", messages) != reply_key("other", messages)


def test_the_cache_key_covers_every_setting_that_changes_a_reply(judge_server, tmp_path):
    """One question asked at temperature 0.0 and 0.2, and with 3 and 1024 max_tokens: each is
    another request, so none is served another's cached reply (4 requests, 4 replies)."""
    replies = iter(["0.1", "0.2", "0.3", "0.4"])
    judge_server.reply = lambda body: (200, next(replies), {})
    messages = mmvet_messages("Q", "A", "B")
    values = []
    with ChatClient(config(judge_server), cache_dir=tmp_path) as client:
        for settings in [{}, {"temperature": 0.2}, {"max_tokens": 3}, {"max_tokens": 1024}]:
            values.append(client.with_settings(**settings).ask(messages, parse_mmvet_grade).value)
        again = client.with_settings(temperature=0.2).ask(messages, parse_mmvet_grade)
    assert values == [0.1, 0.2, 0.3, 0.4]
    assert (again.value, again.cached) == (0.2, True)
    assert [(s.body["temperature"], s.body["max_tokens"]) for s in judge_server.seen] == [
        (0.0, 512),
        (0.2, 512),
        (0.0, 3),
        (0.0, 1024),
    ]
    keys = {reply_key("judge-model", messages, t, m) for t, m in [(0.0, 512), (0.2, 512)]}
    assert len(keys) == 2


def test_the_cache_survives_a_kill_mid_write(judge_server, tmp_path):
    """A run killed while appending leaves half a line; the next run asks that one again and
    appends after the repaired file, and the run after that reads every reply back."""
    judge_server.reply = lambda body: (200, "0.7", {})
    first, second = mmvet_messages("Q", "A", "B"), mmvet_messages("Q", "A", "C")
    with ChatClient(config(judge_server), cache_dir=tmp_path) as client:
        client.ask(first, parse_mmvet_grade)
    cache = tmp_path / "replies.jsonl"
    with cache.open("a") as f:
        f.write('{"key": "cut sh')  # killed mid-line
    with ChatClient(config(judge_server), cache_dir=tmp_path) as client:
        assert client.ask(first, parse_mmvet_grade).cached
        assert not client.ask(second, parse_mmvet_grade).cached
    with ChatClient(config(judge_server), cache_dir=tmp_path) as client:
        assert len(client.cache) == 2
        assert client.ask(second, parse_mmvet_grade).cached
    assert len(judge_server.seen) == 2


def test_a_reply_that_echoes_the_key_is_redacted_before_it_is_kept(judge_server, tmp_path):
    judge_server.reply = lambda body: (200, f"0.5 (you sent {KEY})", {})
    with ChatClient(config(judge_server), cache_dir=tmp_path) as client:
        reply = client.ask(mmvet_messages("Q", "A", "B"), parse_mmvet_grade)
    assert reply.value == 0.5 and KEY not in reply.raw and "***" in reply.raw
    assert KEY not in (tmp_path / "replies.jsonl").read_text()


def test_unparsable_replies_are_not_cached(judge_server, tmp_path):
    judge_server.reply = lambda body: (200, "no idea", {})
    messages = mmvet_messages("Q", "A", "B")
    with ChatClient(config(judge_server, parse_retries=0), cache_dir=tmp_path) as client:
        assert client.ask(messages, parse_mmvet_grade).value is None
        assert len(client.cache) == 0


def test_judge_all_keeps_order_under_concurrency(judge_server):
    """Eight requests, four in flight; the server answers each item's own grade."""

    def reply(body):
        answer = body["messages"][-1]["content"].rsplit("| Answer: ", 1)[1].split(" |")[0]
        return (200, f"0.{answer}", {})

    judge_server.reply = reply
    prompts = [mmvet_messages("Q", "A", str(i)) for i in range(8)]
    with ChatClient(config(judge_server)) as client:
        values = [j.value for j in client.ask_all(prompts, parse_mmvet_grade)]
    assert values == [float(f"0.{i}") for i in range(8)]


def test_a_missing_key_variable_is_named(monkeypatch, judge_server):
    monkeypatch.delenv("BPO_TEST_JUDGE_KEY")
    with pytest.raises(EndpointError, match="environment variable BPO_TEST_JUDGE_KEY is not set"):
        ChatClient(config(judge_server))


def test_no_key_variable_sends_no_authorization(judge_server):
    with ChatClient(config(judge_server, api_key_env=None)) as client:
        client.ask(mmvet_messages("Q", "A", "B"), parse_mmvet_grade)
    assert "Authorization" not in judge_server.seen[0].headers
