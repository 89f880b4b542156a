"""GRPO algorithm against hand-computed values (the small numbers are written out in each test)."""
import math

import pytest
import torch

from cookbook.grpo.algorithm import (align_rollout_logprobs, build_training_batch, group_advantages, kl_estimate,
                                     mismatch_metrics, pad_and_mask, policy_loss, split_minibatches, tis_weights,
                                     token_logprobs)

LN = math.log


# -- advantages ---------------------------------------------------------------------------------
def test_group_advantages_population_std_by_hand():
    # group [1, 0, 0, 1]: mean 0.5, population std 0.5 -> +-0.5 / (0.5 + 1e-5) = +-0.99998
    adv = group_advantages([1, 0, 0, 1, 1, 1, 1, 1], n=4)
    a = 0.5 / (0.5 + 1e-5)
    assert adv[:4].tolist() == pytest.approx([a, -a, -a, a], abs=1e-6)
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # an all-correct group teaches nothing
    # group [1, 0, 0, 0]: mean 0.25, population std sqrt(3)/4 = 0.4330 -> 0.75/0.4330 = 1.7320, -0.25/0.4330
    adv = group_advantages(torch.tensor([[1.0, 0, 0, 0]]), n=4)
    assert adv.shape == (1, 4)  # the input's shape is kept
    assert adv[0].tolist() == pytest.approx([1.732011, -0.577337, -0.577337, -0.577337], abs=1e-5)


def test_group_advantages_unbiased_std_and_drgrpo():
    # unbiased std of [1, 0, 0, 1] = sqrt(1/3) = 0.57735 -> 0.5 / 0.57736 = 0.866017
    adv = group_advantages([1, 0, 0, 1], n=4, unbiased_std=True)
    assert adv.tolist() == pytest.approx([0.866017, -0.866017, -0.866017, 0.866017], abs=1e-5)
    assert group_advantages([1, 0, 0, 1], n=4, method="drgrpo").tolist() == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages([1, 0, 0, 0], n=4, method="drgrpo").tolist() == [0.75, -0.25, -0.25, -0.25]


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="grpo.advantage"):
        group_advantages([1, 0], n=2, method="ppo")
    with pytest.raises(ValueError, match="groups of n=4"):
        group_advantages([1, 0, 1], n=4)
    with pytest.raises(ValueError, match="groups of n=4"):
        group_advantages(torch.zeros(2, 3), n=4)


# -- the clipped loss ---------------------------------------------------------------------------
def _loss(logp, old, adv, **kw):
    mask = torch.ones_like(logp)
    args = dict(clip_low=0.2, clip_high=0.2, logratio_clamp=10.0, loss_cap=3.0, normalizer=float(mask.numel()))
    args.update(kw)
    return policy_loss(logp, old, adv, mask, **args)


def test_clipped_loss_by_hand_positive_and_negative_advantage():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.1, 1.5, 0.5, 0.9]]))  # ratios 1.1 (inside), 1.5 (above), 0.5 (below), 0.9
    # A = +1: max(-r, -clip(r)): 1.1 -> -1.1; 1.5 -> -1.2 (clipped); 0.5 -> -0.5 (unclipped is larger); 0.9 -> -0.9
    out = _loss(logp, old, torch.tensor([1.0]))
    assert out.loss.item() == pytest.approx(-(1.1 + 1.2 + 0.5 + 0.9) / 4, abs=1e-6)  # -0.925
    assert out.metrics["clip_frac_high"] == pytest.approx(0.25) and out.metrics["clip_frac_low"] == 0.0
    assert out.metrics["ratio_mean"] == pytest.approx((1.1 + 1.5 + 0.5 + 0.9) / 4)
    # A = -1: max(r, clip(r)): 1.1 -> 1.1; 1.5 -> 1.5; 0.5 -> 0.8 (clipped); 0.9 -> 0.9
    out = _loss(logp, old, torch.tensor([-1.0]))
    assert out.loss.item() == pytest.approx((1.1 + 1.5 + 0.8 + 0.9) / 4, abs=1e-6)  # 1.075
    assert out.metrics["clip_frac_low"] == pytest.approx(0.25) and out.metrics["clip_frac_high"] == 0.0
    assert out.num_tokens == 4


