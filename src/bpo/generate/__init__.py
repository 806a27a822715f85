"""One generation layer for every stage that generates: bootstrapping, evaluation, the demo.

- `requests`: `GenerationRequest` (chat messages or a rendered prompt, an image, a seed, and the
  weakening hooks: a pixel transform, or image embeddings) and `Generation` (text and token ids);
- `config`: `GenerateConfig` (a config's `generation:` section), `Decoding` (one call's settings);
- `sampling`: keyed sampling (`stream_seed`, `KeyedSampler`, nucleus) and end-of-sequence cuts;
- `transformers_backend.TransformersGenerator` and `vllm_backend.VllmGenerator`: the backends,
  both `generate(requests, decoding) -> list[Generation]` in request order;
- `load.load_generator`: the backend a config names.
"""

from bpo.utils.lazy import lazy_exports

_EXPORTS = {
    "BACKENDS": "config",
    "Backend": "config",
    "Decoding": "config",
    "GenerateConfig": "config",
    "Generation": "requests",
    "GenerationRequest": "requests",
    "Generator": "load",
    "KeyedSampler": "sampling",
    "TransformersGenerator": "transformers_backend",
    "VllmConfig": "config",
    "VllmGenerator": "vllm_backend",
    "load_generator": "load",
    "stream_seed": "sampling",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
