"""Resumable checkpoints of a trainer group (one process per trainer rank, any TP / PP / EP / ETP / DP layout).

A checkpoint is one folder, written by every trainer rank together (``save_checkpoint`` and
``load_checkpoint`` are collective) and read back under any layout::

    checkpoints/step_000010/
        dist/            Megatron-Core torch_dist checkpoint: the model's sharded_state_dict() and the AdamW
                         moments sharded the same way ("optimizer.state.exp_avg.<param key>", ...); the
                         per-parameter step counter and the param groups are replicated ("common") state
        rng/rank_00000.pt  each rank's RNG states (python, numpy, torch, cuda, Megatron's RNG tracker)
        state.json       the loop's state (data position, ...), written by global rank 0
        meta.json        the model architecture, the layout it was saved under, the optimizer state keys
        checksums.json   size and sha256 of every other file; written last

The folder appears under its final name only when complete: everything is written into the temporary
sibling ``.tmp-step_000010`` (``cookbook.atomic.atomic_dir``), every rank hashes the files it wrote, rank 0
hashes the rest, writes ``checksums.json`` and renames. ``resume_point`` checks sizes and hashes and returns
the newest intact checkpoint together with the ones it had to skip, so a truncated file makes a run fall
back to the checkpoint before it (and say so) instead of dying in torch's reader. A checkpoint of another
model architecture stops ``load_checkpoint`` before it touches the model (``ConfigError``).

RNG states are restored only when the layout (world size and parallel sizes) is the one they were saved
under; otherwise ``load_checkpoint`` says so and leaves them alone (the GRPO loop's randomness comes from
seeded generators, not from process state).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from cookbook.atomic import atomic_dir, write_json
from cookbook.config import ConfigError

FORMAT = 1
STEP_DIR = re.compile(r"^step_(\d{6,})$")
LEFTOVER = re.compile(r"^\.(tmp|old)-step_(\d{6,})$")  # interrupted saves (cookbook.atomic.atomic_dir)
DIST, RNG, STATE, META, MANIFEST = "dist", "rng", "state.json", "meta.json", "checksums.json"
REQUIRED = (STATE, META, f"{DIST}/.metadata", f"{DIST}/metadata.json", f"{DIST}/common.pt")
PATH_KEYS = ("hf_dir", "mcore_dir")  # model.* keys that are paths, not architecture
LAYOUT_KEYS = ("world", "tp", "pp", "ep", "etp", "cp")
HASH_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the checkpoint, the file and what to do."""


@dataclasses.dataclass
class Resume:
    """Where a run continues: the newest complete and intact checkpoint (``path`` None and ``step`` 0 when
    there is none), and every newer checkpoint folder skipped on the way, with the reason."""

    step: int
    path: Optional[Path]
    skipped: list[tuple[Path, str]] = dataclasses.field(default_factory=list)

    @property
    def fell_back(self) -> bool:
        """True when a newer checkpoint was damaged and an older one (or a fresh start) is used instead."""
        return bool(self.skipped)

    def message(self) -> str:
        """One line per skipped checkpoint and the outcome, for the log."""
        lines = [f"checkpoint {p} skipped: {reason}" for p, reason in self.skipped]
        if self.path is not None:
            lines.append(f"resuming from {self.path} (step {self.step})"
                         + (" instead of the newer damaged checkpoint(s)" if self.skipped else ""))
        elif self.skipped:
            lines.append("no intact checkpoint left: starting from step 0")
        else:
            lines.append("no checkpoint: starting from step 0")
        return "\n".join(lines)


class LoopState(dict):
    """The loop state saved with a checkpoint (``{"step": ..., **loop_state}``), as a plain dict, plus
    whether the RNG states were restored (``rng_restored``) and, if not, why (``note``)."""

    def __init__(self, values: dict, rng_restored: bool = False, note: str = ""):
        super().__init__(values)
        self.rng_restored = rng_restored
        self.note = note


