"""The GRPO engine on one GPU: notebook 30's CLI twin (``cookbook train``) on a preset, then, in the same run,
the baselines its numbers are compared with: vLLM alone generating the same batch, and a device-to-device copy
of the bytes one weight sync moves. Writes a JSON summary (step split, rollout / train tokens/s, MFU, sync rate,
memory by phase, the bf16 rollout-vs-trainer mismatch) to OUT.

    python3 benchmarks/gpu_grpo_bench.py OUT.json --preset moonlight-1gpu [KEY=VALUE ...]

MFU counts 6 x active parameters (routed experts: top-k of them; embeddings left out) per trained token, against
a bf16 peak of 989 TFLOP/s (H100/H200 dense, datasheet).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

PEAK_FLOPS = 989e12


def active_params(m) -> int:
    from cookbook.convert.names import all_mappings, hf_shape

    total = 0
    for mp in all_mappings(m):
        for name in mp.hf:
            if "embed_tokens" in name:
                continue
            n = 1
            for d in hf_shape(m, name):
                n *= d
            total += n * m.moe_router_topk // m.num_experts if mp.expert is not None else n
    return total


def median(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


BENCH_OVERRIDES = ["logging.wandb_mode=disabled", "logging.tensorboard=false", "grpo.mismatch_threshold=0.1"]


def run_train(args, overrides: list[str], name: str) -> Path:
    """Notebook 30 executed by papermill (``--via notebook``) or its CLI twin ``cookbook train``."""
    all_overrides = [*BENCH_OVERRIDES, *args.overrides, *overrides]
    if args.via == "notebook":
        from cookbook.runner import parse_cli_value, run_notebook

        values = {k: parse_cli_value(v) for k, v in (o.split("=", 1) for o in all_overrides)}
        run_notebook("30_grpo_moonlight", {"preset": args.preset, "overrides": values, "walkthrough": False},
                     run_name=name, runs_dir=args.runs, progress=False)
        return Path(args.runs) / name
    from cookbook.cli import main

    code = main(["train", "--preset", args.preset, "--run-name", name, "--runs-dir", args.runs, "--no-progress",
                 *all_overrides])
    if code:
        raise RuntimeError(f"cookbook train exited {code}")
    return Path(args.runs) / name


def summarize(run: Path, cfg) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0][1:]  # the first step includes warm-up (compiles, allocator)
    phases = {p: median(steps, f"time/{p}") for p in ("rollout", "reward", "offload", "train", "wake", "sync",
                                                       "step")}
    train_tps = median(steps, "perf/train_tokens_per_s")
    other = sum(v for k, v in phases.items() if k not in ("rollout", "train", "step") and v)
    return {
        "steps": len(rows) - 1, "phases_median_s": phases,
        "outside_rollout_and_train_share": other / phases["step"] if phases["step"] else None,
        "rollout_tokens_per_s": median(steps, "perf/rollout_tokens_per_s"),
        "train_tokens_per_s": train_tps,
        "mfu": 6 * active_params(cfg.model) * train_tps / PEAK_FLOPS if train_tps else None,
        "sync_bytes": median(steps, "sync/bytes"), "sync_s": median(steps, "sync/seconds"),
        "sync_gb_per_s": median(steps, "sync/gb_per_s"),
        "sync_split_s": {k: median(steps, f"sync/{k}") for k in ("gather_s", "engine_load_s", "engine_finish_s")},
        "eval": {r["step"]: r.get("eval/accuracy") for r in rows if "eval/accuracy" in r},
        "memory_gib": {k: median(steps, k) for k in ("memory/device_after_rollout_gib",
                                                     "memory/device_after_offload_gib", "memory/train_peak_gib")},
        "mismatch": {k: median(steps, f"mismatch/{k}") for k in ("abs_diff_mean", "abs_diff_p99", "abs_diff_max",
                                                                  "frac_over_threshold")},
        "last": rows[-1],
    }


def vllm_alone(cfg, seconds_budget: float = 120) -> dict:
    """The engine alone (no trainer on the GPU) generating the loop's batch shape with the loop's sampling."""
    from cookbook.data.prepare import prepare_data
    from cookbook.grpo.loop import data_files
    from cookbook.data.preprocess import read_records
    from cookbook.models.tiny import resolve_hf_dir
    from cookbook.rollout.engine import RolloutWorker

    prepare_data(cfg)
    records = read_records(data_files(cfg)[0])[:cfg.grpo.prompts_per_step]
    worker = RolloutWorker(str(resolve_hf_dir(cfg)), cfg)
    g = cfg.grpo
    rates = []
    t_end = time.time() + seconds_budget
    for i in range(3):
        t0 = time.perf_counter()
        samples = worker.generate([r["prompt"] for r in records], n=g.samples_per_prompt, temperature=g.temperature,
                                  top_p=g.top_p, max_tokens=g.max_response_length, seed=i)
        rates.append(sum(len(s.response_ids) for s in samples) / (time.perf_counter() - t0))
        if time.time() > t_end:
            break
    worker.shutdown()
    return {"tokens_per_s": rates, "best": max(rates)}


def d2d_copy(nbytes: int) -> dict:
    x = torch.empty(int(nbytes), dtype=torch.uint8, device="cuda")
    for _ in range(3):
        x.clone()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        x.clone()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"bytes": nbytes, "seconds": best, "gb_per_s": nbytes / best / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--preset", default="moonlight-1gpu")
    parser.add_argument("--runs", default="/tmp/gpu-runs")
    parser.add_argument("--fused", default="off,on", help="which runs: off, on, or both")
    parser.add_argument("--fused-steps", type=int, default=0, help="steps of the fused run (0: the preset's)")
    parser.add_argument("--baselines", action="store_true", help="also measure vLLM alone and the d2d copy")
    parser.add_argument("--only-baselines", action="store_true", help="the baselines without training runs (the "
                        "d2d copy then needs --sync-bytes)")
    parser.add_argument("--sync-bytes", type=float, default=0, help="bytes one weight sync moves (--only-baselines)")
    parser.add_argument("--via", default="cli", choices=("cli", "notebook"),
                        help="run training as notebook 30 under papermill or as its CLI twin")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()

    from cookbook.config import load_config

    cfg = load_config(args.preset, [*args.overrides], values={"runs_dir": args.runs, "run_name": "alone"})
    out: dict = {"preset": args.preset, "overrides": args.overrides, "gpu": torch.cuda.get_device_name(),
                 "active_params": active_params(cfg.model), "date": time.strftime("%Y-%m-%d")}

    def save():
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))

    for flag in [] if args.only_baselines else args.fused.split(","):
        extra = [f"grpo.use_fused_kernels={'true' if flag == 'on' else 'false'}"]
        if flag == "on" and args.fused_steps:
            extra.append(f"grpo.steps={args.fused_steps}")
        try:
            t0 = time.time()
            run = run_train(args, extra, f"fused-{flag}")
            out[f"fused_{flag}"] = summarize(run, cfg) | {"wall_s": time.time() - t0}
        except Exception:  # noqa: BLE001 - record and go on to the next measurement
            out[f"fused_{flag}"] = {"error": traceback.format_exc()[-3000:]}
        save()
    if args.baselines or args.only_baselines:
        sync_bytes = args.sync_bytes or next(v for k, v in out.items() if k.startswith("fused_")
                                             and "sync_bytes" in v)["sync_bytes"]
        for name, fn in (("vllm_alone", lambda: vllm_alone(cfg)), ("d2d_copy", lambda: d2d_copy(sync_bytes))):
            try:
                out[name] = fn()
            except Exception:  # noqa: BLE001
                out[name] = {"error": traceback.format_exc()[-3000:]}
            save()
    print(json.dumps({k: v for k, v in out.items()}, indent=1, default=str)[:6000])
    sys.exit(0)


if __name__ == "__main__":
    main()
