"""Weakened negatives and `bpo bootstrap` through the vLLM backend, with a stand-in engine.

No real vLLM runs here (it needs a CUDA GPU). What is checked is our side: the image embeddings
handed to the engine are the transformers path's own image features on identically noised pixels
(to the bit), the prompts are llava-hf's with one unexpanded `<image>`, the sampling parameters
carry the settings and the keyed seeds, answers come back in request order, and records, pairs
and meta match the transformers backend's. The stand-in answers by running the tiny LLaVA on what
it was handed, so greedy answers equal across backends prove the prompts and embeddings right.
(The backend alone, clean images and rendered prompts: tests/generate/test_vllm_backend.py.)
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

import fake_vllm
from bpo.bootstrap.config import BootstrapConfig, InjectConfig, WeakenConfig
from bpo.bootstrap.run import run_bootstrap
from bpo.bootstrap.weaken import noise_pixels, weakened_answers
from bpo.data import ConfigMismatchError, read_bad_records, read_llava, read_manifest, read_pairs
from bpo.generate import TransformersGenerator, VllmConfig, VllmGenerator, stream_seed
from bpo.generate.config import VllmUnavailableError
from bpo.generate.sampling import eos_ids
from bpo.generate.vllm_backend import engine_kwargs, make_engine
from bpo.models import build_prompt
from bpo.models.load import ModelConfig
from bpo.models.vision import image_features
from bpo.shapeworld.export import write_llava_dataset
from bpo.shapeworld.world import WorldConfig, sample_scene
from generation_helpers import mixed_requests

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "bootstrap"


@pytest.fixture
def vllm_module(monkeypatch):
    return fake_vllm.install(monkeypatch)


def model_config(folder) -> ModelConfig:
    return ModelConfig(str(folder), dtype="float32", device="cpu", attn_implementation="eager")


@pytest.fixture
def generator(vllm_module, loaded, tiny_llava_folder):
    """A VllmGenerator over the stand-in engine; the loaded tiny LLaVA encodes noised images."""
    model, processor = loaded
    engine = make_engine(model_config(tiny_llava_folder), VllmConfig())
    return VllmGenerator(engine, processor, eos_ids(model, processor.tokenizer))


def through_vllm(generator, loaded, requests, config, indices=None):
    """`weakened_answers` through the vLLM route, the encoder batching 4 images."""
    return weakened_answers(generator, requests, config, indices, encoder=loaded[0], batch_size=4)


def through_transformers(loaded, requests, config, indices=None, batch_size=2):
    return weakened_answers(TransformersGenerator(*loaded, batch_size), requests, config, indices)


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
    through_vllm(generator, loaded, asked, config, indices=[10, 11, 12])
    prompts, _ = generator.engine.calls[0]
    handed = [p["multi_modal_data"]["image"] for p in prompts]  # rows (0,0), (0,1), (1,0), ...
    assert len(handed) == 6
    for i, request in enumerate(asked):
        seen = projector_outputs(
            model,
            lambda request=request, i=i: through_transformers(
                loaded, [request], config, indices=[10 + i], batch_size=1
            ),
        )
        assert len(seen) == 2  # the prefill of each sample: later steps reuse the cache
        for j in range(2):
            assert handed[2 * i + j].shape == (1, 16, 64)  # (1, image tokens, LM hidden)
            assert torch.equal(handed[2 * i + j], seen[j])
        assert not torch.equal(handed[2 * i], handed[2 * i + 1])
    clean = processor(text=["<image>"], images=[asked[0].image], return_tensors="pt")
    noised = noise_pixels(clean["pixel_values"], 900, config, 10, 0)
    assert torch.equal(handed[0], image_features(model, {"pixel_values": noised}))
    assert (
        handed[0] - image_features(model, {"pixel_values": clean["pixel_values"]})
    ).abs().max() > 1e-2


def test_prompts_and_sampling_params_are_what_vllm_expects(generator, loaded):
    """llava-hf's prompt with one `<image>` (vLLM expands it), one SamplingParams per sample with
    the config's temperature, top_p and max tokens and the seed keyed by (seed, global index,
    sample). Split into two calls, the requests are handed over exactly as in one call."""
    _, processor = loaded
    config = WeakenConfig(
        temperature=0.7, top_p=0.9, max_new_tokens=5, samples_per_prompt=2, seed=4
    )
    asked = image_requests()
    through_vllm(generator, loaded, asked, config, indices=[40, 41, 42])
    prompts, params = generator.engine.calls[0]
    assert prompts[0]["prompt"] == "USER: <image>\nDescribe the image. ASSISTANT:"
    for k, prompt in enumerate(prompts):
        assert prompt["prompt"] == build_prompt(processor, asked[k // 2].messages)
        assert prompt["prompt"].count("<image>") == 1
    assert [(p.n, p.temperature, p.top_p, p.max_tokens) for p in params] == [(1, 0.7, 0.9, 5)] * 6
    assert [p.seed for p in params] == [
        stream_seed(4, i, j, "sample") for i in (40, 41, 42) for j in (0, 1)
    ]
    through_vllm(generator, loaded, asked[:1], config, indices=[40])
    through_vllm(generator, loaded, asked[1:], config, indices=[41, 42])
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
    config = WeakenConfig(temperature=0.0, max_new_tokens=6, seed=2)
    asked = image_requests()
    ours = through_vllm(generator, loaded, asked, config, indices=[5, 6, 7])
    theirs = through_transformers(loaded, asked, config, indices=[5, 6, 7])
    as_records = [[(a.text, a.token_ids, a.meta) for a in row] for row in ours]
    assert as_records == [[(a.text, a.token_ids, a.meta) for a in row] for row in theirs]
    assert len({tuple(row[0].token_ids) for row in ours}) == 3
    assert ours[1][0].meta["request_index"] == 6 and ours[1][0].logits is None


def test_sampled_answers_are_keyed_and_in_request_order(generator, loaded):
    """At temperature 1, each (request, sample) answered alone (its own call, its global index)
    gets what it got in one call of six rows: the answers are mapped back to the right row."""
    config = WeakenConfig(temperature=1.0, max_new_tokens=6, samples_per_prompt=2, seed=9)
    asked = image_requests()
    together = through_vllm(generator, loaded, asked, config)
    alone = [through_vllm(generator, loaded, [r], config, [i])[0] for i, r in enumerate(asked)]
    ids = [[a.token_ids for a in row] for row in together]
    assert ids == [[a.token_ids for a in row] for row in alone]
    assert len({tuple(t) for row in ids for t in row}) >= 5


def test_each_noise_step_is_encoded_from_its_own_noise(generator, loaded):
    """noise_steps [500, 900] x 2 samples: the embeddings of sample k are the features of the
    pixels noised at its own step with its own key (`noise_pixels(clean, step_k, ..., k)`),
    and the engine's greedy answers equal the transformers backend's, meta included."""
    model, processor = loaded
    config = WeakenConfig(
        noise_steps=[500, 900], samples_per_prompt=2, temperature=0.0, max_new_tokens=4, seed=6
    )
    asked = image_requests()[:2]
    ours = through_vllm(generator, loaded, asked, config, indices=[3, 4])
    prompts, _ = generator.engine.calls[0]
    handed = [p["multi_modal_data"]["image"] for p in prompts]  # (request, sample) rows
    assert len(handed) == 8
    for i, request in enumerate(asked):
        prompt = build_prompt(processor, request.messages)
        clean = processor(text=[prompt], images=[request.image], return_tensors="pt")
        for k, step in enumerate([500, 500, 900, 900]):
            noised = noise_pixels(clean["pixel_values"], step, config, 3 + i, k)
            assert torch.equal(handed[4 * i + k], image_features(model, {"pixel_values": noised}))
    theirs = through_transformers(loaded, asked, config, indices=[3, 4])
    as_records = [[(a.text, a.token_ids, a.meta) for a in row] for row in ours]
    assert as_records == [[(a.text, a.token_ids, a.meta) for a in row] for row in theirs]
    assert [a.meta["noise_step"] for a in ours[1]] == [500, 500, 900, 900]


def test_missing_vllm_fails_at_config_time(monkeypatch, tmp_path):
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
        weaken=WeakenConfig(max_new_tokens=6, temperature=0.0, seed=3),
        inject=InjectConfig(kind="self", mode="qa", max_new_tokens=4, temperature=0.0, max_ratio=9),
        batch_size=4,
        chunk_size=4,
        backend=backend,  # type: ignore[arg-type]
        vllm=VllmConfig(max_model_len=256),
    )


def rewrite_calls(engine) -> list[tuple[dict, object]]:
    """(prompt, sampling params) of every text-only prompt the engine was handed, in order."""
    return [
        (p, s)
        for prompts, ps in engine.calls
        for p, s in zip(prompts, ps, strict=True)
        if "prompt_token_ids" in p
    ]


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
    # "self" rewrites: text-only token-id prompts (no second BOS), one per sample, greedy.
    bos = loaded[1].tokenizer.bos_token_id
    samples = len(list(read_llava(data)))
    rewrites = rewrite_calls(engine)
    assert len(rewrites) == samples
    assert all(p["prompt_token_ids"][:2] != [bos, bos] for p, _ in rewrites)
    assert {(s.temperature, s.seed) for _, s in rewrites} == {(0.0, None)}
    with pytest.raises(ConfigMismatchError, match="backend"):
        run_bootstrap(replace(ours, backend="transformers"), model_and_processor=loaded)
    # Sampled, each rewrite is keyed by its sample's global index.
    sampled = replace(ours.inject, temperature=0.7, seed=5)
    run_bootstrap(
        replace(ours, out=str(tmp_path / "sampled"), weaken=None, inject=sampled), progress=False
    )
    rewrites = rewrite_calls(fake_vllm.FakeLLM.instances[-1])
    assert [s.seed for _, s in rewrites] == [stream_seed(5, k, 0, "inject") for k in range(samples)]
    assert {(s.temperature, s.top_p) for _, s in rewrites} == {(0.7, 0.9)}


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