# -- folders -------------------------------------------------------------------------------------------
def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every ``checkpoints/step_N`` folder, oldest first (complete by construction; intact only if
    ``verify_checkpoint`` says so)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[tuple[int, Path]]:
    """The newest checkpoint folder, unverified (for display); resume with ``resume_point``."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# -- checksums -----------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    """A file's SHA-256, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_files(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "sha256"}}`` of files under ``root``, a few at a time (hashlib releases the GIL)."""
    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(4, len(names))) as pool:
        digests = list(pool.map(lambda n: file_sha256(root / n), names))
    return {n: {"size": (root / n).stat().st_size, "sha256": d} for n, d in zip(names, digests)}


def _all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The manifest's file table; raises CheckpointError saying what is wrong with it."""
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"no {MANIFEST}: the save did not finish (or the folder was not written by "
                              "this module)")
    try:
        files = json.loads(file.read_text())["files"]
        for name, entry in files.items():
            int(entry["size"]), str(entry["sha256"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{MANIFEST} is unreadable ({type(e).__name__}: {e})") from None
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        raise CheckpointError(f"{MANIFEST} does not list {', '.join(missing)}")
    return files


def _check_sizes(path: Path, files: dict[str, dict[str, Any]]) -> Optional[str]:
    for name, entry in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != entry["size"]:
            return f"{name} is {size} bytes, {MANIFEST} says {entry['size']} (truncated or overwritten)"
    return None


def _write_manifest(path: Path, step: int, hashed: dict[str, dict[str, Any]]) -> None:
    """``checksums.json``: the entries the ranks hashed (the files each wrote) and, hashed here, every other
    file of the folder. Written last (its presence marks a finished save)."""
    files = dict(hashed)
    files.update(_hash_files(path, [n for n in _all_files(path) if n not in files and n != MANIFEST]))
    write_json(path / MANIFEST, {"format": FORMAT, "step": step, "algorithm": "sha256",
                                 "files": dict(sorted(files.items()))})


def verify_checkpoint(path: str | os.PathLike, hashes: bool = True) -> Optional[str]:
    """None when the checkpoint is intact, else the first problem, naming the file (relative to ``path``).

    Checks that ``checksums.json`` exists and lists the required files, that every listed file exists with
    its size, then (``hashes``) its sha256. Local file reads only (driver or any rank): the sizes cost a
    ``stat`` per file; the hashes read every byte (seconds for the tiny and Moonlight checkpoints, a long
    time for DeepSeek-V3-671B's terabytes on one machine: pass ``hashes=False`` there for sizes only).
    """
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a folder"
    try:
        files = _read_manifest(path)
    except CheckpointError as e:
        return str(e)
    problem = _check_sizes(path, files)
    if problem or not hashes:
        return problem
    actual = _hash_files(path, sorted(files))
    for name in sorted(files):
        if actual[name]["sha256"] != files[name]["sha256"]:
            return f"{name}: sha256 differs from {MANIFEST} (the file is corrupted)"
    return None


def resume_point(run_dir: str | os.PathLike, hashes: bool = True) -> Resume:
    """The newest complete and intact checkpoint of a run; newer ones that fail ``verify_checkpoint``
    (a damaged file, no manifest) are skipped and listed with the reason, so the caller can say in the log
    and the metrics that it fell back (``Resume.fell_back``, ``Resume.message()``)."""
    skipped: list[tuple[Path, str]] = []
    for step, path in reversed(list_checkpoints(run_dir)):
        reason = verify_checkpoint(path, hashes=hashes)
        if reason is None:
            return Resume(step, path, skipped)
        skipped.append((path, reason))
    return Resume(0, None, skipped)


# -- the model architecture ----------------------------------------------------------------------------
def architecture(config_model: Any) -> dict[str, Any]:
    """The architecture as saved and compared: ``cfg.model`` (a dataclass) or its dict, without paths,
    through JSON (so a saved and a live value compare equal)."""
    values = dataclasses.asdict(config_model) if dataclasses.is_dataclass(config_model) else dict(config_model)
    return json.loads(json.dumps({k: v for k, v in values.items() if k not in PATH_KEYS}, sort_keys=True))


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / META
    if not file.is_file():
        raise CheckpointError(f"{path} is not a training checkpoint of this format: no {META} "
                              f"(use resume_point(run_dir) to find an intact one)")
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file} is unreadable ({e}); use resume_point(run_dir) to find an intact "
                              "checkpoint") from None


