"""Preference losses as pure functions of per-pair answer log-probs (tensors of shape (B,)).

Notation, as in the DPO paper: for a pair, pi_c and pi_r are the policy's summed log-probs of the
chosen and rejected answers, ref_c and ref_r the frozen reference's. The implicit reward of an
answer is beta * (pi - ref), and every loss here is a function of the reward margin's core

    h = (pi_c - pi_r) - (ref_c - ref_r)

    sigmoid  -log sigmoid(beta * h)                      DPO (Rafailov et al., 2023)
             -(1 - eps) log sigmoid(beta * h)            with label_smoothing eps: conservative
               - eps log sigmoid(-beta * h)                DPO / cDPO (labels flipped w.p. eps)
    ipo      (h - 1 / (2 * beta))^2                      IPO (Azar et al., 2023), TRL's form
    hinge    relu(1 - beta * h)                          SLiC (Zhao et al., 2023)

`preference_loss` adds the RPO term (Pang et al., 2024): alpha * the chosen answer's NLL per token,
and optionally scores answers by their mean per-token log-prob instead of the sum (both policy and
reference, so h compares like with like).

The settings are checked once, before training (`bpo.train.config.check_loss`), not per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from bpo.train.config import LossSettings
from bpo.train.logprobs import PairLogps


def _sigmoid(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    logits = beta * h
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _ipo(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # IPO regresses the margin onto 1/(2 beta) (beta plays the role of the paper's tau).
    return (h - 1 / (2 * beta)) ** 2


def _hinge(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return torch.relu(1 - beta * h)


LOSSES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": _sigmoid,
    "ipo": _ipo,
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
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss and the implicit rewards: (losses, chosen_rewards, rejected_rewards).

    All inputs are (B,); so are the outputs. The rewards, beta * (policy - reference), are detached:
    they are metrics, not part of the graph.

    Args:
        beta: the strength of the implicit KL penalty towards the reference.
        loss_type: "sigmoid" (DPO), "ipo" or "hinge"; see the module docstring.
        label_smoothing: the assumed chance that a pair's labels are flipped (conservative DPO);
            only with loss_type "sigmoid".
    """
    policy_margin = policy_chosen_logps - policy_rejected_logps  # (B,)
    ref_margin = ref_chosen_logps - ref_rejected_logps  # (B,)
    h = policy_margin - ref_margin  # (B,)
    losses = LOSSES[loss_type](h, beta, label_smoothing)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
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


def preference_loss(
    policy: PairLogps, ref_chosen: Tensor, ref_rejected: Tensor, settings: LossSettings
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss per pair (B,) and batch-mean metrics under TRL's names.

    The metrics are detached 0-dim tensors, so a trainer can average them across processes before
    logging (and pays no device sync here).

    loss = preference loss (on summed, or with `average_log_prob` mean per-token, log-probs)
           + rpo_alpha * chosen NLL per token.

    Metrics: rewards/chosen, rewards/rejected, rewards/accuracies (share of pairs whose chosen
    reward beats the rejected one strictly), rewards/margins, logps/chosen, logps/rejected (the
    policy's summed log-probs, whatever `average_log_prob` says), and nll when rpo_alpha > 0.

    Args:
        policy: the policy's summed log-probs and the answers' token counts, which the reference
            shares (it scored the same tokens).
        ref_chosen, ref_rejected: the reference's summed log-probs (B,).
    """
    scores = [policy.chosen, policy.rejected, ref_chosen, ref_rejected]
    if settings.average_log_prob:
        counts = [policy.chosen_tokens, policy.rejected_tokens] * 2
        scores = [average_logps(s, n) for s, n in zip(scores, counts, strict=True)]
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        *scores,
        beta=settings.beta,
        loss_type=settings.loss_type,
        label_smoothing=settings.label_smoothing,
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
        nll = nll_loss(policy.chosen, policy.chosen_tokens)
        losses = losses + settings.rpo_alpha * nll
        metrics["nll"] = nll.detach().mean()
    return losses, metrics
