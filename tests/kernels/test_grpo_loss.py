"""Fused GRPO loss kernels (kernels/grpo_loss.py) against the torch reference and the cookbook's own loss.

CPU: the Triton kernels run under TRITON_INTERPRET=1 in a subprocess (the flag must be set before triton is
imported, and other tests in this process may already have imported it), fp32, small uneven shapes
(V = 517 and 129 with 128-wide vocabulary blocks in interpret mode: several blocks and a ragged tail;
token chunks of 16 rows over 37 tokens). The subprocess prints one JSON line of measurements; the tests
assert on them with the relative error ||a - b|| / ||b|| in each message.
GPU (``-m gpu``): bf16 at real-ish shapes against the fp32 reference.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# -- inputs that hit every branch -----------------------------------------------------------------------
def make_case(n: int, h: int, v: int, seed: int, dtype=torch.float32, device="cpu"):
    """Hidden/weight plus token arrays built around the model's own log-probs so that every regime occurs:
    ratio clipped low (A<0) and high (A>0), inside the clip range, log-ratio clamp hit (delta 12 > 10),
    loss cap hit, masked tokens; ratios kept away from the clip and cap boundaries (no ties flip)."""
    g = torch.Generator(device=device).manual_seed(seed)
    f = dict(generator=g, device=device)
    hidden = torch.randn(n, h, **f).to(dtype)
    weight = (torch.randn(v, h, **f) * (2.0 / math.sqrt(h))).to(dtype)
    targets = torch.randint(0, v, (n,), **f)
    with torch.no_grad():
        acc = torch.float64 if device == "cpu" else torch.float32
        logp = torch.log_softmax((hidden.to(acc) @ weight.to(acc).t()) / 0.7, -1).gather(
            -1, targets[:, None]).squeeze(-1).float()
    deltas = torch.tensor([-1.0, -0.1, 0.0, 0.1, 0.5, 2.0, 12.0], device=device)  # log(pi / pi_old)
    advs = torch.tensor([-2.0, -0.5, 0.7, 1.5], device=device)
    delta = deltas[torch.randint(0, len(deltas), (n,), **f)]
    adv = advs[torch.randint(0, len(advs), (n,), **f)]
    old = logp - delta
    ref = logp + 0.3 * torch.randn(n, **f)
    mask = torch.rand(n, **f) > 0.25
    isw = 0.5 + torch.rand(n, **f)
    return dict(hidden=hidden, weight=weight, targets=targets, old=old, adv=adv, mask=mask, ref=ref, isw=isw,
                delta=delta, advs=adv)


FULL = dict(temperature=0.7, clip_low=0.2, clip_high=0.28, logratio_clamp=10.0, loss_cap=3.0, normalizer=53.0,
            kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)


def run_fused(fn, c, kw, grad_scale=1.0, **extra):
    h = c["hidden"].clone().requires_grad_()
    w = c["weight"].clone().requires_grad_()
    loss, logp, ent = fn(h, w, c["targets"], c["old"], c["adv"], c["mask"], ref_logp=c["ref"], is_weights=c["isw"],
                         **kw, **extra)
    (loss * grad_scale).backward() if grad_scale != 1.0 else loss.backward()
    return dict(loss=loss.detach(), logp=logp, entropy=ent, dh=h.grad, dw=w.grad)


def run_logits(fn, logits, c, kw, grad_scale=1.0, **extra):
    x = logits.clone().requires_grad_()
    loss, logp, ent = fn(x, c["targets"], c["old"], c["adv"], c["mask"], ref_logp=c["ref"], is_weights=c["isw"],
                         **kw, **extra)
    (loss * grad_scale).backward() if grad_scale != 1.0 else loss.backward()
    return dict(loss=loss.detach(), logp=logp, entropy=ent, dlogits=x.grad)


def errors(a: dict, b: dict) -> dict:
    return {k: rel(a[k], b[k]) for k in a if k in b}


def cookbook_policy_loss(logp, ent, c, kw):
    """The cookbook's ``policy_loss`` of ``[1, N]`` log-probs and entropies with the case's token arrays."""
    from cookbook.grpo.algorithm import policy_loss
    return policy_loss(logp, c["old"][None], c["adv"][None], c["mask"][None], clip_low=kw["clip_low"],
                       clip_high=kw["clip_high"], logratio_clamp=kw["logratio_clamp"], loss_cap=kw["loss_cap"],
                       normalizer=kw["normalizer"], aggregation="token_mean", ref_logp=c["ref"][None],
                       kl_coef=kw["kl_coef"], kl_estimator=kw["kl_estimator"], is_weights=c["isw"][None],
                       entropy=ent, entropy_coef=kw["entropy_coef"])


def cookbook_loss(c, kw):
    """The cookbook's loss on the same inputs: token_logprobs + policy_loss, autograd for the gradients."""
    from cookbook.grpo.algorithm import token_logprobs
    h = c["hidden"].clone().requires_grad_()
    w = c["weight"].clone().requires_grad_()
    logits = h @ w.t()
    logp, ent = token_logprobs(logits[None], c["targets"][None], temperature=kw["temperature"])
    out = cookbook_policy_loss(logp, ent, c, kw)
    out.loss.backward()
    return dict(loss=out.loss.detach(), logp=logp.detach()[0], entropy=ent.detach()[0], dh=h.grad, dw=w.grad), \
        out.metrics


