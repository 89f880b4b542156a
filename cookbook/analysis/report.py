"""Comparing runs (notebook 90, ``cookbook report``): load run folders, plot them side by side, group seeds into a
study with error bars, and write the figures (PNG) and tables (CSV).

Every panel is drawn only when at least one run logged its metric; which runs lack a metric is said in the panel
("no data: ...") and in the coverage table, and a figure none of whose metrics any run logged is not drawn (the
report says why instead).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

from cookbook.analysis.metrics import (COMPARE_PANELS, METRICS_FILE, SPREADS, STUDY_PANELS, Panel, Rows, aggregate,
                                       layer_keys, panel_series, plot_groups, plot_runs, read_metrics, series)
from cookbook.atomic import write_text
from cookbook.rundir import project_root, resolve_from_root

# Runs named "<case>-seed<k>" (or _seed<k>, -seed-<k>) form the group "<case>" in the study view.
SEED_PATTERN = r"^(?P<group>.+?)[-_]seed[-_]?\d+$"
FIGURE_FILES = {"training": "compare_training.png", "mismatch": "compare_mismatch.png",
                "routing": "compare_routing.png", "study": "study.png"}
# Summary columns: (column, metric, how a run's series becomes one number).
SUMMARY_COLUMNS = (
    ("final eval accuracy", "eval/accuracy", "last"),
    ("best eval accuracy", "eval/accuracy", "max"),
    ("mean |logp diff|", "mismatch/abs_diff_mean", "mean"),
    ("mean p99 |logp diff|", "mismatch/abs_diff_p99", "mean"),
    ("mean share over threshold", "mismatch/frac_over_threshold", "mean"),
    ("mean routing disagreement", "routing/rollout_vs_trainer", "mean"),
    ("mean routing disagreement (any layer)", "routing/rollout_vs_trainer_any_layer", "mean"),
    ("mean routing policy change", "routing/policy_change", "mean"),
)
STUDY_COLUMNS = ("final eval accuracy", "best eval accuracy", "mean |logp diff|", "mean routing disagreement")


@dataclass
class Run:
    """One run folder: its label, its metrics rows and its saved config (``{}`` without config.yaml)."""

    label: str
    path: Path
    rows: Rows
    config: dict[str, Any] = field(default_factory=dict)


def load_run(path: str | os.PathLike, label: str = "") -> Run:
    """Read a run folder (relative paths mean the project root); a missing folder or a folder without
    ``metrics.jsonl`` is a ``FileNotFoundError`` naming the path."""
    p = resolve_from_root(path)
    if not p.is_dir():
        what = "is not a folder" if p.exists() else "does not exist"
        raise FileNotFoundError(f"run folder {p} {what}")
    if not (p / METRICS_FILE).is_file():
        raise FileNotFoundError(f"run folder {p} has no {METRICS_FILE} (training writes it: notebook 30 or "
                                "`cookbook train`)")
    rows = read_metrics(p)
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not isinstance(r.get("step"), int):
            raise ValueError(f"{p / METRICS_FILE}, line {i}: a step row needs an integer 'step'")
    config: dict[str, Any] = {}
    if (p / "config.yaml").is_file():
        config = yaml.safe_load((p / "config.yaml").read_text()) or {}
    return Run(label or p.name, p, rows, config)


def load_runs(paths: Sequence[str | os.PathLike], labels: Sequence[str] = ()) -> list[Run]:
    """Read run folders; each is labelled by ``labels`` (same order; "" or none: the folder name). Two runs with
    the same folder name are labelled ``parent/name``."""
    if labels and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs: give one label per run (or none)")
    runs = [load_run(p, (labels[i] if labels else "") or "") for i, p in enumerate(paths)]
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1 and r.label == r.path.name:
            r.label = f"{r.path.parent.name}/{r.path.name}"
    seen: dict[str, Path] = {}
    for r in runs:
        if r.label in seen:
            raise ValueError(f"two runs labelled '{r.label}' ({seen[r.label]} and {r.path}): give distinct labels")
        seen[r.label] = r.path
    return runs


def find_runs(runs_dir: str | os.PathLike = "runs") -> list[Path]:
    """The run folders under ``runs_dir`` that have a ``metrics.jsonl``, by name."""
    root = resolve_from_root(runs_dir)
    return sorted(p for p in root.iterdir() if (p / METRICS_FILE).is_file()) if root.is_dir() else []


def group_runs(runs: Sequence[Run], groups: Optional[dict[str, Sequence[str]]] = None,
               pattern: str = SEED_PATTERN) -> dict[str, list[Run]]:
    """The study's groups. With ``groups`` ({label: [run label or folder, ...]}) exactly those; without, runs
    whose label matches ``pattern`` (``<case>-seed<k>``) are grouped by case and any other run is a group of
    its own."""
    if groups:
        out: dict[str, list[Run]] = {}
        for name, members in groups.items():
            if isinstance(members, (str, os.PathLike)):
                members = [members]
            out[name] = [_find(runs, m) for m in members]
        return out
    rx = re.compile(pattern, re.IGNORECASE)
    out = {}
    for r in runs:
        m = rx.match(r.label)
        out.setdefault(m.group("group") if m else r.label, []).append(r)
    return out


def _find(runs: Sequence[Run], member: str | os.PathLike) -> Run:
    path = resolve_from_root(member)
    for r in runs:
        if r.label == str(member) or r.path == path:
            return r
    raise ValueError(f"group member '{member}' is neither a run label nor a run folder of this report "
                     f"(runs: {', '.join(r.label for r in runs)})")


def _reduce(rows: Rows, key: str, how: str) -> tuple[float, Optional[int]]:
    steps, values = series(rows, key)
    if not values:
        return float("nan"), None
    if how == "last":
        return values[-1], steps[-1]
    if how == "max":
        i = max(range(len(values)), key=values.__getitem__)
        return values[i], steps[i]
    return sum(values) / len(values), None


def summary_table(runs: Sequence[Run], groups: Optional[dict[str, list[Run]]] = None):
    """One row per run: final and best eval accuracy (with their steps), and the means over the steps of the
    mismatch and routing metrics; NaN (an empty CSV cell) where the run did not log the metric."""
    import pandas as pd

    group_of = {id(r): g for g, members in (groups or {}).items() for r in members}
    records = []
    for r in runs:
        rec: dict[str, Any] = {"run": r.label, "group": group_of.get(id(r), ""), "folder": _shown(r.path),
                               "last step": max((x["step"] for x in r.rows), default=None)}
        for column, key, how in SUMMARY_COLUMNS:
            value, step = _reduce(r.rows, key, how)
            rec[column] = value
            if how == "max":
                rec[f"{column} step"] = step
        records.append(rec)
    table = pd.DataFrame(records).set_index("run")
    steps = [c for c in table.columns if c.endswith("step")]
    return table.astype({c: "Int64" for c in steps})  # steps stay integers beside a run that has none


def study_table(summary, groups: dict[str, list[Run]], spread: str = "minmax"):
    """One row per group: how many runs, and for the main summary columns the mean over the group's runs with
    ``spread`` (min and max, or the sample std), computed by the same ``aggregate`` as the study's error bars.
    Runs without the metric do not count (``n`` columns)."""
    import pandas as pd

    records = []
    for name, members in groups.items():
        rec: dict[str, Any] = {"group": name, "runs": len(members)}
        for column in STUDY_COLUMNS:
            values = [v for v in (summary.loc[r.label, column] for r in members) if v == v]  # NaN != NaN
            _, mean, lo, hi, _ = aggregate([([0], [v]) for v in values], spread)
            m = mean[0] if mean else float("nan")
            rec[f"{column} mean"] = m
            if spread == "minmax":
                rec[f"{column} min"] = lo[0] if lo else float("nan")
                rec[f"{column} max"] = hi[0] if hi else float("nan")
            else:
                rec[f"{column} std"] = hi[0] - m if hi else float("nan")
            rec[f"{column} n"] = len(values)
        records.append(rec)
    return pd.DataFrame(records).set_index("group")


def coverage_table(runs: Sequence[Run], panels: dict[str, Iterable[Panel]] = COMPARE_PANELS):
    """Which run logged which metric: steps logged (layers for a per-layer family), "-" where it did not."""
    import pandas as pd

    records = []
    for figure, fig_panels in panels.items():
        for key, _ in fig_panels:
            rec: dict[str, Any] = {"figure": figure, "metric": key.replace("{L}", "<L>")}
            for r in runs:
                n = len(layer_keys(r.rows, key)) if "{L}" in key else len(series(r.rows, key)[0])
                rec[r.label] = (f"{n} layers" if "{L}" in key else f"{n} steps") if n else "-"
            records.append(rec)
    return pd.DataFrame(records).set_index(["figure", "metric"])


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def runs_table(runs: Sequence[Run]):
    """One row per run: folder, steps, and the config values that differ between the runs (paths and names
    left out)."""
    import pandas as pd

    flat = [_flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f})
    differ = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1
              and not (k in ("run_name", "runs_dir") or k.rsplit(".", 1)[-1].endswith("_dir"))]
    records = [{"run": r.label, "folder": _shown(r.path), "steps logged": len(r.rows),
                "last step": max((x["step"] for x in r.rows), default=None),
                **{k: f.get(k) for k in differ}} for r, f in zip(runs, flat)]
    return pd.DataFrame(records).set_index("run")


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(project_root()))
    except ValueError:
        return str(path)


def _panels_with_threshold(runs: Sequence[Run]) -> dict[str, tuple[Panel, ...]]:
    """The mismatch panel's title names the threshold the runs used (config ``grpo.mismatch_threshold``)."""
    found = {r.label: (r.config.get("grpo") or {}).get("mismatch_threshold") for r in runs}
    values = {v for v in found.values() if v is not None}
    if not values:
        return COMPARE_PANELS
    where = str(values.pop()) if len(values) == 1 else ", ".join(f"{k}: {v}" for k, v in found.items())
    return {name: tuple((k, t.replace("> threshold", f"> {where}") if k == "mismatch/frac_over_threshold" else t)
                        for k, t in panels) for name, panels in COMPARE_PANELS.items()}


