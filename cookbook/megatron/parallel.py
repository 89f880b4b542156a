"""The layout-aware pieces of training one Megatron-Core model under any TP / EP / PP / DP layout.

Plain torch would take full logits, ``clip_grad_norm_`` and ``state_dict()``; under a parallel layout each of
those changes meaning, and this module gives the version that is right for every layout, TP = EP = PP = 1
included, so the trainer group (``cookbook.grpo.trainer``) has one code path for one rank and for many:

- log-probs and entropy from vocab-parallel logits (each TP rank holds ``vocab / TP`` columns);
- the data-parallel shard of a global batch (EP ranks are DP ranks for the dense layers);
- the gradient reductions Megatron's DDP + ``finalize_model_grads`` would do (we use plain torch
  optimizers, whose DDP hard-codes CUDA): sequence-parallel norms and router over TP, dense parameters
  over DP, routed experts over expert-DP;
- the global gradient norm (each parameter counted once, whatever its sharding) and clipping;
- the full, single-process-named tensors of a sharded model, for checks, and in buckets of whole layers
  gathered on one rank for the HF weight sync (peak memory one bucket, not the model).
"""
from __future__ import annotations

import re
from typing import Iterator, Optional

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def parallel_state():
    """Megatron's ``parallel_state`` module (imported late: importing megatron.core takes seconds)."""
    from megatron.core import parallel_state as ps

    return ps


def layout() -> dict[str, int]:
    """The sizes and this rank's coordinates of the current Megatron layout (for logs and checks)."""
    ps = parallel_state()
    return {
        "world": dist.get_world_size(), "rank": dist.get_rank(),
        "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size(),
        "expert_dp": ps.get_expert_data_parallel_group().size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(), "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "ep_rank": ps.get_expert_model_parallel_rank(), "dp_rank": ps.get_data_parallel_rank(),
    }


# -- the batch ------------------------------------------------------------------------------------
def data_parallel_rows(n: int) -> slice:
    """This data-parallel rank's contiguous rows of a global batch of ``n`` (equal shares: with experts
    spread over the DP ranks, every rank must run the same number of forward passes)."""
    ps = parallel_state()
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if n % dp:
        raise ValueError(f"a batch of {n} sequences does not split evenly over {dp} data-parallel ranks; "
                         "make prompts_per_step * samples_per_prompt / num_minibatches a multiple of it")
    share = n // dp
    return slice(rank * share, (rank + 1) * share)


def sequence_multiple() -> int:
    """Sequence lengths must be a multiple of this (sequence parallelism splits tokens over TP)."""
    return parallel_state().get_tensor_model_parallel_world_size()


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized row blocks of every data-parallel rank, in rank order."""
    group = parallel_state().get_data_parallel_group()
    if group.size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(group.size())]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def broadcast_from_last_stage(tensor: Optional[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
                              device: torch.device) -> torch.Tensor:
    """A tensor computed on the last pipeline stage, on every stage of this pipeline."""
    ps = parallel_state()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(tensor, src=ps.get_pipeline_model_parallel_last_rank(),
                   group=ps.get_pipeline_model_parallel_group())
    return tensor


# -- log-probs from vocab-parallel logits --------------------------------------------------------
def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 log-prob of each target and the entropy of each position, from logits ``[..., vocab / TP]``.

    The same quantities as ``cookbook.grpo.algorithm.token_logprobs`` without gathering the vocabulary:
    the log-prob is minus Megatron's ``vocab_parallel_cross_entropy`` (its backward is the memory-lean
    one); megatron-core has no vocab-parallel entropy, so it is computed here from three TP reductions,
    differentiable (an all-reduce's backward is the identity on each rank's shard).
    """
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region, vocab_parallel_cross_entropy

    if temperature <= 0:
        raise ValueError(f"temperature {temperature}: must be > 0 (config key grpo.temperature)")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on [B, T]")
    group = parallel_state().get_tensor_model_parallel_group()
    # the cross entropy works in place on its input: give it a tensor of its own
    logp = -vocab_parallel_cross_entropy(logits.float() / temperature, targets)
    scaled = logits.float() / temperature
    with torch.no_grad():
        shift = scaled.max(dim=-1).values
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    z = scaled - shift.unsqueeze(-1)
    e = z.exp()
    sum_e = reduce_from_tensor_model_parallel_region(e.sum(-1))
    sum_ez = reduce_from_tensor_model_parallel_region((e * z).sum(-1))
    entropy = sum_e.log() - sum_ez / sum_e
    return logp, entropy


