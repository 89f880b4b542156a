"""Fused GRPO loss (kernels/grpo_loss.py) against torch eager, forward + backward, on one CUDA GPU.

    python3 benchmarks/bench_grpo_loss.py [--out DIR] [--quick]

Cases (bf16 inputs, fp32 loss math, median of triton.testing.do_bench):
  moonlight   fused linear: 16384 tokens, hidden 2048, vocab 163840 (targets: <= 60 ms, <= 2.5 GiB extra)
  logits      from logits already in memory: 16384 x 163840 bf16
  dsv3        fused linear: hidden 7168, vocab 129280, 4096 and 16384 tokens
  liger       the Moonlight shape through Liger-Kernel's LigerFusedLinearGRPOLoss (when liger_kernel imports;
              8 sequences x 2048 tokens, loss_type "dapo" = token mean, no KL), checked against ours
Eager baseline: (h @ W.T).float(), log_softmax, gather, clipped-ratio loss, backward (the same loss settings:
temperature 1, clip 0.2/0.2, clamp 10, cap 3, no KL). Before timing, the Triton kernels' launch settings and
the token chunk are swept (kernel alone / whole call) and the best are used. Peak extra memory = peak
allocated during one forward+backward minus what was allocated before it (inputs), gradients included.
Imports only torch, triton and the standard library (plus this repository's kernels package, and
liger_kernel when it is installed).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import kernels.grpo_loss as K  # noqa: E402

GiB = 1 << 30
LOSS_KW = dict(temperature=1.0, clip_low=0.2, clip_high=0.2, logratio_clamp=10.0, loss_cap=3.0)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_tokens(n: int, v: int, g: torch.Generator):
    f = dict(device="cuda", generator=g)
    return dict(targets=torch.randint(0, v, (n,), **f), old=-torch.rand(n, **f) * 8 - 0.5,
                adv=torch.randn(n, **f), mask=torch.rand(n, **f) > 0.1)


def eager_loss_from_logits(logits, t, normalizer):
    logp_all = torch.log_softmax(logits.float(), dim=-1)  # temperature 1: no division (the baseline has none)
    logp = logp_all.gather(-1, t["targets"][:, None]).squeeze(-1)
    ratio = torch.exp((logp - t["old"]).clamp(max=LOSS_KW["logratio_clamp"]))
    adv = t["adv"]
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - LOSS_KW["clip_low"], 1 + LOSS_KW["clip_high"]))
    pg = pg.clamp(max=LOSS_KW["loss_cap"])
    loss = torch.where(t["mask"], pg, 0.0).sum() / normalizer
    return loss, logp.detach()


def peak_extra(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GiB


def bench(fn, grads=(), rep=600) -> float:
    return float(do_bench(fn, warmup=100, rep=rep, grad_to_none=list(grads), return_mode="median"))


def fused_case(name, n, h, v, results, rows, eager_n=None, chunks=(None,), rep=600):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(n, h, device="cuda", generator=g)).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=g) / math.sqrt(h) * 2).bfloat16().requires_grad_()
    t = make_tokens(n, v, g)
    norm = float(t["mask"].sum())

    def ours(chunk):
        def fn():
            loss, logp, ent = K.fused_linear_grpo_loss(hidden, weight, t["targets"], t["old"], t["adv"], t["mask"],
                                                       normalizer=norm, chunk_size=chunk, **LOSS_KW)
            loss.backward()
            return logp
        return fn

    best = None
    for chunk in chunks:
        hidden.grad = weight.grad = None
        fn = ours(chunk)
        fn()
        hidden.grad = weight.grad = None
        mem = peak_extra(fn)
        ms = bench(fn, (hidden, weight), rep)
        c_eff = chunk or K._auto_chunk(n, v, 2)
        rows.append((name, f"fused (chunk {c_eff})", n, ms, mem))
        results[f"{name}/fused/chunk{c_eff}"] = dict(ms=ms, peak_extra_gib=mem)
        if best is None or ms < best[1]:
            best = (chunk, ms, mem)
    # forward only (old/ref log-probs): no grad
    with torch.no_grad():
        ms_fwd = bench(lambda: K.fused_linear_grpo_loss(hidden, weight, t["targets"], t["old"], t["adv"], t["mask"],
                                                         normalizer=norm, chunk_size=best[0], **LOSS_KW), rep=rep)
    results[f"{name}/fused/forward_only_ms"] = ms_fwd
    rows.append((name, "fused, forward only (no grad)", n, ms_fwd, float("nan")))
    # GEMMs alone at the same chunking (what the Triton kernels add on top), and each kind on its own
    chunk = best[0] or K._auto_chunk(n, v, 2)
    buf = torch.empty(chunk, v, device="cuda", dtype=torch.bfloat16).normal_()
    dh = torch.empty_like(hidden)
    dw = torch.empty(v, h, device="cuda", dtype=torch.bfloat16 if n <= chunk else torch.float32)
    hd, wd = hidden.detach(), weight.detach()
    spans = [(r0, min(n, r0 + chunk)) for r0 in range(0, n, chunk)]

    def gemm_logits():
        for r0, r1 in spans:
            torch.mm(hd[r0:r1], wd.t(), out=buf[: r1 - r0])

    def gemm_dh():
        for r0, r1 in spans:
            torch.mm(buf[: r1 - r0], wd, out=dh[r0:r1])

    def gemm_dw():
        for r0, r1 in spans:
            K._accumulate_dw(dw, buf[: r1 - r0], hd[r0:r1], first=r0 == 0)
    parts = {k: bench(f, rep=rep) for k, f in (("logits", gemm_logits), ("dH", gemm_dh), ("dW", gemm_dw))}
    ms_gemm = sum(parts.values())
    flop = 2 * n * h * v
    results[f"{name}/gemms_ms"] = parts
    results[f"{name}/gemm_tflops"] = {k: flop / ms / 1e9 for k, ms in parts.items()}
    rows.append((name, f"3 GEMMs alone (chunk {chunk}; " + ", ".join(
        f"{k} {flop / ms / 1e9:.0f}" for k, ms in parts.items()) + " TFLOP/s)", n, ms_gemm, float("nan")))
    rows.append((name, "floor: 3 GEMMs at 800 TFLOP/s", n, 3 * flop / 800e9, float("nan")))
    del buf, dh, dw
    # accuracy of ours vs eager (same bf16 logits rounding) on the first rows
    hidden.grad = weight.grad = None
    logp = ours(best[0])()
    dh_ours, dw_ours = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    en = eager_n or n
    sub = {k: x[:en] for k, x in t.items()}
    hsub = hidden.detach()[:en].clone().requires_grad_()

    def eager():
        loss, lp = eager_loss_from_logits(hsub @ weight.t(), sub, norm)
        loss.backward()
        return lp
    torch.cuda.empty_cache()
    try:
        lp_e = eager()
        acc = dict(logp=rel(logp[:en], lp_e), dh=rel(dh_ours[:en], hsub.grad))
        if en == n:
            acc["dw"] = rel(dw_ours, weight.grad)
        results[f"{name}/rel_err_vs_eager"] = acc
        hsub.grad = weight.grad = None
        mem_e = peak_extra(eager)
        ms_e = bench(eager, (hsub, weight), max(rep, 800))
        rows.append((name, "torch eager" + ("" if en == n else f" ({en} tokens)"), en, ms_e, mem_e))
        results[f"{name}/eager"] = dict(ms=ms_e, peak_extra_gib=mem_e, tokens=en)
        scale = n / en
        results[f"{name}/speedup_vs_eager"] = ms_e * scale / best[1]
        results[f"{name}/memory_ratio_vs_eager"] = mem_e * scale / best[2]
    except torch.OutOfMemoryError as e:
        results[f"{name}/eager"] = f"OOM: {e}"[:300]
        rows.append((name, "torch eager: OOM", en, float("nan"), float("nan")))
    hidden.grad = weight.grad = hsub.grad = None
    del hidden, weight, hsub
    torch.cuda.empty_cache()
    return best


def sweep_kernels(results, rows, n=16384, v=163840):
    """Launch settings of the two Triton kernels, kernel alone, on bf16 logits."""
    g = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.randn(n, v, device="cuda", generator=g, dtype=torch.bfloat16) * 3
    t = make_tokens(n, v, g)
    cfg = K._Cfg(n, t["targets"], t["old"], t["adv"], t["mask"], None, None, temperature=1.0, clip_low=0.2,
                 clip_high=0.2, logratio_clamp=10.0, loss_cap=3.0, normalizer=float(n), kl_coef=0.0,
                 kl_estimator="k3", entropy_coef=0.0, aggregation="token_mean")
    tok = K._prep_token_inputs(logits.device, t["targets"], t["old"], t["adv"], t["mask"], None, None, cfg)
    out = K._alloc_token_outputs(n, logits.device)
    one = torch.ones(1, device="cuda")
    gb = n * v * 2 / 1e9
    best_f = best_b = None
    for bv in (2048, 4096, 8192, 16384):
        for w in (4, 8, 16):
            K.FWD_BLOCK_V, K.FWD_WARPS = bv, w
            try:
                ms = bench(lambda: K._launch_fwd(logits, tok, cfg, out, 0, n), rep=200)
            except Exception as e:  # noqa: BLE001 (resources exceeded for a setting)
                results[f"sweep/fwd/{bv}x{w}"] = str(e)[:200]
                continue
            results[f"sweep/fwd/{bv}x{w}"] = ms
            if best_f is None or ms < best_f[2]:
                best_f = (bv, w, ms)
    dl = torch.empty_like(logits)
    for bv in (2048, 4096, 8192):
        for per in (1, 4, 64):
            for w in (4, 8):
                K.BWD_BLOCK_V, K.BWD_BLOCKS_PER_PROGRAM, K.BWD_WARPS, K.BWD_EVICT_FIRST = bv, per, w, False
                ms = bench(lambda: K._launch_dlogits(logits, dl, tok, cfg, out, one, 0, n), rep=200)
                results[f"sweep/bwd/{bv}x{per}x{w}"] = ms
                if best_b is None or ms < best_b[-1]:
                    best_b = (bv, per, w, False, ms)
    K.BWD_BLOCK_V, K.BWD_BLOCKS_PER_PROGRAM, K.BWD_WARPS, K.BWD_EVICT_FIRST = best_b[:3] + (True,)
    ms = bench(lambda: K._launch_dlogits(logits, dl, tok, cfg, out, one, 0, n), rep=200)
    results["sweep/bwd/best_evict_first"] = ms
    if ms < best_b[-1]:
        best_b = best_b[:3] + (True, ms)
    ms = bench(lambda: K._launch_dlogits(logits, logits, tok, cfg, out, one, 0, n), rep=200)  # in place
    results["sweep/bwd/best_in_place"] = ms
    K.FWD_BLOCK_V, K.FWD_WARPS = best_f[:2]
    K.BWD_BLOCK_V, K.BWD_BLOCKS_PER_PROGRAM, K.BWD_WARPS, K.BWD_EVICT_FIRST = best_b[:4]
    results["sweep/best"] = dict(fwd=best_f, bwd=best_b)
    rows.append(("kernels", f"fwd stats kernel alone (block {best_f[0]}, {best_f[1]} warps): "
                 f"{gb / best_f[2]:.2f} TB/s", n, best_f[2], float("nan")))
    rows.append(("kernels", f"dlogits kernel alone (block {best_b[0]} x{best_b[1]}, {best_b[2]} warps, "
                 f"evict_first {best_b[3]}): {2 * gb / best_b[-1]:.2f} TB/s", n, best_b[-1], float("nan")))
    # copy ceiling for reference
    ms_copy = bench(lambda: dl.copy_(logits), rep=200)
    results["copy_TBps"] = 2 * gb / ms_copy
    rows.append(("kernels", f"device copy of the logits ({2 * gb / ms_copy:.2f} TB/s)", n, ms_copy, float("nan")))
    del logits, dl
    torch.cuda.empty_cache()


def logits_case(results, rows, n=16384, v=163840, rep=600):
    g = torch.Generator(device="cuda").manual_seed(2)
    logits = (torch.randn(n, v, device="cuda", generator=g, dtype=torch.bfloat16) * 3).requires_grad_()
    t = make_tokens(n, v, g)
    norm = float(t["mask"].sum())

    def ours(inplace=False):
        def fn():
            loss, logp, _ = K.grpo_loss_from_logits(logits, t["targets"], t["old"], t["adv"], t["mask"],
                                                    normalizer=norm, inplace_backward=inplace, **LOSS_KW)
            loss.backward()
            return logp
        return fn

    def eager():
        loss, lp = eager_loss_from_logits(logits, t, norm)
        loss.backward()
        return lp
    lp_o = ours()()
    g_o = logits.grad.clone()
    logits.grad = None
    lp_e = eager()
    results["logits/rel_err_vs_eager"] = dict(logp=rel(lp_o, lp_e), dlogits=rel(g_o, logits.grad))
    del g_o
    logits.grad = None
    for label, fn in (("from-logits kernel", ours()), ("torch eager from logits", eager)):
        logits.grad = None
        mem = peak_extra(fn)
        ms = bench(fn, (logits,), rep)
        rows.append(("logits", label, n, ms, mem))
        results[f"logits/{label}"] = dict(ms=ms, peak_extra_gib=mem)
    results["logits/speedup_vs_eager"] = (results["logits/torch eager from logits"]["ms"]
                                          / results["logits/from-logits kernel"]["ms"])
    # in-place backward: the logits buffer is overwritten (values garbage afterwards). Measured with
    # torch.autograd.grad: a leaf's .grad would get a copy of the aliased gradient, a real (non-leaf) logits
    # tensor hands it on to the output layer's backward without one.
    logits.grad = None

    def inplace():
        loss, _, _ = K.grpo_loss_from_logits(logits, t["targets"], t["old"], t["adv"], t["mask"],
                                             normalizer=norm, inplace_backward=True, **LOSS_KW)
        (gr,) = torch.autograd.grad(loss, logits)
        return gr
    mem = peak_extra(inplace)
    rows.append(("logits", "from-logits kernel, inplace_backward (autograd.grad; memory)", n, float("nan"), mem))
    results["logits/inplace_peak_extra_gib"] = mem
    with torch.no_grad():
        ms_f = bench(lambda: K.grpo_loss_from_logits(logits, t["targets"], t["old"], t["adv"], t["mask"],
                                                      normalizer=norm, **LOSS_KW), rep=rep)
    rows.append(("logits", "from-logits kernel, forward only", n, ms_f, float("nan")))
    results["logits/forward_only_ms"] = ms_f
    logits.grad = None
    del logits
    torch.cuda.empty_cache()


def check_addmm_fp32_out(results):
    a = torch.randn(3000, 512, device="cuda").bfloat16()
    b = torch.randn(3000, 256, device="cuda").bfloat16()
    c = torch.randn(512, 256, device="cuda")
    want = c + a.float().t() @ b.float()
    try:
        torch.addmm(c, a.t(), b, out_dtype=torch.float32, out=c)
        results["addmm_out_dtype_fp32_rel_err"] = rel(c, want)
    except Exception as e:  # noqa: BLE001
        results["addmm_out_dtype_fp32_rel_err"] = f"unsupported: {e}"[:200]


def fp32_reference(hidden, weight, tok, norm, rows_per_chunk=2048):
    """Loss, dH and dW of the same GRPO loss in fp32 autograd (the bf16 inputs upcast), chunked over tokens."""
    wf = weight.float().requires_grad_()
    dh = torch.empty(hidden.shape, device="cuda", dtype=torch.float32)
    total = torch.zeros((), device="cuda", dtype=torch.float64)
    for r0 in range(0, hidden.shape[0], rows_per_chunk):
        part = {k: x[r0:r0 + rows_per_chunk] for k, x in tok.items()}
        hc = hidden[r0:r0 + rows_per_chunk].float().requires_grad_()
        loss, _ = eager_loss_from_logits(hc @ wf.t(), part, norm)
        loss.backward()
        dh[r0:r0 + rows_per_chunk] = hc.grad
        total += loss.detach()
    return total.float(), dh, wf.grad


def liger_case(results, rows, b=8, t=2048, h=2048, v=163840, rep=600) -> None:
    """The peer: Liger's fused linear GRPO loss at the Moonlight shape; both checked against fp32 autograd.

    Liger has no log-ratio clamp or loss cap; on these inputs neither binds (the ratios are far below
    e^10 and the per-token losses far below 3), so both compute the same token-mean clipped loss."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        import liger_kernel
    except ImportError as e:
        results["liger"] = f"not installed: skipped ({e})"
        return
    results["liger"] = getattr(liger_kernel, "__version__", "installed")
    g = torch.Generator(device="cuda").manual_seed(1)
    n = b * t
    hidden = torch.randn(b, t, h, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=g) / math.sqrt(h) * 2).bfloat16().requires_grad_()
    tok = make_tokens(n, v, g)
    adv_seq = torch.randn(b, device="cuda", generator=g)
    tok["adv"] = adv_seq.repeat_interleave(t)
    norm = float(tok["mask"].sum())
    peer = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=LOSS_KW["clip_low"],
                                    epsilon_high=LOSS_KW["clip_high"], loss_type="dapo", temperature=1.0)

    def liger():
        out = peer(hidden, weight, tok["targets"].view(b, t), tok["mask"].view(b, t).long(), adv_seq,
                   old_per_token_logps=tok["old"].view(b, t))
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss.detach()

    def ours():
        loss, _, _ = K.fused_linear_grpo_loss(hidden.view(n, h), weight, tok["targets"], tok["old"], tok["adv"],
                                              tok["mask"], normalizer=norm, **LOSS_KW)
        loss.backward()
        return loss.detach()

    ref = fp32_reference(hidden.detach().view(n, h), weight.detach(), tok, norm)
    for label, fn in (("peer", liger), ("ours", ours)):
        hidden.grad = weight.grad = None
        loss = fn()
        results[f"liger/{label}_rel_err_vs_fp32"] = dict(
            loss=rel(loss.float().view(1), ref[0].view(1)), dh=rel(hidden.grad.view(n, h), ref[1]),
            dw=rel(weight.grad, ref[2]))
    del ref
    for label, fn in (("Liger LigerFusedLinearGRPOLoss (compiled, default chunking)", liger), ("ours", ours)):
        hidden.grad = weight.grad = None
        mem = peak_extra(fn)
        ms = bench(fn, (hidden, weight), rep)
        rows.append(("liger", label, n, ms, mem))
        results[f"liger/{'peer' if label != 'ours' else 'ours'}"] = dict(ms=ms, peak_extra_gib=mem)
    results["liger/speedup_ours_vs_liger"] = results["liger/peer"]["ms"] / results["liger/ours"]["ms"]
    hidden.grad = weight.grad = None
    del hidden, weight
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="auto chunk only, no DeepSeek-V3 16k case")
    ap.add_argument("--no-sweep", action="store_true", help="keep the kernels' default launch settings")
    ap.add_argument("--only-liger", action="store_true", help="only the Liger comparison")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    results = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   python=platform.python_version())
    rows = []
    liger_case(results, rows, rep=300 if args.quick else 600)
    if args.only_liger:
        print(json.dumps(results, default=str))
        for case, impl, n, ms, mem in rows:
            print(f"{case:<10} {impl:<72} {n:>6} {ms:>8.2f} {mem:>7.2f}")
        return
    check_addmm_fp32_out(results)
    if args.no_sweep:  # the defaults in kernels/grpo_loss.py
        results["sweep"] = "skipped: module defaults"
    else:
        sweep_kernels(results, rows)
    rep = 300 if args.quick else 600
    fused_case("moonlight", 16384, 2048, 163840, results, rows,
               chunks=(None, 2048, 4096) if not args.quick else (None,), rep=rep)
    results["dw_accumulation"] = K.DW_ACCUMULATION
    logits_case(results, rows, rep=rep)
    fused_case("dsv3-4k", 4096, 7168, 129280, results, rows, rep=rep)
    if not args.quick:
        fused_case("dsv3-16k", 16384, 7168, 129280, results, rows, rep=rep)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_grpo_loss.json").write_text(json.dumps(dict(results, rows=rows), indent=1, default=str))
    print(json.dumps({k: v for k, v in results.items() if not k.startswith("sweep/")}, default=str))
    print(f"\n{results['device']}  torch {results['torch']}  triton {results['triton']}  Liger: {results['liger']}")
    print(f"{'case':<10} {'implementation':<72} {'tokens':>6} {'ms':>8} {'GiB':>7}")
    for case, impl, n, ms, mem in rows:
        print(f"{case:<10} {impl:<72} {n:>6} {ms:>8.2f} {mem:>7.2f}")
    for name in ("moonlight", "logits", "dsv3-4k", "dsv3-16k"):
        if f"{name}/speedup_vs_eager" in results:
            extra = (f", memory {results[f'{name}/memory_ratio_vs_eager']:.1f}x less"
                     if f"{name}/memory_ratio_vs_eager" in results else "")
            print(f"{name}: {results[f'{name}/speedup_vs_eager']:.2f}x faster than eager{extra}")


if __name__ == "__main__":
    main()
