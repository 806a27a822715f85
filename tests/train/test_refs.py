"""Reference log-probs cache: values, reuse, staleness, fingerprints, bad images, resume."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from bpo.data.records import PreferencePair
from bpo.data.store import PairWriter, StoreError
from bpo.models import load_model_and_processor
from bpo.models.tiny import TinyLlavaConfig, build_model, save_tiny_llava
from bpo.train.batch import collate_pairs, encode_pair
from bpo.train.data import PairDataset, score_pairs
from bpo.train.fingerprint import cached_file_sha256, model_identity, reference_fingerprint
from bpo.train.logprobs import pair_logps
from bpo.train.refs import ensure_reference_logps, load_reference_logps

STORE_CONFIG = {"stage": "refs-test"}
DESCRIBE = [{"role": "user", "content": "<image>\nDescribe the image."}]


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch) -> Path:
    """Keep weight digests out of the user's ~/.cache."""
    monkeypatch.setenv("BPO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "file_digests.json"


@pytest.fixture(scope="module")
def reference(tiny_llava_folder, one_torch_thread):
    """(model, processor) of the session's tiny LLaVA, fp32 on CPU, eager attention."""
    return load_model_and_processor(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
    )


def make_pairs() -> list[PreferencePair]:
    """Four pairs: two share red.png, one uses blue.png, one is text-only."""

    def pair(pair_id, image, prompt, chosen, rejected):
        return PreferencePair(pair_id, image, prompt, chosen, rejected, source="test")

    return [
        pair("a", "red.png", DESCRIBE, "a red circle and a blue square .", "a dog ."),
        pair("b", "red.png", DESCRIBE, "a red circle .", "a green triangle and a cat ."),
        pair(
            "c",
            "sub/blue.png",
            [{"role": "user", "content": "<image>\nIs there a square in the image?"}],
            "yes",
            "no , a white ring .",
        ),
        pair(
            "d",
            None,
            [{"role": "user", "content": "What is in the image?"}],
            "a yellow diamond .",
            "a dog and a cat .",
        ),
    ]


def write_store(out: Path, pairs: list[PreferencePair]) -> Path:
    # overwrite: a rewritten store keeps its refs/ folder (PairWriter only removes its own files).
    with PairWriter(out, STORE_CONFIG, overwrite=True) as writer:
        for pair in pairs:
            writer.write(pair)
    return out


@pytest.fixture
def image_root(tmp_path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "red.png")
    Image.new("RGB", (32, 32), (0, 0, 255)).save(root / "sub" / "blue.png")
    return root


@pytest.fixture
def store(tmp_path) -> Path:
    return write_store(tmp_path / "pairs", make_pairs())


@pytest.fixture
def identity(tiny_llava_folder) -> dict:
    return model_identity(str(tiny_llava_folder))


def direct_logps(model, processor, pair: PreferencePair, image_root: Path, max_length=None):
    """(chosen, rejected, chosen tokens, rejected tokens) of one pair scored alone."""
    image = Image.open(image_root / pair.image).convert("RGB") if pair.image else None
    encoded = encode_pair(pair, processor, image, max_length=max_length)
    batch = collate_pairs([encoded], processor.tokenizer.pad_token_id)
    with torch.inference_mode():
        scores = pair_logps(model, batch)
    return (
        scores.chosen.item(),
        scores.rejected.item(),
        int(scores.chosen_tokens.item()),
        int(scores.rejected_tokens.item()),
    )


def ensure(reference, store, image_root, identity, **kwargs):
    model, processor = reference
    kwargs.setdefault("batch_size", 3)  # 4 pairs: one full batch and one short one
    return ensure_reference_logps(
        model, processor, store, image_root, model_identity=identity, progress=False, **kwargs
    )


def count_forwards(model) -> list[int]:
    calls = [0]

    def hook(*_args):
        calls[0] += 1

    model.register_forward_hook(hook)
    return calls


def test_values_equal_a_direct_computation(reference, store, image_root, identity):
    model, processor = reference
    model.train()
    table = ensure(reference, store, image_root, identity)
    assert model.training, "the model comes back in the mode it came in"
    model.eval()
    assert (table.computed, table.reused, table.stale, table.bad) == (4, 0, 0, {})
    assert [p.key for p in table.pairs] == [p.key for p in make_pairs()]
    for pair in table.pairs:
        want = direct_logps(model, processor, pair, image_root)
        got = (pair.ref_chosen_logp, pair.ref_rejected_logp, pair.chosen_tokens)
        assert got[:2] == pytest.approx(want[:2], abs=1e-4), pair.key
        assert (pair.chosen_tokens, pair.rejected_tokens) == want[2:], pair.key
        assert pair.ref_chosen_logp < 0
    lines = table.path.read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == [p.key for p in make_pairs()]
    assert load_reference_logps(store, table.fingerprint) == table.entries
    meta = json.loads(table.path.with_name(f"{table.fingerprint}.meta.json").read_text())
    assert meta["parts"]["model"] == identity
    assert (meta["parts"]["max_length"], meta["parts"]["dtype"]) == (None, "float32")


def test_second_call_reuses_everything_without_a_forward(reference, store, image_root, identity):
    first = ensure(reference, store, image_root, identity)
    before = first.path.read_bytes()
    calls = count_forwards(reference[0])
    try:
        second = ensure(reference, store, image_root, identity)
    finally:
        reference[0]._forward_hooks.clear()
    assert (second.computed, second.reused, second.stale) == (0, 4, 0)
    assert calls == [0]
    assert second.entries == first.entries
    assert second.path.read_bytes() == before


def test_edited_pair_alone_is_recomputed(reference, store, image_root, identity):
    first = ensure(reference, store, image_root, identity)
    edited = make_pairs()
    edited[1] = replace(edited[1], rejected="a blue square and a dog .")
    write_store(store, edited)
    second = ensure(reference, store, image_root, identity)
    assert (second.computed, second.reused, second.stale) == (1, 3, 1)
    new = second.entries[edited[1].key]
    want = direct_logps(reference[0], reference[1], edited[1], image_root)
    assert new.ref_rejected_logp == pytest.approx(want[1], abs=1e-4)
    assert new.ref_rejected_logp != pytest.approx(first.entries[edited[1].key].ref_rejected_logp)
    assert new.ref_chosen_logp == pytest.approx(first.entries[edited[1].key].ref_chosen_logp)
    for key in ("a:test:0", "c:test:0", "d:test:0"):
        assert second.entries[key] == first.entries[key]
    # The superseded line is gone: one line per pair, the edited one with its new hash.
    lines = [json.loads(line) for line in second.path.read_text().splitlines()]
    assert [line["key"] for line in lines] == [p.key for p in edited]
    assert lines[1]["pair_hash"] == new.pair_hash != first.entries[edited[1].key].pair_hash


def test_changed_image_content_makes_its_pairs_stale(reference, store, image_root, identity):
    ensure(reference, store, image_root, identity)
    Image.new("RGB", (40, 30), (0, 255, 0)).save(image_root / "red.png")
    table = ensure(reference, store, image_root, identity)
    # Pairs a and b use red.png.
    assert (table.computed, table.reused, table.stale) == (2, 2, 2)


def test_touched_image_with_same_content_is_reused_and_restamped(
    reference, store, image_root, identity
):
    first = ensure(reference, store, image_root, identity)
    red = image_root / "red.png"
    os.utime(red, ns=(red.stat().st_atime_ns, red.stat().st_mtime_ns + 10**9))
    second = ensure(reference, store, image_root, identity)
    assert (second.computed, second.reused) == (0, 4)
    stored = load_reference_logps(store, second.fingerprint)["a:test:0"]
    assert stored.image["mtime_ns"] == red.stat().st_mtime_ns
    assert stored.image["sha256"] == first.entries["a:test:0"].image["sha256"]


def test_another_model_reuses_nothing(reference, store, image_root, identity, tmp_path):
    """The same architecture and tokenizer with other weights (seed 1)."""
    first = ensure(reference, store, image_root, identity)
    _, processor = reference
    other_model = build_model(TinyLlavaConfig(), processor.tokenizer, seed=1)
    folder = save_tiny_llava(other_model, processor, tmp_path / "other")
    other = load_model_and_processor(
        str(folder), dtype="float32", device="cpu", attn_implementation="eager"
    )
    other_identity = model_identity(str(folder))
    assert other_identity["weights_sha256"] != identity["weights_sha256"]
    table = ensure(other, store, image_root, other_identity)
    assert table.fingerprint != first.fingerprint
    assert (table.computed, table.reused) == (4, 0)
    assert table.entries["a:test:0"].ref_chosen_logp != pytest.approx(
        first.entries["a:test:0"].ref_chosen_logp
    )
    assert sorted(p.name for p in (store / "refs").glob("*.jsonl")) == sorted(
        [f"{first.fingerprint}.jsonl", f"{table.fingerprint}.jsonl"]
    )


def test_settings_change_the_fingerprint(reference, identity):
    _, processor = reference

    def fingerprint(**kwargs):
        settings = {"max_length": None, "dtype": torch.float32, **kwargs}
        return reference_fingerprint(identity, processor, **settings)[0]

    base = fingerprint()
    assert fingerprint() == base
    assert fingerprint(max_length=64) != base
    assert fingerprint(max_length=64) != fingerprint(max_length=65)
    assert fingerprint(dtype=torch.bfloat16) != base
    four_bit = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    assert fingerprint(quantization=four_bit) != base  # a QLoRA reference scores differently
    assert fingerprint(quantization=None) == base
    assert fingerprint(shared_token_weight=0.0) != base  # dense scores are other numbers
    assert fingerprint(shared_token_weight=None) == base
    template = processor.chat_template
    try:
        processor.chat_template = template + " "
        assert fingerprint() != base
    finally:
        processor.chat_template = template


def test_a_dense_preference_gets_its_own_weighted_entries(reference, store, image_root, identity):
    """With shared_weight 0 every pair is computed anew under another fingerprint, and its
    entries are the weighted sums of its own pair row (not a group row: the chosen answer's
    weights depend on the negative)."""
    model, processor = reference
    plain = ensure(reference, store, image_root, identity)
    table = ensure(reference, store, image_root, identity, shared_weight=0.0)
    assert table.fingerprint != plain.fingerprint
    assert (table.computed, table.reused, table.bad) == (4, 0, {})
    for pair, plain_pair in zip(table.pairs, plain.pairs, strict=True):
        image = Image.open(image_root / pair.image).convert("RGB") if pair.image else None
        item = PairDataset([pair], processor, image_root, shared_weight=0.0)[0]
        assert item.answer_weights is not None
        with torch.inference_mode():
            want = pair_logps(model, collate_pairs([item], processor.tokenizer.pad_token_id))
        assert encode_pair(pair, processor, image).chosen_ids == item.chosen_ids
        assert pair.ref_chosen_logp == pytest.approx(want.weighted_chosen.item(), abs=1e-4)
        assert pair.ref_rejected_logp == pytest.approx(want.weighted_rejected.item(), abs=1e-4)
        assert pair.ref_chosen_logp != pytest.approx(plain_pair.ref_chosen_logp, abs=1e-4)
        assert pair.chosen_tokens == plain_pair.chosen_tokens  # the plain token counts


def test_max_length_gets_its_own_entries(reference, store, image_root, identity):
    """A max_length that truncates answers: a new fingerprint, every pair computed, token counts
    and log-probs equal the direct encoding's (the cut answers), and truncated pairs counted."""
    full = ensure(reference, store, image_root, identity)
    model, processor = reference
    images = {name: Image.open(image_root / name) for name in ("red.png", "sub/blue.png")}
    prompts = [len(encode_pair(p, processor, images.get(p.image)).prompt_ids) for p in make_pairs()]
    max_length = max(prompts) + 2  # the longest prompt keeps 2 tokens per answer
    table = ensure(reference, store, image_root, identity, max_length=max_length)
    assert table.fingerprint != full.fingerprint
    assert (table.computed, table.reused, table.bad) == (4, 0, {})
    for pair, prompt in zip(table.pairs, prompts, strict=True):
        want = direct_logps(model, processor, pair, image_root, max_length=max_length)
        assert (pair.chosen_tokens, pair.rejected_tokens) == want[2:], pair.key
        assert max(want[2:]) <= max_length - prompt, pair.key
        assert pair.ref_chosen_logp == pytest.approx(want[0], abs=1e-4), pair.key
    longest = table.pairs[prompts.index(max(prompts))]
    assert max(longest.chosen_tokens, longest.rejected_tokens) == 2
    assert table.truncated == sum(e.truncated for e in table.entries.values()) >= 1


def test_bad_images_are_reported_by_key(reference, tmp_path, image_root, identity):
    pairs = make_pairs()
    pairs[0] = replace(pairs[0], image="missing.png")
    pairs[2] = replace(pairs[2], image="../outside.png")
    (tmp_path / "outside.png").write_bytes((image_root / "red.png").read_bytes())
    (image_root / "broken.png").write_bytes(b"not a png")
    pairs.append(replace(pairs[1], id="e", image="broken.png"))
    store = write_store(tmp_path / "pairs", pairs)
    table = ensure(reference, store, image_root, identity)
    assert sorted(table.bad) == ["a:test:0", "c:test:0", "e:test:0"]
    assert "missing.png" in table.bad["a:test:0"] and "not found" in table.bad["a:test:0"]
    assert "outside --image-root" in table.bad["c:test:0"]
    assert "cannot be decoded" in table.bad["e:test:0"]
    assert [p.key for p in table.pairs] == ["b:test:0", "d:test:0"]
    assert table.computed == 2
    again = ensure(reference, store, image_root, identity)
    assert (again.computed, again.reused, sorted(again.bad)) == (0, 2, sorted(table.bad))


def test_killed_pass_resumes(reference, store, image_root, identity):
    """A pass killed mid-line: the complete lines are kept, the cut line is dropped, the rest is
    computed, and the file ends as an uninterrupted pass writes it."""
    first = ensure(reference, store, image_root, identity)
    whole = first.path.read_bytes()
    lines = whole.splitlines(keepends=True)
    first.path.write_bytes(lines[0] + lines[1][:20])
    table = ensure(reference, store, image_root, identity)
    assert (table.computed, table.reused) == (3, 1)
    assert table.entries.keys() == first.entries.keys()
    for key, entry in table.entries.items():
        assert entry.ref_chosen_logp == pytest.approx(first.entries[key].ref_chosen_logp, abs=1e-4)
    assert len(table.path.read_text().splitlines()) == 4


def test_recompute_reuses_nothing(reference, store, image_root, identity):
    ensure(reference, store, image_root, identity)
    table = ensure(reference, store, image_root, identity, recompute=True)
    assert (table.computed, table.reused) == (4, 0)


def test_weight_digests_are_cached_per_size_and_mtime(tmp_path, digest_cache):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    real = cached_file_sha256(weights)
    cache = json.loads(digest_cache.read_text())
    # A cached digest is trusted while size and mtime are unchanged: proof that no rehash ran.
    cache[str(weights.resolve())]["sha256"] = "f" * 64
    digest_cache.write_text(json.dumps(cache))
    assert cached_file_sha256(weights) == "f" * 64
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert cached_file_sha256(weights) == real


def test_model_identity_of_a_local_folder_and_a_hub_id(tiny_llava_folder):
    identity = model_identity(str(tiny_llava_folder))
    assert identity["kind"] == "local"
    assert list(identity["weights_sha256"]) == ["model.safetensors"]
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert model_identity("org/model", revision=commit) == {
        "kind": "hub",
        "repo": "org/model",
        "commit": commit,
    }
    with pytest.raises(ValueError, match="cannot tell which commit of hub model"):
        model_identity("nobody/not-a-cached-model-bpo")


def test_a_model_loaded_and_saved_again_keeps_its_identity(tiny_llava_folder, tmp_path):
    """Loading a freshly saved model and saving it again writes its dtype into the sub-configs
    (None before), changes no weight, and must not change the identity: the demo's rerun of a
    cached base would otherwise recompute every reference. A changed setting still does."""
    import json

    model, processor = load_model_and_processor(str(tiny_llava_folder), dtype="float32")
    model.save_pretrained(tmp_path / "again")
    processor.save_pretrained(tmp_path / "again")
    before = json.loads((tiny_llava_folder / "config.json").read_text())
    after = json.loads((tmp_path / "again" / "config.json").read_text())
    assert before["text_config"].get("dtype") != after["text_config"].get("dtype")
    assert model_identity(str(tmp_path / "again")) == model_identity(str(tiny_llava_folder))
    after["text_config"]["rms_norm_eps"] = 1e-3
    (tmp_path / "again" / "config.json").write_text(json.dumps(after))
    assert model_identity(str(tmp_path / "again")) != model_identity(str(tiny_llava_folder))


def test_damaged_files_are_named_not_reused(reference, store, image_root, identity):
    table = ensure(reference, store, image_root, identity)
    lines = table.path.read_text().splitlines(keepends=True)
    table.path.write_text(lines[0] + '{"key": "b:test:0"}\n' + "".join(lines[2:]))
    with pytest.raises(StoreError, match=r"\.jsonl line 2: not a reference entry"):
        ensure(reference, store, image_root, identity)
    meta_path = table.path.with_name(f"{table.fingerprint}.meta.json")
    meta = json.loads(meta_path.read_text())
    meta["parts"]["max_length"] = 7
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="describes other settings"):
        ensure(reference, store, image_root, identity)


