"""The vocabulary-parallel fused GRPO loss (``fused_linear_grpo_loss(..., vocab_shard=...)``) on CPU: 2 gloo
processes, each holding half of the output weight's rows (tests/kernels/tp_loss_probe.py), once through the torch
reference and once through the Triton kernels under TRITON_INTERPRET=1 (fp32; N=19 tokens in 8-row chunks,
H=32, V=2 x 133). Loss, log-probs, entropies, the hidden-state gradient summed over the ranks and the weight
shards' gradients are compared with the single-rank reference on the whole vocabulary and with the project's
unfused vocab-parallel path (``vocab_parallel_logprobs`` + ``policy_loss``). Observed errors about 5e-7.
Also: the single-GPU check benchmarks/gpu_check_tp_loss.py (shards in threads) in its CPU mode.

The trainer-level check (a TP=2 step of the tiny model with ``fused=True`` against ``fused=False``) is in
tests/integration/test_parallel_layouts.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, run_probe

PROBE = Path(__file__).with_name("tp_loss_probe.py")
TOL = 1e-4  # fp32 against fp32, as tests/kernels/test_grpo_loss.py
SLOW = pytest.mark.slow  # two processes importing Megatron, twice: 40-100 s on 2 cores


@pytest.fixture(scope="module", params=[pytest.param("reference", marks=SLOW), pytest.param("interpret", marks=SLOW)])
def result(request) -> dict:
    env = {"TRITON_INTERPRET": "1"} if request.param == "interpret" else {}
    res = run_probe(PROBE, world=2, extra_env=env, timeout=600)
    assert res["interpret"] == (request.param == "interpret") and res["world"] == 2
    return res


def _check(errs: dict, what: str, keys=("loss", "logp", "entropy", "dh", "dw")) -> None:
    assert set(keys) <= set(errs), f"{what}: compared only {sorted(errs)}"
    bad = {k: v for k, v in errs.items() if not v <= TOL}  # NaN fails
    assert not bad, f"{what}: relative error ||a-b||/||b|| over {TOL}: {bad} (all: {errs})"


def test_targets_fall_on_both_shards(result):
    assert all(n > 0 for n in result["targets_per_shard"]), result["targets_per_shard"]


def test_matches_the_single_rank_reference(result):
    _check(result["vs_full_reference"], "TP=2 fused vs whole-vocabulary reference")
    _check(result["plain_one_chunk"], "TP=2 fused without clamp/cap/KL/entropy, one chunk")
    _check(result["grad_scaled"], "TP=2 fused, (-2.5 * loss).backward()")


def test_matches_the_unfused_vocab_parallel_path(result):
    _check(result["vs_unfused_tp"], "TP=2 fused vs vocab_parallel_logprobs + policy_loss")


def test_ranks_agree_and_nograd_matches(result):
    assert result["ranks_disagree"] == 0.0, result["ranks_disagree"]
    _check(result["nograd_vs_grad"], "TP=2 fused under no_grad vs with grad", keys=("loss", "logp", "entropy"))


def test_gpu_check_script_runs_on_cpu(tmp_path):
    """benchmarks/gpu_check_tp_loss.py --cpu: the shards in threads (Triton interpreted) against one rank."""
    out = tmp_path / "check.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check_tp_loss.py"), str(out), "--cpu"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["interpret"] and len(report["cases"]) == 2
    for case in report["cases"]:
        assert case["ranks_disagree"] == 0.0, case
        _check({k: d["rel"] for k, d in case["tp_vs_single_rank"].items()}, f"threaded TP={case['tp']} vs one rank")
