"""Every tiny model family: the family's own classes, its processor's outputs, image tokens that
match the tower's features, generation that stops at the family's end of turn, and a save ->
load round trip through `load_model_and_processor` with identical logits. Then the processor
loading that works without torchvision.

The expected values are what the real families give, scaled down: keys and shapes as each
real processor returns them for one 40x30 image, prompts as each real chat template writes
them, token counts worked out from the tiny sizes (Qwen: a 40x30 image is resized to 32x32,
4x4 patches of 8 px, merged 2x2 into 4 tokens; LLaVA-NeXT: the whole image's 2x2 patches of 16 px,
the crop's 2x2, and a newline feature after each of the crop's 2 rows: 10).
"""

from __future__ import annotations

import inspect
import json
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, LogitsProcessor
from transformers.utils import is_num2words_available, is_torchvision_available

import bpo.models.load as load_module
from bpo.models import build_prompt, load_model_and_processor, load_processor
from bpo.models.family import UnsupportedModelError
from bpo.models.load import VideoProcessorUnavailable, torchvision_free_processor_class
from bpo.models.tiny_families import (
    BUILT,
    FIRST_CLASS,
    NOT_BUILT,
    SECOND_TIER,
    build_tiny_family,
    save_tiny_family,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ONE_TURN = [{"role": "user", "content": "<image>\nDescribe the image."}]
QWEN2_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN3_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN_OUTPUTS = {"pixel_values": (16, 3 * 2 * 8 * 8), "image_grid_thw": (1, 3)}
TILES = {"pixel_values": (1, 2, 3, 32, 32), "image_sizes": (1, 2)}
IDEFICS = {"pixel_values": (1, 1, 3, 32, 32), "pixel_attention_mask": (1, 1, 32, 32)}
SMOL_PROMPT = "<|im_start|>User:<image>Describe the image.<end_of_utterance>\nAssistant:"


# name: (model class, processor class, image processor class, the prompt for ONE_TURN,
#        vision outputs and token-aligned outputs besides ids and mask {key: shape} (None: as
#        long as the ids), image tokens per image, the end-of-turn token generation stops at)
FAMILIES = {
    "llava": (
        "LlavaForConditionalGeneration",
        "LlavaProcessor",
        "CLIPImageProcessorPil",
        "USER: <image>\nDescribe the image. ASSISTANT:",
        {"pixel_values": (1, 3, 32, 32)},
        16,
        "</s>",
    ),
    "llava_next": (
        "LlavaNextForConditionalGeneration",
        "LlavaNextProcessor",
        "LlavaNextImageProcessorPil",
        "[INST] <image>\nDescribe the image. [/INST]",
        TILES,
        10,
        "</s>",
    ),
    "llava_onevision": (
        "LlavaOnevisionForConditionalGeneration",
        "LlavaOnevisionProcessor",
        "LlavaOnevisionImageProcessorPil",
        "<|im_start|>user <image>\nDescribe the image.<|im_end|><|im_start|>assistant\n",
        {**TILES, "batch_num_images": (1,)},
        10,
        "<|im_end|>",
    ),
    "qwen2_vl": (
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLProcessor",
        "Qwen2VLImageProcessorPil",
        QWEN2_PROMPT,
        {**QWEN_OUTPUTS, "mm_token_type_ids": None},
        4,
        "<|im_end|>",
    ),
    "qwen2_5_vl": (
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLProcessor",
        "Qwen2VLImageProcessorPil",
        QWEN2_PROMPT,
        {**QWEN_OUTPUTS, "mm_token_type_ids": None},
        4,
        "<|im_end|>",
    ),
    "qwen3_vl": (
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLProcessor",
        "Qwen2VLImageProcessorPil",
        QWEN3_PROMPT,
        {**QWEN_OUTPUTS, "mm_token_type_ids": None},
        4,
        "<|im_end|>",
    ),
    "gemma3": (
        "Gemma3ForConditionalGeneration",
        "Gemma3Processor",
        "Gemma3ImageProcessorPil",
        "<bos><start_of_turn>user\n<start_of_image>Describe the image.<end_of_turn>\n"
        "<start_of_turn>model\n",
        {"pixel_values": (1, 3, 32, 32), "token_type_ids": None},
        4,
        "<end_of_turn>",
    ),
    "internvl": (
        "InternVLForConditionalGeneration",
        "InternVLProcessor",
        "GotOcr2ImageProcessorPil",
        "<|im_start|>user\n<IMG_CONTEXT>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n",
        {"pixel_values": (1, 3, 32, 32)},
        4,
        "<|im_end|>",
    ),
    "idefics3": (
        "Idefics3ForConditionalGeneration",
        "Idefics3Processor",
        "Idefics3ImageProcessorPil",
        SMOL_PROMPT,
        IDEFICS,
        4,
        "<end_of_utterance>",
    ),
    "smolvlm": (
        "SmolVLMForConditionalGeneration",
        "SmolVLMProcessor",
        "SmolVLMImageProcessorPil",
        SMOL_PROMPT,
        IDEFICS,
        4,
        "<end_of_utterance>",
    ),
    "mistral3": (
        "Mistral3ForConditionalGeneration",
        "PixtralProcessor",
        "PixtralImageProcessorPil",
        "<s>[SYSTEM_PROMPT]You are Mistral Small 3, a Large Language Model (LLM) created by "
        "Mistral AI, a French startup headquartered in Paris.[/SYSTEM_PROMPT][INST][IMG]"
        "Describe the image.[/INST]",
        {"pixel_values": (1, 3, 32, 32), "image_sizes": (1, 2)},
        4,
        "</s>",
    ),
    "aya_vision": (
        "AyaVisionForConditionalGeneration",
        "AyaVisionProcessor",
        "GotOcr2ImageProcessorPil",
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|><image>Describe the image."
        "<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        {"pixel_values": (1, 3, 32, 32)},
        4,
        "<|END_OF_TURN_TOKEN|>",
    ),
    "glm4v": (
        "Glm4vForConditionalGeneration",
        "Glm4vProcessor",
        "Glm4vImageProcessorPil",
        "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>Describe the image."
        "<|assistant|>\n",
        {**QWEN_OUTPUTS, "mm_token_type_ids": None},
        4,
        "<|user|>",
    ),
    "mllama": (
        "MllamaForConditionalGeneration",
        "MllamaProcessor",
        "MllamaImageProcessorPil",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe the "
        "image.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        {
            "pixel_values": (1, 1, 1, 3, 32, 32),  # (B, images, tiles, C, H, W)
            "aspect_ratio_ids": (1, 1),
            "aspect_ratio_mask": (1, 1, 1),
            "cross_attention_mask": "ids x 1 x 1",
        },
        1,  # one <|image|> marker: the features enter through cross-attention, not as tokens
        "<|eot_id|>",
    ),
    "paligemma": (
        "PaliGemmaForConditionalGeneration",
        "PaliGemmaProcessor",
        "SiglipImageProcessorPil",
        # No chat template (the real checkpoints have none): bpo's LLaVA-1.5 fallback.
        "USER: <image>\nDescribe the image. ASSISTANT:",
        {"pixel_values": (1, 3, 32, 32), "token_type_ids": None, "labels": None},
        16,
        "<eos>",
    ),
    "qwen3_5": (
        "Qwen3_5ForConditionalGeneration",
        "Qwen3VLProcessor",
        "Qwen2VLImageProcessorPil",
        QWEN3_PROMPT + "<think>\n",
        {**QWEN_OUTPUTS, "mm_token_type_ids": None},
        4,
        "<|im_end|>",
    ),
}
# Families whose processor has a video processor (a stand-in without torchvision).
WITH_VIDEO = {
    "llava_onevision": "LlavaOnevisionVideoProcessor",
    "qwen2_vl": "Qwen2VLVideoProcessor",
    "qwen2_5_vl": "Qwen2VLVideoProcessor",
    "qwen3_vl": "Qwen3VLVideoProcessor",
    "qwen3_5": "Qwen3VLVideoProcessor",
    "internvl": "InternVLVideoProcessor",
    "smolvlm": "SmolVLMVideoProcessor",
    "glm4v": "Glm4vVideoProcessor",
}
no_torchvision = pytest.mark.skipif(is_torchvision_available(), reason="torchvision installed")
# SmolVLMProcessor refuses to be built without num2words (which it uses for video prompts).
needs_num2words = pytest.mark.skipif(
    not is_num2words_available(), reason="SmolVLMProcessor needs the num2words package"
)


