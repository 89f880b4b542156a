"""Methods vLLM mixes into its worker (``LLM(worker_extension_cls=...)``) to take new weights.

Weights arrive as a safetensors file (in /dev/shm: memory, not disk) because vLLM's RPC cannot pickle
tensors; ``reload_weights`` loads them in place, then the CPU MoE pre-pack is redone where needed.
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
