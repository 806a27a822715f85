"""`accelerate_smoke`: bpo's trainer under `accelerate launch` with FSDP and DeepSpeed ZeRO-2 on
one GPU (the shipped configs/accelerate/*.yaml, one process), and QLoRA, each a few steps.

For each launcher config: run A trains 4 steps with a checkpoint every 2 and saves the adapter
(`smoke_train.py`); then A's folder is copied without its step-4 checkpoint, its model and its
summary (what a run killed after step 3 leaves), and run B resumes the copy from step 2 to 4.
Recorded: the distributed type accelerate chose, each run's metrics, whether the final adapter
was written, and the largest difference of B's steps 3-4 metrics from A's (equal: at most 1e-6
on a CPU, 1e-3 on a GPU, whose bf16 kernels need not repeat bit for bit). QLoRA trains 4 steps of
a 4-bit base (bitsandbytes, CUDA) in a plain process. DeepSpeed and QLoRA are recorded "not run"
where deepspeed or bitsandbytes does not import. On a CPU (the dry run) accelerate turns the FSDP
config into plain CPU processes (MULTI_CPU, `distributed_type` says so): the launch, checkpoint
and resume machinery are what it checks there.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from gpu.runner import Context, attempt, kill_group, missing, not_run

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().with_name("smoke_train.py")
LAUNCHERS = {  # name: (accelerate config, the package it needs)
    "fsdp": ("configs/accelerate/fsdp.yaml", None),
    "deepspeed_zero2": ("configs/accelerate/deepspeed-zero2.yaml", "deepspeed"),
}
RESUME_TOLERANCE = {True: 1e-6, False: 1e-3}  # dry run (CPU fp32), GPU (bf16)
SECONDS = {True: 20.0, False: 35.0}  # least budget to start a launcher's two runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(config: str, dry: bool, script_args: list[str]) -> list[str]:
    """`accelerate launch` of smoke_train.py under `config`, one process on this machine."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [str(REPO / config), "--num_processes", "1", "--num_machines", "1"]
    command += ["--mixed_precision", "no" if dry else "bf16"]
    command += ["--main_process_port", str(free_port())]
    return [*command, str(SCRIPT), *script_args]


def run_command(command: list[str], ctx: Context) -> dict[str, Any]:
    """Run a smoke process within the part's budget; its SMOKE summary, or an error with the
    output's tail. Past the budget its whole process group is ended (the launcher's workers
    would otherwise keep the GPU)."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=max(ctx.left(), 1.0))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        output, _ = proc.communicate()
        print(output[-20000:], flush=True)
        raise TimeoutError(f"killed at the part's budget: {output[-1500:]}") from None
    print(output[-20000:], flush=True)  # into the part's log
    lines = [line for line in output.splitlines() if line.startswith("SMOKE ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"exit {proc.returncode}: {output[-1500:]}")
    return json.loads(lines[-1][len("SMOKE ") :])


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def copy_as_killed(source: Path, target: Path, keep_step: int) -> None:
    """`source` as a run killed after step keep_step + 1 leaves it: no later checkpoint, no
    final model or summary."""
    shutil.copytree(source, target)
    for checkpoint in (target / "checkpoints").glob("step-*"):
        if int(checkpoint.name.split("-")[1].split(".")[0]) > keep_step:
            shutil.rmtree(checkpoint)
    shutil.rmtree(target / "model", ignore_errors=True)
    (target / "summary.json").unlink(missing_ok=True)


def largest_difference(a: list[dict], b: list[dict], after_step: int) -> float:
    """max |a - b| over every numeric metric of the steps after `after_step`."""
    rows_a = {row["step"]: row for row in a if row["step"] > after_step}
    rows_b = {row["step"]: row for row in b if row["step"] > after_step}
    if sorted(rows_a) != sorted(rows_b) or not rows_a:
        raise ValueError(f"steps differ: {sorted(rows_a)} vs {sorted(rows_b)}")
    return max(
        abs(float(rows_a[s][k]) - float(rows_b[s][k]))
        for s in rows_a
        for k, v in rows_a[s].items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    )


def launch_and_resume(ctx: Context, name: str, config: str) -> dict[str, Any]:
    """Run A (save), a copy of it cut back to its step-2 checkpoint, run B (resume); compare."""
    from gpu.smoke_train import SAVE_STEPS, STEPS

    dry = ctx.run.dry
    root = ctx.work / "smoke" / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    flags = ["--dry-run"] if dry else []
    first = run_command(launch_command(config, dry, ["--out", str(root / "a"), *flags]), ctx)
    copy_as_killed(root / "a", root / "b", SAVE_STEPS)
    resume = ["--out", str(root / "b"), "--resume", *flags]
    second = run_command(launch_command(config, dry, resume), ctx)
    a, b = metrics(root / "a"), metrics(root / "b")
    diff = largest_difference(a, b, SAVE_STEPS)
    return {
        "distributed_type": first.get("distributed_type"),
        "steps": [first.get("steps"), second.get("steps")],
        "resumed_from_step": SAVE_STEPS,
        "losses_first_run": [row.get("loss") for row in a],
        "losses_resumed_run": [row.get("loss") for row in b],
        "adapter_saved": any((root / "a" / "model").glob("*.safetensors")),
        "checkpoints_written": sorted(p.name for p in (root / "a" / "checkpoints").iterdir()),
        "max_abs_diff_after_resume": diff,
        "resume_tolerance": RESUME_TOLERANCE[dry],
        "equal_after_resume": diff <= RESUME_TOLERANCE[dry] and len(a) == len(b) == STEPS,
    }


def qlora(ctx: Context) -> dict[str, Any]:
    out = ctx.work / "smoke" / "qlora"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--qlora"]
    summary = run_command(command, ctx)
    return {"steps": summary.get("steps"), "losses": [row.get("loss") for row in metrics(out)]}


def run(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {}
    need = SECONDS[ctx.run.dry]
    for name, (config, package) in LAUNCHERS.items():
        why = missing(package) if package else None
        if why:
            out[name] = ctx.save(name, not_run(why))
            continue
        out[name] = attempt(ctx, name, need, lambda n=name, c=config: launch_and_resume(ctx, n, c))
    why = missing("bitsandbytes") or ("QLoRA's 4-bit base needs a CUDA GPU" if ctx.run.dry else "")
    if why:
        out["qlora"] = ctx.save("qlora", not_run(why))
    else:
        out["qlora"] = attempt(ctx, "qlora", need, lambda: qlora(ctx))
    return out
