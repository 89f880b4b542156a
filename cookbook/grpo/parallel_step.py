"""The GRPO forward and update for a Megatron-Core policy under any TP / EP / PP / DP layout.

One code path for every layout, one process included: micro-batches go through Megatron's
``get_forward_backward_func()`` (no pipelining for PP = 1, the 1F1B schedule for PP > 1), the last stage
scores tokens from vocab-parallel logits and applies ``cookbook.grpo.algorithm.policy_loss`` (or, with the
fused kernels, ``cookbook.grpo.fused_loss`` from the final hidden states), then the gradient reductions,
global-norm clipping, the optimizer step and the router expert-bias update follow (``cookbook.megatron.parallel``).

Every rank passes the same *global* batch; each data-parallel rank takes its own rows and the loss of a
micro-batch is its tokens' sum over the token count of the whole minibatch (``token_mean``), so gradients
add up across micro-batches and DP ranks to the full-batch gradient, however the batch is cut. Results
(log-probs, metrics) come back on every rank, as CPU tensors and floats.

A batch made with a ``PackingSpec`` (``grpo.sequence_packing``; ``cookbook.grpo.packing``) trains in packed rows
(Megatron's ``thd`` format): each minibatch is packed, its rows dealt to the DP ranks, every row split over the
context-parallel ranks (``cookbook.megatron.context_parallel``), and per-token tensors are moved into that layout
for the step only; callers keep the padded ``[B, L - 1]`` layout, and ``forward_logprobs`` returns it.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from cookbook.config import GRPOConfig
from cookbook.grpo import algorithm as A
from cookbook.grpo.packing import PackedLayout, PackingSpec, build_microbatch
from cookbook.megatron import parallel as P
from cookbook.megatron import routing as moe_routing

_PER_TOKEN = ("mask", "advantages", "old_logp", "ref_logp", "is_weights")


@dataclasses.dataclass
class TrainBatch:
    """A global batch in the trainer's layout (``algorithm.build_training_batch``): ``mask[:, t]`` marks
    that ``input_ids[:, t + 1]`` is a response token; log-probs and weights share the mask's layout."""

    input_ids: torch.Tensor  # [B, L] long
    position_ids: torch.Tensor  # [B, L]
    mask: torch.Tensor  # [B, L - 1] float
    advantages: torch.Tensor  # [B] (or [B, L - 1])
    old_logp: Optional[torch.Tensor] = None  # [B, L - 1]; required for an update
    ref_logp: Optional[torch.Tensor] = None
    is_weights: Optional[torch.Tensor] = None
    lengths: Optional[torch.Tensor] = None  # [B] prompt + response tokens (needed to pack)
    packing: Optional[PackingSpec] = None  # train in packed rows (None: padded rows)
    # [B, L - 1, MoE layers, top_k] int16: the experts the rollout routed each position to, -1 none
    # (cookbook.megatron.routing: statistics and replay); row_index [B]: rows' indices in the batch (routing capture)
    routing: Optional[torch.Tensor] = None
    row_index: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The per-row tensors that are set."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def rows(self, index) -> "TrainBatch":
        return dataclasses.replace(self, **{name: t[index] for name, t in self.tensors().items()})

    def padded(self, multiple: int, pad_id: int) -> "TrainBatch":
        """Columns padded to a multiple of ``multiple`` (sequence parallelism splits the sequence over TP);
        padding is at the end and masked out, so causal attention leaves the real tokens unchanged."""
        extra = -self.input_ids.shape[1] % multiple
        if not extra:
            return self

        def pad(t: Optional[torch.Tensor], value: float) -> Optional[torch.Tensor]:
            if t is None or t.dim() < 2:
                return t
            return torch.nn.functional.pad(t, (0, extra), value=value)

        last = self.position_ids[:, -1:]
        positions = torch.cat([self.position_ids, last + torch.arange(1, extra + 1)], dim=1)
        routing = None if self.routing is None else torch.nn.functional.pad(
            self.routing, (0, 0, 0, 0, 0, extra), value=-1)
        return dataclasses.replace(
            self, input_ids=pad(self.input_ids, pad_id), position_ids=positions, mask=pad(self.mask, 0.0),
            advantages=pad(self.advantages, 0.0), old_logp=pad(self.old_logp, 0.0), ref_logp=pad(self.ref_logp, 0.0),
            is_weights=pad(self.is_weights, 0.0), routing=routing)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _microbatches(batch: TrainBatch, size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    out = []
    for start in range(0, len(batch), size):
        part = batch.rows(slice(start, start + size))
        out.append({name: t.to(device) for name, t in part.tensors().items() if name != "lengths"})
    if P.parallel_state().get_pipeline_model_parallel_world_size() > 1 and len(batch) % size:
        raise ValueError(f"pipeline parallelism needs equal micro-batches: {len(batch)} rows per data-parallel "
                         f"rank do not split into micro-batches of {size} (config key grpo.micro_batch_size)")
    return out


def packed_layout(batch: TrainBatch, micro_batch_size: int, model: Optional[torch.nn.Module] = None
                  ) -> PackedLayout:
    """The packing plan of ``batch`` for the current layout: rows of at most ``batch.packing.max_tokens``,
    ``micro_batch_size`` rows per micro-batch, dealt to the DP ranks (``cookbook.grpo.packing``)."""
    if batch.lengths is None:
        raise ValueError("a packed batch needs its sample lengths: make it with batch_from_rollout(..., packing=...)")
    ps = P.parallel_state()
    # the allgather token dispatcher gathers equal-sized token blocks over the EP ranks, which are DP ranks
    dispatcher = getattr(getattr(model, "config", None), "moe_token_dispatcher_type", "allgather")
    allgather_ep = ps.get_expert_model_parallel_world_size() > 1 and dispatcher == "allgather"
    return PackedLayout.build(batch.lengths.tolist(), batch.packing, dp=ps.get_data_parallel_world_size(),
                              tensor=ps.get_tensor_model_parallel_world_size(),
                              context=ps.get_context_parallel_world_size(), rows_per_micro=micro_batch_size,
                              equal_microbatches=allgather_ep)


def _packed_microbatches(batch: TrainBatch, layout: PackedLayout, device: torch.device, pad_id: int) -> list[dict]:
    """This rank's micro-batches of a packed batch: its DP rank's rows, its CP rank's chunks, per-token tensors
    moved from the padded layout into the packed one (``[1, t]``)."""
    ps = P.parallel_state()
    out = []
    for rows in layout.microbatch_rows(ps.get_data_parallel_rank()):
        pm = build_microbatch(rows, batch.input_ids, pad_id, context=ps.get_context_parallel_world_size(),
                              cp_rank=ps.get_context_parallel_rank())
        mb = {"input_ids": pm.input_ids, "position_ids": pm.position_ids, "targets": pm.targets}
        mb.update({name: pm.pack(getattr(batch, name)) for name in _PER_TOKEN if getattr(batch, name) is not None})
        if batch.routing is not None:
            mb["routing"] = moe_routing.pack_routing(pm, batch.routing)
        mb = {name: t.to(device) for name, t in mb.items()}
        mb["packed_seq_params"], mb["packed"] = pm.packed_seq_params(device), pm
        mb["num_samples"] = len(batch)  # the id space of the samples in packed rows (GSPO's per-sample sums)
        out.append(mb)
    return out


def _reset_aux_loss_scale() -> None:
    """Megatron's schedules set the MoE aux-loss gradient scale by copying a ``[1]`` tensor into the one they
    find; an aux-loss backward outside a schedule (``forward_logits(...).backward()`` in a notebook or a test)
    leaves a 0-dim default there (``moe_utils.MoEAuxLossAutoScaler``) and the copy then fails ("output with
    shape [] doesn't match the broadcast shape [1]"). Drop such a default so the schedule sets its own."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    scale = MoEAuxLossAutoScaler.main_loss_backward_scale
    if scale is not None and scale.dim() == 0:
        MoEAuxLossAutoScaler.main_loss_backward_scale = None


def _run_schedule(model: torch.nn.Module, microbatches: list[dict], loss: Callable, forward_only: bool,
                  hidden_states: bool = False) -> list:
    """Megatron's schedule for this layout over the micro-batches; the last stage's loss outputs.

    ``loss(mb, output_weight, output)`` gets the logits, or with ``hidden_states`` (the fused loss) the last
    stage's final hidden states and the output layer's weight."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from cookbook.grpo.fused_loss import hidden_states_instead_of_logits

    # each micro-batch's loss is already normalized by the global batch: the schedule must not rescale it
    model.config.calculate_per_token_loss = True
    _reset_aux_loss_scale()
    packed = "packed_seq_params" in microbatches[0]
    # packed rows differ in length: pipeline stages then send each activation's shape first
    model.config.variable_seq_lengths = packed

    def forward_step(data, model):
        mb = next(data)
        moe_routing.microbatch(model, mb)  # the MoE routers' view of this micro-batch (statistics, replay)
        kwargs = {"packed_seq_params": mb["packed_seq_params"]} if packed else {}
        if hidden_states and model.post_process:
            with hidden_states_instead_of_logits(model) as captured:
                output = model(mb["input_ids"], mb["position_ids"], None, **kwargs)
            return output, partial(loss, mb, captured.weight)
        return model(mb["input_ids"], mb["position_ids"], None, **kwargs), partial(loss, mb, None)

    seq_length, micro_batch_size = microbatches[0]["input_ids"].shape[1], microbatches[0]["input_ids"].shape[0]
    if packed:
        seq_length *= P.parallel_state().get_context_parallel_world_size()
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=model,
        num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only)