# -- gradients ------------------------------------------------------------------------------------
def is_expert_parameter(name: str) -> bool:
    """Routed-expert weights: replicated over expert-DP, not over DP (the shared expert is dense)."""
    return ".mlp.experts." in name


def _params(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    for name, param in model.named_parameters():
        if param.requires_grad and param.grad is not None:
            yield name, param


def _all_reduce_coalesced(grads: list[torch.Tensor], group) -> None:
    if not grads or group.size() == 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def finish_grad_sync(model: torch.nn.Module) -> None:
    """Sum gradients where several ranks each hold part of one parameter's gradient.

    Losses are sums over this rank's tokens divided by the token count of the whole global batch, so the
    reductions are sums, never means: over TP for weights marked ``sequence_parallel`` (norms, router;
    each rank saw its own sequence shard), over DP for dense parameters, over expert-DP for routed
    experts. (What Megatron's DDP and ``finalize_model_grads`` do, for plain torch optimizers.)
    """
    ps = parallel_state()
    if model.config.sequence_parallel:
        _all_reduce_coalesced([p.grad for _, p in _params(model) if getattr(p, "sequence_parallel", False)],
                              ps.get_tensor_model_parallel_group())
    params = list(_params(model))
    _all_reduce_coalesced([p.grad for n, p in params if not is_expert_parameter(n)],
                          ps.get_data_parallel_group(with_context_parallel=True))
    _all_reduce_coalesced([p.grad for n, p in params if is_expert_parameter(n)],
                          ps.get_expert_data_parallel_group())


def grad_norm(model: torch.nn.Module) -> float:
    """The L2 norm of the whole model's gradient, each parameter counted once: TP-sharded weights by every
    shard, TP-replicated ones by TP rank 0, summed over the pipeline stages and expert-parallel ranks.
    Call after ``finish_grad_sync`` (replicas then hold equal gradients)."""
    ps = parallel_state()
    tp_rank = ps.get_tensor_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    dense = torch.zeros((), dtype=torch.float64)
    expert = torch.zeros((), dtype=torch.float64)
    for name, param in _params(model):
        sq = param.grad.detach().double().pow(2).sum().cpu()
        if is_expert_parameter(name):
            if getattr(param, "tensor_model_parallel", False) or etp_rank == 0:
                expert += sq
        elif getattr(param, "tensor_model_parallel", False) or tp_rank == 0:
            dense += sq
    device = next(model.parameters()).device
    dense, expert = dense.to(device), expert.to(device)
    dist.all_reduce(dense, group=ps.get_model_parallel_group())  # TP x PP
    dist.all_reduce(expert, group=ps.get_expert_tensor_model_pipeline_parallel_group())  # ETP x EP x PP
    return float((dense + expert).sqrt())


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Scale the gradients so that their global norm is at most ``max_norm`` (the coefficient
    ``torch.nn.utils.clip_grad_norm_`` uses); returns the norm before clipping."""
    norm = grad_norm(model)
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for _, param in _params(model):
            param.grad.mul_(coef)
    return norm


# -- full tensors from a sharded model --------------------------------------------------------------
def _global_name(name: str, layer_numbers: dict[int, int], expert_offset: int) -> str:
    """Local (this stage's layer, this EP rank's expert) name -> the single-process model's name."""
    layer = _LAYER.match(name)
    if layer:
        name = f"decoder.layers.{layer_numbers[int(layer.group(1))]}." + name[layer.end():]
    expert = _EXPERT.search(name)
    if expert:
        name = name[:expert.start()] + f".local_experts.{int(expert.group(1)) + expert_offset}." + name[expert.end():]
    return name


def _is_glu_fc1(name: str, model: torch.nn.Module) -> bool:
    return model.config.gated_linear_unit and name.endswith("linear_fc1.weight")


def _join_shards(shards: list[torch.Tensor], dim: int, glu: bool) -> torch.Tensor:
    if len(shards) == 1:
        return shards[0]
    if glu:  # each shard is [gate_r; up_r]: the full tensor is [gate_0 .. gate_n; up_0 .. up_n]
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def _group_of(name: str) -> str:
    """Which transfer group a global tensor name belongs to: a decoder layer, or the embedding / the head."""
    layer = _LAYER.match(name)
    if layer:
        return f"layer.{int(layer.group(1)):06d}"
    return "0.embedding" if name.startswith("embedding") else "z.head"


def _contributions(model: torch.nn.Module, grads: bool, groups: Optional[set[str]] = None
                   ) -> Iterator[tuple[str, int, int, bool, torch.Tensor]]:
    """What this rank contributes to the full tensors: (global name, shard rank, partition dim, gated fc1,
    local tensor), only for ``groups`` when given. TP shards come from every TP rank of their group (expert TP
    for experts), replicated tensors from rank 0 of their TP group and of their DP (or expert-DP) group."""
    ps = parallel_state()
    tp_rank, etp_rank = ps.get_tensor_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
    dp_rank, edp_rank = ps.get_data_parallel_rank(with_context_parallel=True), ps.get_expert_data_parallel_rank()
    num_local_experts = model.config.num_moe_experts // ps.get_expert_model_parallel_world_size() \
        if model.config.num_moe_experts else 0
    expert_offset = ps.get_expert_model_parallel_rank() * num_local_experts
    layer_numbers = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    params = dict(model.named_parameters())
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        global_name = _global_name(name, layer_numbers, expert_offset)
        if groups is not None and _group_of(global_name) not in groups:
            continue
        param = params.get(name)
        if grads:
            if param is None or param.grad is None:
                continue
            tensor = param.grad
        expert = is_expert_parameter(name)
        sharded = param is not None and getattr(param, "tensor_model_parallel", False)
        shard_rank = (etp_rank if expert else tp_rank) if sharded else 0
        if (not sharded and (etp_rank if expert else tp_rank) != 0) or (edp_rank if expert else dp_rank) != 0:
            continue
        dim = getattr(param, "partition_dim", 0) if sharded else 0
        yield global_name, shard_rank, dim, _is_glu_fc1(name, model), tensor.detach()


def _local_pieces(model: torch.nn.Module, grads: bool, groups: Optional[set[str]] = None, to_cpu: bool = True
                  ) -> dict[str, tuple[int, int, bool, torch.Tensor]]:
    """``_contributions`` as copies ready to send (on the CPU), or, for one rank, the tensors themselves where
    they are: global name -> (shard rank, dim, glu, data)."""
    return {name: (shard, dim, glu, t.cpu().clone() if to_cpu else t) for name, shard, dim, glu, t in
            _contributions(model, grads, groups)}


def _join_pieces(everyone: list[dict]) -> dict[str, torch.Tensor]:
    pieces: dict[str, dict[int, tuple[int, bool, torch.Tensor]]] = {}
    for rank_pieces in everyone:
        for name, (shard_rank, dim, glu, data) in rank_pieces.items():
            pieces.setdefault(name, {})[shard_rank] = (dim, glu, data)
    full = {}
    for name, shards in pieces.items():
        ordered = [shards[r] for r in sorted(shards)]
        if sorted(shards) != list(range(len(shards))):
            raise RuntimeError(f"'{name}': shards {sorted(shards)} gathered; a rank's piece is missing")
        full[name] = _join_shards([s[2] for s in ordered], ordered[0][0], ordered[0][1])
    return dict(sorted(full.items(), key=lambda kv: _sort_key(kv[0])))


def gather_full_tensors(model: torch.nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (or, with ``grads``, every parameter's gradient) of a model built under
    any layout, as full CPU tensors named as in the single-process model, on every rank (for checks and
    small models; the weight sync streams ``iter_full_tensor_buckets`` instead).

    Each tensor is contributed once (``_local_pieces``) and TP shards are joined along their partition
    dimension (a gated fc1 as gates then ups); pipeline stages and EP ranks each add what they hold."""
    everyone: list[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, _local_pieces(model, grads))
    return _join_pieces(everyone)


def plan_buckets(model: torch.nn.Module, bucket_bytes: int) -> list[list[str]]:
    """Transfer groups (the embedding, each decoder layer, the head; never split, so that a receiver loads
    whole layers) packed in order into buckets of at most ``bucket_bytes`` (a larger group goes alone).
    Collective: the full size of every group comes from one small gather of each rank's share."""
    sizes: dict[str, int] = {}
    for name, _, _, _, t in _contributions(model, grads=False):
        sizes[_group_of(name)] = sizes.get(_group_of(name), 0) + t.numel() * t.element_size()
    everyone: list[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sizes)
    total: dict[str, int] = {}
    for rank_sizes in everyone:
        for group, nbytes in rank_sizes.items():
            total[group] = total.get(group, 0) + nbytes
    buckets: list[list[str]] = []
    filled = 0
    for group in sorted(total):
        if not buckets or filled + total[group] > bucket_bytes:
            buckets.append([])
            filled = 0
        buckets[-1].append(group)
        filled += total[group]
    return buckets


def iter_full_tensor_buckets(model: torch.nn.Module, bucket_bytes: int, dst: int = 0
                             ) -> Iterator[dict[str, torch.Tensor]]:
    """The model's full tensors (single-process names) one bucket at a time, gathered on global rank ``dst``
    (other ranks get empty dicts and must iterate in step: every bucket is a collective). Peak extra memory on
    ``dst`` is one bucket (or the largest layer), not the model. A group of one rank gathers nothing: its
    tensors come as they are, on their device."""
    for groups in plan_buckets(model, bucket_bytes):
        if dist.get_world_size() == 1:
            yield _join_pieces([_local_pieces(model, grads=False, groups=set(groups), to_cpu=False)])
            continue
        everyone: Optional[list[dict]] = [None] * dist.get_world_size() if dist.get_rank() == dst else None
        dist.gather_object(_local_pieces(model, grads=False, groups=set(groups)), everyone, dst=dst)
        yield _join_pieces(everyone) if everyone is not None else {}


def _sort_key(name: str) -> tuple:
    layer = _LAYER.match(name)
    expert = _EXPERT.search(name)
    return (0 if name.startswith("embedding") else 2 if layer is None else 1,
            int(layer.group(1)) if layer else 0, int(expert.group(1)) if expert else -1, name)


def gather_hf_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF-named full weights of a model trained under any layout, through the one name table
    ``cookbook.convert.names``; on every rank (checks; the sync uses ``iter_hf_buckets``)."""
    from cookbook.convert.names import megatron_to_hf_tensors

    return {name: t.contiguous() for name, t in megatron_to_hf_tensors(gather_full_tensors(model).items())}


def iter_hf_buckets(model: torch.nn.Module, bucket_bytes: int, dst: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """``iter_full_tensor_buckets`` with HF names (``cookbook.convert.names``): the rollout engine's weight sync."""
    from cookbook.convert.names import megatron_to_hf_tensors

    for bucket in iter_full_tensor_buckets(model, bucket_bytes, dst):
        yield {name: t.contiguous() for name, t in megatron_to_hf_tensors(bucket.items())}
