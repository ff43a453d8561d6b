"""TRL 1.12.0's PPO math on a given batch, run in a child process by ``test_ppo_trl_parity.py``.

    python trl_ppo_reference.py TRL_DIR INPUTS.safetensors CONFIGS.json OUTPUTS.safetensors

``TRL_DIR`` (a ``pip install --target`` of trl==1.12.0) goes first on ``sys.path``, so this process never
sees the project's own trl. TRL's helpers are imported and called as they are (``truncate_response``,
``first_true_indices``, ``masked_mean``, ``masked_whiten``, ``INVALID_LOGPROB``). The rest of the math sits
inline in ``PPOTrainer.train`` (trl/experimental/ppo/ppo_trainer.py), so the two functions below reproduce
those lines one for one, in order, with their line numbers; :func:`check_transcription` asserts that every
code line of them (but those marked ``# not TRL``) appears, in order, in the cited range of the installed
file. Tensors in and out through safetensors (no pickle); configs through JSON.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

TRL_VERSION = "1.12.0"
TRAIN_SOURCE = "trl/experimental/ppo/ppo_trainer.py"
INVALID_LOGPROB = masked_mean = masked_whiten = truncate_response = first_true_indices = None  # set by main


def trl_rollout_math(self, args, processing_class, response, logprobs, ref_logprobs, values, scores):
    """ppo_trainer.py lines 719-723 and 727 (per forward batch: here the whole batch is one), then
    757-798 (rewards, whitening, GAE) of ``PPOTrainer.train``."""
    # 719-723: Response Processing 1. truncate response after the first occurrence of `stop_token_id`
    postprocessed_response = response
    if self.stop_token_id is not None:  # handle the edge case when stop_token_id exists but is 0
        postprocessed_response = truncate_response(
            self.stop_token_id, processing_class.pad_token_id, response
        )
    # 727
    sequence_length = first_true_indices(postprocessed_response == processing_class.pad_token_id) - 1
    responses, postprocessed_responses, sequence_lengths = response, postprocessed_response, sequence_length  # not TRL: 744-749 concatenate the forward batches
    # 757-759
    contain_eos_token = torch.any(postprocessed_responses == self.processing_class.eos_token_id, dim=-1)
    if self.args.missing_eos_penalty is not None:
        scores[~contain_eos_token] -= self.args.missing_eos_penalty
    # 763-769
    response_idxs = torch.arange(responses.shape[1], device=responses.device).repeat(responses.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)
    # 773-779: 4. compute rewards
    logr = ref_logprobs - logprobs
    kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr  # Else statement is k3
    non_score_reward = -args.kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores
    # 782-784: 5. whiten rewards
    if args.whiten_rewards:
        rewards = masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
    # 787-798: 6. compute advantages and returns
    lastgaelam = 0
    advantages_reversed = []
    gen_length = responses.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + args.gamma * nextvalues - values[:, t]
        lastgaelam = delta + args.gamma * args.lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    raw_advantages = advantages  # not TRL: kept for the comparison before whitening
    advantages = masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return dict(padding_mask=padding_mask, padding_mask_p1=padding_mask_p1, logprobs=logprobs, values=values,
                scores=scores, kl=kl, rewards=rewards, raw_advantages=raw_advantages, advantages=advantages,
                returns=returns)


def trl_loss_math(args, micro_batch_inds, advantages, responses, logprobs, returns, values, padding_mask,
                  padding_mask_p1, logits, new_logprobs, vpred):
    """ppo_trainer.py lines 813-857 of ``PPOTrainer.train`` for one micro-batch: the model's outputs
    (``logits`` after the temperature, ``new_logprobs`` from them, ``vpred``) are given."""
    # 813-818
    mb_advantage = advantages[micro_batch_inds]
    mb_responses = responses[micro_batch_inds]  # noqa: F841 (TRL's line; the log-probs are given here)
    mb_logprobs = logprobs[micro_batch_inds]
    mb_return = returns[micro_batch_inds]
    mb_values = values[micro_batch_inds]
    # 824-857
    new_logprobs = torch.masked_fill(
        new_logprobs, padding_mask[micro_batch_inds], INVALID_LOGPROB
    )
    vpred = torch.masked_fill(vpred, padding_mask_p1[micro_batch_inds], 0)
    vpredclipped = torch.clamp(
        vpred,
        mb_values - args.cliprange_value,
        mb_values + args.cliprange_value,
    )
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * masked_mean(vf_loss_max, ~padding_mask_p1[micro_batch_inds])
    vf_clipfrac = masked_mean(
        (vf_losses2 > vf_losses1).float(), ~padding_mask_p1[micro_batch_inds]
    )
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = masked_mean(pg_loss_max, ~padding_mask[micro_batch_inds])
    loss = pg_loss + args.vf_coef * vf_loss
    pg_clipfrac = masked_mean(
        (pg_losses2 > pg_losses).float(), ~padding_mask[micro_batch_inds]
    )
    prob_dist = torch.nn.functional.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob_dist * logits, dim=-1)
    approxkl = 0.5 * (logprobs_diff**2).mean()
    return dict(vf_loss=vf_loss, vf_clipfrac=vf_clipfrac, pg_loss=pg_loss, loss=loss, pg_clipfrac=pg_clipfrac,
                entropy=entropy, approxkl=approxkl, ratio_mean=ratio.mean())


def code_lines(text: str) -> list[str]:
    """Stripped code lines: no blanks, comment-only lines, or lines marked ``# not TRL``."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "# not TRL" not in line:
            out.append(line.split("  # noqa")[0])
    return out


