"""Sequence packing (``cookbook.grpo.packing``) and its place in the trainer's step: the packing plan, the layout
of a packed row (positions restart at every sample, targets shifted on the full row, the CP split Megatron's thd
rope assumes), the config checks, and packed rows giving the padded batch's numbers in one process.

Tolerances (fp32, tiny model with random weights; measured 2026-12-02 on the 2-core AMD EPYC):
- per-token log-probs, packed vs padded: the same tokens go through the same weights, only the matmul shapes
  (one [t, h] row instead of [B, L, h]) and the attention calls (segments batched by length) differ, so fp32
  rounding of log-probs of size ~6 remains: measured 9.5e-7 (max over every scored token), asserted < 1e-5;
- loss and grad norm, relative: measured 2.8e-7 and 3.4e-8, asserted < 1e-5; gradients per tensor relative to
  their largest element: measured 1.2e-6, asserted < 1e-4. A row run as one sequence (samples attending
  across their boundaries, rope positions not restarting) gives log-prob differences of 0.96, so these bounds
  catch a layout error by orders of magnitude;
- the fused-loss path on packed rows (CPU: the kernel's torch reference) against the unfused packed path:
  measured 9e-8 loss, 5.7e-7 gradients; asserted as above.
"""
import dataclasses

import pytest
import torch

from cookbook.config import ConfigError, load_config
from cookbook.grpo import algorithm as A
from cookbook.grpo.packing import (PackedLayout, PackingSpec, alignment, assign_rows, build_microbatch,
                                   cp_local_positions, pack_rows)

# -- the plan ------------------------------------------------------------------------------------------


def test_rows_hold_whole_samples_first_fit_decreasing_and_end_aligned():
    rows = pack_rows([5, 9, 3, 7, 2, 6], max_tokens=12, sample_multiple=1, row_multiple=4)
    assert sorted(i for r in rows for i in r.samples) == list(range(6))
    assert all(r.tokens <= 12 and r.tokens % 4 == 0 for r in rows)
    assert len(rows) == 3  # 32 tokens in rows of 12: three rows is the fewest
    for r in rows:  # the padding segment, if any, is last and has no real tokens
        assert all(s[0] >= 0 for s in r.segments[:-1]) and (r.segments[-1][0] >= 0 or r.segments[-1][1] == 0)


def test_context_parallel_pads_every_sample_to_two_chunks_per_rank():
    assert alignment(tensor=1, context=1) == (1, 1) and alignment(2, 1) == (1, 2)
    assert alignment(1, 2) == (4, 4) and alignment(2, 2) == (4, 4) and alignment(4, 2) == (4, 8)
    rows = pack_rows([5, 3, 8], max_tokens=16, sample_multiple=4, row_multiple=4)
    assert {s[0]: s[2] for r in rows for s in r.segments if s[0] >= 0} == {0: 8, 1: 4, 2: 8}


def test_a_sample_longer_than_a_row_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"sample 1 has 15 tokens.*grpo.packing_max_tokens=12.*at least 16"):
        pack_rows([4, 15], max_tokens=12, row_multiple=4)
    with pytest.raises(ValueError, match=r"sample 0 has 11 tokens .* \(12 once padded.*context parallelism\)"):
        pack_rows([11], max_tokens=10, sample_multiple=4, row_multiple=2)


