"""Routing statistics and routing replay (``cookbook.megatron.routing``) under two-process layouts against one
process, on the random tiny checkpoint of cp_probe.py (16 samples, seed 0: no top-k near-tie, so no layout's
rounding can flip an expert).

  prepare    1 process: the random HF checkpoint and its conversion (``cp_probe.prepare``).
  reference  1 process, padded rows: the routers' own routing (captured in the ``[B, L - 1]`` layout); the
             log-probs under replay of a random routing; one training step under that replay (loss, grad norm).
  layouts    N processes, per layout (``--layouts``): the own routing as captured from every rank; the statistics
             against the reference routing with known (token, layer) pairs changed; replay of the random routing
             (the routing the routers used, the log-probs); a pass compared with itself (policy change 0); the
             training step under replay.

With a vLLM rollout (``cookbook.rollout.engine``, its own process: vLLM's in-process engine and Megatron both
want torch.distributed):

  convert    1 process: ``--hf`` converted to ``<out>/mcore``.
  rollout    1 process: the engine in ``--dtype`` samples the tiny model's prompts with their routed experts, which
             are compared with HF transformers' router top-k (fp32) on the same sequences, before and after a weight
             push of ``--perturbed`` (optional); the samples are saved for ``trainer``.
  trainer    1 process: ``TrainerRank.train_step`` on those samples, in ``--dtype``, with ``moe.routing_replay``
             none and r3: its ``routing/*`` and ``mismatch/*`` metrics.

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
sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: helpers

import cp_probe  # noqa: E402
from parallel_probe import build  # noqa: E402

LAYERS = [1, 2]
VARIANTS = {  # name -> (cp_probe layout, packed rows, parallel.recompute)
    "one": ("one", False, "none"), "tp2": ("tp2", True, "none"), "tp2_padded": ("tp2", False, "none"),
    "ep2_padded": ("ep2", False, "none"), "pp2_recompute": ("pp2", True, "full"), "cp2ep2": ("cp2ep2", True, "none"),
}
CHANGED = [(0, 0, 0), (0, 0, 1), (3, 2, 1), (9, 5, 0), (15, 1, 1)]  # (sample, n-th scored column, layer slot)


def make(name: str):
    from cookbook.grpo.packing import PackingSpec

    layout, packed, recompute = VARIANTS[name]
    cfg = cp_probe.make_cfg(layout)
    cfg.parallel.recompute = recompute
    if not packed:
        cfg.grpo.sequence_packing = False
    batch = cp_probe.make_batch(cfg, n=16, seed=0)
    batch = dataclasses.replace(batch, packing=PackingSpec.from_config(cfg), row_index=torch.arange(len(batch)))
    return cfg, batch


def random_routing(batch, seed: int = 0) -> torch.Tensor:
    from cookbook.megatron import routing as R

    gen = torch.Generator().manual_seed(seed)
    B, width = batch.mask.shape
    ids = torch.rand(B, width, len(LAYERS), 8, generator=gen).argsort(-1)[..., :2].to(torch.int16)
    forwarded = torch.arange(width)[None] < (batch.lengths - 1)[:, None]
    return torch.where(forwarded[:, :, None, None], ids, torch.full_like(ids, R.NO_EXPERT))


def changed_routing(batch, own: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``own`` with the CHANGED pairs given another expert; returns it, the pairs and the tokens changed."""
    wrong = own.clone()
    tokens = set()
    for b, nth, slot in CHANGED:
        columns = torch.nonzero(batch.mask[b])[:, 0]
        t = int(columns[min(nth, len(columns) - 1)])
        wrong[b, t, slot, 0] = next(e for e in range(8) if e not in wrong[b, t, slot].tolist())
        tokens.add((b, t))
    return wrong, len(CHANGED), len(tokens)


def run(model, batch, cfg, **kwargs):
    from cookbook.grpo.parallel_step import forward_logprobs
    from cookbook.megatron import routing as R

    R.start_pass(model, capture=True, **kwargs)
    logp = forward_logprobs(model, batch, micro_batch_size=cfg.grpo.micro_batch_size)
    result = R.end_pass(model)
    used = R.captured_routing(result, len(batch), batch.mask.shape[1], len(LAYERS), 2,
                              device=next(model.parameters()).device)
    return logp, result, used


def train(model, batch, cfg, old) -> dict:
    from cookbook.grpo.parallel_step import train_minibatch

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    m = train_minibatch(model, opt, dataclasses.replace(batch, old_logp=old, ref_logp=old), cfg.grpo)
    return {"loss": m["loss"], "grad_norm": m["grad_norm"]}


