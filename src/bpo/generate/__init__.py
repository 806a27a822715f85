"""One generation layer for every stage that generates: bootstrapping, evaluation, the demo.

- `requests`: `GenerationRequest` (chat messages or a rendered prompt, an image, a seed, and the
  weakening hooks: a pixel transform, or image embeddings) and `Generation` (text and token ids);
- `config`: `GenerateConfig` (a config's `generation:` section), `Decoding` (one call's settings);
- `sampling`: keyed sampling (`stream_seed`, `KeyedSampler`, nucleus) and end-of-sequence cuts;
- `transformers_backend.TransformersGenerator` and `vllm_backend.VllmGenerator`: the backends,
  both `generate(requests, decoding) -> list[Generation]` in request order;
- `load.load_generator`: the backend a config names.
"""

from bpo.generate.config import BACKENDS, Backend, Decoding, GenerateConfig, VllmConfig
from bpo.generate.load import Generator, load_generator
from bpo.generate.requests import Generation, GenerationRequest
from bpo.generate.sampling import KeyedSampler, stream_seed
from bpo.generate.transformers_backend import TransformersGenerator
from bpo.generate.vllm_backend import VllmGenerator

__all__ = [
    "BACKENDS",
    "Backend",
    "Decoding",
    "GenerateConfig",
    "Generation",
    "GenerationRequest",
    "Generator",
    "KeyedSampler",
    "TransformersGenerator",
    "VllmConfig",
    "VllmGenerator",
    "load_generator",
    "stream_seed",
]
