"""The policy model: a Megatron-Core GPTModel with MLA + MoE built from the preset.

``build_model(cfg)`` maps ``cfg.model`` / ``cfg.moe`` / ``cfg.parallel`` onto an ``MLATransformerConfig``
and the local (non-Transformer-Engine) layer spec with the project's own core attention. The settings
that make it compute exactly what HF DeepSeek-V3 computes (platform-facts.md): ``qk_layernorm``;
plain rope with ``rotary_scaling_factor=1.0`` (MLA's softmax scale uses the YaRN factor even with plain
rope); YaRN with mscale 1 / mscale_all_dim 1; sigmoid routing with the expert bias, groups and the
routed scaling factor.

The expert-bias buffer exists (``moe.trainer_expert_bias``, true by default), because the HF checkpoints carry
``e_score_correction_bias`` and routing depends on it; ``moe.router_enable_expert_bias`` decides whether the bias
is *updated* during training (the tutorial's stability setting keeps it frozen). ``moe.trainer_expert_bias=false``
is the stability study's case of a trainer built without the bias (as ChatLearn builds Moonlight and DeepSeek-V3):
its routers choose experts from the sigmoid scores alone, and loading a checkpoint leaves its bias unread.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from cookbook.config import ConfigError, CookbookConfig
from cookbook.megatron.compat import apply_cpu_compat

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def use_cuda(cfg: CookbookConfig) -> bool:
    return cfg.parallel.gpus_per_node > 0 and torch.cuda.is_available()


def init_parallel(cfg: CookbookConfig, rank: int = 0, world_size: int = 1) -> None:
    """torch.distributed (gloo on CPU, nccl on GPU) and Megatron's parallel state from ``cfg.parallel``.

    Calling it again with the same layout does nothing, so notebooks and tests can call it freely.
    """
    apply_cpu_compat()
    from megatron.core import parallel_state as ps

    p = cfg.parallel
    if not dist.is_initialized():
        backend = "nccl" if use_cuda(cfg) else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        if world_size == 1:  # an in-process store: no port, and no clash with a job's MASTER_ADDR/PORT
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
                raise ConfigError("MASTER_ADDR and MASTER_PORT must be set for a multi-process run "
                                  "(PyTorchJob sets them; locally use 127.0.0.1 and a free port)")
            dist.init_process_group(backend, rank=rank, world_size=world_size)
    # Megatron's groups hang off the default group: if that was replaced (another library in the process,
    # vLLM for one, tore it down and it was made again), the old groups are dead and must be rebuilt.
    layout = (p.tensor, p.pipeline, p.context, p.expert, p.expert_tensor, id(dist.group.WORLD))
    if ps.model_parallel_is_initialized():
        if getattr(init_parallel, "_layout", None) == layout:
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor, pipeline_model_parallel_size=p.pipeline,
        context_parallel_size=p.context, expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=p.expert_tensor)
    init_parallel._layout = layout


def transformer_config(cfg: CookbookConfig):
    """The ``MLATransformerConfig`` for this preset (needs ``init_parallel`` for the layout sizes)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    m, moe, p = cfg.model, cfg.moe, cfg.parallel
    on_gpu = use_cuda(cfg)
    if not on_gpu and moe.token_dispatcher_type == "alltoall":
        raise ConfigError("moe.token_dispatcher_type=alltoall creates a CUDA stream and fails on CPU; "
                          "set moe.token_dispatcher_type=allgather")
    if m.rope_scaling_factor == 1.0:
        rope = {"rope_type": "rope", "rotary_scaling_factor": 1.0}
    else:
        rope = {"rope_type": "yarn", "rotary_scaling_factor": m.rope_scaling_factor,
                "original_max_position_embeddings": m.original_max_position_embeddings,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    recompute = {}
    if p.recompute == "selective":
        recompute = {"recompute_granularity": "selective"}
    elif p.recompute == "full":
        recompute = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    pipeline = {}
    if p.first_pipeline_stage_layers is not None:
        pipeline["num_layers_in_first_pipeline_stage"] = p.first_pipeline_stage_layers
    if p.last_pipeline_stage_layers is not None:
        pipeline["num_layers_in_last_pipeline_stage"] = p.last_pipeline_stage_layers
    dtype = DTYPES[m.params_dtype]
    return MLATransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size, normalization="RMSNorm", layernorm_epsilon=m.rms_norm_eps,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0,
        # MLA
        q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_head_dim=m.qk_nope_head_dim,
        qk_pos_emb_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, qk_layernorm=True,
        rotary_base=m.rope_theta, **rope,
        # MoE
        num_moe_experts=m.num_experts, moe_router_topk=m.moe_router_topk, moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=m.moe_ffn_hidden_size * m.num_shared_experts or None,
        moe_layer_freq=[0] * m.first_k_dense_replace + [1] * (m.num_layers - m.first_k_dense_replace),
        moe_router_score_function="sigmoid", moe_router_pre_softmax=False,
        moe_router_num_groups=m.n_group if m.n_group > 1 else None,
        moe_router_group_topk=m.topk_group if m.n_group > 1 else None,
        moe_router_topk_scaling_factor=m.routed_scaling_factor,
        # the buffer carries e_score_correction_bias (unless moe.trainer_expert_bias=false); updates below
        moe_router_enable_expert_bias=moe.trainer_expert_bias,
        moe_router_bias_update_rate=moe.router_bias_update_rate if moe.router_enable_expert_bias else 0.0,
        moe_router_load_balancing_type=moe.router_load_balancing_type, moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_router_dtype=None if moe.router_dtype == "none" else moe.router_dtype,
        moe_token_dispatcher_type=moe.token_dispatcher_type, moe_grouped_gemm=False,
        # layout
        tensor_model_parallel_size=p.tensor, pipeline_model_parallel_size=p.pipeline,
        context_parallel_size=p.context, expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=p.expert_tensor, sequence_parallel=p.sequence_parallel and p.tensor > 1,
        **pipeline, **recompute,
        # dtype and device
        params_dtype=dtype, bf16=dtype == torch.bfloat16, pipeline_dtype=dtype,
        use_cpu_initialization=not on_gpu, perform_initialization=True,
        # fusions need CUDA / apex / TE
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
    )


