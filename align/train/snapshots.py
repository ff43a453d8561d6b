"""Policy snapshots along a run: ``STAGE/snapshots/step_N/``, plain HF folders (``save_pretrained``) written
every ``train.snapshot_every`` steps (PPO: iterations), so the policy can be evaluated along its training
(the evaluation stage's ``snapshots: true``). The last step is not written: it is the stage's ``model/``.
Each snapshot is written to ``step_N.partial`` and renamed when complete; a resumed run keeps the ones it
has and writes the rest."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

from align.models.loading import is_peft, save_checkpoint
from align.models.snapshots import SNAPSHOTS


def snapshot_saver(accelerator, every: int, total: int, out_dir: str | Path, policy: Callable[[], object],
                   tokenizer) -> Callable[[int], None] | None:
    """-> ``on_step(done)`` that writes the policy (``policy()``: the unwrapped HF model) after steps
    ``every, 2 * every, ...`` below ``total``; None when ``every`` is 0. Every process calls it."""
    if not every:
        return None
    root = Path(out_dir) / SNAPSHOTS

    def on_step(done: int) -> None:
        if done % every or done >= total:
            return
        target = root / f"step_{done}"
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and not target.is_dir():
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            model = policy()
            # a LoRA model is merged in a copy: the one being trained keeps its adapter
            save_checkpoint(copy.deepcopy(model) if is_peft(model) else model, tokenizer, partial)
            partial.rename(target)
        accelerator.wait_for_everyone()

    return on_step
