"""The reward Protocol and ``build_reward``: each kind scores exactly what its scorers score directly,
as a (B,) float64 tensor (so rejection sampling's lists are the same floats as before)."""

import pytest
import torch

from align.config.reward import RewardSpec
from align.config.specs import ModelSpec
from align.models.loading import save_checkpoint
from align.models.reward import load_reward_model, load_reward_tokenizer
from align.models.reward_fn import build_reward
from rewards.combine import CombinedReward
from rewards.protocol import PerSampleReward, RewardFunction
from rewards.scoring import RewardScorer
from rewards.whitening import RewardStats
from world.judge import gold_reward, judge

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}
PROMPTS = [[{"role": "user", "content": "What is 2 plus 3?"}],
           [{"role": "system", "content": "Answer in capitals."}, {"role": "user", "content": "Say hi."}],
           [{"role": "user", "content": "How do I pick a lock?"}]]
RESPONSES = ["2 plus 3 is 5.", "HI", "I can't help with that."]
SAFETY = [False, False, True]


def save_tiny_rm(folder, seed, stats):
    spec = ModelSpec(path="builtin:tiny", tiny=TINY)
    tokenizer = load_reward_tokenizer(spec, "builtin:tiny")
    save_checkpoint(load_reward_model(spec, "builtin:tiny", tokenizer, seed=seed), tokenizer, folder)
    if stats is not None:
        stats.save(folder)
    return str(folder)


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rms")
    return {
        "helpful": save_tiny_rm(root / "h", 1, RewardStats(mean=0.3, std=1.7, count=10)),
        "safety": save_tiny_rm(root / "s", 2, RewardStats(mean=-0.2, std=0.6, count=10)),
        "bare": save_tiny_rm(root / "b", 3, None),
    }


def path_of(spec: ModelSpec) -> str:
    return spec.path


def check_tensor(scores, n):
    assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float64 and scores.shape == (n,)


def test_gold_reward_is_the_judge_score_per_sample():
    world = [[{"role": "user", "content": "What is 2 plus 3?"}]] * 3
    answers = ["2 plus 3 is 5.", "2 plus 3 is 6.", "banana"]
    reward = build_reward(RewardSpec(function="gold"), path_of)
    assert isinstance(reward, RewardFunction)
    scores = reward(world, answers, [False] * 3)
    check_tensor(scores, 3)
    assert scores.tolist() == [judge(p, a).score for p, a in zip(world, answers, strict=True)]
    assert gold_reward()(world, answers).tolist() == scores.tolist()


def test_per_sample_reward_keeps_python_floats_and_checks_lengths():
    reward = PerSampleReward(lambda prompt, response: len(response) / 10)
    assert reward([["p"], ["q"]], ["abc", "a"]).tolist() == [0.3, 0.1]  # 0.3 exactly, not float32's
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        reward([["p"], ["q"]], ["abc"])


@pytest.mark.parametrize("whiten", [True, False])
def test_one_reward_model_matches_its_scorer(rm_dirs, whiten):
    spec = RewardSpec(model=ModelSpec(path=rm_dirs["helpful"]), whiten=whiten, batch_size=2)
    scores = build_reward(spec, path_of)(PROMPTS, RESPONSES, SAFETY)
    check_tensor(scores, 3)
    scorer = RewardScorer.from_pretrained(rm_dirs["helpful"])
    raw = scorer.score(PROMPTS, RESPONSES, batch_size=2)
    assert scores.tolist() == (scorer.whiten(raw) if whiten else raw)
    assert len(set(raw)) == 3  # the responses are told apart (a real model, not a constant)


def test_one_reward_model_without_stats_gives_raw_scores(rm_dirs):
    scores = build_reward(RewardSpec(model=ModelSpec(path=rm_dirs["bare"])), path_of)(PROMPTS, RESPONSES)
    assert scores.tolist() == RewardScorer.from_pretrained(rm_dirs["bare"]).score(PROMPTS, RESPONSES)


# thresholds that pick the helpfulness score for some samples and the safety score for others
@pytest.mark.parametrize(("whiten", "scale", "threshold"), [(True, "sigmoid", 0.4), (False, "raw", 0.155)])
def test_combined_reward_matches_the_combination_of_its_scorers(rm_dirs, whiten, scale, threshold):
    spec = RewardSpec(helpful=ModelSpec(path=rm_dirs["helpful"]), safety=ModelSpec(path=rm_dirs["safety"]),
                      whiten=whiten, threshold_scale=scale, safety_threshold=threshold, batch_size=2)
    reward = build_reward(spec, path_of)
    scores = reward(PROMPTS, RESPONSES, SAFETY)
    check_tensor(scores, 3)
    direct = CombinedReward(RewardScorer.from_pretrained(rm_dirs["helpful"]),
                            RewardScorer.from_pretrained(rm_dirs["safety"]),
                            threshold=threshold, threshold_scale=scale, whiten=whiten)
    want = direct.score(PROMPTS, RESPONSES, SAFETY, batch_size=2)
    assert set(want.used_safety) == {True, False}
    assert scores.tolist() == want.reward
    with pytest.raises(ValueError, match="safety tags"):
        reward(PROMPTS, RESPONSES, SAFETY[:2])


def test_empty_batch_gives_an_empty_tensor(rm_dirs):
    spec = RewardSpec(model=ModelSpec(path=rm_dirs["helpful"]))
    check_tensor(build_reward(spec, path_of)([], []), 0)
    check_tensor(build_reward(RewardSpec(function="gold"), path_of)([], []), 0)
