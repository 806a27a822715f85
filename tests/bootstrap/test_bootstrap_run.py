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
from bootstrap_helpers import ScriptedEngine, config_for, scripted_data

import fake_vllm
from bpo.bootstrap.config import BootstrapConfig, InjectConfig, WeakenConfig
from bpo.bootstrap.inject.lexical import InjectionVocabulary, inject_errors
from bpo.bootstrap.inject.rewriters import LMRewriter, mllm_renderer
from bpo.bootstrap.run import merge_bootstrap_stores, run_bootstrap
from bpo.bootstrap.stats import length_stats
from bpo.bootstrap.weaken import weakened_answers
from bpo.cli import main
from bpo.data import (
    ConfigMismatchError,
    load_image,
    read_bad_records,
    read_llava,
    read_manifest,
    read_pairs,
    remove_image_placeholder,
    split_records,
)
from bpo.generate import TransformersGenerator, stream_seed
from bpo.models.load import load_from_config
from bpo.shapeworld.export import write_llava_dataset
from bpo.shapeworld.world import WorldConfig, sample_scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_full_run_counts_every_sample_once_per_method(full_run, data, tiny_llava_folder):
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
    # What made each negative: the MLLM (weaken), the lexical injector's vocabulary (inject).
    generators = {(p.source, p.meta["generator"]) for p in pairs}
    assert generators == {("weaken", str(tiny_llava_folder)), ("inject", "lexical:shapeworld")}
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
    """The bounds [1/1.2, 1.2] on weakened negatives: exactly the unfiltered run's weakened pairs
    outside them are rejected and counted; injected negatives are never length-filtered (their
    own validation bounds their length in words), so all of them are kept."""
    weaken = replace(full_run[0].weaken, max_length_ratio=1.2, min_length_ratio=1 / 1.2)
    config = config_for(tiny_llava_folder, data, tmp_path / "out", weaken=weaken)
    manifest = run_bootstrap(config, model_and_processor=loaded, progress=False)
    kept = list(read_pairs(config.out))
    inside = [p for p in kept if p.source == "weaken"]
    assert all(1 / 1.2 <= p.rejected_tokens / p.chosen_tokens <= 1.2 for p in inside)
    unfiltered = list(read_pairs(full_run[0].out))
    outside = [p for p in unfiltered if not 1 / 1.2 <= p.rejected_tokens / p.chosen_tokens <= 1.2]
    dropped = [p for p in outside if p.source == "weaken"]
    assert dropped, "the test data should have weakened negatives outside the ratio"
    assert any(p.source == "inject" for p in outside), "and injected ones, which are kept"
    other = manifest["counts"]["other"]
    assert other.get("rejected_weaken_length_ratio", 0) == len(dropped)
    assert other.get("rejected_inject_length_ratio", 0) == 0
    assert len(kept) + len(dropped) == len(unfiltered)
    assert records(config.out) == [
        r
        for r in records(full_run[0].out)
        if (r["id"], r["source"]) not in {(p.id, p.source) for p in dropped}
    ]


def test_self_injection_is_the_mllms_own_language_model(tmp_path, tiny_llava_folder, data, loaded):
    """kind "self": the pairs are an LMRewriter over the MLLM on text alone, validated the same way.

    Sampled at temperature 1 in chunks of 4: each sample's rewrite is keyed by its global index,
    so one rewrite_all over the whole file (batches of 3, other rows) gives the same texts."""
    inject = InjectConfig(
        kind="self", mode="qa", max_new_tokens=4, temperature=1.0, top_p=1.0, seed=8, max_ratio=9
    )
    config = config_for(tiny_llava_folder, data, tmp_path / "out", inject=inject, weaken=None)
    manifest = run_bootstrap(config, model_and_processor=loaded, progress=False)
    model, processor = loaded
    rewriter = LMRewriter(
        inject, TransformersGenerator(model, processor, batch_size=3), mllm_renderer(processor)
    )
    samples, _ = split_records(read_llava(data))
    questions = [remove_image_placeholder(s.messages[-1]["content"]) for s in samples]
    results = rewriter.rewrite_all([s.answer for s in samples], questions, range(len(samples)))
    assert len({r.raw for r in results}) > len(results) // 2  # sampled: mostly different
    expected = {
        s.id: r.text or f"rejected_inject_{r.reason}" for s, r in zip(samples, results, strict=True)
    }
    got = {p.id: p.rejected for p in read_pairs(config.out)}
    got |= {b.id.rsplit(":", 2)[0]: b.reason for b in read_bad_records(config.out)}
    assert got == expected
    assert {p.meta["kind"] for p in read_pairs(config.out)} <= {"self"}
    assert {p.meta["generator"] for p in read_pairs(config.out)} == {str(tiny_llava_folder)}
    assert manifest["config"]["weaken"] is None


