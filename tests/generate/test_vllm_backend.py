"""The vLLM backend up to the engine's boundary, with a stand-in engine (`fake_vllm`).

No real vLLM runs here (it needs a CUDA GPU). What is checked is our side: the prompts are
llava-hf's with one unexpanded `<image>` (or token ids for a rendered prompt, tokenized as the
transformers backend tokenizes it), clean images go over as PIL images, the sampling parameters
carry the settings and each request's seed, and answers come back in request order, cut at the
end of sequence. The stand-in answers by running the tiny LLaVA on what it was handed, so greedy
answers equal across backends prove the prompts right. (Weakened negatives through vLLM:
tests/bootstrap/test_vllm_bootstrap.py.)
"""

from __future__ import annotations

import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import fake_vllm
from bpo.generate import (
    GenerateConfig,
    GenerationRequest,
    TransformersGenerator,
    VllmConfig,
    VllmGenerator,
    load_generator,
    stream_seed,
)
from bpo.generate.config import VllmUnavailableError, check_generate_config
from bpo.generate.vllm_backend import engine_kwargs, make_engine
from bpo.models import build_prompt
from bpo.models.load import ModelConfig
from generation_helpers import mixed_requests

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def vllm_module(monkeypatch):
    return fake_vllm.install(monkeypatch)


def model_config(folder) -> ModelConfig:
    return ModelConfig(str(folder), dtype="float32", device="cpu", attn_implementation="eager")


@pytest.fixture
def generator(vllm_module, tiny_llava_folder):
    """The VllmGenerator of the tiny LLaVA over the stand-in engine, as a config loads it."""
    return load_generator(
        model_config(tiny_llava_folder), "vllm", vllm=VllmConfig(), engine_factory=make_engine
    )


def test_clean_answers_through_the_config_front_end(generator, loaded):
    """A `generation:` section with backend "vllm": PIL images go over as they are (and a
    request without an image as text alone); greedy answers equal the transformers backend's."""
    model, processor = loaded
    assert isinstance(generator, VllmGenerator)
    assert generator.eos == {model.generation_config.eos_token_id}
    asked = mixed_requests()
    config = GenerateConfig(backend="vllm", max_new_tokens=6)
    ours = generator.generate(asked, config.decoding())
    theirs = TransformersGenerator(model, processor, 2).generate(asked, config.decoding())
    assert [(g.text, g.token_ids) for g in ours] == [(g.text, g.token_ids) for g in theirs]
    assert len({g.text for g in ours}) >= 3  # a shuffled order could not pass
    prompts, params = generator.engine.calls[0]
    assert prompts[0]["prompt"] == "USER: <image>\nDescribe the image. ASSISTANT:"
    assert prompts[3] == {"prompt": build_prompt(processor, asked[3].messages, has_image=False)}
    assert prompts[0]["multi_modal_data"]["image"] is asked[0].image
    assert all(
        p["prompt"].count("<image>") == (r.image is not None)
        for p, r in zip(prompts, asked, strict=True)
    )
    assert {(p.n, p.temperature, p.top_p, p.seed, p.max_tokens) for p in params} == {
        (1, 0.0, 1.0, None, 6)
    }
    sampled = replace(config, do_sample=True, temperature=0.8, top_p=0.9, seed=1)
    keyed = [replace(r, seed=stream_seed(1, k, 0, "sample")) for k, r in enumerate(asked)]
    generator.generate(keyed, sampled.decoding())
    _, params = generator.engine.calls[1]
    assert [p.seed for p in params] == [stream_seed(1, k, 0, "sample") for k in range(5)]
    assert {(p.temperature, p.top_p, p.max_tokens) for p in params} == {(0.8, 0.9, 6)}


def test_sampled_answers_are_keyed_by_each_requests_seed(generator):
    """Temperature 1: each request answered alone gets what it got among five."""
    asked = [
        replace(r, seed=stream_seed(3, k, 0, "sample")) for k, r in enumerate(mixed_requests())
    ]
    decoding = GenerateConfig(do_sample=True, max_new_tokens=6).decoding()
    together = [g.token_ids for g in generator.generate(asked, decoding)]
    alone = [generator.generate([r], decoding)[0].token_ids for r in asked]
    assert together == alone
    assert len({tuple(t) for t in together}) >= 4
    with pytest.raises(ValueError, match="request 0 has no seed"):
        generator.generate(mixed_requests(), decoding)


def test_rendered_prompts_go_as_the_token_ids_transformers_would_see(generator, loaded):
    """A text-only prompt is handed over tokenized: with the tokenizer's own special tokens when
    the prompt has no BOS (the tiny tokenizer adds none), and with no second BOS when it starts
    with one; greedy continuations match the transformers backend's."""
    model, processor = loaded
    tokenizer = processor.tokenizer
    bos = tokenizer.bos_token_id
    plain = "USER: What is in the image? ASSISTANT:"
    asked = [GenerationRequest(prompt=plain), GenerationRequest(prompt=tokenizer.bos_token + plain)]
    decoding = GenerateConfig(max_new_tokens=5).decoding()
    ours = generator.generate(asked, decoding)
    prompts, _ = generator.engine.calls[0]
    ids = tokenizer(plain, add_special_tokens=False)["input_ids"]
    assert prompts == [
        {"prompt_token_ids": tokenizer(plain)["input_ids"]},
        {"prompt_token_ids": [bos, *ids]},
    ]
    theirs = TransformersGenerator(model, processor).generate(asked, decoding)
    assert [g.token_ids for g in ours] == [g.token_ids for g in theirs]


