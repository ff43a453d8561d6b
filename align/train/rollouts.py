"""PPO's batch source: loop step ``i`` is iteration ``i``: roll out, then ``ppo_epochs`` passes of minibatches.

Each iteration: 1. sample one response per prompt of this process's share of the rollout batch with the
current policy; 2. score them with the reward, optionally penalising responses without the termination
token; 3. recompute, without gradients, the policy's log-probs (logits divided by the sampling
temperature), the reference's and the value model's per-token values on the same tokens, so the
generation backend's numerics never enter the ratio; 4. per-token rewards = -beta * KL estimate, plus the
score at the last response token; GAE; whitened advantages (over every process); 5. ``ppo_epochs`` seeded
shuffles, each cut into this process's optimizer steps of ``grad_accum`` micro-batches. The prompts and
the sampling seed of iteration i are functions of i, so a resumed run repeats what an uninterrupted one
does; the KL controller is this source's resume state.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass

import torch

from align.data.chat import termination_token_id
from align.losses.kl import kl_k3
from align.models.inference import causal_only, no_grad_map
from align.models.logps import decoder_and_head
from align.models.policy_value import response_logps
from align.models.reward_fn import score_and_count
from align.models.trunk import hidden_from, trunk_states
from align.rl.advantages import advantages_of, masked_mean
from align.rl.kl_control import AdaptiveKLController, FixedKLController
from align.rl.rollout import Rollout
from align.train.collective import global_sum, sum_over_processes
from align.train.sharded import gathered_for_generation


def kl_controller(stage):
    """The KL coefficient's controller: adaptive (Ziegler et al.) when ``adaptive_kl`` is set, else fixed."""
    if stage.adaptive_kl is None:
        return FixedKLController(stage.kl_coef)
    return AdaptiveKLController(stage.kl_coef, stage.adaptive_kl.target, stage.adaptive_kl.horizon)


def eos_penalized(scores: torch.Tensor, no_eos: torch.Tensor, penalty: float | None, mode: str) -> torch.Tensor:
    """(B,) scores with the penalty for responses that ended without the termination token (``no_eos``
    (B,) bool): added to the score (``add``) or in place of it (``replace``); unchanged when None."""
    if penalty is None:
        return scores
    value = torch.full_like(scores, penalty)
    return torch.where(no_eos, scores + value if mode == "add" else value, scores)


@dataclass(frozen=True)
class _Iteration:
    """What an iteration's rollout leaves for its logged row."""

    started: float
    rollout_seconds: float
    prompts: list
    texts: list[str]
    rollout: Rollout
    kl: torch.Tensor  # (B, T) the estimator in the reward
    raw_scores: torch.Tensor  # (B,) before the missing-EOS penalty
    no_eos: torch.Tensor  # (B,) bool
    untagged: int  # prompts the Helpfulness + Safety combination scored without a tag
    by_safety: int  # of them, scored by the safety model