def test_two_tokens_asymmetric_clip():
    # clip_low 0.2, clip_high 0.28 (DAPO-style): ratio 1.25 is inside [0.8, 1.28], 1.5 is clipped to 1.28
    out = _loss(torch.log(torch.tensor([[1.25, 1.5]])), torch.zeros(1, 2), torch.tensor([2.0]), clip_high=0.28)
    assert out.loss.item() == pytest.approx((-2 * 1.25 - 2 * 1.28) / 2, abs=1e-6)
    # A = -2, ratios 0.7 and 0.85 with clip_low 0.1: 0.7 -> max(1.4, 2*0.9=1.8) = 1.8; 0.85 -> max(1.7, 1.8) = 1.8
    out = _loss(torch.log(torch.tensor([[0.7, 0.85]])), torch.zeros(1, 2), torch.tensor([-2.0]), clip_low=0.1)
    assert out.loss.item() == pytest.approx(1.8, abs=1e-6)
    assert out.metrics["clip_frac_low"] == 1.0


def test_gradient_is_zero_on_the_clipped_branch_and_exact_elsewhere():
    # d/dlogp of -A * exp(logp - old) is -A * ratio; clipped and capped tokens get exactly 0
    logp = torch.log(torch.tensor([[1.1, 1.5, 0.5, 0.7]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0]])  # per-token advantages
    out = _loss(logp, torch.zeros(1, 4), adv, normalizer=1.0)
    out.loss.backward()
    # 1.1, A>0: inside -> -1.1 | 1.5, A>0: clipped -> 0 | 0.5, A<0: clipped -> 0 | 0.7, A>0: unclipped -> -0.7
    assert logp.grad[0].tolist() == pytest.approx([-1.1, 0.0, 0.0, -0.7], abs=1e-6)
    # A<0 with ratio above 1 + clip_high is NOT clipped (pessimistic bound): gradient -A * ratio = 1.5
    logp2 = torch.log(torch.tensor([[1.5]])).requires_grad_()
    _loss(logp2, torch.zeros(1, 1), torch.tensor([-1.0]), normalizer=1.0).loss.backward()
    assert logp2.grad.item() == pytest.approx(1.5, abs=1e-6)


def test_loss_cap_and_logratio_clamp():
    # ratio e^2 = 7.389 with A = -1 -> 7.389, capped at 3, and the capped token has no gradient
    logp = torch.tensor([[2.0, 0.0]], requires_grad=True)
    out = _loss(logp, torch.zeros(1, 2), torch.tensor([-1.0]))
    assert out.loss.item() == pytest.approx((3.0 + 1.0) / 2)
    assert out.metrics["capped_frac"] == 0.5 and out.metrics["pg_loss"] == pytest.approx(2.0)
    out.loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([0.0, 0.5])
    # log-ratio 50 is clamped at 10 before exp: ratio e^10 = 22026.47, not inf; no gradient past the clamp
    logp = torch.tensor([[50.0]], requires_grad=True)
    out = _loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), loss_cap=None)
    assert out.loss.item() == pytest.approx(math.exp(10), rel=1e-5)
    out.loss.backward()
    assert logp.grad.item() == 0.0
    # without the clamp the same token overflows
    assert math.isinf(_loss(torch.tensor([[100.0]]), torch.zeros(1, 1), torch.tensor([-1.0]), loss_cap=None,
                            logratio_clamp=None).loss.item())


# -- KL, entropy, importance weights --------------------------------------------------------------
def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])  # d = ref - logp = [-0.5, +1.0]
    assert kl_estimate(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    assert kl_estimate(logp, ref, "k2").tolist() == pytest.approx([0.125, 0.5])
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx([math.exp(-0.5) + 0.5 - 1, math.e - 2])
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx([0.106531, 0.718282], abs=1e-6)
    with pytest.raises(ValueError, match="grpo.kl_estimator"):
        kl_estimate(logp, ref, "k4")


def test_kl_is_logged_at_coefficient_zero_and_added_otherwise():
    logp, old, ref = torch.zeros(1, 2), torch.zeros(1, 2), torch.full((1, 2), -0.5)
    k3 = math.exp(-0.5) + 0.5 - 1
    out0 = _loss(logp, old, torch.tensor([1.0]), ref_logp=ref)
    assert out0.loss.item() == pytest.approx(-1.0) and out0.metrics["kl"] == pytest.approx(k3)
    out1 = _loss(logp, old, torch.tensor([1.0]), ref_logp=ref, kl_coef=0.1)
    assert out1.loss.item() == pytest.approx(-1.0 + 0.1 * k3)
    out2 = _loss(logp, old, torch.tensor([1.0]), ref_logp=ref, kl_coef=0.1, kl_estimator="k2")
    assert out2.loss.item() == pytest.approx(-1.0 + 0.1 * 0.125) and out2.metrics["kl"] == pytest.approx(0.125)
    with pytest.raises(ValueError, match="needs ref_logp"):
        _loss(logp, old, torch.tensor([1.0]), kl_coef=0.1)


def test_entropy_bonus_and_metric():
    out = _loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1.0]), entropy=torch.tensor([[1.0, 3.0]]),
                entropy_coef=0.01)
    assert out.loss.item() == pytest.approx(-1.0 - 0.01 * 2.0) and out.metrics["entropy"] == pytest.approx(2.0)


