"""A study: a grid of cases x seeds, each a run of notebook 30 in one study folder, compared case by case.

The grid (``DEFAULT_GRID``, or a YAML file of the same shape: ``cookbook study --show-grid`` prints it) names the
preset, the seeds, the config every run gets (``base``, dotted keys) and the cases, each with the config it
changes. ``plan`` turns it into one ``RunSpec`` per case and seed, validated before anything runs;
``cookbook.runner.run_study`` executes them (papermill, one run folder per case and seed:
``<study>/<case>-seed<k>/``), skipping runs already done, and writes the manifest (``study.json``); the functions
here read what the runs left: which are done (``run_status``), and the study's report (``study_report``: every
case's mean over its seeds with +-1 std error bars, a table of the final mismatch, routing agreement and accuracy,
and the figures comparing cases the grid names side by side, such as context parallelism 1 vs 2).

The default grid is the MoE stability study of issue 15 (README, "The MoE stability study"; docs/study/): the
tutorial's settings against each knob its guidance turns off, on the tiny preset in bf16.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from cookbook.analysis.metrics import Panel, Rows, plot_groups, read_metrics, series
from cookbook.atomic import write_json, write_text
from cookbook.config import ConfigError, load_config, nest_dotted
from cookbook.rundir import resolve_from_root
from cookbook.runner import CONFIG_PARAMETERS

STUDY_FILE = "study.yaml"  # the grid as it ran (a study folder keeps one grid)
MANIFEST = "study.json"  # machine, runs, their status and wall times, written by cookbook.runner.run_study
RUN_MARKER = "study_run.json"  # in each run folder: its case, seed, overrides and status
REPORT_DIR = "report"
NOTEBOOK = "30_grpo_moonlight"
CASE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


_BIAS_UPDATES = {"moe.router_enable_expert_bias": True, "moe.router_bias_update_rate": 1e-3}

# The MoE stability study on tiny, in bf16 (trainer and rollout): in fp32 on a CPU the two agree to about 2e-7 per
# token and route identically, which hides every effect. Sized for a 2-core CPU (README, "The MoE stability study").
DEFAULT_GRID: dict[str, Any] = {
    "name": "moe-stability",
    "about": "The tutorial's MoE stability guidance on the tiny preset in bf16: its settings (a) against each knob it "
             "turns off (b-d), two corrections on top of bias updates (e, f), ChatLearn's trainer without the expert "
             "bias (g), and a weight sync that leaves the drifting bias behind (h, with its synced control b-fast); "
             "then context parallelism 2 against 1.",
    "preset": "tiny",
    "seeds": [1, 2, 3],
    # the routers' expert bias the runs start from: "balanced" = the tiny model's bias set as a pre-training's
    # aux-loss-free balancing leaves it (cookbook.models.expert_bias; the tiny build's own bias is 0, as its warm-up
    # never updated it, and with a zero bias cases g and a would be the same run); "checkpoint" = as built
    "start_bias": "balanced",
    # what every run gets: bf16; the eval accuracy on the 500 test problems before and after training (no
    # validation split: nothing is tuned here), no pass@k, no checkpoint and no HF export (a study's runs are
    # compared, not continued: about 25 s of a run), no TensorBoard / wandb
    "base": {
        "model.params_dtype": "bfloat16",
        "grpo.steps": 10,
        "grpo.eval_every": 10,
        "data.validation_size": 0,
        "grpo.eval_pass_k": 0,
        "grpo.save_every": 0,
        "grpo.final_save": False,
        "logging.tensorboard": False,
        "logging.wandb_mode": "disabled",
    },
    "cases": {
        "a-defaults": {"about": "the tutorial's settings: no load-balancing loss, expert bias frozen, router in fp32",
                       "overrides": {}},
        "b-bias-updates": {"about": "expert-bias updates on (rate 1e-3), the bias synced to the rollout every step",
                           "overrides": dict(_BIAS_UPDATES)},
        "c-seq-aux-loss": {"about": "sequence-level load-balancing loss on (coefficient 1e-3)",
                           "overrides": {"moe.router_load_balancing_type": "seq_aux_loss",
                                         "moe.aux_loss_coeff": 1e-3}},
        "d-router-bf16": {"about": "the trainer's router in bf16 instead of fp32 (moe.router_dtype=none with bf16 "
                                   "parameters; vLLM's router is bf16 in every case)",
                          "overrides": {"moe.router_dtype": "none"}},
        "e-replay": {"about": "b + routing replay (R3: the trainer uses the rollout's experts)",
                     "overrides": {**_BIAS_UPDATES, "moe.routing_replay": "r3"}},
        "f-seq-mask": {"about": "b + sequence-level masking (geometric-mean ratio outside 0.999-1.001 dropped)",
                       "overrides": {**_BIAS_UPDATES, "grpo.importance_correction": "seq_mask",
                                     "grpo.importance_low": 0.999, "grpo.importance_high": 1.001}},
        "g-trainer-no-bias": {"about": "the trainer's routers without the expert bias, the rollout keeps the "
                                       "checkpoint's (what ChatLearn runs for Moonlight and DeepSeek-V3)",
                              "overrides": {"moe.trainer_expert_bias": False, "parallel.sync_expert_bias": False}},
        "b-fast": {"about": "expert-bias updates at rate 1e-2, synced every step (the control of h)",
                   "overrides": {"moe.router_enable_expert_bias": True, "moe.router_bias_update_rate": 1e-2}},
        "h-bias-unsynced": {"about": "expert-bias updates at rate 1e-2, the bias left out of the weight sync: the "
                                     "trainer's drifts, the rollout keeps the one it loaded",
                            "overrides": {"moe.router_enable_expert_bias": True,
                                          "moe.router_bias_update_rate": 1e-2, "parallel.sync_expert_bias": False}},
        # the tutorial's second chart is the eval accuracy over the steps: these two evaluate every other step
        "cp1": {"about": "context parallelism 1, samples packed into rows of 128 tokens (one trainer rank)",
                "overrides": {"grpo.sequence_packing": True, "grpo.packing_max_tokens": 128, "grpo.eval_every": 2},
                "seeds": [1], "in_study": False},
        "cp2": {"about": "context parallelism 2, the same packing (two trainer ranks on gloo)",
                "overrides": {"grpo.sequence_packing": True, "grpo.packing_max_tokens": 128, "grpo.eval_every": 2,
                              "parallel.context": 2},
                "seeds": [1], "in_study": False},
    },
    # figures of their own: cases drawn side by side (the tutorial's second chart: CP2 = CP1)
    "compare": {"cp": ["cp1", "cp2"]},
}

START_BIAS = ("balanced", "checkpoint")


@dataclass
class Case:
    name: str
    about: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    seeds: Optional[list[int]] = None  # None: the grid's
    in_study: bool = True  # drawn and tabled with the other cases (False: only in a comparison of its own)


@dataclass
class Grid:
    name: str
    preset: str
    seeds: list[int]
    base: dict[str, Any]
    cases: list[Case]
    compare: dict[str, list[str]] = field(default_factory=dict)
    start_bias: str = "checkpoint"
    about: str = ""

    def case(self, name: str) -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        raise KeyError(f"no case '{name}' in grid '{self.name}' (cases: {', '.join(c.name for c in self.cases)})")

    def to_dict(self) -> dict[str, Any]:
        cases = {}
        for c in self.cases:
            entry: dict[str, Any] = {"about": c.about, "overrides": dict(c.overrides)}
            if c.seeds is not None:
                entry["seeds"] = list(c.seeds)
            if not c.in_study:
                entry["in_study"] = False
            cases[c.name] = entry
        return {"name": self.name, "about": self.about, "preset": self.preset, "seeds": list(self.seeds),
                "start_bias": self.start_bias, "base": dict(self.base), "cases": cases,
                "compare": {k: list(v) for k, v in self.compare.items()}}


@dataclass
class RunSpec:
    """One run of the grid: a case with one seed."""

    case: str
    seed: int
    overrides: dict[str, Any]  # base, then the case's, then the seed (dotted keys)

    @property
    def name(self) -> str:
        return f"{self.case}-seed{self.seed}"

    def notebook_parameters(self, preset: str, shared: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Notebook 30's parameters for this run: its own for the MoE knobs and the steps, the rest as ``overrides``
        (with ``shared``, the study's shared inputs: data, start model, converted checkpoint), no walk-through."""
        values = {**self.overrides, **(shared or {})}
        params: dict[str, Any] = {"preset": preset, "walkthrough": False}
        for key, name in CONFIG_PARAMETERS[NOTEBOOK].items():
            if key in values:
                params[name] = values.pop(key)
        params["plot_every"] = int(params.get("steps") or 0) + 1  # not during training: drawn once, at the end
        params["overrides"] = values
        return params


