"""Checkpoints of a training loop: ``<root>/step_NNNNNNN/`` with the accelerator state (safetensors
weights; optimizer and RNG state read with ``weights_only=True``) and ``loop_state.json`` (written last and
atomically: its presence marks the checkpoint complete; it carries the loop's own state and the scheduler's
as JSON, every file's size and SHA-256, and a checksum of itself). Nothing is unpickled. Before loading, a
checkpoint is checked (contents included: a flipped bit is found); a damaged newest one falls back to the
previous one with a :class:`CheckpointWarning`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from align.checksums import digests, folder_files, mismatch
from align.io_atomic import write_text_atomic
from align.runtime import StageStopped
from align.train.collective import any_process


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
    its size and SHA-256, headers, CRCs and pickles readable with ``weights_only=True``, shapes that fit, no
    pickled custom state), checked BEFORE anything is loaded, so a damaged checkpoint leaves the model
    untouched; it warns about each checkpoint it passes over and starts from scratch when none is usable."""

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
            if any_process(acc, problem is not None):
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
            if any_process(acc, failed is not None):
                self._warn(f"[{desc}] checkpoint {path} not used: {failed or 'loading failed on another process'}",
                           own=failed is not None)
                partly_loaded, passed_over = path, True
                continue
            self.loaded = path
            return {k: v for k, v in state.items() if k not in ("stateful", "files", "sha256")}
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
        if "checksum" in state and state.pop("checksum") != _state_checksum(state):
            return {}, "loop_state.json does not match its checksum (its content changed after it was written)"
        return state, None

    def problem(self, path: Path, state: dict) -> str | None:
        """Why the checkpoint at ``path`` (loop state ``state``) cannot be loaded into this accelerator, or
        None; reads headers, CRCs and small pickles (``weights_only=True``), loads no tensor."""
        planted = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
        if planted:
            return f"holds {', '.join(planted)}: pickled state, never loaded (not written by this version)"
        for name in self.stateful:
            try:
                _from_json(state["stateful"][name])
            except (KeyError, TypeError, ValueError) as err:
                return f"no usable saved state for {name!r}: {type(err).__name__}: {err}"
        return self._files_problem(path, state) or self._model_problem(path) or self._state_file_problem(path)

    def _files_problem(self, path: Path, state: dict) -> str | None:
        """A listed file missing, of another size, or (checkpoints that carry digests) of other content:
        checked before any header is parsed. The processes share the hashing: each reads its part of the
        files, and :meth:`resume` passes the checkpoint over when any of them finds a mismatch."""
        for name, size in (state.get("files") or {}).items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {size} were written"
        sha256 = state.get("sha256") or {}  # absent in checkpoints written before digests were kept
        acc = self.accelerator
        share = sorted(sha256)[acc.process_index :: max(acc.num_processes, 1)]
        return mismatch(path, {name: sha256[name] for name in share})

    def _model_problem(self, path: Path) -> str | None:
        for i, model in enumerate(getattr(self.accelerator, "_models", [])):
            end = f"_{i}" if i else ""
            weights = path / f"model{end}.safetensors"
            if weights.is_file():
                problem = _safetensors_problem(weights, model)
            else:
                problem = _torch_file_problem(path / f"pytorch_model{end}.bin")
            if problem:
                return problem
        return None

    def _state_file_problem(self, path: Path) -> str | None:
        acc = self.accelerator
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
            names = folder_files(path)
            files = {name: (path / name).stat().st_size for name in names}
            saved = {"step": step, "key": self.key, **state, "stateful": extra, "files": files,
                     "sha256": digests(path, names)}
            write_text_atomic(path / "loop_state.json", json.dumps({**saved, "checksum": _state_checksum(saved)}))
            for old in sorted(self.root.glob("step_*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()


def _state_checksum(state: dict) -> str:
    """SHA-256 of the loop state as canonical JSON: a changed number in ``loop_state.json`` is found too."""
    canonical = json.loads(json.dumps(state))  # as read back: tuples as lists, keys as strings
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


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
