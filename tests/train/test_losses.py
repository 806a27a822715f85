"""Preference losses against numbers worked out by hand (each test's docstring shows the sums)."""

from __future__ import annotations

import math

import pytest
import torch

from bpo.train.config import LossSettings, check_loss
from bpo.train.logprobs import PairLogps
from bpo.train.losses import (
    LOSSES,
    average_logps,
    dpo_loss,
    nll_loss,
    pooled_nll_loss,
    preference_loss,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def policy(chosen, rejected, chosen_tokens, rejected_tokens) -> PairLogps:
    """The policy's summed log-probs of B pairs, with the answers' token counts."""
    return PairLogps(
        t(*chosen), t(*rejected), torch.tensor(chosen_tokens), torch.tensor(rejected_tokens)
    )


def pair_with_margin(h: float) -> tuple[torch.Tensor, ...]:
    """Log-probs with (pi_c - pi_r) - (ref_c - ref_r) = h; the reference margin is 0."""
    return t(-10.0), t(-10.0 - h), t(-11.0), t(-11.0)


def test_sigmoid_loss_at_margin_two():
    """beta=0.1, h=2: loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.8187308) = 0.5981389."""
    losses, _, _ = dpo_loss(*pair_with_margin(2.0), beta=0.1)
    assert losses.item() == pytest.approx(0.5981389, abs=1e-6)


def test_sigmoid_loss_at_zero_margin_is_log_two():
    """h=0 for any beta: -log sigmoid(0) = log 2 = 0.6931472."""
    losses, _, _ = dpo_loss(*pair_with_margin(0.0), beta=0.5)
    assert losses.item() == pytest.approx(0.6931472, abs=1e-6)


def test_cdpo_is_conservative_dpo_and_sigmoid_reads_no_smoothing():
    """beta=0.1, h=2, eps=0.1:
    cdpo: 0.9 * -log sigmoid(0.2) + 0.1 * -log sigmoid(-0.2)
    = 0.9 * 0.5981389 + 0.1 * log(1 + e^0.2) = 0.5383250 + 0.1 * 0.7981389 = 0.6181389;
    sigmoid with the same eps: plain DPO, 0.5981389.
    """
    cdpo, _, _ = dpo_loss(*pair_with_margin(2.0), loss_type="cdpo", label_smoothing=0.1)
    plain, _, _ = dpo_loss(*pair_with_margin(2.0), loss_type="sigmoid", label_smoothing=0.1)
    assert cdpo.item() == pytest.approx(0.6181389, abs=1e-6)
    assert plain.item() == pytest.approx(0.5981389, abs=1e-6)


def test_robust_dpo_subtracts_the_flipped_term_and_rescales():
    """beta=0.1, eps=0.1: h=2: (0.9 * 0.5981389 - 0.1 * 0.7981389) / 0.8 = 0.4585111 / 0.8
    = 0.5731389;  h=0: (0.9 - 0.1) * log 2 / 0.8 = log 2 = 0.6931472;  eps=0 is plain DPO."""
    cases = [(2.0, 0.1, 0.5731389), (0.0, 0.1, 0.6931472), (2.0, 0.0, 0.5981389)]
    for h, eps, expected in cases:
        losses, _, _ = dpo_loss(*pair_with_margin(h), loss_type="robust", label_smoothing=eps)
        assert losses.item() == pytest.approx(expected, abs=1e-6), (h, eps)


def test_ipo_sum_loss():
    """IPO on summed log-probs, (h - 1/(2 beta))^2:
    beta=0.1, h=2: (2 - 5)^2 = 9;  beta=0.25, h=3: (3 - 2)^2 = 1;  beta=0.25, h=2: 0.
    """
    cases = [(0.1, 2.0, 9.0), (0.25, 3.0, 1.0), (0.25, 2.0, 0.0)]
    for beta, h, expected in cases:
        losses, _, _ = dpo_loss(*pair_with_margin(h), beta=beta, loss_type="ipo_sum")
        assert losses.item() == pytest.approx(expected, abs=1e-9), (beta, h)


def test_ipo_compares_mean_per_token_log_ratios():
    """pi_c=-4 (2 tokens), ref_c=-10: log-ratio 6, per token 3; pi_r=-9 (3 tokens), ref_r=-6:
    log-ratio -3, per token -1; g = 3 + 1 = 4, beta=0.5: (4 - 1)^2 = 9 (ipo_sum: (9 - 1)^2 = 64).
    The rewards stay summed: 0.5 * 6 = 3 and 0.5 * -3 = -1.5."""
    logps = (t(-4.0), t(-9.0), t(-10.0), t(-6.0))
    counts = {"chosen_tokens": torch.tensor([2]), "rejected_tokens": torch.tensor([3])}
    losses, chosen, rejected = dpo_loss(*logps, beta=0.5, loss_type="ipo", **counts)
    summed, _, _ = dpo_loss(*logps, beta=0.5, loss_type="ipo_sum", **counts)
    assert losses.item() == pytest.approx(9.0, abs=1e-9)
    assert summed.item() == pytest.approx(64.0, abs=1e-9)
    assert (chosen.item(), rejected.item()) == pytest.approx((3.0, -1.5))
    with pytest.raises(ValueError, match="'ipo' needs the answers' token counts"):
        dpo_loss(*logps, loss_type="ipo")


def test_hinge_loss():
    """relu(1 - beta h): beta=0.1, h=2 -> 0.8;  h=20 -> relu(-1) = 0;  h=-5 -> 1.5."""
    cases = [(2.0, 0.8), (20.0, 0.0), (-5.0, 1.5)]
    for h, expected in cases:
        losses, _, _ = dpo_loss(*pair_with_margin(h), beta=0.1, loss_type="hinge")
        assert losses.item() == pytest.approx(expected, abs=1e-9), h


def test_rewards_and_margin_use_both_models():
    """pi_c=-10, pi_r=-15, ref_c=-12, ref_r=-13, beta=0.1:
    chosen reward 0.1 * (-10 + 12) = 0.2, rejected 0.1 * (-15 + 13) = -0.2,
    h = (-10 + 15) - (-12 + 13) = 5 - 1 = 4, loss = log(1 + e^-0.4) = log(1.6703200) = 0.5130153.
    """
    losses, chosen, rejected = dpo_loss(t(-10.0), t(-15.0), t(-12.0), t(-13.0), beta=0.1)
    assert chosen.item() == pytest.approx(0.2)
    assert rejected.item() == pytest.approx(-0.2)
    assert losses.item() == pytest.approx(0.5130153, abs=1e-6)


def test_batch_is_per_pair():
    """Two pairs in one batch give each its own loss: h=2 -> 0.5981389, h=0 -> 0.6931472."""
    a, b = pair_with_margin(2.0), pair_with_margin(0.0)
    batch = [torch.cat([x, y]) for x, y in zip(a, b, strict=True)]
    losses, _, _ = dpo_loss(*batch, beta=0.1)
    assert losses.shape == (2,)
    assert losses.tolist() == pytest.approx([0.5981389, 0.6931472], abs=1e-6)


def test_sigmoid_gradient_raises_chosen_and_lowers_rejected():
    """d loss / d pi_c = -beta * sigmoid(-beta h) = -0.1 * sigmoid(-0.2) = -0.1 * 0.4501660
    = -0.0450166 at h=2, and d loss / d pi_r is its negative; the reference gets no gradient
    of its own (it is an input, but a descent step on the policy raises pi_c, lowers pi_r).
    """
    pi_c, pi_r, ref_c, ref_r = (x.clone().requires_grad_(True) for x in pair_with_margin(2.0))
    losses, chosen, rejected = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)
    losses.sum().backward()
    assert pi_c.grad.item() == pytest.approx(-0.0450166, abs=1e-6)
    assert pi_r.grad.item() == pytest.approx(0.0450166, abs=1e-6)
    assert pi_c.grad.item() < 0
    assert not chosen.requires_grad and not rejected.requires_grad


