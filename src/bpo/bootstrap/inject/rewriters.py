"""The rewriters that make error-injected negatives, behind one interface, made by one factory.

Every rewriter has `rewrite_all(golds, questions, indices, stats) -> list[Injection]` (one
validated rewrite per gold answer, rejects counted in `stats`) and `close()`, and names what
made its rewrites in `generator` (recorded in each pair's meta):

- `LexicalRewriter`: the deterministic lexical injector (`bpo.bootstrap.inject.lexical`);
- `LMRewriter`: a language model prompted through its chat template with few-shot examples, by
  default the MLLM itself on text-only prompts (every supported family answers text alone, so no
  text-only model has to be cut out of it), generating through any backend of `bpo.generate`
  (the loaded model, a local causal LM, or the run's vLLM engine);
- `EndpointRewriter`: an OpenAI-compatible chat endpoint, through `bpo.endpoint.ChatClient`.

Each request's randomness is keyed by its global index (`stream_seed(seed, index, 0, "inject")`),
so a resumed or sharded run rewrites exactly as an uninterrupted one; the one exception is an
endpoint sampling at temperature > 0, which samples as it likes. (The official code's rewriter
ignored its max-token setting and cut the first character off every output; the LM rewriter here
takes only the new tokens, by count.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

from bpo.bootstrap.config import InjectConfig
from bpo.bootstrap.inject.lexical import InjectionVocabulary, inject_errors
from bpo.bootstrap.inject.prompts import rewrite_messages
from bpo.bootstrap.inject.validate import Injection, InjectionStats, checked
from bpo.endpoint import ChatClient
from bpo.generate import (
    Decoding,
    GenerationRequest,
    Generator,
    TransformersGenerator,
    VllmGenerator,
    stream_seed,
)
from bpo.models.load import ModelConfig, load_causal_lm
from bpo.models.prompts import build_prompt


class Rewriter(Protocol):
    """What the bootstrap stage asks of a rewriter."""

    generator: str  # what made the rewrites, recorded in each pair's meta

    def rewrite_all(
        self,
        golds: Sequence[str],
        questions: Sequence[str | None],
        indices: Sequence[int],
        stats: InjectionStats | None = None,
    ) -> list[Injection]: ...

    def close(self) -> None: ...


def inject_seed(seed: int, index: int) -> int:
    """The seed of the rewrite of the sample with global index `index`."""
    return stream_seed(seed, index, 0, "inject")


class LexicalRewriter:
    """The lexical injector over a vocabulary, each rewrite seeded by its sample's index."""

    def __init__(self, config: InjectConfig):
        self.config = config
        self.vocabulary = getattr(InjectionVocabulary, config.vocabulary)()
        self.generator = f"lexical:{config.vocabulary}"

    def rewrite_all(self, golds, questions, indices, stats=None) -> list[Injection]:
        c = self.config
        return [
            inject_errors(
                gold,
                self.vocabulary,
                seed=inject_seed(c.seed, index),
                num_edits=c.num_edits,
                edit_types=c.edit_types,
                stats=stats,
                min_ratio=c.min_ratio,
                max_ratio=c.max_ratio,
            )
            for gold, index in zip(golds, indices, strict=True)
        ]

    def close(self) -> None:
        pass


