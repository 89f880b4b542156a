"""Per-GPU memory of a layout, phase by phase, for what this project's code does.

What the code does (and so what is modelled):
- every trainer rank (``cookbook.grpo.trainer.TrainerRank``) keeps its shard of the policy, of the frozen
  reference model, the policy's gradients (autograd's, in the parameter dtype, alive from one backward to the next
  step's ``zero_grad``) and the optimizer's state (``cookbook.grpo.optimizer``: torch AdamW's two moments, with
  ``grpo.master_weights`` an fp32 master copy of each bf16 parameter and fp32 moments; not Megatron's distributed
  optimizer) on its GPU for the whole run: 18 bytes per bf16 parameter (10 without master weights). Nothing of the
  trainer is offloaded between phases (the reference recipe offloads; this project does not);
- its transient peak is the larger of the training forward/backward (activations of the micro-batches a
  pipeline stage holds in flight, the last stage's log-probs, the MoE dispatch buffers; ``activations``) and the
  optimizer step (the gradient norm copies one gradient at a time to fp64; AdamW's ``foreach`` path makes one
  state-sized temporary; master weights add the fp32 copy of every gradient);
- the caching allocator keeps what the training step reserved (nothing calls ``torch.cuda.empty_cache``), so
  during rollout the trainer's GPUs still hold about ``ALLOCATOR_CACHE`` x its transient peak;
- one vLLM engine of ``parallel.rollout_tensor`` GPUs (``cookbook.grpo.workers``), colocated on the first GPUs,
  takes ``parallel.rollout_gpu_memory_utilization`` of each of its GPUs (weights, activations, KV cache); sleep
  mode level 1 (``cookbook.rollout.engine.RolloutWorker.sleep``) frees the KV cache and moves the weights to
  pinned host memory while the trainer works, and wakes both before the weight sync.

Constants measured or assumed, each used once below: ``CUDA_CONTEXT``, ``VLLM_ASLEEP``, ``ALLOCATOR_CACHE``
(from BENCHMARKS.md "First GPU run": 107 GiB in use after rollout, 38 GiB with vLLM asleep, trainer peak 23 GiB),
``PROCESS_HOST``, ``VLLM_BATCHED_TOKENS``, ``VLLM_SAMPLER_COPIES`` (estimates: they only size vLLM's KV cache).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from cookbook.config import CookbookConfig
from cookbook.plan import activations as act
from cookbook.plan.params import largest_tensor, rollout_weight_bytes, stage_counts, stage_layers

GIB = 2**30
CUDA_CONTEXT = 0.5 * GIB  # CUDA context, cuBLAS workspace and NCCL of one process, outside torch's allocator
VLLM_ASLEEP = 1.0 * GIB  # what vLLM keeps on the GPU asleep besides its context (allocations outside its pool)
ALLOCATOR_CACHE = 1.85  # the trainer's reserved pool after a step / its transient peak (first GPU run)
PROCESS_HOST = 3 * GIB  # host memory of one GPU process (Python, torch, CUDA libraries)
VLLM_MAX_SEQS = 256  # cookbook.rollout.engine: max_num_seqs
VLLM_SAMPLER_COPIES = 3  # fp32 [max_num_seqs, vocab] logits, probabilities and log-probs in vLLM's sampler
VLLM_BATCHED_TOKENS = 16384  # vLLM's max_num_batched_tokens for the LLM class on GPUs of 70 GiB or more (else 8192)


@dataclass(frozen=True)
class GPU:
    """A GPU kind: its name and the memory CUDA reports (``nvidia-smi``'s total)."""

    name: str
    bytes: int


GPUS = (GPU("80 GB", 81559 << 20), GPU("141 GB", 143771 << 20))  # H100 80GB, H200


@dataclass
class Line:
    resource: str  # the resource the component counts against
    component: str
    bytes: float


@dataclass
class Resource:
    """One thing that must fit: what the layout needs of it and what there is (None: not judged)."""

    name: str
    need: float
    capacity: float | None
    where: str
    why: str = ""

    @property
    def headroom(self) -> float:
        return math.inf if not self.capacity else 1 - self.need / self.capacity

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.need <= self.capacity


@dataclass
class Plan:
    """The memory plan of one layout on one GPU kind."""

    cfg: CookbookConfig
    gpu: GPU
    lines: list[Line]
    resources: list[Resource]
    stages: list[dict]
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.resources)

    @property
    def tightest(self) -> Resource:
        return min(self.resources, key=lambda r: r.headroom)


