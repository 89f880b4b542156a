"""GRPO algorithm against hand-computed values."""
import math

import pytest
import torch

from cookbook.grpo.algorithm import (align_rollout_logprobs, build_training_batch, group_advantages, kl_estimate,
                                     mismatch_metrics, policy_loss, split_minibatches, tis_weights, token_logprobs)


def test_group_advantages_by_hand():
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) = 0.57735
    adv = group_advantages([1, 0, 0, 1, 1, 1, 1, 1], n=4)
    assert adv[:4].tolist() == pytest.approx([0.866017, -0.866017, -0.866017, 0.866017], abs=1e-5)
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # an all-correct group teaches nothing
    assert group_advantages([1, 0, 0, 1], n=4, method="drgrpo").tolist() == [0.5, -0.5, -0.5, 0.5]
    with pytest.raises(ValueError, match="grpo or drgrpo"):
        group_advantages([1, 0], n=2, method="ppo")


def _loss(logp, old, adv, **kw):
    mask = torch.ones_like(logp)
    args = dict(clip_low=0.2, clip_high=0.2, logratio_clamp=10.0, loss_cap=3.0, normalizer=float(mask.numel()))
    args.update(kw)
    return policy_loss(logp, old, adv, mask, **args)


def test_clipped_loss_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.1, 1.5, 0.5, 0.9]]))
    # A = +1: tokens with ratio 1.1 -> -1.1; 1.5 -> clipped -1.2; 0.5 -> -0.5 (min objective keeps unclipped);
    # 0.9 -> -0.9. Mean = -(1.1 + 1.2 + 0.5 + 0.9) / 4 = -0.925
    out = _loss(logp, old, torch.tensor([1.0]))
    assert out.loss.item() == pytest.approx(-0.925, abs=1e-6)
    assert out.metrics["clip_frac_high"] == pytest.approx(0.25)
    # A = -1: 1.1 -> 1.1; 1.5 -> 1.5; 0.5 -> clipped 0.8; 0.9 -> 0.9. Mean = 4.3 / 4 = 1.075
    out = _loss(logp, old, torch.tensor([-1.0]))
    assert out.loss.item() == pytest.approx(1.075, abs=1e-6)
    assert out.metrics["clip_frac_low"] == pytest.approx(0.25)


def test_asymmetric_clip_and_zero_gradient_when_clipped():
    logp = torch.log(torch.tensor([[1.25]])).requires_grad_()
    out = _loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), clip_high=0.28)
    assert out.loss.item() == pytest.approx(-1.25, abs=1e-6)  # inside [0.8, 1.28]
    out.loss.backward()
    assert logp.grad.item() == pytest.approx(-1.25, abs=1e-6)
    logp2 = torch.log(torch.tensor([[1.5]])).requires_grad_()
    out = _loss(logp2, torch.zeros(1, 1), torch.tensor([1.0]), clip_high=0.28)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-1.28, abs=1e-6) and logp2.grad.item() == 0.0


def test_loss_cap_and_logratio_clamp():
    # ratio e^2 = 7.39 with A = -1 -> 7.39, capped at 3
    out = _loss(torch.tensor([[2.0]]), torch.zeros(1, 1), torch.tensor([-1.0]))
    assert out.loss.item() == pytest.approx(3.0) and out.metrics["capped_frac"] == 1.0
    # log-ratio 50 is clamped at 10 before exp: ratio e^10, not inf
    out = _loss(torch.tensor([[50.0]]), torch.zeros(1, 1), torch.tensor([-1.0]), loss_cap=None)
    assert out.loss.item() == pytest.approx(math.exp(10), rel=1e-5)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # log(ref/pi) = -0.5
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


def test_kl_is_logged_at_coefficient_zero_and_added_otherwise():
    logp, old, ref = torch.zeros(1, 2), torch.zeros(1, 2), torch.full((1, 2), -0.5)
    k3 = math.exp(-0.5) + 0.5 - 1
    out0 = _loss(logp, old, torch.tensor([1.0]), ref_logp=ref)
    assert out0.loss.item() == pytest.approx(-1.0) and out0.metrics["kl"] == pytest.approx(k3)
    out1 = _loss(logp, old, torch.tensor([1.0]), ref_logp=ref, kl_coef=0.1)
    assert out1.loss.item() == pytest.approx(-1.0 + 0.1 * k3)


