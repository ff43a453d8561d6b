"""Every batch class moves with one ``.to(device)`` (``align.data.collate.MovesToDevice``): all its tensors,
nested batches included; None and plain numbers stay. The "meta" device shows what moved on a CPU."""

from __future__ import annotations

import dataclasses

import torch

from align.data.chat import TokenizedChat
from align.data.collate import collate_packed, collate_padded
from align.data.preference import PreferenceExample, collate_pairs
from align.data.ranking import RankedExample, collate_ranked
from align.data.shared_prompt import build_row


def tensors(batch, prefix=""):
    """name -> tensor of every tensor field of ``batch`` and of the batches inside it."""
    out = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            out[prefix + f.name] = value
        elif dataclasses.is_dataclass(value):
            out.update(tensors(value, f"{prefix}{f.name}."))
    return out


def chats():
    return [TokenizedChat([1, 2, 3, 4], [False, False, True, True]),
            TokenizedChat([5, 6, 7], [False, True, True])]


def test_sft_batches_move_every_field_sft_moved_and_keep_none():
    padded, packed = collate_padded(chats(), 0), collate_packed(chats(), 8, 0)
    assert packed.attention_mask is None
    for batch in (padded, packed):
        assert batch.to("meta") is batch  # in place, as ``align.train.sft._to`` did
        moved = set(tensors(batch))
        # the fields align.train.sft._to moved (attention_mask when it is not None)
        assert moved == {"input_ids", "position_ids", "index", "targets", "example_ids"} | (
            {"attention_mask"} if batch is padded else set())
        assert all(t.device.type == "meta" for t in tensors(batch).values())
    assert packed.attention_mask is None and padded.num_examples == 2 and padded.num_tokens == 7


def test_dpo_and_reward_model_batches_move_their_nested_rows():
    ex = PreferenceExample([1, 2], [[3, 4], [5]], [[True, False], [True]], [(0, 1)])
    pairs = collate_pairs([ex], 0, ref_logps=[[-1.0, -2.0]]).to("meta")
    no_ref = collate_pairs([ex], 0).to("meta")
    ranked = collate_ranked([RankedExample(build_row([1, 2], [[3, 4], [5]]), 1.0, None, "helpfulness")], 0)
    ranked = ranked.to("meta")
    for batch in (pairs, no_ref, ranked):
        names = tensors(batch)
        assert {"input_ids", "attention_mask", "last_index"} <= {n.split(".")[-1] for n in names}
        assert all(t.device.type == "meta" for t in names.values())
    assert "ref_logps" in tensors(pairs) and no_ref.ref_logps is None
    assert ranked.rows.responses_per_row == [2] and pairs.tokens.num_tokens == 5