def test_is_weights_scale_the_capped_policy_loss_without_gradient():
    w = torch.tensor([[0.5, 2.0]], requires_grad=True)
    out = _loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1.0]), is_weights=w)
    assert out.loss.item() == pytest.approx(-(0.5 + 2.0) / 2) and out.metrics["is_weight_mean"] == 1.25
    assert not out.loss.requires_grad  # only the (detached) weights required grad
    # the cap applies before the weight: ratio e^2, A = -1 -> min(7.39, 3) * 2 = 6
    out = _loss(torch.tensor([[2.0]]), torch.zeros(1, 1), torch.tensor([-1.0]), is_weights=torch.tensor([[2.0]]))
    assert out.loss.item() == pytest.approx(6.0)


def test_tis_weights_are_capped_detached_and_masked():
    old = torch.tensor([[0.0, 0.0, 0.0, -1.0]], requires_grad=True)
    rollout = torch.tensor([[0.0, -2.0, -0.5, -0.5]])
    # exp(old - rollout) = [1, e^2 = 7.39 -> cap 2, e^0.5 but masked -> 0, e^-0.5 = 0.6065]
    w = tis_weights(old, rollout, torch.tensor([[1.0, 1.0, 0.0, 1.0]]), cap=2.0)
    assert w.tolist()[0] == pytest.approx([1.0, 2.0, 0.0, math.exp(-0.5)])
    assert not w.requires_grad


def test_mismatch_metrics_by_hand():
    m = mismatch_metrics(torch.tensor([[-1.0, -2.0, -3.0, -0.5]]), torch.tensor([[-1.0, -2.6, -9.0, -0.3]]),
                         torch.tensor([[1.0, 1.0, 0.0, 1.0]]), threshold=0.5)
    # valid diffs (trainer - rollout): 0, 0.6, -0.2 -> |d| mean 0.8/3, max 0.6, over 0.5: 1 of 3
    assert m["abs_diff_mean"] == pytest.approx(0.8 / 3) and m["abs_diff_max"] == pytest.approx(0.6)
    assert m["frac_over_threshold"] == pytest.approx(1 / 3)
    # k3 of KL(rollout || trainer): e^d - d - 1 per token with d = trainer - rollout
    k3 = (0 + (math.exp(0.6) - 0.6 - 1) + (math.exp(-0.2) + 0.2 - 1)) / 3
    assert m["kl_k3"] == pytest.approx(k3, abs=1e-6)
    assert mismatch_metrics(torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2), 0.5)["abs_diff_max"] == 0.0


# -- aggregation ----------------------------------------------------------------------------------
def test_token_mean_vs_seq_mean_with_unequal_lengths():
    logp = torch.zeros(2, 3)  # ratio 1 everywhere: per-token loss = -A
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    # seq0 has 1 token at -1, seq1 3 tokens at +1: token_mean = (-1 + 3) / 4 = 0.5; seq_mean = (-1 + 1) / 2 = 0
    tok = policy_loss(logp, logp, adv, mask, normalizer=4.0, aggregation="token_mean")
    assert tok.loss.item() == pytest.approx(0.5)
    seq = policy_loss(logp, logp, adv, mask, normalizer=2.0, aggregation="seq_mean")
    assert seq.loss.item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="grpo.loss_aggregation"):
        policy_loss(logp, logp, adv, mask, normalizer=2.0, aggregation="sum")


def test_padding_never_leaks_into_the_loss():
    # a -inf reference log-prob on a padded column would make k3 = inf there; inf * 0 would be nan
    logp = torch.zeros(1, 3, requires_grad=True)
    ref = torch.tensor([[0.0, 0.0, -math.inf]])
    out = policy_loss(logp, logp.detach(), torch.tensor([1.0]), torch.tensor([[1.0, 1.0, 0.0]]), normalizer=2.0,
                      ref_logp=ref, kl_coef=0.1)
    assert out.loss.item() == pytest.approx(-1.0) and out.metrics["kl"] == 0.0
    out.loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2].item() == 0.0


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_micro_batches_add_up_to_the_full_batch_loss_and_gradient(aggregation):
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(6, 5, generator=gen).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(6, 5, generator=gen)  # some tokens clipped
    adv, ref = torch.randn(6, generator=gen), logp.detach() - 0.1
    mask = (torch.rand(6, 5, generator=gen) > 0.3).float()
    mask[:, 0] = 1.0
    n = float(mask.sum()) if aggregation == "token_mean" else 6.0
    kw = dict(normalizer=n, aggregation=aggregation, kl_coef=0.05)
    full = policy_loss(logp, old, adv, mask, ref_logp=ref, **kw)
    (g_full,) = torch.autograd.grad(full.loss, logp)
    total = 0.0
    for s in (slice(0, 1), slice(1, 4), slice(4, 6)):
        total = total + policy_loss(logp[s], old[s], adv[s], mask[s], ref_logp=ref[s], **kw).loss
    (g_parts,) = torch.autograd.grad(total, logp)
    assert total.item() == pytest.approx(full.loss.item(), abs=1e-6)
    assert torch.allclose(g_parts, g_full, atol=1e-7)
    assert full.metrics["clip_frac_low"] + full.metrics["clip_frac_high"] > 0  # the example exercises the clip