def families(names):
    """`names` as parameters, SmolVLM's marked to need num2words."""
    return [pytest.param(n, marks=needs_num2words) if n == "smolvlm" else n for n in names]


def test_the_registry_covers_every_family():
    assert set(BUILT) == set(FAMILIES)
    assert set(FIRST_CLASS) <= set(BUILT)
    assert set(BUILT) | set(NOT_BUILT) == set(FIRST_CLASS) | set(SECOND_TIER)
    with pytest.raises(ValueError, match=r"phi4_multimodal.*not an AutoModelForImageTextToText"):
        build_tiny_family("phi4_multimodal", ["a"])


@pytest.fixture(scope="module")
def image():
    img = Image.new("RGB", (40, 30), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 30))
    return img


def load(folder):
    """The folder loaded the way every stage loads a model; for a family bpo's stages refuse
    (`bpo.models.family` says why), through the same Auto classes and `load_processor`."""
    try:
        return load_model_and_processor(
            str(folder), dtype="float32", device="cpu", attn_implementation="eager"
        )
    except UnsupportedModelError:
        model = AutoModelForImageTextToText.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager", use_safetensors=True
        )
        return model.eval(), load_processor(str(folder))


@pytest.fixture(scope="module")
def loaded(tiny_families):
    """name -> (built model, built processor, loaded model, loaded processor), each once."""
    cache = {}

    def get(name):
        if name not in cache:
            folder = tiny_families(name)
            cache[name] = (*tiny_families.built[name], *load(folder))
        return cache[name]

    return get


