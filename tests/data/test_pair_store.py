import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bpo.data import (
    BadRecord,
    ConfigMismatchError,
    DuplicateKeyError,
    PairWriter,
    PreferencePair,
    StoreError,
    merge_stores,
    read_bad_records,
    read_manifest,
    read_pairs,
)

CONFIG = {"model": "tiny-llava", "seed": 0, "noise_step": 500, "sources": ["weaken", "inject"]}


def make_pair(i: int) -> PreferencePair:
    """Pair i: even i are `weaken`, odd are `inject`; texts vary so shards differ byte-wise."""
    source = "weaken" if i % 2 == 0 else "inject"
    return PreferencePair(
        id=f"s{i}",
        image=f"img/{i}.png",
        prompt=[{"role": "user", "content": f"<image>\nQuestion {i}? é"}],
        chosen=f"Gold answer {i}.",
        rejected=f"Wrong answer {i}.\nSecond line.",
        source=source,
        meta={
            "noise_step": 500,
            "temperature": 1.0,
            "seed": i,
            "generator": "test",
            "sample_index": 0,
        },
        ref_chosen_logp=-1.5 * i,
        ref_rejected_logp=None,
        chosen_tokens=i,
        rejected_tokens=None,
    )


def bad(i: int, reason: str = "missing_image") -> BadRecord:
    return BadRecord("train.jsonl", i, f"b{i}", reason, f"train.jsonl line {i} (id=b{i}): {reason}")


def write_store(out: Path, pairs, config=CONFIG, shard_size=10) -> None:
    with PairWriter(out, config, shard_size=shard_size) as writer:
        for pair in pairs:
            writer.write(pair)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("pairs-*.jsonl"))}


def test_writes_shards_and_manifest(tmp_path):
    pairs = [make_pair(i) for i in range(25)]

    with PairWriter(tmp_path / "out", CONFIG, shard_size=10) as writer:
        for pair in pairs:
            writer.write(pair)
        writer.report_bad(bad(3))
        writer.report_bad(bad(4, "corrupt_image"))
        writer.count("samples_seen", 27)

    out = tmp_path / "out"
    assert [(name, len(data.splitlines())) for name, data in shard_bytes(out).items()] == [
        ("pairs-00000.jsonl", 10),
        ("pairs-00001.jsonl", 10),
        ("pairs-00002.jsonl", 5),
    ]
    first_line = (out / "pairs-00000.jsonl").read_text(encoding="utf-8").splitlines()[0]
    assert json.loads(first_line) == make_pair(0).to_json()
    assert list(read_pairs(out)) == pairs
    manifest = read_manifest(out)
    assert manifest["schema_version"] == 1
    assert manifest["complete"] is True
    assert manifest["config"] == CONFIG
    assert manifest["counts"] == {
        "pairs": 25,
        "by_source": {"inject": 12, "weaken": 13},
        "other": {"samples_seen": 27},
    }
    assert manifest["bad_records"] == {
        "total": 2,
        "by_reason": {"corrupt_image": 1, "missing_image": 1},
        "first": [bad(3).message, bad(4, "corrupt_image").message],
    }
    assert manifest["shards"] == [
        {"file": "pairs-00000.jsonl", "pairs": 10},
        {"file": "pairs-00001.jsonl", "pairs": 10},
        {"file": "pairs-00002.jsonl", "pairs": 5},
    ]
    assert set(manifest["versions"]) == {"python", "bpo", "torch", "transformers", "datasets"}
    assert manifest["versions"]["bpo"] == "0.1.0"


def test_exception_leaves_store_incomplete(tmp_path):
    with pytest.raises(RuntimeError), PairWriter(tmp_path / "out", CONFIG) as writer:
        writer.write(make_pair(0))
        raise RuntimeError("crash")

    manifest = read_manifest(tmp_path / "out")
    assert (manifest["complete"], manifest["counts"]["pairs"]) == (False, 1)


