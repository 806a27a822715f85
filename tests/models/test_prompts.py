"""Prompts: exact strings, the no-template fallback, answer location and tokenization."""

from __future__ import annotations

import copy

import pytest

from bpo.models import build_full_text, build_prompt, tokenize_prompt_and_answer
from bpo.models.tiny import LLAVA_15_CHAT_TEMPLATE

# llava-hf/llava-1.5-*-hf's template, written out: it renders no eos after an assistant turn.
HF_LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# A template whose generation prompt ends in a space: byte-level BPE then merges that space with
# the answer's first word, so the prompt's ids are not a prefix of the full text's.
TRAILING_SPACE_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}"
)

ONE_TURN = [{"role": "user", "content": "<image>\nDescribe the image."}]
TWO_TURNS = [
    {"role": "user", "content": "<image>\nDescribe the image."},
    {"role": "assistant", "content": "a red circle and a blue square ."},
    {"role": "user", "content": "How many shapes are there?"},
]
WITH_SYSTEM = [{"role": "system", "content": "A chat about shapes."}, *ONE_TURN]
CONVERSATIONS = [
    ONE_TURN,
    TWO_TURNS,
    WITH_SYSTEM,
    [*TWO_TURNS, {"role": "assistant", "content": "two ."}],
]


def with_template(processor, template):
    other = copy.copy(processor)
    other.chat_template = template
    return other


@pytest.fixture(scope="module")
def processor(tiny):
    assert tiny[1].chat_template == LLAVA_15_CHAT_TEMPLATE
    return tiny[1]


@pytest.mark.parametrize(
    "content",
    ["<image>\nDescribe the image.", "Describe the image.\n<image>", "Describe the image."],
)
def test_single_turn_with_image(processor, content):
    prompt = build_prompt(processor, [{"role": "user", "content": content}])
    assert prompt == "USER: <image>\nDescribe the image. ASSISTANT:"


def test_multi_turn(processor):
    assert build_prompt(processor, TWO_TURNS) == (
        "USER: <image>\nDescribe the image. ASSISTANT: a red circle and a blue square .</s> "
        "USER: How many shapes are there? ASSISTANT:"
    )
    assert build_prompt(processor, TWO_TURNS, add_generation_prompt=False) == (
        "USER: <image>\nDescribe the image. ASSISTANT: a red circle and a blue square .</s> "
        "USER: How many shapes are there? "
    )


def test_system_turn(processor):
    assert build_prompt(processor, WITH_SYSTEM) == (
        "A chat about shapes. USER: <image>\nDescribe the image. ASSISTANT:"
    )


def test_image_goes_to_the_first_user_turn(processor):
    messages = [
        {"role": "user", "content": "Describe the image."},
        {"role": "assistant", "content": "a red circle ."},
        {"role": "user", "content": "<image>\nAnd now?"},
    ]
    assert build_prompt(processor, messages) == (
        "USER: <image>\nDescribe the image. ASSISTANT: a red circle .</s> USER: And now? ASSISTANT:"
    )


def test_no_image(processor):
    for messages in (ONE_TURN, [{"role": "user", "content": "Describe the image."}]):
        prompt = build_prompt(processor, messages, has_image=False)
        assert prompt == "USER: Describe the image. ASSISTANT:"


def test_placeholder_twice_is_an_error(processor):
    messages = [
        {"role": "user", "content": "<image>\nDescribe the image."},
        {"role": "assistant", "content": "a red circle ."},
        {"role": "user", "content": "<image>\nAnd this one?"},
    ]
    with pytest.raises(ValueError, match="placeholder '<image>' 2 times"):
        build_prompt(processor, messages)
    with pytest.raises(ValueError, match="no user turn"):
        build_prompt(processor, [{"role": "system", "content": "hi"}])
    with pytest.raises(ValueError, match="role 'human'"):
        build_prompt(processor, [{"role": "human", "content": "hi"}])


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("has_image", [True, False])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_fallback_equals_tiny_template(processor, messages, has_image, add_generation_prompt):
    fallback = with_template(processor, None)
    kwargs = {"has_image": has_image, "add_generation_prompt": add_generation_prompt}
    expected = build_prompt(processor, messages, **kwargs)
    assert build_prompt(fallback, messages, **kwargs) == expected
    assert expected.count("<image>") == int(has_image)


