"""Methods vLLM mixes into its worker (``LLM(worker_extension_cls=...)``) to take new weights.

Weights arrive as a safetensors file (in /dev/shm: memory, not disk) because vLLM's RPC cannot pickle
tensors; ``reload_weights`` loads them in place, then the CPU MoE pre-pack is redone where needed.
The engine also reports which attention backends its layers were built with (``cookbook.rollout.backends``).
"""
from __future__ import annotations


class WeightSyncExtension:
    def cookbook_load_weights(self, path: str) -> int:
        from safetensors.torch import load_file

        from cookbook.rollout import compat

        weights = load_file(path)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
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