# -- the trainer rank --------------------------------------------------------------------------------------------
def trainer_state(cfg: CookbookConfig, stage: int) -> dict[str, float]:
    """Bytes a trainer rank of ``stage`` keeps for the whole run: policy, reference, gradients, optimizer state."""
    c = stage_counts(cfg, stage)
    a = act.DTYPE_BYTES[cfg.model.params_dtype]
    weights = c.params * a + c.buffers * 4
    state = {"policy weights": weights, "reference model": weights, "gradients": c.params * a}
    if master_weights(cfg):
        return state | {"fp32 master weights": c.params * 4, "AdamW moments (fp32)": 2 * c.params * 4}
    return state | {"AdamW moments (torch, param dtype)": 2 * c.params * a}


def master_weights(cfg: CookbookConfig) -> bool:
    """Whether the optimizer keeps fp32 master copies (``cookbook.grpo.optimizer``: bf16 parameters only)."""
    return cfg.grpo.master_weights and act.DTYPE_BYTES[cfg.model.params_dtype] < 4


def in_flight(cfg: CookbookConfig, stage: int, mb: act.MicroBatch) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once: Megatron's 1F1B schedule warms up with
    ``PP - stage`` of them (all of them when there are fewer)."""
    return min(cfg.parallel.pipeline - stage, mb.count)


def trainer_transient(cfg: CookbookConfig, stage: int, tokens_per_sample: int | None = None) -> dict[str, float]:
    """The transient part of a trainer rank's peak: the training pass (activations, log-probs, dispatch) or the
    optimizer step, whichever is larger; the components of the larger one."""
    mb = act.microbatch(cfg, tokens_per_sample)
    stages = stage_layers(cfg)
    dense, moe = stages[stage]
    flight = in_flight(cfg, stage, mb)
    saved: dict[str, float] = {}
    for count, is_moe in ((dense, False), (moe, True)):
        for name, value in (act.layer_bytes(cfg, mb, is_moe) if count else {}).items():
            saved[name] = saved.get(name, 0.0) + value * count * flight
    last = stage == len(stages) - 1
    fused = cfg.grpo.use_fused_kernels and cfg.parallel.gpus_per_node > 0
    logits = act.logits_bytes(cfg, mb, fused) if last else 0.0
    recompute = 0.0
    if cfg.parallel.recompute == "full":  # the backward rebuilds one layer's activations at a time
        recompute = max(sum(act.layer_bytes(cfg, mb, is_moe, "none").values())
                        for count, is_moe in ((dense, False), (moe, True)) if count)
    training = {**saved, "log-probs (logits)": logits, "one layer recomputed": recompute,
                "MoE dispatch buffers": act.dispatch_bytes(cfg, mb) if moe else 0.0}
    if recompute > logits:  # the log-prob peak and the recomputed layer come one after the other
        training["log-probs (logits)"] = 0.0
    else:
        training["one layer recomputed"] = 0.0
    optimizer = optimizer_transient(cfg, stage)
    if optimizer > sum(training.values()):
        return {"optimizer step (grad norm / AdamW temporaries)": optimizer}
    return {k: v for k, v in training.items() if v}


def optimizer_transient(cfg: CookbookConfig, stage: int) -> float:
    """The largest temporary between the backward pass and the end of the optimizer step, one after the other:
    the gradient all-reduce's flat copy of the dense (DP x CP > 1) or expert (expert-DP > 1) gradients
    (``cookbook.megatron.parallel.finish_grad_sync``), the fp64 copy and square of one gradient in the gradient
    norm (16 bytes per element of the largest parameter), AdamW's ``foreach`` square root of every second moment
    (one state-sized temporary), with master weights after the fp32 copies of every gradient."""
    p = cfg.parallel
    c = stage_counts(cfg, stage)
    a = act.DTYPE_BYTES[cfg.model.params_dtype]
    experts = c.parts.get("routed experts", 0)
    dp_cp = cfg.world_size // (p.tensor * p.pipeline)
    edp = cfg.world_size // (p.expert * p.expert_tensor * p.pipeline)
    flat = max((c.params - experts) * a if dp_cp > 1 else 0, experts * a if edp > 1 else 0)
    adam = c.params * 8 if master_weights(cfg) else c.params * a  # (fp32 gradients +) the foreach temporary
    return max(flat, 16 * largest_tensor(cfg, stage), adam)


def trainer_peak(cfg: CookbookConfig, stage: int = 0, tokens_per_sample: int | None = None) -> dict[str, float]:
    """What ``benchmarks/trainer_memory.py`` measures on one rank (``torch.cuda`` allocated bytes): after setup
    (policy + reference), after the first step (+ gradients and AdamW moments) and the step's peak."""
    state = trainer_state(cfg, stage)
    setup = state["policy weights"] + state["reference model"]
    static = sum(state.values())
    return {"after_setup": setup, "after_step": static,
            "peak": static + sum(trainer_transient(cfg, stage, tokens_per_sample).values())}


