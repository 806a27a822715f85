"""LLM judges over any OpenAI-compatible chat endpoint: MM-Vet grading, LLaVA-Bench reviews.

The judge is whatever serves `POST {base_url}/chat/completions`: OpenAI, a local vLLM server,
`transformers serve`. The client keeps at most `concurrency` requests in flight, retries 429, 5xx
and network errors with exponential backoff (honouring Retry-After), re-asks when a reply does
not parse, and caches every parsed reply on disk under a hash of (judge model, messages), so a
rerun never pays for the same judgment twice. The API key is read from the environment variable
the config names and is sent in the Authorization header only: it is never written anywhere.

The prompts are written for this project, following the published protocols: MM-Vet's 0.0-1.0
correctness grade against a ground truth that may join parts with <AND> or list alternatives with
<OR> (Yu et al., 2023), and LLaVA-Bench's pairwise 1-10 review of the model's answer beside the
reference answer, with the image given as text (Liu et al., 2023).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2

Messages = list[dict[str, str]]
# Statuses worth retrying: rate limits, timeouts and server-side failures. Any other error
# (401 bad key, 404 unknown model, 400 bad request) will not change on a retry.
RETRY_STATUSES = frozenset({408, 409, 429})
CACHE_FILE = "judgments.jsonl"


@dataclass
class JudgeConfig:
    """Which OpenAI-compatible endpoint judges, and how the client treats it."""

    # Any OpenAI-compatible server: "http://127.0.0.1:8000/v1" for a local vLLM server.
    base_url: str = "https://api.openai.com/v1"
    # Published MM-Vet and LLaVA-Bench numbers used GPT-4 judges; scores are comparable only
    # between runs judged by the same model.
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
    # Folder of the judgment cache; null: `judge_cache/` in the run's output folder.
    cache_dir: str | None = None


class JudgeError(RuntimeError):
    """The judge endpoint cannot be used: misconfigured, refusing, or down past the retries."""


@dataclass
class Judgment:
    """One judged item: `value` is the parsed reply, or None with `error` saying why."""

    key: str
    value: Any
    raw: str | None  # the reply parsed, or the last unparsable one
    attempts: int  # requests made for it (0 when it came from the cache)
    cached: bool
    error: str | None = None


def judgment_key(model: str, messages: Messages) -> str:
    """The cache key: a SHA-256 of the judge model and the exact messages."""
    blob = json.dumps({"model": model, "messages": messages}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgmentCache:
    """Parsed judge replies by key, in an append-only JSON Lines file (`judgments.jsonl`)."""

    def __init__(self, directory: str | Path | None):
        self._lock = threading.Lock()
        self._entries: dict[str, str] = {}
        self.path = None if directory is None else Path(directory) / CACHE_FILE
        if self.path is not None and self.path.is_file():
            with self.path.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        self._entries[entry["key"]] = entry["content"]
                    # A line cut short by a crash is a judgment to make again, not an error.
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue

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
            line = json.dumps({"key": key, "model": model, "content": content}, ensure_ascii=False)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")


def read_api_key(config: JudgeConfig) -> str | None:
    """The key from the environment variable `config.api_key_env` (None when it names none)."""
    if not config.api_key_env:
        return None
    key = os.environ.get(config.api_key_env)
    if not key:
        raise JudgeError(
            f"environment variable {config.api_key_env} is not set; export it with the judge's "
            "API key, or set judge.api_key_env to null for a server without authentication"
        )
    return key


def _retry_after(response: httpx2.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class JudgeClient:
    """Chat completions with retries, bounded concurrency and the judgment cache."""

    def __init__(self, config: JudgeConfig, cache_dir: str | Path | None = None):
        self.config = config
        self._key = read_api_key(config)
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._http = httpx2.Client(headers=headers, timeout=config.timeout_s)
        directory = config.cache_dir if config.cache_dir is not None else cache_dir
        self.cache = JudgmentCache(directory)
        self.requests = 0  # requests sent, retries included

    def __enter__(self) -> JudgeClient:
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
        """The reply text to `messages`; retries 429/5xx/network errors, raises JudgeError after."""
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
                    raise JudgeError(
                        f"judge {self._url} answered HTTP {response.status_code}: {snippet}; "
                        f"check judge.model ({self.config.model!r}), judge.base_url and the key "
                        f"in ${self.config.api_key_env}"
                    )
                last = f"HTTP {response.status_code}: {snippet}"
                retry_after = _retry_after(response)
            if attempt < self.config.max_retries:
                time.sleep(self._wait(attempt, retry_after))
        raise JudgeError(
            f"judge {self._url} failed {self.config.max_retries + 1} times (last: {last}); "
            "lower judge.concurrency, raise judge.max_retries, or check the server. Judgments "
            "made so far are cached: rerunning resumes."
        )

    def _content(self, response: httpx2.Response) -> str:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise JudgeError(
                f"judge {self._url} answered 200 but not in the chat completions format "
                f"({type(exc).__name__}): {self._redact(response.text[:300])}"
            ) from exc
        return content or ""

    def judge(self, messages: Messages, parse: Callable[[str], Any]) -> Judgment:
        """Ask (or reuse the cached reply), parse; re-ask warmer while the reply does not parse.

        parse: reply text -> value, raising ValueError when the reply is unusable.
        """
        key = judgment_key(self.config.model, messages)
        cached = self.cache.get(key)
        if cached is not None:
            try:
                return Judgment(key, parse(cached), cached, 0, True)
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
            return Judgment(key, value, raw, attempt + 1, False)
        return Judgment(key, None, raw, tries, False, f"unparsable after {tries} replies: {error}")

    def judge_all(
        self,
        prompts: Sequence[Messages],
        parse: Callable[[str], Any],
        progress: Callable[[], None] | None = None,
    ) -> list[Judgment]:
        """`judge` for every prompt, `concurrency` at a time; results in prompt order."""

        def one(messages: Messages) -> Judgment:
            judgment = self.judge(messages, parse)
            if progress is not None:
                progress()
            return judgment

        with ThreadPoolExecutor(max_workers=max(1, self.config.concurrency)) as pool:
            return list(pool.map(one, prompts))


# --- MM-Vet ---------------------------------------------------------------------------------

MMVET_SYSTEM = (
    "You grade answers to questions about images. You do not see the image: judge the answer "
    "against the ground truth only."
)
MMVET_INSTRUCTIONS = """\
Compare the model's answer with the ground truth and reply with one number between 0.0 and 1.0: \
how much of the ground truth the answer gets right.

