"""Importance correction beyond token TIS and GSPO's sequence-level loss (issue 15, point 4):
``algorithm.importance_weights`` (token / sequence masks, their metrics), ``algorithm.gspo_loss`` (against the
sequence form of GSPO written out with autograd), their wiring through ``parallel_step.train_minibatch`` on
padded and packed rows and ``TrainerRank.train_step``, the fused path's refusals and the config checks.
The default loss (``policy_loss``, PPO-clip) is compared bit for bit with the formula it had before these
options existed, written out below.

Tolerances: hand-made masks are exact, metrics summed in fp32 to 1e-6; gspo_loss against the sequence form and
packed ids against padded rows in fp64: 1e-12; the 2-process split of sequences (as CP splits them) in fp64:
1e-12. train_minibatch (fp32 tiny model, random weights) against the loss written out on the full batch in one
forward: only the order of sums differs (micro-batches, packed rows), measured on 2026-12-02 (2-core AMD EPYC)
up to 1.2e-7 absolute on the loss and 1.7e-6 on gradients (per tensor, relative to its largest element), asserted
< 1e-5 x max(1, |loss|) and < 1e-4 as in test_packing.py. A GSPO step that treats a packed row as one sequence
is off by 0.07 on the loss, one that skips the CP all-reduce by 0.08 (checked by hand with cp_probe.py's step).
"""
import dataclasses
import math

import pytest
import torch

from cookbook.config import CHOICES, ConfigError, load_config
from cookbook.grpo import algorithm as A

LN = math.log


# -- the default loss is what it was ----------------------------------------------------------------------
def _policy_loss_before(logp, old_logp, advantages, mask, *, clip_low, clip_high, logratio_clamp, loss_cap,
                        normalizer, aggregation, ref_logp=None, kl_coef=0.0, kl_estimator="k3", is_weights=None,
                        entropy=None, entropy_coef=0.0):
    """``algorithm.policy_loss`` as it was at commit 988e429 (before the importance options), op for op."""
    mask = mask.bool()
    adv = advantages.to(logp.dtype)
    if adv.shape == logp.shape[:-1]:
        adv = adv.unsqueeze(-1)
    log_ratio = logp - old_logp
    if logratio_clamp is not None:
        log_ratio = log_ratio.clamp(max=logratio_clamp)
    ratio = torch.exp(log_ratio)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    capped = pg > loss_cap if loss_cap is not None else torch.zeros_like(mask)
    if loss_cap is not None:
        pg = pg.clamp(max=loss_cap)
    per_token = pg if is_weights is None else pg * is_weights.detach()
    kl = A.kl_estimate(logp, ref_logp, kl_estimator) if ref_logp is not None else None
    if kl_coef:
        per_token = per_token + kl_coef * kl
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy
    per_token = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype))
    if aggregation == "token_mean":
        loss = per_token.sum() / normalizer
    else:
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normalizer
    count = int(mask.sum())

    def mean(x):
        with torch.no_grad():
            return float(torch.where(mask, x.float(), 0.0).sum() / max(count, 1))

    metrics = {"pg_loss": mean(pg), "ratio_mean": mean(ratio),
               "clip_frac_low": mean((ratio < 1 - clip_low) & (adv < 0)),
               "clip_frac_high": mean((ratio > 1 + clip_high) & (adv > 0)), "capped_frac": mean(capped)}
    if kl is not None:
        metrics["kl"] = mean(kl)
    if entropy is not None:
        metrics["entropy"] = mean(entropy)
    if is_weights is not None:
        metrics["is_weight_mean"] = mean(is_weights)
    return loss, metrics, count


