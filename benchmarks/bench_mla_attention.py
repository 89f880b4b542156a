"""Benchmark of the MLA causal attention kernel (kernels/mla_attention.py) against torch SDPA, on one GPU.

    python benchmarks/bench_mla_attention.py [--sweep] [--out DIR]

Imports only torch, triton and the stdlib. Checks correctness first (bf16 vs the fp32 reference, fresh random
inputs, relative errors of out/dq/dk/dv), optionally sweeps block sizes / warps / stages of each kernel on the
main shape (and adopts the fastest), then times with ``triton.testing.do_bench`` (median) on three shapes:

* dense: batch 8 x seq 4096, 16 heads, qk 192 (128 + 64), v 128, bf16, causal (targets: fwd <= 1.0 ms,
  fwd+bwd <= 4.5 ms);
* DeepSeek-V3 heads: batch 1 x seq 4096, 128 heads;
* varlen: 8 segments of random lengths summing to 32768, 16 heads.

Baselines in the same process: ``F.scaled_dot_product_attention(is_causal=True)`` on [b, h, s, d] (each SDPA
backend that accepts the shapes, and the default dispatch); for varlen a loop of SDPA over the segments (what
cookbook/megatron/attention.py does without the kernel). FLOPs count causal pairs n(n+1)/2 per segment: forward
2·P·h·(dk + dv), backward 2·P·h·(3·dk + 2·dv); the floor is those FLOPs at 800 TFLOP/s.
Writes results.json and results.md into --out (default $OUT or .), and prints a short table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import mla_attention as mla  # noqa: E402
from kernels.mla_attention_reference import mla_attention_reference  # noqa: E402

PEAK_TFLOPS = 800.0  # bf16 dense matmul measured on the H100 test machine
DK, DV = 192, 128
DEVICE = "cuda"


def log(*args):
    print(*args, flush=True)


def cu_of(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def flops(lens, heads, dk=DK, dv=DV):
    pairs = sum(n * (n + 1) // 2 for n in lens)
    return 2 * pairs * heads * (dk + dv), 2 * pairs * heads * (3 * dk + 2 * dv)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def make(lens, heads, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    t = sum(lens)
    q = torch.randn(t, heads, DK, device=DEVICE, dtype=dtype, generator=g)
    k = torch.randn(t, heads, DK, device=DEVICE, dtype=dtype, generator=g)
    v = torch.randn(t, heads, DV, device=DEVICE, dtype=dtype, generator=g)
    do = torch.randn(t, heads, DV, device=DEVICE, dtype=dtype, generator=g)
    return q, k, v, do


def bench(fn, grad_to_none=None):
    return do_bench(fn, warmup=25, rep=150, grad_to_none=grad_to_none, return_mode="median")


def resources(name):
    k = mla.LAST_LAUNCHED.get(name)
    if k is None:
        return {}
    out = {}
    for attr in ("n_regs", "n_spills"):
        if hasattr(k, attr):
            out[attr] = getattr(k, attr)
    shared = getattr(getattr(k, "metadata", None), "shared", None)
    if shared is not None:
        out["shared"] = shared
    return out


# ---------------------------------------------------------------------------------------------------------------
def check(config, lens=(1000, 37, 2048, 515), heads=16, seed=0):
    """bf16 kernel vs fp32 reference: relative errors of out, dq, dk, dv."""
    q, k, v, do = make(list(lens), heads, seed=seed)
    cu = cu_of(lens)
    scale = DK ** -0.5
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    out = mla.mla_attention(qs, ks, vs, cu, max(lens), scale, config=config)
    out.backward(do)
    qr, kr, vr = (x.float().requires_grad_() for x in (q, k, v))
    ref = mla_attention_reference(qr, kr, vr, cu, scale, compute_dtype=torch.float32)
    ref.backward(do.float())
    got = (out, qs.grad, ks.grad, vs.grad)
    want = (ref, qr.grad, kr.grad, vr.grad)
    errs = {n: rel(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
    errs["finite"] = all(bool(torch.isfinite(a).all()) for a in got)
    return errs


# ---------------------------------------------------------------------------------------------------------------
def time_ours(lens, heads, config, parts=False):
    q, k, v, do = make(lens, heads)
    cu = cu_of(lens)
    ms = max(lens)
    scale = DK ** -0.5
    res = {}
    res["fwd"] = bench(lambda: mla.mla_attention_forward(q, k, v, cu, ms, scale, config))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

    def fwd_bwd():
        mla.mla_attention(qg, kg, vg, cu, ms, scale, config=config).backward(do)

    res["fwd_bwd"] = bench(fwd_bwd, grad_to_none=[qg, kg, vg])
    if parts:
        out, lse = mla.mla_attention_forward(q, k, v, cu, ms, scale, config)
        delta = mla.bwd_preprocess(out, do)
        res["bwd"] = bench(lambda: mla.mla_attention_backward(do, q, k, v, out, lse, cu, ms, scale, config))
        res["preprocess"] = bench(lambda: mla.bwd_preprocess(out, do))
        res["dkdv"] = bench(lambda: mla.bwd_dkdv(q, k, v, do, lse, delta, cu, ms, scale, config))
        if not config.dq_atomic:
            res["dq"] = bench(lambda: mla.bwd_dq(q, k, v, do, lse, delta, cu, ms, scale, config))
        res["resources"] = {name: resources(name) for name in mla.LAST_LAUNCHED}
    return res


def sdpa_backends():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {"default": None}
    return {"default": None, "cudnn": (sdpa_kernel, SDPBackend.CUDNN_ATTENTION),
            "efficient": (sdpa_kernel, SDPBackend.EFFICIENT_ATTENTION), "flash": (sdpa_kernel, SDPBackend.FLASH_ATTENTION)}


def time_sdpa_dense(batch, seq, heads):
    """SDPA on [b, h, s, d] contiguous, is_causal=True, per backend."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    q = torch.randn(batch, heads, seq, DK, device=DEVICE, dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, heads, seq, DK, device=DEVICE, dtype=torch.bfloat16, generator=g)
    v = torch.randn(batch, heads, seq, DV, device=DEVICE, dtype=torch.bfloat16, generator=g)
    do = torch.randn(batch, heads, seq, DV, device=DEVICE, dtype=torch.bfloat16, generator=g)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    results = {}
    for name, ctx in sdpa_backends().items():
        def enter():
            return ctx[0](ctx[1]) if ctx else _Null()
        try:
            with enter():
                fwd = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))

                def fb():
                    F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(do)
                fb()
                both = bench(fb, grad_to_none=[qg, kg, vg])
            results[name] = {"fwd": fwd, "fwd_bwd": both}
        except Exception as exc:  # backend refuses these shapes
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}
    return results


def time_sdpa_varlen(lens, heads):
    """A loop of SDPA over the segments ([1, h, n, d] each), as cookbook/megatron/attention.py does on GPU
    without the kernel."""
    q, k, v, do = make(lens, heads, seed=2)
    bounds = cu_of(lens).tolist()
    segs = list(zip(bounds[:-1], bounds[1:]))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

    def run(qq, kk, vv):
        out = qq.new_empty(qq.shape[0], heads, DV)
        for s, e in segs:
            out[s:e] = F.scaled_dot_product_attention(*(x[s:e].transpose(0, 1).unsqueeze(0) for x in (qq, kk, vv)),
                                                      is_causal=True)[0].transpose(0, 1)
        return out

    fwd = bench(lambda: run(q, k, v))
    both = bench(lambda: run(qg, kg, vg).backward(do), grad_to_none=[qg, kg, vg])
    return {"default (loop)": {"fwd": fwd, "fwd_bwd": both}}


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---------------------------------------------------------------------------------------------------------------
def _f(bm, bn, w, st, lazy=False, tma=False, pipe=False):
    return dict(BLOCK_M=bm, BLOCK_N=bn, fwd_warps=w, fwd_stages=st, fwd_lazy=lazy, fwd_tma=tma, fwd_pipeline=pipe)


def _kv(bm, bn, w, st, tma=False, atomic=False):
    return dict(BLOCK_M1=bm, BLOCK_N1=bn, dkdv_warps=w, dkdv_stages=st, dkdv_tma=tma, dq_atomic=atomic)


def _q(bm, bn, w, st, tma=False):
    return dict(BLOCK_M2=bm, BLOCK_N2=bn, dq_warps=w, dq_stages=st, dq_tma=tma)


# Run 1 (H100): fwd best (128, 64, 8, 3) 1.57 ms; dkdv (32, 64, 4, 3) 3.04 / (32, 128, 8, 3) 3.09 ms;
# dq (128, 64, 8, 3) 1.89 ms; atomic dQ 7.0 ms and more. Run 2: TMA descriptors slower in all three kernels
# (fwd 1.60 vs 1.51, dkdv 3.11 vs 3.08, dq 2.08 vs 1.88), lazy rescaling slower (1.63), 16 warps in dkdv
# 6.9 ms and more. Run 3: the software-pipelined forward, 256-row forward blocks, stage counts.
FWD_SWEEP = [_f(128, 64, 8, 3), _f(128, 64, 8, 3, pipe=True), _f(128, 32, 8, 3, pipe=True),
             _f(128, 64, 8, 2, pipe=True), _f(128, 32, 8, 4, pipe=True), _f(256, 64, 16, 2), _f(256, 32, 16, 3),
             _f(128, 64, 8, 3, pipe=True, tma=True), _f(128, 64, 8, 3, pipe=True, lazy=True)]
DKDV_SWEEP = [_kv(32, 64, 4, 3), _kv(32, 64, 4, 4), _kv(32, 64, 4, 2), _kv(16, 64, 4, 4), _kv(32, 128, 8, 3)]
DQ_SWEEP = [_q(128, 64, 8, 3), _q(128, 32, 8, 4), _q(64, 64, 4, 4), _q(64, 32, 4, 4)]


def sweep(lens, heads, base, records, save=lambda: None):
    """Times each kernel alone under each variant; returns the config made of the fastest of each."""
    q, k, v, do = make(lens, heads, seed=3)
    cu = cu_of(lens)
    ms = max(lens)
    scale = DK ** -0.5
    out, lse = mla.mla_attention_forward(q, k, v, cu, ms, scale, base)
    delta = mla.bwd_preprocess(out, do)
    kernels = {"fwd": (FWD_SWEEP, lambda c: mla.mla_attention_forward(q, k, v, cu, ms, scale, c), "mla_fwd_kernel"),
               "dkdv": (DKDV_SWEEP, lambda c: mla.bwd_dkdv(q, k, v, do, lse, delta, cu, ms, scale, c),
                        "mla_bwd_dkdv_kernel"),
               "dq": (DQ_SWEEP, lambda c: mla.bwd_dq(q, k, v, do, lse, delta, cu, ms, scale, c), "mla_bwd_dq_kernel")}
    timed = {kind: [] for kind in kernels}
    for kind, (variants, fn, res_name) in kernels.items():
        for over in variants:
            cfg = replace(base, **over)
            try:
                fn(cfg)
                torch.cuda.synchronize()
                rec = {"kind": kind, "config": over, "ms": bench(lambda: fn(cfg)), **resources(res_name)}
                timed[kind].append((rec["ms"], over))
            except Exception as exc:
                rec = {"kind": kind, "config": over, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            records.append(rec)
            save()
            log(f"  sweep {kind:5s} {over} -> {rec.get('ms', rec.get('error'))} regs {rec.get('n_regs', '')} "
                f"spills {rec.get('n_spills', '')} smem {rec.get('shared', '')}")
    tuned = base
    for kind, rows in timed.items():
        if rows:
            tuned = replace(tuned, **min(rows, key=lambda r: r[0])[1])
    return tuned


# ---------------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="sweep block sizes / warps / stages and adopt the fastest")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-deepseek", action="store_true")
    ap.add_argument("--small", action="store_true", help="small shapes (a smoke test of this script)")
    args = ap.parse_args()
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    t_start = time.time()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
    log(json.dumps(info))
    results = {"info": info, "default_config": asdict(mla.DEFAULT_CONFIG), "checks": {}, "sweep": [], "timings": {}}

    def save():
        (outdir / "results.json").write_text(json.dumps(results, indent=1, default=str))

    dense = [4096] * 8
    random_gen = torch.Generator().manual_seed(1234)
    cuts = sorted(torch.randperm(32767, generator=random_gen)[:7].add(1).tolist())
    varlen = [b - a for a, b in zip([0] + cuts, cuts + [32768])]
    shapes = {"dense b8 s4096 h16": (dense, 16, ("dense", 8, 4096)),
              "deepseek b1 s4096 h128": ([4096], 128, ("dense", 1, 4096)),
              "varlen 8 segs (sum 32768) h16": (varlen, 16, ("varlen",))}
    if args.skip_deepseek:
        shapes.pop("deepseek b1 s4096 h128")
    if args.small:
        dense, varlen = [256] * 2, [100, 300, 17, 95]
        shapes = {"dense b2 s256 h4": (dense, 4, ("dense", 2, 256)), "varlen 4 segs h4": (varlen, 4, ("varlen",))}
    results["varlen_lens"] = varlen

    def check_config(name, cfg):
        for case, kw in ((name, dict(seed=10)), (name + " (128 heads)", dict(lens=(700, 300), heads=128, seed=11))):
            try:
                if args.small:
                    kw = dict(lens=(100, 37, 90), heads=2, seed=kw["seed"])
                results["checks"][case] = check(cfg, **kw)
            except Exception:
                results["checks"][case] = {"error": traceback.format_exc()[-2000:]}
            log(f"check {case}: {results['checks'][case]}")
        save()

    def time_config(name, cfg, with_sdpa):
        for shape, (lens, heads, base) in shapes.items():
            f_fwd, f_bwd = flops(lens, heads)
            entry = results["timings"].setdefault(shape, {
                "heads": heads, "tflop_fwd": f_fwd / 1e12, "tflop_bwd": f_bwd / 1e12,
                "floor_fwd_ms": f_fwd / PEAK_TFLOPS / 1e9, "floor_fwd_bwd_ms": (f_fwd + f_bwd) / PEAK_TFLOPS / 1e9,
                "ours": {}, "sdpa": {}})
            try:
                entry["ours"][name] = time_ours(lens, heads, cfg, parts=True)
            except Exception:
                entry["ours"][name] = {"error": traceback.format_exc()[-1500:]}
            log(f"{shape} ours[{name}]: {entry['ours'][name]}  ({time.time() - t_start:.0f}s)")
            if with_sdpa:
                try:
                    entry["sdpa"] = time_sdpa_dense(base[1], base[2], heads) if base[0] == "dense" else \
                        time_sdpa_varlen(lens, heads)
                except Exception:
                    entry["sdpa"] = {"error": {"error": traceback.format_exc()[-1500:]}}
                log(f"{shape} sdpa: {entry['sdpa']}  ({time.time() - t_start:.0f}s)")
            save()
            torch.cuda.empty_cache()

    check_config("default", mla.DEFAULT_CONFIG)
    time_config("default", mla.DEFAULT_CONFIG, with_sdpa=True)
    if args.sweep:
        log("sweep on batch 8 x seq 4096, 16 heads")
        tuned = sweep(dense, 4 if args.small else 16, mla.DEFAULT_CONFIG, results["sweep"], save)
        log(f"tuned: {tuned}  ({time.time() - t_start:.0f}s)")
        if tuned != mla.DEFAULT_CONFIG:
            results["tuned_config"] = asdict(tuned)
            check_config("tuned", tuned)
            time_config("tuned", tuned, with_sdpa=False)

    # ---- tables ----
    lines = [f"device: {info['device']}, torch {info['torch']}, triton {info['triton']}, {info['date']}", ""]
    lines.append("correctness (bf16 kernel vs fp32 reference, ||a-b||/||b||):")
    lines.append("| config | case | out | dq | dk | dv |")
    lines.append("|---|---|---|---|---|---|")
    for name, e in results["checks"].items():
        if "out" in e:
            lines.append(f"| {name.split(' ')[0]} | {name[len(name.split(' ')[0]):].strip() or 'lens 1000,37,2048,515 h16'}"
                         f" | {e['out']:.2e} | {e['dq']:.2e} | {e['dk']:.2e} | {e['dv']:.2e} |")
        else:
            lines.append(f"| {name} | error | | | | |")
    lines.append("")
    lines.append("| shape | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | vs best SDPA fwd / fwd+bwd |")
    lines.append("|---|---|---|---|---|---|---|")
    for shape, entry in results["timings"].items():
        ok = {n: r for n, r in entry["sdpa"].items() if isinstance(r, dict) and "fwd" in r}
        best_f = min((r["fwd"] for r in ok.values()), default=float("nan"))
        best_b = min((r["fwd_bwd"] for r in ok.values()), default=float("nan"))
        f_fwd, f_all = entry["tflop_fwd"], entry["tflop_fwd"] + entry["tflop_bwd"]
        rows = [(f"ours[{n}]", r) for n, r in entry["ours"].items()] + [(f"sdpa[{n}]", r) for n, r in ok.items()]
        for impl, r in rows:
            if "fwd" not in r:
                lines.append(f"| {shape} | {impl} | error | | | | |")
                continue
            lines.append(f"| {shape} | {impl} | {r['fwd']:.3f} | {f_fwd / r['fwd'] * 1e3:.0f} | {r['fwd_bwd']:.3f} | "
                         f"{f_all / r['fwd_bwd'] * 1e3:.0f} | {best_f / r['fwd']:.2f}x / {best_b / r['fwd_bwd']:.2f}x |")
        lines.append(f"| {shape} | floor (800 TFLOP/s) | {entry['floor_fwd_ms']:.3f} | | {entry['floor_fwd_bwd_ms']:.3f} | | |")
        for n, r in entry["ours"].items():
            if "dkdv" in r:
                lines.append(f"| {shape} | ours[{n}] parts | bwd {r['bwd']:.3f} = pre {r['preprocess']:.3f} + dkdv "
                             f"{r['dkdv']:.3f} + dq {r.get('dq', float('nan')):.3f} | | | | |")
    table = "\n".join(lines)
    (outdir / "results.md").write_text(table + "\n")
    save()
    log(f"\ntotal {time.time() - t_start:.0f}s\n")
    log(table)


if __name__ == "__main__":
    main()
