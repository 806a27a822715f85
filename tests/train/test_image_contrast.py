"""The image-contrast term: its loss by hand, its settings, which noised image each pair is scored
on, those scores against the model's own forward, their reference cache, and training with it."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from trainer_helpers import make_images, make_pairs, tiny_config

from bpo.bootstrap.config import WeakenConfig
from bpo.bootstrap.weaken import answer_meta
from bpo.bootstrap.weaken import noise_pixels as weaken_noise_pixels
from bpo.data.records import PreferencePair
from bpo.data.store import PairWriter
from bpo.models import load_model_and_processor
from bpo.models.noise import SCHEDULES, noise_pixels
from bpo.train.batch import collate_pairs, encode_pair, pad_token_id
from bpo.train.config import NOISE_SCHEDULES, LossSettings, check_config
from bpo.train.data import BadPair, PairDataset
from bpo.train.fingerprint import model_identity, reference_fingerprint
from bpo.train.image_noise import ImageNoise
from bpo.train.logprobs import PairLogps, chosen_logps, noised_chosen_logps
from bpo.train.losses import NoisedChosen, image_contrast_loss, preference_loss
from bpo.train.refs import ensure_reference_logps
from bpo.train.run import train

WEAKEN = WeakenConfig(seed=7)  # how the helper store's weakened pairs were "bootstrapped"


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def policy(chosen, rejected, chosen_tokens, rejected_tokens) -> PairLogps:
    return PairLogps(
        t(*chosen), t(*rejected), torch.tensor(chosen_tokens), torch.tensor(rejected_tokens)
    )


# --- the loss, by hand -----------------------------------------------------------------------


def test_image_contrast_loss_by_hand():
    """beta = 0.5. Pair 1: d_clean = 0.4, d_noised = -0.6: margin 0.5 * 1.0 = 0.5,
    loss = log(1 + e^-0.5) = 0.4740770. Pair 2: d_clean = -0.2, d_noised = 0.2: margin -0.2,
    loss = log(1 + e^0.2) = 0.7981389 (the noised image explains the answer better: a big loss)."""
    losses, margins = image_contrast_loss(t(0.4, -0.2), t(-0.6, 0.2), beta=0.5)
    assert losses.tolist() == pytest.approx([0.4740770, 0.7981389], abs=1e-6)
    assert margins.tolist() == pytest.approx([0.5, -0.2], abs=1e-12)
    assert not margins.requires_grad


def test_the_gradient_raises_the_clean_score_and_lowers_the_noised_one():
    """d loss / d pi(y_c | clean) = -beta * sigmoid(-margin) = -0.5 * 1 / (1 + e^0.5)
    = -0.5 * 0.3775407 = -0.1887703 < 0; d loss / d pi(y_c | noised) = +0.1887703 > 0
    (beta 0.5, d_clean 0.4, d_noised -0.6, margin 0.5)."""
    clean, noised = t(0.4).requires_grad_(), t(-0.6).requires_grad_()
    losses, _ = image_contrast_loss(clean - 0.0, noised - 0.0, beta=0.5)
    losses.sum().backward()
    assert clean.grad.item() == pytest.approx(-0.1887703, abs=1e-6)
    assert noised.grad.item() == pytest.approx(0.1887703, abs=1e-6)


def scores():
    """One pair: pi_c = -10, pi_r = -12, ref_c = -10.4, ref_r = -11.6 (h = 0.4 + 0.4 = 0.8);
    on the noised image pi_n = -13, ref_n = -12.4 (d_noised = -0.6, d_clean = 0.4). n_c = 4,
    n_r = 2."""
    logps = policy([-10.0], [-12.0], [4], [2])
    return logps, t(-10.4), t(-11.6), NoisedChosen(t(-13.0), t(-12.4))


def test_the_total_is_dpo_plus_weight_times_the_image_loss_with_its_metrics():
    """beta 0.1, image_beta 0.5, weight 2: DPO = log(1 + e^-0.08) = 0.6539470; image margin
    0.5 * (0.4 + 0.6) = 0.5, image loss 0.4740770; total 0.6539470 + 2 * 0.4740770 = 1.6021009."""
    logps, ref_c, ref_r, noised = scores()
    settings = LossSettings(beta=0.1, image_weight=2.0, image_beta=0.5)
    losses, metrics = preference_loss(logps, ref_c, ref_r, settings, noised)
    assert losses.item() == pytest.approx(1.6021009, abs=1e-6)
    assert metrics["rewards/image_margin"].item() == pytest.approx(0.5, abs=1e-9)
    assert metrics["rewards/image_accuracies"].item() == 1.0
    assert metrics["logps/chosen_noised"].item() == -13.0
    assert metrics["loss/image"].item() == pytest.approx(0.4740770, abs=1e-6)


def test_image_beta_null_uses_beta():
    """beta = image_beta = 0.5: the image margin is 0.5 * 1.0 = 0.5 either way."""
    logps, ref_c, ref_r, noised = scores()
    unset = LossSettings(beta=0.5, image_weight=1.0)
    same = LossSettings(beta=0.5, image_weight=1.0, image_beta=0.5)
    a, _ = preference_loss(logps, ref_c, ref_r, unset, noised)
    b, _ = preference_loss(logps, ref_c, ref_r, same, noised)
    assert torch.equal(a, b)


def test_weight_zero_is_the_plain_loss_exactly():
    """image_weight 0 (the default): the same tensor and the same metric names as without the
    noised scores at all, so existing configs compute what they did."""
    logps, ref_c, ref_r, noised = scores()
    plain, plain_metrics = preference_loss(logps, ref_c, ref_r, LossSettings(beta=0.1))
    off, off_metrics = preference_loss(logps, ref_c, ref_r, LossSettings(beta=0.1), noised)
    assert torch.equal(plain, off)
    assert off_metrics.keys() == plain_metrics.keys()
    assert "loss/image" not in off_metrics


def test_average_log_prob_divides_both_log_ratios_by_the_chosen_tokens():
    """average_log_prob, n_c = 4, n_r = 2, beta 0.1, image_beta 0.5, weight 1:
    DPO: g = 0.4 / 4 - (-0.4) / 2 = 0.1 + 0.2 = 0.3, loss = log(1 + e^-0.03) = 0.6782597;
    image: d_clean = 0.4 / 4 = 0.1, d_noised = -0.6 / 4 = -0.15, margin 0.5 * 0.25 = 0.125,
    loss = log(1 + e^-0.125) = 0.6325990; total 1.3108587."""
    logps, ref_c, ref_r, noised = scores()
    settings = LossSettings(beta=0.1, image_weight=1.0, image_beta=0.5, average_log_prob=True)
    losses, metrics = preference_loss(logps, ref_c, ref_r, settings, noised)
    assert metrics["rewards/image_margin"].item() == pytest.approx(0.125, abs=1e-9)
    assert metrics["loss/image"].item() == pytest.approx(0.6325990, abs=1e-6)
    assert losses.item() == pytest.approx(1.3108587, abs=1e-6)
    # logps/chosen_noised stays the summed log-prob, as logps/chosen does.
    assert metrics["logps/chosen_noised"].item() == -13.0


def test_a_pair_without_an_image_adds_no_image_term():
    """Two pairs, the second text-only: its image loss is 0 (total = its DPO loss alone), and the
    image metrics are those of the first pair (margin 0.5, loss 0.4740770, weight 1)."""
    logps = policy([-10.0, -10.0], [-12.0, -12.0], [4, 4], [2, 2])
    noised = NoisedChosen(t(-13.0, -10.0), t(-12.4, -10.4), torch.tensor([True, False]))
    settings = LossSettings(beta=0.1, image_weight=1.0, image_beta=0.5)
    losses, metrics = preference_loss(logps, t(-10.4, -10.4), t(-11.6, -11.6), settings, noised)
    assert losses.tolist() == pytest.approx([0.6539470 + 0.4740770, 0.6539470], abs=1e-6)
    assert metrics["rewards/image_margin"].item() == pytest.approx(0.5, abs=1e-9)
    assert metrics["loss/image"].item() == pytest.approx(0.4740770, abs=1e-6)


def test_the_term_without_noised_scores_is_refused():
    logps, ref_c, ref_r, _ = scores()
    with pytest.raises(ValueError, match="noised images"):
        preference_loss(logps, ref_c, ref_r, LossSettings(image_weight=1.0))


# --- the settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "method", "message"),
    [
        ({"image_weight": -0.1}, "dpo", r"loss.image_weight must be >= 0"),
        ({"image_weight": math.nan}, "dpo", r"loss.image_weight must be >= 0"),
        ({"image_beta": 0.0}, "dpo", r"loss.image_beta must be > 0 or null"),
        (
            {"image_noise_step": 1000},
            "dpo",
            r"loss.image_noise_step must be an integer in \[0, 999",
        ),
        ({"image_noise_step": -1}, "dpo", r"loss.image_noise_step must be an integer"),
        ({"image_schedule": "cosine"}, "dpo", r"loss.image_schedule must be one of linear, sigm"),
        ({"image_weight": 1.0}, "sft", r"loss.image_weight 1.0 adds .* method is 'sft'"),
    ],
)
def test_bad_image_settings_are_named(tmp_path, loss, method, message):
    config = tiny_config(tmp_path, None, loss=LossSettings(**loss), method=method)
    with pytest.raises(ValueError, match=message):
        check_config(config)


def test_the_schema_schedules_are_the_diffusion_schedules():
    assert NOISE_SCHEDULES == SCHEDULES
    defaults = LossSettings()
    assert (defaults.image_weight, defaults.image_noise_step, defaults.image_schedule) == (
        0.0,
        500,
        "sigmoid",
    )


# --- which noised image ----------------------------------------------------------------------


def weaken_meta(request_index: int, step: int = 900) -> dict:
    """A weakened pair's meta as bootstrapping writes it (`answer_meta` + the indices)."""
    return {**answer_meta(WEAKEN, step), "request_index": request_index, "sample_index": 0}


