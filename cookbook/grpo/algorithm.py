"""GRPO, written out: group-normalized advantages, the clipped policy loss with the reference's
safeguards, KL estimators, the rollout-vs-trainer mismatch measures and the batch layout.

Semantics follow the reference recipe (shared/reference/recipe-facts.md): advantage
(r - mean) / (std + 1e-5) within each prompt's group; PPO-clip with separate low/high ratios; the
log-ratio clamped at 10 before exp; the per-token loss capped at 3; token-level mean over the global
batch; a k3 KL computed and logged with coefficient 0. ``kernels/grpo_loss.py`` holds a fused GPU
version of the same loss; this module is the readable one the engine runs by default and the source of
truth the kernel is tested against. Pure torch: importing it pulls in no engine.

Beyond the reference, as options: GSPO's sequence-level ratio and clip (``gspo_loss``, ``grpo.policy_loss``) and
corrections for the rollout engine's mismatch (``importance_weights``, ``grpo.importance_correction``): token
TIS, token masking outside [low, high] (IcePop) and sequence masking on the geometric-mean ratio (seq-mask-TIS /
MIS), passed to the loss as per-token weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

AGGREGATIONS = ("token_mean", "seq_mean")
POLICY_LOSSES = ("ppo", "gspo")
IMPORTANCE_CORRECTIONS = ("none", "tis", "token_mask", "seq_mask", "tis+token_mask", "tis+seq_mask")
KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGE_METHODS = ("grpo", "drgrpo")


# -- advantages ---------------------------------------------------------------------------------
def group_advantages(rewards: Union[Sequence[float], torch.Tensor], n: int, method: str = "grpo",
                     eps: float = 1e-5, unbiased_std: bool = False) -> torch.Tensor:
    """Per-sample advantage from the rewards of its prompt's ``n`` samples (GRPO needs no critic).

    ``rewards`` is ``[num_prompts * n]`` (each prompt's samples consecutive) or ``[num_prompts, n]``;
    the result has the same shape, fp32.

    ``grpo``: (r - mean) / (std + eps). The std is the population one (ddof 0) by default because the
    reference (ChatLearn's advantage computer at the tutorial's version) uses ``np.std``; verl and
    ChatLearn before August 2025 use ``torch.std`` (ddof 1), available as ``unbiased_std=True``. For
    n = 32 the two differ by 1.6 %, for n = 8 by 6.5 %. A group whose samples all score the same gets 0.
    ``drgrpo`` (Dr. GRPO): r - mean with no std scaling, which removes the extra weight that std
    scaling gives to nearly-solved and nearly-hopeless prompts.
    """
    if method not in ADVANTAGE_METHODS:
        raise ValueError(f"advantage method {method!r}: choose one of {ADVANTAGE_METHODS} (config key grpo.advantage)")
    r = torch.as_tensor(rewards).to(torch.float32)
    if n < 1 or r.dim() not in (1, 2) or r.numel() % n or (r.dim() == 2 and r.shape[1] != n):
        raise ValueError(f"rewards of shape {tuple(r.shape)} do not form groups of n={n} samples per prompt: "
                         "pass [num_prompts * n] or [num_prompts, n]")
    if unbiased_std and n < 2:
        raise ValueError("unbiased_std needs n >= 2 samples per prompt")
    groups = r.reshape(-1, n)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if method == "grpo":
        centered = centered / (groups.std(dim=1, correction=int(unbiased_std), keepdim=True) + eps)
    return centered.reshape(r.shape)


# -- per-token quantities -------------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 log-prob of each target token and the entropy of each position's distribution.

    ``logits[:, t]`` must already be the logits that predict ``targets[:, t]`` (see
    ``build_training_batch`` for the shift). log_softmax runs in fp32: in bf16 the log-probs of
    likely tokens lose about 2-3 decimal digits, more than the mismatch we want to measure. Dividing by
    the rollout temperature scores samples under the distribution they were drawn from.
    """
    if temperature <= 0:
        raise ValueError(f"temperature {temperature}: must be > 0 (config key grpo.temperature)")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on [B, T]")
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman's k1/k2/k3).

    With d = ref_logp - logp: k1 = -d (unbiased, can be negative), k2 = d^2 / 2 (biased, low variance),
    k3 = e^d - d - 1 (unbiased and >= 0; the reference's choice).
    """
    d = ref_logp - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d ** 2
    if kind == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"KL estimator {kind!r}: choose one of {KL_ESTIMATORS} (config key grpo.kl_estimator)")


# -- the loss -------------------------------------------------------------------------------------
@dataclass
class LossOutput:
    """The loss to backpropagate and detached metrics, each a mean over this micro-batch's valid tokens."""

    loss: torch.Tensor
    metrics: dict[str, float]
    num_tokens: int  # valid tokens behind the metrics, so callers can average micro-batches exactly


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, normalizer: float, aggregation: str) -> torch.Tensor:
    per_token = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype))  # padding never leaks (inf*0)
    if aggregation == "token_mean":  # sum over this micro-batch's tokens / tokens of the whole global batch
        return per_token.sum() / normalizer
    # seq_mean: mean within each sequence, summed / sequences of the whole global batch
    per_seq = per_token.sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.sum() / normalizer


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip_low: float = 0.2, clip_high: float = 0.2, logratio_clamp: Optional[float] = 10.0,
                loss_cap: Optional[float] = 3.0, normalizer: float, aggregation: str = "token_mean",
                ref_logp: Optional[torch.Tensor] = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                is_weights: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None,
                entropy_coef: float = 0.0) -> LossOutput:
    """The GRPO loss of one micro-batch ``[B, T]`` plus detached metrics.

    Per valid token (A = the sequence's advantage, broadcast; or per-token ``[B, T]`` advantages)::

        ratio = exp(min(logp - old_logp, logratio_clamp))          # clamp: no overflow on stale tokens
        pg    = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
        pg    = min(pg, loss_cap)                                  # one token cannot dominate the step
        loss  = pg * is_weights + kl_coef * KL(logp, ref_logp) - entropy_coef * entropy

    then ``token_mean``: sum over tokens / ``normalizer`` (valid tokens of the whole optimizer step) or
    ``seq_mean``: per-sequence token mean, summed / ``normalizer`` (sequences of the whole step). Since
    every micro-batch of a step divides by the same global normalizer, their losses and gradients add
    up exactly to the full-batch ones, however the batch is cut. The KL is computed and logged
    whenever ``ref_logp`` is given, even at ``kl_coef`` 0, as the reference does.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"loss aggregation {aggregation!r}: choose one of {AGGREGATIONS} "
                         "(config key grpo.loss_aggregation)")
    if not normalizer > 0:
        raise ValueError(f"normalizer {normalizer}: must be > 0 (valid tokens or sequences of the global batch)")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp), ("is_weights", is_weights),
                    ("entropy", entropy)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logp has {tuple(logp.shape)}: they must match")
    if kl_coef and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp (the reference model's log-probs)")
    if entropy_coef and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs the per-token entropy")
    mask = mask.bool()
    adv = advantages.to(logp.dtype)
    if adv.shape == logp.shape[:-1]:
        adv = adv.unsqueeze(-1)
    elif adv.shape != logp.shape:
        raise ValueError(f"advantages of shape {tuple(advantages.shape)}: pass one per sequence [B] or per token "
                         f"{tuple(logp.shape)}")

    log_ratio = logp - old_logp
    if logratio_clamp is not None:
        log_ratio = log_ratio.clamp(max=logratio_clamp)
    ratio = torch.exp(log_ratio)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    capped = pg > loss_cap if loss_cap is not None else torch.zeros_like(mask)
    if loss_cap is not None:
        pg = pg.clamp(max=loss_cap)
    per_token = pg if is_weights is None else pg * is_weights.detach()
    kl = kl_estimate(logp, ref_logp, kl_estimator) if ref_logp is not None else None
    if kl_coef:
        per_token = per_token + kl_coef * kl
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy
    loss = _aggregate(per_token, mask, normalizer, aggregation)

    with torch.no_grad():
        count = int(mask.sum())

        def mean(x: torch.Tensor) -> float:
            return float(torch.where(mask, x.float(), 0.0).sum() / max(count, 1))

        metrics = {
            "pg_loss": mean(pg),
            "ratio_mean": mean(ratio),
            "clip_frac_low": mean((ratio < 1 - clip_low) & (adv < 0)),  # tokens whose gradient the clip removed
            "clip_frac_high": mean((ratio > 1 + clip_high) & (adv > 0)),
            "capped_frac": mean(capped),
        }
        if kl is not None:
            metrics["kl"] = mean(kl)
        if entropy is not None:
            metrics["entropy"] = mean(entropy)
        if is_weights is not None:
            metrics["is_weight_mean"] = mean(is_weights)
    return LossOutput(loss, metrics, count)


def gspo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              clip_low: float = 3e-4, clip_high: float = 4e-4, logratio_clamp: Optional[float] = 10.0,
              loss_cap: Optional[float] = 3.0, normalizer: float, aggregation: str = "seq_mean",
              ref_logp: Optional[torch.Tensor] = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
              is_weights: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None,
              entropy_coef: float = 0.0, seq_ids: Optional[torch.Tensor] = None, num_seqs: Optional[int] = None,
              seq_group: Any = None) -> LossOutput:
    """GSPO (Group Sequence Policy Optimization, Zheng et al. 2025; ChatLearn's ``use_group_sequence_policy``):
    the importance ratio and its clip are per sequence, ``grpo.policy_loss=gspo``. Arguments and result as
    ``policy_loss``; ``clip_low`` / ``clip_high`` clip the *sequence* ratio, so they are much smaller than
    PPO's (the paper: 3e-4 / 4e-4; ChatLearn's Qwen3 GSPO script: 1e-3 / 1e-3).

    Per sequence i with response tokens t (A_i its advantage)::

        s_i  = exp(min(mean_t(logp_t - old_logp_t), logratio_clamp))     # geometric mean of the token ratios
        pg_i = min(max(-A_i * s_i, -A_i * clip(s_i, 1 - clip_low, 1 + clip_high)), loss_cap)

    written in GSPO-token form: every token carries s_it = sg[s_i] * pi(y_t) / sg[pi(y_t)], whose value is s_i
    and whose gradient is s_i * grad logp_t, and gets the per-token term pg_it (the formula above with s_it);
    with A_it = A_i (GRPO's advantages) the loss and its gradient are exactly those of the sequence form
    (d s_i = s_i * mean_t d logp_t; a clipped or log-ratio-clamped sequence gets no gradient). The token form is
    used because it lets per-token weights act per token: ``is_weights`` (TIS weights, token or sequence masks)
    multiply pg_it, then the KL and entropy terms are added per token, as in ``policy_loss``.
    Aggregation: ``seq_mean`` (the paper's objective): each sequence's token mean, summed / ``normalizer``
    (sequences of the whole step), so every sequence weighs the same; ``token_mean`` (ChatLearn's GSPO, which
    reuses its GRPO token mean): sum over tokens / ``normalizer`` (tokens of the whole step), i.e. each
    sequence's pg_i weighted by its length. Both are exact under any cut into micro-batches.

    Sequences: by default each row of ``[B, T]`` is one; packed rows pass ``seq_ids`` (the sequence of each
    token, any value where ``mask`` is 0) and ``num_seqs`` (ids are < num_seqs); ``seq_group`` is a process
    group over which each sequence's (log-ratio sum, token count) is all-reduced before use, for sequences
    whose tokens are split over context-parallel ranks (every rank of the group calls this with the same
    ``num_seqs``). Only detached sums cross ranks: the gradient of each token is local.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"loss aggregation {aggregation!r}: choose one of {AGGREGATIONS} "
                         "(config key grpo.loss_aggregation)")
    if not normalizer > 0:
        raise ValueError(f"normalizer {normalizer}: must be > 0 (valid tokens or sequences of the global batch)")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp), ("is_weights", is_weights),
                    ("entropy", entropy), ("seq_ids", seq_ids)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logp has {tuple(logp.shape)}: they must match")
    if kl_coef and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp (the reference model's log-probs)")
    if entropy_coef and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs the per-token entropy")
    mask = mask.bool()
    adv = advantages.to(logp.dtype)
    if adv.shape == logp.shape[:-1]:
        adv = adv.unsqueeze(-1).expand_as(logp)
    elif adv.shape != logp.shape:
        raise ValueError(f"advantages of shape {tuple(advantages.shape)}: pass one per sequence [B] or per token "
                         f"{tuple(logp.shape)}")
    if seq_ids is None:
        seq_ids = torch.arange(logp.shape[0], device=logp.device).unsqueeze(-1).expand_as(logp)
        num_seqs = logp.shape[0] if num_seqs is None else num_seqs
    elif num_seqs is None:
        if seq_group is not None:
            raise ValueError("gspo_loss with seq_group needs num_seqs (the same on every rank of the group)")
        num_seqs = int(seq_ids[mask].max()) + 1 if mask.any() else 1

    # each sequence's mean log-ratio and token count (fp64 sums; all-reduced over the ranks that share it)
    ids = torch.where(mask, seq_ids.to(torch.long), 0).reshape(-1)
    with torch.no_grad():
        diff = torch.where(mask, logp.detach().double() - old_logp.double(), 0.0).reshape(-1)
        stats = torch.zeros(2, num_seqs, dtype=torch.float64, device=logp.device)
        stats[0].index_add_(0, ids, diff)
        stats[1].index_add_(0, ids, mask.reshape(-1).double())
        if seq_group is not None:
            import torch.distributed as dist

            dist.all_reduce(stats, group=seq_group)
        seq_log_ratio = (stats[0] / stats[1].clamp(min=1))[ids].view_as(logp).to(logp.dtype)
        seq_tokens = stats[1].clamp(min=1)[ids].view_as(logp).to(logp.dtype)
        clamped = seq_log_ratio > logratio_clamp if logratio_clamp is not None else torch.zeros_like(mask)
        if logratio_clamp is not None:
            seq_log_ratio = seq_log_ratio.clamp(max=logratio_clamp)
        seq_ratio = torch.exp(seq_log_ratio)
    # s_it: value s_i, gradient s_i * d logp_t (none where the sequence's log-ratio was clamped)
    ratio = seq_ratio * torch.exp(torch.where(clamped, torch.zeros((), dtype=logp.dtype), logp - logp.detach()))
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    capped = pg > loss_cap if loss_cap is not None else torch.zeros_like(mask)
    if loss_cap is not None:
        pg = pg.clamp(max=loss_cap)
    per_token = pg if is_weights is None else pg * is_weights.detach()
    kl = kl_estimate(logp, ref_logp, kl_estimator) if ref_logp is not None else None
    if kl_coef:
        per_token = per_token + kl_coef * kl
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy
    if aggregation == "seq_mean":
        per_token = per_token / seq_tokens
    loss = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype)).sum() / normalizer

    with torch.no_grad():
        count = int(mask.sum())

        def mean(x: torch.Tensor) -> float:
            return float(torch.where(mask, x.float(), 0.0).sum() / max(count, 1))

        token_log_ratio = logp - old_logp
        if logratio_clamp is not None:
            token_log_ratio = token_log_ratio.clamp(max=logratio_clamp)
        low = (seq_ratio < 1 - clip_low) & (adv < 0)  # sequences whose gradient the clip removed
        high = (seq_ratio > 1 + clip_high) & (adv > 0)
        metrics = {
            "pg_loss": mean(pg),
            "ratio_mean": mean(torch.exp(token_log_ratio)),  # the token ratios, as policy_loss reports them
            "seq_ratio_mean": mean(seq_ratio),
            "seq_clip_frac_low": mean(low),
            "seq_clip_frac_high": mean(high),
            "seq_clip_frac": mean(low | high),
            "capped_frac": mean(capped),
        }
        if kl is not None:
            metrics["kl"] = mean(kl)
        if entropy is not None:
            metrics["entropy"] = mean(entropy)
        if is_weights is not None:
            metrics["is_weight_mean"] = mean(is_weights)
    return LossOutput(loss, metrics, count)


