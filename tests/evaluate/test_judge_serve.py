"""One judgment end to end through a real OpenAI-compatible server: `transformers serve`.

The server serves a tiny Llama saved to a temporary folder (no hub, no network). Its weights are
set so that greedy decoding always picks the token "0.8": the embedding puts a constant in one
dimension, the attention and MLP outputs are zero, the final norm keeps only that dimension and
the LM head maps it to "0.8" alone. So the prompt goes through the server's chat template,
generation and OpenAI response format, and our client parses a real grade out of it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bpo.endpoint import ChatClient, EndpointConfig
from bpo.evaluate.judges import mmvet_messages, parse_mmvet_grade
from bpo.models.tiny import build_tiny_causal_lm, force_greedy_token

pytest.importorskip("fastapi", reason="needs transformers[serving] (in bpo's dev extra)")
pytest.importorskip("uvicorn", reason="needs transformers[serving] (in bpo's dev extra)")

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def save_grading_lm(folder: Path) -> None:
    """A tiny LlamaForCausalLM + tokenizer (with a chat template) whose greedy reply is "0.8"."""
    model, tokenizer = build_tiny_causal_lm(
        ["Grade the answer to the question ."] * 8,
        CHAT_TEMPLATE,
        extra_tokens=["0.8"],
        max_position_embeddings=4096,
    )
    force_greedy_token(model, tokenizer.convert_tokens_to_ids("0.8"))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served_judge(tmp_path):
    """`transformers serve FOLDER` on 127.0.0.1, offline; killed at teardown."""
    folder = tmp_path / "grading-lm"
    save_grading_lm(folder)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cli = Path(sys.executable).parent / "transformers"
    command = [
        str(cli),
        "serve",
        str(folder),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 50
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"transformers serve did not start:\n{(tmp_path / 'serve.log').read_text()[-2000:]}"
                    )
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1", str(folder)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.mark.slow
def test_a_grade_from_transformers_serve(served_judge, tmp_path):
    base_url, model = served_judge
    config = EndpointConfig(
        base_url=base_url, model=model, api_key_env=None, max_tokens=1, timeout_s=30
    )
    messages = mmvet_messages("What fruit is it?", "apple", "an apple")
    with ChatClient(config, cache_dir=tmp_path / "cache") as client:
        judgment = client.ask(messages, parse_mmvet_grade)
    assert (judgment.value, judgment.raw, judgment.attempts) == (0.8, "0.8", 1)
    with ChatClient(config, cache_dir=tmp_path / "cache") as client:
        assert client.ask(messages, parse_mmvet_grade).cached
