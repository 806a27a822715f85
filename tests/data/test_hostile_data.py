"""Hostile input: colliding sample ids, paths that leave the image root or hold a NUL byte,
images that declare too many pixels, incomplete or empty stores. Each is a counted, named bad
record or one clear error, never a crash mid-run and never a silent loss."""

from __future__ import annotations

import json
import struct
import weakref
import zlib
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
from data_helpers import png_bytes

import bpo.bootstrap.chunk as bootstrap_chunk
from bpo.bootstrap.config import BootstrapConfig, InjectConfig, WeakenConfig
from bpo.bootstrap.run import run_bootstrap
from bpo.cli import main
from bpo.data import (
    ImagePathError,
    ImageTooLargeError,
    PairWriter,
    PreferencePair,
    StoreError,
    check_image,
    load_image,
    load_image_bytes,
    read_bad_records,
    read_hf_dataset,
    read_llava,
    read_manifest,
    read_pairs,
    resolve_image_path,
    split_records,
)
from bpo.models.load import ModelConfig, load_from_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SECRET = b"TOP SECRET: not an image"


def turns(*texts: str) -> list[dict[str, str]]:
    """LLaVA turns alternating human/gpt."""
    return [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(texts)]


def write_llava_json(path: Path, records: list[dict]) -> Path:
    """A LLaVA conversation file as a JSON list (BadRecord.line is the 1-based record index)."""
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: Pillow reads the size from it, and decoding
    would fail (so a refusal before decoding is the only way to say image_too_large)."""
    data = bytearray(png_bytes(size=(1, 1)))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture(scope="module")
def loaded(tiny_llava_folder):
    return load_from_config(model_config(tiny_llava_folder))


def model_config(folder: Path) -> ModelConfig:
    return ModelConfig(str(folder), dtype="float32", device="cpu", attn_implementation="eager")


def bootstrap_config(folder: Path, data: Path, out: Path, **changes) -> BootstrapConfig:
    """Lexical rewrites only (no generation): what the data layer decides is what is tested."""
    config = BootstrapConfig(
        model=model_config(folder),
        data=str(data),
        out=str(out),
        weaken=None,
        inject=InjectConfig(kind="lexical", vocabulary="shapeworld", seed=5),
        batch_size=2,
        chunk_size=4,
    )
    return replace(config, **changes)


# --- 1. sample ids that collide ---------------------------------------------------------------


def colliding_records() -> list[dict]:
    """Record 1 is named like record 2's first turn: both give a sample `x#turn0`."""
    answer = "a red circle and a blue square ."
    return [
        {"id": "x#turn0", "conversations": turns("What is there?", answer)},
        {"id": "x", "conversations": turns("What is there?", answer, "And now?", answer)},
        {"id": "y", "conversations": turns("What is there?", answer)},
    ]


@pytest.mark.parametrize("order", [[0, 1, 2], [1, 0, 2]])
def test_a_record_named_like_another_records_turn_is_a_bad_record_naming_both(tmp_path, order):
    records = [colliding_records()[i] for i in order]
    path = write_llava_json(tmp_path / "data.json", records)
    samples, bad = split_records(read_llava(path))
    first, second = records[0]["id"], records[1]["id"]
    # The first record keeps its samples; the second gives none, and says why.
    assert [s.id for s in samples] == [
        *([first] if first == "x#turn0" else ["x#turn0", "x#turn1"]),
        "y",
    ]
    assert [(b.line, b.id, b.reason) for b in bad] == [(2, second, "duplicate_sample_id")]
    assert f"record 2 (id={second})" in bad[0].message
    assert f"record 1 (id={first})" in bad[0].message and "'x#turn0'" in bad[0].message


def test_hf_rows_whose_sample_ids_collide_are_bad_rows():
    rows = [
        {
            "id": r["id"],
            "messages": [{"from": t["from"], "value": t["value"]} for t in r["conversations"]],
        }
        for r in colliding_records()
    ]
    samples, bad = split_records(read_hf_dataset(datasets.Dataset.from_list(rows), name="toy"))
    assert [s.id for s in samples] == ["x#turn0", "y"]
    assert [(b.line, b.id, b.reason) for b in bad] == [(1, "x", "duplicate_sample_id")]
    assert "row 0 (id=x#turn0)" in bad[0].message


