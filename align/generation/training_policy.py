"""Sampling from a policy while it is being trained (PPO rollouts).

``hf``: the training model itself generates (no copy). ``vllm``: one engine per process, started once from
the policy's starting checkpoint; before every rollout the current weights (LoRA merged in) are loaded into
it and its prefix cache dropped, so each rollout samples from the policy as it is at that moment. On a
CPU the hf path is the one that runs; the vllm path is tested with a stand-in engine
(``tests/integration/test_ppo_vllm_sync.py``) and on a GPU by ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

from collections.abc import Sequence

from align.config.sampling import GenerationBackend, SamplingParams
from align.generation.protocol import Prompt, Sample


class TrainingPolicySampler:
    """``sample(policy, prompts, k, params)`` with the weights ``policy`` has now."""

    def __init__(self, backend: GenerationBackend, spec, path: str, tokenizer, *, make=None, **vllm_options):
        from align.generation import make_generator

        self.backend, self.spec, self.path, self.tokenizer = backend, spec, path, tokenizer
        self.make = make or make_generator
        self.vllm_options = vllm_options
        self.engine = None

    def sample(self, policy, prompts: Sequence[Prompt], k: int, params: SamplingParams) -> list[list[Sample]]:
        if self.backend == "hf":
            return self.make("hf", model=policy, tokenizer=self.tokenizer).sample(prompts, k, params)
        from align.models.gguf import hf_folder
        from align.models.loading import plain_weights

        if self.engine is None:
            self.engine = self.make("vllm", hf_folder(self.spec, self.path), tokenizer=self.tokenizer,
                                    **self.vllm_options)
        self.engine.load_weights(plain_weights(policy))
        return self.engine.sample(prompts, k, params)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