def encode(processor, image):
    return processor(images=[image], text=[build_prompt(processor, ONE_TURN)], return_tensors="pt")


@pytest.mark.parametrize("name", families(BUILT))
def test_round_trip_gives_the_family_classes_and_identical_logits(name, loaded, image):
    model, processor, loaded_model, loaded_processor = loaded(name)
    model_class, processor_class, image_processor_class, prompt, *_ = FAMILIES[name]
    for m in (model, loaded_model):
        assert type(m).__name__ == model_class
    for p in (processor, loaded_processor):
        assert type(p).__name__ == processor_class
        assert type(p.image_processor).__name__ == image_processor_class
    assert loaded_processor.tokenizer.padding_side == "left"
    assert loaded_processor.chat_template == processor.chat_template
    assert build_prompt(loaded_processor, ONE_TURN) == build_prompt(processor, ONE_TURN) == prompt
    inputs, loaded_inputs = encode(processor, image), encode(loaded_processor, image)
    assert inputs.keys() == loaded_inputs.keys()
    for key in inputs:
        assert torch.equal(inputs[key], loaded_inputs[key]), key
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = loaded_model(**loaded_inputs).logits
    assert expected.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.equal(actual, expected)
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 300_000


@pytest.mark.parametrize("name", families(BUILT))
def test_processor_outputs_are_the_familys(name, loaded, image):
    processor = loaded(name)[3]
    outputs = FAMILIES[name][4]
    inputs = encode(processor, image)
    length = inputs["input_ids"].shape[1]
    assert set(inputs) == {"input_ids", "attention_mask", *outputs}
    for key, shape in outputs.items():
        if shape is None:  # one value per token
            shape = (1, length)
        elif shape == "ids x 1 x 1":
            shape = (1, length, 1, 1)
        assert tuple(inputs[key].shape) == shape, key
    assert inputs["attention_mask"].shape == (1, length)


def vision_feature_count(model, inputs):
    """How many feature vectors the model's own `get_image_features` makes from `inputs`."""
    wanted = inspect.signature(model.get_image_features).parameters
    with torch.no_grad():
        out = model.get_image_features(**{k: v for k, v in inputs.items() if k in wanted})
    features = getattr(out, "pooler_output", out)

    def count(x):
        return x.shape[:-1].numel() if torch.is_tensor(x) else sum(count(y) for y in x)

    return count(features)


@pytest.mark.parametrize("name", families(BUILT))
def test_image_tokens_equal_the_vision_features(name, loaded, image):
    model, _, _, processor = loaded(name)
    expected = FAMILIES[name][5]
    inputs = encode(processor, image)
    config = model.config
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    assert int((inputs["input_ids"] == image_id).sum()) == expected
    if name == "mllama":  # no image tokens: the text from <|image|> on cross-attends to the tile
        at = inputs["input_ids"][0].tolist().index(image_id)
        length = inputs["input_ids"].shape[1]
        assert inputs["cross_attention_mask"][0, :, 0, 0].tolist() == [0] * at + [1] * (length - at)
        return
    assert vision_feature_count(model, inputs) == expected