def test_average_logps_and_empty_answer():
    """-12 over 4 tokens = -3;  -10 over 2 = -5;  0 over 0 tokens = 0 (not NaN)."""
    out = average_logps(t(-12.0, -10.0, 0.0), torch.tensor([4, 2, 0]))
    assert out.tolist() == [-3.0, -5.0, 0.0]


def test_nll_loss_is_per_token():
    """-(-12) / 4 = 3 and -(-7) / 7 = 1."""
    assert nll_loss(t(-12.0, -7.0), torch.tensor([4, 7])).tolist() == [3.0, 1.0]


def test_pooled_nll_shares_average_to_the_token_mean():
    """-12 over 4 tokens and -2 over 1: pooled (12 + 2) / 5 = 2.8, shared per pair as 12 * 2/5
    = 4.8 and 2 * 2/5 = 0.8 (mean 2.8); per pair the NLLs are 3 and 2 (mean 2.5)."""
    pooled = pooled_nll_loss(t(-12.0, -2.0), torch.tensor([4, 1]))
    assert pooled.tolist() == pytest.approx([4.8, 0.8])
    assert nll_loss(t(-12.0, -2.0), torch.tensor([4, 1])).tolist() == [3.0, 2.0]


def test_rpo_nll_setting_chooses_the_token_average():
    """Two pairs, both h=2 with beta=0.1 (DPO 0.5981389 each); chosen -12 over 4 tokens and -2
    over 1, alpha=0.5. per_pair: losses 0.5981389 + 0.5 * 3 = 2.0981389 and 0.5981389 + 0.5 * 2
    = 1.5981389, nll 2.5; batch_tokens: 0.5981389 + 0.5 * 4.8 = 2.9981389 and 0.5981389 + 0.4
    = 0.9981389, nll 2.8."""
    args = (policy([-12.0, -2.0], [-10.0, -3.0], [4, 1], [2, 3]), t(-16.0, -3.0), t(-12.0, -2.0))
    per_pair, m1 = preference_loss(*args, LossSettings(rpo_alpha=0.5))
    pooled, m2 = preference_loss(*args, LossSettings(rpo_alpha=0.5, rpo_nll="batch_tokens"))
    assert per_pair.tolist() == pytest.approx([2.0981389, 1.5981389], abs=1e-6)
    assert pooled.tolist() == pytest.approx([2.9981389, 0.9981389], abs=1e-6)
    assert (m1["nll"].item(), m2["nll"].item()) == pytest.approx((2.5, 2.8))


