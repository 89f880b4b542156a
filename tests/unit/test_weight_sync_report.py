"""What vLLM's reload reports as not loaded: its derived MLA matrices are expected, anything else means the
sync left a stale weight (the integration test shows both on a real engine); what the sync leaves out on purpose
(the expert bias with parallel.sync_expert_bias=false) is expected too."""
from cookbook.rollout.worker_ext import unexpected_unloaded


def test_derived_matrices_are_expected():
    weights = {"model.layers.0.self_attn.mla_attn.mla_attn.W_UV", "model.layers.2.self_attn.mla_attn.mla_attn.W_UK_T"}
    assert unexpected_unloaded(weights) == []


def test_a_real_weight_left_out_is_reported():
    weights = {"model.layers.0.self_attn.mla_attn.mla_attn.W_UV", "model.layers.1.self_attn.o_proj.weight"}
    assert unexpected_unloaded(weights) == ["model.layers.1.self_attn.o_proj.weight"]


def test_weights_left_out_on_purpose_are_expected():
    weights = {"model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.self_attn.mla_attn.mla_attn.W_UV"}
    assert unexpected_unloaded(weights) == ["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert unexpected_unloaded(weights, ("e_score_correction_bias",)) == []