def _batch(seed=0, b=5, t=9):
    gen = torch.Generator().manual_seed(seed)
    lengths = [9, 4, 7, 1, 6][:b]
    mask = torch.zeros(b, t)
    for i, n in enumerate(lengths):
        mask[i, t - n - (i % 2):t - (i % 2)] = 1.0  # responses at different columns; padding on both sides
    old = -torch.rand(b, t, generator=gen) * 3
    logp = old + 0.3 * torch.randn(b, t, generator=gen)
    logp[0, 2] = old[0, 2] + 12.0  # over the log-ratio clamp
    logp[2, 5] = old[2, 5] + 2.5  # a loss over the cap (negative advantage)
    rollout = old + 0.05 * torch.randn(b, t, generator=gen)
    ref = old + 0.1 * torch.randn(b, t, generator=gen)
    entropy = torch.rand(b, t, generator=gen) * 2
    adv = torch.tensor([1.3, -0.7, -1.6, 0.4, 0.0][:b])
    return logp, old, rollout, ref, entropy, adv, mask


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("with_extras", [False, True])
def test_default_ppo_loss_is_bit_for_bit_what_it_was(aggregation, with_extras):
    logp, old, rollout, ref, entropy, adv, mask = _batch()
    settings = dict(clip_low=0.2, clip_high=0.28, logratio_clamp=10.0, loss_cap=3.0, aggregation=aggregation,
                    normalizer=float(mask.sum()) if aggregation == "token_mean" else 5.0)
    if with_extras:
        settings.update(ref_logp=ref, kl_coef=0.05, is_weights=A.tis_weights(old, rollout, mask, 2.0),
                        entropy=entropy, entropy_coef=0.01)
    a, b = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    now = A.policy_loss(a, old, adv, mask, **settings)
    loss, metrics, count = _policy_loss_before(b, old, adv, mask, **settings)
    now.loss.backward()
    loss.backward()
    assert torch.equal(now.loss, loss) and torch.equal(a.grad, b.grad)
    assert now.metrics == metrics and now.num_tokens == count


def test_tis_choice_gives_the_tis_weights_it_gave_and_no_mask_metrics():
    _, old, rollout, _, _, _, mask = _batch()
    w, metrics = A.importance_weights(old, rollout, mask, "tis", cap=1.02)
    assert torch.equal(w, A.tis_weights(old, rollout, mask, 1.02)) and metrics == {}
    assert A.importance_weights(old, rollout, mask, "none") == (None, {})
    with pytest.raises(ValueError, match="grpo.importance_correction"):
        A.importance_weights(old, rollout, mask, "icepop")
    with pytest.raises(ValueError, match="0 < low < 1 < high"):
        A.importance_weights(old, rollout, mask, "seq_mask")
    assert set(CHOICES["grpo.importance_correction"]) == set(A.IMPORTANCE_CORRECTIONS)
    assert set(CHOICES["grpo.policy_loss"]) == set(A.POLICY_LOSSES)