# -- the subprocess: Triton under the interpreter ---------------------------------------------------------
def interpret_checks() -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from kernels.grpo_loss import fused_linear_grpo_loss, grpo_loss_from_logits
    from kernels.grpo_loss_reference import fused_linear_grpo_loss_reference, grpo_loss_from_logits_reference
    res = {}
    c = make_case(37, 48, 517, seed=1)
    # which regimes the inputs hit (from the cookbook's own metrics and the designed log-ratios)
    cb, metrics = cookbook_loss(c, FULL)
    m = c["mask"]
    res["regimes"] = {"clip_low": metrics["clip_frac_low"], "clip_high": metrics["clip_frac_high"],
                      "capped": metrics["capped_frac"], "clamped": float(((c["delta"] > 10) & m).sum()),
                      "masked": float((~m).sum()), "inside": float(((c["delta"].abs() <= 0.1) & m).sum())}
    fused = run_fused(fused_linear_grpo_loss, c, FULL, chunk_size=16)
    res["fused_vs_ref"] = errors(fused, run_fused(fused_linear_grpo_loss_reference, c, FULL))
    res["fused_vs_cookbook"] = errors(fused, cb)
    res["fused_grad_scaled"] = errors(run_fused(fused_linear_grpo_loss, c, FULL, grad_scale=-2.5, chunk_size=16),
                                      run_fused(fused_linear_grpo_loss_reference, c, FULL, grad_scale=-2.5))
    res["fused_logp_max"] = float(fused["logp"].max())
    res["fused_entropy_max"] = float(fused["entropy"].max())
    res["fused_nograd_vs_grad"] = errors(
        dict(zip(("loss", "logp", "entropy"), fused_linear_grpo_loss(
            c["hidden"], c["weight"], c["targets"], c["old"], c["adv"], c["mask"], ref_logp=c["ref"],
            is_weights=c["isw"], **FULL))), fused)
    # from logits, V = 517, then variants: other KL estimators, no clamp/cap/KL/entropy, V = 129
    logits = c["hidden"] @ c["weight"].t()
    res["logits_vs_ref"] = errors(run_logits(grpo_loss_from_logits, logits, c, FULL),
                                  run_logits(grpo_loss_from_logits_reference, logits, c, FULL))
    variants = {
        "k1": dict(FULL, kl_estimator="k1"),
        "k2": dict(FULL, kl_estimator="k2", temperature=1.0),
        "plain": dict(FULL, logratio_clamp=None, loss_cap=None, kl_coef=0.0, entropy_coef=0.0),
    }
    for name, kw in variants.items():
        res[f"logits_{name}"] = errors(run_logits(grpo_loss_from_logits, logits, c, kw),
                                       run_logits(grpo_loss_from_logits_reference, logits, c, kw))
    c2 = make_case(19, 16, 129, seed=2)
    logits2 = c2["hidden"] @ c2["weight"].t()
    res["logits_v129"] = errors(run_logits(grpo_loss_from_logits, logits2, c2, FULL),
                                run_logits(grpo_loss_from_logits_reference, logits2, c2, FULL))
    res["logits_grad_scaled"] = errors(run_logits(grpo_loss_from_logits, logits2, c2, FULL, grad_scale=0.3),
                                       run_logits(grpo_loss_from_logits_reference, logits2, c2, FULL, grad_scale=0.3))
    res["logits_inplace"] = errors(run_logits(grpo_loss_from_logits, logits2, c2, FULL, inplace_backward=True),
                                   run_logits(grpo_loss_from_logits_reference, logits2, c2, FULL))
    res["fused_v129_one_chunk"] = errors(run_fused(fused_linear_grpo_loss, c2, FULL),
                                         run_fused(fused_linear_grpo_loss_reference, c2, FULL))
    return res


