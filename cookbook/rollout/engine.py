"""The rollout engine: vLLM built from the policy's HF directory, sampling n responses per prompt.

Prompts are tokenized here with the model's chat template (the trainer sees exactly these ids), and
each sample carries the log-prob vLLM assigned to every generated token, so the trainer can measure
the rollout-vs-trainer mismatch, and (on request) the experts every MoE layer routed each forwarded token
to, for the trainer's routing statistics and routing replay (``cookbook.megatron.routing``). New weights
arrive every step by name (HF names) without a checkpoint on disk, in buckets of whole layers
(``begin_weight_update``, ``load_weight_bucket``, ``finish_weight_update``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np
import torch

from cookbook.config import CookbookConfig

Messages = list[dict[str, str]]


@dataclass
class RolloutSample:
    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    # [len(prompt_ids) + len(response_ids) - 1, MoE layers (RolloutWorker.moe_layers), top_k]: the experts each
    # forwarded token (every one but the last sampled) was routed to; uint8 up to 256 experts, else int16
    routed_experts: Optional[np.ndarray] = None


def moe_layers(hf_config: Any) -> list[int]:
    """The MoE layers of a DeepSeek-V3-style HF config (0-based, as ``model.layers.{L}``)."""
    if not getattr(hf_config, "n_routed_experts", None):
        return []
    first, freq = getattr(hf_config, "first_k_dense_replace", 0), getattr(hf_config, "moe_layer_freq", 1) or 1
    return [layer for layer in range(hf_config.num_hidden_layers) if layer >= first and layer % freq == 0]


def routing_source(cfg: CookbookConfig, capture: bool) -> Optional[str]:
    """Where the rollout's routed experts come from: ``"capture"`` where the CPU ``routed`` fix applies
    (``capture``: ``compat.needed("routed")``), ``"vllm"`` on GPUs when this vLLM's ``EngineArgs`` has
    ``enable_return_routed_experts``, else None (a dense model too). ``moe.routing_replay=r3`` without a source
    raises here, before the engine is built: there would be nothing to replay."""
    from vllm.engine.arg_utils import EngineArgs

    from cookbook.rollout import backends

    source = None
    if cfg.model.num_experts and capture:
        source = "capture"
    elif cfg.model.num_experts and backends.on_gpu(cfg) and "enable_return_routed_experts" in {
            f.name for f in dataclasses.fields(EngineArgs)}:
        source = "vllm"
    if source is None and cfg.moe.routing_replay == "r3":
        import vllm

        raise ValueError(f"moe.routing_replay=r3 needs the experts the rollout engine routed to, and vLLM "
                         f"{vllm.__version__} here cannot return them (no enable_return_routed_experts, no CPU "
                         "capture): set moe.routing_replay=none")
    return source


def _engine_env(cfg: CookbookConfig) -> None:
    """In-process engine (no spawn; 3 s instead of 17 s on CPU) and a small KV cache on CPU."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if cfg.parallel.gpus_per_node == 0:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def engine_args(cfg: CookbookConfig, hf_dir: str) -> dict[str, Any]:
    """vLLM's ``LLM`` arguments from the config (pure, so that what decides the engine's numbers can be compared
    without building one: ``cookbook.grpo.baseline``)."""
    from cookbook.rollout import backends

    g, p = cfg.grpo, cfg.parallel
    kwargs: dict[str, Any] = {}
    if backends.on_gpu(cfg):  # colocated with the trainer: sleep releases the KV cache while the trainer works
        kwargs.update(gpu_memory_utilization=p.rollout_gpu_memory_utilization, enable_sleep_mode=p.colocate)
    return dict(model=hf_dir, dtype=backends.rollout_dtype(cfg), attention_backend=backends.attention_backend(cfg),
                max_model_len=g.max_prompt_length + g.max_response_length, seed=cfg.seed, enforce_eager=True,
                tensor_parallel_size=p.rollout_tensor, max_num_seqs=256,
                worker_extension_cls="cookbook.rollout.worker_ext.WeightSyncExtension", **kwargs)


