"""`bpo eval`: answer the benchmarks a config lists, score them, write what a person compares.

Layout of the output folder:

- `{benchmark}/answers.jsonl`, `{benchmark}/answers.meta.json`: the answers and what generated
  them (`bpo.evaluate.answers`); a rerun reuses them;
- `{benchmark}/judgments.jsonl`: the per-question scoring (parsed answer, mentions, grades, the
  judge's reply), rewritten on every run;
- `judge_cache/judgments.jsonl`: the judge's parsed replies by hash; a rerun asks nothing twice;
- `results.json`: metrics per benchmark, how each judged benchmark was judged (`protocol`: bpo's
  prompts or a file's, the prompt's SHA-256, the judge model and settings), the model, the
  config, library versions;
- `results.md`: the metrics as a markdown table, a judged number asked with bpo's own prompts
  marked (it is not comparable with published numbers); `bpo compare RUN...` sets runs side by
  side;
- `.lock`: held while a run writes the folder, so two runs into one --out never answer twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bpo.data.files import write_atomic
from bpo.endpoint import ChatClient
from bpo.evaluate.answers import ModelHolder, ensure_answers
from bpo.evaluate.benchmarks import (
    benchmark,
    judge_protocol,
    judge_settings,
    needs_judge,
    read_items,
)
from bpo.evaluate.config import EvalConfig, check_config
from bpo.train.outputs import lock_output
from bpo.utils.versions import versions


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, key + "/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[key] = value
    return flat


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    # Rates (0-1) need four decimals to tell runs apart; percentages and scores need two.
    return f"{value:.4f}" if abs(value) < 1.5 else f"{value:.2f}"


# How results.md marks a number judged with bpo's own prompts rather than the reference protocol's.
OWN_PROMPTS_MARK = "†"
OWN_PROMPTS_NOTE = (
    f"{OWN_PROMPTS_MARK} judged with bpo's own prompts (bpo protocol only): comparable between "
    "bpo runs, not with published numbers; see docs/evaluation.md for the reference protocol files"
)


def own_prompt_benchmarks(protocol: dict[str, dict[str, Any]]) -> set[str]:
    """The benchmarks of a results.json `protocol` that were judged with bpo's own prompts."""
    return {bench for bench, entry in protocol.items() if entry.get("prompts") == "bpo"}


def markdown_table(
    runs: dict[str, dict[str, dict[str, Any]]], own_prompts: dict[str, set[str]] | None = None
) -> str:
    """Runs side by side: a row per (benchmark, metric), a column per run ('-' where absent).

    runs: {run name: {benchmark: metrics}} (metrics nested as results.json holds them).
    own_prompts: {run name: benchmarks judged with bpo's own prompts}; their numbers are marked
        with OWN_PROMPTS_MARK and the table ends with OWN_PROMPTS_NOTE.
    """
    own_prompts = own_prompts or {}
    names = list(runs)
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for name, benchmarks in runs.items():
        for bench, metrics in benchmarks.items():
            for metric, value in _flatten(metrics).items():
                rows.setdefault((bench, metric), {})[name] = value
    lines = [
        "| benchmark | metric | " + " | ".join(names) + " |",
        "|---|---|" + "---:|" * len(names),
    ]
    marked = False
    for (bench, metric), values in rows.items():
        cells = []
        for n in names:
            mark = n in values and bench in own_prompts.get(n, set())
            marked |= mark
            cells.append(_cell(values.get(n)) + (OWN_PROMPTS_MARK if mark else ""))
        lines.append(f"| {bench} | {metric} | {' | '.join(cells)} |")
    if marked:
        lines += ["", OWN_PROMPTS_NOTE]
    return "\n".join(lines) + "\n"


def _json_lines(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def run_eval(
    config: EvalConfig,
    out: str | Path,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict:
    """Run every benchmark of `config` into `out`; returns what results.json holds.

    progress: show a progress bar while answers are generated.
    """
    started = time.time()
    check_config(config)
    out = Path(out)
    with lock_output(out, "bpo eval"):
        return _run_locked(config, out, log, progress, started)


def _run_locked(
    config: EvalConfig, out: Path, log: Callable[[str], None], progress: bool, started: float
) -> dict:
    model = ModelHolder(config.model, config.generation)
    client = None
    if config.judge is not None and any(needs_judge(b) for b in config.benchmarks):
        client = ChatClient(
            config.judge, cache_dir=out / "judge_cache", cache_name="judgments.jsonl"
        )
    results: dict[str, Any] = {}
    protocol: dict[str, Any] = {}
    try:
        for bench in config.benchmarks:
            folder = out / bench.key
            items = read_items(bench)
            answers = ensure_answers(config, bench, items, folder, model, log, progress)
            judge = None
            if client is not None and needs_judge(bench):
                protocol[bench.key] = judge_protocol(bench, config.judge)
                judge = client.with_settings(**judge_settings(bench, config.judge))
            metrics, records = benchmark(bench).score(bench, items, answers, judge)
            write_atomic(folder / "judgments.jsonl", _json_lines(records))
            results[bench.key] = metrics
            log(f"{bench.key}: scored {len(items)} questions")
    finally:
        if client is not None:
            client.close()
    name = config.name or out.resolve().name
    summary = {
        "name": name,
        "model": config.model.name_or_path if config.model else None,
        "benchmarks": results,
        "protocol": protocol,
        "config": asdict(config),
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 1),
    }
    write_atomic(out / "results.json", json.dumps(summary, indent=2) + "\n")
    table = markdown_table({name: results}, {name: own_prompt_benchmarks(protocol)})
    write_atomic(out / "results.md", f"# {name}\n\n" + table)
    return summary


def compare_runs(runs: Sequence[str | Path]) -> str:
    """The markdown table of several runs' results.json, side by side."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    own_prompts: dict[str, set[str]] = {}
    for run in runs:
        path = Path(run)
        path = path / "results.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; pass the output folder of a `bpo eval` run")
        data = json.loads(path.read_text())
        name = data.get("name") or path.parent.name
        while name in table:  # two runs of one name stay two columns
            name += "'"
        table[name] = data["benchmarks"]
        own_prompts[name] = own_prompt_benchmarks(data.get("protocol", {}))
    return markdown_table(table, own_prompts)
