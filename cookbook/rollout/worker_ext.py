"""Methods vLLM mixes into its worker (``LLM(worker_extension_cls=...)``) to take new weights.

Weights arrive as a safetensors file (in /dev/shm: memory, not disk) because vLLM's RPC cannot pickle
tensors; ``reload_weights`` loads them in place, then the CPU MoE pre-pack is redone where needed.

vLLM's reload warns, at every sync, that MLA's ``W_UV`` / ``W_UK_T`` "were not loaded from checkpoint" and
that ``RotaryEmbedding`` "failed to load weights". Both are expected: the absorbed ``W_UV`` / ``W_UK_T`` are
recomputed from the new ``kv_b_proj`` after loading, and the rotary cos/sin cache comes from the config, not
from weights (tests/integration/test_rollout_vllm.py checks decode log-probs against HF after a sync). Any
other weight or layer left out is a broken sync and raises here.

The engine also reports which attention backends its layers were built with (``cookbook.rollout.backends``).
"""
from __future__ import annotations

import logging

DERIVED_WEIGHTS = ("W_UV", "W_UK_T")  # MLA's absorbed matrices, recomputed from kv_b_proj after every load
WEIGHTLESS_LAYERS = ("RotaryEmbedding",)  # buffers computed from the config
RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.inplace",
                  "vllm.model_executor.model_loader.reload.layerwise")


class _ReloadWarnings(logging.Handler):
    """Collects what vLLM's reload reports as not loaded (its log records carry the names as arguments)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.weights: set[str] = set()
        self.layers: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if "not loaded from checkpoint" in record.msg:
            self.weights |= set(record.args[0])
        elif "Failed to load weights" in record.msg:
            self.layers.add(str(record.args[0]))


def unexpected_unloaded(weights: set[str], layers: set[str]) -> list[str]:
    """The names a sync left stale that are not derived or weightless (empty for a complete sync)."""
    return sorted({w for w in weights if w.rsplit(".", 1)[-1] not in DERIVED_WEIGHTS} |
                  {f"layer {name}" for name in layers if name not in WEIGHTLESS_LAYERS})


class WeightSyncExtension:
    def cookbook_load_weights(self, path: str) -> int:
        from safetensors.torch import load_file

        from cookbook.rollout import compat

        weights = load_file(path)
        report = _ReloadWarnings()
        loggers = [logging.getLogger(name) for name in RELOAD_LOGGERS]
        for logger in loggers:
            logger.addHandler(report)
        try:
            self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        finally:
            for logger in loggers:
                logger.removeHandler(report)
        stale = unexpected_unloaded(report.weights, report.layers)
        if stale:
            raise RuntimeError(f"weight sync left {len(stale)} weights of the rollout engine stale: {stale[:8]}; "
                               "the trainer's HF export does not cover them (cookbook.convert.names)")
        if compat.needed("moe"):
            compat.repack_cpu_moe(self.model_runner.get_model())
        return len(weights)

    def cookbook_attention_backends(self) -> list[dict[str, str]]:
        """Per MLA attention layer: the decode backend and the prefill backend vLLM selected."""
        out = []
        for name, module in self.model_runner.get_model().named_modules():
            backend = getattr(module, "attn_backend", None)
            if backend is None:
                continue
            prefill = getattr(module, "prefill_backend", None)
            out.append({"layer": name, "backend": backend.get_name(),
                        "prefill": type(prefill).get_name() if prefill is not None else "-"})
        return out
