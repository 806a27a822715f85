"""`bpo bootstrap`: exact counts, resume after a real SIGKILL, shards, bad input, length filter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from jsonargparse import ArgumentParser

from bpo.bootstrap.inject import (
    InjectionVocabulary,
    LocalRewriter,
    causal_lm_from_mllm,
    inject_errors,
)
from bpo.bootstrap.run import (
    BootstrapConfig,
    InjectMethod,
    WeakenMethod,
    length_stats,
    merge_bootstrap_stores,
    run_bootstrap,
)
from bpo.bootstrap.weaken import stream_seed
from bpo.cli import main
from bpo.data import (
    ConfigMismatchError,
    read_bad_records,
    read_llava,
    read_manifest,
    read_pairs,
    remove_image_placeholder,
    split_records,
)
from bpo.models.load import ModelConfig, load_from_config
from bpo.shapeworld.export import write_llava_dataset
from bpo.shapeworld.world import WorldConfig, sample_scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "bootstrap"


def make_data(folder: Path, scenes: int) -> Path:
    world = WorldConfig()
    rng = np.random.default_rng(0)
    return write_llava_dataset([sample_scene(rng, world) for _ in range(scenes)], world, folder)


def to_jsonl(path: Path) -> Path:
    """data.json rewritten as JSON Lines, so a malformed line can be planted mid-file."""
    out = path.with_name("data.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in json.loads(path.read_text())))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return to_jsonl(make_data(tmp_path_factory.mktemp("sw"), 12))


def config_for(model_dir: Path, data: Path, out: Path, **changes) -> BootstrapConfig:
    config = BootstrapConfig(
        model=ModelConfig(
            str(model_dir), dtype="float32", device="cpu", attn_implementation="eager"
        ),
        data=str(data),
        out=str(out),
        weaken=WeakenMethod(max_new_tokens=8, temperature=1.0, seed=3),
        inject=InjectMethod(kind="lexical", vocabulary="shapeworld", seed=5),
        batch_size=4,
        chunk_size=4,
    )
    return replace(config, **changes)


@pytest.fixture(scope="module")
def loaded(tiny_llava_folder):
    config = config_for(tiny_llava_folder, Path("x"), Path("y"))
    return load_from_config(config.model)


def records(out: Path) -> list[dict]:
    return sorted((p.to_json() for p in read_pairs(out)), key=lambda r: (r["id"], r["source"]))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_llava_folder, data, loaded):
    out = tmp_path_factory.mktemp("full") / "pairs"
    config = config_for(tiny_llava_folder, data, out)
    return config, run_bootstrap(config, model_and_processor=loaded, progress=False)


def test_full_run_counts_every_sample_once_per_method(full_run, data):
    config, manifest = full_run
    samples, bad = split_records(read_llava(data))
    assert bad == [] and len(samples) > 12  # the scenes' questions add turns
    rejects = list(read_bad_records(config.out))
    pairs = list(read_pairs(config.out))
    for source in ("weaken", "inject"):
        made = [p for p in pairs if p.source == source]
        lost = [b for b in rejects if b.reason.startswith(f"rejected_{source}_")]
        assert len(made) + len(lost) == len(samples)
        assert manifest["counts"]["by_source"].get(source, 0) == len(made)
    # The lexical rewrites are exactly inject_errors keyed by (seed, global index).
    vocabulary = InjectionVocabulary.shapeworld()
    expected = {}
    for index, sample in enumerate(samples):
        result = inject_errors(sample.answer, vocabulary, seed=stream_seed(5, index, 0, "inject"))
        expected[sample.id] = result.text or f"rejected_inject_{result.reason}"
    got = {p.id: p.rejected for p in pairs if p.source == "inject"}
    got |= {b.id.rsplit(":", 2)[0]: b.reason for b in rejects if "_inject_" in b.reason}
    assert got == expected
    reasons = {}
    for b in rejects:
        reasons[b.reason] = reasons.get(b.reason, 0) + 1
    assert manifest["counts"]["other"] == reasons
    assert manifest["bad_records"]["by_reason"] == reasons
    assert manifest["complete"] is True
    # Token counts are the answers' scoring tokens; meta names the global index and sample.
    pair = next(p for p in pairs if p.source == "weaken")
    assert pair.meta["sample_index"] == 0 and pair.meta["noise_step"] == 900
    assert pair.meta["global_index"] == [s.id for s in samples].index(pair.id)
    assert manifest["stats"]["lengths"] == length_stats(pairs)
    assert manifest["stats"]["lengths"]["inject"]["pairs"] == len(got) - len(
        [b for b in rejects if "_inject_" in b.reason]
    )


def test_length_stats_by_hand():
    from bpo.data import PreferencePair

    def pair(c, r):
        return PreferencePair("x", None, [], "c", "r", "weaken", chosen_tokens=c, rejected_tokens=r)

    stats = length_stats([pair(10, 5), pair(10, 10), pair(10, 20), pair(4, 8)])
    assert stats["weaken"]["pairs"] == 4
    assert stats["weaken"]["rejected_tokens"] == {"mean": 10.75, "p50": 8, "p90": 20, "max": 20}
    assert stats["weaken"]["ratio"] == {"mean": 1.375, "p50": 1.0, "p90": 2.0, "max": 2.0}


def write_yaml(config: BootstrapConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump({"run": json.loads(json.dumps(config, default=vars))}))
    return path


def test_three_shards_merged_equal_the_unsharded_run(full_run, tmp_path, loaded):
    """Shards 0 and 1 through the API, shard 2 and the merge through the CLI."""
    config, manifest = full_run
    shards = [tmp_path / f"shard{i}" for i in range(3)]
    for i in range(2):
        run_bootstrap(
            replace(config, out=str(shards[i]), num_shards=3, shard_index=i),
            model_and_processor=loaded,
            progress=False,
        )
    path = write_yaml(config, tmp_path / "run.yaml")
    flags = ["--out", str(shards[2]), "--num_shards", "3", "--shard_index", "2"]
    main(["bootstrap", "--config", str(path), *flags])
    assert read_manifest(shards[2])["config"]["shard_index"] == 2
    main(["merge", str(tmp_path / "merged"), *map(str, shards)])
    merged = read_manifest(tmp_path / "merged")
    assert records(tmp_path / "merged") == records(Path(config.out))
    keys = sorted(b.key for b in read_bad_records(tmp_path / "merged"))
    assert keys == sorted(b.key for b in read_bad_records(config.out))
    assert merged["counts"]["by_source"] == manifest["counts"]["by_source"]
    assert merged["counts"]["other"] == manifest["counts"]["other"]
    assert merged["stats"] == manifest["stats"]
    other = replace(config, weaken=replace(config.weaken, seed=4), out=str(tmp_path / "o"))
    run_bootstrap(other, model_and_processor=loaded, progress=False)
    with pytest.raises(ConfigMismatchError, match=r"weaken\.seed"):
        merge_bootstrap_stores([shards[0], tmp_path / "o"], tmp_path / "bad-merge")


def test_bad_image_and_bad_line_mid_run_are_reported_and_the_rest_made(
    tmp_path, tiny_llava_folder, data, loaded, full_run
):
    lines = data.read_text().splitlines(keepends=True)
    broken = tmp_path / "data.jsonl"
    lines.insert(5, '{"id": "oops", "conversations": [\n')  # line 6
    broken.write_text("".join(lines))
    images = tmp_path / "images"
    images.mkdir()
    for path in (data.parent / "images").iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    corrupt_id = json.loads(lines[8])["id"]  # line 9
    (images / f"{corrupt_id}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    config = config_for(tiny_llava_folder, broken, tmp_path / "out")
    manifest = run_bootstrap(config, model_and_processor=loaded, progress=False)
    bad = {b.reason: b for b in read_bad_records(config.out) if not b.reason.startswith("rej")}
    assert set(bad) == {"malformed_json", "corrupt_image"}
    assert (bad["malformed_json"].file, bad["malformed_json"].line) == (str(broken), 6)
    corrupt = bad["corrupt_image"]
    assert (corrupt.file, corrupt.line, corrupt.id) == (str(broken), 9, corrupt_id)
    assert f"line 9 (id={corrupt_id})" in corrupt.message
    assert manifest["bad_records"]["by_reason"]["corrupt_image"] == 1
    assert manifest["bad_records"]["by_reason"]["malformed_json"] == 1
    assert manifest["complete"] is True
    # Every other sample made the same pairs as the clean run (global indices shift by none: the
    # malformed line yields no sample, and the corrupt image's samples still count).
    clean = [r for r in records(Path(full_run[0].out)) if r["id"].split("#")[0] != corrupt_id]
    assert records(config.out) == clean


def test_length_filter_rejects_are_counted(tmp_path, tiny_llava_folder, data, loaded, full_run):
    config = config_for(tiny_llava_folder, data, tmp_path / "out", max_length_ratio=1.2)
    manifest = run_bootstrap(config, model_and_processor=loaded, progress=False)
    kept = list(read_pairs(config.out))
    assert all(1 / 1.2 <= p.rejected_tokens / p.chosen_tokens <= 1.2 for p in kept)
    unfiltered = list(read_pairs(full_run[0].out))
    dropped = [p for p in unfiltered if not 1 / 1.2 <= p.rejected_tokens / p.chosen_tokens <= 1.2]
    assert dropped, "the test data should have negatives outside the ratio"
    by_source = {s: sum(p.source == s for p in dropped) for s in ("weaken", "inject")}
    other = manifest["counts"]["other"]
    assert other.get("rejected_weaken_length_ratio", 0) == by_source["weaken"]
    assert other.get("rejected_inject_length_ratio", 0) == by_source["inject"]
    assert len(kept) + len(dropped) == len(unfiltered)


def test_self_injection_is_the_mllms_own_language_model(tmp_path, tiny_llava_folder, data, loaded):
    """kind "self": the pairs are LocalRewriter over causal_lm_from_mllm, validated the same way.

    Sampled at temperature 1 in chunks of 4: each sample's rewrite is keyed by its global index,
    so one rewrite_all over the whole file (batches of 4, other rows) gives the same texts."""
    inject = InjectMethod(
        kind="self", mode="qa", max_new_tokens=4, temperature=1.0, top_p=1.0, seed=8, max_ratio=9
    )
    config = config_for(
        tiny_llava_folder, data, tmp_path / "out", inject=inject, weaken=WeakenMethod(enabled=False)
    )
    run_bootstrap(config, model_and_processor=loaded, progress=False)
    model, processor = loaded
    rewriter = LocalRewriter(
        causal_lm_from_mllm(model),
        processor.tokenizer,
        max_new_tokens=4,
        temperature=1.0,
        top_p=1.0,
        chat_template=processor.tokenizer.chat_template or processor.chat_template,
        batch_size=3,
        max_ratio=9,
        seed=8,
    )
    samples, _ = split_records(read_llava(data))
    questions = [remove_image_placeholder(s.messages[-1]["content"]) for s in samples]
    results = rewriter.rewrite_all([s.answer for s in samples], "qa", questions)
    assert len({r.raw for r in results}) > len(results) // 2  # sampled: mostly different
    expected = {
        s.id: r.text or f"rejected_inject_{r.reason}" for s, r in zip(samples, results, strict=True)
    }
    got = {p.id: p.rejected for p in read_pairs(config.out)}
    got |= {b.id.rsplit(":", 2)[0]: b.reason for b in read_bad_records(config.out)}
    assert got == expected
    assert {p.meta["kind"] for p in read_pairs(config.out)} <= {"self"}


def test_resume_with_another_config_is_refused(tmp_path, tiny_llava_folder, data, loaded, full_run):
    config = full_run[0]
    changed = replace(config, weaken=replace(config.weaken, noise_step=500))
    with pytest.raises(ConfigMismatchError, match=r"weaken.noise_step: 900 \(stored\) vs 500"):
        run_bootstrap(changed, model_and_processor=loaded, progress=False)
    # Output-only settings may change: the same store resumes and has nothing left to do.
    same = replace(config, chunk_size=7)
    assert (
        run_bootstrap(same, model_and_processor=loaded, progress=False)["counts"]
        == (full_run[1]["counts"])
    )


def parse_run(path: Path) -> BootstrapConfig:
    parser = ArgumentParser()
    parser.add_argument("--run", type=BootstrapConfig)
    return parser.instantiate(parser.parse_path(str(path))).run


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    run = parse_run(path)
    assert set(yaml.safe_load(path.read_text())) == {"run"}
    assert run.weaken.noise_step == 900 and run.weaken.schedule == "sigmoid"
    if "llava" in path.name:
        assert (run.inject.kind, run.weaken.temperature) == ("self", 1.0)


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, tiny_llava_folder, loaded):
    data = to_jsonl(make_data(tmp_path / "sw", 30))
    out = tmp_path / "killed"
    config = config_for(tiny_llava_folder, data, out, chunk_size=2, batch_size=2)
    path = write_yaml(config, tmp_path / "run.yaml")
    command = [sys.executable, "-m", "bpo.cli", "bootstrap", "--config", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shard = out / "pairs-00000.jsonl"
    deadline = time.monotonic() + 60
    while not (shard.is_file() and shard.read_bytes().count(b"\n") >= 3):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no pairs within 60 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert read_manifest(out)["complete"] is False
    killed_at = shard.read_bytes().count(b"\n")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reference = replace(config, out=str(tmp_path / "reference"))
    expected = run_bootstrap(reference, model_and_processor=loaded, progress=False)
    assert killed_at < expected["counts"]["pairs"]
    assert records(out) == records(Path(reference.out))
    assert sorted(b.key for b in read_bad_records(out)) == sorted(
        b.key for b in read_bad_records(reference.out)
    )
    manifest = read_manifest(out)
    assert manifest["complete"] is True
    for part in ("counts", "bad_records", "stats"):
        assert manifest[part] == expected[part]
