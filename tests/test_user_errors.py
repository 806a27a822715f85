"""A user's mistake is one line on stderr, refused before any work; a bug keeps its traceback.

The console script (`bpo`, `python -m bpo.cli`) prints `bpo VERB: error: MESSAGE` and exits 2;
`BPO_DEBUG=1` shows the traceback instead. `bpo.cli.main` (Python callers, the tests) still
raises. Settings that do nothing or cannot run (`bpo shapeworld --scenes -5`, a demo whose
derived stage configs a stage would refuse) fail at once, naming the setting.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bpo.cli
import bpo.demo.run
from bpo.cli import is_user_error, main, run
from bpo.data.store import StoreError


def bootstrap_args(folder: Path, *flags: str) -> list[str]:
    """`bpo bootstrap` with a model folder and a data file that do not exist."""
    return [
        "bootstrap",
        "--run.model.name_or_path",
        str(folder / "no-model"),
        "--run.data",
        str(folder / "no-data.json"),
        "--run.out",
        str(folder / "out"),
        *flags,
    ]


NOISE_5000 = ("--run.weaken.noise_steps", "[5000]")
# case: (its arguments in a scratch folder, its extra environment)
CASES = {
    "missing config file": (lambda folder: ["bootstrap", "--config", f"{folder}/missing.yaml"], {}),
    "bad setting": (lambda folder: bootstrap_args(folder, *NOISE_5000), {}),
    "missing model folder": (bootstrap_args, {}),
    "debug switch": (lambda folder: bootstrap_args(folder, *NOISE_5000), {"BPO_DEBUG": "1"}),
}


@pytest.fixture(scope="module")
def console_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Each case run through `python -m bpo.cli`, all at once (each spends seconds importing)."""
    started = {}
    for name, (args_in, env) in CASES.items():
        folder = tmp_path_factory.mktemp(name.replace(" ", "-"))
        args = args_in(folder)
        environment = {k: v for k, v in os.environ.items() if k != "BPO_DEBUG"}
        environment.update({"OMP_NUM_THREADS": "1", **env})
        started[name] = (
            subprocess.Popen(
                [sys.executable, "-m", "bpo.cli", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=environment,
            ),
            folder,
        )
    done = {}
    for name, (process, folder) in started.items():
        stdout, stderr = process.communicate(timeout=300)
        done[name] = (
            subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr),
            folder,
        )
    return done


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing config file", r"Parser key \"config\": File does not exist: '.*missing\.yaml'"),
        ("bad setting", r"weaken\.noise_steps holds 5000: a noise step must be an integer in"),
        ("missing model folder", r"model folder '.*no-model' not found"),
    ],
)
def test_a_user_error_is_one_line_and_exit_code_2(console_runs, case, expected):
    done, folder = console_runs[case]
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("bpo bootstrap: error: ")
    assert re.search(expected, lines[0]), lines[0]
    assert done.stdout == ""
    assert not (folder / "out").exists()


def test_the_debug_switch_shows_the_traceback(console_runs):
    done, _ = console_runs["debug switch"]
    assert done.returncode == 1
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert "in check_weaken" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("ValueError: weaken.noise_steps holds 5000")


def test_in_process_callers_still_get_the_exception(tmp_path):
    """`main` raises; only the console script (`run`) turns a user error into one line."""
    with pytest.raises(ValueError, match=r"weaken\.noise_steps holds 5000"):
        main(bootstrap_args(tmp_path, "--run.weaken.noise_steps", "[5000]"))


def test_run_prints_a_user_error_as_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BPO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exited:
        run(bootstrap_args(tmp_path, "--run.batch_size", "0"))
    assert exited.value.code == 2
    assert capsys.readouterr().err == "bpo bootstrap: error: batch_size must be at least 1, got 0\n"


