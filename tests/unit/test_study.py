"""The study's grid, plan, resume rules and report, without training: run folders are written by hand (or by the
synthetic example study of ``cookbook.analysis.examples``)."""
import copy

import pytest
import yaml

from cookbook.analysis import study as S
from cookbook.analysis.examples import write_example_study
from cookbook.config import ConfigError

SMALL = {
    "name": "small", "preset": "tiny", "seeds": [1, 2],
    "base": {"model.params_dtype": "bfloat16", "grpo.steps": 2},
    "cases": {
        "off": {"about": "bias frozen", "overrides": {}},
        "on": {"about": "bias updates", "overrides": {"moe.router_enable_expert_bias": True,
                                                       "moe.router_bias_update_rate": 1e-3}},
        "solo": {"overrides": {"grpo.lr": 1e-5}, "seeds": [7], "in_study": False},
    },
    "compare": {"pair": ["off", "solo"]},
}


def test_the_default_grid_is_the_issue_15_study():
    grid = S.load_grid()
    names = [c.name for c in grid.cases]
    for prefix in "abcdefgh":
        assert any(n.startswith(f"{prefix}-") for n in names), prefix
    assert grid.seeds == [1, 2, 3] and grid.base["model.params_dtype"] == "bfloat16"
    specs = S.plan(grid)
    in_study = [c for c in grid.cases if c.in_study]
    assert len(specs) == 3 * len(in_study) + 2  # every studied case x 3 seeds, CP1 and CP2 once
    by_name = {s.name: s for s in specs}
    assert by_name["cp2-seed1"].overrides["parallel.context"] == 2
    assert by_name["h-bias-unsynced-seed3"].overrides["parallel.sync_expert_bias"] is False
    assert by_name["g-trainer-no-bias-seed1"].overrides["moe.trainer_expert_bias"] is False
    assert grid.compare == {"cp": ["cp1", "cp2"]}
    # the YAML form round-trips (cookbook study --show-grid, then --grid FILE)
    assert S.grid_from_dict(yaml.safe_load(S.grid_yaml(grid))).to_dict() == grid.to_dict()


def test_plan_orders_runs_and_maps_notebook_parameters():
    grid = S.grid_from_dict(copy.deepcopy(SMALL))
    specs = S.plan(grid)
    assert [s.name for s in specs] == ["off-seed1", "off-seed2", "on-seed1", "on-seed2", "solo-seed7"]
    assert [s.name for s in S.plan(grid, only=("on",))] == ["on-seed1", "on-seed2"]
    on = specs[2]
    assert on.overrides == {"model.params_dtype": "bfloat16", "grpo.steps": 2, "moe.router_enable_expert_bias": True,
                            "moe.router_bias_update_rate": 1e-3, "seed": 1}
    params = on.notebook_parameters("tiny", {"data.processed_dir": "/d"})
    assert params["router_enable_expert_bias"] is True and params["router_bias_update_rate"] == 1e-3
    assert params["steps"] == 2 and params["walkthrough"] is False and params["plot_every"] == 3
    assert params["overrides"] == {"model.params_dtype": "bfloat16", "seed": 1, "data.processed_dir": "/d"}


def test_every_default_run_passes_the_notebook_check(tmp_path):
    """The runner checks notebook 30's own parameters together with its overrides, as the grid's plan does (case h's
    unsynced bias is refused without the bias updates that come as notebook parameters)."""
    from cookbook.runner import prepare_run

    for spec in S.plan(S.load_grid()):
        cfg = prepare_run(S.NOTEBOOK, spec.notebook_parameters("tiny"), run_name=spec.name,
                          runs_dir=str(tmp_path)).cfg
        assert cfg.moe.router_bias_update_rate == spec.overrides.get("moe.router_bias_update_rate", 0.0)


@pytest.mark.parametrize("change, message", [
    (lambda g: g["cases"]["on"]["overrides"].update({"moe.router_bias_update_ratee": 1}), "did you mean"),
    (lambda g: g["cases"]["on"]["overrides"].update({"moe.router_enable_expert_bias": False}),
     "case 'on', seed 1"),
    (lambda g: g["cases"].update({"x-seed2": {}}), "seed<k>"),
    (lambda g: g["cases"].update({"Bad Name": {}}), "case name"),
    (lambda g: g.update(seeds=[1, 1]), "distinct"),
    (lambda g: g.update(compare={"p": ["off", "nope"]}), "nope"),
    (lambda g: g.update(start_bias="random"), "start_bias"),
    (lambda g: g.update(extra=1), "unknown key"),
    (lambda g: g["cases"]["on"].update(seed=[1]), "unknown key"),
])
def test_a_bad_grid_is_refused_before_anything_runs(change, message):
    values = copy.deepcopy(SMALL)
    change(values)
    with pytest.raises(ConfigError, match=message.replace("<", "<").replace("(", r"\(")):
        S.grid_from_dict(values)