def test_bootstrap_reports_a_sample_id_collision_on_every_run(tmp_path, tiny_llava_folder, loaded):
    """First run: no DuplicateKeyError; rerun: the second record is still counted, not dropped."""
    data = write_llava_json(tmp_path / "data.json", colliding_records())
    config = bootstrap_config(tiny_llava_folder, data, tmp_path / "out")
    manifests = [run_bootstrap(config, model_and_processor=loaded, progress=False) for _ in "ab"]
    for manifest in manifests:
        assert manifest["complete"] is True
        assert manifest["bad_records"]["by_reason"].get("duplicate_sample_id") == 1
    (bad,) = [b for b in read_bad_records(config.out) if b.reason == "duplicate_sample_id"]
    assert (bad.line, bad.id) == (2, "x")
    assert "record 1 (id=x#turn0)" in bad.message
    # One inject outcome (pair or reject) for each sample kept: record 1's and record 3's.
    made = [p.id for p in read_pairs(config.out)]
    made += [
        b.id.rsplit(":", 2)[0]
        for b in read_bad_records(config.out)
        if b.reason.startswith("rejected_")
    ]
    assert sorted(made) == ["x#turn0", "y"]


# --- 3. NUL bytes and names the OS refuses --------------------------------------------------


def test_a_nul_byte_or_an_overlong_name_in_an_image_path_is_a_bad_record(tmp_path, image_root):
    with pytest.raises(ImagePathError, match="NUL byte") as nul:
        resolve_image_path(image_root, "a.png\x00.txt")
    assert nul.value.reason == "invalid_image_path"
    with pytest.raises(ImagePathError, match="cannot be looked up") as long:
        check_image(image_root, "x" * 300 + ".png")
    assert long.value.reason == "invalid_image_path"
    records = [
        {"id": "nul", "image": "a.png\x00", "conversations": turns("<image>\nWhat?", "red.")},
        {"id": "ok", "image": "a.png", "conversations": turns("<image>\nWhat?", "red.")},
    ]
    path = write_llava_json(tmp_path / "data.json", records)
    for check_images in (True, False):
        samples, bad = split_records(read_llava(path, image_root, check_images=check_images))
        assert [s.id for s in samples] == ["ok"]
        assert [(b.id, b.reason) for b in bad] == [("nul", "invalid_image_path")]
        assert "record 1 (id=nul)" in bad[0].message


def test_bootstrap_counts_nul_paths_and_oversized_images(tmp_path, tiny_llava_folder, loaded):
    """Both are bad records of the run, which goes on. The oversized image's record is named
    `huge#turn0`, like a turn: it is reported under that id, not as `huge`."""
    (tmp_path / "ok.png").write_bytes(png_bytes(size=(16, 16)))
    (tmp_path / "huge.png").write_bytes(png_declaring(12000, 12000))
    records = [
        {"id": i, "image": image, "conversations": turns("<image>\nWhat?", "a red circle .")}
        for i, image in [("nul", "ok\x00.png"), ("huge#turn0", "huge.png"), ("ok", "ok.png")]
    ]
    data = write_llava_json(tmp_path / "data.json", records)
    config = bootstrap_config(tiny_llava_folder, data, tmp_path / "out")
    manifest = run_bootstrap(config, model_and_processor=loaded, progress=False)
    by_reason = manifest["bad_records"]["by_reason"]
    assert (by_reason["invalid_image_path"], by_reason["image_too_large"]) == (1, 1)
    bad = {b.reason: b for b in read_bad_records(config.out)}
    assert (
        bad["image_too_large"].id == "huge#turn0"
        and "max_image_pixels" in bad["image_too_large"].message
    )
    made = [p.id for p in read_pairs(config.out)]
    made += [b.id.rsplit(":", 2)[0] for b in bad.values() if b.reason.startswith("rejected_")]
    assert made == ["ok"]


# --- 4. images that declare too many pixels ---------------------------------------------------


