"""MoE routing on the trainer: what Megatron-Core's routers choose, how it compares with the rollout engine's
choice and with the previous policy's, and routing replay (R3: the trainer routes every token to the experts the
rollout engine chose).

**The hook.** Megatron-Core 0.16's ``TopKRouter.routing`` hands its top-k selection to ``self.router_replay``
when it is set (``topk_routing_with_score_function(..., router_replay=...)`` calls
``router_replay.get_replay_topk(scores, topk, num_groups, group_topk, compute_topk)``); Megatron's own
``RouterReplay`` (``config.moe_enable_routing_replay``) keeps one process-global list of instances for every
router built, both models and every test's models together, set by list position. ``attach`` puts one
``_RouterHook`` of this module on each router of one model instead: it computes the router's own top-k as
Megatron would (kept for the statistics), and under replay returns the rollout's experts in its place. The gates
are then the trainer's own scores at the replayed experts, exactly as Megatron's sigmoid + expert-bias router
treats its own choice: ``scores`` (without the bias) gathered at those experts, normalised over them, times
``moe_router_topk_scaling_factor``; the gradient flows through them as usual. Tokens without a rollout choice
(padding, a sample's last token, samples the engine returned no routing for) keep the trainer's own.

**Where a router's tokens come from.** A router sees its micro-batch's tokens sequence-first and flattened,
``[S * B]`` (index ``s * B + b``), on padded micro-batches ``[B, S]`` and on packed ones ``[1, S]`` alike;
with sequence parallelism (TP > 1: Megatron requires it with MoE) each TP rank sees the ``r``-th of ``TP`` equal
slices of ``S``; with context parallelism the packed micro-batch is already this CP rank's chunks
(``cookbook.grpo.packing``); every pipeline stage runs every micro-batch through its own layers. The parallel
step (``cookbook.grpo.parallel_step._run_schedule``) calls ``microbatch(model, mb)`` before each micro-batch's
forward, on every stage; this module lays the micro-batch's per-token tensors (``mask``, the rollout routing
``routing``, in the padded ``[B, L - 1]`` or packed ``[1, t]`` layout the step built) out the way the routers will
see them. Under full activation recompute (``parallel.recompute=full``) a layer's forward runs again during the
backward pass, after later micro-batches' forwards under pipelining: each hook queues the targets of the forwards
it ran without gradients (the checkpointed first pass) and takes them back in order when it runs again with
gradients (the recompute).

**Positions.** The rollout returns, per sample, the routing of every token it forwarded: positions
``0 .. prompt + response - 2`` (the last sampled token is never fed back). In the trainer's ``[B, L - 1]`` layout
column ``t`` is the token at position ``t``, whose output scores token ``t + 1``: the statistics count exactly
the columns of the loss mask (the positions whose outputs score the response tokens, the last prompt token
first); replay uses every position the rollout forwarded, prompt tokens included (they shape the response's
log-probs through attention).

**Statistics** (``step_metrics``; every count is made by the rank that holds the token and the layer, then
summed over the whole group, so no routing is gathered; the any-layer flags are OR-ed over the pipeline stages):

- ``routing/rollout_vs_trainer``: the share of (scored token, MoE layer) pairs whose top-k expert *set* differs
  between the rollout engine and the trainer's policy forward before the updates (the old-log-prob forward, same
  weights as the rollout); ``..._any_layer``: the share of scored tokens that differ in at least one MoE layer;
  ``..._layer{L}``: per MoE layer, ``L`` the model's 0-based layer index (``model.layers.{L}``). Under replay
  these compare the experts the trainer *used* (0 by construction); ``routing/rollout_vs_trainer_unreplayed``
  (and ``..._any_layer``) then give what its router would have chosen.
- ``routing/policy_change`` (``..._layer{L}``, ``..._any_layer``): the share of (scored token, MoE layer) pairs of
  this step's batch whose trainer top-k set differs between the policy before this step's updates (the
  old-log-prob forward) and after them (one extra forward pass without gradients, same batch and layout, same
  replay setting): how much one step's ``grpo.num_minibatches`` updates move the routing. Under replay it
  compares the routers' own choices, which replay does not change.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

NO_EXPERT = -1  # a position without a rollout choice in the [B, L - 1, layers, top_k] routing tensor
STATISTICS = ("rollout_vs_trainer", "rollout_vs_trainer_unreplayed", "policy_change")  # routing/<name>...


# -- the rollout's routing in the trainer's layout ---------------------------------------------------------
def moe_layers(num_layers: int, first_k_dense_replace: int) -> list[int]:
    """The model's MoE layers, 0-based (``cookbook.megatron.model`` builds the first ``first_k_dense_replace``
    layers dense, every later one MoE)."""
    return list(range(first_k_dense_replace, num_layers))


def rollout_routing(routed_experts: Optional[Sequence[Optional[np.ndarray]]], width: int, layers: int, top_k: int
                    ) -> Optional[torch.Tensor]:
    """The rollout engine's per-sample routing (``RolloutSample.routed_experts``: ``[prompt + response - 1,
    layers, top_k]``) as an int16 ``[B, width, layers, top_k]`` tensor in the trainer's ``[B, L - 1]`` layout
    (column ``t`` = the token at position ``t``), ``NO_EXPERT`` elsewhere; None when no sample has any."""
    if routed_experts is None or all(r is None for r in routed_experts):
        return None
    out = torch.full((len(routed_experts), width, layers, top_k), NO_EXPERT, dtype=torch.int16)
    for i, ids in enumerate(routed_experts):
        if ids is None:
            continue
        ids = np.asarray(ids)
        if ids.ndim != 3 or ids.shape[1:] != (layers, top_k) or ids.shape[0] > width:
            raise ValueError(f"sample {i}: the rollout's routing has shape {ids.shape}, expected [<= {width} "
                             f"positions, {layers} MoE layers, top_k {top_k}]")
        out[i, :ids.shape[0]] = torch.from_numpy(ids.astype(np.int16))
    return out


def pack_routing(packed: Any, routing: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``routing [B, L - 1, layers, k]`` in a packed micro-batch's ``[1, t, layers, k]`` layout
    (``PackedMicrobatch.source``), ``NO_EXPERT`` where nothing is scored (a sample's last token, padding)."""
    if routing is None:
        return None
    valid = packed.source >= 0
    flat = routing.reshape(-1, *routing.shape[2:])[packed.source.clamp(min=0)]
    return torch.where(valid[:, None, None], flat, torch.full_like(flat, NO_EXPERT)).unsqueeze(0)


# -- the router hook -------------------------------------------------------------------------------------
def _sets_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row: do the top-k index sets differ (order ignored)?"""
    return (a.sort(-1).values != b.sort(-1).values.to(a.dtype)).any(-1)


@dataclasses.dataclass
class _Microbatch:
    """One micro-batch as this rank's routers see it: ``n`` tokens in router order."""

    index: int
    n: int
    scored: torch.Tensor  # [n] bool: a loss-mask position
    target: Optional[torch.Tensor]  # [n, global MoE layers, k] rollout routing (NO_EXPERT: none)
    has_target: Optional[torch.Tensor]  # [n] bool: scored and the rollout routed it in every layer
    source: Optional[torch.Tensor]  # [n, 2] (row, column) in the global batch (-1: none), for capture
    flags: dict[str, torch.Tensor]  # any-layer flags per statistic, [n] bool


class _RouterHook:
    """Takes the place of Megatron's ``RouterReplay`` on one ``TopKRouter`` (``router.router_replay``)."""

    def __init__(self, tracker: "RoutingTracker", layer: int, slot: int):
        self.tracker, self.layer, self.slot = tracker, layer, slot
        self.queue: collections.deque = collections.deque()  # targets of checkpointed forwards (full recompute)

    def get_replay_topk(self, scores: torch.Tensor, topk: int, num_groups: Optional[int] = None,
                        group_topk: Optional[int] = None, default_compute_topk=None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        values, own = default_compute_topk(scores, topk, num_groups, group_topk)
        tracker = self.tracker
        mb = tracker.current
        if tracker.recompute and tracker.training:
            if torch.is_grad_enabled():  # the recompute of a checkpointed forward, in the backward pass
                mb = self.queue.popleft()
            else:
                self.queue.append(mb)
        if mb is None:
            return values, own
        if mb.n != scores.shape[0]:
            raise RuntimeError(f"routing: layer {self.layer} routes {scores.shape[0]} tokens, the micro-batch has "
                               f"{mb.n} in this rank's layout")
        used = own
        if tracker.replay and mb.target is not None:
            target = mb.target[:, self.slot].to(own.device)
            replayed = (target >= 0).all(-1, keepdim=True)
            used = torch.where(replayed, target.to(own.dtype), own)
            values = scores.gather(1, used)
        if not (tracker.training and torch.is_grad_enabled() and tracker.recompute):
            tracker.observe(self.slot, mb, own, used)
        return values, used


@dataclasses.dataclass
class _Pass:
    keep: bool
    compare: Optional["PassResult"]
    capture: bool
    rollout: bool
    counts: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # name -> [2, layers] (diff, total)
    kept: dict[tuple[int, int], torch.Tensor] = dataclasses.field(default_factory=dict)
    captured: list[tuple[int, torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)
    microbatches: list[_Microbatch] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PassResult:
    """What one tracked forward pass saw on this rank (``end_pass``); ``step_metrics`` reduces it."""

    counts: dict[str, torch.Tensor]
    any_counts: dict[str, torch.Tensor]  # name -> [2] (tokens differing in some layer, tokens), this rank's part
    kept: dict[tuple[int, int], torch.Tensor]
    captured: list[tuple[int, torch.Tensor, torch.Tensor]]


class RoutingTracker:
    """The routing hooks of one model (``attach``) and the state of the forward pass being tracked."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[int]):
        from megatron.core.transformer.moe.router import TopKRouter

        if getattr(model.config, "moe_router_fusion", False):  # TE's fused top-k never calls router_replay
            raise ValueError("routing statistics and replay need Megatron's unfused router (moe_router_fusion off)")
        self.layers = list(layers)  # the model's MoE layers, 0-based, in the rollout's order
        self.replay = False
        self.training = False
        self.recompute = getattr(model.config, "recompute_granularity", None) == "full"
        self.sequence_parallel = bool(getattr(model.config, "sequence_parallel", False))
        self.current: Optional[_Microbatch] = None
        self.active: Optional[_Pass] = None
        self._count = 0
        for module in model.modules():
            if isinstance(module, TopKRouter):
                layer = int(module.layer_number) - 1
                if layer not in self.layers:
                    raise RuntimeError(f"routing: a router in layer {layer}, not one of the MoE layers {self.layers}")
                module.router_replay = _RouterHook(self, layer, self.layers.index(layer))
        self.device = next(model.parameters()).device

    # -- micro-batches ---------------------------------------------------------------------------------
    def _router_order(self, t: torch.Tensor, columns: int, fill: int) -> torch.Tensor:
        """A per-token tensor of a micro-batch (``[B, c, ...]``, ``c <= columns``) in router order: padded to
        ``columns`` with ``fill``, sequence-first, this TP rank's sequence-parallel slice, flattened."""
        from megatron.core import parallel_state as ps

        extra = columns - t.shape[1]
        if extra:
            pad = torch.full((t.shape[0], extra, *t.shape[2:]), fill, dtype=t.dtype, device=t.device)
            t = torch.cat([t, pad], dim=1)
        t = t.transpose(0, 1)
        if self.sequence_parallel:
            tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
            share = t.shape[0] // tp
            t = t[rank * share:(rank + 1) * share]
        return t.reshape(-1, *t.shape[2:])

    def microbatch(self, mb: dict) -> None:
        if self.active is None and not self.replay:
            self.current = None
            return
        columns = mb["input_ids"].shape[1]
        scored = self._router_order(mb["mask"] > 0, columns, False).cpu()
        routing = mb.get("routing")
        target = has_target = None
        if routing is not None:
            target = self._router_order(routing, columns, NO_EXPERT).cpu()
            has_target = scored & (target >= 0).flatten(1).all(-1)
        source = None
        if self.active is not None and self.active.capture:
            if "packed" in mb:
                flat, width = mb["packed"].source, mb["packed"].width
                pairs = torch.stack([flat // width, flat % width], -1)
                pairs[flat < 0] = -1
                source = self._router_order(pairs.unsqueeze(0), columns, -1)
            elif "row_index" in mb:
                rows = mb["row_index"].cpu()
                pairs = torch.stack(torch.broadcast_tensors(rows[:, None], torch.arange(columns)[None]), -1)
                source = self._router_order(pairs, columns, -1)
        self.current = _Microbatch(self._count, len(scored), scored, target, has_target, source, {})
        self._count += 1
        if self.active is not None:
            self.active.microbatches.append(self.current)

    def observe(self, slot: int, mb: _Microbatch, own: torch.Tensor, used: torch.Tensor) -> None:
        p = self.active
        if p is None:
            return
        own, used = own.detach().cpu(), used.detach().cpu()

        def count(name: str, differ: torch.Tensor, over: torch.Tensor) -> None:
            c = p.counts.setdefault(name, torch.zeros(2, len(self.layers), dtype=torch.float64))
            c[0, slot] += float((differ & over).sum())
            c[1, slot] += float(over.sum())
            flag = mb.flags.setdefault(name, torch.zeros(mb.n, dtype=torch.bool))
            flag |= differ & over

        if p.rollout and mb.target is not None:
            target = mb.target[:, slot]
            count("rollout_vs_trainer", _sets_differ(used, target), mb.has_target)
            if self.replay:
                count("rollout_vs_trainer_unreplayed", _sets_differ(own, target), mb.has_target)
        if p.keep:
            p.kept[(mb.index, slot)] = own.to(torch.int16)
        if p.compare is not None:
            before = p.compare.kept.get((mb.index, slot))
            if before is None or before.shape != own.shape:
                raise RuntimeError("routing: the compared passes laid the batch out differently")
            count("policy_change", _sets_differ(own, before), mb.scored)
        if p.capture and mb.source is not None:
            p.captured.append((slot, mb.source.cpu(), used.to(torch.int16)))

    # -- passes ----------------------------------------------------------------------------------------
    def start(self, keep: bool = False, compare: Optional[PassResult] = None, capture: bool = False,
              rollout: bool = True) -> None:
        self.active, self._count, self.current = _Pass(keep, compare, capture, rollout), 0, None

    def end(self) -> PassResult:
        """This rank's counts of the pass; the any-layer flags are OR-ed over the pipeline stages (collective
        over the pipeline group), then counted on the first stage only."""
        from megatron.core import parallel_state as ps

        p, self.active, self.current = self.active, None, None
        pp = ps.get_pipeline_model_parallel_world_size()
        counted = {"rollout_vs_trainer": p.rollout, "rollout_vs_trainer_unreplayed": p.rollout and self.replay,
                   "policy_change": p.compare is not None}
        any_counts = {}
        for name in STATISTICS:  # every rank, every name: the collectives must match over the group
            over = [mb.scored if name == "policy_change" else mb.has_target for mb in p.microbatches]
            over = [o if counted[name] and o is not None else torch.zeros(mb.n, dtype=torch.bool)
                    for o, mb in zip(over, p.microbatches)]
            flags = [mb.flags.get(name, torch.zeros(mb.n, dtype=torch.bool)) for mb in p.microbatches]
            flags = torch.cat(flags).to(torch.int32) if flags else torch.zeros(0, dtype=torch.int32)
            if pp > 1:
                flags = flags.to(self.device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=ps.get_pipeline_model_parallel_group())
                flags = flags.cpu()
            over = torch.cat(over) if over else torch.zeros(0, dtype=torch.bool)
            first = ps.get_pipeline_model_parallel_rank() == 0
            any_counts[name] = torch.tensor([float((flags.bool() & over).sum()), float(over.sum())] if first
                                            else [0.0, 0.0], dtype=torch.float64)
            p.counts.setdefault(name, torch.zeros(2, len(self.layers), dtype=torch.float64))
        return PassResult(p.counts, any_counts, p.kept, p.captured)


# -- the model-level API ---------------------------------------------------------------------------------
def attach_trainer(cfg: Any, *models: torch.nn.Module) -> list[int]:
    """The trainer's models (policy, reference) get the hooks, replaying with ``moe.routing_replay=r3``; returns
    the model's MoE layers (none: nothing attached)."""
    m = cfg.model
    layers = moe_layers(m.num_layers, m.first_k_dense_replace) if m.num_experts else []
    for model in models if layers else ():
        attach(model, layers, replay=cfg.moe.routing_replay == "r3")
    return layers


def with_rollout_routing(batch: Any, routed_experts: Optional[Sequence[Optional[np.ndarray]]], layers: Sequence[int],
                         top_k: int, replay: bool = False) -> Any:
    """``batch`` (a ``TrainBatch``) with the rollout's routing of its samples in its layout, if there is any;
    ``replay`` (``moe.routing_replay=r3``) refuses a batch of an MoE model without it."""
    routing = rollout_routing(routed_experts, batch.mask.shape[1], len(layers), top_k) if layers else None
    if routing is None and replay and layers:
        raise ValueError("moe.routing_replay=r3: the rollout batch carries no routed experts to replay")
    return batch if routing is None else dataclasses.replace(batch, routing=routing)


def policy_change(model: torch.nn.Module, before: Optional[PassResult], forward: Any, layers: Sequence[int]
                  ) -> dict[str, float]:
    """After the updates: ``forward()`` (the batch's log-probs, the same layout as the pass ``before``) once more,
    and the step's ``routing/...`` metrics of both passes (collective)."""
    import time

    if before is None or not layers:
        return {}
    t0 = time.perf_counter()
    start_pass(model, compare=before, rollout=False)
    forward()
    after = end_pass(model)
    metrics = step_metrics(before, after, device=next(model.parameters()).device, layers=layers)
    metrics["perf/routing_forward_s"] = time.perf_counter() - t0
    return metrics


def attach(model: torch.nn.Module, layers: Sequence[int], replay: bool = False) -> RoutingTracker:
    """Put the routing hooks on every MoE router of ``model`` (this rank's stage); with ``replay`` every forward
    whose micro-batches carry the rollout's routing (``TrainBatch.routing``) routes with it."""
    tracker = RoutingTracker(model, layers)
    tracker.replay = replay
    model.cookbook_routing = tracker
    return tracker


def tracker_of(model: torch.nn.Module) -> Optional[RoutingTracker]:
    return getattr(model, "cookbook_routing", None)


def microbatch(model: torch.nn.Module, mb: dict) -> None:
    """Called by the parallel step before each micro-batch's forward, on every pipeline stage."""
    tracker = tracker_of(model)
    if tracker is not None:
        tracker.microbatch(mb)


@contextlib.contextmanager
def training(model: torch.nn.Module) -> Iterator[None]:
    """Marks the forward/backward passes of an update (replay under full recompute queues its targets)."""
    tracker = tracker_of(model)
    if tracker is None:
        yield
        return
    tracker.training = True
    try:
        yield
    finally:
        tracker.training = False
        for router_hook in _hooks(model):
            router_hook.queue.clear()


def _hooks(model: torch.nn.Module) -> list[_RouterHook]:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m.router_replay for m in model.modules()
            if isinstance(m, TopKRouter) and isinstance(m.router_replay, _RouterHook)]


def start_pass(model: torch.nn.Module, keep: bool = False, compare: Optional[PassResult] = None,
               capture: bool = False, rollout: bool = True) -> None:
    """Track the next forward pass(es) of ``model`` until ``end_pass``: count disagreement with the rollout's
    routing (``rollout``), ``keep`` this rank's own top-k for a later pass to ``compare`` with, ``capture`` the
    routing used (``captured_routing``)."""
    tracker = tracker_of(model)
    if tracker is not None:
        tracker.start(keep=keep, compare=compare, capture=capture, rollout=rollout)


def end_pass(model: torch.nn.Module) -> Optional[PassResult]:
    tracker = tracker_of(model)
    return None if tracker is None else tracker.end()


def step_metrics(*results: Optional[PassResult], device: Optional[torch.device] = None,
                 layers: Sequence[int] = ()) -> dict[str, float]:
    """The ``routing/...`` metrics of the given passes' counts, summed over the whole group (collective: every
    rank calls it with the same passes)."""
    if not layers or all(r is None for r in results):
        return {}
    names = STATISTICS
    layers = list(layers)
    counts = torch.zeros(len(names), 2, len(layers) + 1, dtype=torch.float64)
    for r in results:
        if r is None:
            continue
        for i, name in enumerate(names):
            if name in r.counts:
                counts[i, :, :len(layers)] += r.counts[name]
            if name in r.any_counts:
                counts[i, :, len(layers)] += r.any_counts[name]
    if dist.is_initialized() and dist.get_world_size() > 1:
        counts = counts.to(device or torch.device("cpu"))
        dist.all_reduce(counts)
        counts = counts.cpu()
    metrics = {}
    for i, name in enumerate(names):
        diff, total = counts[i, 0], counts[i, 1]
        if total[:len(layers)].sum() == 0:
            continue
        metrics[f"routing/{name}"] = float(diff[:len(layers)].sum() / total[:len(layers)].sum())
        metrics[f"routing/{name}_any_layer"] = float(diff[-1] / max(float(total[-1]), 1.0))
        for j, layer in enumerate(layers):
            metrics[f"routing/{name}_layer{layer}"] = float(diff[j] / max(float(total[j]), 1.0))
    return metrics


def captured_routing(result: PassResult, batch_size: int, width: int, layers: int, top_k: int,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """The routing the captured pass used, ``[B, width, layers, top_k]`` int16 in the trainer's ``[B, L - 1]``
    layout (``NO_EXPERT`` where no rank routed a scored position), assembled from every rank (collective)."""
    out = torch.full((batch_size * width, layers, top_k), NO_EXPERT, dtype=torch.int32)
    for slot, source, used in result.captured:
        keep = (source[:, 0] >= 0) & (source[:, 1] < width)
        out[source[keep, 0] * width + source[keep, 1], slot] = used[keep].to(torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = out.to(device or torch.device("cpu"))
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        out = out.cpu()
    return out.view(batch_size, width, layers, top_k).to(torch.int16)
