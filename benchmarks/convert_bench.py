"""Conversion throughput and peak host memory vs a plain copy of the same bytes on the same disk.

    .venv/bin/python benchmarks/convert_bench.py [--work DIR] [--sizes tiny,dsv3-shaped]

Each step runs in a fresh child process so its peak RSS (ru_maxrss) is its own (about 470 MiB of it is
the interpreter with torch and megatron imported); HF shards are written at the same size as the source's. ``dsv3-shaped`` is a
random-weight checkpoint with DeepSeek-V3's layer shapes (hidden 7168, 128 heads, q_lora 1536, dense FFN
18432, experts of 2048) cut to 2 layers, 8 experts and a 16k vocabulary so that it stays under 3 GB.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time, torch
torch.set_num_threads(2)
from cookbook.config import load_config
from cookbook.convert.pipeline import convert
def main():
    args = json.loads(sys.argv[1])
    cfg = load_config(args["preset"], overrides=args["overrides"])
    t = time.perf_counter()
    convert(cfg, args["direction"], args["src"], args["out"], part=(0, 1), progress=False,
            max_shard_bytes=args["shard_bytes"])
    print(json.dumps({"seconds": time.perf_counter() - t,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
if __name__ == "__main__":
    main()
"""

SIZES = {
    "tiny": [],
    "dsv3-shaped": ["model.vocab_size=16384", "model.hidden_size=7168", "model.num_layers=2",
                    "model.num_attention_heads=128", "model.ffn_hidden_size=18432", "model.moe_ffn_hidden_size=2048",
                    "model.num_experts=8", "model.moe_router_topk=2", "model.num_shared_experts=1",
                    "model.first_k_dense_replace=1", "model.q_lora_rank=1536", "model.qk_nope_head_dim=128",
                    "model.v_head_dim=128", "model.params_dtype=bfloat16"],
}
SHARD_BYTES = {"tiny": 1 << 20, "dsv3-shaped": 512 << 20}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_child(preset: str, overrides: list[str], direction: str, src: Path, out: Path, shard_bytes: int) -> dict:
    arg = json.dumps({"preset": preset, "overrides": overrides, "direction": direction, "src": str(src),
                      "out": str(out), "shard_bytes": shard_bytes})
    proc = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plain_copy(src: Path, dst: Path) -> float:
    dst.mkdir()
    t = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        shutil.copyfile(f, dst / f.name)
    subprocess.run(["sync"], check=False)
    return time.perf_counter() - t


def bench(size: str, work: Path) -> list[dict]:
    from cookbook.config import load_config
    from cookbook.convert.synthetic import write_random_hf_checkpoint

    overrides = SIZES[size]
    cfg = load_config("tiny", overrides=overrides)
    src = write_random_hf_checkpoint(cfg.model, work / f"{size}-hf", max_shard_bytes=SHARD_BYTES[size])
    nbytes = dir_bytes(src)
    largest = max(p.stat().st_size for p in src.glob("*.safetensors"))
    rows = []
    copy_s = plain_copy(src, work / f"{size}-copy")
    rows.append({"size": size, "step": "plain copy", "gb": nbytes / 1e9, "seconds": copy_s, "peak_rss_mib": None})
    shutil.rmtree(work / f"{size}-copy")
    steps = [("hf_to_mcore", src, work / f"{size}-mcore"), ("mcore_to_hf", work / f"{size}-mcore", work / f"{size}-back")]
    for direction, a, b in steps:
        result = run_child("tiny", overrides, direction, a, b, SHARD_BYTES[size])
        rows.append({"size": size, "step": direction, "gb": nbytes / 1e9, **result})
    for row in rows:
        row["gb_per_s"] = row["gb"] / row["seconds"]
        row["vs_copy"] = row["gb_per_s"] / (nbytes / 1e9 / copy_s)
        row["largest_shard_mib"] = largest / 2**20
    for name in ("hf", "mcore", "back"):
        shutil.rmtree(work / f"{size}-{name}", ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default="", help="scratch folder on the disk to measure (default: a temp dir)")
    parser.add_argument("--sizes", default="tiny,dsv3-shaped")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for size in args.sizes.split(","):
            rows += bench(size, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print("| checkpoint | step | GB | s | GB/s | vs plain copy | peak RSS MiB | largest shard MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rss = "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        print(f"| {r['size']} | {r['step']} | {r['gb']:.3f} | {r['seconds']:.2f} | {r['gb_per_s']:.3f} | "
              f"{r['vs_copy']:.2f}x | {rss} | {r['largest_shard_mib']:.1f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