def loss_settings(g) -> dict:
    """The loss keywords of ``policy_loss`` (and of the fused kernel, which takes the same) from a
    ``GRPOConfig``, so every trainer path computes the loss the config asks for."""
    return dict(clip_low=g.clip_low, clip_high=g.clip_high, logratio_clamp=g.logratio_clamp, loss_cap=g.loss_cap,
                aggregation=g.loss_aggregation, kl_coef=g.kl_coef, kl_estimator=g.kl_estimator,
                entropy_coef=g.entropy_coef)


# -- rollout vs trainer -----------------------------------------------------------------------------
def tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(pi_trainer / pi_rollout, cap) per token, detached, 0 on padding.

    Off by default (the reference has none). vLLM and Megatron compute the same policy differently
    (kernels, precision, and for MoE a different expert choice on a share of tokens), so samples drawn
    by the rollout engine are slightly off-policy for the trainer; the weight corrects for that, and the
    cap keeps rare huge ratios from blowing up the gradient's variance.
    """
    if cap <= 0:
        raise ValueError(f"importance cap {cap}: must be > 0 (config key grpo.importance_cap)")
    w = torch.exp(old_logp - rollout_logp).clamp(max=cap)
    return torch.where(mask.bool(), w, 0.0).detach()


def sequence_log_ratio(logp: torch.Tensor, other_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row ``[B]`` (fp64): the mean over its response tokens of ``logp - other_logp``, the log of the
    geometric mean of the token ratios; 0 for a row without response tokens."""
    m = mask.bool()
    diff = torch.where(m, logp.double() - other_logp.double(), 0.0)
    return diff.sum(-1) / m.sum(-1).clamp(min=1)


