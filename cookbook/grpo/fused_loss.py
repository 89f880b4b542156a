"""The trainer's fused GPU loss (``grpo.use_fused_kernels``): the GRPO loss straight from the last hidden
states and the output layer's weight, without ever holding ``[tokens, vocab]`` logits.

At Moonlight's vocabulary (163840) a 16k-token micro-batch has 5 GiB of bf16 logits, and the unfused
fp32 log-softmax plus its backward need about 30 GiB more; ``kernels.grpo_loss.fused_linear_grpo_loss``
needs about 2 GiB (BENCHMARKS.md). Megatron's GPTModel applies its output layer inside ``forward``, so
``hidden_states_instead_of_logits`` makes that layer hand back its input for one call (the parallel step does
this on the last pipeline stage when the switch is on); the kernel then does the output projection,
log-probs, entropy, loss and both gradients. The metrics are the same as the
unfused path's (``algorithm.policy_loss`` run on the kernel's detached log-probs).

Under tensor parallelism the output layer holds ``vocab / TP`` rows of the weight on each rank: the kernel
all-reduces each chunk's row statistics over the TP group (``kernels.grpo_loss.VocabShard``), and the captured
hidden states go through what ColumnParallelLinear does to its input (the sequence all-gather under sequence
parallelism, the TP copy otherwise), so the input's gradient is summed over the TP ranks as in the unfused layer.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from cookbook.config import ConfigError, CookbookConfig
from cookbook.grpo import algorithm as A


def fused_loss_enabled(cfg: CookbookConfig) -> bool:
    """Whether the trainer takes the fused path: the switch is on and the policy runs on CUDA.

    Raises for settings the kernel does not cover, so the switch never silently means "unfused".
    """
    from cookbook.megatron.model import use_cuda

    g = cfg.grpo
    if g.use_fused_kernels:
        refuse_unfused_options(g)
    if not (g.use_fused_kernels and use_cuda(cfg)):
        return False
    if g.loss_aggregation != "token_mean":
        raise ConfigError(f"grpo.loss_aggregation={g.loss_aggregation!r} with grpo.use_fused_kernels=true: the "
                          "fused loss supports only 'token_mean'; set one of the two differently")
    return True


def refuse_unfused_options(g) -> None:
    """Raise ConfigError for a loss option of ``g`` (a ``GRPOConfig``) that the kernel does not compute.

    The kernel computes ``policy_loss`` (token-level PPO-clip) per token; GSPO's sequence-level ratio needs sums
    over each sequence's tokens, which it has not. The importance corrections need nothing: TIS weights and the
    token / sequence masks reach the kernel as per-token ``is_weights`` (0 or 1 for a mask), which it multiplies
    into the clipped loss and its gradient, as ``policy_loss`` does."""
    if g.policy_loss != "ppo":
        raise ConfigError(f"grpo.policy_loss={g.policy_loss!r} with grpo.use_fused_kernels=true: the fused kernel "
                          "computes only the token-level PPO-clip loss ('ppo'); set grpo.use_fused_kernels=false or "
                          "grpo.policy_loss=ppo")


class _Captured:
    weight: Optional[torch.Tensor] = None


def _output_layer_input(layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
    """The output layer's input as ColumnParallelLinear prepares it for its matmul: all-gathered over the
    sequence under sequence parallelism (backward: reduce-scatter), else copied into the TP region (backward:
    all-reduce; nothing at TP 1). The kernel's hidden-state gradient is one vocabulary shard's part; these
    backward passes sum it over the TP ranks, as they do for the unfused layer."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

    if layer.sequence_parallel:
        return gather_from_sequence_parallel_region(input_, group=layer.tp_group)
    return copy_to_tensor_model_parallel_region(input_, group=layer.tp_group)


@contextlib.contextmanager
def hidden_states_instead_of_logits(model: torch.nn.Module) -> Iterator[_Captured]:
    """Inside the block, ``model(...)`` returns the final hidden states ``[b, s, hidden]`` (the whole sequence,
    also under sequence parallelism) instead of the logits, and the output layer's weight (its own, or the tied
    embedding; under TP this rank's vocabulary rows) is captured for the kernel."""
    layer = model.output_layer
    captured = _Captured()

    def passthrough(input_, weight=None, runtime_gather_output=None):
        captured.weight = layer.weight if weight is None else weight
        return _output_layer_input(layer, input_), None

    layer.forward = passthrough
    try:
        yield captured
    finally:
        del layer.forward  # back to the class's forward


def fused_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor, old_logp: torch.Tensor,
                      advantages: torch.Tensor, mask: torch.Tensor, *, g, normalizer: float,
                      ref_logp: Optional[torch.Tensor] = None, is_weights: Optional[torch.Tensor] = None,
                      tp_group: Optional[torch.distributed.ProcessGroup] = None) -> A.LossOutput:
    """The GRPO loss of one micro-batch through the fused kernel, from the final hidden states ``[B, T, H]``
    and the output weight (``hidden_states_instead_of_logits``); the other arguments and the result are those
    of ``algorithm.policy_loss`` (``[B, T-1]`` tensors aligned with ``input_ids[:, 1:]``, advantages ``[B]``),
    with ``g`` the ``GRPOConfig``. ``tp_group``: the tensor-parallel group over which the output layer splits
    the vocabulary (``weight`` is then this rank's rows), or None for the whole vocabulary here."""
    from kernels.grpo_loss import VocabShard, fused_linear_grpo_loss

    refuse_unfused_options(g)
    tokens = hidden[:, :-1]
    mask = mask.bool()
    per_token_adv = advantages.to(torch.float32).unsqueeze(-1).expand_as(old_logp)

    def flat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.reshape(-1).to(hidden.device)

    settings = A.loss_settings(g)
    shard = VocabShard.of_group(tp_group, weight.shape[0]) if tp_group is not None and tp_group.size() > 1 else None
    loss, logp, entropy = fused_linear_grpo_loss(
        tokens.reshape(-1, tokens.shape[-1]), weight, flat(input_ids[:, 1:]), flat(old_logp),
        flat(per_token_adv), flat(mask), temperature=g.temperature, normalizer=normalizer,
        ref_logp=flat(ref_logp), is_weights=flat(is_weights), vocab_shard=shard, **settings)
    with torch.no_grad():  # the metrics of the unfused path, from the kernel's log-probs
        logp, entropy = logp.view_as(old_logp).to(old_logp.device), entropy.view_as(old_logp).to(old_logp.device)
        metrics = A.policy_loss(logp, old_logp, advantages, mask, normalizer=normalizer, ref_logp=ref_logp,
                                is_weights=is_weights, entropy=entropy, **settings)
    return A.LossOutput(loss, metrics.metrics, metrics.num_tokens)
