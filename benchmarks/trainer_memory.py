"""Peak GPU memory of one trainer rank under several configurations: the measurements the fit planner
(issue 14) is checked against. Each configuration runs in a fresh process (clean allocator statistics): the
policy and the frozen reference are built and loaded from the converted checkpoint, then two GRPO train steps
run on a synthetic batch of the loop's shape (random token ids; the memory does not depend on their values).

    python3 benchmarks/trainer_memory.py OUT.json --preset moonlight-1gpu \\
        --config base= --config full=parallel.recompute=full --config ...

Each ``--config NAME=KEY=VALUE,KEY=VALUE`` adds a configuration (overrides separated by commas). Recorded per
configuration: memory allocated after setup (weights, reference, optimizer not yet touched), after the first
step (Adam's states exist), and the peak of the second step (``torch.cuda.max_memory_allocated``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import sys
import time
import traceback
from pathlib import Path

GIB = 2**30


def synthetic_batch(cfg, seed: int = 0) -> dict:
    """The loop's batch shape: prompts_per_step x samples_per_prompt samples, prompt of half the prompt limit,
    responses of the full response limit (the worst case the loop can produce)."""
    import random

    g, rng = cfg.grpo, random.Random(seed)
    n, vocab = g.prompts_per_step * g.samples_per_prompt, cfg.model.vocab_size
    prompt = [[rng.randrange(1, vocab) for _ in range(g.max_prompt_length // 2)] for _ in range(n)]
    response = [[rng.randrange(1, vocab) for _ in range(g.max_response_length)] for _ in range(n)]
    return {"prompt_ids": prompt, "response_ids": response, "rollout_logp": [[-1.0] * len(r) for r in response],
            "advantages": [rng.choice((-1.0, 1.0)) for _ in range(n)]}


def measure(preset: str, overrides: list[str], runs: str, queue) -> None:
    try:
        import torch

        from cookbook.config import load_config
        from cookbook.grpo.trainer import TrainerRank
        from cookbook.grpo.workers import _convert
        from cookbook.models.hf_config import read_hf_config
        from cookbook.models.tiny import resolve_hf_dir
        from cookbook.rundir import mcore_dir

        # one converted checkpoint per architecture (the model.* overrides), shared by its configurations
        arch = hashlib.sha1(repr(sorted(o for o in overrides if o.startswith("model."))).encode()).hexdigest()[:8]
        cfg = load_config(preset, ["logging.wandb_mode=disabled", *overrides],
                          values={"runs_dir": runs, "run_name": f"memory-{arch}"})
        hf = str(resolve_hf_dir(cfg))
        mcore = mcore_dir(cfg)
        if not mcore.is_dir():
            _convert(cfg, hf, str(mcore))
        rank = TrainerRank(cfg, 0, 1)
        rank.setup("127.0.0.1", 0, str(mcore), int(read_hf_config(hf).get("pad_token_id") or 0))
        out = {"after_setup_gib": torch.cuda.memory_allocated() / GIB if torch.cuda.is_available() else None,
               "params": sum(p.numel() for p in rank.model.parameters()),
               "master_weights": cfg.grpo.master_weights}  # benchmarks/planner_check.py predicts with it
        batch = synthetic_batch(cfg)
        t0 = time.perf_counter()
        rank.train_step(batch, 1)
        if torch.cuda.is_available():
            out["after_step1_gib"] = torch.cuda.memory_allocated() / GIB
            out["step1_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        metrics = rank.train_step(batch, 2)
        out["step2_peak_gib"] = metrics.get("memory/train_peak_gib")
        out["step_s"] = (time.perf_counter() - t0) / 2
        if torch.cuda.is_available():
            out["reserved_gib"] = torch.cuda.memory_reserved() / GIB
        out["tokens"] = sum(len(p) + len(r) for p, r in zip(batch["prompt_ids"], batch["response_ids"]))
        queue.put(out)
    except Exception:  # noqa: BLE001 - the parent records it and goes on
        queue.put({"error": traceback.format_exc()[-3000:]})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--preset", default="moonlight-1gpu")
    parser.add_argument("--runs", default="/tmp/memory-runs")
    parser.add_argument("--config", action="append", default=[], metavar="NAME=OVERRIDES")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = {}
    for spec in args.config or ["base="]:
        name, _, rest = spec.partition("=")
        overrides = [o for o in rest.split(",") if o]
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(args.preset, overrides, args.runs, queue))
        proc.start()
        result = queue.get()
        proc.join()
        results[name] = {"preset": args.preset, "overrides": overrides, **result}
        print(name, json.dumps(results[name])[:400], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    sys.exit(0)


if __name__ == "__main__":
    main()
