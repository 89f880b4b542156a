"""Checkpoint folders without a trainer group: manifest checks, the resume point, the architecture check,
pruning, RNG states. (Saving and loading Megatron models under layouts: tests/integration/test_checkpoints.py.)"""
import dataclasses
import json
import pickle
import random

import numpy as np
import pytest
import torch

from cookbook.config import ConfigError, load_config
from cookbook.grpo import checkpoint as C


def fake_checkpoint(run_dir, step, model=None):
    """A folder shaped like a saved checkpoint (the torch_dist files are stand-ins), with its manifest."""
    path = C.checkpoint_dir(run_dir, step)
    (path / "dist").mkdir(parents=True)
    (path / "rng").mkdir()
    for name, size in ((".metadata", 300), ("metadata.json", 60), ("common.pt", 900), ("__0_0.distcp", 5000),
                       ("__0_1.distcp", 4000), ("__1_0.distcp", 5000)):
        (path / "dist" / name).write_bytes(bytes(random.Random(step * 7 + size).randbytes(size)))
    torch.save(C.rng_state(), path / "rng" / "rank_00000.pt")
    (path / "state.json").write_text(json.dumps({"step": step, "prompts": {"epoch": 0, "offset": step}}))
    arch = C.architecture(model if model is not None else load_config("tiny").model)
    (path / "meta.json").write_text(json.dumps({"format": 1, "step": step, "model": arch,
                                                "layout": {"world": 2, "tp": 2, "pp": 1, "ep": 1, "etp": 1, "cp": 1}}))
    rank1 = C._hash_files(path, ["dist/__1_0.distcp"])  # as rank 1 would report its own file
    C._write_manifest(path, step, rank1)
    return path


def truncate(file, keep=0.5):
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])


def test_intact_checkpoint_verifies_and_the_newest_is_the_resume_point(tmp_path):
    for step in (2, 4):
        fake_checkpoint(tmp_path, step)
    manifest = json.loads((C.checkpoint_dir(tmp_path, 4) / "checksums.json").read_text())
    assert set(manifest["files"]) == {"dist/.metadata", "dist/metadata.json", "dist/common.pt", "dist/__0_0.distcp",
                                      "dist/__0_1.distcp", "dist/__1_0.distcp", "rng/rank_00000.pt", "state.json",
                                      "meta.json"}
    assert C.verify_checkpoint(C.checkpoint_dir(tmp_path, 4)) is None
    resume = C.resume_point(tmp_path)
    assert (resume.step, resume.path, resume.skipped) == (4, C.checkpoint_dir(tmp_path, 4), [])
    assert not resume.fell_back and "resuming from" in resume.message()


@pytest.mark.parametrize("damaged", ["dist/__1_0.distcp", "state.json", "dist/.metadata", "rng/rank_00000.pt"])
def test_a_truncated_file_makes_resume_fall_back_to_the_previous_checkpoint(tmp_path, damaged):
    fake_checkpoint(tmp_path, 2)
    newest = fake_checkpoint(tmp_path, 4)
    truncate(newest / damaged)
    resume = C.resume_point(tmp_path)
    assert resume.step == 2 and resume.path == C.checkpoint_dir(tmp_path, 2)
    [(path, reason)] = resume.skipped
    assert path == newest and reason.startswith(damaged) and "truncated" in reason, reason
    assert resume.fell_back and str(newest) in resume.message() and damaged in resume.message()


def test_same_size_corruption_is_found_by_the_hash(tmp_path):
    path = fake_checkpoint(tmp_path, 3)
    data = bytearray((path / "dist" / "__0_0.distcp").read_bytes())
    data[100] ^= 0xFF
    (path / "dist" / "__0_0.distcp").write_bytes(bytes(data))
    assert C.verify_checkpoint(path, hashes=False) is None  # sizes only
    reason = C.verify_checkpoint(path)
    assert reason.startswith("dist/__0_0.distcp") and "sha256" in reason


def test_manifest_less_missing_file_and_broken_manifest_are_skipped(tmp_path):
    fake_checkpoint(tmp_path, 1)
    no_manifest = fake_checkpoint(tmp_path, 2)
    (no_manifest / "checksums.json").unlink()  # an interrupted write that got renamed anyway
    missing = fake_checkpoint(tmp_path, 3)
    (missing / "dist" / "__0_1.distcp").unlink()
    broken = fake_checkpoint(tmp_path, 4)
    (broken / "checksums.json").write_text('{"files": ')
    resume = C.resume_point(tmp_path)
    assert resume.step == 1
    reasons = dict(resume.skipped)
    assert list(reasons) == [broken, missing, no_manifest]
    assert "checksums.json is unreadable" in reasons[broken]
    assert reasons[missing] == "dist/__0_1.distcp is missing"
    assert reasons[no_manifest].startswith("no checksums.json")


