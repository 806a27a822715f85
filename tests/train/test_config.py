"""The training schema's checks: each bad setting is named with its fix, before any model loads."""

from __future__ import annotations

import pytest

from bpo.models.load import ModelConfig
from bpo.train.config import LossSettings, TrainConfig, check_config
from bpo.train.run import train

MISSING_MODEL = "/nonexistent/bpo-model"


def config(**overrides) -> TrainConfig:
    """A config whose model folder does not exist: only the checks can run."""
    return TrainConfig(model=ModelConfig(MISSING_MODEL), out=None, trackers=[], **overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"loss": LossSettings(loss_type="kto")},
            "loss.loss_type must be one of 'sigmoid', 'cdpo', 'robust', 'ipo', 'ipo_sum', 'hinge', "
            "got 'kto'",
        ),
        ({"loss": LossSettings(beta=0)}, "loss.beta must be > 0, got 0"),
        ({"loss": LossSettings(beta=float("nan"))}, "loss.beta must be > 0, got nan"),
        (
            {"loss": LossSettings(label_smoothing=0.5)},
            r"loss.label_smoothing must be in \[0, 0.5\), got 0.5",
        ),
        (
            {"loss": LossSettings(loss_type="ipo", label_smoothing=0.1)},
            "read only by loss.loss_type 'cdpo' .*not 'ipo'; set label_smoothing to 0",
        ),
        (
            {"loss": LossSettings(loss_type="hinge", label_smoothing=0.1)},
            "read only by loss.loss_type 'cdpo' .*not 'hinge'",
        ),
        ({"loss": LossSettings(rpo_alpha=-1.0)}, r"loss.rpo_alpha must be >= 0 \(0: plain DPO\)"),
        ({"method": "kto"}, "method must be one of 'dpo', 'sft', got 'kto'"),
        ({"noise_steps": []}, r"noise_steps must be a non-empty list of integers in \[0, 999\]"),
        ({"noise_steps": [1000]}, r"integers in \[0, 999\] or null \(all pairs\), got \[1000\]"),
        ({"noise_steps": [-1]}, r"got \[-1\]"),
        ({"noise_steps": [900.0]}, r"got \[900.0\]"),
        ({"noise_steps": [True]}, r"got \[True\]"),
        ({"sources": []}, "sources must be a non-empty list of source names or null, got"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0, got 0.0; set it to null"),
        ({"adam_betas": (0.9, 1.0)}, r"adam_betas must be two numbers in \[0, 1\)"),
    ],
)
def test_a_bad_setting_names_its_field_and_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(config(**overrides))


def test_the_edges_of_the_ranges_are_allowed():
    """Noise steps 0 and 999 are the schedule's first and last; label_smoothing just below 0.5."""
    smoothed = LossSettings(loss_type="cdpo", label_smoothing=0.49)
    check_config(config(noise_steps=[0, 999], loss=smoothed))


def test_a_bad_loss_setting_stops_train_before_the_model_loads():
    """The model does not exist, so any load would fail: the error is the config's. The same
    config with a good beta gets as far as the load, and fails there instead."""
    with pytest.raises(ValueError, match=r"^loss\.beta must be > 0, got 0$"):
        train(config(loss=LossSettings(beta=0)), log=lambda _: None)
    with pytest.raises(OSError, match=MISSING_MODEL):
        train(config(), log=lambda _: None)


def test_bpo_refs_checks_the_config_before_the_model_loads(tmp_path):
    from bpo.cli import refs

    bad = config(pairs=str(tmp_path), image_root=str(tmp_path), loss=LossSettings(rpo_alpha=-1))
    with pytest.raises(ValueError, match=r"^loss\.rpo_alpha must be >= 0"):
        refs(bad)
