"""The OpenAI-compatible chat client every stage that asks an LLM shares: judges and rewriters.

The endpoint is whatever serves `POST {base_url}/chat/completions`: OpenAI, a local vLLM server,
`transformers serve`. The client keeps at most `concurrency` requests in flight, retries 429, 5xx,
network errors and bad replies (not the chat completions format, content that is not text, too
long, too slow) with exponential backoff (honouring Retry-After), re-asks when a reply does not
parse, and caches every parsed reply on disk under a hash of everything that shapes the reply
(model, temperature, max_tokens, messages), so a rerun never pays for the same reply twice, and a
change of any of them asks again. The API key is read from the environment variable the config names
and is sent in the Authorization header only: it is never written anywhere, and replies or errors
that echo it, or any fragment of it, are redacted.

A server can stall a request without ever breaking a read timeout (one byte a second) or send a
reply of any size, so each request has a deadline for the whole exchange (`timeout_s`, enforced on
every network wait by `_DeadlineBackend`) and a size limit (`max_reply_bytes`, read as a stream).
"""

from __future__ import annotations

import copy
import dataclasses
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
SNIPPET = 300  # characters of a reply quoted in an error message
# Any run of this many characters of the key is redacted wherever it appears: a reply cut at a
# size limit, or a server that echoes part of the header, must not leak most of the key.
KEY_FRAGMENT = 8


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
    timeout_s: float = 120.0  # for the whole request: connecting, sending, the entire reply
    # A longer reply is refused and retried, never kept (1 MiB: a judgment is a few hundred bytes).
    max_reply_bytes: int = 1 << 20
    parse_retries: int = 2  # extra asks (each 0.5 warmer) when a reply does not parse
    # Folder of the reply cache; null: the stage's default (`judge_cache/` in an eval run's
    # output folder; no cache for a rewriter, whose replies are sampled).
    cache_dir: str | None = None


class EndpointError(RuntimeError):
    """The endpoint cannot be used: misconfigured, refusing, or down past the retries."""


