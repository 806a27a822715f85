"""The vLLM backend up to the engine's boundary, with a stand-in engine (`fake_vllm`).

No real vLLM runs here (it needs a CUDA GPU). What is checked is our side: the image embeddings
handed to the engine are the transformers path's own image features on identically noised pixels
(to the bit), the prompts are llava-hf's with one unexpanded `<image>`, the sampling parameters
carry the settings and the keyed seeds, answers come back in request order, and records, pairs
and meta match the transformers backend's. The stand-in answers by running the tiny LLaVA on what
it was handed, so greedy answers equal across backends prove the prompts and embeddings right.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import fake_vllm
import numpy as np
import pytest
import torch
import yaml
from bootstrap_helpers import mixed_requests
from jsonargparse import ArgumentParser

from bpo.bootstrap import GenerateConfig, generate_answers, generate_with_config
from bpo.bootstrap.generate import VllmConfig
from bpo.bootstrap.run import BootstrapConfig, InjectMethod, WeakenMethod, run_bootstrap
from bpo.bootstrap.vllm_backend import (
    VllmGenerator,
    VllmUnavailableError,
    engine_kwargs,
    image_features,
    make_engine,
)
from bpo.bootstrap.weaken import WeakenConfig, noise_pixels, stream_seed, weakened_answers
from bpo.data import ConfigMismatchError, read_bad_records, read_llava, read_manifest, read_pairs
from bpo.models import build_prompt
from bpo.models.load import ModelConfig
from bpo.shapeworld.export import write_llava_dataset
from bpo.shapeworld.world import WorldConfig, sample_scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "bootstrap"


@pytest.fixture
def vllm_module(monkeypatch):
    return fake_vllm.install(monkeypatch)


def model_config(folder) -> ModelConfig:
    return ModelConfig(str(folder), dtype="float32", device="cpu", attn_implementation="eager")


@pytest.fixture
def generator(vllm_module, loaded, tiny_llava_folder):
    """A VllmGenerator over the stand-in engine, with the loaded tiny LLaVA as its encoder."""
    model, processor = loaded
    engine = make_engine(model_config(tiny_llava_folder), VllmConfig())
    return VllmGenerator(engine, processor, model, batch_size=4)


def image_requests():
    return mixed_requests()[:3]


def projector_outputs(model, run):
    """The multi-modal projector's outputs, (rows, tokens, hidden) each, during `run()`."""
    seen = []
    hook = model.model.multi_modal_projector.register_forward_hook(
        lambda _module, _inputs, output: seen.append(output.detach().clone())
    )
    try:
        run()
    finally:
        hook.remove()
    return seen


def test_embeddings_are_the_transformers_paths_image_features_on_the_same_noise(generator, loaded):
    """The features LLaVA's own forward computes inside `weakened_answers` (caught at the
    projector, one request and sample per generate call) equal, bit for bit, the embeddings the
    engine was handed for that (request, sample); the encoder batches 4 rows, the forward 1.
    They are not the clean image's features, and two samples of a request differ (their noise)."""
    model, processor = loaded
    config = WeakenConfig(max_new_tokens=2, samples_per_prompt=2, seed=3)
    asked = image_requests()
    generator.weakened(asked, config, indices=[10, 11, 12])
    prompts, _ = generator.engine.calls[0]
    handed = [p["multi_modal_data"]["image"] for p in prompts]  # rows (0,0), (0,1), (1,0), ...
    assert len(handed) == 6
    for i, request in enumerate(asked):
        seen = projector_outputs(
            model,
            lambda request=request, i=i: weakened_answers(
                model, processor, [request], config, batch_size=1, indices=[10 + i]
            ),
        )
        assert len(seen) == 2  # the prefill of each sample: later steps reuse the cache
        for j in range(2):
            assert handed[2 * i + j].shape == (1, 16, 64)  # (1, image tokens, LM hidden)
            assert torch.equal(handed[2 * i + j], seen[j])
        assert not torch.equal(handed[2 * i], handed[2 * i + 1])
    clean = processor(text=["<image>"], images=[asked[0].image], return_tensors="pt")
    noised = noise_pixels(clean["pixel_values"], config, 10, 0)
    assert torch.equal(handed[0], image_features(model, noised))
    assert (handed[0] - image_features(model, clean["pixel_values"])).abs().max() > 1e-2


