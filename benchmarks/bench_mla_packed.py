"""MLA attention on packed batches, the case RL training lives in: ``kernels.mla_attention`` against
FlexAttention with a document mask and against cuDNN SDPA (a loop over segments, and one padded batch), forward
and forward+backward, on one CUDA GPU (bf16, qk 192 / v 128, 16 heads).

    python3 benchmarks/bench_mla_packed.py OUT.json --lengths-from RUN/metrics.jsonl [--lengths-from ...]

Sequence lengths (prompt + response) are drawn from a run's logged distribution: each step's response-length
quantiles (``response/length_{min,p10,p50,p90,max}``, cookbook.grpo.loop) define a piecewise-linear inverse CDF,
a step is picked at random and a response length drawn from it, plus the step's mean prompt length. Sequences are
packed first-fit, in the order drawn, into rows of 4096 and of 16384 tokens (32768 tokens in all per case, as the
dense benchmark); a row's unused tail is left out of every implementation (no attention to or from padding).

- ours: one launch over the packed token axis (cu_seqlens).
- flex: ``torch.compile(flex_attention)`` over each row [1, h, row, d] with a causal + same-document BlockMask
  (rows processed as a batch of rows).
- cudnn loop: SDPA (cuDNN backend) per segment, [1, h, n, d] each.
- cudnn padded: the segments as one padded batch [num_seqs, h, longest, d] with is_causal (a real token never sees
  the padding after it, so the result is exact; the cost is the padding's compute).
Speed-up = the best baseline's time / ours. Correctness: each baseline's output against ours on the real tokens.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels.mla_attention as mla  # noqa: E402
from bench_mla_attention import DK, DV, bench, cu_of, flops, make  # noqa: E402

QUANTILES = ((0.0, "min"), (0.1, "p10"), (0.5, "p50"), (0.9, "p90"), (1.0, "max"))
TOTAL_TOKENS = 32768
HEADS = 16


def length_sampler(metrics_file: Path, seed: int = 0):
    """A function drawing sequence lengths (prompt + response) from the run's per-step distributions."""
    steps = []
    for i, line in enumerate(metrics_file.read_text().splitlines(), 1):
        row = json.loads(line)
        if "response/length_p50" not in row:
            continue
        steps.append(([row[f"response/length_{k}"] for _, k in QUANTILES], row["prompt/length_mean"]))
    if not steps:
        raise SystemExit(f"{metrics_file}: no step logs response/length_p50 (runs before this benchmark logged only "
                         "the mean); take a run that logged the quantiles")
    rng = random.Random(seed)

    def draw() -> int:
        qs, prompt = rng.choice(steps)
        u = rng.random()
        for (u0, _), (u1, _), a, b in zip(QUANTILES, QUANTILES[1:], qs, qs[1:]):
            if u <= u1:
                return max(1, round(prompt + a + (b - a) * (u - u0) / (u1 - u0)))
        return max(1, round(prompt + qs[-1]))
    return draw, len(steps)


