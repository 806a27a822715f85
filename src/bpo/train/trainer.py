"""`bpo train`: DPO (BPO) or the SFT baseline on preference pairs, an accelerate loop.

Features:
- LoRA (peft; default targets: every linear layer of the language model), QLoRA (4-bit base,
  needs bitsandbytes and CUDA) or full fine-tuning of the language model. The vision tower stays
  frozen unless asked; the projector trains only when `projector_lr` is set, at that rate.
- The reference is the frozen starting model: its log-probs are computed once, before any weight
  is wrapped or trained (cached in the pair store by `bpo.train.refs`; in-memory pairs are scored
  in memory), and training runs no reference forward. (The official code scored the reference as
  "policy with adapters disabled" while its projector trained outside the adapter, so its
  reference drifted; computing it first rules that out.) The reference runs in the weights' own
  dtype, so with bf16 autocast over fp32 weights the first step's rewards are near 0, not 0.
- fp32/bf16/fp16 autocast, gradient accumulation, gradient checkpointing, warmup then a cosine
  (or linear, or constant) schedule applied to every parameter group.
- `max_length` counts image tokens and cuts answers, never the image or the prompt; truncated
  pairs are counted and reported. A pair whose image is missing or broken is reported with its
  key and counted, and the run goes on without it.
- Metrics under TRL's names, one JSON line per logged step in OUT/metrics.jsonl and to
  accelerate's trackers (TensorBoard by default).
- Checkpoints every `save_steps` (trainable weights, optimizer, scheduler, RNG states, data
  position); `resume=True` continues from the newest one and gives the weights and metric lines
  an uninterrupted run gives. The data order is a seeded shuffle per epoch, recomputed, not stored.
- Output in Hugging Face format under OUT/model: the adapter, the adapter merged into the base
  (`lora.merge`), or the full weights; safetensors, with the processor.

Assumptions: a LLaVA-style model (`vision_tower`, `multi_modal_projector`, `language_model`
submodules) whose forward takes a 4D mask and per-row `logits_to_keep` (see
`bpo.train.logprobs`); the pairs fit in memory as text (images are loaded per batch).

Distributed: the same command under `accelerate launch` or `torchrun` runs DDP (tested: two gloo
processes on a CPU give the curves and weights of one process accumulating two micro-batches),
DeepSpeed ZeRO-2/3 or FSDP (configs/accelerate/; not run in this project's tests, which have no
GPU nor deepspeed). Under DDP or one process a checkpoint holds the trainable weights and the
optimizer as files of their own; under DeepSpeed or FSDP, where optimizer states (ZeRO-2) or
weights too (ZeRO-3, FSDP) are split across processes, each process writes its part through
`accelerator.save_state`, and the final model is gathered with `accelerator.get_state_dict`.

Run:
    bpo train --config configs/train/shapeworld.yaml
    bpo train --config configs/train/shapeworld.yaml --method sft --out runs/train/sft
    bpo train --config configs/train/shapeworld.yaml --resume true     # after a kill
    # 8 GPUs, R = configs/llava-1.5-7b-bpo.yaml: DDP, or the paper's DeepSpeed ZeRO-2
    accelerate launch --config_file configs/accelerate/ddp.yaml -m bpo.cli train --recipe R
    accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml -m bpo.cli train ...
    torchrun --nproc_per_node 2 -m bpo.cli train --config X.yaml    # DDP on CPUs too (gloo)
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from bpo.data.images import ImageError, load_image, resolve_image_path
from bpo.data.records import PreferencePair
from bpo.train.batch import EncodedPair, PairBatch, collate_pairs, encode_pair
from bpo.train.config import TrainConfig, check_config
from bpo.train.logprobs import chosen_logps, pair_logps
from bpo.train.losses import nll_loss, preference_loss

# Submodule names of LLaVA-style models (the last component of the module's dotted name).
VISION_NAMES = ("vision_tower", "visual", "vision_model")
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector")
LANGUAGE_NAMES = ("language_model",)
# Settings that may change between a run and its resume: they do not change what is trained.
RESUMABLE_CHANGES = ("out", "save_steps", "save_total_limit", "trackers", "num_workers")
MAX_BAD_MESSAGES = 20
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@dataclass
class BadPair:
    """A pair that cannot be used: its image is missing or broken, or it cannot be encoded."""

    key: str
    reason: str
    message: str


@dataclass
class TrainResult:
    """What `train` returns: the trained model, every metrics line, and the run's summary."""

    model: Any  # the trained model (adapter merged when lora.merge), in eval mode
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