How to grade:
- Parts joined by <AND> are all required: the grade is the share of them the answer gets right.
- Alternatives joined by <OR> are each a complete answer: matching any one of them earns 1.0.
- Wording does not matter, meaning does: synonyms, paraphrases, units and number formats that say \
the same thing are correct. Extra correct detail costs nothing; a statement that contradicts the \
ground truth lowers the grade.
- For an open-ended question, grade how fully and how correctly the answer covers the points of \
the ground truth, in steps of 0.1.
- Reply with the number alone.

Graded examples:
Question: Which two numbers solve the equation? | Ground truth: 3 <AND> -2 | Answer: x = 3 | Grade: 0.5
Question: Which two numbers solve the equation? | Ground truth: 3 <AND> -2 | Answer: -2 and 3 \
| Grade: 1.0
Question: What is the man holding? | Ground truth: umbrella <OR> parasol | Answer: He holds a \
black parasol. | Grade: 1.0
Question: What does the street sign say? | Ground truth: Main St | Answer: It says Elm Street. \
| Grade: 0.0
Question: How many cups are on the table? | Ground truth: 4 | Answer: There are four cups. \
| Grade: 1.0
Question: What colour is the bus and where is it going? | Ground truth: yellow <AND> to the airport \
| Answer: The bus is yellow and is going downtown. | Grade: 0.5
Question: Why is the road wet? | Ground truth: It has been raining: the sky is grey and people \
carry umbrellas. | Answer: Because it rained. | Grade: 0.6"""


def mmvet_messages(question: str, ground_truth: str, answer: str) -> Messages:
    """The grading request for one MM-Vet item."""
    item = f"Question: {question} | Ground truth: {ground_truth} | Answer: {answer} | Grade:"
    return [
        {"role": "system", "content": MMVET_SYSTEM},
        {"role": "user", "content": f"{MMVET_INSTRUCTIONS}\n\nNow grade this one:\n{item}"},
    ]


_GRADE_PREFIX = re.compile(r"^\s*(?:grade|score|correctness)\s*[:=]?\s*", re.IGNORECASE)


def parse_mmvet_grade(text: str) -> float:
    """The grade in a reply: its first word, a number from 0 to 1 ("0.5", "Grade: 1.0.").

    Raises ValueError when the first word is not a number or the number is outside [0, 1].
    """
    stripped = _GRADE_PREFIX.sub("", text.strip())
    first = stripped.split(maxsplit=1)[0].rstrip(".,;:") if stripped else ""
    try:
        grade = float(first)
    except ValueError:
        raise ValueError(f"no grade at the start of the reply {text[:80]!r}") from None
    if not 0.0 <= grade <= 1.0:
        raise ValueError(f"grade {grade} is outside [0, 1] in the reply {text[:80]!r}")
    return grade


def mmvet_scores(grades: Sequence[float | None], capabilities: Sequence[Sequence[str]]) -> dict:
    """MM-Vet's scores in percent: total, per capability and per capability combination.

    A capability's score is the mean grade of the items that need it (an item needing OCR and
    math counts for both); a combination's ("math_ocr", names sorted) of the items that need
    exactly those. Items whose grade is None (unparsable) are left out of every mean and counted
    in `unparsable`; a mean over no item is 0.
    """
    if len(grades) != len(capabilities):
        raise ValueError(f"{len(grades)} grades but {len(capabilities)} capability lists")
    by_capability: dict[str, list[float]] = {}
    by_combination: dict[str, list[float]] = {}
    graded = []
    for grade, needs in zip(grades, capabilities, strict=True):
        for name in needs:
            by_capability.setdefault(name, [])
        by_combination.setdefault("_".join(sorted(needs)), [])
        if grade is None:
            continue
        graded.append(grade)
        for name in needs:
            by_capability[name].append(grade)
        by_combination["_".join(sorted(needs))].append(grade)

    def percent(values: list[float]) -> float:
        return 100 * sum(values) / len(values) if values else 0.0

    return {
        "total": percent(graded),
        "capability": {k: percent(v) for k, v in sorted(by_capability.items())},
        "combination": {k: percent(v) for k, v in sorted(by_combination.items())},
        "graded": len(graded),
        "unparsable": len(grades) - len(graded),
    }


# --- LLaVA-Bench in-the-wild ------------------------------------------------------------------

LLAVA_BENCH_SYSTEM = "You are a fair, careful reviewer of answers to questions about images."
LLAVA_BENCH_FOCUS = {
    "conv": "This is a conversational question: a short, direct, correct answer is best.",
    "detail": (
        "This question asks for a detailed description: reward correct, complete coverage of the "
        "objects, attributes and layout, and penalize anything the description does not support."
    ),
    "complex": (
        "This question needs reasoning about the image: reward correct reasoning grounded in "
        "what the image shows."
    ),
}
LLAVA_BENCH_INSTRUCTIONS = """\
You cannot see the image; the description above tells what it shows. Two assistants answered the \
question. Rate each answer for helpfulness, relevance, accuracy (against the description) and \
level of detail, on a scale of 1 to 10 where 10 is best. {focus}