def image_pairs() -> list:
    """The helper store's pairs, the weakened ones with the meta bootstrapping writes."""
    pairs = make_pairs()
    return [
        replace(p, meta=weaken_meta(10 + i)) if p.source == "weaken" else p
        for i, p in enumerate(pairs)
    ]


def expected_pixels(pair, clean: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    """The rule, written out: a weakened pair's own noise (step, schedule, seed, request and
    sample index of its meta, stream "noise"); any other pair the run's step, the "sigmoid"
    schedule here, eps keyed by (run seed, pair key, 0, "image")."""
    if pair.source == "weaken":
        m = pair.meta
        return weaken_noise_pixels(
            clean, m["noise_step"], WEAKEN, m["request_index"], m["sample_index"]
        )
    return noise_pixels(clean, step, "sigmoid", seed, pair.key, 0, "image")


@pytest.fixture(scope="module")
def loaded(tiny_llava_folder, one_torch_thread):
    """(model, processor) of the tiny LLaVA, fp32 on CPU, eager attention."""
    return load_model_and_processor(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
    )


def test_each_pair_is_noised_by_its_own_rule(loaded):
    """Weakened pairs get the very tensor bootstrapping noised (bit for bit), other pairs the
    run's step and keyed eps; the noise differs between pairs (its key is per pair)."""
    _, processor = loaded
    pairs = image_pairs()
    dataset = PairDataset(
        pairs, processor, images=make_images(), noise=ImageNoise(500, "sigmoid", 3)
    )
    seen = []
    for pair, item in zip(pairs, (dataset[i] for i in range(len(pairs))), strict=True):
        clean = item.vision["pixel_values"]
        noised = item.noised_vision["pixel_values"]
        assert torch.equal(noised, expected_pixels(pair, clean, 500, 3)), pair.key
        assert not torch.allclose(noised, clean)
        seen.append(noised)
    assert not torch.allclose(seen[0], seen[2])  # p0 and p2 are both weakened, other requests


def test_the_weakened_meta_bootstrap_writes_names_the_noise_it_drew(loaded):
    """The meta `weakened_answers` itself returns keys the same noised image: so a store's
    weakened pair is scored on the image its negative came from."""
    from bpo.bootstrap.weaken import weakened_answers
    from bpo.generate import TransformersGenerator

    model, processor = loaded
    image = make_images()["red.png"]
    request = {"messages": make_pairs()[0].prompt, "image": image}
    config = WeakenConfig(noise_steps=[700], seed=9, max_new_tokens=2, schedule="linear")
    generator = TransformersGenerator(model, processor, batch_size=1)
    (answer,) = weakened_answers(generator, [request], config, indices=[42])[0]
    pair = replace(make_pairs()[0], meta={**answer.meta, "generator": "tiny"})
    item = PairDataset(
        [pair], processor, images={"red.png": image}, noise=ImageNoise(5, "sigmoid", 0)
    )[0]
    drawn = weaken_noise_pixels(item.vision["pixel_values"], 700, config, 42, 0)
    assert torch.equal(item.noised_vision["pixel_values"], drawn)


def test_a_weakened_pair_without_its_noise_meta_is_a_bad_pair(loaded):
    _, processor = loaded
    pair = make_pairs()[0]  # source "weaken", no meta
    item = PairDataset(
        [pair], processor, images=make_images(), noise=ImageNoise(500, "sigmoid", 0)
    )[0]
    assert isinstance(item, BadPair) and item.reason == "no_noise_meta"
    assert "lacks noise_step, schedule, seed, request_index, sample_index" in item.message


# --- the scores ------------------------------------------------------------------------------


def naive_chosen_logp(model, item, pixels: torch.Tensor | None) -> float:
    """The model's own plain forward over [prompt | chosen] with the given pixels, summing the
    chosen tokens' log-probs (token j predicted by position j - 1)."""
    ids = torch.tensor([item.prompt_ids + item.chosen_ids])
    vision = {} if pixels is None else {"pixel_values": pixels}
    with torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **vision
        )
    logps = torch.log_softmax(logits.logits[0, :-1].double(), dim=-1)
    p = len(item.prompt_ids)
    targets = ids[0, p:]
    return float(logps[p - 1 :].gather(-1, targets[:, None]).sum())


