"""What vLLM's reload reports as not loaded: its derived MLA matrices and weightless layers are expected,
anything else means the sync left a stale weight (the integration test shows both on a real engine)."""
from cookbook.rollout.worker_ext import unexpected_unloaded


def test_derived_and_weightless_are_expected():
    weights = {"model.layers.0.self_attn.mla_attn.mla_attn.W_UV", "model.layers.2.self_attn.mla_attn.mla_attn.W_UK_T"}
    assert unexpected_unloaded(weights, {"RotaryEmbedding"}) == []


def test_a_real_weight_or_layer_left_out_is_reported():
    weights = {"model.layers.0.self_attn.mla_attn.mla_attn.W_UV", "model.layers.1.self_attn.o_proj.weight"}
    assert unexpected_unloaded(weights, {"RotaryEmbedding", "RowParallelLinear"}) == [
        "layer RowParallelLinear", "model.layers.1.self_attn.o_proj.weight"]