def test_average_log_prob_changes_the_margin():
    """pi_c=-12 (4 tokens), pi_r=-10 (2), ref_c=-16 (4), ref_r=-12 (2), beta=0.1.
    Summed:   h = (-12 + 10) - (-16 + 12) = -2 + 4 = 2  -> loss 0.5981389.
    Averaged: pi_c=-3, pi_r=-5, ref_c=-4, ref_r=-6, h = 2 - 2 = 0 -> loss log 2 = 0.6931472,
    and rewards 0.1 * (-3 + 4) = 0.1, 0.1 * (-5 + 6) = 0.1.
    """
    args = (policy([-12.0], [-10.0], [4], [2]), t(-16.0), t(-12.0))
    summed, _ = preference_loss(*args, LossSettings(beta=0.1))
    averaged, metrics = preference_loss(*args, LossSettings(beta=0.1, average_log_prob=True))
    assert summed.item() == pytest.approx(0.5981389, abs=1e-6)
    assert averaged.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.1)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.1)
    # logps/* report the policy's summed log-probs either way.
    assert metrics["logps/chosen"].item() == -12.0


def test_rpo_adds_alpha_times_chosen_nll():
    """As above, summed (h=2, DPO 0.5981389); chosen NLL = 12 / 4 = 3, alpha = 0.5:
    loss = 0.5981389 + 0.5 * 3 = 2.0981389, metric nll = 3.
    """
    args = (policy([-12.0], [-10.0], [4], [2]), t(-16.0), t(-12.0))
    losses, metrics = preference_loss(*args, LossSettings(beta=0.1, rpo_alpha=0.5))
    assert losses.item() == pytest.approx(2.0981389, abs=1e-6)
    assert metrics["nll"].item() == pytest.approx(3.0)
    _, plain = preference_loss(*args, LossSettings(beta=0.1))
    assert "nll" not in plain


