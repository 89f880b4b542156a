"""The GRPO forward and update for a Megatron-Core policy under any TP / EP / PP / DP layout.

One code path for every layout, one process included: micro-batches go through Megatron's
``get_forward_backward_func()`` (no pipelining for PP = 1, the 1F1B schedule for PP > 1), the last stage
scores tokens from vocab-parallel logits and applies ``cookbook.grpo.algorithm.policy_loss`` (the same
loss as the single-process trainer), then the gradient reductions, global-norm clipping, the optimizer
step and the router expert-bias update follow (``cookbook.megatron.parallel``).

Every rank passes the same *global* batch; each data-parallel rank takes its own rows and the loss of a
micro-batch is its tokens' sum over the token count of the whole minibatch (``token_mean``), so gradients
add up across micro-batches and DP ranks to the full-batch gradient, however the batch is cut. Results
(log-probs, metrics) come back on every rank, as CPU tensors and floats.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from cookbook.config import GRPOConfig
from cookbook.grpo import algorithm as A
from cookbook.megatron import parallel as P


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

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index) -> "TrainBatch":
        return TrainBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                             for f in dataclasses.fields(self)})

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
        return TrainBatch(pad(self.input_ids, pad_id), positions, pad(self.mask, 0.0), pad(self.advantages, 0.0),
                          pad(self.old_logp, 0.0), pad(self.ref_logp, 0.0), pad(self.is_weights, 0.0))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _microbatches(batch: TrainBatch, size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    out = []
    for start in range(0, len(batch), size):
        part = batch.rows(slice(start, start + size))
        out.append({f.name: getattr(part, f.name).to(device) for f in dataclasses.fields(part)
                    if getattr(part, f.name) is not None})
    if P.parallel_state().get_pipeline_model_parallel_world_size() > 1 and len(batch) % size:
        raise ValueError(f"pipeline parallelism needs equal micro-batches: {len(batch)} rows per data-parallel "
                         f"rank do not split into micro-batches of {size} (config key grpo.micro_batch_size)")
    return out


def _run_schedule(model: torch.nn.Module, microbatches: list[dict], loss: Callable, forward_only: bool) -> list:
    """Megatron's schedule for this layout over the micro-batches; the last stage's loss outputs."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    # each micro-batch's loss is already normalized by the global batch: the schedule must not rescale it
    model.config.calculate_per_token_loss = True

    def forward_step(data, model):
        mb = next(data)
        return model(mb["input_ids"], mb["position_ids"], None), partial(loss, mb)

    seq_length, micro_batch_size = microbatches[0]["input_ids"].shape[1], microbatches[0]["input_ids"].shape[0]
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=model,
        num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only)


def _score(mb: dict, logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    return P.vocab_parallel_logprobs(logits[:, :-1], mb["input_ids"][:, 1:], temperature)


def _logprob_loss(temperature: float, mb: dict, logits: torch.Tensor):
    logp, _ = _score(mb, logits, temperature)
    zero = torch.zeros((), device=logits.device)
    return zero, torch.ones((), dtype=torch.int, device=logits.device), {"logp": logp.detach()}


def forward_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, *,
                     micro_batch_size: int, temperature: float = 1.0, pad_id: int = 0) -> torch.Tensor:
    """Per-token log-probs ``[B, L - 1]`` (fp32, CPU) of a global batch, on every rank, without gradients
    (the old and reference log-probs of a GRPO step)."""
    mask = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1)
    batch = TrainBatch(input_ids, position_ids, mask, torch.zeros(input_ids.shape[0]))
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


def _grpo_loss(g: GRPOConfig, normalizer: float, mb: dict, logits: torch.Tensor):
    logp, entropy = _score(mb, logits, g.temperature)
    out = A.policy_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], normalizer=normalizer,
                        ref_logp=mb.get("ref_logp"), is_weights=mb.get("is_weights"), entropy=entropy,
                        **A.loss_settings(g))
    tokens = torch.tensor(out.num_tokens, dtype=torch.int, device=logits.device)
    return out.loss, tokens, {"loss": float(out.loss.detach()), "metrics": out.metrics, "num_tokens": out.num_tokens}


def _reduce_metrics(store: list[dict], device: torch.device) -> dict[str, float]:
    """Sum the last stage's micro-batch results over DP; token-weighted means; on every stage."""
    ps = P.parallel_state()
    result: list[Optional[dict]] = [None]
    if store:
        keys = sorted(store[0]["metrics"])
        values = torch.tensor([[s["loss"], s["num_tokens"]] + [s["metrics"][k] * s["num_tokens"] for k in keys]
                               for s in store], dtype=torch.float64).sum(0).to(device)
        dist.all_reduce(values, group=ps.get_data_parallel_group())
        tokens = float(values[1])
        result[0] = {"loss": float(values[0]), "num_tokens": tokens,
                     **{k: float(v) / max(tokens, 1.0) for k, v in zip(keys, values[2:])}}
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast_object_list(result, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group(), device=device)
    return result[0]


def train_minibatch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: TrainBatch, g: GRPOConfig,
                    *, pad_id: int = 0, after_backward: Optional[Callable[[], None]] = None) -> dict[str, float]:
    """One optimizer step on a global minibatch (``old_logp`` required): forward/backward of this rank's
    rows, gradient reductions, clipping at ``g.grad_clip``, the step, the router expert-bias update.
    Returns the minibatch's loss, token count, token-mean policy metrics and the pre-clip grad norm.
    ``after_backward`` runs once the gradients are complete (before clipping), e.g. to inspect them."""
    from cookbook.megatron.model import update_router_expert_bias

    if batch.old_logp is None:
        raise ValueError("train_minibatch needs batch.old_logp (forward_logprobs of the policy before the step)")
    normalizer = float(batch.mask.sum()) if g.loss_aggregation == "token_mean" else float(len(batch))
    if not normalizer > 0:
        raise ValueError("the minibatch has no response tokens to train on")
    device = _device(model)
    shard = batch.rows(P.data_parallel_rows(len(batch))).padded(P.sequence_multiple(), pad_id)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    store = _run_schedule(model, _microbatches(shard, g.micro_batch_size, device),
                          partial(_grpo_loss, g, normalizer), forward_only=False)
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
                   seed: int, *, pad_id: int = 0) -> dict[str, float]:
    """``g.num_minibatches`` optimizer steps over a rollout batch (seeded shuffle, as the single-process
    trainer does), with its metric names: ``actor/<metric>`` token-weighted, ``actor/grad_norm`` the mean
    over steps, ``actor/updates``."""
    sums: dict[str, float] = {}
    tokens = 0.0
    norms: list[float] = []
    for mb in A.split_minibatches(len(batch), g.num_minibatches, seed=seed):
        m = train_minibatch(model, optimizer, batch.rows(mb), g, pad_id=pad_id)
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
                       advantages: Sequence[float], pad_id: int) -> TrainBatch:
    """A ``TrainBatch`` (no log-probs yet) from token id lists, via ``algorithm.build_training_batch``."""
    input_ids, mask, positions = A.build_training_batch(prompt_ids, response_ids, pad_id)
    return TrainBatch(input_ids, positions, mask, torch.as_tensor(list(advantages), dtype=torch.float32))
