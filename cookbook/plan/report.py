"""What ``cookbook plan`` prints and the notebooks show: the memory table, the verdict and the smallest layouts."""
from __future__ import annotations

from typing import Sequence

from cookbook.config import CookbookConfig, validate
from cookbook.plan import memory, search
from cookbook.plan.params import stage_counts

GIB = memory.GIB


def check_layout(cfg: CookbookConfig) -> None:
    """Stop before any work on a layout the code cannot build: config validation (a GPU count the layout cannot
    use names the node counts that work), then every stage's shards (a TP / ETP that does not divide a weight)."""
    validate(cfg)
    for stage in range(cfg.parallel.pipeline):
        stage_counts(cfg, stage)


def plans(cfg: CookbookConfig, gpus: Sequence[memory.GPU] = memory.GPUS, tokens_per_sample: int | None = None,
          host_gib: float | None = None) -> dict[str, memory.Plan]:
    """The layout's plan on each GPU kind."""
    check_layout(cfg)
    host = host_gib * GIB if host_gib else None
    return {gpu.name: memory.plan_gpu(cfg, gpu, tokens_per_sample, host) for gpu in gpus}


def fit_table(cfg: CookbookConfig, gpus: Sequence[memory.GPU] = memory.GPUS, tokens_per_sample: int | None = None,
              host_gib: float | None = None):
    """GiB by resource and component (rows) on each GPU kind (columns), each resource followed by its total and
    capacity, for the worst pipeline stage of each phase (``stage_table`` has every stage)."""
    import pandas as pd

    rows: dict[tuple[str, str], dict[str, float | None]] = {}
    for name, plan in plans(cfg, gpus, tokens_per_sample, host_gib).items():
        for res in plan.resources:
            if res.name.startswith("vLLM KV"):
                continue
            for line in (x for x in plan.lines if x.resource == res.name):
                rows.setdefault((res.name, line.component), {})[name] = line.bytes / GIB
            rows.setdefault((res.name, "= total"), {})[name] = res.need / GIB
            rows.setdefault((res.name, "of capacity"), {})[name] = res.capacity / GIB if res.capacity else None
    frame = pd.DataFrame.from_dict(rows, orient="index").round(2)
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["resource", "component"])
    return frame


def stage_table(cfg: CookbookConfig, gpus: Sequence[memory.GPU] = memory.GPUS,
                tokens_per_sample: int | None = None):
    """One row per pipeline stage: its layers, parameters per rank, the trainer's peak, the training phase's GPU
    total and, on the stages that share GPUs with vLLM, the rollout phase's on each GPU kind (GiB)."""
    import pandas as pd

    rows = []
    for name, plan in plans(cfg, gpus, tokens_per_sample).items():
        for i, st in enumerate(plan.stages):
            if len(rows) <= i:
                rows.append({"stage": st["stage"], "layers (dense + MoE)": f"{st['dense layers']} + {st['MoE layers']}",
                             "params per rank (B)": st["parameters per rank (B)"],
                             "trainer peak": st["trainer peak (GiB)"],
                             "training phase": st["GPU, training phase (GiB)"]})
            rows[i][f"rollout phase, {name}"] = st.get("GPU, rollout phase (GiB)")
    return pd.DataFrame(rows).set_index("stage").round(2)


def _verdict(plan: memory.Plan) -> list[str]:
    t = plan.tightest
    head = f"{plan.gpu.name} GPUs: {'fits' if plan.fits else 'does NOT fit'}"
    lines = [f"{head}. Tightest: {t.name} on {t.where}: {t.need / GIB:.1f} of {t.capacity / GIB:.1f} GiB "
             f"({t.need / t.capacity:.0%}); largest parts: {t.why}"]
    for res in plan.resources:
        if not res.fits and res is not t:
            lines.append(f"    also over: {res.name} on {res.where}: {res.need / GIB:.1f} of "
                         f"{res.capacity / GIB:.1f} GiB ({res.why})")
    lines += [f"    {hint}" for hint in hints(plan)]
    return lines


