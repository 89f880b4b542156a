"""Packed rows and context parallelism (CP) on CPU: layouts of 2 gloo processes against one process, the
tokens/s gain of packing, and the router's top-k margins that tell a routing flip from a bug.

  prepare    1 process: a random HF checkpoint of the tiny model and its conversion (``parallel_probe.prepare``).
  reference  1 process: packed rows (CP 1) through ``cookbook.grpo.parallel_step``: log-probs, one optimizer
             step (loss, metrics, grad norm, every gradient), log-probs after it; the smallest top-k margin of
             the router over every token it routed. Saved as what every layout must reproduce.
  layouts    N processes (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT): the same packed step under each layout
             (``--layouts``, e.g. tp2,dp2,ep2,pp2,cp2,cp2ep2), compared with the reference.
  bench      1 process: forward + backward of a realistic tiny rollout batch (128 samples, prompts of 30-45 and
             responses of 5-40 tokens, as the tiny preset produces), padded micro-batches vs packed rows.

Rank 0 prints one line ``RESULT <json>``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from parallel_probe import build, diff_stats, max_abs  # noqa: E402

LAYOUTS = {  # name -> (tensor, pipeline, context, expert, expert_tensor); world 2 unless said
    "one": (1, 1, 1, 1, 1), "tp2": (2, 1, 1, 1, 1), "dp2": (1, 1, 1, 1, 1), "ep2": (1, 1, 1, 2, 1),
    "pp2": (1, 2, 1, 1, 1), "cp2": (1, 1, 2, 1, 1), "cp2ep2": (1, 1, 2, 2, 1),
    "tp2fused": (2, 1, 1, 1, 1),  # the fused loss (vocabulary-parallel kernel; on CPU its torch reference)
    "moonlight": (2, 2, 2, 2, 2),  # the Moonlight reference's layout, 8 processes
}
MAX_TOKENS, ROWS_PER_MICRO = 48, 2


def make_cfg(layout: str = "one"):
    from cookbook.config import load_config

    tp, pp, cp, ep, etp = LAYOUTS[layout]
    overrides = ["grpo.sequence_packing=true", f"grpo.packing_max_tokens={MAX_TOKENS}",
                 f"grpo.micro_batch_size={ROWS_PER_MICRO}", "grpo.lr=1e-3", "grpo.kl_coef=0.05",
                 "grpo.entropy_coef=0.01", f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
                 f"parallel.context={cp}", f"parallel.expert={ep}", f"parallel.expert_tensor={etp}",
                 f"parallel.sequence_parallel={tp > 1}"]
    if pp > 1:
        overrides.append("parallel.first_pipeline_stage_layers=2")
    return load_config("tiny", overrides)


def make_batch(cfg, n: int = 16, prompt=(4, 24), response=(1, 20), seed: int = 0):
    from cookbook.grpo import algorithm as A
    from cookbook.grpo.packing import PackingSpec
    from cookbook.grpo.parallel_step import batch_from_rollout

    gen = torch.Generator().manual_seed(seed)

    def tokens(lo_hi):
        k = int(torch.randint(lo_hi[0], lo_hi[1] + 1, (), generator=gen))
        return torch.randint(2, cfg.model.vocab_size, (k,), generator=gen).tolist()

    prompts = [tokens(prompt) for _ in range(n)]
    responses = [tokens(response) for _ in range(n)]
    advantages = A.group_advantages(torch.rand(n, generator=gen), n=4)
    return batch_from_rollout(prompts, responses, advantages.tolist(), pad_id=0,
                              packing=PackingSpec.from_config(cfg))


# -- the router's margins ------------------------------------------------------------------------------
MARGINS: list[float] = []


def record_router_margins() -> None:
    """Wrap Megatron's top-k routing to record, per call, the smallest gap between the k-th and (k+1)-th
    selection score (sigmoid + expert bias) over the tokens routed: a layout can flip a token's expert only
    if its router input moves by about that much."""
    from megatron.core.transformer.moe import router

    original = router.topk_routing_with_score_function

    def wrapped(logits, topk, *args, **kwargs):
        with torch.no_grad():
            scores = torch.sigmoid(logits.float())
            bias = kwargs.get("expert_bias")
            if bias is not None:
                scores = scores + bias.float()
            top = scores.topk(topk + 1, dim=-1).values
            if top.numel():
                MARGINS.append(float((top[:, topk - 1] - top[:, topk]).min()))
        return original(logits, topk, *args, **kwargs)

    router.topk_routing_with_score_function = wrapped


def nudge_router_bias(model, scale: float, seed: int = 7) -> None:
    """Move every router's expert bias by ``scale`` x N(0, 1): tokens whose top-k margin is below about that
    change experts (a stand-in for a routing flip at a near-tie, to show its signature in ``diff_stats``)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in sorted(model.named_buffers()):
            if name.endswith("router.expert_bias"):
                buf.add_(scale * torch.randn(buf.shape, generator=gen).to(buf.device))