def test_noised_chosen_logps_equal_the_models_own_forward(llava, pairs, image):
    """Three pairs of different lengths in one padded batch, the last text-only: each noised score
    equals the naive forward on its noised pixels within 1e-5, and differs from its clean score
    by more than 1e-3 where there is an image (the check would catch clean pixels)."""
    model, processor = llava
    batch_pairs = [*pairs[:2], replace(pairs[2], image=None)]
    dataset = PairDataset(
        batch_pairs, processor, images={"x.png": image}, noise=ImageNoise(700, "linear", 5)
    )
    items = [dataset[i] for i in range(3)]
    batch = collate_pairs(items, pad_token_id(processor))
    assert batch.tensors["has_image"].tolist() == [True, True, False]
    with torch.no_grad():
        noised = noised_chosen_logps(model, batch)
        clean = chosen_logps(model, batch)
    for k, item in enumerate(items):
        pixels = item.noised_vision.get("pixel_values")
        assert noised.chosen[k].item() == pytest.approx(
            naive_chosen_logp(model, item, pixels), abs=1e-5
        )
        if pixels is not None:
            assert abs(noised.chosen[k].item() - clean.chosen[k].item()) > 1e-3
    assert noised.chosen_tokens.tolist() == [len(i.chosen_ids) for i in items]