def _check_bounds(low: Optional[float], high: Optional[float]) -> None:
    if low is None or high is None or not 0 < low < 1 < high:
        raise ValueError(f"importance bounds low={low}, high={high}: need 0 < low < 1 < high (config keys "
                         "grpo.importance_low, grpo.importance_high)")


def importance_mask(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, low: float,
                    high: float, level: str) -> torch.Tensor:
    """1 where a response token is kept, 0 where the correction drops it and on padding (``old_logp``'s dtype).

    ``token`` (IcePop): drop the token whose ratio pi_trainer_old / pi_rollout is outside [low, high].
    ``seq`` (seq-mask-TIS / MIS): drop every token of a sequence whose geometric-mean ratio
    r_seq = exp(mean over its response tokens of (log pi_trainer_old - log pi_rollout)) is outside [low, high].
    The bounds are inclusive; compared in log space (fp64), so a -inf rollout log-prob or a NaN is dropped.
    """
    _check_bounds(low, high)
    m = mask.bool()
    if level == "token":
        log_ratio = old_logp.double() - rollout_logp.double()
    elif level == "seq":
        log_ratio = sequence_log_ratio(old_logp, rollout_logp, mask).unsqueeze(-1).expand(m.shape)
    else:
        raise ValueError(f"importance mask level {level!r}: 'token' or 'seq'")
    keep = m & (log_ratio >= math.log(low)) & (log_ratio <= math.log(high))
    return keep.to(old_logp.dtype)