def reference(args) -> dict:
    from cookbook.megatron import routing as R

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    cfg, batch = make("one")
    model = build(cfg, out / "mcore")
    tracker = R.attach(model, LAYERS)
    t0 = time.perf_counter()
    _, _, own = run(model, batch, cfg)
    tracker.replay = True
    target = random_routing(batch)
    logp, _, used = run(model, dataclasses.replace(batch, routing=target), cfg)
    step = train(model, dataclasses.replace(batch, routing=target), cfg, logp)
    rec = {"own": own, "replay_logp": logp, "replay_used": used, "train": step, "seconds": time.perf_counter() - t0}
    torch.save(rec, out / "routing_reference.pt")
    forwarded = torch.arange(batch.mask.shape[1])[None] < (batch.lengths - 1)[:, None]
    return {"mode": "reference", "seconds": rec["seconds"], "train": step,
            "own_complete": bool((own[forwarded] >= 0).all()), "replayed": bool(torch.equal(used[forwarded], target[forwarded]))}


def layouts(args) -> dict:
    from cookbook.megatron import routing as R
    from cookbook.megatron.parallel import layout

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ref = torch.load(out / "routing_reference.pt", weights_only=False)
    results = {}
    for name in args.layouts.split(","):
        t0 = time.perf_counter()
        cfg, batch = make(name)
        model = build(cfg, out / "mcore", rank, world)
        tracker = R.attach(model, LAYERS)
        device = next(model.parameters()).device
        res = {"layout": {k: v for k, v in layout().items() if k != "rank" and not k.endswith("_rank")},
               "packed": batch.packing is not None, "recompute": cfg.parallel.recompute}
        forwarded = torch.arange(batch.mask.shape[1])[None] < (batch.lengths - 1)[:, None]
        # the routers' own routing, from every rank
        _, _, own = run(model, batch, cfg, keep=True)
        res["own_equal"] = bool(torch.equal(own[forwarded], ref["own"][forwarded]))
        # statistics against the reference's routing with known pairs changed; a pass against itself
        wrong, pairs, tokens = changed_routing(batch, ref["own"])
        _, before, _ = run(model, dataclasses.replace(batch, routing=wrong), cfg, keep=True)
        _, again, _ = run(model, batch, cfg, compare=before, rollout=False)
        metrics = R.step_metrics(before, again, device=device, layers=LAYERS)
        scored = int(batch.mask.sum())
        res["stats"] = {k: v for k, v in metrics.items()}
        res["expected"] = {"routing/rollout_vs_trainer": pairs / (2 * scored),
                           "routing/rollout_vs_trainer_any_layer": tokens / scored}
        # replay of the random routing
        tracker.replay = True
        target = random_routing(batch)
        replayed = dataclasses.replace(batch, routing=target)
        logp, result, used = run(model, replayed, cfg)
        scored_mask = batch.mask.bool()
        res["replay_used_equal"] = bool(torch.equal(used[forwarded], target[forwarded]))
        res["replay_logp_max_diff"] = float((logp - ref["replay_logp"])[scored_mask].abs().max())
        res["replay_stats"] = R.step_metrics(result, device=device, layers=LAYERS)
        step = train(model, replayed, cfg, ref["replay_logp"])
        res["train"] = step
        res["train_loss_diff"] = abs(step["loss"] - ref["train"]["loss"])
        res["train_grad_norm_rel"] = abs(step["grad_norm"] - ref["train"]["grad_norm"]) / ref["train"]["grad_norm"]
        res["seconds"] = time.perf_counter() - t0
        results[name] = res
        del model
        dist.barrier()
    return {"mode": "layouts", "world": world, "results": results}


def convert(args) -> dict:
    from cookbook.config import load_config
    from cookbook.convert.pipeline import convert as run

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    run(load_config("tiny"), "hf_to_mcore", args.hf, Path(args.out) / "mcore", part=(0, 1), progress=False)
    return {"mode": "convert", "seconds": time.perf_counter() - t0}


def hf_router_topk(model, layers: list[int], ids: list[int]) -> torch.Tensor:
    """HF transformers' router choice ``[positions, layers, top_k]`` for the tokens ``ids`` (fp32)."""
    caught = {}
    hooks = [model.model.layers[L].mlp.gate.register_forward_hook(
        lambda mod, i, o, L=L: caught.__setitem__(L, o[2])) for L in layers]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([caught[L] for L in layers], 1)