def test_an_empty_answer_is_reported_and_the_rest_of_its_batch_scored(
    reference, tmp_path, image_root, identity
):
    """Pairs a, b, c form the first batch of 3; b's rejected answer is blank."""
    pairs = make_pairs()
    pairs[1] = replace(pairs[1], rejected=" ")
    store = write_store(tmp_path / "pairs", pairs)
    table = ensure(reference, store, image_root, identity)
    message = "pair b:test:0: the rejected answer is empty; fix or drop the pair"
    assert table.bad == {"b:test:0": message} and table.bad_reasons == {"b:test:0": "empty_answer"}
    assert [p.key for p in table.pairs] == ["a:test:0", "c:test:0", "d:test:0"]
    assert table.computed == 3


def test_the_store_pass_and_in_memory_scoring_are_one_path(reference, store, image_root, identity):
    """The same pairs in the same batches of 3: the cached entries are score_pairs' numbers,
    exactly (the pass is score_pairs, plus the file)."""
    model, processor = reference
    table = ensure(reference, store, image_root, identity)
    scores, bad = score_pairs(model, PairDataset(make_pairs(), processor, image_root), 3)
    assert bad == []

    def numbers(entry):
        return entry.key, entry.ref_chosen_logp, entry.ref_rejected_logp, entry.chosen_tokens

    assert [numbers(s) for s in scores] == [numbers(e) for e in table.entries.values()]
