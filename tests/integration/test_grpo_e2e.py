"""A short GRPO run end to end on CPU (Ray, vLLM, Megatron-Core), and exact resume after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import make_random_tiny_hf

pytestmark = pytest.mark.slow
VOLATILE = ("time/", "perf/", "sync/")  # wall-clock measurements differ run to run by nature


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_random_tiny_hf(tmp_path_factory.mktemp("grpo") / "hf")


def _args(runs_dir: Path, name: str, hf_dir: Path) -> list[str]:
    return [sys.executable, "-m", "cookbook.cli", "train", "--run-name", name, "--runs-dir", str(runs_dir),
            "--no-progress", f"model.hf_dir={hf_dir}", "grpo.steps=3", "grpo.prompts_per_step=4",
            "grpo.samples_per_prompt=4", "grpo.max_response_length=12", "grpo.eval_every=2", "grpo.save_every=1",
            "grpo.num_minibatches=2", "data.num_train=64", "data.num_test=16", "logging.wandb_mode=disabled"]


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, hf_dir):
    runs = tmp_path_factory.mktemp("runs")
    out = subprocess.run(_args(runs, "full", hf_dir), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return runs / "full"


def test_short_run_logs_checkpoints_and_exports(full_run):
    rows = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2]
    for r in rows[1:]:
        assert 0.0 <= r["reward/mean"] <= 1.0 and r["actor/updates"] == 2
        # the sync worked: vLLM's sampled-token log-probs equal the trainer's recomputed ones (fp32)
        assert r["mismatch/abs_diff_max"] < 1e-3, r
        assert r["sync/bytes"] > 1e6 and r["time/step"] > 0
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    export = full_run / "hf_export"
    assert (export / "config.json").is_file() and (export / "model.safetensors.index.json").is_file()
    assert (export / "tokenizer.json").is_file()
    assert (full_run / "config.yaml").is_file() and any((full_run / "tensorboard").iterdir())


def test_sigkill_then_resume_ends_with_the_same_metrics(tmp_path, full_run, hf_dir):
    runs = tmp_path / "runs"
    proc = subprocess.Popen(_args(runs, "killed", hf_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    first = runs / "killed" / "checkpoints" / "step_000001"
    deadline = time.time() + 900
    while not first.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert first.is_dir(), f"no first checkpoint before the kill: {proc.stderr.read()[-3000:] if proc.poll() else ''}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [json.loads(line)["step"] for line in (runs / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert max(done) < 3, "the run finished before it was killed; the test proves nothing"
    out = subprocess.run(_args(runs, "killed", hf_dir), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert _metrics(runs / "killed") == _metrics(full_run)
