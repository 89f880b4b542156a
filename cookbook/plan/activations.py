"""Activation memory of one trainer rank: what a training forward keeps for its backward, per micro-batch.

The numbers follow the tensors the project's model actually saves (Megatron-Core's local layer spec, the
project's MLA core attention, torch RMSNorm, the vocab-parallel log-probs of ``cookbook.megatron.parallel``),
read off with ``torch.autograd.graph.saved_tensors_hooks`` on the tiny model and written out per token below
(``a`` = bytes of the parameter dtype, ``t`` = TP, ``n`` = heads, ``dq`` = qk_nope + qk_rope, ``dv`` = v head).
Sequence parallelism (TP > 1) splits the norm / residual regions over TP; the attention and MLP inner
regions hold all of the rank's tokens with ``1 / t`` of the heads or FFN columns.

- attention: input RMSNorm (its input + fp32 rstd: torch's fused kernel on CUDA; on CPU torch also keeps the
  normalized copy, ``a x width`` more per norm), the projections' input, the latent path (q_layernorm /
  kv_layernorm input, rstd, output), fp32 rope tables (16 x qk_rope bytes per position), the core attention's
  q, k, v, output and fp32 log-sum-exp (SDPA's memory-efficient / cuDNN kernels and the fused kernel keep no
  score matrix; on CPU SDPA's math path does), and linear_proj's input;
- dense MLP / shared experts: pre-MLP RMSNorm, fc1 input, then 5 units of the FFN width per token (fc1's
  gate+up output, the SiLU output, the product, fc2's input);
- routed experts: each token's ``topk`` copies, each with its hidden state, 6 units of the expert FFN width (the
  router probability multiplies in one more) and an fp32 probability; with ETP > 1 the dispatcher all-gathers a
  rank's copies over the expert-TP group; the router keeps its fp32 scores, indices, routing map and (with
  ``moe.router_dtype=fp32`` and a bf16 model) an fp32 copy of its input;
- log-probs on the last stage: the bf16 logits plus five fp32 ``[tokens, vocab / TP]`` tensors alive together
  in ``vocab_parallel_logprobs`` (the cross entropy's softmax, the scaled logits, their shifted copy, its exp and
  the entropy's product), ``a + 20`` bytes per logit. The fused loss (``grpo.use_fused_kernels`` on CUDA)
  never holds them: its chunk of at most 1 GiB of logits and an fp32 gradient of the output weight instead.

Recompute (``parallel.recompute``): ``selective`` recomputes the core attention (keeps q, k, v, drops its output
and log-sum-exp); ``full`` keeps each layer's input only and recomputes one layer at a time in the backward pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from cookbook.config import CookbookConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
FUSED_LOSS_CHUNK = 1 << 30  # kernels/grpo_loss.py CHUNK_BYTES: logits per chunk of the fused loss


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch as a trainer rank sees it."""

    tokens: int  # on this rank: the micro-batch's tokens divided over the context-parallel ranks
    count: int  # micro-batches per data-parallel rank in one optimizer step (the pipeline fills with these)
    positions: int  # distinct rope positions (a padded batch shares one table over its rows)


def sample_tokens(cfg: CookbookConfig) -> int:
    """The longest sample the loop can make: the prompt limit plus the response limit."""
    return cfg.grpo.max_prompt_length + cfg.grpo.max_response_length


