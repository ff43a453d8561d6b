"""Generation: K samples per prompt behind one small interface (``Generator``).

    gen = make_generator("hf", model=model, tokenizer=tokenizer)      # or make_generator("hf", "path")
    samples = gen.sample(prompts, k=8, params=SamplingParams(temperature=0.8, max_new_tokens=256))
    samples[i][j].text, .token_ids, .finish_reason, .logps_sum
    gen.close()

Backends: ``hf`` (default; any HF causal LM, CPU or GPU, one shared prefill per prompt) and ``vllm``
(optional extra ``align[vllm]``, imported only when chosen).
"""

from __future__ import annotations

from align.config.sampling import GenerationBackend, SamplingParams
from align.generation.protocol import Generator, Prompt, Sample, prompt_ids

__all__ = ["GenerationBackend", "Generator", "Prompt", "Sample", "SamplingParams", "make_generator", "policy_generator",
           "prompt_ids"]


def make_generator(backend: GenerationBackend = "hf", model_path: str | None = None, *, model=None,
                   tokenizer=None, **options) -> Generator:
    """A generator for ``backend``.

    hf: give a loaded ``model`` and ``tokenizer``, or ``model_path`` (loaded with align's loader in
    ``options["dtype"]``, default float32, on ``options["device"]``, default CUDA when available).
    vllm: give ``model_path`` (an HF checkpoint folder or hub id); ``tokenizer`` (default: loaded from
    ``model_path``) renders the prompts; other ``options`` go to ``vllm.LLM``.
    """
    if backend == "hf":
        from align.generation.hf_backend import HFGenerator

        if model is None:
            model, tokenizer = _load_hf(model_path, tokenizer, options.pop("device", None),
                                        options.pop("dtype", "float32"))
        elif tokenizer is None:
            raise ValueError("make_generator('hf', model=...) needs the model's tokenizer too")
        if options:
            raise TypeError(f"unknown option(s) for the hf backend: {', '.join(sorted(options))}")
        return HFGenerator(model, tokenizer)
    if backend == "vllm":
        from align.generation.vllm_backend import VLLMGenerator, import_vllm

        import_vllm()  # fail first, and clearly, when vLLM is missing
        if model_path is None:
            raise ValueError("the vllm backend loads the model itself: give model_path (an HF checkpoint)")
        if tokenizer is None:
            tokenizer = _load_tokenizer(model_path)
        return VLLMGenerator(model_path, tokenizer, **options)
    raise ValueError(f"unknown generation backend {backend!r}; known: 'hf', 'vllm'")


def policy_generator(spec, path: str, backend: GenerationBackend, seed: int, device, make=None) -> Generator:
    """The policy of a stage (``spec`` resolved to ``path``) as a generator: with hf, loaded without LoRA
    or activation checkpointing, in eval mode on ``device``; with vllm, its HF folder (a GGUF spec's
    converted one). ``make``: the factory (default :func:`make_generator`; stages pass theirs so tests can
    replace it)."""
    from align.models.gguf import hf_folder
    from align.models.loading import load_causal_lm, load_tokenizer

    make = make or make_generator
    tokenizer = load_tokenizer(spec, path)
    if backend == "hf":
        plain = spec.model_copy(update={"lora": None, "gradient_checkpointing": False})
        model = load_causal_lm(plain, path, tokenizer, seed=seed).to(device).eval()
        return make("hf", model=model, tokenizer=tokenizer)
    return make("vllm", hf_folder(spec, path), tokenizer=tokenizer)


def _load_tokenizer(model_path: str):
    from align.config.specs import ModelSpec
    from align.models.loading import load_tokenizer

    return load_tokenizer(ModelSpec(path=model_path), model_path)


def _load_hf(model_path: str | None, tokenizer, device: str | None, dtype: str):
    import torch

    from align.config.specs import ModelSpec
    from align.models.loading import load_causal_lm

    if model_path is None:
        raise ValueError("make_generator('hf') needs model= and tokenizer=, or model_path=")
    tokenizer = tokenizer or _load_tokenizer(model_path)
    model = load_causal_lm(ModelSpec(path=model_path, dtype=dtype), model_path, tokenizer)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), tokenizer
