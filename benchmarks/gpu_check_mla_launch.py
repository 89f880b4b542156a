"""GPU check of the MLA attention launch settings (kernels/mla_attention.py, ``config=None``) for fp32 and bf16.

    python benchmarks/gpu_check_mla_launch.py OUT.json              # on the GPU machine, repository root
    python benchmarks/gpu_check_mla_launch.py OUT.json --cpu-smoke  # CPU dry run: TRITON_INTERPRET=1, tiny shape

For fp32 and bf16 inputs: the forward, and the forward + backward, of ``kernels.mla_attention.mla_attention`` with
the default launch settings (``config=None``: ``launch_config(dtype, device)``) at 2 x 1024 tokens packed as
segments of 700 + 324 and 1 + 512 + 383 + 128 tokens, 16 heads, qk 192 / v 128, ``max_seqlen=None``; compared
with ``kernels.mla_attention_reference`` in fp32 (max abs and relative errors of out, dq, dk, dv). Also: the
chosen settings per dtype with their shared-memory estimates, the device's limit, the compiled kernels' shared
memory / registers / spills (``LAST_LAUNCHED``), any launch fallbacks taken (OutOfResources), the time of the
first call (compile) and of a few warm calls, and that a too-small ``max_seqlen`` raises ValueError.

Never stops on a failure: each case records its error text and traceback; the JSON (argv[1]) is rewritten after
every case, so it holds what ran even if the process dies later. Imports torch, triton, the stdlib and the repo.
"""
from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # must precede the first triton import
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import mla_attention as mla  # noqa: E402
from kernels.mla_attention_reference import mla_attention_reference  # noqa: E402