def _score(mb: dict, logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    if "targets" in mb:  # packed: targets were shifted on the full row, before the CP split
        return P.vocab_parallel_logprobs(logits, mb["targets"], temperature)
    return P.vocab_parallel_logprobs(logits[:, :-1], mb["input_ids"][:, 1:], temperature)


def _logprob_loss(temperature: float, mb: dict, weight: None, logits: torch.Tensor):
    logp, _ = _score(mb, logits, temperature)
    zero = torch.zeros((), device=logits.device)
    return zero, torch.ones((), dtype=torch.int, device=logits.device), {"logp": logp.detach()}


def forward_logprobs(model: torch.nn.Module, batch: "TrainBatch | torch.Tensor",
                     position_ids: Optional[torch.Tensor] = None, *, micro_batch_size: int, temperature: float = 1.0,
                     pad_id: int = 0) -> torch.Tensor:
    """Per-token log-probs ``[B, L - 1]`` (fp32, CPU) of a global batch, on every rank, without gradients
    (the old and reference log-probs of a GRPO step).

    ``batch`` is a ``TrainBatch`` (packed when it carries a ``PackingSpec``; ``micro_batch_size`` then counts
    packed rows) or, as before, the ``input_ids [B, L]`` tensor with ``position_ids``. A packed batch's
    log-probs come back in the padded layout, 0 outside each sample's scored columns."""
    if isinstance(batch, torch.Tensor):
        input_ids = batch
        batch = TrainBatch(input_ids, position_ids, torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1),
                           torch.zeros(input_ids.shape[0]))
    if batch.packing is not None:
        return _packed_logprobs(model, batch, micro_batch_size, temperature, pad_id)
    input_ids = batch.input_ids
    batch = TrainBatch(input_ids, batch.position_ids, batch.mask, torch.zeros(input_ids.shape[0]),
                       routing=batch.routing, row_index=batch.row_index)  # the mask and routing: for the routers
    shard = batch.rows(P.data_parallel_rows(len(batch))).padded(P.sequence_multiple(), pad_id)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            store = _run_schedule(model, _microbatches(shard, micro_batch_size, _device(model)),
                                  partial(_logprob_loss, temperature), forward_only=True)
    finally:
        model.train(was_training)
    columns = input_ids.shape[1] - 1
    local = torch.cat([s["logp"] for s in store])[:, :columns].contiguous() if store else None
    local = P.broadcast_from_last_stage(local, (len(shard), columns), torch.float32, _device(model))
    return P.all_gather_rows(local).cpu()


