"""The trainer on the session's tiny LLaVA: first-step losses, resume, lrs, freezing, output."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import make_images, make_pairs, tiny_config, write_store

from bpo.models import load_model_and_processor
from bpo.train.batch import collate_pairs, encode_pair, pad_token_id
from bpo.train.config import LoraSettings, LossSettings
from bpo.train.logprobs import naive_pair_logps
from bpo.train.model import setup_trainable
from bpo.train.run import train


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    """Keep the reference pass's weight digests out of the user's ~/.cache."""
    monkeypatch.setenv("BPO_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def fresh(tiny_llava_folder, one_torch_thread):
    """A fresh (model, processor): training changes the model it is given."""
    return load_model_and_processor(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
    )


def in_memory(tiny_llava_folder, fresh, **overrides):
    """Train on the helper pairs and images without files; returns the TrainResult."""
    model, processor = fresh
    config = tiny_config(tiny_llava_folder, None, **overrides)
    return train(config, model, processor, make_pairs(), make_images(), log=lambda _: None)


def naive_batch(processor, pairs, max_length=None):
    images = make_images()
    encoded = [encode_pair(p, processor, images[p.image], max_length) for p in pairs]
    return collate_pairs(encoded, pad_token_id(processor))


def test_first_dpo_step_loss_is_log_2(tiny_llava_folder, fresh):
    """At step 0 the policy is the reference, so h = 0 and -log sigmoid(0) = log 2 = 0.693147,
    with every reward 0 (and accuracy 0: no chosen reward strictly beats its rejected one)."""
    first = in_memory(tiny_llava_folder, fresh, max_steps=1).history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert first["rewards/margins"] == 0.0 and first["rewards/accuracies"] == 0.0
    assert first["lr"] == 1e-2


@pytest.mark.parametrize("pad", [True, False], ids=["pad-token", "no-pad-token"])
def test_first_sft_step_loss_is_the_naive_chosen_nll(tiny_llava_folder, fresh, pad):
    """SFT's loss is the mean over pairs of -log p(chosen) / |chosen|, here from the naive scorer
    (one plain sequence per answer) on the untouched model; batch 6 puts every pair in step 1.
    Without a pad token (as many LLaMA tokenizers) padding is written with </s>: masked, so the
    loss is the same."""
    if not pad:
        fresh[1].tokenizer.pad_token = None
    _, processor = fresh
    with torch.no_grad():
        logps = naive_pair_logps(fresh[0], naive_batch(processor, make_pairs()))
    expected = float((-logps.chosen / logps.chosen_tokens).mean())
    first = in_memory(tiny_llava_folder, fresh, method="sft", batch_size=6, max_steps=1).history[0]
    assert first["loss"] == pytest.approx(expected, abs=1e-5)
    assert first["logps/chosen"] == pytest.approx(float(logps.chosen.mean()), abs=1e-4)
    assert "rewards/chosen" not in first


def test_resume_after_a_kill_gives_the_same_weights_and_log(tiny_llava_folder, tmp_path):
    """Killed after step 3 (last checkpoint: step 2) and resumed, a run ends with the weights and
    metrics.jsonl of a run never killed: adapter, projector (own lr), Adam state, cosine schedule,
    dropout RNG and the data position across the epoch boundary all restored."""
    store, image_root = write_store(tmp_path / "data")
    config = tiny_config(
        tiny_llava_folder,
        tmp_path / "whole",
        pairs=str(store),
        image_root=str(image_root),
        epochs=2,
        save_steps=2,
        projector_lr=1e-3,
        warmup_ratio=0.2,
        lora=LoraSettings(r=4, alpha=8, dropout=0.3),
    )
    whole = train(config, log=lambda _: None)
    assert whole.summary["steps"] == 6  # 6 pairs / batch 2 x 2 epochs

    killed = replace(config, out=str(tmp_path / "killed"))

    def kill_at_3(step, _line):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(killed, on_step=kill_at_3, log=lambda _: None)
    assert len((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()) == 3
    resumed = train(killed, resume=True, log=lambda _: None)

    log = (tmp_path / "whole" / "metrics.jsonl").read_text()
    assert (tmp_path / "killed" / "metrics.jsonl").read_text() == log
    assert [json.loads(line) for line in log.splitlines()] == resumed.history
    a = load_file(tmp_path / "whole" / "model" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("multi_modal_projector" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_projector_lr_is_applied_and_a_zero_lm_lr_moves_nothing(tiny_llava_folder, fresh):
    """lr 0 for the adapter, 1e-3 for the projector, one full-batch step, no decay or clipping.
    Adam's first step moves a weight by lr * g / (|g| + eps) (m and v bias-corrected to g, g^2),
    i.e. by 1e-3 wherever |g| >> eps = 1e-8: the projector moves by exactly its lr, the
    language model and the vision tower not at all."""
    before = {k: v.clone() for k, v in fresh[0].state_dict().items()}
    result = in_memory(
        tiny_llava_folder,
        fresh,
        lr=0.0,
        projector_lr=1e-3,
        scheduler="constant",
        max_steps=1,
        batch_size=6,
        max_grad_norm=None,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0, merge=True),
    )
    assert result.history[0]["lr"] == 0.0 and result.history[0]["lr/projector"] == 1e-3
    after = result.model.state_dict()
    assert after.keys() == before.keys()  # merged: a plain LLaVA again
    for name, value in after.items():
        delta = (value - before[name]).abs()
        if "multi_modal_projector" in name:
            assert delta.max() <= 1e-3 * (1 + 1e-5)
            assert delta.median() == pytest.approx(1e-3, rel=1e-3), name
        else:
            assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_vision_tower_and_projector_stay_frozen_by_default(tiny_llava_folder, fresh, finetune):
    """Only language-model weights move (with full fine-tuning, the LM head too)."""
    before = {k: v.clone() for k, v in fresh[0].state_dict().items()}
    lora = LoraSettings(r=4, alpha=8, merge=True)
    result = in_memory(tiny_llava_folder, fresh, max_steps=2, finetune=finetune, lora=lora)
    after = result.model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(".language_model." in k or k == "lm_head.weight" for k in changed)
    assert ("lm_head.weight" in changed) == (finetune == "full")
    if finetune == "full":  # every LM weight trains (embeddings only where their tokens occur)
        layers = {k for k in after if ".language_model.layers." in k}
        assert layers <= changed


def test_lora_targets_every_linear_layer_of_the_language_model_only(fresh, tiny_llava_folder):
    model = setup_trainable(fresh[0], tiny_config(tiny_llava_folder, None))
    adapted = {
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if hasattr(m, "lora_A")
    }
    attention = [f"self_attn.{name}_proj" for name in ("q", "k", "v", "o")]
    per_layer = attention + [f"mlp.{name}_proj" for name in ("gate", "up", "down")]
    assert adapted == {f"model.language_model.layers.{i}.{p}" for i in range(2) for p in per_layer}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_saved_merged_model_loads_back_with_the_same_logits(tiny_llava_folder, fresh, tmp_path):
    out = tmp_path / "run"
    model, processor = fresh
    config = tiny_config(
        tiny_llava_folder, out, max_steps=2, lora=LoraSettings(r=4, alpha=8, merge=True)
    )
    result = train(config, model, processor, make_pairs(), make_images(), log=lambda _: None)
    loaded, _ = load_model_and_processor(
        str(out / "model"), dtype="float32", device="cpu", attn_implementation="eager"
    )
    batch = naive_batch(processor, make_pairs())
    with torch.no_grad():
        ours, theirs = naive_pair_logps(result.model, batch), naive_pair_logps(loaded, batch)
    assert torch.allclose(ours.chosen, theirs.chosen, atol=1e-5)
    assert torch.allclose(ours.rejected, theirs.rejected, atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["effective_batch"] == 2


def test_an_adapter_save_keeps_a_trained_vision_tower_and_projector(
    tiny_llava_folder, fresh, tmp_path
):
    """LoRA without merging, vision tower and projector trained: the saved adapter, loaded onto
    the base model with peft, gives the trained model's log-probs (nothing trained is lost)."""
    from peft import PeftModel

    out = tmp_path / "run"
    model, processor = fresh
    config = tiny_config(
        tiny_llava_folder,
        out,
        max_steps=2,
        train_vision_tower=True,
        projector_lr=1e-2,
        lora=LoraSettings(r=4, alpha=8, merge=False),
    )
    result = train(config, model, processor, make_pairs(), make_images(), log=lambda _: None)
    base, _ = load_model_and_processor(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
    )
    loaded = PeftModel.from_pretrained(base, str(out / "model")).eval()
    batch = naive_batch(processor, make_pairs())
    with torch.no_grad():
        ours, theirs = naive_pair_logps(result.model, batch), naive_pair_logps(loaded, batch)
        untouched = naive_pair_logps(
            load_model_and_processor(
                str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
            )[0],
            batch,
        )
    assert torch.allclose(ours.chosen, theirs.chosen, atol=1e-5)
    assert torch.allclose(ours.rejected, theirs.rejected, atol=1e-5)
    assert not torch.allclose(ours.chosen, untouched.chosen, atol=1e-3)  # it did train