# --- Data ---------------------------------------------------------------------------------------


class PairDataset(torch.utils.data.Dataset):
    """Pairs, each loaded (image) and encoded on access; a bad pair comes back as a BadPair.

    Args:
        images: the pairs' images by their `image` path (the in-memory API); else `image_root`.
    """

    def __init__(
        self,
        pairs: Sequence[PreferencePair],
        processor: Any,
        image_root: str | Path | None = None,
        images: Mapping[str, Image.Image] | None = None,
        max_length: int | None = None,
    ) -> None:
        self.pairs = list(pairs)
        self.processor = processor
        self.image_root = Path(image_root) if image_root is not None else None
        self.images = images
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.pairs)

    def _image(self, pair: PreferencePair) -> Image.Image | None:
        if pair.image is None:
            return None
        if self.images is not None:
            if pair.image not in self.images:
                raise ImageError(f"image '{pair.image}' is not among the images given to train()")
            return self.images[pair.image]
        if self.image_root is None:
            raise ImageError(f"image '{pair.image}' but no image_root; set run.image_root")
        return load_image(resolve_image_path(self.image_root, pair.image))

    def __getitem__(self, index: int) -> EncodedPair | BadPair:
        pair = self.pairs[index]
        try:
            return encode_pair(pair, self.processor, self._image(pair), self.max_length)
        except ImageError as exc:
            return BadPair(pair.key, exc.reason, f"pair {pair.key}: {exc}")
        except ValueError as exc:  # e.g. a prompt that alone exceeds max_length
            return BadPair(pair.key, "unencodable", str(exc))


@dataclass
class Collated:
    """One micro-batch: the good pairs collated (None if there are none) and the bad ones."""

    batch: PairBatch | None
    bad: list[BadPair]


class Collator:
    """collate_pairs over the good items, plus each pair's reference log-probs when known."""

    def __init__(self, pad_token_id: int, refs: Mapping[str, tuple[float, float]] | None = None):
        self.pad_token_id = pad_token_id
        self.refs = refs

    def __call__(self, items: list[EncodedPair | BadPair]) -> Collated:
        good = [item for item in items if isinstance(item, EncodedPair)]
        bad = [item for item in items if isinstance(item, BadPair)]
        if not good:
            return Collated(None, bad)
        batch = collate_pairs(good, self.pad_token_id)
        if self.refs is not None:
            chosen, rejected = zip(*(self.refs[key] for key in batch.keys), strict=True)
            batch.tensors["ref_chosen_logps"] = torch.tensor(chosen, dtype=torch.float32)
            batch.tensors["ref_rejected_logps"] = torch.tensor(rejected, dtype=torch.float32)
        return Collated(batch, bad)


def epoch_batches(
    num_pairs: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """This process's micro-batches (pair indices) for an epoch: a seeded shuffle, recomputable.

    With several processes the order is cut into global batches of `batch_size * world` pairs,
    the last one filled by wrapping around (as DistributedSampler does), so every process runs the
    same number of forward passes.
    """
    order = np.random.default_rng([seed, epoch]).permutation(num_pairs).tolist()
    chunk = batch_size * world
    if world > 1 and len(order) % chunk:
        order += order[: chunk - len(order) % chunk]
    return [
        order[start + rank * batch_size : start + (rank + 1) * batch_size]
        for start in range(0, len(order), chunk)
    ]


def load_store_pairs(directory: str | Path, sources: Sequence[str] | None) -> list[PreferencePair]:
    """The pairs of a store, keeping only the given sources (all when None)."""
    from bpo.data.store import read_manifest, read_pairs

    read_manifest(directory)  # a clear error when the folder is not a store
    pairs = [p for p in read_pairs(directory) if sources is None or p.source in sources]
    if not pairs:
        raise ValueError(
            f"{directory} holds no pairs{f' of sources {list(sources)}' if sources else ''}; "
            "check run.pairs and run.sources"
        )
    return pairs


# --- Model --------------------------------------------------------------------------------------


def find_component(model: nn.Module, names: Sequence[str]) -> str | None:
    """The dotted name of the first submodule whose own name is one of `names`."""
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in names:
            return name
    return None


def lora_target_regex(model: nn.Module, names: Sequence[str] | None = None) -> str:
    """A peft `target_modules` regex: the named linear layers (default all) of the language model."""
    lm = find_component(model, LANGUAGE_NAMES)
    if lm is None:
        raise ValueError(f"{type(model).__name__} has no `language_model` submodule to adapt")
    linear = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name.startswith(lm + ".") and isinstance(module, nn.Linear)
    }
    unknown = sorted(set(names or ()) - linear)
    if unknown:
        raise ValueError(
            f"lora.target_modules {unknown} are not linear layers of the language model; "
            f"choose from {sorted(linear)}"
        )
    chosen = sorted(names or linear)
    return rf"{re.escape(lm)}\..*\.({'|'.join(map(re.escape, chosen))})"


