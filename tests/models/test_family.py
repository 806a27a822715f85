"""The family layer: which family a model is, what is refused, and the per-sample batching."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import LlavaConfig, MllamaConfig, PaliGemmaConfig, Qwen2_5_VLConfig

from bpo.models import load_model_and_processor
from bpo.models.family import (
    UnsupportedModelError,
    attention_layout,
    check_supported,
    family_of,
    join_samples,
    language_model_name,
    packing_refusal,
    token_aligned_keys,
)


def test_families_by_model_type():
    assert family_of(LlavaConfig()).name == "llava"
    assert family_of(Qwen2_5_VLConfig()).positions == "mrope"
    generic = family_of(type("Config", (), {"model_type": "someone_vl"})())
    assert (generic.name, generic.tier, generic.positions) == ("someone_vl", "generic", "1d")
    mrope = type("Config", (), {"model_type": "x", "rope_parameters": {"mrope_section": [1]}})()
    assert family_of(mrope).positions == "mrope"  # an unknown M-RoPE family is still M-RoPE


@pytest.mark.parametrize(
    ("config", "said"),
    [(MllamaConfig(), "cross_attention_mask"), (PaliGemmaConfig(), "prefix/suffix")],
)
def test_refused_families_name_themselves_and_the_reason(config, said):
    with pytest.raises(
        UnsupportedModelError, match=f"'{config.model_type}' is not supported.*{said}"
    ):
        check_supported(config)


def test_a_refused_family_stops_before_its_weights_load(tiny_families, tmp_path):
    folder = shutil.copytree(tiny_families("mllama"), tmp_path / "mllama")
    (folder / "model.safetensors").write_bytes(b"not read")  # loading it would fail otherwise
    with pytest.raises(UnsupportedModelError, match="'mllama' is not supported"):
        load_model_and_processor(str(folder), dtype="float32", device="cpu")


def test_join_samples_pads_text_left_and_crops_with_zeros():
    """Two samples: ids padded with the pad id, mask and token types with 0, on the left; a
    (1, crops, C, H, W) vision key padded to the most crops with all-zero crops, then stacked."""
    first = {
        "input_ids": torch.tensor([[5, 6, 7]]),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
        "token_type_ids": torch.tensor([[0, 1, 0]]),
        "pixel_values": torch.ones(1, 2, 1, 2, 2),
    }
    second = {
        "input_ids": torch.tensor([[8]]),
        "attention_mask": torch.ones(1, 1, dtype=torch.long),
        "token_type_ids": torch.tensor([[1]]),
        "pixel_values": torch.full((1, 1, 1, 2, 2), 2.0),
    }
    joined = join_samples([first, second], pad_token_id=0, side="left")
    assert joined["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert joined["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert joined["token_type_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    pixels = joined["pixel_values"]
    assert pixels.shape == (2, 2, 1, 2, 2)
    assert pixels[1, 0].eq(2).all() and pixels[1, 1].eq(0).all() and pixels[0].eq(1).all()
    right = join_samples([first, second], pad_token_id=9, side="right")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]


def test_a_flattened_patch_layout_joins_along_dim_0():
    """Qwen-VL: each sample's (patches, dim) pixels and (1, 3) grid, stacked in sample order."""
    samples = [
        {
            "input_ids": torch.tensor([[1]]),
            "pixel_values": torch.zeros(4, 6),
            "image_grid_thw": torch.tensor([[1, 2, 2]]),
        },
        {
            "input_ids": torch.tensor([[2]]),
            "pixel_values": torch.ones(8, 6),
            "image_grid_thw": torch.tensor([[1, 2, 4]]),
        },
    ]
    joined = join_samples(samples, pad_token_id=0)
    assert joined["pixel_values"].shape == (12, 6) and joined["pixel_values"][4:].eq(1).all()
    assert joined["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4]]


def test_per_token_outputs_of_another_kind_are_refused():
    sample = {
        "input_ids": torch.ones(1, 3, dtype=torch.long),
        "cross_attention_mask": torch.ones(1, 3, 1, 1),
    }
    with pytest.raises(UnsupportedModelError, match="cross_attention_mask"):
        token_aligned_keys(sample)


def test_layouts_and_the_language_model(tiny_families):
    layouts = {}
    for name in ("llava", "gemma3", "idefics3", "qwen3_5"):
        model, _ = load_model_and_processor(str(tiny_families(name)), dtype="float32", device="cpu")
        layouts[name] = model
    gemma = attention_layout(layouts["gemma3"])
    assert gemma.by_layer_type and gemma.bidirectional_images
    assert gemma.windows["sliding_attention"] == layouts["gemma3"].config.text_config.sliding_window
    assert attention_layout(layouts["llava"]).windows == {"full_attention": None}
    assert language_model_name(layouts["llava"]) == "model.language_model"
    assert language_model_name(layouts["idefics3"]) == "model.text_model"
    assert packing_refusal(layouts["llava"]) is None
    assert "linear_attention" in packing_refusal(layouts["qwen3_5"])
    with pytest.raises(UnsupportedModelError, match="linear_attention"):
        attention_layout(layouts["qwen3_5"])