def test_prompts_and_sampling_params_are_what_vllm_expects(generator, loaded):
    """llava-hf's prompt with one `<image>` (vLLM expands it), one SamplingParams per sample with
    the config's temperature, top_p and max tokens and the seed keyed by (seed, global index,
    sample). Split into two calls, the requests are handed over exactly as in one call."""
    _, processor = loaded
    config = WeakenConfig(
        temperature=0.7, top_p=0.9, max_new_tokens=5, samples_per_prompt=2, seed=4
    )
    asked = image_requests()
    generator.weakened(asked, config, indices=[40, 41, 42])
    prompts, params = generator.engine.calls[0]
    assert prompts[0]["prompt"] == "USER: <image>\nDescribe the image. ASSISTANT:"
    for k, prompt in enumerate(prompts):
        assert prompt["prompt"] == build_prompt(processor, asked[k // 2].messages)
        assert prompt["prompt"].count("<image>") == 1
    assert [(p.n, p.temperature, p.top_p, p.max_tokens) for p in params] == [(1, 0.7, 0.9, 5)] * 6
    assert [p.seed for p in params] == [
        stream_seed(4, i, j, "sample") for i in (40, 41, 42) for j in (0, 1)
    ]
    generator.weakened(asked[:1], config, indices=[40])
    generator.weakened(asked[1:], config, indices=[41, 42])
    split = [generator.engine.calls[1], generator.engine.calls[2]]
    again = [p for call, _ in split for p in call]
    assert [p["prompt"] for p in again] == [p["prompt"] for p in prompts]
    assert all(
        torch.equal(a["multi_modal_data"]["image"], b["multi_modal_data"]["image"])
        for a, b in zip(again, prompts, strict=True)
    )
    assert [p for _, ps in split for p in ps] == params


def test_greedy_weakened_answers_equal_the_transformers_backends(generator, loaded):
    """At temperature 0 the stand-in, running the tiny LLaVA on the handed prompt + embeddings,
    answers what `weakened_answers` answers: same token ids, text and meta, in request order
    (the three requests' answers differ, so a shuffled order could not pass)."""
    model, processor = loaded
    config = WeakenConfig(temperature=0.0, max_new_tokens=6, seed=2)
    asked = image_requests()
    ours = generator.weakened(asked, config, indices=[5, 6, 7])
    theirs = weakened_answers(model, processor, asked, config, batch_size=2, indices=[5, 6, 7])
    as_records = [[(a.text, a.token_ids, a.meta) for a in row] for row in ours]
    assert as_records == [[(a.text, a.token_ids, a.meta) for a in row] for row in theirs]
    assert len({tuple(row[0].token_ids) for row in ours}) == 3
    assert ours[1][0].meta["request_index"] == 6 and ours[1][0].logits is None


def test_sampled_answers_are_keyed_and_in_request_order(generator):
    """At temperature 1, each (request, sample) answered alone (its own call, its global index)
    gets what it got in one call of six rows: the answers are mapped back to the right row."""
    config = WeakenConfig(temperature=1.0, max_new_tokens=6, samples_per_prompt=2, seed=9)
    asked = image_requests()
    together = generator.weakened(asked, config)
    alone = [generator.weakened([r], config, indices=[i])[0] for i, r in enumerate(asked)]
    ids = [[a.token_ids for a in row] for row in together]
    assert ids == [[a.token_ids for a in row] for row in alone]
    assert len({tuple(t) for row in ids for t in row}) >= 5


def test_clean_answers_through_the_config_front_end(generator, loaded):
    """`generate_with_config` with backend "vllm": PIL images go over as they are (and a request
    without an image as text alone); greedy answers equal the transformers backend's."""
    model, processor = loaded
    asked = mixed_requests()
    config = GenerateConfig(backend="vllm", max_new_tokens=6)
    ours = generate_with_config(generator, None, asked, config)
    assert ours == generate_answers(model, processor, asked, batch_size=2, max_new_tokens=6)
    prompts, params = generator.engine.calls[0]
    assert prompts[3] == {"prompt": build_prompt(processor, asked[3].messages, has_image=False)}
    assert prompts[0]["multi_modal_data"]["image"] is asked[0].image
    assert {(p.temperature, p.top_p, p.seed, p.max_tokens) for p in params} == {(0.0, 1.0, None, 6)}
    sampled = replace(config, do_sample=True, temperature=0.8, seed=1)
    generate_with_config(generator, None, asked, sampled)
    assert [p.seed for p in generator.engine.calls[1][1]] == [
        stream_seed(1, k, 0, "sample") for k in range(5)
    ]
    with pytest.raises(TypeError, match="VllmGenerator"):
        generate_with_config(model, processor, asked, config)


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
        "max_model_len": 2048,
    }
    config = ModelConfig("llava-hf/llava-1.5-7b-hf", dtype="bf16")
    both = engine_kwargs(config, VllmConfig(dtype="float16", extra={"seed": 3}))
    assert (both["dtype"], both["seed"], "max_model_len" in both) == ("float16", 3, False)


def test_missing_vllm_fails_at_config_time(monkeypatch, tmp_path, loaded):
    """Backend "vllm" without vllm: a clear error before the store is opened or a model loaded."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    config = BootstrapConfig(
        model=ModelConfig("llava-hf/llava-1.5-7b-hf"),
        data=str(tmp_path / "missing.json"),
        out=str(tmp_path / "out"),
        backend="vllm",
    )
    with pytest.raises(VllmUnavailableError, match=r"pip install 'bpo\[vllm\]'"):
        run_bootstrap(config, progress=False)
    assert not (tmp_path / "out").exists()
    model, processor = loaded
    with pytest.raises(VllmUnavailableError, match="backend: transformers"):
        generate_with_config(model, processor, [], GenerateConfig(backend="vllm"))


# --- `bpo bootstrap` with backend "vllm" --------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    world, rng = WorldConfig(), np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("sw")
    return write_llava_dataset([sample_scene(rng, world) for _ in range(4)], world, folder)


def bootstrap_config(folder, data: Path, out: Path, backend: str) -> BootstrapConfig:
    return BootstrapConfig(
        model=model_config(folder),
        data=str(data),
        out=str(out),
        weaken=WeakenMethod(max_new_tokens=6, temperature=0.0, seed=3),
        inject=InjectMethod(kind="self", mode="qa", max_new_tokens=4, temperature=0.0, max_ratio=9),
        batch_size=4,
        chunk_size=4,
        backend=backend,  # type: ignore[arg-type]
        vllm=VllmConfig(max_model_len=256),
    )


def pairs_and_rejects(out: Path) -> tuple[list[dict], list[str]]:
    pairs = sorted((p.to_json() for p in read_pairs(out)), key=lambda r: (r["id"], r["source"]))
    return pairs, sorted(b.key for b in read_bad_records(out))


def test_bootstrap_with_vllm_makes_the_transformers_backends_pairs(
    vllm_module, tmp_path, tiny_llava_folder, data, loaded
):
    """Greedy weakened negatives and "self" rewrites through the stand-in engine, the model
    loaded from the config (only its encoder half used): the same pairs, meta and rejects as the
    transformers backend. The store records the backend and refuses to resume with the other."""
    ours = bootstrap_config(tiny_llava_folder, data, tmp_path / "vllm", "vllm")
    manifest = run_bootstrap(ours, progress=False)
    theirs = replace(ours, out=str(tmp_path / "hf"), backend="transformers")
    run_bootstrap(theirs, model_and_processor=loaded, progress=False)
    assert pairs_and_rejects(tmp_path / "vllm") == pairs_and_rejects(tmp_path / "hf")
    pairs = list(read_pairs(tmp_path / "vllm"))
    assert {p.source for p in pairs} == {"weaken", "inject"}
    assert manifest["config"]["backend"] == "vllm"
    assert manifest["config"]["vllm"]["max_model_len"] == 256
    assert "gpu_memory_utilization" not in manifest["config"]["vllm"]
    assert "backend" not in read_manifest(tmp_path / "hf")["config"]
    (engine,) = fake_vllm.FakeLLM.instances
    assert engine.kwargs["max_model_len"] == 256
    weakened = [p for prompts, _ in engine.calls for p in prompts if "multi_modal_data" in p]
    assert len(weakened) == sum(p.source == "weaken" for p in pairs) + sum(
        "_weaken_" in b for b in pairs_and_rejects(tmp_path / "vllm")[1]
    )
    # "self" rewrites: text-only token-id prompts (no second BOS), keyed by global index.
    rewrites = [
        (p, s)
        for prompts, ps in engine.calls
        for p, s in zip(prompts, ps, strict=True)
        if "prompt_token_ids" in p
    ]
    samples = len(list(read_llava(data)))
    assert len(rewrites) == samples
    assert [s.seed for _, s in rewrites] == [stream_seed(0, k, 0, "inject") for k in range(samples)]
    with pytest.raises(ConfigMismatchError, match="backend"):
        run_bootstrap(replace(ours, backend="transformers"), model_and_processor=loaded)


def test_shipped_vllm_config_parses(tmp_path):
    path = CONFIGS / "llava-1.5-7b-vllm.yaml"
    parser = ArgumentParser()
    parser.add_argument("--run", type=BootstrapConfig)
    run = parser.instantiate(parser.parse_path(str(path))).run
    assert run.backend == "vllm"
    assert run.vllm == VllmConfig(
        tensor_parallel_size=1, gpu_memory_utilization=0.85, max_model_len=4096
    )
    plain = yaml.safe_load((CONFIGS / "llava-1.5-7b.yaml").read_text())["run"]
    ours = yaml.safe_load(path.read_text())["run"]
    assert {k: v for k, v in ours.items() if k not in ("backend", "vllm", "out")} == {
        k: v for k, v in plain.items() if k != "out"
    }
    assert json.loads(json.dumps(engine_kwargs(run.model, run.vllm)))["dtype"] == "bfloat16"
