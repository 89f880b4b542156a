"""Reading a run folder's metrics and plotting the curves people compare (reward, eval accuracy, KL, ...).

One plotting path serves notebook 30's live plot (``plot_runs`` on one run) and notebook 90's comparisons
(``plot_runs`` on many runs, ``plot_groups`` for the mean over seeds): a panel is a ``(metric key, title)`` pair,
drawn only when at least one run logged the key, and a panel that some runs lack names them.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from cookbook.atomic import atomic_file, read_jsonl

METRICS_FILE = "metrics.jsonl"

Rows = list[dict[str, Any]]
Panel = tuple[str, str]  # (metric key, panel title); a key with "{L}" is a per-MoE-layer family, see panel_series

# What the training plots show by default: (metric key, panel title).
TRAINING_PANELS = (
    ("reward/mean", "mean training reward"),
    ("eval/accuracy", "eval accuracy (test split)"),
    ("response/length_mean", "mean response length (tokens)"),
    ("actor/kl", "KL to reference (k3)"),
    ("mismatch/abs_diff_mean", "|logp trainer - logp rollout|"),
    ("time/step", "step time (s)"),
)

# Notebook 90 / `cookbook report`: one figure per group of panels, one line per run.
COMPARE_PANELS: dict[str, tuple[Panel, ...]] = {
    "training": (
        ("reward/mean", "mean training reward"),
        ("eval/accuracy", "eval accuracy (test split)"),
        ("response/length_mean", "mean response length (tokens)"),
        ("actor/kl", "KL to reference (k3)"),
        ("actor/entropy", "policy entropy (nats/token)"),
        ("actor/clip_frac_low", "clipped share, ratio < 1-eps (A<0)"),
        ("actor/clip_frac_high", "clipped share, ratio > 1+eps (A>0)"),
        ("time/step", "step time (s)"),
    ),
    "mismatch": (
        ("mismatch/abs_diff_mean", "mean |logp trainer - logp rollout|"),
        ("mismatch/abs_diff_p99", "p99 |logp trainer - logp rollout|"),
        ("mismatch/frac_over_threshold", "share of tokens with |diff| > threshold"),
        ("is/masked_token_frac", "importance correction: tokens masked"),
        ("is/masked_seq_frac", "importance correction: sequences masked"),
        ("is/touched_seq_frac", "importance correction: sequences with a token masked"),
    ),
    "routing": (
        ("routing/rollout_vs_trainer", "top-k experts differ, rollout vs trainer\n(share of token x MoE layer)"),
        ("routing/rollout_vs_trainer_any_layer",
         "top-k experts differ, rollout vs trainer\n(share of tokens, any layer)"),
        ("routing/rollout_vs_trainer_unreplayed", "under replay: the trainer's own router vs rollout\n"
                                                  "(share of token x MoE layer)"),
        ("routing/rollout_vs_trainer_unreplayed_any_layer", "under replay: the trainer's own router vs rollout\n"
                                                            "(share of tokens, any layer)"),
        ("routing/policy_change", "experts changed by the step's updates\n(share of token x MoE layer)"),
        ("routing/policy_change_any_layer", "experts changed by the step's updates\n(share of tokens, any layer)"),
        ("routing/rollout_vs_trainer_layer{L}", "rollout vs trainer by MoE layer\n(mean over steps)"),
        ("routing/policy_change_layer{L}", "policy change by MoE layer\n(mean over steps)"),
    ),
}

# The study view: mean over the runs of a group (seeds), with error bars.
STUDY_PANELS: tuple[Panel, ...] = (
    ("eval/accuracy", "eval accuracy (test split)"),
    ("mismatch/abs_diff_mean", "mean |logp trainer - logp rollout|"),
    ("routing/rollout_vs_trainer", "routing disagreement, rollout vs trainer"),
    ("routing/policy_change", "routing change between policy versions"),
)

SPREADS = {"minmax": "min-max over the group's runs", "std": "+-1 sample std (ddof=1) over the group's runs"}


def read_metrics(run_dir: str | os.PathLike) -> Rows:
    """All step rows of ``metrics.jsonl`` (empty when the run has not logged yet)."""
    path = Path(run_dir) / METRICS_FILE
    return read_jsonl(path) if path.exists() else []


def series(rows: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def layer_keys(rows: Iterable[dict[str, Any]], pattern: str) -> dict[int, str]:
    """The metric keys of a per-layer family (``routing/policy_change_layer{L}``) present in ``rows``, by layer."""
    head, _, tail = pattern.partition("{L}")
    rx = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + "$")
    found: dict[int, str] = {}
    for r in rows:
        for k, v in r.items():
            m = rx.match(k)
            if m and v is not None:
                found[int(m.group(1))] = k
    return dict(sorted(found.items()))


def panel_series(rows: Rows, key: str) -> tuple[list[float], list[float]]:
    """What a panel draws for one run: the metric against the step, or for a ``{L}`` family the mean over the
    steps of each layer's metric against the layer."""
    if "{L}" not in key:
        return series(rows, key)
    xs, ys = [], []
    for layer, k in layer_keys(rows, key).items():
        values = series(rows, k)[1]
        xs.append(layer)
        ys.append(sum(values) / len(values))
    return xs, ys


def has_metric(rows: Rows, key: str) -> bool:
    return bool(panel_series(rows, key)[0])


