"""Sequence packing: the samples of a GRPO minibatch in variable-length rows, as Moonlight's recipe trains.

Padding every sample of a micro-batch to the longest one wastes the compute of the pad tokens (a GRPO batch
mixes short and long responses); packing lays samples end to end in rows of at most ``grpo.packing_max_tokens``
tokens and tells the attention where each sample starts (``cu_seqlens``, Megatron's ``thd`` format through
``PackedSeqParams``), so no token attends across a sample boundary and MLA's rotary embedding restarts its
positions at every sample (Megatron's MLA takes the positions from ``cu_seqlens``).

The layout, for one row of ``T`` tokens (samples in the order they were packed)::

    tokens     p0 p0 p0 r0 r0 | p1 p1 r1 r1 r1 r1 | pad ...     (segments; cu_seqlens_padded = [0, 5, 11, T])
    positions  0  1  2  3  4  | 0  1  2  3  4  5  | 0 ...
    target[t]  = token t + 1 of the row, shifted on the whole row (before any context-parallel slicing)
    mask[t]    = 1 where token t + 1 is a response token of the same sample (the project's shift convention:
                 a sample's last token predicts nothing, a segment boundary never counts)

Alignment (``alignment``): under context parallelism (CP) every sample is padded at its end to a multiple of
2 x CP (each CP rank holds two of its 2 x CP chunks, Megatron's load-balanced split); every row is padded at
its end, with a padding segment, to a multiple of lcm(2 x CP, CP x TP) so that each CP rank's share splits
over TP (sequence parallelism). Padding sits after real tokens in causal order, so it changes nothing they see.

Work split (``assign_rows``): rows are packed first-fit-decreasing over the whole minibatch (fewest rows), then
dealt to the data-parallel ranks longest row first, each to the rank with the fewest tokens so far among those
with fewer than ceil(rows / DP) rows. Every DP rank (and so every EP rank, whose MoE layers exchange tokens in
every forward) then runs the same number of micro-batches, as Megatron's schedules and the expert dispatcher
require, with tokens as even as whole rows allow; a rank short of rows gets an empty, fully masked row of the
smallest aligned length. Context-parallel ranks of one DP rank share its rows (each holds its chunks of every
sample).

Micro-batches: ``grpo.micro_batch_size`` counts packed rows per micro-batch (the reference's 1 is one row of up
to ``packing_max_tokens`` tokens); several rows of a micro-batch are joined into one ``thd`` sequence. With
``equal_microbatches`` (expert parallelism with Megatron's ``allgather`` token dispatcher, the CPU one, which
all-gathers equal-sized token blocks over the EP ranks, and EP ranks are DP ranks) the i-th micro-batch of every
DP rank is padded to the longest of them.

Per-token tensors (mask, advantages, old / reference log-probs, TIS weights) are stored by the caller in the
padded ``[B, L - 1]`` layout of ``algorithm.build_training_batch`` and moved into the packed layout here
(``PackedMicrobatch``); log-probs computed in the packed layout go back with ``PackedMicrobatch.unpack``
(0 outside each sample's scored columns), so everything outside the trainer step keeps one layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from cookbook.config import packing_alignment

KEY = "grpo.packing_max_tokens"


@dataclass(frozen=True)
class PackingSpec:
    """Pack samples into rows of at most ``max_tokens`` tokens (``grpo.packing_max_tokens``)."""

    max_tokens: int = 4096

    @classmethod
    def from_config(cls, cfg) -> Optional["PackingSpec"]:
        """The spec of ``cfg.grpo`` when ``grpo.sequence_packing`` is on, else None (padded batches)."""
        return cls(cfg.grpo.packing_max_tokens) if cfg.grpo.sequence_packing else None


def alignment(tensor: int, context: int) -> tuple[int, int]:
    """(sample multiple, row multiple): every sample is padded to a multiple of 2 x CP (1 without CP), every
    row to a multiple of lcm(2 x CP, CP x TP) (each CP rank's share of the row splits over TP); config
    validation checks ``grpo.packing_max_tokens`` against the same numbers."""
    return packing_alignment(tensor, context)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class Row:
    """One packed row: segments ``(sample index or -1 for padding, real tokens, tokens with padding)``."""

    segments: tuple[tuple[int, int, int], ...]

    @property
    def tokens(self) -> int:
        return sum(s[2] for s in self.segments)

    @property
    def samples(self) -> list[int]:
        return [s[0] for s in self.segments if s[0] >= 0]


def empty_row(row_multiple: int) -> Row:
    """A fully masked row of the smallest aligned length (for a data-parallel rank short of rows)."""
    return Row(((-1, 0, row_multiple),))


def pack_rows(lengths: Sequence[int], max_tokens: int, sample_multiple: int = 1, row_multiple: int = 1) -> list[Row]:
    """First-fit-decreasing packing of samples (``lengths`` = prompt + response tokens) into rows of at most
    ``max_tokens``; each row ends with a padding segment up to a multiple of ``row_multiple``.
    Raises ValueError naming ``grpo.packing_max_tokens`` for a sample that cannot fit a row."""
    if max_tokens % row_multiple:
        raise ValueError(f"{KEY}={max_tokens} is not a multiple of {row_multiple} (the layout's row alignment)")
    padded = [_round_up(max(int(n), 1), sample_multiple) for n in lengths]
    for i, (n, p) in enumerate(zip(lengths, padded)):
        if p > max_tokens:
            aligned = f" ({p} once padded to a multiple of {sample_multiple} for context parallelism)" \
                if p != n else ""
            raise ValueError(
                f"sample {i} has {n} tokens (prompt + response){aligned}, more than {KEY}={max_tokens}: a packed "
                f"row holds whole samples; raise {KEY} (a multiple of {row_multiple}) to at least "
                f"{_round_up(p, row_multiple)}, or lower grpo.max_prompt_length / grpo.max_response_length")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(padded)), key=lambda i: (-padded[i], i)):
        for r, space in enumerate(free):
            if padded[i] <= space:
                rows[r].append(i)
                free[r] -= padded[i]
                break
        else:
            rows.append([i])
            free.append(max_tokens - padded[i])
    out = []
    for members in rows:
        members.sort()  # batch order inside a row: easier to read, and the result does not depend on it
        segments = [(i, int(lengths[i]), padded[i]) for i in members]
        used = sum(padded[i] for i in members)
        tail = _round_up(used, row_multiple) - used
        if tail:
            segments.append((-1, 0, tail))
        out.append(Row(tuple(segments)))
    return out


def assign_rows(rows: Sequence[Row], dp: int, row_multiple: int = 1) -> list[list[Row]]:
    """Deal rows to ``dp`` data-parallel ranks: equal row counts (empty rows added), tokens balanced
    (longest row first, to the rank with the fewest tokens among those with room). Deterministic, so every
    rank computes the same plan from the same global batch."""
    per = max(1, -(-len(rows) // dp))
    ranks: list[list[Row]] = [[] for _ in range(dp)]
    load = [0] * dp
    for row in sorted(rows, key=lambda r: -r.tokens):
        rank = min((r for r in range(dp) if len(ranks[r]) < per), key=lambda r: (load[r], r))
        ranks[rank].append(row)
        load[rank] += row.tokens
    for mine in ranks:
        mine.extend(empty_row(row_multiple) for _ in range(per - len(mine)))
    return ranks


@dataclass
class PackedLayout:
    """The packing plan of one global (mini)batch for one parallel layout: every DP rank's rows, cut into
    micro-batches of ``rows_per_micro`` rows. Built the same on every rank."""

    lengths: list[int]
    ranks: list[list[Row]]
    rows_per_micro: int
    sample_multiple: int
    row_multiple: int
    equal_microbatches: bool = False

    @classmethod
    def build(cls, lengths: Sequence[int], spec: PackingSpec, *, dp: int = 1, tensor: int = 1, context: int = 1,
              rows_per_micro: int = 1, equal_microbatches: bool = False) -> "PackedLayout":
        sample, row = alignment(tensor, context)
        if spec.max_tokens % row:
            raise ValueError(f"{KEY}={spec.max_tokens} is not a multiple of {row} = lcm(2 x parallel.context, "
                             f"parallel.context x parallel.tensor) for context={context}, tensor={tensor}")
        rows = pack_rows(lengths, spec.max_tokens, sample, row)
        return cls([int(n) for n in lengths], assign_rows(rows, dp, row), max(1, rows_per_micro), sample, row,
                   equal_microbatches)

    @property
    def rows(self) -> list[Row]:
        return [r for mine in self.ranks for r in mine]

    def _cut(self, dp_rank: int) -> list[list[Row]]:
        mine = self.ranks[dp_rank]
        return [mine[i:i + self.rows_per_micro] for i in range(0, len(mine), self.rows_per_micro)]

    def microbatch_rows(self, dp_rank: int) -> list[list[Row]]:
        """This DP rank's micro-batches (lists of rows joined into one sequence); with ``equal_microbatches``
        each ends with a padding row up to the longest i-th micro-batch of all DP ranks."""
        mine = self._cut(dp_rank)
        if not self.equal_microbatches:
            return mine
        longest = [max(sum(r.tokens for r in rank_cut[i]) for rank_cut in map(self._cut, range(len(self.ranks))))
                   for i in range(len(mine))]
        return [rows + [Row(((-1, 0, n - sum(r.tokens for r in rows)),))] if n > sum(r.tokens for r in rows)
                else rows for rows, n in zip(mine, longest)]

    def stats(self) -> dict[str, float]:
        """Rows, tokens (with padding) and the share of them that are sample tokens."""
        total = sum(r.tokens for r in self.rows)
        return {"rows": len(self.rows), "tokens": total, "fill": sum(self.lengths) / max(total, 1),
                "rows_per_rank": len(self.ranks[0]),
                "max_rank_tokens": max(sum(r.tokens for r in m) for m in self.ranks)}


@dataclass
class PackedMicrobatch:
    """One micro-batch of packed rows, joined into one ``thd`` sequence, as one CP rank holds it.

    ``local`` are this CP rank's positions in the full sequence (chunks r and 2CP-1-r of every segment);
    ``source`` maps each of them to the flat index ``sample * width + column`` of the padded ``[B, L - 1]``
    per-token layout, or -1 where nothing is scored (a sample's last token, padding)."""

    input_ids: torch.Tensor  # [1, t] this CP rank's tokens
    position_ids: torch.Tensor  # [1, t] restarting at every sample
    targets: torch.Tensor  # [1, t] next token of the full row, shifted before slicing
    source: torch.Tensor  # [t] long
    cu_seqlens: torch.Tensor  # [segments + 1] int32, real tokens (TE's cu_seqlens_q)
    cu_seqlens_padded: torch.Tensor  # [segments + 1] int32, the layout (what attention and rope use)
    max_seqlen: int
    width: int  # L - 1 of the padded layout
    full_tokens: int  # tokens of the whole sequence over all CP ranks

    def pack(self, padded: Optional[torch.Tensor], fill: float = 0.0) -> Optional[torch.Tensor]:
        """A per-token ``[B, L - 1]`` tensor (or per-sample ``[B]``, broadcast over its tokens) in this
        micro-batch's layout ``[1, t]``; ``fill`` where nothing is scored."""
        if padded is None:
            return None
        valid = self.source >= 0
        index = self.source.clamp(min=0)
        flat = padded[index // self.width] if padded.dim() == 1 else padded.reshape(-1)[index]
        return torch.where(valid, flat, torch.full_like(flat, fill)).unsqueeze(0)

    def unpack(self, packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write this micro-batch's ``[1, t]`` (or ``[t]``) values into the padded ``[B, L - 1]`` ``out``."""
        valid = self.source >= 0
        out.view(-1)[self.source[valid]] = packed.reshape(-1)[valid.to(packed.device)].to(out.dtype).cpu()
        return out

    def packed_seq_params(self, device: torch.device):
        from megatron.core.packed_seq_params import PackedSeqParams

        cu, cu_pad = self.cu_seqlens.to(device), self.cu_seqlens_padded.to(device)
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
                               cu_seqlens_kv_padded=cu_pad, max_seqlen_q=self.max_seqlen,
                               max_seqlen_kv=self.max_seqlen)


def cp_local_positions(segment_lengths: torch.Tensor, context: int, cp_rank: int) -> torch.Tensor:
    """This CP rank's positions in a packed sequence: of every segment (length a multiple of 2 x CP), chunk
    ``cp_rank`` then chunk ``2 CP - 1 - cp_rank`` of its 2 x CP equal chunks, the split Megatron's thd rope
    (``_get_thd_freqs_on_this_cp_rank``) assumes."""
    total = int(segment_lengths.sum())
    if context == 1:
        return torch.arange(total)
    seg = torch.repeat_interleave(torch.arange(len(segment_lengths)), segment_lengths)
    starts = torch.cumsum(segment_lengths, 0) - segment_lengths
    pos = torch.arange(total) - starts[seg]
    chunk = pos // (segment_lengths[seg] // (2 * context))
    return torch.nonzero((chunk == cp_rank) | (chunk == 2 * context - 1 - cp_rank)).squeeze(1)


def build_microbatch(rows: Sequence[Row], input_ids: torch.Tensor, pad_id: int, *, context: int = 1,
                     cp_rank: int = 0) -> PackedMicrobatch:
    """The packed ``thd`` micro-batch of ``rows`` (joined) from the padded ``input_ids [B, L]``, for CP rank
    ``cp_rank`` of ``context``."""
    segments = [s for row in rows for s in row.segments]
    sample = torch.tensor([s[0] for s in segments])
    real = torch.tensor([s[1] for s in segments])
    length = torch.tensor([s[2] for s in segments])
    total = int(length.sum())
    seg = torch.repeat_interleave(torch.arange(len(segments)), length)
    starts = torch.cumsum(length, 0) - length
    pos = torch.arange(total) - starts[seg]
    who = sample[seg]
    is_token = (who >= 0) & (pos < real[seg])
    ids = torch.full((total,), pad_id, dtype=torch.long)
    ids[is_token] = input_ids[who[is_token], pos[is_token]]
    targets = torch.cat([ids[1:], torch.tensor([pad_id])])  # shifted on the full sequence, before CP slicing
    width = input_ids.shape[1] - 1
    scored = (who >= 0) & (pos < real[seg] - 1)
    source = torch.where(scored, who * width + pos, torch.full_like(pos, -1))
    local = cp_local_positions(length, context, cp_rank)
    zero = torch.zeros(1, dtype=torch.int32)
    return PackedMicrobatch(
        input_ids=ids[local].unsqueeze(0), position_ids=pos[local].unsqueeze(0), targets=targets[local].unsqueeze(0),
        source=source[local], cu_seqlens=torch.cat([zero, torch.cumsum(real, 0).to(torch.int32)]),
        cu_seqlens_padded=torch.cat([zero, torch.cumsum(length, 0).to(torch.int32)]),
        max_seqlen=int(length.max()), width=width, full_tokens=total)
