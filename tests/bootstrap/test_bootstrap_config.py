"""The `bpo bootstrap` schema: every bad setting refused up front, what the store records, the
shipped configs."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

import fake_vllm
from bpo.bootstrap.config import (
    BootstrapConfig,
    InjectConfig,
    WeakenConfig,
    check_config,
    store_config,
    weaken_steps,
)
from bpo.bootstrap.run import run_bootstrap
from bpo.endpoint import EndpointConfig
from bpo.generate import VllmConfig
from bpo.generate.config import VllmUnavailableError
from bpo.models.load import ModelConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "bootstrap"


def config_in(folder: Path, **changes) -> BootstrapConfig:
    """A config whose model folder and data file do not exist."""
    config = BootstrapConfig(
        model=ModelConfig(str(folder / "no-such-model"), device="cpu"),
        data=str(folder / "no-such-data.json"),
        out=str(folder / "out"),
    )
    return replace(config, **changes)


def weaken(**changes) -> WeakenConfig:
    return replace(WeakenConfig(), **changes)


def inject(**changes) -> InjectConfig:
    return replace(InjectConfig(), **changes)


BAD = [
    ({"weaken": weaken(noise_steps=[])}, r"weaken\.noise_steps is empty"),
    (
        {"weaken": weaken(noise_steps=[300, 300])},
        r"weaken\.noise_steps repeats a step: \[300, 300\]",
    ),
    ({"weaken": weaken(noise_steps=[1000])}, r"noise step must be an integer in \[0, 999\]"),
    ({"weaken": weaken(noise_steps=[900.0])}, r"weaken\.noise_steps holds 900\.0"),
    ({"weaken": weaken(noise_steps=[True])}, r"weaken\.noise_steps holds True"),
    ({"weaken": weaken(schedule="cosine")}, r"weaken\.schedule 'cosine' is unknown"),
    ({"weaken": weaken(temperature=-1.0)}, r"weaken\.temperature must be >= 0"),
    ({"weaken": weaken(top_p=1.5)}, r"weaken\.top_p must be in \(0, 1\]"),
    ({"weaken": weaken(samples_per_prompt=0)}, r"weaken\.samples_per_prompt must be at least 1"),
    ({"weaken": weaken(max_new_tokens=0)}, r"weaken\.max_new_tokens must be at least 1"),
    ({"weaken": weaken(max_length_ratio=0.0)}, r"must be > 0 or null"),
    ({"weaken": weaken(min_length_ratio=-1.0)}, r"must be > 0 or null"),
    (
        {"weaken": weaken(min_length_ratio=2.0, max_length_ratio=1.5)},
        r"weaken\.min_length_ratio 2\.0 is above max_length_ratio 1\.5",
    ),
    ({"inject": inject(kind="local")}, r"inject\.kind 'local' needs inject\.model"),
    ({"inject": inject(edit_types=["recolour"])}, r"inject\.edit_types \['recolour'\]"),
    ({"inject": inject(edit_types=[])}, r"must be a non-empty list"),
    ({"inject": inject(num_edits=0)}, r"inject\.num_edits must be at least 1"),
    ({"inject": inject(min_ratio=3.0)}, r"min_ratio \(3\.0\) and max_ratio \(2\.0\)"),
    ({"inject": inject(temperature=-0.1)}, r"inject needs temperature >= 0"),
    ({"inject": inject(max_new_tokens=0)}, r"inject\.max_new_tokens must be at least 1"),
    ({"weaken": None, "inject": None}, r"both methods are off \(weaken: null, inject: null\)"),
    ({"num_shards": 2, "shard_index": 2}, r"shard_index must be in \[0, num_shards\)"),
    ({"batch_size": 0}, r"batch_size must be at least 1"),
    ({"chunk_size": 0}, r"chunk_size must be at least 1"),
    ({"limit": -1}, r"limit must be at least 1 or null, got -1"),
    ({"limit": 0}, r"limit must be at least 1 or null, got 0"),  # an empty store, "complete"
    ({"model": ModelConfig("m", dtype="fp33")}, r"model\.dtype: unknown dtype 'fp33'"),
    ({"backend": "tgi"}, r"unknown generation backend 'tgi'"),
]


@pytest.mark.parametrize(("changes", "message"), BAD, ids=[m for _, m in BAD])
def test_a_bad_setting_is_refused_before_the_store_opens_or_a_model_loads(
    tmp_path, changes, message
):
    """The model folder and the data file do not exist: the config error must come first, and
    nothing is written."""
    with pytest.raises(ValueError, match=message):
        run_bootstrap(config_in(tmp_path, **changes), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_stand_in_engine_still_needs_vllm(tmp_path, monkeypatch, tiny_llava_folder):
    """An engine factory does not lift the vllm check (its SamplingParams carry the settings):
    without vllm the run stops before the store opens and before the factory is called."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    made = []
    config = config_in(tmp_path, backend="vllm")
    with pytest.raises(VllmUnavailableError, match=r"pip install 'bpo\[vllm\]'"):
        run_bootstrap(config, progress=False, engine_factory=lambda *a: made.append(a))
    assert made == [] and not (tmp_path / "out").exists()


