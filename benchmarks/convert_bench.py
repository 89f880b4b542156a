"""Conversion throughput and peak host memory vs a plain copy of the same bytes on the same disk.

    .venv/bin/python benchmarks/convert_bench.py [--work DIR] [--sizes tiny,dsv3-shaped] [--parts N] [--cold]

Each step runs in fresh child processes, ``--parts`` of them at once as the nodes of a batch job split it
(``part=(i, N)``; part 0 finalizes); peak RSS is each process's own high-water mark (VmHWM: ru_maxrss would carry
the parent's peak across fork and exec); about 470 MiB of it is the interpreter with torch and megatron imported. ``--cold`` drops the page cache before every step (needs root), so
the copy and the conversions all read from the disk. The plain copy runs before and after the steps, and the steps are
compared with the mean of the two: a cloud disk's throughput drifts (here up to 1.8x within an hour). Sizes:

- ``tiny``: the tiny preset (fixed costs dominate).
- ``dsv3-shaped``: random bf16 weights with DeepSeek-V3's layer shapes (hidden 7168, 128 heads, q_lora 1536, dense
  FFN 18432, experts of 2048) cut to 2 layers, 8 experts and a 16k vocabulary (2.8 GB): HF -> Megatron -> HF.
- ``dsv3-fp8-20g``: DeepSeek-V3's fp8 layout (e4m3 + 128x128 scale_inv), its real vocabulary (129280) and expert
  count per layer cut to 192, 1 dense + 2 MoE layers: 21.6 GB in 1 GiB shards; step: the fp8 -> bf16 cast.
- ``dsv3-bf16-20g``: the same shapes in bf16, 1 dense + 7 MoE layers of 24 experts (DeepSeek-V3's 3 dense of 61
  layers, scaled; 22 GB in 2 GiB shards, as the cast writes them), so that 2 parts split it by layer ranges about
  evenly as they split DeepSeek-V3: step: HF -> Megatron-Core. (The cast's 40 GB output and its conversion would
  not fit together on an 80 GB disk, so the two steps are measured on two checkpoints of at least 20 GB.)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time, torch
torch.set_num_threads(1)
from cookbook.config import load_config
from cookbook.convert.pipeline import convert
def main():
    args = json.loads(sys.argv[1])
    cfg = load_config(args["preset"], overrides=args["overrides"])
    t = time.perf_counter()
    convert(cfg, args["direction"], args["src"], args["out"], part=tuple(args["part"]), progress=False,
            max_shard_bytes=args["shard_bytes"])
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
    print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mib": int(hwm.split()[1]) / 1024}))
if __name__ == "__main__":
    main()
"""

DSV3 = ["model.hidden_size=7168", "model.num_attention_heads=128", "model.ffn_hidden_size=18432",
        "model.moe_ffn_hidden_size=2048", "model.num_shared_experts=1", "model.first_k_dense_replace=1",
        "model.q_lora_rank=1536", "model.qk_nope_head_dim=128", "model.v_head_dim=128", "model.params_dtype=bfloat16"]
SIZES = {  # name: (overrides, source shard bytes, fp8 source, steps)
    "tiny": ([], 1 << 20, False, ("hf_to_mcore", "mcore_to_hf")),
    "dsv3-shaped": (DSV3 + ["model.vocab_size=16384", "model.num_layers=2", "model.num_experts=8",
                            "model.moe_router_topk=2"], 512 << 20, False, ("hf_to_mcore", "mcore_to_hf")),
    "dsv3-fp8-20g": (DSV3 + ["model.vocab_size=129280", "model.num_layers=3", "model.num_experts=192",
                             "model.moe_router_topk=8"], 1 << 30, True, ("fp8_to_bf16",)),
    "dsv3-bf16-20g": (DSV3 + ["model.vocab_size=129280", "model.num_layers=8", "model.num_experts=24",
                              "model.moe_router_topk=8"], 2 << 30, False, ("hf_to_mcore",)),
}
OUTPUT = {"hf_to_mcore": "mcore", "mcore_to_hf": "back", "fp8_to_bf16": "bf16"}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def drop_caches(cold: bool) -> None:
    if cold:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1\n")


def run_parts(overrides: list[str], direction: str, src: Path, out: Path, shard_bytes: int, parts: int) -> dict:
    """The step split into ``parts`` processes running at once; wall time until the last ends (part 0, which
    finalizes), and each process's peak RSS."""
    procs = []
    t = time.perf_counter()
    for i in range(parts):
        arg = json.dumps({"preset": "tiny", "overrides": overrides, "direction": direction, "src": str(src),
                          "out": str(out), "shard_bytes": shard_bytes, "part": [i, parts]})
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, arg], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise RuntimeError(stderr[-3000:])
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    subprocess.run(["sync"], check=False)
    return {"seconds": time.perf_counter() - t, "peak_rss_mib": [round(r["peak_rss_mib"]) for r in results]}