def test_processor_expands_the_one_placeholder(processor, image):
    prompt = build_prompt(processor, TWO_TURNS)
    ids = processor(images=image, text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    image_id = processor.image_token_id
    assert ids.count(image_id) == 16
    # The expanded run sits where the one placeholder was; everything else is the tokenizer's.
    collapsed = [i for k, i in enumerate(ids) if i != image_id or ids[k - 1] != image_id]
    assert collapsed == processor.tokenizer(prompt)["input_ids"]


def test_build_full_text(processor):
    prompt, full = build_full_text(processor, TWO_TURNS, "two .")
    assert prompt == build_prompt(processor, TWO_TURNS)
    assert full == prompt + " two .</s>"
    fallback = with_template(processor, None)
    assert build_full_text(fallback, TWO_TURNS, "two .") == (prompt, full)


def test_build_full_text_adds_eos_when_the_template_does_not(processor):
    hf = with_template(processor, HF_LLAVA_15_TEMPLATE)
    prompt, full = build_full_text(hf, ONE_TURN, "a red circle .")
    assert prompt == "USER: <image>\nDescribe the image. ASSISTANT:"
    assert full == "USER: <image>\nDescribe the image. ASSISTANT: a red circle .</s>"
    with pytest.raises(ValueError, match="answer is empty"):
        build_full_text(processor, ONE_TURN, " ")


def test_prompt_ids_are_a_prefix_of_full_ids(processor, texts):
    """Byte-level BPE never merges across "ASSISTANT:" + " answer": ':' and ' word' are split
    into separate pre-tokens before any merge, so tokenizing the full text keeps the prompt."""
    tokenizer = processor.tokenizer
    answers = [*texts, ". a red", "  two", "red.", "\nyes", "2 shapes"]
    for messages in CONVERSATIONS[:3]:
        for answer in answers:
            prompt, full = build_full_text(processor, messages, answer)
            prompt_ids = tokenizer(prompt)["input_ids"]
            full_ids = tokenizer(full)["input_ids"]
            assert full_ids[: len(prompt_ids)] == prompt_ids, (prompt, answer)
            assert tokenize_prompt_and_answer(processor, messages, answer) == (
                prompt_ids,
                full_ids[len(prompt_ids) :],
            )


def test_tokenize_prompt_and_answer(processor):
    tokenizer = processor.tokenizer
    prompt_ids, answer_ids = tokenize_prompt_and_answer(processor, ONE_TURN, "a red circle .")
    assert tokenizer.decode(prompt_ids) == "USER: <image>\nDescribe the image. ASSISTANT:"
    assert tokenizer.convert_ids_to_tokens(answer_ids) == ["Ġa", "Ġred", "Ġcircle", "Ġ.", "</s>"]
    assert answer_ids[-1] == tokenizer.eos_token_id


def test_tokenize_prompt_and_answer_when_merges_cross_the_boundary(processor):
    spaced = with_template(processor, TRAILING_SPACE_TEMPLATE)
    tokenizer = processor.tokenizer
    prompt, full = build_full_text(spaced, ONE_TURN, "a red circle .")
    assert prompt.endswith("ASSISTANT: ")
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert tokenizer(full)["input_ids"][: len(prompt_ids)] != prompt_ids  # merged "Ġa"
    got_prompt, answer_ids = tokenize_prompt_and_answer(spaced, ONE_TURN, "a red circle .")
    # The prompt as generation sees it, then the answer tokenized on its own.
    assert got_prompt == prompt_ids
    assert tokenizer.convert_ids_to_tokens(prompt_ids)[-1] == "Ġ"
    assert tokenizer.decode(got_prompt + answer_ids) == full
    assert tokenizer.convert_ids_to_tokens(answer_ids) == ["a", "Ġred", "Ġcircle", "Ġ.", "</s>"]
