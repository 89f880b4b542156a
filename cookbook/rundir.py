"""The run folder: one directory per run holding everything needed to understand and resume it.

Layout (each part written by the step that owns it)::

    runs/<run>/config.yaml          resolved config (every notebook step rewrites it)
    runs/<run>/env_report.json      environment check (00)
    runs/<run>/data/                preprocessed train/test JSONL + manifest (10)
    runs/<run>/mcore/               the policy converted to Megatron-Core (20)
    runs/<run>/notebooks/           executed notebooks and the parameters each ran with
    runs/<run>/metrics.jsonl        one JSON line per training step
    runs/<run>/checkpoints/         resumable checkpoints
    runs/<run>/plots/               figures people compare
    runs/<run>/logs/                what the libraries printed (Megatron-Core, vLLM, Ray), one file per process
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from cookbook.config import CookbookConfig, load_config, nest_dotted, save_config
from cookbook.logs import quiet_libraries


def open_run(
    preset: str = "tiny",
    run_name: str = "",
    overrides: dict[str, Any] | list[str] | tuple[str, ...] = (),
    runs_dir: str = "",
    values: dict[str, Any] | None = None,
) -> CookbookConfig:
    """Resolve and validate the config, create the run folder and save ``config.yaml`` in it.

    Notebooks and CLI commands start with this, so a bad value fails before any work and every run
    folder says exactly what ran. ``overrides`` is a list of ``"a.b=c"`` strings (CLI) or a dict of
    dotted keys (notebook parameters: papermill cannot parse ``=`` inside a parameters cell).
    """
    merged: dict[str, Any] = dict(values or {})
    if isinstance(overrides, dict):
        merged = _deep_merge(merged, nest_dotted(overrides))
        overrides = ()
    if run_name:
        merged["run_name"] = run_name
    runs_dir = runs_dir or os.environ.get("COOKBOOK_RUNS_DIR", "") or merged.get("runs_dir", "runs")
    merged["runs_dir"] = str(resolve_from_root(runs_dir))
    cfg = load_config(preset, overrides=list(overrides), values=merged)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg)
    quiet_libraries(cfg.run_dir)
    return cfg


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def project_root() -> Path:
    """The checkout this package lives in (an editable install), else the working directory."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "notebooks").is_dir() else Path.cwd()


def checkout_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with this checkout first on PYTHONPATH, for the processes it starts (notebook kernels, Ray
    nodes): they then import this checkout's ``cookbook`` even when the environment's editable install points at
    another checkout (git worktrees sharing one virtual environment)."""
    paths = [str(project_root())] + [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def resolve_from_root(path: str | os.PathLike) -> Path:
    """Relative paths in configs mean the project root, whether a notebook runs from notebooks/ or not."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path


def mcore_dir(cfg: CookbookConfig) -> Path:
    """The converted Megatron-Core checkpoint of the initial policy (notebook 20 writes it, training reads it)."""
    return Path(cfg.model.mcore_dir) if cfg.model.mcore_dir else cfg.run_dir / "mcore"


def plots_dir(cfg: CookbookConfig) -> Path:
    path = cfg.run_dir / "plots"
    path.mkdir(parents=True, exist_ok=True)
    return path
