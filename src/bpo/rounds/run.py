"""`bpo iterate`: on-policy BPO rounds, each resumable, the best one kept.

Round k (1-based) bootstraps negatives from round k-1's policy (round 0's is `train.model`),
trains that policy on them with DPO (the trainer takes its reference log-probs from the same
starting model, cached beside the pairs), evaluates the checkpoint on the eval's benchmarks, and
records it all in OUT/round-k/round.json. OUT/rounds.json then lists every round's metrics and
the best round by `rounds.select_metric`. The layout is `bpo.rounds.stages`'s.

Resume: rerun the same command. A round whose round.json says complete is skipped; inside the
round each stage resumes as its own verb does: the bootstrap store keeps every pair already
written (a complete store with the same config is not reopened, so no model loads), training
continues from its newest checkpoint (`train.save_steps`; a finished training, summary.json
written, is reused), and evaluation reuses every answer already in its answers files.

Runs in one process (no `accelerate launch`): the stages alternate between generating and
training, and each round merges its adapter, which sharded training cannot do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bpo.bootstrap.config import store_config
from bpo.bootstrap.run import run_bootstrap
from bpo.data.files import write_atomic
from bpo.data.store import MANIFEST, config_differences, read_manifest
from bpo.evaluate.run import run_eval
from bpo.rounds.config import IterateConfig
from bpo.rounds.pairs import join_injected
from bpo.rounds.select import best_round, flat_metrics, metric_value
from bpo.rounds.stages import (
    RoundPaths,
    bootstrap_config,
    check_stages,
    eval_config,
    joins_injection,
    policy_path,
    round_paths,
    train_config,
    write_round_configs,
)
from bpo.train.checkpoint import resume_config
from bpo.train.outputs import lock_output
from bpo.train.run import train

StepHook = Callable[[int, int, dict], None]  # (round, optimizer step, metrics line)
TRAIN_SUMMARY_KEYS = ("steps", "pairs", "bad_pairs", "truncated_pairs", "final")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def _check_one_process() -> None:
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        raise ValueError(
            f"bpo iterate runs in one process, not {processes} (accelerate launch / torchrun): "
            "run `bpo iterate` directly; train.model.device places the model"
        )


def _store_is_done(boot: Any) -> bool:
    """Whether `boot.out` holds a complete store of exactly this config (nothing left to do)."""
    if not (Path(boot.out) / MANIFEST).is_file():
        return False
    manifest = read_manifest(boot.out)
    return bool(manifest["complete"]) and manifest["config"] == json.loads(
        json.dumps(store_config(boot))
    )


def stage_configs(config: IterateConfig, k: int) -> dict[str, Any]:
    """What round k's results depend on, per stage, as JSON reads it back: the store's config,
    the training config a resume must match, and the eval config."""
    configs = {
        "bootstrap": store_config(bootstrap_config(config, k)),
        "train": resume_config(train_config(config, k)),
        "eval": asdict(eval_config(config, k)),
    }
    return json.loads(json.dumps(configs))


def _check_same_configs(path: Path, stored: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """A round started with other settings is not continued (nor skipped) with these."""
    if stored is None or stored == now:
        return
    diffs = config_differences(stored, now)
    raise ValueError(
        f"{path}: the round was run with other settings ({'; '.join(diffs[:5])}); rerun with "
        "the config it was run with, or choose another out"
    )


def make_pairs(
    config: IterateConfig, k: int, log: Callable[[str], None], progress: bool
) -> dict[str, Any]:
    """Round k's pair store (OUT/round-k/pairs); returns its manifest."""
    boot, paths = bootstrap_config(config, k), round_paths(config.out, k)
    if _store_is_done(boot):
        log(f"round {k}: pairs reused from {boot.out}")
    else:
        log(f"round {k}: bootstrapping from {boot.model.name_or_path} into {boot.out}")
        run_bootstrap(boot, progress=progress, log=log)
    if joins_injection(config, k):
        first = round_paths(config.out, 1).pairs
        log(f"round {k}: joining {boot.out} with the injected pairs of {first}")
        return join_injected(Path(boot.out), first, paths.pairs, k)
    return read_manifest(paths.pairs)


def train_round(
    config: IterateConfig, k: int, log: Callable[[str], None], on_step: StepHook | None
) -> dict[str, Any]:
    """Round k's training (resumed from its newest checkpoint); returns its summary.json."""
    cfg, paths = train_config(config, k), round_paths(config.out, k)
    summary = paths.train / "summary.json"
    if summary.is_file() and paths.checkpoint.is_dir():
        log(f"round {k}: training reused from {paths.train}")
        return _read_json(summary)
    log(f"round {k}: training {cfg.model.name_or_path} on {cfg.pairs}")
    hook = None if on_step is None else (lambda step, line: on_step(k, step, line))
    result = train(cfg, resume=True, on_step=hook, log=log)
    return result.summary


