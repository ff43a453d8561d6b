"""Version shims, one place. Each says when it can go."""

from __future__ import annotations


def enable_activation_checkpointing(model) -> None:
    """transformers 5.x renamed ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=)`` to
    ``activation_checkpointing_enable(activation_checkpointing_kwargs=)``.
    Remove when the transformers floor in pyproject.toml is a release that has the new name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def cache_kwarg(model, cache) -> dict:
    """The decoding cache as a forward() keyword: transformers 5.24 renamed ``past_key_values`` to
    ``cache`` (the old name warns and goes in 5.40). Remove when the transformers floor in pyproject.toml
    is a release whose models take ``cache``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes kwargs on
    if "cache" in inspect.signature(type(base).forward).parameters:
        return {"cache": cache}
    return {"past_key_values": cache}


def get_peft_model(model, config):
    """``peft.get_peft_model`` without the FutureWarning peft 0.21 triggers by reading transformers 5's
    deprecated ``is_gradient_checkpointing`` property (renamed ``is_activation_checkpointing``; the old
    name goes in transformers 6). Only that warning is silenced. Remove when the peft floor in
    pyproject.toml is a release that reads the new name."""
    import warnings

    import peft

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return peft.get_peft_model(model, config)


def vllm_load_weights(llm, weights) -> None:
    """Load ``(name, tensor)`` pairs (HF parameter names) into a running ``vllm.LLM`` and drop its prefix
    cache (cached KV blocks were computed with the old weights). vLLM >= 0.7 runs a function on the model
    in every worker with ``LLM.apply_model``; older releases expose the in-process model at
    ``llm_engine.model_executor.driver_worker.model_runner.model`` (V1 adds ``.worker``). Remove the fallback
    when the vllm floor of the extra is a release with ``apply_model``."""
    weights = list(weights)
    if hasattr(llm, "apply_model"):
        llm.apply_model(lambda model: model.load_weights(weights))
    else:
        worker = llm.llm_engine.model_executor.driver_worker
        worker = getattr(worker, "worker", worker)
        worker.model_runner.model.load_weights(weights)
    reset = getattr(llm, "reset_prefix_cache", None)
    if callable(reset):
        reset()



def hub_offline() -> bool:
    """Whether the Hugging Face hub is off limits: ``HF_HUB_OFFLINE`` (or the older ``TRANSFORMERS_OFFLINE``)
    as ``huggingface_hub`` read it at import (``constants.HF_HUB_OFFLINE``, in every release transformers
    4.56 accepts; ``is_offline_mode()`` only in recent ones). Remove when the floor has ``is_offline_mode``."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_problem(repo_id: str, filename: str = "config.json") -> str | None:
    """Why the hub model ``repo_id`` cannot be loaded (None: it can), in one request at most: on an
    unreachable hub, transformers 5 / huggingface_hub 1+ retry with back-off for a minute or more (longer
    for a cached model) before they fail. Offline (:func:`hub_offline`) the Hugging Face cache must hold
    ``filename`` of it; online the hub must answer for it. Remove when huggingface_hub fails fast on an
    unreachable hub."""
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    try:
        cached = isinstance(try_to_load_from_cache(repo_id, filename), str)
    except ValueError as err:  # huggingface_hub's HFValidationError: e.g. '--' or '..' in the id
        return f"no such folder, and '{repo_id}' is no hub id either ({str(err).splitlines()[0][:120]})"
    if hub_offline():
        return None if cached else (f"'{repo_id}' is neither a local folder nor in the Hugging Face cache, and "
                                    "HF_HUB_OFFLINE is set: give a local folder or download it first")
    try:
        model_info(repo_id, timeout=10)
    except GatedRepoError:
        return None if cached else (f"'{repo_id}' is gated on the Hugging Face hub: accept its terms there and "
                                    "log in (hf auth login), or give a local folder")
    except RepositoryNotFoundError:
        return f"'{repo_id}' is neither a local folder nor a model on the Hugging Face hub"
    except Exception as err:  # noqa: BLE001 (no network, a proxy, a timeout: the hub cannot be reached)
        hint = "set HF_HUB_OFFLINE=1 to use the copy in the Hugging Face cache" if cached else \
            "give a local folder (or download it where there is a network)"
        return (f"'{repo_id}' is not a local folder and the Hugging Face hub cannot be reached (no network? "
                f"{str(err).splitlines()[0][:120]}): {hint}")
    return None
