"""What the cu_seqlens check costs the packed forward on one CUDA GPU: the same cu_seqlens every call (checked once,
as every layer of a step passes the same tensor) against a fresh copy per call (a device sync per call) and the raw
launcher (no check); notebook 31's GPU run's lengths, rows of 4096 and 16384 tokens.

    OUT=DIR python3 benchmarks/probe_mla_check_sync.py    (writes DIR/sync_probe.json)
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels.mla_attention as mla  # noqa: E402
from bench_mla_attention import DK, bench, cu_of, make  # noqa: E402
from bench_mla_packed import HEADS, TOTAL_TOKENS, length_sampler, pack  # noqa: E402

LENGTHS = Path(__file__).resolve().parent / "results" / "nb31_tiny_deepseek_v3_h200_metrics.jsonl"


def main() -> None:
    draw, _ = length_sampler(LENGTHS)
    out = {}
    for row in (4096, 16384):
        lens = [n for r in pack(draw, row, TOTAL_TOKENS) for n in r]
        q, k, v, _ = make(lens, HEADS)
        cu, scale = cu_of(lens), DK ** -0.5
        out[row] = {"same cu (checked once)": bench(lambda: mla.mla_attention(q, k, v, cu, None, scale)),
                    "fresh cu per call (a sync each)": bench(
                        lambda: mla.mla_attention(q, k, v, cu.clone(), None, scale)),
                    "raw launcher (no check)": bench(
                        lambda: mla.mla_attention_forward(q, k, v, cu, max(lens), scale))}
        print(row, out[row], flush=True)
    Path(os.environ.get("OUT", "."), "sync_probe.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
