"""How answers are generated: the `generation:` section of a config, and one call's decoding.

`GenerateConfig` is what a generating stage reads from its YAML (`bpo eval`'s `generation:`);
`Decoding` is what one call of a backend's `generate` takes. Temperature 0 decodes greedily.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

Backend = Literal["transformers", "vllm"]
BACKENDS = ("transformers", "vllm")


@dataclass(frozen=True)
class Decoding:
    """One call's decoding settings, the same for every request of the call."""

    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy; above 0 every request needs its own seed
    top_p: float = 1.0  # nucleus sampling; 1.0 keeps the whole distribution
    # More `model.generate` kwargs (transformers) or `vllm.SamplingParams` fields (vLLM).
    extra: Mapping[str, Any] = field(default_factory=dict)


def check_decoding(decoding: Decoding) -> None:
    """Raise ValueError naming the setting that cannot decode."""
    if decoding.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {decoding.max_new_tokens}")
    if decoding.temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {decoding.temperature}")
    if not 0 < decoding.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {decoding.top_p}")


@dataclass
class VllmConfig:
    """The vLLM engine's options: the `vllm:` section, read when the backend is "vllm"."""

    tensor_parallel_size: int = 1  # GPUs one engine spans
    # Share of each GPU's memory the engine takes (weights + KV cache). Leave room for what runs
    # beside it: the vision tower + projector that encode noised images (~0.6 GB for LLaVA-1.5).
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None  # null: the model's context length
    dtype: str | None = None  # null: the `model:` section's dtype, so both backends match
    enforce_eager: bool = False  # true skips CUDA graphs (slower, starts faster, less memory)
    extra: dict[str, Any] = field(default_factory=dict)  # more vllm.LLM(...) kwargs


@dataclass
class GenerateConfig:
    """How answers are generated: the `generation:` section of a generating stage's config."""

    backend: Backend = "transformers"  # "vllm": an offline vLLM engine (CUDA; bpo[vllm])
    batch_size: int = 8  # requests per model.generate call (transformers)
    max_new_tokens: int = 512
    do_sample: bool = False  # greedy by default, as benchmark answers are reported
    temperature: float = 1.0  # sampling only
    top_p: float = 1.0  # sampling only
    # Sampling only: each request is sampled with its own seed, keyed by (seed, request key),
    # so its answer does not depend on the batch it lands in or on a resume.
    seed: int = 0
    # More model.generate kwargs (transformers) or vllm.SamplingParams kwargs (vllm).
    extra: dict[str, Any] = field(default_factory=dict)
    vllm: VllmConfig = field(default_factory=VllmConfig)  # backend "vllm" only

    def decoding(self, max_new_tokens: int | None = None) -> Decoding:
        """The Decoding of this config; `max_new_tokens` overrides the config's."""
        return Decoding(
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            temperature=self.temperature if self.do_sample else 0.0,
            top_p=self.top_p if self.do_sample else 1.0,
            extra=dict(self.extra),
        )


class VllmUnavailableError(ImportError):
    """The vllm package is not installed (or does not import) where backend "vllm" was asked for."""


def require_vllm() -> ModuleType:
    """The vllm module, or a VllmUnavailableError that says how to get it."""
    try:
        import vllm
    except ImportError as error:
        raise VllmUnavailableError(
            f"generation backend 'vllm' needs the vllm package, which does not import here "
            f"({error}). On a machine with a CUDA GPU: pip install 'bpo[vllm]'. Elsewhere set "
            "backend: transformers."
        ) from error
    return vllm


def check_backend(backend: str) -> None:
    """Fail before any work on an unknown backend, or on "vllm" where vLLM is not installed."""
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown generation backend {backend!r}; use one of {', '.join(map(repr, BACKENDS))}"
        )
    if backend == "vllm":
        require_vllm()


def check_generate_config(config: GenerateConfig) -> None:
    """Every setting of a `generation:` section, checked before a model loads."""
    check_backend(config.backend)
    if config.batch_size < 1:
        raise ValueError(f"generation.batch_size must be at least 1, got {config.batch_size}")
    check_decoding(config.decoding())
