"""The bridge between the preset's ModelConfig and a Hugging Face DeepSeek-V3 ``config.json``.

Every other part (the tiny-model builder, conversion, the rollout engine) reads or writes HF configs
through here, so the two descriptions of one architecture cannot drift apart.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cookbook.config import ConfigError, ModelConfig

# HF config key -> ModelConfig field, for every number both sides describe.
HF_TO_MODEL_FIELD: dict[str, str] = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads",
    "intermediate_size": "ffn_hidden_size",
    "moe_intermediate_size": "moe_ffn_hidden_size",
    "n_routed_experts": "num_experts",
    "num_experts_per_tok": "moe_router_topk",
    "n_shared_experts": "num_shared_experts",
    "first_k_dense_replace": "first_k_dense_replace",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "n_group": "n_group",
    "topk_group": "topk_group",
    "routed_scaling_factor": "routed_scaling_factor",
    "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
}


def rope_parameters(m: ModelConfig) -> dict[str, Any]:
    """transformers-5 style rope block: plain rope, or YaRN when a scaling factor is set."""
    if m.rope_scaling_factor == 1.0:
        return {"rope_type": "default", "rope_theta": m.rope_theta}
    return {
        "rope_type": "yarn", "rope_theta": m.rope_theta, "factor": m.rope_scaling_factor,
        "original_max_position_embeddings": m.original_max_position_embeddings,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
    }


def hf_config_dict(m: ModelConfig, bos_token_id: int = 0, eos_token_id: int = 1,
                   pad_token_id: int | None = None) -> dict[str, Any]:
    """A DeepseekV3ForCausalLM ``config.json`` for this architecture.

    ``topk_method="noaux_tc"`` and ``scoring_func="sigmoid"`` are what vLLM needs to build the router with
    its ``e_score_correction_bias`` (platform-facts.md); ``num_nextn_predict_layers=0`` drops MTP.
    """
    cfg: dict[str, Any] = {hf: getattr(m, field) for hf, field in HF_TO_MODEL_FIELD.items()}
    cfg.update({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "num_key_value_heads": m.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "rope_theta": m.rope_theta,
        "rope_parameters": rope_parameters(m),
        "rope_scaling": None if m.rope_scaling_factor == 1.0 else {
            k: v for k, v in rope_parameters(m).items() if k not in ("rope_theta",)} | {"type": "yarn"},
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "norm_topk_prob": True,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "num_nextn_predict_layers": 0,
        "initializer_range": 0.02,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "use_cache": True,
        "torch_dtype": m.params_dtype,
    })
    return cfg


def _rope_problems(hf_cfg: dict[str, Any], m: ModelConfig) -> list[str]:
    """Rope base and YaRN scaling: a checkpoint trained with other positions would load and run, only worse."""
    rope = hf_cfg.get("rope_scaling") or hf_cfg.get("rope_parameters") or {}
    scaled = rope.get("rope_type", rope.get("type")) not in (None, "default")
    have = {"rope_theta": hf_cfg.get("rope_theta", rope.get("rope_theta")),
            "rope_scaling.factor": float(rope.get("factor", 1.0)) if scaled else 1.0}
    want = {"rope_theta": m.rope_theta, "rope_scaling.factor": m.rope_scaling_factor}
    fields = {"rope_theta": "rope_theta", "rope_scaling.factor": "rope_scaling_factor"}
    if scaled and m.rope_scaling_factor != 1.0:
        have["rope_scaling.original_max_position_embeddings"] = rope.get("original_max_position_embeddings")
        want["rope_scaling.original_max_position_embeddings"] = m.original_max_position_embeddings
        fields["rope_scaling.original_max_position_embeddings"] = "original_max_position_embeddings"
    return [f"{key}={have[key]!r} but the preset has model.{fields[key]}={want[key]!r}" for key in want
            if have[key] is not None and float(have[key]) != float(want[key])]


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: model.hf_dir must be a Hugging Face model directory (config.json, *.safetensors, "
            "tokenizer files), e.g. from `modelscope download --model moonshotai/Moonlight-16B-A3B-Instruct`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None


def check_hf_config(hf_cfg: dict[str, Any], m: ModelConfig, where: str = "config.json") -> None:
    """Raise ConfigError listing every architecture number where the checkpoint and the preset disagree."""
    problems = []
    for hf_key, field in HF_TO_MODEL_FIELD.items():
        if hf_key not in hf_cfg:
            if field in ("q_lora_rank", "tie_word_embeddings", "n_group", "topk_group") and not getattr(m, field):
                continue
            problems.append(f"{hf_key} is missing (preset model.{field}={getattr(m, field)!r})")
            continue
        have, want = hf_cfg[hf_key], getattr(m, field)
        same = abs(have - want) <= 1e-9 * max(1.0, abs(want)) if isinstance(want, float) and have is not None \
            else have == want
        if not same:
            problems.append(f"{hf_key}={have!r} but the preset has model.{field}={want!r}")
    problems += _rope_problems(hf_cfg, m)
    if problems:
        raise ConfigError(
            f"{where} does not match preset '{m.name}':\n  " + "\n  ".join(problems)
            + "\nUse the preset that matches this checkpoint, or override the model.* keys.")
