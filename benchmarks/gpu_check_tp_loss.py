"""GPU check of the vocabulary-parallel fused GRPO loss (``fused_linear_grpo_loss(..., vocab_shard=...)``) on ONE GPU.

    python benchmarks/gpu_check_tp_loss.py OUT.json        # on the GPU machine, repository root
    python benchmarks/gpu_check_tp_loss.py OUT.json --cpu  # CPU dry run: TRITON_INTERPRET=1, tiny fp32 shapes

Tensor parallelism is emulated in one process: each of the TP shards of the output weight runs in its own thread
with the real kernels and chunking, and the shards' all-reduces meet at a barrier (``ThreadAllReduce``), so the code
path is the one a TP group takes, only the collective is not NCCL (the multi-process gloo test,
tests/kernels/test_grpo_loss_tp.py, covers that). For each case: loss, log-probs, entropies, the hidden-state
gradient summed over the shards and the weight gradient with the shards stacked, against the single-rank fused
loss on the whole weight (max abs and relative ||a - b|| / ||b|| differences), both against the fp32 torch
reference for scale, and the largest difference between shards in what must be identical on every rank.

Cases (bf16 on the GPU): Moonlight's output layer (4096 tokens, hidden 2048, vocabulary 163840) split in 2 with
the default chunking; 1000 tokens x 512 x 50000 split in 4 with 384-row chunks (fp32 dW accumulation, a
vocabulary that is no power of 2) and the backward scaled by -2.5. Never stops on a failure: each case records
its error; the JSON (argv[1]) is rewritten after every case.
"""
from __future__ import annotations

import os
import sys

if "--cpu" in sys.argv:  # must precede the first triton import
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.grpo_loss import VocabShard, fused_linear_grpo_loss  # noqa: E402
from kernels.grpo_loss_reference import fused_linear_grpo_loss_reference  # noqa: E402

SETTINGS = dict(temperature=0.7, clip_low=0.2, clip_high=0.28, logratio_clamp=10.0, loss_cap=3.0, kl_coef=0.05,
                kl_estimator="k3", entropy_coef=0.01)
GPU_CASES = [  # (tokens, hidden, vocab, TP, chunk_size, backward scale)
    (4096, 2048, 163840, 2, None, 1.0),
    (1000, 512, 50000, 4, 384, -2.5),
]
CPU_CASES = [(19, 32, 266, 2, 8, 1.0), (13, 16, 300, 4, None, -2.5)]
QUANTITIES = ("loss", "logp", "entropy", "dh", "dw")


class ThreadAllReduce:
    """An in-place all-reduce among ``world`` threads of one process (``VocabShard.all_reduce`` for shard r):
    each thread hands in its tensor, all wait, each computes the reduction of all of them, all wait, each writes
    the result into its own tensor. On one CUDA stream the order in which the threads queue their work is the
    order in which it runs, and the barriers fix that order. The threads take turns (``turn``, held by a
    shard's thread except while it waits at the barrier): Triton's interpreter is not thread-safe."""

    def __init__(self, world: int, timeout: float = 600.0):
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world, timeout=timeout)
        self.turn = threading.Lock()

    def _wait(self) -> None:
        self.turn.release()
        try:
            self.barrier.wait()
        finally:
            self.turn.acquire()

    def shard(self, rank: int, rows: int) -> VocabShard:
        def all_reduce(t: torch.Tensor, op: str) -> None:
            self.slots[rank] = t
            self._wait()
            stacked = torch.stack(self.slots)
            result = stacked.amax(0) if op == "max" else stacked.sum(0)
            self._wait()
            t.copy_(result)

        return VocabShard(rank * rows, all_reduce)


def make_case(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Random hidden states and weight; old/ref log-probs around the model's own so the ratios clip both ways."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (2.0 / math.sqrt(h))
    targets = torch.randint(0, v, (n,), generator=g)
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.t() / SETTINGS["temperature"], -1).gather(-1, targets[:, None])[:, 0]
    delta = torch.tensor([-1.0, -0.1, 0.0, 0.1, 0.5, 2.0, 12.0])[torch.randint(0, 7, (n,), generator=g)]
    case = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), targets=targets, old=logp - delta,
                adv=torch.randn(n, generator=g), mask=torch.rand(n, generator=g) > 0.25,
                ref=logp + 0.3 * torch.randn(n, generator=g), isw=0.5 + torch.rand(n, generator=g))
    return {k: t.to(device) for k, t in case.items()}


