"""Chat prompts with the image placeholder, built the one way every stage builds them.

Messages use the simple form `{"role": "user" | "assistant" | "system", "content": str}`; the first
user turn's text may hold LLaVA's placeholder `<image>` (LLaVA data writes "<image>\\nWhat is ...?").
The image always goes at the start of the first user turn, as LLaVA-1.5 trained with.
"""

from __future__ import annotations

from typing import Any

IMAGE_PLACEHOLDER = "<image>"
_ROLES = ("system", "user", "assistant")


def _strip_placeholder(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Messages with `<image>` removed from their text; raises if it appears more than once."""
    count = 0
    cleaned = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(_ROLES)}")
        if not isinstance(content, str):
            raise TypeError(
                f"message {i}: content must be a string (the simple form), got "
                f"{type(content).__name__}"
            )
        count += content.count(IMAGE_PLACEHOLDER)
        if IMAGE_PLACEHOLDER in content:
            content = content.replace(IMAGE_PLACEHOLDER, "").strip()
        cleaned.append({"role": role, "content": content})
    if count > 1:
        raise ValueError(
            f"messages hold the image placeholder {IMAGE_PLACEHOLDER!r} {count} times; one image "
            "per conversation is supported, so write it once, in the first user turn"
        )
    return cleaned


def _first_user_turn(messages: list[dict[str, str]]) -> int:
    for i, message in enumerate(messages):
        if message["role"] == "user":
            return i
    raise ValueError("has_image=True but the messages have no user turn to carry the image")


def _llava_15_prompt(
    messages: list[dict[str, str]],
    image_at: int | None,
    eos_token: str,
    add_generation_prompt: bool,
) -> str:
    """LLaVA-1.5's format, character for character what tiny.LLAVA_15_CHAT_TEMPLATE renders."""
    parts = []
    for i, message in enumerate(messages):
        if message["role"] == "system":
            parts.append(message["content"] + " ")
            continue
        image = IMAGE_PLACEHOLDER + "\n" if i == image_at else ""
        end = eos_token if message["role"] == "assistant" else ""
        parts.append(f"{message['role'].upper()}: {image}{message['content']}{end} ")
    if add_generation_prompt:
        parts.append("ASSISTANT:")
    return "".join(parts)


def build_prompt(
    processor: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    has_image: bool = True,
) -> str:
    """The prompt text for `messages`, with the image placeholder once (has_image) or never.

    Uses the processor's chat template when it has one, otherwise LLaVA-1.5's format
    ("USER: <image>\\nQ ASSISTANT: A</s> USER: Q2 ASSISTANT:"). Where `<image>` stands in the
    messages does not matter: it is removed, and the image goes at the start of the first user turn.
    """
    cleaned = _strip_placeholder(messages)
    image_at = _first_user_turn(cleaned) if has_image else None
    template = getattr(processor, "chat_template", None)
    if not template:
        tokenizer = getattr(processor, "tokenizer", processor)
        return _llava_15_prompt(cleaned, image_at, tokenizer.eos_token or "", add_generation_prompt)
    structured = []
    for i, message in enumerate(cleaned):
        content = [{"type": "text", "text": message["content"]}]
        if i == image_at:
            content.insert(0, {"type": "image"})
        structured.append({"role": message["role"], "content": content})
    return processor.apply_chat_template(
        structured, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def adds_special_tokens(tokenizer: Any, prompt: str) -> bool:
    """Whether tokenizing a rendered prompt should add the tokenizer's special tokens (its BOS):
    not when the chat template already wrote the BOS, so that no prompt starts with two."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and prompt.startswith(bos))


def build_full_text(
    processor: Any, messages: list[dict[str, Any]], answer: str, has_image: bool = True
) -> tuple[str, str]:
    """(prompt, prompt + answer as the template renders it) for scoring `answer` after `messages`.

    The completion is everything the template writes after the generation prompt: the answer and
    its end-of-turn marker (where the template opens a rendered assistant turn otherwise than its
    generation prompt, the answer and what follows it). Whitespace after that marker is dropped (the model never generates it).
    When the template writes no end-of-turn marker at all (llava-hf's llava-1.5 template), the
    tokenizer's eos token is appended so the model learns to stop, as LLaVA's own training did.
    """
    if not answer.strip():
        raise ValueError("the answer is empty; there is nothing to score")
    prompt = build_prompt(processor, messages, add_generation_prompt=True, has_image=has_image)
    full = build_prompt(
        processor,
        [*messages, {"role": "assistant", "content": answer}],
        add_generation_prompt=False,
        has_image=has_image,
    )
    if full.startswith(prompt):
        completion = full[len(prompt) :].rstrip()
    else:
        completion = _completion_after_answer(prompt, full, answer)
    if completion.endswith(answer.rstrip()):
        tokenizer = getattr(processor, "tokenizer", processor)
        completion += tokenizer.eos_token or ""
    return prompt, prompt + completion


def _completion_after_answer(prompt: str, full: str, answer: str) -> str:
    """The completion when the template writes an assistant turn's opening otherwise than its
    generation prompt (llava-hf's OneVision template: "assistant\n" to generate, "assistant \n"
    in a rendered turn): the answer, then whatever the template writes after it (its end-of-turn
    marker), which is what the model generates after the generation prompt."""
    at = full.rfind(answer)
    if at < 0:
        raise ValueError(
            "the chat template renders the conversation with the answer differently from the "
            f"prompt alone, so the answer cannot be located: prompt {prompt!r}, full {full!r}"
        )
    return (answer + full[at + len(answer) :]).rstrip()


def tokenize_prompt_and_answer(
    processor: Any, messages: list[dict[str, Any]], answer: str, has_image: bool = True
) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) with the answer ids being what follows the prompt ids.

    The prompt is tokenized alone, exactly as for generation. The answer ids are the tail of the
    full text's tokenization when the prompt ids are a prefix of it (the case for byte-level BPE
    and LLaVA-1.5's "ASSISTANT:" boundary); otherwise (a template whose generation prompt ends in
    a space, say) the completion is tokenized on its own, so `prompt_ids + answer_ids` is always
    the sequence the model would see when it generated the answer itself. The answer ids end with
    the end-of-turn token. The image placeholder is one token here; the processor expands it to
    the image's tokens inside the prompt only, so the answer ids and the boundary do not move.
    Training scores answers with these ids.
    """
    prompt, full = build_full_text(processor, messages, answer, has_image=has_image)
    tokenizer = getattr(processor, "tokenizer", processor)
    # The processor adds the tokenizer's specials (a BOS) unless the template already wrote one.
    specials = adds_special_tokens(tokenizer, prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=specials)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=specials)["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, full_ids[len(prompt_ids) :]
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    return prompt_ids, answer_ids