def test_truncated_pairs_are_counted(tiny_llava_folder, fresh):
    """max_length = the longest prompt + 3 tokens: exactly the pairs with an answer longer than
    its budget (max_length - its prompt) are cut, and the summary counts each once over 2 epochs."""
    _, processor = fresh
    images = make_images()
    encoded = [encode_pair(p, processor, images[p.image]) for p in make_pairs()]
    max_length = max(len(e.prompt_ids) for e in encoded) + 3
    budget = [max_length - len(e.prompt_ids) for e in encoded]
    expected = sum(
        max(len(e.chosen_ids), len(e.rejected_ids)) > b
        for e, b in zip(encoded, budget, strict=True)
    )
    assert 0 < expected < len(encoded)
    result = in_memory(tiny_llava_folder, fresh, max_length=max_length, epochs=2)
    assert result.summary["truncated_pairs"] == expected


def test_a_pair_with_a_missing_image_is_reported_and_skipped(tiny_llava_folder, tmp_path):
    """The run goes on without it; the log names the pair; the summary counts it; the source
    filter keeps the weaken pairs only."""
    pairs = make_pairs()
    pairs[0] = replace(pairs[0], image="gone.png")
    store, image_root = write_store(tmp_path / "data", pairs)
    messages = []
    config = tiny_config(
        tiny_llava_folder, None, pairs=str(store), image_root=str(image_root), sources=["weaken"]
    )
    result = train(config, log=messages.append)
    assert result.summary["pairs"] == 2 and result.summary["bad_pairs"] == 1
    assert any("p0:weaken:0" in m and "gone.png" in m for m in messages)
    sft = train(replace(config, method="sft"), log=messages.append)
    assert sft.summary["bad_pairs"] == 1 and sft.summary["bad_reasons"] == {"missing_image": 1}


