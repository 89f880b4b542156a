"""Presets and the validated run configuration.

One dataclass tree describes a run: the model architecture, the MoE router knobs (the tutorial's
stability guidance), the parallel layout, the data, the GRPO hyperparameters and logging. A preset
fills it with the reference numbers (shared/reference/recipe-facts.md); ``key=value`` overrides
change single fields. ``load_config`` validates everything before any work starts, so a typo or an
impossible layout fails in a second with the key, the value and what is allowed.

This module is a leaf: it imports nothing else from the package.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

PRESETS = ("tiny", "tiny-deepseek-v3", "moonlight-1gpu", "moonlight-16b-a3b", "deepseek-v3-671b")
# Presets whose policy is built offline and warmed up on this machine (cookbook.models.tiny), not downloaded.
OFFLINE_PRESETS = ("tiny", "tiny-deepseek-v3")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key, the value and the fix."""


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture numbers (MLA + MoE); names follow the HF config where one exists."""

    name: str = "tiny"
    hf_dir: str = ""  # local HF checkpoint directory; empty for tiny = build it offline (cookbook.models)
    mcore_dir: str = ""  # converted Megatron-Core checkpoint (notebook 20); empty = <run dir>/mcore
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 3
    num_attention_heads: int = 2
    ffn_hidden_size: int = 256  # dense MLP of the first layers (HF intermediate_size)
    moe_ffn_hidden_size: int = 64  # each routed expert (HF moe_intermediate_size)
    num_experts: int = 8
    moe_router_topk: int = 2
    num_shared_experts: int = 1
    first_k_dense_replace: int = 1
    q_lora_rank: Optional[int] = None  # None = plain q projection (Moonlight); DeepSeek-V3 uses 1536
    kv_lora_rank: int = 512  # vLLM's CPU MLA needs kv_lora_rank + qk_rope_head_dim == 576
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 64
    v_head_dim: int = 32
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # YaRN factor; 1.0 = no rope scaling
    original_max_position_embeddings: int = 4096  # YaRN's pre-scaling context (DeepSeek-V3: 4096)
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    params_dtype: str = "float32"  # training parameter dtype: float32 | bfloat16


@dataclass
class MoEConfig:
    """Router settings. Defaults are the tutorial's RL stability settings: no load-balancing loss,
    no expert-bias updates (off-policy drift from routing changes collapsed the gray run)."""

    router_load_balancing_type: str = "none"  # none | aux_loss | seq_aux_loss | global_aux_loss
    aux_loss_coeff: float = 0.0
    router_enable_expert_bias: bool = False
    router_bias_update_rate: float = 0.0
    # the trainer's router logits: fp32, or none = the model dtype (bf16 with model.params_dtype=bfloat16); the
    # rollout engine (vLLM) computes its router in the model dtype whatever this says
    router_dtype: str = "fp32"  # fp32 | none (model dtype)
    token_dispatcher_type: str = "alltoall"  # alltoall | allgather (CPU needs allgather)
    # routing replay: none, or r3 (the trainer routes every token to the experts the rollout engine chose; the gates
    # stay the trainer router's own scores, normalised over those experts; cookbook.megatron.routing)
    routing_replay: str = "none"
    # Experiment knob (the MoE stability study, docs/study/): false builds the trainer's routers without the expert
    # bias (Megatron's moe_router_enable_expert_bias=False), as ChatLearn builds Moonlight and DeepSeek-V3, while the
    # rollout engine keeps the e_score_correction_bias it loaded from the checkpoint; the two then route differently
    # wherever the bias decides a token's experts. Needs parallel.sync_expert_bias=false (the trainer has no bias to
    # send) and no bias updates. Checkpoints and conversions still carry the bias; the HF export writes the rollout's.
    trainer_expert_bias: bool = True


@dataclass
class ParallelConfig:
    """Trainer and rollout layout. ``gpus_per_node = 0`` means CPU: gloo, one trainer process per rank the
    layout needs (``CookbookConfig.world_size``)."""

    num_nodes: int = 1
    gpus_per_node: int = 0
    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    expert: int = 1
    expert_tensor: int = 1
    sequence_parallel: bool = False
    first_pipeline_stage_layers: Optional[int] = None  # uneven PP split, e.g. 14 of Moonlight's 27
    last_pipeline_stage_layers: Optional[int] = None  # e.g. 2 of DeepSeek-V3's 61 (3 + 14 x 4 + 2)
    recompute: str = "none"  # none | selective | full
    rollout_tensor: int = 1
    rollout_gpu_memory_utilization: float = 0.75
    colocate: bool = True  # trainer and rollout share the GPUs (offloaded between phases)
    weight_sync_bucket_mb: int = 1024  # the trainer -> rollout weight sync sends whole layers in buckets of this size
    # Experiment knob (the MoE stability study): false leaves the routers' expert bias (e_score_correction_bias) out
    # of the weight sync, so the rollout engine keeps the bias it loaded while the trainer's drifts under
    # moe.router_bias_update_rate: what a sync that carries only parameters (the bias is a buffer) would do. Needs bias
    # updates, or moe.trainer_expert_bias=false; otherwise the bias never changes and leaving it out does nothing.
    sync_expert_bias: bool = True


@dataclass
class DataConfig:
    source: str = "generated"  # generated (offline, tiny) | local (a MATH-lighteval copy) | modelscope
    local_dir: str = ""  # MATH-lighteval directory for source=local (parquet or json, train/test)
    dataset_id: str = "AI-ModelScope/MATH-lighteval"
    processed_dir: str = ""  # where train.jsonl/test.jsonl go; empty = <run dir>/data
    num_train: int = 4000  # generated rows (source=generated)
    num_test: int = 500
    max_test_examples: int = 0  # evaluate on at most this many problems (validation and test); 0 = all
    validation_size: int = 0  # problems held out for the evaluations during training; 0 = evaluate on test (the reference)
    skip_bad_rows: bool = False  # skip and count malformed rows instead of stopping
    prompt_suffix: str = " Let's think step by step and output the final answer within \\boxed{}."


@dataclass
class GRPOConfig:
    """GRPO hyperparameters; defaults are the Moonlight reference (recipe-facts.md)."""

    steps: int = 200  # the reference's "episodes"
    lr: float = 2e-6
    prompts_per_step: int = 64
    samples_per_prompt: int = 32
    num_minibatches: int = 1  # optimizer steps per rollout batch
    micro_batch_size: int = 1
    max_prompt_length: int = 1024
    max_response_length: int = 2048
    sequence_packing: bool = False  # pack samples into rows of packing_max_tokens (thd); needed by parallel.context > 1
    packing_max_tokens: int = 4096  # tokens per packed row (the Moonlight reference: 4096); micro_batch_size = rows
    clip_low: float = 0.2
    clip_high: float = 0.2
    logratio_clamp: float = 10.0
    loss_cap: float = 3.0
    loss_aggregation: str = "token_mean"  # token_mean | seq_mean
    advantage: str = "grpo"  # grpo: (r - mean) / (std + eps) | drgrpo: r - mean
    advantage_eps: float = 1e-5
    kl_coef: float = 0.0
    kl_estimator: str = "k3"  # k1 | k2 | k3
    entropy_coef: float = 0.0
    # rollout-vs-trainer correction (algorithm.importance_weights): none | tis (truncated importance sampling) |
    # token_mask (drop tokens with pi_old / pi_rollout outside [low, high], IcePop; e.g. 0.5 / 2) | seq_mask (drop
    # sequences whose geometric-mean ratio is outside [low, high], seq-mask-TIS / MIS; e.g. 0.999 / 1.001) |
    # tis+token_mask | tis+seq_mask
    importance_correction: str = "none"
    importance_cap: float = 2.0  # tis: weights min(pi_old / pi_rollout, cap)
    importance_low: Optional[float] = None  # token_mask / seq_mask bounds, required with them: 0 < low < 1 < high
    importance_high: Optional[float] = None
    # ppo: the reference's token-level PPO-clip | gspo: GSPO's sequence-level ratio and clip (algorithm.gspo_loss);
    # GSPO clips the sequence ratio, so set clip_low / clip_high to about 3e-4 / 4e-4 (the GSPO paper)
    policy_loss: str = "ppo"
    reward_mode: str = "math_verify"  # math_verify: Hendrycks string match, then math-verify | strict: the reference's
    mismatch_threshold: float = 0.5  # |logp_train - logp_rollout| above which a token counts as mismatched
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    eval_top_k: int = 20
    eval_every: int = 1
    eval_pass_k: int = 0  # at the first and last evaluation: pass@1 and pass@k from k samples per problem; 0 = off
    # another run's eval_step0.json to log at step 0 instead of evaluating the start model again; refused unless it is
    # the same evaluation (same start model files, problems, settings, machine: cookbook.grpo.baseline); "" = evaluate
    eval_baseline: str = ""
    save_every: int = 10
    keep_checkpoints: int = 2  # the newest complete checkpoints kept (an older one is the fallback if the newest is damaged)
    # the last step's checkpoint and the HF export (hf_export/); false skips both (about 25 s of a 10-step tiny run):
    # a study's runs are compared, never continued or served (an early stop still checkpoints, to resume)
    final_save: bool = True
    weight_decay: float = 0.01
    # AdamW on fp32 master copies of bf16 parameters (cookbook/grpo/optimizer.py): without them most updates at
    # lr ~1e-6 round away in bf16; false = AdamW in the parameter dtype (half the optimizer memory)
    master_weights: bool = True
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    use_fused_kernels: bool = False  # kernels/ GRPO loss + MLA attention when CUDA is present


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb_mode: str = "auto"  # auto (online when WANDB_API_KEY is set, else offline) | offline | online | disabled
    wandb_project: str = "grpo-cookbook"


@dataclass
class CookbookConfig:
    preset: str = "tiny"
    run_name: str = ""  # empty = <preset>-<YYYYmmdd-HHMMSS>
    runs_dir: str = "runs"
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name

    @property
    def world_size(self) -> int:
        """Trainer ranks: one per GPU; on CPU (``gpus_per_node = 0``) as many processes as the layout needs,
        lcm(tensor x pipeline x context, expert x expert_tensor x pipeline)."""
        p = self.parallel
        if p.gpus_per_node:
            return p.num_nodes * p.gpus_per_node
        return math.lcm(p.tensor * p.pipeline * p.context, p.expert * p.expert_tensor * p.pipeline)


# ---------------------------------------------------------------------------------------------
# Presets: only the fields that differ from the dataclass defaults.

_TINY: dict[str, Any] = {
    "model": {"name": "tiny", "params_dtype": "float32", "hidden_size": 192, "moe_ffn_hidden_size": 96,
              "ffn_hidden_size": 384},
    "moe": {"token_dispatcher_type": "allgather"},
    # validation: 500 problems of the test split's space (the warm-up never saw them), beyond the 500 test problems
    "data": {"source": "generated", "num_train": 4000, "num_test": 500, "max_test_examples": 500,
             "validation_size": 500},
    # lr 1e-4 for 20 steps: the gain comes in the first 10-20 steps; longer runs drift back (60 steps kept about
    # two thirds of it), lr 2e-4 and above drift from the start (BENCHMARKS.md, "Tiny GRPO learning")
    "grpo": {
        "steps": 20, "lr": 1e-4, "prompts_per_step": 16, "samples_per_prompt": 8, "num_minibatches": 2,
        "micro_batch_size": 16, "max_prompt_length": 96, "max_response_length": 40,
        "eval_every": 5, "save_every": 5, "eval_pass_k": 8,
    },
}

# What makes DeepSeek-V3 differ from Moonlight, kept at the tiny size so that notebook 31 runs on a 2-core CPU: a
# q projection through a low rank (q_lora_rank), several dense first layers (3 + 2 MoE layers, so the reference's
# 3-first / 2-last pipeline split applies to it too), grouped routing (2 groups of 4 experts, the best one searched:
# top-k / topk_group = 2 as DeepSeek-V3's 8 / 4, see validate),
# routed scaling 2.5, and YaRN rope scaling whose original context (64) is shorter than the prompt + response, so
# the scaled frequencies are used where the model runs. Its source checkpoint is fp8 block-quantised as
# DeepSeek-V3 ships (cookbook.models.fp8_source) and goes through the cast to bf16. The GRPO settings follow the
# DeepSeek-V3 recipe's shape (8 prompts x 32 samples scaled to 8 x 16, one update per step, no packing, eval every
# 5 steps) at the tiny model's learning rate and lengths. Runs on one GPU with parallel.gpus_per_node=1 and
# model.params_dtype=bfloat16 (vLLM's GPU MLA backends need bf16).
_TINY_DEEPSEEK_V3: dict[str, Any] = {
    "model": {"name": "tiny-deepseek-v3", "params_dtype": "float32", "hidden_size": 192, "num_layers": 5,
              "first_k_dense_replace": 3, "ffn_hidden_size": 384, "moe_ffn_hidden_size": 96, "num_experts": 8,
              "moe_router_topk": 2, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5, "q_lora_rank": 96,
              "rope_scaling_factor": 4.0, "original_max_position_embeddings": 64, "max_position_embeddings": 256},
    "moe": {"token_dispatcher_type": "allgather", "router_dtype": "none"},
    "data": {"source": "generated", "num_train": 4000, "num_test": 500, "max_test_examples": 200,
             "validation_size": 500},
    "grpo": {
        "steps": 10, "lr": 1e-4, "prompts_per_step": 8, "samples_per_prompt": 16, "num_minibatches": 1,
        "micro_batch_size": 16, "max_prompt_length": 96, "max_response_length": 40,
        "eval_every": 5, "save_every": 5,
    },
}

_MOONLIGHT: dict[str, Any] = {
    "model": {
        "name": "moonlight-16b-a3b", "vocab_size": 163840, "hidden_size": 2048, "num_layers": 27,
        "num_attention_heads": 16, "ffn_hidden_size": 11264, "moe_ffn_hidden_size": 1408,
        "num_experts": 64, "moe_router_topk": 6, "num_shared_experts": 2, "first_k_dense_replace": 1,
        "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.446,
        "rope_theta": 50000.0, "rope_scaling_factor": 1.0, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "params_dtype": "bfloat16",
    },
    "parallel": {
        # the reference's layout: TP2 PP2 CP2 (context parallelism in the project's MLA attention) EP2 ETP2
        "num_nodes": 1, "gpus_per_node": 8, "tensor": 2, "pipeline": 2, "context": 2, "expert": 2,
        "expert_tensor": 2, "sequence_parallel": True, "first_pipeline_stage_layers": 14,
        "recompute": "selective", "rollout_tensor": 2, "rollout_gpu_memory_utilization": 0.75,
    },
    "data": {"source": "modelscope"},
    "grpo": {
        "steps": 200, "lr": 2e-6, "prompts_per_step": 64, "samples_per_prompt": 32,
        "max_prompt_length": 1024, "max_response_length": 2048,
        # the reference packs samples into 4096-token rows and trains one row per micro-batch
        "sequence_packing": True, "packing_max_tokens": 4096, "micro_batch_size": 1,
        "eval_every": 1, "save_every": 20,
    },
}

# Moonlight's architecture (MLA dims, 64 routed experts top-6 + 2 shared, first layer dense, vocabulary 163840)
# with fewer layers and a smaller hidden size, so that trainer and rollout fit one GPU together; it starts from a
# synthetic (random) HF checkpoint (cookbook.models.synthetic), so its runs measure the system, not learning.
_MOONLIGHT_1GPU: dict[str, Any] = {
    "model": {**_MOONLIGHT["model"], "name": "moonlight-1gpu", "hidden_size": 1024, "num_layers": 4,
              "ffn_hidden_size": 2816, "moe_ffn_hidden_size": 704, "max_position_embeddings": 4096},
    "parallel": {"num_nodes": 1, "gpus_per_node": 1, "rollout_tensor": 1, "rollout_gpu_memory_utilization": 0.5},
    "data": {"source": "generated", "num_train": 4000, "num_test": 200, "max_test_examples": 200},
    # the recipe's sampling and loss settings; the batch scaled to one GPU (the reference: 64 x 32, 1024 / 2048)
    "grpo": {
        "steps": 20, "lr": 2e-6, "prompts_per_step": 16, "samples_per_prompt": 16, "micro_batch_size": 1,
        "max_prompt_length": 256, "max_response_length": 256, "sequence_packing": True, "packing_max_tokens": 4096,
        "eval_every": 5, "save_every": 10,
    },
}

_DEEPSEEK_V3: dict[str, Any] = {
    "model": {
        "name": "deepseek-v3-671b", "vocab_size": 129280, "hidden_size": 7168, "num_layers": 61,
        "num_attention_heads": 128, "ffn_hidden_size": 18432, "moe_ffn_hidden_size": 2048,
        "num_experts": 256, "moe_router_topk": 8, "num_shared_experts": 1, "first_k_dense_replace": 3,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
        "rope_theta": 10000.0, "rope_scaling_factor": 40.0, "original_max_position_embeddings": 4096,
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "params_dtype": "bfloat16",
    },
    # Router in fp32 only without rope scaling (recipe-facts.md); DeepSeek-V3 uses YaRN.
    "moe": {"router_dtype": "none"},
    "parallel": {
        "num_nodes": 16, "gpus_per_node": 8, "tensor": 4, "pipeline": 16, "context": 1, "expert": 2,
        # 61 = 3 + 14 x 4 + 2, the reference script's decoder_first/last_pipeline_num_layers
        "first_pipeline_stage_layers": 3, "last_pipeline_stage_layers": 2,
        "expert_tensor": 4, "sequence_parallel": True, "recompute": "full", "rollout_tensor": 32,
        "rollout_gpu_memory_utilization": 0.6,
    },
    "data": {"source": "modelscope"},
    "grpo": {
        "steps": 200, "lr": 7e-7, "prompts_per_step": 8, "samples_per_prompt": 32,
        "max_prompt_length": 768, "max_response_length": 2048, "micro_batch_size": 1,
        "eval_every": 5, "save_every": 20,
    },
}

PRESET_VALUES: dict[str, dict[str, Any]] = {
    "tiny": _TINY,
    "tiny-deepseek-v3": _TINY_DEEPSEEK_V3,
    "moonlight-1gpu": _MOONLIGHT_1GPU,
    "moonlight-16b-a3b": _MOONLIGHT,
    "deepseek-v3-671b": _DEEPSEEK_V3,
}

# The fewest GPUs each real preset needs (trainer layout divisibility; recipe-facts.md).
MIN_GPUS = {"tiny": 0, "tiny-deepseek-v3": 0, "moonlight-1gpu": 1, "moonlight-16b-a3b": 8, "deepseek-v3-671b": 128}

CHOICES: dict[str, tuple[str, ...]] = {
    "moe.router_load_balancing_type": ("none", "aux_loss", "seq_aux_loss", "global_aux_loss"),
    "moe.router_dtype": ("fp32", "none"),
    "moe.token_dispatcher_type": ("alltoall", "allgather"),
    "moe.routing_replay": ("none", "r3"),
    "model.params_dtype": ("float32", "bfloat16"),
    "parallel.recompute": ("none", "selective", "full"),
    "data.source": ("generated", "local", "modelscope"),
    "grpo.loss_aggregation": ("token_mean", "seq_mean"),
    "grpo.advantage": ("grpo", "drgrpo"),
    "grpo.kl_estimator": ("k1", "k2", "k3"),
    "grpo.importance_correction": ("none", "tis", "token_mask", "seq_mask", "tis+token_mask", "tis+seq_mask"),
    "grpo.policy_loss": ("ppo", "gspo"),
    "grpo.reward_mode": ("math_verify", "strict"),
    "logging.wandb_mode": ("auto", "offline", "online", "disabled"),
}


# ---------------------------------------------------------------------------------------------
# Loading, overrides, validation.

def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        full = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            keys.extend(_all_keys(value, full + "."))
        else:
            keys.append(full)
    return keys


VALID_KEYS: tuple[str, ...] = tuple(_all_keys(CookbookConfig()))


def _unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, VALID_KEYS, n=1, cutoff=0.5)
    if not close:  # a right leaf under a wrong section, or the reverse
        leaf = key.split(".")[-1]
        close = [k for k in VALID_KEYS if k.split(".")[-1] == leaf][:1]
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(VALID_KEYS)}"
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Parse ``a.b=c`` strings (YAML values: 1e-6, true, null, [1,2]) into a nested dict."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (for example grpo.lr=1e-6)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in VALID_KEYS:
            raise _unknown_key_error(key, f"override '{item}'")
        value = OmegaConf.create({"v": raw}).v if raw == "" else OmegaConf.create(f"v: {raw}").v
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return nested


def nest_dotted(values: dict[str, Any], where: str = "overrides") -> dict[str, Any]:
    """{"grpo.lr": 1e-6} -> {"grpo": {"lr": 1e-6}}, checking every key (notebook parameters use this form)."""
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if key not in VALID_KEYS:
            raise _unknown_key_error(key, where)
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return nested


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        full = f"{prefix}{k}"
        if isinstance(v, dict) and full not in VALID_KEYS:
            out.update(_flatten(v, full + "."))
        else:
            out[full] = v
    return out


def _merge(base: Any, values: dict[str, Any], where: str) -> Any:
    for key in _flatten(values):
        if key not in VALID_KEYS:
            raise _unknown_key_error(key, where)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        reason = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"{where}: key '{key}' expects {_field_type(key)}: {reason}") from None


def _field_type(key: str) -> str:
    node: Any = CookbookConfig()
    try:
        for part in key.split(".")[:-1]:
            node = getattr(node, part)
        for f in dataclasses.fields(node):
            if f.name == key.split(".")[-1]:
                return str(f.type)
    except AttributeError:
        pass
    return "value"


def preset_config(preset: str) -> CookbookConfig:
    """The unvalidated config of a preset (its reference numbers)."""
    if preset not in PRESET_VALUES:
        close = difflib.get_close_matches(preset, PRESETS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"preset '{preset}' is unknown{hint}; choose one of {', '.join(PRESETS)}")
    values = copy.deepcopy(PRESET_VALUES[preset])
    values["preset"] = preset
    return _merge(CookbookConfig(), values, f"preset '{preset}'")


def load_config(
    preset: str = "tiny",
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
    config_file: str | os.PathLike | None = None,
) -> CookbookConfig:
    """Preset, then a YAML file, then a nested dict (notebook parameters), then ``a.b=c`` overrides."""
    cfg = preset_config(preset)
    if config_file is not None:
        file_values = OmegaConf.to_container(OmegaConf.load(config_file))
        file_values.pop("preset", None)
        cfg = _merge(cfg, file_values, f"config file {config_file}")
    if values:
        cfg = _merge(cfg, values, "values")
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), "overrides")
    if not cfg.run_name:
        cfg.run_name = f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    validate(cfg)
    return cfg


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def validate(cfg: CookbookConfig) -> None:
    """Check choices, ranges and the parallel layout; raise ConfigError naming the key."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(value in allowed, key, value, f"choose one of {', '.join(allowed)}")
    _require(cfg.preset in PRESETS, "preset", cfg.preset, f"choose one of {', '.join(PRESETS)}")

    m, moe, p, g = cfg.model, cfg.moe, cfg.parallel, cfg.grpo
    for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_experts",
                "moe_router_topk", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        _require(getattr(m, key) > 0, f"model.{key}", getattr(m, key), "must be > 0")
    _require(m.moe_router_topk <= m.num_experts, "model.moe_router_topk", m.moe_router_topk,
             f"must be <= model.num_experts ({m.num_experts})")
    _require(m.first_k_dense_replace < m.num_layers, "model.first_k_dense_replace", m.first_k_dense_replace,
             f"must be < model.num_layers ({m.num_layers}) so that some layers are MoE")
    _require(m.num_experts % m.n_group == 0, "model.n_group", m.n_group,
             f"must divide model.num_experts ({m.num_experts})")
    _require(1 <= m.topk_group <= m.n_group, "model.topk_group", m.topk_group,
             f"must be between 1 and model.n_group ({m.n_group})")
    # Megatron-Core scores a group by the sum of its best top-k / topk_group experts, HF DeepSeek-V3 and vLLM by its
    # best 2: the trainer and the rollout route alike only when top-k / topk_group is 2 (DeepSeek-V3: 8 / 4).
    # Measured: 4 groups, best 2, top-2 (a ratio of 1) put Megatron's logits 0.25 away from HF's.
    _require(m.n_group == 1 or m.moe_router_topk // m.topk_group == 2, "model.topk_group", m.topk_group,
             f"with model.n_group={m.n_group} > 1, model.moe_router_topk // model.topk_group must be 2 "
             f"(model.moe_router_topk={m.moe_router_topk}): Megatron-Core scores a group by its best top-k / "
             "topk_group experts, HF and vLLM by its best 2, so otherwise trainer and rollout route differently")
    _require(moe.aux_loss_coeff >= 0, "moe.aux_loss_coeff", moe.aux_loss_coeff, "must be >= 0")
    _require(moe.router_bias_update_rate >= 0, "moe.router_bias_update_rate", moe.router_bias_update_rate,
             "must be >= 0")
    if moe.router_load_balancing_type == "none" and moe.aux_loss_coeff > 0:
        raise ConfigError(
            f"moe.aux_loss_coeff={moe.aux_loss_coeff} has no effect with moe.router_load_balancing_type='none'; "
            "set moe.router_load_balancing_type=seq_aux_loss (or aux_loss) or moe.aux_loss_coeff=0")
    if moe.router_bias_update_rate > 0 and not moe.router_enable_expert_bias:
        raise ConfigError(
            f"moe.router_bias_update_rate={moe.router_bias_update_rate} needs moe.router_enable_expert_bias=true "
            "(the tutorial turns both off for RL stability)")
    _validate_expert_bias_knobs(moe, p)

    # Sizes and hyperparameters.
    _require(g.steps >= 1, "grpo.steps", g.steps, "must be >= 1")
    _require(g.lr > 0, "grpo.lr", g.lr, "must be > 0")
    _require(g.samples_per_prompt >= 2, "grpo.samples_per_prompt", g.samples_per_prompt,
             "must be >= 2: GRPO normalizes rewards within each prompt's group")
    _require(g.prompts_per_step >= 1, "grpo.prompts_per_step", g.prompts_per_step, "must be >= 1")
    samples = g.prompts_per_step * g.samples_per_prompt
    _require(g.num_minibatches >= 1 and samples % g.num_minibatches == 0, "grpo.num_minibatches",
             g.num_minibatches, f"must divide the samples per step ({samples})")
    _require(0 <= g.clip_low < 1, "grpo.clip_low", g.clip_low, "must be in [0, 1)")
    _require(g.clip_high >= 0, "grpo.clip_high", g.clip_high, "must be >= 0")
    _require(g.temperature > 0, "grpo.temperature", g.temperature, "must be > 0")
    _require(0 < g.top_p <= 1, "grpo.top_p", g.top_p, "must be in (0, 1]")
    _require(g.eval_every >= 0 and g.save_every >= 0, "grpo.eval_every/save_every",
             (g.eval_every, g.save_every), "must be >= 0 (0 = never)")
    _require(g.max_prompt_length + g.max_response_length <= m.max_position_embeddings,
             "grpo.max_prompt_length + grpo.max_response_length",
             g.max_prompt_length + g.max_response_length,
             f"must fit model.max_position_embeddings ({m.max_position_embeddings})")
    _require(0 < p.rollout_gpu_memory_utilization <= 1, "parallel.rollout_gpu_memory_utilization",
             p.rollout_gpu_memory_utilization, "must be in (0, 1]")
    _require(p.weight_sync_bucket_mb >= 1, "parallel.weight_sync_bucket_mb", p.weight_sync_bucket_mb, "must be >= 1")
    _require(g.keep_checkpoints >= 1, "grpo.keep_checkpoints", g.keep_checkpoints, "must be >= 1")
    _require(cfg.data.validation_size >= 0, "data.validation_size", cfg.data.validation_size, "must be >= 0")
    _require(g.eval_pass_k == 0 or g.eval_pass_k >= 2, "grpo.eval_pass_k", g.eval_pass_k,
             "must be 0 (off) or >= 2 samples per problem")
    _require(not g.eval_baseline or g.eval_every > 0, "grpo.eval_baseline", g.eval_baseline,
             "has no effect with grpo.eval_every=0 (no step-0 evaluation to replace); leave it empty")

    _validate_importance(g)
    if g.use_fused_kernels and g.policy_loss != "ppo":  # cookbook.grpo.fused_loss.refuse_unfused_options
        raise ConfigError(f"grpo.policy_loss={g.policy_loss!r} with grpo.use_fused_kernels=true: the fused kernel "
                          "computes only the token-level PPO-clip loss ('ppo'); set grpo.use_fused_kernels=false or "
                          "grpo.policy_loss=ppo")
    _validate_layout(cfg)


