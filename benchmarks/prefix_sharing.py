"""Scoring both answers of a pair: naive batch of two vs packed shared prefix vs KV-cache prefix.

Run: python benchmarks/prefix_sharing.py [--pairs 4] [--repeats 7] [--threads 1]

One training step = forward + backward of sum(chosen - rejected) over every parameter (full
fine-tune, fp32) of a LLaVA-shaped tiny model: a CLIP tower on 224x224 images with 16x16 patches
(196 image tokens), a ~20-token prompt and ~48-token answers (44 to 52, drawn with a fixed seed).

  naive   `bpo.train.logprobs.naive_pair_logps`: 2B rows [prefix + chosen; prefix + rejected],
          the image encoded twice per pair, full logits.
  packed  `bpo.train.logprobs.pair_logps`: one row [prefix | chosen | rejected] per pair with a
          block attention mask; the library's path.
  kv      prefix forward (with pixel_values) once, its cache repeated for the two answers, one
          continuation pass over 2B answer rows (without pixel_values). Lives here only; the
          prefixes are of equal length so no left-padding is needed.

The three variants run round-robin, `--repeats` times each after a warm-up, and the median step
time is reported, with ratios to naive. Memory is the size of the tensors autograd saves for the
backward pass (deduplicated by storage): the activation memory a step holds at its peak, measured
the same way on CPU and GPU. Each variant's log-probs are checked against naive first.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from bpo.models.tiny import TinyLlavaConfig, build_tiny_llava
from bpo.train.batch import EncodedPair, PairBatch, collate_pairs
from bpo.train.logprobs import PairLogps, naive_pair_logps, pair_logps

CONFIG = TinyLlavaConfig(
    image_size=224,
    patch_size=16,  # 14 x 14 = 196 image tokens, as LLaVA-1.5's 336 / 14 = 24 x 24 is 576
    vision_hidden_size=128,
    vision_layers=2,
    vision_heads=4,
    vision_intermediate_size=256,
    text_hidden_size=128,
    text_layers=2,
    text_heads=4,
    text_intermediate_size=384,
    max_position_embeddings=512,
)
TEXTS = ["a red circle and a blue square .", "Describe the image. What is in it? yes no"] * 8
PROMPT_TOKENS = 20
ANSWER_TOKENS = (44, 52)


def make_batch(processor, pairs: int, seed: int = 0) -> PairBatch:
    """`pairs` pairs of random token ids: BOS, 196 image tokens, a prompt, two answers."""
    rng = random.Random(seed)
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    words = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    items = []
    for i in range(pairs):
        prompt = [tokenizer.bos_token_id] + [image_id] * CONFIG.num_image_tokens
        prompt += rng.choices(words, k=PROMPT_TOKENS)
        chosen = rng.choices(words, k=rng.randint(*ANSWER_TOKENS))
        rejected = rng.choices(words, k=rng.randint(*ANSWER_TOKENS))
        pixels = torch.randn(1, 3, CONFIG.image_size, CONFIG.image_size)
        items.append(EncodedPair(f"p{i}", prompt, chosen, rejected, {"pixel_values": pixels}))
    return collate_pairs(items, tokenizer.pad_token_id)


def kv_pair_logps(model, batch: PairBatch) -> PairLogps:
    """Prefix once with the image, its cache repeated for 2B continuation rows without it."""
    t = batch.tensors
    prefix_len = int(t["prefix_lengths"][0])
    assert bool((t["prefix_lengths"] == prefix_len).all()), "kv variant needs equal prefixes"
    prefix = model(
        input_ids=t["input_ids"][:, :prefix_len],
        pixel_values=t["pixel_values"],
        use_cache=True,
        logits_to_keep=1,
    )
    cache = prefix.cache
    cache.batch_repeat_interleave(2)  # rows: p0 chosen, p0 rejected, p1 chosen, ...
    answers, lengths = _answer_rows(batch, prefix_len)  # (2B, A), (2B,)
    width = answers.shape[1]
    j = torch.arange(width)[None, :]
    valid = j < lengths[:, None]  # (2B, A)
    attention = torch.cat([torch.ones(len(answers), prefix_len, dtype=torch.long), valid], dim=1)
    out = model(
        input_ids=answers,
        attention_mask=attention,
        position_ids=prefix_len + j.expand_as(answers),
        cache=cache,
        use_cache=False,
    )
    first = prefix.logits[:, -1].repeat_interleave(2, dim=0)  # (2B, V) predicts answer token 0
    logits = torch.cat([first[:, None], out.logits[:, :-1]], dim=1)  # (2B, A, V)
    logps = torch.log_softmax(logits.float(), -1).gather(-1, answers[..., None]).squeeze(-1)
    sums = (logps * valid).sum(-1).view(-1, 2)
    counts = valid.sum(-1).view(-1, 2)
    return PairLogps(sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1])


def _answer_rows(batch: PairBatch, prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, A) answer ids (chosen, rejected per pair), right-padded, and their lengths."""
    t = batch.tensors
    rows, lengths = [], []
    for i in range(len(batch)):
        c, r = int(t["chosen_lengths"][i]), int(t["rejected_lengths"][i])
        ids = t["input_ids"][i]
        rows += [ids[prefix_len : prefix_len + c], ids[prefix_len + c : prefix_len + c + r]]
        lengths += [c, r]
    answers = torch.nn.utils.rnn.pad_sequence(
        rows, batch_first=True, padding_value=batch.extra["pad_token_id"]
    )
    return answers, torch.tensor(lengths)


