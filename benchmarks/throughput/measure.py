"""What each side measures: peak memory, its turn-taking with the driver (and the spans of work
between GO and DONE), and the per-side result a child prints."""

from __future__ import annotations

import os
import re
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from throughput.build import Settings


class PeakMemory:
    """Peak memory above the moment `reset` is called: CUDA allocator or process RSS."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.baseline = 0

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        self.baseline = _status_kib("VmRSS") * 1024
        try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False

    def peak_above_baseline(self) -> tuple[int, int]:
        """(peak - baseline, peak) in bytes."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.hwm_reset:
            peak = _status_kib("VmHWM") * 1024
        else:  # without the reset this also counts any peak before the baseline
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak - self.baseline, peak


def _status_kib(field_name: str) -> int:
    match = re.search(rf"{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


class Gate:
    """A child's turn-taking with the driver, and the wall time of each turn (its span).

    A side says READY when it is idle, waits for GO, works (the reference pass, or fetching and
    collating a batch and taking a step), and says DONE; the driver sends GO to one side at a
    time, so no side's measured work overlaps another side's. The span from GO to DONE is what
    the end-to-end time adds up; whatever a side does between DONE and READY (building its
    trainer) is set-up, untimed, and also runs alone. Without control pipes (sequential runs) it
    only times the spans.
    """

    def __init__(self, fds: str | None = None, device: str = "cpu") -> None:
        self.reader = self.writer = None
        if fds:
            read_fd, write_fd = (int(fd) for fd in fds.split(","))
            self.reader, self.writer = os.fdopen(read_fd, "r"), os.fdopen(write_fd, "w")
        self.device = device
        self.spans: list[float] = []
        self.cpu_spans: list[float] = []  # the process's CPU time in each turn (a load check)
        self.start = self.cpu_start = 0.0

    def _say(self, word: str) -> None:
        if self.writer is not None:
            self.writer.write(word + "\n")
            self.writer.flush()

    def wait_turn(self) -> None:
        self._say("READY")
        if self.reader is not None and self.reader.readline().strip() != "GO":
            raise SystemExit("the driver went away")
        sync(self.device)
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def done(self) -> None:
        sync(self.device)
        self.spans.append(time.perf_counter() - self.start)
        self.cpu_spans.append(time.process_time() - self.cpu_start)
        self._say("DONE")


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def param_counts(model) -> dict[str, int]:
    """Parameters doing matmuls per token: vision tower, projector, decoder layers, LM head
    (Qwen: `visual.merger` is the projector, the rest of `visual` the tower)."""
    counts = {"vision": 0, "projector": 0, "lm": 0, "head": 0, "trainable": 0}
    for name, p in model.named_parameters():
        counts["trainable"] += p.numel() if p.requires_grad else 0
        if "lora_" in name or "embed_tokens" in name or "position_embedding" in name:
            continue
        if "multi_modal_projector" in name or "visual.merger" in name:
            counts["projector"] += p.numel()
        elif "vision_tower" in name or "visual." in name:
            counts["vision"] += p.numel()
        elif "lm_head" in name:
            counts["head"] += p.numel()
        elif "language_model" in name:
            counts["lm"] += p.numel()
    return counts


class StepClock:
    """Each step's wall time and the process's CPU time in it."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def start(self) -> None:
        sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        sync(self.device)
        self.times.append(time.perf_counter() - self.wall)
        self.cpu_times.append(time.process_time() - self.cpu)


def side_result(settings, clock, gate, delta, peak, tokens, counts, loss) -> dict[str, Any]:
    times, spans = clock.times, gate.spans
    measured = times[settings.warmup :]
    # The median step: robust to a stray slow step on a shared machine; the mean is also kept.
    median = statistics.median(measured)
    return {
        "pairs_per_s": settings.batch_size / median,
        "s_per_step": median,
        "s_per_step_mean": statistics.fmean(measured),
        "steps_measured": len(measured),
        "step_times": times,  # every step, warm-up included
        "spans": spans,  # every turn's wall time (bpo: the reference pass first)
        "end_to_end_s": sum(spans),
        # CPU time: what load on a shared machine changes least (not on a GPU: kernels run there).
        "step_cpu_times": clock.cpu_times,
        "end_to_end_cpu_s": sum(gate.cpu_spans),
        "cpu_spans": gate.cpu_spans,
        "peak_mem_bytes": delta,
        "peak_total_bytes": peak,
        "tokens": {k: sum(t[k] for t in tokens) / len(tokens) for k in tokens[0]},
        "params": counts,
        "loss": loss,
        "device": device_name(settings),
    }


def device_name(settings: Settings) -> str:
    import torch

    if settings.device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(settings.device))
    return f"cpu, {torch.get_num_threads()} threads"
