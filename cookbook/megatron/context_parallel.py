"""Context parallelism (CP) in the project's MLA core attention, for packed (``thd``) sequences.

Megatron-Core's own CP lives in Transformer Engine's attention, which is not available here (CPU) and not used by
the project's MLA core attention (``cookbook.megatron.attention``); this module gives that attention CP.

The split (Megatron's, load-balanced): every packed segment (one sample, its length a multiple of 2 x CP) is cut
into 2 x CP equal chunks and CP rank r holds chunks r and 2CP-1-r, in that order, segment after segment. Under a
causal mask the early chunks see little context and the late ones much, so pairing chunk r with its mirror gives
every rank the same attention work. It is exactly the split Megatron's thd rope assumes
(``rope_utils._get_thd_freqs_on_this_cp_rank``), so MLA's rotary positions are right on every rank, and the one
``cookbook.grpo.packing.cp_local_positions`` produces. Everything outside attention is per token and needs no
change: the projections, norms and MoE layers run on the rank's own tokens.

Attention needs every earlier key and value of the segment. Two ways to get them:
- a ring (TE's ``p2p``): CP - 1 passes, each sending a chunk pair's K/V to the next rank while computing with the
  current one, merging partial softmax results; communication overlaps compute, memory is two chunks' K/V;
- an all-gather (TE's ``all_gather``, what this module does): one collective gathers the K/V of the whole
  sequence on every rank, then each rank runs causal attention of its query chunks against it.
Each rank receives the same (CP - 1) / CP of the sequence's K/V either way, so the communication volume is equal;
the all-gather is one collective with one backward (a reduce-scatter of dK/dV: each rank's queries contribute to
every rank's keys), no online-softmax merging and no ordering of partial results, which keeps it simple enough to
read and to check exactly against CP = 1. Its costs: the full K/V of a sequence on each rank (for Moonlight at
4096 tokens, 16 heads / TP 2 x (192 + 128) x 2 bytes x 4096 = 21 MB per layer: small beside the activations) and no
overlap of communication with compute. A ring is worth it at long contexts and CP >= 4; the reference runs
4096-token rows at CP 2.

What goes over the wire is the per-head K and V after MLA's up-projection. Gathering the compressed latent
(``kv_lora_rank`` + rope = 576 per token instead of heads x 320) would send less at large head counts but make
every rank redo the up-projection of the whole sequence; not done.

Backward of the all-gather: dK/dV of the gathered sequence are summed over the CP ranks and each rank keeps its
own chunks: ``reduce_scatter_tensor`` on NCCL; gloo has no reduce-scatter, so there it is an all-reduce and a
slice (twice the traffic, CPU only).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _AllGatherWithReduceScatterGrad(torch.autograd.Function):
    """``[t, ...]`` on each of the group's ranks -> ``[cp, t, ...]`` on every rank; the backward sums the
    gradient over the ranks and returns each rank its own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        grad = grad.contiguous()
        if dist.get_backend(group) == "nccl":
            out = torch.empty_like(grad[0])
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        summed = grad.clone()
        dist.all_reduce(summed, group=group)
        return summed[group.rank()].clone(), None


def all_gather_with_reduce_scatter_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Every CP rank's ``x`` stacked in rank order, differentiable (see the module docstring)."""
    return _AllGatherWithReduceScatterGrad.apply(x, group)


def segment_bounds(cu_seqlens_padded: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of every segment of the full packed sequence."""
    cu = cu_seqlens_padded.tolist()
    return [(a, b - a) for a, b in zip(cu[:-1], cu[1:]) if b > a]


def query_positions(length: int, context: int, rank: int, device=None) -> torch.Tensor:
    """Positions within a segment of ``length`` of this rank's query tokens: chunk r, then chunk 2CP-1-r."""
    c = length // (2 * context)
    mirror = 2 * context - 1 - rank
    return torch.cat([torch.arange(rank * c, (rank + 1) * c, device=device),
                      torch.arange(mirror * c, (mirror + 1) * c, device=device)])


def packed_cp_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        cu_seqlens_padded: torch.Tensor, group, softmax_scale: float,
                        dropout: float = 0.0) -> torch.Tensor:
    """Causal attention within each segment of a packed sequence split over the CP ``group``.

    ``query``/``key`` ``[t, h, dk]`` and ``value`` ``[t, h, dv]`` are this rank's tokens (``t`` = the full
    length / CP, laid out as in the module docstring); ``cu_seqlens_padded`` describes the full sequence (every
    segment a multiple of 2 x CP). Returns ``[t, h * dv]``."""
    cp, rank = group.size(), group.rank()
    t, h, dk = query.shape
    dv = value.shape[-1]
    gathered = all_gather_with_reduce_scatter_grad(torch.cat([key, value], dim=-1), group)  # [cp, t, h, dk + dv]
    outputs = []
    local = 0
    for start, length in segment_bounds(cu_seqlens_padded):
        if length % (2 * cp):
            raise ValueError(f"a packed segment of {length} tokens does not split into 2 x CP = {2 * cp} chunks; "
                             "pad every sample to a multiple of 2 x parallel.context (cookbook.grpo.packing)")
        c, share = length // (2 * cp), length // cp
        # the segment's K/V in sequence order: chunk j lives on rank j (first half) or 2CP-1-j (second half)
        pieces = [gathered[j, local:local + c] if j < cp else gathered[2 * cp - 1 - j, local + c:local + share]
                  for j in range(2 * cp)]
        kv = torch.cat(pieces)  # [length, h, dk + dv]
        k, v = kv[..., :dk], kv[..., dk:]
        q = query[local:local + share]
        positions = query_positions(length, cp, rank, device=query.device)
        visible = int(positions.max()) + 1  # keys past the last query are never seen
        allowed = torch.arange(visible, device=query.device).unsqueeze(0) <= positions.unsqueeze(1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k[:visible].transpose(0, 1),
                                             v[:visible].transpose(0, 1), attn_mask=allowed, dropout_p=dropout,
                                             scale=softmax_scale)
        outputs.append(out.transpose(0, 1))
        local += share
    if local != t:
        raise ValueError(f"cu_seqlens describe {local} tokens per CP rank, the rank holds {t}")
    return torch.cat(outputs).reshape(t, h * dv)


def context_parallel_group(pg_collection=None) -> Optional[object]:
    """The CP process group: the layer's own (Megatron passes ``pg_collection``) or the global one."""
    group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
    if group is None:
        from megatron.core import parallel_state as ps

        group = ps.get_context_parallel_group(check_initialized=False)
    return group