def test_resume_with_another_config_is_refused(tmp_path, tiny_llava_folder, data, loaded, full_run):
    config = full_run[0]
    changed = replace(config, weaken=replace(config.weaken, noise_steps=[500]))
    with pytest.raises(
        ConfigMismatchError, match=r"weaken.noise_steps: \[900\] \(stored\) vs \[500\]"
    ):
        run_bootstrap(changed, model_and_processor=loaded, progress=False)
    # Output-only settings may change: the same store resumes and has nothing left to do.
    same = replace(config, chunk_size=7)
    assert (
        run_bootstrap(same, model_and_processor=loaded, progress=False)["counts"]
        == (full_run[1]["counts"])
    )


def test_weaken_alone_makes_the_full_runs_weakened_pairs(
    tmp_path, tiny_llava_folder, data, loaded, full_run
):
    """inject: null: the same weakened pairs and rejects as with both methods, and nothing else
    (a sample's weakening is keyed by its global index, not by what else the run makes)."""
    config = config_for(tiny_llava_folder, data, tmp_path / "out", inject=None)
    manifest = run_bootstrap(config, model_and_processor=loaded, progress=False)
    assert records(config.out) == [r for r in records(full_run[0].out) if r["source"] == "weaken"]
    weakened = sorted(b.key for b in read_bad_records(full_run[0].out) if "_weaken_" in b.reason)
    assert sorted(b.key for b in read_bad_records(config.out)) == weakened
    assert manifest["config"]["inject"] is None and set(manifest["counts"]["by_source"]) == {
        "weaken"
    }


def test_several_noise_steps_make_their_own_pairs(tmp_path, tiny_llava_folder, data, loaded):
    """noise_steps [300, 900] x 2 samples: four weakened pairs (or rejects) per sample, sample
    indices 0-3 at steps 300, 300, 900, 900, with distinct keys, each the `weakened_answers`
    sample of that index (request keyed by its global index)."""
    weaken = WeakenConfig(
        noise_steps=[300, 900], samples_per_prompt=2, max_new_tokens=6, temperature=1.0, seed=3
    )
    config = config_for(tiny_llava_folder, data, tmp_path / "out", weaken=weaken, inject=None)
    config = replace(config, limit=3)
    run_bootstrap(config, model_and_processor=loaded, progress=False)
    pairs, rejects = list(read_pairs(config.out)), list(read_bad_records(config.out))
    keys = [p.key for p in pairs] + [b.id for b in rejects]
    assert len(keys) == len(set(keys)) == 3 * 4
    assert {p.meta["sample_index"] for p in pairs} == {0, 1, 2, 3}
    assert all(p.meta["noise_step"] == [300, 300, 900, 900][p.meta["sample_index"]] for p in pairs)
    samples = split_records(read_llava(data))[0][:3]
    requests = [
        {"messages": s.messages, "image": load_image(data.parent / s.image)} for s in samples
    ]
    expected = weakened_answers(TransformersGenerator(*loaded, batch_size=5), requests, weaken)
    by_key = {(p.id, p.meta["sample_index"]): p.rejected for p in pairs}
    for sample, row in zip(samples, expected, strict=True):
        for k, answer in enumerate(row):
            if (sample.id, k) in by_key:
                assert by_key[sample.id, k] == answer.text
    assert len(by_key) >= 6


def test_a_local_rewriter_is_recorded_as_its_folder(tmp_path, tiny_llava_folder, data, loaded):
    """kind "local": the causal LM at inject.model (loaded from safetensors) rewrites, and each
    pair names it; every sample gives a pair or a counted reject."""
    from bpo.models.tiny import build_tiny_causal_lm

    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    lm, tokenizer = build_tiny_causal_lm(["a red circle and a blue square ."] * 8, template)
    folder = tmp_path / "rewriter"
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    inject = InjectConfig(
        kind="local",
        model=str(folder),
        max_new_tokens=6,
        temperature=1.0,
        min_ratio=0,
        max_ratio=99,
    )
    config = config_for(tiny_llava_folder, data, tmp_path / "out", weaken=None, inject=inject)
    config = replace(config, limit=4)
    run_bootstrap(config, model_and_processor=loaded, progress=False)
    pairs = list(read_pairs(config.out))
    assert len(pairs) + len(list(read_bad_records(config.out))) == 4
    assert pairs and {(p.meta["kind"], p.meta["generator"]) for p in pairs} == {
        ("local", str(folder))
    }


# (question, gold, weakened answer); every word is one token of the tiny tokenizer, plus </s>.
SCRIPT = [
    ("Describe the image.", "a red circle .", "a red circle and a blue square ."),  # 9 / 5 = 1.8
    ("What is in the image?", "a blue square .", "yes"),  # 2 / 5 = 0.4
    ("Is there a circle in the image?", "a dog and a cat .", "a red circle ."),  # 5 / 7 = 0.71
    ("Is there a square in the image?", "yes", "a red circle ."),  # 5 / 2 = 2.5
]
REWRITE = "a green triangle , a yellow diamond and a white ring ."  # 13 tokens, 12 words


