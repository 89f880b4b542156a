"""What vLLM's reload reports as not loaded: its derived MLA matrices are expected, anything else means the
sync left a stale weight (the integration test shows both on a real engine)."""
from cookbook.rollout.worker_ext import unexpected_unloaded


def test_derived_matrices_are_expected():
    weights = {"model.layers.0.self_attn.mla_attn.mla_attn.W_UV", "model.layers.2.self_attn.mla_attn.mla_attn.W_UK_T"}
    assert unexpected_unloaded(weights) == []


def test_a_real_weight_left_out_is_reported():
    weights = {"model.layers.0.self_attn.mla_attn.mla_attn.W_UV", "model.layers.1.self_attn.o_proj.weight"}
    assert unexpected_unloaded(weights) == ["model.layers.1.self_attn.o_proj.weight"]
