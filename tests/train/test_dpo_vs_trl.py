"""bpo's DPO options against TRL 1.16's own loss code, on the same per-token log-probs.

TRL 1.16 has no loss function apart from its trainer: `DPOTrainer._compute_loss` runs the model,
sums per-token log-probs and applies the loss. Here it runs unchanged on a stand-in trainer (the
attributes `DPOTrainer.__init__` sets from a `DPOConfig`) and a stand-in model that returns the
given per-token log-probs, with precomputed reference log-probs; so every formula, reduction and
logged metric is TRL's own. docs/dpo-vs-trl.md tabulates the differences these tests pin.

The pairs (B=2; per-token log-probs of the chosen and rejected answers, reference sums):
    A: chosen [-1, -2, -3, -6] (sum -12, 4 tokens), rejected [-4, -6] (sum -10, 2 tokens),
       ref_c -16, ref_r -12: log-ratios 4 and 2, summed margin h = 2, per-token margin g = 0.
    B: chosen [-2] (sum -2, 1 token), rejected [-1, -1, -1] (sum -3, 3 tokens),
       ref_c -3, ref_r -2: log-ratios 1 and -1, h = 2, g = 1 + 1/3 = 4/3.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from bpo.train.config import LossSettings
from bpo.train.logprobs import PairLogps
from bpo.train.losses import preference_loss

CHOSEN = [[-1.0, -2.0, -3.0, -6.0], [-2.0]]
REJECTED = [[-4.0, -6.0], [-1.0, -1.0, -1.0]]
REF_CHOSEN = [-16.0, -3.0]
REF_REJECTED = [-12.0, -2.0]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@pytest.fixture(scope="module")
def trl_trainer():
    """TRL 1.16's DPOTrainer class (trl, in the dev extra, is imported here: it is slow to load)."""
    import trl
    from trl.trainer.dpo_trainer import DPOTrainer

    assert trl.__version__.startswith("1.16"), "docs/dpo-vs-trl.md describes TRL 1.16"
    return DPOTrainer


