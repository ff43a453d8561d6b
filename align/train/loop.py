"""The training loop on accelerate: functions, no Trainer class.

Loss reduction: every stage's loss is a SUM over its units (tokens for SFT, pairs for DPO, ...) and the
loop divides by the unit count of the whole optimizer step across all micro-batches and all processes.
So 1 micro-batch of 8, 8 micro-batches of 1, and 2 processes x 4 give the same gradient: the mean over
the global batch. (DDP averages gradients over processes, hence the extra factor ``world``.)

The pieces, for any stage:

- :func:`optimizer_step`: one optimizer step over this process's micro-batches (accumulation without
  gradient sync until the last, the global-unit reduction above, clipping, scheduler) -> its metrics;
- :class:`Checkpoints`: save and resume the accelerator state plus a small JSON loop state (with the LR
  scheduler's state), keyed so a checkpoint made for other work is ignored. Weights are safetensors, the
  optimizer and RNG states are loaded with ``weights_only=True`` (tensors and plain data only: nothing
  else is unpickled, and a checkpoint holding accelerate's pickled custom state is refused); a damaged
  checkpoint is found before anything is loaded and an older one is used;
- :func:`train`: the supervised loop built from them. Its data order is a plan fixed up front from the
  seed: ``plan[step]`` lists the micro-batches of that step for all processes (process r takes its
  slice); resuming at step s continues at ``plan[s]``. A stage that makes its batches as it goes (PPO's
  rollouts) calls ``optimizer_step`` and ``Checkpoints`` itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from align.config.specs import TrainConfig
from align.io_atomic import write_text_atomic
from align.runtime import StageInputError, StageStopped
from align.train.metrics import MetricsLogger

Plan = list[list[list[int]]]  # step -> micro-batch -> example indices


@dataclass
class TrainSummary:
    steps: int
    resumed_from: int
    first_loss: float | None
    last_loss: float | None
    tokens: int
    seconds: float


def make_plan(
    epoch_groups: Callable[[int], list[list[int]]], epochs: float, per_step: int, max_steps: int | None
) -> Plan:
    """Cut the micro-batches of successive epochs into optimizer steps of ``per_step`` micro-batches
    (``grad_accum * num_processes``). Incomplete trailing steps are dropped."""
    first = epoch_groups(0)
    total_micro = int(math.floor(epochs * len(first)))
    n_steps = max(1, total_micro // per_step)
    if max_steps is not None:
        n_steps = max_steps
    if len(first) < per_step:
        raise StageInputError(
            f"one optimizer step needs {per_step} micro-batches (grad_accum x processes) but an epoch has "
            f"only {len(first)}; lower batch_size or grad_accum"
        )
    stream, epoch = list(first), 0
    while len(stream) < n_steps * per_step:
        epoch += 1
        stream += epoch_groups(epoch)
    return [stream[i * per_step : (i + 1) * per_step] for i in range(n_steps)]


def plan_hash(plan: Plan) -> str:
    return hashlib.sha256(json.dumps(plan).encode()).hexdigest()[:16]


class CheckpointError(StageStopped):
    """No checkpoint could be resumed after one was partly loaded: the model may hold a mix of states."""


class CheckpointWarning(UserWarning):
    """A checkpoint was passed over on resume (damaged, or holding files that are never loaded)."""


class Checkpoints:
    """``<root>/step_NNNNNNN/``: the accelerator state (weights as safetensors, optimizer and RNG states
    as ``torch.save`` zips read with ``weights_only=True``) and ``loop_state.json``, written last and
    atomically: its presence marks the checkpoint complete. ``key`` says what work a checkpoint belongs to
    (e.g. the data plan's hash); a checkpoint with another key is ignored on resume.

    ``stateful``: name -> object with ``state_dict()``/``load_state_dict()`` whose state is plain data
    (the LR scheduler): kept as JSON in ``loop_state.json``. Never register objects with
    ``accelerator.register_for_checkpointing``: accelerate pickles them and unpickles them with
    ``weights_only=False``, so a file planted in a checkpoint folder would run code on resume.

    Resume takes the newest checkpoint of this work that passes :meth:`problem` (every file it lists with
    its size, headers, CRCs and pickles readable with ``weights_only=True``, shapes that fit, no pickled
    custom state), checked BEFORE anything is loaded, so a damaged checkpoint leaves the model untouched;
    it warns about each checkpoint it passes over and starts from scratch when none is usable."""

    def __init__(self, accelerator, root: Path, key: str, keep: int, stateful: dict[str, object] | None = None):
        self.accelerator, self.root, self.key, self.keep = accelerator, Path(root), key, keep
        self.stateful = dict(stateful or {})
        self.loaded: Path | None = None  # the checkpoint resume() loaded
        if getattr(accelerator, "_custom_objects", None):
            raise ValueError("objects registered with accelerator.register_for_checkpointing are pickled and "
                             "unpickled unsafely; pass them to Checkpoints(stateful=...) instead")

    def resume(self, desc: str) -> dict | None:
        """Load the newest usable checkpoint of this work into the accelerator; -> its loop state."""
        acc, partly_loaded, passed_over = self.accelerator, None, False
        for path in sorted(self.root.glob("step_*"), reverse=True):
            if not (path / "loop_state.json").exists():
                acc.print(f"[{desc}] skipping {path.name} (incomplete: no loop_state.json)")
                continue
            state, problem = self._read_state(path)
            if problem is None and state.get("key") != self.key:
                acc.print(f"[{desc}] ignoring {path} (made for other work)")
                continue
            problem = problem or self.problem(path, state)
            if _any_process(acc, problem is not None):
                self._warn(f"[{desc}] checkpoint {path} not used: {problem or 'damaged on another process'}",
                           own=problem is not None)
                passed_over = True
                continue
            try:
                acc.load_state(str(path))
                for name, obj in self.stateful.items():
                    obj.load_state_dict(_from_json(state["stateful"][name]))
                failed = None
            except Exception as err:  # noqa: BLE001 - any failure: try an older checkpoint
                failed = f"loading failed: {type(err).__name__}: {err}"
            if _any_process(acc, failed is not None):
                self._warn(f"[{desc}] checkpoint {path} not used: {failed or 'loading failed on another process'}",
                           own=failed is not None)
                partly_loaded, passed_over = path, True
                continue
            self.loaded = path
            return {k: v for k, v in state.items() if k not in ("stateful", "files")}
        if partly_loaded is not None:
            raise CheckpointError(
                f"[{desc}] {partly_loaded} failed to load after part of it was restored, and no older checkpoint "
                f"in {self.root} is usable: the model may hold a mix of states. Delete {self.root} to start over."
            )
        if passed_over:
            self._warn(f"[{desc}] no usable checkpoint in {self.root}: starting from scratch")
        return None

    def _warn(self, message: str, own: bool = False) -> None:
        """A warning from the main process, and from any other that found the reason itself."""
        import warnings

        if self.accelerator.is_main_process or own:
            warnings.warn(message, CheckpointWarning, stacklevel=3)

    @staticmethod
    def _read_state(path: Path) -> tuple[dict, str | None]:
        try:
            state = json.loads((path / "loop_state.json").read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            return {}, f"loop_state.json unreadable: {err}"
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "key" not in state:
            return {}, "loop_state.json has no step and key"
        return state, None

    def problem(self, path: Path, state: dict) -> str | None:
        """Why the checkpoint at ``path`` (loop state ``state``) cannot be loaded into this accelerator, or
        None; reads headers, CRCs and small pickles (``weights_only=True``), loads no tensor."""
        acc = self.accelerator
        planted = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
        if planted:
            return f"holds {', '.join(planted)}: pickled state, never loaded (not written by this version)"
        for name in self.stateful:
            try:
                _from_json(state["stateful"][name])
            except (KeyError, TypeError, ValueError) as err:
                return f"no usable saved state for {name!r}: {type(err).__name__}: {err}"
        for name, size in (state.get("files") or {}).items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {size} were written"
        for i, model in enumerate(getattr(acc, "_models", [])):
            end = f"_{i}" if i else ""
            weights = path / f"model{end}.safetensors"
            if weights.is_file():
                problem = _safetensors_problem(weights, model)
            else:
                problem = _torch_file_problem(path / f"pytorch_model{end}.bin")
            if problem:
                return problem
        for i, opt in enumerate(getattr(acc, "_optimizers", [])):
            problem = _torch_file_problem(path / (f"optimizer_{i}.bin" if i else "optimizer.bin"), opt)
            if problem:
                return problem
        names = [f"scheduler_{i}.bin" if i else "scheduler.bin" for i in range(len(getattr(acc, "_schedulers", [])))]
        if getattr(acc, "scaler", None) is not None:
            names.append("scaler.pt")
        names.append(f"random_states_{acc.process_index}.pkl")
        for name in names:
            problem = _torch_file_problem(path / name)
            if problem:
                return problem
        return None

    def save(self, step: int, state: dict) -> None:
        acc = self.accelerator
        path = self.root / f"step_{step:07d}"
        extra = {name: _to_json(obj.state_dict()) for name, obj in self.stateful.items()}
        if acc.is_main_process and path.exists():
            shutil.rmtree(path)  # a damaged checkpoint of this step, passed over on resume
        acc.wait_for_everyone()
        acc.save_state(str(path))
        acc.wait_for_everyone()  # every process's files are written
        if acc.is_main_process:
            files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
            write_text_atomic(path / "loop_state.json", json.dumps(
                {"step": step, "key": self.key, **state, "stateful": extra, "files": files}))
            for old in sorted(self.root.glob("step_*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()


def _any_process(accelerator, flag: bool) -> bool:
    """``flag`` on any process (every process takes the same decision)."""
    return global_sum(accelerator, float(flag)) > 0 if accelerator.num_processes > 1 else flag


def _safetensors_problem(path: Path, model: torch.nn.Module) -> str | None:
    """The header is readable, covers the file exactly, and names only tensors of ``model`` with their
    shapes; a tensor of the model it lacks must share its storage with one it has (tied weights)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (OSError, SafetensorError, ValueError) as err:
        return f"{path.name} unreadable: {err}"
    own = model.state_dict()
    for name, shape in shapes.items():
        if name not in own:
            return f"{path.name} holds {name}, not a tensor of this model"
        if tuple(own[name].shape) != shape:
            return f"{path.name}: {name} has shape {list(shape)}, the model {list(own[name].shape)}"
    stored = {own[n].untyped_storage().data_ptr() for n in shapes}
    lacking = [n for n, t in own.items() if n not in shapes and t.untyped_storage().data_ptr() not in stored]
    if lacking:
        return f"{path.name} lacks {lacking[0]}" + (f" and {len(lacking) - 1} more" if len(lacking) > 1 else "")
    return None


def _torch_file_problem(path: Path, optimizer=None) -> str | None:
    """A ``torch.save`` zip whose every record matches its CRC and whose pickle loads with
    ``weights_only=True`` (as accelerate will load it; tensors are memory-mapped, not read). With
    ``optimizer``: its parameter groups match the saved ones."""
    import zipfile

    from accelerate.utils import load

    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        if bad is not None:
            return f"{path.name}: record {bad} does not match its CRC"
        obj = load(str(path), map_location="cpu", mmap=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, refused pickle, ...: all mean unusable
        return f"{path.name} unreadable: {type(err).__name__}: {err}"
    if optimizer is not None:
        try:
            saved = [len(g["params"]) for g in obj["param_groups"]]
        except (KeyError, TypeError) as err:
            return f"{path.name} is not an optimizer state: {err}"
        if saved != [len(g["params"]) for g in optimizer.param_groups]:
            return f"{path.name}: parameter groups of sizes {saved}, the optimizer's differ"
    return None


def _to_json(value):
    """A state dict as JSON-able data that :func:`_from_json` turns back into an equal state dict (tuples
    and dicts with keys other than strings are tagged); anything else (a tensor, a function) -> TypeError."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v) for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _to_json(v) for k, v in value.items()}
        return {"__items__": [[_to_json(k), _to_json(v)] for k, v in value.items()]}
    raise TypeError(f"state of type {type(value).__name__} cannot be kept as JSON")


def _from_json(value):
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        if set(value) == {"__items__"}:
            return {_hashable(_from_json(k)): _from_json(v) for k, v in value["__items__"]}
        return {k: _from_json(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"unexpected {type(value).__name__} in saved state")


def _hashable(key):
    if isinstance(key, list | dict):
        raise TypeError("a saved dict key is not hashable")
    return key


def global_sum(accelerator, value: float) -> float:
    """Sum of ``value`` over all processes."""
    if accelerator.num_processes == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(t, reduction="sum").item())


def optimizer_step(
    accelerator, model, optimizer, scheduler, batches: Sequence[object],
    loss_fn: Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict[str, float]]],
    units: Callable[[object], float], max_grad_norm: float | None,
) -> dict[str, float]:
    """One optimizer step over this process's micro-batches ``batches``.

    ``loss_fn(model, batch) -> (loss_sum, stat_sums)`` returns SUMS over the batch's units; ``units(batch)``
    is that count, known before the forward pass. Gradients are of the mean over the units of the whole
    step on all processes. -> ``loss`` and every stat as that mean, ``lr`` (of this step), ``grad_norm``
    (before clipping), ``tokens`` (all processes), ``tokens_per_s``.
    """
    t0 = time.perf_counter()
    world = accelerator.num_processes
    global_units = global_sum(accelerator, sum(units(b) for b in batches))
    denominator = max(global_units, 1e-12)
    scale = world / denominator  # DDP averages gradients over processes
    loss_sum, sums, local_tokens = 0.0, {}, 0
    for j, batch in enumerate(batches):
        sync = j == len(batches) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
            loss, stats = loss_fn(model, batch)
            accelerator.backward(loss * scale)
        loss_sum += float(loss.detach())
        local_tokens += int(getattr(batch, "num_tokens", 0))
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
    lr = scheduler.get_last_lr()[0]
    _check_finite(accelerator, loss_sum, grad_norm, lr)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = int(global_sum(accelerator, local_tokens))
    metrics = {"loss": global_sum(accelerator, loss_sum) / denominator, "lr": lr}
    for k in sorted(sums):
        metrics[k] = global_sum(accelerator, sums[k]) / denominator
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm
    metrics["tokens"] = tokens
    metrics["tokens_per_s"] = tokens / max(time.perf_counter() - t0, 1e-9)
    return metrics


class TrainingDiverged(StageStopped):
    """The loss or the gradient stopped being finite: the step is not taken and nothing is saved."""


def _check_finite(accelerator, loss_sum: float, grad_norm: float | None, lr: float) -> None:
    """Stop before the optimizer applies a non-finite update (on every process alike)."""
    bad = not math.isfinite(loss_sum) or (grad_norm is not None and not math.isfinite(grad_norm))
    if accelerator.num_processes > 1:
        bad = global_sum(accelerator, float(bad)) > 0
    if bad:
        raise TrainingDiverged(
            f"training diverged: loss {loss_sum:.4g}, gradient norm {grad_norm} at learning rate {lr:.3g}; "
            "lower train.optim.lr (or check the data for empty targets)"
        )


def progress_bar(accelerator, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not accelerator.is_main_process,
                dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)


def train(
    *,
    accelerator,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    plan: Plan,
    make_batch: Callable[[Sequence[int]], object],
    loss_fn: Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict[str, float]]],
    units: Callable[[object], float],
    cfg: TrainConfig,
    out_dir: Path,
    logger: MetricsLogger,
    desc: str = "train",
    on_step: Callable[[int], None] | None = None,
) -> TrainSummary:
    """Run ``plan`` (resuming from the latest checkpoint in ``out_dir/checkpoints`` if any), one
    :func:`optimizer_step` per entry."""
    checkpoints = Checkpoints(accelerator, Path(out_dir) / "checkpoints", plan_hash(plan), cfg.keep_checkpoints,
                              stateful={"scheduler": scheduler})
    state = checkpoints.resume(desc) or {}
    start, tokens_seen = state.get("step", 0), state.get("tokens", 0)
    first_loss, last_loss = state.get("first_loss"), None
    if start:
        logger.truncate_after(start)
        accelerator.print(f"[{desc}] resuming from {checkpoints.loaded.name} (step {start}/{len(plan)})")
    rank, accum = accelerator.process_index, cfg.grad_accum
    bar = progress_bar(accelerator, len(plan), start, desc)
    model.train()
    t_start = time.perf_counter()
    for step in range(start, len(plan)):
        batches = [make_batch(group) for group in plan[step][rank * accum : (rank + 1) * accum]]
        try:
            metrics = optimizer_step(accelerator, model, optimizer, scheduler, batches, loss_fn, units,
                                     cfg.optim.max_grad_norm)
        except TrainingDiverged as err:
            raise TrainingDiverged(f"[{desc}] step {step + 1}/{len(plan)}: {err}") from None
        tokens_seen += metrics.pop("tokens")
        first_loss = metrics["loss"] if first_loss is None else first_loss
        last_loss = metrics["loss"]
        done = step + 1
        if done % cfg.log_every == 0 or done == len(plan):
            logger.log(done, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)  # drawn at tqdm's interval
        bar.update(1)
        if cfg.save_every and done % cfg.save_every == 0 and done < len(plan):
            checkpoints.save(done, {"tokens": tokens_seen, "first_loss": first_loss})
        if on_step is not None:
            on_step(done)
    bar.close()
    return TrainSummary(
        steps=len(plan),
        resumed_from=start,
        first_loss=first_loss,
        last_loss=last_loss,
        tokens=tokens_seen,
        seconds=time.perf_counter() - t_start,
    )
