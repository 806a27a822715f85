"""The schema of `bpo eval`: `EvalConfig` (a run) and `BenchmarkConfig` (one benchmark of it).

`check_config` validates every setting it can without reading a file, so a config that cannot run
to the end fails before any model loads: unknown benchmark names, repeated labels, options set on
a benchmark that does not read them, a judged benchmark without a judge, a benchmark with neither
a model nor an answers file, judge settings out of range or a judge prompt file that is not there, a model dtype or device the loader would refuse, generation settings
that cannot decode or a backend that is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bpo.endpoint import EndpointConfig
from bpo.evaluate.benchmarks import (
    BenchmarkConfig,
    BenchmarkName,
    benchmark,
    ignored_options,
    judge_missing,
    needs_judge,
)
from bpo.generate.config import GenerateConfig, check_generate_config
from bpo.generate.ray_cluster import RayConfig, check_ray_config
from bpo.models.config import ModelConfig, check_model

# BenchmarkConfig and BenchmarkName belong to the schema; they are defined beside the table.
__all__ = [
    "BenchmarkConfig",
    "BenchmarkName",
    "EvalConfig",
    "check_benchmark",
    "check_config",
    "check_model",
]


@dataclass
class EvalConfig:
    """A run of `bpo eval`: the model (or answer files), the benchmarks, generation and judge."""

    benchmarks: list[BenchmarkConfig] = field(default_factory=list)
    model: ModelConfig | None = None  # null when every benchmark has an `answers` file
    generation: GenerateConfig = field(default_factory=GenerateConfig)
    # The judge's endpoint, needed by mmvet, llava_bench, judge_objects. Its temperature,
    # max_tokens and parse_retries apply only where a benchmark has no default of its own; each
    # benchmark's `judge:` overrides them and the model (docs/evaluation.md).
    judge: EndpointConfig | None = None
    name: str | None = None  # the run's column title in `bpo compare`; default the folder name
    # Generate the answers on a Ray cluster, one model replica per actor (`pip install
    # 'bpo[ray]'`); the answers are those of a run in this process. null: in this process.
    ray: RayConfig | None = None


def _check_counts(bench: BenchmarkConfig) -> None:
    for option in ("limit", "max_new_tokens"):
        value = getattr(bench, option)
        if value is not None and value < 1:
            raise ValueError(
                f"benchmark {bench.key}: {option} is {value}; use a positive number or null"
            )


def _check_judge_settings(bench: BenchmarkConfig) -> None:
    settings = bench.judge
    if settings.temperature is not None and not 0.0 <= settings.temperature <= 2.0:
        raise ValueError(
            f"benchmark {bench.key}: judge.temperature is {settings.temperature}; use 0 to 2, or "
            "null for the benchmark's default"
        )
    for option, least in (("max_tokens", 1), ("parse_retries", 0)):
        value = getattr(settings, option)
        if value is not None and value < least:
            raise ValueError(
                f"benchmark {bench.key}: judge.{option} is {value}; use at least {least}, or "
                "null for the benchmark's default"
            )
    if bench.judge_prompt is not None and not Path(bench.judge_prompt).is_file():
        raise ValueError(
            f"benchmark {bench.key}: judge_prompt {bench.judge_prompt} is not a file; fix the "
            "path (docs/evaluation.md says where each reference prompt comes from)"
        )


def check_benchmark(config: EvalConfig, bench: BenchmarkConfig) -> None:
    """Fail on a setting of one benchmark that cannot run (the name first: the rest needs it)."""
    spec = benchmark(bench)
    ignored = ignored_options(bench)
    if ignored:
        reads = ", ".join(sorted(spec.options)) or "none of them"
        raise ValueError(
            f"benchmark {bench.key}: {bench.name} does not read {', '.join(ignored)} (of the "
            f"benchmark-specific options it reads {reads}); remove them"
        )
    _check_counts(bench)
    spec.check(bench)
    _check_judge_settings(bench)
    if needs_judge(bench) and config.judge is None:
        raise ValueError(judge_missing(bench))
    if bench.answers is None and config.model is None:
        raise ValueError(
            f"benchmark {bench.key} has no `answers:` file and the config no `model:`; add one"
        )


def check_config(config: EvalConfig) -> None:
    """Fail before any work on a config that cannot run to the end."""
    if not config.benchmarks:
        raise ValueError("the config lists no benchmarks; add a `benchmarks:` list")
    keys = [b.key for b in config.benchmarks]
    if len(set(keys)) != len(keys):
        raise ValueError(f"benchmark labels repeat ({keys}); give each a distinct `label`")
    for bench in config.benchmarks:
        check_benchmark(config, bench)
    if config.model is not None:
        check_model(config.model)
    check_generate_config(config.generation)  # a missing vllm, too, fails before any work
    if config.ray is not None:
        generation = config.generation
        check_ray_config(  # so does a missing ray
            config.ray,
            backend=generation.backend,
            tensor_parallel=generation.vllm.tensor_parallel_size,
            section="generation.",
        )