def shift_targets_after_the_split() -> None:
    """The CP bug peers had, on purpose: each CP rank shifts its own slice instead of the full row (a chunk's
    last token then predicts the first token of its mirror chunk)."""
    import cookbook.grpo.parallel_step as PS

    original = PS.build_microbatch

    def wrong(*args, **kwargs):
        mb = original(*args, **kwargs)
        mb.targets = torch.cat([mb.input_ids[:, 1:], torch.zeros_like(mb.input_ids[:, :1])], dim=1)
        return mb

    PS.build_microbatch = wrong


# -- the step ------------------------------------------------------------------------------------------
def packed_step(cfg, model, batch, fused: bool = False) -> dict:
    """Old log-probs, one optimizer step on the packed batch (gradients kept; ``fused``: the loss through the
    fused kernel), log-probs after it."""
    from cookbook.grpo import algorithm as A
    from cookbook.grpo.parallel_step import forward_logprobs, packed_layout, train_minibatch
    from cookbook.megatron.parallel import gather_full_tensors

    g = cfg.grpo
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=g.lr,
                            betas=(g.adam_beta1, g.adam_beta2), weight_decay=g.weight_decay)
    rec: dict = {"plan": packed_layout(batch, g.micro_batch_size, model).stats()}
    t0 = time.perf_counter()
    old = forward_logprobs(model, batch, micro_batch_size=g.micro_batch_size, temperature=g.temperature)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(old.shape, generator=gen)
    b = dataclasses.replace(batch, old_logp=old - 0.05 * noise.abs(), ref_logp=old + 0.1 * noise,
                            is_weights=A.tis_weights(old, old + 0.05 * noise, batch.mask, 2.0))
    metrics = train_minibatch(model, opt, b, g, fused=fused,
                              after_backward=lambda: rec.__setitem__("grads", gather_full_tensors(model, grads=True)))
    rec["new_logp"] = forward_logprobs(model, batch, micro_batch_size=g.micro_batch_size, temperature=g.temperature)
    rec.update(old_logp=old, metrics=metrics, step_s=time.perf_counter() - t0)
    return rec


def compare(rec: dict, ref: dict, scored: torch.Tensor) -> dict:
    grads = {name: max_abs(g, ref["grads"][name]) / max(float(ref["grads"][name].abs().max()), 1e-30)
             for name, g in rec["grads"].items()}
    m, r = rec["metrics"], ref["metrics"]
    return {
        "logp": diff_stats(rec["old_logp"][scored], ref["old_logp"][scored]),
        "logp_unscored_max": float(rec["old_logp"][~scored].abs().max()),
        "logp_after_step": diff_stats(rec["new_logp"][scored], ref["new_logp"][scored]),
        "loss": abs(m["loss"] - r["loss"]), "loss_ref": r["loss"],
        "num_tokens": (m["num_tokens"], r["num_tokens"]),
        "metrics_max": max(abs(m[k] - r[k]) for k in r if k not in ("num_tokens",)),
        "grad_norm_rel": abs(m["grad_norm"] - r["grad_norm"]) / r["grad_norm"],
        "grad_rel_max": max(grads.values()), "grad_worst": max(grads, key=grads.get), "grad_tensors": len(grads),
        "grad_tensors_missing": sorted(set(ref["grads"]) - set(rec["grads"])),
    }


def scored_positions(batch) -> torch.Tensor:
    scored = torch.zeros_like(batch.mask, dtype=torch.bool)
    for i, n in enumerate(batch.lengths.tolist()):
        scored[i, :n - 1] = True
    return scored


# -- modes ---------------------------------------------------------------------------------------------
def prepare(args) -> dict:
    from parallel_probe import prepare as prepare_checkpoint

    return prepare_checkpoint(argparse.Namespace(out=args.out, threads=args.threads, size="tiny", gpu=False))


def reference(args) -> dict:
    torch.set_num_threads(args.threads)
    record_router_margins()
    out, cfg = Path(args.out), make_cfg("one")
    batch = make_batch(cfg, n=args.samples, seed=args.seed)
    rec = packed_step(cfg, build(cfg, out / "mcore"), batch)
    rec["router_min_margin"] = min(MARGINS)
    torch.save(rec, out / "cp_reference.pt")
    return {"mode": "reference", "plan": rec["plan"], "router_min_margin": rec["router_min_margin"],
            "router_calls": len(MARGINS), "step_s": rec["step_s"], "loss": rec["metrics"]["loss"]}


