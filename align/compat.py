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
