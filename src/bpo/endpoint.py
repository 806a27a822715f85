"""The OpenAI-compatible chat client every stage that asks an LLM shares: judges and rewriters.

The endpoint is whatever serves `POST {base_url}/chat/completions`: OpenAI, a local vLLM server,
`transformers serve`. The client keeps at most `concurrency` requests in flight, retries 429, 5xx
and network errors with exponential backoff (honouring Retry-After), re-asks when a reply does
not parse, and caches every parsed reply on disk under a hash of (model, messages), so a rerun
never pays for the same reply twice. The API key is read from the environment variable the config
names and is sent in the Authorization header only: it is never written anywhere, and replies or
errors that echo it are redacted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2

from bpo.data.files import append_json_lines, read_json_lines, truncate_partial_line

Messages = list[dict[str, str]]
# Statuses worth retrying: rate limits, timeouts and server-side failures. Any other error
# (401 bad key, 404 unknown model, 400 bad request) will not change on a retry.
RETRY_STATUSES = frozenset({408, 409, 429})
CACHE_FILE = "replies.jsonl"


@dataclass
class EndpointConfig:
    """Which OpenAI-compatible endpoint answers, and how the client treats it: the `judge:` section
    of an eval config, or `inject.endpoint` of a bootstrap config."""

    # Any OpenAI-compatible server: "http://127.0.0.1:8000/v1" for a local vLLM server.
    base_url: str = "https://api.openai.com/v1"
    # Published MM-Vet and LLaVA-Bench numbers used GPT-4 judges; judged scores are comparable
    # only between runs judged by the same model.
    model: str = "gpt-4o-2024-08-06"
    # Name of the environment variable holding the API key; null for a server without auth.
    api_key_env: str | None = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 512
    concurrency: int = 8  # requests in flight at once
    max_retries: int = 6  # per request, on 429/5xx/network errors
    backoff_s: float = 1.0  # first wait; doubles on each retry, plus up to 25% jitter
    max_backoff_s: float = 60.0
    timeout_s: float = 120.0
    parse_retries: int = 2  # extra asks (each 0.5 warmer) when a reply does not parse
    # Folder of the reply cache; null: the stage's default (`judge_cache/` in an eval run's
    # output folder; no cache for a rewriter, whose replies are sampled).
    cache_dir: str | None = None


class EndpointError(RuntimeError):
    """The endpoint cannot be used: misconfigured, refusing, or down past the retries."""


@dataclass
class Reply:
    """One asked item: `value` is the parsed reply, or None with `error` saying why."""

    key: str
    value: Any
    raw: str | None  # the reply parsed, or the last unparsable one
    attempts: int  # requests made for it (0 when it came from the cache)
    cached: bool
    error: str | None = None


def reply_key(model: str, messages: Messages) -> str:
    """The cache key: a SHA-256 of the endpoint's model and the exact messages."""
    blob = json.dumps({"model": model, "messages": messages}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ReplyCache:
    """Parsed replies by key, in an append-only JSON Lines file (`replies.jsonl` by default)."""

    def __init__(self, directory: str | Path | None, name: str = CACHE_FILE):
        self._lock = threading.Lock()
        self._entries: dict[str, str] = {}
        self.path = None if directory is None else Path(directory) / name
        if self.path is not None and self.path.is_file():
            truncate_partial_line(self.path)  # a reply cut short by a kill: asked again
            fix = "delete the line or the file (those replies are asked again)"
            for number, entry in read_json_lines(
                self.path, appended=True, fix=fix, error=EndpointError
            ):
                if not isinstance(entry, dict) or not {"key", "content"} <= set(entry):
                    raise EndpointError(f"{self.path} line {number}: not a cached reply; {fix}")
                self._entries[entry["key"]] = entry["content"]

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> str | None:
        return self._entries.get(key)

    def put(self, key: str, model: str, content: str) -> None:
        with self._lock:
            self._entries[key] = content
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_json_lines(self.path, [{"key": key, "model": model, "content": content}])


def read_api_key(config: EndpointConfig, section: str = "judge") -> str | None:
    """The key from the environment variable `config.api_key_env` (None when it names none).

    section: where the config sits in the stage's YAML, for the message (`judge`,
        `inject.endpoint`).
    """
    if not config.api_key_env:
        return None
    key = os.environ.get(config.api_key_env)
    if not key:
        raise EndpointError(
            f"environment variable {config.api_key_env} is not set; export it with the "
            f"endpoint's API key, or set {section}.api_key_env to null for a server without "
            "authentication"
        )
    return key


def _retry_after(response: httpx2.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class ChatClient:
    """Chat completions with retries, bounded concurrency and the reply cache.

    cache_dir, cache_name: where replies are cached when `config.cache_dir` is null (None: no
        cache).
    section: the config's place in the stage's YAML, named in error messages.
    """

    def __init__(
        self,
        config: EndpointConfig,
        cache_dir: str | Path | None = None,
        cache_name: str = CACHE_FILE,
        section: str = "judge",
    ):
        self.config, self.section = config, section
        self._key = read_api_key(config, section)
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._http = httpx2.Client(headers=headers, timeout=config.timeout_s)
        directory = config.cache_dir if config.cache_dir is not None else cache_dir
        self.cache = ReplyCache(directory, cache_name)
        self.requests = 0  # requests sent, retries included

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        wait = self.config.backoff_s * 2**attempt * (1 + 0.25 * random.random())
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.config.max_backoff_s)

    def complete(self, messages: Messages, temperature: float | None = None) -> str:
        """The reply text to `messages`; retries 429/5xx/network errors, raises EndpointError after."""
        body = {
            "model": self.config.model,
            "messages": messages,
            "temperature": self.config.temperature if temperature is None else temperature,
            "max_tokens": self.config.max_tokens,
        }
        last = ""
        for attempt in range(self.config.max_retries + 1):
            retry_after = None
            self.requests += 1
            try:
                response = self._http.post(self._url, json=body)
            except httpx2.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return self._content(response)
                snippet = self._redact(response.text[:300])
                if response.status_code < 500 and response.status_code not in RETRY_STATUSES:
                    raise EndpointError(
                        f"endpoint {self._url} answered HTTP {response.status_code}: {snippet}; "
                        f"check {self.section}.model ({self.config.model!r}), "
                        f"{self.section}.base_url and the key in ${self.config.api_key_env}"
                    )
                last = f"HTTP {response.status_code}: {snippet}"
                retry_after = _retry_after(response)
            if attempt < self.config.max_retries:
                time.sleep(self._wait(attempt, retry_after))
        raise EndpointError(
            f"endpoint {self._url} failed {self.config.max_retries + 1} times (last: {last}); "
            f"lower {self.section}.concurrency, raise {self.section}.max_retries, or check the "
            "server. Replies received so far are cached: rerunning resumes."
        )

    def _content(self, response: httpx2.Response) -> str:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise EndpointError(
                f"endpoint {self._url} answered 200 but not in the chat completions format "
                f"({type(exc).__name__}): {self._redact(response.text[:300])}"
            ) from exc
        # A server that echoes the request (its headers included) must not put the key in a
        # cache, a judgments file or a pair store.
        return self._redact(content or "")

    def ask(self, messages: Messages, parse: Callable[[str], Any]) -> Reply:
        """Ask (or reuse the cached reply), parse; re-ask warmer while the reply does not parse.

        parse: reply text -> value, raising ValueError when the reply is unusable.
        """
        key = reply_key(self.config.model, messages)
        cached = self.cache.get(key)
        if cached is not None:
            try:
                return Reply(key, parse(cached), cached, 0, True)
            except ValueError:
                pass  # the parser changed since; ask again
        raw, error = None, ""
        tries = self.config.parse_retries + 1
        for attempt in range(tries):
            # At temperature 0 the same question gets the same unusable reply; warm up.
            temperature = min(self.config.temperature + 0.5 * attempt, 2.0)
            raw = self.complete(messages, temperature)
            try:
                value = parse(raw)
            except ValueError as exc:
                error = str(exc)
                continue
            self.cache.put(key, self.config.model, raw)
            return Reply(key, value, raw, attempt + 1, False)
        return Reply(key, None, raw, tries, False, f"unparsable after {tries} replies: {error}")

    def ask_all(
        self,
        prompts: Sequence[Messages],
        parse: Callable[[str], Any],
        progress: Callable[[], None] | None = None,
    ) -> list[Reply]:
        """`ask` for every prompt, `concurrency` at a time; results in prompt order."""

        def one(messages: Messages) -> Reply:
            reply = self.ask(messages, parse)
            if progress is not None:
                progress()
            return reply

        with ThreadPoolExecutor(max_workers=max(1, self.config.concurrency)) as pool:
            return list(pool.map(one, prompts))
