"""PPO stage, Llama 2 style (sec. 3.2.3): the baseline DPO is compared against.

Each iteration: 1. sample one response per prompt of a rollout batch with the current policy (the
project's Generator); 2. score them with the reward (one RM, the Helpfulness/Safety combination, or a
function), optionally penalising responses without the termination token; 3. recompute, without
gradients, the policy's log-probs (logits divided by the sampling temperature), the reference's and the
value model's per-token values on the same tokens, so the generation backend's numerics never enter the
ratio; 4. per-token rewards = -beta * KL estimate, plus the score at the last response token; GAE;
whitened advantages; 5. ``ppo_epochs`` passes over shuffled minibatches, each an ``optimizer_step`` of the
clipped policy loss + ``vf_coef`` * clipped value loss, summed over response tokens (the loop divides by
the step's global token count). Policy and value model are one module (one optimizer), so DDP/FSDP see a
single ``forward``. Checkpoints at iteration boundaries (``train.save_every`` counts iterations); the
rollout seed of iteration i is a function of i, so a resumed run repeats exactly what an uninterrupted one
does.

Several processes: each rolls out its share of the rollout batch; advantages are whitened over all of them
(the statistics are summed across processes), so two processes train like one with twice the
accumulation (tested). Every process loads the reward models.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from align.config.base import PROMPT_SOURCES, Artifact
from align.config.ppo import PPOStage
from align.data.chat import termination_token_id
from align.data.sources import load_prompts
from align.generation import make_generator
from align.generation.training_policy import TrainingPolicySampler
from align.losses.kl import kl_k3
from align.losses.ppo import entropy_from_logits, policy_loss, value_loss
from align.models.inference import causal_only, no_grad_map
from align.models.last_layer import hidden_at
from align.models.loading import count_parameters, load_causal_lm, save_checkpoint
from align.models.logps import decoder_and_head
from align.models.policy_value import PolicyAndValue, response_logps
from align.models.reward import backbone_and_head, load_reward_model, load_reward_tokenizer
from align.models.reward_fn import build_reward, score_and_count
from align.rl.advantages import gae, kl_penalized_rewards, masked_mean, masked_whiten
from align.rl.kl_control import AdaptiveKLController, FixedKLController
from align.rl.rollout import Rollout
from align.runtime import StageContext, StageInputError, StageResult
from align.train.collective import sum_over_processes
from align.train.common import load_policy, make_accelerator
from align.train.loop import Checkpoints, global_sum, optimizer_step, progress_bar
from align.train.metrics import MetricsLogger
from align.train.optim import build_optimizer, build_scheduler
from align.train.sharded import full_state_dict, gathered_for_generation
from align.train.snapshots import snapshot_saver
from eval.world_eval import is_world_prompts


def make_loss_fn(stage: PPOStage):
    temperature = stage.sampling.temperature

    def loss_fn(model, batch: Rollout):
        mask = batch.response_mask
        logits, values = model(batch.sequences, batch.attention_mask, mask)  # logits (N, V) on the mask
        logps = response_logps(logits, batch.sequences, mask, temperature)
        pg, pg_stats = policy_loss(logps, batch.logps, batch.advantages, mask, stage.cliprange)
        vf, vf_stats = value_loss(values, batch.values, batch.returns, mask, stage.cliprange_value)
        with torch.no_grad():
            entropy = entropy_from_logits(logits / max(temperature, 1e-6)).sum()
        stats = {"pg_loss": pg.detach(), "vf_loss": vf.detach(), "entropy": entropy, **pg_stats, **vf_stats}
        return pg + stage.vf_coef * vf, stats

    return loss_fn


def kl_controller(stage: PPOStage):
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


def response_tokens(batch: Rollout) -> float:
    return float(batch.response_mask.sum())


def run(stage: PPOStage, ctx: StageContext) -> StageResult:
    """1. accelerator and seed  2. policy, reference, value model, reward  3. prompts  4. optimizer and
    resume  5. iterate: rollout, score, advantages, PPO epochs, log, checkpoint  6. save the HF checkpoints."""
    cfg = stage.train
    # step 1
    accelerator = make_accelerator(cfg, ctx.seed)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    # step 2
    lm, tokenizer = load_policy(stage.model, ctx.model_path(stage.model, (Artifact.POLICY,)), ctx.seed)
    ref_spec = (stage.reference or stage.model).model_copy(update={"lora": None, "gradient_checkpointing": False})
    reference = load_causal_lm(ref_spec, ctx.model_path(stage.reference or stage.model, (Artifact.POLICY,)),
                               tokenizer, seed=ctx.seed).to(device).eval().requires_grad_(False)
    value_spec, value_path = _value_source(stage, ctx)
    value_model = load_reward_model(value_spec, value_path, load_reward_tokenizer(value_spec, value_path),
                                    seed=ctx.seed)
    if value_model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        value_model.resize_token_embeddings(len(tokenizer))
    _whiten_value_head(value_model, value_path, stage)
    reward = build_reward(stage.reward, ctx.model_path)
    eot = termination_token_id(tokenizer)
    # step 3
    prompts = load_prompts(stage.prompts, ctx.data_paths(stage.prompts, PROMPT_SOURCES), ctx.seed)
    if len(prompts) < stage.rollout_batch_size:
        raise StageInputError(f"stage '{stage.name}': {len(prompts)} prompts, fewer than rollout_batch_size "
                         f"({stage.rollout_batch_size})")
    world_prompts = stage.report_gold and is_world_prompts(prompts)
    # step 4
    model = PolicyAndValue(lm, value_model)
    mb_per_process = cfg.batch_size * cfg.grad_accum
    steps_per_iteration = stage.ppo_epochs * stage.rollout_batch_size // (mb_per_process * world)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, stage.iterations * steps_per_iteration)
    model, optimizer = accelerator.prepare(model, optimizer)
    kl_ctl = kl_controller(stage)
    key = hashlib.sha256(stage.model_dump_json().encode()).hexdigest()[:16]
    checkpoints = Checkpoints(accelerator, Path(ctx.out_dir) / "checkpoints", key, cfg.keep_checkpoints,
                              stateful={"scheduler": scheduler})
    logger = MetricsLogger(ctx.out_dir, cfg.report_to, accelerator.is_main_process, stage.name)
    state = checkpoints.resume(stage.name) or {}
    start, first = state.get("step", 0), state.get("first")
    if start:
        kl_ctl.load_state_dict(state["kl_controller"])
        logger.truncate_after(start)
        accelerator.print(f"[{stage.name}] resuming from iteration {start}/{stage.iterations}")
    total, trainable = count_parameters(model)
    accelerator.print(f"[{stage.name}] {len(prompts)} prompts, {stage.iterations} iterations of "
                      f"{stage.rollout_batch_size} rollouts x {stage.ppo_epochs} epochs, "
                      f"{total / 1e6:.2f}M parameters (policy + value)")
    loss_fn = make_loss_fn(stage)
    snapshot = snapshot_saver(accelerator, cfg.snapshot_every, stage.iterations, ctx.out_dir,
                              lambda: accelerator.unwrap_model(model).policy, tokenizer)
    sampler = TrainingPolicySampler(stage.backend, stage.model, ctx.model_path(stage.model, (Artifact.POLICY,)),
                                    tokenizer, make=make_generator,
                                    **({"gpu_memory_utilization": stage.vllm_gpu_memory} if stage.backend == "vllm" else {}))
    bar = progress_bar(accelerator, stage.iterations, start, stage.name)
    last = None
    # step 5
    for it in range(start, stage.iterations):
        t0 = time.perf_counter()
        batch_prompts = _iteration_prompts(prompts, stage.rollout_batch_size, it, ctx.seed)[rank::world]
        with gathered_for_generation(accelerator, model):
            samples = _generate(sampler, accelerator.unwrap_model(model).policy, batch_prompts, stage, it, ctx)
        texts = [s.text for s in samples]
        scores, untagged, by_safety = score_and_count(reward, [p.prompt for p in batch_prompts], texts,
                                                      [p.is_safety for p in batch_prompts])
        scores = scores.to(device=device, dtype=torch.float32)
        no_eos = torch.tensor([s.finish_reason != "stop" for s in samples], device=device)
        raw_scores = scores
        scores = eos_penalized(scores, no_eos, stage.missing_eos_penalty, stage.missing_eos_mode)
        rollout, kl = _rollout(model, reference, tokenizer, batch_prompts, samples, scores, eot, kl_ctl.value,
                               stage, accelerator)
        gen_seconds = time.perf_counter() - t0
        step_metrics = []
        for epoch in range(stage.ppo_epochs):
            order = torch.randperm(len(batch_prompts), generator=torch.Generator().manual_seed(
                ctx.seed * 1_000_003 + it * 1009 + epoch)).to(device)
            for start_mb in range(0, len(order), mb_per_process):
                rows = order[start_mb : start_mb + mb_per_process]
                micro = [rollout.select(rows[j : j + cfg.batch_size]).trimmed()
                         for j in range(0, len(rows), cfg.batch_size)]
                step_metrics.append(optimizer_step(accelerator, model, optimizer, scheduler, micro, loss_fn,
                                                   response_tokens, cfg.optim.max_grad_norm))
        kl_per_seq = global_sum(accelerator, float(kl.sum())) / max(global_sum(accelerator, len(samples)), 1)
        kl_ctl.update(kl_per_seq, stage.rollout_batch_size)
        metrics = _iteration_metrics(step_metrics, rollout, raw_scores, scores, no_eos, kl_per_seq, kl_ctl.value,
                                     samples, accelerator)
        if world_prompts:
            metrics.update(_gold(batch_prompts, texts))
        untagged_all = global_sum(accelerator, untagged)
        if untagged_all:  # the Helpfulness + Safety combination scored a helpfulness prompt with the safety model
            metrics["safety_scored_share"] = global_sum(accelerator, by_safety) / untagged_all
        metrics["seconds"] = time.perf_counter() - t0
        metrics["rollout_seconds"] = gen_seconds
        first = metrics if first is None else first
        last = metrics
        done = it + 1
        logger.log(done, metrics)
        bar.set_postfix(reward=f"{metrics['score']:.3f}", kl=f"{kl_per_seq:.3f}", refresh=False)
        bar.update(1)
        if snapshot is not None:  # before the checkpoint, so a run resumed from it has the snapshot
            snapshot(done)
        if cfg.save_every and done % cfg.save_every == 0 and done < stage.iterations:
            checkpoints.save(done, {"kl_controller": kl_ctl.state_dict(), "first": first})
    bar.close()
    sampler.close()
    logger.close()
    # step 6
    accelerator.wait_for_everyone()
    value_state = full_state_dict(accelerator, model, "value_model")  # every process (sharded: the gather)
    policy_state = full_state_dict(accelerator, model, "policy")
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_checkpoint(unwrapped.value_model, load_reward_tokenizer(value_spec, value_path),
                        Path(ctx.out_dir) / "value_model", value_state)
        save_checkpoint(unwrapped.policy, tokenizer, ctx.output(Artifact.POLICY), policy_state)
    accelerator.wait_for_everyone()
    out = {"iterations": stage.iterations, "parameters_trainable": trainable, "kl_coef_final": kl_ctl.value}
    for name, values in (("first", first), ("last", last)):
        if values:
            out.update({f"{k}_{name}": v for k, v in values.items() if k in _HEADLINE})
    return StageResult(metrics=out)


_HEADLINE = ("score", "kl", "kl_k3", "gold_helpfulness", "safety_violation_rate", "no_eos_rate", "response_length",
             "pg_loss", "vf_loss", "explained_variance", "safety_scored_share")


def _value_source(stage: PPOStage, ctx: StageContext):
    spec = stage.value_model
    if spec is None:
        spec = stage.reward.model or stage.reward.helpful or stage.model
    return spec.model_copy(update={"gradient_checkpointing": stage.model.gradient_checkpointing}), ctx.model_path(spec)


def _whiten_value_head(value_model, path: str, stage: PPOStage) -> None:
    """A value model that starts from a reward model predicts the RM's raw score; the reward PPO sees is
    whitened, (r - mean) / std. Scale the head (and shift its bias, if it has one) so the value starts on
    the reward's scale: without this, value errors of several reward standard deviations swamp GAE."""
    from rewards.whitening import RewardStats

    stats = RewardStats.load(path) if Path(path).is_dir() else None
    if stats is None or not stage.reward.whiten or stage.reward.function is not None:
        return
    _, head = backbone_and_head(value_model)
    with torch.no_grad():
        head.weight.div_(stats.std)
        if getattr(head, "bias", None) is not None:
            head.bias.sub_(stats.mean).div_(stats.std)


