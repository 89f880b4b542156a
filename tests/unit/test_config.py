"""Presets carry the reference numbers; bad values fail early with the key, the value and the fix."""
import pytest

from cookbook.config import (PRESETS, ConfigError, load_config, load_saved_config, parse_overrides,
                             pipeline_stage_layers, preset_config, save_config)


def test_presets_carry_the_reference_numbers():
    moon = load_config("moonlight-16b-a3b")
    assert (moon.model.num_layers, moon.model.hidden_size, moon.model.num_experts) == (27, 2048, 64)
    assert (moon.model.moe_router_topk, moon.model.num_shared_experts, moon.model.vocab_size) == (6, 2, 163840)
    assert moon.model.q_lora_rank is None and moon.model.routed_scaling_factor == pytest.approx(2.446)
    assert (moon.grpo.lr, moon.grpo.prompts_per_step, moon.grpo.samples_per_prompt) == (2e-6, 64, 32)
    assert (moon.parallel.tensor, moon.parallel.pipeline, moon.parallel.context, moon.parallel.expert) == (2, 2, 2, 2)
    assert moon.grpo.sequence_packing and moon.grpo.packing_max_tokens == 4096

    ds = load_config("deepseek-v3-671b")
    assert (ds.model.num_layers, ds.model.hidden_size, ds.model.num_experts, ds.model.first_k_dense_replace) == (
        61, 7168, 256, 3)
    assert (ds.model.q_lora_rank, ds.model.n_group, ds.model.topk_group, ds.model.rope_scaling_factor) == (
        1536, 8, 4, 40.0)
    assert ds.world_size >= 128 and ds.grpo.lr == 7e-7 and ds.grpo.prompts_per_step * ds.grpo.samples_per_prompt == 256
    # the reference script's decoder_first/last_pipeline_num_layers: 61 = 3 + 14 x 4 + 2
    assert (ds.parallel.first_pipeline_stage_layers, ds.parallel.last_pipeline_stage_layers) == (3, 2)
    assert pipeline_stage_layers(61, 16, 3, 2) == [3] + [4] * 14 + [2]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_has_the_tutorial_stability_defaults(preset):
    moe = load_config(preset).moe
    assert moe.router_load_balancing_type == "none" and moe.aux_loss_coeff == 0
    assert moe.router_enable_expert_bias is False and moe.router_bias_update_rate == 0


