"""KL of a policy to its reference: the exact per-token KL and the k1/k3 estimators against values worked
out by hand, and evaluation's ``kl_to_reference`` against a brute-force loop on a tiny model.

Hand example on a 3-token vocabulary, p = (1/2, 1/4, 1/4) (policy), q = (1/8, 1/8, 3/4) (reference):

    KL(p || q) = 1/2 ln(4) + 1/4 ln(2) + 1/4 ln(1/3) = 1.25 ln 2 - 0.25 ln 3
               = 0.8664339757 - 0.2746530722 = 0.5917809035
    KL(q || p) = 1/8 ln(1/4) + 1/8 ln(1/2) + 3/4 ln 3 = -0.375 ln 2 + 0.75 ln 3
               = -0.2599301927 + 0.8239592165 = 0.5640290238        (not symmetric: catches swapped args)

Sampled-token estimators, r = ln q(y) - ln p(y):
    y = 0: k1 = ln(1/2) - ln(1/8) = ln 4 = 1.3862943611;   k3 = e^(-ln 4) - 1 + ln 4 = 0.25 - 1 + 1.3862943611 = 0.6362943611
    y = 1: k1 = ln(1/4) - ln(1/8) = ln 2 = 0.6931471806;   k3 = 0.5 - 1 + ln 2 = 0.1931471806
    y = 2: k1 = ln(1/4) - ln(3/4) = -ln 3 = -1.0986122887; k3 = 3 - 1 - ln 3 = 0.9013877113
Both unbiased: sum_y p(y) k(y) = KL(p || q):
    k1: 0.5 * 1.3862943611 + 0.25 * 0.6931471806 - 0.25 * 1.0986122887 = 0.5917809036
    k3: 0.5 * 0.6362943611 + 0.25 * 0.1931471806 + 0.25 * 0.9013877113 = 0.5917809036
"""

import copy
import math

import pytest
import torch

from align.config.specs import ModelSpec
from align.data.chat import build_byte_tokenizer, termination_token_id, tokenize_prompt
from align.losses.kl import exact_kl, kl_k1, kl_k3
from align.models.kl import kl_to_reference, response_vocab_logps
from align.models.loading import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

P = torch.tensor([1 / 2, 1 / 4, 1 / 4], dtype=torch.float64)
Q = torch.tensor([1 / 8, 1 / 8, 3 / 4], dtype=torch.float64)
KL_PQ, KL_QP = 0.5917809035, 0.5640290238
K1 = [1.3862943611, 0.6931471806, -1.0986122887]
K3 = [0.6362943611, 0.1931471806, 0.9013877113]


def test_exact_kl_on_a_three_token_vocabulary():
    logps, ref_logps = P.log(), Q.log()
    assert float(exact_kl(logps, ref_logps)) == pytest.approx(KL_PQ, abs=1e-9)
    assert float(exact_kl(ref_logps, logps)) == pytest.approx(KL_QP, abs=1e-9)
    assert float(exact_kl(logps, logps)) == 0.0
    # (T, V) rows: per-token values, and dim=(-2, -1) sums the tokens of a response
    rows, ref_rows = torch.stack([logps, ref_logps, logps]), torch.stack([ref_logps, logps, logps])
    assert exact_kl(rows, ref_rows).tolist() == pytest.approx([KL_PQ, KL_QP, 0.0], abs=1e-9)
    assert float(exact_kl(rows, ref_rows, dim=(-2, -1))) == pytest.approx(KL_PQ + KL_QP, abs=1e-9)
    # from logits: log_softmax of shifted logits gives the same
    assert float(exact_kl((P.log() + 3).log_softmax(-1), (Q.log() - 1).log_softmax(-1))) == pytest.approx(KL_PQ)


def test_k1_and_k3_by_hand_and_unbiased():
    logps, ref_logps = P.log(), Q.log()  # each vocabulary entry as the sampled token
    assert kl_k1(logps, ref_logps).tolist() == pytest.approx(K1, abs=1e-9)
    assert kl_k3(logps, ref_logps).tolist() == pytest.approx(K3, abs=1e-9)
    assert float((P * kl_k1(logps, ref_logps)).sum()) == pytest.approx(KL_PQ, abs=1e-9)
    assert float((P * kl_k3(logps, ref_logps)).sum()) == pytest.approx(KL_PQ, abs=1e-9)
    assert kl_k1(logps, logps).abs().max() == 0 and kl_k3(logps, logps).abs().max() == 0


@pytest.mark.parametrize("scale", [1e-9, 1e-6, 1e-3, 1.0, 10.0])
def test_k3_is_never_negative(scale):
    torch.manual_seed(0)
    logps = -torch.rand(64, 32) * 5  # (B, T) float32
    ref_logps = logps + scale * torch.randn(64, 32)
    assert (kl_k3(logps, ref_logps) >= 0).all()


TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}
PROMPTS = [[{"role": "user", "content": "What is 2 plus 3?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
           [{"role": "user", "content": "Hi"}]]
RESPONSES = ["It is 5.", "Blue, I think, or maybe green.", ""]


@pytest.fixture(scope="module")
def models():
    tokenizer = build_byte_tokenizer()
    policy = build_tiny_model(ModelSpec(path="builtin:tiny", tiny=TINY), len(tokenizer), seed=0).eval()
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # differ only in the LM head (a new, untied parameter)
        head = reference.lm_head.weight
        reference.lm_head.weight = torch.nn.Parameter(0.5 * head + 0.05 * torch.randn_like(head))
    assert torch.equal(reference.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    return policy, reference, tokenizer


@torch.no_grad()
def brute_force_kl(policy, reference, tokenizer, prompt, response, finished: bool = True) -> float:
    """One unpadded forward per response token on its own prefix, KL summed in float64 by a Python loop."""
    ids = tokenize_prompt(tokenizer, prompt)
    start = len(ids)
    ids = ids + list(tokenizer(response, add_special_tokens=False)["input_ids"])
    ids += [termination_token_id(tokenizer)] if finished else []
    total = 0.0
    for t in range(start, len(ids)):
        prefix = torch.tensor([ids[:t]])
        p = policy(input_ids=prefix).logits[0, -1].double().softmax(-1).tolist()
        q = reference(input_ids=prefix).logits[0, -1].double().softmax(-1).tolist()
        total += sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q, strict=True))
    return total


def test_kl_to_reference_matches_a_brute_force_loop(models):
    policy, reference, tokenizer = models
    want = [brute_force_kl(policy, reference, tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert min(want) > 1e-3  # the heads differ enough to measure
    got = kl_to_reference(policy, reference, tokenizer, PROMPTS, RESPONSES)
    assert got == pytest.approx(sum(want) / len(want), rel=1e-4)


def test_an_answer_cut_at_the_length_limit_has_no_termination_position(models):
    policy, reference, tokenizer = models
    finished = [i % 2 == 0 for i in range(len(RESPONSES))]
    want = [brute_force_kl(policy, reference, tokenizer, p, r, f)
            for p, r, f in zip(PROMPTS, RESPONSES, finished, strict=True)]
    got = kl_to_reference(policy, reference, tokenizer, PROMPTS, RESPONSES, finished)
    assert got == pytest.approx(sum(want) / len(want), rel=1e-4)
    assert got != pytest.approx(kl_to_reference(policy, reference, tokenizer, PROMPTS, RESPONSES), rel=1e-4)


def test_response_vocab_logps_rows_are_distributions_over_the_response_tokens(models):
    policy, _, tokenizer = models
    out = response_vocab_logps(policy, tokenizer, PROMPTS, RESPONSES, batch_size=2)  # padding and 2 batches
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in RESPONSES]  # + eot
    assert [tuple(x.shape) for x in out] == [(n, len(tokenizer)) for n in lengths]
    for x in out:
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.exp().sum(-1), torch.ones(x.shape[0]))


def test_kl_of_a_model_to_itself_is_exactly_zero(models):
    policy, _, tokenizer = models
    assert kl_to_reference(policy, policy, tokenizer, PROMPTS, RESPONSES) == 0.0


@pytest.mark.parametrize(("differs_in", "shared"), [("head", 2), ("top_layer", 1), ("embeddings", 0)])
def test_kl_runs_the_shared_lower_layers_once_and_matches_brute_force(models, differs_in, shared):
    """A LoRA policy on the top layers shares the layers below with its reference: they run once for both
    (align.models.trunk); the KL is the brute-force one whichever layers differ."""
    from align.models.trunk import shared_layers

    policy, _, tokenizer = models
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        if differs_in == "head":  # a new, untied head
            head = reference.lm_head.weight
            reference.lm_head.weight = torch.nn.Parameter(head + 0.3 * torch.randn_like(head))
        else:
            part = reference.model.layers[1].mlp.up_proj.weight if differs_in == "top_layer" else \
                reference.model.embed_tokens.weight
            part.add_(0.3 * torch.randn_like(part))
    policy.requires_grad_(False)
    reference.requires_grad_(False)
    assert shared_layers(policy, reference) == shared
    want = [brute_force_kl(policy, reference, tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert min(want) > 1e-4
    got = kl_to_reference(policy, reference, tokenizer, PROMPTS, RESPONSES, batch_size=2)
    assert got == pytest.approx(sum(want) / len(want), rel=1e-4)