def setup_trainable(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Freeze everything, then open what trains: a LoRA adapter or the LM, the projector if asked.

    Returns the model to train (peft-wrapped for LoRA).
    """
    projector = find_component(model, PROJECTOR_NAMES)
    vision = find_component(model, VISION_NAMES)
    if config.projector_lr is not None and projector is None:
        raise ValueError(f"projector_lr is set but {type(model).__name__} has no projector")
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the embeddings are frozen).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.requires_grad_(False)
    if config.finetune == "full":
        lm = find_component(model, LANGUAGE_NAMES)
        model.get_submodule(lm).requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        # A trained projector or vision tower is saved with the adapter (and merged with it);
        # otherwise an adapter-only save would silently drop its training.
        saved = [projector] if config.projector_lr is not None else []
        if config.train_vision_tower and vision is not None:
            saved.append(vision)
        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=lora_target_regex(model, config.lora.target_modules),
            modules_to_save=[name.rsplit(".", 1)[-1] for name in saved] or None,
        )
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing`; not ours to fix.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            model = get_peft_model(model, lora)
    if config.projector_lr is not None:
        for name, param in model.named_parameters():
            if _in_component(name, projector) and "original_module" not in name:
                param.requires_grad_(True)
    if config.train_vision_tower and vision is not None:
        for name, param in model.named_parameters():
            if _in_component(name, vision) and "original_module" not in name:
                param.requires_grad_(True)
    return model


def _in_component(param_name: str, component: str | None) -> bool:
    """Whether a parameter lies in the component (matched by its last name: peft adds prefixes)."""
    return component is not None and component.rsplit(".", 1)[-1] in param_name.split(".")


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Optimizer groups: the projector at `projector_lr`, everything else trainable at `lr`."""
    projector = find_component(model, PROJECTOR_NAMES)
    main, proj = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_projector = config.projector_lr is not None and _in_component(name, projector)
        (proj if in_projector else main).append(param)
    groups = [{"name": "main", "params": main, "lr": config.lr}]
    if proj:
        groups.append({"name": "projector", "params": proj, "lr": config.projector_lr})
    return [g for g in groups if g["params"]]


def load_for_training(config: TrainConfig, device: torch.device) -> tuple[nn.Module, Any]:
    """The starting model and processor, on `device` (4-bit for QLoRA)."""
    from bpo.models.load import load_model_and_processor, load_processor

    m = config.model
    if config.finetune != "qlora":
        return load_model_and_processor(
            m.name_or_path, dtype=m.dtype, device=device, trust_remote_code=m.trust_remote_code,
            attn_implementation=m.attn_implementation, revision=m.revision,
        )  # fmt: skip
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        # Only the language model is quantized: the tower and projector are small and sensitive.
        llm_int8_skip_modules=[*VISION_NAMES, *PROJECTOR_NAMES, "lm_head"],
    )
    model = AutoModelForImageTextToText.from_pretrained(
        m.name_or_path, quantization_config=quantization, device_map={"": device},
        use_safetensors=True, trust_remote_code=m.trust_remote_code,
        attn_implementation=m.attn_implementation, revision=m.revision,
    )  # fmt: skip
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, load_processor(m.name_or_path, m.trust_remote_code, m.revision)


# --- Reference log-probs ------------------------------------------------------------------------