def masking_metrics(keep: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """What a mask from ``importance_mask`` drops, over the batch it was computed on: ``masked_token_frac``
    (response tokens dropped / response tokens), ``masked_seq_frac`` (sequences with every response token
    dropped / sequences with response tokens) and ``touched_seq_frac`` (sequences with at least one token
    dropped / the same; equal to masked_seq_frac for the sequence mask)."""
    m = mask.bool()
    kept, dropped = m & keep.bool(), m & ~keep.bool()
    has_tokens = m.any(-1)
    tokens, seqs = max(int(m.sum()), 1), max(int(has_tokens.sum()), 1)
    return {"masked_token_frac": int(dropped.sum()) / tokens,
            "masked_seq_frac": int((has_tokens & ~kept.any(-1)).sum()) / seqs,
            "touched_seq_frac": int(dropped.any(-1).sum()) / seqs}


def importance_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, correction: str, *,
                       cap: float = 2.0, low: Optional[float] = None, high: Optional[float] = None
                       ) -> tuple[Optional[torch.Tensor], dict[str, float]]:
    """The per-token weights ``grpo.importance_correction`` asks for (``policy_loss``'s ``is_weights``, detached,
    0 on padding; None for ``none``) and what they mask, from the whole step's batch in the ``[B, L - 1]``
    layout: the trainer's old log-probs, the rollout engine's, the response mask.

    ``tis``: ``tis_weights`` (min(ratio, cap)); ``token_mask`` / ``seq_mask``: ``importance_mask`` at the token /
    sequence level with [low, high], as 0/1 weights; ``tis+token_mask`` / ``tis+seq_mask``: their product. The
    metrics (``masking_metrics``, and for the sequence mask the smallest and largest r_seq) come with every
    masking choice, none otherwise.
    """
    if correction not in IMPORTANCE_CORRECTIONS:
        raise ValueError(f"importance correction {correction!r}: choose one of {IMPORTANCE_CORRECTIONS} "
                         "(config key grpo.importance_correction)")
    parts = correction.split("+")
    weights = tis_weights(old_logp, rollout_logp, mask, cap) if "tis" in parts else None
    level = "token" if "token_mask" in parts else "seq" if "seq_mask" in parts else None
    if level is None:
        return weights, {}
    keep = importance_mask(old_logp, rollout_logp, mask, low, high, level)
    weights = keep if weights is None else weights * keep
    metrics = masking_metrics(keep, mask)
    if level == "seq":
        has_tokens = mask.bool().any(-1)
        seq_ratio = torch.exp(sequence_log_ratio(old_logp, rollout_logp, mask)[has_tokens])
        metrics["seq_ratio_min"] = float(seq_ratio.min()) if seq_ratio.numel() else 1.0
        metrics["seq_ratio_max"] = float(seq_ratio.max()) if seq_ratio.numel() else 1.0
    return weights, metrics