class _Retry(Exception):
    """One attempt failed in a way a retry may fix: `reason` (redacted) says how."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


@dataclass
class Reply:
    """One asked item: `value` is the parsed reply, or None with `error` saying why."""

    key: str
    value: Any
    raw: str | None  # the reply parsed, or the last unparsable one
    attempts: int  # requests made for it (0 when it came from the cache)
    cached: bool
    error: str | None = None


def redact(text: str, key: str | None) -> str:
    """`text` with every run of KEY_FRAGMENT or more characters of `key` (all of a shorter key)
    replaced by ***."""
    if not key:
        return text
    size = min(KEY_FRAGMENT, len(key))
    spans = []
    for gram in {key[i : i + size] for i in range(len(key) - size + 1)}:
        start = text.find(gram)
        while start != -1:
            spans.append((start, start + size))
            start = text.find(gram, start + 1)
    merged: list[list[int]] = []  # overlapping or touching fragments become one ***
    for start, stop in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    pieces, end = [], 0
    for start, stop in merged:
        pieces += [text[end:start], "***"]
        end = stop
    return "".join(pieces) + text[end:]


def reply_key(
    model: str,
    messages: Messages,
    temperature: float = EndpointConfig.temperature,
    max_tokens: int = EndpointConfig.max_tokens,
) -> str:
    """The cache key: a SHA-256 of every request setting that shapes the reply, and the messages.

    temperature, max_tokens: the request's (by default EndpointConfig's defaults).

    Re-asks warmer (`parse_retries`) are kept under the key of the first ask: the cache holds the
    parsed answer to this request at these settings.
    """
    request = {
        "model": model,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "messages": messages,
    }
    blob = json.dumps(request, sort_keys=True, ensure_ascii=False)
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


class _Deadline(threading.local):
    at: float | None = None  # monotonic time by which this thread's current request must end


_DEADLINE = _Deadline()


def _until_deadline(timeout: float | None) -> float | None:
    """`timeout` cut to what is left of this thread's request deadline.

    Never below 1 ms: a socket timeout of 0 would mean non-blocking, so a spent deadline makes
    the wait time out at once instead.
    """
    if _DEADLINE.at is None:
        return timeout
    left = max(_DEADLINE.at - time.monotonic(), 1e-3)
    return left if timeout is None else min(timeout, left)


class _DeadlineStream:
    """A connection whose every wait (connect, TLS, send, each read) ends by the deadline."""

    def __init__(self, stream: Any):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _until_deadline(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _until_deadline(timeout))

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout=None):
        tls = self._stream.start_tls(ssl_context, server_hostname, _until_deadline(timeout))
        return _DeadlineStream(tls)

    def __getattr__(self, name: str) -> Any:  # close, get_extra_info
        return getattr(self._stream, name)


class _DeadlineBackend:
    """httpcore2's network backend, opening `_DeadlineStream`s.

    httpx2's timeout bounds each read, so a server sending a byte a second would hold a request
    forever; bounding every wait by the request's deadline bounds the whole of it.
    """

    def __init__(self, backend: Any):
        self._backend = backend

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, **kwargs: Any):
        return _DeadlineStream(
            self._backend.connect_tcp(host, port, _until_deadline(timeout), **kwargs)
        )

    def connect_unix_socket(self, path: str, timeout: float | None = None, **kwargs: Any):
        stream = self._backend.connect_unix_socket(path, _until_deadline(timeout), **kwargs)
        return _DeadlineStream(stream)

    def __getattr__(self, name: str) -> Any:  # sleep
        return getattr(self._backend, name)


def _bound_by_deadlines(client: httpx2.Client) -> None:
    """Route every connection `client` opens (directly or through a proxy) via _DeadlineBackend.

    httpx2 takes no network backend, so this sets the one of each transport's connection pool; a
    transport laid out otherwise fails here, loudly, rather than leaving requests unbounded.
    """
    for transport in {client._transport, *client._mounts.values()} - {None}:
        pool = getattr(transport, "_pool", None)
        if not hasattr(pool, "_network_backend"):
            raise RuntimeError(
                f"httpx2 {httpx2.__version__}: {transport!r} has no connection pool whose "
                "network backend bpo.endpoint can bound by a deadline; pin the httpx2 version "
                "this bpo was tested with"
            )
        pool._network_backend = _DeadlineBackend(pool._network_backend)


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
        _bound_by_deadlines(self._http)
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
        return redact(text, self._key)

    def _key_of(self, messages: Messages) -> str:
        config = self.config
        return reply_key(config.model, messages, config.temperature, config.max_tokens)

    def with_settings(self, **settings: Any) -> ChatClient:
        """This client asking with other request settings (model, temperature, max_tokens,
        parse_retries); the connection, the key and the reply cache are shared, so close only the
        client they were opened by. None keeps a setting as it is."""
        allowed = {"model", "temperature", "max_tokens", "parse_retries"}
        unknown = set(settings) - allowed
        if unknown:
            raise TypeError(f"with_settings takes {sorted(allowed)}, not {sorted(unknown)}")
        changes = {k: v for k, v in settings.items() if v is not None}
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, **changes)
        return other

    def _name(self, messages: Messages) -> str:
        """How an error names a request: its cache key and the end of its last message."""
        tail = " ".join(str(messages[-1].get("content", "")).split()) if messages else ""
        return f"request {self._key_of(messages)[:12]} (...{tail[-60:]!r})"

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        wait = self.config.backoff_s * 2**attempt * (1 + 0.25 * random.random())
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.config.max_backoff_s)

    def complete(self, messages: Messages, temperature: float | None = None) -> str:
        """The reply text to `messages`; retries 429/5xx/network errors and bad replies, raises
        EndpointError after."""
        body = {
            "model": self.config.model,
            "messages": messages,
            "temperature": self.config.temperature if temperature is None else temperature,
            "max_tokens": self.config.max_tokens,
        }
        last = ""
        for attempt in range(self.config.max_retries + 1):
            self.requests += 1
            try:
                return self._attempt(body)
            except _Retry as failure:
                last = failure.reason
                if attempt < self.config.max_retries:
                    time.sleep(self._wait(attempt, failure.retry_after))
        raise EndpointError(
            f"endpoint {self._url} failed {self.config.max_retries + 1} times on "
            f"{self._redact(self._name(messages))} (last: {last}); lower "
            f"{self.section}.concurrency, raise {self.section}.max_retries, or check the server. "
            "Replies received so far are cached: rerunning resumes."
        )

    def _attempt(self, body: dict[str, Any]) -> str:
        """One request: the reply text; _Retry when a retry may do better, EndpointError when not."""
        deadline = time.monotonic() + self.config.timeout_s
        _DEADLINE.at = deadline
        try:
            with self._http.stream("POST", self._url, json=body) as response:
                data, whole = self._read_body(response)
        except httpx2.RequestError as exc:  # network, protocol, timeout, undecodable body
            if time.monotonic() >= deadline:
                raise _Retry(
                    f"no whole reply within {self.section}.timeout_s ({self.config.timeout_s} s)"
                ) from None
            raise _Retry(self._redact(f"{type(exc).__name__}: {exc}")) from None
        finally:
            _DEADLINE.at = None
        # Redacted whole, then cut: a cut first would leave the part of the key before the cut.
        text = self._redact(data.decode("utf-8", errors="replace"))
        status = response.status_code
        if status != 200:
            if status < 500 and status not in RETRY_STATUSES:
                raise EndpointError(
                    f"endpoint {self._url} answered HTTP {status}: {text[:SNIPPET]}; "
                    f"check {self.section}.model ({self.config.model!r}), "
                    f"{self.section}.base_url and the key in ${self.config.api_key_env}"
                )
            raise _Retry(f"HTTP {status}: {text[:SNIPPET]}", _retry_after(response))
        if not whole:
            limit = self.config.max_reply_bytes
            raise _Retry(f"a reply over {self.section}.max_reply_bytes ({limit} bytes)")
        return self._content(data, text)

    def _read_body(self, response: httpx2.Response) -> tuple[bytes, bool]:
        """At most max_reply_bytes of the body, read as it streams in, and whether that is all."""
        limit = self.config.max_reply_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return b"", False  # refused before reading any of it
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > limit:
                return bytes(body[:limit]), False
        return bytes(body), True

    def _content(self, data: bytes, text: str) -> str:
        """The message text of a 200 reply (`text`: the body, redacted); _Retry when there is none."""
        try:
            content = json.loads(data)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, RecursionError) as exc:
            raise _Retry(
                f"HTTP 200 but not in the chat completions format ({type(exc).__name__}): "
                f"{text[:SNIPPET]}"
            ) from None
        if not isinstance(content, str):
            # A number or an object is no reply text; null is no reply at all.
            shown = self._redact(json.dumps(content, ensure_ascii=False))[:80]
            raise _Retry(f"HTTP 200 but message.content is {shown}, not text")
        # A server that echoes the request (its headers included) must not put the key in a
        # cache, a judgments file or a pair store.
        return self._redact(content)

    def ask(self, messages: Messages, parse: Callable[[str], Any]) -> Reply:
        """Ask (or reuse the cached reply), parse; re-ask warmer while the reply does not parse.

        parse: reply text -> value, raising ValueError when the reply is unusable.
        """
        key = self._key_of(messages)
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