@dataclass
class Report:
    """What ``build_report`` made: the runs, the groups, the figures (matplotlib, also saved as PNG), why a figure
    was not drawn, the tables (also saved as CSV) and the files written."""

    runs: list[Run]
    groups: dict[str, list[Run]]
    spread: str
    out_dir: Path
    figures: dict[str, Any] = field(default_factory=dict)
    not_drawn: dict[str, str] = field(default_factory=dict)
    runs_info: Any = None
    coverage: Any = None
    summary: Any = None
    study: Any = None
    files: list[Path] = field(default_factory=list)

    def show(self, name: str):
        """The figure ``name`` (training, mismatch, routing, study), or a line saying why it was not drawn."""
        if name in self.figures:
            return self.figures[name]
        if name not in self.not_drawn:
            raise KeyError(f"no figure '{name}' (figures: {', '.join(FIGURE_FILES)})")
        from IPython.display import Markdown

        return Markdown(f"**{name}: not drawn.** {self.not_drawn[name]}")

    def table(self, name: str):
        """A table for reading: ``runs``, ``coverage``, or ``summary`` and ``study`` with one column per run or
        group (their CSVs have one row each); for a study that was not drawn, a line saying why."""
        tables = {"runs": self.runs_info, "coverage": self.coverage, "summary": self.summary, "study": self.study}
        if name not in tables:
            raise KeyError(f"no table '{name}' (tables: {', '.join(tables)})")
        if tables[name] is None:
            return self.show(name)
        if name not in ("summary", "study"):
            return tables[name]
        import pandas as pd

        def cell(v):  # a transposed column mixes counts and shares: each value its own way
            if v is None or v is pd.NA or (isinstance(v, float) and v != v):
                return "-"
            return f"{v:.4g}" if isinstance(v, float) and not float(v).is_integer() else (
                int(v) if isinstance(v, float) else v)

        return tables[name].T.astype(object).map(cell)

    def text(self) -> str:
        """The report as plain text (what ``cookbook report`` prints)."""
        import pandas as pd

        parts = []
        shown = ("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4g}".format)
        with pd.option_context(*shown):
            parts += ["runs:", self.runs_info.to_string(), "", "summary:", self.table("summary").to_string()]
            if self.study is not None:
                parts += ["", f"study (spread: {SPREADS[self.spread]}):", self.table("study").to_string()]
        parts += [""] + [f"not drawn: {k}: {v}" for k, v in self.not_drawn.items()]
        parts += ["saved:"] + [f"  {_shown(f)}" for f in self.files]
        return "\n".join(parts)