def mismatch_metrics(trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                     threshold: float) -> dict[str, float]:
    """How far the rollout engine's log-probs are from the trainer's on the sampled tokens.

    ``kl_k3`` estimates KL(rollout || trainer) with k3 (the tokens were sampled by the rollout engine);
    ``frac_over_threshold`` is the share of tokens with |diff| > ``threshold``, which catches a few
    badly routed tokens that a mean hides.
    """
    m = mask.bool()
    if not m.any():
        return {"abs_diff_mean": 0.0, "abs_diff_p99": 0.0, "abs_diff_max": 0.0, "kl_k3": 0.0,
                "frac_over_threshold": 0.0}
    diff = (trainer_logp - rollout_logp)[m].double()
    return {
        "abs_diff_mean": float(diff.abs().mean()),
        "abs_diff_p99": float(torch.quantile(diff.abs(), 0.99)),
        "abs_diff_max": float(diff.abs().max()),
        "kl_k3": float(kl_estimate(rollout_logp[m].double(), trainer_logp[m].double(), "k3").mean()),
        "frac_over_threshold": float((diff.abs() > threshold).double().mean()),
    }


# -- batch layout -----------------------------------------------------------------------------------
def pad_and_mask(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to ``[B, max_len]`` (long) and mark the real tokens (float mask)."""
    if not sequences:
        raise ValueError("pad_and_mask got no sequences")
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.float32)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1.0
    return ids, mask


def build_training_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids = prompt + response`` right-padded to ``[B, L]``, the loss mask ``[B, L - 1]``, position ids.

    The shift, explicitly: logits at column t predict token t + 1, so the trainer scores
    ``token_logprobs(logits[:, :-1], input_ids[:, 1:])``, which is ``[B, L - 1]``, and the loss mask has
    that layout: ``mask[:, t]`` is 1 exactly when ``input_ids[:, t + 1]`` is a response token. The first
    response token is therefore scored at the last prompt column, and the last real token of a row
    predicts nothing that counts.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("an empty prompt: every sample needs at least one prompt token to predict its response")
    ids, _ = pad_and_mask([list(p) + list(r) for p, r in zip(prompt_ids, response_ids)], pad_id)
    mask = torch.zeros((ids.shape[0], ids.shape[1] - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        mask[i, len(p) - 1:len(p) + len(r) - 1] = 1.0
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids).contiguous()
    return ids, mask, positions


def align_rollout_logprobs(prompt_ids: Sequence[Sequence[int]], rollout_logp: Sequence[Sequence[float]],
                           mask: torch.Tensor) -> torch.Tensor:
    """The rollout engine's per-response-token log-probs placed in the trainer's ``[B, L - 1]`` layout."""
    out = torch.zeros_like(mask)
    for i, (p, lp) in enumerate(zip(prompt_ids, rollout_logp)):
        if len(lp) != int(mask[i].sum()):
            raise ValueError(f"sample {i}: the rollout engine returned {len(lp)} log-probs for "
                             f"{int(mask[i].sum())} response tokens")
        out[i, len(p) - 1:len(p) - 1 + len(lp)] = torch.as_tensor(list(lp), dtype=out.dtype)
    return out


def split_minibatches(indices: Union[int, Sequence[int], torch.Tensor], num_minibatches: int, seed: int
                      ) -> list[torch.Tensor]:
    """A seeded shuffle of ``indices`` (or ``range(indices)`` for an int) cut into equal minibatches.

    Each minibatch is one optimizer step; equal sizes keep every step's normalizer comparable, and the
    seed (e.g. run seed + step) makes a resumed run replay the same order.
    """
    idx = torch.arange(indices) if isinstance(indices, int) else torch.as_tensor(indices, dtype=torch.long)
    if num_minibatches < 1 or len(idx) % num_minibatches:
        raise ValueError(f"{len(idx)} samples do not split into {num_minibatches} equal minibatches "
                         "(config key grpo.num_minibatches must divide prompts_per_step * samples_per_prompt)")
    order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))
    return list(idx[order].chunk(num_minibatches))