def _validate_expert_bias_knobs(moe: MoEConfig, p: ParallelConfig) -> None:
    """The study's expert-bias knobs: each must change something, and the two must agree."""
    updates = moe.router_enable_expert_bias and moe.router_bias_update_rate > 0
    if not moe.trainer_expert_bias:
        if moe.router_enable_expert_bias:
            raise ConfigError(
                "moe.trainer_expert_bias=false builds the trainer's routers without an expert bias, so there is none to "
                "update: set moe.router_enable_expert_bias=false and moe.router_bias_update_rate=0")
        if p.sync_expert_bias:
            raise ConfigError(
                "moe.trainer_expert_bias=false: the trainer has no expert bias to send, so the rollout engine keeps the "
                "one it loaded; say so with parallel.sync_expert_bias=false")
    elif not p.sync_expert_bias and not updates:
        raise ConfigError(
            "parallel.sync_expert_bias=false changes nothing while the trainer's expert bias is frozen (the rollout "
            "engine already has the same bias): turn on bias updates (moe.router_enable_expert_bias=true, "
            "moe.router_bias_update_rate > 0), or set moe.trainer_expert_bias=false, or leave it true")


def _validate_importance(g: GRPOConfig) -> None:
    """The rollout-vs-trainer correction's settings: bounds where a mask uses them, and nowhere else."""
    parts = g.importance_correction.split("+")
    if "tis" in parts:
        _require(g.importance_cap > 0, "grpo.importance_cap", g.importance_cap, "must be > 0")
    if "token_mask" in parts or "seq_mask" in parts:
        if g.importance_low is None or g.importance_high is None:
            raise ConfigError(
                f"grpo.importance_correction={g.importance_correction!r} needs grpo.importance_low and "
                "grpo.importance_high (0 < low < 1 < high); starting points: 0.999 / 1.001 for seq_mask (verl's "
                "async MoE script; NeMo-RL recommends 0.999 / 1.002), 0.5 / 2 for token_mask (IcePop)")
        if not 0 < g.importance_low < 1 < g.importance_high:
            raise ConfigError(f"grpo.importance_low={g.importance_low!r}, grpo.importance_high={g.importance_high!r} "
                              "are not allowed: need 0 < low < 1 < high")
    elif g.importance_low is not None or g.importance_high is not None:
        raise ConfigError(
            f"grpo.importance_low={g.importance_low!r} / grpo.importance_high={g.importance_high!r} have no effect "
            f"with grpo.importance_correction={g.importance_correction!r}: only token_mask and seq_mask use them; "
            "leave them unset (null) or choose a masking correction")