def test_every_data_parallel_rank_gets_as_many_rows_with_tokens_balanced():
    rows = pack_rows([100, 90, 80, 70, 60, 50, 40, 30, 20], max_tokens=100, row_multiple=2)
    ranks = assign_rows(rows, dp=2, row_multiple=2)
    assert len(ranks[0]) == len(ranks[1]) == -(-len(rows) // 2)
    loads = [sum(r.tokens for r in m) for m in ranks]
    assert abs(loads[0] - loads[1]) <= max(r.tokens for r in rows)
    # an odd number of rows: the short rank gets an empty, fully masked row of the smallest aligned length
    ranks = assign_rows(pack_rows([10, 10, 10], max_tokens=10), dp=2, row_multiple=4)
    assert [len(m) for m in ranks] == [2, 2]
    assert [r.samples for r in ranks[1]][-1] == [] and ranks[1][-1].tokens == 4



def test_expert_parallel_allgather_gets_equal_token_blocks_on_every_rank():
    """Megatron's allgather dispatcher gathers equal-sized token blocks over the EP ranks (which are DP ranks):
    with ``equal_microbatches`` the i-th micro-batch of every DP rank has the same length."""
    lengths = [40, 37, 30, 22, 19, 12, 9, 5, 3]
    layout = PackedLayout.build(lengths, PackingSpec(48), dp=2, tensor=1, rows_per_micro=2, equal_microbatches=True)
    mine = [layout.microbatch_rows(r) for r in range(2)]
    assert len(mine[0]) == len(mine[1])
    for a, b in zip(*mine):
        assert sum(r.tokens for r in a) == sum(r.tokens for r in b)
    assert sorted(i for r in layout.rows for i in r.samples) == list(range(len(lengths)))

def test_packed_row_layout_positions_targets_and_the_padded_mapping():
    prompts, responses = [[11, 12, 13], [21, 22]], [[14, 15], [23, 24, 25, 26]]
    input_ids, mask, _ = A.build_training_batch(prompts, responses, pad_id=0)
    layout = PackedLayout.build([5, 6], PackingSpec(16), tensor=2)
    (rows,) = layout.microbatch_rows(0)
    mb = build_microbatch(rows, input_ids, pad_id=0)
    assert mb.input_ids.tolist() == [[11, 12, 13, 14, 15, 21, 22, 23, 24, 25, 26, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0]]
    assert mb.targets.tolist() == [[12, 13, 14, 15, 21, 22, 23, 24, 25, 26, 0, 0]]
    assert mb.cu_seqlens_padded.tolist() == [0, 5, 11, 12] and mb.max_seqlen == 6
    # the shift convention: mask[t] = target t is a response token of the same sample
    assert mb.pack(mask).tolist() == [[0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0]]
    assert mb.pack(torch.tensor([0.5, -1.0])).tolist() == [[.5] * 4 + [0] + [-1.0] * 5 + [0, 0]]
    logp = torch.arange(12, dtype=torch.float32).unsqueeze(0)
    back = mb.unpack(logp, torch.zeros_like(mask))
    assert back.tolist() == [[0, 1, 2, 3, 0], [5, 6, 7, 8, 9]]



def test_under_context_parallelism_targets_are_shifted_before_the_split():
    """A chunk's last token predicts the first token of the next chunk, which another CP rank holds: the shift
    happens on the full row (the bug peers had: shifting each rank's slice drops or misplaces those targets)."""
    prompts, responses = [[11, 12, 13], [21, 22]], [[14, 15, 16, 17, 18], [23, 24, 25, 26, 27, 28]]
    input_ids, mask, _ = A.build_training_batch(prompts, responses, pad_id=0)
    layout = PackedLayout.build([8, 8], PackingSpec(16), context=2)
    (rows,) = layout.microbatch_rows(0)
    full = build_microbatch(rows, input_ids, pad_id=0)
    seen = torch.zeros(16, dtype=torch.long)
    for rank in range(2):
        mb = build_microbatch(rows, input_ids, pad_id=0, context=2, cp_rank=rank)
        local = cp_local_positions(torch.tensor([8, 8]), 2, rank)
        assert torch.equal(mb.targets[0], full.targets[0, local])
        assert torch.equal(mb.input_ids[0], full.input_ids[0, local])
        assert torch.equal(mb.pack(mask)[0], full.pack(mask)[0, local])
        seen[local] += 1
    assert seen.tolist() == [1] * 16  # the two ranks hold every position once
    # rank 0 holds chunks 0 and 3 of each 8-token sample: positions 0-1 and 6-7
    assert cp_local_positions(torch.tensor([8, 8]), 2, 0).tolist() == [0, 1, 6, 7, 8, 9, 14, 15]

@pytest.mark.parametrize("context", [2, 4])
def test_cp_chunks_are_the_positions_megatron_thd_rope_gives_each_rank(context):
    from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank

    lengths = torch.tensor([8 * context, 2 * context, 4 * context])
    freqs = torch.arange(int(lengths.max()), dtype=torch.float32)  # "frequencies" that are the positions
    for rank in range(context):
        local = cp_local_positions(lengths, context, rank)
        starts = torch.cumsum(lengths, 0) - lengths
        seg = torch.repeat_interleave(torch.arange(3), lengths)
        ours = (local - starts[seg[local]]).float()
        theirs = torch.cat([_get_thd_freqs_on_this_cp_rank(rank, context, torch.empty(int(n) // context), freqs)
                            for n in lengths])
        assert torch.equal(ours, theirs)


# -- configuration --------------------------------------------------------------------------------------


def test_moonlight_preset_is_the_reference_layout_with_packing():
    moon = load_config("moonlight-16b-a3b")
    p, g = moon.parallel, moon.grpo
    assert (p.tensor, p.pipeline, p.context, p.expert, p.expert_tensor) == (2, 2, 2, 2, 2)
    assert g.sequence_packing and g.packing_max_tokens == 4096 and g.micro_batch_size == 1
    assert PackingSpec.from_config(moon) == PackingSpec(4096)
    assert PackingSpec.from_config(load_config("tiny")) is None


@pytest.mark.parametrize("overrides, message", [
    (["parallel.context=2"], "parallel.context=2 needs grpo.sequence_packing=true"),
    (["grpo.sequence_packing=true", "parallel.context=2", "grpo.packing_max_tokens=4094"],
     r"grpo.packing_max_tokens=4094 does not split over parallel.context=2 .* multiple of 4 .* use 4092, 4096"),
    (["grpo.sequence_packing=true", "parallel.context=2", "parallel.tensor=4", "parallel.sequence_parallel=true",
      "model.num_attention_heads=4", "grpo.packing_max_tokens=100"], r"multiple of 8 = lcm"),
    (["grpo.sequence_packing=true", "grpo.loss_aggregation=seq_mean"], "only token_mean"),
])
def test_packing_and_context_parallel_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_packing_and_context_parallel_are_accepted():
    cfg = load_config("tiny", ["parallel.context=2", "grpo.sequence_packing=true", "grpo.packing_max_tokens=64"])
    assert cfg.world_size == 2


# -- packed rows in the trainer's step (one process) -------------------------------------------------------

def _rollout(cfg, n=12, seed=5):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, cfg.model.vocab_size, (int(torch.randint(5, 14, (), generator=gen)),),
                             generator=gen).tolist() for _ in range(n)]
    responses = [torch.randint(2, cfg.model.vocab_size, (int(torch.randint(1, 12, (), generator=gen)),),
                               generator=gen).tolist() for _ in range(n)]
    advantages = A.group_advantages(torch.rand(n, generator=gen), n=4)
    return prompts, responses, advantages.tolist()


def _step(model, batch, g, fused=False):
    from cookbook.grpo.parallel_step import train_minibatch

    grads = {}

    def keep():
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    metrics = train_minibatch(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, g, fused=fused,
                              after_backward=keep)
    return metrics, grads


def _grad_error(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) > 10
    return max(float((a[n] - b[n]).abs().max()) / max(float(b[n].abs().max()), 1e-12) for n in a)


@pytest.fixture(scope="module")
def tiny():
    from cookbook.megatron.model import build_model, init_parallel

    torch.set_num_threads(1)
    cfg = load_config("tiny", ["grpo.sequence_packing=true", "grpo.packing_max_tokens=48", "grpo.micro_batch_size=2",
                               "grpo.kl_coef=0.05", "grpo.entropy_coef=0.01", "grpo.temperature=0.9"])
    init_parallel(cfg)
    return cfg, build_model(cfg)


def test_packed_rows_give_the_padded_batch_logprobs_loss_and_gradients(tiny):
    from cookbook.grpo.parallel_step import batch_from_rollout, forward_logprobs, packed_layout

    cfg, model = tiny
    g = cfg.grpo
    prompts, responses, adv = _rollout(cfg)
    padded = batch_from_rollout(prompts, responses, adv, pad_id=0)
    packed = batch_from_rollout(prompts, responses, adv, pad_id=0, packing=PackingSpec.from_config(cfg))
    layout = packed_layout(packed, g.micro_batch_size)
    assert layout.stats()["rows"] >= 3 and len(layout.microbatch_rows(0)) >= 2  # several rows, several micro-batches

    old_padded = forward_logprobs(model, padded.input_ids, padded.position_ids, micro_batch_size=4,
                                  temperature=g.temperature)
    old_packed = forward_logprobs(model, packed, micro_batch_size=g.micro_batch_size, temperature=g.temperature)
    scored = torch.zeros_like(padded.mask, dtype=torch.bool)  # every column whose target is a real token
    for i, n in enumerate(packed.lengths.tolist()):
        scored[i, :n - 1] = True
    assert float((old_packed - old_padded)[scored].abs().max()) < 1e-5
    assert float(old_packed[~scored].abs().max()) == 0.0

    gen = torch.Generator().manual_seed(1)
    ref = old_padded + 0.1 * torch.randn(old_padded.shape, generator=gen)
    isw = A.tis_weights(old_padded, old_padded + 0.05 * torch.randn(old_padded.shape, generator=gen), padded.mask, 2.0)
    extra = dict(old_logp=old_padded - 0.02, ref_logp=ref, is_weights=isw)
    m_pad, g_pad = _step(model, dataclasses.replace(padded, **extra), dataclasses.replace(g, micro_batch_size=4))
    m_pack, g_pack = _step(model, dataclasses.replace(packed, **extra), g)
    assert m_pack["num_tokens"] == m_pad["num_tokens"] == float(padded.mask.sum())
    assert abs(m_pack["loss"] - m_pad["loss"]) < 1e-5 * max(1.0, abs(m_pad["loss"]))
    assert abs(m_pack["grad_norm"] - m_pad["grad_norm"]) < 1e-5 * m_pad["grad_norm"]
    for key in ("pg_loss", "kl", "entropy", "is_weight_mean", "ratio_mean"):
        assert abs(m_pack[key] - m_pad[key]) < 1e-5, key
    assert _grad_error(g_pack, g_pad) < 1e-4

    # the fused loss (on CPU: the kernel's torch reference) on packed rows gives the unfused packed step
    m_fused, g_fused = _step(model, dataclasses.replace(packed, **extra), g, fused=True)
    assert abs(m_fused["loss"] - m_pack["loss"]) < 1e-5 * max(1.0, abs(m_pack["loss"]))
    assert _grad_error(g_fused, g_pack) < 1e-4


def test_a_sample_longer_than_a_packed_row_stops_the_step_naming_the_key(tiny):
    from cookbook.grpo.parallel_step import batch_from_rollout, forward_logprobs

    cfg, model = tiny
    batch = batch_from_rollout([[3] * 40], [[4] * 9], [1.0], pad_id=0, packing=PackingSpec(48))
    with pytest.raises(ValueError, match="sample 0 has 49 tokens.*grpo.packing_max_tokens=48"):
        forward_logprobs(model, batch, micro_batch_size=1)


# -- context-parallel attention (2 gloo processes, no model) ---------------------------------------------

def _cp_attention_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from cookbook.megatron.context_parallel import packed_cp_attention

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        lengths = torch.tensor([8, 4, 12, 4])
        t, h, dk, dv = int(lengths.sum()), 2, 5, 3
        q, k, v = torch.randn(t, h, dk, dtype=torch.float64), torch.randn(t, h, dk, dtype=torch.float64), \
            torch.randn(t, h, dv, dtype=torch.float64)
        upstream = torch.randn(t, h * dv, dtype=torch.float64)
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(lengths, 0).to(torch.int32)])
        local = cp_local_positions(lengths, world, rank)
        ql, kl, vl = (x[local].clone().requires_grad_() for x in (q, k, v))
        result = packed_cp_attention(ql, kl, vl, cu, dist.group.WORLD, softmax_scale=0.3)
        result.backward(upstream[local])
        torch.save({"local": local, "out": result.detach(), "grads": [x.grad for x in (ql, kl, vl)]},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_context_parallel_attention_equals_full_attention_forward_and_backward(tmp_path):
    """Each CP rank's output and its dQ/dK/dV (the all-gather's backward summed over ranks) equal full causal
    per-segment attention at that rank's positions, in float64 (so exact up to summation order: < 1e-12)."""
    import torch.multiprocessing as mp
    import torch.nn.functional as F

    from helpers import free_port

    mp.spawn(_cp_attention_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    lengths = torch.tensor([8, 4, 12, 4])
    t, h, dk, dv = int(lengths.sum()), 2, 5, 3
    q, k, v = (x.requires_grad_() for x in (torch.randn(t, h, dk, dtype=torch.float64),
                                            torch.randn(t, h, dk, dtype=torch.float64),
                                            torch.randn(t, h, dv, dtype=torch.float64)))
    upstream = torch.randn(t, h * dv, dtype=torch.float64)
    outs, start = [], 0
    for n in lengths.tolist():
        seg = [x[start:start + n].transpose(0, 1) for x in (q, k, v)]
        outs.append(F.scaled_dot_product_attention(*seg, is_causal=True, scale=0.3).transpose(0, 1))
        start += n
    full = torch.cat(outs).reshape(t, h * dv)
    full.backward(upstream)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        local = got["local"]
        assert float((got["out"] - full.detach()[local]).abs().max()) < 1e-12
        for mine, ref in zip(got["grads"], (q.grad, k.grad, v.grad)):
            assert float((mine - ref[local]).abs().max()) < 1e-12
