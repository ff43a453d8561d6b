"""The KL coefficient of PPO's per-token penalty: fixed, or adapted to a target KL (Ziegler et al. 2019).

Adaptive rule, after each rollout of ``n_steps`` sequences with mean per-sequence KL ``current``::

    proportional_error = clip(current / target - 1, -0.2, 0.2)
    value *= 1 + proportional_error * n_steps / horizon

``state_dict()`` is a plain JSON-able dict (the stage checkpoints it as JSON); ``load_state_dict`` restores
the coefficient and checks that the controller kind matches. ``target`` and ``horizon`` come from the
config and are stored only for the record.
"""

from __future__ import annotations


class KLController:
    """Holds ``value``; subclasses say how ``update`` moves it."""

    kind = ""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Called once per rollout with its mean per-sequence KL and its number of sequences."""

    def state_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"KL controller state is {state.get('kind')!r}, this controller is {self.kind!r}")
        self.value = float(state["value"])


class FixedKLController(KLController):
    """A constant coefficient: ``update`` does nothing."""

    kind = "fixed"


class AdaptiveKLController(KLController):
    """Moves the coefficient towards the value that keeps the KL at ``target``, at most 20% per ``horizon``."""

    kind = "adaptive"

    def __init__(self, init: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
        super().__init__(init)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {**super().state_dict(), "target": self.target, "horizon": self.horizon}
