"""Training checkpoints (``cookbook.grpo.checkpoint``) of a small MLA + MoE model under TP / EP layouts on
CPU (gloo), fp32, random weights.

  roundtrip  1 process: trains, saves steps 1..3 (keep=2), then loads step 3 into a freshly built model and
             optimizer and checks weights, optimizer state and RNG bit-equal and that one more step equals one
             more step without the save/load (``--dtype bfloat16``: the fp32 master weights too).
             Writes ``single-state.pt`` (the state at step 3 and after one more step) for the layouts to load.
  layout     N processes (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT): loads the 1-process checkpoint into
             ``--layout`` and compares (1 -> layout); then saves its own checkpoint at step 4 into
             ``run-<layout>`` and writes ``<layout>-state.pt`` (layout -> 1).
  load-one   1 process: loads each ``run-<layout>`` checkpoint and compares with ``<layout>-state.pt``.

Rank 0 prints one line ``RESULT <json>``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

MODEL = {"vocab_size": 256, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 2, "ffn_hidden_size": 128,
         "moe_ffn_hidden_size": 32, "num_experts": 4, "moe_router_topk": 2, "kv_lora_rank": 32,
         "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16}
LAYOUTS = {"one": (1, 1), "tp2": (2, 1), "ep2": (1, 2)}  # name -> (tensor, expert)
LOOP_STATE = {"prompts": {"epoch": 0, "offset": 24}}


def make_cfg(layout: str = "one", seed: int = 1, model: dict | None = None, dtype: str = "float32"):
    from cookbook.config import load_config

    cfg = load_config("tiny", values={"model": {**MODEL, "params_dtype": dtype, **(model or {})}}, overrides=[
        "moe.router_enable_expert_bias=true", "moe.router_bias_update_rate=0.001", "grpo.lr=0.001",
        "grpo.micro_batch_size=4", f"seed={seed}"])
    tp, ep = LAYOUTS[layout]
    p = cfg.parallel
    p.tensor, p.expert, p.pipeline, p.expert_tensor, p.sequence_parallel = tp, ep, 1, 1, tp > 1
    return cfg


def make_batch(cfg):
    from cookbook.grpo import algorithm as A
    from cookbook.grpo.parallel_step import batch_from_rollout

    gen = torch.Generator().manual_seed(0)

    def tokens(lo, hi):
        return torch.randint(2, cfg.model.vocab_size, (int(torch.randint(lo, hi + 1, (), generator=gen)),),
                             generator=gen).tolist()

    prompts = [tokens(3, 8) for _ in range(8)]
    responses = [tokens(3, 10) for _ in range(8)]
    return batch_from_rollout(prompts, responses, A.group_advantages(torch.rand(8, generator=gen), n=4).tolist(), 0)


def build(cfg, rank: int = 0, world: int = 1):
    from cookbook.megatron.model import build_model, init_parallel

    init_parallel(cfg, rank=rank, world_size=world)
    model = build_model(cfg)
    from cookbook.grpo.optimizer import make_optimizer

    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.grpo, master_weights=True)
    return model, opt  # as the trainer makes it (fp32 parameters: torch's AdamW step; bf16: fp32 master weights)


def train_step(cfg, model, opt, batch) -> None:
    from cookbook.grpo.parallel_step import forward_logprobs, train_minibatch

    old = forward_logprobs(model, batch.input_ids, batch.position_ids, micro_batch_size=cfg.grpo.micro_batch_size)
    train_minibatch(model, opt, dataclasses.replace(batch, old_logp=old), cfg.grpo)


def gather_state(model, opt) -> dict:
    """Full (single-process-named) weights and buffers, and each optimizer moment gathered the same way
    (the moments stand in for the parameters' data during the gather); step counters; param groups."""
    from cookbook.megatron.parallel import gather_full_tensors

    buffers = {name.rsplit(".", 1)[-1] for name, _ in model.named_buffers()}
    params = [p for group in opt.param_groups for p in group["params"]]
    out = {"weights": gather_full_tensors(model)}
    for key in sorted({k for s in opt.state.values() for k in s if k != "step"}):
        originals = [p.data for p in params]
        try:
            for p in params:
                p.data = opt.state[p][key]
            full = gather_full_tensors(model)
        finally:
            for p, data in zip(params, originals):
                p.data = data
        out[key] = {n: t for n, t in full.items() if n.rsplit(".", 1)[-1] not in buffers}
    out["steps"] = sorted({float(s["step"]) for s in opt.state.values()})
    out["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return out


def compare(a: dict, b: dict) -> dict:
    """Per part: same names, bit-equal, largest difference."""
    out = {}
    for part in sorted(set(a) | set(b)):
        x, y = a.get(part), b.get(part)
        if isinstance(x, dict) and isinstance(y, dict) and all(torch.is_tensor(v) for v in x.values()):
            same = set(x) == set(y)
            diffs = [float((x[k].double() - y[k].double()).abs().max()) if x[k].shape == y[k].shape else float("inf")
                     for k in x if k in y]
            out[part] = {"same_names": same, "tensors": len(x), "bit_equal": same and all(
                x[k].shape == y[k].shape and torch.equal(x[k], y[k]) for k in x), "max_abs": max(diffs, default=0.0)}
        else:
            out[part] = {"equal": x == y, "a": str(x)[:200], "b": str(y)[:200]}
    return out


def draws() -> list:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracker = torch.rand(3).tolist()
    return [random.random(), float(np.random.rand()), torch.rand(3).tolist(), tracker]


def roundtrip(args) -> dict:
    from cookbook.grpo.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

    out = Path(args.out)
    cfg = make_cfg("one", dtype=args.dtype)
    batch = make_batch(cfg)
    model, opt = build(cfg)
    times = []
    for step in (1, 2, 3):
        train_step(cfg, model, opt, batch)
        t0 = time.perf_counter()
        save_checkpoint(out / "run-one", step, model, opt, {"prompts": {"epoch": 0, "offset": 8 * step}}, cfg.model,
                        keep=2)
        times.append(time.perf_counter() - t0)
    after_save = draws()
    saved = gather_state(model, opt)
    train_step(cfg, model, opt, batch)
    continued = gather_state(model, opt)
    torch.save({"saved": saved, "continued": continued}, out / "single-state.pt")

    model2, opt2 = build(make_cfg("one", seed=7, dtype=args.dtype))  # other initial weights, no optimizer state
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    before_load = draws()
    t0 = time.perf_counter()
    loop_state = load_checkpoint(out / "run-one" / "checkpoints" / "step_000003", model2, opt2, cfg.model)
    load_s = time.perf_counter() - t0
    after_load = draws()
    loaded = gather_state(model2, opt2)
    train_step(cfg, model2, opt2, batch)
    return {"mode": "roundtrip", "save_s": times, "load_s": load_s,
            "kept": [p.name for _, p in list_checkpoints(out / "run-one")],
            "loop_state": dict(loop_state), "rng_restored": loop_state.rng_restored, "note": loop_state.note,
            "rng_equal": after_load == after_save, "rng_moved_before_load": before_load != after_save,
            "loaded_vs_saved": compare(loaded, saved), "step_after_load_vs_continued": compare(
                gather_state(model2, opt2), continued)}


def layout_run(args) -> dict:
    from cookbook.grpo.checkpoint import load_checkpoint, save_checkpoint
    from cookbook.megatron.parallel import layout

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(args.out)
    cfg = make_cfg(args.layout)
    batch = make_batch(cfg)
    model, opt = build(make_cfg(args.layout, seed=7), rank, world)
    t0 = time.perf_counter()
    loop_state = load_checkpoint(out / "run-one" / "checkpoints" / "step_000003", model, opt, cfg.model)
    load_s = time.perf_counter() - t0
    single = torch.load(out / "single-state.pt", weights_only=False) if rank == 0 else None
    loaded = gather_state(model, opt)
    train_step(cfg, model, opt, batch)
    stepped = gather_state(model, opt)
    res = {"mode": "layout", "layout": layout(), "load_s": load_s, "loop_state": dict(loop_state),
           "rng_restored": loop_state.rng_restored, "note": loop_state.note}
    if rank == 0:
        res["one_to_layout"] = compare(loaded, single["saved"])
        res["one_to_layout_step"] = compare(stepped, single["continued"])
    t0 = time.perf_counter()
    path = save_checkpoint(out / f"run-{args.layout}", 4, model, opt, LOOP_STATE, cfg.model)
    res["save_s"] = time.perf_counter() - t0
    res["files"] = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    saved = gather_state(model, opt)
    train_step(cfg, model, opt, batch)
    continued = gather_state(model, opt)
    if rank == 0:
        torch.save({"saved": saved, "continued": continued}, out / f"{args.layout}-state.pt")
    return res


def load_one(args) -> dict:
    from cookbook.grpo.checkpoint import load_checkpoint

    out = Path(args.out)
    cfg = make_cfg("one")
    batch = make_batch(cfg)
    res = {"mode": "load-one"}
    for name in args.layouts.split(","):
        model, opt = build(make_cfg("one", seed=7))
        loop_state = load_checkpoint(out / f"run-{name}" / "checkpoints" / "step_000004", model, opt, cfg.model)
        ref = torch.load(out / f"{name}-state.pt", weights_only=False)
        loaded = gather_state(model, opt)
        train_step(cfg, model, opt, batch)
        res[name] = {"loop_state": dict(loop_state), "rng_restored": loop_state.rng_restored,
                     "note": loop_state.note, "layout_to_one": compare(loaded, ref["saved"]),
                     "layout_to_one_step": compare(gather_state(model, opt), ref["continued"])}
    return res


MODES = {"roundtrip": roundtrip, "layout": layout_run, "load-one": load_one}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=tuple(MODES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--layout", default="tp2", choices=tuple(LAYOUTS))
    parser.add_argument("--layouts", default="tp2,ep2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="roundtrip's parameters")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = MODES[args.mode](args)
    if int(os.environ.get("RANK", 0)) == 0:
        print("RESULT " + json.dumps(result, default=str), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
