"""The reference pass's group rows: a sample's pairs scored in one row, for every family.

A group row is `[prefix | chosen | rejected_1 | ... | rejected_k]`. The oracle for each pair is
the model's own plain forward of prompt + answer (`plain_answer_logp`, every processor output
passed), as for the pair rows; the group rows must also equal the pair rows of the same pairs,
so that a reference computed either way gives the same first-step rewards.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_family_logprobs import FAMILIES, plain_answer_logp

from bpo.data.records import PreferencePair
from bpo.models import load_model_and_processor
from bpo.models.family import packing_refusal
from bpo.train.batch import REJECTED, collate_pairs, encode_pair
from bpo.train.groups import branch_sums, collate_groups, group_pairs, group_scores
from bpo.train.logprobs import pair_logps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DESCRIBE = [{"role": "user", "content": "<image>\nDescribe the image."}]
TEXT_ONLY = [{"role": "user", "content": "What is in the image?"}]
CHOSEN = "a red circle and a blue square ."
# Sample 0 (image): three negatives; sample 1 (another image, same prompt and chosen): one;
# sample 2 (no image): two. The pairs are interleaved, as a store's chunks interleave them.
PAIRS = [
    (0, DESCRIBE, CHOSEN, "a green triangle ."),
    (1, DESCRIBE, CHOSEN, "two squares ."),
    (0, DESCRIBE, CHOSEN, "a red circle and a purple square ."),
    (2, TEXT_ONLY, "a yellow square .", "a purple circle and a red square ."),
    (0, DESCRIBE, CHOSEN, "three circles and a blue triangle and a red square ."),
    (2, TEXT_ONLY, "a yellow square .", "nothing ."),
]


def _images():
    first = Image.new("RGB", (40, 30), (255, 0, 0))
    first.paste((0, 0, 255), (20, 0, 40, 30))
    second = Image.new("RGB", (36, 48), (0, 200, 0))
    return [first, second, None]


def _encoded(processor):
    images = _images()
    pairs = [
        PreferencePair(
            id=f"p{i}", image=f"{s}.png", prompt=prompt, chosen=c, rejected=r, source="weaken"
        )
        for i, (s, prompt, c, r) in enumerate(PAIRS)
    ]
    items = [
        encode_pair(pair, processor, images[s]) for pair, (s, *_) in zip(pairs, PAIRS, strict=True)
    ]
    return pairs, items


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tiny_families):
    model, processor = load_model_and_processor(
        str(tiny_families(request.param)),
        dtype="float32",
        device="cpu",
        attn_implementation="eager",
    )
    return request.param, model, processor


def test_group_pairs_joins_the_pairs_of_one_image_prompt_and_chosen(family):
    """Six pairs, three samples: the groups are {p0, p2, p4}, {p1}, {p3, p5}, first-seen order
    (p1 shares prompt and chosen with p0 but not the image, so it is its own sample)."""
    _, _, processor = family
    _, items = _encoded(processor)
    groups = group_pairs(items)
    assert [[item.key.split(":")[0] for item in group] for group in groups] == [
        ["p0", "p2", "p4"],
        ["p1"],
        ["p3", "p5"],
    ]


def test_group_rows_equal_the_models_own_forward_and_the_pair_rows(family):
    name, model, processor = family
    pairs, items = _encoded(processor)
    images = _images()
    pad = processor.tokenizer.pad_token_id
    if packing_refusal(model):  # Qwen3.5's linear attention: score_pairs keeps pair rows
        with pytest.raises(ValueError, match="carry state along a packed row"):
            group_scores(model, collate_groups(group_pairs(items), pad))
        return
    with torch.no_grad():
        grouped = {
            row[0]: row[1:] for row in group_scores(model, collate_groups(group_pairs(items), pad))
        }
        per_pair = pair_logps(model, collate_pairs(items, pad))
        for i, (pair, (s, prompt, chosen, rejected)) in enumerate(zip(pairs, PAIRS, strict=True)):
            got_c, got_r, n_c, n_r, truncated = grouped[pair.key]
            oracle_c = plain_answer_logp(model, processor, prompt, chosen, images[s])
            oracle_r = plain_answer_logp(model, processor, prompt, rejected, images[s])
            assert abs(got_c - float(oracle_c)) < 1e-4, (name, pair.key)
            assert abs(got_r - float(oracle_r)) < 1e-4, (name, pair.key)
            # Float rounding only: another row length sums the same terms in another order.
            for got, row in ((got_c, per_pair.chosen[i]), (got_r, per_pair.rejected[i])):
                assert abs(got - float(row)) <= 1e-5 + 1e-6 * abs(got), (name, pair.key)
            assert (n_c, n_r) == (len(items[i].chosen_ids), len(items[i].rejected_ids))
            assert truncated is False


def test_branch_sums_add_each_branchs_tokens():
    """Row 0: chosen (1) tokens -1 and -2, rejected_0 (2) -3, rejected_1 (3) -4 and -5, one
    unused slot (0) holding -9 that must not count: sums [0, -3, -3, -9], counts [0, 2, 1, 2]."""
    logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0, -9.0]])
    branch = torch.tensor([[1, 1, REJECTED, REJECTED + 1, REJECTED + 1, 0]])
    sums, counts = branch_sums(logps, branch, REJECTED + 2)
    assert sums.tolist() == [[0.0, -3.0, -3.0, -9.0]]
    assert counts.tolist() == [[0, 2, 1, 2]]
