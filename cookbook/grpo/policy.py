"""The policy trainer: a Megatron-Core GPTModel (MLA + MoE) updated with the GRPO loss.

It runs inside a Ray actor. Per step it recomputes the old log-probs (the reference does not trust the
rollout engine's), computes reference log-probs for the KL (logged even at coefficient 0, as the
reference does), measures the trainer-vs-rollout mismatch, then makes ``grpo.num_minibatches`` optimizer
steps over the batch with token-level loss aggregation. It exports HF-named weights for the per-step
sync and an HF checkpoint at the end.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from cookbook.config import CookbookConfig
from cookbook.grpo import algorithm as A
from cookbook.grpo.checkpoint import load_checkpoint, save_checkpoint
from cookbook.grpo.fused_loss import fused_loss_enabled, fused_policy_loss
from cookbook.models.hf_config import read_hf_config
from cookbook.rundir import mcore_dir


def _micro_slices(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class PolicyTrainer:
    """One trainer rank (the tiny preset on CPU has exactly one)."""

    def __init__(self, cfg: CookbookConfig, hf_dir: str):
        from cookbook.megatron.model import build_model, init_parallel

        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, (os.cpu_count() or 2)))
        init_parallel(cfg, rank=0, world_size=1)
        self.model = build_model(cfg)
        self._load_initial_weights(hf_dir)
        self.hf_dir = hf_dir
        self.ref_model = build_model(cfg).eval()  # the initial policy, frozen (a deepcopy cannot copy groups)
        self.ref_model.load_state_dict(self.model.state_dict())
        for p in self.ref_model.parameters():
            p.requires_grad_(False)
        g = cfg.grpo
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=g.lr,
            betas=(g.adam_beta1, g.adam_beta2), weight_decay=g.weight_decay)
        self.pad_id = int(read_hf_config(hf_dir).get("pad_token_id") or 0)
        self.fused_loss = fused_loss_enabled(cfg)  # grpo.use_fused_kernels on CUDA: kernels/grpo_loss.py

    # -- set-up -------------------------------------------------------------------------------
    def _load_initial_weights(self, hf_dir: str) -> None:
        """From the converted Megatron checkpoint (notebook 20); converted first when it is missing."""
        from cookbook.convert.hf_to_mcore import load_megatron_checkpoint
        from cookbook.convert.pipeline import convert

        mcore = mcore_dir(self.cfg)
        if not mcore.is_dir():
            convert(self.cfg, "hf_to_mcore", hf_dir, mcore, part=(0, 1), progress=False)
        load_megatron_checkpoint(self.model, mcore)
        self.init_source = str(mcore)

    def ready(self) -> str:
        return self.init_source

    # -- forward ------------------------------------------------------------------------------
    def _token_logprobs(self, model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                        grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from cookbook.megatron.model import forward_logits

        with torch.set_grad_enabled(grad):
            logits = forward_logits(model, input_ids, position_ids)
            return A.token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature=self.cfg.grpo.temperature)

    def _batched_logprobs(self, model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor
                          ) -> torch.Tensor:
        size = self.cfg.grpo.micro_batch_size
        return torch.cat([self._token_logprobs(model, input_ids[s], position_ids[s], grad=False)[0]
                          for s in _micro_slices(len(input_ids), size)])

    # -- the step -----------------------------------------------------------------------------
    def train_step(self, batch: dict[str, list], step: int) -> dict[str, float]:
        """One GRPO step on a rollout batch; returns metrics for the log."""
        from cookbook.megatron.model import update_router_expert_bias

        g, t0 = self.cfg.grpo, time.perf_counter()
        input_ids, mask, position_ids = A.build_training_batch(batch["prompt_ids"], batch["response_ids"],
                                                               self.pad_id)
        # mask[:, t] marks that token t+1 is a response token, aligned with log-probs of input_ids[:, 1:]
        rollout_logp = A.align_rollout_logprobs(batch["prompt_ids"], batch["rollout_logp"], mask)
        advantages = torch.tensor(batch["advantages"], dtype=torch.float32)

        self.model.eval()
        old_logp = self._batched_logprobs(self.model, input_ids, position_ids)
        ref_logp = self._batched_logprobs(self.ref_model, input_ids, position_ids)
        metrics = {f"mismatch/{k}": v for k, v in
                   A.mismatch_metrics(old_logp, rollout_logp, mask, g.mismatch_threshold).items()}
        is_weights = A.tis_weights(old_logp, rollout_logp, mask, g.importance_cap) \
            if g.importance_correction == "tis" else None

        self.model.train()
        token_sums: dict[str, float] = {}  # per-token metrics, weighted by each micro-batch's valid tokens
        tokens_seen = 0.0
        grad_norms: list[float] = []
        for mb in A.split_minibatches(len(input_ids), g.num_minibatches, seed=self.cfg.seed + step):
            normalizer = float(mask[mb].sum()) if g.loss_aggregation == "token_mean" else float(len(mb))
            self.optimizer.zero_grad(set_to_none=True)
            for s in _micro_slices(len(mb), g.micro_batch_size):
                idx = mb[s]
                weights = None if is_weights is None else is_weights[idx]
                if self.fused_loss:
                    out = fused_policy_loss(self.model, input_ids[idx], position_ids[idx], old_logp[idx],
                                            advantages[idx], mask[idx], cfg=self.cfg, normalizer=normalizer,
                                            ref_logp=ref_logp[idx], is_weights=weights)
                else:
                    logp, entropy = self._token_logprobs(self.model, input_ids[idx], position_ids[idx], grad=True)
                    out = A.policy_loss(logp, old_logp[idx], advantages[idx], mask[idx], normalizer=normalizer,
                                        ref_logp=ref_logp[idx], is_weights=weights, entropy=entropy,
                                        **A.loss_settings(g))
                out.loss.backward()
                for k, v in out.metrics.items():
                    token_sums[k] = token_sums.get(k, 0.0) + float(v) * out.num_tokens
                tokens_seen += out.num_tokens
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), g.grad_clip)))
            self.optimizer.step()
            update_router_expert_bias(self.model)
        metrics.update({f"actor/{k}": v / max(tokens_seen, 1.0) for k, v in token_sums.items()})
        metrics["actor/grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["actor/updates"] = len(grad_norms)
        tokens = sum(len(p) + len(r) for p, r in zip(batch["prompt_ids"], batch["response_ids"]))
        metrics["perf/train_tokens_per_s"] = tokens / (time.perf_counter() - t0)  # batch tokens / step time
        return metrics

    # -- weights out --------------------------------------------------------------------------
    def export_hf_weights(self) -> dict[str, torch.Tensor]:
        """HF-named tensors for the rollout engine (the convert name table, streamed)."""
        from cookbook.convert.names import megatron_to_hf_tensors

        return {name: t.detach().clone() for name, t in megatron_to_hf_tensors(self.model.state_dict().items())}

    def export_hf_checkpoint(self, out_dir: str) -> str:
        """The trained policy as an HF directory: a torch_dist save, then the same export as notebook 20."""
        from megatron.core import dist_checkpointing

        from cookbook.convert.mcore_to_hf import mcore_to_hf

        staging = Path(out_dir).with_name(Path(out_dir).name + ".mcore")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        dist_checkpointing.save(self.model.sharded_state_dict(), str(staging))
        try:
            return str(mcore_to_hf(self.cfg, staging, out_dir, tokenizer_dir=self.hf_dir, overwrite=True,
                                   progress=False))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, run_dir: str, step: int, loop_state: dict[str, Any]) -> str:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        return str(save_checkpoint(run_dir, step, state, loop_state))

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        state, loop_state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return loop_state

    def shutdown(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