class RolloutWorker:
    """One vLLM engine (a Ray actor on CPU; TP ranks live inside vLLM on GPU)."""

    def __init__(self, hf_dir: str, cfg: CookbookConfig):
        _engine_env(cfg)
        from transformers import AutoTokenizer

        from cookbook.rollout import backends, compat

        self.cfg = cfg
        self.fixes = compat.apply_before_engine()
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        self.on_gpu = backends.on_gpu(cfg)
        # the experts the routers chose (routing statistics, moe.routing_replay): "capture" (the CPU `routed` fix),
        # "vllm" (vLLM's own output), or None (this vLLM cannot: no routing metrics, and r3 is refused)
        self.routing = routing_source(cfg, compat.needed("routed"))
        self.llm = self._build_llm(cfg, engine_args(cfg, hf_dir))
        self.backends = self.llm.collective_rpc("cookbook_attention_backends")[0]
        backends.check_selected(cfg, self.backends)
        hf_config = self.llm.llm_engine.model_config.hf_config
        self.moe_layers, self.num_experts = moe_layers(hf_config), int(getattr(hf_config, "n_routed_experts", 0) or 0)
        if self.routing == "capture":
            captured = self.llm.collective_rpc("cookbook_capture_routing")[0]
            if captured != self.moe_layers:
                raise RuntimeError(f"the engine routes in layers {captured}, the config names {self.moe_layers}")
        self._sync_file = Path(shm_dir()) / f"cookbook-weights-{os.getpid()}.safetensors"

    def _build_llm(self, cfg: CookbookConfig, build: dict[str, Any]) -> Any:
        from vllm import LLM

        if self.routing == "vllm":
            # vLLM returns routed experts only with prefix caching on (it keeps the routing of cached prompt blocks).
            # Prefix caching stays off otherwise: a cache hit skips recomputing a prompt's KV, which changes the
            # rollout's numerics; finish_weight_update resets the cache, so no block of an older policy is reused.
            try:
                return LLM(**build, enable_prefix_caching=True, enable_return_routed_experts=True)
            except Exception as e:  # noqa: BLE001 - vLLM refuses the option in some set-ups: rebuilt without it
                if cfg.moe.routing_replay == "r3":
                    raise ValueError("moe.routing_replay=r3 needs the rollout engine's routed experts, and vLLM "
                                     f"refused enable_return_routed_experts: {e}") from e
                logging.getLogger(__name__).warning(
                    "vLLM refused enable_return_routed_experts (%s): this run logs no routing/* metrics", e)
                self.routing = None
        return LLM(**build, enable_prefix_caching=False)

    def ready(self) -> dict[str, Any]:
        """The CPU fixes applied, the attention backends the engine's layers run, where the routing comes from
        (for the run log)."""
        fixes = self.fixes + (["routed"] if self.routing == "capture" else [])
        return {"fixes": fixes, "attention": sorted({(b["backend"], b["prefill"]) for b in self.backends}),
                "moe_layers": self.moe_layers, "routing": self.routing}

    def encode(self, prompt: Union[Messages, list[int]]) -> list[int]:
        if prompt and isinstance(prompt[0], int):
            return list(prompt)
        ids = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        limit = self.cfg.grpo.max_prompt_length
        if len(ids) > limit:
            raise ValueError(f"a prompt has {len(ids)} tokens, over grpo.max_prompt_length={limit}")
        return list(ids)

    def generate(self, prompts: list[Union[Messages, list[int]]], n: int, temperature: float, top_p: float = 1.0,
                 top_k: int = -1, max_tokens: int = 64, seed: Optional[int] = None, routed_experts: bool = False
                 ) -> list[RolloutSample]:
        """``n`` samples per prompt, ordered prompt by prompt; reproducible for a given ``seed``. With
        ``routed_experts`` each sample carries the experts its tokens were routed to (``RolloutSample``)."""
        from vllm import SamplingParams, TokensPrompt

        encoded = [self.encode(p) for p in prompts]
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                                 max_tokens=max_tokens, logprobs=0,
                                 seed=None if seed is None else (seed + i) % 2**31)
                  for i in range(len(encoded))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in encoded], params,
                                    use_tqdm=False)
        captured = self._take_routing()
        samples = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                logps = [float(step[tok].logprob) for step, tok in zip(c.logprobs, c.token_ids)]
                samples.append(RolloutSample(i, encoded[i], list(c.token_ids), c.text, logps,
                                             c.finish_reason or "stop"))
                if routed_experts and self.routing:
                    samples[-1].routed_experts = self._routed_experts(out, c, captured, len(encoded[i]))
        return samples

    def _take_routing(self) -> dict[tuple[str, int], np.ndarray]:
        """The captured routing of the requests just generated, by (request id, sample index); emptied after every
        call (evaluations and prompt log-probs too, so nothing piles up)."""
        from cookbook.rollout.compat import request_key

        if self.routing != "capture":
            return {}
        return {request_key(rid): ids for rid, ids in self.llm.collective_rpc("cookbook_take_routing")[0].items()}

    def _routed_experts(self, out: Any, completion: Any, captured: dict, prompt_len: int) -> np.ndarray:
        rows = prompt_len + len(completion.token_ids) - 1  # the last sampled token is never forwarded
        if self.routing == "capture":
            ids = captured.get((out.request_id, completion.index))
        else:  # vLLM's own: [tokens, every decoder layer, top_k]
            ids = completion.routed_experts
            ids = None if ids is None else ids[:, self.moe_layers]
        if ids is None or ids.shape[0] < rows:
            raise RuntimeError(f"the rollout engine returned routing for {None if ids is None else ids.shape[0]} "
                               f"positions of request {out.request_id}/{completion.index}, expected {rows}")
        return np.ascontiguousarray(ids[:rows], dtype=np.uint8 if self.num_experts <= 256 else np.int16)

    def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Log-prob of each token given the ones before it (first token excluded), for sync checks."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in token_ids], params, use_tqdm=False)
        self._take_routing()
        return [[float(step[tok].logprob) for step, tok in zip(o.prompt_logprobs[1:], ids[1:])]
                for o, ids in zip(outs, token_ids)]

    def begin_weight_update(self) -> None:
        self.llm.collective_rpc("cookbook_begin_update")

    def load_weight_bucket(self, data: Union[bytes, dict[str, Any]]) -> int:
        """One bucket of HF-named weights (whole layers); returns how many tensors.

        On CPU: safetensors bytes, which travel through Ray's object store (the sending trainer rank may live on
        another node) and reach vLLM's worker as a file in shared memory (its RPC cannot pickle CPU tensors).
        On GPU: CUDA IPC handles of the sender's tensors on the same GPU (``cuda_ipc_handles``), opened here
        without a copy and loaded in-process (the engine runs in this process), no file, no host round trip."""
        if isinstance(data, dict):
            tensors = {name: rebuild(*args) for name, (rebuild, args) in data.items()}
            return self.llm.collective_rpc("cookbook_load_bucket", args=(tensors,))[0]
        self._sync_file.write_bytes(data)
        try:
            return self.llm.collective_rpc("cookbook_load_bucket", args=(str(self._sync_file),))[0]
        finally:
            self._sync_file.unlink(missing_ok=True)

    def device_memory_gib(self) -> float:
        """GPU memory in use on this engine's device, by every process (the colocated trainer's too); 0 on CPU."""
        if not self.on_gpu:
            return 0.0
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**30

    def sleep(self) -> float:
        """Release the KV cache and offload the weights to host memory while the trainer uses the GPU (vLLM's
        sleep mode, level 1); returns the seconds it took. A no-op on CPU, where vLLM has no sleep mode."""
        t0 = time.perf_counter()
        if self.on_gpu and self.cfg.parallel.colocate:
            self.llm.sleep(level=1)
        return time.perf_counter() - t0

    def wake_up(self, tags: Optional[list[str]] = None) -> float:
        """Bring back the weights (``tags=["weights"]``, before a weight update), the KV cache, or both."""
        t0 = time.perf_counter()
        if self.on_gpu and self.cfg.parallel.colocate:
            self.llm.wake_up(tags=tags)
        return time.perf_counter() - t0

    def finish_weight_update(self, kept: tuple[str, ...] = ()) -> None:
        """Refuse an update that left a weight stale (but those named in ``kept``, left out on purpose, keep what
        the engine loaded); redo the CPU MoE packing once for all layers; forget the prefix cache (on only for
        vLLM's routed experts): its blocks hold the old policy's KV."""
        self.llm.collective_rpc("cookbook_finish_update", args=(tuple(kept),))
        if self.routing == "vllm":
            self.llm.reset_prefix_cache()

    def update_weights(self, buckets: Union[dict[str, torch.Tensor], Iterable[dict[str, torch.Tensor]]]
                       ) -> dict[str, float]:
        """Load HF-named weights from this process (one dict, or an iterable of bucket dicts); returns timing."""
        from safetensors.torch import save

        t0 = time.perf_counter()
        nbytes, count = 0, 0
        self.begin_weight_update()
        for bucket in [buckets] if isinstance(buckets, dict) else buckets:
            tensors = {name: t.detach().contiguous() for name, t in bucket.items()}
            nbytes += sum(t.numel() * t.element_size() for t in tensors.values())
            self.load_weight_bucket(save(tensors))
            count += 1
        self.finish_weight_update()
        seconds = time.perf_counter() - t0
        return {"bytes": float(nbytes), "buckets": float(count), "seconds": seconds,
                "gb_per_s": nbytes / max(seconds, 1e-9) / 1e9}

    def shutdown(self) -> None:
        self._sync_file.unlink(missing_ok=True)
        del self.llm