# --- the reference cache ---------------------------------------------------------------------


def test_a_pair_writes_its_noised_reference_only_when_it_has_one():
    """Pairs without `ref_noised_chosen_logp` serialize as before the field existed (a store's
    columns do not change); with it, the value round-trips."""
    pair = make_pairs()[1]
    assert "ref_noised_chosen_logp" not in pair.to_json()
    scored = replace(pair, ref_noised_chosen_logp=-12.5)
    assert scored.to_json()["ref_noised_chosen_logp"] == -12.5
    assert PreferencePair.from_json(scored.to_json()) == scored
    with pytest.raises(ValueError, match="field 'ref_noised_chosen_logp' must be finite"):
        replace(pair, ref_noised_chosen_logp=math.inf)


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    """Keep weight digests out of the user's ~/.cache."""
    monkeypatch.setenv("BPO_CACHE_DIR", str(tmp_path / "cache"))


def write_store(root, pairs):
    image_root = root / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    for name, picture in make_images().items():
        picture.save(image_root / name)
    with PairWriter(root / "pairs", {"stage": "image-test"}, overwrite=True) as writer:
        for pair in pairs:
            writer.write(pair)
    return root / "pairs", image_root


def test_the_refs_cache_holds_the_noised_scores_keyed_by_the_noise(
    loaded, tiny_llava_folder, tmp_path
):
    """Each entry's ref_noised_chosen_logp is the model's own forward on the pair's noised image
    (1e-5); the same settings reuse every entry; another image_noise_step is another file, whose
    injected pairs' scores change while weakened pairs keep theirs (their noise is their own); a
    weakened pair whose meta changes is recomputed."""
    model, processor = loaded
    store, image_root = write_store(tmp_path, image_pairs())
    identity = model_identity(str(tiny_llava_folder))

    def refs(step, **kwargs):
        noise = ImageNoise(step, "sigmoid", 0) if step is not None else None
        return ensure_reference_logps(
            model,
            processor,
            store,
            image_root,
            model_identity=identity,
            progress=False,
            noise=noise,
            **kwargs,
        )

    first = refs(500)
    assert first.computed == 6 and first.reused == 0
    images = make_images()
    for pair in first.pairs:
        item = encode_pair(pair, processor, images[pair.image])
        pixels = expected_pixels(pair, item.vision["pixel_values"], 500, 0)
        assert pair.ref_noised_chosen_logp == pytest.approx(
            naive_chosen_logp(model, item, pixels), abs=1e-5
        )
    lines = [json.loads(line) for line in first.path.read_text().splitlines()]
    assert [line["ref_noised_chosen_logp"] for line in lines] == [
        p.ref_noised_chosen_logp for p in first.pairs
    ]

    again = refs(500)
    assert (again.reused, again.computed, again.path) == (6, 0, first.path)
    other = refs(300)
    assert other.path != first.path and other.computed == 6
    for a, b in zip(first.pairs, other.pairs, strict=True):
        if a.source == "weaken":
            assert b.ref_noised_chosen_logp == pytest.approx(a.ref_noised_chosen_logp, abs=1e-6)
        else:
            assert abs(b.ref_noised_chosen_logp - a.ref_noised_chosen_logp) > 1e-4

    changed = image_pairs()
    changed[0] = replace(changed[0], meta={**changed[0].meta, "seed": 8})
    write_store(tmp_path, changed)
    rescored = refs(500)
    assert (rescored.reused, rescored.computed, rescored.stale) == (5, 1, 1)


