"""Tensor, expert and pipeline parallel GRPO on CPU (2 gloo processes) against one process, the HF weight
sync from a sharded trainer, conversion split over processes, and checkpoints across layouts.

Tolerances (fp32 throughout; measured values in BENCHMARKS.md, "Multi-GPU layouts (issue 6)"):
- forward log-probs, loss: layouts only change summation order (TP shards of matmuls and of the
  vocabulary reductions, all-reduce order), so differences sit near fp32 rounding of log-probs of size ~6:
  measured <= 1e-6, asserted < 1e-5;
- gradients, per tensor relative to its largest element, and the grad norm: measured <= 4e-6, asserted
  < 1e-4; a missing or doubled reduction shows at 1e-2 or more (the MLA rope-key bug gave 4e-2);
- log-probs after 4 AdamW steps (lr 1e-3): Adam turns a relative gradient error into an update error of
  up to lr for elements with gradients near zero, so this is looser: measured <= 1e-5, asserted < 1e-4;
- the HF model loaded from the synced weights against the trainer: fp32 HF vs Megatron kernels (the
  conversion test's 1e-5 on logits), measured <= 1e-6, asserted < 1e-5.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, run_probe

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("parallel_probe.py")
LAYOUTS = ("tp2", "tp2fused", "ep2", "pp2", "tp2ep2")  # tp2fused: the fused loss; tp2ep2 last (its checkpoint is verified)
FORWARD_TOL, GRAD_TOL, AFTER_STEPS_TOL, SYNC_TOL = 1e-5, 1e-4, 1e-4, 1e-5


def _probe(*args: str, world: int = 1, extra_env: dict | None = None) -> dict:
    return run_probe(PROBE, *args, world=world, extra_env=extra_env)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    _probe("prepare", "--out", str(out))
    return out


@pytest.fixture(scope="module")
def reference(prepared):
    return _probe("reference", "--out", str(prepared))


@pytest.fixture(scope="module")
def layouts(reference, prepared):
    return _probe("layouts", "--out", str(prepared), "--layouts", ",".join(LAYOUTS), world=2)["results"]


def _assert_matches(diff: dict) -> None:
    assert diff["grad_tensors"] > 0 and not diff["grad_tensors_missing"], diff
    assert diff["logp_before_step"] < FORWARD_TOL, diff
    assert diff["loss"] < FORWARD_TOL, diff
    assert diff["grad_norm_rel"] < GRAD_TOL, diff
    assert diff["grad_rel_max"] < GRAD_TOL, diff
    assert diff["logp_after_steps"] < AFTER_STEPS_TOL, diff


def test_conversion_split_over_two_processes_matches_one(prepared):
    """``convert(..., part=(i, 2))`` in two concurrent processes (part 0 waits for part 1, then merges)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    procs = [subprocess.Popen([sys.executable, str(PROBE), "convert-part", "--out", str(prepared), "--part", str(i),
                               "--parts", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (1, 0)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-3000:] for _, err in outs)
    report = _probe("compare-ckpt", "--out", str(prepared))
    # layers are stacked along a leading axis (one key per kind of tensor): 38 keys for the tiny model
    assert report["tensors"] >= 30, report
    assert not report["different"] and not report["only_single"] and not report["only_split"], report


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_one_process(layouts, name):
    res = layouts[name]
    assert res["layout"]["world"] == 2
    assert res["load_bit_exact"], "the 1-process checkpoint did not load exactly under " + name
    _assert_matches(res)


@pytest.mark.parametrize("name", ("tp2", "ep2", "tp2ep2"))
def test_weight_sync_from_a_sharded_trainer_reaches_hf(layouts, name):
    assert layouts[name]["hf_sync_logp_max"] < SYNC_TOL, layouts[name]


def test_checkpoint_saved_under_tp2_ep2_loads_in_one_process(layouts, prepared):
    report = _probe("verify", "--out", str(prepared), "--layout", "tp2ep2")
    assert report["same_names"] and report["weights_bit_exact"], report
    assert report["logp_max"] < FORWARD_TOL, report


def test_mla_rope_key_grad_workaround_is_still_needed(reference, prepared):
    """Without ``compat._mla_rope_key_grad`` TP=2 gradients are wrong (the compat test's partner, which
    needs two processes)."""
    res = _probe("layouts", "--out", str(prepared), "--layouts", "tp2", world=2,
                 extra_env={"COOKBOOK_MCORE_COMPAT_SKIP": "mla_rope_key_grad"})["results"]["tp2"]
    assert res["logp_before_step"] < FORWARD_TOL, res  # the forward is right ...
    assert res["grad_rel_max"] > 1e-2, res  # ... the gradient is not
    assert "linear_kv_down_proj" in res["grad_worst"], res
