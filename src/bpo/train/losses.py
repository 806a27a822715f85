"""Preference losses as pure functions of per-pair answer log-probs (tensors of shape (B,)).

Notation, as in the DPO paper: for a pair, pi_c and pi_r are the policy's summed log-probs of the
chosen and rejected answers, ref_c and ref_r the frozen reference's, n_c and n_r the answers' token
counts. The implicit reward of an answer is beta * (pi - ref), and every loss here is a function
of the reward margin's core

    h = (pi_c - ref_c) - (pi_r - ref_r)          (summed log-ratios)
    g = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r   (mean per-token log-ratios)

    sigmoid  -log sigmoid(beta * h)                          DPO (Rafailov et al., 2023)
    cdpo     -(1 - eps) log sigmoid(beta * h)                conservative DPO (Mitchell, 2023):
               - eps log sigmoid(-beta * h)                    labels flipped w.p. eps
    robust   [-(1 - eps) log sigmoid(beta * h)               robust DPO (Chowdhury et al., 2024),
               + eps log sigmoid(-beta * h)] / (1 - 2 eps)     unbiased under flips w.p. eps
    ipo      (g - 1 / (2 * beta))^2                          IPO (Azar et al., 2023), length-
                                                               normalized as TRL 1.16's `ipo`
    ipo_sum  (h - 1 / (2 * beta))^2                          IPO on summed log-probs
    hinge    relu(1 - beta * h)                              SLiC (Zhao et al., 2023)

`preference_loss` adds the RPO term (Pang et al., 2024), alpha * the chosen answers' NLL per token
(per pair, or pooled over the batch's tokens), and optionally scores answers by their mean
per-token log-prob instead of the sum (both policy and reference, so h compares like with like).
docs/dpo-vs-trl.md sets each option beside TRL 1.16's.

The image-contrast term (mDPO, Wang et al., 2024; CHiP, Fu et al., 2025) prefers the chosen
answer on the clean image over the same answer on a noised image (`bpo.train.image_noise`). With
pi_n and ref_n the policy's and reference's log-probs of the chosen answer on the noised image,

    d_clean = pi_c - ref_c,   d_noised = pi_n - ref_n   (each / n_c with `average_log_prob`)
    image    -log sigmoid(beta_img * (d_clean - d_noised))

added with weight `image_weight` (`image_contrast_loss`).

The settings are checked once, before training (`bpo.train.config.check_loss`), not per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bpo.train.config import LENGTH_NORMALIZED_LOSSES, LossSettings
from bpo.train.logprobs import PairLogps


def _sigmoid(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return -F.logsigmoid(beta * h)


def _cdpo(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # The expected DPO loss when each label is flipped with chance eps.
    logits = beta * h
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _robust(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # The flipped term is subtracted and the sum rescaled, so the loss is unbiased under flips.
    logits = beta * h
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def _ipo(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # IPO regresses the margin onto 1/(2 beta) (beta plays the role of the paper's tau).
    return (h - 1 / (2 * beta)) ** 2


def _hinge(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return torch.relu(1 - beta * h)


LOSSES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": _sigmoid,
    "cdpo": _cdpo,
    "robust": _robust,
    "ipo": _ipo,  # on g: dpo_loss divides the log-ratios by the token counts first
    "ipo_sum": _ipo,
    "hinge": _hinge,
}


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss and the implicit rewards: (losses, chosen_rewards, rejected_rewards).

    All inputs are (B,); so are the outputs. The rewards, beta * (policy - reference) of the
    log-probs given, are detached: they are metrics, not part of the graph.

    Args:
        beta: the strength of the implicit KL penalty towards the reference.
        loss_type: a key of `LOSSES`; see the module docstring.
        label_smoothing: the assumed chance a pair's labels are flipped; read by "cdpo" and
            "robust" only.
        chosen_tokens, rejected_tokens: the answers' token counts (B,); needed by "ipo".
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    if loss_type in LENGTH_NORMALIZED_LOSSES:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(f"loss_type {loss_type!r} needs the answers' token counts")
        h = average_logps(chosen_logratios, chosen_tokens) - average_logps(
            rejected_logratios, rejected_tokens
        )
    else:
        h = chosen_logratios - rejected_logratios  # (B,)
    losses = LOSSES[loss_type](h, beta, label_smoothing)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def average_logps(logps: Tensor, tokens: Tensor) -> Tensor:
    """Summed log-probs turned into mean per-token log-probs; `tokens` is each answer's count (B,).

    An empty answer (0 tokens, summed log-prob 0) averages to 0 rather than NaN.
    """
    return logps / tokens.clamp(min=1).to(logps.dtype)


def nll_loss(chosen_logps: Tensor, chosen_tokens: Tensor) -> Tensor:
    """The chosen answers' negative log-likelihood per token, per pair (B,): the RPO/SFT term.

    Length-normalized so a long answer does not outweigh the preference loss of its pair.
    """
    return -average_logps(chosen_logps, chosen_tokens)


def pooled_nll_loss(chosen_logps: Tensor, chosen_tokens: Tensor) -> Tensor:
    """The batch's chosen-token NLL pooled over all its tokens, as per-pair shares (B,).

    The shares' mean is sum(-chosen_logps) / sum(chosen_tokens) (TRL's `sft` loss), so a trainer
    that averages per-pair losses gets the pooled mean; a long answer weighs more than a short one.
    """
    total = chosen_tokens.sum().clamp(min=1).to(chosen_logps.dtype)
    return -chosen_logps * (chosen_logps.numel() / total)


RPO_NLL: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "per_pair": nll_loss,
    "batch_tokens": pooled_nll_loss,
}


def image_contrast_loss(
    clean_logratios: Tensor, noised_logratios: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """Per-pair image-contrast loss -log sigmoid(beta * (d_clean - d_noised)) and its margins.

    clean_logratios, noised_logratios: d_clean and d_noised (B,), policy - reference log-probs
        of the chosen answer on the clean and on the noised image.
    Returns (losses, margins), both (B,); the margins beta * (d_clean - d_noised) are detached.
    """
    margins = beta * (clean_logratios - noised_logratios)  # (B,)
    return -F.logsigmoid(margins), margins.detach()


# The metrics the image-contrast term adds (`preference_loss`).
IMAGE_METRICS = (
    "rewards/image_margin",
    "rewards/image_accuracies",
    "logps/chosen_noised",
    "loss/image",
)


@dataclass
class NoisedChosen:
    """The chosen answers scored on the noised images, for the image-contrast term.

    Args:
        policy, reference: summed log-probs of the chosen answer on the noised image (B,).
        has_image: (B,) bool, the pairs with an image to noise; a text-only pair's term is 0.
            None: every pair has one.
    """

    policy: Tensor
    reference: Tensor
    has_image: Tensor | None = None


def _image_term(
    policy: PairLogps,
    ref_chosen: Tensor,
    noised: NoisedChosen | None,
    settings: LossSettings,
    metrics: dict[str, Tensor],
) -> Tensor:
    """The image-contrast losses (B,), 0 for pairs without an image; adds the term's metrics
    (means over the pairs with an image)."""
    if noised is None:
        raise ValueError(
            "loss.image_weight > 0 needs the chosen answers' log-probs on the noised images "
            "(preference_loss's `noised`)"
        )
    d_clean = policy.preference_chosen - ref_chosen  # (B,)
    d_noised = noised.policy - noised.reference  # (B,): the same answer tokens, so n_c too
    if settings.average_log_prob:
        d_clean = average_logps(d_clean, policy.preference_chosen_tokens)
        d_noised = average_logps(d_noised, policy.preference_chosen_tokens)
    beta = settings.beta if settings.image_beta is None else settings.image_beta
    losses, margins = image_contrast_loss(d_clean, d_noised, beta)
    has = torch.ones_like(margins) if noised.has_image is None else noised.has_image.to(margins)
    losses = losses * has
    count = has.sum().clamp(min=1)
    metrics["rewards/image_margin"] = (margins * has).sum() / count
    metrics["rewards/image_accuracies"] = ((margins > 0).to(has) * has).sum() / count
    metrics["logps/chosen_noised"] = (noised.policy.detach() * has).sum() / count
    metrics["loss/image"] = losses.detach().sum() / count
    return losses


def preference_loss(
    policy: PairLogps,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    settings: LossSettings,
    noised: NoisedChosen | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss per pair (B,) and batch-mean metrics under TRL's names.

    The metrics are detached 0-dim tensors, so a trainer can average them across processes before
    logging (and pays no device sync here).

    loss = preference loss (on summed, or with `average_log_prob` mean per-token, log-probs)
           + rpo_alpha * chosen NLL per token (per pair, or pooled over the batch: `rpo_nll`)
           + image_weight * image-contrast loss (`image_contrast_loss`; off at weight 0).

    Metrics: rewards/chosen, rewards/rejected, rewards/accuracies (share of pairs whose chosen
    reward beats the rejected one strictly), rewards/margins, logps/chosen, logps/rejected (the
    policy's summed log-probs, whatever `average_log_prob` says), and nll when rpo_alpha > 0. The
    rewards are beta * (policy - reference) of the log-probs the loss is given: mean per-token
    ones with `average_log_prob` (TRL 1.16 always logs summed ones), summed ones for "ipo".
    With image_weight > 0, also rewards/image_margin (beta_img * (d_clean - d_noised)),
    rewards/image_accuracies (share of pairs whose margin is > 0), logps/chosen_noised (the
    policy's summed log-prob of the chosen answer on the noised image) and loss/image, means over
    the pairs with an image.

    A dense preference (`loss.shared_token_weight` < 1): the preference terms score each answer
    by its weighted log-prob sum (`PairLogps.preference_chosen`), averaged over the sum of the
    weights; the reference's scores must be weighted alike. The NLL keeps the plain sums.

    Args:
        policy: the policy's summed log-probs and the answers' token counts, which the reference
            shares (it scored the same tokens).
        ref_chosen, ref_rejected: the reference's summed log-probs (B,), weighted as the
            policy's preference scores are.
        noised: the chosen answers on the noised images; needed when image_weight > 0.
    """
    scores = [policy.preference_chosen, policy.preference_rejected, ref_chosen, ref_rejected]
    tokens = [policy.preference_chosen_tokens, policy.preference_rejected_tokens]
    if settings.average_log_prob:
        scores = [average_logps(s, n) for s, n in zip(scores, tokens * 2, strict=True)]
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        *scores,
        beta=settings.beta,
        loss_type=settings.loss_type,
        label_smoothing=settings.label_smoothing,
        chosen_tokens=tokens[0],
        rejected_tokens=tokens[1],
    )
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy.chosen.detach().mean(),
        "logps/rejected": policy.rejected.detach().mean(),
    }
    if settings.rpo_alpha > 0:
        nll = RPO_NLL[settings.rpo_nll](policy.chosen, policy.chosen_tokens)
        losses = losses + settings.rpo_alpha * nll
        metrics["nll"] = nll.detach().mean()
    if settings.image_weight > 0:
        losses = losses + settings.image_weight * _image_term(
            policy, ref_chosen, noised, settings, metrics
        )
    return losses, metrics
