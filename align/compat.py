"""Version shims, one place. Each says when it can go."""

from __future__ import annotations


def enable_activation_checkpointing(model) -> None:
    """transformers 5.x renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``.
    Remove when the transformers floor in pyproject.toml is a release that has the new name."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
