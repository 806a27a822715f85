"""The GPU verification run: one script, run once on a lent GPU, that measures what the CPU cannot.

Parts, in this order, each under its own wall-clock budget (a failed part records its error and
the run goes on; a part the remaining budget cannot hold is recorded "not run (budget)"):

    logprobs_bf16     bpo's packed pair log-probs vs the model's own plain forward, bf16, both
                      7B shapes (gpu/logprob_check.py)
    train_throughput  bpo's trainer vs TRL's DPOTrainer: pairs/s step only and end to end (bpo's
                      reference pass included), peak memory; both 7B shapes (gpu/training.py)
    attention         packed rows with SDPA + a 4D float mask vs FlexAttention with a block mask,
                      step time and memory, LLaVA-7B shape (gpu/attention.py)
    generation        weakened-negative generation, batch 32 vs per sample, tokens/s, LLaVA-7B
                      shape (gpu/generation.py)
    accelerate_smoke  `accelerate launch` of bpo's trainer under FSDP and DeepSpeed ZeRO-2: a few
                      steps, save, resume, equal metrics; QLoRA a few steps (gpu/smoke.py)

The 7B shapes are random inits built on the GPU in bf16 (gpu/specs.py); LoRA r=128, alpha=256 on
the language model's linear layers; SDPA attention. `--dry-run` runs every part at toy sizes on
the CPU in fp32, in this process, so the tests run the script itself.

Output: OUT/results.json (machine, versions, date, one record per part, rewritten after each part)
and OUT/log.txt (everything the parts printed). Scratch files go to --work (default: a temporary
folder), never under OUT.

Run (GPU machine, after the wheels of `benchmarks/gpu/wheels.py`; docs/gpu-verification.md):
    python benchmarks/gpu/verify.py --out OUT               # all parts, 480 s in all
    python benchmarks/gpu/verify.py --dry-run --out /tmp/v  # toy sizes on a CPU, ~1 min
    python benchmarks/gpu/verify.py --out OUT --parts attention,generation --budget_s 200
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# bpo from the working tree (no install needed), `throughput`, `shapes` and this `gpu` package.
for entry in (REPO / "benchmarks", REPO / "src"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from gpu.machine import imported_distributions, machine_info  # noqa: E402
from gpu.runner import (  # noqa: E402
    Context,
    not_run,
    run_in_process,
    run_isolated,
    teeing,
    write_json,
)
from gpu.specs import Run  # noqa: E402


@dataclass(frozen=True)
class Part:
    """A part: its function ("module:function"), its budget, and the least budget worth starting
    it with (below that it is recorded "not run (budget)")."""

    function: str
    budget_s: float
    min_s: float


PARTS = {
    "logprobs_bf16": Part("gpu.logprob_check:run", 60, 25),
    "train_throughput": Part("gpu.training:run", 190, 70),
    "attention": Part("gpu.attention:run", 80, 30),
    "generation": Part("gpu.generation:run", 55, 20),
    "accelerate_smoke": Part("gpu.smoke:run", 90, 35),
}
DEFAULT_BUDGET_S = 480.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for results.json and log.txt")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU, fp32")
    parser.add_argument(
        "--budget_s",
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="wall-clock seconds for every part together",
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="which parts (they run in the order above)"
    )
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument(
        "--isolate",
        choices=["auto", "yes", "no"],
        default="auto",
        help="a process per part (auto: on the GPU yes, in the dry run no)",
    )
    parser.add_argument("--part", help=argparse.SUPPRESS)  # a part's own process
    parser.add_argument("--part-budget-s", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts.split(",") if p and p not in PARTS]
    if unknown:
        parser.error(f"--parts {','.join(unknown)}: not a part; choose from {', '.join(PARTS)}")
    return args


def part_function(name: str) -> Any:
    module, function = PARTS[name].function.split(":")
    return getattr(importlib.import_module(module), function)


def budget_for(name: str, remaining_s: float) -> float | None:
    """The budget part `name` gets with `remaining_s` of the run left; None: too little to start."""
    part = PARTS[name]
    if remaining_s < part.min_s:
        return None
    return min(part.budget_s, remaining_s)


def child_argv(args: argparse.Namespace, name: str, budget_s: float, work: Path) -> list[str]:
    """The command line of part `name`'s own process."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--out", args.out, "--part", name]
    argv += ["--part-budget-s", f"{budget_s:.1f}", "--work", str(work)]
    return argv + (["--dry-run"] if args.dry_run else [])


def child_env() -> None:
    """Let a part's own processes (and theirs: accelerate launches) import bpo and `gpu`."""
    paths = [str(REPO / "src"), str(REPO / "benchmarks")]
    rest = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([rest] if rest else []))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_part_here(args: argparse.Namespace, name: str, budget_s: float, work: Path) -> dict:
    """Part `name` in this process; with --part, its record also goes to the partial file the
    parent reads (written as it goes, so a kill keeps what was measured)."""
    partial = work / "parts" / f"{name}.json" if args.part else None
    part_work = work / name
    part_work.mkdir(parents=True, exist_ok=True)
    ctx = Context(Run(args.dry_run), time.monotonic() + budget_s, part_work, partial)
    if args.dry_run:
        import torch

        torch.set_num_threads(1)  # the dry run's toy models gain nothing from more
    record = run_in_process(part_function(name), ctx)
    record["imported_distributions"] = imported_distributions()  # this process's, so far
    if partial is not None:
        write_json(partial, record)
    return record


def summary_line(name: str, record: dict) -> str:
    why = record.get("why") or record.get("error") or ""
    return f"[verify] {name}: {record['status']} ({record.get('wall_s', 0):.0f} s) {why}".rstrip()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    child_env()
    with tempfile.TemporaryDirectory(prefix="bpo_gpu_verify_") as tmp:
        work = Path(args.work or tmp)
        if args.part:  # a part's own process: its record goes to the partial file
            run_part_here(args, args.part, args.part_budget_s or PARTS[args.part].budget_s, work)
            return {}
        return run_all(args, out, work)


def run_all(args: argparse.Namespace, out: Path, work: Path) -> dict[str, Any]:
    """Every chosen part in order, within the run's budget; results.json after each."""
    start = time.monotonic()
    log = out / "log.txt"
    isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.dry_run)
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "dry_run": args.dry_run,
        "budget_s": args.budget_s,
        "isolated_parts": isolate,
        **machine_info(REPO),
        "parts": {},
    }
    chosen = [p for p in args.parts.split(",") if p]
    for name in PARTS:
        if name not in chosen:
            results["parts"][name] = not_run("not chosen (--parts)")
            continue
        remaining = args.budget_s - (time.monotonic() - start)
        budget = budget_for(name, remaining)
        if budget is None:
            why = f"budget: {remaining:.0f} s left of --budget_s {args.budget_s:.0f}, "
            record = not_run(why + f"the part needs at least {PARTS[name].min_s:.0f} s")
        elif isolate:
            partial = work / "parts" / f"{name}.json"
            record = run_isolated(child_argv(args, name, budget, work), budget, partial, log)
        else:
            with teeing(log):
                record = run_part_here(args, name, budget, work)
        record["budget_s"] = round(budget or 0.0, 1)
        results["parts"][name] = record
        results["wall_s"] = round(time.monotonic() - start, 1)
        write_json(out / "results.json", results)
        line = summary_line(name, record)
        print(line, flush=True)
        with log.open("a") as f:
            f.write(line + "\n")
    results["wall_s"] = round(time.monotonic() - start, 1)
    write_json(out / "results.json", results)
    return results


if __name__ == "__main__":
    main()