def _validate_layout(cfg: CookbookConfig) -> None:
    m, p = cfg.model, cfg.parallel
    for key in ("num_nodes", "tensor", "pipeline", "context", "expert", "expert_tensor", "rollout_tensor"):
        _require(getattr(p, key) >= 1, f"parallel.{key}", getattr(p, key), "must be >= 1")
    _require(p.gpus_per_node >= 0, "parallel.gpus_per_node", p.gpus_per_node, "must be >= 0 (0 = CPU)")

    _require(m.num_experts % p.expert == 0, "parallel.expert", p.expert,
             f"must divide model.num_experts ({m.num_experts})")
    world = cfg.world_size
    need = MIN_GPUS[cfg.preset]
    if p.gpus_per_node == 0 and need:
        raise ConfigError(
            f"preset '{cfg.preset}' needs GPUs (at least {need}); parallel.gpus_per_node=0 means CPU. "
            f"Set parallel.gpus_per_node and parallel.num_nodes, or use preset 'tiny' (or 'tiny-deepseek-v3') on CPU")
    if p.gpus_per_node == 0 and p.num_nodes > world:
        raise ConfigError(
            f"parallel.num_nodes={p.num_nodes} on CPU puts at least one trainer rank on every node, but the layout has "
            f"{world} rank(s) (lcm of tensor x pipeline x context and expert x expert_tensor x pipeline): give it "
            f"{p.num_nodes} or more (e.g. parallel.expert={p.num_nodes}) or use fewer nodes")
    if world < need:
        raise ConfigError(
            f"preset '{cfg.preset}' needs at least {need} GPUs; parallel.num_nodes x parallel.gpus_per_node = "
            f"{p.num_nodes} x {p.gpus_per_node} = {world}")
    model_parallel = p.tensor * p.pipeline * p.context
    if world % model_parallel:
        raise ConfigError(
            f"parallel.tensor x pipeline x context = {p.tensor} x {p.pipeline} x {p.context} = {model_parallel} "
            f"does not divide the {world} processes (num_nodes x gpus_per_node){_node_hint(p)}")
    expert_parallel = p.expert * p.expert_tensor * p.pipeline
    if world % expert_parallel:
        raise ConfigError(
            f"parallel.expert x expert_tensor x pipeline = {p.expert} x {p.expert_tensor} x {p.pipeline} = "
            f"{expert_parallel} does not divide the {world} processes (num_nodes x gpus_per_node)"
            f"{_node_hint(p)}")
    _require(m.num_attention_heads % p.tensor == 0, "parallel.tensor", p.tensor,
             f"must divide model.num_attention_heads ({m.num_attention_heads})")
    _require(m.num_attention_heads % p.rollout_tensor == 0, "parallel.rollout_tensor", p.rollout_tensor,
             f"must divide model.num_attention_heads ({m.num_attention_heads})")
    if p.gpus_per_node and p.rollout_tensor > world:
        raise ConfigError(f"parallel.rollout_tensor={p.rollout_tensor} exceeds the {world} GPUs")
    if p.tensor > 1 and not p.sequence_parallel:
        raise ConfigError(
            f"parallel.tensor={p.tensor} with MoE requires parallel.sequence_parallel=true (Megatron-Core)")
    _validate_pipeline_split(m, p)
    _validate_packing(cfg)