def test_a_valid_config_gets_as_far_as_the_model(tmp_path):
    """The control: with every setting valid, the same missing model folder is what fails."""
    with pytest.raises(FileNotFoundError, match="no-such-model' not found"):
        run_bootstrap(config_in(tmp_path), progress=False)


def test_sample_indices_run_over_steps_then_samples():
    """noise_steps [100, 500, 900] x 2 samples: sample index k has step [t0, t0, t1, t1, t2, t2][k]."""
    steps = weaken_steps(WeakenConfig(noise_steps=[100, 500, 900], samples_per_prompt=2))
    assert steps == [100, 100, 500, 500, 900, 900]
    assert weaken_steps(WeakenConfig()) == [900]


def test_the_store_records_what_changes_the_pairs(tmp_path):
    """Everything but the output settings; the endpoint only for an endpoint rewriter; the
    backend only when it is vLLM (less the engine's memory share); a null method as null."""
    config = config_in(tmp_path, inject=inject(kind="lexical"), chunk_size=7, shard_size=3)
    recorded = store_config(config)
    assert recorded["stage"] == "bootstrap"
    assert not {"out", "chunk_size", "shard_size", "backend", "vllm"} & set(recorded)
    assert "endpoint" not in recorded["inject"] and recorded["inject"]["kind"] == "lexical"
    assert recorded["weaken"]["noise_steps"] == [900]
    assert recorded["weaken"]["max_length_ratio"] is None
    endpoint = inject(kind="endpoint", endpoint=EndpointConfig(model="m-1"))
    assert store_config(replace(config, inject=endpoint))["inject"]["endpoint"]["model"] == "m-1"
    vllm = store_config(replace(config, backend="vllm", vllm=VllmConfig(max_model_len=256)))
    assert vllm["backend"] == "vllm" and vllm["vllm"]["max_model_len"] == 256
    assert "gpu_memory_utilization" not in vllm["vllm"]
    assert store_config(replace(config, weaken=None))["weaken"] is None
    check_config(config)


def parse_run(path: Path) -> BootstrapConfig:
    parser = ArgumentParser()
    parser.add_argument("--run", type=BootstrapConfig)
    return parser.instantiate(parser.parse_path(str(path))).run


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path, monkeypatch):
    run = parse_run(path)
    assert set(yaml.safe_load(path.read_text())) == {"run"}
    assert run.weaken.noise_steps == [900] and run.weaken.schedule == "sigmoid"
    fake_vllm.install(monkeypatch)  # the vLLM config's backend check imports vllm
    check_config(run)  # every setting valid
    if "llava" in path.name:
        assert (run.inject.kind, run.weaken.temperature) == ("self", 1.0)
        assert (run.weaken.min_length_ratio, run.weaken.max_length_ratio) == (None, None)
    else:
        # [1/2, 2]: the two-sided bound this config's old top-level `max_length_ratio: 2.0` meant
        assert (run.weaken.min_length_ratio, run.weaken.max_length_ratio) == (0.5, 2.0)
        assert (run.inject.kind, run.inject.vocabulary) == ("lexical", "shapeworld")


def test_null_sections_parse_as_no_method(tmp_path):
    """`weaken: null` and `inject: null` in YAML turn the method off."""
    path = CONFIGS / "shapeworld.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["run"]["inject"] = None
    off = tmp_path / "weaken-only.yaml"
    off.write_text(yaml.safe_dump(raw))
    run = parse_run(off)
    assert run.inject is None and run.weaken.noise_steps == [900]
    raw["run"]["weaken"], raw["run"]["inject"] = None, {"kind": "lexical"}
    off.write_text(yaml.safe_dump(raw))
    run = parse_run(off)
    assert run.weaken is None and run.inject == InjectConfig(kind="lexical")