On the first line write only the two scores, Assistant 1's then Assistant 2's, separated by a \
space. From the second line on, explain the ratings in a few sentences. Do not let the order of \
the answers or their length sway you."""


def llava_bench_messages(
    question: str, context: str, reference: str, answer: str, category: str
) -> Messages:
    """The review request: Assistant 1 is the reference answer, Assistant 2 the model's."""
    focus = LLAVA_BENCH_FOCUS.get(category, "")
    instructions = LLAVA_BENCH_INSTRUCTIONS.format(focus=focus).replace("  ", " ").rstrip()
    user = (
        f"[Image description]\n{context}\n\n[Question]\n{question}\n\n"
        f"[Assistant 1]\n{reference}\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{answer}\n[End of Assistant 2]\n\n{instructions}"
    )
    return [{"role": "system", "content": LLAVA_BENCH_SYSTEM}, {"role": "user", "content": user}]


_SCORE = re.compile(r"^\d+(?:\.\d+)?$")


def parse_review_scores(text: str) -> tuple[float, float]:
    """(reference score, model score) from a review's first line: two numbers from 1 to 10.

    Commas between the scores are accepted ("8, 6"); anything else on the line, or a score
    outside [1, 10], raises ValueError.
    """
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    parts = first.replace(",", " ").split()
    if len(parts) != 2 or not all(_SCORE.match(p) for p in parts):
        raise ValueError(f"the first line is not two scores: {first[:80]!r}")
    scores = (float(parts[0]), float(parts[1]))
    if not all(1.0 <= s <= 10.0 for s in scores):
        raise ValueError(f"scores {scores} are outside [1, 10]: {first[:80]!r}")
    return scores