def _node_hint(p: ParallelConfig) -> str:
    """How to fix a GPU count the layout cannot use: the node counts that work (the GPUs must be a multiple of
    both tensor x pipeline x context and expert x expert_tensor x pipeline), or another layout."""
    unit = math.lcm(p.tensor * p.pipeline * p.context, p.expert * p.expert_tensor * p.pipeline)
    nodes = unit // math.gcd(unit, p.gpus_per_node) if p.gpus_per_node else 1
    return (f"; with parallel.gpus_per_node={p.gpus_per_node} set parallel.num_nodes to a multiple of {nodes} "
            f"({nodes * p.gpus_per_node} GPUs), or change the layout")


def packing_alignment(tensor: int, context: int) -> tuple[int, int]:
    """(sample multiple, row multiple) of packed rows: each sample padded to a multiple of 2 x context (1 without
    CP), each row to a multiple of lcm(2 x context, context x tensor) (``cookbook.grpo.packing.alignment``)."""
    sample = 2 * context if context > 1 else 1
    return sample, math.lcm(sample, context * tensor)


def _validate_packing(cfg: CookbookConfig) -> None:
    p, g = cfg.parallel, cfg.grpo
    if p.context > 1 and not g.sequence_packing:
        raise ConfigError(
            f"parallel.context={p.context} needs grpo.sequence_packing=true: context parallelism in the project's "
            "MLA attention splits packed rows over the CP ranks; set grpo.sequence_packing=true or parallel.context=1")
    if not g.sequence_packing:
        return
    _require(g.packing_max_tokens >= 1, "grpo.packing_max_tokens", g.packing_max_tokens, "must be >= 1")
    _, row = packing_alignment(p.tensor, p.context)
    if g.packing_max_tokens % row:
        lower, upper = g.packing_max_tokens // row * row, (g.packing_max_tokens // row + 1) * row
        contexts = [c for c in (1, 2, 4, 8, 16) if g.packing_max_tokens % packing_alignment(p.tensor, c)[1] == 0]
        raise ConfigError(
            f"grpo.packing_max_tokens={g.packing_max_tokens} does not split over parallel.context={p.context} x "
            f"parallel.tensor={p.tensor}: a packed row must be a multiple of {row} = lcm(2 x context, context x "
            f"tensor) (each CP rank holds 2 chunks of every sample, its share splits over TP); use "
            f"{', '.join(str(v) for v in (lower, upper) if v > 0)}, or parallel.context in {contexts}")
    _require(g.loss_aggregation == "token_mean" or g.policy_loss == "gspo", "grpo.loss_aggregation",
             g.loss_aggregation, "with grpo.sequence_packing=true only token_mean (the reference's) is supported "
             "(and seq_mean with grpo.policy_loss=gspo)")


