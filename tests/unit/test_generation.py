"""Generation: the shared-prefill sampler is exact (greedy == generate(), per-token log-probs == a full
forward, first-token frequencies == the softmax), seeded, stops and truncates; vLLM fails clearly."""

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from align.config.sampling import SamplingParams
from align.data.chat import build_byte_tokenizer, termination_token_id
from align.generation import make_generator, prompt_ids
from align.generation.hf_backend import draw, left_pad, nucleus_mask, sampling_logps

CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus three, friend?"}],
    [{"role": "user", "content": "abc def"}],
]


def tiny_llama(vocab: int, seed: int = 0, head_scale: float = 1.0):
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)  # spread the next-token distribution
    return model


class SmallVocabTokenizer:
    """Just what a generator needs from a tokenizer, for a model with a vocabulary of ``vocab`` ids."""

    def __init__(self, vocab: int, eot: int):
        self.pad_token_id, self.unk_token_id, self.eos_token_id, self.eot = 0, None, eot, eot

    def convert_tokens_to_ids(self, token):
        return self.eot

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def chat_setup():
    tok = build_byte_tokenizer()
    model = tiny_llama(len(tok), head_scale=8.0)
    model.generation_config.eos_token_id = termination_token_id(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def full_forward_logps(model, prompt: list[int], answer: list[int]) -> float:
    """Sum of log p(answer tokens) by one plain forward over prompt + answer (no cache, no padding)."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].float(), dim=-1)
    return float(logps.gather(1, torch.tensor(answer)[:, None]).sum())


def test_greedy_matches_plain_generate_with_left_padding(chat_setup):
    model, tok = chat_setup
    params = SamplingParams(temperature=0, max_new_tokens=12, batch_size=3)
    samples = make_generator("hf", model=model, tokenizer=tok).sample(CHATS, k=2, params=params)
    ids = [prompt_ids(tok, c) for c in CHATS]
    assert len({len(i) for i in ids}) == 3  # different lengths: left padding is exercised
    input_ids, mask = left_pad(ids, tok.pad_token_id, "cpu")
    ref = model.generate(input_ids, attention_mask=mask.long(), max_new_tokens=12, do_sample=False)
    for i, per_prompt in enumerate(samples):
        expected = ref[i, input_ids.shape[1]:].tolist()
        assert len(per_prompt) == 2
        for s in per_prompt:
            assert s.token_ids == expected and s.finish_reason == "length" and s.logps_sum == 0.0
            assert s.text == tok.decode(expected, skip_special_tokens=True)


def test_greedy_stops_at_the_termination_token(chat_setup):
    model, tok = chat_setup
    gen = make_generator("hf", model=model, tokenizer=tok)
    params = SamplingParams(temperature=0, max_new_tokens=12)
    (free,) = gen.sample(CHATS[:1], k=1, params=params)[0]
    gen.eot_id = free.token_ids[4]  # pretend the 5th greedy token ends the turn
    (stopped,) = gen.sample(CHATS[:1], k=1, params=params)[0]
    cut = free.token_ids.index(gen.eot_id) + 1
    assert stopped.token_ids == free.token_ids[:cut] and stopped.finish_reason == "stop"
    assert stopped.text == tok.decode(free.token_ids[:cut - 1], skip_special_tokens=True)
    (ignored,) = gen.sample(CHATS[:1], k=1, params=params.model_copy(update={"stop_at_eot": False}))[0]
    assert ignored.token_ids == free.token_ids


def test_same_seed_same_samples_other_seed_other_samples(chat_setup):
    model, tok = chat_setup
    gen = make_generator("hf", model=model, tokenizer=tok)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=7, batch_size=2)
    first, again = gen.sample(CHATS, k=3, params=params), gen.sample(CHATS, k=3, params=params)
    other = gen.sample(CHATS, k=3, params=params.model_copy(update={"seed": 8}))
    assert first == again
    assert first != other
    assert len({tuple(s.token_ids) for s in first[1]}) > 1  # the k samples of a prompt differ
    assert all(len(s.token_ids) <= 8 for per_prompt in first for s in per_prompt)


def test_sampled_logps_equal_a_full_forward_also_after_rows_stop():
    """Temperature 1, no top-p: the sampler's per-token log-probs are the model's. Many rows stop early
    (a frequent token ends them), so stopped rows are dropped from the cache mid-decode."""
    vocab = 12
    model = tiny_llama(vocab, seed=1, head_scale=4.0)
    gen = make_generator("hf", model=model, tokenizer=SmallVocabTokenizer(vocab, eot=3))
    prompts = [[5, 6, 7, 8, 9, 10], [1, 2], [4, 4, 11, 2]]
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=0, batch_size=3)
    samples = gen.sample(prompts, k=6, params=params)
    reasons = [s.finish_reason for per_prompt in samples for s in per_prompt]
    assert "stop" in reasons and "length" in reasons
    for prompt, per_prompt in zip(prompts, samples, strict=True):
        for s in per_prompt:
            assert (s.token_ids[-1] == 3) == (s.finish_reason == "stop")
            assert 3 not in s.token_ids[:-1] and len(s.token_ids) <= 10
            assert s.logps_sum == pytest.approx(full_forward_logps(model, prompt, s.token_ids), abs=1e-4)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_first_token_frequencies_match_the_sampling_distribution(temperature, top_p):
    vocab, n = 10, 4000
    model = tiny_llama(vocab, seed=2, head_scale=10.0)
    prompt = [1, 5, 2, 7]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    expected = sampling_logps(logits[None], temperature, top_p)[0].exp()
    gen = make_generator("hf", model=model, tokenizer=SmallVocabTokenizer(vocab, eot=vocab - 1))
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=1, seed=0)
    (samples,) = gen.sample([prompt], k=n, params=params)
    counts = torch.bincount(torch.tensor([s.token_ids[0] for s in samples]), minlength=vocab).float()
    kept = expected > 0
    assert (counts[~kept] == 0).all()  # nothing drawn outside the nucleus
    chi2 = float(((counts[kept] - n * expected[kept]) ** 2 / (n * expected[kept])).sum())
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001
    uniform = torch.full((int(kept.sum()),), n / int(kept.sum()))
    assert float(((counts[kept] - uniform) ** 2 / uniform).sum()) > 100  # the test can tell distributions apart


def test_top_p_keeps_the_smallest_set_reaching_p_and_renormalises():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.allclose(sampling_logps(logits, 1.0, 0.8).exp(), torch.tensor([[0.625, 0.375, 0, 0]]))
    assert torch.allclose(sampling_logps(logits, 1.0, 0.81).exp(), torch.tensor([[0.5, 0.3, 0.15, 0]]) / 0.95)
    assert torch.allclose(sampling_logps(logits, 1.0, 0.1).exp(), torch.tensor([[1.0, 0, 0, 0]]))
    sharp = sampling_logps(logits, 0.5, 1.0).exp()  # temperature 0.5 squares the probabilities
    assert torch.allclose(sharp, torch.tensor([[0.25, 0.09, 0.0225, 0.0025]]) / 0.3650)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8), (1.3, 0.3)])
def test_draw_reports_the_logps_of_the_distribution_it_samples(temperature, top_p):
    logits = torch.randn(256, 50, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(temperature=temperature, top_p=top_p)
    tokens, logps = draw(logits, params, torch.Generator().manual_seed(0))
    expected = sampling_logps(logits, temperature, top_p).gather(1, tokens[:, None]).squeeze(1)
    assert torch.isfinite(expected).all()  # never a token outside the nucleus
    assert torch.allclose(logps, expected, atol=1e-5)


def test_system_prompt_is_added_to_chats_without_one():
    tok = build_byte_tokenizer()
    with_system = prompt_ids(tok, CHATS[0], system_prompt="Be kind.")
    assert tok.decode(with_system).count("Be kind.") == 1
    assert prompt_ids(tok, CHATS[1], system_prompt="Be kind.") == prompt_ids(tok, CHATS[1])
    with pytest.raises(ValueError, match="token ids"):
        prompt_ids(tok, [1, 2, 3], system_prompt="Be kind.")


def test_vllm_backend_without_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'align\[vllm\]'"):
        make_generator("vllm", "some/model")
    with pytest.raises(ValueError, match="unknown generation backend"):
        make_generator("tgi", "some/model")


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.95, 0.999])
def test_nucleus_mask_without_sorting_equals_the_sorted_definition(top_p):
    torch.manual_seed(0)
    # flat rows (a random model), peaked rows, rows with zero-probability tokens, a one-hot row
    logits = torch.cat([torch.randn(4, 3000) * 0.05, torch.randn(4, 3000) * 4.0,
                        torch.randn(2, 3000).masked_fill(torch.rand(2, 3000) < 0.5, float("-inf")),
                        torch.full((1, 3000), -30.0).index_fill_(1, torch.tensor([7]), 0.0)])
    logps = torch.log_softmax(logits, dim=-1)
    want = sampling_logps(logits, 1.0, top_p) > float("-inf")
    for buckets in (1024, 7, 1):  # coarse slices only move work to the exact part
        assert torch.equal(nucleus_mask(logps, top_p, buckets), want), buckets
