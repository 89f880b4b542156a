"""Pieces the GRPO loop stands on: prompt stream, metrics tracking, Ray placement plan (checkpoints:
tests/unit/test_checkpoint.py and tests/integration/test_checkpoints.py)."""
import pytest
import torch

from cookbook.analysis.metrics import plot_runs, read_metrics
from cookbook.cluster.placement import plan_placement
from cookbook.config import load_config
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
    # on CPU the trainer group has as many ranks as the layout needs, each its own process
    for override, ranks in (("parallel.expert=2", 2), ("parallel.tensor=2", 2), ("parallel.expert=4", 4)):
        cfg = load_config("tiny", [override, "parallel.sequence_parallel=true"])
        plan = plan_placement(cfg)
        assert cfg.world_size == ranks and plan.trainer_bundles == list(range(ranks)) and plan.rollout_bundles == [ranks]
    moon = load_config("moonlight-16b-a3b")
    colocated = plan_placement(moon)
    assert len(colocated.bundles) == 8 and colocated.trainer_bundles == colocated.rollout_bundles
    assert colocated.trainer_resources["num_gpus"] == 0.5
    split = plan_placement(load_config("moonlight-16b-a3b", ["parallel.colocate=false"]))
    assert set(split.trainer_bundles).isdisjoint(split.rollout_bundles)
    assert len(split.trainer_bundles) + len(split.rollout_bundles) == 8


def test_placement_over_nodes_pins_each_bundle_to_a_node():
    assert plan_placement(load_config("tiny")).bundle_nodes == []  # one node: Ray packs as it likes
    cpu = plan_placement(load_config("tiny", ["parallel.num_nodes=2", "parallel.expert=4"]))
    assert cpu.bundle_nodes == [0, 0, 1, 1, 0]  # trainer ranks in blocks over the nodes, rollout beside the driver
    gpu = plan_placement(load_config("moonlight-16b-a3b", ["parallel.num_nodes=2"]))
    assert gpu.bundle_nodes == [0] * 8 + [1] * 8  # bundle b on the node of GPU b


def test_summary_tables_of_a_run_without_evaluations(tmp_path):
    """grpo.eval_every=0 logs no eval rows: the accuracy table is empty, the timing table is not."""
    import json

    from cookbook.config import save_config
    from cookbook.grpo.recipe import summary_tables

    save_config(load_config("tiny", ["grpo.eval_every=0"]), tmp_path)
    rows = [{"step": s, "time/rollout": 1.0 + s, "time/train": 2.0, "time/step": 3.0 + s} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    accuracy, timing = summary_tables(tmp_path)
    assert accuracy.empty and accuracy.index.name == "step"
    assert timing.loc["rollout", "mean seconds"] == pytest.approx(2.5)
    assert timing.loc["step", "steps"] == 2
