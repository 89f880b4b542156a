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
from typing import TYPE_CHECKING, Any, Iterator, Mapping, TextIO

import yaml

from cookbook.atomic import write_json, write_text
from cookbook.config import ConfigError, CookbookConfig, load_config, nest_dotted
from cookbook.rundir import checkout_env, project_root, resolve_from_root

if TYPE_CHECKING:  # cookbook.analysis.study imports this module
    from cookbook.analysis.study import Grid, RunSpec

KERNEL_NAME = "grpo-cookbook"  # registered by env/setup_cpu.sh (and the GPU image)
# The order `make demo` runs them in; later steps read what earlier ones wrote into the run folder.
DEMO_NOTEBOOKS = ("00_environment", "10_data", "20_convert", "30_grpo_moonlight", "31_grpo_deepseek_v3")
# Notebook 31 runs the DeepSeek-V3 recipe, another model than the demo preset's: it runs on the preset's DeepSeek-V3
# counterpart in a run folder of its own, <run>-deepseek-v3 (its own data, conversion, metrics); presets without
# one skip it.
DSV3_NOTEBOOK = "31_grpo_deepseek_v3"
DSV3_COUNTERPART = {"tiny": "tiny-deepseek-v3", "tiny-deepseek-v3": "tiny-deepseek-v3",
                    "deepseek-v3-671b": "deepseek-v3-671b"}


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


# Config keys a notebook takes as parameters of its own (notebook 30's MoE knobs and steps; 0 / empty = the
# preset's): checked together with ``overrides``, since the config's cross-field rules see both.
CONFIG_PARAMETERS: dict[str, dict[str, str]] = {
    "30_grpo_moonlight": {
        "grpo.steps": "steps",
        "moe.router_load_balancing_type": "router_load_balancing_type",
        "moe.aux_loss_coeff": "aux_loss_coeff",
        "moe.router_enable_expert_bias": "router_enable_expert_bias",
        "moe.router_bias_update_rate": "router_bias_update_rate",
    },
}


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
    own = {key: params[name] for key, name in CONFIG_PARAMETERS.get(nb.stem, {}).items() if params.get(name)}
    cfg = load_config(preset, values={"run_name": run_name, "runs_dir": str(runs_path),
                                      **nest_dotted({**own, **overrides})})
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
        # shutdown_kernel="immediate": once the last cell has run (its outputs are in the notebook, the run's files
        # written) the kernel is stopped rather than left to unload torch, Ray and the rest (3 s a run); a local Ray
        # it started goes with it (Ray's own clean-up on the driver's exit)
        papermill.execute_notebook(
            str(run.notebook), str(output), parameters=run.params, kernel_name=KERNEL_NAME,
            progress_bar=progress, cwd=str(run.notebook.parent), stdout_file=log, stderr_file=log,
            shutdown_kernel="immediate",
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


def demo_target(notebook: str, preset: str, run_name: str) -> tuple[str, str] | None:
    """(preset, run name) a demo runs ``notebook`` with: the demo's own, except notebook 31 (the DeepSeek-V3
    counterpart in ``<run>-deepseek-v3``); None when the preset has no DeepSeek-V3 counterpart."""
    if Path(notebook).stem != DSV3_NOTEBOOK:
        return preset, run_name
    if preset not in DSV3_COUNTERPART:
        return None
    return DSV3_COUNTERPART[preset], f"{run_name}-deepseek-v3"


def run_demo(preset: str = "tiny", run_name: str = "", runs_dir: str = "runs",
             notebooks: tuple[str, ...] = DEMO_NOTEBOOKS, progress: bool = True) -> list[Path]:
    """Run the notebook sequence into one run folder (what `make demo` does); notebook 31 into its own
    (``demo_target``)."""
    run_name = run_name or f"{preset}-demo-{time.strftime('%Y%m%d-%H%M%S')}"
    outputs = []
    for name in notebooks:
        target = demo_target(name, preset, run_name)
        if target is None:
            print(f"[demo] {name} skipped: preset '{preset}' has no DeepSeek-V3 counterpart", flush=True)
            continue
        nb_preset, nb_run = target
        params_file = notebooks_dir() / "params" / f"{nb_preset}.yaml"
        print(f"[demo] {name} ({nb_preset}, runs/{nb_run}) ...", flush=True)
        outputs.append(run_notebook(name, {"preset": nb_preset},
                                    params_file=params_file if params_file.is_file() else None,
                                    run_name=nb_run, runs_dir=runs_dir, progress=progress))
    return outputs


# -- a study: a grid of notebook-30 runs in one folder (cookbook.analysis.study) --------------------------------
def machine_info() -> dict[str, Any]:
    """Where a study ran: host, CPU (model, cores, the flags that change kernels), GPUs, the load when it started."""
    import os
    import platform
    import socket

    from cookbook.envcheck import cpu_info

    info: dict[str, Any] = {"host": socket.gethostname(), "platform": platform.platform(), "cpu": cpu_info(),
                            "nice": os.nice(0)}
    try:  # the code the study ran: this checkout's commit, and whether it had changes beyond it
        import subprocess

        root = str(project_root())
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        info["code"] = {"commit": commit, "uncommitted_changes": bool(dirty)}
    except OSError:
        info["code"] = {}
    try:
        import torch

        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # a broken CUDA install reports no GPU rather than stopping the study
        info["gpus"] = []
    return info


def _load() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


def _short_hash(values: Any) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _convert_in_process(cfg, hf_dir: str, out: str) -> None:
    from cookbook.convert.pipeline import convert

    convert(cfg, "hf_to_mcore", hf_dir, out, part=(0, 1), progress=False)


def prepare_study_inputs(grid, study: Path, specs: list) -> dict[str, dict[str, Any]]:
    """What runs share, made once in ``<study>/shared/``: the start model (with ``start_bias: balanced`` the tiny
    model with a balancing expert bias, ``cookbook.models.expert_bias``), the data of each seed (the generated
    problems follow the run seed, as in any run), the converted Megatron checkpoint of each architecture. Returns
    each run's extra overrides (``model.hf_dir``, ``data.processed_dir``, ``model.mcore_dir``)."""
    import dataclasses

    import ray

    from cookbook.data.prepare import prepare_data
    from cookbook.models.tiny import resolve_hf_dir

    shared = study / "shared"
    extra: dict[str, dict[str, Any]] = {}
    start: dict[str, str] = {}
    for spec in specs:
        cfg = load_config(grid.preset, values={"runs_dir": str(study), "run_name": spec.name,
                                               **nest_dotted(spec.overrides)})
        hf_dir = str(resolve_hf_dir(cfg))
        if grid.start_bias == "balanced":
            key = _short_hash(dataclasses.asdict(cfg.model) | {"hf_dir": hf_dir})
            if key not in start:
                from cookbook.models.expert_bias import balanced_bias_checkpoint

                start[key] = str(balanced_bias_checkpoint(cfg, hf_dir, shared / f"start-model-{key}"))
            hf_dir = start[key]
        values = {"model.hf_dir": hf_dir} if grid.start_bias == "balanced" else {}
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_dir=values.get("model.hf_dir", "")))
        data_key = _short_hash({"data": dataclasses.asdict(cfg.data), "prompt": cfg.grpo.max_prompt_length,
                                "hf_dir": hf_dir, "seed": cfg.seed})
        data_dir = shared / f"data-seed{cfg.seed}-{data_key}"
        values["data.processed_dir"] = str(data_dir)
        prepare_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, processed_dir=str(data_dir))))
        model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("hf_dir", "mcore_dir")}
        mcore = shared / f"mcore-{_short_hash({'model': model, 'hf_dir': hf_dir})}"
        if not mcore.is_dir():  # in a process of its own, as training does (conversion sets up torch.distributed)
            ray.get(ray.remote(num_cpus=1)(_convert_in_process).remote(cfg, hf_dir, str(mcore)))
        values["model.mcore_dir"] = str(mcore)
        extra[spec.name] = values
    return extra


