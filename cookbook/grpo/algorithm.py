"""GRPO, written out: group-normalized advantages, the clipped policy loss with the reference's
safeguards, KL estimators, and the rollout-vs-trainer mismatch measures.

Semantics follow the reference recipe (shared/reference/recipe-facts.md): advantage
(r - mean) / (std + 1e-5) within each prompt's group; PPO-clip with separate low/high ratios; the
log-ratio clamped at 10 before exp; the per-token loss capped at 3; token-level mean over the global
batch; a k3 KL computed and logged with coefficient 0. kernels/ holds a fused GPU version of the same
loss; this module is the readable reference the engine runs on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch


def group_advantages(rewards: Sequence[float] | np.ndarray | torch.Tensor, n: int, method: str = "grpo",
                     eps: float = 1e-5) -> torch.Tensor:
    """Per-sample advantage from the rewards of its prompt's ``n`` samples (consecutive in ``rewards``).

    ``grpo``: (r - mean) / (std + eps), with the unbiased std (torch's default, as ChatLearn and verl
    use); a group whose samples all score the same gets 0. ``drgrpo`` (Dr. GRPO): r - mean, no std
    scaling, which removes the bias toward low-variance (too easy or too hard) prompts.
    """
    r = torch.as_tensor(np.asarray(rewards, dtype=np.float32)).reshape(-1, n)
    centered = r - r.mean(dim=1, keepdim=True)
    if method == "drgrpo":
        return centered.reshape(-1)
    if method != "grpo":
        raise ValueError(f"advantage method {method!r}: choose grpo or drgrpo")
    std = r.std(dim=1, keepdim=True) if n > 1 else torch.zeros_like(r[:, :1])
    return (centered / (std + eps)).reshape(-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 log-prob of each target token and the entropy of each position's distribution."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimators of KL(pi || ref) from samples of pi (Schulman's k1/k2/k3)."""
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"KL estimator {kind!r}: choose k1, k2 or k3")


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float]


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, normalizer: float, aggregation: str) -> torch.Tensor:
    if aggregation == "token_mean":  # sum over this micro-batch's tokens / tokens of the whole global batch
        return (per_token * mask).sum() / normalizer
    if aggregation == "seq_mean":  # mean within each sequence, summed / sequences of the global batch
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / normalizer
    raise ValueError(f"loss aggregation {aggregation!r}: choose token_mean or seq_mean")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip_low: float = 0.2, clip_high: float = 0.2, logratio_clamp: Optional[float] = 10.0,
                loss_cap: Optional[float] = 3.0, normalizer: float, aggregation: str = "token_mean",
                ref_logp: Optional[torch.Tensor] = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                is_weights: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None,
                entropy_coef: float = 0.0) -> LossOutput:
    """The GRPO loss of one micro-batch ``[B, T]`` plus detached metrics (means over its valid tokens).

    Micro-batches of one optimizer step share ``normalizer`` (valid tokens, or sequences for
    ``seq_mean``, of the whole step), so their losses add up to the full-batch loss exactly.
    """
    mask = mask.to(logp.dtype)
    adv = advantages if advantages.dim() == logp.dim() else advantages.unsqueeze(-1)
    log_ratio = logp - old_logp
    if logratio_clamp is not None:
        log_ratio = log_ratio.clamp(max=logratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    capped = torch.zeros_like(per_token, dtype=torch.bool)
    if loss_cap is not None:
        capped = per_token > loss_cap
        per_token = per_token.clamp(max=loss_cap)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    kl = kl_estimate(logp, ref_logp, kl_estimator) if ref_logp is not None else None
    if kl is not None and kl_coef:
        per_token = per_token + kl_coef * kl
    if entropy is not None and entropy_coef:
        per_token = per_token - entropy_coef * entropy
    loss = _aggregate(per_token, mask, normalizer, aggregation)

    with torch.no_grad():
        n = mask.sum().clamp(min=1)

        def mean(x: torch.Tensor) -> float:
            return float((x.float() * mask).sum() / n)

        metrics = {
            "pg_loss": mean(torch.maximum(unclipped, clipped)),
            "ratio_mean": mean(ratio),
            "clip_frac_low": mean((ratio < 1 - clip_low) & (adv < 0)),
            "clip_frac_high": mean((ratio > 1 + clip_high) & (adv > 0)),
            "capped_frac": mean(capped),
        }
        if kl is not None:
            metrics["kl"] = mean(kl)
        if entropy is not None:
            metrics["entropy"] = mean(entropy)
    return LossOutput(loss, metrics)


def tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(pi_trainer / pi_rollout, cap) per token (detached).

    Off by default (the reference has none): vLLM and Megatron disagree on MoE routing for a share of
    tokens, so samples drawn by the rollout engine are slightly off-policy for the trainer; TIS
    reweights them without letting rare large ratios blow up the gradient.
    """
    return (torch.exp(old_logp - rollout_logp).clamp(max=cap) * mask).detach()


def mismatch_metrics(trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                     threshold: float) -> dict[str, float]:
    """How far the rollout engine's log-probs are from the trainer's on the sampled tokens."""
    m = mask.bool()
    if not m.any():
        return {"abs_diff_mean": 0.0, "abs_diff_max": 0.0, "kl_k3": 0.0, "frac_over_threshold": 0.0}
    diff = (trainer_logp - rollout_logp)[m]
    return {
        "abs_diff_mean": float(diff.abs().mean()),
        "abs_diff_max": float(diff.abs().max()),
        "kl_k3": float(kl_estimate(rollout_logp[m], trainer_logp[m], "k3").mean()),
        "frac_over_threshold": float((diff.abs() > threshold).float().mean()),
    }


def build_training_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids = prompt + response``, the loss mask and position ids.

    The log-prob at column t scores token t + 1 (logits at t predict the next token), so the mask has
    one column fewer than ``input_ids``: ``mask[:, t]`` is 1 when ``input_ids[:, t + 1]`` is a response
    token.
    """
    length = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    ids = torch.full((len(prompt_ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), length - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, :len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        mask[i, len(p) - 1:len(p) + len(r) - 1] = 1.0
    positions = torch.arange(length).unsqueeze(0).expand(len(prompt_ids), -1).contiguous()
    return ids, mask, positions


def align_rollout_logprobs(prompt_ids: Sequence[Sequence[int]], rollout_logp: Sequence[Sequence[float]],
                           mask: torch.Tensor) -> torch.Tensor:
    """The rollout engine's per-response-token log-probs placed in the trainer's ``[B, L-1]`` layout."""
    out = torch.zeros_like(mask)
    for i, (p, lp) in enumerate(zip(prompt_ids, rollout_logp)):
        out[i, len(p) - 1:len(p) - 1 + len(lp)] = torch.tensor(lp, dtype=out.dtype)
    return out


def split_minibatches(n: int, num_minibatches: int, seed: int) -> list[torch.Tensor]:
    """A seeded shuffle of ``range(n)`` cut into ``num_minibatches`` equal parts (one optimizer step each)."""
    if n % num_minibatches:
        raise ValueError(f"{n} samples do not split into {num_minibatches} equal minibatches")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(order.chunk(num_minibatches))
