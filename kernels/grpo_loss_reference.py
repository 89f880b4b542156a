"""Torch reference for the fused GRPO loss kernels (``kernels/grpo_loss.py``).

Plain autograd, computed in fp32 (fp64 when the inputs are fp64), full ``[N, V]`` logits: this is what the
kernels are tested against and what the public functions fall back to on CPU. The formulas are written out
the way ``cookbook.grpo.algorithm.token_logprobs`` / ``policy_loss`` write them (same ops, so the same
gradient conventions at ties: ``torch.maximum`` splits, ``clamp`` passes the gradient at its bound), with
``token_mean`` aggregation over flat ``[N]`` tokens. Imports only torch, so it runs where the cookbook's
engine is not installed.

Vocabulary-parallel (``vocab_shard``, a ``VocabShard``): each tensor-parallel rank holds rows
``[start, start + V_local)`` of the output layer, as Megatron's ColumnParallelLinear shards it. The row max is
all-reduced (max), then the shifted sum of exponentials, the sum for the entropy and the target's logit (0 on the
ranks that do not hold it) are all-reduced (sum): every rank gets the same loss, log-probs and entropies. The
gradient of ``hidden`` that a rank gets is its shard's part (what ``dlogits_local @ W_local`` gives): summing it
over the ranks is the caller's job, as ColumnParallelLinear's backward does for its input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
AllReduce = Callable[[torch.Tensor, str], None]  # in place over the ranks of one vocabulary; op "max" or "sum"


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows ``[start, start + weight.shape[0])`` of the vocabulary and the in-place all-reduce
    (``all_reduce(tensor, "max" | "sum")``) over the ranks that hold the other rows. A callable rather than a
    process group so that a single-GPU check can combine shards computed in threads of one process."""

    start: int
    all_reduce: AllReduce

    @classmethod
    def of_group(cls, group: "torch.distributed.ProcessGroup", rows: int) -> "VocabShard":
        """Megatron's layout: rank r of ``group`` holds rows ``[r * rows, (r + 1) * rows)``."""
        import torch.distributed as dist

        ops = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
        return cls(dist.get_rank(group) * rows, lambda t, op: dist.all_reduce(t, op=ops[op], group=group))

    def local_targets(self, targets: torch.Tensor, rows: int) -> torch.Tensor:
        """Target ids relative to this shard; -1 where another rank holds the target."""
        local = targets.long() - self.start
        return torch.where((local >= 0) & (local < rows), local, torch.full_like(local, -1))


class _SumOverShards(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward: each rank's loss is the same function of every shard, so
    each rank's share of the gradient flows back through its own summand (Megatron's
    ``reduce_from_tensor_model_parallel_region``)."""

    @staticmethod
    def forward(ctx, x, all_reduce):
        out = x.clone()
        all_reduce(out, "sum")
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def check_args(n: int, targets, old_logp, advantages, mask, ref_logp, is_weights, *, temperature: float,
               normalizer: float, kl_coef: float, kl_estimator: str, aggregation: str,
               entropy_coef: float) -> None:
    """Shared validation (the kernels raise the same errors as the reference)."""
    if aggregation != "token_mean":
        raise ValueError(f"loss aggregation {aggregation!r}: the fused GRPO loss supports only 'token_mean' "
                         "(use cookbook.grpo.algorithm.policy_loss for 'seq_mean')")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator {kl_estimator!r}: choose one of {KL_ESTIMATORS}")
    if not temperature > 0:
        raise ValueError(f"temperature {temperature}: must be > 0")
    if not normalizer > 0:
        raise ValueError(f"normalizer {normalizer}: must be > 0 (valid tokens of the global batch)")
    if kl_coef and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp (the reference model's log-probs)")
    for name, t in (("targets", targets), ("old_logp", old_logp), ("advantages", advantages), ("mask", mask),
                    ("ref_logp", ref_logp), ("is_weights", is_weights)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}: expected [{n}] (one per token, flattened)")


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def per_token_loss_reference(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                             mask: torch.Tensor, *, clip_low: float, clip_high: float,
                             logratio_clamp: Optional[float], loss_cap: Optional[float],
                             ref_logp: Optional[torch.Tensor], kl_coef: float, kl_estimator: str,
                             is_weights: Optional[torch.Tensor], entropy: Optional[torch.Tensor],
                             entropy_coef: float) -> torch.Tensor:
    """Masked per-token GRPO loss (before the sum / normalizer), differentiable in ``logp`` (and entropy)."""
    dt = logp.dtype
    adv = advantages.to(dt)
    log_ratio = logp - old_logp.to(dt)
    if logratio_clamp is not None:
        log_ratio = log_ratio.clamp(max=logratio_clamp)
    ratio = torch.exp(log_ratio)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    if loss_cap is not None:
        pg = pg.clamp(max=loss_cap)
    per_token = pg if is_weights is None else pg * is_weights.detach().to(dt)
    if kl_coef:
        d = ref_logp.to(dt) - logp
        kl = -d if kl_estimator == "k1" else (0.5 * d ** 2 if kl_estimator == "k2" else torch.exp(d) - d - 1)
        per_token = per_token + kl_coef * kl
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy
    return torch.where(mask.bool(), per_token, torch.zeros((), dtype=dt))


def _vocab_parallel_logp_entropy(scaled: torch.Tensor, targets: torch.Tensor, shard: VocabShard
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-prob and entropy from this rank's columns of the temperature-scaled logits."""
    with torch.no_grad():
        shift = scaled.max(dim=-1).values
        shard.all_reduce(shift, "max")
    z = scaled - shift.unsqueeze(-1)
    e = z.exp()
    local = shard.local_targets(targets, scaled.shape[-1])
    owned = local >= 0
    z_target = torch.where(owned, z.gather(-1, local.clamp(min=0).unsqueeze(-1)).squeeze(-1),
                           torch.zeros((), dtype=z.dtype))
    sum_e, sum_ez, z_target = _SumOverShards.apply(torch.stack([e.sum(-1), (e * z).sum(-1), z_target]),
                                                   shard.all_reduce)
    lse = sum_e.log()
    return z_target - lse, lse - sum_ez / sum_e