def _iteration_prompts(prompts, n: int, iteration: int, seed: int):
    """The prompts of an iteration: consecutive slices of seeded shuffles of the pool (a new shuffle each
    pass), a function of the iteration alone so a resumed run sees the same prompts."""
    import random

    per_pass = len(prompts) // n
    pass_, slot = divmod(iteration, per_pass)
    order = list(range(len(prompts)))
    random.Random(seed * 7919 + pass_).shuffle(order)
    return [prompts[i] for i in order[slot * n : (slot + 1) * n]]


def _generate(sampler, policy, batch_prompts, stage: PPOStage, iteration: int, ctx: StageContext):
    params = stage.sampling.model_copy(update={"seed": stage.sampling.seed + 7919 * iteration + 104729 * ctx.round})
    return [ss[0] for ss in sampler.sample(policy, [p.prompt for p in batch_prompts], 1, params)]


@torch.no_grad()
def _rollout(model, reference, tokenizer, batch_prompts, samples, scores, eot, kl_coef, stage, accelerator):
    """Rows, the models' no-grad log-probs and values, KL-penalised rewards, GAE -> (Rollout, kl (B, T-1))."""
    from align.generation.protocol import prompt_ids

    device = accelerator.device
    rows, starts = [], []
    for p, s in zip(batch_prompts, samples, strict=True):
        ids = prompt_ids(tokenizer, p.prompt, stage.sampling.system_prompt)
        starts.append(len(ids))
        rows.append(ids + list(s.token_ids))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    sequences = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T) prompt | response | pad
    attention_mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (B, T)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (B, T)
    for i, (r, p_len) in enumerate(zip(rows, starts, strict=True)):
        sequences[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = True
        response_mask[i, p_len : len(r)] = True
    sequences, attention_mask, response_mask = sequences.to(device), attention_mask.to(device), response_mask.to(device)
    temperature = stage.sampling.temperature
    bs = stage.train.batch_size
    # groups of batch_size rows, each cut after its longest row (right padding: nothing before changes)
    groups = [(slice(i, i + bs), max(len(r) for r in rows[i : i + bs])) for i in range(0, len(rows), bs)]

    def padded(x):  # (b, w) -> (b, T) with zeros after w
        return torch.nn.functional.pad(x, (0, width - x.size(1)))

    def policy_and_values(m, group):
        sl, w = group
        logits, values = m(sequences[sl, :w], attention_mask[sl, :w], response_mask[sl, :w])
        return padded(response_logps(logits, sequences[sl, :w], response_mask[sl, :w], temperature)), padded(values)

    def reference_logps(m, group):
        sl, w = group
        ids, mask = sequences[sl, :w], response_mask[sl, :w]
        rows, cols = mask.nonzero(as_tuple=True)
        decoder, head = decoder_and_head(m)
        hidden = hidden_at(decoder, rows * w + cols - 1, input_ids=ids, attention_mask=causal_only(attention_mask[sl, :w]))
        return padded(response_logps(head(hidden).float(), ids, mask, temperature))

    with accelerator.autocast():
        pv = [out for _, out in no_grad_map(model, groups, lambda g: g, policy_and_values)]
        ref = [out for _, out in no_grad_map(reference, groups, lambda g: g, reference_logps)]
    logps = torch.cat([lp for lp, _ in pv]) * response_mask
    values = torch.cat([v for _, v in pv]) * response_mask
    ref_logps = torch.cat(ref) * response_mask
    rollout = Rollout(sequences, attention_mask, response_mask, logps, ref_logps, values, scores)
    rollout.rewards, kl, rollout.advantages, rollout.returns = advantages_of(
        scores, logps, ref_logps, values, response_mask, kl_coef, stage, sum_over_processes(accelerator))
    return rollout, kl


def advantages_of(scores, logps, ref_logps, values, response_mask, kl_coef: float, stage: PPOStage,
                  process_sum=None):
    """The rollout's arithmetic once the models have spoken -> (rewards, kl, advantages, returns), each
    (B, T): KL-penalised per-token rewards, GAE, advantages whitened (over every process's tokens when
    ``process_sum`` is given) if the stage says so."""
    rewards, kl = kl_penalized_rewards(scores, logps, ref_logps, response_mask, kl_coef, stage.kl_estimator)
    advantages, returns = gae(rewards, values, response_mask, stage.gamma, stage.lam)
    if stage.whiten_advantages:
        advantages = masked_whiten(advantages, response_mask, sum_over_processes=process_sum)
    return rewards, kl, advantages, returns


def _iteration_metrics(step_metrics, rollout: Rollout, raw_scores, scores, no_eos, kl_per_seq, kl_coef,
                       samples, accelerator) -> dict[str, float]:
    mask = rollout.response_mask
    keys = [k for k in step_metrics[0] if k not in ("lr",)]
    out = {k: sum(m[k] for m in step_metrics) / len(step_metrics) for k in keys}
    out["lr"] = step_metrics[-1]["lr"]
    out["optimizer_steps"] = len(step_metrics)
    n = max(global_sum(accelerator, len(samples)), 1)
    out["score"] = global_sum(accelerator, float(scores.sum())) / n
    out["score_raw"] = global_sum(accelerator, float(raw_scores.sum())) / n
    out["kl"] = kl_per_seq  # the estimator in the reward, summed per sequence (k1 can be < 0 on a sample)
    k3 = kl_k3(rollout.logps, rollout.ref_logps) * mask
    out["kl_k3"] = global_sum(accelerator, float(k3.sum())) / n  # non-negative, unbiased
    out["kl_coef"] = kl_coef
    out["no_eos_rate"] = global_sum(accelerator, float(no_eos.sum())) / n
    out["response_length"] = global_sum(accelerator, float(mask.sum())) / n
    var_returns = float(masked_mean((rollout.returns - masked_mean(rollout.returns, mask)) ** 2, mask))
    residual = float(masked_mean((rollout.returns - rollout.values) ** 2, mask))
    out["explained_variance"] = 1.0 - residual / var_returns if var_returns > 0 else 0.0
    return out


def _gold(batch_prompts, texts) -> dict[str, float]:
    from eval.world_eval import world_metrics

    m = world_metrics([p.prompt for p in batch_prompts], texts)
    return {k: float(m[k]) for k in ("gold_helpfulness", "safety_violation_rate", "over_refusal_rate") if k in m}