# -- the rollout engine ------------------------------------------------------------------------------------------
def rollout_parts(cfg: CookbookConfig, gpu: GPU) -> dict[str, float]:
    """One vLLM GPU's share: what the engine takes (``rollout_gpu_memory_utilization`` x GPU memory) and, inside
    it, the weights (bf16 at rollout TP), MLA's absorbed copies of kv_b, an activation estimate (its profile run
    over ``max_num_batched_tokens`` and the sampler) and what is left for the KV cache."""
    m, p = cfg.model, cfg.parallel
    rt = p.rollout_tensor
    budget = p.rollout_gpu_memory_utilization * gpu.bytes
    weights = rollout_weight_bytes(m, rt)
    absorbed = m.num_layers * m.num_attention_heads / rt * (m.qk_nope_head_dim + m.v_head_dim) * m.kv_lora_rank * 2
    dq = m.qk_nope_head_dim + m.qk_rope_head_dim
    per_token = (4 * m.hidden_size + m.num_attention_heads / rt * (2 * dq + 2 * m.v_head_dim)
                 + 2 * m.moe_router_topk * (2 * m.moe_ffn_hidden_size / rt + m.hidden_size))
    batched = VLLM_BATCHED_TOKENS if gpu.bytes >= 70 * GIB else VLLM_BATCHED_TOKENS // 2
    activations = batched * 2 * per_token + VLLM_SAMPLER_COPIES * VLLM_MAX_SEQS * m.vocab_size * 4
    return {"budget": budget, "weights": weights, "absorbed": absorbed, "activations": activations,
            "kv_cache": budget - weights - absorbed - activations}


def kv_bytes_per_token(cfg: CookbookConfig) -> int:
    """MLA caches one latent per token and layer, whole on every TP rank: (kv_lora_rank + qk_rope) x 2 bytes."""
    m = cfg.model
    return m.num_layers * (m.kv_lora_rank + m.qk_rope_head_dim) * 2


