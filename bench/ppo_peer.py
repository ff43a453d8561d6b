"""The peer side of ``bench/ppo.py``: TRL 1.12's PPOTrainer (the last TRL with PPO), run in its own
process with trl 1.12.0 (installed with ``pip --no-deps --target``) first on ``sys.path``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bench.common import LoopClock, pick_device, pip_target

TRL_VERSION = "1.12.0"
TRL_MARKER = "trl/experimental/ppo/ppo_trainer.py"


def run_peer(args, work: Path) -> dict:
    """TRL 1.12's PPOTrainer on the same checkpoints and prompt ids; ``trainer.train()``'s loop observed by
    a callback (start: ``on_train_begin``, right before the first iteration; marks: ``on_step_end``, after
    each iteration's update and log). Response lengths are read by wrapping TRL's ``truncate_response``."""
    trl_dir = args.trl_dir or str(pip_target("trl", TRL_VERSION, TRL_MARKER))
    sys.path.insert(0, trl_dir)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    if trl.__version__ != TRL_VERSION or not Path(trl.__file__).resolve().is_relative_to(Path(trl_dir).resolve()):
        raise RuntimeError(f"expected trl {TRL_VERSION} from {trl_dir}, got {trl.__version__} at {trl.__file__}")
    policy_dir, rm_dir = str(work / "policy"), str(work / "rm")
    tokenizer = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id  # finished rows padded, not eos-filled
    ref_policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    value_model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=torch.float32)
    rows = [json.loads(line) for line in (work / "prompt_ids.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    device = pick_device()
    config = PPOConfig(
        output_dir=str(work / "trl_out"), seed=args.seed, report_to="none", save_strategy="no",
        logging_steps=1, num_sample_generations=0, dataloader_num_workers=0,
        bf16=False, fp16=False, gradient_checkpointing=False,
        total_episodes=args.iterations * args.rollout_batch,
        per_device_train_batch_size=args.rollout_batch, gradient_accumulation_steps=1,
        num_mini_batches=args.rollout_batch // args.minibatch, num_ppo_epochs=args.ppo_epochs,
        local_rollout_forward_batch_size=args.gen_batch, response_length=args.max_new_tokens,
        stop_token="eos", temperature=args.temperature, missing_eos_penalty=None,
        kl_coef=args.kl_coef, kl_estimator="k1", whiten_rewards=False, cliprange=0.2, cliprange_value=0.2,
        vf_coef=0.1, gamma=1.0, lam=0.95,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, optim="adamw_torch",
    )
    clock = LoopClock(device)
    lengths: list[torch.Tensor] = []
    stopped: list[torch.Tensor] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kw):
            clock.start(episodes=0)

        def on_step_end(self, args_, state, control, **kw):
            clock.mark(episodes=state.episode)

    real_truncate = trl_ppo.truncate_response

    def truncate_response(stop_token_id, pad_token_id, responses):
        out = real_truncate(stop_token_id, pad_token_id, responses)
        lengths.append(trl_ppo.first_true_indices(out == pad_token_id))  # tokens up to the stop, included
        stopped.append((out == stop_token_id).any(dim=1))
        return out

    trl_ppo.truncate_response = truncate_response
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, train_dataset=dataset, value_model=value_model,
                         callbacks=[Clock()])
    trainer.train()
    trl_ppo.truncate_response = real_truncate
    scores = [h["objective/scores"] for h in trainer.state.log_history if "objective/scores" in h]
    return clock.result("peer", args.warmup, response_tokens=float(torch.cat(lengths).float().mean()),
                        stopped=float(torch.cat(stopped).float().mean()), final_score=scores[-1])
