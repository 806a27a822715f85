"""The `bpo bootstrap` schema: the `run:` section of configs/bootstrap/*.yaml, read by the CLI,
the YAML files and the Python API alike, and checked whole before any model loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from bpo.endpoint import EndpointConfig, read_api_key
from bpo.generate.config import Backend, VllmConfig, check_backend
from bpo.generate.ray_cluster import RayConfig, check_ray_config
from bpo.models.config import ModelConfig, check_model

EDIT_TYPES = (
    "swap_object",
    "insert_object",
    "delete_object",
    "change_colour",
    "change_count",
    "change_position",
    "flip_answer",
)


@dataclass
class WeakenConfig:
    """How image-weakened negatives are made: the `weaken:` section (null: none are made)."""

    # 0-based indices into the T = 1000 schedule (the paper's 900); each step makes its own
    # `samples_per_prompt` negatives per sample (sample index = step position * samples + j).
    noise_steps: list[int] = field(default_factory=lambda: [900])
    schedule: str = "sigmoid"  # "sigmoid" (the official code's) or "linear" (DDPM)
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus sampling; 1.0 keeps the whole distribution
    max_new_tokens: int = 512
    samples_per_prompt: int = 1
    seed: int = 0  # with the sample's global index and sample index, fixes noise and tokens
    # Keep a negative only if its tokens are at most / at least this multiple of the gold
    # answer's (null: no bound). Noised images make long, rambling answers, and DPO against
    # long negatives learns to say less rather than to look.
    max_length_ratio: float | None = None
    min_length_ratio: float | None = None


@dataclass
class InjectConfig:
    """The `inject:` section (null: none are made): who rewrites the gold answer, and how the
    rewrites are validated."""

    # "lexical": deterministic vocabulary edits; "self": the MLLM's own language model;
    # "local": the causal LM at `model`; "endpoint": an OpenAI-compatible server (`endpoint`).
    kind: Literal["lexical", "self", "local", "endpoint"] = "self"
    mode: Literal["description", "qa"] = "description"  # rewrite the answer alone, or given the Q
    vocabulary: Literal["coco", "shapeworld"] = "coco"  # lexical only
    num_edits: int = 1  # lexical only
    edit_types: list[str] = field(default_factory=lambda: list(EDIT_TYPES))  # lexical only
    seed: int = 0  # keys the edits or the sampling, with the sample's global index
    model: str | None = None  # kind "local": a causal LM folder or hub name
    max_new_tokens: int = 256  # "self"/"local"
    temperature: float = 0.7  # "self"/"local"; 0 is greedy
    top_p: float = 0.9  # "self"/"local"
    endpoint: EndpointConfig = field(default_factory=lambda: EndpointConfig(temperature=0.7))
    min_ratio: float = 0.5  # rewrite length in words over the gold's: rejected below...
    max_ratio: float = 2.0  # ...or above


@dataclass
class BootstrapConfig:
    """A `bpo bootstrap` run: the `run:` section of configs/bootstrap/*.yaml."""

    model: ModelConfig
    data: str  # LLaVA conversation file (.json list or JSON Lines)
    image_root: str | None = None  # the data's image paths are relative to it (default: data's dir)
    out: str = "runs/bootstrap"
    weaken: WeakenConfig | None = field(default_factory=WeakenConfig)
    inject: InjectConfig | None = field(default_factory=InjectConfig)
    batch_size: int = 8  # rows per model.generate call
    chunk_size: int = 64  # samples read, processed and written together
    num_shards: int = 1
    shard_index: int = 0  # this run makes the pairs of samples with global index % N == i
    limit: int | None = None  # only the first `limit` samples of the file (smoke runs)
    shard_size: int = 1000  # pairs per output file
    # "transformers": generate in the loaded model; "vllm": weakened negatives and "self"
    # rewrites in an offline vLLM engine (a CUDA GPU and `pip install 'bpo[vllm]'`).
    backend: Backend = "transformers"
    vllm: VllmConfig = field(default_factory=VllmConfig)  # the engine's options (backend "vllm")
    # Make the chunks on a Ray cluster, one model replica per actor (`pip install 'bpo[ray]'`);
    # null: in this process. Either way the store is the same, and either resumes the other's.
    ray: RayConfig | None = None


def weaken_steps(config: WeakenConfig) -> list[int]:
    """The noise step of each sample index: [t0] * samples_per_prompt + [t1] * ... ."""
    return [t for t in config.noise_steps for _ in range(config.samples_per_prompt)]


def check_weaken(config: WeakenConfig) -> None:
    """Raise ValueError naming the `weaken.` setting that cannot run."""
    from bpo.models.noise import NUM_STEPS, SCHEDULES  # torch: only once a config is checked

    if config.schedule not in SCHEDULES:
        raise ValueError(
            f"weaken.schedule {config.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}"
        )
    if not config.noise_steps:
        raise ValueError("weaken.noise_steps is empty; give at least one step, e.g. [900]")
    for step in config.noise_steps:
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < NUM_STEPS:
            raise ValueError(
                f"weaken.noise_steps holds {step!r}: a noise step must be an integer in "
                f"[0, {NUM_STEPS - 1}] (a 0-based index into the {NUM_STEPS}-step schedule)"
            )
    if len(set(config.noise_steps)) != len(config.noise_steps):
        raise ValueError(f"weaken.noise_steps repeats a step: {config.noise_steps}")
    if config.temperature < 0:
        raise ValueError(f"weaken.temperature must be >= 0 (0 is greedy), got {config.temperature}")
    if not 0 < config.top_p <= 1:
        raise ValueError(f"weaken.top_p must be in (0, 1], got {config.top_p}")
    for name in ("samples_per_prompt", "max_new_tokens"):
        if getattr(config, name) < 1:
            raise ValueError(f"weaken.{name} must be at least 1, got {getattr(config, name)}")
    low, high = config.min_length_ratio, config.max_length_ratio
    if (low is not None and low <= 0) or (high is not None and high <= 0):
        raise ValueError("weaken.min_length_ratio and max_length_ratio must be > 0 or null")
    if low is not None and high is not None and low > high:
        raise ValueError(f"weaken.min_length_ratio {low} is above max_length_ratio {high}")


def check_inject(config: InjectConfig) -> None:
    """Raise ValueError naming the `inject.` setting that cannot run (and EndpointError for an
    endpoint whose key is not in the environment: before a model loads, not minutes after)."""
    choices = {
        "kind": ("lexical", "self", "local", "endpoint"),
        "mode": ("description", "qa"),
        "vocabulary": ("coco", "shapeworld"),
    }
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(
                f"inject.{name} {getattr(config, name)!r} is unknown; use one of "
                f"{', '.join(allowed)}"
            )
    if config.kind == "endpoint":
        read_api_key(config.endpoint, "inject.endpoint")
    if config.kind == "local" and not config.model:
        raise ValueError("inject.kind 'local' needs inject.model (a causal LM folder or name)")
    unknown = sorted(set(config.edit_types) - set(EDIT_TYPES))
    if unknown or not config.edit_types:
        raise ValueError(
            f"inject.edit_types {config.edit_types} must be a non-empty list of {EDIT_TYPES}"
        )
    if config.num_edits < 1:
        raise ValueError(f"inject.num_edits must be at least 1, got {config.num_edits}")
    if not 0 <= config.min_ratio <= config.max_ratio:
        raise ValueError(
            f"inject.min_ratio ({config.min_ratio}) and max_ratio ({config.max_ratio}) must "
            "satisfy 0 <= min_ratio <= max_ratio"
        )
    sampled = config.kind in ("self", "local")
    if sampled and (config.temperature < 0 or not 0 < config.top_p <= 1):
        raise ValueError(
            "inject needs temperature >= 0 (0 is greedy) and top_p in (0, 1]; got "
            f"{config.temperature} and {config.top_p}"
        )
    if sampled and config.max_new_tokens < 1:
        raise ValueError(f"inject.max_new_tokens must be at least 1, got {config.max_new_tokens}")


def check_config(config: BootstrapConfig) -> None:
    """Every setting, checked before the store opens or a model loads.

    Backend "vllm" needs the vllm package even with a stand-in engine (`run_bootstrap`'s
    `engine_factory`): its `SamplingParams` carry each request's settings to the engine.
    """
    if config.num_shards < 1 or not 0 <= config.shard_index < config.num_shards:
        raise ValueError(
            f"shard_index must be in [0, num_shards); got shard_index={config.shard_index}, "
            f"num_shards={config.num_shards}"
        )
    for name in ("batch_size", "chunk_size", "shard_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.limit is not None and config.limit < 1:  # 0 made an empty store marked complete
        raise ValueError(f"limit must be at least 1 or null, got {config.limit}")
    check_model(config.model)
    if config.weaken is None and config.inject is None:
        raise ValueError("both methods are off (weaken: null, inject: null); enable one")
    if config.weaken is not None:
        check_weaken(config.weaken)
    if config.inject is not None:
        check_inject(config.inject)
    check_backend(config.backend)  # a missing vllm fails here, before the store is opened
    if config.ray is not None:
        # So does a missing ray.
        check_ray_config(
            config.ray, backend=config.backend, tensor_parallel=config.vllm.tensor_parallel_size
        )


# Fields that change where or how fast output is written, never what it holds.
NOT_IN_STORE_CONFIG = ("out", "chunk_size", "shard_size", "ray")


def store_config(config: BootstrapConfig) -> dict[str, Any]:
    """What the store records: everything that changes the pairs, and the shard position.

    The backend is recorded only when it is "vllm", so stores made before it existed still resume.
    """
    recorded = {k: v for k, v in asdict(config).items() if k not in NOT_IN_STORE_CONFIG}
    if config.inject is not None and config.inject.kind != "endpoint":
        del recorded["inject"]["endpoint"]
    if config.backend == "transformers":
        del recorded["backend"], recorded["vllm"]
    else:
        del recorded["vllm"]["gpu_memory_utilization"]  # changes speed, not the pairs
    return {"stage": "bootstrap", **recorded}