def test_an_endpoint_rewriter_without_its_key_and_unknown_choices_stop_before_any_model(
    tmp_path, monkeypatch
):
    """The endpoint's key is read from the environment at the config check (the model folder
    does not exist, so any later failure would name it instead); a typo in a choice field set
    from Python (where no parser checks the Literal) is named with the choices."""
    from bpo.endpoint import EndpointError

    monkeypatch.delenv("BPO_TEST_REWRITER_KEY", raising=False)
    endpoint = EndpointConfig(api_key_env="BPO_TEST_REWRITER_KEY")
    config = config_in(tmp_path, inject=inject(kind="endpoint", endpoint=endpoint))
    with pytest.raises(EndpointError, match=r"BPO_TEST_REWRITER_KEY is not set.*inject\.endpoint"):
        check_config(config)
    monkeypatch.setenv("BPO_TEST_REWRITER_KEY", "sk-test")
    check_config(config)
    with pytest.raises(ValueError, match=r"inject\.kind 'lexcal' is unknown; use one of lexical"):
        check_config(config_in(tmp_path, inject=inject(kind="lexcal")))
    assert not (tmp_path / "out").exists()


def write_data(folder: Path, records: list) -> Path:
    """A LLaVA file of `records` beside an image folder holding one real PNG, a.png."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(folder / "images" / "a.png")
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


ONE_RECORD = {
    "id": "a",
    "image": "a.png",
    "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": "a red circle."},
    ],
}


def real_model_config(tmp_path: Path, tiny_llava_folder: Path, **changes) -> BootstrapConfig:
    """A config that passes the model family check (a real model folder) and reads real data."""
    config = BootstrapConfig(
        model=ModelConfig(str(tiny_llava_folder), dtype="float32", device="cpu"),
        data=str(write_data(tmp_path, [ONE_RECORD])),
        image_root=str(tmp_path / "images"),
        out=str(tmp_path / "out"),
        inject=InjectConfig(kind="lexical", vocabulary="shapeworld"),
    )
    return replace(config, **changes)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"dtype": "float33"}, r"model\.dtype: unknown dtype 'float33'; use 'auto' or one of"),
        ({"device": "gpu"}, r"model\.device 'gpu' is not a device"),
        pytest.param(
            {"device": "cuda"},
            r"model\.device 'cuda' but torch sees no CUDA device",
            marks=pytest.mark.skipif(
                __import__("torch").cuda.is_available(), reason="a CUDA device is here"
            ),
        ),
    ],
)
def test_model_settings_are_refused_before_the_store_records_them(
    tmp_path, tiny_llava_folder, model, message
):
    """A dtype or device the loader would refuse used to fail after the store was created with
    it recorded, so the corrected rerun was refused as a config mismatch."""
    config = real_model_config(tmp_path, tiny_llava_folder)
    config = replace(config, model=replace(config.model, **model))
    with pytest.raises(ValueError, match=message):
        run_bootstrap(config, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"data": "no-data.json"}, FileNotFoundError, r"LLaVA data file no-data\.json not found"),
        ({"image_root": "no-images"}, FileNotFoundError, r"--image-root no-images is not a dir"),
    ],
)
def test_missing_data_is_refused_before_the_store_opens(
    tmp_path, tiny_llava_folder, changes, error, message
):
    """Without a progress bar the data file was first read after the store was created and the
    model loaded; the image root was first checked there in every run."""
    config = real_model_config(tmp_path, tiny_llava_folder, **changes)
    with pytest.raises(error, match=message):
        run_bootstrap(config, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([], r"data\.json holds no samples to bootstrap from; check the file"),
        (
            [{"id": "a", "conversations": []}],
            r"data\.json has no usable sample: all 1 records are bad, e\.g\. .*record 1 \(id=a\): "
            r"no turns",
        ),
    ],
)
@pytest.mark.parametrize("progress", [False, True])
def test_a_dataset_with_no_usable_samples_is_refused(
    tmp_path, tiny_llava_folder, records, message, progress
):
    """An empty (or all-bad) file used to give a `complete` store of 0 pairs."""
    config = real_model_config(tmp_path, tiny_llava_folder)
    write_data(tmp_path, records)
    with pytest.raises(ValueError, match=message):
        run_bootstrap(config, progress=progress)
    assert not (tmp_path / "out").exists()


def test_a_shard_without_samples_of_a_file_with_some_still_runs(tmp_path, tiny_llava_folder):
    """1 sample, 2 shards: shard 1 makes an empty, complete store, which the merge of all the
    shards needs (it refuses a set with a shard missing)."""
    from bpo.data import read_manifest

    config = real_model_config(tmp_path, tiny_llava_folder, num_shards=2, shard_index=1)
    run_bootstrap(config, progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["complete"] is True and manifest["counts"]["pairs"] == 0
