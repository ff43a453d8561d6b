"""Metric sinks: ``metrics.jsonl`` always, TensorBoard and W&B when asked. Main process only."""

from __future__ import annotations

import json
import math
from pathlib import Path

from align.io_atomic import append_line, read_json_lines, write_text_atomic


class MetricsLogger:
    def __init__(self, out_dir: Path, report_to: list[str], enabled: bool = True, run_name: str = ""):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
        if "wandb" in report_to:
            import wandb  # optional extra: pip install align[wandb]

            self._wandb = wandb.init(name=run_name or None, dir=str(out_dir), reinit=True)

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after ``step`` (they are redone when a run resumes), and any line a kill
        cut short."""
        if not (self.enabled and self.path.exists()):
            return
        self._keep(lambda row: row.get("step", 0) <= step)

    def log(self, step: int, metrics: dict, prefix: str = "train", replace: bool = False) -> None:
        """Append a row of ``metrics`` under ``prefix/``; ``replace``: first drop an earlier row of the same step
        and prefix (a resumed run logs its held-out numbers before training again)."""
        if not self.enabled:
            return
        if replace and self.path.exists():
            self._keep(lambda row: not (row.get("step") == step and any(k.startswith(f"{prefix}/") for k in row)))
        row = {"step": step, **{f"{prefix}/{k}": v for k, v in metrics.items()}}
        append_line(self.path, json.dumps(_finite_or_null(row), allow_nan=False))  # NaN is not JSON
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def _keep(self, wanted) -> None:
        """Rewrite metrics.jsonl with the rows ``wanted(row)`` accepts (and none a kill cut short)."""
        keep = [row for _, row, bad in read_json_lines(self.path) if bad is None and isinstance(row, dict) and wanted(row)]
        write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [row for _, row, bad in read_json_lines(path) if bad is None]  # not a line a kill cut short


def _finite_or_null(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