def test_token_mean_vs_seq_mean_with_unequal_lengths():
    logp = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    # per-token losses: seq0 -> -1 (1 token); seq1 -> +1 x 3 tokens
    tok = policy_loss(logp, logp, adv, mask, normalizer=4.0, aggregation="token_mean")
    assert tok.loss.item() == pytest.approx((-1 + 3) / 4)
    seq = policy_loss(logp, logp, adv, mask, normalizer=2.0, aggregation="seq_mean")
    assert seq.loss.item() == pytest.approx((-1 + 1) / 2)


def test_micro_batches_add_up_to_the_full_batch_loss_and_gradient():
    torch.manual_seed(0)
    logp = torch.randn(6, 5).requires_grad_()
    old, adv = logp.detach() + 0.1 * torch.randn(6, 5), torch.randn(6)
    mask = (torch.rand(6, 5) > 0.3).float()
    n = float(mask.sum())
    full = policy_loss(logp, old, adv, mask, normalizer=n)
    (g_full,) = torch.autograd.grad(full.loss, logp)
    total = 0.0
    for s in (slice(0, 2), slice(2, 6)):
        part = policy_loss(logp[s], old[s], adv[s], mask[s], normalizer=n)
        total = total + part.loss
    (g_parts,) = torch.autograd.grad(total, logp)
    assert total.item() == pytest.approx(full.loss.item(), abs=1e-6)
    assert torch.allclose(g_parts, g_full, atol=1e-7)


def test_is_weights_scale_the_policy_loss():
    out = _loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1.0]), is_weights=torch.tensor([[0.5, 2.0]]))
    assert out.loss.item() == pytest.approx(-(0.5 + 2.0) / 2)


def test_tis_weights_are_capped_and_masked():
    w = tis_weights(torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[0.0, -2.0, -0.5]]), torch.tensor([[1.0, 1.0, 0.0]]),
                    cap=2.0)
    assert w.tolist()[0] == pytest.approx([1.0, 2.0, 0.0])


def test_mismatch_metrics_by_hand():
    m = mismatch_metrics(torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.0, -2.6, -9.0]]),
                         torch.tensor([[1.0, 1.0, 0.0]]), threshold=0.5)
    assert m["abs_diff_mean"] == pytest.approx(0.3) and m["abs_diff_max"] == pytest.approx(0.6)
    assert m["frac_over_threshold"] == pytest.approx(0.5)
    assert m["kl_k3"] == pytest.approx((0 + (math.exp(0.6) - 0.6 - 1)) / 2, abs=1e-6)


def test_label_shift_and_alignment():
    ids, mask, pos = build_training_batch([[1, 2, 3], [4, 5]], [[6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 6, 7], [4, 5, 8, 0, 0]]
    # logits at column t predict token t+1: responses start predicting at the last prompt position
    assert mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert pos.tolist()[1] == [0, 1, 2, 3, 4]
    rl = align_rollout_logprobs([[1, 2, 3], [4, 5]], [[-0.1, -0.2], [-0.3]], mask)
    assert torch.allclose(rl, torch.tensor([[0, 0, -0.1, -0.2], [0, -0.3, 0, 0]]))
    logits = torch.zeros(2, 5, 10)
    logits[0, 2, 6] = 5.0  # position 2 (token 3) strongly predicts token 6
    logp, ent = token_logprobs(logits[:, :-1], ids[:, 1:])
    assert logp[0, 2].item() == pytest.approx(5 - math.log(math.exp(5) + 9), abs=1e-6)
    assert ent[1, 0].item() == pytest.approx(math.log(10), abs=1e-6)


def test_split_minibatches_is_a_seeded_partition():
    parts = split_minibatches(8, 2, seed=3)
    assert sorted(torch.cat(parts).tolist()) == list(range(8)) and len(parts) == 2
    assert [p.tolist() for p in parts] == [p.tolist() for p in split_minibatches(8, 2, seed=3)]
    with pytest.raises(ValueError, match="equal minibatches"):
        split_minibatches(7, 2, seed=0)