def _packed_logprobs(model: torch.nn.Module, batch: TrainBatch, rows_per_micro: int, temperature: float,
                     pad_id: int) -> torch.Tensor:
    """``forward_logprobs`` of a packed batch: each rank scores its rows' chunks; the pieces are written into
    the padded layout and summed over DP x CP (each scored token is written by exactly one of those ranks,
    and adding zeros is exact), then sent from the last pipeline stage."""
    device = _device(model)
    layout = packed_layout(batch, rows_per_micro, model)
    microbatches = _packed_microbatches(batch, layout, device, pad_id)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            store = _run_schedule(model, microbatches, partial(_logprob_loss, temperature), forward_only=True)
    finally:
        model.train(was_training)
    out = torch.zeros(len(batch), batch.input_ids.shape[1] - 1)
    for mb, s in zip(microbatches, store or []):
        mb["packed"].unpack(s["logp"], out)
    out = out.to(device)
    ps = P.parallel_state()
    dist.all_reduce(out, group=ps.get_data_parallel_group(with_context_parallel=True))
    return P.broadcast_from_last_stage(out if store else None, out.shape, torch.float32, device).cpu()


def _grpo_loss(g: GRPOConfig, normalizer: float, mb: dict, weight: Optional[torch.Tensor], output: torch.Tensor):
    """The policy loss of a micro-batch from its logits, or (``weight`` given) through the fused kernel from the
    final hidden states (``grpo.use_fused_kernels``; ``cookbook.grpo.fused_loss``)."""
    if weight is not None and "targets" in mb:
        out = _packed_fused_loss(g, normalizer, mb, weight, output)
    elif weight is not None:
        from cookbook.grpo.fused_loss import fused_policy_loss

        out = fused_policy_loss(output, weight, mb["input_ids"], mb["old_logp"], mb["advantages"], mb["mask"], g=g,
                                normalizer=normalizer, ref_logp=mb.get("ref_logp"), is_weights=mb.get("is_weights"),
                                tp_group=P.parallel_state().get_tensor_model_parallel_group())
    elif g.policy_loss == "gspo":
        logp, entropy = _score(mb, output, g.temperature)
        out = A.gspo_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], normalizer=normalizer,
                          ref_logp=mb.get("ref_logp"), is_weights=mb.get("is_weights"), entropy=entropy,
                          **_sequences(mb), **A.loss_settings(g))
    else:
        logp, entropy = _score(mb, output, g.temperature)
        out = A.policy_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], normalizer=normalizer,
                            ref_logp=mb.get("ref_logp"), is_weights=mb.get("is_weights"), entropy=entropy,
                            **A.loss_settings(g))
    tokens = torch.tensor(out.num_tokens, dtype=torch.int, device=output.device)
    return out.loss, tokens, {"loss": float(out.loss.detach()), "metrics": out.metrics, "num_tokens": out.num_tokens}