@torch.no_grad()
def reference_logps(
    model: nn.Module, dataset: PairDataset, batch_size: int, accelerator: Any | None = None
) -> tuple[dict[str, tuple[float, float]], list[BadPair]]:
    """The frozen model's summed (chosen, rejected) log-probs for every usable pair, by key.

    The in-memory counterpart of `bpo.train.refs.ensure_reference_logps` (which caches them in a
    pair store): eval mode, the weights' own dtype, no autocast, as that pass scores.
    accelerator: splits the pairs over its processes; None scores them all here, on the model's
        device.
    """
    from accelerate.utils import gather_object

    if accelerator is None:  # one process: all pairs, no gathering
        accelerator = SimpleNamespace(process_index=0, num_processes=1, device=model.device)
    was_training = model.training
    model.eval()
    collate = Collator(dataset.processor.tokenizer.pad_token_id)
    mine = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    # Its own generator: a loader otherwise draws a seed from the global RNG (dropout's).
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate, generator=torch.Generator()
    )
    refs, bad = {}, []
    for collated in loader:
        bad.extend(collated.bad)
        if collated.batch is not None:
            logps = pair_logps(model, collated.batch.to(accelerator.device))
            for key, c, r in zip(
                collated.batch.keys, logps.chosen.tolist(), logps.rejected.tolist(), strict=True
            ):
                refs[key] = (c, r)
    model.train(was_training)
    if accelerator.num_processes == 1:
        return refs, bad
    merged: dict[str, tuple[float, float]] = {}
    for part in gather_object([refs]):
        merged.update(part)
    return merged, list(gather_object(bad))


def _store_refs(
    config: TrainConfig, model: nn.Module, processor: Any, accelerator: Any, log: Callable
) -> tuple[list[PreferencePair], list[BadPair]]:
    """The store's pairs with reference log-probs, cached in the store (`bpo.train.refs`)."""
    from accelerate.utils import broadcast_object_list

    from bpo.train import refs as refs_module

    if config.image_root is None:
        raise ValueError("run.image_root is needed to score the pairs' images")
    fingerprint = [None]
    bad: list[BadPair] = []
    if accelerator.is_main_process:  # one pass; the other processes read its file
        identity = refs_module.model_identity(config.model.name_or_path, config.model.revision)
        table = refs_module.ensure_reference_logps(
            model, processor, config.pairs, config.image_root, model_identity=identity,
            max_length=config.max_length, batch_size=config.reference_batch_size,
        )  # fmt: skip
        log(f"reference log-probs: {table.reused} reused, {table.computed} computed "
            f"({table.stale} stale) in {table.path}")  # fmt: skip
        fingerprint = [table.fingerprint]
        bad = [BadPair(key, "unusable", message) for key, message in table.bad.items()]
    accelerator.wait_for_everyone()
    (fingerprint,) = broadcast_object_list(fingerprint)
    entries = refs_module.load_reference_logps(config.pairs, fingerprint)
    pairs = [
        refs_module.with_reference_logps(p, entries[p.key])
        for p in load_store_pairs(config.pairs, config.sources)
        if p.key in entries
    ]
    return pairs, bad


def _pairs_and_refs(
    config: TrainConfig,
    model: nn.Module,
    processor: Any,
    pairs: Sequence[PreferencePair] | None,
    images: Mapping[str, Image.Image] | None,
    accelerator: Any,
    log: Callable,
) -> tuple[list[PreferencePair], dict[str, tuple[float, float]] | None, list[BadPair]]:
    """The pairs to train on, their reference log-probs (DPO) by key, and the unusable pairs.

    From a store, the references are cached beside the pairs; in-memory pairs are scored here,
    unless every one already carries `ref_chosen_logp` and `ref_rejected_logp` (the caller then
    vouches they are this model's, under this max_length).
    """
    if pairs is None:
        if config.pairs is None:
            raise ValueError("no pairs: set run.pairs (a pair store folder) or pass pairs=")
        if config.method == "sft":
            return load_store_pairs(config.pairs, config.sources), None, []
        pairs, bad = _store_refs(config, model, processor, accelerator, log)
    else:
        pairs = [p for p in pairs if config.sources is None or p.source in config.sources]
        bad = []
        if config.method == "sft":
            return pairs, None, []
        if not all(
            p.ref_chosen_logp is not None and p.ref_rejected_logp is not None for p in pairs
        ):
            dataset = PairDataset(pairs, processor, config.image_root, images, config.max_length)
            refs, bad = reference_logps(model, dataset, config.reference_batch_size, accelerator)
            log(f"reference log-probs: {len(refs)} pairs")
            pairs = [p for p in pairs if p.key in refs]
            return pairs, refs, bad
    refs = {p.key: (p.ref_chosen_logp, p.ref_rejected_logp) for p in pairs}
    return pairs, refs, bad


# --- Checkpoints --------------------------------------------------------------------------------


