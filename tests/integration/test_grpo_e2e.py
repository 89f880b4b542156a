"""GRPO runs end to end on CPU (Ray, vLLM, a Megatron-Core trainer group): one rank, two-rank groups under TP2,
EP2 and CP2 against one rank, exact resume after SIGKILL of a two-rank run, resume under another layout, and
the fall-back past a damaged checkpoint.

Tolerance between layouts (fp32): a layout changes only the order of sums (TP shards, all-reduces, the CP
all-gather), so the trainer's numbers differ at rounding level, and the rollout engine samples the same tokens
from weights that differ by about 1e-6 (a sampled token would flip only if its uniform draw fell within that
of a boundary). So rewards, response lengths and eval accuracy must be equal, and the trainer's metrics equal
to RTOL relative (measured below 1e-5; Adam turns rounding-level gradient differences into update differences
of up to lr on elements with near-zero gradients, which the log-probs of later steps see).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import make_random_tiny_hf

pytestmark = pytest.mark.slow
VOLATILE = ("time/", "perf/", "sync/")  # wall-clock measurements differ run to run by nature
RESUME = ("resume/",)  # only in the first step after a resume (checked where it matters)
EXACT = ("reward/", "response/", "eval/")
RTOL = 1e-4
LAYOUTS = {
    "tp2": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "ep2": ["parallel.expert=2"],
    "cp2": ["parallel.context=2", "grpo.sequence_packing=true", "grpo.packing_max_tokens=128"],
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_random_tiny_hf(tmp_path_factory.mktemp("grpo") / "hf")


@pytest.fixture(scope="module")
def mcore_dir(hf_dir):
    """The policy converted once (notebook 20's step): every run below starts from it."""
    from cookbook.config import load_config
    from cookbook.convert.pipeline import convert

    return convert(load_config("tiny", [f"model.hf_dir={hf_dir}"]), "hf_to_mcore", hf_dir, hf_dir.parent / "mcore",
                   part=(0, 1), progress=False)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local Ray instance for the in-process runs (each run starts and ends its own actors on it)."""
    import ray

    from cookbook.cluster.placement import init_ray
    from cookbook.config import load_config

    init_ray(load_config("tiny", LAYOUTS["tp2"], values={"runs_dir": str(tmp_path_factory.mktemp("ray"))}))
    yield
    ray.shutdown()


def _args(runs_dir: Path, name: str, hf_dir: Path, *overrides: str) -> list[str]:
    return ["train", "--run-name", name, "--runs-dir", str(runs_dir), "--no-progress", f"model.hf_dir={hf_dir}",
            "grpo.steps=3", "grpo.prompts_per_step=4", "grpo.samples_per_prompt=4", "grpo.max_response_length=12",
            "grpo.eval_every=2", "grpo.save_every=1", "grpo.num_minibatches=2", "data.num_train=64",
            "data.num_test=16", "data.validation_size=16", "logging.wandb_mode=disabled",
            "parallel.weight_sync_bucket_mb=4", *overrides]


def _train(runs_dir: Path, name: str, hf_dir: Path, mcore_dir: Path, *overrides: str) -> Path:
    """``cookbook train`` in this process, on the module's Ray instance."""
    from cookbook.cli import main

    assert main(_args(runs_dir, name, hf_dir, f"model.mcore_dir={mcore_dir}", *overrides)) == 0
    return runs_dir / name


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE + RESUME)} for r in _rows(run)]


