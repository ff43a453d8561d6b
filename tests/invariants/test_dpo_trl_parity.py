"""Parity with TRL 1.16 ``DPOTrainer(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2])``, masking off.

Same tiny weights (policy = perturbed copy of the reference), same pairs, and TRL's own collator and
``compute_loss``. The sigmoid term matches to 1e-5. The NLL term is normalised differently (see
``align.losses.dpo``): ours is the per-pair token mean averaged over pairs, TRL's the token mean over all
chosen tokens of the batch. They are equal when the chosen responses have equal lengths, and TRL's value
is our per-pair NLLs re-weighted by length otherwise.
"""

import copy

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from align.data.chat import build_byte_tokenizer  # noqa: E402
from align.data.preference import collate_pairs, tokenize_preferences  # noqa: E402
from align.losses.dpo import response_sums, response_token_counts  # noqa: E402
from align.models.logps import TokenLogps  # noqa: E402
from align.train.dpo import make_loss_fn  # noqa: E402
from align.train.reference import compute_response_logps  # noqa: E402
from data_schemas import parse_record  # noqa: E402

BETA, NLL_WEIGHT = 0.1, 0.2
UNEQUAL = [("What is 2 plus 3?", "5.", "6 I think."), ("Reverse abc.", "cba, done", "abc"),
           ("Say hi.", "Hi there!", "No.")]
EQUAL = [("What is 2 plus 3?", "5.", "6 I think."), ("Reverse abc.", "cb", "abc"), ("Say hi.", "Hi", "No.")]


pytestmark = pytest.mark.usefixtures("one_thread")


def rows(triples):
    return [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in triples]


@pytest.fixture(scope="module")
def setup():
    tok = build_byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    ref = LlamaForCausalLM(cfg).eval()
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tok, policy, ref


def trl_terms(tok, policy, ref, data, tmp_path):
    """TRL's sigmoid term, sft term and their weighted sum on the batch its collator makes."""
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, loss_type=["sigmoid", "sft"],
                     loss_weights=[1.0, NLL_WEIGHT], report_to="none", use_cpu=True, max_length=None, bf16=False,
                     per_device_train_batch_size=len(data))
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                         train_dataset=Dataset.from_list(data), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(data))])
    out = {}
    for name, types, weights in (("sigmoid", ["sigmoid"], [1.0]), ("sft", ["sft"], [1.0]),
                                 ("total", ["sigmoid", "sft"], [1.0, NLL_WEIGHT])):
        trainer.loss_types, trainer.loss_weights = types, weights
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        out[name] = loss.detach()
        out[name + "_grads"] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    return out, batch


def ours(tok, policy, ref, data, nll_weight=NLL_WEIGHT):
    records = [parse_record(r, "preference") for r in data]
    examples = tokenize_preferences(tok, records, frozenset(), 10_000, "best_worst").examples  # masking off
    refs, _ = compute_response_logps(TokenLogps(ref), examples, len(examples), tok.pad_token_id, "cpu")
    batch = collate_pairs(examples, tok.pad_token_id, ref_logps=refs)
    model = TokenLogps(copy.deepcopy(policy))
    loss_sum, stats = make_loss_fn(BETA, nll_weight, 0.0)(model, batch)
    loss = loss_sum / batch.num_pairs
    loss.backward()
    grads = {n.removeprefix("lm."): p.grad for n, p in model.named_parameters()}
    with torch.no_grad():
        logps = model(*batch.model_inputs())
        owner, r = batch.tokens.owner, batch.num_responses
        chosen_sum = -response_sums(logps, owner, r)[batch.chosen]  # (P,) NLL sums of the chosen responses
        chosen_len = response_token_counts(owner, r)[batch.chosen]  # (P,)
    return {"loss": loss.detach(), "stats": stats, "grads": grads, "examples": examples, "batch": batch,
            "chosen_nll_sum": chosen_sum, "chosen_len": chosen_len}


def test_same_token_sequences(setup, tmp_path):
    tok, policy, ref = setup
    _, trl_batch = trl_terms(tok, policy, ref, rows(UNEQUAL), tmp_path)
    ex = ours(tok, policy, ref, rows(UNEQUAL))["examples"]
    for i, e in enumerate(ex):
        n = len(UNEQUAL)
        for k, row in ((0, i), (1, n + i)):
            want = trl_batch["input_ids"][row][trl_batch["attention_mask"][row].bool()].tolist()
            assert e.prompt_ids + e.responses[k] == want


def test_sigmoid_term_matches_and_sft_term_is_length_weighted(setup, tmp_path):
    tok, policy, ref = setup
    trl, _ = trl_terms(tok, policy, ref, rows(UNEQUAL), tmp_path)
    no_nll = ours(tok, policy, ref, rows(UNEQUAL), nll_weight=0.0)
    torch.testing.assert_close(no_nll["loss"], trl["sigmoid"], atol=1e-5, rtol=1e-5)
    full = ours(tok, policy, ref, rows(UNEQUAL))
    nll_sum, n = full["chosen_nll_sum"], full["chosen_len"]
    assert len(set(n.tolist())) > 1  # unequal chosen lengths
    # TRL: one token mean over the batch's chosen tokens == our per-pair NLLs weighted by length
    torch.testing.assert_close(trl["sft"], nll_sum.sum() / n.sum(), atol=1e-5, rtol=1e-5)
    # ours: per-pair token mean, then mean over pairs
    ours_nll = (nll_sum / n).mean()
    torch.testing.assert_close(full["stats"]["nll"] / len(UNEQUAL), ours_nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full["loss"], trl["sigmoid"] + NLL_WEIGHT * ours_nll, atol=1e-5, rtol=1e-5)
    assert abs(float(trl["sft"] - ours_nll)) > 1e-3  # the normalisations really differ here


def test_equal_chosen_lengths_give_the_same_loss_and_gradient(setup, tmp_path):
    tok, policy, ref = setup
    trl, _ = trl_terms(tok, policy, ref, rows(EQUAL), tmp_path)
    mine = ours(tok, policy, ref, rows(EQUAL))
    assert len(set(mine["chosen_len"].tolist())) == 1
    torch.testing.assert_close(mine["loss"], trl["total"], atol=1e-5, rtol=1e-5)
    for name, g in trl["total_grads"].items():
        torch.testing.assert_close(mine["grads"][name], g, atol=1e-5, rtol=1e-4)
