"""One rank of the vocabulary-parallel fused GRPO loss check (tests/kernels/test_grpo_loss_tp.py).

Run as WORLD_SIZE gloo processes (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT); Megatron's parallel state with
tensor = WORLD_SIZE gives the TP group. Each rank holds rows ``[r * V / TP, (r + 1) * V / TP)`` of the output
weight and runs ``fused_linear_grpo_loss(..., vocab_shard=...)`` (the Triton kernels when TRITON_INTERPRET=1,
else the torch reference). Compared, with the hidden-state gradient summed and the weight gradient gathered
over the group:
- against the single-rank reference on the whole vocabulary (``fused_linear_grpo_loss_reference``);
- against the project's unfused vocab-parallel path (the logits of ColumnParallelLinear's input handling,
  ``vocab_parallel_logprobs``, ``policy_loss``), as the trainer runs it without the switch.
Rank 0 prints ``RESULT <json>``: relative errors ||a - b|| / ||b|| per quantity, and what the ranks disagree on.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from test_grpo_loss import FULL, cookbook_policy_loss, errors, make_case, run_fused

N, H, V_SHARD = 19, 32, 133  # 2 x 133: two 128-wide blocks with a ragged tail per shard in interpret mode
CHUNK = 8  # three token chunks over 19 tokens


def setup() -> tuple[int, int, object]:
    from cookbook.config import load_config
    from cookbook.megatron.model import init_parallel
    from cookbook.megatron.parallel import parallel_state

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = load_config("tiny", overrides=[f"parallel.tensor={world}", "parallel.sequence_parallel=true"])
    init_parallel(cfg, rank=rank, world_size=world)
    return rank, world, parallel_state().get_tensor_model_parallel_group()


def gathered(res: dict, group, sum_dh: bool = True) -> dict:
    """The whole-vocabulary view of one rank's result: dh summed (unless already), dW's shards concatenated."""
    out = dict(res)
    if sum_dh and res.get("dh") is not None:
        out["dh"] = res["dh"].clone()
        dist.all_reduce(out["dh"], group=group)
    if res.get("dw") is not None:
        parts = [torch.empty_like(res["dw"]) for _ in range(group.size())]
        dist.all_gather(parts, res["dw"].contiguous(), group=group)
        out["dw"] = torch.cat(parts)
    return out


def shard_of(c: dict, rank: int) -> dict:
    return dict(c, weight=c["weight"][rank * V_SHARD:(rank + 1) * V_SHARD])


def vocab_shard(group):
    from kernels.grpo_loss import VocabShard

    return VocabShard.of_group(group, V_SHARD)


def fused_tp(c: dict, kw: dict, group, rank: int, **extra) -> dict:
    from kernels.grpo_loss import fused_linear_grpo_loss

    return gathered(run_fused(fused_linear_grpo_loss, shard_of(c, rank), kw, vocab_shard=vocab_shard(group),
                              **extra), group)


def unfused_tp(c: dict, kw: dict, rank: int) -> dict:
    """The trainer's path without the switch: ColumnParallelLinear's logits, ``vocab_parallel_logprobs``,
    ``policy_loss``; the input's TP copy sums its gradient over the group."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    from cookbook.megatron.parallel import parallel_state, vocab_parallel_logprobs

    h = c["hidden"].clone().requires_grad_()
    w = shard_of(c, rank)["weight"].clone().requires_grad_()
    logits = copy_to_tensor_model_parallel_region(h) @ w.t()
    logp, ent = vocab_parallel_logprobs(logits[None], c["targets"][None], temperature=kw["temperature"])
    out = cookbook_policy_loss(logp, ent, c, kw)
    out.loss.backward()
    return gathered(dict(loss=out.loss.detach(), logp=logp.detach()[0], entropy=ent.detach()[0], dh=h.grad,
                         dw=w.grad), parallel_state().get_tensor_model_parallel_group(), sum_dh=False)


def spread(res: dict, group) -> float:
    """Largest difference between ranks in the loss, log-probs and entropies (all ranks must agree)."""
    worst = 0.0
    for k in ("loss", "logp", "entropy"):
        parts = [torch.empty_like(res[k]) for _ in range(group.size())]
        dist.all_gather(parts, res[k].contiguous(), group=group)
        worst = max(worst, max(float((p - parts[0]).abs().max()) for p in parts))
    return worst


def checks() -> dict:
    from kernels.grpo_loss import fused_linear_grpo_loss
    from kernels.grpo_loss_reference import fused_linear_grpo_loss_reference

    rank, world, group = setup()
    c = make_case(N, H, world * V_SHARD, seed=11)
    want = run_fused(fused_linear_grpo_loss_reference, c, FULL)
    got = fused_tp(c, FULL, group, rank, chunk_size=CHUNK)
    plain = dict(FULL, logratio_clamp=None, loss_cap=None, kl_coef=0.0, entropy_coef=0.0)
    with torch.no_grad():
        nograd = fused_linear_grpo_loss(c["hidden"], shard_of(c, rank)["weight"], c["targets"], c["old"], c["adv"],
                                        c["mask"], ref_logp=c["ref"], is_weights=c["isw"], chunk_size=CHUNK,
                                        vocab_shard=vocab_shard(group), **FULL)
    return {
        "interpret": os.environ.get("TRITON_INTERPRET") == "1", "world": world,
        "targets_per_shard": [int(((c["targets"] // V_SHARD) == r).sum()) for r in range(world)],
        "vs_full_reference": errors(got, want),
        "vs_unfused_tp": errors(got, unfused_tp(c, FULL, rank)),
        "plain_one_chunk": errors(fused_tp(c, plain, group, rank), run_fused(fused_linear_grpo_loss_reference, c,
                                                                             plain)),
        "grad_scaled": errors(fused_tp(c, FULL, group, rank, grad_scale=-2.5, chunk_size=CHUNK),
                              run_fused(fused_linear_grpo_loss_reference, c, FULL, grad_scale=-2.5)),
        "nograd_vs_grad": errors(dict(zip(("loss", "logp", "entropy"), nograd)), got),
        "ranks_disagree": spread(got, group),
    }


if __name__ == "__main__":
    result = checks()
    if int(os.environ["RANK"]) == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()
