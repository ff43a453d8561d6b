"""PPO stage, Llama 2 style (sec. 3.2.3): the baseline DPO is compared against.

Policy and value model are one module (one optimizer: DDP/FSDP see one ``forward``); the loss is the clipped
policy loss + ``vf_coef`` * clipped value loss, summed over response tokens. The batches come from rollouts
of the policy as it trains (``align.train.rollouts``, which also says how a resumed or multi-process run
stays exact); ``train.save_every`` and ``snapshot_every`` count iterations.
"""

from __future__ import annotations

from pathlib import Path

import torch

from align.config.base import PROMPT_SOURCES, Artifact
from align.config.ppo import PPOStage
from align.data.sources import load_prompts
from align.evaluators import load_evaluators
from align.generation import make_generator
from align.generation.training_policy import TrainingPolicySampler
from align.losses.ppo import entropy_from_logits, policy_loss, value_loss
from align.models.loading import count_parameters, load_causal_lm
from align.models.policy_value import PolicyAndValue, response_logps
from align.models.reward import load_reward_model, load_reward_tokenizer, whiten_value_head
from align.models.reward_fn import build_reward
from align.models.trunk import shared_layers
from align.rl.rollout import Rollout
from align.runtime import StageContext, StageInputError, StageResult
from align.train.common import load_policy
from align.train.fit import Built, Output, Task, fit
from align.train.rollouts import RolloutSource

HEADLINE = ("score", "kl", "kl_k3", "gold_helpfulness", "safety_violation_rate", "no_eos_rate", "response_length",
            "pg_loss", "vf_loss", "explained_variance", "safety_scored_share")


def make_loss_fn(temperature: float, cliprange: float, cliprange_value: float, vf_coef: float):
    """``loss_fn(model, rollout) -> (policy loss + vf_coef * value loss, stats)``, sums over response tokens."""

    def loss_fn(model, batch: Rollout):
        mask = batch.response_mask
        logits, values = model(batch.sequences, batch.attention_mask, mask, trunk=batch.trunk)  # (N, V) on the mask
        logps = response_logps(logits, batch.sequences, mask, temperature)
        pg, pg_stats = policy_loss(logps, batch.logps, batch.advantages, mask, cliprange)
        vf, vf_stats = value_loss(values, batch.values, batch.returns, mask, cliprange_value)
        with torch.no_grad():
            entropy = entropy_from_logits(logits / max(temperature, 1e-6)).sum()
        stats = {"pg_loss": pg.detach(), "vf_loss": vf.detach(), "entropy": entropy, **pg_stats, **vf_stats}
        return pg + vf_coef * vf, stats

    return loss_fn


def stage_loss(stage: PPOStage):
    """The loss with the stage's settings."""
    return make_loss_fn(stage.sampling.temperature, stage.cliprange, stage.cliprange_value, stage.vf_coef)


def response_tokens(batch: Rollout) -> float:
    return float(batch.response_mask.sum())


class PPO(Task):
    stage: PPOStage

    def build(self) -> Built:
        stage, ctx, acc = self.stage, self.ctx, self.accelerator
        policy_path = ctx.model_path(stage.model, (Artifact.POLICY,))
        lm, tokenizer = load_policy(stage.model, policy_path, ctx.seed)
        ref_spec = (stage.reference or stage.model).model_copy(update={"lora": None, "gradient_checkpointing": False})
        reference = load_causal_lm(ref_spec, ctx.model_path(stage.reference or stage.model, (Artifact.POLICY,)),
                                   tokenizer, seed=ctx.seed).to(acc.device).eval().requires_grad_(False)
        value_model, value_tokenizer = self._value_model(len(tokenizer))
        reward = build_reward(stage.reward, ctx.model_path)
        prompts = load_prompts(stage.prompts, ctx.data_paths(stage.prompts, PROMPT_SOURCES), ctx.seed)
        if len(prompts) < stage.rollout_batch_size:
            raise StageInputError(f"stage '{stage.name}': {len(prompts)} prompts, fewer than rollout_batch_size "
                                  f"({stage.rollout_batch_size})")
        module = PolicyAndValue(lm, value_model)
        if acc.num_processes == 1 and self._trunk_fits(lm):  # shared frozen lower layers: once per rollout
            module.trunk_layers = shared_layers(lm, value_model, reference)
        self.trunk_layers = module.trunk_layers
        options = {"gpu_memory_utilization": stage.vllm_gpu_memory} if stage.backend == "vllm" else {}
        self.sampler = TrainingPolicySampler(stage.backend, stage.model, policy_path, tokenizer, make=make_generator,
                                             **options)
        self.source = RolloutSource(stage, ctx, acc, prompts, tokenizer, reference, reward, self.sampler,
                                    load_evaluators(stage.evaluators))
        self.trainable = count_parameters(module)[1]
        outputs = [Output("value_model", Path(ctx.out_dir) / "value_model", value_tokenizer),
                   Output("policy", ctx.output(Artifact.POLICY), tokenizer)]
        banner = (f"{len(prompts)} prompts, {stage.iterations} iterations of {stage.rollout_batch_size} rollouts x "
                  f"{stage.ppo_epochs} epochs (policy + value)"
                  + (f"; {module.trunk_layers} shared frozen lower layers run once per rollout"
                     if module.trunk_layers else ""))
        return Built(module, self.source, stage_loss(stage), response_tokens, outputs, banner, policy="policy",
                     tokenizer=tokenizer, loss_falls=False)  # a PPO loss need not fall: no max_loss_rise

    def _trunk_fits(self, lm) -> bool:
        """Whether a rollout's hidden states (kept for its training steps) stay under 1 GiB."""
        stage, config = self.stage, lm.config
        size = stage.rollout_batch_size * stage.train.max_length * config.hidden_size * lm.dtype.itemsize
        return size <= 2**30

    def _value_model(self, vocabulary: int):
        """The value model (from ``value_model``, else the reward model, else the policy), its head on the
        whitened reward's scale."""
        stage, spec = self.stage, self.stage.value_model
        if spec is None:
            spec = stage.reward.model or stage.reward.helpful or stage.model
        path = self.ctx.model_path(spec)
        spec = spec.model_copy(update={"gradient_checkpointing": stage.model.gradient_checkpointing})
        tokenizer = load_reward_tokenizer(spec, path)
        value_model = load_reward_model(spec, path, tokenizer, seed=self.ctx.seed)
        if value_model.get_input_embeddings().weight.shape[0] < vocabulary:
            value_model.resize_token_embeddings(vocabulary)
        whiten_value_head(value_model, path, stage.reward.whiten and stage.reward.function is None)
        return value_model, tokenizer

    def close(self) -> None:
        self.sampler.close()

    def result(self, summary, before, after) -> dict:
        out = {"iterations": self.stage.iterations, "parameters_trainable": self.trainable,
               "trunk_layers": self.trunk_layers,  # lower layers run once per rollout (align.models.trunk)
               "kl_coef_final": self.source.kl_ctl.value}
        for name, values in (("first", summary.first), ("last", summary.last)):
            out.update({f"{k}_{name}": v for k, v in (values or {}).items() if k in HEADLINE})
        return out


def run(stage: PPOStage, ctx: StageContext) -> StageResult:
    return fit(PPO(stage, ctx), stage.train, ctx)