def layer_spec(config, use_fused_kernels: bool = False):
    """The local layer spec with ``MLACoreAttention`` as every layer's core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    from cookbook.megatron.attention import MLACoreAttention

    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    attention = ModuleSpec(module=MLACoreAttention, params={"use_fused_kernel": use_fused_kernels})
    for layer in spec.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = attention
    return spec


def build_model(cfg: CookbookConfig, pre_process: Optional[bool] = None, post_process: Optional[bool] = None):
    """The GPTModel for this rank's pipeline stage (call ``init_parallel`` first)."""
    apply_cpu_compat()
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("call cookbook.megatron.model.init_parallel(cfg) before build_model(cfg)")
    torch.manual_seed(cfg.seed)
    model_parallel_cuda_manual_seed(cfg.seed, force_reset_rng=True)
    config = transformer_config(cfg)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, cfg.grpo.use_fused_kernels and use_cuda(cfg)),
        vocab_size=cfg.model.vocab_size,
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=ps.is_pipeline_last_stage() if post_process is None else post_process,
        share_embeddings_and_output_weights=cfg.model.tie_word_embeddings,
        position_embedding_type="none",  # MLA applies its own rotary embedding
    )
    return model


def forward_logits(model, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                   attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` of a single-stage model; ``attention_mask`` follows Megatron's
    convention (bool, True = masked out) and is combined with the causal mask."""
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return model(input_ids, position_ids, attention_mask)


def update_router_expert_bias(model, config=None) -> bool:
    """After an optimizer step with a plain torch optimizer: apply the expert-bias update that Megatron's
    ``finalize_model_grads`` would do (bias += sign(mean count - count) * rate, counts all-reduced over
    TP x CP x DP), then reset the token counters. Returns whether an update was applied."""
    from megatron.core.distributed.finalize_model_grads import (
        _update_router_expert_bias, reset_model_temporary_tensors)

    config = config or model.config
    models = model if isinstance(model, list) else [model]
    if not (config.moe_router_enable_expert_bias and config.moe_router_bias_update_rate > 0):
        reset_model_temporary_tensors(config, models)
        return False
    _update_router_expert_bias(models, config)
    reset_model_temporary_tensors(config, models)
    return True


def moe_aux_loss(clear: bool = True) -> dict[str, float]:
    """The MoE auxiliary losses of the last forward passes, summed over layers (for logging); the
    gradient of the loss already includes them (Megatron's ``MoEAuxLossAutoScaler``)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    values = {name: float(entry["values"].sum()) for name, entry in get_moe_layer_wise_logging_tracker().items()}
    if clear:
        clear_aux_losses_tracker()
    return values
