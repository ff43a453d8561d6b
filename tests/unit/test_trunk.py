"""Shared frozen lower layers (align.models.trunk) run once: the models above them compute exactly what the
whole models do, and PPO's rollout and training step give the same numbers with and without the trunk."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from align.config.specs import ModelSpec
from align.models.loading import load_causal_lm, load_tokenizer
from align.models.policy_value import PolicyAndValue
from align.models.reward import load_reward_model
from align.models.trunk import decoder_of, from_layer, shared_layers, trunk_states

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def _spec(lora=None, seed_tiny=None):
    return ModelSpec(path="builtin:tiny", tiny=TINY, lora=lora)


@pytest.fixture(scope="module")
def models():
    tok = load_tokenizer(ModelSpec(path="builtin:tiny"), "builtin:tiny")
    top = {"r": 2, "alpha": 4, "last_layers": 1}
    policy = load_causal_lm(_spec(top), "builtin:tiny", tok, seed=0)
    value = load_reward_model(_spec(top), "builtin:tiny", tok, seed=0)
    reference = load_causal_lm(_spec(), "builtin:tiny", tok, seed=0).requires_grad_(False)
    with torch.no_grad():  # the adapters as after some training (LoRA's B starts at 0)
        for model in (policy, value):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    return policy, value, reference, tok


def test_shared_layers_counts_the_frozen_equal_layers(models):
    policy, value, reference, tok = models
    assert shared_layers(policy, value, reference) == 2  # LoRA on the last of 3 layers
    assert shared_layers(reference) == 3
    everywhere = load_causal_lm(_spec({"r": 2, "alpha": 4}), "builtin:tiny", tok, seed=0)
    assert shared_layers(everywhere, reference) == 0  # adapters on every layer
    other = load_causal_lm(_spec(), "builtin:tiny", tok, seed=1).requires_grad_(False)
    assert shared_layers(policy, other) == 0  # another model
    with torch.no_grad():
        changed = load_causal_lm(_spec(), "builtin:tiny", tok, seed=0).requires_grad_(False)
        decoder_of(changed).layers[1].mlp.down_proj.weight.mul_(1.01)
    assert shared_layers(policy, changed) == 1


def _batch(tok):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 7:] = mask[2, 5:] = False  # right padding
    response = torch.zeros(3, 10, dtype=torch.bool)
    response[0, 4:] = response[1, 3:7] = response[2, 2:5] = True
    return ids, mask, response


def test_decoder_from_the_trunk_equals_the_whole_decoder(models):
    policy, _, reference, tok = models
    ids, mask, _ = _batch(tok)
    decoder = decoder_of(policy)
    with torch.no_grad():
        whole = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        trunk = trunk_states(reference, 2, input_ids=ids, attention_mask=mask)
        with from_layer(decoder, 2):
            top = decoder(inputs_embeds=trunk, attention_mask=mask).last_hidden_state
    assert len(decoder.layers) == 3  # the stack is whole again
    torch.testing.assert_close(top[mask], whole[mask], rtol=1e-5, atol=1e-6)


def test_policy_and_value_from_the_trunk_equal_the_whole_models_with_their_gradients(models):
    policy, value, reference, tok = models
    ids, mask, response = _batch(tok)
    module = PolicyAndValue(policy, value)
    outputs, grads = [], []
    for k in (0, 2):
        module.trunk_layers = k
        trunk = trunk_states(reference, k, input_ids=ids) if k else None
        module.zero_grad()
        logits, values = module(ids, mask, response, trunk=trunk)
        (logits.logsumexp(-1).sum() + values.sum()).backward()
        outputs.append((logits.detach(), values.detach()))
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_a_rollout_built_on_the_trunk_equals_one_built_without(models):
    from align.train.rollouts import build_rollout

    policy, value, reference, tok = models
    ids, mask, response = _batch(tok)
    samples = [SimpleNamespace(prompt_ids=ids[i, : int(response[i].nonzero()[0])].tolist(),
                               token_ids=ids[i, int(response[i].nonzero()[0]) : int(mask[i].sum())].tolist())
               for i in range(3)]
    stage = SimpleNamespace(sampling=SimpleNamespace(temperature=0.7), train=SimpleNamespace(batch_size=2),
                            kl_estimator="k1", gamma=1.0, lam=0.95, whiten_advantages=False)
    acc = SimpleNamespace(device="cpu", autocast=contextlib.nullcontext, unwrap_model=lambda m: m,
                          num_processes=1)
    module = PolicyAndValue(policy, value)
    built = []
    for k in (0, 2):
        module.trunk_layers = k
        built.append(build_rollout(module, reference, samples, torch.tensor([0.5, -1.0, 0.2]), 0.1, stage, acc, 0)[0])
    plain, shared = built
    assert plain.trunk is None and shared.trunk is not None and shared.trunk.shape[:2] == plain.sequences.shape
    for field in ("logps", "ref_logps", "values", "advantages"):
        torch.testing.assert_close(getattr(shared, field), getattr(plain, field), rtol=1e-5, atol=1e-6)
    assert float(plain.ref_logps.sub(plain.logps).abs().max()) > 1e-3  # the policy differs from its reference
    # a trimmed minibatch keeps the trunk's rows and columns aligned with the tokens
    mini = shared.select(torch.tensor([2, 0])).trimmed()
    assert mini.trunk.shape[:2] == mini.sequences.shape


EXAMPLES = [  # DPO records: prompt ids, responses, DPO masks, (chosen, rejected) pairs; packed two to a row
    ([1, 40, 41, 44], [[50, 51, 52], [60, 61]], [[True, True, False], [True, False]], [(0, 1)]),
    ([2, 42], [[70], [71, 72, 73]], [[True], [True, True, True]], [(0, 1)]),
    ([3, 43, 45, 46, 47, 48, 49], [[80, 81], [90, 91, 92, 93, 94, 95]], [[True, True], [True] * 5 + [False]], [(1, 0)]),
]


def test_dpo_token_logps_from_cached_trunks_equal_the_whole_policy_with_gradients(models):
    """The reference pass (adapter off) keeps each record's states after the frozen layers; collated into
    packed rows, the policy's log-probs and gradients from them are the whole policy's."""
    from align.data.preference import PreferenceExample, collate_pairs
    from align.models.logps import TokenLogps
    from align.train.reference import logps_and_trunks

    policy, _, _, tok = models
    examples = [PreferenceExample(*e) for e in EXAMPLES]
    with policy.disable_adapter():
        plain_refs, _ = logps_and_trunks(TokenLogps(policy), examples, 3, tok.pad_token_id, "cpu")[:2]
        refs, _, trunks = logps_and_trunks(TokenLogps(policy), examples, 3, tok.pad_token_id, "cpu", trunk_layers=2)
    assert refs == plain_refs and [t.shape[0] for t in trunks] == [len(e) for e in examples]
    batch = collate_pairs(examples, tok.pad_token_id, trunks=trunks)
    assert batch.tokens.trunk.shape[0] < len(examples)  # packed: the trunks sit where their tokens do
    assert_same_values_and_gradients(policy, lambda k, inputs: TokenLogps(policy, k)(*inputs),
                                     batch.model_inputs()[:5], batch.model_inputs(), k=2)


def test_reward_model_from_cached_trunks_equals_the_whole_model_with_gradients(models):
    """A reward model with LoRA on its top layer: each record's states after the frozen layers, computed
    once (shared_row_trunks) and packed into batches, give the whole model's scores and gradients."""
    from align.data.ranking import RankedExample, collate_ranked
    from align.data.shared_prompt import build_row
    from align.models.reward import PackedRewards, score_ranked
    from align.models.trunk import shared_row_trunks, trunk_layers_to_keep

    _, value, _, tok = models
    examples = [RankedExample(build_row(p, r), 0.0, None, "helpfulness") for p, r, _, _ in EXAMPLES]
    assert trunk_layers_to_keep(value, tokens=100) == 2 and trunk_layers_to_keep(value, tokens=10**12) == 0
    trunks = shared_row_trunks(value, [e.row for e in examples], 2, batch_size=2, pad_id=tok.pad_token_id,
                               device="cpu")
    assert [t.shape[0] for t in trunks] == [len(e.row.input_ids) for e in examples]
    batch = collate_ranked(examples, tok.pad_token_id, trunks=trunks)
    assert_same_values_and_gradients(value, lambda k, inputs: PackedRewards(value, k)(*inputs),
                                     batch.model_inputs()[:4], batch.model_inputs(), k=2)
    # evaluation scores from the trunks too
    top, whole = (score_ranked(PackedRewards(value, k).eval(), examples, 2, tok.pad_token_id, "cpu", trunks=t)
                  for k, t in ((2, trunks), (0, None)))
    torch.testing.assert_close(torch.tensor(top), torch.tensor(whole), rtol=1e-5, atol=1e-5)


def assert_same_values_and_gradients(model, run, whole_inputs, trunk_inputs, k: int) -> None:
    """``run(0, whole_inputs)`` (the whole model) and ``run(k, trunk_inputs)`` (from the kept states) give the
    same values and the same gradients of every trainable parameter (for a weighted sum of the values)."""
    results = []
    for layers, inputs in ((0, whole_inputs), (k, trunk_inputs)):
        model.zero_grad()
        values = run(layers, inputs)
        (values * torch.arange(1.0, 1 + len(values))).sum().backward()
        results.append((values.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (whole, g0), (top, g1) = results
    torch.testing.assert_close(top, whole, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6)
