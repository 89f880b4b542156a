"""The notebooks run headless under papermill on the tiny preset, into one run folder, as `make demo` does."""
import json

import pytest

from cookbook.runner import run_notebook

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def notebook(run_dir):
    """``notebook(name)`` executes a notebook on tiny into the module's run folder the first time it is asked
    for, and returns its executed copy (or raises its error again) after that: each test asks for what it
    needs, so any test passes alone and the whole module runs every notebook once."""
    done: dict[str, object] = {}

    def run(name: str, params: dict | None = None):
        if name not in done:
            try:
                done[name] = run_notebook(name, {"preset": "tiny", **(params or {})}, run_name="nb",
                                          runs_dir=str(run_dir), progress=False)
            except Exception as e:  # a prerequisite that failed is not run again by the next test
                done[name] = e
        if isinstance(done[name], Exception):
            raise done[name]
        return done[name]

    return run


def _streams(path, name):
    nb = json.loads(path.read_text())
    return ["".join(o["text"]) for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "stream" and o.get("name") == name]


def _errors(path):
    nb = json.loads(path.read_text())
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]


def test_00_environment(run_dir, notebook):
    out = notebook("00_environment")
    assert out.is_file() and not _errors(out)
    report = json.loads((run_dir / "nb" / "env_report.json").read_text())
    assert report["preset"] == "tiny" and report["worst"] == "ok"
    assert (run_dir / "nb" / "notebooks" / "00_environment.params.yaml").is_file()


def test_10_data(run_dir, notebook):
    out = notebook("10_data")
    assert out.is_file() and not _errors(out)
    data = run_dir / "nb" / "data"
    train = (data / "train.jsonl").read_text().splitlines()
    test = (data / "test.jsonl").read_text().splitlines()
    assert len(train) > 100 and len(test) > 10
    record = json.loads(train[0])
    assert record["prompt"][0]["content"].endswith("output the final answer within \\boxed{}.")
    assert (run_dir / "nb" / "plots" / "prompt_lengths.png").is_file()


def test_20_convert(run_dir, notebook):
    out = notebook("20_convert")
    assert out.is_file() and not _errors(out)
    assert (run_dir / "nb" / "mcore" / "cookbook_convert.json").is_file()
    text = out.read_text()
    assert "bit_exact" in text and "max_abs_diff" in text


def test_30_grpo_on_tiny(run_dir, notebook):
    notebook("20_convert")  # the policy it starts from (it prepares the data itself when notebook 10 has not run)
    out = notebook("30_grpo_moonlight", {"steps": 4, "plot_every": 2,
                                         "overrides": {"grpo.eval_every": 2, "data.max_test_examples": 40,
                                                       "logging.wandb_mode": "disabled"}})
    assert out.is_file() and not _errors(out)
    run = run_dir / "nb"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]
    assert (run / "plots" / "training.png").is_file() and (run / "hf_export" / "config.json").is_file()
    # it started from the checkpoint notebook 20 converted (the inputs table says so before training)
    assert "ready (converted by notebook 20 or 31)" in (run / "notebooks" / "30_grpo_moonlight.ipynb").read_text()
    # a reader sees progress, tables and plots; what Megatron-Core, vLLM and Ray print is in <run>/logs/
    assert not _streams(out, "stderr"), _streams(out, "stderr")[:3]
    assert "IProgress not found" not in out.read_text()
    assert "not loaded from checkpoint" in (run / "logs" / "rollout.log").read_text()  # vLLM's reload, logged
    assert (run / "logs" / "trainer-0.log").is_file() and (run / "logs" / "driver.log").is_file()


def test_31_grpo_deepseek_v3_on_tiny(run_dir):
    """Notebook 31 on tiny-deepseek-v3 in a run folder of its own, as `make demo` runs it: the fp8 source detected
    and cast, the conversion in two parts, the 128-GPU plan, GRPO with an evaluation at steps 0 and 5."""
    out = run_notebook("31_grpo_deepseek_v3", {"preset": "tiny-deepseek-v3", "steps": 5, "plot_every": 5,
                                               "overrides": {"data.max_test_examples": 40,
                                                             "logging.wandb_mode": "disabled"}},
                       run_name="nb-deepseek-v3", runs_dir=str(run_dir), progress=False)
    assert out.is_file() and not _errors(out)
    run = run_dir / "nb-deepseek-v3"
    text = out.read_text()
    assert "fp8 source detected: quantization_config fp8 e4m3, blocks 128x128" in text
    assert (run / "source-bf16" / "config.json").is_file()  # every run casts (into its folder); the fp8 build is cached
    assert "fp8 -> bf16: cast into" in text and "part 1 of 2" in text and "part 0 of 2" in text and "finalized" in text
    assert "TP4 PP16 (3/.../2)" in text and "16 x 8 GPUs" in text  # the planner judged the reference layout
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4, 5]
    assert [m["step"] for m in metrics if "eval/accuracy" in m] == [0, 5]  # every 5 steps, the recipe's
    assert (run / "plots" / "training.png").is_file() and (run / "hf_export" / "config.json").is_file()
    export = json.loads((run / "hf_export" / "config.json").read_text())
    assert export["q_lora_rank"] and export["n_group"] == 2 and "quantization_config" not in export
    assert not _streams(out, "stderr"), _streams(out, "stderr")[:3]