def test_policy_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="old_logp has shape"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3), normalizer=6.0)
    with pytest.raises(ValueError, match="advantages of shape"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3), normalizer=6.0)
    with pytest.raises(ValueError, match="normalizer"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), normalizer=0.0)


# -- log-probs and the label shift ------------------------------------------------------------------
def test_token_logprobs_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0]]], dtype=torch.bfloat16)
    logp, ent = token_logprobs(logits, torch.tensor([[0]]))
    z = math.exp(2) + 2  # log p(0) = 2 - ln z; entropy = -sum p ln p
    p = [math.exp(2) / z, 1 / z, 1 / z]
    assert logp.dtype == torch.float32 and logp.item() == pytest.approx(2 - LN(z), abs=1e-6)
    assert ent.item() == pytest.approx(-sum(q * LN(q) for q in p), abs=1e-6)
    # temperature 2 halves the logits: log p(0) = 1 - ln(e + 2)
    logp_t, _ = token_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    assert logp_t.item() == pytest.approx(1 - LN(math.e + 2), abs=1e-6)
    with pytest.raises(ValueError, match="grpo.temperature"):
        token_logprobs(logits, torch.tensor([[0]]), temperature=0.0)


def test_pad_and_mask():
    ids, mask = pad_and_mask([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_label_shift_and_alignment():
    ids, mask, pos = build_training_batch([[1, 2, 3], [4, 5]], [[6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 6, 7], [4, 5, 8, 0, 0]]
    # mask[:, t] = 1 when input_ids[:, t + 1] is a response token: row 0 targets (2, 3, 6, 7) -> 0 0 1 1;
    # row 1 targets (5, 8, pad, pad) -> 0 1 0 0
    assert mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert ids[:, 1:][mask.bool()].tolist() == [6, 7, 8]  # exactly the response tokens are scored
    assert pos.tolist() == [[0, 1, 2, 3, 4]] * 2
    rl = align_rollout_logprobs([[1, 2, 3], [4, 5]], [[-0.1, -0.2], [-0.3]], mask)
    assert torch.allclose(rl, torch.tensor([[0, 0, -0.1, -0.2], [0, -0.3, 0, 0]]))
    with pytest.raises(ValueError, match="returned 1 log-probs for 2 response tokens"):
        align_rollout_logprobs([[1, 2, 3], [4, 5]], [[-0.1], [-0.3]], mask)
    # logits at column t predict token t + 1: make column 2 (token 3) predict 6 strongly
    logits = torch.zeros(2, 5, 10)
    logits[0, 2, 6] = 5.0
    logp, ent = token_logprobs(logits[:, :-1], ids[:, 1:])
    assert logp[0, 2].item() == pytest.approx(5 - LN(math.exp(5) + 9), abs=1e-6)
    assert logp[0, 3].item() == pytest.approx(-LN(10), abs=1e-6)  # column 3 (token 6) predicting 7: uniform
    assert ent[1, 0].item() == pytest.approx(LN(10), abs=1e-6)
    with pytest.raises(ValueError, match="empty prompt"):
        build_training_batch([[]], [[1]], pad_id=0)


def test_split_minibatches_is_a_seeded_partition():
    parts = split_minibatches(8, 2, seed=3)
    assert sorted(torch.cat(parts).tolist()) == list(range(8)) and [len(p) for p in parts] == [4, 4]
    assert [p.tolist() for p in parts] == [p.tolist() for p in split_minibatches(8, 2, seed=3)]
    assert [p.tolist() for p in parts] != [p.tolist() for p in split_minibatches(8, 2, seed=4)]
    sub = split_minibatches([10, 11, 12, 13, 14, 15], 3, seed=0)  # explicit indices are shuffled, not replaced
    assert sorted(torch.cat(sub).tolist()) == [10, 11, 12, 13, 14, 15] and len(sub) == 3
    with pytest.raises(ValueError, match="equal minibatches"):
        split_minibatches(7, 2, seed=0)