def pipeline_stage_layers(num_layers: int, pipeline: int, first: Optional[int], last: Optional[int]) -> list[int]:
    """Decoder layers on each pipeline stage: ``first`` and ``last`` where set, the rest split evenly.
    Raises ValueError when the split is impossible (the caller names the keys)."""
    ends = (first is not None) + (last is not None)
    middle_stages = pipeline - ends
    rest = num_layers - (first or 0) - (last or 0)
    if ends and pipeline < 2:
        raise ValueError("an uneven split needs parallel.pipeline >= 2")
    if any(v is not None and v < 1 for v in (first, last)):
        raise ValueError("every stage needs at least one layer")
    if middle_stages == 0:
        if rest:
            raise ValueError(f"first + last = {(first or 0) + (last or 0)} layers, but the model has {num_layers}")
        return [first, last]
    if rest < middle_stages or rest % middle_stages:
        raise ValueError(f"the other {rest} layers do not split evenly over the other {middle_stages} stages")
    per = rest // middle_stages
    return ([first] if first is not None else []) + [per] * middle_stages + ([last] if last is not None else [])


def _validate_pipeline_split(m: ModelConfig, p: ParallelConfig) -> None:
    try:
        pipeline_stage_layers(m.num_layers, p.pipeline, p.first_pipeline_stage_layers, p.last_pipeline_stage_layers)
    except ValueError as e:
        raise ConfigError(
            f"parallel.pipeline={p.pipeline}, parallel.first_pipeline_stage_layers={p.first_pipeline_stage_layers}, "
            f"parallel.last_pipeline_stage_layers={p.last_pipeline_stage_layers} for model.num_layers={m.num_layers}: "
            f"{e}; set the first/last stage sizes so that the rest divides evenly (DeepSeek-V3: 61 = 3 + 14 x 4 + 2)"
        ) from None


def to_yaml(cfg: CookbookConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: CookbookConfig, run_dir: str | os.PathLike | None = None) -> Path:
    """Write the resolved config as ``config.yaml`` in the run folder (atomically)."""
    from cookbook.atomic import write_text  # atomic is a leaf utility too

    path = Path(run_dir or cfg.run_dir) / "config.yaml"
    return write_text(path, to_yaml(cfg))


def load_saved_config(path: str | os.PathLike) -> CookbookConfig:
    """Read a run folder's ``config.yaml`` (or the file itself) back, validated."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.yaml"
    values = OmegaConf.to_container(OmegaConf.load(path))
    cfg = _merge(CookbookConfig(), values, str(path))
    validate(cfg)
    return cfg