def microbatch(cfg: CookbookConfig, tokens_per_sample: int | None = None) -> MicroBatch:
    """Tokens per micro-batch and micro-batches per optimizer step. Packed: ``grpo.micro_batch_size`` rows of
    at most ``grpo.packing_max_tokens`` (rows hold whole samples: with samples of ``tokens_per_sample`` a row
    has as many as fit, else the worst case is a full row); padded: ``micro_batch_size`` samples of the longest
    length (a multiple of TP for sequence parallelism)."""
    g, p = cfg.grpo, cfg.parallel
    per_sample = tokens_per_sample or sample_tokens(cfg)
    dp = max(1, cfg.world_size // (p.tensor * p.pipeline * p.context))
    samples = g.prompts_per_step * g.samples_per_prompt // g.num_minibatches
    if g.sequence_packing:
        row = g.packing_max_tokens
        if tokens_per_sample:  # rows of equal samples: as many whole samples as fit
            row = max(1, row // per_sample) * per_sample if per_sample <= row else per_sample
        rows = math.ceil(samples / max(1, row // per_sample)) if per_sample <= row else samples
        count = math.ceil(math.ceil(rows / dp) / g.micro_batch_size)
        tokens = row * g.micro_batch_size
        return MicroBatch(math.ceil(tokens / p.context), max(1, count), math.ceil(tokens / p.context))
    length = -(-per_sample // p.tensor) * p.tensor
    count = max(1, samples // dp // g.micro_batch_size)
    return MicroBatch(g.micro_batch_size * length, count, length)


def attention_bytes(cfg: CookbookConfig, mb: MicroBatch, recompute: str) -> dict[str, float]:
    """Saved bytes of one MLA attention block for one micro-batch (norm before it included)."""
    m, p = cfg.model, cfg.parallel
    a, t, T = DTYPE_BYTES[m.params_dtype], p.tensor, mb.tokens
    n, dq, dv = m.num_attention_heads / t, m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    h, kv, r = m.hidden_size, m.kv_lora_rank, m.qk_rope_head_dim
    norm = (2 * a * h + 4) / t  # RMSNorm input + rstd, and the projections' (shared) input
    latent = (a * (kv + r if t == 1 else kv) + 4 + a * kv) / t  # kv_layernorm in (a split view when TP = 1)
    if m.q_lora_rank:
        latent += (2 * a * m.q_lora_rank + 4) / t
    keys = n * a * (dq + dv) * p.context  # CP all-gathers the keys and values of the whole row
    core = n * a * dq + keys + (n * a * dv + 4 * n if recompute == "none" else 0)
    return {"attention": T * (norm + latent + n * a * dv) + mb.positions * 16 * r,
            "core attention": T * core}


def mlp_bytes(cfg: CookbookConfig, mb: MicroBatch, moe: bool) -> dict[str, float]:
    """Saved bytes of one dense MLP or MoE block for one micro-batch (its RMSNorm included)."""
    m, p, moe_cfg = cfg.model, cfg.parallel, cfg.moe
    a, t, T, h = DTYPE_BYTES[m.params_dtype], p.tensor, mb.tokens, m.hidden_size
    norm = (2 * a * h + 4) / t
    if not moe:
        return {"dense MLP": T * (norm + 5 * a * m.ffn_hidden_size / t)}
    k, e = m.moe_router_topk, m.num_experts
    # scores, top-k indices / probabilities, the routing map and its probabilities (fp32), an fp32 input copy
    router = (9 * e + 20 * k + 4 + (4 * h if moe_cfg.router_dtype == "fp32" and a != 4 else 0)) / t
    shared = 5 * a * m.moe_ffn_hidden_size * m.num_shared_experts / t
    copies = k * p.expert_tensor / t  # routed copies this rank's experts process, per token of the micro-batch
    routed = copies * (a * h + 6 * a * m.moe_ffn_hidden_size / p.expert_tensor + 4)
    return {"router and shared experts": T * (norm + router + shared), "routed experts": T * routed}


def layer_bytes(cfg: CookbookConfig, mb: MicroBatch, moe: bool, recompute: str | None = None) -> dict[str, float]:
    """One decoder layer's saved bytes for one micro-batch, by component, under the recompute setting."""
    recompute = recompute or cfg.parallel.recompute
    if recompute == "full":  # the checkpoint keeps the layer's input hidden states only
        m = cfg.model
        return {"layer inputs (full recompute)": mb.tokens * DTYPE_BYTES[m.params_dtype] * m.hidden_size
                / cfg.parallel.tensor}
    return attention_bytes(cfg, mb, recompute) | mlp_bytes(cfg, mb, moe)


def dispatch_bytes(cfg: CookbookConfig, mb: MicroBatch) -> float:
    """The MoE dispatcher's send buffer of one layer in flight (each token's ``topk`` copies of its hidden
    state before the all-to-all), and its gradient in the backward pass."""
    m = cfg.model
    return 2 * mb.tokens * m.moe_router_topk * m.hidden_size * DTYPE_BYTES[m.params_dtype] / cfg.parallel.tensor


def logits_bytes(cfg: CookbookConfig, mb: MicroBatch, fused: bool = False) -> float:
    """The last stage's log-prob computation at its peak: ``a + 20`` bytes per ``[token, vocab / TP]`` logit
    (``cookbook.megatron.parallel.vocab_parallel_logprobs``); the fused loss holds one chunk of logits and an
    fp32 gradient of the output weight instead (under TP both of the rank's ``vocab / TP`` share: the kernel is
    vocabulary-parallel)."""
    m = cfg.model
    a, vocab = DTYPE_BYTES[m.params_dtype], m.vocab_size / cfg.parallel.tensor
    if fused:
        chunk = min(FUSED_LOSS_CHUNK, mb.tokens * vocab * a)
        return chunk + (4 * vocab * m.hidden_size if chunk == FUSED_LOSS_CHUNK else 0)
    return mb.tokens * vocab * (a + 20)
