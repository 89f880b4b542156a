"""A training plot that redraws in place while a notebook cell runs (and is saved as a file)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cookbook.analysis.metrics import TRAINING_PANELS, plot_runs, read_metrics


class LivePlot:
    """Pass as ``on_step`` to the trainer: every ``every`` steps it redraws the run's curves."""

    def __init__(self, run_dir: str | os.PathLike, every: int = 5, name: str = "this run"):
        self.run_dir, self.every, self.name = Path(run_dir), max(1, every), name
        self._handle = None

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        if step % self.every == 0:
            self.draw()

    def draw(self, path: str | os.PathLike | None = None):
        import matplotlib.pyplot as plt
        from IPython.display import display

        fig = plot_runs({self.name: read_metrics(self.run_dir)}, TRAINING_PANELS, path=path)
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)
        plt.close(fig)
        return fig
