"""Gradient accumulation is exact for DPO and the reward model too (like tests/invariants/
test_accumulation.py for SFT): one optimizer step of the real loop over the same 8 records gives the same
gradient as 1 micro-batch of 8, 2 of 4 and 8 of 1.

DPO uses the stage's own ``make_loss_fn`` and ``pair_count`` with ``pairs: adjacent`` on records of 2 to 4
responses, so records carry different numbers of pairs and a per-micro-batch mean would be wrong (checked
too). The reward model uses the ranking loss with the stage's ``reduction="sum"``, margins and centering,
and ``prompts_in``, on records of 2 and 3 responses.
"""

from __future__ import annotations

import pytest
import torch

from align.config.specs import ModelSpec, OptimConfig, TinyModelConfig, TrainConfig
from align.data.chat import build_byte_tokenizer, formatting_token_ids
from align.data.preference import collate_pairs, tokenize_preferences
from align.data.ranking import collate_ranked, tokenize_ranked
from align.losses.reward import reward_ranking_loss
from align.models.logps import TokenLogps
from align.models.reward import PackedRewards, load_reward_model, load_reward_tokenizer
from align.train.dpo import make_loss_fn, pair_count
from align.train.loop import PlanSource, train
from align.train.metrics import MetricsLogger
from align.train.reward_model import prompts_in
from data_schemas import parse_record
from tests.conftest import ConstantLR, GradRecorder

pytestmark = pytest.mark.usefixtures("one_thread")

N = 8
STRENGTHS = ["significantly_better", "better", "slightly_better", None]


def records():
    out = []
    for k in range(N):
        n = 2 + k % 3  # 2, 3 or 4 responses
        out.append(parse_record({
            "prompt": "add " + "1 " * k,
            "responses": [f"it is {k + j}" + "!" * (j * 3 + k) for j in range(n)],
            **({"strength": STRENGTHS[k % 4]} if STRENGTHS[k % 4] else {}),
        }, "preference"))
    return out






def step_grads(tmp_path, model, make_batch, loss_fn, units, micro: int, label: str) -> torch.Tensor:
    from accelerate import Accelerator

    size = N // micro
    plan = [[list(range(i * size, (i + 1) * size)) for i in range(micro)]]
    optimizer = GradRecorder(model.parameters())
    out = tmp_path / f"{label}_{micro}"
    train(accelerator=Accelerator(cpu=True), model=model, optimizer=optimizer, scheduler=ConstantLR(),
          source=PlanSource(plan, make_batch, 0, micro), loss_fn=loss_fn, units=units,
          cfg=TrainConfig(grad_accum=micro, report_to=[], optim=OptimConfig(max_grad_norm=None)),
          out_dir=out, logger=MetricsLogger(out, [], enabled=False), desc="accum")
    return torch.cat([g.flatten() for g in optimizer.grads])


def rel_diff(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def dpo_setup():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_byte_tokenizer()
    data = tokenize_preferences(tok, records(), formatting_token_ids(tok), 128, "adjacent")
    assert len(data.examples) == N and sorted({len(e.pairs) for e in data.examples}) == [1, 2, 3]
    # reference sums that differ from the policy's, so the DPO term has a real gradient
    refs = [[-3.0 * len(r) + 0.7 * j for j, r in enumerate(ex.responses)] for ex in data.examples]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = TokenLogps(LlamaForCausalLM(config))

    def make_batch(group):
        return collate_pairs([data.examples[i] for i in group], tok.pad_token_id, torch.float32,
                             [refs[i] for i in group])

    return model, make_batch


DPO_LOSS = make_loss_fn(beta=0.5, nll_weight=0.2, label_smoothing=0.1)


def test_dpo_accumulation_gives_the_gradient_of_one_big_batch(dpo_setup, tmp_path):
    model, make_batch = dpo_setup
    reference = step_grads(tmp_path, model, make_batch, DPO_LOSS, pair_count, 1, "dpo")
    assert reference.norm() > 0
    for micro in (2, 8):
        got = step_grads(tmp_path, model, make_batch, DPO_LOSS, pair_count, micro, "dpo")
        assert rel_diff(got, reference) < 1e-6, f"{micro} micro-batches of {N // micro}"


def test_dpo_naive_micro_batch_mean_differs(dpo_setup, tmp_path):
    """A per-micro-batch mean over pairs (units = 1 per micro-batch) is not the mean over all pairs when
    records carry 1 to 3 pairs: the invariant above is not trivially true."""
    model, make_batch = dpo_setup

    def mean_loss(m, batch):
        loss, stats = DPO_LOSS(m, batch)
        return loss / batch.num_pairs, stats

    reference = step_grads(tmp_path, model, make_batch, DPO_LOSS, pair_count, 1, "dpo")
    naive = step_grads(tmp_path, model, make_batch, mean_loss, lambda b: 1.0, 8, "dpo_naive")
    assert rel_diff(naive, reference) > 1e-2


@pytest.fixture(scope="module")
def rm_setup():
    spec = ModelSpec(path="builtin:tiny", tiny=TinyModelConfig(hidden_size=32, intermediate_size=64,
                                                               num_hidden_layers=2, num_attention_heads=4,
                                                               num_key_value_heads=2))
    tok = load_reward_tokenizer(spec, "builtin:tiny")
    rm = load_reward_model(spec, "builtin:tiny", tok, seed=0)
    with torch.no_grad():  # a head that is not ~0, so the scores differ and every term has a gradient
        rm.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    examples = [tokenize_ranked(tok, r, 128, 64, "llama2_large") for r in records()]
    assert sorted({e.num_responses for e in examples}) == [2, 3, 4]
    assert sorted({e.margin for e in examples}) == [0.0, 1.0, 2.0, 3.0]

    def make_batch(group):
        return collate_ranked([examples[i] for i in group], tok.pad_token_id)

    def loss_fn(model, batch):  # what the reward_model stage's loss does
        rewards = model(*batch.model_inputs())
        return reward_ranking_loss(rewards, batch.responses_per_prompt, batch.margins, 0.05, reduction="sum")

    return PackedRewards(rm), make_batch, loss_fn


def test_reward_model_accumulation_gives_the_gradient_of_one_big_batch(rm_setup, tmp_path):
    model, make_batch, loss_fn = rm_setup
    reference = step_grads(tmp_path, model, make_batch, loss_fn, prompts_in, 1, "rm")
    assert reference.norm() > 0
    for micro in (2, 8):
        got = step_grads(tmp_path, model, make_batch, loss_fn, prompts_in, micro, "rm")
        assert rel_diff(got, reference) < 1e-6, f"{micro} micro-batches of {N // micro}"
