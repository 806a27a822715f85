"""benchmarks/train_throughput.py's arithmetic and turn-taking: the FLOP-count ideals with and
without gradient checkpointing, the paired ratios, the target lines, the gate's words."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from throughput.build import CPU_SPEC
from throughput.measure import Gate
from throughput.summary import _target_lines, flops_per_pair, ideal_ratios, paired_ratios

# The benchmark's mean shape: P = 221 prefix tokens, answers of A = 64.
TOKENS = {"prefix": 221.0, "chosen": 64.0, "rejected": 64.0}
DECODER_ONLY = {"vision": 0, "projector": 0, "lm": 1, "head": 0}


def test_ideals_of_the_decoder_alone_by_hand():
    """In units of 2 N_lm per pair, rows 2P + 2A = 570 (TRL) and P + 2A = 349 (bpo):
    no checkpointing: TRL = 2 x 570 + 570 = 1710, bpo = 2 x 349 = 698, pass = 349;
      step 1710 / 698 = 2.4499, end to end (2 epochs) 3420 / (1396 + 349) = 1.9599;
      TRL no-ref 1140: TRL / no-ref = 1.5.
    checkpointing (the decoder's forward again in the backward): TRL = 3 x 570 + 570 = 2280,
      bpo = 3 x 349 = 1047: step 2.1777; end to end 4560 / (2094 + 349) = 1.8666."""
    plain = ideal_ratios(flops_per_pair(TOKENS, DECODER_ONLY, CPU_SPEC, False), epochs=2)
    assert plain["bpo"] == pytest.approx((3420 / 1745, 1710 / 698))
    assert plain["trl-noref"] == pytest.approx((1.5, 1.5))
    assert plain["trl"] == (1.0, 1.0)
    recompute = ideal_ratios(flops_per_pair(TOKENS, DECODER_ONLY, CPU_SPEC, True), epochs=2)
    assert recompute["bpo"] == pytest.approx((4560 / 2443, 2280 / 1047))
    assert round(recompute["bpo"][1], 2) == 2.18


def test_the_pass_scores_a_samples_pairs_in_one_row_by_hand():
    """Two pairs a sample: one row P + C + 2R = 221 + 64 + 128 = 413 decoder tokens for both,
    206.5 a pair (against 349 in a row of its own); end to end (2 epochs, no checkpointing)
    3420 / (1396 + 206.5) = 2.1342; the step is unchanged (training keeps a row per pair)."""
    flops = flops_per_pair(TOKENS, DECODER_ONLY, CPU_SPEC, False, per_sample=2)
    assert flops["bpo_pass"] == pytest.approx(2 * 206.5)  # FLOPs: 2 N_lm per token
    grouped = ideal_ratios(flops, epochs=2)
    assert grouped["bpo"] == pytest.approx((3420 / 1602.5, 1710 / 698))


def test_the_head_and_the_vision_tower_are_not_recomputed():
    """N_head = 1, N_vision = 1 (CPU_SPEC: 197 tower positions, 196 image tokens), N_proj = 0:
    F_vis = 2 x 197 = 394; scored S = 128, so H = 256 per head pass; decoder 0. bpo's step
    = 394 + 2 H = 906 with or without checkpointing; TRL = 4 x 394 + 3 H = 2344; the pass
    = 394 + H = 650."""
    counts = {"vision": 1, "projector": 0, "lm": 0, "head": 1}
    for checkpointing in (False, True):
        flops = flops_per_pair(TOKENS, counts, CPU_SPEC, checkpointing)
        assert flops == {"trl": 2344, "trl-noref": 1300, "bpo": 906, "bpo_pass": 650}


def side(spans, steps):
    return {"spans": spans, "step_times": steps}


def test_paired_ratios_spread_the_pass_over_the_rounds_by_hand():
    """bpo: pass 3 s, then turns 1, 2, 1 (steps 0.5, 1, 0.5); TRL turns 3, 6, 1 (steps 2, 4, 1).
    End to end, each bpo turn carries 3 / 3 = 1 s of the pass: 3/2, 6/3, 1/2 -> median 1.5.
    Step only after 1 warm-up step: 4/1, 1/0.5 -> median of (4, 2) = 3."""
    bpo = side([3.0, 1.0, 2.0, 1.0], [0.5, 1.0, 0.5])
    trl = side([3.0, 6.0, 1.0], [2.0, 4.0, 1.0])
    assert paired_ratios(trl, bpo, "bpo", warmup=1) == pytest.approx((1.5, 3.0))


def test_each_target_is_printed_with_pass_or_fail():
    summary = {
        "end_to_end_speedup": 2.01,
        "step_speedup": 2.29,
        "peak_mem_ratio": 0.75,
        "ref_pass_per_step": 0.4,
    }
    lines = [line.split() for line in _target_lines(summary)]
    assert [(words[0], words[-1]) for words in lines] == [
        ("end_to_end_speedup", "PASS"),
        ("step_speedup", "FAIL"),
        ("peak_mem_ratio", "PASS"),  # the bound itself passes
        ("ref_pass_per_step", "FAIL"),
    ]
    assert summary["targets"]["step_speedup"] == {"value": 2.29, "target": ">= 2.3", "pass": False}


def test_the_gate_says_ready_waits_for_go_and_times_the_turn():
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    os.write(to_child_w, b"GO\n")
    gate = Gate(f"{to_child_r},{from_child_w}")
    gate.wait_turn()
    gate.done()
    gate.writer.close()
    with os.fdopen(from_child_r) as said:
        assert said.read() == "READY\nDONE\n"
    assert len(gate.spans) == 1 and gate.spans[0] >= 0
    os.close(to_child_w)
    gate.reader.close()