def run(fn, case: dict, weight: torch.Tensor, scale: float, **extra) -> dict:
    """One forward + backward; the results as fp32 tensors."""
    h = case["hidden"].clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, logp, ent = fn(h, w, case["targets"], case["old"], case["adv"], case["mask"], ref_logp=case["ref"],
                         is_weights=case["isw"], normalizer=float(case["mask"].sum()), **SETTINGS, **extra)
    (loss * scale).backward()
    return dict(loss=loss.detach().float(), logp=logp.float(), entropy=ent.float(), dh=h.grad.float(),
                dw=w.grad.float())


def run_sharded(case: dict, tp: int, scale: float, chunk) -> list[dict]:
    """Each shard's result, the shards in ``tp`` threads meeting in ``ThreadAllReduce``."""
    rows = case["weight"].shape[0] // tp
    reduce = ThreadAllReduce(tp)
    results: list = [None] * tp
    errors: list = []

    def shard(r: int) -> None:
        try:
            with reduce.turn:
                results[r] = run(fused_linear_grpo_loss, case, case["weight"][r * rows:(r + 1) * rows], scale,
                                 chunk_size=chunk, vocab_shard=reduce.shard(r, rows))
        except BaseException as err:  # noqa: BLE001 - the other shards must not wait for this one forever
            errors.append(err)
            reduce.barrier.abort()

    threads = [threading.Thread(target=shard, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def combined(shards: list[dict]) -> dict:
    """What the TP group computes as a whole: rank 0's loss, log-probs, entropies; dh summed; dW stacked."""
    return dict(shards[0], dh=sum(s["dh"] for s in shards), dw=torch.cat([s["dw"] for s in shards]))


def differences(a: dict, b: dict) -> dict:
    return {k: {"max_abs": float((a[k] - b[k]).abs().max()),
                "rel": float((a[k] - b[k]).double().norm() / b[k].double().norm().clamp_min(1e-30))}
            for k in QUANTITIES}


def spread(shards: list[dict]) -> float:
    """The largest difference between shards in what every rank must agree on."""
    return max(float((s[k] - shards[0][k]).abs().max()) for s in shards for k in ("loss", "logp", "entropy"))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_case(n: int, h: int, v: int, tp: int, chunk, scale: float, dtype: torch.dtype, device: str) -> dict:
    rec = {"tokens": n, "hidden": h, "vocab": v, "tp": tp, "chunk_size": chunk, "grad_scale": scale,
           "dtype": str(dtype)}
    case = make_case(n, h, v, dtype, device)
    one = run(fused_linear_grpo_loss, case, case["weight"], scale, chunk_size=chunk)
    sync()
    t0 = time.perf_counter()
    shards = run_sharded(case, tp, scale, chunk)
    sync()
    rec["sharded_s"] = round(time.perf_counter() - t0, 3)  # all shards one after another, first call compiles
    tp_result = combined(shards)
    rec["tp_vs_single_rank"] = differences(tp_result, one)
    rec["ranks_disagree"] = spread(shards)
    ref_case = dict(case, hidden=case["hidden"].float())
    ref = run(fused_linear_grpo_loss_reference, ref_case, case["weight"].float(), scale)
    rec["tp_vs_fp32_reference"] = differences(tp_result, ref)
    rec["single_rank_vs_fp32_reference"] = differences(one, ref)
    rec["finite"] = all(bool(torch.isfinite(t).all()) for t in tp_result.values())
    return rec


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    cpu = "--cpu" in sys.argv
    out_path = Path(args[0]) if args else Path("gpu_check_tp_loss.json")
    device, dtype, cases = ("cpu", torch.float32, CPU_CASES) if cpu else ("cuda", torch.bfloat16, GPU_CASES)
    if cpu:
        torch.set_num_threads(1)
    import triton

    summary = {"script": "benchmarks/gpu_check_tp_loss.py", "cpu": cpu,
               "interpret": os.environ.get("TRITON_INTERPRET") == "1",
               "versions": {"torch": torch.__version__, "triton": triton.__version__,
                            "python": platform.python_version()},
               "device": torch.cuda.get_device_name(0) if not cpu and torch.cuda.is_available() else "cpu",
               "settings": SETTINGS, "cases": []}

    def write() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(summary, indent=1))

    failures = 0
    for n, h, v, tp, chunk, scale in cases:
        t0 = time.perf_counter()
        try:
            rec = run_case(n, h, v, tp, chunk, scale, dtype, device)
        except Exception as err:  # noqa: BLE001 - record and go on to the next case
            failures += 1
            rec = {"tokens": n, "hidden": h, "vocab": v, "tp": tp, "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc()}
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        summary["cases"].append(rec)
        write()
        print(json.dumps({k: rec.get(k) for k in ("tokens", "vocab", "tp", "ranks_disagree", "error")}),
              {k: f"{d['max_abs']:.2e}" for k, d in rec.get("tp_vs_single_rank", {}).items()}, flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"wrote {out_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
