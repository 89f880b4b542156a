"""One rank of the trainer group: a shard of the Megatron-Core policy under the configured layout.

The GRPO loop (``cookbook.grpo.loop``) drives every rank of the group through the same calls, in the same
order; each call is collective over the group (``cookbook.cluster.group``). A rank has a clear life:

- ``setup``: torch.distributed and Megatron's parallel state for the layout (TP, PP, EP, ETP, CP, DP; gloo on
  CPU, NCCL on GPU), this rank's shard of the policy and of the frozen reference model, both loaded from the
  converted Megatron checkpoint (any layout loads it), and the optimizer;
- ``train_step``: old and reference log-probs, the rollout-vs-trainer mismatch, TIS weights, then
  ``grpo.num_minibatches`` updates through ``cookbook.grpo.parallel_step`` (the loss settings, the fused loss
  as a choice, the router expert-bias update), the same code for one rank and for many;
- ``sync_weights``: HF-named weights gathered in buckets of whole layers onto rank 0, which pushes each bucket
  to the rollout engine (the routers' expert bias left out with ``parallel.sync_expert_bias=false``);
- ``save_checkpoint`` / ``load_checkpoint``: Megatron distributed checkpoints (``cookbook.grpo.checkpoint``);
- ``shutdown``.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Any

import torch

from cookbook.config import CookbookConfig
from cookbook.grpo import algorithm as A
from cookbook.megatron import routing


def trainer_model_config(cfg: CookbookConfig) -> dict[str, Any]:
    """The architecture a checkpoint belongs to (paths left out): a resume under another model is refused."""
    return {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("hf_dir", "mcore_dir")}


EXPERT_BIAS = "e_score_correction_bias"  # the routers' expert bias, by its HF name


def kept_by_rollout(cfg: CookbookConfig) -> tuple[str, ...]:
    """The HF weight names (last part) a weight sync leaves out, so that the rollout engine keeps what it loaded:
    the expert bias with ``parallel.sync_expert_bias=false`` (the stability study's knob; also the case of a trainer
    built without the bias, ``moe.trainer_expert_bias=false``, which has none to send)."""
    return () if cfg.parallel.sync_expert_bias else (EXPERT_BIAS,)


def rollout_tensors(bucket: dict[str, torch.Tensor], cfg: CookbookConfig) -> dict[str, torch.Tensor]:
    """A bucket in the rollout engine's dtype (bf16 on GPUs), the router's expert bias kept in fp32 as in the
    checkpoints, or left out with ``parallel.sync_expert_bias=false``; on CUDA when the trainer is (a one-rank group
    hands over its own tensors)."""
    from cookbook.megatron.model import DTYPES
    from cookbook.rollout.backends import rollout_dtype

    dtype = DTYPES[rollout_dtype(cfg)]
    left_out = kept_by_rollout(cfg)
    return {name: (t if not t.is_floating_point() or name.endswith(EXPERT_BIAS) else t.to(dtype)).contiguous()
            for name, t in bucket.items() if name.rsplit(".", 1)[-1] not in left_out}


def bucket_message(bucket: dict[str, torch.Tensor]) -> "bytes | dict":
    """What travels to the rollout engine: CUDA IPC handles of tensors on the GPU the engine shares (no copy;
    the sender keeps them alive until the engine has loaded them), else safetensors bytes."""
    if next(iter(bucket.values())).is_cuda:
        from torch.multiprocessing.reductions import reduce_tensor

        return {name: reduce_tensor(t) for name, t in bucket.items()}
    from safetensors.torch import save

    return save(bucket)


class TrainerRank:
    """One trainer rank (a Ray actor); ``rank`` 0 also talks to the rollout engine."""

    def __init__(self, cfg: CookbookConfig, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))

    @staticmethod
    def address() -> tuple[str, int]:
        """This node's address and a free port: rank 0's answer becomes the group's MASTER_ADDR / PORT."""
        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self, master_addr: str, master_port: int, mcore_dir: str, pad_id: int) -> dict[str, int]:
        """Join the group, build this rank's shards of the policy and the reference, load both from the converted
        checkpoint, make the optimizer. Returns the layout this rank sees (for the log)."""
        from cookbook.convert.hf_to_mcore import load_megatron_checkpoint
        from cookbook.grpo.fused_loss import fused_loss_enabled
        from cookbook.grpo.optimizer import make_optimizer
        from cookbook.megatron.model import build_model, init_parallel, use_cuda
        from cookbook.megatron.parallel import layout

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        cfg, g = self.cfg, self.cfg.grpo
        torch.manual_seed(cfg.seed)
        init_parallel(cfg, rank=self.rank, world_size=self.world_size)
        self.model = self._on_device(build_model(cfg), use_cuda(cfg))
        load_megatron_checkpoint(self.model, mcore_dir)
        self.ref_model = self._on_device(build_model(cfg), use_cuda(cfg)).eval()  # the initial policy, frozen
        load_megatron_checkpoint(self.ref_model, mcore_dir)
        for p in self.ref_model.parameters():
            p.requires_grad_(False)
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad], g,
                                        master_weights=g.master_weights)
        self.pad_id = pad_id
        self.fused = fused_loss_enabled(cfg)  # grpo.use_fused_kernels on CUDA: kernels/grpo_loss.py
        # MoE routing statistics every step, and replay of the rollout's routing with moe.routing_replay=r3
        self.moe_layers = routing.attach_trainer(cfg, self.model, self.ref_model)
        return layout()

    @staticmethod
    def _on_device(model: torch.nn.Module, cuda: bool) -> torch.nn.Module:
        return model.cuda() if cuda else model

    # -- the step ------------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, list], step: int) -> dict[str, float]:
        """One GRPO step on the global rollout batch (every rank gets all of it and takes its share)."""
        from cookbook.grpo.packing import PackingSpec
        from cookbook.grpo.parallel_step import batch_from_rollout, forward_logprobs, train_on_batch

        g, t0 = self.cfg.grpo, time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        # grpo.sequence_packing: the step trains in packed rows; tensors here stay in the padded [B, L - 1] layout
        tb = batch_from_rollout(batch["prompt_ids"], batch["response_ids"], batch["advantages"], self.pad_id,
                                packing=PackingSpec.from_config(self.cfg))
        tb = routing.with_rollout_routing(  # the experts the rollout chose
            tb, batch.get("routed_experts"), self.moe_layers, self.cfg.model.moe_router_topk,
            replay=self.cfg.moe.routing_replay == "r3")

        def logprobs(model: torch.nn.Module) -> torch.Tensor:
            return forward_logprobs(model, tb, micro_batch_size=g.micro_batch_size, temperature=g.temperature,
                                    pad_id=self.pad_id)

        routing.start_pass(self.model, keep=True)  # the policy's routing before the updates, vs the rollout's
        old_logp, ref_logp = logprobs(self.model), logprobs(self.ref_model)
        routing_before = routing.end_pass(self.model)
        rollout_logp = A.align_rollout_logprobs(batch["prompt_ids"], batch["rollout_logp"], tb.mask)
        metrics = {f"mismatch/{k}": v for k, v in
                   A.mismatch_metrics(old_logp, rollout_logp, tb.mask, g.mismatch_threshold).items()}
        # grpo.importance_correction over the whole step's batch: TIS weights and/or token or sequence masks (0/1),
        # one per-token weight the loss multiplies in; what the masks drop is logged as is/*
        is_weights, correction = A.importance_weights(old_logp, rollout_logp, tb.mask, g.importance_correction,
                                                      cap=g.importance_cap, low=g.importance_low,
                                                      high=g.importance_high)
        metrics.update({f"is/{k}": v for k, v in correction.items()})
        tb = dataclasses.replace(tb, old_logp=old_logp, ref_logp=ref_logp, is_weights=is_weights)
        metrics.update(train_on_batch(self.model, self.optimizer, tb, g, seed=self.cfg.seed + step,
                                      pad_id=self.pad_id, fused=self.fused))
        # routing/*: rollout vs trainer, and policy change (one more forward of the batch, after the updates)
        metrics.update(routing.policy_change(self.model, routing_before, lambda: logprobs(self.model), self.moe_layers))
        tokens = sum(len(p) + len(r) for p, r in zip(batch["prompt_ids"], batch["response_ids"]))
        metrics["perf/train_tokens_per_s"] = tokens / (time.perf_counter() - t0)  # batch tokens / step time
        if torch.cuda.is_available():
            metrics["memory/train_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return metrics

    # -- weights out ---------------------------------------------------------------------------------
    def sync_weights(self, rollout: Any, bucket_bytes: int) -> dict[str, float]:
        """Push the policy's HF-named weights to the rollout engine in buckets of whole layers of at most
        ``bucket_bytes`` (a larger layer goes alone): every rank takes part in each gather, rank 0 sends."""
        import ray

        from cookbook.megatron.parallel import iter_hf_buckets

        t0 = time.perf_counter()
        nbytes, largest, count, load_s = 0, 0, 0, 0.0
        if self.rank == 0:
            ray.get(rollout.begin_weight_update.remote())
        for bucket in iter_hf_buckets(self.model, bucket_bytes):
            if self.rank == 0:
                bucket = rollout_tensors(bucket, self.cfg)
                if not bucket:
                    continue
                size = sum(t.numel() * t.element_size() for t in bucket.values())
                nbytes, largest, count = nbytes + size, max(largest, size), count + 1
                t_load = time.perf_counter()
                ray.get(rollout.load_weight_bucket.remote(bucket_message(bucket)))
                load_s += time.perf_counter() - t_load
        t_finish = time.perf_counter()
        if self.rank == 0:  # what the sync left out on purpose may stay as the engine loaded it
            ray.get(rollout.finish_weight_update.remote(kept_by_rollout(self.cfg)))
        end = time.perf_counter()
        seconds = end - t0
        # where the time goes: the engine loading buckets, its final checks, the rest (gather, names, casts)
        return {"bytes": float(nbytes), "buckets": float(count), "largest_bucket_bytes": float(largest),
                "seconds": seconds, "gb_per_s": nbytes / max(seconds, 1e-9) / 1e9, "engine_load_s": load_s,
                "engine_finish_s": end - t_finish, "gather_s": t_finish - t0 - load_s}

    def save_model(self, out_dir: str) -> str:
        """The policy as a torch_dist checkpoint (collective); ``cookbook.convert`` turns it into HF."""
        from megatron.core import dist_checkpointing

        if self.rank == 0:
            os.makedirs(out_dir, exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(self.model.sharded_state_dict(), out_dir)
        return out_dir

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self, run_dir: str, step: int, loop_state: dict[str, Any], keep: int) -> str:
        from cookbook.grpo.checkpoint import save_checkpoint

        return str(save_checkpoint(run_dir, step, self.model, self.optimizer, loop_state,
                                   trainer_model_config(self.cfg), keep=keep))

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        from cookbook.grpo.checkpoint import load_checkpoint

        return load_checkpoint(path, self.model, self.optimizer, trainer_model_config(self.cfg))

    def shutdown(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