def shared_baseline(grid: Grid, study: Path, spec: RunSpec, extra: dict[str, Any], folders: list[Path]
                    ) -> dict[str, str]:
    """``grpo.eval_baseline`` for a run whose step-0 evaluation a run among ``folders`` already measured (the same
    start model, problems and settings: ``cookbook.grpo.baseline``), so that it does not repeat it; else nothing,
    and the run measures it. ``extra``: the run's shared inputs (``prepare_study_inputs``)."""
    from cookbook.grpo.baseline import find_measured
    from cookbook.grpo.loop import baseline_fingerprint

    cfg = load_config(grid.preset, values={"runs_dir": str(study), "run_name": spec.name,
                                           **nest_dotted({**spec.overrides, **extra})})
    if not cfg.grpo.eval_every:
        return {}
    found = find_measured([f for f in folders if f.name != spec.name], baseline_fingerprint(cfg))
    return {"grpo.eval_baseline": str(found)} if found else {}


def _start_ray(cfg, init_ray, attempts: int = 5) -> None:
    """Start the study's Ray instance; on a busy machine its start can time out, so try again a few times."""
    import ray

    for attempt in range(attempts):
        try:
            init_ray(cfg)
            return
        except Exception as e:  # Ray raises a bare Exception when its node does not come up in time
            ray.shutdown()
            if attempt == attempts - 1:
                raise
            print(f"study: Ray did not start ({str(e).splitlines()[0][:120]}); trying again", flush=True)
            time.sleep(30)