def test_with_the_term_off_the_cache_is_the_one_it_was(loaded, tiny_llava_folder, tmp_path):
    """No noise: the fingerprint is the one computed without the image settings, and the lines
    carry no ref_noised_chosen_logp (existing caches stay valid, byte for byte)."""
    model, processor = loaded
    store, image_root = write_store(tmp_path, image_pairs())
    identity = model_identity(str(tiny_llava_folder))
    table = ensure_reference_logps(
        model, processor, store, image_root, model_identity=identity, progress=False
    )
    expected, _ = reference_fingerprint(identity, processor, max_length=None, dtype=torch.float32)
    assert table.fingerprint == expected
    assert all(
        "ref_noised_chosen_logp" not in json.loads(line)
        for line in table.path.read_text().splitlines()
    )
    assert all(p.ref_noised_chosen_logp is None for p in table.pairs)


# --- training --------------------------------------------------------------------------------


@pytest.fixture
def fresh(tiny_llava_folder, one_torch_thread):
    """A fresh (model, processor): training changes the model it is given."""
    return load_model_and_processor(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
    )


def test_the_first_step_adds_weight_times_log_2(tiny_llava_folder, fresh):
    """At step 0 the policy is the reference on both images (LoRA's B is 0, no dropout), so
    d_clean = d_noised = 0: the DPO loss is log 2 and the image loss log 2 too, the total
    (1 + 0.5) * 0.6931472 = 1.0397208 with weight 0.5 and the image margin 0. The 0 needs the
    training pass's noised image to be the reference pass's."""
    model, processor = fresh
    config = tiny_config(tiny_llava_folder, None, max_steps=1, loss=LossSettings(image_weight=0.5))
    result = train(config, model, processor, image_pairs(), make_images(), log=lambda _: None)
    first = result.history[0]
    assert first["loss"] == pytest.approx(1.5 * math.log(2), abs=1e-5)
    assert first["loss/image"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/image_margin"] == pytest.approx(0.0, abs=1e-5)
    assert (
        first["logps/chosen_noised"] < 0 and first["logps/chosen_noised"] != first["logps/chosen"]
    )


def test_training_from_a_store_logs_the_image_metrics(tiny_llava_folder, fresh, tmp_path):
    """Three steps from a store: every metrics line holds the four image metrics, finite, the
    accuracy a share; the store's refs file holds the noised scores."""
    model, processor = fresh
    store, image_root = write_store(tmp_path, image_pairs())
    config = tiny_config(
        tiny_llava_folder,
        tmp_path / "out",
        pairs=str(store),
        image_root=str(image_root),
        max_steps=3,
        loss=LossSettings(image_weight=1.0, image_noise_step=800),
    )
    train(config, model, processor, log=lambda _: None)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        for name in ("rewards/image_margin", "logps/chosen_noised", "loss/image"):
            assert math.isfinite(line[name]), name
        assert 0.0 <= line["rewards/image_accuracies"] <= 1.0
    (refs_file,) = (store / "refs").glob("*.jsonl")
    entries = [json.loads(x) for x in refs_file.read_text().splitlines()]
    assert len(entries) == 6 and all(math.isfinite(e["ref_noised_chosen_logp"]) for e in entries)


@pytest.mark.slow
def test_two_process_ddp_with_the_term_equals_one_process_accumulating_two(
    tiny_llava_folder, tmp_path, monkeypatch
):
    """Two forwards before one backward under DDP (the pair rows, then the noised rows), with a
    trained vision tower (find_unused_parameters): `torchrun --nproc_per_node 2` with batch 1 per
    process logs the curves, image metrics included, of one process with batch 1 x grad_accum 2,
    and the loss moves."""
    from test_distributed import metrics, one_and_two_processes

    loss = LossSettings(image_weight=1.0, image_beta=0.5)
    one_and_two_processes(
        tiny_llava_folder, tmp_path, monkeypatch, image_pairs(), train_vision_tower=True, loss=loss
    )
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "ddp")
    assert [line["step"] for line in two] == [line["step"] for line in one] == [1, 2, 3, 4, 5, 6]
    for name in ("loss", "rewards/margins", "rewards/image_margin", "logps/chosen_noised"):
        curve_one, curve_two = [line[name] for line in one], [line[name] for line in two]
        assert curve_two == pytest.approx(curve_one, abs=1e-5), name
    assert one[-1]["loss"] < one[0]["loss"] - 1e-3