@pytest.mark.parametrize(
    ("low", "high", "rejected"),
    [(None, 1.5, [0, 3]), (0.5, None, [1]), (0.5, 1.5, [0, 1, 3]), (None, None, [])],
)
def test_the_length_filter_bounds_weakened_negatives_alone_by_hand(
    tmp_path, tiny_llava_folder, loaded, low, high, rejected, monkeypatch
):
    """Weakened over gold tokens are 9/5 = 1.8, 2/5 = 0.4, 5/7 = 0.71 and 5/2 = 2.5 (SCRIPT).
    Each bound is one-sided: max 1.5 alone rejects samples 0 and 3 (1.8, 2.5 > 1.5), not 1
    (0.4 is below 1/1.5, which the old two-sided filter rejected); min 0.5 alone rejects 1 only;
    both reject 0, 1 and 3. The rewrites (13 tokens) are 13/5 = 2.6, 2.6, 13/7 = 1.86 and 6.5
    times their golds, outside every bound, and all four are kept: the filter is for weakened
    negatives only. Generation is scripted (the vLLM route with a stand-in engine), so the
    answers, and the token counts, are the ones written here."""
    data = scripted_data(tmp_path, SCRIPT)
    weaken = WeakenConfig(max_new_tokens=16, min_length_ratio=low, max_length_ratio=high)
    inject = InjectConfig(kind="self", max_new_tokens=16, temperature=0.0, max_ratio=20)
    config = config_for(tiny_llava_folder, data, tmp_path / "out", weaken=weaken, inject=inject)
    config = replace(config, backend="vllm")
    fake_vllm.install(monkeypatch)  # its SamplingParams; the engine is the scripted one
    tokenizer = loaded[1].tokenizer
    engine = ScriptedEngine(tokenizer, {q: a for q, _, a in SCRIPT}, REWRITE)
    manifest = run_bootstrap(
        config, model_and_processor=loaded, progress=False, engine_factory=lambda *_: engine
    )
    pairs = list(read_pairs(config.out))
    tokens = {(p.id, p.source): (p.rejected_tokens, p.chosen_tokens) for p in pairs}
    assert {p.id for p in pairs if p.source == "weaken"} == {
        f"r{i}" for i in range(4) if i not in rejected
    }
    assert [tokens.get((f"r{i}", "weaken")) for i in range(4)] == [
        None if i in rejected else pair for i, pair in enumerate([(9, 5), (2, 5), (5, 7), (5, 2)])
    ]
    assert [tokens[f"r{i}", "inject"] for i in range(4)] == [(13, 5), (13, 5), (13, 7), (13, 2)]
    other = manifest["counts"]["other"]
    assert other.get("rejected_weaken_length_ratio", 0) == len(rejected)
    assert set(other) <= {"rejected_weaken_length_ratio"}
    bad = {b.id: b for b in read_bad_records(config.out)}
    assert sorted(bad) == [f"r{i}:weaken:0" for i in rejected]
    if 0 in rejected:
        assert bad["r0:weaken:0"].message.endswith(
            "9 tokens, 1.80x the gold answer's 5: above weaken.max_length_ratio 1.5"
        )
    if 1 in rejected:
        assert bad["r1:weaken:0"].message.endswith(
            "2 tokens, 0.40x the gold answer's 5: below weaken.min_length_ratio 0.5"
        )


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


def test_a_weakened_answer_that_is_the_gold_or_says_nothing_is_a_counted_reject(
    tmp_path, tiny_llava_folder, loaded, monkeypatch
):
    """Scripted answers from the noised image: the gold itself up to case and punctuation
    (`A Red Circle!` for `a red circle .`), only punctuation, and a real negative. The first two
    teach DPO nothing (chosen and rejected score alike), so they are rejects, counted under
    their reasons with the pair key as id; only the third becomes a pair."""
    script = [
        ("Describe the image.", "a red circle .", "A Red Circle!"),
        ("What is in the image?", "a blue square .", " . "),
        ("Is there a circle in the image?", "a dog and a cat .", "a red circle ."),
    ]
    data = scripted_data(tmp_path, script)
    config = config_for(
        tiny_llava_folder, data, tmp_path / "out", weaken=WeakenConfig(max_new_tokens=16)
    )
    config = replace(config, backend="vllm", inject=None)
    fake_vllm.install(monkeypatch)
    engine = ScriptedEngine(loaded[1].tokenizer, {q: a for q, _, a in script}, REWRITE)
    manifest = run_bootstrap(
        config, model_and_processor=loaded, progress=False, engine_factory=lambda *_: engine
    )
    assert [(p.id, p.rejected) for p in read_pairs(config.out)] == [("r2", "a red circle .")]
    assert manifest["counts"]["other"] == {
        "rejected_weaken_empty": 1,
        "rejected_weaken_identical": 1,
    }
    bad = {b.id: b for b in read_bad_records(config.out)}
    assert bad["r0:weaken:0"].reason == "rejected_weaken_identical"
    assert bad["r0:weaken:0"].message.endswith(
        "the answer from the noised image is the gold answer"
    )
    assert bad["r1:weaken:0"].reason == "rejected_weaken_empty"