def vllm_stages(cfg: CookbookConfig) -> set[int]:
    """Pipeline stages of the trainer ranks that share a GPU with the vLLM engine: the engine takes the first
    ``rollout_tensor`` GPUs, and Megatron numbers ranks TP, CP, EP/DP first, pipeline stage last."""
    p = cfg.parallel
    if not p.colocate:
        return set()
    per_stage = cfg.world_size // p.pipeline
    return {r // per_stage for r in range(min(p.rollout_tensor, cfg.world_size))}


# -- the plan ----------------------------------------------------------------------------------------------------
def plan_gpu(cfg: CookbookConfig, gpu: GPU, tokens_per_sample: int | None = None,
             host_bytes: float | None = None) -> Plan:
    """Every resource of the layout on GPUs of kind ``gpu``: GPU memory in the training and rollout phases (the
    worst pipeline stage of each), the KV cache vLLM can hold, host memory per node for the sleep offload."""
    p = cfg.parallel
    hosts = vllm_stages(cfg)
    roll = rollout_parts(cfg, gpu)
    stages, lines, resources = [], [], []
    worst: dict[str, tuple[float, int, dict[str, float]]] = {}
    for s, (dense, moe) in enumerate(stage_layers(cfg)):
        state = trainer_state(cfg, s)
        transient = trainer_transient(cfg, s, tokens_per_sample)
        peak = sum(state.values()) + sum(transient.values())
        train = {**state, **transient, "CUDA contexts (trainer, vLLM)": CUDA_CONTEXT * (1 + (s in hosts))}
        if s in hosts:
            train["vLLM asleep (KV freed, weights on host)"] = VLLM_ASLEEP
        phases = {"GPU, training phase": train}
        if s in hosts:
            phases["GPU, rollout phase"] = {
                **state,
                "trainer allocator cache (training transients kept)": ALLOCATOR_CACHE * sum(transient.values()),
                "CUDA contexts (trainer, vLLM)": 2 * CUDA_CONTEXT,
                f"vLLM ({p.rollout_gpu_memory_utilization:g} x GPU): weights": roll["weights"],
                "vLLM: activations and MLA absorbed weights": roll["activations"] + roll["absorbed"],
                "vLLM: KV cache": max(0.0, roll["kv_cache"])}
        for name, parts in phases.items():
            if sum(parts.values()) > worst.get(name, (-1.0, 0, {}))[0]:
                worst[name] = (sum(parts.values()), s, parts)
        stages.append({"stage": s, "dense layers": dense, "MoE layers": moe,
                       "parameters per rank (B)": stage_counts(cfg, s).params / 1e9,
                       "trainer peak (GiB)": peak / GIB, "hosts vLLM": s in hosts,
                       **{f"{k} (GiB)": sum(v.values()) / GIB for k, v in phases.items()}})
    for name, (need, s, parts) in worst.items():
        lines += [Line(name, k, v) for k, v in parts.items()]
        where = f"pipeline stage {s}" + (" (with vLLM)" if s in hosts else "") if p.pipeline > 1 else \
            ("a GPU with vLLM" if s in hosts else "every GPU")
        resources.append(Resource(name, need, gpu.bytes, where, _why(parts)))
    if not p.colocate:  # the engine's own GPUs
        resources.append(Resource("GPU, rollout GPUs", roll["budget"] + CUDA_CONTEXT, gpu.bytes, "vLLM's GPUs"))
    resources.append(_kv_resource(cfg, roll))
    host = host_lines(cfg)
    lines += host
    resources.append(Resource("host memory per node", sum(x.bytes for x in host), host_bytes, "node 0 (vLLM's)",
                              _why({x.component: x.bytes for x in host})))
    return Plan(cfg, gpu, lines, resources, stages, notes(cfg, gpu, roll))


def _kv_resource(cfg: CookbookConfig, roll: dict[str, float]) -> Resource:
    """vLLM refuses to start unless its KV cache holds one sequence of ``max_model_len`` tokens; the batch runs
    all at once when it holds ``min(samples, max_num_seqs)`` of them (otherwise it queues: slower, still fits)."""
    per_token = kv_bytes_per_token(cfg)
    need = act.sample_tokens(cfg) * per_token
    batch = min(cfg.grpo.prompts_per_step * cfg.grpo.samples_per_prompt, VLLM_MAX_SEQS) * need
    share = max(0.0, roll["kv_cache"]) / batch
    why = (f"holds {max(0.0, roll['kv_cache']) / per_token:,.0f} tokens; the step's "
           f"{min(cfg.grpo.prompts_per_step * cfg.grpo.samples_per_prompt, VLLM_MAX_SEQS)} concurrent sequences "
           f"need {batch / per_token:,.0f} ({min(share, 1.0):.0%} fit at once)")
    return Resource("vLLM KV cache (one max-length sequence)", need, max(0.0, roll["kv_cache"]), "vLLM", why)


def host_lines(cfg: CookbookConfig) -> list[Line]:
    """Host memory on node 0: the vLLM weights its sleep mode parks in pinned memory, and the processes."""
    p = cfg.parallel
    gpus = p.gpus_per_node or 1
    engine_gpus = min(p.rollout_tensor, gpus)
    out = []
    if p.colocate and p.gpus_per_node:
        out.append(Line("host memory per node", "vLLM sleep offload (bf16 weights, pinned)",
                        engine_gpus * rollout_weight_bytes(cfg.model, p.rollout_tensor)))
    out.append(Line("host memory per node", "processes (trainer ranks, vLLM workers)",
                    (gpus + engine_gpus) * PROCESS_HOST))
    return out


def _why(parts: dict[str, float]) -> str:
    top = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
    return ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in top)


