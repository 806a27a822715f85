"""The accelerate glue: one Accelerator for one process, DDP, DeepSpeed or FSDP, and their quirks.

The same command under `accelerate launch` or `torchrun` runs DDP (tested: two gloo processes on
a CPU), DeepSpeed ZeRO-2/3 or FSDP (configs/accelerate/; not run in this project's tests, which
have no GPU nor deepspeed). The trainer drives accumulation itself (no DataLoader goes through
`accelerator.prepare`), so what accelerate would infer from one is set here.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from bpo.train.config import TrainConfig


def make_accelerator(config: TrainConfig) -> Any:
    """The Accelerator of a run: its precision, trackers, and the DDP settings the model needs."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, is_tensorboard_available

    trackers = list(config.trackers) if config.out is not None else []
    if "tensorboard" in trackers and not is_tensorboard_available():
        warnings.warn(
            "the tensorboard package is not installed; metrics go to metrics.jsonl only "
            "(pip install tensorboard for TensorBoard logs)",
            stacklevel=3,
        )
        trackers.remove("tensorboard")
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.precision]
    # DDP fails at the second step when a parameter that requires grad got none in the first.
    # A LoRA adapter on the language model always gets one; a trained vision tower does not (LLaVA
    # never reads its last layer norm, nor layers after vision_feature_layer), nor does a trained
    # projector on a micro-batch of text-only pairs. Finding them costs a graph walk per step.
    unused = config.train_vision_tower or config.projector_lr is not None
    # Without cpu=True, accelerate ignores a torchrun launch on a machine with no accelerator and
    # runs each process alone; with it, the processes join over gloo (MULTI_CPU).
    cpu = config.model.device == "cpu" or not torch.accelerator.is_available()
    kwargs = {
        "mixed_precision": mixed,
        "log_with": trackers or None,
        "project_dir": config.out,
        "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=unused)],
        "cpu": cpu,
    }
    try:
        return Accelerator(**kwargs)
    except ValueError:
        # accelerate keeps one precision per process; a single process training twice (the demo's
        # arms, tests) may change it. Under a multi-process launch that stays an error.
        from accelerate.state import AcceleratorState, PartialState

        if PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state()
        return Accelerator(**kwargs)


def is_deepspeed(accelerator: Any) -> bool:
    """Whether the run is under DeepSpeed."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_sharded(accelerator: Any) -> bool:
    """Whether the weights are split across processes: DeepSpeed ZeRO-3 or FSDP."""
    from accelerate.utils import DistributedType

    if is_deepspeed(accelerator):
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        return ds.get("zero_optimization", {}).get("stage") == 3
    return accelerator.distributed_type == DistributedType.FSDP


def state_is_split(accelerator: Any) -> bool:
    """Whether a checkpoint needs every process's part: DeepSpeed (ZeRO splits the optimizer
    states at any stage) or FSDP."""
    return is_deepspeed(accelerator) or is_sharded(accelerator)


def check_launch(config: TrainConfig, accelerator: Any) -> None:
    """Fit the DeepSpeed config to the trainer's, or say which setting of which file to change."""
    if is_sharded(accelerator) and config.lora.merge and config.finetune != "full":
        raise ValueError(
            "lora.merge cannot merge an adapter whose base weights are sharded (DeepSpeed ZeRO-3 "
            "or FSDP); set lora.merge false and merge the saved adapter into the base afterwards"
        )
    if not is_deepspeed(accelerator):
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    # The trainer counts micro-batches itself; DeepSpeed must step on the same boundaries.
    steps = ds.get("gradient_accumulation_steps", "auto")
    if steps not in ("auto", config.grad_accum):
        raise ValueError(
            f"the accelerate config's deepspeed_config.gradient_accumulation_steps is {steps} but "
            f"the training config's grad_accum is {config.grad_accum}; make them equal"
        )
    clip = ds.get("gradient_clipping", "auto")
    if (1.0 if clip == "auto" else clip) != (config.max_grad_norm or 0.0):  # accelerate's "auto"
        raise ValueError(
            f"the accelerate config's deepspeed_config.gradient_clipping is {clip} but the training "
            f"config's max_grad_norm is {config.max_grad_norm}; make them equal (DeepSpeed clips)"
        )
    ds["gradient_accumulation_steps"] = config.grad_accum
    # No DataLoader goes through accelerator.prepare, so DeepSpeed cannot read the batch size.
    ds["train_micro_batch_size_per_gpu"] = config.batch_size
    ds["train_batch_size"] = config.batch_size * config.grad_accum * accelerator.num_processes


@contextmanager
def accumulating(accelerator: Any, model: nn.Module, last: bool) -> Iterator[None]:
    """Run one micro-batch's forward and backward; gradients sync only on the step's last one.

    DDP all-reduces in backward unless under `no_sync`. The DeepSpeed engine steps inside backward
    when accelerate says "sync gradients" (untested here), so that flag is set for the last
    micro-batch only, and left set afterwards for clipping and the optimizer step.
    """
    if is_deepspeed(accelerator):
        accelerator.gradient_state._set_sync_gradients(last)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
    elif last:
        yield
    else:
        with accelerator.no_sync(model):
            yield


def backward_scale(accelerator: Any, grad_accum: int) -> int:
    """What the step's loss is multiplied by before backward: DeepSpeed's backward divides by
    grad_accum, which the trainer's mean over the step's pairs has done already."""
    return grad_accum if is_deepspeed(accelerator) else 1