class _OneProcess:
    """accelerate's gathers on one process: the tensor itself."""

    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def trl_loss(trainer_cls, loss_type, loss_weights=None, beta=0.1, label_smoothing=0.0):
    """TRL's batch loss and logged metrics on the module's pairs (rows: chosen A, B; rejected A, B).

    Each row is one prompt token, then its answer: completion_mask marks the answer, and the model
    returns its per-token log-probs at the shifted positions (0 elsewhere, as TRL's fused head
    gives for label -100).
    """
    rows = CHOSEN + REJECTED
    width = 1 + max(map(len, rows))
    completion_mask = torch.zeros(len(rows), width, dtype=torch.long)
    log_probs = torch.zeros(len(rows), width - 1, dtype=torch.float64)
    for i, row in enumerate(rows):
        completion_mask[i, 1 : 1 + len(row)] = 1
        log_probs[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
    outputs = SimpleNamespace(
        log_probs=log_probs,
        entropy=torch.zeros_like(log_probs),
        mean_logits=torch.zeros_like(log_probs),
        is_top1=torch.zeros_like(log_probs, dtype=torch.bool),
    )
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    trainer = SimpleNamespace(  # what DPOTrainer.__init__ copies from DPOConfig
        model=SimpleNamespace(training=True),
        accelerator=_OneProcess(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(len(rows), width, dtype=torch.long),
        "attention_mask": torch.ones(len(rows), width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor(REF_CHOSEN, dtype=torch.float64),
        "ref_rejected_logps": torch.tensor(REF_REJECTED, dtype=torch.float64),
    }
    loss = trainer_cls._compute_loss(trainer, lambda **_: outputs, inputs, return_outputs=False)
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def bpo_loss(**settings):
    """bpo's batch loss (the mean of the per-pair losses, as `bpo train` reduces them) and metrics."""
    policy = PairLogps(
        torch.tensor([sum(r) for r in CHOSEN], dtype=torch.float64),
        torch.tensor([sum(r) for r in REJECTED], dtype=torch.float64),
        torch.tensor([len(r) for r in CHOSEN]),
        torch.tensor([len(r) for r in REJECTED]),
    )
    ref = [torch.tensor(x, dtype=torch.float64) for x in (REF_CHOSEN, REF_REJECTED)]
    losses, metrics = preference_loss(policy, *ref, LossSettings(**settings))
    return losses.mean().item(), {k: v.item() for k, v in metrics.items()}


def assert_same_metrics(bpo, trl, names=(*METRICS, "logps/chosen", "logps/rejected")):
    for name in names:
        assert bpo[name] == pytest.approx(trl[name], abs=1e-9), name


def test_sigmoid_and_hinge_equal_trl(trl_trainer):
    """Both pairs have h = 2. sigmoid: log(1 + e^-0.2) = 0.5981389 each, so the mean 0.5981389;
    hinge: relu(1 - 0.1 * 2) = 0.8. Rewards: chosen (0.4 + 0.1) / 2 = 0.25, rejected
    (0.2 - 0.1) / 2 = 0.05, margins 0.2, accuracies 1; logps/chosen (-12 - 2) / 2 = -7."""
    for loss_type, expected in (("sigmoid", 0.5981389), ("hinge", 0.8)):
        bpo, bpo_metrics = bpo_loss(loss_type=loss_type)
        trl, trl_metrics = trl_loss(trl_trainer, loss_type)
        assert bpo == pytest.approx(expected, abs=1e-6)
        assert bpo == pytest.approx(trl, abs=1e-12)
        assert_same_metrics(bpo_metrics, trl_metrics)
    assert bpo_metrics["rewards/chosen"] == pytest.approx(0.25)
    assert bpo_metrics["rewards/margins"] == pytest.approx(0.2)
    assert bpo_metrics["logps/chosen"] == -7.0


def test_ipo_is_trls_length_normalized_ipo(trl_trainer):
    """beta = 0.1, target 1/(2 beta) = 5. ipo on g: A (0 - 5)^2 = 25, B (4/3 - 5)^2 = (11/3)^2
    = 13.4444444, mean 19.2222222 (TRL's `ipo`). ipo_sum on h: (2 - 5)^2 = 9 for both, mean 9.
    The rewards stay the summed ones, as TRL logs them: chosen 0.25, rejected 0.05."""
    bpo, bpo_metrics = bpo_loss(loss_type="ipo")
    trl, trl_metrics = trl_loss(trl_trainer, "ipo")
    assert bpo == pytest.approx((25 + (11 / 3) ** 2) / 2, abs=1e-9)
    assert bpo == pytest.approx(trl, abs=1e-12)
    assert_same_metrics(bpo_metrics, trl_metrics)
    summed, _ = bpo_loss(loss_type="ipo_sum")
    assert summed == pytest.approx(9.0, abs=1e-12)


def test_robust_equals_trl_and_cdpo_is_not_trls_sigmoid(trl_trainer):
    """beta = 0.1, eps = 0.1, h = 2 for both pairs; -log sigmoid(0.2) = 0.5981389 and
    -log sigmoid(-0.2) = 0.7981389.
    robust: (0.9 * 0.5981389 - 0.1 * 0.7981389) / 0.8 = 0.4585111 / 0.8 = 0.5731389 (TRL's).
    cdpo:   0.9 * 0.5981389 + 0.1 * 0.7981389 = 0.6181389; TRL's `sigmoid` ignores eps: 0.5981389.
    """
    robust, _ = bpo_loss(loss_type="robust", label_smoothing=0.1)
    trl_robust, _ = trl_loss(trl_trainer, "robust", label_smoothing=0.1)
    assert robust == pytest.approx(0.5731389, abs=1e-6)
    assert robust == pytest.approx(trl_robust, abs=1e-12)
    cdpo, _ = bpo_loss(loss_type="cdpo", label_smoothing=0.1)
    trl_sigmoid, _ = trl_loss(trl_trainer, "sigmoid", label_smoothing=0.1)
    assert cdpo == pytest.approx(0.6181389, abs=1e-6)
    assert trl_sigmoid == pytest.approx(0.5981389, abs=1e-6)


def test_average_log_prob_is_trls_sigmoid_norm_but_logs_mean_rewards(trl_trainer):
    """sigmoid on g: A g = 0 -> log 2 = 0.6931472; B g = 4/3 -> log(1 + e^-0.1333333)
    = log(1.8751733) = 0.6287011; mean 0.6609241, as TRL's `sigmoid_norm`.
    bpo's rewards are on the mean log-ratios: chosen (0.1 * 1 + 0.1 * 1) / 2 = 0.1, rejected
    (0.1 * 1 + 0.1 * -1/3) / 2 = 0.0333333, margins 0.0666667. TRL logs the summed ones whatever
    the loss: chosen 0.25, rejected 0.05, margins 0.2. logps/* are summed on both sides."""
    bpo, bpo_metrics = bpo_loss(average_log_prob=True)
    trl, trl_metrics = trl_loss(trl_trainer, "sigmoid_norm")
    assert bpo == pytest.approx((math.log(2) + math.log1p(math.exp(-0.4 / 3))) / 2, abs=1e-9)
    assert bpo == pytest.approx(0.6609241, abs=1e-6)
    assert bpo == pytest.approx(trl, abs=1e-12)
    assert bpo_metrics["rewards/chosen"] == pytest.approx(0.1)
    assert bpo_metrics["rewards/rejected"] == pytest.approx(0.1 / 3)
    assert bpo_metrics["rewards/margins"] == pytest.approx(0.2 / 3)
    assert trl_metrics["rewards/chosen"] == pytest.approx(0.25)
    assert trl_metrics["rewards/rejected"] == pytest.approx(0.05)
    assert trl_metrics["rewards/margins"] == pytest.approx(0.2)
    assert_same_metrics(bpo_metrics, trl_metrics, names=("logps/chosen", "logps/rejected"))


def test_rpo_batch_tokens_is_trls_sft_term(trl_trainer):
    """sigmoid 0.5981389 plus alpha = 0.5 times the chosen NLL.
    batch_tokens: (12 + 2) / (4 + 1) = 2.8 -> 0.5981389 + 1.4 = 1.9981389, TRL's
        loss_type [sigmoid, sft] with loss_weights [1, 0.5].
    per_pair: (12/4 + 2/1) / 2 = 2.5 -> 0.5981389 + 1.25 = 1.8481389."""
    pooled, pooled_metrics = bpo_loss(rpo_alpha=0.5, rpo_nll="batch_tokens")
    trl, _ = trl_loss(trl_trainer, ["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    assert pooled == pytest.approx(1.9981389, abs=1e-6)
    assert pooled == pytest.approx(trl, abs=1e-12)
    assert pooled_metrics["nll"] == pytest.approx(2.8)
    per_pair, per_pair_metrics = bpo_loss(rpo_alpha=0.5)
    assert per_pair == pytest.approx(1.8481389, abs=1e-6)
    assert per_pair_metrics["nll"] == pytest.approx(2.5)


def test_lora_dropout_stays_on_where_trl_zeroes_it(trl_trainer, tiny_llava_folder):
    """bpo's LoRA adapters keep dropout 0.05 (the paper's recipe); TRL's DPOConfig defaults to
    disable_dropout=True, whose disable_dropout_in_model sets p = 0 in every nn.Dropout, the
    adapters' included."""
    from trl import DPOConfig
    from trl.trainer.utils import disable_dropout_in_model

    from bpo.models import load_model_and_processor
    from bpo.models.load import ModelConfig
    from bpo.train.config import TrainConfig
    from bpo.train.model import setup_trainable

    defaults = {f.name: f.default for f in dataclasses.fields(DPOConfig)}
    assert defaults["disable_dropout"] is True
    model, _ = load_model_and_processor(str(tiny_llava_folder), dtype="float32", device="cpu")
    model = setup_trainable(model, TrainConfig(model=ModelConfig(str(tiny_llava_folder))))
    adapter_dropouts = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    assert adapter_dropouts and {m.p for m in adapter_dropouts} == {0.05}
    disable_dropout_in_model(model)
    assert {m.p for m in adapter_dropouts} == {0.0}


@pytest.fixture(scope="module")
def llava_hf_processor(processor):
    """The tiny LLaVA's processor as llava-hf/llava-1.5-*-hf ships it: llava-hf's chat template
    (no end marker after an answer, a space after every turn) and a tokenizer that adds BOS."""
    from tokenizers import processors

    from bpo.models.tiny_families.llava_like import LLAVA_CHAT_TEMPLATE

    hf = copy.deepcopy(processor)
    hf.chat_template = LLAVA_CHAT_TEMPLATE
    tokenizer = hf.tokenizer
    bos = (tokenizer.bos_token, tokenizer.bos_token_id)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos[0]} $A", special_tokens=[bos]
    )
    return hf


def test_bpo_scores_bos_and_eos_where_trls_vision_collator_scores_a_space(
    trl_trainer, llava_hf_processor, image
):
    """The same pair through bpo's encode_pair and TRL's DataCollatorForVisionPreference.
    bpo: the prompt starts with BOS; the chosen answer is " a red circle ." then EOS.
    TRL: no BOS (it tokenizes with add_special_tokens=False); the completion is llava-hf's
    rendering after "ASSISTANT:", " a red circle . ": the same answer tokens, then a scored
    space token where bpo scores EOS."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from bpo.data.records import PreferencePair
    from bpo.train.batch import encode_pair

    tokenizer = llava_hf_processor.tokenizer
    pair = PreferencePair(
        id="one",
        image="x.png",
        prompt=[{"role": "user", "content": "<image>\nDescribe the image."}],
        chosen="a red circle .",
        rejected="a dog .",
        source="test",
    )
    ours = encode_pair(pair, llava_hf_processor, image)
    collate = DataCollatorForVisionPreference(llava_hf_processor)
    theirs = collate(
        [
            {
                "images": [image],
                "prompt": [{"role": "user", "content": "Describe the image."}],
                "chosen": [{"role": "assistant", "content": pair.chosen}],
                "rejected": [{"role": "assistant", "content": pair.rejected}],
            }
        ]
    )
    row = theirs["input_ids"][0][theirs["attention_mask"][0].bool()].tolist()
    completion = theirs["input_ids"][0][theirs["completion_mask"][0].bool()].tolist()

    assert ours.prompt_ids[0] == tokenizer.bos_token_id
    assert ours.chosen_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ours.chosen_ids[:-1]) == " a red circle ."
    assert row[: len(ours.prompt_ids) - 1] == ours.prompt_ids[1:]  # TRL's prompt: ours less BOS
    assert tokenizer.bos_token_id not in row and tokenizer.eos_token_id not in completion
    assert tokenizer.decode(completion) == " a red circle . "
    assert completion[:-1] == ours.chosen_ids[:-1] and tokenizer.decode(completion[-1:]) == " "
