"""The project's MLA core attention: softmax(q k^T * scale) v with a causal mask.

Megatron-Core's local ``DotProductAttention`` rejects MLA's different key and value head sizes
(``k_channels`` = qk_nope + qk_rope = 192, ``v_channels`` = 128 in the real models) and Transformer Engine
is not available on CPU, so the layer spec puts this module in its place. On CPU it is torch's
``scaled_dot_product_attention``; on GPU, when ``grpo.use_fused_kernels`` is set, it calls the project's
fused Triton kernel ``kernels.mla_attention.mla_attention`` (varlen layout, causal).

Packed sequences (``thd``, ``grpo.sequence_packing``) attend within their own segment of ``cu_seqlens``
(the padded boundaries when given: every sample's padding sits at its end). Context parallelism (CP > 1) needs
them: each CP rank holds two chunks of every segment and gathers the keys and values of the rest
(``cookbook.megatron.context_parallel``; SDPA with an explicit causal mask there, also on GPU, because the
fused varlen kernel takes the same segments for queries and keys).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from cookbook.megatron.context_parallel import context_parallel_group, packed_cp_attention


def load_fused_kernel() -> Optional[Callable]:
    """The fused MLA kernel when CUDA and ``kernels.mla_attention`` are both present, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from kernels.mla_attention import mla_attention
    except ImportError:
        return None
    return mla_attention


class MLACoreAttention(MegatronModule):
    """Core attention for ``MLASelfAttention``: query/key ``[s, b, h, dk]``, value ``[s, b, h, dv]``,
    output ``[s, b, h * dv]``; packed sequences (``thd``: ``[t, h, d]`` with ``cu_seqlens``) attend
    within their own segment only."""

    cp_group = None  # the context-parallel group when CP > 1

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        use_fused_kernel: bool = False,
    ):
        super().__init__(config=config)
        self.cp_group = context_parallel_group(pg_collection) if config.context_parallel_size > 1 else None
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.k_channels = k_channels
        self.v_channels = v_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else (k_channels or 1) ** -0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.fused_kernel = load_fused_kernel() if use_fused_kernel else None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **unused):
        if attention_bias is not None:
            raise NotImplementedError("MLACoreAttention does not take an attention bias")
        dropout = self.dropout_p if self.training else 0.0
        if packed_seq_params is not None:
            cu = getattr(packed_seq_params, "cu_seqlens_q_padded", None)  # the layout, when samples are padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
            if self.cp_group is not None and self.cp_group.size() > 1:
                if query.dim() == 4:
                    query, key, value = (x.squeeze(1) for x in (query, key, value))
                return packed_cp_attention(query, key, value, cu, self.cp_group, self.softmax_scale, dropout)
            return self._packed(query, key, value, cu, dropout)
        if self.cp_group is not None and self.cp_group.size() > 1:
            raise NotImplementedError("context parallelism needs packed sequences (grpo.sequence_packing=true): "
                                      "the project's MLA attention splits packed segments over the CP ranks")
        s, b, h, _ = query.shape
        if self.fused_kernel is not None and attention_mask is None and dropout == 0.0:
            cu = torch.arange(0, (b + 1) * s, s, device=query.device, dtype=torch.int32)
            out = self.fused_kernel(*(x.transpose(0, 1).reshape(b * s, h, x.shape[-1]) for x in (query, key, value)),
                                    cu, s, self.softmax_scale)
            return out.view(b, s, -1).transpose(0, 1).contiguous()
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale)
        else:  # Megatron's convention: True = masked out; keep the causal mask as well
            causal = torch.ones(s, k.shape[2], dtype=torch.bool, device=q.device).tril()
            allowed = causal & ~attention_mask.to(torch.bool)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                                 scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _packed(self, query, key, value, cu_seqlens, dropout):
        """``[t, h, d]`` packed sequences: causal attention inside each ``cu_seqlens`` segment."""
        if query.dim() == 4:  # [t, 1, h, d]
            query, key, value = (x.squeeze(1) for x in (query, key, value))
        t, h, _ = query.shape
        if self.fused_kernel is not None and dropout == 0.0:
            # max_seqlen None: the kernel finds it, with one device sync per step's cu_seqlens instead of per layer
            return self.fused_kernel(query, key, value, cu_seqlens, None, self.softmax_scale).reshape(t, -1)
        return packed_sdpa(query, key, value, cu_seqlens, self.softmax_scale, dropout).reshape(t, -1)


def packed_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                scale: float, dropout: float = 0.0) -> torch.Tensor:
    """Causal SDPA inside each segment of packed ``[t, h, d]`` tensors, ``[t, h, dv]`` out.

    Segments go in batches of similar length (lengths in (2^(b-1), 2^b]), each padded at its end to the longest
    of its batch: a handful of SDPA calls instead of one per sample (a packed row holds hundreds of short
    samples on the tiny preset), at most 4x the attention FLOPs of exact per-segment calls; the padding sits after
    every real key, so the causal mask keeps it out of every real query's view."""
    t, h, _ = query.shape
    starts = cu_seqlens[:-1].tolist()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    buckets: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        if n:
            buckets.setdefault((n - 1).bit_length(), []).append(i)
    rows, values = [], []
    for members in buckets.values():
        sizes = [lengths[i] for i in members]
        longest = max(sizes)
        tokens = torch.cat([torch.arange(starts[i], starts[i] + lengths[i]) for i in members]).to(query.device)
        seg = torch.repeat_interleave(torch.arange(len(members)), torch.tensor(sizes)).to(query.device)
        pos = torch.cat([torch.arange(n) for n in sizes]).to(query.device)

        def batched(x: torch.Tensor) -> torch.Tensor:  # [segments, h, longest, d]
            buf = x.new_zeros(len(members), longest, h, x.shape[-1])
            return buf.index_put((seg, pos), x[tokens]).transpose(1, 2)

        out = F.scaled_dot_product_attention(batched(query), batched(key), batched(value), dropout_p=dropout,
                                             is_causal=True, scale=scale)
        rows.append(tokens)
        values.append(out.transpose(1, 2)[seg, pos])
    return query.new_zeros(t, h, value.shape[-1]).index_copy(0, torch.cat(rows), torch.cat(values))