# -- the masks, by hand -------------------------------------------------------------------------------------
def test_token_mask_keeps_ratios_inside_the_bounds_and_never_counts_padding():
    # trainer/rollout ratios per token; the last column of row 0 and the first of row 1 are padding
    ratios = torch.tensor([[0.49, 0.501, 1.0, 1.99, 2.01, 50.0],
                           [1e-6, 1.2, 0.8, 0.3, 1.0, 1.0],
                           [3.0, 3.0, 0.1, 1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.float32)
    rollout = -torch.rand(3, 6, generator=torch.Generator().manual_seed(0)).double() - 1
    old = (rollout + ratios.log()).float()
    keep = A.importance_mask(old, rollout.float(), mask, 0.5, 2.0, "token")
    assert keep.tolist() == [[0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert keep.dtype == old.dtype
    m = A.masking_metrics(keep, mask)
    # 11 response tokens, 6 dropped (row 0: 0.49 and 2.01; row 1: 0.3; row 2: all three)
    assert m["masked_token_frac"] == pytest.approx(6 / 11)
    assert m["masked_seq_frac"] == pytest.approx(1 / 3)  # row 2 lost every token
    assert m["touched_seq_frac"] == 1.0  # every row lost at least one


def test_sequence_mask_on_the_geometric_mean_ratio_just_inside_and_just_outside():
    # per row, token log-ratios (old - rollout) whose mean is the row's log r_seq; bounds 0.999 / 1.001
    t = 6
    targets = [1.0009, 1.0011, 0.9991, 0.9989, 1.0]  # inside, outside, inside, outside, inside
    mask = torch.zeros(6, t)
    lengths = [4, 3, 6, 2, 5]
    gen = torch.Generator().manual_seed(3)
    rollout = -torch.rand(6, t, generator=gen, dtype=torch.float64) * 4
    diff = torch.zeros(6, t, dtype=torch.float64)
    for i, (r, n) in enumerate(zip(targets, lengths)):
        mask[i, :n] = 1.0
        spread = torch.linspace(-0.3, 0.3, n, dtype=torch.float64)  # tokens far apart, the mean is what counts
        diff[i, :n] = LN(r) + spread - spread.mean()
        diff[i, n:] = 5.0  # padding with wild ratios: must not count
    # row 5 has no response tokens at all
    old = rollout + diff
    keep = A.importance_mask(old, rollout, mask, 0.999, 1.001, "seq")
    assert keep.sum(-1).tolist() == [4, 0, 6, 0, 5, 0]
    assert torch.equal(keep, keep * mask)  # 0 on padding
    ratio = torch.exp(A.sequence_log_ratio(old, rollout, mask))
    assert ratio[:5].tolist() == pytest.approx(targets, abs=1e-12) and ratio[5] == 1.0
    w, metrics = A.importance_weights(old, rollout, mask, "seq_mask", low=0.999, high=1.001)
    assert torch.equal(w, keep)
    assert metrics["masked_token_frac"] == pytest.approx(5 / 20)  # rows 1 and 3: 3 + 2 of 20 tokens
    assert metrics["masked_seq_frac"] == metrics["touched_seq_frac"] == pytest.approx(2 / 5)  # row 5 not counted
    assert metrics["seq_ratio_min"] == pytest.approx(0.9989) and metrics["seq_ratio_max"] == pytest.approx(1.0011)
    # tis+seq_mask: the TIS weights where the sequence is kept, 0 elsewhere
    w, metrics2 = A.importance_weights(old, rollout, mask, "tis+seq_mask", cap=2.0, low=0.999, high=1.001)
    assert torch.equal(w, A.tis_weights(old, rollout, mask, 2.0) * keep) and metrics2 == metrics
    w, _ = A.importance_weights(old, rollout, mask, "tis+token_mask", cap=2.0, low=0.5, high=2.0)
    assert torch.equal(w, A.tis_weights(old, rollout, mask, 2.0) *
                       A.importance_mask(old, rollout, mask, 0.5, 2.0, "token"))


def test_masks_drop_nan_and_infinite_ratios():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    rollout = torch.tensor([[-math.inf, float("nan"), -1.0]])
    mask = torch.ones(1, 3)
    assert A.importance_mask(old, rollout, mask, 0.5, 2.0, "token").tolist() == [[0, 0, 1]]
    assert A.importance_mask(old, rollout, mask, 0.5, 2.0, "seq").tolist() == [[0, 0, 0]]


@pytest.mark.parametrize("loss", ["ppo", "gspo"])
def test_masked_tokens_contribute_no_gradient(loss):
    logp, old, rollout, ref, entropy, adv, mask = _batch(seed=4)
    adv = torch.tensor([1.3, -0.7, -1.6, 0.4, 0.9])
    logp[0, 2] = old[0, 2] + 0.1
    keep = A.importance_mask(old, rollout, mask, 0.97, 1.03, "token")
    assert 0 < float((keep * mask).sum()) < float(mask.sum())
    fn = A.policy_loss if loss == "ppo" else A.gspo_loss
    settings = dict(clip_low=0.2, clip_high=0.2, logratio_clamp=10.0, loss_cap=3.0, normalizer=float(mask.sum()),
                    aggregation="token_mean")
    x, y = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    fn(x, old, adv, mask, is_weights=keep, **settings).loss.backward()
    fn(y, old, adv, mask, **settings).loss.backward()
    dropped, kept = (mask.bool() & (keep == 0)), keep.bool()
    assert float(x.grad[dropped].abs().max()) == 0.0
    assert torch.equal(x.grad[kept], y.grad[kept])  # kept tokens: exactly the unmasked gradient
    assert float(y.grad[dropped].abs().max()) > 0  # they had a gradient before


# -- GSPO -----------------------------------------------------------------------------------------------------
def _gspo_by_hand(logp, old, adv, mask, *, clip_low, clip_high, logratio_clamp, loss_cap, normalizer, aggregation):
    """The sequence form, straight from the GSPO paper: s_i = (pi(y_i) / pi_old(y_i))^(1 / |y_i|), the clipped
    objective per sequence, summed over sequences (seq_mean) or weighted by their lengths (token_mean)."""
    total = logp.new_zeros(())
    for i in range(logp.shape[0]):
        m = mask[i].bool()
        if not m.any():
            continue
        s = torch.exp(torch.clamp((logp[i][m] - old[i][m]).mean(), max=logratio_clamp))
        pg = torch.maximum(-adv[i] * s, -adv[i] * torch.clamp(s, 1 - clip_low, 1 + clip_high))
        pg = torch.clamp(pg, max=loss_cap)
        total = total + (pg if aggregation == "seq_mean" else pg * int(m.sum()))
    return total / normalizer


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean"])
def test_gspo_loss_and_gradient_are_the_sequence_form(aggregation):
    logp, old, _, _, _, adv, mask = (t.double() for t in _batch(seed=1))
    logp[1, 5:] = old[1, 5:] + 3.5  # row 1 (4 tokens, A < 0): a large sequence ratio, the loss goes over the cap
    logp[4, 3:] = old[4, 3:] + 5  # row 4: mean log-ratio 5, clamped at 3; A = -0.1 keeps the loss under the cap
    adv = adv.clone()
    adv[4] = -0.1
    settings = dict(clip_low=0.2, clip_high=0.28, logratio_clamp=3.0, loss_cap=3.0, aggregation=aggregation,
                    normalizer=5.0 if aggregation == "seq_mean" else float(mask.sum()))
    x, y = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    out = A.gspo_loss(x, old, adv, mask, **settings)
    ref = _gspo_by_hand(y, old, adv, mask, **settings)
    out.loss.backward()
    ref.backward()
    assert abs(float(out.loss.detach() - ref.detach())) < 1e-12
    assert float((x.grad - y.grad).abs().max()) < 1e-12
    assert float(x.grad[~mask.bool()].abs().max()) == 0.0
    assert out.metrics["capped_frac"] > 0  # row 1's loss went over the cap: no gradient there
    assert float(x.grad[1].abs().max()) == 0.0
    assert float(x.grad[4].abs().max()) == 0.0  # the clamped sequence: no gradient, as in the sequence form


def test_gspo_clips_the_sequence_ratio():
    # one row per case, 3 response tokens each; token ratios differ, the geometric mean is the sequence ratio
    clip_low, clip_high = 3e-4, 4e-4
    cases = [(1.0002, 1.0), (1.0006, 1.0), (0.9994, -1.0), (0.9994, 1.0), (1.0006, -1.0)]
    old = torch.zeros(5, 3, dtype=torch.float64)
    spread = torch.tensor([-0.2, 0.05, 0.15], dtype=torch.float64)
    logp = torch.stack([LN(r) + spread for r, _ in cases]).requires_grad_()
    adv = torch.tensor([a for _, a in cases], dtype=torch.float64)
    mask = torch.ones(5, 3)
    out = A.gspo_loss(logp, old, adv, mask, clip_low=clip_low, clip_high=clip_high, logratio_clamp=10.0,
                      loss_cap=3.0, normalizer=5.0, aggregation="seq_mean")
    out.loss.backward()
    # per sequence: inside (gradient -A s / 3 / 5 per token), above with A > 0 (clipped: 1 + clip_high, no
    # gradient), below with A < 0 (clipped: 1 - clip_low, none), below with A > 0 and above with A < 0 (the
    # unclipped branch is the larger loss: it keeps its gradient)
    expected = [-1.0002, -(1 + clip_high), 1 - clip_low, -0.9994, 1.0006]
    assert float(out.loss.detach()) == pytest.approx(sum(expected) / 5, abs=1e-12)
    grads = logp.grad
    assert grads[0].tolist() == pytest.approx([-1.0002 / 15] * 3, abs=1e-12)
    assert grads[1].abs().max() == 0 and grads[2].abs().max() == 0
    assert grads[3].tolist() == pytest.approx([-0.9994 / 15] * 3, abs=1e-12)
    assert grads[4].tolist() == pytest.approx([1.0006 / 15] * 3, abs=1e-12)
    m = out.metrics  # token-weighted, like every actor metric (3 tokens per sequence here); summed in fp32
    assert m["seq_clip_frac_high"] == pytest.approx(1 / 5) and m["seq_clip_frac_low"] == pytest.approx(1 / 5)
    assert m["seq_clip_frac"] == pytest.approx(2 / 5)
    assert m["seq_ratio_mean"] == pytest.approx(sum(r for r, _ in cases) / 5, abs=1e-6)
    assert m["ratio_mean"] == pytest.approx(float(torch.exp(logp.detach()).mean()), abs=1e-6)


def test_gspo_on_packed_ids_is_the_padded_result():
    """Two rows holding three sequences (ids, as packed rows have them) give the per-row result."""
    logp, old, _, ref, entropy, adv, mask = (t.double() for t in _batch(seed=2, b=3, t=9))
    settings = dict(clip_low=0.1, clip_high=0.1, logratio_clamp=10.0, loss_cap=3.0, kl_coef=0.05,
                    entropy_coef=0.01, aggregation="seq_mean", normalizer=3.0)
    w = torch.rand(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * mask
    x = logp.clone().requires_grad_()
    padded = A.gspo_loss(x, old, adv, mask, ref_logp=ref, entropy=entropy, is_weights=w, **settings)
    padded.loss.backward()
    # pack: row 0 = samples 0 and 2 side by side, row 1 = sample 1 (then padding)
    cols = [(0, slice(0, 9)), (1, slice(0, 9)), (0, slice(9, 18))]

    def pack(t, fill=0.0):
        out = torch.full((2, 18), fill, dtype=t.dtype)
        for i, (row, span) in enumerate(cols):
            out[row, span] = t[i]
        return out

    y = logp.clone().requires_grad_()
    ids = pack(torch.arange(3).unsqueeze(-1).expand(3, 9), fill=-1).long()
    packed = A.gspo_loss(pack(y), pack(old), pack(adv.unsqueeze(-1).expand(3, 9)), pack(mask),
                         ref_logp=pack(ref), entropy=pack(entropy), is_weights=pack(w), seq_ids=ids, num_seqs=3,
                         **settings)
    packed.loss.backward()
    assert abs(float(packed.loss.detach() - padded.loss.detach())) < 1e-12 and float((x.grad - y.grad).abs().max()) < 1e-12
    assert packed.metrics == pytest.approx(padded.metrics, rel=1e-6)  # metrics are summed in fp32


def _gspo_cp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        logp, old, _, _, _, adv, mask = (t.double() for t in _batch(seed=6))
        ids = torch.arange(5).unsqueeze(-1).expand(5, 9)
        cols = torch.arange(9) % 2 == rank  # this rank's half of every sequence's tokens
        x = logp.clone().requires_grad_()
        res = A.gspo_loss(x[:, cols], old[:, cols], adv.unsqueeze(-1).expand(5, 9)[:, cols], mask[:, cols],
                          seq_ids=ids[:, cols], num_seqs=5, seq_group=dist.group.WORLD, clip_low=0.1, clip_high=0.1,
                          logratio_clamp=10.0, loss_cap=3.0, normalizer=5.0, aggregation="seq_mean")
        res.loss.backward()
        torch.save({"loss": res.loss.detach(), "grad": x.grad}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gspo_with_sequences_split_over_context_parallel_ranks(tmp_path):
    """Each sequence's tokens split over 2 gloo processes (as CP splits a packed sample): the sums are
    all-reduced, the losses add up and the gradients together are the one-process ones."""
    import torch.multiprocessing as mp

    from helpers import free_port

    mp.spawn(_gspo_cp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    logp, old, _, _, _, adv, mask = (t.double() for t in _batch(seed=6))
    x = logp.clone().requires_grad_()
    one = A.gspo_loss(x, old, adv, mask, clip_low=0.1, clip_high=0.1, logratio_clamp=10.0, loss_cap=3.0,
                      normalizer=5.0, aggregation="seq_mean")
    one.loss.backward()
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert abs(float(parts[0]["loss"] + parts[1]["loss"] - one.loss)) < 1e-12
    assert float((parts[0]["grad"] + parts[1]["grad"] - x.grad).abs().max()) < 1e-12


# -- configuration and the fused path -------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["grpo.importance_correction=seq_mask"], r"needs grpo.importance_low and grpo.importance_high .*0.999 / 1.001"),
    (["grpo.importance_correction=token_mask", "grpo.importance_low=0.5"], "needs grpo.importance_low and"),
    (["grpo.importance_correction=token_mask", "grpo.importance_low=1.0", "grpo.importance_high=2"],
     r"grpo.importance_low=1.0, grpo.importance_high=2.0 are not allowed: need 0 < low < 1 < high"),
    (["grpo.importance_correction=seq_mask", "grpo.importance_low=0", "grpo.importance_high=1.001"],
     "0 < low < 1 < high"),
    (["grpo.importance_correction=tis+seq_mask", "grpo.importance_low=0.999", "grpo.importance_high=0.9995"],
     "0 < low < 1 < high"),
    (["grpo.importance_correction=tis", "grpo.importance_high=1.001"], "have no effect with"),
    (["grpo.importance_correction=tis", "grpo.importance_cap=0"], "grpo.importance_cap=0.0 is not allowed"),
    (["grpo.importance_correction=icepop"], "choose one of none, tis, token_mask, seq_mask"),
    (["grpo.policy_loss=gspo", "grpo.use_fused_kernels=true"], r"grpo.policy_loss='gspo' with grpo.use_fused_kernels"),
    (["grpo.policy_loss=grpo"], "choose one of ppo, gspo"),
    (["grpo.sequence_packing=true", "grpo.loss_aggregation=seq_mean"], "only token_mean"),
])
def test_config_checks_name_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_config_accepts_every_choice():
    for choice in CHOICES["grpo.importance_correction"]:
        bounds = ["grpo.importance_low=0.999", "grpo.importance_high=1.001"] if "mask" in choice else []
        g = load_config("tiny", [f"grpo.importance_correction={choice}", *bounds]).grpo
        assert g.importance_correction == choice
    g = load_config("tiny", ["grpo.policy_loss=gspo", "grpo.clip_low=3e-4", "grpo.clip_high=4e-4",
                             "grpo.sequence_packing=true", "grpo.loss_aggregation=seq_mean"]).grpo
    assert (g.policy_loss, g.loss_aggregation) == ("gspo", "seq_mean")
    assert load_config("tiny").grpo.policy_loss == "ppo"
    cfg = load_config("moonlight-16b-a3b", ["grpo.policy_loss=gspo"])  # CP2 + packing: GSPO all-reduces over CP
    assert cfg.parallel.context == 2


def test_fused_path_refuses_gspo_naming_both_keys(monkeypatch):
    from cookbook.grpo.fused_loss import fused_loss_enabled, fused_policy_loss

    cfg = load_config("tiny", ["grpo.policy_loss=gspo"])
    cfg.grpo.use_fused_kernels = True  # past validation, as a notebook could set it
    with pytest.raises(ConfigError, match="grpo.policy_loss='gspo' with grpo.use_fused_kernels=true"):
        fused_loss_enabled(cfg)
    with pytest.raises(ConfigError, match="grpo.use_fused_kernels=false or grpo.policy_loss=ppo"):
        fused_policy_loss(torch.zeros(1, 3, 4), torch.zeros(8, 4), torch.zeros(1, 3, dtype=torch.long),
                          torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), g=cfg.grpo, normalizer=2.0)
    monkeypatch.setattr("cookbook.megatron.model.use_cuda", lambda cfg: True)
    masked = load_config("tiny", ["grpo.use_fused_kernels=true", "grpo.importance_correction=tis+seq_mask",
                                  "grpo.importance_low=0.999", "grpo.importance_high=1.001"])
    assert fused_loss_enabled(masked)  # masks reach the kernel as is_weights


# -- the trainer's step, one process --------------------------------------------------------------------------
OPTIONS = {  # name -> (overrides, kind of reference)
    "token_mask": (["grpo.importance_correction=token_mask", "grpo.importance_low=0.95",
                    "grpo.importance_high=1.05"], "ppo"),
    "seq_mask": (["grpo.importance_correction=seq_mask", "grpo.importance_low=0.99", "grpo.importance_high=1.01"],
                 "ppo"),
    "tis+token_mask": (["grpo.importance_correction=tis+token_mask", "grpo.importance_cap=1.03",
                        "grpo.importance_low=0.95", "grpo.importance_high=1.05"], "ppo"),
    "tis+seq_mask": (["grpo.importance_correction=tis+seq_mask", "grpo.importance_cap=1.03",
                      "grpo.importance_low=0.99", "grpo.importance_high=1.01"], "ppo"),
    "gspo_seq_mean": (["grpo.policy_loss=gspo", "grpo.loss_aggregation=seq_mean", "grpo.clip_low=0.01",
                       "grpo.clip_high=0.012"], "gspo"),
    "gspo_token_mean": (["grpo.policy_loss=gspo", "grpo.clip_low=0.01", "grpo.clip_high=0.012"], "gspo"),
    "gspo+seq_mask": (["grpo.policy_loss=gspo", "grpo.loss_aggregation=seq_mean", "grpo.clip_low=0.01",
                       "grpo.clip_high=0.012", "grpo.importance_correction=tis+seq_mask",
                       "grpo.importance_low=0.99", "grpo.importance_high=1.01"], "gspo"),
}


@pytest.fixture(scope="module")
def tiny():
    from cookbook.megatron.model import build_model, init_parallel

    torch.set_num_threads(1)
    cfg = load_config("tiny", ["grpo.sequence_packing=true", "grpo.packing_max_tokens=48", "grpo.micro_batch_size=2",
                               "grpo.temperature=0.9"])
    init_parallel(cfg)
    return cfg, build_model(cfg)


def _rollout(cfg, n=12, seed=5):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, cfg.model.vocab_size, (int(torch.randint(5, 14, (), generator=gen)),),
                             generator=gen).tolist() for _ in range(n)]
    responses = [torch.randint(2, cfg.model.vocab_size, (int(torch.randint(1, 12, (), generator=gen)),),
                               generator=gen).tolist() for _ in range(n)]
    return prompts, responses, A.group_advantages(torch.rand(n, generator=gen), n=4).tolist()


def _step(model, batch, g, fused=False):
    from cookbook.grpo.parallel_step import train_minibatch

    grads = {}

    def keep():
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    metrics = train_minibatch(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, g, fused=fused,
                              after_backward=keep)
    return metrics, grads


def _written_out(model, batch, g, kind):
    """The full batch in one forward, the loss written out: ``policy_loss`` with the weights (masks as 0/1), or
    GSPO's sequence form (``_gspo_by_hand``) with each sequence's weight (the masks are per sequence here or
    absent; TIS weights are per token: gspo+seq_mask's reference uses ``gspo_loss``' token form instead)."""
    from cookbook.megatron.model import forward_logits

    model.zero_grad(set_to_none=True)
    logp, entropy = A.token_logprobs(forward_logits(model, batch.input_ids, batch.position_ids)[:, :-1],
                                     batch.input_ids[:, 1:], temperature=g.temperature)
    normalizer = float(batch.mask.sum()) if g.loss_aggregation == "token_mean" else float(len(batch))
    settings = dict(clip_low=g.clip_low, clip_high=g.clip_high, logratio_clamp=g.logratio_clamp, loss_cap=g.loss_cap,
                    normalizer=normalizer, aggregation=g.loss_aggregation)
    if kind == "ppo":
        loss = A.policy_loss(logp, batch.old_logp, batch.advantages, batch.mask, is_weights=batch.is_weights,
                             **settings).loss
    elif batch.is_weights is None:
        loss = _gspo_by_hand(logp, batch.old_logp, batch.advantages, batch.mask, **settings)
    else:
        loss = A.gspo_loss(logp, batch.old_logp, batch.advantages, batch.mask, is_weights=batch.is_weights,
                           **settings).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _grad_error(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) > 10
    return max(float((a[n] - b[n]).abs().max()) / max(float(b[n].abs().max()), 1e-12) for n in a)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_trains_the_same_on_padded_and_packed_rows(tiny, option):
    from cookbook.grpo.packing import PackingSpec
    from cookbook.grpo.parallel_step import batch_from_rollout, forward_logprobs

    base, model = tiny
    overrides, kind = OPTIONS[option]
    g = load_config("tiny", ["grpo.sequence_packing=true", "grpo.packing_max_tokens=48", "grpo.micro_batch_size=2",
                             "grpo.temperature=0.9", *overrides]).grpo
    prompts, responses, adv = _rollout(base)
    padded = batch_from_rollout(prompts, responses, adv, pad_id=0)
    packed = batch_from_rollout(prompts, responses, adv, pad_id=0, packing=PackingSpec(g.packing_max_tokens))
    old = forward_logprobs(model, padded.input_ids, padded.position_ids, micro_batch_size=4,
                           temperature=g.temperature)
    gen = torch.Generator().manual_seed(1)
    # the rollout engine's log-probs: some tokens and sequences far off, the rest close
    rollout = old + 0.02 * torch.randn(old.shape, generator=gen)
    rollout[::3] += 0.1 * torch.randn(rollout[::3].shape, generator=gen)
    weights, metrics = A.importance_weights(old, rollout, padded.mask, g.importance_correction, cap=g.importance_cap,
                                            low=g.importance_low, high=g.importance_high)
    if "mask" in g.importance_correction:
        assert 0 < metrics["masked_token_frac"] < 1, metrics
    # the policy moved since the old log-probs (as after a first minibatch): ratios away from 1, some clipped
    extra = dict(old_logp=old - 0.01 * torch.randn(old.shape, generator=gen).abs() * (1 + torch.arange(12)[:, None]
                                                                                      % 3), is_weights=weights)
    ref_loss, ref_grads = _written_out(model, dataclasses.replace(padded, **extra), g, kind)
    m_pad, g_pad = _step(model, dataclasses.replace(padded, **extra), dataclasses.replace(g, micro_batch_size=4))
    m_pack, g_pack = _step(model, dataclasses.replace(packed, **extra), g)
    for m, grads in ((m_pad, g_pad), (m_pack, g_pack)):
        assert abs(m["loss"] - ref_loss) < 1e-5 * max(1.0, abs(ref_loss)), (m["loss"], ref_loss)
        assert _grad_error(grads, ref_grads) < 1e-4
    if kind == "gspo":
        for key in ("seq_clip_frac", "seq_ratio_mean", "ratio_mean", "pg_loss"):
            assert abs(m_pack[key] - m_pad[key]) < 1e-5, key
        assert 0 < m_pad["seq_clip_frac"] < 1  # some sequences clipped, not all
    else:
        assert abs(m_pack["is_weight_mean"] - m_pad["is_weight_mean"]) < 1e-6
    if kind == "ppo":  # the fused path (on CPU: the kernel's torch reference) takes the masks as is_weights
        for batch, gg, ref in ((padded, dataclasses.replace(g, micro_batch_size=4), g_pad), (packed, g, g_pack)):
            m_fused, g_fused = _step(model, dataclasses.replace(batch, **extra), gg, fused=True)
            assert abs(m_fused["loss"] - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
            assert _grad_error(g_fused, ref) < 1e-4
    else:
        with pytest.raises(ConfigError, match="grpo.policy_loss='gspo' with grpo.use_fused_kernels"):
            _step(model, dataclasses.replace(padded, **extra), dataclasses.replace(g, micro_batch_size=4), fused=True)


def test_train_step_computes_the_correction_over_the_whole_batch_and_logs_it(tiny, monkeypatch):
    """``TrainerRank.train_step`` (one rank): the masks from the step's old log-probs and the rollout's, passed to
    every minibatch as is_weights, their fractions as is/*."""
    import cookbook.grpo.parallel_step as PS
    from cookbook.grpo.trainer import TrainerRank

    base, model = tiny
    cfg = load_config("tiny", ["grpo.importance_correction=seq_mask", "grpo.importance_low=0.99",
                               "grpo.importance_high=1.01", "grpo.num_minibatches=2", "grpo.micro_batch_size=4",
                               "grpo.prompts_per_step=3", "grpo.samples_per_prompt=4"])
    prompts, responses, adv = _rollout(base)
    old = PS.forward_logprobs(model, PS.batch_from_rollout(prompts, responses, adv, pad_id=0), micro_batch_size=4,
                              temperature=cfg.grpo.temperature)
    gen = torch.Generator().manual_seed(2)
    _, mask, _ = A.build_training_batch(prompts, responses, 0)
    rollout_rows = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        scored = old[i, len(p) - 1:len(p) - 1 + len(r)]
        rollout_rows.append((scored + (0.05 if i % 3 == 0 else 0.001) * torch.randn(len(r), generator=gen)).tolist())
    rollout = A.align_rollout_logprobs(prompts, rollout_rows, mask)
    expected, expected_metrics = A.importance_weights(old, rollout, mask, "seq_mask", low=0.99, high=1.01)
    seen = []
    original = PS.train_minibatch

    def spy(model, optimizer, batch, g, **kw):
        seen.append(batch.is_weights)
        return original(model, optimizer, batch, g, **kw)

    monkeypatch.setattr(PS, "train_minibatch", spy)
    # the rank's own setup, with the fixture's weights instead of a converted checkpoint and no optimizer step
    monkeypatch.setattr("cookbook.convert.hf_to_mcore.load_megatron_checkpoint",
                        lambda target, path: target.load_state_dict(model.state_dict()))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "0")
    rank = TrainerRank(cfg, 0, 1)
    torch.set_num_threads(1)
    rank.setup("127.0.0.1", 0, "unused", pad_id=0)
    rank.optimizer = torch.optim.SGD(rank.model.parameters(), lr=0.0)
    metrics = rank.train_step({"prompt_ids": prompts, "response_ids": responses, "advantages": adv,
                               "rollout_logp": rollout_rows}, step=0)
    assert len(seen) == 2 and sum(int((w != 0).sum()) for w in seen) == int((expected != 0).sum())
    assert 0 < expected_metrics["masked_seq_frac"] < 1
    for key, value in expected_metrics.items():
        assert metrics[f"is/{key}"] == pytest.approx(value), key
    assert metrics["is/masked_seq_frac"] == pytest.approx(
        sum(int(not expected[i].any()) for i in range(12) if mask[i].any()) / 12)
