"""Pieces the GRPO loop stands on: prompt stream, checkpoints, metrics tracking, Ray placement plan."""
import json
import random

import numpy as np
import pytest
import torch

from cookbook.analysis.metrics import plot_runs, read_metrics
from cookbook.cluster.placement import plan_placement
from cookbook.config import load_config
from cookbook.grpo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from cookbook.grpo.prompts import PromptStream, step_seed
from cookbook.grpo.tracking import MetricsTracker


def test_prompt_stream_resumes_exactly():
    records = [{"i": i} for i in range(11)]
    a = PromptStream(records, 4, seed=3)
    seen = [a.next_batch() for _ in range(4)]  # crosses an epoch boundary (ragged tail dropped)
    assert all(len(b) == 4 for b in seen) and a.state_dict()["epoch"] == 1
    state = a.state_dict()
    b = PromptStream(records, 4, seed=3)
    b.load_state_dict(state)
    assert [b.next_batch() for _ in range(3)] == [a.next_batch() for _ in range(3)]
    with pytest.raises(ValueError, match="exceeds"):
        PromptStream(records, 12, seed=0)


def test_step_seed_is_stable_and_distinct():
    assert step_seed(1, 5) == step_seed(1, 5)
    assert len({step_seed(1, s) for s in range(100)}) == 100
    assert step_seed(1, 5, "eval") != step_seed(1, 5)


def test_checkpoint_round_trip_restores_rng_and_keeps_the_newest(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"model": model.state_dict(), "optim": opt.state_dict()},
                        {"prompts": {"epoch": 0, "offset": step}}, keep=2)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step_000002", "step_000003"]
    step, path = latest_checkpoint(tmp_path)
    assert step == 3
    random.random(), np.random.rand(), torch.rand(1)  # move every generator on
    trainer_state, loop_state = load_checkpoint(path)
    assert loop_state == {"step": 3, "prompts": {"epoch": 0, "offset": 3}}
    assert torch.equal(trainer_state["model"]["weight"], model.weight)
    again = (random.random(), np.random.rand(), torch.rand(1))
    assert expected[0] == again[0] and expected[1] == again[1] and torch.equal(expected[2], again[2])


def test_incomplete_checkpoint_is_not_picked(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step_000009").mkdir(parents=True)
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints" / "step_000004").mkdir()
    with pytest.raises(FileNotFoundError, match="missing trainer.pt"):
        load_checkpoint(tmp_path / "checkpoints" / "step_000004")


def test_tracker_writes_jsonl_tensorboard_and_truncates_on_resume(tmp_path):
    cfg = load_config("tiny", ["logging.wandb_mode=disabled"], values={"runs_dir": str(tmp_path), "run_name": "r"})
    t = MetricsTracker(cfg)
    for step in range(1, 5):
        t.log(step, {"reward/mean": step / 10, "eval/accuracy": float("nan"), "time/step": torch.tensor(1.5)})
    t.close()
    rows = read_metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[0]["eval/accuracy"] is None
    assert rows[0]["time/step"] == 1.5
    assert any((cfg.run_dir / "tensorboard").iterdir())
    t = MetricsTracker(cfg, resume_step=2)
    t.log(3, {"reward/mean": 0.9})
    t.close()
    assert [(r["step"], r["reward/mean"]) for r in read_metrics(cfg.run_dir)] == [(1, 0.1), (2, 0.2), (3, 0.9)]
    fig = plot_runs({"r": read_metrics(cfg.run_dir)}, path=tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000 and fig.axes


def test_tracker_wandb_offline(tmp_path):
    cfg = load_config("tiny", ["logging.wandb_mode=offline", "logging.tensorboard=false"],
                      values={"runs_dir": str(tmp_path), "run_name": "w"})
    t = MetricsTracker(cfg)
    t.log(1, {"reward/mean": 0.5})
    t.close()
    assert list((cfg.run_dir / "wandb").glob("offline-run-*"))


def test_read_metrics_names_the_bad_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{oops\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2"):
        read_metrics(tmp_path)


def test_placement_plans():
    cpu = plan_placement(load_config("tiny"))
    assert cpu.bundles == [{"CPU": 1.0}, {"CPU": 1.0}] and cpu.trainer_bundles == [0] and cpu.rollout_bundles == [1]
    moon = load_config("moonlight-16b-a3b")
    colocated = plan_placement(moon)
    assert len(colocated.bundles) == 8 and colocated.trainer_bundles == colocated.rollout_bundles
    assert colocated.trainer_resources["num_gpus"] == 0.5
    split = plan_placement(load_config("moonlight-16b-a3b", ["parallel.colocate=false"]))
    assert set(split.trainer_bundles).isdisjoint(split.rollout_bundles)
    assert len(split.trainer_bundles) + len(split.rollout_bundles) == 8
