"""benchmarks/gpu/: the verification script's dry run end to end, its budget and part-running
logic, the packed block mask it gives FlexAttention, the resume comparison, and the wheel
helper's package list and size check (with a fake downloader: nothing is fetched)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from gpu import attention, runner, smoke, training, verify, wheels
from gpu.specs import Run

ROOT = Path(__file__).resolve().parents[2]

TINY_LORA_PARAMS = {"llava": 17408, "qwen": 16384}


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    """verify.py --dry-run, as CI runs it: every part at toy sizes on the CPU, in fp32."""
    out = tmp_path_factory.mktemp("verify")
    command = [sys.executable, str(ROOT / "benchmarks/gpu/verify.py"), "--dry-run", "--out"]
    subprocess.run([*command, str(out)], check=True, timeout=600, env=_one_thread_env())
    assert (out / "log.txt").read_text().count("[verify] ") == len(verify.PARTS)
    return json.loads((out / "results.json").read_text())


def _one_thread_env() -> dict:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_dry_run_records_every_part_ok(dry_run):
    parts = dry_run["parts"]
    assert list(parts) == list(verify.PARTS)
    assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(parts, "ok")
    assert dry_run["dry_run"] is True and dry_run["cuda"]["available"] is False
    assert dry_run["packages"]["torch"] and dry_run["date"]


@pytest.mark.slow
def test_dry_run_packed_log_probs_equal_the_plain_forward(dry_run):
    """fp32: the packed rows and the plain forward add the same terms in another order, so the
    ~-77 nat sums agree to a few fp32 steps (~8e-6 each), far below 1e-4."""
    part = dry_run["parts"]["logprobs_bf16"]
    for shape in ("llava", "qwen"):
        record = part[shape]
        assert record["status"] == "ok" and record["dtype"] == "float32"
        assert record["max_abs_diff_packed_vs_plain"] < 1e-4
        assert record["floor_plain_vs_alone"] < 1e-4
        assert record["within"] is True
        assert -1000 < record["mean_chosen_logp"] < 0


@pytest.mark.slow
def test_dry_run_trains_both_sides_at_both_shapes(dry_run):
    """LoRA r=8 on every linear layer of the toy language models, r x (in + out) each:
    LLaVA (2 layers, hidden 64, MLP 128): q, k, v, o 8 x 128 = 1024 each, gate and up
    8 x 192 = 1536 each, down 1536: 8704 a layer, 17408; Qwen (4 heads of 16, 2 key/value
    heads: k and v 64 -> 32, 8 x 96 = 768 each): 1024 + 768 + 768 + 1024 + 3 x 1536 = 8192 a
    layer, 16384. Both sides must train exactly these."""
    part = dry_run["parts"]["train_throughput"]
    for shape, trainable in TINY_LORA_PARAMS.items():
        record = part[shape]
        for side in ("bpo", "trl"):
            figures = record[side]
            assert figures["status"] == "ok", figures
            assert finite_positive(figures["pairs_per_s_step"])
            assert finite_positive(figures["pairs_per_s_end_to_end"])
            assert finite_positive(figures["peak_total_mib"])
            assert figures["peak_mem_mib"] >= 0
            assert figures["params"]["trainable"] == trainable
            assert abs(figures["loss"] - math.log(2)) < 0.01  # random weights: margin ~0
        assert finite_positive(record["bpo"]["ref_pass_s"])
        assert finite_positive(record["speedup"]["step"])
        assert finite_positive(record["speedup"]["ideal_step"])


@pytest.mark.slow
def test_dry_run_flex_and_sdpa_score_the_same(dry_run):
    part = dry_run["parts"]["attention"]
    assert part["block_mask_equals_bpo_mask"] is True
    assert part["max_abs_diff_flex_vs_sdpa"] < 1e-4
    for path in ("sdpa_4d_mask", "flex_block_mask"):
        assert part[path]["status"] == "ok"
        assert finite_positive(part[path]["s_per_step"])
        assert "peak_mem_mib" in part[path] and finite_positive(part[path]["peak_total_mib"])


@pytest.mark.slow
def test_dry_run_generation_batched_equals_per_sample(dry_run):
    """Keyed noise and sampling make a request's answer independent of its batch (fp32): the 2
    per-sample answers equal the batched ones; at most 32 requests x 8 new tokens = 256."""
    part = dry_run["parts"]["generation"]
    assert part["identical_answers"] == "2 of 2"
    assert 0 < part["batch_32"]["generated_tokens"] <= 256
    assert finite_positive(part["batch_32"]["tokens_per_s"])
    assert finite_positive(part["per_sample"]["tokens_per_s"])


@pytest.mark.slow
def test_dry_run_resumes_to_the_same_metrics(dry_run):
    part = dry_run["parts"]["accelerate_smoke"]
    fsdp = part["fsdp"]
    assert fsdp["status"] == "ok" and fsdp["equal_after_resume"] is True
    assert fsdp["max_abs_diff_after_resume"] <= 1e-6
    assert fsdp["checkpoints_written"] == ["step-00000002", "step-00000004"]
    assert fsdp["adapter_saved"] is True
    assert fsdp["losses_first_run"] == fsdp["losses_resumed_run"]
    assert part["qlora"]["status"] == "not run"  # no CUDA here


@pytest.mark.slow
def test_the_wheel_list_covers_what_the_run_imports(dry_run):
    """Every distribution the parts imported is in the GPU image, among the wheels the helper
    carries, bpo itself (the working tree), or imported only when present."""
    imported = set()
    for part in dry_run["parts"].values():
        imported |= {wheels.normalize(d) for d in part["imported_distributions"]}
    covered = {wheels.normalize(n) for n in wheels.GPU_IMAGE} | {w.name for w in wheels.needed()}
    assert imported - covered - wheels.IMPORTED_IF_PRESENT == {"bpo"}


# --- budget and part running -----------------------------------------------------------------


def test_budget_for_a_part_by_hand():
    """train_throughput: budget 190 s, at least 70: 500 s left -> 190; 100 -> 100; 69 -> None."""
    assert verify.budget_for("train_throughput", 500) == 190
    assert verify.budget_for("train_throughput", 100) == 100
    assert verify.budget_for("train_throughput", 69) is None


def test_parts_the_budget_cannot_hold_are_recorded_not_run(tmp_path, monkeypatch):
    """A fake clock; every part spends its whole budget. --budget_s 300: logprobs_bf16 gets 60
    (240 left), train_throughput 190 (50 left), attention min(80, 50) = 50 (0 left);
    generation (needs 20) and accelerate_smoke (35) are not run."""
    now = [1000.0]
    monkeypatch.setattr(verify.time, "monotonic", lambda: now[0])  # runner's `time` too
    monkeypatch.setattr(verify, "machine_info", lambda repo: {})

    def spend_budget(ctx):
        now[0] = ctx.deadline
        return {"spent": True}

    monkeypatch.setattr(verify, "part_function", lambda name: spend_budget)
    monkeypatch.setenv("PYTHONPATH", "")  # main() sets both for its parts' processes
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    args = ["--out", str(tmp_path), "--budget_s", "300", "--work", str(tmp_path), "--isolate", "no"]
    results = verify.main(args)
    parts = results["parts"]
    budgets = {name: parts[name]["budget_s"] for name in parts}
    assert budgets == {
        "logprobs_bf16": 60,
        "train_throughput": 190,
        "attention": 50,
        "generation": 0,
        "accelerate_smoke": 0,
    }
    assert [parts[n]["status"] for n in parts] == ["ok", "ok", "ok", "not run", "not run"]
    assert "needs at least 20 s" in parts["generation"]["why"]
    assert json.loads((tmp_path / "results.json").read_text())["parts"] == parts


def test_a_measurement_without_budget_is_not_run(tmp_path):
    ctx = runner.Context(Run(True), deadline=runner.time.monotonic() + 5, work=tmp_path)
    record = runner.attempt(ctx, "x", 60, lambda: {"never": 1})
    assert record["status"] == "not run" and "~60 s needed" in record["why"]
    assert ctx.record["x"] is record


def test_a_failed_measurement_records_its_error_and_the_part_goes_on(tmp_path):
    ctx = runner.Context(Run(True), deadline=runner.time.monotonic() + 60, work=tmp_path)

    def part(ctx):
        runner.attempt(ctx, "broken", 0, lambda: 1 / 0)
        return {"after": runner.attempt(ctx, "fine", 0, lambda: {"value": 3})["value"]}

    record = runner.run_in_process(part, ctx)
    assert record["status"] == "ok" and record["after"] == 3
    assert record["broken"]["status"] == "error"
    assert record["broken"]["error"] == "ZeroDivisionError: division by zero"


def test_an_isolated_part_past_its_budget_is_killed_keeping_its_partial_record(tmp_path):
    partial, log = tmp_path / "part.json", tmp_path / "log.txt"
    child = (
        f"import json, time; open({str(partial)!r}, 'w').write(json.dumps({{'llava': 1}}));"
        "print('measured llava', flush=True); time.sleep(60)"
    )
    record = runner.run_isolated([sys.executable, "-c", child], 0.5, partial, log, grace_s=1.0)
    assert record["status"] == "timeout" and record["partial"] == {"llava": 1}
    assert "measured llava" in log.read_text()


def test_an_isolated_part_that_crashes_is_an_error(tmp_path):
    partial, log = tmp_path / "part.json", tmp_path / "log.txt"
    argv = [sys.executable, "-c", "raise SystemExit(3)"]
    record = runner.run_isolated(argv, 30, partial, log)
    assert record["status"] == "error" and "exited with 3" in record["error"]


def test_missing_trl_is_recorded_not_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now raises ImportError
    ctx = runner.Context(Run(True), deadline=runner.time.monotonic() + 60, work=tmp_path)
    record = runner.attempt(ctx, "llava_trl", 0, lambda: training.trl_side(None))
    assert record["status"] == "not run"
    assert record["why"].startswith("trl is not importable here (ModuleNotFoundError")


def test_missing_deepspeed_and_bitsandbytes_are_recorded_not_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setattr(smoke, "launch_and_resume", lambda ctx, name, config: {"ran": name})
    ctx = runner.Context(Run(False), deadline=runner.time.monotonic() + 600, work=tmp_path)
    record = smoke.run(ctx)
    assert record["fsdp"] == {"status": "ok", "ran": "fsdp", "wall_s": record["fsdp"]["wall_s"]}
    for name, package in (("deepspeed_zero2", "deepspeed"), ("qlora", "bitsandbytes")):
        assert record[name]["status"] == "not run"
        assert record[name]["why"].startswith(f"{package} is not importable here")


def test_a_side_out_of_memory_is_told_from_other_errors():
    """torch's error and bpo's (which names the batch) both make the shape run again with
    gradient checkpointing; any other failure does not."""
    oom = {"status": "error", "error": "BatchOutOfMemoryError: out of memory in training step 1"}
    assert training._out_of_memory(oom)
    assert training._out_of_memory({"status": "error", "error": "OutOfMemoryError: CUDA out of"})
    assert not training._out_of_memory({"status": "error", "error": "ValueError: no pairs"})
    assert not training._out_of_memory({"status": "not run", "why": "trl is not importable"})


# --- the block mask and the resume comparison ----------------------------------------------


def test_the_flex_mask_is_bpos_packed_mask_by_hand():
    """Row [P P C C R pad]: chosen tokens see the prefix and earlier chosen ones, the rejected
    token the prefix and itself (never the chosen block), padding only itself."""
    import torch

    from bpo.train.logprobs import block_attention_mask

    segments = torch.tensor([[0, 0, 1, 1, 2, -1]])
    by_hand = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(attention.dense_allowed(segments)[0], by_hand)
    assert torch.equal(block_attention_mask(segments, torch.float32)[0, 0] == 0, by_hand)


def test_the_resume_comparison_by_hand(tmp_path):
    """Steps 3 and 4 after a resume from step 2: |0.5 - 0.5| and |0.25 - 0.2503| -> 3e-4; step
    1's difference (before the resume) does not count."""
    a = [{"step": 1, "loss": 0.9}, {"step": 3, "loss": 0.5}, {"step": 4, "loss": 0.25}]
    b = [{"step": 1, "loss": 0.1}, {"step": 3, "loss": 0.5}, {"step": 4, "loss": 0.2503}]
    assert smoke.largest_difference(a, b, after_step=2) == pytest.approx(3e-4)
    with pytest.raises(ValueError, match="steps differ"):
        smoke.largest_difference(a, b[:2], after_step=2)
    run = tmp_path / "a"
    for step in (2, 4):
        (run / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
    (run / "model").mkdir()
    (run / "summary.json").write_text("{}")
    (run / "metrics.jsonl").write_text("{}\n")
    smoke.copy_as_killed(run, tmp_path / "b", keep_step=2)
    kept = sorted(p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*"))
    assert kept == ["checkpoints", "checkpoints/step-00000002", "metrics.jsonl"]


# --- the wheel helper ----------------------------------------------------------------------


def test_requirement_markers_are_read_for_the_gpu_machine():
    """Python 3.12 on Linux: the python < 3.10 and the extra's entries drop out."""
    lines = [
        "x>=1",
        "y; python_version < '3.10'",
        "z; extra == 'dev'",
        "w; sys_platform == 'linux'",
    ]
    assert wheels.required_names(lines) == ["x", "w"]


def test_needed_walks_requirements_the_image_lacks():
    """a needs b and c; b needs d; the image has c (and so whatever c needs): a, b, d."""
    deps = {"a": ["b", "C"], "b": ["d"], "c": ["e"], "d": []}
    found = wheels.needed(
        {"a": "the part's import"},
        frozenset({"c"}),
        requires=lambda name: deps[name.lower()],
        version=lambda name: "1.0",
    )
    assert [(w.name, w.why) for w in found] == [
        ("a", "the part's import"),
        ("b", "needed by a"),
        ("d", "needed by b"),
    ]


def test_the_wheels_of_this_environment():
    """trl pinned to 1.16.0 with datasets, dill and multiprocess; httpx2 with httpcore2 and
    truststore (bpo.endpoint); none of them in the GPU image (docs/gpu-verification.md)."""
    found = {w.name: w.version for w in wheels.needed()}
    assert set(found) == {"trl", "datasets", "dill", "multiprocess", "httpx2", "httpcore2"} | {
        "truststore"
    }
    assert found["trl"] == "1.16.0"
    assert not set(found) & {wheels.normalize(n) for n in wheels.GPU_IMAGE}


def fake_wheel(path: Path, size: int, requires: tuple[str, ...] = ()) -> None:
    """A wheel-shaped zip of about `size` bytes whose METADATA lists `requires`."""
    metadata = "Metadata-Version: 2.1\nName: x\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("x-1.0.dist-info/METADATA", metadata)
        z.writestr("x/payload.bin", b"\0" * size)


def fake_downloader(sizes: dict[str, int], requires: dict[str, tuple] | None = None):
    def download(spec: str, dest: Path) -> None:
        name = spec.split("=")[0].split(">")[0]
        if name not in sizes:
            raise RuntimeError(f"pip found no cp312 manylinux x86-64 wheel of {spec}")
        fake_wheel(
            dest / f"{name}-1.0-py3-none-any.whl", sizes[name], (requires or {}).get(name, ())
        )

    return download


KIB = 1024


def test_collect_keeps_the_optional_wheels_that_fit(tmp_path, capsys):
    """Limit 10 KiB: a (2 KiB) + b (3 KiB) = ~5 KiB; 'big' (8 KiB) would make ~13: left out;
    'needy' fits but needs 'missing-dep': left out; 'fits' (1 KiB) is kept; 'absent' has no
    wheel. A stale wheel in the folder is removed first."""
    (tmp_path / "stale-0.1-py3-none-any.whl").write_bytes(b"old")
    sizes = {"a": 2 * KIB, "b": 3 * KIB, "big": 8 * KIB, "fits": KIB, "needy": KIB}
    optional = {name: (name, f"{name} part") for name in ("big", "absent", "needy", "fits")}
    got, skipped = wheels.collect(
        tmp_path,
        [wheels.Wheel("a", "1.0", "root"), wheels.Wheel("b", "1.0", "needed by a")],
        optional,
        download=fake_downloader(sizes, {"needy": ("missing-dep>=1", "torch")}),
        limit_mib=10 / 1024,
        image=frozenset({"torch"}),
    )
    assert [w.name for w, _ in got] == ["a", "b", "fits"]
    assert sorted(p.name for p in tmp_path.glob("*.whl")) == [
        "a-1.0-py3-none-any.whl",
        "b-1.0-py3-none-any.whl",
        "fits-1.0-py3-none-any.whl",
    ]
    assert skipped["big"].startswith("its wheel is 0.0 MiB") and "would exceed" in skipped["big"]
    assert skipped["needy"] == "it needs missing-dep, which the GPU image lacks"
    assert "no cp312 manylinux x86-64 wheel of absent" in skipped["absent"]
    text = wheels.report(got, skipped, tmp_path, 10 / 1024)
    assert "fits-1.0-py3-none-any.whl" in text and "left out: big" in text
    assert text.splitlines()[-1] == "on the GPU machine: " + wheels.INSTALL.format(dest=tmp_path)


def test_collect_refuses_wheels_over_the_limit(tmp_path):
    """a (3 MiB) + b (2.5 MiB) = 5.5 MiB against a 5 MiB limit: refused, nothing kept."""
    sizes = {"a": 3 * 2**20, "b": 5 * 2**19}
    with pytest.raises(SystemExit, match=r"5\.5 MiB, over --limit-mib 5 .*a==1\.0 3\.0 MiB"):
        wheels.collect(
            tmp_path,
            [wheels.Wheel("a", "1.0", "root"), wheels.Wheel("b", "1.0", "root")],
            {},
            download=fake_downloader(sizes),
            limit_mib=5,
        )
    assert list(tmp_path.glob("*.whl")) == []