DK, DV, HEADS = 192, 128, 16
LENS = [700, 324, 1, 512, 383, 128]  # batch 2 x 1024 tokens, packed
SMOKE_LENS, SMOKE_HEADS = [5, 17, 1, 9], 2
# Relative-error bounds (as in tests/kernels/test_mla_attention.py): fp32 products are exact ("ieee").
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def log(*args):
    print(*args, flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kernel_resources() -> dict:
    """What the compiled kernels of the last launches report: shared memory (bytes), registers, spills."""
    out = {}
    for name, kernel in mla.LAST_LAUNCHED.items():
        rec = {}
        meta = getattr(kernel, "metadata", None)
        for attr in ("shared", "num_warps", "num_stages"):
            value = getattr(meta, attr, None)
            if value is None:
                value = getattr(kernel, attr, None)
            if value is not None:
                rec[attr] = int(value)
        for attr in ("n_regs", "n_spills"):
            value = getattr(kernel, attr, None)
            if isinstance(value, int):
                rec[attr] = value
        out[name] = rec
    return out


def settings(dtype, device) -> dict:
    config = mla.launch_config(dtype, device, DK, DV)
    rec = {"config": asdict(config), "is_default": config == mla.DEFAULT_CONFIG}
    rec["estimates"] = {k: mla.shared_memory_estimate(k, config, dtype, DK, DV) for k in mla.KERNEL_FIELDS}
    return rec


def make(lens, heads, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = sum(lens)
    xs = [torch.randn(t, heads, d, generator=g) for d in (DK, DK, DV, DV)]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return [x.to(device=device, dtype=dtype) for x in xs], cu


def errors(got, want) -> dict:
    rec = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        a, b = a.float(), b.float()
        rec[name] = {"max_abs": float((a - b).abs().max()) if a.numel() else 0.0,
                     "rel": float((a - b).norm() / b.norm().clamp_min(1e-30)),
                     "finite": bool(torch.isfinite(a).all())}
    return rec


def timed(fn, reps):
    """(first call s, median of warm calls in ms)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    warm = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        warm.append((time.perf_counter() - t0) * 1e3)
    warm.sort()
    return first, (warm[len(warm) // 2] if warm else None)


def run_case(dtype, mode, lens, heads, device, reps, judge=True) -> dict:
    (q, k, v, do), cu = make(lens, heads, dtype, device, seed=0)
    scale = DK ** -0.5
    mla.LAST_LAUNCHED.clear()
    rec = {"dtype": str(dtype), "mode": mode, "lens": lens, "heads": heads, "dk": DK, "dv": DV}
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    result = {}

    def fwd():
        with torch.no_grad():
            result["out"] = mla.mla_attention(q, k, v, cu, None, scale)

    def fwd_bwd():
        for x in (qg, kg, vg):
            x.grad = None
        out = mla.mla_attention(qg, kg, vg, cu, None, scale)
        out.backward(do)
        result["out"] = out.detach()

    first, warm_ms = timed(fwd if mode == "fwd" else fwd_bwd, reps)
    rec["first_call_s"], rec["warm_ms"] = round(first, 3), warm_ms
    rec["kernels"] = kernel_resources()
    rec["settings"] = settings(dtype, q.device)
    qr, kr, vr = (x.float().requires_grad_() for x in (q, k, v))
    ref = mla_attention_reference(qr, kr, vr, cu, scale, compute_dtype=torch.float32)
    if mode == "fwd":
        rec["errors"] = errors([result["out"]], [ref.detach()])
    else:
        ref.backward(do.float())
        rec["errors"] = errors([result["out"], qg.grad, kg.grad, vg.grad], [ref.detach(), qr.grad, kr.grad, vr.grad])
    tol = REL_TOL.get(dtype, 2e-2)
    rec["rel_tol"] = tol
    # ok: None where the numbers mean nothing (bf16 under the interpreter); False on an exception or a miss
    rec["ok"] = all(e["finite"] and e["rel"] < tol for e in rec["errors"].values()) if judge else None
    return rec


def max_seqlen_case(lens, heads, device) -> dict:
    (q, k, v, _), cu = make(lens, heads, torch.float32, device, seed=1)
    try:
        mla.mla_attention(q, k, v, cu, max(lens) - 1)
    except ValueError as err:
        return {"raised": True, "message": str(err), "ok": True}
    return {"raised": False, "ok": False}


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    smoke = "--cpu-smoke" in sys.argv
    out_path = Path(args[0]) if args else Path("gpu_check_mla_launch.json")
    device = "cpu" if smoke else "cuda"
    lens, heads, reps = (SMOKE_LENS, SMOKE_HEADS, 0) if smoke else (LENS, HEADS, 5)
    summary = {
        "script": "benchmarks/gpu_check_mla_launch.py", "smoke": smoke,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "cases": [],
    }
    if smoke:
        summary["note"] = "TRITON_INTERPRET=1 on CPU: bf16 has no real arithmetic there, its errors mean nothing"
    try:
        if torch.cuda.is_available() and not smoke:
            props = torch.cuda.get_device_properties(0)
            summary["device"] = {"name": props.name, "capability": list(torch.cuda.get_device_capability(0)),
                                 "shared_memory_per_block_optin": getattr(props, "shared_memory_per_block_optin",
                                                                          None),
                                 "smem_limit_used": mla.device_shared_memory_limit(torch.device("cuda", 0))}
        else:
            summary["device"] = {"name": "cpu", "cuda_available": torch.cuda.is_available()}
    except Exception as err:  # noqa: BLE001
        summary["device"] = {"error": f"{type(err).__name__}: {err}"}

    def write():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(summary, indent=1, default=str))

    for dtype in (torch.float32, torch.bfloat16):
        try:
            summary.setdefault("selected", {})[str(dtype)] = settings(dtype, torch.device(device, 0)
                                                                      if device == "cuda" else device)
        except Exception as err:  # noqa: BLE001
            summary.setdefault("selected", {})[str(dtype)] = {"error": f"{type(err).__name__}: {err}"}
        for mode in ("fwd", "fwd_bwd"):
            t0 = time.perf_counter()
            try:
                rec = run_case(dtype, mode, lens, heads, device, reps,
                               judge=not (smoke and dtype != torch.float32))
            except Exception as err:  # noqa: BLE001 - record and go on
                rec = {"dtype": str(dtype), "mode": mode, "ok": False, "error": f"{type(err).__name__}: {err}",
                       "traceback": traceback.format_exc()[-4000:], "kernels": kernel_resources()}
            rec["wall_s"] = round(time.perf_counter() - t0, 2)
            summary["cases"].append(rec)
            errs = {n: f"{e['max_abs']:.2e}" for n, e in rec.get("errors", {}).items()}
            log(f"{str(dtype):15s} {mode:8s} ok={rec['ok']} max_abs={errs} "
                f"smem={ {n: r.get('shared') for n, r in rec.get('kernels', {}).items()} } "
                f"{rec.get('error', '')[:300]}")
            write()
    try:
        summary["max_seqlen_too_small"] = max_seqlen_case(lens, heads, device)
    except Exception as err:  # noqa: BLE001
        summary["max_seqlen_too_small"] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    log(f"max_seqlen too small: {summary['max_seqlen_too_small']}")
    summary["launch_fallbacks"] = list(mla.LAUNCH_FALLBACKS)
    for dtype in (torch.float32, torch.bfloat16):  # after any fallback
        try:
            summary.setdefault("final_settings", {})[str(dtype)] = settings(
                dtype, torch.device(device, 0) if device == "cuda" else device)
        except Exception as err:  # noqa: BLE001
            summary.setdefault("final_settings", {})[str(dtype)] = {"error": f"{type(err).__name__}: {err}"}
    for name, rec in summary.get("final_settings", {}).items():
        cfg = rec.get("config", {})
        log(f"settings {name}: default={rec.get('is_default')} "
            f"fwd {cfg.get('BLOCK_M')}x{cfg.get('BLOCK_N')} w{cfg.get('fwd_warps')} s{cfg.get('fwd_stages')}, "
            f"dkdv {cfg.get('BLOCK_M1')}x{cfg.get('BLOCK_N1')} w{cfg.get('dkdv_warps')} s{cfg.get('dkdv_stages')}, "
            f"dq {cfg.get('BLOCK_M2')}x{cfg.get('BLOCK_N2')} w{cfg.get('dq_warps')} s{cfg.get('dq_stages')}; "
            f"estimates {rec.get('estimates')}")
    summary["all_ok"] = bool(all(c.get("ok") is not False for c in summary["cases"])
                             and summary["max_seqlen_too_small"].get("ok"))
    write()
    log(f"all_ok={summary['all_ok']} -> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