def _numpy_bug() -> None:
    np.zeros(2) + np.zeros(3)  # a ValueError from inside numpy: a bug in the caller


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """A ValueError numpy raises is a bug's symptom, not a message for the user: `run` lets it
    through (Python prints the traceback, exit 1)."""

    def shapeworld(out: Path = tmp_path, scenes: int = 1) -> None:
        _numpy_bug()

    monkeypatch.delenv("BPO_DEBUG", raising=False)
    monkeypatch.setattr(bpo.cli, "shapeworld", shapeworld)
    with pytest.raises(ValueError, match="operands could not be broadcast"):
        run(["shapeworld"])
    assert capsys.readouterr().err == ""


def _caught(call) -> BaseException:
    try:
        call()
    except Exception as error:  # the test classifies whatever was raised
        return error
    raise AssertionError("nothing raised")


def test_which_errors_are_the_users():
    """bpo's own error types, an OSError, and a ValueError bpo raises on purpose are the user's;
    a ValueError from inside numpy, and any other type, are bugs."""
    from bpo.bootstrap.config import BootstrapConfig, check_config
    from bpo.models.load import ModelConfig

    bad = BootstrapConfig(model=ModelConfig("m"), data="d", batch_size=0)
    assert is_user_error(_caught(lambda: check_config(bad)))
    assert is_user_error(StoreError("pairs/ is not a pair store"))
    assert is_user_error(_caught(lambda: open("/no/such/file")))  # noqa: SIM115
    assert not is_user_error(_caught(_numpy_bug))
    assert not is_user_error(_caught(lambda: 1 / 0))
    assert not is_user_error(_caught(lambda: int("x")))  # Python's own ValueError, here


# --- settings that do nothing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--scenes", "-5"], r"--scenes is -5; write at least 1 scene"),
        (["--scenes", "0"], r"--scenes is 0; write at least 1 scene"),
        (["--world.max_objects", "9"], r"world\.max_objects 9 is more than the 8 shapes"),
        (["--world.min_objects", "3", "--world.max_objects", "2"], r"world\.min_objects 3"),
        (["--world.faint_prob", "1.5"], r"world\.faint_prob must be in \[0, 1\], got 1\.5"),
        (["--world.grid", "0"], r"world\.grid must be at least 1, got 0"),
        (["--existence_share", "2"], r"--existence_share is 2\.0; give a share in \[0, 1\]"),
    ],
)
def test_shapeworld_refuses_settings_that_write_nothing_or_cannot_run(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        main(["shapeworld", "--out", str(tmp_path / "sw"), *flags])
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--run.negatives.noise_steps", "[5000]"],
            r"weaken\.noise_steps holds 5000.*; the demo makes its `bpo bootstrap` config from "
            r"`negatives:`",
        ),
        (["--run.negatives.temperature", "-1"], r"weaken\.temperature must be >= 0"),
        (["--run.negatives.scenes", "0"], r"negatives\.scenes is 0"),
        (["--run.training.lr", "-1"], r"lr and projector_lr must be >= 0.*from `training:`"),
        (["--run.pope_per_image", "0"], r"pope_per_image is 0.*`bpo eval` configs from"),
        (["--run.world.max_objects", "9"], r"world\.max_objects 9"),
        (["--run.corpus_qa_fraction", "1.5"], r"corpus_qa_fraction must be in \[0, 1\], got 1\.5"),
        (
            ["--run.existence_fraction", "0.6", "--run.qa_fraction", "0.5"],
            r"existence_fraction 0\.6 \+ qa_fraction 0\.5 is more than 1",
        ),
        (
            ["--full", "true", "--run.full_noise_steps", "[100, 1000]"],
            r"weaken\.noise_steps holds 1000",
        ),
    ],
)
def test_the_demo_refuses_a_bad_setting_before_any_work(tmp_path, monkeypatch, flags, message):
    """Every stage config the demo derives is checked up front: nothing is built or trained."""

    def no_work(*_args, **_kwargs):
        raise AssertionError("the demo started work before refusing its config")

    monkeypatch.setattr(bpo.demo.run, "build_world", no_work)
    monkeypatch.setattr(bpo.demo.run, "pretrained_model", no_work)
    with pytest.raises(ValueError, match=message):
        main(["demo", "--out", str(tmp_path / "demo"), *flags])
    assert not (tmp_path / "demo").exists()
