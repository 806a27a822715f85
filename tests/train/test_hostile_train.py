"""Training runs given hostile inputs: a huge answer, a rebuilt store, two runs in one --out, a
mistyped store, filtered-out bad pairs, a full disk. Each test names the defect it pins down."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from trainer_helpers import make_images, make_pairs, tiny_config, write_store

from bpo.data.files import DirectoryBusyError
from bpo.data.store import PairWriter
from bpo.models import load_model_and_processor
from bpo.train.checkpoint import DiskFullError, latest_checkpoint
from bpo.train.limits import BatchOutOfMemoryError
from bpo.train.outputs import lock_output
from bpo.train.run import train

TINY_CONTEXT = 256  # TinyLlavaConfig.max_position_embeddings
LONG = "a red circle and a blue square . " * 60  # ~480 tokens: past the tiny model's context


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    """Keep the reference pass's weight digests out of the user's ~/.cache."""
    monkeypatch.setenv("BPO_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def fresh(tiny_llava_folder, one_torch_thread):
    """A fresh (model, processor): training changes the model it is given."""
    return load_model_and_processor(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
    )


def quiet(_message: str) -> None:
    pass


def write_yaml(path: Path, model: Path, pairs: Path, image_root: Path, out: Path) -> Path:
    path.write_text(
        f"run:\n  model:\n    name_or_path: {model}\n    dtype: float32\n    device: cpu\n"
        f"  pairs: {pairs}\n  image_root: {image_root}\n  out: {out}\n"
        "  lora: {r: 4, alpha: 8}\n  max_steps: 1\n  trackers: []\n"
    )
    return path


# --- 1. one very long pair -------------------------------------------------------------------


def test_max_length_defaults_to_the_models_context_and_cuts_a_long_answer(tiny_llava_folder, fresh):
    """Defect: with max_length null a 24,000-token answer went to the forward whole. Now null is
    the model's context (the tiny LLaVA's max_position_embeddings, 256, under the 4096 cap): the
    one long answer (p1's chosen, ~480 tokens) is cut, counted once, and the run says so."""
    pairs = make_pairs()
    pairs[1] = replace(pairs[1], chosen=LONG)
    messages = []
    config = tiny_config(tiny_llava_folder, None, epochs=1)
    assert config.max_length is None
    result = train(config, *fresh, pairs, make_images(), log=messages.append)
    assert result.summary["max_length"] == TINY_CONTEXT
    assert result.summary["truncated_pairs"] == 1 and result.summary["bad_pairs"] == 0
    assert any(
        "max_length not set: using 256" in m and "max_position_embeddings=256" in m
        for m in messages
    )
    assert any("pair p1:inject:0: an answer was cut to max_length=256" in m for m in messages)


def test_bpo_refs_and_bpo_train_key_the_cache_with_the_resolved_default(
    tiny_llava_folder, tmp_path, capsys
):
    """`bpo refs` writes its fingerprint with max_length 256 (not null), the one `bpo train`
    resolves too: train reuses all 6 entries, the long one counted as truncated by both."""
    from bpo.cli import main

    pairs = make_pairs()
    pairs[1] = replace(pairs[1], chosen=LONG)
    store, image_root = write_store(tmp_path / "data", pairs)
    yaml = write_yaml(tmp_path / "t.yaml", tiny_llava_folder, store, image_root, tmp_path / "x")
    main(["refs", "--config", str(yaml)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (printed["computed"], printed["truncated"]) == (6, 1)
    (meta,) = (store / "refs").glob("*.meta.json")
    assert json.loads(meta.read_text())["parts"]["max_length"] == TINY_CONTEXT
    main(["train", "--config", str(yaml)])
    assert "6 reused, 0 computed" in capsys.readouterr().err


def test_a_batch_out_of_memory_names_its_pairs_and_max_length(
    tiny_llava_folder, fresh, monkeypatch
):
    """Defect: the allocator's error named neither the pair nor the setting. A forward that runs
    out of memory (here: any row over 100 tokens, as CPU and CUDA allocators report it) now
    names the pair with its row length, max_length and the settings to lower, in the reference
    pass and in a training step."""
    from bpo.train import data, run

    def oom_on_long_rows(real, error):
        def scorer(model, batch, *args, **kwargs):
            if batch.tensors["input_ids"].shape[1] > 100:
                raise error
            return real(model, batch, *args, **kwargs)

        return scorer

    cpu_error = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 18 GB")
    # The reference pass scores group rows (a sample's pairs in one row).
    monkeypatch.setattr(data, "group_scores", oom_on_long_rows(data.group_scores, cpu_error))
    pairs = make_pairs()
    pairs[1] = replace(pairs[1], chosen=LONG)
    config = tiny_config(tiny_llava_folder, None, max_length=200, batch_size=6, max_steps=1)
    with pytest.raises(BatchOutOfMemoryError) as caught:
        train(config, *fresh, pairs, make_images(), log=quiet)
    message = str(caught.value)
    assert message.startswith("out of memory in the reference pass on a batch of 6 pair(s): ")
    assert "p1:inject:0 (row of " in message and "chosen 1" in message  # longest row first
    assert "max_length=200" in message and "run.reference_batch_size" in message

    monkeypatch.undo()
    scored = [replace(p, ref_chosen_logp=-1.0, ref_rejected_logp=-1.0) for p in pairs]
    gpu_error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 18.00 GiB")
    monkeypatch.setattr(run, "pair_logps", oom_on_long_rows(run.pair_logps, gpu_error))
    with pytest.raises(BatchOutOfMemoryError, match=r"in training step 1 .*p1:inject:0 \(row of"):
        train(config, *fresh, scored, make_images(), log=quiet)


# --- 2. resume on a rebuilt store ------------------------------------------------------------


def test_resume_refuses_a_store_rebuilt_with_other_pairs(tiny_llava_folder, tmp_path):
    """Defect: after the store was rebuilt, --resume continued the old data position on other
    pairs. Killed after step 1, the store rebuilt with one answer edited (same count, same keys),
    the resume is refused naming both fingerprints and the fix; an unchanged rebuild resumes."""
    store, image_root = write_store(tmp_path / "data")
    config = tiny_config(
        tiny_llava_folder,
        tmp_path / "run",
        pairs=str(store),
        image_root=str(image_root),
        method="sft",
        save_steps=1,
    )

    def kill_after_1(step, _line):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, on_step=kill_after_1, log=quiet)
    state = json.loads((latest_checkpoint(tmp_path / "run") / "state.json").read_text())
    assert state["pairs"]["count"] == 6

    edited = make_pairs()
    edited[3] = replace(edited[3], chosen="no")  # p3 was "yes"
    shutil.rmtree(store)
    write_store(tmp_path / "data", edited)
    with pytest.raises(
        ValueError, match=r"was trained on other pairs: 6 pairs \(fingerprint "
    ) as e:
        train(config, resume=True, log=quiet)
    assert "now gives 6 (fingerprint" in str(e.value) and "Train in a new --out" in str(e.value)
    assert state["pairs"]["sha256"] in str(e.value)

    shutil.rmtree(store)
    write_store(tmp_path / "data")
    resumed = train(config, resume=True, log=quiet)
    assert resumed.summary["steps"] == 3


# --- 3. one run per --out --------------------------------------------------------------------


def test_train_refuses_an_out_another_run_holds(tiny_llava_folder, fresh, tmp_path):
    """Defect: two runs into one --out both ran. While another run holds OUT (here the test,
    through the same lock), train stops at once naming the holder, and writes nothing."""
    out = tmp_path / "run"
    config = tiny_config(tiny_llava_folder, out, max_steps=1)
    with lock_output(out, "bpo train"):
        with pytest.raises(DirectoryBusyError, match=r"held by `bpo train` \(pid \d+ on .*--out"):
            train(config, *fresh, make_pairs(), make_images(), log=quiet)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    result = train(config, *fresh, make_pairs(), make_images(), log=quiet)
    assert result.summary["steps"] == 1 and (out / "metrics.jsonl").is_file()


# --- 4. a folder that is not a pair store ----------------------------------------------------


def test_a_mistyped_store_fails_naming_the_setting_and_creates_nothing(tiny_llava_folder, tmp_path):
    """Defect: `--run.pairs TYPO` made TYPO/refs/ and `bpo refs` exited 0 with 0 pairs. Now
    refs and train name the folder and the setting, and create nothing."""
    from bpo.cli import main

    _, image_root = write_store(tmp_path / "data")
    typo = tmp_path / "data" / "pairz"
    yaml = write_yaml(tmp_path / "t.yaml", tiny_llava_folder, typo, image_root, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match=r"run.pairs '.*pairz' is not a folder"):
        main(["refs", "--config", str(yaml)])
    with pytest.raises(FileNotFoundError, match=r"run.pairs '.*pairz' is not a folder"):
        main(["train", "--config", str(yaml)])
    assert not typo.exists() and not (tmp_path / "x").exists()


def test_an_empty_store_fails_and_creates_nothing(tiny_llava_folder, tmp_path):
    """Defect: a store with no pairs made `bpo refs` exit 0 having scored nothing."""
    from bpo.cli import main

    _, image_root = write_store(tmp_path / "data")
    empty = tmp_path / "empty"
    with PairWriter(empty, {"stage": "trainer-test"}):
        pass
    yaml = write_yaml(tmp_path / "e.yaml", tiny_llava_folder, empty, image_root, tmp_path / "x")
    with pytest.raises(ValueError, match=r"empty is a pair store with no pairs; check run.pairs"):
        main(["refs", "--config", str(yaml)])
    assert not (empty / "refs").exists()


# --- 5. bad pairs of filtered-out sources ----------------------------------------------------


def test_bad_pairs_count_only_the_sources_the_run_trains_on(tiny_llava_folder, tmp_path):
    """Defect: a broken "weaken" pair (p0, image gone) was counted by a run on "inject" pairs
    only. That run now counts 0 bad pairs; a run on "weaken" pairs still counts it."""
    pairs = make_pairs()
    pairs[0] = replace(pairs[0], image="gone.png")
    store, image_root = write_store(tmp_path / "data", pairs)
    config = tiny_config(
        tiny_llava_folder,
        None,
        pairs=str(store),
        image_root=str(image_root),
        sources=["inject"],
        max_steps=1,
    )
    inject = train(config, log=quiet)
    assert inject.summary["pairs"] == 3
    assert inject.summary["bad_pairs"] == 0 and inject.summary["bad_reasons"] == {}
    weaken = train(replace(config, sources=["weaken"]), log=quiet)
    assert weaken.summary["bad_reasons"] == {"missing_image": 1}


# --- 6. a full disk during a checkpoint save -------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs under tmp_path (needs root and mount); skipped where the machine has none."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:  # unbuffered: closing it flushes nothing more
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_a_full_disk_while_saving_a_checkpoint_is_named_and_the_last_one_kept(
    tiny_llava_folder, fresh, small_disk
):
    """Defect: a full disk surfaced as torch's "basic_ios::clear: iostream error". Checkpoint 1
    saved, the disk then filled: the step-2 save stops with the plain reason, the half-written
    folder is gone, and after freeing space the run resumes from checkpoint 1 and finishes."""
    out = small_disk / "run"
    config = tiny_config(tiny_llava_folder, out, save_steps=1, max_steps=3, max_length=64)
    filled: list[Path] = []

    def fill_after_1(step, _line):
        if step == 1:
            filled.append(fill(small_disk))

    with pytest.raises(DiskFullError) as caught:
        train(config, *fresh, make_pairs(), make_images(), on_step=fill_after_1, log=quiet)
    step2 = out / "checkpoints" / "step-00000002"
    assert str(caught.value) == (
        f"no space left on device while saving checkpoint {step2}; free space or change --out"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]

    filled[0].unlink()
    model, processor = load_model_and_processor(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
    )
    resumed = train(config, model, processor, make_pairs(), make_images(), resume=True, log=quiet)
    assert [line["step"] for line in resumed.history] == [1, 2, 3]
    assert math.isfinite(resumed.history[-1]["loss"])


def test_a_failed_save_on_a_disk_with_room_keeps_its_own_error(
    tiny_llava_folder, fresh, tmp_path, monkeypatch
):
    """Only a full disk is reported as one: another write failure keeps its message, and the
    half-written folder is removed all the same."""
    from bpo.train import checkpoint

    def broken_save(*_args, **_kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    config = tiny_config(tiny_llava_folder, tmp_path / "run", save_steps=1, max_steps=1)
    with pytest.raises(RuntimeError, match="unexpected pos 576"):
        train(config, *fresh, make_pairs(), make_images(), log=quiet)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []
