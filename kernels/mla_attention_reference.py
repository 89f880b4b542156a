"""Torch reference for MLA causal attention on packed (varlen) sequences.

The oracle for the Triton kernel in ``kernels/mla_attention.py`` and its CPU fallback. It loops over the
segments given by ``cu_seqlens`` and applies an explicit causal mask, so no token ever sees another segment.
Plain torch ops only: autograd gives the gradients of q, k and v.
"""
from __future__ import annotations

from typing import Optional

import torch


def mla_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            softmax_scale: Optional[float] = None,
                            compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v inside each segment.

    q, k: [total_tokens, heads, dk]; v: [total_tokens, heads, dv]; cu_seqlens: int [num_seqs + 1], the segment
    borders (0, l0, l0 + l1, ..., total_tokens). Computed in ``compute_dtype`` (float32 or float64) and returned
    in q's dtype, shape [total_tokens, heads, dv]."""
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k [t, h, dk] and v [t, h, dv]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != q.shape[0] or any(b > e for b, e in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens {bounds} does not partition {q.shape[0]} tokens")
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (x[start:end].to(compute_dtype).transpose(0, 1) for x in (q, k, v))  # [h, n, d]
        scores = torch.matmul(qs, ks.transpose(1, 2)) * scale  # [h, n, n]
        n = end - start
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        outs.append(torch.matmul(probs, vs).transpose(0, 1))  # [n, h, dv]
    if not outs:
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    return torch.cat(outs, dim=0).to(q.dtype)


def mla_attention_reference_lse(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor,
                                softmax_scale: Optional[float] = None,
                                compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The natural-log logsumexp of each row's masked, scaled scores: [heads, total_tokens] in compute_dtype."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    bounds = [int(x) for x in cu_seqlens.tolist()]
    out = torch.empty(q.shape[1], q.shape[0], dtype=compute_dtype, device=q.device)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks = (x[start:end].to(compute_dtype).transpose(0, 1) for x in (q, k))
        scores = torch.matmul(qs, ks.transpose(1, 2)) * scale
        n = end - start
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        out[:, start:end] = torch.logsumexp(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return out