def test_metrics_are_batch_means_with_trl_names():
    """Pair A: pi_c=-10, pi_r=-15, ref_c=-12, ref_r=-13 -> rewards 0.2, -0.2 (chosen wins).
    Pair B: pi_c=-20, pi_r=-18, ref_c=-19, ref_r=-19 -> rewards -0.1, 0.1 (rejected wins).
    Pair C: pi_c=-5, pi_r=-5, ref_c=-5, ref_r=-5 -> rewards 0, 0 (a tie is not a win).
    rewards/chosen = (0.2 - 0.1 + 0) / 3 = 0.0333333, rewards/rejected = (-0.2 + 0.1 + 0) / 3
    = -0.0333333, margins = (0.4 - 0.2 + 0) / 3 = 0.0666667, accuracies = 1/3,
    logps/chosen = (-10 - 20 - 5) / 3 = -11.6666667, logps/rejected = (-15 - 18 - 5) / 3
    = -12.6666667.
    """
    losses, metrics = preference_loss(
        policy([-10.0, -20.0, -5.0], [-15.0, -18.0, -5.0], [3, 3, 3], [3, 3, 3]),
        t(-12.0, -19.0, -5.0),
        t(-13.0, -19.0, -5.0),
        LossSettings(beta=0.1),
    )
    expected = {
        "rewards/chosen": 0.0333333,
        "rewards/rejected": -0.0333333,
        "rewards/accuracies": 1 / 3,
        "rewards/margins": 0.0666667,
        "logps/chosen": -11.6666667,
        "logps/rejected": -12.6666667,
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert metrics[name].item() == pytest.approx(value, abs=1e-6), name
        assert not metrics[name].requires_grad
    assert losses.shape == (3,)


def test_every_configurable_loss_type_has_a_loss():
    """The schema's loss_type choices are exactly the dispatch dict's keys."""
    from typing import get_args

    from bpo.train.config import LossType

    expected = {"sigmoid", "cdpo", "robust", "ipo", "ipo_sum", "hinge"}
    assert set(get_args(LossType)) == set(LOSSES) == expected


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            LossSettings(label_smoothing=0.1),
            "loss.label_smoothing is read only by loss.loss_type 'cdpo' .* and 'robust' .*, "
            "not 'sigmoid'; set label_smoothing to 0 or choose one of those",
        ),
        (LossSettings(loss_type="ipo", label_smoothing=0.1), "not 'ipo'"),
        (
            LossSettings(loss_type="ipo", average_log_prob=True),
            "loss.average_log_prob would normalize loss.loss_type 'ipo' twice",
        ),
    ],
)
def test_check_loss_refuses_settings_no_loss_reads(settings, message):
    with pytest.raises(ValueError, match=message):
        check_loss(settings)


def test_check_loss_accepts_smoothing_where_it_is_read():
    """cdpo and robust read eps just below 0.5; ipo_sum may average the log-probs."""
    for loss_type in ("cdpo", "robust"):
        check_loss(LossSettings(loss_type=loss_type, label_smoothing=0.49))
    check_loss(LossSettings(loss_type="ipo_sum", average_log_prob=True))
