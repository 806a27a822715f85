"""Model setup for training: load the starting model, freeze it, open what trains.

LoRA (peft; default targets: every linear layer of the language model), QLoRA (4-bit base, needs
bitsandbytes and CUDA) or full fine-tuning of the language model. The vision tower stays frozen
unless asked; the projector trains only when `projector_lr` is set, at that rate. The language
model is the module the model's `get_decoder()` returns (`bpo.models.family`); the vision tower
and projector are found by their submodule names, which differ between families.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bpo.models.family import language_model_name
from bpo.train.config import TrainConfig

# Submodule names (the last component of the dotted name): LLaVA, Gemma 3, InternVL, Mistral 3
# (`vision_tower`, `multi_modal_projector`), Qwen-VL (`visual`, its `merger`), Idefics3/SmolVLM
# (`vision_model`, `connector`).
VISION_NAMES = ("vision_tower", "visual", "vision_model")
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "connector", "merger")


def find_component(model: nn.Module, names: Sequence[str]) -> str | None:
    """The dotted name of the first submodule whose own name is one of `names`."""
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in names:
            return name
    return None


def lora_target_regex(model: nn.Module, names: Sequence[str] | None = None) -> str:
    """A peft `target_modules` regex: the named linear layers (default all) of the language model."""
    lm = language_model_name(model)
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
        model.get_submodule(language_model_name(model)).requires_grad_(True)
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
            m.name_or_path,
            dtype=m.dtype,
            device=device,
            trust_remote_code=m.trust_remote_code,
            attn_implementation=m.attn_implementation,
            revision=m.revision,
        )
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from bpo.models.load import check_family

    check_family(m.name_or_path, m.trust_remote_code, m.revision)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        # Only the language model is quantized: the tower and projector are small and sensitive.
        llm_int8_skip_modules=[*VISION_NAMES, *PROJECTOR_NAMES, "lm_head"],
    )
    model = AutoModelForImageTextToText.from_pretrained(
        m.name_or_path,
        quantization_config=quantization,
        device_map={"": device},
        use_safetensors=True,
        trust_remote_code=m.trust_remote_code,
        attn_implementation=m.attn_implementation,
        revision=m.revision,
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, load_processor(m.name_or_path, m.trust_remote_code, m.revision)