def check_architecture(path: str | os.PathLike, config_model: Any) -> None:
    """Raise ConfigError when the checkpoint at ``path`` holds another model architecture than
    ``config_model`` (every differing model.* key with both values). Cheap: reads ``meta.json``; the
    driver can call it before starting the trainer group, ``load_checkpoint`` calls it first."""
    path = Path(path)
    saved = _read_meta(path).get("model")
    if saved is None:
        raise CheckpointError(f"{path / META} has no model architecture")
    live = architecture(config_model)
    missing = object()
    diffs = [(k, saved.get(k, missing), live.get(k, missing)) for k in sorted(set(saved) | set(live))
             if saved.get(k, missing) != live.get(k, missing)]
    if not diffs:
        return

    def show(v):
        return "(absent)" if v is missing else json.dumps(v)

    lines = "; ".join(f"model.{k}: checkpoint {show(a)}, this run {show(b)}" for k, a, b in diffs)
    fix = " ".join(f"model.{k}={show(a)}" for k, a, _ in diffs if a is not missing)
    raise ConfigError(
        f"checkpoint {path} holds a different model architecture: {lines}. To resume from it, set the model "
        f"to the checkpoint's architecture ({fix}); to train this architecture, start a new run folder "
        f"(another run_name) instead of resuming this one")


# -- RNG -----------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states: python, numpy, torch, cuda (if present), Megatron's RNG tracker."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tracker = _megatron_tracker()
    if tracker is not None:
        state["megatron_tracker"] = {name: s.get_state() if isinstance(s, torch.Generator) else s.clone()
                                     for name, s in tracker.get_states().items()}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tracker = _megatron_tracker()
    if tracker is not None and "megatron_tracker" in state:
        current = tracker.get_states()
        restored = {}
        for name, s in state["megatron_tracker"].items():
            if isinstance(current.get(name), torch.Generator):  # graph-safe trackers keep generators
                current[name].set_state(s)
                restored[name] = current[name]
            else:
                restored[name] = s.clone()
        tracker.set_states(restored)


def _megatron_tracker():
    """Megatron's model-parallel RNG tracker, if megatron.core is in use in this process."""
    if "megatron.core.tensor_parallel.random" not in sys.modules:
        return None
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


# -- the group ------------------------------------------------------------------------------------------
def _dist():
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("save_checkpoint/load_checkpoint are collective over the trainer group: call "
                           "cookbook.megatron.model.init_parallel(cfg, rank, world) first")
    return dist


