"""The driver: one process per side, run one after the other or with their turns interleaved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from throughput.build import ModelSpec, Settings
from throughput.measure import Gate

SIDES = ("bpo", "trl", "trl-noref")
# The turns a side takes before its first step: bpo's reference pass.
TURNS_BEFORE_STEPS = {"bpo": 1, "trl": 0, "trl-noref": 0}
ENTRY = Path(__file__).resolve().parents[1] / "train_throughput.py"


def child(side: str, settings_json: str, gate_fds: str | None) -> None:
    """A side's process: build, train, print its result as one 'RESULT {...}' line."""
    from throughput.sides import run_bpo, run_trl

    raw = json.loads(settings_json)
    settings = Settings(**{**raw, "spec": ModelSpec(**raw["spec"])})
    gate = Gate(gate_fds, settings.device)
    import torch

    torch.set_num_threads(settings.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        if side == "bpo":
            result = run_bpo(settings, gate)
        else:
            result = run_trl(settings, side == "trl-noref", gate)
    except torch.OutOfMemoryError:
        print(
            f"OOM: {side} ran out of GPU memory; retry with fewer --text-layers, a smaller "
            "--batch-size or --gradient-checkpointing (the same settings apply to every side)",
            file=sys.stderr,
        )
        raise
    print("RESULT " + json.dumps(result), flush=True)


def _command(side: str, settings: Settings) -> list[str]:
    settings_json = json.dumps(asdict(settings))
    return [sys.executable, str(ENTRY), "--child", side, "--settings", settings_json]


def _read_result(side: str, log: Path, returncode: int) -> dict[str, Any]:
    """A finished child's last 'RESULT {...}' line; its log and an exit if it failed."""
    text = log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if returncode != 0 or not lines:
        sys.stderr.write(text[-10000:])
        raise SystemExit(f"side {side!r} failed (exit {returncode}); its output is above")
    return json.loads(lines[-1][len("RESULT ") :])


def run_sequential(sides: list[str], settings: Settings, logs: Path) -> dict[str, dict]:
    """Each side in a fresh process, one after the other (for GPUs: one model in memory)."""
    results = {}
    for side in sides:
        print(f"running {side} ...", flush=True)
        log = logs / f"{side}.log"
        with log.open("w") as out:
            proc = subprocess.run(_command(side, settings), stdout=out, stderr=subprocess.STDOUT)
        results[side] = _read_result(side, log, proc.returncode)
    return results


def run_interleaved(sides: list[str], settings: Settings, logs: Path) -> dict[str, dict]:
    """All sides' processes at once, one turn at a time: bpo's reference pass alone once every
    side is built, then one step of each side a round (the order rotates each round)."""
    procs, gates = {}, {}
    for side in sides:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        out = (logs / f"{side}.log").open("w")
        command = [*_command(side, settings), "--gate", f"{to_child_r},{from_child_w}"]
        procs[side] = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, pass_fds=(to_child_r, from_child_w)
        )
        os.close(to_child_r)
        os.close(from_child_w)
        gates[side] = (os.fdopen(to_child_w, "w"), os.fdopen(from_child_r, "r"))

    def expect(side: str, word: str) -> None:
        line = gates[side][1].readline().strip()
        if line != word:
            procs[side].wait()
            _read_result(side, logs / f"{side}.log", procs[side].returncode or 1)
            raise SystemExit(f"side {side!r} said {line!r} where the driver expected {word!r}")

    def turn(side: str, last: bool) -> None:
        gates[side][0].write("GO\n")
        gates[side][0].flush()
        expect(side, "DONE")
        if not last:
            expect(side, "READY")  # set up for its next turn: it is idle again

    print(f"running {', '.join(sides)} (turns interleaved) ...", flush=True)
    for side in sides:  # every side built and idle before anything is timed
        expect(side, "READY")
    for side in sides:
        for _ in range(TURNS_BEFORE_STEPS[side]):
            turn(side, last=False)
    total = settings.total_steps
    for step in range(total):
        k = step % len(sides)
        for side in sides[k:] + sides[:k]:
            turn(side, last=step == total - 1)
    results = {}
    for side in sides:
        procs[side].wait()
        results[side] = _read_result(side, logs / f"{side}.log", procs[side].returncode)
    return results


def fit_text_layers(spec: ModelSpec, batch_size: int, gradient_checkpointing: bool) -> int:
    """Llama layers that fit TRL's step (the larger) in this GPU's memory; a rough estimate.

    Per layer: the bf16 weights, plus, without checkpointing, ~0.3 MiB of saved activations per
    token (LoRA keeps fp32 copies of its inputs) over TRL's 2 rows per pair; 85% of free memory.
    """
    import torch

    free, _ = torch.cuda.mem_get_info(0)
    per_layer_weights = 2 * (
        4 * spec.text_hidden**2 + 3 * spec.text_hidden * spec.text_intermediate
    )
    tokens = 2 * batch_size * (spec.image_tokens + 24 + 70)
    per_token = 0.35 * 2**20 * spec.text_hidden / 4096
    activations = 0 if gradient_checkpointing else tokens * per_token
    fixed = 2 * 2 * spec.vocab_size * spec.text_hidden + 2 * 2**30  # embeddings, head, vision
    layers = int((0.85 * free - fixed) // (per_layer_weights + activations))
    return max(1, min(spec.text_layers, layers))