def test_no_intact_checkpoint_means_a_fresh_start_that_says_why(tmp_path):
    assert C.resume_point(tmp_path) == C.Resume(0, None, [])
    path = fake_checkpoint(tmp_path, 5)
    (path / "meta.json").unlink()
    resume = C.resume_point(tmp_path)
    assert resume.path is None and resume.step == 0 and resume.skipped == [(path, "meta.json is missing")]
    assert "no intact checkpoint left" in resume.message()


def test_incomplete_checkpoint_folder_is_not_listed(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step_000009").mkdir(parents=True)
    assert C.list_checkpoints(tmp_path) == [] and C.latest_checkpoint(tmp_path) is None
    assert C.resume_point(tmp_path).path is None
    fake_checkpoint(tmp_path, 4)
    assert C.latest_checkpoint(tmp_path) == (4, C.checkpoint_dir(tmp_path, 4))


def test_architecture_mismatch_names_the_keys_both_values_and_the_way_out(tmp_path):
    saved = load_config("tiny", values={"model": {"hidden_size": 64}}).model
    path = fake_checkpoint(tmp_path, 2, model=saved)
    live = load_config("tiny", values={"model": {"hidden_size": 96, "num_experts": 4, "hf_dir": "/elsewhere"}}).model
    with pytest.raises(ConfigError) as e:
        C.check_architecture(path, live)
    msg = str(e.value)
    assert "model.hidden_size: checkpoint 64, this run 96" in msg and "model.num_experts: checkpoint 8, this run 4" \
        in msg, msg
    assert str(path) in msg and "model.hidden_size=64" in msg and "new run folder" in msg, msg
    assert "hf_dir" not in msg  # paths are not architecture
    C.check_architecture(path, dataclasses.replace(saved, hf_dir="/moved", mcore_dir="/moved/mcore"))
    C.check_architecture(path, dataclasses.asdict(saved))  # the dict form works too


class Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"the model was touched ({name})")


def test_load_stops_before_touching_the_model(tmp_path):
    """A wrong architecture or a damaged file stops ``load_checkpoint`` before any model, optimizer or
    collective work (no process group here)."""
    path = fake_checkpoint(tmp_path, 2, model=load_config("tiny").model)
    other = load_config("tiny", values={"model": {"hidden_size": 96}}).model
    with pytest.raises(ConfigError, match="model.hidden_size"):
        C.load_checkpoint(path, Untouchable(), Untouchable(), other)
    truncate(path / "dist" / "__0_0.distcp")
    with pytest.raises(C.CheckpointError, match=r"is damaged: dist/__0_0\.distcp is 2500 bytes"):
        C.load_checkpoint(path, Untouchable(), Untouchable(), load_config("tiny").model)
    with pytest.raises(C.CheckpointError, match="no meta.json"):
        C.load_checkpoint(tmp_path, Untouchable(), Untouchable(), load_config("tiny").model)


def test_prune_keeps_the_newest_up_to_the_step_and_removes_leftovers(tmp_path):
    for step in (1, 2, 3, 9):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / ".tmp-step_000005").mkdir()
    (tmp_path / "checkpoints" / ".old-step_000002").mkdir()
    C._prune(tmp_path, 3, keep=2)
    # step 9 is newer than the step just saved (left from before a fall-back): not counted, not removed
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002", "step_000003",
                                                                           "step_000009"]
    C._prune(tmp_path, 9, keep=0)  # 0 keeps all
    assert len(C.list_checkpoints(tmp_path)) == 3


def test_rng_state_round_trip():
    state = C.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(2))
    C.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_loop_state_keeps_its_flags_through_pickle():
    """It crosses Ray as a pickle; it is the loop state dict itself plus the RNG outcome."""
    state = C.LoopState({"step": 3, "prompts": {"epoch": 0, "offset": 5}}, rng_restored=False, note="layout changed")
    back = pickle.loads(pickle.dumps(state))
    assert back == {"step": 3, "prompts": {"epoch": 0, "offset": 5}}
    assert back.rng_restored is False and back.note == "layout changed"


def test_a_per_parameter_step_that_differs_is_refused_with_the_parameter_names():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 2)).sum().backward()
    opt.step()
    model[1].weight.grad = None  # AdamW skips it: its step falls behind
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    with pytest.raises(C.CheckpointError, match="step counter differs.*1: 1.weight"):
        C._common_step(opt, names)
