"""The HF <-> Megatron name table: complete for the architecture, invertible, exact on fused tensors."""
import dataclasses

import pytest
import torch

from cookbook.config import load_config
from cookbook.convert.names import (all_mappings, hf_shape, mapping_for_mcore_name, mapping_table,
                                    megatron_to_hf_tensors, to_hf_tensors)


@pytest.fixture()
def tiny():
    return load_config("tiny").model


def test_every_layer_kind_is_mapped(tiny):
    hf = {h for mp in all_mappings(tiny) for h in mp.hf}
    assert "model.layers.0.mlp.gate_proj.weight" in hf  # first layer dense
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in hf
    assert f"model.layers.2.mlp.experts.{tiny.num_experts - 1}.down_proj.weight" in hf
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in hf
    assert "model.layers.0.self_attn.q_proj.weight" in hf and not any("q_a_proj" in h for h in hf)
    attention = 7  # 2 norms, q, kv down / norm / up, o
    dense, moe = attention + 2, attention + 2 + 2 + 2 * tiny.num_experts  # fc1/fc2; router+bias, shared, experts
    assert len(all_mappings(tiny)) == 3 + dense + (tiny.num_layers - 1) * moe


def test_q_lora_variant_uses_down_up_projection(tiny):
    m = dataclasses.replace(tiny, q_lora_rank=48)
    hf = {h for mp in all_mappings(m) for h in mp.hf}
    assert {"model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.q_a_layernorm.weight",
            "model.layers.0.self_attn.q_b_proj.weight"} <= hf
    assert not any(h.endswith("q_proj.weight") and "q_a" not in h and "q_b" not in h for h in hf)
    assert hf_shape(m, "model.layers.0.self_attn.q_b_proj.weight") == (2 * (32 + 64), 48)


def test_names_invert_and_layer_ranges_partition(tiny):
    for mp in all_mappings(tiny):
        assert mapping_for_mcore_name(mp.mcore) == mp
    parts = [all_mappings(tiny, range(0, 1)), all_mappings(tiny, range(1, 3))]
    assert [x.mcore for x in parts[0] + parts[1]] == [x.mcore for x in all_mappings(tiny)]
    with pytest.raises(KeyError, match="no rule"):
        mapping_for_mcore_name("decoder.layers.0.mlp.mystery.weight")


def test_fused_fc1_splits_into_gate_then_up():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fused = torch.cat([gate, up])  # Megatron's fused fc1: gate rows, then up rows
    mp = mapping_for_mcore_name("decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight")
    assert mp.hf == ("model.layers.3.mlp.experts.5.gate_proj.weight", "model.layers.3.mlp.experts.5.up_proj.weight")
    (n1, t1), (n2, t2) = to_hf_tensors(mp, fused)
    assert torch.equal(t1, gate) and torch.equal(t2, up)


def test_weight_sync_generator_skips_megatron_only_entries():
    items = [("decoder.layers.1.mlp.router.expert_bias", torch.zeros(8)),
             ("decoder.layers.1.mlp.router.local_tokens_per_expert", torch.zeros(8)),
             ("decoder.layers.0.self_attention.linear_proj._extra_state", None),
             ("module.decoder.layers.0.mlp.linear_fc1.weight", torch.ones(4, 2))]
    out = dict(megatron_to_hf_tensors(items))
    assert set(out) == {"model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.0.mlp.gate_proj.weight",
                        "model.layers.0.mlp.up_proj.weight"}
    assert out["model.layers.0.mlp.gate_proj.weight"].shape == (2, 2)


def test_mapping_table_rows(tiny):
    rows = mapping_table(tiny, max_experts=1)
    assert {"hf": "model.embed_tokens.weight", "megatron": "embedding.word_embeddings.weight", "layer": None} in rows
    assert any(r["hf"].startswith("... experts 1..") for r in rows)
