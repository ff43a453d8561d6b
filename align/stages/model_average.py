"""Model averaging: the (weighted) mean of the weights of several checkpoints of one architecture.

Llama 3 averages models from runs with different data or hyperparameters at its RM, SFT and DPO stages.
Works on the saved HF folders directly, so causal LMs and sequence-classification (reward) models alike:
the safetensors files are read tensor by tensor (no model is built), averaged in float32 and written in
the first checkpoint's dtype and file layout (one output shard in memory at a time). Config, tokenizer
and every other top-level file are copied from the first checkpoint. Checkpoints must agree on their
config (apart from bookkeeping keys) and on parameter names and shapes; otherwise the stage stops and
names the two checkpoints and the first difference.

Simplification: files that describe a model's outputs rather than its weights, e.g. a reward model's
``reward_stats.json`` (whitening mean and std), are the first model's; recompute them if they matter.
"""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from align.checksums import MANIFEST, verify_model_folder, write_manifest
from align.config.model_average import BOOKKEEPING_KEYS, ModelAverageStage
from align.runtime import StageContext, StageInputError, StageResult

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class CheckpointMismatchError(StageInputError):
    """Two checkpoints that cannot be averaged."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. F32, BF16


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict
    tensors: dict[str, TensorInfo]  # parameter name -> where it is stored
    files: list[Path]  # the safetensors files, in name order


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Index a saved HF checkpoint folder: its config and where each tensor is (nothing is loaded)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise StageInputError(f"{path}: not an HF checkpoint folder (no config.json)")
    verify_model_folder(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise StageInputError(f"{path}: no *.safetensors weights; only safetensors checkpoints can be "
                              "averaged (save_pretrained writes them by default)")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name in tensors:
                    raise StageInputError(f"{path}: tensor '{name}' is stored twice")
                s = f.get_slice(name)
                tensors[name] = TensorInfo(file, tuple(s.get_shape()), s.get_dtype())
    return Checkpoint(path, json.loads((path / "config.json").read_text()), tensors, files)


def check_compatible(a: Checkpoint, b: Checkpoint) -> None:
    """Raise CheckpointMismatchError naming both checkpoints and the first difference in config keys,
    parameter names or shapes."""
    where = f"cannot average {a.path} and {b.path}"
    for key in sorted((set(a.config) | set(b.config)) - BOOKKEEPING_KEYS):
        va, vb = (repr(c.config[key]) if key in c.config else "absent" for c in (a, b))
        if va != vb:
            raise CheckpointMismatchError(f"{where}: config.json '{key}' differs ({va} vs {vb})")
    for name in sorted(set(a.tensors) | set(b.tensors)):
        if name not in b.tensors or name not in a.tensors:
            has, lacks = (a, b) if name in a.tensors else (b, a)
            raise CheckpointMismatchError(f"{where}: parameter '{name}' is in {has.path} but not in {lacks.path}")
        sa, sb = a.tensors[name].shape, b.tensors[name].shape
        if sa != sb:
            raise CheckpointMismatchError(f"{where}: parameter '{name}' has shape {list(sa)} vs {list(sb)}")


def average_checkpoints(paths: list[str | Path], weights: list[float], out_dir: str | Path) -> dict[str, float]:
    """Write the weighted mean of the checkpoints at ``paths`` to ``out_dir``; returns metrics.

    1. index every checkpoint and check each against the first  2. per output file of the first
    checkpoint: accumulate each tensor in float32, cast back, save  3. copy the other top-level files.
    ``weights`` are used as given (normalise them first).
    """
    # step 1
    ckpts = [read_checkpoint(p) for p in paths]
    for other in ckpts[1:]:
        check_compatible(ckpts[0], other)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sq_dist, numel = [0.0] * len(ckpts), 0
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="pt")) for c in ckpts for f in c.files}
        # step 2
        for file in ckpts[0].files:
            averaged = {}
            names = [n for n, info in ckpts[0].tensors.items() if info.file == file]
            for name in names:
                tensors = [handles[c.tensors[name].file].get_tensor(name) for c in ckpts]
                mean = _weighted_mean(tensors, weights, name, ckpts)
                for i, t in enumerate(tensors):
                    sq_dist[i] += float((t.float() - mean).pow(2).sum())
                numel += mean.numel()
                averaged[name] = mean.to(tensors[0].dtype).contiguous()
            save_file(averaged, str(out / file.name), metadata={"format": "pt"})
    # step 3
    for item in ckpts[0].path.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name != MANIFEST:
            shutil.copy2(item, out / item.name)
    write_manifest(out)  # last: the averaged folder's own digests
    rms = [(d / max(numel, 1)) ** 0.5 for d in sq_dist]
    return {"models": float(len(ckpts)), "parameters": float(numel),
            "rms_distance_to_average": sum(rms) / len(rms)}


def _weighted_mean(tensors: list[torch.Tensor], weights: list[float], name: str, ckpts) -> torch.Tensor:
    if not tensors[0].is_floating_point():  # integer buffers: must agree, kept as they are
        for t, c in zip(tensors[1:], ckpts[1:], strict=True):
            if not torch.equal(t, tensors[0]):
                raise CheckpointMismatchError(
                    f"cannot average {ckpts[0].path} and {c.path}: non-float tensor '{name}' differs")
        return tensors[0]
    mean = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for t, w in zip(tensors, weights, strict=True):
        mean.add_(t.float(), alpha=w)
    return mean


def run(stage: ModelAverageStage, ctx: StageContext) -> StageResult:
    """1. resolve the checkpoints  2. average them into ``model/``  3. report."""
    # step 1
    paths = [ctx.model_path(ref) for ref in stage.models]
    weights = stage.normalised_weights()
    # step 2
    (kind,) = ctx.outputs
    model_dir = ctx.output(kind)
    metrics = average_checkpoints(paths, weights, model_dir)
    # step 3
    print(f"[{stage.name}] averaged {len(paths)} checkpoints (weights {[round(w, 4) for w in weights]}): "
          f"{int(metrics['parameters']) / 1e6:.2f}M parameters, RMS distance to the average "
          f"{metrics['rms_distance_to_average']:.3g}")
    return StageResult(metrics=metrics)
