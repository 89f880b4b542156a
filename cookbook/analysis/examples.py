"""Synthetic run folders shaped like real ones, for trying notebook 90 and ``cookbook report`` without training,
and for their tests. Every number in them is made up (their config.yaml says ``synthetic: true``, and the
folder names start with ``synthetic-``): they show the layout of the analysis, not a result.
"""
from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Sequence

import yaml

from cookbook.atomic import write_jsonl, write_text


def write_example_runs(root: str | os.PathLike, cases: Sequence[str] = ("synthetic-a", "synthetic-b"),
                       seeds: Sequence[int] = (1, 2, 3), steps: int = 20, eval_every: int = 5,
                       moe_layers: Sequence[int] = (1, 2), routing: bool = True) -> list[Path]:
    """Write ``<root>/<case>-seed<k>/`` (metrics.jsonl + config.yaml) for each case and seed; return the folders.

    Case ``i`` has ``i`` times more rollout-vs-trainer mismatch and routing disagreement than the first and a
    lower accuracy, so that the figures have something to tell apart. ``routing=False`` leaves out the
    ``routing/*`` and ``is/*`` metrics (as runs from before they were logged).
    """
    folders = []
    for ci, case in enumerate(cases):
        for seed in seeds:
            rng = random.Random(f"{case}/{seed}")
            scale = 1.0 + ci
            rows = []
            for step in range(steps + 1):
                row: dict = {"step": step}
                if step % eval_every == 0 or step == steps:
                    row["eval/accuracy"] = round(0.10 + 0.08 * (1 - math.exp(-step / 8)) / scale
                                                 + rng.gauss(0, 0.006), 4)
                if step:
                    mm = 0.01 * scale * (1 + 0.3 * rng.random())
                    row.update({
                        "reward/mean": 0.12 + 0.1 * (1 - math.exp(-step / 6)) / scale + rng.gauss(0, 0.01),
                        "response/length_mean": 21 + 2 * math.sin(step / 4) + rng.gauss(0, 0.3),
                        "actor/kl": 0.002 * step * scale * (1 + 0.2 * rng.random()),
                        "actor/entropy": 0.3 - 0.004 * step + rng.gauss(0, 0.005),
                        "actor/clip_frac_low": 0.004 * scale * rng.random(),
                        "actor/clip_frac_high": 0.003 * scale * rng.random(),
                        "mismatch/abs_diff_mean": mm,
                        "mismatch/abs_diff_p99": 12 * mm,
                        "mismatch/frac_over_threshold": 0.002 * scale * rng.random(),
                        "time/step": 4.5 + rng.random(),
                    })
                    if routing:
                        per_layer = {L: 0.02 * scale * (1 + 0.5 * j) * (1 + 0.3 * rng.random())
                                     for j, L in enumerate(moe_layers)}
                        change = {L: 0.05 * math.exp(-step / 10) * (1 + 0.4 * j) * (1 + 0.2 * rng.random())
                                  for j, L in enumerate(moe_layers)}
                        row.update({f"routing/rollout_vs_trainer_layer{L}": v for L, v in per_layer.items()})
                        row.update({f"routing/policy_change_layer{L}": v for L, v in change.items()})
                        row["routing/rollout_vs_trainer"] = sum(per_layer.values()) / len(per_layer)
                        row["routing/rollout_vs_trainer_any_layer"] = min(1.0, 1.6 * row["routing/rollout_vs_trainer"])
                        row["routing/policy_change"] = sum(change.values()) / len(change)
                        row["is/masked_token_frac"] = 0.001 * scale * rng.random()
                        row["is/masked_seq_frac"] = 0.01 * scale * rng.random()
                rows.append(row)
            folder = Path(root) / f"{case}-seed{seed}"
            write_jsonl(folder / "metrics.jsonl", rows)
            config = {"synthetic": True, "preset": "tiny", "run_name": folder.name, "seed": seed,
                      "grpo": {"mismatch_threshold": 0.5, "steps": steps, "eval_every": eval_every},
                      "moe": {"router_bias_update_rate": 1e-3 * ci}}
            write_text(folder / "config.yaml", yaml.safe_dump(config, sort_keys=False))
            folders.append(folder)
    return folders


EXAMPLE_GRID = {
    "name": "synthetic-study", "about": "made-up numbers that show the layout of a study, not a result",
    "preset": "tiny", "seeds": [1, 2, 3], "start_bias": "checkpoint",
    "base": {"model.params_dtype": "bfloat16", "grpo.steps": 8},
    "cases": {
        "synthetic-frozen": {"about": "expert bias frozen", "overrides": {}},
        "synthetic-updates": {"about": "expert-bias updates", "overrides": {"moe.router_enable_expert_bias": True,
                                                                            "moe.router_bias_update_rate": 1e-3}},
        "synthetic-cp1": {"about": "compared on its own", "overrides": {}, "seeds": [1], "in_study": False},
        "synthetic-cp2": {"about": "compared on its own", "overrides": {"grpo.lr": 1e-5}, "seeds": [1],
                          "in_study": False},
    },
    "compare": {"cp": ["synthetic-cp1", "synthetic-cp2"]},
}


def write_example_study(root: str | os.PathLike, grid: dict | None = None, steps: int = 8) -> Path:
    """A study folder as ``cookbook study`` leaves it (``study.yaml``, ``study.json``, one finished run folder per
    case and seed with its ``study_run.json``), every run's metrics made up as ``write_example_runs`` makes them."""
    import json

    from cookbook.analysis import study as S

    root = Path(root)
    g = S.grid_from_dict(grid or EXAMPLE_GRID)
    root.mkdir(parents=True, exist_ok=True)
    write_text(root / S.STUDY_FILE, S.grid_yaml(g))
    records = []
    for i, case in enumerate(g.cases):
        # write_example_runs makes its i-th case i times worse: case i here is that i-th case, under its own name
        names = [f"synthetic-filler-{j}" for j in range(i)] + [case.name]
        for seed in case.seeds if case.seeds is not None else g.seeds:
            write_example_runs(root / ".examples", cases=names, seeds=(seed,), steps=steps, eval_every=steps // 2)
            src = root / ".examples" / f"{case.name}-seed{seed}"
            spec = next(s for s in S.plan(g, only=(case.name,)) if s.seed == seed)
            dst = root / spec.name
            dst.mkdir(exist_ok=True)
            for f in ("metrics.jsonl", "config.yaml"):
                (dst / f).write_text((src / f).read_text())
            S.write_marker(dst, {"run": spec.name, "case": case.name, "seed": seed, "overrides": spec.overrides,
                                 "status": "done", "wall_s": 1.0})
            records.append({"run": spec.name, "case": case.name, "seed": seed, "status": "done", "wall_s": 1.0,
                            "where": "synthetic"})
    import shutil

    shutil.rmtree(root / ".examples")
    write_text(root / S.MANIFEST, json.dumps({"name": g.name, "synthetic": True, "runs": records}, indent=2))
    return root
