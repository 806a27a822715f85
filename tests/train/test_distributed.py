"""Distributed training: 2-process DDP (gloo, CPU) equals 1 process accumulating 2 micro-batches,
and the shipped accelerate configs agree with the training configs they launch."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from trainer_helpers import make_pairs, tiny_config, write_store

from bpo.train.config import LoraSettings
from bpo.train.data import epoch_batches
from bpo.train.distributed import check_launch
from bpo.train.run import train

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
LAUNCH_TIMEOUT_S = 180
CURVES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `command` in its own process group; kill the whole group if it outlives the timeout."""
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        output, _ = proc.communicate()
        pytest.fail(f"{command[0]} ran past {LAUNCH_TIMEOUT_S}s (hung?); output:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, output)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_see_the_pairs_one_process_accumulates_per_step():
    """Per optimizer step, ranks 0 and 1 with batch 1 take the pairs that one process with batch 1
    and 2 accumulated micro-batches takes: positions 2k and 2k + 1 of the same epoch order."""
    one = epoch_batches(6, 1, seed=0, epoch=1)
    ranks = [epoch_batches(6, 1, seed=0, epoch=1, rank=r, world=2) for r in (0, 1)]
    steps_one = [one[i] + one[i + 1] for i in range(0, 6, 2)]
    steps_two = [a + b for a, b in zip(*ranks, strict=True)]
    assert steps_one == steps_two


def one_and_two_processes(
    tiny_llava_folder, tmp_path, monkeypatch, pairs=None, **settings
) -> subprocess.CompletedProcess:
    """Train the same store twice: in this process with batch 1 x grad_accum 2 (into tmp/one),
    then under `torchrun --nproc_per_node 2 -m bpo.cli train` with batch 1 each (into tmp/ddp).
    Returns the torchrun run, asserted successful."""
    store, image_root = write_store(tmp_path / "data", pairs)
    env = {**os.environ, "BPO_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    common = dict(
        pairs=str(store),
        image_root=str(image_root),
        batch_size=1,
        epochs=2,
        lr=1e-3,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0, merge=True),
        **settings,
    )
    single = tiny_config(tiny_llava_folder, tmp_path / "one", grad_accum=2, **common)
    ddp = tiny_config(tiny_llava_folder, tmp_path / "ddp", grad_accum=1, **common)

    # One process, in this one; it also caches the reference log-probs that both runs read.
    monkeypatch.setenv("BPO_CACHE_DIR", env["BPO_CACHE_DIR"])
    train(single, log=lambda _: None)

    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump({"run": json.loads(json.dumps(asdict(ddp)))}))
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    command += [
        f"--master_port={free_port()}",
        "-m",
        "bpo.cli",
        "train",
        "--config",
        str(config_file),
    ]
    done = launch(command, env)
    assert done.returncode == 0, done.stdout[-4000:]
    return done


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_accumulating_two(
    tiny_llava_folder, tmp_path, monkeypatch
):
    """`torchrun --nproc_per_node 2 -m bpo.cli train` (gloo on CPU, batch 1 per process) gives the
    loss and reward curves, and the final weights, of one process with batch 1 x grad_accum 2: the
    same 2 pairs per step, DDP averaging the two ranks' gradients where accumulation sums halves.
    The vision tower trains too: its unused final layer norm needs find_unused_parameters."""
    one_and_two_processes(tiny_llava_folder, tmp_path, monkeypatch, train_vision_tower=True)

    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["distributed_type"] == "MULTI_CPU"
    assert summary["effective_batch"] == 2 and summary["steps"] == 6
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "ddp")
    assert [line["step"] for line in two] == [line["step"] for line in one] == [1, 2, 3, 4, 5, 6]
    for name in CURVES:
        curve_one, curve_two = [line[name] for line in one], [line[name] for line in two]
        assert curve_two == pytest.approx(curve_one, abs=1e-5), name
    assert one[-1]["loss"] < one[0]["loss"] - 1e-3  # the curves moved: training happened
    # Merged, so the saved weights hold the trained vision tower as well as the adapter's update.
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key