@pytest.mark.parametrize("overrides, message", [
    # a trainer without the bias has none to update, and none to send
    (["moe.trainer_expert_bias=false", "parallel.sync_expert_bias=false", "moe.router_enable_expert_bias=true",
      "moe.router_bias_update_rate=1e-3"], "none to update"),
    (["moe.trainer_expert_bias=false"], "parallel.sync_expert_bias=false"),
    # leaving a frozen bias out of the sync would change nothing
    (["parallel.sync_expert_bias=false"], "changes nothing"),
])
def test_expert_bias_study_knobs_must_change_something(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_expert_bias_study_knobs_accepted_where_they_act():
    g = load_config("tiny", ["moe.trainer_expert_bias=false", "parallel.sync_expert_bias=false"])
    assert not g.moe.trainer_expert_bias and not g.parallel.sync_expert_bias
    h = load_config("tiny", ["parallel.sync_expert_bias=false", "moe.router_enable_expert_bias=true",
                             "moe.router_bias_update_rate=1e-2"])
    assert not h.parallel.sync_expert_bias and h.moe.trainer_expert_bias
    default = load_config("tiny")
    assert default.moe.trainer_expert_bias and default.parallel.sync_expert_bias


def test_tiny_fits_the_vllm_cpu_mla_rule():
    m = load_config("tiny").model
    assert m.kv_lora_rank + m.qk_rope_head_dim == 576


def test_overrides_are_typed_yaml_values():
    cfg = load_config("tiny", ["grpo.lr=3e-5", "moe.router_enable_expert_bias=true",
                               "moe.router_bias_update_rate=1e-3", "grpo.steps=4"])
    assert cfg.grpo.lr == 3e-5 and cfg.moe.router_enable_expert_bias is True and cfg.grpo.steps == 4
    assert parse_overrides(["grpo.clip_high=0.28"]) == {"grpo": {"clip_high": 0.28}}


@pytest.mark.parametrize("override, message", [
    ("grpo.lrr=1", "did you mean 'grpo.lr'"),
    ("lr=1", "did you mean 'grpo.lr'"),
    ("grpo.lr=abc", "grpo.lr"),
    ("grpo.steps=1.5", "grpo.steps"),
    ("moe.router_load_balancing_type=foo", "choose one of none, aux_loss"),
    ("parallel.tensor=3", "must divide model.num_attention_heads"),
    ("grpo.samples_per_prompt=1", "samples_per_prompt"),
    ("moe.aux_loss_coeff=0.01", "router_load_balancing_type"),
    ("moe.router_bias_update_rate=0.001", "router_enable_expert_bias"),
    ("grpo.max_response_length=100000", "max_position_embeddings"),
    ("nonsense", "key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config("tiny", [override])


def test_parallel_layout_must_fit_the_gpus():
    with pytest.raises(ConfigError, match="needs at least 128 GPUs"):
        load_config("deepseek-v3-671b", ["parallel.num_nodes=2"])
    with pytest.raises(ConfigError, match="needs GPUs"):
        load_config("moonlight-16b-a3b", ["parallel.gpus_per_node=0"])
    with pytest.raises(ConfigError, match="sequence_parallel"):
        load_config("moonlight-16b-a3b", ["parallel.sequence_parallel=false"])
    with pytest.raises(ConfigError, match="must divide model.num_experts"):
        load_config("moonlight-16b-a3b", ["parallel.expert=3"])
    with pytest.raises(ConfigError, match="first_pipeline_stage_layers"):
        load_config("moonlight-16b-a3b", ["parallel.first_pipeline_stage_layers=27"])


@pytest.mark.parametrize("overrides, message", [
    (["parallel.last_pipeline_stage_layers=3"], "the other 55 layers do not split evenly over the other 14 stages"),
    (["parallel.first_pipeline_stage_layers=2", "parallel.last_pipeline_stage_layers=null"],
     "the other 59 layers do not split evenly over the other 15 stages"),
    (["parallel.last_pipeline_stage_layers=0"], "at least one layer"),
])
def test_deepseek_pipeline_split_is_checked(overrides, message):
    with pytest.raises(ConfigError, match="parallel.last_pipeline_stage_layers=.*" + message):
        load_config("deepseek-v3-671b", overrides)


def test_pipeline_split_of_two_stages_and_of_one():
    assert pipeline_stage_layers(27, 2, 14, None) == [14, 13]
    assert pipeline_stage_layers(27, 2, 14, 13) == [14, 13]
    assert pipeline_stage_layers(4, 1, None, None) == [4]
    with pytest.raises(ValueError, match="pipeline >= 2"):
        pipeline_stage_layers(4, 1, 2, None)
    with pytest.raises(ValueError, match="first \\+ last = 26"):
        pipeline_stage_layers(27, 2, 14, 12)


def test_context_parallelism_needs_packing_and_a_divisible_row():
    with pytest.raises(ConfigError, match="parallel.context=2 needs grpo.sequence_packing=true"):
        load_config("moonlight-16b-a3b", ["grpo.sequence_packing=false"])
    with pytest.raises(ConfigError, match="grpo.packing_max_tokens=4090 does not split"):
        load_config("moonlight-16b-a3b", ["grpo.packing_max_tokens=4090"])


def test_on_cpu_the_trainer_world_is_what_the_layout_needs():
    assert load_config("tiny").world_size == 1
    assert load_config("tiny", ["parallel.expert=2"]).world_size == 2  # EP ranks are data-parallel ranks
    assert load_config("tiny", ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2"]
                       ).world_size == 2
    with pytest.raises(ConfigError, match="= 16 does not divide the 8 processes"):  # on GPUs the world is given
        load_config("moonlight-16b-a3b", ["parallel.tensor=4"])


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'moonlight-16b-a3b'"):
        preset_config("moonlight-16b")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("moonlight-16b-a3b", ["grpo.lr=1e-6"], values={"runs_dir": str(tmp_path), "run_name": "r"})
    path = save_config(cfg)
    assert path == tmp_path / "r" / "config.yaml"
    again = load_saved_config(tmp_path / "r")
    assert again == cfg


def test_config_file_and_values_layer_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("grpo:\n  lr: 0.001\n  steps: 7\n")
    cfg = load_config("tiny", ["grpo.steps=9"], values={"grpo": {"lr": 0.002}}, config_file=f)
    assert (cfg.grpo.lr, cfg.grpo.steps) == (0.002, 9)
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo:\n  lrate: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml.*did you mean 'grpo.lr'"):
        load_config("tiny", config_file=bad)