class RolloutSource:
    """The batch source of :func:`align.train.loop.train` for PPO (see the module docstring)."""

    def __init__(self, stage, ctx, accelerator, prompts, tokenizer, reference, reward, sampler, evaluators=()):
        self.stage, self.ctx, self.accelerator = stage, ctx, accelerator
        self.prompts, self.tokenizer, self.reference, self.reward = prompts, tokenizer, reference, reward
        self.sampler, self.evaluators = sampler, list(evaluators)
        self.key = hashlib.sha256(stage.model_dump_json().encode()).hexdigest()[:16]
        self.steps = stage.iterations
        self.minibatch = stage.train.batch_size * stage.train.grad_accum  # rows of one optimizer step, per process
        per_iteration = stage.ppo_epochs * stage.rollout_batch_size // (self.minibatch * accelerator.num_processes)
        self.optimizer_steps = stage.iterations * per_iteration
        self.kl_ctl = kl_controller(stage)
        self.eot = termination_token_id(tokenizer)
        self.current: _Iteration | None = None

    def batches(self, it: int, model):
        self.current = self._roll_out(it, model)
        rollout, bs, accum = self.current.rollout, self.stage.train.batch_size, self.stage.train.grad_accum
        for epoch in range(self.stage.ppo_epochs):
            seed = self.ctx.seed * 1_000_003 + it * 1009 + epoch
            micro = [m.trimmed() for m in rollout.minibatches(bs, torch.Generator().manual_seed(seed))]
            for start in range(0, len(micro), accum):
                yield micro[start : start + accum]

    def _roll_out(self, it: int, model) -> _Iteration:
        from align.train import rollouts  # the module's _generate, looked up at call time (tests replace it)

        t0, acc, stage = time.perf_counter(), self.accelerator, self.stage
        prompts = iteration_prompts(self.prompts, stage.rollout_batch_size, it, self.ctx.seed)
        prompts = prompts[acc.process_index :: acc.num_processes]
        with gathered_for_generation(acc, model):
            samples = rollouts._generate(self.sampler, acc.unwrap_model(model).policy, prompts, stage, it, self.ctx)
        texts = [s.text for s in samples]
        scores, untagged, by_safety = score_and_count(self.reward, [p.prompt for p in prompts], texts,
                                                      [p.is_safety for p in prompts])
        raw = scores.to(device=acc.device, dtype=torch.float32)
        no_eos = torch.tensor([s.finish_reason != "stop" for s in samples], device=acc.device)
        scores = eos_penalized(raw, no_eos, stage.missing_eos_penalty, stage.missing_eos_mode)
        rollout, kl = build_rollout(model, self.reference, samples, scores, self.kl_ctl.value, stage, acc,
                                    self._pad_id())
        return _Iteration(t0, time.perf_counter() - t0, prompts, texts, rollout, kl, raw, no_eos, untagged, by_safety)

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot

    def summarize(self, it: int, step_metrics: list[dict]) -> dict[str, float]:
        cur, acc = self.current, self.accelerator
        kl_per_seq = global_sum(acc, float(cur.kl.sum())) / max(global_sum(acc, len(cur.texts)), 1)
        self.kl_ctl.update(kl_per_seq, self.stage.rollout_batch_size)
        metrics = iteration_metrics(step_metrics, cur, kl_per_seq, self.kl_ctl.value, acc)
        if self.evaluators:
            from align.evaluators import evaluate_all

            metrics.update(evaluate_all(self.evaluators, [p.prompt for p in cur.prompts], cur.texts))
        untagged = global_sum(acc, cur.untagged)
        if untagged:  # the Helpfulness + Safety combination scored a helpfulness prompt with the safety model
            metrics["safety_scored_share"] = global_sum(acc, cur.by_safety) / untagged
        metrics["seconds"] = time.perf_counter() - cur.started
        metrics["rollout_seconds"] = cur.rollout_seconds
        return metrics

    def postfix(self, metrics: dict) -> dict[str, str]:
        return {"reward": f"{metrics['score']:.3f}", "kl": f"{metrics['kl']:.3f}"}

    def state_dict(self) -> dict:
        return {"kl_controller": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_controller"])


def iteration_prompts(prompts, n: int, iteration: int, seed: int):
    """The prompts of an iteration: consecutive slices of seeded shuffles of the pool (a new shuffle each
    pass), a function of the iteration alone so a resumed run sees the same prompts."""
    per_pass = len(prompts) // n
    pass_, slot = divmod(iteration, per_pass)
    order = list(range(len(prompts)))
    random.Random(seed * 7919 + pass_).shuffle(order)
    return [prompts[i] for i in order[slot * n : (slot + 1) * n]]


def _generate(sampler, policy, batch_prompts, stage, iteration: int, ctx):
    params = stage.sampling.model_copy(update={"seed": stage.sampling.seed + 7919 * iteration + 104729 * ctx.round})
    return [ss[0] for ss in sampler.sample(policy, [p.prompt for p in batch_prompts], 1, params)]


def _layout(samples, pad: int):
    """(B, T) prompt | response | pad rows of the samples (their own prompt ids): ids, attention and
    response masks, and each row's length."""
    rows = [list(s.prompt_ids) + list(s.token_ids) for s in samples]
    width = max(len(r) for r in rows)
    sequences = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, s) in enumerate(zip(rows, samples, strict=True)):
        sequences[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = True
        response_mask[i, len(s.prompt_ids) : len(r)] = True
    return sequences, attention_mask, response_mask, [len(r) for r in rows]


@torch.no_grad()
def build_rollout(model, reference, samples, scores, kl_coef: float, stage, accelerator, pad: int):
    """The models' no-grad log-probs and values on the sampled rows, KL-penalised rewards, GAE ->
    (the frozen Rollout, kl (B, T))."""
    device, temperature = accelerator.device, stage.sampling.temperature
    sequences, attention_mask, response_mask, lengths = _layout(samples, pad)
    sequences, attention_mask, response_mask = sequences.to(device), attention_mask.to(device), response_mask.to(device)
    width, bs = sequences.size(1), stage.train.batch_size
    # groups of batch_size rows, each cut after its longest row (right padding: nothing before changes)
    groups = [(slice(i, i + bs), max(lengths[i : i + bs])) for i in range(0, len(lengths), bs)]

    def padded(x):  # (b, w) -> (b, T) with zeros after w
        return torch.nn.functional.pad(x, (0, width - x.size(1)))

    k = accelerator.unwrap_model(model).trunk_layers  # lower layers all three models share frozen

    def trunk(group):  # run once, for the three models and every training step
        sl, w = group
        return trunk_states(reference, k, input_ids=sequences[sl, :w],
                            attention_mask=causal_only(attention_mask[sl, :w]))

    def policy_and_values(m, group):
        (sl, w), trunk = group
        logits, values = m(sequences[sl, :w], attention_mask[sl, :w], response_mask[sl, :w], trunk=trunk)
        return padded(response_logps(logits, sequences[sl, :w], response_mask[sl, :w], temperature)), padded(values)

    def reference_logps(m, group):
        (sl, w), trunk = group
        ids, mask = sequences[sl, :w], response_mask[sl, :w]
        rows, cols = mask.nonzero(as_tuple=True)
        decoder, head = decoder_and_head(m)
        hidden = hidden_from(decoder, rows * w + cols - 1, trunk, k, input_ids=ids,
                             attention_mask=causal_only(attention_mask[sl, :w]))
        return padded(response_logps(head(hidden).float(), ids, mask, temperature))

    with accelerator.autocast():
        with_trunk = [(g, trunk(g) if k else None) for g in groups]
        pv = [out for _, out in no_grad_map(model, with_trunk, lambda g: g, policy_and_values)]
        ref = [out for _, out in no_grad_map(reference, with_trunk, lambda g: g, reference_logps)]
    logps = torch.cat([lp for lp, _ in pv]) * response_mask
    values = torch.cat([v for _, v in pv]) * response_mask
    ref_logps = torch.cat(ref) * response_mask
    rewards, kl, advantages, returns = advantages_of(
        scores, logps, ref_logps, values, response_mask, kl_coef=kl_coef, kl_estimator=stage.kl_estimator,
        gamma=stage.gamma, lam=stage.lam, whiten=stage.whiten_advantages, process_sum=sum_over_processes(accelerator))
    trunk = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, width - t.size(1))) for _, t in with_trunk]) if k else None
    return Rollout(sequences, attention_mask, response_mask, logps, ref_logps, values, scores, rewards, advantages,
                   returns, trunk), kl


