"""The demo's training and negatives settings reach the `bpo train` and `bpo bootstrap` configs
it derives, and a combination `bpo train` refuses is refused before any work."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from test_demo import mini_config

from bpo.bootstrap.config import EDIT_TYPES
from bpo.demo.arms import ARMS, arm_train_config
from bpo.demo.stages import bootstrap_config, check_stages, datasets_in


def test_the_loss_settings_reach_each_arms_train_config():
    cfg = mini_config()
    training = replace(cfg.training, loss_type="cdpo", label_smoothing=0.1, beta=0.3)
    out = Path("OUT")
    train = arm_train_config(ARMS["bpo"], 1, training, out / "base", out, out, out)
    loss = train.loss
    assert (loss.loss_type, loss.label_smoothing, loss.beta) == ("cdpo", 0.1, 0.3)
    assert (loss.rpo_alpha, loss.average_log_prob) == (3.0, True)  # the other defaults kept


def test_the_shared_token_weight_reaches_the_dpo_arms_only():
    cfg = mini_config()
    training = replace(cfg.training, shared_token_weight=0.5)
    out = Path("OUT")
    for name, weight in (("bpo", 0.5), ("bpo_weaken", 0.5), ("sft", 1.0)):
        train = arm_train_config(ARMS[name], 1, training, out / "base", out, out, out)
        assert train.loss.shared_token_weight == weight, name


def test_the_length_bounds_and_edit_types_reach_the_bootstrap_config():
    cfg = mini_config()
    out = Path("OUT")
    boot = bootstrap_config(cfg, out / "base", datasets_in(out), out / "pairs")
    assert boot.inject.edit_types == list(EDIT_TYPES)  # None: every edit type
    edits = ("swap_object", "flip_answer")
    negatives = replace(cfg.negatives, min_length_ratio=1.0, edit_types=edits)
    boot = bootstrap_config(replace(cfg, negatives=negatives), out / "base", datasets_in(out), out)
    assert (boot.weaken.min_length_ratio, boot.weaken.max_length_ratio) == (1.0, 1.5)
    assert (boot.inject.edit_types, boot.inject.vocabulary) == (list(edits), "shapeworld")


def test_a_loss_bpo_train_refuses_is_refused_before_the_run_naming_the_demo_section():
    cfg = mini_config()
    # IPO is length-normalized already: mean per-token scores would normalize it twice.
    cfg = replace(cfg, training=replace(cfg.training, loss_type="ipo"))
    with pytest.raises(ValueError, match=r"average_log_prob.*the demo makes its `bpo train`"):
        check_stages(cfg)
    check_stages(replace(cfg, training=replace(cfg.training, average_log_prob=False)))
