"""The loop's reusable pieces: ``optimizer_step`` on batches a stage makes as it goes (PPO's way) gives
the same update as ``train`` on a fixed plan, and ``Checkpoints`` resumes only its own work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from align.config.specs import OptimConfig, TrainConfig
from align.train.loop import Checkpoints, PlanSource, optimizer_step, train
from align.train.metrics import MetricsLogger


class Batch:
    def __init__(self, x, y):
        self.x, self.y, self.num_tokens = x, y, len(x)


def loss_fn(model, batch):
    return ((model(batch.x).squeeze(-1) - batch.y) ** 2).sum(), {"abs_err": (model(batch.x).squeeze(-1) - batch.y).abs().sum()}


def units(batch):
    return float(len(batch.x))


def setup(seed=0):
    from accelerate import Accelerator

    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, scheduler


def data():
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(10, 3, generator=g)
    return [Batch(xs[i : i + 2], xs[i : i + 2].sum(-1)) for i in range(0, 10, 2)] + [Batch(xs[:1], xs[:1].sum(-1))]


def test_optimizer_step_matches_train_on_the_same_batches(tmp_path):
    batches = data()
    plan = [[[0], [1]], [[2], [3], [4]], [[5]]]  # steps of 2, 3 and 1 micro-batches (grad_accum varies)
    acc, model, opt, sched = setup()
    manual = []
    for step in plan:
        manual.append(optimizer_step(acc, model, opt, sched, [batches[i] for (i,) in step], loss_fn, units, 1.0))
    expected = [p.detach().clone() for p in model.parameters()]

    acc, model, opt, sched = setup()
    for step in plan:
        cfg = TrainConfig(grad_accum=len(step), report_to=[], optim=OptimConfig(max_grad_norm=1.0))
        train(accelerator=acc, model=model, optimizer=opt, scheduler=sched,
              source=PlanSource([step], lambda g: batches[g[0]], 0, len(step)), loss_fn=loss_fn, units=units, cfg=cfg,
              out_dir=tmp_path / f"t{len(step)}", logger=MetricsLogger(tmp_path, [], enabled=False))
    for a, b in zip(expected, model.parameters(), strict=True):
        assert torch.equal(a, b.detach())
    # the reported loss is the mean over the step's units, and lr is the lr the step used
    first = manual[0]
    acc, model, opt, sched = setup()
    with torch.no_grad():
        err = torch.cat([model(batches[i].x).squeeze(-1) - batches[i].y for i in (0, 1)])
    assert abs(first["loss"] - torch.mean(err**2).item()) < 1e-6
    assert abs(first["abs_err"] - err.abs().mean().item()) < 1e-6
    assert first["lr"] == 0.1 and manual[1]["lr"] == 0.05 and first["tokens"] == 4


def test_checkpoints_resume_only_their_own_work(tmp_path):
    acc, model, opt, sched = setup()
    Checkpoints(acc, tmp_path, key="plan-a", keep=2, stateful={"scheduler": sched}).save(3, {"tokens": 7})
    assert json.loads((tmp_path / "step_0000003" / "loop_state.json").read_text())["key"] == "plan-a"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert Checkpoints(acc, tmp_path, key="plan-b", keep=2).resume("t") is None  # other work: ignored
    state = Checkpoints(acc, tmp_path, key="plan-a", keep=2, stateful={"scheduler": sched}).resume("t")
    assert state["step"] == 3 and state["tokens"] == 7
    acc2, model2, _, _ = setup()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)  # the saved weights came back
    for step in (4, 5, 6):
        Checkpoints(acc, tmp_path, key="plan-a", keep=2).save(step, {})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000005", "step_0000006"]


def test_the_scheduler_is_kept_as_json_and_nothing_is_registered_for_pickling(tmp_path):
    acc, model, opt, sched = setup()
    batches = data()
    for i in range(3):
        optimizer_step(acc, model, opt, sched, [batches[i]], loss_fn, units, None)
    saved = sched.state_dict()
    Checkpoints(acc, tmp_path, key="k", keep=2, stateful={"scheduler": sched}).save(3, {})
    folder = tmp_path / "step_0000003"
    assert not list(folder.glob("custom_checkpoint_*"))
    state = json.loads((folder / "loop_state.json").read_text())
    assert state["stateful"]["scheduler"]["last_epoch"] == 3
    assert not list(folder.glob("*.tmp"))
    acc2, _, _, sched2 = setup()
    assert Checkpoints(acc2, tmp_path, key="k", keep=2, stateful={"scheduler": sched2}).resume("t")["step"] == 3
    assert sched2.state_dict() == saved and sched2.get_last_lr() == sched.get_last_lr()
    acc2.register_for_checkpointing(sched2)
    with pytest.raises(ValueError, match="register_for_checkpointing"):
        Checkpoints(acc2, tmp_path, key="k", keep=2)


def test_state_json_round_trip():
    from align.train.checkpoints import _from_json, _to_json

    state = {"a": (1, 2.5, [3, (4,)]), "b": {0: "x", 1: None}, "__c": True, "d": [float("inf"), 1e-300]}
    assert _from_json(json.loads(json.dumps(_to_json(state)))) == state
    with pytest.raises(TypeError):
        _to_json({"t": torch.zeros(1)})


def test_a_checkpoint_that_fails_after_a_partial_load_is_overwritten_by_an_older_one_or_stops(tmp_path):
    from align.train.checkpoints import CheckpointError, CheckpointWarning

    acc, model, opt, sched = setup()
    ckpt = Checkpoints(acc, tmp_path, key="k", keep=2, stateful={"scheduler": sched})
    ckpt.save(2, {})
    at_2 = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ckpt.save(4, {})
    real = acc.load_state

    def breaks_on_step_4(path, *args, **kwargs):
        if path.endswith("step_0000004"):
            with torch.no_grad():
                next(iter(model.parameters())).add_(5.0)  # part of it was loaded, then it failed
            raise RuntimeError("simulated failure after the weights")
        return real(path, *args, **kwargs)

    acc.load_state = breaks_on_step_4
    with pytest.warns(CheckpointWarning, match="step_0000004 not used: loading failed"):
        assert ckpt.resume("t")["step"] == 2
    assert ckpt.loaded.name == "step_0000002"
    assert all(torch.equal(a, b) for a, b in zip(at_2, model.parameters(), strict=True))
    shutil.rmtree(tmp_path / "step_0000002")
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="mix of states"):
        ckpt.resume("t")
