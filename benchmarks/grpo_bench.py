"""GRPO engine throughput on this machine: rollout tokens/s (vLLM), train tokens/s (the trainer group), and the
per-step weight sync against a plain memory copy of the same bytes (the floor).

    .venv/bin/python benchmarks/grpo_bench.py [--preset tiny] [--prompts 16] [--samples 8] [KEY=VALUE ...]

KEY=VALUE are config overrides, e.g. ``parallel.tensor=2`` for a 2-rank trainer group.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import ray

    from cookbook.config import load_config
    from cookbook.data.generate import generate_rows
    from cookbook.grpo.workers import start_workers

    cfg = load_config(args.preset, ["logging.wandb_mode=disabled", *args.overrides],
                      values={"runs_dir": "/tmp/cookbook-bench", "run_name": "bench"})
    workers = start_workers(cfg)
    rollout, trainer = workers.rollout, workers.trainer
    prompts = [[{"role": "user", "content": r["problem"] + cfg.data.prompt_suffix}]
               for r in generate_rows(args.prompts, 99, "test")]
    try:
        gen_rates, samples = [], []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            samples = ray.get(rollout.generate.remote(prompts, n=args.samples, temperature=1.0,
                                                      max_tokens=cfg.grpo.max_response_length, seed=i))
            gen_rates.append(sum(len(s.response_ids) for s in samples) / (time.perf_counter() - t0))

        batch = ray.put({"prompt_ids": [s.prompt_ids for s in samples],
                         "response_ids": [s.response_ids for s in samples],
                         "rollout_logp": [s.logprobs for s in samples],
                         "advantages": [float(x) for x in torch.randn(len(samples))]})
        train_rates = [trainer.call("train_step", batch, i)["perf/train_tokens_per_s"] for i in range(args.repeats)]

        syncs = [trainer.call("sync_weights", rollout, cfg.parallel.weight_sync_bucket_mb << 20)
                 for _ in range(args.repeats)]
        nbytes = int(syncs[0]["bytes"])
        block = torch.empty(nbytes, dtype=torch.uint8)
        copy_s = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            block.clone()
            copy_s.append(time.perf_counter() - t0)
        best_sync, best_copy = min(s["seconds"] for s in syncs), min(copy_s)
    finally:
        workers.shutdown()

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
          f"preset {args.preset} {' '.join(args.overrides)}; {cfg.world_size} trainer ranks; "
          f"{args.prompts} prompts x {args.samples} samples")
    print(f"rollout (vLLM): {max(gen_rates):,.0f} generated tokens/s (best of {args.repeats})")
    print(f"train step (old + ref log-probs, {cfg.grpo.num_minibatches} updates): {max(train_rates):,.0f} tokens/s")
    print(f"weight sync: {nbytes / 2**20:.1f} MiB in {int(syncs[0]['buckets'])} buckets, {best_sync * 1e3:.0f} ms "
          f"({nbytes / best_sync / 1e9:.2f} GB/s); plain memory copy {best_copy * 1e3:.1f} ms "
          f"({nbytes / best_copy / 1e9:.2f} GB/s); ratio {best_sync / best_copy:.0f}x the copy")


if __name__ == "__main__":
    main()
