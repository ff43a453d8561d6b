"""The ``ppo`` stage: PPO the Llama 2 way, the baseline DPO is compared against (pydantic only, no torch)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from align.config.base import MODELS, PROMPT_SOURCES, Artifact, Consumes, StageBase
from align.config.reward import RewardSpec
from align.config.sampling import GenerationBackend, SamplingParams
from align.config.specs import (
    EVALUATORS_HELP,
    DataSpec,
    EvaluatorNames,
    ModelSpec,
    OptimConfig,
    Strict,
    TrainConfig,
)


def _ppo_train() -> TrainConfig:
    return TrainConfig(batch_size=8, optim=OptimConfig(lr=1e-6, warmup_ratio=0.0))  # Llama 2: lr 1e-6


class AdaptiveKL(Strict):
    """Ziegler et al. (2019): the KL coefficient follows the measured KL toward a target."""

    target: float = Field(6.0, gt=0, description="KL per sequence (nats) the controller steers toward")
    horizon: int = Field(10000, gt=0, description="responses over which the coefficient adapts")


class PPOStage(StageBase):
    """PPO on prompts with a reward model, Llama 2 style: reward = whitened (combined) RM score at the last
    response token minus a per-token KL penalty to the reference, a value model with its own head,
    GAE, clipped policy and value losses, several PPO epochs over minibatches of each rollout batch."""

    kind: Literal["ppo"] = "ppo"
    produces: ClassVar = {Artifact.POLICY: "model"}

    model: Annotated[ModelSpec, Consumes(Artifact.POLICY)] = Field(
        ..., description="the policy to train (Llama 2: the rejection-sampling checkpoint)"
    )
    reference: Annotated[ModelSpec | None, Consumes(Artifact.POLICY)] = Field(
        None, description="the KL reference (default: the policy's starting point)"
    )
    value_model: Annotated[ModelSpec | None, Consumes(*MODELS)] = Field(
        None, description="where the value model starts: a reward model (its backbone and head; Llama 2) or a "
        "policy (a new head). Default: the reward model (the Helpfulness one when combined), or the policy "
        "when the reward is a function",
    )
    reward: RewardSpec = Field(..., description="how responses are scored (Llama 2: Helpfulness + Safety)")
    prompts: Annotated[DataSpec, Consumes(*PROMPT_SOURCES)] = Field(..., description="prompts for rollouts")
    sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(temperature=1.0, max_new_tokens=128, batch_size=64),
        description="rollout decoding; log-probs are recomputed with logits divided by this temperature",
    )
    backend: GenerationBackend = Field(
        "hf", description="rollouts with hf (the training model generates) or vllm (extra align[vllm], GPU: one "
        "engine per process, the current weights loaded into it before every rollout)",
    )
    vllm_gpu_memory: float = Field(
        0.3, gt=0, le=1, description="vllm backend: share of the GPU's memory the engine may take (it shares "
        "the GPU with the models being trained)",
    )
    iterations: int = Field(10, gt=0, description="rollout batches (each followed by the PPO epochs)")
    rollout_batch_size: int = Field(64, gt=0, description="prompts per rollout batch (one response each)")
    ppo_epochs: int = Field(4, gt=0, description="passes over each rollout batch")
    kl_coef: float = Field(0.01, ge=0, description="beta of the per-token KL penalty (Llama 2: 0.01 for 7B/13B)")
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1", description="per-token KL estimate in the reward: k1 = logp - ref_logp, k3 = Schulman's "
        "non-negative estimator"
    )
    adaptive_kl: AdaptiveKL | None = Field(None, description="adapt kl_coef toward a target KL (null: fixed)")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    whiten_advantages: bool = Field(True, description="normalise advantages over the rollout batch")
    cliprange: float = Field(0.2, gt=0, description="epsilon of the clipped policy surrogate")
    cliprange_value: float = Field(0.2, gt=0, description="clip of the value update around the rollout values")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss in pg + vf_coef * vf")
    missing_eos_penalty: float | None = Field(
        None, description="score change for responses that end without the termination token (null: none)"
    )
    missing_eos_mode: Literal["add", "replace"] = Field(
        "add", description="add: score + penalty; replace: the score becomes the penalty"
    )
    train: TrainConfig = Field(
        default_factory=_ppo_train,
        description="optimizer and batch geometry: batch_size * grad_accum * processes responses per "
        "optimizer step (a minibatch); epochs and max_steps are not used (iterations and ppo_epochs are)",
    )
    evaluators: EvaluatorNames = Field(
        default_factory=lambda: ["world"], description=EVALUATORS_HELP + "; run on every iteration's rollouts "
        "(world, on the world's prompts: gold_helpfulness, safety_violation_rate, over_refusal_rate)",
    )

    @model_validator(mode="after")
    def _geometry(self):
        per_step = self.train.batch_size * self.train.grad_accum * self.launch.num_processes
        if self.rollout_batch_size % per_step:
            raise ValueError(f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                             f"train.batch_size * train.grad_accum * launch.num_processes ({per_step})")
        return self

    @model_validator(mode="after")
    def _vllm_loads_checkpoints(self):
        if self.backend == "vllm" and self.model.path == "builtin:tiny":
            raise ValueError("backend vllm loads an HF checkpoint; builtin:tiny is not one: start from a stage's "
                             "model (model: {from: ...}) or a folder")
        return self