def iteration_metrics(step_metrics, cur: _Iteration, kl_per_seq: float, kl_coef: float, acc) -> dict[str, float]:
    """The logged row of an iteration: the means of its optimizer steps' metrics (tokens: their sum), the
    rollout's score, KL, length, missing-EOS rate and the value model's explained variance."""
    rollout, mask = cur.rollout, cur.rollout.response_mask
    out = {k: sum(m[k] for m in step_metrics) / len(step_metrics) for k in step_metrics[0] if k != "lr"}
    out["tokens"] = sum(m["tokens"] for m in step_metrics)
    out["lr"] = step_metrics[-1]["lr"]
    out["optimizer_steps"] = len(step_metrics)
    n = max(global_sum(acc, len(cur.texts)), 1)
    out["score"] = global_sum(acc, float(rollout.scores.sum())) / n
    out["score_raw"] = global_sum(acc, float(cur.raw_scores.sum())) / n
    out["kl"] = kl_per_seq  # the estimator in the reward, summed per sequence (k1 can be < 0 on a sample)
    out["kl_k3"] = global_sum(acc, float((kl_k3(rollout.logps, rollout.ref_logps) * mask).sum())) / n
    out["kl_coef"] = kl_coef
    out["no_eos_rate"] = global_sum(acc, float(cur.no_eos.sum())) / n
    out["response_length"] = global_sum(acc, float(mask.sum())) / n
    var_returns = float(masked_mean((rollout.returns - masked_mean(rollout.returns, mask)) ** 2, mask))
    residual = float(masked_mean((rollout.returns - rollout.values) ** 2, mask))
    out["explained_variance"] = 1.0 - residual / var_returns if var_returns > 0 else 0.0
    return out