def test_an_image_declaring_too_many_pixels_is_refused_from_its_header(tmp_path, monkeypatch):
    """12000 x 12000 is 144 megapixels: below Pillow's bomb limit, above ours (50)."""
    path = tmp_path / "huge.png"
    path.write_bytes(png_declaring(12000, 12000))
    with pytest.raises(
        ImageTooLargeError,
        match=r"12000 x 12000 pixels \(144\.0 megapixels\), above max_image_pixels = 50000000",
    ) as info:
        load_image(path)
    assert info.value.reason == "image_too_large"
    with pytest.raises(ImageTooLargeError, match="BPO_MAX_IMAGE_PIXELS"):
        load_image_bytes(path.read_bytes(), "'huge.png'")
    # The limit is a setting: 8 x 8 = 64 pixels passes at 64, not at 63, by argument or env.
    small = tmp_path / "small.png"
    small.write_bytes(png_bytes(size=(8, 8)))
    assert load_image(small, max_pixels=64).size == (8, 8)
    with pytest.raises(ImageTooLargeError, match="above max_image_pixels = 63"):
        load_image(small, max_pixels=63)
    monkeypatch.setenv("BPO_MAX_IMAGE_PIXELS", "63")
    with pytest.raises(ImageTooLargeError, match="above max_image_pixels = 63"):
        load_image(small)
    monkeypatch.setenv("BPO_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="BPO_MAX_IMAGE_PIXELS='lots' must be a positive number"):
        load_image(small)


def test_bootstrap_holds_one_batch_of_decoded_images_at_a_time(
    tmp_path, tiny_llava_folder, loaded, monkeypatch
):
    """A chunk of 6 samples with images, batches of 2: when an image is decoded, at most one
    other (its batch's) is still alive; decoding the whole chunk first would keep 6."""
    records = []
    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(png_bytes((40 * i, 0, 0), size=(16, 16)))
        records.append(
            {
                "id": f"s{i}",
                "image": f"{i}.png",
                "conversations": turns("<image>\nWhat?", "a red circle ."),
            }
        )
    data = write_llava_json(tmp_path / "data.json", records)
    alive: list[weakref.ref] = []
    most = []

    def counting_load(path, *args, **kwargs):
        image = load_image(path, *args, **kwargs)
        most.append(sum(ref() is not None for ref in alive) + 1)
        alive.append(weakref.ref(image))
        return image

    monkeypatch.setattr(bootstrap_chunk, "load_image", counting_load)
    config = bootstrap_config(
        tiny_llava_folder,
        data,
        tmp_path / "out",
        chunk_size=6,
        batch_size=2,
        weaken=WeakenConfig(max_new_tokens=2, seed=3),
        inject=None,
    )
    manifest = run_bootstrap(config, model_and_processor=loaded, progress=False)
    assert len(most) == 6 and max(most) == 2
    assert manifest["counts"]["pairs"] + manifest["bad_records"]["total"] == 6


# --- 2. export and view read images only under a root ------------------------------------------


def image_pairs(tmp_path: Path, **config) -> tuple[Path, Path]:
    """A store recording `image_root` = tmp/images, with one good image and five bad paths:
    outside the root, absolute, a text file named .png inside it, missing, a NUL byte."""
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes(size=(4, 4)))
    (root / "notes.png").write_bytes(SECRET)
    (tmp_path / "secret.txt").write_bytes(SECRET)
    images = [
        "a.png",
        "../secret.txt",
        str(tmp_path / "secret.txt"),
        "notes.png",
        "gone.png",
        "a\x00.png",
    ]
    store = tmp_path / "pairs"
    recorded = config or {
        "stage": "bootstrap",
        "data": str(tmp_path / "d.json"),
        "image_root": str(root),
    }
    with PairWriter(store, recorded) as writer:
        for i, image in enumerate(images):
            prompt = [{"role": "user", "content": "<image>\nWhat is it?"}]
            writer.write(PreferencePair(f"p{i}", image, prompt, "red", "blue", "inject"))
    return store, root


BAD_IMAGE_REASONS = {
    "image_outside_root": 2,
    "corrupt_image": 1,
    "missing_image": 1,
    "invalid_image_path": 1,
}