def _trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {
        n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad
    }


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _config_for_resume(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder under OUT/checkpoints, or None."""
    found = sorted((out / "checkpoints").glob("step-*[0-9]/state.json"))  # not a .tmp one
    return found[-1].parent if found else None


# --- The trainer --------------------------------------------------------------------------------


class Trainer:
    """The training state (model, optimizer, schedule, data position, counts) and its loop."""

    def __init__(self, config, model, processor, dataset, refs, accelerator, log):
        from transformers import get_scheduler

        self.config, self.processor, self.dataset, self.log = config, processor, dataset, log
        self.accelerator = accelerator
        self.out = Path(config.out) if config.out is not None else None
        optimizer = torch.optim.AdamW(
            param_groups(model, config), betas=config.adam_betas, weight_decay=config.weight_decay
        )
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.deepspeed = _is_deepspeed(accelerator)
        self.sharded = _is_sharded(accelerator)
        self.collate = Collator(processor.tokenizer.pad_token_id, refs)
        world = accelerator.num_processes
        self.micro_per_epoch = len(epoch_batches(len(dataset), config.batch_size, 0, 0, 0, world))
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / config.grad_accum)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.scheduler = get_scheduler(
            config.scheduler if config.scheduler != "constant" else "constant_with_warmup",
            self.optimizer,
            num_warmup_steps=math.ceil(config.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.step, self.epoch, self.micro = 0, 0, 0  # optimizer steps done; next micro-batch
        self.truncated: set[str] = set()
        self.bad: dict[str, str] = {}  # key -> reason
        self.history: list[dict[str, Any]] = []
        # The metrics every process reduces, in one fixed order: processes must all-reduce
        # tensors of the same size even when one of them scored no pair in a step.
        self.metric_names = ["loss", "logps/chosen"]
        if config.method == "dpo":
            self.metric_names += [*REWARD_METRICS, "logps/rejected"]
            if config.loss.rpo_alpha > 0:
                self.metric_names.append("nll")
        self.spare: PairBatch | None = None  # the last usable batch (see `_no_pair_loss`)

    # -- one optimizer step: forward and backward over `grad_accum` micro-batches ---------------

    def loss(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-pair losses (B,) and batch-mean metrics of the configured method."""
        if self.config.method == "sft":
            logps = chosen_logps(self.model, batch)
            losses = nll_loss(logps.chosen, logps.chosen_tokens)  # per token, per pair
            return losses, {"logps/chosen": logps.chosen.detach().mean()}
        t = batch.tensors
        logps = pair_logps(self.model, batch)  # one vision + prefix pass for both answers
        return preference_loss(
            logps.chosen, logps.rejected, t["ref_chosen_logps"], t["ref_rejected_logps"],
            logps.chosen_tokens, logps.rejected_tokens, **asdict(self.config.loss),
        )  # fmt: skip

    def train_step(self, micro_batches: list[Collated], planned_pairs: int) -> dict[str, float]:
        """Accumulate gradients over the micro-batches, clip, step; the step's mean metrics."""
        sums: dict[str, Any] = defaultdict(float)
        scored = 0
        for i, collated in enumerate(micro_batches):
            self._count(collated)
            last = i == len(micro_batches) - 1
            # DDP: all-reduce the gradients once, on the last micro-batch of the step.
            sync = self.accelerator.no_sync(self.model) if not last else nullcontext()
            if self.deepspeed:
                # The engine steps inside backward when accelerate says "sync" (untested here).
                self.accelerator.gradient_state._set_sync_gradients(last)
            with sync, self.accelerator.autocast():
                if collated.batch is None:  # every pair of the micro-batch is unusable
                    loss = self._no_pair_loss()
                    if loss is None:
                        continue
                else:
                    batch = collated.batch.to(self.accelerator.device)
                    self.spare = batch
                    losses, metrics = self.loss(batch)  # (B,), {name: mean}
                    # The step's loss is the mean over the pairs it planned to see.
                    loss = losses.sum() / planned_pairs
                    if self.deepspeed:  # its backward divides by grad_accum, done here already
                        loss = loss * self.config.grad_accum
                    n = len(batch)
                    scored += n
                    sums["loss"] += losses.detach().sum()
                    for name, value in metrics.items():
                        sums[name] += value * n
                self.accelerator.backward(loss)
        if self.deepspeed:
            self.accelerator.gradient_state._set_sync_gradients(True)
        grad_norm = None
        if self.config.max_grad_norm is not None:  # under DeepSpeed: the norm the engine clipped
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            grad_norm = self.accelerator.clip_grad_norm_(params, self.config.max_grad_norm)
        lrs = [group["lr"] for group in self.optimizer.param_groups]  # the rates this step used
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Means over every pair scored in the step, on all processes.
        device = self.accelerator.device
        values = [sums.get(name, 0.0) for name in self.metric_names] + [scored]
        totals = torch.stack([_as_tensor(v).to(device) for v in values])
        totals = self.accelerator.reduce(totals, "sum").tolist()
        line = {
            name: total / max(totals[-1], 1.0)
            for name, total in zip(self.metric_names, totals[:-1], strict=True)
        }
        line["lr"] = lrs[0]
        if len(lrs) > 1:
            line["lr/projector"] = lrs[1]
        if grad_norm is not None:  # DeepSpeed may not report one
            line["grad_norm"] = float(grad_norm)
        return line

    def _no_pair_loss(self) -> Tensor | None:
        """The loss of a micro-batch with no usable pair: None (skip it) on one process.

        Under DDP every process must run a forward through the wrapped model and a backward, or
        the gradient all-reduce waits forever; so a usable batch runs, its loss times zero.
        """
        if self.accelerator.num_processes == 1:
            return None
        if self.spare is None:
            self.spare = self._first_usable_batch()
        losses, _ = self.loss(self.spare)
        return losses.sum() * 0.0

    def _first_usable_batch(self) -> PairBatch:
        """A batch of the dataset's first pair that encodes (a stand-in with no effect)."""
        for index in range(len(self.dataset)):
            collated = self.collate([self.dataset[index]])
            if collated.batch is not None:
                return collated.batch.to(self.accelerator.device)
        raise ValueError("no pair of the training set is usable (see the pairs reported above)")

    def _count(self, collated: Collated) -> None:
        for bad in collated.bad:
            if bad.key not in self.bad:
                self.bad[bad.key] = bad.reason
                if len(self.bad) <= MAX_BAD_MESSAGES:
                    self.log(f"skipping {bad.message}")
        batch = collated.batch
        if batch is not None:
            cut = [k for k, t in zip(batch.keys, batch.extra["truncated"], strict=True) if t]
            if cut and not self.truncated:
                self.log(f"pair {cut[0]}: an answer was cut to max_length="
                         f"{self.config.max_length}; truncated pairs are counted")  # fmt: skip
            self.truncated.update(cut)

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, on_step: Callable[[int, dict], None] | None = None) -> None:
        """Train until `total_steps`, from the current position (0 or a loaded checkpoint)."""
        from bpo.utils.console import progress_bar

        cfg, acc = self.config, self.accelerator
        self.model.train()
        enabled = acc.is_local_main_process
        description = f"training ({cfg.method})"
        with progress_bar(description, self.total_steps - self.step, enabled) as advance:
            while self.step < self.total_steps:
                batches = epoch_batches(len(self.dataset), cfg.batch_size, cfg.seed, self.epoch,
                                        acc.process_index, acc.num_processes)  # fmt: skip
                # Its own generator: a loader otherwise draws its seed from the global RNG, and a
                # resumed run would then draw one more time than an uninterrupted one (dropout).
                loader = iter(torch.utils.data.DataLoader(
                    self.dataset, batch_sampler=batches[self.micro:], collate_fn=self.collate,
                    num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed),
                ))  # fmt: skip
                while self.micro < len(batches) and self.step < self.total_steps:
                    group = batches[self.micro : self.micro + cfg.grad_accum]
                    micro_batches = [next(loader) for _ in group]
                    line = self.train_step(micro_batches, sum(len(b) for b in group))
                    self.step += 1
                    self.micro += len(group)
                    epoch = round(self.epoch + self.micro / len(batches), 6)  # fractional
                    line = {"step": self.step, "epoch": epoch, **line}
                    self._after_step(line, on_step)
                    advance(self.step, line.get("loss"), line.get("rewards/accuracies"))
                if self.micro >= len(batches):
                    self.epoch, self.micro = self.epoch + 1, 0

    def _after_step(self, line: dict[str, Any], on_step: Callable | None) -> None:
        cfg = self.config
        if self.step % cfg.log_steps == 0 or self.step == self.total_steps:
            self.history.append(line)
            if self.out is not None and self.accelerator.is_main_process:
                with (self.out / "metrics.jsonl").open("a", encoding="utf-8") as f:
                    f.write(json.dumps(line) + "\n")
            self.accelerator.log({k: v for k, v in line.items() if k != "step"}, step=self.step)
        if cfg.save_steps and self.out is not None and self.step % cfg.save_steps == 0:
            self.save_checkpoint()
        if on_step is not None:
            on_step(self.step, line)

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write OUT/checkpoints/step-N (atomically: a kill leaves the previous one usable)."""
        acc = self.accelerator
        final = self.out / "checkpoints" / f"step-{self.step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            if not self.deepspeed and not self.sharded:  # one process, or DDP: whole copies
                state = _trainable_state(acc.unwrap_model(self.model))
                save_file(state, tmp / "trainable.safetensors")
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        acc.wait_for_everyone()
        if self.deepspeed or self.sharded:
            # Optimizer states (ZeRO) or weights too (ZeRO-3, FSDP) are split across processes:
            # every process writes its part (untested here: needs GPUs and deepspeed).
            acc.save_state(str(tmp / "accelerate"))
            acc.wait_for_everyone()
        # Each process's RNG (dropout) state, so a resume draws the same masks.
        (tmp / f"rng-{acc.process_index}.json").write_text(json.dumps(_rng_state()))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "step": self.step, "epoch": self.epoch, "micro": self.micro,
                "truncated": sorted(self.truncated), "bad": self.bad,
                "history": self.history, "config": _config_for_resume(self.config),
            }  # fmt: skip
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            shutil.rmtree(final, ignore_errors=True)  # a step saved before (save_steps changed)
            tmp.rename(final)
            self._prune_checkpoints()
        acc.wait_for_everyone()
        return final

    def _prune_checkpoints(self) -> None:
        limit = self.config.save_total_limit
        if limit is not None:
            for old in sorted((self.out / "checkpoints").glob("step-*[0-9]"))[:-limit]:
                shutil.rmtree(old)

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything `save_checkpoint` wrote; the metrics log is cut back to its step."""
        state = json.loads((path / "state.json").read_text())
        now = _config_for_resume(self.config)
        if json.loads(json.dumps(now)) != state["config"]:
            from bpo.data.store import config_differences

            diffs = config_differences(state["config"], json.loads(json.dumps(now)))
            raise ValueError(
                f"{path} was written with a different config ({'; '.join(diffs)}); resume with "
                "the same config, or start over in a new --out"
            )
        if (path / "accelerate").is_dir():  # written under DeepSpeed or FSDP
            self.accelerator.load_state(str(path / "accelerate"))
        else:
            weights = load_file(path / "trainable.safetensors")
            params = dict(self.accelerator.unwrap_model(self.model).named_parameters())
            with torch.no_grad():
                for name, value in weights.items():
                    params[name].copy_(value)
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        _set_rng_state(
            json.loads((path / f"rng-{self.accelerator.process_index}.json").read_text())
        )
        self.step, self.epoch, self.micro = state["step"], state["epoch"], state["micro"]
        self.truncated, self.bad = set(state["truncated"]), state["bad"]
        self.history = state["history"]
        if self.accelerator.is_main_process:
            # Lines a killed run logged after this checkpoint are logged again by the resume.
            log_path = self.out / "metrics.jsonl"
            log_path.write_text("".join(json.dumps(line) + "\n" for line in self.history))
        self.log(f"resumed from {path} at step {self.step}")


