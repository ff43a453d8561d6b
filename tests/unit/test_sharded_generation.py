"""PPO's rollouts gather ZeRO-3-sharded weights once per rollout; nothing changes in any other setting."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import torch

from align.train.sharded import gathered_for_generation, zero_stage


def _accelerator(stage: int | None):
    plugin = None if stage is None else SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}})
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))


def test_zero3_gathers_every_parameter_once_for_the_rollout(monkeypatch):
    calls = []

    class Gathered:
        def __init__(self, params, modifier_rank):
            calls.append(("enter", len(params), modifier_rank))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            calls.append(("exit",))

    fake = types.ModuleType("deepspeed")
    fake.zero = SimpleNamespace(GatheredParameters=Gathered)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    with gathered_for_generation(_accelerator(3), model) as inside:
        assert inside is model and calls == [("enter", 4, None)]
    assert calls[-1] == ("exit",)


def test_other_settings_gather_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # importing it would fail
    model = torch.nn.Linear(2, 2)
    for stage in (None, 0, 1, 2):
        with gathered_for_generation(_accelerator(stage), model) as inside:
            assert inside is model
    assert [zero_stage(_accelerator(s)) for s in (None, 2, 3)] == [0, 2, 3]
