"""Step metrics: one JSON line per step in the run folder, mirrored to TensorBoard and wandb.

``metrics.jsonl`` is the source of truth (the analysis notebook reads it); on resume, lines past the
checkpoint's step are dropped so a resumed run's file equals an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from cookbook.analysis.metrics import METRICS_FILE, read_metrics
from cookbook.config import CookbookConfig, to_yaml


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_metrics(run_dir: str | os.PathLike, last_step: int) -> None:
    """Keep only the lines with step <= last_step (what the checkpoint being resumed had seen)."""
    from cookbook.atomic import write_jsonl

    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    write_jsonl(Path(run_dir) / METRICS_FILE, rows)


def wandb_mode(cfg: CookbookConfig) -> str:
    mode = cfg.logging.wandb_mode
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class MetricsTracker:
    """Append step metrics to metrics.jsonl, TensorBoard and wandb (offline unless a key is set)."""

    def __init__(self, cfg: CookbookConfig, resume_step: Optional[int] = None):
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_metrics(self.run_dir, resume_step)
        self._file = open(self.run_dir / METRICS_FILE, "a")
        self._tb = None
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step)
        self._wandb = None
        mode = wandb_mode(cfg)
        if mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.logging.wandb_project, name=cfg.run_name, id=cfg.run_name.replace("/", "-"),
                dir=str(self.run_dir), mode=mode, resume="allow", config={"yaml": to_yaml(cfg)},
                settings=wandb.Settings(silent=True, console="off"),
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