def _pyplot(path):
    import matplotlib

    inline = "module://matplotlib_inline.backend_inline"
    if path is not None and matplotlib.get_backend().lower() not in ("agg", inline):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, n: int, cols: int):
    cols = max(1, min(cols, n))
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)[:n]


def _title(ax, title: str, lacking: Sequence[str]) -> None:
    ax.set_title(title + (f"\nno data: {', '.join(lacking)}" if lacking else ""), fontsize=9)


def _finish(fig, axes, names: list[str], path, suptitle: str = "", legend_from: int = 2):
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    ordered = [n for n in names if n in handles]
    fig.tight_layout()
    top = 1.0
    if suptitle:
        fig.suptitle(suptitle, fontsize=10, y=1.0, va="bottom")
        top = 1.0 + 0.25 / fig.get_figheight()
    if len(ordered) >= legend_from:
        fig.legend([handles[n] for n in ordered], ordered, loc="lower center", bbox_to_anchor=(0.5, top),
                   ncol=min(len(ordered), 6), fontsize=8, frameon=False)
    if path is not None:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    return fig


def plot_runs(runs: dict[str, Rows], panels: Iterable[Panel] = TRAINING_PANELS,
              path: Optional[str | os.PathLike] = None, cols: int = 3):
    """One panel per metric, one line per run (the same colour in every panel); panels no run has are left out,
    and a panel some runs lack says which ("no data: ..."). Saved (PNG, atomically) when ``path`` is set."""
    plt = _pyplot(path)
    present = [(k, t) for k, t in panels if any(has_metric(rows, k) for rows in runs.values())]
    if not present:
        raise ValueError("no metric to plot yet: the runs have no metrics.jsonl rows with these keys")
    names = list(runs)
    fig, axes = _grid(plt, len(present), cols)
    for ax, (key, title) in zip(axes, present):
        lacking = []
        for i, (name, rows) in enumerate(runs.items()):
            x, y = panel_series(rows, key)
            if not x:
                lacking.append(name)
                continue
            ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, color=f"C{i % 10}", label=name)
        _title(ax, title, lacking)
        ax.set_xlabel("MoE layer" if "{L}" in key else "step")
        if "{L}" in key:
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    return _finish(fig, axes, names, path)


def aggregate(per_run: Sequence[tuple[Sequence[float], Sequence[float]]], spread: str = "minmax"):
    """Mean over runs at each step, with the spread the error bars show.

    ``per_run`` holds one ``(steps, values)`` pair per run. Returns ``(steps, mean, low, high, n)``, lists over
    the steps any run logged; at each step only the runs that logged it count (``n``). ``spread="minmax"``: low
    and high are the smallest and largest value; ``"std"``: mean -+ the sample standard deviation (ddof=1; 0 for
    a single run).
    """
    if spread not in SPREADS:
        raise ValueError(f"spread {spread!r}: must be one of {', '.join(SPREADS)}")
    by_step: dict[float, list[float]] = {}
    for steps, values in per_run:
        for s, v in zip(steps, values):
            by_step.setdefault(s, []).append(float(v))
    out: tuple[list, list, list, list, list] = ([], [], [], [], [])
    for s in sorted(by_step):
        v = by_step[s]
        mean = sum(v) / len(v)
        if spread == "minmax":
            lo, hi = min(v), max(v)
        else:
            sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
            lo, hi = mean - sd, mean + sd
        for col, val in zip(out, (s, mean, lo, hi, len(v))):
            col.append(val)
    return out


def plot_groups(groups: dict[str, dict[str, Rows]], panels: Iterable[Panel] = STUDY_PANELS, spread: str = "minmax",
                path: Optional[str | os.PathLike] = None, cols: int = 4):
    """The study view: per group of runs (``{group: {run: rows}}``, e.g. the seeds of one setting) the mean at
    each step with error bars (``spread``, see ``aggregate``); one line per group, panels as in ``plot_runs``."""
    if spread not in SPREADS:
        raise ValueError(f"spread {spread!r}: must be one of {', '.join(SPREADS)}")
    plt = _pyplot(path)
    present = [(k, t) for k, t in panels
               if any(has_metric(rows, k) for runs in groups.values() for rows in runs.values())]
    if not present:
        raise ValueError("no metric to plot: no run of these groups has these keys")
    names = [f"{g} (n={len(runs)})" for g, runs in groups.items()]
    fig, axes = _grid(plt, len(present), cols)
    for ax, (key, title) in zip(axes, present):
        lacking = []
        for i, ((group, runs), name) in enumerate(zip(groups.items(), names)):
            steps, mean, lo, hi, _ = aggregate([panel_series(rows, key) for rows in runs.values()], spread)
            if not steps:
                lacking.append(group)
                continue
            ax.errorbar(steps, mean, yerr=[[m - a for m, a in zip(mean, lo)], [b - m for m, b in zip(mean, hi)]],
                        marker="o" if len(steps) < 30 else None, ms=3, capsize=2, elinewidth=0.8,
                        color=f"C{i % 10}", label=name)
        _title(ax, title, lacking)
        ax.set_xlabel("MoE layer" if "{L}" in key else "step")
        ax.grid(alpha=0.3)
    return _finish(fig, axes, names, path, suptitle=f"mean over each group's runs; error bars: {SPREADS[spread]}",
                   legend_from=1)