@pytest.fixture(scope="module")
def interp() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"interpreter checks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


TOL = 1e-4  # fp32 against fp32 (observed about 1e-6)


def _check(errs: dict, what: str, tol: float = TOL) -> None:
    assert errs, f"{what}: nothing compared"
    bad = {k: v for k, v in errs.items() if not v <= tol}  # NaN fails
    assert not bad, f"{what}: relative error ||a-b||/||b|| over {tol}: {bad} (all: {errs})"


def test_inputs_hit_every_regime(interp):
    r = interp["regimes"]
    for k in ("clip_low", "clip_high", "capped", "clamped", "masked", "inside"):
        assert r[k] > 0, f"the test inputs never hit {k}: {r}"


def test_fused_linear_matches_reference(interp):
    _check(interp["fused_vs_ref"], "fused_linear_grpo_loss (Triton, interpreted) vs torch reference")
    for k in ("loss", "logp", "entropy", "dh", "dw"):
        assert k in interp["fused_vs_ref"]


def test_fused_linear_matches_cookbook_policy_loss(interp):
    _check(interp["fused_vs_cookbook"], "fused_linear_grpo_loss vs cookbook token_logprobs + policy_loss")


def test_fused_linear_single_chunk_and_nograd(interp):
    _check(interp["fused_v129_one_chunk"], "fused_linear_grpo_loss, V=129, one chunk")
    _check(interp["fused_nograd_vs_grad"], "fused_linear_grpo_loss without grad vs with grad")
    _check(interp["fused_grad_scaled"], "fused_linear_grpo_loss, (-2.5 * loss).backward()")


def test_vocab_tail_masked(interp):
    assert interp["fused_logp_max"] < 0, f"a log-prob above 0 ({interp['fused_logp_max']}): phantom vocab entries"
    assert interp["fused_entropy_max"] <= math.log(517) + 1e-5


@pytest.mark.parametrize("name", ["logits_vs_ref", "logits_k1", "logits_k2", "logits_plain", "logits_v129",
                                  "logits_inplace", "logits_grad_scaled"])
def test_from_logits_matches_reference(interp, name):
    _check(interp[name], f"grpo_loss_from_logits [{name}] vs torch reference")
    assert "dlogits" in interp[name]


# -- in-process, no Triton: dispatch and argument checks --------------------------------------------------
def test_cpu_dispatches_to_reference():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpret mode: CPU tensors go to Triton")
    from kernels.grpo_loss import fused_linear_grpo_loss, grpo_loss_from_logits
    from kernels.grpo_loss_reference import fused_linear_grpo_loss_reference
    c = make_case(11, 8, 33, seed=3)
    a = run_fused(fused_linear_grpo_loss, c, FULL)
    b = run_fused(fused_linear_grpo_loss_reference, c, FULL)
    assert all(torch.equal(a[k], b[k]) for k in a)
    cb, _ = cookbook_loss(c, FULL)
    _check(errors(a, cb), "CPU fallback vs cookbook policy_loss", 1e-5)
    loss, logp, ent = grpo_loss_from_logits(c["hidden"] @ c["weight"].t(), c["targets"], c["old"], c["adv"],
                                            c["mask"], normalizer=5.0)
    assert logp.dtype == torch.float32 and ent.shape == (11,) and loss.dim() == 0


