"""Parity of our PPO math with TRL 1.12.0's ``PPOTrainer`` (the last release with ``trl.experimental.ppo``).

TRL 1.12.0 is installed with ``pip install --no-deps --target`` into a cache folder (``$ALIGN_TEST_CACHE``
or ``~/.cache/align-tests``, then ``trl-1.12.0``: ``bench.common.pip_target``, shared with ``bench/ppo.py``)
and run in a child process with that folder first on ``sys.path`` (``trl_ppo_reference.py``), so it never
clashes with the project's trl; tensors go through safetensors. One batch of 4 responses of 6 tokens
(pad 0, EOS 1): EOS in the middle with junk generated after it, EOS in the last slot, no EOS (truncated),
and EOS alone.

How TRL's tensors map onto ours (ours sit after a 3-token prompt, (B, 3 + 6), to show the layout does not
matter; TRL's are the response part only):

- TRL's ``~padding_mask`` (tokens up to the EOS included) is our ``response_mask``.
- TRL's ``~padding_mask_p1`` adds ONE token after the EOS (when there is room). TRL puts the score there
  (``actual_end = sequence_lengths + 1``), keeps the value there, runs GAE over it and trains the value on
  it; ours puts the score on the EOS itself. Called with ``mask_p1`` for the rewards, GAE and value loss,
  and with ``response_mask`` for advantage whitening and the policy loss, our functions give TRL's
  numbers exactly; ``test_score_placement_differs_only_after_an_early_eos`` shows the difference.
- Off the response TRL fills log-probs with ``INVALID_LOGPROB = 1`` for both policies (KL 0 there); ours
  are 0 (KL 0 there too).
- Our losses return sums; TRL's ``masked_mean``s are our sums divided by the mask's token count (policy:
  ``response_mask``, value: ``mask_p1``). TRL's ``approxkl`` and ``ratio`` metrics are plain means over
  all B x T positions (padding has log-ratio 0, ratio 1): ``approx_kl / (B T)``, ``(ratio + #pad) / (B T)``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from align.losses.ppo import entropy_from_logits, policy_loss, value_loss
from align.rl.advantages import gae, kl_penalized_rewards, masked_whiten

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: bench/ is not an installed package
from bench.common import pip_target  # noqa: E402  (shared with bench/ppo.py)

TRL_VERSION = "1.12.0"
CHILD = Path(__file__).with_name("trl_ppo_reference.py")
PAD, EOS, PROMPT, ATOL = 0, 1, 3, 1e-5
# raw generations: row 0 keeps generating after its EOS (TRL truncates), row 1 ends on the last slot,
# row 2 never ends (truncated by the length limit), row 3 is the EOS alone
RESPONSES = torch.tensor([[5, 7, EOS, 6, 8, 2], [4, 4, 6, 2, 3, EOS], [3, 8, 9, 2, 5, 7], [EOS, 4, 4, 4, 4, 4]])
EOS_AT = [2, 5, None, 0]
CONFIGS = {  # TRL's defaults, then everything else switched
    "defaults": dict(kl_coef=0.05, kl_estimator="k1", whiten_rewards=False, gamma=1.0, lam=0.95,
                     cliprange=0.2, cliprange_value=0.2, missing_eos_penalty=None),
    "k3_whitened": dict(kl_coef=0.3, kl_estimator="k3", whiten_rewards=True, gamma=0.9, lam=0.8,
                        cliprange=0.1, cliprange_value=0.1, missing_eos_penalty=1.0),
}
COMMON = dict(pad_token_id=PAD, eos_token_id=EOS, stop_token_id=EOS, vf_coef=0.1)


def trl_folder() -> Path:
    """trl==1.12.0 installed (no deps) in the cache; skip if pip cannot get it."""
    try:
        return pip_target("trl", TRL_VERSION, "trl/experimental/ppo/ppo_trainer.py")
    except RuntimeError as err:
        pytest.skip(str(err))


def make_batch() -> dict[str, torch.Tensor]:
    """TRL-shaped (B, 6) inputs; new log-probs and values moved far enough that both clips engage."""
    g = torch.Generator().manual_seed(0)
    b, t, vocab = RESPONSES.shape[0], RESPONSES.shape[1], 11
    logits = 2 * torch.randn(b, t, vocab, generator=g)
    logprobs = torch.log_softmax(logits, -1).gather(-1, RESPONSES[..., None]).squeeze(-1)
    return {
        "responses": RESPONSES,
        "logprobs": logprobs,
        "ref_logprobs": logprobs + 0.5 * torch.randn(b, t, generator=g),
        "values": torch.randn(b, t, generator=g),
        "scores": 2 * torch.randn(b, generator=g),
        "logits": logits,
        "new_logprobs": logprobs + 0.3 * torch.randn(b, t, generator=g),
        "vpred": torch.randn(b, t, generator=g),
    }


def run_trl(batch, tmp_path) -> dict[str, torch.Tensor]:
    trl_dir = trl_folder()
    save_file(batch, tmp_path / "in.safetensors")
    (tmp_path / "configs.json").write_text(json.dumps({k: {**v, **COMMON} for k, v in CONFIGS.items()}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONPATH": ""}
    cmd = [sys.executable, str(CHILD), str(trl_dir), str(tmp_path / "in.safetensors"),
           str(tmp_path / "configs.json"), str(tmp_path / "out.safetensors")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(tmp_path / "out.safetensors")


@pytest.fixture(scope="module")
def trl_out(tmp_path_factory):
    return run_trl(make_batch(), tmp_path_factory.mktemp("trl_ppo"))


def response_mask() -> torch.Tensor:
    """(B, 6) True up to and including the first EOS, or everywhere when there is none."""
    after_eos = (RESPONSES == EOS).long().cumsum(1) - (RESPONSES == EOS).long()  # EOSs strictly before
    return after_eos == 0


def with_prompt(x: torch.Tensor, fill=0) -> torch.Tensor:
    """(B, 6) -> (B, 3 + 6): our layout, prompt positions first."""
    return torch.cat([torch.full((x.shape[0], PROMPT), fill, dtype=x.dtype), x], 1)


def ours(cfg: dict, batch: dict, placement: str) -> dict[str, torch.Tensor]:
    """Our pipeline on the batch, in our (B, 3 + 6) layout; ``placement`` "trl" uses TRL's mask_p1 for
    rewards, GAE and the value loss, "ours" the response mask everywhere."""
    mask = with_prompt(response_mask(), False)  # (B, 9)
    mask_p1 = mask.clone()
    mask_p1[:, 1:] |= mask[:, :-1]  # + the token after the last response token, if any
    score_mask = mask_p1 if placement == "trl" else mask
    logps = torch.where(mask, with_prompt(batch["logprobs"]), 0)  # 0 off the response: our convention
    ref_logps = torch.where(mask, with_prompt(batch["ref_logprobs"]), 0)
    values = torch.where(score_mask, with_prompt(batch["values"]), 0)
    scores = batch["scores"].clone()
    if cfg["missing_eos_penalty"] is not None:  # TRL's option, the caller's job here
        scores[[e is None for e in EOS_AT]] -= cfg["missing_eos_penalty"]
    rewards, kl = kl_penalized_rewards(scores, logps, ref_logps, score_mask, cfg["kl_coef"], cfg["kl_estimator"])
    if cfg["whiten_rewards"]:
        rewards = masked_whiten(rewards, score_mask, shift_mean=False)
    raw_advantages, returns = gae(rewards, values, score_mask, cfg["gamma"], cfg["lam"])
    advantages = masked_whiten(raw_advantages, mask)
    new_logps = with_prompt(batch["new_logprobs"], float("nan"))  # junk off the response is never read
    pg_sum, pg_metrics = policy_loss(new_logps, logps, advantages, mask, cfg["cliprange"])
    vf_sum, vf_metrics = value_loss(with_prompt(batch["vpred"]), values, returns, score_mask,
                                    cfg["cliprange_value"])
    n_pg, n_vf, n_all = mask.sum(), score_mask.sum(), batch["responses"].numel()
    cut = slice(PROMPT, None)  # back to TRL's (B, 6)
    assert not (rewards[:, :PROMPT].any() or raw_advantages[:, :PROMPT].any() or returns[:, :PROMPT].any())
    return {
        "kl": kl[:, cut], "rewards": rewards[:, cut], "raw_advantages": raw_advantages[:, cut],
        "advantages": advantages[:, cut], "returns": returns[:, cut], "scores": scores,
        "pg_loss": pg_sum / n_pg, "vf_loss": vf_sum / n_vf,
        "pg_clipfrac": pg_metrics["clipfrac"] / n_pg, "vf_clipfrac": vf_metrics["vf_clipfrac"] / n_vf,
        "approxkl": pg_metrics["approx_kl"] / n_all,
        "ratio_mean": (pg_metrics["ratio"] + (n_all - n_pg)) / n_all,
        "padding_mask": ~mask[:, cut], "padding_mask_p1": ~mask_p1[:, cut],
    }


def close(actual, expected):
    torch.testing.assert_close(actual.reshape(expected.shape).to(expected.dtype), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_masks_rewards_gae_and_losses_as_trl(trl_out, name):
    cfg, trl = CONFIGS[name], {k.split("/", 1)[1]: v for k, v in trl_out.items() if k.startswith(name + "/")}
    mine = ours(cfg, make_batch(), placement="trl")
    assert torch.equal(mine["padding_mask"], trl["padding_mask"])  # TRL's truncation == our response mask
    assert torch.equal(mine["padding_mask_p1"], trl["padding_mask_p1"])
    for key in ("scores", "kl", "rewards", "raw_advantages", "returns", "advantages", "pg_loss", "vf_loss",
                "pg_clipfrac", "vf_clipfrac", "approxkl", "ratio_mean"):
        close(mine[key], trl[key])
    # the batch really exercises the clips and the EOS cases
    assert 0 < float(trl["pg_clipfrac"]) < 1 and 0 < float(trl["vf_clipfrac"]) < 1
    total = mine["pg_loss"] + COMMON["vf_coef"] * mine["vf_loss"]
    close(total, trl["loss"])


def test_entropy_matches_trl(trl_out):
    close(entropy_from_logits(make_batch()["logits"]), trl_out["defaults/entropy"])


def test_score_placement_differs_only_after_an_early_eos(trl_out):
    """Ours: score on the EOS (the last response token). TRL: one token after the EOS when there is room
    (rows 0 and 3), on the last token otherwise (row 1: EOS in the last slot; row 2: no EOS)."""
    trl = {k.split("/", 1)[1]: v for k, v in trl_out.items() if k.startswith("defaults/")}
    mine = ours(CONFIGS["defaults"], make_batch(), placement="ours")
    scores = trl["scores"]
    same_rows, moved_rows = [1, 2], [0, 3]
    for key in ("rewards", "raw_advantages", "returns"):  # per-row quantities (whitening mixes rows)
        close(mine[key][same_rows], trl[key][same_rows])
    for row in moved_rows:
        eos = EOS_AT[row]
        shift = torch.zeros(RESPONSES.shape[1])
        shift[eos], shift[eos + 1] = scores[row], -scores[row]
        close(mine["rewards"][row] - trl["rewards"][row], shift)