class LMRewriter:
    """Rewrites with a language model, prompted through a chat template.

    generate: the backend that continues the rendered prompts (text only).
    render: messages -> prompt text (`template_renderer` for a tokenizer's template; for the
        MLLM itself, `bpo.models.prompts.build_prompt` without an image, which renders the
        typed content multimodal templates expect).
    """

    def __init__(
        self,
        config: InjectConfig,
        generate: Generator,
        render: Callable[[list[dict[str, str]]], str],
        name: str = "",
    ):
        self.config, self.backend, self.render = config, generate, render
        self.generator = name
        self.decoding = Decoding(config.max_new_tokens, config.temperature, config.top_p)

    def prompt(self, gold: str, question: str | None = None) -> str:
        """The rendered prompt text for one rewrite."""
        return self.render(rewrite_messages(gold, self.config.mode, question))

    def raw_rewrites(
        self, golds: Sequence[str], questions: Sequence[str | None], indices: Sequence[int]
    ) -> list[str]:
        """The model's continuation of each rewrite prompt: only the new tokens, decoded."""
        qa = self.config.mode == "qa"
        requests = [
            GenerationRequest(
                prompt=self.prompt(gold, question if qa else None),
                seed=inject_seed(self.config.seed, index),
            )
            for gold, question, index in zip(golds, questions, indices, strict=True)
        ]
        return [g.text for g in self.backend.generate(requests, self.decoding)]

    def rewrite_all(self, golds, questions, indices, stats=None) -> list[Injection]:
        edits = [{"type": "llm", "mode": self.config.mode}]
        c = self.config
        return [
            checked(gold, raw, edits, stats, c.min_ratio, c.max_ratio)
            for gold, raw in zip(golds, self.raw_rewrites(golds, questions, indices), strict=True)
        ]

    def close(self) -> None:
        pass


class EndpointRewriter:
    """Rewrites with an OpenAI-compatible chat endpoint, `endpoint.concurrency` at a time.

    The endpoint's `temperature` applies (a rewriter wants some, unlike a judge: e.g. 0.7);
    failures past the retries raise EndpointError.
    """

    def __init__(self, config: InjectConfig):
        self.config = config
        self.client = ChatClient(config.endpoint, section="inject.endpoint")
        self.generator = f"endpoint:{config.endpoint.model}"

    def rewrite_all(self, golds, questions, indices, stats=None) -> list[Injection]:
        c = self.config
        qa = c.mode == "qa"
        prompts = [
            rewrite_messages(gold, c.mode, question if qa else None)
            for gold, question in zip(golds, questions, strict=True)
        ]
        replies = self.client.ask_all(prompts, str)  # any reply parses; validation judges it
        edits = [{"type": "llm", "mode": c.mode, "model": c.endpoint.model}]
        return [
            checked(gold, reply.value, edits, stats, c.min_ratio, c.max_ratio)
            for gold, reply in zip(golds, replies, strict=True)
        ]

    def close(self) -> None:
        self.client.close()


def template_renderer(
    tokenizer: Any, chat_template: str | None = None
) -> Callable[[list[dict[str, str]]], str]:
    """Messages -> prompt text through a text LM tokenizer's chat template (or `chat_template`)."""
    return partial(
        tokenizer.apply_chat_template,
        chat_template=chat_template,
        tokenize=False,
        add_generation_prompt=True,
    )


def mllm_renderer(processor: Any) -> Callable[[list[dict[str, str]]], str]:
    """Messages -> prompt text through the MLLM processor's template, with no image."""
    return partial(build_prompt, processor, add_generation_prompt=True, has_image=False)


def make_rewriter(
    config: InjectConfig,
    model_config: ModelConfig,
    model: Any,
    processor: Any,
    generator: Generator,
    batch_size: int = 8,
) -> Rewriter:
    """The rewriter `config.kind` names.

    model, processor: the run's MLLM and processor (with the vLLM backend, `model` may be the
        encoder of noised images or None: "self" then rewrites in the engine).
    generator: the run's generation backend.
    """
    if config.kind == "lexical":
        return LexicalRewriter(config)
    if config.kind == "endpoint":
        return EndpointRewriter(config)
    if config.kind == "self":
        if isinstance(generator, VllmGenerator):
            backend: Generator = generator  # the engine continues the text prompts too
        else:
            backend = TransformersGenerator(model, processor, batch_size)
        return LMRewriter(config, backend, mllm_renderer(processor), name=model_config.name_or_path)
    lm, tokenizer = load_causal_lm(config.model, model_config.dtype, model_config.device)
    backend = TransformersGenerator(lm, tokenizer, batch_size)
    return LMRewriter(config, backend, template_renderer(tokenizer), name=config.model)