def _group_layout() -> dict[str, int]:
    """The layout a checkpoint's RNG states belong to: world size and parallel sizes."""
    from megatron.core import parallel_state as ps

    dist = _dist()
    return {"world": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "ep": ps.get_expert_model_parallel_world_size(),
            "etp": ps.get_expert_tensor_parallel_world_size(), "cp": ps.get_context_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _show_layout(lay: dict) -> str:
    return ", ".join(f"{k} {lay.get(k)}" for k in LAYOUT_KEYS)


def _together(fn: Callable[[], Any], what: str) -> Any:
    """Run a local part of a collective operation on every rank, then agree: when any rank failed, every
    rank raises (naming the ranks and their errors) instead of the others waiting for it forever."""
    dist = _dist()
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 -- reported to every rank below, re-raised here
        error = e
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        message = f"{what} failed: " + "; ".join(f"rank {r}: {e}" for r, e in failed)
        if error is not None:
            raise CheckpointError(message) from error
        raise CheckpointError(message)
    return result


# -- optimizer state, sharded like the parameters -------------------------------------------------------
def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _optimizer_state_keys(optimizer: torch.optim.Optimizer) -> list[str]:
    keys = set()
    for state in optimizer.state.values():
        keys.update(k for k in state if k != "step")
    return sorted(keys)


def _common_step(optimizer: torch.optim.Optimizer, names: dict[int, str]):
    """The step counter every parameter's state shares (Megatron stores it once, as FP32Optimizer does)."""
    steps = {}
    for p in _optimizer_params(optimizer):
        state = optimizer.state.get(p, {})
        if "step" in state:
            steps[names.get(id(p), "?")] = state["step"]
    values = {float(s) for s in steps.values()}
    if len(values) > 1:
        by_value: dict[float, list[str]] = {}
        for name, s in steps.items():
            by_value.setdefault(float(s), []).append(name)
        raise CheckpointError("the optimizer's step counter differs between parameters ("
                              + "; ".join(f"{v:g}: {', '.join(sorted(n)[:3])}" for v, n in sorted(by_value.items()))
                              + "); the checkpoint stores one shared counter: every trainable parameter must get "
                                "a gradient (zero is fine) at every step")
    return next(iter(steps.values())) if steps else None


def _sharded_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        state_keys: Optional[list[str]] = None) -> dict[str, Any]:
    """``{"model": model.sharded_state_dict(), "optimizer": ...}`` with each optimizer state tensor sharded
    like its parameter (``megatron.core.dist_checkpointing.optimizer``; FP32Optimizer's recipe for a plain
    torch optimizer). ``state_keys`` (loading): the state tensors the checkpoint holds, created as zeros
    where this optimizer has none yet, so that they are loaded in place."""
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)

    model_sd = model.sharded_state_dict()
    params = _optimizer_params(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    if state_keys is not None:
        state_dtype = getattr(optimizer, "state_dtype", lambda p: p.dtype)  # fp32 state of bf16 params
        for p in params:
            state = optimizer.state[p]
            for key in state_keys:
                if key not in state:
                    state[key] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
            for key in [k for k in state if k not in state_keys and k != "step"]:
                del state[key]
    id_map = get_param_id_to_sharded_param_map(model_sd, params)
    unmapped = [names.get(id(p), f"#{i}") for i, p in enumerate(params) if i not in id_map]
    if unmapped:
        raise CheckpointError(f"optimizer parameters not in the model's sharded_state_dict: {unmapped[:5]}; "
                              "the optimizer must hold this model's own parameters")
    step = _common_step(optimizer, names)
    optim_sd = optimizer.state_dict()
    optim_state_to_sharding_state(optim_sd, id_map, exclude_keys=("step",))
    if step is not None:
        optim_sd["state"]["common_step"] = step
    return {"model": model_sd, "optimizer": optim_sd}


# -- save -----------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, loop_state: dict[str, Any], config_model: Any,
                    keep: int = 2) -> Path:
    """Write ``checkpoints/step_<step>`` atomically; COLLECTIVE (every trainer rank, same arguments; only
    global rank 0's ``loop_state`` is written). ``config_model``: ``cfg.model`` (or its dict), compared on
    load. Keeps the newest ``keep`` checkpoints up to ``step`` (0 = all); leftovers of interrupted saves
    go. Returns the checkpoint's path on every rank, once it exists."""
    from megatron.core import dist_checkpointing

    dist = _dist()
    rank = dist.get_rank()
    final = checkpoint_dir(run_dir, step)
    meta = {"format": FORMAT, "step": step, "model": architecture(config_model), "layout": _group_layout(),
            "optimizer": {"class": type(optimizer).__name__, "state_keys": _optimizer_state_keys(optimizer)},
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with contextlib.ExitStack() as stack:

        def prepare() -> str:
            if rank != 0:
                return ""
            tmp = stack.enter_context(atomic_dir(final, overwrite=True))
            (tmp / DIST).mkdir()
            (tmp / RNG).mkdir()
            return str(tmp)

        tmp = Path(next(t for t in _together_all(prepare, "preparing checkpoint " + str(final)) if t))
        sharded = _together(lambda: _sharded_state_dict(model, optimizer), f"checkpoint {final}")
        dist_checkpointing.save(sharded, str(tmp / DIST))

        def write_and_hash() -> dict[str, dict[str, Any]]:
            rng_file = f"{RNG}/rank_{rank:05d}.pt"
            torch.save(rng_state(), tmp / rng_file)
            mine = [f"{DIST}/{p.name}" for p in (tmp / DIST).glob(f"__{rank}_*.distcp")]
            return _hash_files(tmp, sorted(mine) + [rng_file])

        hashed = _together_all(write_and_hash, f"checkpoint {final}")

        def finish() -> None:
            if rank != 0:
                return
            files = {name: entry for part in hashed for name, entry in part.items()}
            write_json(tmp / STATE, {"step": step, **loop_state})
            write_json(tmp / META, meta)
            _write_manifest(tmp, step, files)
            stack.close()  # the rename: the checkpoint now exists under its final name
            _prune(Path(run_dir), step, keep)

        _together(finish, f"checkpoint {final}")
    return final


def _together_all(fn: Callable[[], Any], what: str) -> list:
    """``_together``, then every rank's result on every rank."""
    dist = _dist()
    mine = _together(fn, what)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def _prune(run_dir: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step`` (newer ones, left from before a fall-back, are
    replaced when the run reaches their step); remove leftovers of interrupted saves."""
    if keep > 0:
        for _, old in [c for c in list_checkpoints(run_dir) if c[0] <= step][:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    root = run_dir / "checkpoints"
    for p in root.iterdir():
        if LEFTOVER.match(p.name):
            shutil.rmtree(p, ignore_errors=True)


# -- load -----------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config_model: Any) -> LoopState:
    """Load a checkpoint saved under any layout into this group's model and optimizer; COLLECTIVE.

    Before anything is touched: the architecture must match ``config_model`` (else ConfigError, on every
    rank) and every file must have the size ``checksums.json`` records (else CheckpointError naming the
    file; ``resume_point`` also checks the hashes). Then the model's and the optimizer's shards are read
    for this layout (exp_avg / exp_avg_sq resharded like their parameters; step counters and param groups,
    learning rate included, as saved). RNG states are restored when the layout is the saved one; the
    returned ``LoopState`` (the saved loop state dict, ``"step"`` included) says whether
    (``rng_restored``) and why not (``note``)."""
    path = Path(path)
    meta = _read_meta(path)
    check_architecture(path, config_model)
    try:
        problem = _check_sizes(path, _read_manifest(path))
    except CheckpointError as e:
        problem = str(e)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}; resume from an intact one "
                              "(cookbook.grpo.checkpoint.resume_point) or delete it")
    loop_state = json.loads((path / STATE).read_text())
    from megatron.core import dist_checkpointing

    dist = _dist()
    rank = dist.get_rank()

    state_keys = meta.get("optimizer", {}).get("state_keys", [])
    sharded = _together(lambda: _sharded_state_dict(model, optimizer, state_keys=state_keys),
                        f"loading checkpoint {path}")
    loaded = dist_checkpointing.load(sharded, str(path / DIST))

    def apply() -> None:
        model.load_state_dict(loaded["model"])
        osd = loaded["optimizer"]
        step = osd["state"].pop("common_step", None)
        if step is not None:
            for state in osd["state"].values():
                state["step"] = step.clone() if torch.is_tensor(step) else step
        if len(osd["param_groups"]) != len(optimizer.param_groups):
            raise CheckpointError(f"checkpoint {path} has {len(osd['param_groups'])} optimizer param groups, "
                                  f"this optimizer {len(optimizer.param_groups)}")
        optimizer.load_state_dict(osd)

    _together(apply, f"loading checkpoint {path}")
    saved, now = meta.get("layout", {}), _group_layout()
    if all(saved.get(k) == now[k] for k in LAYOUT_KEYS):
        set_rng_state(torch.load(path / RNG / f"rank_{rank:05d}.pt", weights_only=False))
        return LoopState(loop_state, rng_restored=True)
    note = (f"RNG states not restored: checkpoint saved under {_show_layout(saved)}, this group is "
            f"{_show_layout(now)} (the loop's randomness comes from seeded generators)")
    return LoopState(loop_state, rng_restored=False, note=note)
