"""Hostile inputs to the chat client, the judges, answers files and the local rewriter LM.

The servers here are real HTTP servers on 127.0.0.1 that answer as a broken or malicious
endpoint would: echoing the key, replying with numbers where text belongs, trickling a reply a
byte at a time, sending 50 MB. Each test fails on the code before its fix.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from bpo.bootstrap.config import InjectConfig
from bpo.bootstrap.inject.rewriters import EndpointRewriter, make_rewriter
from bpo.endpoint import ChatClient, EndpointConfig, EndpointError, redact, reply_key
from bpo.evaluate.config import BenchmarkConfig, EvalConfig
from bpo.evaluate.datasets import read_llava_bench
from bpo.evaluate.judges import mmvet_messages, parse_mmvet_grade
from bpo.evaluate.run import run_eval
from bpo.models.load import ModelConfig, load_model_and_processor
from bpo.models.tiny import build_tiny_causal_lm
from local_server import serving

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = "sk-hostile-0123456789abcdefABCDEF"  # 33 characters
KEY_ENV = "BPO_HOSTILE_KEY"


def leaks(text: str, size: int = 8) -> list[str]:
    """The fragments of KEY of `size` characters that appear in `text`."""
    return [KEY[i : i + size] for i in range(len(KEY) - size + 1) if KEY[i : i + size] in text]


def completion(content: Any) -> bytes:
    """A chat completions reply whose message content is `content` (any JSON value)."""
    message = {"role": "assistant", "content": content}
    return json.dumps({"choices": [{"index": 0, "message": message}]}).encode()


# --- a server that answers however the test says -------------------------------------------

# respond(handler): writes the whole HTTP response itself (status line, headers, body).
Respond = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Hostile:
    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    respond: Respond = lambda handler: send(handler, 200, completion("1.0"))


def send(handler: BaseHTTPRequestHandler, status: int, payload: bytes, **headers: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", headers.pop("length", str(len(payload))))
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(payload)


@pytest.fixture
def hostile():
    state = Hostile()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            state.requests.append(json.loads(self.rfile.read(length)))
            # The client hangs up on a reply it refuses.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                state.respond(self)

        def log_message(self, *_args):
            pass

    with serving(Handler) as state.url:
        yield state


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def judge(server: Hostile, **overrides) -> EndpointConfig:
    values = {
        "base_url": server.url,
        "model": "judge-model",
        "api_key_env": KEY_ENV,
        "backoff_s": 0.01,
        "max_backoff_s": 0.02,
        "max_retries": 2,
        "parse_retries": 0,
        "timeout_s": 10.0,
    }
    return EndpointConfig(**{**values, **overrides})


MESSAGES = mmvet_messages("What is x?", "3", "x = 3")


# --- 1. the key, whole or in part, never leaves the client ----------------------------------


def test_redact_replaces_every_long_enough_fragment():
    """KEY[:10] and KEY[20:] (13 characters) are each one ***; 7 characters of it (below the
    8 that say something) stay; a key shorter than 8 is replaced only whole."""
    text = f"a {KEY[:10]} b {KEY[20:]} c {KEY[5:12]} d {KEY}"
    assert redact(text, KEY) == f"a *** b *** c {KEY[5:12]} d ***"
    assert redact("x secret y secre", "secret") == "x *** y secre"
    assert redact("nothing", None) == "nothing"


@pytest.mark.parametrize("status", [401, 500])
@pytest.mark.parametrize("position", [0, 268, 275, 285, 292, 299])
def test_a_key_echoed_across_the_snippet_cut_leaves_nothing_of_it(hostile, status, position):
    """The error quotes the first 300 characters of the body. With the key at 268 the cut falls
    after 32 of its 33 characters: cut before redacting, those 32 reached the message."""
    body = ("x" * position + KEY + " and more").encode()
    hostile.respond = lambda handler: send(handler, status, body)
    with (
        ChatClient(judge(hostile, max_retries=0)) as client,
        pytest.raises(EndpointError, match=f"HTTP {status}") as error,
    ):
        client.ask(MESSAGES, parse_mmvet_grade)
    assert leaks(str(error.value)) == []


def test_a_fragment_of_the_key_in_a_reply_is_redacted_before_it_is_kept(hostile, tmp_path):
    """A server that echoes a truncated header ("Bearer sk-hostile-01...") puts 13 characters of
    the key in the reply: neither the reply nor the cache may keep them."""
    content = f"0.5 (you sent Bearer {KEY[:13]}...)"
    hostile.respond = lambda handler: send(handler, 200, completion(content))
    with ChatClient(judge(hostile), cache_dir=tmp_path) as client:
        reply = client.ask(MESSAGES, parse_mmvet_grade)
    assert reply.value == 0.5 and reply.raw == "0.5 (you sent Bearer ***...)"
    assert leaks((tmp_path / "replies.jsonl").read_text()) == []


# --- 2. a reply that is no chat completion is retried like a 5xx ----------------------------

BAD_REPLIES = {
    "a number": completion(5),
    "an object": completion({"grade": 1.0}),
    "null": completion(None),
    "a list": completion(["0.5"]),
    "not JSON": b"<html>502 Bad Gateway</html>",
    "no choices": b'{"error": "overloaded"}',
}


@pytest.mark.parametrize("payload", BAD_REPLIES.values(), ids=BAD_REPLIES.keys())
def test_a_bad_reply_is_retried_then_named(hostile, payload):
    """max_retries=2: three requests, then an EndpointError naming the request by its cache key;
    never an AttributeError, never an empty reply passed on as the judge's."""
    hostile.respond = lambda handler: send(handler, 200, payload)
    with ChatClient(judge(hostile)) as client, pytest.raises(EndpointError) as error:
        client.ask(MESSAGES, parse_mmvet_grade)
    assert len(hostile.requests) == 3
    message = str(error.value)
    assert f"failed 3 times on request {reply_key('judge-model', MESSAGES)[:12]}" in message
    assert "x = 3 | Grade:" in message  # the end of the request's last message
    assert "not text" in message or "not in the chat completions format" in message


