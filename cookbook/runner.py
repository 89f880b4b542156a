"""Headless notebook execution with papermill: the batch face of every notebook.

Each executed copy goes to ``runs/<run>/notebooks/`` with the parameters it ran with, so a batch run
leaves the same record as a person stepping through JupyterLab.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, TextIO

import yaml

from cookbook.atomic import write_text
from cookbook.config import ConfigError, CookbookConfig, load_config, nest_dotted
from cookbook.rundir import checkout_env, project_root, resolve_from_root

KERNEL_NAME = "grpo-cookbook"  # registered by env/setup_cpu.sh (and the GPU image)
# The order `make demo` runs them in; later steps read what earlier ones wrote into the run folder.
DEMO_NOTEBOOKS = ("00_environment", "10_data", "20_convert", "30_grpo_moonlight")


def notebooks_dir() -> Path:
    return project_root() / "notebooks"


def find_notebook(name: str) -> Path:
    """Accept a path, a file name or a stem such as ``10_data``."""
    path = Path(name)
    if path.suffix == ".ipynb" and path.is_file():
        return path.resolve()
    stem = path.stem if path.suffix == ".ipynb" else path.name
    candidate = notebooks_dir() / f"{stem}.ipynb"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in notebooks_dir().glob("*.ipynb"))
    close = difflib.get_close_matches(stem, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise FileNotFoundError(f"notebook '{name}' not found{hint} (available: {', '.join(known)})")


def load_params_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of parameter names to values, got {type(values).__name__}")
    return values


def parse_cli_value(raw: str) -> Any:
    """``-p NAME VALUE`` values are YAML, as in papermill: 3 -> int, true -> bool, [a=b] -> list."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def notebook_parameters(notebook: Path) -> dict[str, Any]:
    """Names and defaults of the notebook's ``parameters`` cell."""
    import papermill

    params = papermill.inspect_notebook(str(notebook))
    return {name: info["default"] for name, info in params.items()}


def _unknown_parameter(name: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: no parameter '{name}'{hint} (parameters: {', '.join(known)})")


def file_parameters(notebook: Path, params_file: str | Path) -> dict[str, Any]:
    """The values of a shared params file that this notebook takes.

    One file serves all notebooks (notebooks/params/<preset>.yaml), so a key another notebook takes is
    skipped here, but a key no notebook takes is a typo and stops the run.
    """
    values = load_params_file(params_file)
    known = notebook_parameters(notebook)
    anywhere = set(known)
    for other in notebooks_dir().glob("*.ipynb"):
        anywhere |= set(notebook_parameters(other))
    for name in values:
        if name not in anywhere:
            raise _unknown_parameter(name, sorted(anywhere), f"{params_file}")
    return {k: v for k, v in values.items() if k in known}


def _literal(source: str) -> Any:
    """papermill reports defaults as source text ("'tiny'"); evaluate the plain literal."""
    import ast

    return ast.literal_eval(source)


@dataclass(frozen=True)
class PreparedRun:
    """A notebook run checked before any kernel starts: the notebook, the parameters it will get (run name and
    runs folder filled in) and the config they resolve to."""

    notebook: Path
    params: dict[str, Any]
    cfg: CookbookConfig


def prepare_run(
    notebook: str | Path,
    parameters: dict[str, Any] | None = None,
    params_file: str | Path | None = None,
    run_name: str = "",
    runs_dir: str = "runs",
) -> PreparedRun:
    """Validate the parameters (names against the notebook, values through the config) without running
    anything, so a typo costs a second, not a failed batch job."""
    nb = find_notebook(str(notebook))
    defaults = notebook_parameters(nb)
    params: dict[str, Any] = file_parameters(nb, params_file) if params_file else {}
    for name in parameters or {}:
        if name not in defaults:
            raise _unknown_parameter(name, list(defaults), nb.name)
    params.update(parameters or {})
    preset = params.get("preset") or _literal(defaults.get("preset", "'tiny'"))
    run_name = run_name or params.get("run_name") or f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    runs_path = resolve_from_root(runs_dir)
    overrides = params.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"parameter 'overrides' must be a mapping of dotted keys to values, got {overrides!r}")
    cfg = load_config(preset, values={"run_name": run_name, "runs_dir": str(runs_path), **nest_dotted(overrides)})
    params.update({"run_name": run_name, "runs_dir": str(runs_path)})
    return PreparedRun(nb, params, cfg)


@contextlib.contextmanager
def environ(env: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` replaced for the block: the kernel papermill starts inherits it."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def execute(run: PreparedRun, out_dir: Path | None = None, progress: bool = True, log: TextIO | None = None
            ) -> Path:
    """Execute a prepared run under the project kernel into ``out_dir`` (default ``<run>/notebooks/``), with the
    parameters it ran with beside it; ``log`` also receives the kernel's stdout and stderr as they come."""
    import papermill

    out_dir = out_dir or run.cfg.run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / f"{run.notebook.stem}.params.yaml", yaml.safe_dump(run.params, sort_keys=True))
    output = out_dir / run.notebook.name
    with environ(checkout_env(os.environ)):  # the kernel (and a local Ray it starts) import this checkout
        papermill.execute_notebook(
            str(run.notebook), str(output), parameters=run.params, kernel_name=KERNEL_NAME,
            progress_bar=progress, cwd=str(run.notebook.parent), stdout_file=log, stderr_file=log,
        )
    return output


def run_notebook(
    notebook: str | Path,
    parameters: dict[str, Any] | None = None,
    params_file: str | Path | None = None,
    run_name: str = "",
    runs_dir: str = "runs",
    progress: bool = True,
) -> Path:
    """Execute ``notebook`` headless under the project kernel; return the executed copy's path."""
    return execute(prepare_run(notebook, parameters, params_file, run_name, runs_dir), progress=progress)


def run_demo(preset: str = "tiny", run_name: str = "", runs_dir: str = "runs",
             notebooks: tuple[str, ...] = DEMO_NOTEBOOKS, progress: bool = True) -> list[Path]:
    """Run the notebook sequence into one run folder (what `make demo` does)."""
    run_name = run_name or f"{preset}-demo-{time.strftime('%Y%m%d-%H%M%S')}"
    params_file = notebooks_dir() / "params" / f"{preset}.yaml"
    outputs = []
    for name in notebooks:
        print(f"[demo] {name} ...", flush=True)
        outputs.append(run_notebook(name, {"preset": preset}, params_file=params_file if params_file.is_file() else None,
                                    run_name=run_name, runs_dir=runs_dir, progress=progress))
    return outputs
