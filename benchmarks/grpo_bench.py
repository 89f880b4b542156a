"""GRPO engine throughput on this machine: rollout tokens/s (vLLM), train tokens/s (Megatron-Core), and the
per-step weight sync against a plain memory copy of the same bytes (the floor).

    .venv/bin/python benchmarks/grpo_bench.py [--preset tiny] [--prompts 16] [--samples 8]
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
    args = parser.parse_args()

    from cookbook.config import load_config
    from cookbook.data.generate import generate_rows
    from cookbook.grpo.policy import PolicyTrainer
    from cookbook.models.tiny import resolve_hf_dir
    from cookbook.rollout.engine import RolloutWorker

    cfg = load_config(args.preset, ["logging.wandb_mode=disabled"], values={"runs_dir": "/tmp/cookbook-bench",
                                                                           "run_name": "bench"})
    hf_dir = str(resolve_hf_dir(cfg))
    rollout = RolloutWorker(hf_dir, cfg)
    trainer = PolicyTrainer(cfg, hf_dir)
    prompts = [[{"role": "user", "content": r["problem"] + cfg.data.prompt_suffix}]
               for r in generate_rows(args.prompts, 99, "test")]

    gen_rates, samples = [], []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        samples = rollout.generate(prompts, n=args.samples, temperature=1.0, max_tokens=cfg.grpo.max_response_length,
                                   seed=i)
        gen_rates.append(sum(len(s.response_ids) for s in samples) / (time.perf_counter() - t0))

    batch = {"prompt_ids": [s.prompt_ids for s in samples], "response_ids": [s.response_ids for s in samples],
             "rollout_logp": [s.logprobs for s in samples],
             "advantages": [float(x) for x in torch.randn(len(samples))]}
    train_rates = [trainer.train_step(batch, i)["perf/train_tokens_per_s"] for i in range(args.repeats)]

    weights = trainer.export_hf_weights()
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    sync_s, copy_s = [], []
    for _ in range(args.repeats):
        sync_s.append(rollout.update_weights(weights)["seconds"])
        t0 = time.perf_counter()
        _ = {k: v.clone() for k, v in weights.items()}
        copy_s.append(time.perf_counter() - t0)
    best_sync, best_copy = min(sync_s), min(copy_s)

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
          f"preset {args.preset}; {args.prompts} prompts x {args.samples} samples")
    print(f"rollout (vLLM CPU): {max(gen_rates):,.0f} generated tokens/s (best of {args.repeats})")
    print(f"train step (Megatron-Core: old + ref log-probs, {cfg.grpo.num_minibatches} updates): "
          f"{max(train_rates):,.0f} tokens/s")
    print(f"weight sync: {nbytes / 2**20:.1f} MiB in {best_sync * 1e3:.0f} ms ({nbytes / best_sync / 1e9:.2f} GB/s); "
          f"plain memory copy {best_copy * 1e3:.1f} ms ({nbytes / best_copy / 1e9:.2f} GB/s); "
          f"ratio {best_sync / best_copy:.0f}x the copy")
    rollout.shutdown()
    trainer.shutdown()


if __name__ == "__main__":
    main()