def test_a_bad_reply_then_a_good_one_is_a_judgment(hostile):
    replies = iter([completion(5), b"not json", completion("0.7")])
    hostile.respond = lambda handler: send(handler, 200, next(replies))
    with ChatClient(judge(hostile)) as client:
        assert client.ask(MESSAGES, parse_mmvet_grade).value == 0.7
        assert client.requests == 3


def mmvet_run(tmp_path: Path, url: str) -> EvalConfig:
    """An MM-Vet run of one question scored from an answers file by the judge at `url`."""
    folder = tmp_path / "mmvet"
    (folder / "images").mkdir(parents=True)
    item = {"imagename": "a.png", "question": "What fruit?", "answer": "apple"}
    (folder / "mm-vet.json").write_text(json.dumps({"v1_0": {**item, "capability": ["rec"]}}))
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"question_id": "v1_0", "answer": "an apple"}) + "\n")
    bench = BenchmarkConfig(name="mmvet", data=str(folder), answers=str(answers))
    config = EndpointConfig(
        base_url=url, model="judge", api_key_env=KEY_ENV, backoff_s=0.01, max_retries=1
    )
    return EvalConfig(benchmarks=[bench], judge=config)


@pytest.mark.parametrize(
    ("status", "payload"), [(200, completion(3)), (200, b"{not json"), (503, b"busy")]
)
def test_eval_stops_on_a_bad_judge_reply_as_on_a_lasting_5xx(hostile, tmp_path, status, payload):
    """Either way the run stops with the same EndpointError (its replies so far cached, so a
    rerun resumes) and writes no results; a later good judge finishes the run."""
    hostile.respond = lambda handler: send(handler, status, payload)
    config = mmvet_run(tmp_path, hostile.url)
    with pytest.raises(EndpointError, match="failed 2 times on request"):
        run_eval(config, tmp_path / "run", log=lambda _: None)
    assert not (tmp_path / "run" / "results.json").exists()
    hostile.respond = lambda handler: send(handler, 200, completion("0.8"))
    results = run_eval(config, tmp_path / "run", log=lambda _: None)
    assert results["benchmarks"]["mmvet"]["total"] == pytest.approx(80.0)


def test_the_endpoint_rewriter_refuses_a_reply_that_is_not_text(hostile):
    hostile.respond = lambda handler: send(handler, 200, completion({"text": "A cat."}))
    config = InjectConfig(kind="endpoint", endpoint=judge(hostile, max_retries=1))
    rewriter = EndpointRewriter(config)
    try:
        with pytest.raises(EndpointError, match=r"message\.content is \{\"text\""):
            rewriter.rewrite_all(["A dog."], [None], [0])
    finally:
        rewriter.close()