def pack(draw, row_tokens: int, total: int) -> list[list[int]]:
    """First-fit packing, in drawing order, into total // row_tokens rows; a sequence longer than a row is cut."""
    rows: list[list[int]] = [[] for _ in range(total // row_tokens)]
    free = [row_tokens] * len(rows)
    misses = 0
    while misses < 50:
        n = min(draw(), row_tokens)
        fits = [i for i, f in enumerate(free) if f >= n]
        if not fits:
            misses += 1
            continue
        rows[fits[0]].append(n)
        free[fits[0]] -= n
    return rows


def time_ours(lens, config=None):
    q, k, v, do = make(lens, HEADS)
    cu, ms, scale = cu_of(lens), max(lens), DK ** -0.5
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out = mla.mla_attention(q, k, v, cu, ms, scale, config)
    fwd = bench(lambda: mla.mla_attention(q, k, v, cu, ms, scale, config))
    both = bench(lambda: mla.mla_attention(qg, kg, vg, cu, ms, scale, config).backward(do),
                 grad_to_none=[qg, kg, vg])
    return {"fwd": fwd, "fwd_bwd": both}, out


# --sweep: launch settings tried per kernel (the others at DEFAULT_CONFIG), (BLOCK rows, BLOCK cols, warps, stages)
SWEEP = {
    "fwd": ((128, 64, 8, 3), (128, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 1), (64, 32, 4, 2), (64, 64, 8, 2),
            (32, 32, 4, 1), (32, 32, 2, 2), (32, 16, 2, 1)),
    "dkdv": ((32, 64, 4, 3), (16, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2), (16, 32, 2, 2), (32, 64, 4, 1),
             (64, 64, 8, 2), (32, 32, 2, 1)),
    "dq": ((128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 1), (32, 32, 4, 1), (32, 32, 2, 2)),
}


def sweep(lens) -> list[dict]:
    """Ours under each setting of SWEEP: the forward's settings timed on the forward, the backward kernels' on
    forward+backward."""
    rows = []
    for kernel, candidates in SWEEP.items():
        for params in candidates:
            config = mla._with_params(mla.DEFAULT_CONFIG, kernel, params)
            try:
                times, _ = time_ours(lens, config)
            except Exception as err:  # noqa: BLE001 - a setting that does not fit is reported
                times = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            rows.append({"kernel": kernel, "params": params, **times})
            print("sweep", rows[-1], flush=True)
    return rows


def time_flex(rows, lens, ref):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v, do = make(lens, HEADS)
    row_tokens = max(sum(r) for r in rows)
    width = max(row_tokens, 128)
    doc = torch.full((len(rows), width), -1, dtype=torch.int32, device="cuda")
    place = []  # (row, position in the row, position in the packed axis, length) of each segment, in token order
    t = 0
    for r, row in enumerate(rows):
        pos = 0
        for i, n in enumerate(row):
            doc[r, pos:pos + n] = i
            place.append((r, pos, t, n))
            pos += n
            t += n

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & (doc[b, q_idx] >= 0) & (q_idx >= kv_idx)

    block_mask = create_block_mask(mask_mod, len(rows), None, width, width, device="cuda")

    def to_rows(x):
        out = x.new_zeros(len(rows), width, HEADS, x.shape[-1])
        for r, pos, t0, n in place:
            out[r, pos:pos + n] = x[t0:t0 + n]
        return out.transpose(1, 2).contiguous()

    qr, kr, vr, dor = (to_rows(x) for x in (q, k, v, do))
    compiled = torch.compile(flex_attention)
    qg, kg, vg = (x.clone().requires_grad_() for x in (qr, kr, vr))
    out_rows = compiled(qr, kr, vr, block_mask=block_mask, scale=DK ** -0.5)
    got = torch.cat([out_rows[r, :, pos:pos + n].transpose(0, 1) for r, pos, _, n in place])
    fwd = bench(lambda: compiled(qr, kr, vr, block_mask=block_mask, scale=DK ** -0.5))
    both = bench(lambda: compiled(qg, kg, vg, block_mask=block_mask, scale=DK ** -0.5).backward(dor),
                 grad_to_none=[qg, kg, vg])
    return {"fwd": fwd, "fwd_bwd": both, "max_abs_diff_vs_ours": float((got.float() - ref.float()).abs().max())}


def _cudnn():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.CUDNN_ATTENTION)


def time_cudnn_loop(lens, ref):
    q, k, v, do = make(lens, HEADS)
    bounds = cu_of(lens).tolist()
    segs = list(zip(bounds[:-1], bounds[1:]))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

    def run(qq, kk, vv):
        out = qq.new_empty(qq.shape[0], HEADS, DV)
        for s, e in segs:
            out[s:e] = F.scaled_dot_product_attention(*(x[s:e].transpose(0, 1).unsqueeze(0) for x in (qq, kk, vv)),
                                                      is_causal=True, scale=DK ** -0.5)[0].transpose(0, 1)
        return out

    with _cudnn():
        got = run(q, k, v)
        fwd = bench(lambda: run(q, k, v))
        both = bench(lambda: run(qg, kg, vg).backward(do), grad_to_none=[qg, kg, vg])
    return {"fwd": fwd, "fwd_bwd": both, "max_abs_diff_vs_ours": float((got.float() - ref.float()).abs().max())}


def time_cudnn_padded(lens, ref):
    q, k, v, do = make(lens, HEADS)
    longest = max(lens)
    index = torch.cat([torch.arange(n, device="cuda") + i * longest for i, n in enumerate(lens)])

    def padded(x):
        out = x.new_zeros(len(lens) * longest, HEADS, x.shape[-1])
        out[index] = x
        return out.view(len(lens), longest, HEADS, -1).transpose(1, 2)

    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

    def run(qq, kk, vv):
        out = F.scaled_dot_product_attention(padded(qq), padded(kk), padded(vv), is_causal=True, scale=DK ** -0.5)
        return out.transpose(1, 2).reshape(len(lens) * longest, HEADS, DV)[index]

    with _cudnn():
        got = run(q, k, v)
        fwd = bench(lambda: run(q, k, v))
        both = bench(lambda: run(qg, kg, vg).backward(do), grad_to_none=[qg, kg, vg])
    return {"fwd": fwd, "fwd_bwd": both, "max_abs_diff_vs_ours": float((got.float() - ref.float()).abs().max())}


def run_case(rows) -> dict:
    lens = [n for row in rows for n in row]
    f_fwd, f_bwd = flops(lens, HEADS)
    result = {"segments": len(lens), "tokens": sum(lens), "longest": max(lens), "mean": sum(lens) / len(lens),
              "tflop_fwd": f_fwd / 1e12, "tflop_bwd": f_bwd / 1e12}
    result["ours"], ref = time_ours(lens)
    for name, fn in (("flex", lambda: time_flex(rows, lens, ref)), ("cudnn loop", lambda: time_cudnn_loop(lens, ref)),
                     ("cudnn padded", lambda: time_cudnn_padded(lens, ref))):
        try:
            result[name] = fn()
        except Exception:  # noqa: BLE001 - a baseline that cannot run these shapes is reported, not hidden
            result[name] = {"error": traceback.format_exc()[-1500:]}
        print(name, result[name], flush=True)
    for phase in ("fwd", "fwd_bwd"):
        times = {k: v[phase] for k, v in result.items() if isinstance(v, dict) and phase in v and k != "ours"}
        if times:
            best = min(times, key=times.get)
            result[f"speedup_{phase}"] = {"vs": best, "x": times[best] / result["ours"][phase]}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--lengths-from", action="append", required=True, help="a run's metrics.jsonl (repeatable)")
    ap.add_argument("--rows", default="4096,16384")
    ap.add_argument("--sweep", action="store_true", help="also time ours under each launch setting of SWEEP")
    args = ap.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "heads": HEADS, "dk": DK, "dv": DV,
               "total_tokens": TOTAL_TOKENS, "cases": {}}
    for path in args.lengths_from:
        draw, steps = length_sampler(Path(path))
        for row_tokens in (int(r) for r in args.rows.split(",")):
            name = f"{Path(path).parent.name} rows of {row_tokens}"
            rows = pack(draw, row_tokens, TOTAL_TOKENS)
            results["cases"][name] = {"lengths_from": str(path), "steps": steps, **run_case(rows)}
            if args.sweep:
                results["cases"][name]["sweep"] = sweep([n for row in rows for n in row])
            print(name, json.dumps(results["cases"][name]), flush=True)
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    for name, case in results["cases"].items():
        line = [f"{name}: {case['segments']} segments (mean {case['mean']:.0f}, longest {case['longest']})"]
        for impl in ("ours", "flex", "cudnn loop", "cudnn padded"):
            r = case.get(impl, {})
            line.append(f"{impl} " + (f"{r['fwd']:.3f}/{r['fwd_bwd']:.3f} ms" if "fwd" in r else "error"))
        for phase in ("fwd", "fwd_bwd"):
            if f"speedup_{phase}" in case:
                s = case[f"speedup_{phase}"]
                line.append(f"{phase} {s['x']:.2f}x vs {s['vs']}")
        print("; ".join(line))


if __name__ == "__main__":
    main()
