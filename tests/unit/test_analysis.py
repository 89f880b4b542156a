"""Notebook 90 / `cookbook report` on run folders written here: panels only for logged metrics, the study's error
bars, the CSV tables, and the CLI's errors."""
import csv
import json
import math

import pytest
import yaml

from cookbook.analysis.metrics import aggregate, layer_keys, panel_series, plot_groups
from cookbook.analysis.report import build_report, group_runs, load_runs
from cookbook.cli import main


def _run(root, name, rows, config=None):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "config.yaml").write_text(yaml.safe_dump(config or {"grpo": {"mismatch_threshold": 0.5}}))
    return folder


def _titles(fig):
    return [ax.get_title() for ax in fig.axes if ax.axison]


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_panels_only_for_logged_metrics_and_lacking_runs_named(tmp_path):
    a = _run(tmp_path, "a", [{"step": 0, "eval/accuracy": 0.1}, {"step": 1, "reward/mean": 0.2},
                             {"step": 2, "reward/mean": 0.3, "eval/accuracy": 0.2}])
    b = _run(tmp_path, "b", [{"step": 1, "reward/mean": 0.1, "mismatch/abs_diff_mean": 0.01},
                             {"step": 2, "reward/mean": 0.2, "mismatch/abs_diff_mean": 0.02}])
    rep = build_report([a, b], out_dir=tmp_path / "out")
    assert set(rep.figures) == {"training", "mismatch"}
    assert _titles(rep.figures["training"]) == ["mean training reward", "eval accuracy (test split)\nno data: b"]
    assert _titles(rep.figures["mismatch"]) == ["mean |logp trainer - logp rollout|\nno data: a"]
    assert "routing/*" in rep.not_drawn["routing"] and "single run" in rep.not_drawn["study"]
    assert "not drawn" in rep.show("routing").data and "single run" in rep.table("study").data
    assert list(rep.table("summary").columns) == ["a", "b"]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["compare_mismatch.png", "compare_training.png", "coverage.csv",
                                                    "summary.csv"]
    cov = {(r["figure"], r["metric"]): r for r in _csv(out / "coverage.csv")}
    assert cov[("training", "eval/accuracy")]["a"] == "2 steps" and cov[("training", "eval/accuracy")]["b"] == "-"
    assert cov[("routing", "routing/rollout_vs_trainer")]["a"] == "-"


def test_per_layer_routing_panel_is_the_mean_over_steps_by_layer(tmp_path):
    rows = [{"step": 1, "routing/policy_change_layer1": 0.1, "routing/policy_change_layer10": 0.4,
             "routing/policy_change": 0.25},
            {"step": 2, "routing/policy_change_layer1": 0.3, "routing/policy_change_layer10": 0.2,
             "routing/policy_change": 0.25}]
    assert layer_keys(rows, "routing/policy_change_layer{L}") == {1: "routing/policy_change_layer1",
                                                                  10: "routing/policy_change_layer10"}
    xs, ys = panel_series(rows, "routing/policy_change_layer{L}")
    assert xs == [1, 10] and ys == pytest.approx([0.2, 0.3])
    rep = build_report([_run(tmp_path, "r", rows)], out_dir=tmp_path / "o")
    titles = _titles(rep.figures["routing"])
    assert titles == ["experts changed by the step's updates\n(share of token x MoE layer)",
                      "policy change by MoE layer\n(mean over steps)"]
    assert (tmp_path / "o" / "compare_routing.png").stat().st_size > 1000


def test_aggregate_minmax_and_sample_std():
    runs = [([0, 1], [1.0, 10.0]), ([0, 1], [2.0, 20.0]), ([0], [3.0])]
    steps, mean, lo, hi, n = aggregate(runs, "minmax")
    assert steps == [0, 1] and n == [3, 2]
    assert mean == pytest.approx([2.0, 15.0]) and lo == [1.0, 10.0] and hi == [3.0, 20.0]
    _, mean, lo, hi, _ = aggregate(runs, "std")
    sd1 = math.sqrt(((10 - 15) ** 2 + (20 - 15) ** 2) / 1)  # ddof=1
    assert lo == pytest.approx([1.0, 15 - sd1]) and hi == pytest.approx([3.0, 15 + sd1])
    _, _, lo, hi, _ = aggregate([([5], [0.4])], "std")
    assert lo == hi == [0.4]  # one run: no bar
    with pytest.raises(ValueError, match="spread 'iqr'"):
        aggregate(runs, "iqr")