def test_a_grid_file_loads_and_names_its_errors(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    assert [c.name for c in S.load_grid(path).cases] == ["off", "on", "solo"]
    path.write_text("cases: [")
    with pytest.raises(ConfigError, match="invalid YAML"):
        S.load_grid(path)


def test_resume_rules(tmp_path):
    grid = S.grid_from_dict(copy.deepcopy(SMALL))
    off1, off2, on1, *_ = S.plan(grid)
    assert S.run_status(tmp_path, off1) == "todo"
    S.write_marker(tmp_path / off1.name, {"overrides": off1.overrides, "status": "done"})
    S.write_marker(tmp_path / off2.name, {"overrides": off2.overrides, "status": "running"})
    S.write_marker(tmp_path / on1.name, {"overrides": on1.overrides, "status": "failed"})
    assert [S.run_status(tmp_path, s) for s in (off1, off2, on1)] == ["done", "interrupted", "failed"]
    # a run made with other settings, or a folder the study did not make, stops the study
    S.write_marker(tmp_path / off1.name, {"overrides": {**off1.overrides, "grpo.lr": 1.0}, "status": "done"})
    with pytest.raises(ConfigError, match="other settings"):
        S.run_status(tmp_path, off1)
    stray = S.plan(grid)[3]
    (tmp_path / stray.name).mkdir()
    (tmp_path / stray.name / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="not made by this study"):
        S.run_status(tmp_path, stray)
    # one study folder keeps one grid
    (tmp_path / S.STUDY_FILE).write_text(S.grid_yaml(grid))
    S.check_study_folder(tmp_path, grid)
    other = copy.deepcopy(SMALL)
    other["seeds"] = [1, 2, 3]
    with pytest.raises(ConfigError, match="another grid"):
        S.check_study_folder(tmp_path, S.grid_from_dict(other))


def test_final_values():
    rows = [{"step": 0, "eval/accuracy": 0.1}] + [
        {"step": s, "mismatch/abs_diff_mean": float(s), "routing/rollout_vs_trainer": 0.01 * s} for s in range(1, 9)]
    rows[-1]["eval/accuracy"] = 0.25
    assert S.final_value(rows, "mismatch/abs_diff_mean", "tail") == 7.5  # the last quarter: steps 7 and 8
    assert S.final_value(rows, "routing/rollout_vs_trainer", "agreement") == pytest.approx(1 - 0.075)
    assert S.final_value(rows, "eval/accuracy", "last") == 0.25
    assert S.final_value(rows, "eval/accuracy", "gain") == pytest.approx(0.15)
    assert S.final_value(rows, "test/accuracy", "last") != S.final_value(rows, "test/accuracy", "last")  # NaN


def test_study_report_compares_cases_with_error_bars(tmp_path):
    study = write_example_study(tmp_path / "study")
    rep = S.study_report(study)
    assert list(rep.table.index) == ["synthetic-frozen", "synthetic-updates"]  # the cp cases: their own figure
    assert (rep.table["runs"] == 3).all()
    assert "±" in rep.table.loc["synthetic-frozen", "mismatch |logp diff|"]
    assert rep.table.loc["synthetic-updates", "routing agreement n"] == 3
    # the second case of the example has twice the mismatch of the first
    means = rep.table["mismatch |logp diff| mean"]
    assert 1.5 < means["synthetic-updates"] / means["synthetic-frozen"] < 2.5
    assert set(rep.report.groups) == {"synthetic-frozen", "synthetic-updates"}
    for name in ("study", "compare_training", "compare_mismatch", "compare_routing", "compare_cp"):
        assert any(p.name.startswith(name) and p.suffix == ".png" for p in rep.files), name
    assert (study / "report" / "cases.md").read_text().startswith("| case | runs |")
    assert rep.cases().loc["synthetic-cp2", "seeds"] == "1"
    assert list(rep.runs_table().index)[:2] == ["synthetic-frozen-seed1", "synthetic-frozen-seed2"]
    assert rep.show("cp") is rep.figures["cp"]