def grpo_loss_from_logits_reference(logits: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor,
                                    advantages: torch.Tensor, mask: torch.Tensor, *, temperature: float = 1.0,
                                    clip_low: float = 0.2, clip_high: float = 0.2,
                                    logratio_clamp: Optional[float] = 10.0, loss_cap: Optional[float] = 3.0,
                                    normalizer: float, ref_logp: Optional[torch.Tensor] = None,
                                    kl_coef: float = 0.0, kl_estimator: str = "k3",
                                    is_weights: Optional[torch.Tensor] = None, entropy_coef: float = 0.0,
                                    aggregation: str = "token_mean", vocab_shard: Optional[VocabShard] = None
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logp [N], entropy [N]) from logits ``[N, V]``, or with ``vocab_shard`` from this rank's columns
    ``[N, V_local]`` of them; autograd gives d loss / d logits.

    logp and entropy come back detached (fp32, or fp64 for fp64 logits); with ``entropy_coef`` the
    entropy term is part of the loss and its gradient flows.
    """
    n = logits.shape[0]
    check_args(n, targets, old_logp, advantages, mask, ref_logp, is_weights, temperature=temperature,
               normalizer=normalizer, kl_coef=kl_coef, kl_estimator=kl_estimator, aggregation=aggregation,
               entropy_coef=entropy_coef)
    dt = _compute_dtype(logits)
    if vocab_shard is None:
        logp_all = torch.log_softmax(logits.to(dt) / temperature, dim=-1)
        logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    else:
        logp, entropy = _vocab_parallel_logp_entropy(logits.to(dt) / temperature, targets, vocab_shard)
    per_token = per_token_loss_reference(
        logp, old_logp, advantages, mask, clip_low=clip_low, clip_high=clip_high, logratio_clamp=logratio_clamp,
        loss_cap=loss_cap, ref_logp=ref_logp, kl_coef=kl_coef, kl_estimator=kl_estimator, is_weights=is_weights,
        entropy=entropy, entropy_coef=entropy_coef)
    loss = per_token.sum() / normalizer
    return loss, logp.detach(), entropy.detach()


def fused_linear_grpo_loss_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                     old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                                     **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logp, entropy) from hidden ``[N, H]`` and the output layer's weight ``[V, H]`` (with
    ``vocab_shard`` in the kwargs: this rank's rows ``[V_local, H]``).

    The logits are ``hidden @ weight.T`` computed in fp32 (fp64 for fp64 inputs), materialized in full:
    fine for tests and the CPU trainer, not for real vocabularies on a GPU (that is what the kernel is for).
    Gradients reach ``hidden`` and ``weight`` in their own dtypes through autograd.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}: expected [N, H] and [V, H]")
    dt = _compute_dtype(hidden, weight)
    logits = hidden.to(dt) @ weight.to(dt).t()
    return grpo_loss_from_logits_reference(logits, targets, old_logp, advantages, mask, **kwargs)