class ScriptedEngine:
    """An engine that answers every prompt with the same token ids (or drops the last prompt)."""

    def __init__(self, token_ids: list[int], drop_last: bool = False):
        self.token_ids, self.drop_last, self.calls = token_ids, drop_last, 0

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls += 1
        outputs = [SimpleNamespace(outputs=[SimpleNamespace(token_ids=self.token_ids)])] * len(
            prompts
        )
        return outputs[:-1] if self.drop_last else outputs


def test_answers_are_cut_at_the_end_of_sequence_and_decoded_by_our_tokenizer(loaded):
    _, processor = loaded
    tokenizer = processor.tokenizer
    red, square = tokenizer.convert_tokens_to_ids(["Ġred", "Ġsquare"])
    eos = tokenizer.eos_token_id
    generator = VllmGenerator(
        ScriptedEngine([red, square, eos, red, red]), processor, sampling_params=lambda **k: k
    )
    (answer,) = generator.generate(mixed_requests()[:1], GenerateConfig().decoding())
    assert (answer.text, answer.token_ids) == ("red square", [red, square, eos])
    assert generator.eos == {eos}


def test_refusals(loaded):
    """What the engine cannot take is refused before it is called, with the reason."""
    _, processor = loaded
    engine = ScriptedEngine([2])
    generator = VllmGenerator(engine, processor, sampling_params=lambda **k: k)
    decoding = GenerateConfig().decoding()
    weakened = replace(mixed_requests()[0], pixels=torch.zeros_like)
    with pytest.raises(ValueError, match="not a `pixels` transform"):
        generator.generate([weakened], decoding)
    with pytest.raises(ValueError, match="does not return logits"):
        generator.generate(mixed_requests(), decoding, return_logits=True)
    assert generator.generate([], decoding) == [] and engine.calls == 0
    short = VllmGenerator(ScriptedEngine([2], drop_last=True), processor, None, lambda **k: k)
    with pytest.raises(RuntimeError, match="the engine answered 4 of 5 prompts"):
        short.generate(mixed_requests(), decoding)


def test_engine_options_come_from_the_config(vllm_module, tiny_llava_folder):
    options = VllmConfig(tensor_parallel_size=2, gpu_memory_utilization=0.7, max_model_len=2048)
    engine = make_engine(model_config(tiny_llava_folder), options)
    assert engine.kwargs == {
        "model": str(tiny_llava_folder),
        "revision": None,
        "trust_remote_code": False,
        "dtype": "float32",  # the model section's, as the encoder loads it
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.7,
        "enforce_eager": False,
        "limit_mm_per_prompt": {"image": 1},
        "enable_mm_embeds": True,
        "load_format": "safetensors",  # never pickled weights
        "max_model_len": 2048,
    }
    config = ModelConfig("llava-hf/llava-1.5-7b-hf", dtype="bf16")
    both = engine_kwargs(config, VllmConfig(dtype="float16", extra={"seed": 3}))
    assert (both["dtype"], both["seed"], "max_model_len" in both) == ("float16", 3, False)


def test_engine_without_the_embeddings_switch(vllm_module, tiny_llava_folder, monkeypatch):
    """A vLLM whose EngineArgs has no enable_mm_embeds (older releases) is not handed one."""
    from dataclasses import make_dataclass

    monkeypatch.setattr(vllm_module, "EngineArgs", make_dataclass("EngineArgs", [("model", str)]))
    engine = make_engine(model_config(tiny_llava_folder), VllmConfig())
    assert "enable_mm_embeds" not in engine.kwargs


def test_missing_vllm_is_named_before_any_model_loads(monkeypatch, tiny_llava_folder):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(VllmUnavailableError, match="backend: transformers"):
        load_generator(ModelConfig(str(tiny_llava_folder / "missing")), "vllm")
    made = []  # a stand-in engine still needs vllm's SamplingParams: refused before it is made
    with pytest.raises(VllmUnavailableError, match="backend: transformers"):
        load_generator(ModelConfig(str(tiny_llava_folder)), "vllm", engine_factory=made.append)
    assert made == []
    with pytest.raises(VllmUnavailableError, match=r"pip install 'bpo\[vllm\]'"):
        check_generate_config(GenerateConfig(backend="vllm"))


class _BosTokenizer:
    """A tokenizer that writes its BOS (id 1) in front of every text, as Gemma's does."""

    bos_token, bos_token_id = "<bos>", 1

    def __init__(self, adds_bos: bool):
        self.adds_bos = adds_bos

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": [1, *ids] if self.adds_bos and add_special_tokens else ids}


@pytest.mark.parametrize(("adds_bos", "expected"), [(True, "USER: hi"), (False, "<bos>USER: hi")])
def test_a_bos_the_template_wrote_is_not_doubled_by_vllm(adds_bos, expected):
    """vLLM tokenizes a text prompt with the tokenizer's specials: a template-written BOS is
    dropped from the text exactly when that tokenizer adds one itself."""
    engine = VllmGenerator(object(), _BosTokenizer(adds_bos), eos={2}, sampling_params=dict)
    assert engine._without_template_bos("<bos>USER: hi") == expected
    assert engine._without_template_bos("USER: hi") == "USER: hi"