VARIANTS = {"naive": naive_pair_logps, "packed": pair_logps, "kv": kv_pair_logps}


def step(model, variant, batch: PairBatch) -> int:
    """One forward + backward; returns the bytes autograd saved for the backward pass."""
    storages: dict[int, int] = {}

    def pack(tensor):
        if tensor.numel():
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logps = VARIANTS[variant](model, batch)
    (logps.rejected - logps.chosen).sum().backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for ptr, size in storages.items() if ptr not in params)


def check_equal(model, batch: PairBatch) -> None:
    """Every variant's log-probs equal naive's (fp32)."""
    with torch.no_grad():
        reference = naive_pair_logps(model, batch)
        for name in ("packed", "kv"):
            got = VARIANTS[name](model, batch)
            diff = max(
                (got.chosen - reference.chosen).abs().max().item(),
                (got.rejected - reference.rejected).abs().max().item(),
            )
            assert diff < 1e-3, f"{name} differs from naive by {diff}"
            print(f"{name:>6}: max |logp - naive| = {diff:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4, help="pairs per batch")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, processor = build_tiny_llava(TEXTS, CONFIG, seed=0)
    model.set_attn_implementation(args.attn)
    model.train()
    batch = make_batch(processor, args.pairs)
    t = batch.tensors
    print(
        f"{args.pairs} pairs, prefix {int(t['prefix_lengths'][0])} tokens "
        f"({CONFIG.num_image_tokens} image), answers {t['chosen_lengths'].tolist()} / "
        f"{t['rejected_lengths'].tolist()}, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters, attention {args.attn}, {args.threads} thread(s)"
    )
    check_equal(model, batch)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    saved: dict[str, int] = {}
    for name in VARIANTS:  # warm-up
        saved[name] = step(model, name, batch)
    for _ in range(args.repeats):
        for name in VARIANTS:
            start = time.perf_counter()
            step(model, name, batch)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["naive"])
    print(f"{'variant':>7} {'step ms':>8} {'speed-up':>9} {'saved MiB':>10}")
    for name in VARIANTS:
        median = statistics.median(times[name])
        print(f"{name:>7} {median * 1e3:8.1f} {base / median:8.2f}x {saved[name] / 2**20:10.1f}")


if __name__ == "__main__":
    main()
