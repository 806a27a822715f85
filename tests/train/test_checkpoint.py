"""Checkpoint pieces without a model: the resume-config comparison and the RNG states."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from trainer_helpers import tiny_config

from bpo.train.checkpoint import check_resume_config, resume_config, rng_state, set_rng_state


def test_a_resume_must_match_the_config_except_resumable_settings(tmp_path):
    config = tiny_config(tmp_path, tmp_path / "out")
    stored = resume_config(config)
    moved = replace(config, out=str(tmp_path / "elsewhere"), save_steps=5, trackers=["wandb"])
    check_resume_config(tmp_path, stored, moved)
    with pytest.raises(ValueError, match=r"\(lr: 0\.5 \(stored\) vs 0\.01 \(now\)\); resume with"):
        check_resume_config(tmp_path, resume_config(replace(config, lr=0.5)), config)


def test_a_setting_added_after_the_checkpoint_matches_at_its_default(tmp_path):
    """A checkpoint from before `noise_steps` existed resumes with noise_steps null, not with
    another value."""
    config = tiny_config(tmp_path, tmp_path / "out")
    stored = resume_config(config)
    del stored["noise_steps"]
    check_resume_config(tmp_path, stored, config)
    with pytest.raises(ValueError, match=r"noise_steps: absent \(stored\) vs \[900\] \(now\)"):
        check_resume_config(tmp_path, stored, replace(config, noise_steps=[900]))


def test_rng_states_restore_the_same_draws():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