def _sequences(mb: dict) -> dict:
    """GSPO's samples in a micro-batch: a padded row is one sample (the default); in packed rows each token's
    sample is its row in the minibatch, and under context parallelism a sample's tokens are spread over the CP
    ranks, which all-reduce its sums (``algorithm.gspo_loss``)."""
    pm = mb.get("packed")
    if pm is None:
        return {}
    source = pm.source.to(mb["mask"].device)
    ids = torch.where(source >= 0, source // pm.width, torch.full_like(source, -1)).view_as(mb["mask"])
    ps = P.parallel_state()
    group = ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None
    return {"seq_ids": ids, "num_seqs": mb["num_samples"], "seq_group": group}


def _packed_fused_loss(g: GRPOConfig, normalizer: float, mb: dict, weight: torch.Tensor, hidden: torch.Tensor):
    """The fused loss of a packed micro-batch. ``fused_policy_loss`` scores ``hidden[:, :-1]`` against
    ``input_ids[:, 1:]`` row by row; a packed micro-batch's targets were shifted on the full row (and CP-split),
    so each token goes in as a row of two: (its hidden state, an unused copy) and (its target, its target).
    The hidden states are expanded, not copied; advantages are per token."""
    from cookbook.grpo.fused_loss import fused_policy_loss

    def column(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t[0].unsqueeze(1)

    rows = hidden[0].unsqueeze(1).expand(-1, 2, -1)
    targets = mb["targets"][0].unsqueeze(1).expand(-1, 2)
    return fused_policy_loss(rows, weight, targets, column(mb["old_logp"]), mb["advantages"][0], column(mb["mask"]),
                             g=g, normalizer=normalizer, ref_logp=column(mb.get("ref_logp")),
                             is_weights=column(mb.get("is_weights")),
                             tp_group=P.parallel_state().get_tensor_model_parallel_group())


def _reduce_metrics(store: list[dict], device: torch.device) -> dict[str, float]:
    """Sum the last stage's micro-batch results over DP x CP; token-weighted means; on every stage."""
    ps = P.parallel_state()
    result: list[Optional[dict]] = [None]
    if store:
        keys = sorted(store[0]["metrics"])
        values = torch.tensor([[s["loss"], s["num_tokens"]] + [s["metrics"][k] * s["num_tokens"] for k in keys]
                               for s in store], dtype=torch.float64).sum(0).to(device)
        dist.all_reduce(values, group=ps.get_data_parallel_group(with_context_parallel=True))
        tokens = float(values[1])
        result[0] = {"loss": float(values[0]), "num_tokens": tokens,
                     **{k: float(v) / max(tokens, 1.0) for k, v in zip(keys, values[2:])}}
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast_object_list(result, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group(), device=device)
    return result[0]


def train_minibatch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: TrainBatch, g: GRPOConfig,
                    *, pad_id: int = 0, fused: bool = False, after_backward: Optional[Callable[[], None]] = None
                    ) -> dict[str, float]:
    """One optimizer step on a global minibatch (``old_logp`` required): forward/backward of this rank's
    rows, gradient reductions, clipping at ``g.grad_clip``, the step, the router expert-bias update.
    Returns the minibatch's loss, token count, token-mean policy metrics and the pre-clip grad norm.
    ``fused`` computes the loss with the fused kernel (``cookbook.grpo.fused_loss.fused_loss_enabled``);
    ``after_backward`` runs once the gradients are complete (before clipping), e.g. to inspect them.
    A packed batch (``batch.packing``) trains in packed rows, ``g.micro_batch_size`` rows per micro-batch."""
    from cookbook.megatron.model import update_router_expert_bias

    if batch.old_logp is None:
        raise ValueError("train_minibatch needs batch.old_logp (forward_logprobs of the policy before the step)")
    normalizer = float(batch.mask.sum()) if g.loss_aggregation == "token_mean" else float(len(batch))
    if not normalizer > 0:
        raise ValueError("the minibatch has no response tokens to train on")
    device = _device(model)
    if batch.packing is not None:
        if g.loss_aggregation != "token_mean" and g.policy_loss != "gspo":
            raise ValueError(f"grpo.loss_aggregation={g.loss_aggregation!r} with packed rows: only token_mean "
                             "(per-sample means would need sample boundaries inside the loss; GSPO's loss has them)")
        microbatches = _packed_microbatches(batch, packed_layout(batch, g.micro_batch_size, model), device,
                                            pad_id)
    else:
        shard = batch.rows(P.data_parallel_rows(len(batch))).padded(P.sequence_multiple(), pad_id)
        microbatches = _microbatches(shard, g.micro_batch_size, device)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with moe_routing.training(model):
        store = _run_schedule(model, microbatches, partial(_grpo_loss, g, normalizer), forward_only=False,
                              hidden_states=fused)
    P.finish_grad_sync(model)
    if after_backward is not None:
        after_backward()
    norm = P.clip_grad_norm(model, g.grad_clip)
    optimizer.step()
    update_router_expert_bias(model)
    metrics = _reduce_metrics(store, device)
    metrics["grad_norm"] = norm
    return metrics


def train_on_batch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: TrainBatch, g: GRPOConfig,
                   seed: int, *, pad_id: int = 0, fused: bool = False) -> dict[str, float]:
    """``g.num_minibatches`` optimizer steps over a rollout batch (seeded shuffle, as the single-process
    trainer does), with its metric names: ``actor/<metric>`` token-weighted, ``actor/grad_norm`` the mean
    over steps, ``actor/updates``."""
    sums: dict[str, float] = {}
    tokens = 0.0
    norms: list[float] = []
    for mb in A.split_minibatches(len(batch), g.num_minibatches, seed=seed):
        m = train_minibatch(model, optimizer, batch.rows(mb), g, pad_id=pad_id, fused=fused)
        for key, value in m.items():
            if key not in ("loss", "num_tokens", "grad_norm"):
                sums[key] = sums.get(key, 0.0) + value * m["num_tokens"]
        tokens += m["num_tokens"]
        norms.append(m["grad_norm"])
    metrics = {f"actor/{k}": v / max(tokens, 1.0) for k, v in sums.items()}
    metrics["actor/grad_norm"] = sum(norms) / len(norms)
    metrics["actor/updates"] = len(norms)
    return metrics


def batch_from_rollout(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                       advantages: Sequence[float], pad_id: int, packing: Optional[PackingSpec] = None
                       ) -> TrainBatch:
    """A ``TrainBatch`` (no log-probs yet) from token id lists, via ``algorithm.build_training_batch``; with
    ``packing`` (``PackingSpec.from_config(cfg)``) the step packs it (``cookbook.grpo.packing``)."""
    input_ids, mask, positions = A.build_training_batch(prompt_ids, response_ids, pad_id)
    lengths = torch.tensor([len(p) + len(r) for p, r in zip(prompt_ids, response_ids)], dtype=torch.long)
    return TrainBatch(input_ids, positions, mask, torch.as_tensor(list(advantages), dtype=torch.float32),
                      lengths=lengths, packing=packing)