def test_bpo_train_verb_reads_a_yaml_config(tiny_llava_folder, tmp_path, capsys):
    from bpo.cli import main

    store, image_root = write_store(tmp_path / "data")
    (tmp_path / "train.yaml").write_text(
        f"run:\n  model:\n    name_or_path: {tiny_llava_folder}\n    dtype: float32\n"
        f"    device: cpu\n  pairs: {store}\n  image_root: {image_root}\n  out: {tmp_path / 'x'}\n"
        "  lora: {r: 4, alpha: 8}\n  lr: 0.01\n  max_steps: 2\n  batch_size: 3\n  trackers: []\n"
    )
    config, out = str(tmp_path / "train.yaml"), str(tmp_path / "run")
    main(["train", "--config", config, "--out", out, "--method", "sft"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["method"] == "sft" and printed["steps"] == 2 and printed["pairs"] == 6
    assert (tmp_path / "run" / "model" / "adapter_model.safetensors").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_accumulating_three_batches_of_two_equals_one_batch_of_six(tiny_llava_folder, fresh):
    """The step's loss is the mean over its pairs however they are split, so one step of 2 x 3
    accumulated equals one step of 6 (up to float summation order): same loss, same weights."""
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, merge=True)
    split = in_memory(tiny_llava_folder, fresh, batch_size=2, grad_accum=3, max_steps=1, lora=lora)
    model, processor = load_model_and_processor(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
    )
    whole = in_memory(tiny_llava_folder, (model, processor), batch_size=6, max_steps=1, lora=lora)
    assert split.summary["steps"] == whole.summary["steps"] == 1
    assert split.history[0]["loss"] == pytest.approx(whole.history[0]["loss"], abs=1e-6)
    assert split.history[0]["grad_norm"] == pytest.approx(whole.history[0]["grad_norm"], rel=1e-5)
    a, b = split.model.state_dict(), whole.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_gradient_checkpointing_changes_memory_not_results(tiny_llava_folder, fresh):
    plain = in_memory(tiny_llava_folder, fresh, max_steps=3)
    model, processor = load_model_and_processor(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
    )
    ckpt = in_memory(
        tiny_llava_folder, (model, processor), max_steps=3, gradient_checkpointing=True
    )
    for a, b in zip(plain.history, ckpt.history, strict=True):
        assert a.keys() == b.keys()
        assert all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7) for k in a)