@pytest.mark.parametrize("bad,match", [
    (dict(aggregation="seq_mean"), "token_mean"),
    (dict(kl_estimator="k4"), "KL estimator"),
    (dict(kl_coef=0.1), "ref_logp"),
    (dict(normalizer=0.0), "normalizer"),
    (dict(temperature=0.0), "temperature"),
])
def test_bad_arguments(bad, match):
    from kernels.grpo_loss import fused_linear_grpo_loss, grpo_loss_from_logits
    c = make_case(5, 8, 17, seed=4)
    kw = dict(normalizer=5.0)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        fused_linear_grpo_loss(c["hidden"], c["weight"], c["targets"], c["old"], c["adv"], c["mask"], **kw)
    with pytest.raises(ValueError, match=match):
        grpo_loss_from_logits(c["hidden"] @ c["weight"].t(), c["targets"], c["old"], c["adv"], c["mask"], **kw)


# -- GPU: bf16 at real-ish shapes ---------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# bf16 logits (rounded once by the output layer, as an unfused bf16 model gives them) vs fp32 logits
GPU_TOL = dict(loss=1e-2, logp=5e-3, entropy=5e-3, dh=2e-2, dw=2e-2, dlogits=1e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n,h,v,chunk,scale", [
    (2048, 2048, 163840, 384, 1.0),  # several chunks: fp32 dW accumulator, cast in backward
    (1024, 7168, 129280, None, 1.0),  # one chunk (auto): dW straight in bf16
    (1000, 512, 50001, 384, -2.5),  # several chunks, backward scaled (mul + cast in one pass)
])
def test_gpu_fused_linear_bf16(n, h, v, chunk, scale):
    from kernels.grpo_loss import fused_linear_grpo_loss
    from kernels.grpo_loss_reference import fused_linear_grpo_loss_reference
    c = make_case(n, h, v, seed=5, dtype=torch.bfloat16, device="cuda")
    kw = dict(FULL, normalizer=float(n))
    got = run_fused(fused_linear_grpo_loss, c, kw, grad_scale=scale, chunk_size=chunk)
    c32 = dict(c, hidden=c["hidden"].float(), weight=c["weight"].float())
    want = run_fused(fused_linear_grpo_loss_reference, c32, kw, grad_scale=scale)
    errs = errors(got, want)
    print(f"\nGPU fused bf16 n={n} h={h} v={v} chunk={chunk}: rel err vs fp32 reference "
          + ", ".join(f"{k} {e:.2e}" for k, e in errs.items()))
    bad = {k: e for k, e in errs.items() if not e <= GPU_TOL[k]}
    assert not bad, f"bf16 fused vs fp32 reference, rel errors over {GPU_TOL}: {bad} (all {errs})"
    assert got["dw"].dtype == torch.bfloat16 and got["dh"].dtype == torch.bfloat16
    assert float(got["logp"].max()) < 0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n,v", [(4096, 163840), (777, 129280)])
def test_gpu_from_logits_bf16(n, v):
    from kernels.grpo_loss import grpo_loss_from_logits
    from kernels.grpo_loss_reference import grpo_loss_from_logits_reference
    c = make_case(n, 64, v, seed=6, device="cuda")
    logits = (c["hidden"] @ c["weight"].t() * 3).bfloat16()
    kw = dict(FULL, normalizer=float(n))
    got = run_logits(grpo_loss_from_logits, logits, c, kw)
    want = run_logits(grpo_loss_from_logits_reference, logits.float(), c, kw)
    errs = errors(got, want)
    print(f"\nGPU from-logits bf16 n={n} v={v}: rel err vs fp32 reference on the same logits "
          + ", ".join(f"{k} {e:.2e}" for k, e in errs.items()))
    tol = dict(loss=1e-5, logp=1e-5, entropy=1e-5, dlogits=1e-2)  # same logits: fp32 math, bf16 dlogits
    bad = {k: e for k, e in errs.items() if not e <= tol[k]}
    assert not bad, f"bf16 from-logits vs fp32 reference, rel errors over {tol}: {bad} (all {errs})"


if __name__ == "__main__":  # the interpreter subprocess
    torch.manual_seed(0)
    print(json.dumps(interpret_checks()))
