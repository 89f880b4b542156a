"""The fit planner's predictions against ``benchmarks/trainer_memory.py``'s measurements, one line per configuration.

    python3 benchmarks/planner_check.py MEASURED.json          # predicted vs measured, relative error, verdict
    python3 benchmarks/planner_check.py --predict               # predictions only, for the standard configurations
    python3 benchmarks/planner_check.py --command               # the trainer_memory.py command that measures them

A configuration is what ``trainer_memory.py`` recorded (preset + overrides). The planner is given the batch
``trainer_memory.synthetic_batch`` makes (prompts of half the prompt limit, responses of the full response limit)
and predicts one trainer rank's ``torch.cuda`` allocated bytes: after setup (policy + reference), after the first
step (+ gradients and AdamW moments) and the second step's peak, plus the reserved pool
(``cookbook.plan.memory.ALLOCATOR_CACHE``). ``--tolerance`` (default 0.15) is the acceptance bound on the peak.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
# the H200 measurements (benchmarks/results/trainer_memory_h200.json) ran before grpo.master_weights existed, with
# AdamW in bf16: what grpo.master_weights=false runs (a measurement without the key is compared as such)
BEFORE_MASTER_WEIGHTS = ["grpo.master_weights=false"]
BASE = ["grpo.prompts_per_step=8", "grpo.samples_per_prompt=8"]
# the configurations the planner is validated on (moonlight-1gpu, one H200): name -> overrides
CONFIGS = {
    "base": BASE,  # packed rows of 4096 tokens, one row per micro-batch, recompute none
    "full": BASE + ["parallel.recompute=full"],
    "selective": BASE + ["parallel.recompute=selective"],
    "padded4": BASE + ["grpo.sequence_packing=false", "grpo.micro_batch_size=4"],
    "layers8": BASE + ["model.num_layers=8"],
}


def predict(preset: str, overrides: list[str]) -> dict[str, float]:
    """The planner's numbers (GiB) for one trainer rank running ``trainer_memory.py``'s batch."""
    from cookbook.config import load_config
    from cookbook.plan.activations import microbatch
    from cookbook.plan.memory import ALLOCATOR_CACHE, trainer_peak
    from cookbook.plan.params import stage_counts

    cfg = load_config(preset, ["logging.wandb_mode=disabled", *overrides], values={"run_name": "planner-check"})
    per_sample = cfg.grpo.max_prompt_length // 2 + cfg.grpo.max_response_length
    peak = trainer_peak(cfg, 0, per_sample)
    transient = peak["peak"] - peak["after_step"]
    return {"params": stage_counts(cfg, 0).params, "tokens_per_microbatch": microbatch(cfg, per_sample).tokens,
            "after_setup_gib": peak["after_setup"] / GIB, "after_step1_gib": peak["after_step"] / GIB,
            "step2_peak_gib": peak["peak"] / GIB,
            "reserved_gib": (peak["after_step"] + ALLOCATOR_CACHE * transient) / GIB}


def compare(measured: dict, tolerance: float) -> tuple[list[dict], bool]:
    """Rows of predicted vs measured per configuration and quantity; whether every peak is within tolerance."""
    rows, ok = [], True
    for name, m in measured.items():
        if "error" in m:
            rows.append({"config": name, "quantity": "error", "measured": m["error"].splitlines()[-1]})
            ok = False
            continue
        recorded = [f"grpo.master_weights={str(m['master_weights']).lower()}"] if "master_weights" in m else \
            BEFORE_MASTER_WEIGHTS
        p = predict(m["preset"], [*m["overrides"], *recorded])
        for key in ("params", "after_setup_gib", "after_step1_gib", "step2_peak_gib", "reserved_gib"):
            if m.get(key) is None:
                continue
            error = (p[key] - m[key]) / m[key]
            rows.append({"config": name, "quantity": key, "predicted": p[key], "measured": m[key], "error": error})
            if key == "step2_peak_gib" and abs(error) > tolerance:
                ok = False
    return rows, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("measured", nargs="?", help="trainer_memory.py's output JSON")
    parser.add_argument("--preset", default="moonlight-1gpu")
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument("--predict", action="store_true", help="print the predictions for the standard configurations")
    parser.add_argument("--command", action="store_true", help="print the trainer_memory.py command for them")
    args = parser.parse_args()
    if args.command:
        specs = " ".join(f"--config {name}={','.join(o)}" for name, o in CONFIGS.items())
        print(f"python3 benchmarks/trainer_memory.py OUT.json --preset {args.preset} {specs}")
        return 0
    if args.predict or not args.measured:
        print("| config | params | tokens / micro-batch | after setup GiB | after step 1 GiB | peak GiB | "
              "reserved GiB |")
        print("|---|---|---|---|---|---|---|")
        for name, overrides in CONFIGS.items():
            p = predict(args.preset, overrides)
            print(f"| {name} | {p['params']:,} | {p['tokens_per_microbatch']} | {p['after_setup_gib']:.2f} | "
                  f"{p['after_step1_gib']:.2f} | {p['step2_peak_gib']:.2f} | {p['reserved_gib']:.2f} |")
        return 0
    rows, ok = compare(json.loads(Path(args.measured).read_text()), args.tolerance)
    print("| config | quantity | predicted | measured | error |")
    print("|---|---|---|---|---|")
    for r in rows:
        pred = f"{r['predicted']:,}" if isinstance(r.get("predicted"), int) else f"{r.get('predicted', 0):.2f}"
        meas = f"{r['measured']:,}" if isinstance(r.get("measured"), int) else \
            (f"{r['measured']:.2f}" if isinstance(r.get("measured"), float) else r.get("measured"))
        err = f"{r['error']:+.1%}" if "error" in r else "-"
        print(f"| {r['config']} | {r['quantity']} | {pred} | {meas} | {err} |")
    print(f"\npeaks within {args.tolerance:.0%}: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
