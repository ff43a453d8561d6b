"""One encoder for a preference row (``align.data.encode``): DPO and the reward model get the same token ids
from it and differ only in how a record is cut to max_length; what it counts comes back as values; both
stages split records by prompt, with the train / held-out membership they had before the encoder was
shared."""

from __future__ import annotations

import pytest

import rewards.encoding
from align.config.specs import DataSpec
from align.data.chat import build_byte_tokenizer, formatting_token_ids
from align.data.encode import EncodeCounts, encode_preference
from align.data.preference import load_preferences, tokenize_preference, tokenize_preferences
from align.data.ranking import select_domain, tokenize_ranked, tokenize_ranked_records
from align.data.sources import prompt_key, split_by_prompt
from data_schemas import Message, PreferenceRecord, write_jsonl

CHATML = ("{% for message in messages %}"
          "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def merging_tokenizer():
    """Byte-level BPE with ChatML and one merge, newline + space: like SmolLM2, it merges the end of
    ``<|im_start|>assistant\\n`` with a response that starts with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["ĊĠ"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "Ġ")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    return tok


def record(*responses, prompt="What is 2 plus 2?"):
    return PreferenceRecord(prompt=[Message(role="user", content=prompt)],
                            responses=[Message(role="assistant", content=r) for r in responses])


@pytest.mark.parametrize("make", [build_byte_tokenizer, merging_tokenizer])
def test_dpo_and_the_reward_model_get_the_same_ids(make):
    tok = make()
    rec = record("  Sure: 4.", "It is 4.", "5")
    encoded, counts = encode_preference(tok, rec)
    dpo, *_ = tokenize_preference(tok, rec, formatting_token_ids(tok), 1000, "adjacent")
    rm = tokenize_ranked(tok, rec, 1000, None, "none")
    assert dpo.prompt_ids == encoded.prompt_ids == rm.row.input_ids[: rm.row.prompt_length]
    assert dpo.responses == encoded.responses == [rm.row.input_ids[s:e] for s, e in rm.row.spans]
    assert tok.decode(encoded.prompt_ids + encoded.responses[1]) == tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "It is 4."}],
        tokenize=False)
    assert counts == EncodeCounts(boundary_adjusted=int(make is merging_tokenizer))


def test_boundary_splits_are_returned_per_call_not_kept_in_a_global():
    tok = merging_tokenizer()
    rec = record("  Sure.", "No.")
    for _ in range(2):  # the same count each time: nothing accumulates between calls
        encoded, counts = encode_preference(tok, rec, template_masks=True)
        assert counts.boundary_adjusted == 1
    assert tok.decode(encoded.responses[0]) == "  Sure.<|im_end|>\n"
    assert tok.decode(encoded.prompt_ids).endswith("<|im_start|>assistant\n")
    # template text: what lies outside the stripped content (the leading spaces too), whatever its ids
    assert [tok.decode([i]) for i, t in zip(encoded.responses[0], encoded.template_masks[0], strict=True)
            if t] == [" ", " ", "<|im_end|>", "\n"]
    assert not hasattr(rewards.encoding, "BOUNDARY_SPLITS")
    assert tokenize_preferences(tok, [rec, rec], frozenset(), 256, "best_worst").boundary_adjusted == 2
    assert tokenize_ranked_records(tok, [rec, rec], 256, None, "none").boundary_adjusted == 2
    assert encode_preference(tok, record("Sure.", "No."))[1].boundary_adjusted == 0


def test_the_two_truncation_rules():
    tok = build_byte_tokenizer()
    rec = record("abcdefgh", "xy")
    full, _ = encode_preference(tok, rec)
    p = len(full.prompt_ids)
    # DPO: the prompt is kept whole, a response loses its end
    cut, counts = encode_preference(tok, rec, max_length=p + 4, truncation="cut_end")
    assert cut.prompt_ids == full.prompt_ids and cut.responses == [full.responses[0][:4], full.responses[1]]
    assert counts == EncodeCounts(truncated_responses=1)
    assert encode_preference(tok, rec, max_length=p, truncation="cut_end") == (None, EncodeCounts())
    # the reward model: the prompt keeps its last tokens, a response keeps its final (scored) token
    kept, counts = encode_preference(tok, rec, max_length=12, max_prompt_length=8, truncation="keep_final")
    assert kept.prompt_ids == full.prompt_ids[-8:]
    assert kept.responses == [full.responses[0][:3] + full.responses[0][-1:], full.responses[1]]
    assert counts == EncodeCounts(truncated_prompts=1, truncated_responses=1)
    masked, _ = encode_preference(tok, rec, max_length=12, max_prompt_length=8, template_masks=True)
    assert masked.template_masks[0] == [False, False, False, True]  # the masks are cut like their ids
    with pytest.raises(ValueError, match="unknown truncation"):
        encode_preference(tok, rec, truncation="middle")


def split_rows():
    rows = []
    for i in range(48):
        kw = {} if i % 7 == 0 else {"domain": ("helpfulness", "safety", "safety")[i % 3]}
        rows.append(PreferenceRecord(
            prompt=[Message(role="user", content=f"Question {i // 2 if i % 5 else i}?")],  # prompts shared
            responses=[Message(role="assistant", content=f"Answer {i}."),
                       Message(role="assistant", content="No.")],
            meta={"row": i}, **kw))
    return rows


def test_both_stages_keep_their_train_and_held_out_records(tmp_path):
    """The rows each stage trained on and held out before ``load_preferences`` stopped splitting (DPO: its
    loader split every record; the reward model: loaded with no split, selected its domain, then split)."""
    path = str(tmp_path / "p.jsonl")
    write_jsonl(path, split_rows())
    spec = DataSpec(paths=[path], sample=40, eval_fraction=0.25)
    records = load_preferences(spec, [path], seed=7)
    assert len(records) == 40
    dpo = split_by_prompt(records, spec.eval_fraction, 7)  # as align.train.dpo
    rm = split_by_prompt(select_domain(records, "safety", "safety"), spec.eval_fraction, 7)  # as reward_model
    assert [[r.meta["row"] for r in part] for part in dpo] == [
        [0, 1, 2, 3, 5, 7, 10, 11, 12, 14, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 31, 35, 39, 40, 42, 43, 45,
         46, 47], [8, 9, 16, 17, 28, 29, 32, 34, 36, 37, 44]]
    assert [[r.meta["row"] for r in part] for part in rm] == [
        [1, 2, 8, 10, 19, 20, 22, 23, 25, 26, 29, 31, 32, 37, 44, 46, 47], [5, 11, 16, 17, 34, 40, 43]]
    for train, held in (dpo, rm):
        assert not {prompt_key(r) for r in train} & {prompt_key(r) for r in held}
