"""Summarize the logs of benchmarks/multi_gpu_layouts.sh: ``summary.json`` and a table of equivalence
errors, throughput and peak memory per layout (the reference row is one process / one GPU)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def results(log: Path) -> list[dict]:
    if not log.is_file():
        return []
    return [json.loads(line[len("RESULT "):]) for line in log.read_text(errors="replace").splitlines()
            if line.startswith("RESULT ")]


def steady(step_s: list[float]) -> float:
    """Mean step time without the first step (warm-up, compilation, gradient gather)."""
    rest = step_s[1:] or step_s
    return sum(rest) / len(rest)


def summarize(out: Path) -> dict:
    found = {name: results(out / f"{name}.log") for name in ("prepare", "split", "compare", "reference", "layouts",
                                                             "verify")}
    summary: dict = {"steps_with_result": {k: len(v) for k, v in found.items()}}
    if found["prepare"]:
        summary["prepare"] = found["prepare"][0]
    summary["convert_split"] = found["split"]
    if found["compare"]:
        c = found["compare"][0]
        summary["convert_split_equal"] = {"tensors": c["tensors"], "equal": not (c["different"] or c["only_single"]
                                                                                  or c["only_split"])}
    rows = []
    if found["reference"]:
        r = found["reference"][0]
        summary["reference"] = r
        v = r["parallel_step_vs_plain"]
        rows.append({"layout": "1 process", "gpus": 1, "tokens_per_s": r["tokens_per_step"] / steady(r["step_s"]),
                     "peak_gib": [r["peak_gib"]], **{k: v[k] for k in ERRORS}, **_over(v)})
    if found["layouts"]:
        for name, res in found["layouts"][0]["results"].items():
            tps = res["tokens_per_step"] / steady(res["step_s"])
            rows.append({"layout": name, "gpus": res["layout"]["world"], "tokens_per_s": tps,
                         "peak_gib": res["peak_gib_per_rank"], "hf_sync_logp_max": res["hf_sync_logp_max"],
                         "load_bit_exact": res["load_bit_exact"], "gather_s": res["gather_s"],
                         "hf_sync_over": res["hf_sync_stats"]["over_1e-3"],
                         **{k: res[k] for k in ERRORS}, **_over(res)})
    if found["verify"]:
        summary["verify"] = found["verify"][0]
    summary["rows"] = rows
    return summary


def _over(diff: dict) -> dict:
    """Tokens whose log-prob differs by more than 1e-3, before and after the steps, of how many."""
    return {"over_before": diff["logp_before_stats"]["over_1e-3"], "over_after": diff["logp_after_stats"]["over_1e-3"],
            "tokens": diff["logp_before_stats"]["tokens"]}


ERRORS = ("logp_before_step", "loss", "grad_norm_rel", "grad_rel_max", "logp_after_steps")


def table(rows: list[dict]) -> str:
    head = ("| layout | GPUs | tokens/s (per GPU) | peak GiB per GPU | logp before | loss | grad norm rel | "
            "grad rel max | logp after | tokens > 1e-3 before / after (of N) | HF sync logp (tokens > 1e-3) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        peaks = " / ".join(f"{p:.2f}" for p in r["peak_gib"])
        sync = f"{r['hf_sync_logp_max']:.1e} ({r['hf_sync_over']})" if "hf_sync_logp_max" in r else "-"
        lines.append(f"| {r['layout']} | {r['gpus']} | {r['tokens_per_s']:.0f} ({r['tokens_per_s'] / r['gpus']:.0f}) | "
                     f"{peaks} | {r['logp_before_step']:.1e} | {r['loss']:.1e} | {r['grad_norm_rel']:.1e} | "
                     f"{r['grad_rel_max']:.1e} | {r['logp_after_steps']:.1e} | "
                     f"{r['over_before']} / {r['over_after']} (of {r['tokens']}) | {sync} |")
    return "\n".join(lines)


def main() -> None:
    out = Path(sys.argv[1])
    summary = summarize(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("rows", "reference")}, default=str))
    print(table(summary["rows"]))


if __name__ == "__main__":
    main()