def run_study(grid, study_dir: str | Path = "", only: tuple[str, ...] = (), progress: bool = True,
              report: bool = True):
    """Run a study's grid (``cookbook.analysis.study``) into ``study_dir`` (default ``runs/study-<time>``): one
    papermill execution of notebook 30 per case and seed, ``<study>/<case>-seed<k>/``, in order. Runs already done
    are skipped, an interrupted one resumes from its checkpoint, a failed one runs again; every run records its case,
    seed, settings, wall time and the machine load in ``study_run.json`` and in the study's ``study.json``. Every run
    joins one local Ray instance started here (instead of starting its own), and a run whose step-0 evaluation an
    earlier run measured (the same start model, problems and settings) reuses it (``shared_baseline``). Then the study
    report goes to ``<study>/report/`` (``cookbook.analysis.study.study_report``). Returns that report (or None)."""
    import datetime
    import os

    import ray
    from tqdm.auto import tqdm

    from cookbook.analysis import study as S
    from cookbook.cluster.placement import init_ray

    specs = S.plan(grid, only)
    study = resolve_from_root(study_dir or f"runs/study-{time.strftime('%Y%m%d-%H%M%S')}")
    study.mkdir(parents=True, exist_ok=True)
    S.check_study_folder(study, grid)
    write_text(study / S.STUDY_FILE, S.grid_yaml(grid))
    status = {s.name: S.run_status(study, s) for s in specs}
    manifest_path = study / S.MANIFEST
    manifest = S.read_manifest(study) if manifest_path.is_file() else {
        "name": grid.name, "created": datetime.datetime.now().isoformat(timespec="seconds"), "runs": []}
    manifest.update(grid=grid.to_dict(), machine=machine_info())
    records = {r["run"]: r for r in manifest.get("runs", [])}

    def save() -> None:
        manifest["runs"] = [records[s.name] for s in S.plan(grid) if s.name in records]
        done = [r for r in manifest["runs"] if r.get("status") == "done"]
        manifest["wall_s_runs"] = round(sum(r.get("wall_s") or 0 for r in done), 1)
        manifest["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
        write_json(manifest_path, manifest)

    todo = [s for s in specs if status[s.name] != "done"]
    print(f"study {study}: {len(specs)} runs, {len(specs) - len(todo)} done, {len(todo)} to run", flush=True)
    t_study = time.perf_counter()
    if todo:
        widest = max(todo, key=lambda s: load_config(grid.preset, values=nest_dotted(s.overrides)).world_size)
        ray_cfg = load_config(grid.preset, values={"runs_dir": str(study), "run_name": "shared",
                                                   **nest_dotted(widest.overrides)})
        had_address = os.environ.get("RAY_ADDRESS")
        # the study's own Ray, which every run's notebook joins through RAY_ADDRESS; its workers import this checkout
        # (only PYTHONPATH is set and put back: Ray's start adds variables, its token among them, that the runs'
        # kernels need to join it)
        before = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = checkout_env(os.environ)["PYTHONPATH"]
        try:
            _start_ray(ray_cfg, init_ray)
        finally:
            if before is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = before
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        try:
            t0 = time.perf_counter()
            shared = prepare_study_inputs(grid, study, todo)
            manifest["prepare_s"] = round(manifest.get("prepare_s", 0) + time.perf_counter() - t0, 1)
            folders = [study / s.name for s in S.plan(grid)]  # where an earlier run's step-0 evaluation may be
            bar = tqdm(todo, desc="study", unit="run", disable=not progress)
            for spec in bar:
                bar.set_postfix_str(spec.name)
                run_dir = study / spec.name
                run_dir.mkdir(exist_ok=True)
                inputs = {**shared[spec.name], **shared_baseline(grid, study, spec, shared[spec.name], folders)}
                record = {"run": spec.name, "case": spec.case, "seed": spec.seed, "overrides": spec.overrides,
                          "status": "running", "resumed": status[spec.name] == "interrupted",
                          "eval_baseline": inputs.get("grpo.eval_baseline"),
                          "started": datetime.datetime.now().isoformat(timespec="seconds"), "load_before": _load(),
                          "where": f"{manifest['machine']['host']} ({manifest['machine']['cpu']['model']})"}
                S.write_marker(run_dir, record)
                records[spec.name] = record
                save()
                t0 = time.perf_counter()
                try:
                    run_notebook(S.NOTEBOOK, spec.notebook_parameters(grid.preset, inputs),
                                 run_name=spec.name, runs_dir=str(study), progress=False)
                    record["status"] = "done"
                except Exception as e:  # one failed run does not stop the others; a new call runs it again
                    record.update(status="failed", error=f"{type(e).__name__}: {str(e).strip()[-2000:]}")
                    print(f"study: {spec.name} failed ({type(e).__name__}); its notebook and logs are in {run_dir}",
                          flush=True)
                record.update(wall_s=round(time.perf_counter() - t0, 1), load_after=_load(),
                              finished=datetime.datetime.now().isoformat(timespec="seconds"))
                S.write_marker(run_dir, record)
                save()
                print(f"study: {spec.name} {record['status']} in {record['wall_s']:.0f} s (load {record['load_after'][0]})",
                      flush=True)
        finally:
            ray.shutdown()
            if had_address is None:
                os.environ.pop("RAY_ADDRESS", None)
            else:
                os.environ["RAY_ADDRESS"] = had_address
    manifest["wall_s_last_call"] = round(time.perf_counter() - t_study, 1)
    save()
    failed = [r["run"] for r in manifest["runs"] if r.get("status") != "done"]
    if failed:
        print(f"study: not done: {', '.join(failed)} (run the same command again to retry them)", flush=True)
    if not report:
        return None
    rep = S.study_report(study)
    manifest["report"] = [str(p.relative_to(study)) for p in rep.files]
    save()
    return rep