def llava_bench_scores(
    reviews: Sequence[tuple[float, float] | None], categories: Sequence[str]
) -> dict:
    """Relative scores: 100 * mean(model score) / mean(reference score), per category and overall.

    reviews: (reference score, model score) per question, None when the review did not parse;
        those are reported in `unparsable` and left out of every mean (the original script
        averaged them in as -1). A category with no parsed review scores 0.
    """
    if len(reviews) != len(categories):
        raise ValueError(f"{len(reviews)} reviews but {len(categories)} categories")
    groups: dict[str, list[tuple[float, float]]] = {c: [] for c in sorted(set(categories))}
    parsed = []
    for review, category in zip(reviews, categories, strict=True):
        if review is not None:
            groups[category].append(review)
            parsed.append(review)

    def summary(pairs: list[tuple[float, float]]) -> dict:
        reference = sum(r for r, _ in pairs) / len(pairs) if pairs else 0.0
        model = sum(m for _, m in pairs) / len(pairs) if pairs else 0.0
        return {
            "relative": 100 * model / reference if reference else 0.0,
            "model": model,
            "reference": reference,
            "reviews": len(pairs),
        }

    return {
        "overall": summary(parsed),
        **{category: summary(pairs) for category, pairs in groups.items()},
        "unparsable": len(reviews) - len(parsed),
    }


# --- Object extraction for Object HalBench (optional, as in the RLHF-V evaluation) ------------

OBJECTS_INSTRUCTIONS = """\
Below are a question about an image and an answer to it. Assume the answer is right, and list \
every physical object the answer says is visible in the image.

- List objects only, without colours, materials, counts or other attributes ("two red cars" -> \
"car").
- Only objects the answer states are present; not ones it says are absent or might be there.
- Reply with a JSON list of strings and nothing else, e.g. ["car", "traffic light", "person"]; \
reply [] when there is none.

[Question]
{question}

[Answer]
{answer}"""


def object_messages(question: str, answer: str) -> Messages:
    """The request for the objects an answer mentions."""
    content = OBJECTS_INSTRUCTIONS.format(question=question, answer=answer)
    return [{"role": "user", "content": content}]


def parse_object_list(text: str) -> list[str]:
    """The JSON list of strings in a reply (the outermost [...]); ValueError if there is none."""
    start, end = text.find("["), text.rfind("]")
    if start == -1 or end < start:
        raise ValueError(f"no JSON list in the reply {text[:80]!r}")
    try:
        value = json.loads(text[start : end + 1])
    except json.JSONDecodeError as exc:
        raise ValueError(f"the list in the reply is not JSON ({exc}): {text[:80]!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"the reply's list is not a list of strings: {text[:80]!r}")
    return value
