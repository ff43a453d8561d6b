"""``builtin:world``: the byte-level BPE learned from the built-in world (world.tokenizer)."""

import json
import subprocess
import sys

import pytest

from align.config.specs import ModelSpec
from align.data.chat import EOT, LLAMA3_SPECIAL_TOKENS, build_byte_tokenizer, tokenize_chat
from world.generator import sft_records
from world.tokenizer import WORLD_VOCAB_SIZE, build_world_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_world_tokenizer()


def test_vocabulary_special_tokens_and_termination(tok):
    assert len(tok) == WORLD_VOCAB_SIZE == 512
    vocab = tok.get_vocab()
    assert all(t in vocab for t in LLAMA3_SPECIAL_TOKENS)
    assert tok.eos_token == EOT and tok.pad_token_id != tok.eos_token_id
    # each special token is one id, never split by the BPE
    assert [len(tok(t, add_special_tokens=False)["input_ids"]) for t in LLAMA3_SPECIAL_TOKENS] == [1] * 6


def test_every_string_round_trips(tok):
    texts = ["What is 4 minus 1?", "The answer is HAT, indeed.", "  two  spaces\tand a tab\n",
             "naïve café — ünïcödé ✓ 漢字", "I can't help with that."]
    texts += [m.content for r in sft_records(50, seed=3) for m in r.messages]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_world_text_takes_far_fewer_tokens_than_bytes(tok):
    byte_tok = build_byte_tokenizer()
    chats = [[m.model_dump(exclude_none=True) for m in r.messages] for r in sft_records(200, seed=5)]
    n_bytes = sum(len(tokenize_chat(byte_tok, c)) for c in chats)
    n_world = sum(len(tokenize_chat(tok, c)) for c in chats)
    assert n_bytes / n_world > 2.0
    assert tok.tokenize(" answer")[0] == "Ġanswer"  # whole words are single tokens


def test_loss_mask_covers_exactly_the_answers_and_their_termination(tok):
    chat = [{"role": "system", "content": "Always answer in upper case."},
            {"role": "user", "content": "What is 2 plus 3?"},
            {"role": "assistant", "content": "2 PLUS 3 IS 5."},
            {"role": "user", "content": "Spell hat in capital letters."},
            {"role": "assistant", "content": "THE ANSWER IS HAT."}]
    out = tokenize_chat(tok, chat)
    runs, current = [], []
    for i, on in zip(out.input_ids, out.loss_mask, strict=True):
        if on:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [tok.decode(r) for r in runs] == ["2 PLUS 3 IS 5." + EOT, "THE ANSWER IS HAT." + EOT]


def test_the_same_tokenizer_in_every_process():
    """Stages run in separate processes: the merges must not depend on hashing or thread order."""
    code = ("from world.tokenizer import build_world_tokenizer;"
            "print(build_world_tokenizer().backend_tokenizer.to_str())")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")]
    assert json.loads(outs[0])["model"] == json.loads(outs[1])["model"]


def test_builtin_tiny_takes_either_builtin_tokenizer_and_nothing_else():
    assert ModelSpec(path="builtin:tiny", tokenizer="builtin:world").tokenizer == "builtin:world"
    assert ModelSpec(path="builtin:tiny", tokenizer="builtin:bytes").tokenizer == "builtin:bytes"
    with pytest.raises(ValueError, match="builtin:bytes or builtin:world"):
        ModelSpec(path="builtin:tiny", tokenizer="/models/other")


def test_a_stage_spec_naming_it_gets_it_and_a_model_of_its_size(tmp_path):
    from align.models.loading import load_causal_lm, load_tokenizer

    spec = ModelSpec(path="builtin:tiny", tokenizer="builtin:world")
    tok = load_tokenizer(spec, "builtin:tiny")
    assert len(tok) == 512 and tok.tokenize(" answer") == ["Ġanswer"]
    model = load_causal_lm(spec, "builtin:tiny", tok)
    assert model.get_input_embeddings().weight.shape[0] == 512
    tok.save_pretrained(tmp_path)  # a checkpoint's tokenizer reloads as the same one
    from transformers import AutoTokenizer
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "What is 4 minus 1? The answer is 3."
    assert again(text)["input_ids"] == tok(text)["input_ids"]


def test_the_benches_save_the_tokenizer_they_are_asked_for(tmp_path):
    """bench/roofline.py's round size saves its tiny model with the default round's tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    from bench.common import save_tiny_llama

    for name, size in (("builtin:bytes", 262), ("builtin:world", WORLD_VOCAB_SIZE)):
        folder, _ = save_tiny_llama(tmp_path / name.replace(":", "_"), 32, 1, tokenizer=name, intermediate=64)
        assert len(AutoTokenizer.from_pretrained(folder)) == size
        assert AutoConfig.from_pretrained(folder).vocab_size == size