def _seeds(tmp_path):
    acc = {("x", 1): [0.1, 0.3], ("x", 2): [0.2, 0.5], ("x", 3): [0.3, 0.4], ("y", 1): [0.1, 0.1]}
    folders = []
    for (case, seed), (a0, a1) in acc.items():
        folders.append(_run(tmp_path, f"{case}-seed{seed}", [
            {"step": 0, "eval/accuracy": a0},
            {"step": 1, "mismatch/abs_diff_mean": 0.01 * seed, "routing/rollout_vs_trainer": 0.1 * seed},
            {"step": 2, "eval/accuracy": a1, "mismatch/abs_diff_mean": 0.03 * seed}]))
    return folders


def test_study_groups_seed_names_with_right_error_bars(tmp_path):
    rep = build_report(_seeds(tmp_path), out_dir=tmp_path / "out")
    assert {g: [r.label for r in m] for g, m in rep.groups.items()} == {
        "x": ["x-seed1", "x-seed2", "x-seed3"], "y": ["y-seed1"]}
    fig = rep.figures["study"]
    assert "error bars: min-max" in fig._suptitle.get_text()
    acc = [ax for ax in fig.axes if ax.get_title().startswith("eval accuracy")][0]
    line = acc.lines[0]  # group x: mean at steps 0 and 2, bars from min to max
    assert list(line.get_xdata()) == [0, 2] and list(line.get_ydata()) == pytest.approx([0.2, 0.4])
    bars = [seg for coll in acc.collections for seg in coll.get_segments()]
    assert any(seg[0][1] == pytest.approx(0.3) and seg[1][1] == pytest.approx(0.5) for seg in bars)
    study = {r["group"]: r for r in _csv(tmp_path / "out" / "study.csv")}
    assert float(study["x"]["final eval accuracy mean"]) == pytest.approx(0.4)
    assert float(study["x"]["final eval accuracy min"]) == 0.3 and float(study["x"]["final eval accuracy max"]) == 0.5
    assert float(study["x"]["best eval accuracy mean"]) == pytest.approx(0.4)
    assert float(study["x"]["mean |logp diff| mean"]) == pytest.approx((0.02 + 0.04 + 0.06) / 3)
    assert study["y"]["runs"] == "1" and float(study["y"]["final eval accuracy max"]) == 0.1

    std = build_report(_seeds(tmp_path / "again"), out_dir=tmp_path / "std", spread="std").study
    assert std.loc["x", "final eval accuracy std"] == pytest.approx(0.1)  # sample std of 0.3, 0.5, 0.4
    assert "final eval accuracy min" not in std.columns


def test_summary_csv(tmp_path):
    a = _run(tmp_path, "a", [{"step": 0, "eval/accuracy": 0.1}, {"step": 1, "mismatch/abs_diff_mean": 0.2,
                                                                 "routing/rollout_vs_trainer": 0.05},
                             {"step": 2, "eval/accuracy": 0.3, "mismatch/abs_diff_mean": 0.4,
                              "routing/rollout_vs_trainer": 0.15},
                             {"step": 4, "eval/accuracy": 0.2}])
    b = _run(tmp_path, "b", [{"step": 1, "reward/mean": 0.5}])
    build_report([a, b], labels=["first", ""], out_dir=tmp_path / "out")
    rows = {r["run"]: r for r in _csv(tmp_path / "out" / "summary.csv")}
    assert list(rows) == ["first", "b"]
    r = rows["first"]
    assert float(r["final eval accuracy"]) == 0.2 and float(r["best eval accuracy"]) == 0.3
    assert r["best eval accuracy step"] == "2" and r["last step"] == "4"
    assert float(r["mean |logp diff|"]) == pytest.approx(0.3)
    assert float(r["mean routing disagreement"]) == pytest.approx(0.1)
    assert rows["b"]["final eval accuracy"] == "" and rows["b"]["mean routing disagreement"] == ""


