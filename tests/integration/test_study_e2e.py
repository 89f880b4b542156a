"""`cookbook study` end to end on a micro grid: two cases x one seed x two steps, each a papermill run of notebook 30
on tiny in bf16 from the start model with a balancing expert bias; the manifest, the report and notebook 90 on the
study folder; a second call finds every run done and only redraws the report."""
import json

import pytest
import yaml

from cookbook.analysis import study as S
from cookbook.cli import main
from cookbook.runner import run_notebook

pytestmark = pytest.mark.slow

MICRO = {
    "name": "micro", "preset": "tiny", "seeds": [1], "start_bias": "balanced",
    # the default grid's base (bf16, no checkpoint, no HF export), shortened: two steps, 64 test problems
    "base": {**S.DEFAULT_GRID["base"], "grpo.steps": 2, "grpo.eval_every": 2, "data.max_test_examples": 64},
    "cases": {
        "a-defaults": {"about": "the tutorial's settings", "overrides": {}},
        # the trainer routes without the bias the rollout engine keeps: the two disagree where the bias decides
        "g-trainer-no-bias": {"about": "trainer without the expert bias",
                              "overrides": {"moe.trainer_expert_bias": False, "parallel.sync_expert_bias": False}},
    },
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump(MICRO))
    assert main(["study", "--grid", str(grid), "--out", str(root / "micro"), "--no-progress"]) == 0
    return root / "micro", grid


def test_every_run_done_with_its_record(study):
    folder, _ = study
    manifest = json.loads((folder / S.MANIFEST).read_text())
    assert [(r["run"], r["status"]) for r in manifest["runs"]] == [("a-defaults-seed1", "done"),
                                                                   ("g-trainer-no-bias-seed1", "done")]
    assert all(r["wall_s"] > 0 and r["load_before"] and r["where"] for r in manifest["runs"])
    assert manifest["machine"]["cpu"]["cores"] >= 1 and manifest["grid"]["name"] == "micro"
    for run in ("a-defaults-seed1", "g-trainer-no-bias-seed1"):
        assert (folder / run / "notebooks" / "30_grpo_moonlight.ipynb").is_file()
        rows = [json.loads(line) for line in (folder / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1, 2]
        assert not (folder / run / "checkpoints").exists() and not (folder / run / "hf_export").exists()  # final_save
    # g starts from a's model with a's problems and seed: it logs a's step-0 evaluation, and says so
    a, g = ([json.loads(line) for line in (folder / run / "metrics.jsonl").read_text().splitlines()][0]
            for run in ("a-defaults-seed1", "g-trainer-no-bias-seed1"))
    source = folder / "a-defaults-seed1" / "eval_step0.json"
    assert g == {**a, "eval/reused_from": str(source)}
    record = json.loads((folder / "g-trainer-no-bias-seed1" / "eval_step0.json").read_text())
    assert record["reused_from"] == str(source) and record["measured_in"] == str(folder / "a-defaults-seed1")
    assert [r.get("eval_baseline") for r in manifest["runs"]] == [None, str(source)]
    config = yaml.safe_load((folder / "g-trainer-no-bias-seed1" / "config.yaml").read_text())
    assert config["moe"]["trainer_expert_bias"] is False and config["model"]["params_dtype"] == "bfloat16"
    bias = json.loads((folder / "shared").glob("start-model-*").__next__().joinpath("expert_bias.json").read_text())
    assert all(max(map(abs, layer["bias"])) > 0 for layer in bias["layers"].values())


def test_the_report_tells_the_cases_apart(study):
    folder, _ = study
    table = (folder / "report" / "cases.csv").read_text()
    assert table.startswith("case,runs,")
    rep = S.study_report(folder)
    mismatch = rep.table["mismatch |logp diff| mean"]
    routing = rep.table["routing agreement mean"]
    # the bias the trainer lacks moves tokens to other experts: far more mismatch, far less routing agreement
    assert mismatch["g-trainer-no-bias"] > 3 * mismatch["a-defaults"]
    assert routing["g-trainer-no-bias"] < routing["a-defaults"] - 0.05
    # one seed per case here: the seed-spread figure is not drawn, and the report says why (cookbook report)
    assert not (folder / "report" / "study.png").exists()
    assert "single run" in rep.report.not_drawn["study"]
    assert (folder / "report" / "compare_mismatch.png").is_file()


def test_a_second_call_resumes_with_nothing_to_run(study, capsys):
    folder, grid = study
    before = {r: (folder / r / "metrics.jsonl").stat().st_mtime for r in ("a-defaults-seed1", "g-trainer-no-bias-seed1")}
    assert main(["study", "--out", str(folder), "--no-progress"]) == 0  # its own grid, read from the folder
    assert "2 runs, 2 done, 0 to run" in capsys.readouterr().out
    assert before == {r: (folder / r / "metrics.jsonl").stat().st_mtime for r in before}


def test_notebook_90_reads_the_study(study, tmp_path):
    folder, _ = study
    executed = run_notebook("90_analysis", {"study": str(folder), "out_dir": str(tmp_path / "report")},
                            run_name="analysis", runs_dir=str(tmp_path), progress=False)
    nb = json.loads(executed.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert "g-trainer-no-bias" in executed.read_text()
    assert (tmp_path / "report" / "cases.csv").is_file()