# --- 3. a deadline for the whole request, a limit on the reply's size ------------------------


def trickle(payload: bytes, headers_too: bool, every_s: float = 0.04) -> Respond:
    """Sends `payload` (the body, or the whole response with `headers_too`) a byte at a time."""

    def respond(handler: BaseHTTPRequestHandler) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(payload)}\r\n\r\n".encode()
        if not headers_too:
            handler.wfile.write(head)
            handler.wfile.flush()
        for byte in (head if headers_too else b"") + payload:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(every_s)

    return respond


@pytest.mark.parametrize("headers_too", [False, True], ids=["body", "headers and body"])
def test_a_trickled_reply_ends_at_the_deadline(hostile, headers_too):
    """79 bytes of body at 40 ms each is 3.2 s, every read well inside the 1 s timeout: before
    the fix the reply arrived whole after 3.2 s or more; now the request ends at its 1 s
    deadline."""
    hostile.respond = trickle(completion("0.5"), headers_too)
    started = time.monotonic()
    with (
        ChatClient(judge(hostile, timeout_s=1.0, max_retries=0)) as client,
        pytest.raises(EndpointError, match=r"no whole reply within judge\.timeout_s \(1\.0 s\)"),
    ):
        client.ask(MESSAGES, parse_mmvet_grade)
    assert time.monotonic() - started < 2.5


MIB = 1 << 20


def fifty_megabytes(declared: bool) -> Respond:
    """A reply that parses ("0.5 xxxx...") and is 50 MB long, sent 1 MiB at a time; with its
    length declared, or (HTTP/1.0) ended by closing the connection."""
    head = b'{"choices": [{"message": {"content": "0.5 '
    chunk = b"x" * MIB

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        if declared:
            handler.send_header("Content-Length", str(len(head) + 50 * MIB + 4))
        handler.end_headers()
        handler.wfile.write(head)
        for _ in range(50):
            handler.wfile.write(chunk)
        handler.wfile.write(b'"}}]}')

    return respond


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-close"])
def test_a_fifty_megabyte_reply_is_refused_and_never_kept(hostile, tmp_path, declared):
    hostile.respond = fifty_megabytes(declared)
    with (
        ChatClient(judge(hostile, max_retries=1), cache_dir=tmp_path) as client,
        pytest.raises(
            EndpointError, match=r"a reply over judge\.max_reply_bytes \(1048576 bytes\)"
        ),
    ):
        client.ask(MESSAGES, parse_mmvet_grade)
    assert len(hostile.requests) == 2  # refused like a 5xx: retried, then reported
    assert not (tmp_path / "replies.jsonl").exists()


# --- 4. answers must be text -----------------------------------------------------------------


def pope_run(tmp_path: Path, answers: list[dict]) -> EvalConfig:
    pope = tmp_path / "pope" / "coco_pope_random.json"
    pope.parent.mkdir(parents=True)
    questions = [
        {"question_id": i, "image": "a.jpg", "text": f"Is there a {thing}?", "label": label}
        for i, (thing, label) in enumerate([("dog", "yes"), ("cat", "no")], start=1)
    ]
    pope.write_text("".join(json.dumps(q) + "\n" for q in questions))
    file = tmp_path / "given.jsonl"
    file.write_text("".join(json.dumps(a) + "\n" for a in answers))
    bench = BenchmarkConfig(name="pope", data=str(pope.parent), answers=str(file))
    return EvalConfig(benchmarks=[bench])


@pytest.mark.parametrize("answer", [5, True, {"text": "yes"}, ["yes"]], ids=str)
def test_an_answer_that_is_not_text_is_refused_by_line(tmp_path, answer):
    """Before the fix these were scored as the texts "5", "True", "{'text': 'yes'}"."""
    config = pope_run(
        tmp_path,
        [
            {"question_id": "random/1", "answer": "yes"},
            {"question_id": "random/2", "answer": answer},
        ],
    )
    expected = f"given.jsonl line 2 (question_id='random/2'): the answer is {json.dumps(answer)}"
    with pytest.raises(ValueError, match=re.escape(expected + ", not text")):
        run_eval(config, tmp_path / "run", log=lambda _: None)


