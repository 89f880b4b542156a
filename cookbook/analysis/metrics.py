"""Reading a run folder's metrics and plotting the curves people compare (reward, eval accuracy, KL, ...)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Optional

from cookbook.atomic import read_jsonl

METRICS_FILE = "metrics.jsonl"

# What the training plots show by default: (metric key, panel title).
TRAINING_PANELS = (
    ("reward/mean", "mean training reward"),
    ("eval/accuracy", "eval accuracy (test split)"),
    ("response/length_mean", "mean response length (tokens)"),
    ("actor/kl", "KL to reference (k3)"),
    ("mismatch/abs_diff_mean", "|logp trainer - logp rollout|"),
    ("time/step", "step time (s)"),
)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All step rows of ``metrics.jsonl`` (empty when the run has not logged yet)."""
    path = Path(run_dir) / METRICS_FILE
    return read_jsonl(path) if path.exists() else []


def series(rows: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_runs(runs: dict[str, list[dict[str, Any]]], panels: Iterable[tuple[str, str]] = TRAINING_PANELS,
              path: Optional[str | os.PathLike] = None):
    """One panel per metric, one line per run; panels no run has are left out. Saved when ``path`` is set."""
    import matplotlib

    if path is not None and matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(k, t) for k, t in panels if any(series(rows, k)[0] for rows in runs.values())]
    if not present:
        raise ValueError("no metric to plot yet: the runs have no metrics.jsonl rows with these keys")
    cols = min(3, len(present))
    nrows = (len(present) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, present):
        for name, rows in runs.items():
            x, y = series(rows, key)
            ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig
