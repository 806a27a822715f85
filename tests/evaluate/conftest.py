"""A real HTTP server on 127.0.0.1 that answers in the chat completions format, for judge tests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from local_server import serving

# reply(request body) -> (status, reply text or raw body, extra headers)
Reply = Callable[[dict[str, Any]], tuple[int, str, dict[str, str]]]


@dataclass
class Seen:
    """One request the server received."""

    at: float
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class JudgeServer:
    url: str
    seen: list[Seen] = field(default_factory=list)
    reply: Reply = lambda body: (200, "1.0", {})

    def user_text(self, index: int = -1) -> str:
        return self.seen[index].body["messages"][-1]["content"]


def completion(content: str) -> str:
    return json.dumps(
        {
            "id": "test",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": content},
                }
            ],
        }
    )


@pytest.fixture
def judge_server():
    """A ThreadingHTTPServer on a free port; set `.reply` to script its answers."""
    state = JudgeServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            state.seen.append(Seen(time.monotonic(), dict(self.headers), body))
            status, text, headers = state.reply(body)
            payload = (completion(text) if status == 200 else text).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_args):  # keep test output quiet
            pass

    with serving(Handler) as state.url:
        yield state