def run_round(
    config: IterateConfig,
    k: int,
    log: Callable[[str], None],
    on_step: StepHook | None,
    progress: bool,
) -> dict[str, Any]:
    """Round k end to end, or its round.json when complete; returns the round's record."""
    paths, configs = round_paths(config.out, k), stage_configs(config, k)
    record = _read_json(paths.record)
    _check_same_configs(paths.record, record.get("configs"), configs)
    if record.get("complete"):
        log(f"round {k}: complete ({paths.record}), skipped")
        return _with_select_value(config, paths, record)
    started = record.get("started") or _now()
    policy = policy_path(config, k)
    begun = {"round": k, "policy": policy, "started": started, "complete": False}
    begun["configs"] = configs
    _write_json(paths.record, begun)
    write_round_configs(config, k)
    manifest = make_pairs(config, k, log, progress)
    summary = train_round(config, k, log, on_step)
    log(f"round {k}: evaluating {paths.checkpoint}")
    results = run_eval(eval_config(config, k), paths.eval, log=log, progress=progress)
    return _finish_round(config, k, paths, begun, manifest, summary, results)


def _with_select_value(config: IterateConfig, paths: RoundPaths, record: dict) -> dict[str, Any]:
    """A complete round's record with the value of today's select_metric (rewritten when
    select_metric changed since the round ran)."""
    metric = config.rounds.select_metric
    if record.get("select_metric") == metric:
        return record
    results = _read_json(paths.eval / "results.json")
    where = str(paths.eval / "results.json")
    value = metric_value(results.get("benchmarks", {}), metric, where)
    record = {**record, "select_metric": metric, "select_value": value}
    _write_json(paths.record, record)
    return record


def _finish_round(
    config: IterateConfig,
    k: int,
    paths: RoundPaths,
    begun: dict[str, Any],
    manifest: dict[str, Any],
    summary: dict[str, Any],
    results: dict[str, Any],
) -> dict[str, Any]:
    """Write round.json, complete: the round's provenance, metrics and select value."""
    metric = config.rounds.select_metric
    value = metric_value(results["benchmarks"], metric, str(paths.eval / "results.json"))
    inject = manifest["config"].get("inject_from") if joins_injection(config, k) else None
    record = {
        "round": k,
        "complete": True,
        "policy": begun["policy"],
        "pairs": str(paths.pairs),
        "injected_pairs_from": inject or str(paths.pairs),
        "pair_counts": manifest["counts"],
        "checkpoint": str(paths.checkpoint),
        "train": {key: summary.get(key) for key in TRAIN_SUMMARY_KEYS},
        "eval": str(paths.eval / "results.json"),
        "metrics": flat_metrics(results["benchmarks"]),
        "select_metric": metric,
        "select_value": value,
        "started": begun["started"],
        "finished": _now(),
        "configs": begun["configs"],
    }
    _write_json(paths.record, record)
    return record


def rounds_summary(config: IterateConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """What OUT/rounds.json holds: each round's metrics and the best round by select_metric."""
    settings = config.rounds
    best = best_round({r["round"]: r["select_value"] for r in records}, settings.select_mode)
    chosen = next(r for r in records if r["round"] == best)
    return {
        "select_metric": settings.select_metric,
        "select_mode": settings.select_mode,
        "inject_model": settings.inject_model,
        "rounds": [
            {key: r[key] for key in ("round", "policy", "checkpoint", "select_value", "metrics")}
            for r in records
        ],
        "best": {
            "round": best,
            "checkpoint": chosen["checkpoint"],
            "value": chosen["select_value"],
        },
    }


def run_rounds(
    config: IterateConfig,
    log: Callable[[str], None] = print,
    on_step: StepHook | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) every round of `config`; returns what OUT/rounds.json holds.

    Args:
        on_step: called as on_step(round, step, metrics) after each optimizer step of a round's
            training and its checkpoint.
        progress: show the stages' progress bars.
    """
    check_stages(config)
    _check_one_process()
    out = Path(config.out)
    with lock_output(out, "bpo iterate"):
        records = [
            run_round(config, k, log, on_step, progress) for k in range(1, config.rounds.rounds + 1)
        ]
        summary = rounds_summary(config, records)
        _write_json(out / "rounds.json", summary)
    best = summary["best"]
    log(f"best round: {best['round']} ({config.rounds.select_metric} = {best['value']:.4g})")
    return summary
