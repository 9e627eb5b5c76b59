"""builder.chat: the model card's reasoning switch, sampling defaults and chat template."""

from __future__ import annotations

import pytest

from builder import chat


def test_messages_put_the_switch_in_the_system_prompt():
    on = chat.messages("Why?", reasoning=True)
    off = chat.messages("Why?", reasoning=False, history=[{"role": "user", "content": "Hi"}])
    assert on == [
        {"role": "system", "content": "detailed thinking on"},
        {"role": "user", "content": "Why?"},
    ]
    assert [m["role"] for m in off] == ["system", "user", "user"]
    assert off[0]["content"] == "detailed thinking off" and off[-1]["content"] == "Why?"


def test_sampling_defaults():
    on, off = chat.sampling(True), chat.sampling(False)
    assert on.generate_kwargs() == {"do_sample": True, "temperature": 0.6, "top_p": 0.95}
    assert off.generate_kwargs() == {"do_sample": False}


@pytest.fixture(scope="module")
def nemotron_tokenizer(mixed_ckpt):
    """The byte-level tokenizer `builder synth` writes, carrying the Nemotron template."""
    from transformers import AutoTokenizer

    import builder.model  # noqa: F401  (AutoTokenizer reads config.json: nemotron-nas must be known)

    return AutoTokenizer.from_pretrained(mixed_ckpt)


def test_nemotron_template_renders_llama31_turns(nemotron_tokenizer):
    assert nemotron_tokenizer.chat_template == chat.nemotron_template()
    text = nemotron_tokenizer.apply_chat_template(
        chat.messages("  What is 2+2? ", reasoning=False),
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "detailed thinking off<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_nemotron_template_without_generation_prompt_or_system(nemotron_tokenizer):
    text = nemotron_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        add_generation_prompt=False,
        tokenize=False,
    )
    assert text.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>"
    )
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>")
    ids = nemotron_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert nemotron_tokenizer.convert_tokens_to_ids("<|eot_id|>") in ids  # specials stay whole