def test_kept_encodings_change_speed_not_results(tiny_llava_folder, fresh):
    plain = in_memory(tiny_llava_folder, fresh, epochs=3, loss=LossSettings(shared_token_weight=0))
    model, processor = load_model_and_processor(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
    )
    kept = in_memory(
        tiny_llava_folder,
        (model, processor),
        epochs=3,
        loss=LossSettings(shared_token_weight=0),
        keep_encoded_pairs=True,
    )
    assert len(kept.history) == len(plain.history) >= 3  # every pair read in three epochs
    assert kept.history == plain.history


def test_metrics_reach_tensorboard_or_fall_back_to_the_log(
    tiny_llava_folder, tmp_path, monkeypatch
):
    """With the tensorboard package an event file holds the TRL-named scalars; without it the run
    warns and still writes metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pairs, images = make_pairs(), make_images()
    model, processor = load_model_and_processor(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
    )
    config = tiny_config(tiny_llava_folder, tmp_path / "tb", max_steps=2, trackers=["tensorboard"])
    train(config, model, processor, pairs, images, log=lambda _: None)
    (events,) = (tmp_path / "tb" / "bpo").glob("events.out.tfevents.*")  # hparams: a subfolder
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "lr"} <= set(tags)

    monkeypatch.setattr("accelerate.utils.is_tensorboard_available", lambda: False)
    model, processor = load_model_and_processor(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
    )
    config = replace(config, out=str(tmp_path / "no-tb"))
    with pytest.warns(UserWarning, match="tensorboard package is not installed"):
        train(config, model, processor, pairs, images, log=lambda _: None)
    assert len((tmp_path / "no-tb" / "metrics.jsonl").read_text().splitlines()) == 2
    assert not list((tmp_path / "no-tb").rglob("events.out.tfevents.*"))


def test_bpo_refs_precomputes_what_bpo_train_then_reuses(tiny_llava_folder, tmp_path, capsys):
    from bpo.cli import main

    store, image_root = write_store(tmp_path / "data")
    (tmp_path / "train.yaml").write_text(
        f"run:\n  model:\n    name_or_path: {tiny_llava_folder}\n    dtype: float32\n"
        f"    device: cpu\n  pairs: {store}\n  image_root: {image_root}\n  out: {tmp_path / 'x'}\n"
        "  lora: {r: 4, alpha: 8}\n  max_steps: 1\n  trackers: []\n"
    )
    main(["refs", "--config", str(tmp_path / "train.yaml")])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [printed[k] for k in ("pairs", "computed", "reused", "bad")] == [6, 6, 0, 0]
    main(["train", "--config", str(tmp_path / "train.yaml")])
    assert "6 reused, 0 computed" in capsys.readouterr().err
    first = json.loads((tmp_path / "x" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def noised_pairs() -> list:
    """make_pairs() with the weaken pairs p0, p2, p4 made at noise steps 100, 500, 100."""
    steps = {"p0": 100, "p2": 500, "p4": 100}
    return [
        replace(p, meta={"noise_step": steps[p.id]}) if p.id in steps else p for p in make_pairs()
    ]


def test_noise_steps_select_the_same_pairs_from_a_store_and_from_memory(
    tiny_llava_folder, tmp_path
):
    """noise_steps [100]: p0 and p4 only (injected pairs have no noise step), one step of batch
    2, the same first step from the store (cached references) and in memory (scored here)."""
    store, image_root = write_store(tmp_path / "data", noised_pairs())
    config = tiny_config(
        tiny_llava_folder, None, pairs=str(store), image_root=str(image_root), noise_steps=[100]
    )
    from_store = train(config, log=lambda _: None)
    model, processor = load_model_and_processor(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
    )
    memory_config = replace(config, pairs=None, image_root=None)
    from_memory = train(memory_config, model, processor, noised_pairs(), make_images(), log=print)
    assert from_store.summary["pairs"] == from_memory.summary["pairs"] == 2
    assert from_store.summary["steps"] == 1
    first, other = from_store.history[0], from_memory.history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["logps/chosen"] == pytest.approx(other["logps/chosen"], abs=1e-5)
    assert first["grad_norm"] == pytest.approx(other["grad_norm"], rel=1e-5)


def test_training_from_a_store_reuses_the_pass_it_ran(tiny_llava_folder, tmp_path, monkeypatch):
    """One process trains on the pairs ensure_reference_logps returned: neither the refs file
    nor the store is read a second time."""

    def read_again(*_args, **_kwargs):
        raise AssertionError("the store or its refs file was read a second time")

    monkeypatch.setattr("bpo.train.refs.load_reference_logps", read_again)
    monkeypatch.setattr("bpo.train.refs.load_store_pairs", read_again)
    store, image_root = write_store(tmp_path / "data")
    config = tiny_config(
        tiny_llava_folder, None, pairs=str(store), image_root=str(image_root), max_steps=1
    )
    result = train(config, log=lambda _: None)
    assert result.summary["pairs"] == 6
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_pair_with_an_empty_answer_is_reported_and_skipped(tiny_llava_folder, fresh):
    pairs = make_pairs()
    pairs[2] = replace(pairs[2], chosen="")
    messages = []
    config = tiny_config(tiny_llava_folder, None)
    result = train(config, *fresh, pairs, make_images(), log=messages.append)
    assert result.summary["pairs"] == 5 and result.summary["bad_reasons"] == {"empty_answer": 1}
    assert "skipping pair p2:weaken:0: the chosen answer is empty; fix or drop the pair" in messages


def test_refs_and_train_fail_when_no_pair_is_usable(tiny_llava_folder, tmp_path, capsys):
    """Every pair's image gone: `bpo refs` and `bpo train` stop with an error that counts the
    unusable pairs and quotes a reason, instead of exiting 0 with nothing scored."""
    from bpo.cli import main

    store, image_root = write_store(tmp_path / "data")
    for image in Path(image_root).glob("*.png"):
        image.unlink()
    (tmp_path / "train.yaml").write_text(
        f"run:\n  model:\n    name_or_path: {tiny_llava_folder}\n    dtype: float32\n"
        f"    device: cpu\n  pairs: {store}\n  image_root: {image_root}\n  out: {tmp_path / 'x'}\n"
        "  lora: {r: 4, alpha: 8}\n  max_steps: 1\n  trackers: []\n"
    )
    with pytest.raises(ValueError, match=r"no pair could be scored \(6 unusable\), e\.g\. .*p0"):
        main(["refs", "--config", str(tmp_path / "train.yaml")])
    with pytest.raises(ValueError, match=r"no usable pairs to train on \(6 unusable"):
        main(["train", "--config", str(tmp_path / "train.yaml")])
    assert not (tmp_path / "x" / "metrics.jsonl").exists()