def disagreement(model, layers: list[int], samples) -> dict:
    pairs = differ = tokens_differ = 0
    for s in samples:
        ids = s.prompt_ids + s.response_ids
        hf = hf_router_topk(model, layers, ids[:-1]).sort(-1).values
        got = torch.from_numpy(s.routed_experts.astype("int64")).sort(-1).values
        assert got.shape == hf.shape, (got.shape, hf.shape)
        d = (got != hf).any(-1)
        pairs, differ, tokens_differ = pairs + d.numel(), differ + int(d.sum()), tokens_differ + int(d.any(-1).sum())
    return {"pairs": pairs, "differ": differ, "tokens_differ": tokens_differ}


def rollout(args) -> dict:
    import transformers
    from safetensors.torch import load_file

    from cookbook.config import load_config
    from cookbook.data.generate import generate_rows
    from cookbook.rollout.engine import RolloutWorker

    torch.set_num_threads(args.threads)
    cfg = load_config("tiny", [f"model.params_dtype={args.dtype}", "grpo.max_response_length=40"])
    t0 = time.perf_counter()
    worker = RolloutWorker(args.hf, cfg)
    res = {"mode": "rollout", "ready": worker.ready(), "init_s": time.perf_counter() - t0}
    prompts = [[{"role": "user", "content": r["problem"]}] for r in generate_rows(args.prompts, 1)]
    t0 = time.perf_counter()
    samples = worker.generate(prompts, n=4, temperature=1.0, max_tokens=40, seed=5, routed_experts=True)
    res["generate_s"] = time.perf_counter() - t0
    res["tokens"] = sum(len(s.response_ids) for s in samples)
    res["routing_bytes"] = sum(s.routed_experts.nbytes for s in samples)
    res["dtype"] = str(samples[0].routed_experts.dtype)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    res["vs_hf"] = disagreement(hf, worker.moe_layers, samples)
    torch.save([dataclasses.asdict(s) for s in samples], Path(args.out) / f"samples_{args.dtype}.pt")
    if args.perturbed:
        worker.update_weights(load_file(f"{args.perturbed}/model.safetensors"))
        after = worker.generate(prompts[:4], n=2, temperature=1.0, max_tokens=40, seed=6, routed_experts=True)
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(args.perturbed, dtype=torch.float32).eval()
        res["vs_hf_after_push"] = disagreement(hf, worker.moe_layers, after)
    worker.shutdown()
    return res


def trainer(args) -> dict:
    from cookbook.config import load_config
    from cookbook.grpo.trainer import TrainerRank
    from helpers import free_port
    from transformers import AutoTokenizer

    samples = torch.load(Path(args.out) / f"samples_{args.dtype}.pt", weights_only=False)
    gen = torch.Generator().manual_seed(0)
    batch = {"prompt_ids": [s["prompt_ids"] for s in samples], "response_ids": [s["response_ids"] for s in samples],
             "rollout_logp": [s["logprobs"] for s in samples],
             "advantages": torch.randn(len(samples), generator=gen).tolist(),
             "routed_experts": [s["routed_experts"] for s in samples]}
    pad_id = AutoTokenizer.from_pretrained(args.hf).pad_token_id
    res = {"mode": "trainer"}
    for replay in ("none", "r3"):
        cfg = load_config("tiny", [f"model.params_dtype={args.dtype}", f"moe.routing_replay={replay}",
                                   "grpo.micro_batch_size=8", "grpo.num_minibatches=2"])
        rank = TrainerRank(cfg, 0, 1)
        torch.set_num_threads(args.threads)
        rank.setup("127.0.0.1", free_port(), str(Path(args.out) / "mcore"), pad_id)
        t0 = time.perf_counter()
        metrics = rank.train_step(batch, 1)
        metrics["step_s"] = time.perf_counter() - t0
        res[replay] = {k: v for k, v in metrics.items() if k.startswith(("routing/", "mismatch/", "perf/", "step_s"))}
        rank.shutdown()
    return res


MODES = {"prepare": cp_probe.prepare, "reference": reference, "layouts": layouts, "convert": convert,
         "rollout": rollout, "trainer": trainer}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=tuple(MODES))
    parser.add_argument("--out", default="")
    parser.add_argument("--layouts", default="tp2,tp2_padded,ep2_padded,pp2_recompute,cp2ep2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hf", default="")
    parser.add_argument("--perturbed", default="")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    result = MODES[args.mode](args)
    if int(os.environ.get("RANK", 0)) == 0:
        print("RESULT " + json.dumps(result, default=str), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
