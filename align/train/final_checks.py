"""What a trained model must pass before :func:`align.train.fit.fit` saves anything as the stage's result.

1. Its weights are finite. The loop stops before a non-finite update, but an update computed from finite
   numbers can still overflow (``lr=1e38``: every weight becomes +-inf) and nothing looked after the last one.
2. The run did not diverge by the user's rules (``train.divergence``, :class:`DivergenceConfig`): the norm of
   the weights did not grow more than ``max_weight_growth`` times (``lr=1e3`` on the tiny models: the weights
   reach thousands while the loss can stay flat, a reward model sitting at exactly ln 2), and the training
   loss at the end is not ``max_loss_rise`` worse than at the start (stages whose loss must fall).

The weights are measured in place, as each process holds them (a shard under FSDP2 or ZeRO-3, a whole copy
otherwise), and summed over the processes, so every process takes the same decision and all stop together.
"""

from __future__ import annotations

import math

import torch

from align.config.specs import DivergenceConfig, TrainConfig
from align.runtime import StageStopped
from align.train.collective import global_sum
from align.train.loop import TrainSummary


class BrokenModel(StageStopped):
    """The trained weights are not fit to save (not finite, or the run diverged): nothing is saved."""


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: its shard (FSDP2's DTensor), its partition (ZeRO-3) or all of it."""
    p = p.detach()
    if hasattr(p, "to_local"):
        return p.to_local()
    return getattr(p, "ds_tensor", p)


def weight_norm(accelerator, model: torch.nn.Module) -> float:
    """The L2 norm of all of ``model``'s weights over all processes (a whole copy on each of several
    processes counts once per process, which a ratio of two norms of the same run cancels); inf or nan when
    any weight is not finite."""
    squares = [torch.linalg.vector_norm(_local(p), dtype=torch.float64) ** 2 for p in model.parameters()]
    local = float(torch.stack([s.cpu() for s in squares]).sum()) if squares else 0.0
    return math.sqrt(global_sum(accelerator, local))


def _first_non_finite(accelerator, model: torch.nn.Module) -> str:
    """The name of the first weight with an inf or nan on any process."""
    module = accelerator.unwrap_model(model)
    name = next((n for n, p in module.named_parameters() if not bool(torch.isfinite(_local(p)).all())), None)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        name = next((n for n in gather_object([name]) if n is not None), None)
    return name or "a weight"


def loss_ends(summary: TrainSummary) -> tuple[float, float, int] | None:
    """Mean training loss of the first and of the last ``n`` steps, and ``n`` (at most the kept window, at
    most half the run); None for a run of one step."""
    n = min(len(summary.early), len(summary.late), summary.steps // 2)
    if n < 1:
        return None
    return sum(summary.early[:n]) / n, sum(summary.late[-n:]) / n, n


def check_trained(accelerator, model, summary: TrainSummary, cfg: TrainConfig, *, stage: str,
                  start_norm: float, loss_falls: bool) -> float | None:
    """Raise :class:`BrokenModel` when the trained ``model`` must not be saved (module docstring); else
    return how many times the weights' norm grew (None when it started at 0)."""
    end_norm = weight_norm(accelerator, model)
    where = f"[{stage}] after {summary.steps} step(s) at learning rate {cfg.optim.lr:.3g}"
    if not math.isfinite(end_norm):
        raise BrokenModel(
            f"{where}: the trained weights are not finite ({_first_non_finite(accelerator, model)} is the first "
            "with inf or nan); nothing was saved: lower train.optim.lr"
        )
    growth = end_norm / start_norm if start_norm > 0 else None
    if cfg.divergence is not None:
        problem = _diverged(cfg.divergence, summary, growth, loss_falls)
        if problem is not None:
            raise BrokenModel(f"{where}: {problem}; nothing was saved: lower train.optim.lr (or, if this run is "
                              "sound, relax train.divergence)")
    return growth


def _diverged(rules: DivergenceConfig, summary: TrainSummary, growth: float | None, loss_falls: bool) -> str | None:
    """What broke a rule of ``rules``, in words, or None."""
    limit = rules.max_weight_growth
    if limit is not None and growth is not None and growth > limit:
        return (f"the norm of the weights grew {growth:.3g}x, more than train.divergence.max_weight_growth="
                f"{limit:g} allows (the model blew up)")
    ends = loss_ends(summary) if loss_falls and rules.max_loss_rise is not None else None
    if ends is not None:
        start, end, n = ends
        if end - start > rules.max_loss_rise * abs(start):
            return (f"the training loss rose from {start:.4g} (mean of the first {n} steps) to {end:.4g} (the "
                    f"last {n}), more than train.divergence.max_loss_rise={rules.max_loss_rise:g} allows")
    return None
