"""Torch reference for the fused GRPO loss kernels (``kernels/grpo_loss.py``).

Plain autograd, computed in fp32 (fp64 when the inputs are fp64), full ``[N, V]`` logits: this is what the
kernels are tested against and what the public functions fall back to on CPU. The formulas are written out
the way ``cookbook.grpo.algorithm.token_logprobs`` / ``policy_loss`` write them (same ops, so the same
gradient conventions at ties: ``torch.maximum`` splits, ``clamp`` passes the gradient at its bound), with
``token_mean`` aggregation over flat ``[N]`` tokens. Imports only torch, so it runs where the cookbook's
engine is not installed.
"""
from __future__ import annotations

from typing import Optional

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


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


def grpo_loss_from_logits_reference(logits: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor,
                                    advantages: torch.Tensor, mask: torch.Tensor, *, temperature: float = 1.0,
                                    clip_low: float = 0.2, clip_high: float = 0.2,
                                    logratio_clamp: Optional[float] = 10.0, loss_cap: Optional[float] = 3.0,
                                    normalizer: float, ref_logp: Optional[torch.Tensor] = None,
                                    kl_coef: float = 0.0, kl_estimator: str = "k3",
                                    is_weights: Optional[torch.Tensor] = None, entropy_coef: float = 0.0,
                                    aggregation: str = "token_mean"
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logp [N], entropy [N]) from logits ``[N, V]``; autograd gives d loss / d logits.

    logp and entropy come back detached (fp32, or fp64 for fp64 logits); with ``entropy_coef`` the
    entropy term is part of the loss and its gradient flows.
    """
    n = logits.shape[0]
    check_args(n, targets, old_logp, advantages, mask, ref_logp, is_weights, temperature=temperature,
               normalizer=normalizer, kl_coef=kl_coef, kl_estimator=kl_estimator, aggregation=aggregation,
               entropy_coef=entropy_coef)
    dt = _compute_dtype(logits)
    logp_all = torch.log_softmax(logits.to(dt) / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    per_token = per_token_loss_reference(
        logp, old_logp, advantages, mask, clip_low=clip_low, clip_high=clip_high, logratio_clamp=logratio_clamp,
        loss_cap=loss_cap, ref_logp=ref_logp, kl_coef=kl_coef, kl_estimator=kl_estimator, is_weights=is_weights,
        entropy=entropy, entropy_coef=entropy_coef)
    loss = per_token.sum() / normalizer
    return loss, logp.detach(), entropy.detach()


def fused_linear_grpo_loss_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                     old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                                     **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logp, entropy) from hidden ``[N, H]`` and the output layer's weight ``[V, H]``.

    The logits are ``hidden @ weight.T`` computed in fp32 (fp64 for fp64 inputs), materialized in full:
    fine for tests and the CPU trainer, not for real vocabularies on a GPU (that is what the kernel is for).
    Gradients reach ``hidden`` and ``weight`` in their own dtypes through autograd.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}: expected [N, H] and [V, H]")
    dt = _compute_dtype(hidden, weight)
    logits = hidden.to(dt) @ weight.to(dt).t()
    return grpo_loss_from_logits_reference(logits, targets, old_logp, advantages, mask, **kwargs)
