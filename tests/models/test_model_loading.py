"""Loading: round trip through safetensors, safety defaults, dtype/device resolution."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from bpo.models import (
    build_prompt,
    count_image_tokens,
    load_model_and_processor,
    load_processor,
    resolve_device,
    resolve_dtype,
)
from bpo.models.tiny import TinyLlavaConfig, build_model, build_processor

QUESTION = [{"role": "user", "content": "<image>\nDescribe the image."}]


def test_round_trip_gives_identical_logits(tiny, image):
    model, processor, folder, _ = tiny
    loaded, loaded_processor = load_model_and_processor(
        str(folder), dtype="float32", device="cpu", attn_implementation="eager"
    )
    assert not loaded.training
    assert loaded.dtype == torch.float32
    assert loaded.config._attn_implementation == "eager"
    assert loaded_processor.tokenizer.padding_side == "left"
    prompt = build_prompt(processor, QUESTION)
    assert build_prompt(loaded_processor, QUESTION) == prompt
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    loaded_inputs = loaded_processor(images=image, text=prompt, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], loaded_inputs["input_ids"])
    assert torch.equal(inputs["pixel_values"], loaded_inputs["pixel_values"])
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = loaded(**loaded_inputs).logits
    assert expected.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.equal(actual, expected)


@pytest.mark.parametrize(
    ("image_size", "patch_size", "expected"), [(32, 8, 16), (48, 8, 36), (40, 10, 16)]
)
def test_image_tokens_match_vision_features(tiny, image, image_size, patch_size, expected):
    tokenizer = tiny[1].tokenizer
    config = TinyLlavaConfig(image_size=image_size, patch_size=patch_size)
    processor = build_processor(config, tokenizer)
    model = build_model(config, tokenizer)
    prompt = build_prompt(processor, QUESTION)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    n_tokens = int((inputs["input_ids"] == model.config.image_token_index).sum())
    with torch.no_grad():
        features = model.get_image_features(
            inputs["pixel_values"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output
    assert n_tokens == features[0].shape[0] == expected == config.num_image_tokens
    assert count_image_tokens(processor) == expected
    assert count_image_tokens(processor, image) == expected
    # The model's own check: a forward pass fails if the counts disagree.
    with torch.no_grad():
        model(**inputs)


def test_from_pretrained_gets_safe_defaults(tiny, monkeypatch):
    folder = str(tiny[2])
    calls = {}
    model_loader = AutoModelForImageTextToText.from_pretrained
    processor_loader = AutoProcessor.from_pretrained

    def spy_model(name, **kwargs):
        calls["model"] = (name, kwargs)
        return model_loader(name, **kwargs)

    def spy_processor(name, **kwargs):
        calls["processor"] = (name, kwargs)
        return processor_loader(name, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", spy_model)
    monkeypatch.setattr(AutoProcessor, "from_pretrained", spy_processor)
    load_model_and_processor(folder, dtype="bf16", device="cpu")
    name, kwargs = calls["model"]
    assert name == folder
    assert kwargs["use_safetensors"] is True
    assert kwargs["trust_remote_code"] is False
    assert kwargs["dtype"] == torch.bfloat16
    assert kwargs["device_map"] == torch.device("cpu")
    assert kwargs["revision"] is None
    assert "attn_implementation" not in kwargs  # transformers' own default
    assert calls["processor"] == (folder, {"trust_remote_code": False, "revision": None})

    load_model_and_processor(folder, device="cpu", trust_remote_code=True, revision="main")
    assert calls["model"][1]["trust_remote_code"] is True
    assert calls["model"][1]["revision"] == "main"
    assert calls["processor"][1] == {"trust_remote_code": True, "revision": "main"}


def test_pickle_only_folder_is_refused(tiny, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny[2], folder)
    (folder / "model.safetensors").unlink()
    torch.save({"not": "loaded"}, folder / "pytorch_model.bin")
    with pytest.raises(
        OSError, match=r"only PyTorch pickle weights \(pytorch_model\.bin\).*safetensors only"
    ):
        load_model_and_processor(str(folder), device="cpu")


@pytest.mark.parametrize("path", ["/no/such/model", "./missing-model", "runs/a/b/checkpoint"])
def test_missing_local_folder_is_a_clear_error(path):
    with pytest.raises(FileNotFoundError, match=r"model folder .* not found"):
        load_model_and_processor(path)
    with pytest.raises(FileNotFoundError, match=r"model folder .* not found"):
        load_processor(path)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        (torch.float16, torch.float16),
        ("auto", torch.float32),
        (None, torch.float32),
    ],
)
def test_resolve_dtype_on_cpu(name, expected):
    assert resolve_dtype(name, "cpu") == expected


def test_resolve_dtype_auto_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("auto", "mps") == torch.float16


def test_resolve_dtype_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"unknown dtype 'float8'; use 'auto' or one of"):
        resolve_dtype("float8", "cpu")


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