def _grid_error(where: str, message: str) -> ConfigError:
    return ConfigError(f"study grid {where}: {message}")


def grid_from_dict(values: dict[str, Any], where: str = "grid") -> Grid:
    """A ``Grid`` from its dict (YAML) form, checked: names, seeds, the keys and the comparisons."""
    if not isinstance(values, dict):
        raise _grid_error(where, f"expected a mapping, got {type(values).__name__}")
    known = {"name", "about", "preset", "seeds", "base", "cases", "compare", "start_bias"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise _grid_error(where, f"unknown key(s) {', '.join(unknown)} (keys: {', '.join(sorted(known))})")
    seeds = values.get("seeds") or [1]
    if not (isinstance(seeds, list) and all(isinstance(s, int) for s in seeds) and len(set(seeds)) == len(seeds)):
        raise _grid_error(where, f"seeds={seeds!r}: need a list of distinct integers")
    start_bias = values.get("start_bias", "checkpoint")
    if start_bias not in START_BIAS:
        raise _grid_error(where, f"start_bias={start_bias!r}: choose one of {', '.join(START_BIAS)}")
    raw_cases = values.get("cases") or {}
    if not isinstance(raw_cases, dict) or not raw_cases:
        raise _grid_error(where, "needs cases: {name: {about: ..., overrides: {dotted.key: value}}}")
    cases = []
    for name, spec in raw_cases.items():
        spec = spec or {}
        if not isinstance(name, str) or not CASE_NAME.match(name) or re.search(r"seed[-_]?\d", name):
            raise _grid_error(where, f"case name {name!r}: lower-case letters, digits, '-', '_', '.', and no "
                                     "'seed<k>' in it (run folders are named <case>-seed<k>)")
        extra = sorted(set(spec) - {"about", "overrides", "seeds", "in_study"})
        if extra:
            raise _grid_error(where, f"case '{name}': unknown key(s) {', '.join(extra)}")
        case_seeds = spec.get("seeds")
        if case_seeds is not None and not (isinstance(case_seeds, list) and case_seeds
                                           and all(isinstance(s, int) for s in case_seeds)):
            raise _grid_error(where, f"case '{name}': seeds={case_seeds!r}: need a list of integers")
        cases.append(Case(name, str(spec.get("about", "")), dict(spec.get("overrides") or {}), case_seeds,
                          bool(spec.get("in_study", True))))
    compare = values.get("compare") or {}
    names = {c.name for c in cases}
    for fig, members in compare.items():
        missing = [m for m in members or [] if m not in names]
        if missing or not members:
            raise _grid_error(where, f"compare '{fig}': {missing or 'no cases'} not among the cases")
    grid = Grid(str(values.get("name") or "study"), str(values.get("preset") or "tiny"), seeds,
                dict(values.get("base") or {}), cases, {k: list(v) for k, v in compare.items()}, start_bias,
                str(values.get("about") or ""))
    plan(grid)  # every run's config validates, or the grid is refused now
    return grid


def load_grid(path: Optional[str | os.PathLike] = None) -> Grid:
    """The grid of a YAML file (``cookbook study --grid FILE``), or the default one."""
    if path is None:
        return grid_from_dict(copy.deepcopy(DEFAULT_GRID), "(default)")
    text = Path(path).read_text()
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _grid_error(str(path), f"invalid YAML ({getattr(e, 'problem', e)})") from None
    return grid_from_dict(values, str(path))


def grid_yaml(grid: Grid) -> str:
    return yaml.safe_dump(grid.to_dict(), sort_keys=False, width=110)


def plan(grid: Grid, only: Sequence[str] = ()) -> list[RunSpec]:
    """Every run of the grid (or of the cases in ``only``), in order: case by case, seed by seed. Each run's
    config is validated here (``cookbook.config.load_config``), so a wrong key stops the study before it starts."""
    for name in only:
        grid.case(name)
    specs = []
    for case in grid.cases:
        if only and case.name not in only:
            continue
        for seed in case.seeds if case.seeds is not None else grid.seeds:
            overrides = {**grid.base, **case.overrides, "seed": seed}
            try:
                load_config(grid.preset, values=nest_dotted(overrides, f"case '{case.name}'"))
            except ConfigError as e:
                raise ConfigError(f"study grid '{grid.name}', case '{case.name}', seed {seed}: {e}") from None
            specs.append(RunSpec(case.name, seed, overrides))
    return specs


# -- what the runs left -------------------------------------------------------------------------------
def read_marker(run_dir: str | os.PathLike) -> Optional[dict[str, Any]]:
    path = Path(run_dir) / RUN_MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def write_marker(run_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    return write_json(Path(run_dir) / RUN_MARKER, record)


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def run_status(study_dir: str | os.PathLike, spec: RunSpec) -> str:
    """``todo`` (never started), ``done``, ``failed`` (ran and stopped with an error: a new call runs it again),
    ``interrupted`` (started and never finished: a new call resumes it from its checkpoint). A run folder made
    with other settings than the grid's stops the study: mixing them would compare unlike runs."""
    run_dir = Path(study_dir) / spec.name
    marker = read_marker(run_dir)
    if marker is None:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"{run_dir} exists but was not made by this study (no {RUN_MARKER}): move it away, "
                              "or use another study folder")
        return "todo"
    if not _same(marker.get("overrides"), spec.overrides):
        raise ConfigError(f"{run_dir} was run with other settings ({marker.get('overrides')}) than the grid now "
                          f"gives it ({spec.overrides}): use another study folder, or delete that run")
    return {"done": "done", "failed": "failed"}.get(marker.get("status", ""), "interrupted")


def check_study_folder(study_dir: str | os.PathLike, grid: Grid) -> None:
    """A study folder keeps one grid: its ``study.yaml`` must be this grid (same cases, overrides and seeds)."""
    path = Path(study_dir) / STUDY_FILE
    if path.is_file():
        saved = yaml.safe_load(path.read_text())
        if not _same(saved, grid.to_dict()):
            raise ConfigError(f"{study_dir} holds the study of another grid ({path}); resume it with that grid "
                              "(--grid), or start a new study folder")


def read_manifest(study_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(study_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {study_dir} is not a study folder (`cookbook study` makes one)")
    return json.loads(path.read_text())


def read_grid(study_dir: str | os.PathLike) -> Grid:
    path = Path(study_dir) / STUDY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {study_dir} is not a study folder (`cookbook study` makes one)")
    return grid_from_dict(yaml.safe_load(path.read_text()), str(path))


# -- the study's numbers --------------------------------------------------------------------------------
# (column, metric, how): "tail" = the mean over the last quarter of the run's steps (at least one), "last" = the
# value at the last step that logged it; "gain" = last minus first.
FINAL_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("mismatch |logp diff|", "mismatch/abs_diff_mean", "tail"),
    ("mismatch p99", "mismatch/abs_diff_p99", "tail"),
    ("routing agreement", "routing/rollout_vs_trainer", "agreement"),
    ("routing agreement, unreplayed", "routing/rollout_vs_trainer_unreplayed", "agreement"),
    ("routing policy change", "routing/policy_change", "tail"),
    ("eval accuracy", "eval/accuracy", "last"),
    ("eval accuracy gain", "eval/accuracy", "gain"),
    ("test accuracy", "test/accuracy", "last"),
    ("KL to reference", "actor/kl", "tail"),
)
TABLE_COLUMNS = ("mismatch |logp diff|", "routing agreement", "routing policy change", "eval accuracy",
                 "eval accuracy gain", "test accuracy")


def final_value(rows: Rows, key: str, how: str) -> float:
    steps, values = series(rows, key)
    if not values:
        return float("nan")
    if how == "last":
        return float(values[-1])
    if how == "gain":
        return float(values[-1] - values[0]) if len(values) > 1 else float("nan")
    tail = values[-max(1, math.ceil(len(values) / 4)):]
    mean = sum(tail) / len(tail)
    return 1.0 - mean if how == "agreement" else mean


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if v == v]
    if not vals:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else float("nan")
    return mean, std, len(vals)


def _fmt(mean: float, std: float) -> str:
    if mean != mean:
        return "-"
    digits = 4 if abs(mean) < 0.01 and mean != 0 else 3

    def num(v: float) -> str:
        return f"{v:.{digits}g}" if abs(v) < 0.01 and v != 0 else f"{v:.{digits}f}"
    return num(mean) if std != std else f"{num(mean)} ± {num(std)}"


def case_table(rows_by_case: dict[str, dict[str, Rows]]):
    """Per case (rows) the mean and sample std over its runs of the final numbers (``FINAL_COLUMNS``): numeric
    columns ``<name> mean`` / ``<name> std`` / ``<name> n``, and ``<name>`` as "mean ± std" for reading."""
    import pandas as pd

    records = []
    for case, runs in rows_by_case.items():
        rec: dict[str, Any] = {"case": case, "runs": len(runs)}
        for column, key, how in FINAL_COLUMNS:
            mean, std, n = _mean_std([final_value(rows, key, how) for rows in runs.values()])
            rec[column] = _fmt(mean, std)
            rec[f"{column} mean"], rec[f"{column} std"], rec[f"{column} n"] = mean, std, n
        records.append(rec)
    return pd.DataFrame(records).set_index("case")


def markdown_table(table) -> str:
    """A DataFrame as a Markdown table (index first), for the write-up."""
    header = [table.index.name or "", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for idx, row in table.iterrows():
        lines.append("| " + " | ".join([str(idx), *(str(v) for v in row)]) + " |")
    return "\n".join(lines) + "\n"


# Panels of a comparison figure (the tutorial's CP chart shows the eval accuracy and the reward).
COMPARE_CASE_PANELS: tuple[Panel, ...] = (
    ("eval/accuracy", "eval accuracy"),
    ("reward/mean", "mean training reward"),
    ("actor/kl", "KL to reference (k3)"),
    ("actor/entropy", "policy entropy (nats/token)"),
    ("mismatch/abs_diff_mean", "mean |logp trainer - logp rollout|"),
    ("actor/pg_loss", "policy-gradient loss"),
    ("actor/grad_norm", "gradient norm"),
    ("time/step", "step time (s)"),
)


@dataclass
class StudyReport:
    """What ``study_report`` made: the grid, the manifest, the cases' runs, the run-comparison report
    (``cookbook.analysis.report.Report``, with each case as a group), the case table and the comparison figures."""

    study_dir: Path
    grid: Grid
    manifest: dict[str, Any]
    runs: dict[str, dict[str, Path]]  # case -> {run name: folder}, the runs that finished
    report: Any = None
    table: Any = None
    figures: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def cases(self):
        """What each case is: its description, the settings it changes, its seeds and how many runs finished."""
        import pandas as pd

        records = [{"case": c.name, "about": c.about,
                    "overrides": ", ".join(f"{k}={v}" for k, v in c.overrides.items()) or "-",
                    "seeds": ", ".join(map(str, c.seeds if c.seeds is not None else self.grid.seeds)),
                    "done": len(self.runs.get(c.name, {}))} for c in self.grid.cases]
        return pd.DataFrame(records).set_index("case")

    def runs_table(self):
        """One row per run of the manifest: case, seed, status, wall time."""
        import pandas as pd

        cols = ["run", "case", "seed", "status", "wall_s", "where"]
        return pd.DataFrame([{k: r.get(k) for k in cols} for r in self.manifest.get("runs", [])],
                            columns=cols).set_index("run")

    def show(self, name: str):
        """A figure: ``study`` (the cases with error bars), ``training``, ``mismatch``, ``routing`` (each case's mean
        with error bars), or a comparison the grid names (``cp``)."""
        if name in self.figures:
            return self.figures[name]
        if self.report is not None and name in ("study", "training", "mismatch", "routing"):
            return self.report.show(name)
        raise KeyError(f"no figure '{name}' (figures: study, training, mismatch, routing, {', '.join(self.figures)})")

    def final_table(self):
        """The case table for reading: final mismatch, routing agreement and accuracy as mean ± std over seeds."""
        if self.table is None:
            return None
        shown = [c for c in TABLE_COLUMNS if (self.table[f"{c} n"] > 0).any()]  # not a column no run logged
        return self.table[["runs", *shown]]


def study_report(study_dir: str | os.PathLike, spread: str = "std", out_dir: str | os.PathLike = "") -> StudyReport:
    """Read a study folder (relative paths mean the project root) and compare its cases (notebook 90 with
    ``study``, and ``cookbook study`` at its end).

    The cases of the study view (all but those the grid keeps for a comparison of their own) are the groups of a
    ``build_report`` whose figures draw each case's mean over its seeds with ``spread`` error bars (default +-1
    sample std); ``table`` has per case the final numbers (``FINAL_COLUMNS``) as mean and std over seeds; each
    ``compare`` entry of the grid is a figure of its cases side by side. Files go to ``<study>/report/`` (or
    ``out_dir``): the report's PNGs and CSVs, ``cases.csv``, ``cases.md`` and ``compare_<name>.png``."""
    import matplotlib.pyplot as plt

    from cookbook.analysis.report import build_report

    study = resolve_from_root(study_dir)
    grid = read_grid(study)
    manifest = read_manifest(study)
    out = resolve_from_root(out_dir) if out_dir else study / REPORT_DIR
    runs: dict[str, dict[str, Path]] = {}
    for spec in plan(grid):
        marker = read_marker(study / spec.name)
        if marker and marker.get("status") == "done" and read_metrics(study / spec.name):
            runs.setdefault(spec.case, {})[spec.name] = study / spec.name
    rep = StudyReport(study, grid, manifest, runs)
    in_study = {c.name: list(runs[c.name].values()) for c in grid.cases if c.in_study and c.name in runs}
    if in_study:
        rep.report = build_report([p for ps in in_study.values() for p in ps], groups=in_study, out_dir=out,
                                  spread=spread, by_group=True)
        rep.files += rep.report.files
    rows = {case: {name: read_metrics(path) for name, path in members.items()} for case, members in runs.items()}
    rep.table = case_table({c: rows[c] for c in in_study}) if in_study else None
    if rep.table is not None:
        rep.files.append(write_text(out / "cases.csv", rep.table.to_csv()))
        rep.files.append(write_text(out / "cases.md", markdown_table(rep.final_table())))
    for name, members in grid.compare.items():
        groups = {c: rows[c] for c in members if c in rows}
        if not groups:
            continue
        path = out / f"compare_{name}.png"
        rep.figures[name] = plot_groups(groups, COMPARE_CASE_PANELS, spread, path=path)
        plt.close(rep.figures[name])
        rep.files.append(path)
    return rep

