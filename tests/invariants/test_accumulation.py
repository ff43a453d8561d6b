"""Gradient accumulation is exact: one optimizer step over the same 8 examples gives the same gradient
whether they come as 1 micro-batch of 8, 2 of 4 or 8 of 1, through the real loop
(``align.train.loop.train``), packed or padded. The examples have different lengths, so the naive
per-micro-batch mean would give a different gradient; the test checks that too, to show it has teeth.
"""

from __future__ import annotations

import pytest
import torch

from align.config.specs import OptimConfig, TrainConfig
from align.data.chat import build_byte_tokenizer, tokenize_chat
from align.data.collate import collate_packed, collate_padded
from align.models.logps import TokenLogps
from align.train.loop import PlanSource, train
from align.train.metrics import MetricsLogger
from align.train.sft import scored_tokens, sft_loss
from tests.conftest import ConstantLR, GradRecorder

MAX_LENGTH = 64
PACK_ROW = 128  # packed rows hold 2-3 examples, so attention must not cross examples inside a row
N_EXAMPLES = 8






@pytest.fixture(scope="module")
def setup():
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_byte_tokenizer()
    # 8 chats of distinct lengths (34..62 tokens) with assistant spans of distinct lengths
    examples = [
        tokenize_chat(
            tokenizer,
            [
                {"role": "user", "content": "sum " + "1 " * k},
                {"role": "assistant", "content": "it is " + str(k) + "!" * (2 * k)},
            ],
            MAX_LENGTH,
        )
        for k in range(N_EXAMPLES)
    ]
    assert len({len(ex) for ex in examples}) == N_EXAMPLES and max(len(ex) for ex in examples) <= MAX_LENGTH
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = TokenLogps(LlamaForCausalLM(config))
    return Accelerator(), model, tokenizer, examples


def step_grads(setup, tmp_path, micro, collate, loss_fn=sft_loss, units=scored_tokens):
    """Gradient of one optimizer step whose plan is ``micro`` micro-batches of the 8 examples."""
    accelerator, model, tokenizer, examples = setup
    size = N_EXAMPLES // micro
    plan = [[list(range(i * size, (i + 1) * size)) for i in range(micro)]]

    def make_batch(group):
        chosen = [examples[i] for i in group]
        if collate == "packed":
            return collate_packed(chosen, PACK_ROW, tokenizer.pad_token_id)
        return collate_padded(chosen, tokenizer.pad_token_id)

    cfg = TrainConfig(
        grad_accum=micro, max_length=MAX_LENGTH, report_to=[], optim=OptimConfig(max_grad_norm=None)
    )
    optimizer = GradRecorder(model.parameters())
    out = tmp_path / f"{collate}_{micro}_{loss_fn.__name__}"
    train(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=ConstantLR(),
        source=PlanSource(plan, make_batch, 0, micro),
        loss_fn=loss_fn,
        units=units,
        cfg=cfg,
        out_dir=out,
        logger=MetricsLogger(out, [], enabled=False),
        desc="accum",
    )
    assert optimizer.grads is not None
    return torch.cat([g.flatten() for g in optimizer.grads])


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def naive_mean_loss(model, batch):
    """The per-micro-batch token mean (what a loop that averages micro-batch means would use)."""
    logps = model(*batch.model_inputs())
    return -logps.mean(), {}


@pytest.mark.parametrize("collate", ["packed", "padded"])
def test_accumulation_gives_the_gradient_of_one_big_batch(setup, tmp_path, collate):
    reference = step_grads(setup, tmp_path, 1, collate)  # 1 x 8
    assert reference.norm() > 0
    for micro in (2, 8):  # 2 x 4 and 8 x 1
        got = step_grads(setup, tmp_path, micro, collate)
        assert rel_diff(got, reference) < 1e-6, f"{micro} micro-batches of {N_EXAMPLES // micro}"


@pytest.mark.parametrize("collate", ["packed", "padded"])
def test_naive_micro_batch_mean_differs(setup, tmp_path, collate):
    """Averaging per-micro-batch means (units = 1 per micro-batch) is NOT the global token mean when
    examples differ in length: the invariant above is not trivially true."""
    reference = step_grads(setup, tmp_path, 1, collate)
    naive = step_grads(setup, tmp_path, 8, collate, loss_fn=naive_mean_loss, units=lambda b: 1.0)
    assert rel_diff(naive, reference) > 1e-2


def test_packed_and_padded_give_the_same_gradient(setup, tmp_path):
    packed = step_grads(setup, tmp_path, 1, "packed")
    padded = step_grads(setup, tmp_path, 1, "padded")
    assert rel_diff(packed, padded) < 1e-5
