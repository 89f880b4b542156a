"""GRPO steps of an MLA + MoE model under TP / EP / PP layouts against one process, the HF weight sync
from a sharded trainer, and checkpoints across layouts. Runs on CPU (gloo) and on GPUs (nccl, ``--gpu``).

  prepare    1 process: a random HF checkpoint and its one-process conversion (``mcore``).
  convert-part, compare-ckpt: the same conversion split over processes (``mcore-split``), and the two
             checkpoints compared tensor by tensor.
  reference  1 process: runs the steps with ``cookbook.grpo.parallel_step`` (the trainer's step) and saves
             the log-probs, losses, grad norms, first gradients and final weights as the reference.
  layouts    N processes (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, as torchrun sets them): for each
             layout, loads the converted checkpoint, checks the gathered weights against the HF checkpoint,
             runs the same steps with ``parallel_step`` and compares with the reference; loads the gathered
             trained weights into HF transformers and compares its log-probs with the trainer's; saves the
             last layout's trained model as a torch_dist checkpoint.
  verify     1 process: loads that checkpoint and compares weights and log-probs with the layout's run.

Rank 0 prints one line ``RESULT <json>``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

LAYOUTS = {  # name -> (tensor, expert, pipeline)
    "dp2": (1, 1, 1), "tp2": (2, 1, 1), "ep2": (1, 2, 1), "pp2": (1, 1, 2), "tp2ep2": (2, 2, 1),
    "tp2fused": (2, 1, 1),  # the fused loss (vocabulary-parallel kernel) against the unfused single process
}
SIZES = {  # model / batch overrides of the tiny preset
    "tiny": {"model": {}, "batch": 8, "prompt": (4, 9), "response": (4, 14), "micro": 2, "lr": 1e-3},
    "gpu": {"model": {"hidden_size": 1024, "num_layers": 6, "num_attention_heads": 8, "ffn_hidden_size": 2816,
                      "moe_ffn_hidden_size": 704, "num_experts": 16, "moe_router_topk": 4, "vocab_size": 32768,
                      "max_position_embeddings": 1024, "qk_nope_head_dim": 64, "v_head_dim": 64},
            "batch": 32, "prompt": (64, 192), "response": (128, 320), "micro": 4, "lr": 1e-5},
}


def make_cfg(size: str, layout: str = "dp2", gpu: bool = False):
    from cookbook.config import load_config

    cfg = load_config("tiny", values={"model": SIZES[size]["model"]}, overrides=[
        "moe.router_enable_expert_bias=true", "moe.router_bias_update_rate=0.001", f"grpo.lr={SIZES[size]['lr']}",
        f"grpo.micro_batch_size={SIZES[size]['micro']}", "grpo.num_minibatches=2"])
    tp, ep, pp = LAYOUTS[layout]
    p = cfg.parallel
    p.tensor, p.expert, p.pipeline, p.expert_tensor, p.sequence_parallel = tp, ep, pp, 1, tp > 1
    if pp > 1 and cfg.model.num_layers % pp:
        p.first_pipeline_stage_layers = cfg.model.num_layers - cfg.model.num_layers // pp
    if gpu:
        p.gpus_per_node = 1
        cfg.moe.token_dispatcher_type = "alltoall"
    return cfg


def make_batch(cfg, size: str, seed: int = 0):
    from cookbook.grpo import algorithm as A
    from cookbook.grpo.parallel_step import batch_from_rollout

    s = SIZES[size]
    gen = torch.Generator().manual_seed(seed)

    def tokens(lo_hi):
        n = int(torch.randint(lo_hi[0], lo_hi[1] + 1, (), generator=gen))
        return torch.randint(2, cfg.model.vocab_size, (n,), generator=gen).tolist()

    prompts = [tokens(s["prompt"]) for _ in range(s["batch"])]
    responses = [tokens(s["response"]) for _ in range(s["batch"])]
    advantages = A.group_advantages(torch.rand(s["batch"], generator=gen), n=4)
    return batch_from_rollout(prompts, responses, advantages.tolist(), pad_id=0)


def build(cfg, ckpt: Path, rank: int = 0, world: int = 1):
    from cookbook.convert.hf_to_mcore import load_megatron_checkpoint
    from cookbook.megatron.model import build_model, init_parallel

    init_parallel(cfg, rank=rank, world_size=world)
    model = build_model(cfg)
    if torch.cuda.is_available() and cfg.parallel.gpus_per_node:
        model.cuda()
    load_megatron_checkpoint(model, ckpt)
    return model


def optimizer(cfg, model):
    g = cfg.grpo
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=g.lr,
                             betas=(g.adam_beta1, g.adam_beta2), weight_decay=g.weight_decay)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def parallel_steps(cfg, model, batch, steps: int, fused: bool = False) -> dict:
    """The same steps through ``cookbook.grpo.parallel_step`` (any layout; ``fused``: the loss through the
    fused kernel, on CPU its torch reference); times each step."""
    from cookbook.grpo import algorithm as A
    from cookbook.grpo.parallel_step import forward_logprobs, train_minibatch
    from cookbook.megatron.parallel import gather_full_tensors

    g, opt = cfg.grpo, optimizer(cfg, model)
    rec = {"logp": [], "loss": [], "grad_norm": [], "step_s": []}

    def logprobs():
        return forward_logprobs(model, batch.input_ids, batch.position_ids, micro_batch_size=g.micro_batch_size,
                                temperature=g.temperature)

    for step in range(steps):
        _sync()
        t0 = time.perf_counter()
        old = logprobs()
        rec["logp"].append(old)
        b = dataclasses.replace(batch, old_logp=old)
        for i, mb in enumerate(A.split_minibatches(len(batch), g.num_minibatches, seed=cfg.seed + step)):
            hook = (lambda: rec.__setitem__("grads", gather_full_tensors(model, grads=True))) \
                if step == 0 and i == 0 else None
            m = train_minibatch(model, opt, b.rows(mb), g, fused=fused, after_backward=hook)
            rec["loss"].append(m["loss"])
            rec["grad_norm"].append(m["grad_norm"])
        _sync()
        rec["step_s"].append(time.perf_counter() - t0)  # step 0 includes warm-up and the gradient gather
        if step == 0 and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # peak memory of the steady steps, not of the gathers
    rec["logp"].append(logprobs())
    return rec


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def diff_stats(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How far apart two log-prob tensors are: a single token whose MoE routing flips at a near tie shows
    as one large difference among many tiny ones, a bug as many large ones."""
    d = (a.double() - b.double()).abs().flatten()
    return {"max": float(d.max()), "p999": float(torch.quantile(d, 0.999)), "mean": float(d.mean()),
            "over_1e-3": int((d > 1e-3).sum()), "tokens": d.numel()}