def layouts(args) -> dict:
    from cookbook.megatron.parallel import layout

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(args.threads)
    record_router_margins()
    if args.bug_shift_after_split:
        shift_targets_after_the_split()
    out = Path(args.out)
    ref = torch.load(out / "cp_reference.pt", weights_only=False)
    results = {}
    for name in args.layouts.split(","):
        cfg = make_cfg(name)
        batch = make_batch(cfg, n=args.samples, seed=args.seed)
        MARGINS.clear()
        model = build(cfg, out / "mcore", rank, world)
        if args.nudge_router_bias:
            nudge_router_bias(model, args.nudge_router_bias)
        res = {"layout": {k: v for k, v in layout().items() if k != "rank" and not k.endswith("_rank")}}
        res["layout"]["cp"] = cfg.parallel.context
        rec = packed_step(cfg, model, batch, fused=name.endswith("fused"))
        margins = [None] * world
        dist.all_gather_object(margins, min(MARGINS) if MARGINS else float("inf"))
        if rank == 0:
            res.update(compare(rec, ref, scored_positions(batch)), plan=rec["plan"], step_s=rec["step_s"],
                       router_min_margin=min(margins))
        results[name] = res
        del model
        dist.barrier()
    return {"mode": "layouts", "world": world, "results": results}


def bench(args) -> dict:
    """Forward + backward tokens/s of one rollout batch, padded micro-batches vs packed rows (1 process)."""
    from cookbook.config import load_config
    from cookbook.grpo.packing import PackedLayout, PackingSpec
    from cookbook.grpo.parallel_step import train_minibatch
    from cookbook.megatron.model import build_model, init_parallel

    torch.set_num_threads(args.threads)
    cfg = load_config("tiny")  # the preset's model and loss settings (micro-batches of 16 samples)
    g = cfg.grpo
    init_parallel(cfg)
    model = build_model(cfg)
    batch = make_batch(cfg, n=128, prompt=(30, 45), response=(5, 40), seed=args.seed)
    real_tokens = int(batch.lengths.sum())
    old = torch.where(batch.mask.bool(), -2.0, 0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    runs = {
        "padded": (dataclasses.replace(batch, packing=None, old_logp=old), dataclasses.replace(g, micro_batch_size=16)),
        "packed_4096": (dataclasses.replace(batch, packing=PackingSpec(4096), old_logp=old),
                        dataclasses.replace(g, micro_batch_size=1)),
        "packed_1024": (dataclasses.replace(batch, packing=PackingSpec(1024), old_logp=old),
                        dataclasses.replace(g, micro_batch_size=1)),
    }
    # the padded path pads every sample to the batch's longest (build_training_batch), micro-batches of 16 rows
    result = {"samples": len(batch), "real_tokens": real_tokens,
              "padded_tokens": int(batch.input_ids.shape[1]) * len(batch), "threads": args.threads,
              "cpu": _cpu_name(), "torch": torch.__version__}
    for b, gg in runs.values():
        train_minibatch(model, opt, b, gg)  # warm-up (first calls compile Megatron's fused functions)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so that a slow spell of a shared machine hits every variant
        for name, (b, gg) in runs.items():
            t0 = time.perf_counter()
            train_minibatch(model, opt, b, gg)
            times[name].append(time.perf_counter() - t0)
    for name, seconds in times.items():
        best = min(seconds)
        result[name] = {"seconds_best": best, "seconds_median": sorted(seconds)[len(seconds) // 2],
                        "real_tokens_per_s": real_tokens / best}
    for name, spec in (("packed_4096", PackingSpec(4096)), ("packed_1024", PackingSpec(1024))):
        result[name].update(PackedLayout.build(batch.lengths.tolist(), spec).stats())
        result[name]["gain"] = result[name]["real_tokens_per_s"] / result["padded"]["real_tokens_per_s"]
    return {"mode": "bench", **result}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


MODES = {"prepare": prepare, "reference": reference, "layouts": layouts, "bench": bench}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=tuple(MODES))
    parser.add_argument("--out", default="")
    parser.add_argument("--layouts", default="tp2,dp2,ep2,pp2,cp2,cp2ep2,tp2fused")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--nudge-router-bias", type=float, default=0.0, help="demo: a routing flip's signature")
    parser.add_argument("--bug-shift-after-split", action="store_true", help="demo: a bug's signature")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = MODES[args.mode](args)
    if int(os.environ.get("RANK", 0)) == 0:
        print("RESULT " + json.dumps(result, default=str), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