def hints(plan: memory.Plan) -> list[str]:
    """How the layout could be made to fit, where a single setting can do it."""
    out = []
    p = plan.cfg.parallel
    for res in plan.resources:
        if res.fits or not res.name.startswith("GPU, rollout phase"):
            continue
        parts = {line.component: line.bytes for line in plan.lines if line.resource == res.name}
        vllm = sum(v for k, v in parts.items() if k.startswith("vLLM"))
        cache = sum(v for k, v in parts.items() if "allocator cache" in k)
        allowed = (plan.gpu.bytes - (res.need - vllm)) / plan.gpu.bytes
        roll = memory.rollout_parts(plan.cfg, plan.gpu)
        needed = (roll["weights"] + roll["absorbed"] + roll["activations"]
                  + memory.act.sample_tokens(plan.cfg) * memory.kv_bytes_per_token(plan.cfg)) / plan.gpu.bytes
        if needed <= allowed:
            out.append(f"fix: parallel.rollout_gpu_memory_utilization={p.rollout_gpu_memory_utilization:g} -> "
                       f"{needed:.2f}..{allowed:.2f} (vLLM needs {needed:.2f} for its weights, activations and one "
                       "max-length sequence)")
        if cache:
            out.append(f"note: {cache / GIB:.1f} GiB of it is the trainer's allocator cache, kept from the training "
                       "step because nothing empties it before vLLM wakes")
    return out


def fit_summary(cfg: CookbookConfig, gpus: Sequence[memory.GPU] = memory.GPUS, search_layouts: bool = True,
                host_gib: float | None = None, max_gpus: int = 1024) -> str:
    """The verdict on each GPU kind (fits, the tightest resource and why), the smallest layouts that fit, the
    notes on what is modelled."""
    found = plans(cfg, gpus, host_gib=host_gib)
    lines = [f"Layout: {search.layout_label(cfg)} ({cfg.preset}, recompute {cfg.parallel.recompute})"]
    if not cfg.parallel.gpus_per_node:
        lines.append("(a CPU run: the numbers are what this layout would need on GPUs)")
    for plan in found.values():
        lines += _verdict(plan)
    if search_layouts:
        lines.append("Smallest layouts that fit (memory only, not speed; same recipe; "
                     "layouts config validation accepts):")
        for gpu in gpus:
            fits = search.smallest_fits(cfg, gpu, max_gpus)
            if not fits:
                lines.append(f"  {gpu.name}: none up to {max_gpus} GPUs")
                continue
            for fit in fits:
                t = fit.plan.tightest
                shared = sorted(memory.vllm_stages(fit.cfg))
                with_vllm = ""
                if fit.cfg.parallel.pipeline > 1 and shared:
                    with_vllm = f"; vLLM shares stage {', '.join(map(str, shared))}'s GPUs"
                lines.append(f"  {gpu.name}: {fit.label}; tightest {t.name} {t.need / GIB:.1f} of "
                             f"{t.capacity / GIB:.1f} GiB{with_vllm}")
    lines += [f"Note: {n}" for n in next(iter(found.values())).notes]
    return "\n".join(lines)


def plan_text(cfg: CookbookConfig, gpus: Sequence[memory.GPU] = memory.GPUS, search_layouts: bool = True,
              host_gib: float | None = None, max_gpus: int = 1024) -> str:
    """Everything ``cookbook plan`` prints: the memory table, the stage table (PP > 1) and the summary."""
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_rows", 200, "display.max_colwidth", 60):
        parts = ["GPU and host memory per GPU / node, GiB (the worst pipeline stage of each phase):",
                 fit_table(cfg, gpus, host_gib=host_gib).fillna("-").to_string()]
        if cfg.parallel.pipeline > 1:
            parts += ["", "Per pipeline stage (GiB; rollout phase only where vLLM shares the GPU):",
                      stage_table(cfg, gpus).fillna("-").to_string()]
    return "\n".join(parts + ["", fit_summary(cfg, gpus, search_layouts, host_gib, max_gpus)])


# The recipe each CPU preset stands in for: its cluster layout is what a planner cell judges on CPU.
CLUSTER_PRESET = {"tiny": "moonlight-16b-a3b", "tiny-deepseek-v3": "deepseek-v3-671b"}


def cluster_layout(cfg: CookbookConfig) -> CookbookConfig:
    """The layout a planner cell judges: ``cfg`` itself on GPUs; on CPU the reference preset of the recipe it
    stands in for (``tiny-deepseek-v3``: ``deepseek-v3-671b``'s 128 GPUs, TP4 PP16 split 3 / ... / 2), so a
    notebook run on a laptop still shows what the cluster run needs."""
    from cookbook.config import load_config

    if cfg.parallel.gpus_per_node or cfg.preset not in CLUSTER_PRESET:
        return cfg
    return load_config(CLUSTER_PRESET[cfg.preset], values={"run_name": cfg.run_name, "runs_dir": cfg.runs_dir})