def test_explicit_groups_labels_and_threshold_in_title(tmp_path):
    a = _run(tmp_path / "p", "run", [{"step": 1, "mismatch/frac_over_threshold": 0.1, "eval/accuracy": 0.1}])
    b = _run(tmp_path / "q", "run", [{"step": 1, "mismatch/frac_over_threshold": 0.2, "eval/accuracy": 0.2}])
    runs = load_runs([a, b])
    assert [r.label for r in runs] == ["p/run", "q/run"]  # same folder name: the parent tells them apart
    assert {g: len(m) for g, m in group_runs(runs, {"both": ["p/run", b]}).items()} == {"both": 2}
    with pytest.raises(ValueError, match="'nope' is neither a run label nor a run folder"):
        group_runs(runs, {"g": ["nope"]})
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        load_runs([a, b], ["x"])
    with pytest.raises(ValueError, match="two runs labelled 'x'"):
        load_runs([a, b], ["x", "x"])
    rep = build_report([a, b], groups={"both": [a, b]}, out_dir=tmp_path / "out")
    assert _titles(rep.figures["mismatch"]) == ["share of tokens with |diff| > 0.5"]
    assert list(rep.study.index) == ["both"] and rep.study.loc["both", "runs"] == 2


def test_stale_figures_of_an_earlier_report_are_removed(tmp_path):
    folders = _seeds(tmp_path)
    build_report(folders, out_dir=tmp_path / "out")
    assert (tmp_path / "out" / "study.png").is_file()
    build_report(folders[:1], out_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "study.png").exists() and not (tmp_path / "out" / "study.csv").exists()


def test_plot_groups_needs_some_metric():
    with pytest.raises(ValueError, match="no metric to plot"):
        plot_groups({"g": {"r": [{"step": 1, "reward/mean": 1.0}]}})


def test_cli_report(tmp_path, capsys):
    folders = _seeds(tmp_path)
    assert main(["report", *map(str, folders), "--spread", "std"]) == 0
    out = capsys.readouterr().out
    assert "summary:" in out and "study (spread: +-1 sample std" in out
    plots = folders[0] / "plots"  # default: the first run's plots/
    assert {"compare_training.png", "compare_mismatch.png", "compare_routing.png", "study.png", "summary.csv",
            "study.csv", "coverage.csv"} <= {p.name for p in plots.iterdir()}
    assert main(["report", str(folders[0]), str(folders[3]), "--out", str(tmp_path / "o"),
                 "--group", f"both={folders[0]},y-seed1"]) == 0
    assert _csv(tmp_path / "o" / "study.csv")[0]["runs"] == "2"


def test_cli_report_errors_name_the_path(tmp_path, capsys):
    ok = _run(tmp_path, "ok", [{"step": 1, "reward/mean": 0.1}])
    missing = tmp_path / "missing"
    assert main(["report", str(ok), str(missing)]) == 2
    assert f"error: run folder {missing} does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert f"error: run folder {empty} has no metrics.jsonl" in capsys.readouterr().err
    broken = _run(tmp_path, "broken", [{"step": 1}])
    (broken / "metrics.jsonl").write_text('{"step": 1}\n{oops\n')
    assert main(["report", str(broken)]) == 2
    assert "metrics.jsonl, line 2" in capsys.readouterr().err
    nostep = _run(tmp_path, "nostep", [{"reward/mean": 1.0}])
    assert main(["report", str(nostep)]) == 2
    assert "line 1: a step row needs an integer 'step'" in capsys.readouterr().err
    assert main(["report", str(ok), "--group", "oops"]) == 2
    assert "expected NAME=RUN" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report"])  # at least one run
    assert not (ok / "plots").exists() or not any((ok / "plots").iterdir())
