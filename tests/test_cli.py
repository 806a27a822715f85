"""The `bpo` command line lists its verbs and parses configs into the one schema."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bpo.cli import main


def test_help_lists_the_verbs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "demo" in text and "shapeworld" in text


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "bpo.cli", "demo", "--print_config"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "eval_scenes: 1500" in result.stdout
    assert "replay_weight:" in result.stdout


def test_shapeworld_verb_writes_a_llava_dataset(tmp_path, capsys):
    """`bpo shapeworld` writes a dataset that the LLaVA reader reads back without bad records."""
    from bpo.data import read_llava, split_records

    main(["shapeworld", "--out", str(tmp_path), "--scenes", "5", "--seed", "3"])
    samples, bad = split_records(read_llava(tmp_path / "data.json", image_root=tmp_path))
    assert bad == []
    assert len({s.id.split("#")[0] for s in samples}) == 5
