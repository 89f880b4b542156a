"""The smallest layouts that fit: GPU counts from one GPU up, every layout config validation accepts there.

For each GPU count (1, 2, 4 GPUs of one node, then whole nodes of 8) the search tries tensor parallel sizes
within a node, context parallelism when sequences are packed, every pipeline size that divides what is left
(with the config's uneven first/last stage sizes where they still apply, else an even split, else a shorter last
stage), expert parallel sizes that divide the experts, and expert-TP of 1 or TP; vLLM gets the smallest
tensor parallel size whose KV cache holds one max-length sequence. A layout counts when ``config.validate``
accepts it (the same rules ``load_config`` enforces) and every resource of its plan fits. The recipe itself
(batch, lengths, recompute, vLLM's memory share) is left as configured.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

from cookbook.config import ConfigError, CookbookConfig, pipeline_stage_layers, validate
from cookbook.plan import memory

GPUS_PER_NODE = 8


@dataclasses.dataclass
class Fit:
    """A layout that fits, with its plan."""

    cfg: CookbookConfig
    plan: memory.Plan

    @property
    def label(self) -> str:
        return layout_label(self.cfg)


def layout_label(cfg: CookbookConfig) -> str:
    """``TP2 PP2 (14/13) CP2 EP2 ETP2, vLLM TP2 on 8 GPUs`` for a config's layout."""
    p = cfg.parallel
    split = ""
    if p.first_pipeline_stage_layers is not None or p.last_pipeline_stage_layers is not None:
        sizes = pipeline_stage_layers(cfg.model.num_layers, p.pipeline, p.first_pipeline_stage_layers,
                                      p.last_pipeline_stage_layers)
        split = f" ({sizes[0]}/.../{sizes[-1]})" if len(sizes) > 2 else f" ({sizes[0]}/{sizes[1]})"
    where = f"{p.num_nodes} x {p.gpus_per_node} GPUs" if p.num_nodes > 1 else f"{p.gpus_per_node} GPUs"
    if not p.gpus_per_node:
        where = f"CPU ({cfg.world_size} trainer processes)"
    return (f"TP{p.tensor} PP{p.pipeline}{split} CP{p.context} EP{p.expert} ETP{p.expert_tensor}, "
            f"vLLM TP{p.rollout_tensor} on {where}")


def gpu_counts(max_gpus: int) -> Iterator[tuple[int, int]]:
    """(nodes, GPUs per node): part of one node, then whole nodes."""
    for g in (1, 2, 4):
        if g <= max_gpus:
            yield 1, g
    for n in range(1, max_gpus // GPUS_PER_NODE + 1):
        yield n, GPUS_PER_NODE


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _splits(cfg: CookbookConfig, pipeline: int) -> list[tuple[int | None, int | None]]:
    """First/last stage sizes for ``pipeline`` stages: the config's, an even split, a shorter last stage."""
    layers, p = cfg.model.num_layers, cfg.parallel
    options = [(p.first_pipeline_stage_layers, p.last_pipeline_stage_layers), (None, None)]
    if pipeline > 1:
        per = -(-layers // pipeline)
        options.append((None, layers - per * (pipeline - 1)))
    out, seen = [], set()
    for first, last in options:
        if pipeline == 1 and (first, last) != (None, None):
            continue
        try:
            sizes = tuple(pipeline_stage_layers(layers, pipeline, first, last))
        except ValueError:
            continue
        if sizes not in seen:
            seen.add(sizes)
            out.append((first, last))
    return out


def _rollout_tensor(cfg: CookbookConfig, gpu: memory.GPU, world: int) -> int | None:
    """vLLM's tensor parallel size: the config's when its KV cache holds one max-length sequence on this GPU kind
    and there are enough GPUs, else the smallest power of two dividing the heads that does; None if none does."""
    heads = cfg.model.num_attention_heads
    options = [cfg.parallel.rollout_tensor] + [2**i for i in range(world.bit_length())]
    for rt in options:
        if rt > world or heads % rt:
            continue
        trial = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, rollout_tensor=rt))
        if memory.rollout_parts(trial, gpu)["kv_cache"] >= memory.act.sample_tokens(cfg) * \
                memory.kv_bytes_per_token(cfg):
            return rt
    return None


def layouts(cfg: CookbookConfig, nodes: int, gpus: int, gpu: memory.GPU) -> Iterator[CookbookConfig]:
    """Every layout of ``nodes x gpus`` GPUs that config validation accepts (the recipe unchanged)."""
    m, world = cfg.model, nodes * gpus
    rt = _rollout_tensor(cfg, gpu, world)
    if rt is None:
        return
    contexts = (1, 2, 4) if cfg.grpo.sequence_packing else (1,)
    for tp in (t for t in (1, 2, 4, 8) if t <= gpus and m.num_attention_heads % t == 0):
        for cp in (c for c in contexts if world % (tp * c) == 0):
            for pp in (d for d in _divisors(world // (tp * cp)) if d <= m.num_layers):
                for ep in (e for e in _divisors(m.num_experts) if world % (e * pp) == 0):
                    for etp in sorted({1, tp}):
                        if world % (ep * etp * pp):
                            continue
                        for first, last in _splits(cfg, pp):
                            trial = dataclasses.replace(cfg, parallel=dataclasses.replace(
                                cfg.parallel, num_nodes=nodes, gpus_per_node=gpus, tensor=tp, context=cp,
                                pipeline=pp, expert=ep, expert_tensor=etp, sequence_parallel=tp > 1,
                                first_pipeline_stage_layers=first, last_pipeline_stage_layers=last,
                                rollout_tensor=rt))
                            try:
                                validate(trial)
                            except ConfigError:
                                continue
                            yield trial


def smallest_fits(cfg: CookbookConfig, gpu: memory.GPU, max_gpus: int = 1024, keep: int = 3) -> list[Fit]:
    """The layouts that fit on the fewest GPUs of kind ``gpu`` (up to ``keep``, most headroom first); empty when
    nothing fits on ``max_gpus``."""
    for nodes, gpus in gpu_counts(max_gpus):
        fits = []
        for trial in layouts(cfg, nodes, gpus, gpu):
            try:
                plan = memory.plan_gpu(trial, gpu)
            except ConfigError:  # a shard that does not divide (Megatron would refuse to build it)
                continue
            if plan.fits:
                fits.append(Fit(trial, plan))
        if fits:
            return sorted(fits, key=lambda f: -f.plan.tightest.headroom)[:keep]
    return []