def _assert_close(run: Path, ref: Path, rtol: float = RTOL) -> None:
    got, want = _metrics(run), _metrics(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys(), (a.keys() ^ b.keys())
        for key, expected in b.items():
            if key.startswith(EXACT) or not isinstance(expected, float):
                assert a[key] == expected, (a["step"], key, a[key], expected)
            else:
                assert abs(a[key] - expected) <= rtol * max(1.0, abs(expected)), (a["step"], key, a[key], expected)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def one_rank(runs, hf_dir, mcore_dir, ray_cluster):
    return _train(runs, "one-rank", hf_dir, mcore_dir)


@pytest.fixture(scope="module")
def two_ranks(runs, hf_dir, mcore_dir, ray_cluster):
    done = {}

    def run(layout: str) -> Path:
        if layout not in done:
            done[layout] = _train(runs, layout, hf_dir, mcore_dir, *LAYOUTS[layout])
        return done[layout]

    return run


def test_short_run_logs_checkpoints_and_exports(one_rank):
    rows = _rows(one_rank)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2] and "eval/accuracy" in rows[3]
    for first_or_last in (rows[0], rows[3]):  # test split, planted habit, pass@k where learning is judged
        assert {"test/accuracy", "eval/habit_rate", "eval/pass@1", "eval/pass@8"} <= first_or_last.keys()
        assert first_or_last["eval/pass@8"] >= first_or_last["eval/pass@1"]
    assert "test/accuracy" not in rows[2]
    for r in rows[1:]:
        assert 0.0 <= r["reward/mean"] <= 1.0 and r["actor/updates"] == 2
        # the sync worked: vLLM's sampled-token log-probs equal the trainer's recomputed ones (fp32)
        assert r["mismatch/abs_diff_max"] < 1e-3, r
        assert r["sync/bytes"] > 1e6 and r["sync/buckets"] >= 2 and r["time/step"] > 0
        assert r["sync/largest_bucket_bytes"] <= 4 << 20  # bounded by the bucket, not the model
    assert sorted(p.name for p in (one_rank / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    export = one_rank / "hf_export"
    assert (export / "config.json").is_file() and (export / "model.safetensors.index.json").is_file()
    assert (export / "tokenizer.json").is_file()
    assert (one_rank / "config.yaml").is_file() and any((one_rank / "tensorboard").iterdir())
    assert (one_rank / "logs" / "trainer-0.log").is_file() and (one_rank / "logs" / "rollout.log").is_file()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_rank_group_matches_one_rank(two_ranks, one_rank, layout):
    run = two_ranks(layout)
    assert (run / "logs" / "trainer-1.log").is_file()  # two ranks ran
    for r in _rows(run)[1:]:  # the rollout's log-probs match the trainer's after every sync from two ranks
        assert r["mismatch/abs_diff_max"] < 1e-3, r
    _assert_close(run, one_rank)


def test_sigkill_of_a_two_rank_run_then_resume_ends_with_the_same_metrics(tmp_path, two_ranks, hf_dir, mcore_dir):
    """A separate process (its own Ray), killed as a node failure would kill it, then resumed."""
    full = two_ranks("tp2")
    runs = tmp_path / "runs"
    args = [sys.executable, "-m", "cookbook.cli", *_args(runs, "killed", hf_dir, f"model.mcore_dir={mcore_dir}",
                                                          *LAYOUTS["tp2"])]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    first = runs / "killed" / "checkpoints" / "step_000001"
    deadline = time.time() + 900
    while not first.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert first.is_dir(), f"no first checkpoint before the kill: {proc.stderr.read()[-3000:] if proc.poll() else ''}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [r["step"] for r in _rows(runs / "killed")]
    assert max(done) < 3, "the run finished before it was killed; the test proves nothing"
    out = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert _metrics(runs / "killed") == _metrics(full)


def _copy_resumable(run: Path, dest: Path, step: int) -> Path:
    """A copy of a finished run as it stood after ``step``: later checkpoints and metrics removed."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("hf_export*", "tensorboard", "logs"))
    for ckpt in (dest / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    rows = [r for r in _rows(run) if r["step"] <= step]
    (dest / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest


@pytest.mark.parametrize("layout", ["tp2", "ep2"])
def test_checkpoint_of_a_two_rank_run_resumes_on_one_rank(tmp_path, two_ranks, hf_dir, mcore_dir, layout):
    full = two_ranks(layout)
    resumed = _copy_resumable(full, tmp_path / "runs" / "resumed", step=2)
    _train(tmp_path / "runs", "resumed", hf_dir, mcore_dir)  # the 1-rank layout
    _assert_close(resumed, full)


def test_a_damaged_checkpoint_is_named_and_the_run_falls_back_to_the_one_before(tmp_path, one_rank, hf_dir,
                                                                                 mcore_dir, capsys):
    run = _copy_resumable(one_rank, tmp_path / "runs" / "damaged", step=3)
    newest = run / "checkpoints" / "step_000003"
    victim = max((p for p in newest.rglob("*.distcp")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated, as by a full disk
    capsys.readouterr()
    _train(run.parent, "damaged", hf_dir, mcore_dir)
    err = capsys.readouterr().err
    assert "step_000003" in err and victim.name in err  # named, with the file
    rows = _rows(run)
    assert rows[-1]["step"] == 3 and rows[-1]["resume/from_step"] == 2 and rows[-1]["resume/skipped_damaged"] == 1
    assert _metrics(run) == _metrics(one_rank)


def test_a_checkpoint_of_another_model_stops_before_any_work(tmp_path, one_rank, hf_dir, mcore_dir, capsys):
    """A run folder whose checkpoint holds another architecture (here: its intact manifest says hidden 64)."""
    import hashlib

    from cookbook.cli import main

    run = _copy_resumable(one_rank, tmp_path / "runs" / "other", step=2)
    ckpt = run / "checkpoints" / "step_000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["model"]["hidden_size"] = 64
    (ckpt / "meta.json").write_text(json.dumps(meta))
    sums = json.loads((ckpt / "checksums.json").read_text())
    data = (ckpt / "meta.json").read_bytes()
    sums["files"]["meta.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "checksums.json").write_text(json.dumps(sums))
    capsys.readouterr()
    code = main(_args(run.parent, "other", hf_dir, f"model.mcore_dir={mcore_dir}"))
    err = capsys.readouterr().err
    assert code == 2 and "model.hidden_size: checkpoint 64, this run 192" in err and str(ckpt) in err, err
    assert not (run / "logs" / "rollout.log").exists()  # stopped before any actor started