def megatron_state(cfg: CookbookConfig, stage: int) -> float:
    """For comparison: the same rank's state with Megatron's DistributedOptimizer (Megatron-Bridge's estimate,
    6 + 12 / DP bytes per parameter: bf16 weights, fp32 gradients, fp32 master weights and Adam moments sharded
    over data parallel; expert-data-parallel for routed experts), plus the bf16 reference model."""
    p = cfg.parallel
    c = stage_counts(cfg, stage)
    dp = max(1, cfg.world_size // (p.tensor * p.pipeline * p.context))
    edp = max(1, cfg.world_size // (p.expert * p.expert_tensor * p.pipeline))
    experts = c.parts.get("routed experts", 0)
    dense = c.params - experts
    return dense * (6 + 12 / dp) + experts * (6 + 12 / edp) + 2 * c.params


def notes(cfg: CookbookConfig, gpu: GPU, roll: dict[str, float]) -> list[str]:
    """What the numbers assume, and the comparison with Megatron's distributed optimizer."""
    worst = max(range(cfg.parallel.pipeline), key=lambda s: sum(trainer_state(cfg, s).values()))
    ours = sum(trainer_state(cfg, worst).values())
    a = act.DTYPE_BYTES[cfg.model.params_dtype]
    return [
        f"trainer state on the fullest stage ({worst}): {ours / GIB:.2f} GiB with torch AdamW as this project runs "
        f"it (policy + reference + gradients + optimizer state, "
        f"{3 * a + 12 if master_weights(cfg) else 5 * a} bytes per {cfg.model.params_dtype} parameter"
        f"{', fp32 master weights' if master_weights(cfg) else ''}); "
        f"Megatron's DistributedOptimizer would need {megatron_state(cfg, worst) / GIB:.2f} GiB (Megatron-Bridge's "
        "6 + 12/DP bytes per parameter, plus 2 for the reference)",
        f"vLLM takes {cfg.parallel.rollout_gpu_memory_utilization:g} x the GPU's memory on each of its "
        f"{cfg.parallel.rollout_tensor} GPU(s) (one engine, on the first GPUs); the trainer keeps its allocator "
        f"cache ({ALLOCATOR_CACHE} x its transient peak, measured on the first GPU run) while vLLM is awake",
    ]
