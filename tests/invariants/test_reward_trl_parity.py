"""Parity with TRL's RewardTrainer on pairwise data with a margin column: same weights, same records,
same batch -> the same rewards, loss (margin and centering included) and head gradient."""

import json

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from trl import RewardConfig, RewardTrainer  # noqa: E402

from align.config.specs import ModelSpec, TinyModelConfig  # noqa: E402
from align.data.ranking import collate_ranked, tokenize_ranked  # noqa: E402
from align.losses.reward import reward_ranking_loss  # noqa: E402
from align.models.reward import PackedRewards, load_reward_model, load_reward_tokenizer  # noqa: E402
from data_schemas import read_jsonl  # noqa: E402

CENTERING = 0.05


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


ROWS = [
    {"prompt": user("What is 2 plus 5?"), "chosen": assistant("2 plus 5 is 7."),
     "rejected": assistant("It is 9."), "margin": 1.0},
    {"prompt": user("Reverse the word lemon."), "chosen": assistant("nomel"),
     "rejected": assistant("The word lemon reversed is lemon."), "margin": 0.0},
    {"prompt": user("Hi") + assistant("Hello! How can I help?") + user("Write TIGER in lower case."),
     "chosen": assistant("tiger"), "rejected": assistant("TIGER"), "margin": 2 / 3},
    {"prompt": user("How many times does the letter p appear in apple?"),
     "chosen": assistant("The letter p appears 2 times in apple."), "rejected": assistant("3"), "margin": 3.0},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    tiny = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1)
    spec = ModelSpec(path="builtin:tiny", tiny=tiny)
    tok = load_reward_tokenizer(spec, "builtin:tiny")
    model = load_reward_model(spec, "builtin:tiny", tok, seed=0)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(0)))
        # rewards of order 1, so the margins matter
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def trl_side(path, tmp_path):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True,
                        per_device_train_batch_size=len(ROWS), center_rewards_coefficient=CENTERING,
                        bf16=False, gradient_checkpointing=False)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    model.train()
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    loss.backward()
    chosen, rejected = outputs.logits.squeeze(-1).detach().chunk(2)
    return loss.detach(), torch.stack([chosen, rejected], 1).flatten(), model.score.weight.grad.clone()


def ours_side(path, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    spec = ModelSpec(path=str(path))
    tok = load_reward_tokenizer(spec, str(path))
    model = load_reward_model(spec, str(path), tok)
    examples = [tokenize_ranked(tok, r, 1024, None, "column") for r in read_jsonl(data, "preference")]
    batch = collate_ranked(examples, tok.pad_token_id)
    model.train()
    rewards = PackedRewards(model)(*batch.model_inputs())
    loss, _ = reward_ranking_loss(rewards, batch.responses_per_prompt, batch.margins, CENTERING)
    loss.backward()
    return loss.detach(), rewards.detach(), model.score.weight.grad.clone()


def test_loss_rewards_and_gradient_match_trl(checkpoint, tmp_path):
    trl_loss, trl_rewards, trl_grad = trl_side(checkpoint, tmp_path)
    our_loss, our_rewards, our_grad = ours_side(checkpoint, tmp_path)
    torch.testing.assert_close(our_rewards, trl_rewards, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_loss, trl_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_grad, trl_grad, atol=1e-5, rtol=1e-4)
    assert trl_loss.item() > 0.5  # margins and centering are in play, not a trivial 0


def test_ranked_record_equals_trl_on_its_three_pairs(checkpoint, tmp_path):
    """One packed row of best > middle > worst == TRL on the pairs (0,1), (0,2), (1,2) (no margin):
    the per-prompt mean over its 3 pairs is TRL's mean over the same 3 pairs."""
    ranked = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], assistant("I am not sure.")]}
              for r in ROWS[:2]]
    pairs = [{"prompt": r["prompt"], "chosen": r["responses"][i], "rejected": r["responses"][j]}
             for r in ranked for i, j in ((0, 1), (0, 2), (1, 2))]
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=torch.float32)
    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False,
                        gradient_checkpointing=False, per_device_train_batch_size=len(pairs))
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok)
    model.train()
    trl_loss = trainer.compute_loss(model, trainer.data_collator([trainer.train_dataset[i] for i in range(6)]))
    trl_loss.backward()

    (tmp_path / "ranked.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ranked))
    spec = ModelSpec(path=str(checkpoint))
    ours = load_reward_model(spec, str(checkpoint), load_reward_tokenizer(spec, str(checkpoint)))
    examples = [tokenize_ranked(tok, r, 1024, None, "none") for r in read_jsonl(tmp_path / "ranked.jsonl", "preference")]
    batch = collate_ranked(examples, tok.pad_token_id)
    ours.train()
    loss, _ = reward_ranking_loss(PackedRewards(ours)(*batch.model_inputs()), batch.responses_per_prompt)
    loss.backward()
    torch.testing.assert_close(loss.detach(), trl_loss.detach(), atol=1e-5, rtol=1e-5)
    theirs = dict(model.named_parameters())
    for name, p in ours.named_parameters():  # every weight's gradient, backbone included
        # fp32 sums in another order (one packed row vs 6 padded rows): ~1e-5 on the most used embeddings
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-4, rtol=1e-3,
                                   msg=lambda m, name=name: f"{name}: {m}")
