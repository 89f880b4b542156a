"""The three GEMMs of the fused GRPO loss at Moonlight's shape (16384 tokens, hidden 2048, vocabulary 163840, bf16)
per token chunk, under cuBLAS and cuBLASLt, with a square 8192 GEMM as the device's reference rate; one CUDA GPU.

    OUT=DIR python3 benchmarks/probe_gemm_shapes.py    (writes DIR/gemm_probe.json)

logits = h @ W^T, dH = dlogits @ W, dW (+)= dlogits^T @ h: fp32 accumulator (what the loss uses with several
chunks) and bf16 (for comparison). TFLOP/s = 2 * chunk * hidden * vocab / time.
"""
import json
import os
from pathlib import Path

import torch
from triton.testing import do_bench

N, HIDDEN, VOCAB = 16384, 2048, 163840


def rate(fn, flop: float) -> dict:
    ms = do_bench(fn, warmup=25, rep=300, return_mode="median")
    return {"ms": ms, "tflops": flop / ms / 1e9}


def main() -> None:
    out = {}
    w = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(N, HIDDEN, device="cuda", dtype=torch.bfloat16)
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        out[f"{lib}/square8192"] = rate(lambda: a @ b, 2 * 8192 ** 3)
        for chunk in (2048, 2816, 3328, 4096):
            h = hidden[:chunk]
            logits = torch.empty(chunk, VOCAB, device="cuda", dtype=torch.bfloat16).normal_()
            dh = torch.empty(chunk, HIDDEN, device="cuda", dtype=torch.bfloat16)
            dw32 = torch.zeros(VOCAB, HIDDEN, device="cuda", dtype=torch.float32)
            dw16 = torch.zeros(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16)
            flop = 2 * chunk * HIDDEN * VOCAB
            r = {"logits": rate(lambda: torch.mm(h, w.t(), out=logits), flop),
                 "dh": rate(lambda: torch.mm(logits, w, out=dh), flop),
                 "dw_fp32_addmm": rate(lambda: torch.addmm(dw32, logits.t(), h, out_dtype=torch.float32, out=dw32),
                                       flop),
                 "dw_bf16_addmm": rate(lambda: dw16.addmm_(logits.t(), h), flop)}
            out[f"{lib}/chunk{chunk}"] = r
            print(lib, chunk, {k: round(x["tflops"]) for k, x in r.items()}, flush=True)
        print(lib, "square 8192", round(out[f"{lib}/square8192"]["tflops"]), "TFLOP/s", flush=True)
    Path(os.environ.get("OUT", "."), "gemm_probe.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