def compare(rec: dict, ref: dict) -> dict:
    """Largest differences against the reference: log-probs before each step and after the last, losses,
    grad norms (relative), first gradients (per tensor, relative to its largest element)."""
    grads = {name: max_abs(g, ref["grads"][name]) / max(float(ref["grads"][name].abs().max()), 1e-30)
             for name, g in rec["grads"].items()}
    missing = sorted(set(ref["grads"]) - set(rec["grads"]))
    return {
        "logp_before_step": max(max_abs(a, b) for a, b in zip(rec["logp"][:1], ref["logp"][:1])),
        "logp_after_steps": max(max_abs(a, b) for a, b in zip(rec["logp"][1:], ref["logp"][1:])),
        "loss": max(abs(a - b) for a, b in zip(rec["loss"], ref["loss"])),
        "grad_norm_rel": max(abs(a - b) / b for a, b in zip(rec["grad_norm"], ref["grad_norm"])),
        "grad_rel_max": max(grads.values()), "grad_worst": max(grads, key=grads.get),
        "grad_tensors": len(grads), "grad_tensors_missing": missing,
        "logp_before_stats": diff_stats(rec["logp"][0], ref["logp"][0]),
        "logp_after_stats": diff_stats(rec["logp"][-1], ref["logp"][-1]),
        "loss_ref": ref["loss"], "grad_norm_ref": ref["grad_norm"],
    }


