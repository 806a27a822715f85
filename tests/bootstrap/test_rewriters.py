"""The rewriters that use a language model (the MLLM's own, a local causal LM, an endpoint)
and the factory that makes each kind from the `inject:` config."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from bpo.bootstrap.config import InjectConfig
from bpo.bootstrap.inject.prompts import rewrite_messages
from bpo.bootstrap.inject.rewriters import (
    EndpointRewriter,
    LexicalRewriter,
    LMRewriter,
    inject_seed,
    make_rewriter,
    mllm_renderer,
    template_renderer,
)
from bpo.bootstrap.inject.validate import InjectionStats
from bpo.endpoint import EndpointConfig
from bpo.generate import GenerationRequest, TransformersGenerator, VllmGenerator
from bpo.models.load import ModelConfig
from bpo.models.tiny import (
    TinyLlavaConfig,
    build_tiny_causal_lm,
    build_tiny_llava,
    force_greedy_token,
)

# The local chat-completions server the judge tests use (tests/ is no package: load it by path).
_spec = importlib.util.spec_from_file_location(
    "evaluate_conftest", Path(__file__).parents[1] / "evaluate" / "conftest.py"
)
_server = sys.modules.setdefault("evaluate_conftest", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(_server)
judge_server = _server.judge_server

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GOLD = "A brown dog sleeps on a grey sofa."  # 7 words


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def forced_lm(word: str):
    """A tiny Llama + tokenizer whose greedy output is `word`, over and over (no EOS)."""
    model, tokenizer = build_tiny_causal_lm(
        ["rewrite the description of the image ."] * 8, CHAT_TEMPLATE, extra_tokens=[word]
    )
    force_greedy_token(model, tokenizer.convert_tokens_to_ids(word))
    return model, tokenizer


@pytest.fixture(scope="module")
def zebra_lm():
    return forced_lm("Zebra")


def lm_rewriter(model, tokenizer, batch_size=8, chat_template=None, **inject) -> LMRewriter:
    """An LMRewriter over a causal LM in the transformers backend, `inject` its InjectConfig."""
    config = InjectConfig(kind="local", model="tiny-lm", **inject)
    backend = TransformersGenerator(model, tokenizer, batch_size)
    return LMRewriter(config, backend, template_renderer(tokenizer, chat_template), name="tiny-lm")


def test_prompt_uses_the_chat_template(zebra_lm):
    model, tokenizer = zebra_lm
    rewriter = lm_rewriter(model, tokenizer, temperature=0.0)
    prompt = rewriter.prompt(GOLD)
    assert prompt.startswith("<|user|>Rewrite the image description below")
    assert prompt.endswith(f"<|user|>{GOLD}\n<|assistant|>")
    assert prompt.count("<|assistant|>") == 4  # three examples, then the answer to give
    qa = lm_rewriter(model, tokenizer, temperature=0.0, mode="qa")
    assert qa.prompt("It is red.", question="What colour is the bus?").endswith(
        "<|user|>Question: What colour is the bus?\nAnswer: It is red.\n<|assistant|>"
    )
    with pytest.raises(ValueError, match="pass question="):
        rewrite_messages("It is red.", mode="qa")


def test_local_rewriter_keeps_the_first_character_and_the_token_limit(zebra_lm):
    model, tokenizer = zebra_lm
    zebra = tokenizer.convert_tokens_to_ids("Zebra")
    for limit in (1, 3):
        rewriter = lm_rewriter(model, tokenizer, max_new_tokens=limit, temperature=0.0)
        raw = rewriter.raw_rewrites([GOLD, "A cat."], [None, None], [0, 1])
        # the official code decoded from one character too far and lost the "Z"
        assert raw == ["Zebra" * limit] * 2
        (generated,) = rewriter.backend.generate(
            [GenerationRequest(prompt=rewriter.prompt(GOLD))], rewriter.decoding
        )
        assert generated.token_ids == [zebra] * limit
    stats = InjectionStats()
    rewriter = lm_rewriter(model, tokenizer, max_new_tokens=2, temperature=0.0)
    done = rewriter.rewrite_all(["Zebra crossing.", "ZebraZebra"], [None, None], [0, 1], stats)
    assert [(d.text, d.reason) for d in done] == [("ZebraZebra", None), (None, "identical")]
    assert stats.as_dict() == {"accepted": 1, "rejected": {"identical": 1}}
    assert done[0].edits == [{"type": "llm", "mode": "description"}]


def random_lm():
    return build_tiny_causal_lm(["a red dog and a blue cat on a mat ."] * 8, CHAT_TEMPLATE)


def test_sampled_rewrites_honour_max_new_tokens():
    model, tokenizer = random_lm()
    rewriter = lm_rewriter(model, tokenizer, max_new_tokens=5, temperature=1.0, top_p=1.0)
    prompts = [rewriter.prompt(GOLD), rewriter.prompt("A cat.")] * 2
    requests = [GenerationRequest(prompt=p, seed=inject_seed(0, k)) for k, p in enumerate(prompts)]
    new_tokens = [g.token_ids for g in rewriter.backend.generate(requests, rewriter.decoding)]
    assert [len(ids) <= 5 for ids in new_tokens] == [True] * 4
    assert max(len(ids) for ids in new_tokens) == 5  # random weights: some row runs to the limit


def test_sampled_rewrites_do_not_depend_on_the_batch():
    """Temperature 1: six golds rewritten in one run (batches of 4, padded) equal the same golds
    rewritten in two runs of three given their global indices (batches of 2): request i samples
    from its own keyed stream, whatever else runs. The six rewrites differ from each other, so a
    shuffled order could not pass; another seed gives other rewrites."""
    model, tokenizer = random_lm()
    golds = [GOLD, "A cat.", "A red dog on a mat.", GOLD, "A blue cat.", "A dog and a cat."]
    none = [None] * 6

    def rewriter(batch_size, seed=0):
        return lm_rewriter(
            model,
            tokenizer,
            batch_size,
            max_new_tokens=6,
            temperature=1.0,
            top_p=1.0,
            max_ratio=99,
            seed=seed,
        )

    whole = rewriter(4).rewrite_all(golds, none, range(6))
    first = rewriter(2).rewrite_all(golds[:3], none[:3], [0, 1, 2])
    second = rewriter(2).rewrite_all(golds[3:], none[3:], [3, 4, 5])
    assert [r.raw for r in whole] == [r.raw for r in first + second]
    assert [r.text for r in whole] == [r.text for r in first + second]
    assert len({r.raw for r in whole}) == 6
    # GOLD at index 0 and index 3: same prompt, other stream, other rewrite.
    assert whole[0].raw != whole[3].raw
    assert [r.raw for r in rewriter(4, seed=1).rewrite_all(golds, none, range(6))] != [
        r.raw for r in whole
    ]
    assert rewriter(1).rewrite_all([golds[4]], [None], [4])[0].raw == whole[4].raw


def test_self_rewriting_runs_the_mllm_on_text_alone():
    """The MLLM rewrites with its own template, typed content and no image: its rewrite is the
    greedy continuation of exactly that prompt by the MLLM's own forward."""
    texts = ["a red circle and a blue square ."] * 8
    llava, processor = build_tiny_llava(texts, TinyLlavaConfig(), seed=0)
    config = InjectConfig(kind="self", max_new_tokens=4, temperature=0.0)
    rewriter = LMRewriter(config, TransformersGenerator(llava, processor), mllm_renderer(processor))
    prompt = rewriter.prompt("a red circle .")
    assert prompt.startswith("USER: Rewrite the image description") and prompt.endswith(
        "ASSISTANT:"
    )
    assert "<image>" not in prompt
    ids = processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(4):  # greedy by hand: the argmax of the last position, four times
            ids = torch.cat([ids, llava(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    expected = processor.tokenizer.decode(ids[0, -4:], skip_special_tokens=True).strip()
    eos = processor.tokenizer.eos_token_id
    if eos in ids[0, -4:].tolist():  # generation stops at the end of sequence
        cut = ids[0, -4:].tolist().index(eos)
        expected = processor.tokenizer.decode(ids[0, -4:][:cut], skip_special_tokens=True).strip()
    assert rewriter.raw_rewrites(["a red circle ."], [None], [0]) == [expected]


def test_endpoint_rewriter(judge_server, monkeypatch):
    monkeypatch.setenv("REWRITER_KEY", "secret")
    replies = iter(
        [
            "Sure! Here is the rewritten description: A brown cat sleeps on a grey sofa.",
            "A brown dog sleeps on a grey sofa.",
        ]
    )
    judge_server.reply = lambda body: (200, next(replies), {})
    config = EndpointConfig(
        base_url=judge_server.url,
        model="rewriter-7b",
        api_key_env="REWRITER_KEY",
        temperature=0.7,
        max_tokens=64,
        max_retries=0,
    )
    stats = InjectionStats()
    description = EndpointRewriter(InjectConfig(kind="endpoint", endpoint=config))
    qa = EndpointRewriter(InjectConfig(kind="endpoint", mode="qa", endpoint=config))
    try:
        (first,) = description.rewrite_all([GOLD], [None], [0], stats)
        (second,) = qa.rewrite_all(["It is red."], ["What colour?"], [1], stats)
    finally:
        description.close()
        qa.close()
    assert (first.text, first.reason) == ("A brown cat sleeps on a grey sofa.", None)
    assert first.edits == [{"type": "llm", "mode": "description", "model": "rewriter-7b"}]
    assert (second.text, second.reason) == (None, "too_long")  # 7 words for 3
    request = judge_server.seen[0]
    assert request.headers["Authorization"] == "Bearer secret"
    assert request.body["model"] == "rewriter-7b"
    assert request.body["temperature"] == 0.7
    assert request.body["max_tokens"] == 64
    assert request.body["messages"] == rewrite_messages(GOLD)
    assert judge_server.seen[1].body["messages"][-1]["content"] == (
        "Question: What colour?\nAnswer: It is red."
    )
    assert stats.as_dict() == {"accepted": 1, "rejected": {"too_long": 1}}
    assert (description.generator, qa.generator) == ("endpoint:rewriter-7b",) * 2


# --- The factory ------------------------------------------------------------------------------


def test_make_rewriter_gives_each_kind_its_rewriter(loaded, tiny_llava_folder, tmp_path):
    """lexical, endpoint, self (the MLLM's own LM in transformers, or the run's vLLM engine) and
    local (a causal LM folder, loaded from safetensors), each naming what made its rewrites."""
    model, processor = loaded
    mllm = ModelConfig(str(tiny_llava_folder), dtype="float32", device="cpu")
    hf = TransformersGenerator(model, processor)

    lexical = make_rewriter(
        InjectConfig(kind="lexical", vocabulary="shapeworld"), mllm, None, None, hf
    )
    assert isinstance(lexical, LexicalRewriter) and lexical.generator == "lexical:shapeworld"

    endpoint = make_rewriter(
        InjectConfig(kind="endpoint", endpoint=EndpointConfig(model="m-1", api_key_env=None)),
        mllm,
        None,
        None,
        hf,
    )
    assert isinstance(endpoint, EndpointRewriter) and endpoint.generator == "endpoint:m-1"
    endpoint.close()

    own = InjectConfig(kind="self", max_new_tokens=4, temperature=0.0)
    rewriter = make_rewriter(own, mllm, model, processor, hf, batch_size=3)
    assert isinstance(rewriter, LMRewriter) and rewriter.generator == str(tiny_llava_folder)
    assert isinstance(rewriter.backend, TransformersGenerator) and rewriter.backend.batch_size == 3
    assert rewriter.backend.model is model  # the MLLM itself, not a copy
    by_hand = LMRewriter(own, TransformersGenerator(model, processor), mllm_renderer(processor))
    golds = ["a red circle .", "a blue square ."]
    assert [r.raw for r in rewriter.rewrite_all(golds, [None] * 2, [0, 1])] == [
        r.raw for r in by_hand.rewrite_all(golds, [None] * 2, [0, 1])
    ]

    engine = VllmGenerator(object(), processor, eos={2}, sampling_params=dict)
    in_engine = make_rewriter(own, mllm, None, processor, engine)
    assert isinstance(in_engine, LMRewriter) and in_engine.backend is engine
    assert in_engine.generator == str(tiny_llava_folder)

    lm, tokenizer = random_lm()
    folder = tmp_path / "rewriter-lm"
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    local = make_rewriter(InjectConfig(kind="local", model=str(folder)), mllm, None, None, hf)
    assert isinstance(local, LMRewriter) and local.generator == str(folder)
    assert local.prompt(GOLD) == lm_rewriter(lm, tokenizer).prompt(GOLD)  # its own template
    torch.testing.assert_close(
        local.backend.model.lm_head.weight, lm.lm_head.weight, rtol=0, atol=0
    )