@pytest.mark.slow
def test_a_pair_without_its_image_does_not_stall_two_processes(
    tiny_llava_folder, tmp_path, monkeypatch
):
    """SFT from a store where one pair's image is missing, under 2-process DDP with batch 1: the
    process that draws it still joins every all-reduce (no hang), the pair is reported, and the
    curves equal one process accumulating 2 micro-batches (which simply skips it)."""
    pairs = make_pairs()
    pairs[0] = dataclasses.replace(pairs[0], image="missing.png")
    done = one_and_two_processes(tiny_llava_folder, tmp_path, monkeypatch, pairs, method="sft")
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6
    assert "p0:weaken:0" in done.stdout
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "ddp")
    for name in ("loss", "logps/chosen", "grad_norm"):
        curve_one, curve_two = [line[name] for line in one], [line[name] for line in two]
        assert curve_two == pytest.approx(curve_one, abs=1e-5), name


def _deepspeed_section(path: Path) -> dict:
    return yaml.safe_load(path.read_text()).get("deepspeed_config") or {}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_loads(path):
    """Every shipped accelerate config is one `accelerate launch --config_file` reads."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.compute_environment.value == "LOCAL_MACHINE"
    assert config.distributed_type.value in {"MULTI_GPU", "DEEPSPEED", "FSDP"}


@pytest.mark.parametrize("size", ["7b", "13b"])
@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_agrees_with_the_llava_training_config(path, size):
    """The launcher's precision and DeepSpeed's accumulation and clipping match the training
    config's `precision`, `grad_accum` and `max_grad_norm` (the trainer refuses a mismatch)."""
    recipe = yaml.safe_load((ROOT / "configs" / f"llava-1.5-{size}-bpo.yaml").read_text())
    run = recipe.get("train", recipe)["run"]  # a recipe, or a train config
    launcher = yaml.safe_load(path.read_text())
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[run["precision"]]
    # DDP's file keeps "no": the trainer passes its own precision to Accelerator, which wins.
    assert launcher["mixed_precision"] in {"no", precision}
    deepspeed = _deepspeed_section(path)
    if deepspeed:
        assert deepspeed["gradient_accumulation_steps"] == run["grad_accum"]
        assert deepspeed["gradient_clipping"] == run["max_grad_norm"]
        assert launcher["mixed_precision"] == precision


def _fake_deepspeed_accelerator(ds_config: dict, processes: int = 8):
    """Just what `check_launch` reads of an accelerator launched with DeepSpeed (none here)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        state=SimpleNamespace(deepspeed_plugin=plugin),
        num_processes=processes,
    )


def test_deepspeed_settings_are_filled_from_the_training_config(tmp_path):
    """No DataLoader reaches accelerate, so the trainer fills DeepSpeed's batch sizes: 4 pairs per
    micro-batch x 2 accumulated x 8 processes = 64 per step."""
    ds = {
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": 1.0,
        "train_micro_batch_size_per_gpu": "auto",
        "zero_optimization": {"stage": 2},
    }
    check_launch(
        tiny_config(tmp_path, None, batch_size=4, grad_accum=2, max_grad_norm=1.0),
        _fake_deepspeed_accelerator(ds),
    )
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["train_batch_size"] == 64


@pytest.mark.parametrize(
    ("ds", "overrides", "message"),
    [
        (
            {"gradient_accumulation_steps": 1, "gradient_clipping": 1.0},
            {"grad_accum": 4},
            "gradient_accumulation_steps is 1 but the training config's grad_accum is 4",
        ),
        (
            {"gradient_accumulation_steps": 1, "gradient_clipping": 1.0},
            {"max_grad_norm": None},
            "gradient_clipping is 1.0 but the training config's max_grad_norm is None",
        ),
        (
            {"gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}},
            {"lora": LoraSettings(merge=True)},
            "lora.merge cannot merge",
        ),
    ],
)
def test_deepspeed_settings_that_disagree_stop_the_run(tmp_path, ds, overrides, message):
    config = tiny_config(tmp_path, None, **{"max_grad_norm": 1.0, **overrides})
    with pytest.raises(ValueError, match=message):
        check_launch(config, _fake_deepspeed_accelerator(ds))