def build_report(runs: Sequence[str | os.PathLike] = (), labels: Sequence[str] = (), out_dir: str | os.PathLike = "",
                 groups: Optional[dict[str, Sequence[str]]] = None, spread: str = "minmax",
                 runs_dir: str | os.PathLike = "runs", by_group: bool = False) -> Report:
    """Compare run folders (notebook 90 and ``cookbook report`` call this).

    ``runs``: run folders, relative to the project root or absolute (none: the folders of ``groups``, else every
    run folder under ``runs_dir`` with a metrics.jsonl); ``labels``: one per run (default: folder names);
    ``groups``: the study's groups ({label: [run folder or label, ...]}; default: ``<case>-seed<k>`` names grouped
    by case); ``spread``: the study's error bars, ``minmax`` or ``std``; ``out_dir``: where the PNGs and CSVs go
    (default: the first run's ``plots/``). The figures are compare_training.png, compare_mismatch.png,
    compare_routing.png and study.png; the tables summary.csv, study.csv and coverage.csv. ``by_group``: the
    training, mismatch and routing figures draw each group's mean with error bars, not one line per run (a study of
    many seeds: ``cookbook.analysis.study``).
    """
    import matplotlib.pyplot as plt

    if spread not in SPREADS:
        raise ValueError(f"spread {spread!r}: must be one of {', '.join(SPREADS)}")
    paths = list(runs)
    if not paths and groups:
        paths = list(dict.fromkeys(str(m) for members in groups.values()
                                   for m in ([members] if isinstance(members, str) else members)))
    if not paths:
        paths = find_runs(runs_dir)
        if not paths:
            raise FileNotFoundError(f"no run folder with a {METRICS_FILE} under {resolve_from_root(runs_dir)}: "
                                    "train one first (make demo, notebook 30) or name run folders")
    loaded = load_runs(paths, labels)
    grouped = group_runs(loaded, groups)
    out = resolve_from_root(out_dir) if out_dir else loaded[0].path / "plots"
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(loaded, grouped, spread, out)

    curves = {r.label: r.rows for r in loaded}
    study_groups = {g: {r.label: r.rows for r in members} for g, members in grouped.items()}
    for name, panels in _panels_with_threshold(loaded).items():
        if not any(panel_series(rows, k)[0] for k, _ in panels for rows in curves.values()):
            keys = sorted({k.split("/")[0] + "/*" for k, _ in panels})
            rep.not_drawn[name] = f"no run logged any of its metrics ({', '.join(keys)})."
            continue
        if by_group:
            rep.figures[name] = plot_groups(study_groups, panels, spread, path=out / FIGURE_FILES[name])
        else:
            rep.figures[name] = plot_runs(curves, panels, path=out / FIGURE_FILES[name], cols=4)
    rep.runs_info = runs_table(loaded)
    rep.coverage = coverage_table(loaded)
    rep.summary = summary_table(loaded, grouped)
    if not any(len(m) > 1 for m in grouped.values()):
        rep.not_drawn["study"] = ("every group has a single run: name runs <case>-seed<k>, or pass groups, to see "
                                  "the mean over seeds.")
    elif not any(panel_series(rows, k)[0] for k, _ in STUDY_PANELS for g in study_groups.values()
                 for rows in g.values()):
        rep.not_drawn["study"] = "no run logged eval/accuracy, mismatch/abs_diff_mean or routing/* metrics."
    else:
        rep.figures["study"] = plot_groups(study_groups, STUDY_PANELS, spread, path=out / FIGURE_FILES["study"])
        rep.study = study_table(rep.summary, grouped, spread)
    for fig in rep.figures.values():
        plt.close(fig)  # kept for display; closed so that a notebook cell shows only what it asks for
    rep.files = [out / FIGURE_FILES[n] for n in rep.figures]
    tables = {"summary.csv": rep.summary, "coverage.csv": rep.coverage, "study.csv": rep.study}
    for fname, table in tables.items():
        if table is not None:
            rep.files.append(write_text(out / fname, table.to_csv()))
    for stale in [out / f for f in (*FIGURE_FILES.values(), *tables)]:
        if stale not in rep.files and stale.is_file():
            stale.unlink()  # an earlier report's figure this one did not draw would read as current
    return rep