def plain_copy(src: Path, dst: Path) -> float:
    dst.mkdir()
    t = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        shutil.copyfile(f, dst / f.name)
    subprocess.run(["sync"], check=False)
    return time.perf_counter() - t


def copy_row(size: str, src: Path, dst: Path, cold: bool, when: str) -> dict:
    drop_caches(cold)
    seconds = plain_copy(src, dst)
    shutil.rmtree(dst)
    nbytes = dir_bytes(src) / 1e9
    return {"size": size, "step": f"plain copy ({when})", "parts": None, "gb_read": nbytes, "gb_written": nbytes,
            "seconds": seconds, "peak_rss_mib": None}


def bench(size: str, work: Path, parts: int, cold: bool) -> list[dict]:
    from cookbook.config import load_config
    from cookbook.convert.synthetic import write_random_hf_checkpoint

    overrides, shard_bytes, fp8, steps = SIZES[size]
    cfg = load_config("tiny", overrides=overrides)
    t = time.perf_counter()
    src = write_random_hf_checkpoint(cfg.model, work / f"{size}-hf", max_shard_bytes=shard_bytes, fp8=fp8)
    print(f"{size}: wrote {dir_bytes(src) / 1e9:.1f} GB in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    largest = max(p.stat().st_size for p in src.glob("*.safetensors"))
    rows = [copy_row(size, src, work / f"{size}-copy", cold, "before")]
    step_src = src
    for direction in steps:
        out = work / f"{size}-{OUTPUT[direction]}"
        drop_caches(cold)
        result = run_parts(overrides, direction, step_src, out, shard_bytes, parts)
        rows.append({"size": size, "step": direction, "parts": parts, "gb_read": dir_bytes(step_src) / 1e9,
                     "gb_written": dir_bytes(out) / 1e9, **result})
        step_src = out
    for name in OUTPUT.values():
        shutil.rmtree(work / f"{size}-{name}", ignore_errors=True)
    rows.append(copy_row(size, src, work / f"{size}-copy", cold, "after"))
    # a cloud disk's throughput drifts (burst credits): the steps are compared with the mean of the copies around them
    copy_gb_s = sum(r["gb_read"] / r["seconds"] for r in rows if r["parts"] is None) / 2
    for row in rows:
        row["gb_per_s"] = row["gb_read"] / row["seconds"]
        row["vs_copy"] = row["gb_per_s"] / copy_gb_s  # per byte read, against the copy of the source
        row["vs_copy_written"] = row["gb_written"] / row["seconds"] / copy_gb_s  # per byte written
        # per byte moved (read + written): the copy moves each byte twice; the cast writes 1.83x what it reads
        row["vs_copy_moved"] = (row["gb_read"] + row["gb_written"]) / row["seconds"] / (2 * copy_gb_s)
        row["largest_shard_mib"] = largest / 2**20
    shutil.rmtree(src)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="", help="scratch folder on the disk to measure (default: a temp dir)")
    parser.add_argument("--sizes", default="tiny,dsv3-shaped", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--parts", type=int, default=1, help="processes per step, as the nodes of a job")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each step (root)")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    args = parser.parse_args()
    if args.cold and os.geteuid() != 0:
        parser.error("--cold writes /proc/sys/vm/drop_caches, which needs root; run without it")
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        parser.error(f"--sizes: unknown {unknown}; choose from {', '.join(SIZES)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for size in args.sizes.split(","):
            rows += bench(size, work, args.parts, args.cold)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print("| checkpoint | step | processes | GB read | GB written | s | GB/s read | vs plain copy (per byte read) "
          "| (per byte written) | (per byte moved) | peak RSS MiB per process | source shard MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rss = "-" if r["peak_rss_mib"] is None else " / ".join(str(x) for x in r["peak_rss_mib"])
        print(f"| {r['size']} | {r['step']} | {r['parts'] or 1} | {r['gb_read']:.2f} | {r['gb_written']:.2f} | "
              f"{r['seconds']:.1f} | {r['gb_per_s']:.3f} | {r['vs_copy']:.2f}x | {r['vs_copy_written']:.2f}x | "
              f"{r['vs_copy_moved']:.2f}x | {rss} | "
              f"{r['largest_shard_mib']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
