"""Tokenisation masks, hand-checked on a two-turn chat with the built-in byte tokenizer."""

import pytest

from align.data.chat import (
    EOT,
    build_byte_tokenizer,
    formatting_token_ids,
    termination_token_id,
    tokenize_chat,
    tokenize_prompt,
)

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def test_rendered_text_is_llama3_format(tok):
    text = tok.apply_chat_template(TWO_TURNS, tokenize=False)
    assert text == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
    )


def test_loss_mask_covers_assistant_content_and_eot_only(tok):
    chat = tokenize_chat(tok, TWO_TURNS)
    ids, mask = chat.input_ids, chat.loss_mask
    assert len(ids) == len(mask)
    # hand-built expectation: byte tokenizer = one token per byte, one per special token
    def toks(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    expected = []
    for piece, trained in [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>", False),
        ("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", False),
        ("<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Hello!<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>", False),
        ("<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("4<|eot_id|>", True),
    ]:
        expected += [trained] * len(toks(piece))
    assert mask == expected
    # the masked tokens decode to exactly the two answers with their termination tokens
    kept = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(kept) == f"Hello!{EOT}4{EOT}"
    assert sum(mask) == len("Hello!") + 1 + len("4") + 1
    assert kept[-1] == termination_token_id(tok)


def test_truncation_keeps_mask_aligned(tok):
    chat = tokenize_chat(tok, TWO_TURNS, max_length=40)
    assert len(chat.input_ids) == len(chat.loss_mask) == 40
    whole = tokenize_chat(tok, TWO_TURNS)
    assert chat.cut == len(whole) - 40 and whole.cut == 0  # the stage counts truncated rows from it


def test_prompt_ends_with_assistant_header(tok):
    ids = tokenize_prompt(tok, TWO_TURNS[:2])
    assert tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_formatting_tokens_are_headers_bos_and_eot(tok):
    ids = formatting_token_ids(tok)
    names = set(tok.convert_ids_to_tokens(sorted(ids)))
    assert names == {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}
    assert formatting_token_ids(tok, explicit=["<|eot_id|>"]) == {termination_token_id(tok)}


def test_round_trip_of_unicode(tok):
    s = "naïve café — 你好"
    assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s