def check_transcription(fn, source: Path, first: int, last: int) -> None:
    """Every code line of ``fn``'s body occurs, in order, among lines first..last of ``source``."""
    body = inspect.getsource(fn).split('"""')[2]  # after the docstring
    body = body[: body.rindex("\n    return ")]
    theirs = code_lines("\n".join(source.read_text().splitlines()[first - 1 : last]))
    at = 0
    for line in code_lines(body):
        while at < len(theirs) and theirs[at] != line:
            at += 1
        if at == len(theirs):
            raise AssertionError(f"{fn.__name__}: {line!r} is not in {source} lines {first}-{last} (in order)")
        at += 1


def main(trl_dir: str, inputs: str, configs: str, outputs: str) -> None:
    global INVALID_LOGPROB, masked_mean, masked_whiten, truncate_response, first_true_indices
    sys.path.insert(0, trl_dir)
    import trl
    from trl.experimental.ppo import ppo_trainer
    from trl.experimental.utils import first_true_indices

    assert trl.__version__ == TRL_VERSION and Path(trl.__file__).is_relative_to(trl_dir), trl.__file__
    INVALID_LOGPROB, masked_mean, masked_whiten = (ppo_trainer.INVALID_LOGPROB, ppo_trainer.masked_mean,
                                                   ppo_trainer.masked_whiten)
    truncate_response = ppo_trainer.truncate_response
    source = Path(ppo_trainer.__file__)
    check_transcription(trl_rollout_math, source, 719, 798)
    check_transcription(trl_loss_math, source, 813, 857)

    x = load_file(inputs)
    results = {}
    for name, cfg in json.loads(Path(configs).read_text()).items():
        args = SimpleNamespace(**cfg)
        tok = SimpleNamespace(pad_token_id=cfg["pad_token_id"], eos_token_id=cfg["eos_token_id"])
        self = SimpleNamespace(args=args, processing_class=tok, stop_token_id=cfg["stop_token_id"])
        roll = trl_rollout_math(self, args, tok, x["responses"], x["logprobs"], x["ref_logprobs"], x["values"],
                                x["scores"].clone())
        inds = torch.arange(x["responses"].shape[0])  # one micro-batch: the whole batch
        losses = trl_loss_math(args, inds, roll["advantages"], x["responses"], roll["logprobs"], roll["returns"],
                               roll["values"], roll["padding_mask"], roll["padding_mask_p1"], x["logits"],
                               x["new_logprobs"], x["vpred"])
        for key, value in {**roll, **losses}.items():
            results[f"{name}/{key}"] = value.reshape(-1) if value.dim() == 0 else value.contiguous()
    save_file(results, outputs)


if __name__ == "__main__":
    main(*sys.argv[1:5])