def hf_logprobs(hf_dir: Path, weights: dict, batch, device, scratch: Path) -> torch.Tensor:
    """Log-probs from HF transformers (the non-vLLM generation path) loaded from the synced weights,
    written as a safetensors file beside the source config (transformers 5 fuses the per-expert tensors
    of the on-disk layout while loading, as vLLM's loader does)."""
    import shutil

    import transformers
    from safetensors.torch import save_file

    from cookbook.grpo import algorithm as A

    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    shutil.copy2(hf_dir / "config.json", scratch / "config.json")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(scratch / "model.safetensors"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(scratch, dtype=torch.float32).to(device).eval()
    ids = batch.input_ids.to(device)
    with torch.no_grad():
        out = torch.cat([A.token_logprobs(hf(ids[s:s + 4]).logits[:, :-1], ids[s:s + 4, 1:])[0]
                         for s in range(0, len(ids), 4)])
    del hf
    shutil.rmtree(scratch, ignore_errors=True)
    return out.cpu()


def hf_checkpoint_tensors(hf_dir: Path) -> dict:
    from safetensors import safe_open

    from cookbook.convert.hf_io import read_index

    out = {}
    for name, shard in read_index(hf_dir).items():
        with safe_open(hf_dir / shard, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def peak_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def single_cfg(args):
    cfg = make_cfg(args.size, "dp2", args.gpu)
    cfg.parallel.tensor = cfg.parallel.expert = cfg.parallel.pipeline = 1
    return cfg


def prepare(args) -> dict:
    """A random HF checkpoint (several shards) and its one-process conversion."""
    from cookbook.convert.pipeline import convert
    from cookbook.convert.synthetic import write_random_hf_checkpoint

    torch.set_num_threads(args.threads)
    out, cfg = Path(args.out), single_cfg(args)
    shard_bytes = 1 << 20 if args.size == "tiny" else 256 << 20  # several shards either way
    hf = write_random_hf_checkpoint(cfg.model, out / "hf", max_shard_bytes=shard_bytes, seed=3)
    t0 = time.perf_counter()
    convert(cfg, "hf_to_mcore", hf, out / "mcore", part=(0, 1), progress=False)
    return {"mode": "prepare", "convert_s": time.perf_counter() - t0,
            "hf_bytes": sum(f.stat().st_size for f in hf.glob("*.safetensors"))}


def convert_part(args) -> dict:
    """Part ``--part`` of ``--parts`` of the conversion into ``mcore-split`` (part 0 finalizes)."""
    from cookbook.convert.pipeline import convert

    torch.set_num_threads(args.threads)
    out, cfg = Path(args.out), single_cfg(args)
    t0 = time.perf_counter()
    convert(cfg, "hf_to_mcore", out / "hf", out / "mcore-split", part=(args.part, args.parts), progress=False)
    return {"mode": "convert-part", "part": args.part, "seconds": time.perf_counter() - t0}


def compare_checkpoints(args) -> dict:
    """Two torch_dist checkpoints tensor by tensor (names, dtypes, shapes, values)."""
    from cookbook.convert.mcore_ckpt import CheckpointReader

    a, b = CheckpointReader(Path(args.out) / "mcore"), CheckpointReader(Path(args.out) / "mcore-split")
    different = []
    tensors = 0
    for key in sorted(set(a.keys()) & set(b.keys())):
        meta = a.metadata.state_dict_metadata[key]
        if not hasattr(meta, "size"):
            continue
        tensors += 1
        shape = tuple(meta.size)
        ta, tb = a.read(key, (0,) * len(shape), shape), b.read(key, (0,) * len(shape), shape)
        if ta.dtype != tb.dtype or not torch.equal(ta, tb):
            different.append(key)
    return {"mode": "compare-ckpt", "tensors": tensors, "different": different,
            "only_single": sorted(set(a.keys()) - set(b.keys())), "only_split": sorted(set(b.keys()) - set(a.keys()))}


def reference(args) -> dict:
    """The steps in one process, saved as what every layout must reproduce."""
    from cookbook.megatron.parallel import gather_full_tensors

    torch.set_num_threads(args.threads)
    out, cfg = Path(args.out), single_cfg(args)
    batch = make_batch(cfg, args.size)
    model = build(cfg, out / "mcore")
    ref = parallel_steps(cfg, model, batch, args.steps)
    ref["weights"] = gather_full_tensors(model)
    torch.save(ref, out / "reference.pt")
    tokens = int((batch.input_ids != 0).sum())
    return {"mode": "reference", "tokens_per_step": tokens, "step_s": ref["step_s"], "peak_gib": peak_memory_gib()}


def layouts(args) -> dict:
    from cookbook.convert.names import megatron_to_hf_tensors
    from cookbook.megatron.parallel import gather_full_tensors, gather_hf_weights, layout

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ref = torch.load(out / "reference.pt", weights_only=False)
    hf_tensors = hf_checkpoint_tensors(out / "hf") if rank == 0 else None
    results = {}
    for name in args.layouts.split(","):
        cfg = make_cfg(args.size, name, args.gpu)
        batch = make_batch(cfg, args.size)
        model = build(cfg, out / "mcore", rank, world)
        loaded = gather_hf_weights(model)
        res = {"layout": {k: v for k, v in layout().items() if k not in ("rank",) and not k.endswith("_rank")}}
        if rank == 0:
            res["load_bit_exact"] = set(loaded) == set(hf_tensors) and all(
                torch.equal(loaded[k], hf_tensors[k].to(loaded[k].dtype)) for k in hf_tensors)
        rec = parallel_steps(cfg, model, batch, args.steps, fused=name.endswith("fused"))
        peaks = [None] * world
        dist.all_gather_object(peaks, peak_memory_gib())
        t0 = time.perf_counter()
        full = gather_full_tensors(model)
        res["gather_s"] = time.perf_counter() - t0
        weights = dict(megatron_to_hf_tensors(full.items()))
        if rank == 0:
            res.update(compare(rec, ref))
            ref_hf = dict(megatron_to_hf_tensors(ref["weights"].items()))
            res["weights_vs_reference_max"] = max(max_abs(weights[k], ref_hf[k]) for k in ref_hf)
            device = torch.device("cuda", torch.cuda.current_device()) if args.gpu else torch.device("cpu")
            hf = hf_logprobs(out / "hf", weights, batch, device, out / "synced")
            res["hf_sync_logp_max"] = max_abs(hf, rec["logp"][-1])
            res["hf_sync_stats"] = diff_stats(hf, rec["logp"][-1])
            res["step_s"], res["peak_gib_per_rank"] = rec["step_s"], peaks
            res["tokens_per_step"] = int((batch.input_ids != 0).sum())
        if name == args.layouts.split(",")[-1]:
            from megatron.core import dist_checkpointing

            save = out / f"trained-{name}"
            if rank == 0:
                save.mkdir()
            dist.barrier()
            dist_checkpointing.save(model.sharded_state_dict(), str(save))
            if rank == 0:
                torch.save({"weights": full, "logp": rec["logp"][-1]}, out / f"trained-{name}.pt")
        results[name] = res
        del model
        dist.barrier()
    return {"mode": "layouts", "world": world, "results": results}


def verify(args) -> dict:
    from cookbook.grpo.parallel_step import forward_logprobs
    from cookbook.megatron.parallel import gather_full_tensors

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    cfg = single_cfg(args)
    saved = torch.load(out / f"trained-{args.layout}.pt", weights_only=False)
    model = build(cfg, out / f"trained-{args.layout}")
    batch = make_batch(cfg, args.size)
    weights = gather_full_tensors(model)
    logp = forward_logprobs(model, batch.input_ids, batch.position_ids, micro_batch_size=cfg.grpo.micro_batch_size)
    return {"mode": "verify", "layout": args.layout, "same_names": set(weights) == set(saved["weights"]),
            "weights_bit_exact": all(torch.equal(weights[k], saved["weights"][k]) for k in saved["weights"]),
            "logp_max": max_abs(logp, saved["logp"]), "logp_stats": diff_stats(logp, saved["logp"])}


MODES = {"prepare": prepare, "convert-part": convert_part, "compare-ckpt": compare_checkpoints,
         "reference": reference, "layouts": layouts, "verify": verify}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=tuple(MODES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", default="tiny", choices=tuple(SIZES))
    parser.add_argument("--layouts", default="tp2,ep2,pp2,tp2ep2")
    parser.add_argument("--layout", default="tp2ep2")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    result = MODES[args.mode](args)
    if int(os.environ.get("RANK", 0)) == 0:
        print("RESULT " + json.dumps(result, default=str), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