def test_resume_after_partial_line_matches_an_uninterrupted_run(tmp_path):
    pairs = [make_pair(i) for i in range(25)]
    write_store(tmp_path / "reference", pairs)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt), PairWriter(out, CONFIG, shard_size=10) as writer:
        for pair in pairs[:13]:
            writer.write(pair)
        raise KeyboardInterrupt
    # What a kill in the middle of write() leaves: the start of line 14, no newline.
    partial = json.dumps(pairs[13].to_json())[:40]
    with (out / "pairs-00001.jsonl").open("a", encoding="utf-8") as f:
        f.write(partial)

    with PairWriter(out, CONFIG, shard_size=10) as writer:
        assert writer.done_keys == {p.key for p in pairs[:13]}
        assert (out / "pairs-00001.jsonl").read_bytes() == b"".join(
            (json.dumps(p.to_json(), ensure_ascii=False) + "\n").encode() for p in pairs[10:13]
        )
        for pair in pairs:
            if pair.key not in writer.done_keys:
                writer.write(pair)

    assert shard_bytes(out) == shard_bytes(tmp_path / "reference")
    assert read_manifest(out)["counts"]["pairs"] == 25


def test_resume_after_sigkill_rebuilds_counts_from_files(tmp_path):
    """A real kill: no close(), a stale manifest, a half line, and the lock left to the OS."""
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import json, os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_pair_store import CONFIG, bad, make_pair
        from bpo.data import PairWriter
        writer = PairWriter({str(out)!r}, CONFIG, shard_size=10, manifest_interval_s=1e9)
        for i in range(13):
            writer.write(make_pair(i))
        writer.report_bad(bad(1))
        writer.report_bad(bad(2))
        writer._shard.write(json.dumps(make_pair(13).to_json())[:30].encode())
        writer._shard.flush()
        writer._bad_file.write(b'{{"file": "train.js')
        writer._bad_file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    # Last written when shard 0 closed; the 3 pairs and 2 bad records since live only in files.
    assert read_manifest(out)["counts"]["pairs"] == 10
    assert read_manifest(out)["bad_records"]["total"] == 0

    with PairWriter(out, CONFIG, shard_size=10) as writer:
        assert writer.done_keys == {make_pair(i).key for i in range(13)}
        assert writer.report_bad(bad(2)) is False  # reported before the kill
        assert writer.report_bad(bad(3)) is True
        for i in range(13, 25):
            writer.write(make_pair(i))

    write_store(tmp_path / "reference", [make_pair(i) for i in range(25)])
    assert shard_bytes(out) == shard_bytes(tmp_path / "reference")
    manifest = read_manifest(out)
    assert manifest["counts"]["pairs"] == 25
    assert manifest["bad_records"]["by_reason"] == {"missing_image": 3}
    assert [b.id for b in read_bad_records(out)] == ["b1", "b2", "b3"]