def test_export_without_image_root_embeds_only_decodable_images_under_the_stores_root(
    tmp_path, capsys
):
    store, _ = image_pairs(tmp_path)
    out = tmp_path / "trl"
    main(["export", str(store), str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert (printed["rows"], printed["bad_pairs"]) == (1, 5)
    assert printed["bad_reasons"] == BAD_IMAGE_REASONS
    dataset = datasets.load_from_disk(str(out))
    assert dataset["id"] == ["p0"] and dataset[0]["images"][0].size == (4, 4)
    assert not any(SECRET in f.read_bytes() for f in out.rglob("*") if f.is_file())


def test_view_without_image_root_embeds_only_decodable_images_under_the_stores_root(tmp_path):
    store, _ = image_pairs(tmp_path)
    main(["view", str(store)])
    page = (store / "pairs.html").read_text()
    assert page.count("data:image/png;base64,") == 1
    assert page.count('class="error"') == 5
    assert "5 of 6 pairs shown have an unusable image" in page
    assert "TOP SECRET" not in page


def test_the_default_image_root_is_the_data_folder_when_none_was_recorded(tmp_path, capsys):
    """A bootstrap config with image_root null read images next to its data file."""
    store, _ = image_pairs(
        tmp_path, stage="bootstrap", data=str(tmp_path / "images" / "d.json"), image_root=None
    )
    main(["export", str(store), str(tmp_path / "trl")])
    assert json.loads(capsys.readouterr().out)["rows"] == 1
    # A store recording no root at all: its image pairs need --image_root, said once.
    (tmp_path / "o").mkdir()
    other, _ = image_pairs(tmp_path / "o", test=True)
    with pytest.raises(ValueError, match=r"records no image root.*pass --image_root"):
        main(["export", str(other), str(tmp_path / "trl2")])


# --- 5. incomplete stores --------------------------------------------------------------------


def incomplete_store(path: Path, shard: int = 0) -> Path:
    writer = PairWriter(path, {"stage": "bootstrap", "shard_index": shard, "num_shards": 2})
    prompt = [{"role": "user", "content": "q"}]
    writer.write(
        PreferencePair(
            f"t{shard}", None, prompt, "yes", "no", "inject", chosen_tokens=1, rejected_tokens=1
        )
    )
    writer.close(complete=False)  # as a killed run leaves it
    assert read_manifest(path)["complete"] is False
    return path


def test_export_view_and_merge_refuse_an_incomplete_store_unless_asked(tmp_path, capsys):
    a, b = incomplete_store(tmp_path / "a", 0), incomplete_store(tmp_path / "b", 1)
    refusal = r"is not complete.*rerun the same `bpo bootstrap` command.*--allow_incomplete true"
    with pytest.raises(StoreError, match=refusal):
        main(["export", str(a), str(tmp_path / "trl")])
    with pytest.raises(StoreError, match=refusal):
        main(["view", str(a)])
    with pytest.raises(StoreError, match=r"is not complete.*--allow_incomplete true"):
        main(["merge", str(tmp_path / "m"), str(a), str(b)])
    capsys.readouterr()
    main(["export", str(a), str(tmp_path / "trl"), "--allow_incomplete", "true"])
    assert json.loads(capsys.readouterr().out)["rows"] == 1
    main(["view", str(a), "--allow_incomplete", "true"])
    assert "t0" in (a / "pairs.html").read_text()
    main(["merge", str(tmp_path / "m"), str(a), str(b), "--allow_incomplete", "true"])
    assert [p.id for p in read_pairs(tmp_path / "m")] == ["t0", "t1"]


def test_training_refuses_an_incomplete_store_unless_asked(tmp_path):
    from bpo.train.config import TrainConfig
    from bpo.train.data import load_store_pairs
    from bpo.train.refs import config_reference_logps

    store = incomplete_store(tmp_path / "a")
    with pytest.raises(StoreError, match=r"is not complete.*run\.allow_incomplete: true"):
        load_store_pairs(store)
    assert [p.id for p in load_store_pairs(store, allow_incomplete=True)] == ["t0"]
    config = TrainConfig(model=ModelConfig("unused"), pairs=str(store), image_root=str(tmp_path))
    # Refused before the model is touched (there is none here).
    with pytest.raises(StoreError, match=r"run\.allow_incomplete: true"):
        config_reference_logps(config, None, None)


# --- 6. not a store, an empty store, a limit below one ---------------------------------------


def test_export_of_a_folder_that_is_not_a_store_or_holds_no_pairs_is_one_clear_error(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match=r"is .*plain a pair store written by bpo"):
        main(["export", str(tmp_path / "plain"), str(tmp_path / "trl")])
    with PairWriter(tmp_path / "empty", {"stage": "bootstrap"}):
        pass
    with pytest.raises(ValueError, match=r"empty holds no pairs; nothing to export"):
        main(["export", str(tmp_path / "empty"), str(tmp_path / "trl")])
    assert not (tmp_path / "trl").exists()


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_view_refuses_a_limit_below_one(tmp_path, limit):
    store = tmp_path / "pairs"
    with PairWriter(store, {"stage": "bootstrap"}) as writer:
        writer.write(
            PreferencePair("t", None, [{"role": "user", "content": "q"}], "a", "b", "inject")
        )
    with pytest.raises(ValueError, match=f"--limit must be at least 1, got {limit}"):
        main(["view", str(store), "--limit", limit])
