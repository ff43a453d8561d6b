"""Reductions over the processes of a stage (one process: the value itself)."""

from __future__ import annotations

import torch


def global_sum(accelerator, value: float) -> float:
    """Sum of ``value`` over all processes."""
    if accelerator.num_processes == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(t, reduction="sum").item())


def any_process(accelerator, flag: bool) -> bool:
    """``flag`` on any process (every process takes the same decision)."""
    return global_sum(accelerator, float(flag)) > 0 if accelerator.num_processes > 1 else flag


def sum_over_processes(accelerator):
    """``t -> t`` summed over all processes (a tensor of any shape), or None in a one-process run: what
    :func:`align.rl.advantages.masked_whiten` takes to whiten over every process's entries."""
    if accelerator.num_processes == 1:
        return None
    return lambda t: accelerator.reduce(t.clone(), reduction="sum")