class ForceTokenAt(LogitsProcessor):
    """Makes generation emit `token_id` at step `step` (0-based) and anything at other steps."""

    def __init__(self, prompt_length: int, step: int, token_id: int):
        self.at, self.token_id = prompt_length + step, token_id

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.token_id] = 0.0
        return scores


@pytest.mark.parametrize("name", families(BUILT))
def test_generation_stops_at_the_end_of_turn(name, loaded, image):
    model, processor = loaded(name)[2:]
    end_of_turn = processor.tokenizer.convert_tokens_to_ids(FAMILIES[name][6])
    inputs = encode(processor, image)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        free = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        forced = model.generate(
            **inputs,
            max_new_tokens=4,
            do_sample=False,
            logits_processor=[ForceTokenAt(length, 1, end_of_turn)],
        )
    assert free.shape[1] <= length + 4 and torch.equal(free[:, :length], inputs["input_ids"])
    # The end-of-turn token ends generation: the second new token is the last one.
    assert forced[0, length:].tolist()[1:] == [end_of_turn]


def test_save_tiny_family_saves_what_build_tiny_family_builds(texts, image, tmp_path):
    model, processor = build_tiny_family("gemma3", texts, seed=3)
    loaded_model, loaded_processor = load(save_tiny_family("gemma3", texts, tmp_path, seed=3))
    inputs = encode(processor, image)
    assert torch.equal(encode(loaded_processor, image)["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(loaded_model(**inputs).logits, model(**inputs).logits)
    other = build_tiny_family("gemma3", texts, seed=4)[0]
    with torch.no_grad():
        assert not torch.equal(other(**inputs).logits, model(**inputs).logits)


# ---- processors without torchvision -------------------------------------------------------


@no_torchvision
@pytest.mark.parametrize("name", families(sorted(WITH_VIDEO)))
def test_without_torchvision_the_video_processor_is_a_stand_in(
    name, loaded, tiny_families, tmp_path
):
    processor = loaded(name)[3]
    videos = processor.video_processor
    assert isinstance(videos, VideoProcessorUnavailable)
    assert videos.settings["video_processor_type"] == WITH_VIDEO[name]
    with pytest.raises(ImportError, match="needs torchvision"):
        videos([torch.zeros(2, 3, 32, 32)])
    # Saving the loaded processor writes the folder's video settings back unchanged, so a user
    # with torchvision gets the real video processor from a folder saved here.
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    original = json.loads((tiny_families(name) / "processor_config.json").read_text())
    assert saved["video_processor"] == original["video_processor"] == videos.settings
    assert saved["processor_class"] == original["processor_class"] == FAMILIES[name][1]


@no_torchvision
def test_without_torchvision_other_processors_go_through_auto_processor(tiny_families, monkeypatch):
    calls = []
    real = load_module.AutoProcessor.from_pretrained

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(load_module.AutoProcessor, "from_pretrained", spy)
    gemma3, qwen2_vl = str(tiny_families("gemma3")), str(tiny_families("qwen2_vl"))
    assert type(load_processor(gemma3)).__name__ == "Gemma3Processor"
    assert type(load_processor(qwen2_vl)).__name__ == "Qwen2VLProcessor"
    assert calls == [gemma3]  # Qwen2-VL's has a video processor: built from its parts instead


def test_with_torchvision_load_processor_is_auto_processor(tiny_families, monkeypatch):
    """A user with torchvision gets AutoProcessor's processor, untouched but for left padding."""
    folder = str(tiny_families("qwen2_vl"))
    calls = []

    class Tokenizer:
        padding_side = "right"

    class Processor:
        tokenizer = Tokenizer()

    def from_pretrained(*args, **kwargs):
        calls.append((args, kwargs))
        return Processor()

    monkeypatch.setattr(load_module, "is_torchvision_available", lambda: True)
    monkeypatch.setattr(load_module.AutoProcessor, "from_pretrained", from_pretrained)
    processor = load_processor(folder)
    assert isinstance(processor, Processor) and processor.tokenizer.padding_side == "left"
    assert calls == [((folder,), {"trust_remote_code": False, "revision": None})]


@no_torchvision
def test_pixtral_processor_imports_without_torchvision_and_leaves_no_alias():
    processor_class = torchvision_free_processor_class("PixtralProcessor")
    assert processor_class.__module__ == "transformers.models.pixtral.processing_pixtral"
    assert "transformers.models.pixtral.image_processing_pixtral" not in sys.modules
    with pytest.raises(ImportError):
        import transformers.models.pixtral.image_processing_pixtral  # noqa: F401
