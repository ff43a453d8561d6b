"""The vLLM backend (optional extra ``align[vllm]``): ``n=K`` samples per request, prefix caching on.

vLLM is imported in the constructor only, so this module imports without it. Prompts are tokenized
here (the same ids as the HF backend) and passed as ``{"prompt_token_ids": ...}``. Every prompt gets its
own seeded request (seed derived from ``params.seed`` and the prompt's index): vLLM gives the K children
of a seeded ``n=K`` request the seeds ``seed + j``, so requests are spaced K apart and no two samples
share their noise. Written against vLLM's public offline API (``LLM``, ``SamplingParams``); not run in
CI (no GPU there).

Simplification: ``Sample.logps_sum`` is None; vLLM's default log-probs are those of the raw model, not of
the distribution the token was drawn from.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

from align.config.sampling import SamplingParams
from align.data.chat import termination_token_id
from align.generation.protocol import Prompt, Sample, check_k, prompt_ids

INSTALL_HINT = "the 'vllm' generation backend needs vLLM: pip install 'align[vllm]' (on a CUDA machine)"


def import_vllm():
    """The vllm module, or an ImportError that says how to get it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return vllm


class VLLMGenerator:
    """Generator over a vLLM engine loaded from an HF checkpoint folder (or hub id)."""

    def __init__(self, model_path: str, tokenizer, **engine_options):
        """``engine_options`` go to ``vllm.LLM`` (e.g. ``gpu_memory_utilization``, ``tensor_parallel_size``,
        ``dtype``, ``max_model_len``)."""
        self._vllm = import_vllm()
        self.tokenizer = tokenizer
        self.eot_id = termination_token_id(tokenizer)
        options = {"enable_prefix_caching": True, **engine_options}
        self.llm = self._vllm.LLM(model=model_path, **options)

    def sample(self, prompts: Sequence[Prompt], k: int, params: SamplingParams) -> list[list[Sample]]:
        """1. tokenize  2. one seeded n=k request per prompt  3. generate (vLLM batches and shares the
        prompt's prefill across its k samples)  4. outputs -> Samples, in prompt order."""
        check_k(k)
        if self.llm is None:
            raise RuntimeError("this generator was closed")
        # step 1
        requests = [{"prompt_token_ids": prompt_ids(self.tokenizer, p, params.system_prompt)} for p in prompts]
        # step 2
        greedy = params.temperature == 0
        per_prompt = [
            self._vllm.SamplingParams(
                n=k, temperature=params.temperature, top_p=1.0 if greedy else params.top_p,
                max_tokens=params.max_new_tokens,
                stop_token_ids=[self.eot_id] if params.stop_at_eot else [],
                ignore_eos=not params.stop_at_eot, seed=params.seed * 2**32 + i * k,
            )
            for i in range(len(requests))
        ]
        # step 3
        outputs = self.llm.generate(requests, per_prompt, use_tqdm=False)
        # step 4
        return [[self._to_sample(c, r["prompt_token_ids"]) for c in out.outputs]
                for r, out in zip(requests, outputs, strict=True)]

    def load_weights(self, weights) -> None:
        """Replace the engine's weights with ``(name, tensor)`` pairs in HF naming (a policy being trained,
        e.g. PPO after each update); the prefix cache is dropped with them."""
        from align.compat import vllm_load_weights

        if self.llm is None:
            raise RuntimeError("this generator was closed")
        vllm_load_weights(self.llm, weights)

    def _to_sample(self, completion, prompt: list[int]) -> Sample:
        reason = "stop" if completion.finish_reason == "stop" else "length"
        return Sample(token_ids=list(completion.token_ids), text=completion.text, finish_reason=reason,
                      logps_sum=None, prompt_ids=tuple(prompt))

    def close(self) -> None:
        """Shut the engine down and free its GPU memory (before loading e.g. a reward model)."""
        if self.llm is None:
            return
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        self.llm = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
