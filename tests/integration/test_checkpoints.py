"""Training checkpoints of a Megatron-Core MLA + MoE model (``cookbook.grpo.checkpoint``) on CPU, gloo, fp32:
a bit-exact 1-process round trip (model, AdamW moments and step, RNG), checkpoints moving between layouts
(1 -> TP2, 1 -> EP2, TP2 -> 1, EP2 -> 1: model and optimizer), a damaged newest checkpoint skipped for the
one before it, and a checkpoint of another architecture refused before the model is touched.

Tolerance: loading is a copy, so loaded weights and moments are compared bit for bit with the saving run's
(gathered to full tensors). The optimizer step after a load under another layout is compared with the saving
run's next step: the layouts only change summation order (tests/integration/test_parallel_layouts.py), and one
AdamW step (lr 1e-3) turns that into weight differences far below lr: asserted < 1e-5.
"""
import json
import shutil
from pathlib import Path

import pytest

from helpers import run_probe

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("checkpoint_probe.py")
LAYOUTS = ("tp2", "ep2")
STEP_TOL = 1e-5


def _probe(*args: str, world: int = 1) -> dict:
    return run_probe(PROBE, *args, world=world)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def roundtrip(out):
    return _probe("roundtrip", "--out", str(out))


@pytest.fixture(scope="module")
def layouts(roundtrip, out):
    return {name: _probe("layout", "--out", str(out), "--layout", name, world=2) for name in LAYOUTS}


@pytest.fixture(scope="module")
def back_to_one(layouts, out):
    return _probe("load-one", "--out", str(out), "--layouts", ",".join(LAYOUTS))


def _assert_bit_equal(report: dict, state=("exp_avg", "exp_avg_sq")) -> None:
    assert set(report) == {"weights", *state, "steps", "param_groups"}, report
    for part, r in report.items():
        if "bit_equal" in r:
            assert r["same_names"] and r["tensors"] > 20 and r["bit_equal"], (part, r)
        else:
            assert r["equal"], (part, r)


def _assert_close(report: dict, tol: float) -> None:
    for part, r in report.items():
        if "bit_equal" in r:
            assert r["same_names"] and r["max_abs"] < tol, (part, r)
        else:
            assert r["equal"], (part, r)


def test_one_process_round_trip_restores_everything_bit_exactly(roundtrip):
    r = roundtrip
    assert r["kept"] == ["step_000002", "step_000003"]  # keep=2
    assert r["loop_state"] == {"step": 3, "prompts": {"epoch": 0, "offset": 24}}
    assert r["rng_restored"] and r["note"] == ""
    assert r["rng_moved_before_load"] and r["rng_equal"]  # python, numpy, torch, Megatron's tracker
    _assert_bit_equal(r["loaded_vs_saved"])
    _assert_bit_equal(r["step_after_load_vs_continued"])  # the next AdamW step is the same step


@pytest.mark.parametrize("name", LAYOUTS)
def test_one_process_checkpoint_loads_under_a_layout(layouts, name):
    r = layouts[name]
    assert r["layout"]["world"] == 2 and (r["layout"]["tp"], r["layout"]["ep"]) == ((2, 1) if name == "tp2" else (1, 2))
    assert r["loop_state"] == {"step": 3, "prompts": {"epoch": 0, "offset": 24}}
    assert not r["rng_restored"] and "world 1" in r["note"] and "world 2" in r["note"], r["note"]
    _assert_bit_equal(r["one_to_layout"])
    _assert_close(r["one_to_layout_step"], STEP_TOL)


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_checkpoint_loads_in_one_process(back_to_one, layouts, out, name):
    from cookbook.grpo.checkpoint import verify_checkpoint

    files = layouts[name]["files"]
    assert {"rng/rank_00000.pt", "rng/rank_00001.pt", "checksums.json", "state.json", "meta.json"} <= set(files)
    assert any(f.startswith("dist/__0_") for f in files) and any(f.startswith("dist/__1_") for f in files), files
    path = out / f"run-{name}" / "checkpoints" / "step_000004"
    assert verify_checkpoint(path) is None
    manifest = json.loads((path / "checksums.json").read_text())["files"]
    assert set(manifest) == set(files) - {"checksums.json"}  # every file, both ranks' shards included

    r = back_to_one[name]
    assert r["loop_state"] == {"step": 4, "prompts": {"epoch": 0, "offset": 24}}
    assert not r["rng_restored"] and "world 2" in r["note"], r["note"]
    _assert_bit_equal(r["layout_to_one"])
    _assert_close(r["layout_to_one_step"], STEP_TOL)


@pytest.mark.parametrize("damage", ["distcp", "state.json", "manifest"])
def test_damaged_newest_checkpoint_is_skipped_for_the_previous_one(roundtrip, out, tmp_path, damage):
    from cookbook.grpo.checkpoint import CheckpointError, load_checkpoint, resume_point

    run = tmp_path / "run"
    shutil.copytree(out / "run-one", run)
    newest = run / "checkpoints" / "step_000003"
    if damage == "manifest":  # an interrupted write that somehow got renamed
        (newest / "checksums.json").unlink()
        file = "checksums.json"
    else:
        file = sorted((newest / "dist").glob("*.distcp"))[0] if damage == "distcp" else newest / "state.json"
        data = file.read_bytes()
        file.write_bytes(data[:len(data) // 2])
        file = file.relative_to(newest).as_posix()
    resume = resume_point(run)
    assert resume.step == 2 and resume.path == run / "checkpoints" / "step_000002"
    [(path, reason)] = resume.skipped
    assert path == newest and file in reason, reason
    assert resume.fell_back and str(newest) in resume.message()
    # loading the damaged one directly stops with the file's name, before the model is touched
    meta = json.loads((newest / "meta.json").read_text())["model"]
    with pytest.raises(CheckpointError, match=file.replace(".", r"\.")):
        load_checkpoint(newest, None, None, meta)


def test_checkpoint_of_another_architecture_is_refused_before_the_model_is_touched(roundtrip, out):
    from cookbook.config import ConfigError
    from cookbook.grpo.checkpoint import load_checkpoint

    path = out / "run-one" / "checkpoints" / "step_000003"
    model = json.loads((path / "meta.json").read_text())["model"]
    assert model["hidden_size"] == 64

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the model was touched ({name})")

    with pytest.raises(ConfigError) as e:
        load_checkpoint(path, Untouchable(), Untouchable(), dict(model, hidden_size=96))
    msg = str(e.value)
    assert "model.hidden_size: checkpoint 64, this run 96" in msg and str(path) in msg, msg
    assert "model.hidden_size=64" in msg and "new run folder" in msg, msg


def test_bf16_round_trip_keeps_the_fp32_master_weights_bit_exactly(out):
    """bf16 parameters train on fp32 master copies (cookbook/grpo/optimizer.py): the checkpoint keeps them, in fp32,
    so the step after a resume is the step the run would have taken."""
    r = _probe("roundtrip", "--out", str(out / "bf16"), "--dtype", "bfloat16")
    _assert_bit_equal(r["loaded_vs_saved"], state=("exp_avg", "exp_avg_sq", "master"))
    _assert_bit_equal(r["step_after_load_vs_continued"], state=("exp_avg", "exp_avg_sq", "master"))
