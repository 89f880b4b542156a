"""Fused GRPO token log-prob + clipped policy loss (Triton), with and without the output layer.

Two entry points, both ``token_mean`` GRPO with the semantics of ``cookbook.grpo.algorithm``
(``token_logprobs`` + ``policy_loss``: PPO-clip with separate low/high bounds, log-ratio clamp before exp,
per-token loss cap, optional KL term (k1/k2/k3), optional importance weights, optional entropy bonus):

``fused_linear_grpo_loss(hidden [N, H], weight [V, H], targets, old_logp, advantages, mask, ...)``
    never materializes the ``[N, V]`` logits. Tokens are cut into chunks of ``chunk_size`` rows (auto: about
    1 GiB of logits per chunk). Per chunk: logits = h @ W^T (cuBLAS, input dtype), one Triton kernel does the
    online log-sum-exp (running max from -inf, vocabulary tail masked with -inf, fp32), the target log-prob,
    the entropy, the per-token loss and its derivative g = d loss / d logp, a second Triton kernel overwrites
    the chunk's logits in place with d loss / d logits = g * (onehot - softmax) / T (plus the entropy term),
    then dH = dlogits @ W and dW += dlogits^T @ h (cuBLAS; dW accumulated in fp32). The gradients are
    computed in the forward pass (as Liger's fused linear cross-entropy does): 3 GEMMs instead of the 4 a
    recomputing backward needs. The backward only scales them by the incoming gradient and casts dW back to
    the weight's dtype. When no gradient is needed (no_grad, or nothing requires grad) only the forward runs.
    With a tensor-parallel output layer (``vocab_shard``: this rank holds rows ``[start, start + V_local)``)
    the forward kernel is split in two around two all-reduces per chunk: a statistics kernel (the shard's
    online max, sum of exponentials, entropy sum and the target's logit where the shard holds it), the
    all-reduces (max, then the rescaled sums) giving the global log-sum-exp, log-prob and entropy, and a
    per-token loss kernel; the dlogits kernel is the same, with targets relative to the shard.

``grpo_loss_from_logits(logits [N, V], targets, ...)``
    for logits already in memory (e.g. gathered from a tensor-parallel output layer). Forward: one read of
    the logits (stats, logp, entropy, loss, g); backward: one read and one write (dlogits, into a new tensor,
    or into ``logits`` itself with ``inplace_backward=True``).

Both return ``(loss, logp [N] fp32, entropy [N] fp32)``; logp and entropy are detached (the loss carries the
gradient). On tensors that are not on CUDA the functions run the torch reference
(``kernels/grpo_loss_reference.py``) unless ``TRITON_INTERPRET=1`` is set, so the CPU trainer works and the
Triton code can be tested on CPU. Imports only torch, triton and the standard library.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from kernels.grpo_loss_reference import (VocabShard, check_args, fused_linear_grpo_loss_reference,
                                         grpo_loss_from_logits_reference)

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # CPU-only installs without triton still get the reference path
    HAVE_TRITON = False

__all__ = ["VocabShard", "fused_linear_grpo_loss", "grpo_loss_from_logits"]

_KL_KIND = {"k1": 1, "k2": 2, "k3": 3}
# Logits bytes per chunk in the fused-linear path when chunk_size is not given (the fp32 dW and this are the
# two large buffers: 1.25 GiB + 1 GiB at Moonlight's vocabulary 163840 x hidden 2048).
CHUNK_BYTES = 1 << 30
# Launch settings of the two kernels on a GPU (benchmarks/bench_grpo_loss.py sweeps them).
# Best on an H100 (16384 x 163840 bf16, 2026-11-24): forward 2.01 ms = 2.67 TB/s; dlogits 3.78 ms = 2.84 TB/s
# (a device copy of the same bytes: 3.03 TB/s), one program per row for the dlogits when rows are many.
FWD_BLOCK_V, FWD_WARPS = 4096, 4
BWD_BLOCK_V, BWD_WARPS = 8192, 8
BWD_BLOCKS_PER_PROGRAM, BWD_EVICT_FIRST = 64, False


# Read once, at import, like triton.jit reads it when it decorates the kernels below: the two must agree.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _interpret() -> bool:
    return _INTERPRET


def _use_triton(t: torch.Tensor) -> bool:
    return HAVE_TRITON and (t.is_cuda or _interpret())


if HAVE_TRITON:
    @triton.jit
    def _row_stats(base, V, inv_temp, BLOCK_V: tl.constexpr):
        """Online max, sum exp(z - max) and sum exp(z - max) * z over a row's V logits z (scaled by 1/T)."""
        offs = tl.arange(0, BLOCK_V)
        m = tl.zeros([], dtype=tl.float32) - float("inf")  # running max starts at -inf
        s = tl.zeros([], dtype=tl.float32)  # sum exp(z - m)
        t = tl.zeros([], dtype=tl.float32)  # sum exp(z - m) * z
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            valid = cols < V
            z = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(z, axis=0))
            alpha = tl.exp(m - m_new)
            e = tl.exp(z - m_new)  # 0 on the masked tail
            s = s * alpha + tl.sum(e, axis=0)
            t = t * alpha + tl.sum(e * tl.where(valid, z, 0.0), axis=0)
            m = m_new
        return m, s, t

    @triton.jit
    def _token_loss(row, logp, entropy, old_ptr, adv_ptr, mask_ptr, ref_ptr, isw_ptr, g_ptr, gent_ptr, loss_ptr,
                    ratio_lo, ratio_hi, logratio_clamp, loss_cap, inv_norm, kl_coef, entropy_coef,
                    HAS_CLAMP: tl.constexpr, HAS_CAP: tl.constexpr, KL_KIND: tl.constexpr, HAS_ISW: tl.constexpr,
                    HAS_ENT: tl.constexpr):
        """A token's loss and g = d loss / d logp (and the entropy bonus's g) from its log-prob and entropy."""
        old = tl.load(old_ptr + row)
        adv = tl.load(adv_ptr + row)
        keep = tl.load(mask_ptr + row) != 0
        log_ratio = logp - old
        d_lr = 1.0
        if HAS_CLAMP:  # clamp(max=c): the gradient passes where log_ratio <= c (torch's convention)
            d_lr = tl.where(log_ratio <= logratio_clamp, 1.0, 0.0)
            log_ratio = tl.minimum(log_ratio, logratio_clamp)
        ratio = tl.exp(log_ratio)
        a = -adv * ratio
        ratio_c = tl.minimum(tl.maximum(ratio, ratio_lo), ratio_hi)
        b = -adv * ratio_c
        pg = tl.maximum(a, b)
        # torch.maximum splits the gradient in half at a tie; clamp passes it inside [lo, hi] inclusive
        w_a = tl.where(a > b, 1.0, tl.where(a == b, 0.5, 0.0))
        in_range = tl.where((ratio >= ratio_lo) & (ratio <= ratio_hi), 1.0, 0.0)
        d_pg = -adv * (w_a + (1.0 - w_a) * in_range) * ratio * d_lr  # d pg / d logp
        if HAS_CAP:
            d_pg = tl.where(pg <= loss_cap, d_pg, 0.0)
            pg = tl.minimum(pg, loss_cap)
        per = pg
        d_per = d_pg
        if HAS_ISW:
            w = tl.load(isw_ptr + row)
            per = per * w
            d_per = d_per * w
        if KL_KIND != 0:
            d = tl.load(ref_ptr + row) - logp
            if KL_KIND == 1:
                kl = -d
                d_kl = 1.0
            elif KL_KIND == 2:
                kl = 0.5 * d * d
                d_kl = -d
            else:
                ed = tl.exp(d)
                kl = ed - d - 1.0
                d_kl = 1.0 - ed
            per = per + kl_coef * kl
            d_per = d_per + kl_coef * d_kl
        if HAS_ENT:
            per = per - entropy_coef * entropy
            tl.store(gent_ptr + row, tl.where(keep, -entropy_coef * inv_norm, 0.0))
        tl.store(g_ptr + row, tl.where(keep, d_per * inv_norm, 0.0))
        tl.store(loss_ptr + row, tl.where(keep, per, 0.0))

    @triton.jit
    def _grpo_fwd_kernel(logits_ptr, stride_row, targets_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, isw_ptr,
                         logp_ptr, ent_ptr, lse_ptr, g_ptr, gent_ptr, loss_ptr,
                         V, inv_temp, ratio_lo, ratio_hi, logratio_clamp, loss_cap, inv_norm, kl_coef, entropy_coef,
                         HAS_CLAMP: tl.constexpr, HAS_CAP: tl.constexpr, KL_KIND: tl.constexpr,
                         HAS_ISW: tl.constexpr, HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
        """One program per token row: online log-sum-exp + entropy over V, then the per-token loss and g."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        m, s, t = _row_stats(base, V, inv_temp, BLOCK_V)
        lse = m + tl.log(s)
        entropy = lse - t / s
        tgt = tl.load(targets_ptr + row)
        tgt = tl.where((tgt >= 0) & (tgt < V), tgt, 0)
        logp = tl.load(base + tgt).to(tl.float32) * inv_temp - lse
        tl.store(logp_ptr + row, logp)
        tl.store(ent_ptr + row, entropy)
        tl.store(lse_ptr + row, lse)
        _token_loss(row, logp, entropy, old_ptr, adv_ptr, mask_ptr, ref_ptr, isw_ptr, g_ptr, gent_ptr, loss_ptr,
                    ratio_lo, ratio_hi, logratio_clamp, loss_cap, inv_norm, kl_coef, entropy_coef,
                    HAS_CLAMP, HAS_CAP, KL_KIND, HAS_ISW, HAS_ENT)

    @triton.jit
    def _grpo_shard_stats_kernel(logits_ptr, stride_row, targets_ptr, stats_ptr, n, V, inv_temp,
                                 BLOCK_V: tl.constexpr):
        """Vocabulary-parallel forward, before the all-reduce: one program per row of this rank's logit columns
        writes (max, sum exp(z - max), sum exp(z - max) * z, the target's z or 0 where another rank holds it)
        to ``stats[0..3, row]``; ``targets`` are relative to the shard (-1: not here)."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        m, s, t = _row_stats(base, V, inv_temp, BLOCK_V)
        tgt = tl.load(targets_ptr + row)
        owned = (tgt >= 0) & (tgt < V)
        z_tgt = tl.load(base + tl.where(owned, tgt, 0)).to(tl.float32) * inv_temp
        tl.store(stats_ptr + row, m)
        tl.store(stats_ptr + n + row, s)
        tl.store(stats_ptr + 2 * n + row, t)
        tl.store(stats_ptr + 3 * n + row, tl.where(owned, z_tgt, 0.0))

    @triton.jit
    def _grpo_token_loss_kernel(logp_ptr, ent_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, isw_ptr, g_ptr, gent_ptr,
                                loss_ptr, ratio_lo, ratio_hi, logratio_clamp, loss_cap, inv_norm, kl_coef,
                                entropy_coef, HAS_CLAMP: tl.constexpr, HAS_CAP: tl.constexpr, KL_KIND: tl.constexpr,
                                HAS_ISW: tl.constexpr, HAS_ENT: tl.constexpr):
        """Vocabulary-parallel forward, after the all-reduce: one program per token, from its log-prob and entropy."""
        row = tl.program_id(0).to(tl.int64)
        _token_loss(row, tl.load(logp_ptr + row), tl.load(ent_ptr + row), old_ptr, adv_ptr, mask_ptr, ref_ptr,
                    isw_ptr, g_ptr, gent_ptr, loss_ptr, ratio_lo, ratio_hi, logratio_clamp, loss_cap, inv_norm,
                    kl_coef, entropy_coef, HAS_CLAMP, HAS_CAP, KL_KIND, HAS_ISW, HAS_ENT)

    @triton.jit
    def _grpo_dlogits_kernel(logits_ptr, stride_row, out_ptr, stride_out, targets_ptr, lse_ptr, g_ptr, ent_ptr,
                             gent_ptr, scale_ptr, V, inv_temp, HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr,
                             SPAN: tl.constexpr, EVICT_FIRST: tl.constexpr):
        """dlogits = scale * (g * (onehot - p) + g_ent * dH/dz) / T over columns [pid1 * SPAN, + SPAN) of one
        row, BLOCK_V at a time; ``out`` may alias ``logits`` (each element is read, then written, once)."""
        row = tl.program_id(0).to(tl.int64)
        start = tl.program_id(1) * SPAN
        end = tl.minimum(start + SPAN, V)
        lse = tl.load(lse_ptr + row)
        scale = tl.load(scale_ptr)
        g = tl.load(g_ptr + row) * scale
        tgt = tl.load(targets_ptr + row).to(tl.int32)
        if HAS_ENT:
            ge = tl.load(gent_ptr + row) * scale
            ent = tl.load(ent_ptr + row)
        src = logits_ptr + row * stride_row
        dst = out_ptr + row * stride_out
        for v0 in range(start, end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            valid = cols < end
            if EVICT_FIRST:
                x = tl.load(src + cols, mask=valid, other=0.0, eviction_policy="evict_first")
            else:
                x = tl.load(src + cols, mask=valid, other=0.0)
            logp = x.to(tl.float32) * inv_temp - lse
            p = tl.exp(logp)
            d = g * (tl.where(cols == tgt, 1.0, 0.0) - p)  # d logp_tgt / d z = onehot - p
            if HAS_ENT:  # d entropy / d z_j = -p_j (log p_j + entropy)
                d = d - ge * p * (logp + ent)
            tl.store(dst + cols, (d * inv_temp).to(out_ptr.dtype.element_ty), mask=valid)


def _block_v(V: int, kind: str) -> int:
    if _interpret():  # small blocks so CPU tests cover several blocks plus a ragged tail
        return 128
    return min(FWD_BLOCK_V if kind == "fwd" else BWD_BLOCK_V, triton.next_power_of_2(V))


def _warps(kind: str) -> int:
    return 1 if _interpret() else (FWD_WARPS if kind == "fwd" else BWD_WARPS)


class _Cfg:
    """The scalar settings of one call, validated once."""

    def __init__(self, n, targets, old_logp, advantages, mask, ref_logp, is_weights, *, temperature, clip_low,
                 clip_high, logratio_clamp, loss_cap, normalizer, kl_coef, kl_estimator, entropy_coef, aggregation,
                 vocab_shard: Optional[VocabShard] = None):
        check_args(n, targets, old_logp, advantages, mask, ref_logp, is_weights, temperature=temperature,
                   normalizer=normalizer, kl_coef=kl_coef, kl_estimator=kl_estimator, aggregation=aggregation,
                   entropy_coef=entropy_coef)
        self.temperature = float(temperature)
        self.inv_temp = 1.0 / float(temperature)
        self.ratio_lo = 1 - clip_low
        self.ratio_hi = 1 + clip_high
        self.logratio_clamp = logratio_clamp
        self.loss_cap = loss_cap
        self.normalizer = float(normalizer)
        self.kl_coef = float(kl_coef)
        self.kl_kind = _KL_KIND[kl_estimator] if kl_coef else 0
        self.entropy_coef = float(entropy_coef)
        self.shard = vocab_shard


def _prep_token_inputs(device, targets, old_logp, advantages, mask, ref_logp, is_weights, cfg: _Cfg):
    f32 = dict(device=device, dtype=torch.float32)
    tok = dict(
        targets=targets.to(device=device, dtype=torch.int64).contiguous(),
        old=old_logp.detach().to(**f32).contiguous(),
        adv=advantages.detach().to(**f32).contiguous(),
        mask=(mask.to(device) != 0).to(torch.int8).contiguous(),
    )
    tok["ref"] = ref_logp.detach().to(**f32).contiguous() if cfg.kl_kind else tok["old"]
    tok["isw"] = is_weights.detach().to(**f32).contiguous() if is_weights is not None else tok["old"]
    tok["has_isw"] = is_weights is not None
    return tok


def _loss_settings(tok: dict, cfg: _Cfg) -> tuple[tuple, dict]:
    """The per-token loss's scalar arguments and compile-time flags (``_token_loss``)."""
    scalars = (cfg.ratio_lo, cfg.ratio_hi, 0.0 if cfg.logratio_clamp is None else float(cfg.logratio_clamp),
               0.0 if cfg.loss_cap is None else float(cfg.loss_cap), 1.0 / cfg.normalizer, cfg.kl_coef,
               cfg.entropy_coef)
    flags = dict(HAS_CLAMP=cfg.logratio_clamp is not None, HAS_CAP=cfg.loss_cap is not None, KL_KIND=cfg.kl_kind,
                 HAS_ISW=tok["has_isw"], HAS_ENT=bool(cfg.entropy_coef))
    return scalars, flags


def _launch_fwd(logits: torch.Tensor, tok: dict, cfg: _Cfg, out: dict, r0: int, r1: int) -> None:
    """Row statistics and per-token loss for rows [r0, r1) of the token arrays; ``logits`` holds those rows (all
    of the vocabulary, or with ``cfg.shard`` this rank's columns: statistics, all-reduce, then the loss)."""
    n, V = logits.shape
    if n == 0:
        return
    sl = slice(r0, r1)
    scalars, flags = _loss_settings(tok, cfg)
    token_in = [tok[k][sl] for k in ("old", "adv", "mask", "ref", "isw")]
    token_out = [out[k][sl] for k in ("g", "gent", "loss_tok")]
    if cfg.shard is None:
        _grpo_fwd_kernel[(n,)](
            logits, logits.stride(0), tok["targets"][sl], *token_in,
            out["logp"][sl], out["entropy"][sl], out["lse"][sl], *token_out, V, cfg.inv_temp, *scalars, **flags,
            BLOCK_V=_block_v(V, "fwd"), num_warps=_warps("fwd"))
        return
    stats = torch.empty(4, n, device=logits.device, dtype=torch.float32)
    _grpo_shard_stats_kernel[(n,)](logits, logits.stride(0), tok["targets"][sl], stats, n, V, cfg.inv_temp,
                                   BLOCK_V=_block_v(V, "fwd"), num_warps=_warps("fwd"))
    _combine_shard_stats(stats, cfg.shard, out, sl)
    _grpo_token_loss_kernel[(n,)](out["logp"][sl], out["entropy"][sl], *token_in, *token_out, *scalars, **flags,
                                  num_warps=1)


def _combine_shard_stats(stats: torch.Tensor, shard: VocabShard, out: dict, sl: slice) -> None:
    """Log-sum-exp, entropy and target log-prob over the whole vocabulary from every shard's
    ``(max, sum exp(z - max), sum exp(z - max) * z, target z)``: two all-reduces (the max, then the sums
    rescaled to it); the results are the same on every rank."""
    m, s, t = stats[0], stats[1], stats[2]
    top = m.clone()
    shard.all_reduce(top, "max")
    rescale = torch.exp(m - top)
    s.mul_(rescale)
    t.mul_(rescale)
    shard.all_reduce(stats[1:], "sum")
    lse = top + s.log()
    out["lse"][sl] = lse
    out["entropy"][sl] = lse - t / s
    out["logp"][sl] = stats[3] - lse


def _launch_dlogits(logits: torch.Tensor, dlogits: torch.Tensor, tok: dict, cfg: _Cfg, out: dict,
                    scale: torch.Tensor, r0: int, r1: int) -> None:
    n, V = logits.shape
    if n == 0:
        return
    sl = slice(r0, r1)
    block = _block_v(V, "bwd")
    per = BWD_BLOCKS_PER_PROGRAM if n >= 1024 else 1  # few rows: split them over more programs
    span = block * (2 if _interpret() else per)
    _grpo_dlogits_kernel[(n, triton.cdiv(V, span))](
        logits, logits.stride(0), dlogits, dlogits.stride(0), tok["targets"][sl], out["lse"][sl], out["g"][sl],
        out["entropy"][sl], out["gent"][sl], scale, V, cfg.inv_temp,
        HAS_ENT=bool(cfg.entropy_coef), BLOCK_V=block, SPAN=span, EVICT_FIRST=BWD_EVICT_FIRST and not _interpret(),
        num_warps=_warps("bwd"))


def _alloc_token_outputs(n: int, device) -> dict:
    f32 = dict(device=device, dtype=torch.float32)
    out = {k: torch.empty(n, **f32) for k in ("logp", "entropy", "lse", "g", "loss_tok")}
    out["gent"] = torch.zeros(n, **f32)
    return out


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# -- from logits -------------------------------------------------------------------------------------------
class _GRPOFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tok, cfg, inplace_backward):
        n = logits.shape[0]
        out = _alloc_token_outputs(n, logits.device)
        _launch_fwd(logits, tok, cfg, out, 0, n)
        loss = out["loss_tok"].sum() / cfg.normalizer
        ctx.save_for_backward(logits)
        ctx.tok, ctx.cfg, ctx.out, ctx.inplace = tok, cfg, out, inplace_backward
        ctx.mark_non_differentiable(out["logp"], out["entropy"])
        return loss, out["logp"], out["entropy"]

    @staticmethod
    def backward(ctx, grad_loss, _glogp, _gent):
        (logits,) = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None
        dlogits = logits if ctx.inplace else torch.empty_like(logits)
        scale = grad_loss.detach().to(device=logits.device, dtype=torch.float32).reshape(1).contiguous()
        _launch_dlogits(logits, dlogits, ctx.tok, ctx.cfg, ctx.out, scale, 0, logits.shape[0])
        return dlogits, None, None, None


def grpo_loss_from_logits(logits: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor,
                          advantages: torch.Tensor, mask: torch.Tensor, *, temperature: float = 1.0,
                          clip_low: float = 0.2, clip_high: float = 0.2, logratio_clamp: Optional[float] = 10.0,
                          loss_cap: Optional[float] = 3.0, normalizer: float, ref_logp: Optional[torch.Tensor] = None,
                          kl_coef: float = 0.0, kl_estimator: str = "k3", is_weights: Optional[torch.Tensor] = None,
                          entropy_coef: float = 0.0, aggregation: str = "token_mean",
                          inplace_backward: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO loss from logits ``[N, V]`` (any float dtype; math in fp32): ``(loss, logp [N], entropy [N])``.

    ``token_mean`` only: loss = sum over masked tokens of the per-token loss / ``normalizer``. With
    ``inplace_backward`` the backward writes d loss / d logits into ``logits``' own storage (saves one
    ``[N, V]`` buffer; the logits are garbage afterwards). Not vocabulary-parallel: the row must be whole.
    """
    kw = dict(temperature=temperature, clip_low=clip_low, clip_high=clip_high, logratio_clamp=logratio_clamp,
              loss_cap=loss_cap, normalizer=normalizer, ref_logp=ref_logp, kl_coef=kl_coef,
              kl_estimator=kl_estimator, is_weights=is_weights, entropy_coef=entropy_coef, aggregation=aggregation)
    if logits.dim() != 2:
        raise ValueError(f"logits of shape {tuple(logits.shape)}: expected [N, V] (flatten batch and time)")
    if not _use_triton(logits):
        return grpo_loss_from_logits_reference(logits, targets, old_logp, advantages, mask, **kw)
    cfg = _Cfg(logits.shape[0], targets, old_logp, advantages, mask, ref_logp, is_weights,
               **{k: v for k, v in kw.items() if k not in ("ref_logp", "is_weights")})
    tok = _prep_token_inputs(logits.device, targets, old_logp, advantages, mask, ref_logp, is_weights, cfg)
    return _GRPOFromLogits.apply(_row_major(logits), tok, cfg, inplace_backward)


# -- fused with the output layer ---------------------------------------------------------------------------
def _auto_chunk(n: int, V: int, elem: int) -> int:
    cmax = max(128, CHUNK_BYTES // max(1, V * elem))
    nchunks = max(1, math.ceil(n / cmax))
    return min(n, math.ceil(math.ceil(n / nchunks) / 128) * 128)


DW_ACCUMULATION: Optional[str] = None  # which path _accumulate_dw took (reported by the benchmark)


def _accumulate_dw(dw: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor, first: bool) -> None:
    """dw (+)= dlogits^T @ h; ``dw`` is fp32 (several chunks: fp32 accumulation across them) or, for a single
    chunk, already in the weight's dtype (one GEMM, which accumulates in fp32 inside, rounded once)."""
    global DW_ACCUMULATION
    if dw.dtype == dlogits.dtype:
        if first:
            torch.mm(dlogits.t(), h, out=dw)
        else:
            dw.addmm_(dlogits.t(), h)
        return
    if DW_ACCUMULATION != "rounded per chunk":
        try:  # cuBLAS with bf16/fp16 inputs and an fp32 C/D (torch >= 2.8 on CUDA); the first chunk writes C
            if first:
                torch.mm(dlogits.t(), h, out_dtype=torch.float32, out=dw)
            else:
                torch.addmm(dw, dlogits.t(), h, out_dtype=torch.float32, out=dw)
            DW_ACCUMULATION = "fp32 (cuBLAS out_dtype)"
            return
        except (TypeError, RuntimeError, NotImplementedError):
            DW_ACCUMULATION = "rounded per chunk"
    part = torch.mm(dlogits.t(), h)  # fallback: each chunk's product rounded once to the input dtype
    if first:
        dw.copy_(part)
    else:
        dw.add_(part)


def _fused_linear_forward(hidden, weight, tok, cfg, need_dh: bool, need_dw: bool, chunk_size: Optional[int]):
    n, _ = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    out = _alloc_token_outputs(n, dev)
    need_grad = need_dh or need_dw
    chunk = chunk_size or _auto_chunk(n, V, hidden.element_size())
    chunk = max(1, min(chunk, n))
    buf = torch.empty(chunk, V, device=dev, dtype=hidden.dtype) if n else None
    dh = torch.empty_like(hidden) if need_dh else None
    dw = None
    if need_dw:  # one chunk: dW straight in the weight's dtype; several: an fp32 accumulator
        dw_dtype = weight.dtype if n <= chunk or weight.dtype in (torch.float32, torch.float64) else torch.float32
        dw = torch.empty(weight.shape, device=dev, dtype=dw_dtype) if n else torch.zeros_like(weight)
    one = torch.ones(1, device=dev, dtype=torch.float32)
    wt = weight.t()
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        h = hidden[r0:r1]
        logits = buf[: r1 - r0]
        torch.mm(h, wt, out=logits)
        _launch_fwd(logits, tok, cfg, out, r0, r1)
        if not need_grad:
            continue
        _launch_dlogits(logits, logits, tok, cfg, out, one, r0, r1)  # in place: logits -> dlogits
        if need_dh:
            torch.mm(logits, weight, out=dh[r0:r1])
        if need_dw:
            _accumulate_dw(dw, logits, h, first=r0 == 0)
    del buf
    loss = out["loss_tok"].sum() / cfg.normalizer
    return loss, out, dh, dw


class _FusedLinearGRPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tok, cfg, chunk_size):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, out, dh, dw = _fused_linear_forward(hidden, weight, tok, cfg, need_dh, need_dw, chunk_size)
        ctx.dh, ctx.dw, ctx.weight_dtype = dh, dw, weight.dtype
        ctx.mark_non_differentiable(out["logp"], out["entropy"])
        return loss, out["logp"], out["entropy"]

    @staticmethod
    def backward(ctx, grad_loss, _glogp, _gent):
        if ctx.dh is None and ctx.dw is None:
            raise RuntimeError("fused_linear_grpo_loss: backward called twice (its gradients are computed in the "
                               "forward pass and handed over once; retain_graph is not supported)")
        dh, dw = ctx.dh, ctx.dw
        ctx.dh = ctx.dw = None
        scale = grad_loss.detach().to(torch.float32)
        unit = bool((scale == 1).all())  # one host sync; saves a pass over dW in the usual loss.backward()
        if dh is not None and not unit:
            dh.mul_(scale)
        if dw is not None:
            if dw.dtype == ctx.weight_dtype:
                if not unit:
                    dw.mul_(scale)
            else:  # fp32 accumulator -> weight dtype, scaled in the same pass
                acc, dw = dw, torch.empty(dw.shape, device=dw.device, dtype=ctx.weight_dtype)
                if unit:
                    dw.copy_(acc)
                else:
                    torch.mul(acc, scale, out=dw)
                del acc
        return dh, dw, None, None, None


def fused_linear_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                           temperature: float = 1.0, clip_low: float = 0.2, clip_high: float = 0.2,
                           logratio_clamp: Optional[float] = 10.0, loss_cap: Optional[float] = 3.0,
                           normalizer: float, ref_logp: Optional[torch.Tensor] = None, kl_coef: float = 0.0,
                           kl_estimator: str = "k3", is_weights: Optional[torch.Tensor] = None,
                           entropy_coef: float = 0.0, aggregation: str = "token_mean",
                           chunk_size: Optional[int] = None, vocab_shard: Optional[VocabShard] = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO loss from hidden states ``[N, H]`` and the output layer's weight ``[V, H]``, no ``[N, V]`` logits.

    Returns ``(loss, logp [N] fp32, entropy [N] fp32)``; ``loss.backward()`` fills the gradients of
    ``hidden`` and ``weight`` (computed during the forward; dW accumulated in fp32, cast to the weight's
    dtype). The logits are ``hidden @ weight.T`` rounded to the input dtype (as an unfused bf16 output layer
    gives them), then everything is fp32. ``chunk_size``: token rows per chunk (default: ~1 GiB of logits).

    Tensor-parallel output layer (``vocab_shard``, e.g. ``VocabShard.of_group(tp_group, weight.shape[0])``):
    ``weight`` is this rank's rows of the vocabulary and ``hidden`` the same on every rank of the group; each
    chunk's row statistics are all-reduced over the group (two small all-reduces per chunk), so loss, logp and
    entropy are the same on every rank. ``weight``'s gradient is this rank's shard; ``hidden``'s is this shard's
    part, which the caller sums over the group (as ColumnParallelLinear's backward does for its input).
    """
    kw = dict(temperature=temperature, clip_low=clip_low, clip_high=clip_high, logratio_clamp=logratio_clamp,
              loss_cap=loss_cap, normalizer=normalizer, ref_logp=ref_logp, kl_coef=kl_coef,
              kl_estimator=kl_estimator, is_weights=is_weights, entropy_coef=entropy_coef, aggregation=aggregation,
              vocab_shard=vocab_shard)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}: expected [N, H] and [V, H]")
    if not _use_triton(hidden):
        return fused_linear_grpo_loss_reference(hidden, weight, targets, old_logp, advantages, mask, **kw)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}: pass one dtype")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size {chunk_size}: must be >= 1")
    cfg = _Cfg(hidden.shape[0], targets, old_logp, advantages, mask, ref_logp, is_weights,
               **{k: v for k, v in kw.items() if k not in ("ref_logp", "is_weights")})
    tok = _prep_token_inputs(hidden.device, targets, old_logp, advantages, mask, ref_logp, is_weights, cfg)
    if vocab_shard is not None:  # the shard's own columns; -1 (no one-hot) where another rank holds the target
        tok["targets"] = vocab_shard.local_targets(tok["targets"], weight.shape[0])
    hidden_c, weight_c = _row_major(hidden), _row_major(weight)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearGRPO.apply(hidden_c, weight_c, tok, cfg, chunk_size)
    with torch.no_grad():
        loss, out, _, _ = _fused_linear_forward(hidden_c, weight_c, tok, cfg, False, False, chunk_size)
    return loss, out["logp"], out["entropy"]