def _as_tensor(value: Any) -> Tensor:
    return value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))


# --- Entry points -------------------------------------------------------------------------------


def _make_accelerator(config: TrainConfig) -> Any:
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
        "mixed_precision": mixed, "log_with": trackers or None, "project_dir": config.out,
        "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=unused)],
        "cpu": cpu,
    }  # fmt: skip
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


def _is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _is_sharded(accelerator: Any) -> bool:
    """Whether the weights are split across processes: DeepSpeed ZeRO-3 or FSDP."""
    from accelerate.utils import DistributedType

    if _is_deepspeed(accelerator):
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        return ds.get("zero_optimization", {}).get("stage") == 3
    return accelerator.distributed_type == DistributedType.FSDP


def _check_launch(config: TrainConfig, accelerator: Any) -> None:
    """Fit the DeepSpeed config to the trainer's, or say which setting of which file to change."""
    if _is_sharded(accelerator) and config.lora.merge and config.finetune != "full":
        raise ValueError(
            "lora.merge cannot merge an adapter whose base weights are sharded (DeepSpeed ZeRO-3 "
            "or FSDP); set lora.merge false and merge the saved adapter into the base afterwards"
        )
    if not _is_deepspeed(accelerator):
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


def _flat_config(config: TrainConfig) -> dict[str, Any]:
    """The config as one level of scalars, as TensorBoard's hparams need."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            ok = isinstance(value, (int, float, str, bool))
            flat[prefix.rstrip(".")] = value if ok else json.dumps(value)

    walk("", asdict(config))
    return flat


def train(
    config: TrainConfig,
    model: nn.Module | None = None,
    processor: Any = None,
    pairs: Sequence[PreferencePair] | None = None,
    images: Mapping[str, Image.Image] | None = None,
    *,
    resume: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train with DPO (or SFT) and return the trained model, its metrics and a summary.

    Args:
        model, processor: the starting model (also the reference); default: `config.model` loaded.
        pairs: the training pairs; default: the store at `config.pairs` (`config.sources` apply).
        images: the pairs' images by path (no files needed); default: read under `config.image_root`.
        resume: continue from the newest checkpoint under `config.out`.
        on_step: called as on_step(step, metrics) after each optimizer step and its checkpoint.
        config.out: where the log, checkpoints and model go; None writes nothing.
    """
    from accelerate.utils import set_seed

    check_config(config)
    if resume and config.out is None:
        raise ValueError("resume needs run.out, the folder holding the checkpoints")
    out = Path(config.out) if config.out is not None else None
    checkpoint = latest_checkpoint(out) if resume and out is not None else None
    if out is not None and not resume and (out / "metrics.jsonl").exists():
        raise FileExistsError(
            f"{out} holds a previous run (metrics.jsonl); pass --resume to continue it, or "
            "choose another --out"
        )
    accelerator = _make_accelerator(config)
    _check_launch(config, accelerator)
    log = log if accelerator.is_main_process else (lambda _msg: None)
    set_seed(config.seed)  # the adapter's initialisation and dropout
    if model is None:
        model, processor = load_for_training(config, accelerator.device)
    elif not getattr(model, "is_loaded_in_4bit", False):
        model.to(accelerator.device)
    # Before any adapter or trainable weight exists: the reference is the starting model.
    pairs, refs, bad = _pairs_and_refs(config, model, processor, pairs, images, accelerator, log)
    if not pairs:
        example = f", e.g. {bad[0].message}" if bad else ""
        raise ValueError(f"no usable pairs to train on ({len(bad)} unusable{example})")
    dataset = PairDataset(pairs, processor, config.image_root, images, config.max_length)
    model = setup_trainable(model, config)
    trainer = Trainer(config, model, processor, dataset, refs, accelerator, log)
    trainer._count(Collated(None, bad))
    if out is not None and accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        trainer.load_checkpoint(checkpoint)
    elif resume:
        log(f"no checkpoint under {out}; starting from step 0")
        if accelerator.is_main_process:
            (out / "metrics.jsonl").unlink(missing_ok=True)  # lines of the run being redone
    if accelerator.log_with:  # filled by init_trackers, which starts them
        accelerator.init_trackers("bpo", config=_flat_config(config))
    world = accelerator.num_processes
    log(f"{config.method}: {len(dataset)} pairs, {trainer.total_steps} steps, effective batch "
        f"{config.effective_batch * world} ({config.batch_size} x {config.grad_accum} accumulation "
        f"x {world} processes)")  # fmt: skip
    trainer.fit(on_step)

    # Sharded weights are gathered (every process takes part); whole copies are saved as they are.
    state_dict = accelerator.get_state_dict(trainer.model) if trainer.sharded else None
    final = accelerator.unwrap_model(trainer.model)
    if config.finetune != "full" and config.lora.merge:
        final = final.merge_and_unload()
    final.eval()
    summary = {
        "method": config.method,
        "steps": trainer.step,
        "pairs": len(dataset),
        "effective_batch": config.effective_batch * world,
        "processes": world,
        "distributed_type": str(accelerator.distributed_type.value),
        "truncated_pairs": len(trainer.truncated),
        "bad_pairs": len(trainer.bad),
        "bad_reasons": dict(Counter(trainer.bad.values())),
        "final": trainer.history[-1] if trainer.history else {},
    }
    if trainer.truncated:
        log(f"{len(trainer.truncated)} pairs had an answer cut to max_length={config.max_length}")
    if trainer.bad:
        log(f"{len(trainer.bad)} pairs skipped: {summary['bad_reasons']}")
    if out is not None and accelerator.is_main_process:
        final.save_pretrained(out / "model", safe_serialization=True, state_dict=state_dict)
        processor.save_pretrained(out / "model")
        summary["model"] = str(out / "model")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    accelerator.end_training()
    return TrainResult(final, trainer.history, summary)