def test_bad_records_are_not_double_counted_after_resume(tmp_path):
    out = tmp_path / "out"
    with PairWriter(out, CONFIG) as writer:
        writer.report_bad(bad(1))
        writer.report_bad(bad(2, "corrupt_image"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["bad_records"]["by_reason"] = {"missing_image": 99}  # a stale or lying manifest
    (out / "manifest.json").write_text(json.dumps(manifest))

    with PairWriter(out, CONFIG) as writer:
        writer.report_bad(bad(1))
        writer.report_bad(bad(2, "corrupt_image"))
        writer.report_bad(bad(5))

    assert read_manifest(out)["bad_records"]["by_reason"] == {
        "corrupt_image": 1,
        "missing_image": 2,
    }
    assert len((out / "bad_records.jsonl").read_text().splitlines()) == 3


def test_different_config_refuses_to_resume(tmp_path):
    write_store(tmp_path / "out", [make_pair(0)])

    with pytest.raises(ConfigMismatchError) as info:
        PairWriter(tmp_path / "out", {**CONFIG, "seed": 1, "extra": True})

    assert str(info.value) == (
        f"{tmp_path / 'out'} holds pairs made with a different config "
        "(extra: absent (stored) vs True (now); seed: 0 (stored) vs 1 (now)); "
        "choose a new --out to keep both, or pass --overwrite to replace it"
    )


def test_overwrite_starts_over_and_keeps_unrelated_files(tmp_path):
    out = tmp_path / "out"
    write_store(out, [make_pair(i) for i in range(12)])
    (out / "notes.txt").write_text("mine")

    with PairWriter(out, {**CONFIG, "seed": 1}, shard_size=10, overwrite=True) as writer:
        assert writer.done_keys == set()
        writer.write(make_pair(100))

    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "bad_records.jsonl",
        "manifest.json",
        "notes.txt",
        "pairs-00000.jsonl",
    ]
    assert [p.id for p in read_pairs(out)] == ["s100"]


def test_writing_a_key_twice_is_an_error(tmp_path):
    with PairWriter(tmp_path / "out", CONFIG) as writer:
        writer.write(make_pair(0))
        with pytest.raises(DuplicateKeyError, match="pair s0:weaken:0 is already in"):
            writer.write(make_pair(0))


def test_second_writer_on_the_same_directory_is_refused(tmp_path):
    with PairWriter(tmp_path / "out", CONFIG), pytest.raises(StoreError, match="another process"):
        PairWriter(tmp_path / "out", CONFIG)


def test_damaged_line_in_a_closed_shard_names_file_and_line(tmp_path):
    out = tmp_path / "out"
    write_store(out, [make_pair(i) for i in range(12)])
    lines = (out / "pairs-00000.jsonl").read_text().splitlines(keepends=True)
    lines[4] = "{not json\n"
    (out / "pairs-00000.jsonl").write_text("".join(lines))

    with pytest.raises(StoreError, match=r"pairs-00000\.jsonl line 5: not valid JSON"):
        list(read_pairs(out))
    with pytest.raises(StoreError, match=r"pairs-00000\.jsonl line 5: not valid JSON"):
        PairWriter(out, CONFIG)


def sharded_config(index: int, num_shards: int = 2) -> dict:
    return {**CONFIG, "shard_index": index, "num_shards": num_shards}


def test_merge_equals_a_single_store(tmp_path):
    pairs = [make_pair(i) for i in range(20)]
    write_store(tmp_path / "single", pairs)
    for index in (0, 1):
        with PairWriter(tmp_path / f"shard{index}", sharded_config(index), shard_size=4) as writer:
            for pair in pairs[index::2]:
                writer.write(pair)
            writer.report_bad(bad(index))
            writer.count("samples_seen", 10 + index)

    manifest = merge_stores(
        [tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged", shard_size=10
    )

    def as_set(directory):
        return {json.dumps(p.to_json(), sort_keys=True) for p in read_pairs(directory)}

    assert as_set(tmp_path / "merged") == as_set(tmp_path / "single")
    assert manifest["counts"] == {
        "pairs": 20,
        "by_source": {"inject": 10, "weaken": 10},
        "other": {"samples_seen": 21},
    }
    assert manifest["bad_records"]["total"] == 2
    assert manifest["config"] == {
        **CONFIG,
        "merged_from": [str(tmp_path / "shard0"), str(tmp_path / "shard1")],
    }
    assert manifest["complete"] is True


def test_merge_refuses_configs_that_differ_beyond_the_shard(tmp_path):
    write_store(tmp_path / "a", [make_pair(0)], config=sharded_config(0))
    write_store(tmp_path / "b", [make_pair(1)], config={**sharded_config(1), "noise_step": 900})

    with pytest.raises(ConfigMismatchError, match=r"noise_step: 500 \(first\) vs 900 \(now\)"):
        merge_stores([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")


def test_merge_refuses_duplicate_keys(tmp_path):
    write_store(tmp_path / "a", [make_pair(0), make_pair(1)], config=sharded_config(0))
    write_store(tmp_path / "b", [make_pair(1)], config=sharded_config(1))

    with pytest.raises(DuplicateKeyError) as info:
        merge_stores([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")

    assert str(info.value).startswith(
        f"pair s1:inject:0 is in both {tmp_path / 'a'} and {tmp_path / 'b'}"
    )


def test_merge_refuses_a_missing_shard(tmp_path):
    write_store(tmp_path / "a", [make_pair(0)], config=sharded_config(0, num_shards=3))
    write_store(tmp_path / "b", [make_pair(1)], config=sharded_config(1, num_shards=3))

    with pytest.raises(StoreError, match=r"shards \[2\] are missing"):
        merge_stores([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")


def test_shards_load_with_datasets(tmp_path):
    from datasets import load_dataset

    out = tmp_path / "out"
    write_store(out, [make_pair(i) for i in range(25)])

    dataset = load_dataset(
        "json",
        data_files=str(out / "pairs-*.jsonl"),
        split="train",
        cache_dir=str(tmp_path / "cache"),
    )

    assert dataset.num_rows == 25
    assert dataset.column_names == list(make_pair(0).to_json())
    row = dataset[7]
    assert (row["id"], row["source"], row["prompt"]) == ("s7", "inject", make_pair(7).prompt)
    assert row["meta"] == make_pair(7).meta
    assert row["ref_chosen_logp"] == pytest.approx(-10.5)
    assert PreferencePair.from_json(row) == make_pair(7)