@pytest.mark.parametrize("record", [{"answer": None}, {"question_id": None}], ids=str)
def test_a_null_answer_or_question_id_is_not_an_answer_record(tmp_path, record):
    config = pope_run(tmp_path, [{"question_id": "random/1", "answer": "yes", **record}])
    with pytest.raises(ValueError, match=r"given\.jsonl line 1: not an answer record"):
        run_eval(config, tmp_path / "run", log=lambda _: None)


def test_a_llava_bench_reference_that_is_not_text_is_refused(tmp_path):
    """The judge reads the reference beside the answer: 7 would have reached it as "7"."""
    folder = tmp_path / "llava_bench"
    folder.mkdir()
    question = {"question_id": 1, "image": "a.jpg", "text": "What?", "category": "conv"}
    (folder / "questions.jsonl").write_text(json.dumps(question) + "\n")
    (folder / "context.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": "c"}) + "\n")
    (folder / "answers_gpt4.jsonl").write_text(json.dumps({"question_id": 1, "text": 7}) + "\n")
    with pytest.raises(
        ValueError, match=r"answers_gpt4\.jsonl line 1 \(question_id=1\): the reference answer"
    ):
        read_llava_bench(str(folder))


# --- 5. the local rewriter LM loads safetensors only -----------------------------------------

CHAT = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def tiny_lm():
    return build_tiny_causal_lm(["a red circle ."] * 8, CHAT)


def pickled_lm(folder: Path, tiny_lm, weights: str = "pytorch_model.bin") -> Path:
    """A causal LM folder whose weights are a torch pickle named `weights`, no model.safetensors
    (transformers 5 writes safetensors even with safe_serialization=False, so it is saved by
    hand)."""
    model, tokenizer = tiny_lm
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / weights)
    return folder


def decoy(folder: Path) -> None:
    """Some other safetensors file, so the folder does not hold pickle weights only."""
    save_file({"step": torch.zeros(1)}, folder / "optimizer_state.safetensors")


def point_index_at_pickle(folder: Path, tiny_lm) -> None:
    weight_map = {name: "pytorch_model.bin" for name in tiny_lm[0].state_dict()}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def local_rewriter(model: str):
    config = InjectConfig(kind="local", model=model)
    return make_rewriter(config, ModelConfig("unused", dtype="float32", device="cpu"), *[None] * 3)


def test_a_pickle_only_local_lm_is_refused(tmp_path, tiny_lm):
    """Already refused before the fix (kept as a guard): the folder has no safetensors at all."""
    folder = pickled_lm(tmp_path / "lm", tiny_lm)
    with pytest.raises(OSError, match=r"holds only PyTorch pickle weights \(pytorch_model\.bin\)"):
        local_rewriter(str(folder))


def index_to_pickle(folder: Path, tiny_lm) -> None:
    """A safetensors index whose shards are the pickle: transformers loaded it."""
    point_index_at_pickle(folder, tiny_lm)
    decoy(folder)


def transformers_weights_to_pickle(folder: Path, tiny_lm) -> None:
    """config.json's `transformers_weights` naming adapter_model.bin: transformers loaded it."""
    (folder / "pytorch_model.bin").rename(folder / "adapter_model.bin")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "transformers_weights": "adapter_model.bin"})
    )
    decoy(folder)


@pytest.mark.parametrize("trick", [index_to_pickle, transformers_weights_to_pickle])
def test_a_local_lm_that_points_at_pickle_is_refused_as_the_mllm_loader_refuses(
    tmp_path, tiny_lm, trick
):
    folder = pickled_lm(tmp_path / "lm", tiny_lm)
    trick(folder, tiny_lm)
    with pytest.raises(OSError, match=r"points its weights at PyTorch pickle files") as local:
        local_rewriter(str(folder))
    assert "bpo loads safetensors only" in str(local.value)
    with pytest.raises(OSError) as mllm:
        load_model_and_processor(str(folder), device="cpu")
    assert str(mllm.value) == str(local.value)


def test_a_hub_lm_that_points_at_pickle_is_refused(tmp_path, tiny_lm, monkeypatch):
    """A hub name was never checked at all: a cached repo (offline) whose index names a pickle
    shard loaded."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo, commit = tmp_path / "hub" / "models--someone--lm", "0" * 40
    snapshot = pickled_lm(repo / "snapshots" / commit, tiny_lm)
    point_index_at_pickle(snapshot, tiny_lm)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with pytest.raises(OSError, match=r"someone/lm points its weights at PyTorch pickle files"):
        local_rewriter("someone/lm")
