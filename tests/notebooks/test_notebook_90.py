"""Notebook 90 runs headless (papermill, the project kernel) on two small synthetic run folders: no training,
seconds."""
import json

from cookbook.analysis.examples import write_example_runs
from cookbook.runner import run_notebook


def test_90_analysis_on_two_runs(tmp_path):
    runs = write_example_runs(tmp_path / "runs", cases=("synthetic",), seeds=(1, 2), steps=6, eval_every=3)
    out_dir = tmp_path / "report"
    executed = run_notebook("90_analysis", {"runs": [str(p) for p in runs], "out_dir": str(out_dir)},
                            run_name="analysis", runs_dir=str(tmp_path / "runs"), progress=False)
    nb = json.loads(executed.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    stderr = ["".join(o["text"]) for o in outputs if o.get("name") == "stderr"]
    assert not stderr, stderr
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4  # training, mismatch, routing, study
    assert {p.name for p in out_dir.iterdir()} == {"compare_training.png", "compare_mismatch.png",
                                                   "compare_routing.png", "study.png", "summary.csv", "study.csv",
                                                   "coverage.csv"}
    summary = (out_dir / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("run,group,folder") and [line.split(",")[:2] for line in summary[1:]] == [
        ["synthetic-seed1", "synthetic"], ["synthetic-seed2", "synthetic"]]
    assert "synthetic-seed1" in executed.read_text()  # the tables name the runs


def test_90_analysis_on_a_study_folder(tmp_path):
    """With ``study``: each case's mean over its seeds in every figure, the case table, the CP comparison."""
    from cookbook.analysis.examples import write_example_study

    study = write_example_study(tmp_path / "study")
    executed = run_notebook("90_analysis", {"study": str(study)}, run_name="analysis", runs_dir=str(tmp_path / "runs"),
                            progress=False)
    nb = json.loads(executed.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    stderr = ["".join(o["text"]) for o in outputs if o.get("name") == "stderr"]
    assert not stderr, stderr
    # training, mismatch, routing and study by case, and the grid's comparison (cp)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 5
    text = executed.read_text()
    assert "synthetic-updates" in text and "routing agreement" in text and "±" in text
    assert {"cases.csv", "cases.md", "compare_cp.png", "study.png"} <= {p.name for p in (study / "report").iterdir()}
