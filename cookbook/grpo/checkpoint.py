"""Resumable checkpoints: model, optimizer, RNG states and data position, written atomically.

A checkpoint folder ``checkpoints/step_000010`` appears only when complete (cookbook.atomic.atomic_dir),
so a run killed mid-save resumes from the previous one. Resume restores every RNG and the prompt
stream position, which makes a resumed tiny run end with the same metrics as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from cookbook.atomic import atomic_dir

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[tuple[int, Path]]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | os.PathLike, step: int, trainer_state: dict[str, Any],
                    loop_state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``trainer.pt`` (model + optimizer), ``rng.pt`` and ``state.json`` (step, data position, metrics
    needed to continue); keep the newest ``keep`` checkpoints."""
    path = checkpoint_dir(run_dir, step)
    with atomic_dir(path, overwrite=True) as tmp:
        torch.save(trainer_state, tmp / "trainer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **loop_state}, indent=2))
    for _, old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (trainer_state, loop_state) and restore the RNG states saved with them."""
    path = Path(path)
    for name in ("trainer.pt", "rng.pt", "state.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} is missing {name}; delete it to resume from an earlier one")
    trainer_state = torch.load(path / "trainer.pt", weights_only=False)
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return trainer_state, json.loads((path / "state.json").read_text())
