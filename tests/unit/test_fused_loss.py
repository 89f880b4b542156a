"""The trainer's fused-loss path (grpo.use_fused_kernels) gives the unfused path's loss, metrics and
gradients for every parameter. On CPU the kernel entry point runs its torch reference (kernels/grpo_loss.py
falls back to it off CUDA), so this checks the integration: the hidden-state capture, the output weight,
the shift and the flattening. The Triton kernels themselves are checked against the reference in
tests/kernels; the GPU test below runs the real kernel inside the real model."""
import pytest
import torch

from cookbook.config import ConfigError, load_config
from cookbook.grpo import algorithm as A
from cookbook.grpo.fused_loss import fused_loss_enabled, fused_policy_loss, hidden_states_instead_of_logits
from cookbook.megatron.model import build_model, forward_logits, init_parallel


def _batch(cfg, device, b=4, t=12):
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, cfg.model.vocab_size, (b, t), generator=g)
    position_ids = torch.arange(t).expand(b, t)
    mask = torch.rand(b, t - 1, generator=g) > 0.3
    old_logp = -torch.rand(b, t - 1, generator=g) * 6
    ref_logp = old_logp + 0.1 * torch.randn(b, t - 1, generator=g)
    advantages = torch.randn(b, generator=g)
    return [x.to(device) for x in (input_ids, position_ids, old_logp, ref_logp, advantages, mask)]


def _compare(cfg, device, tol):
    init_parallel(cfg)
    model = build_model(cfg)
    if device == "cuda":
        model = model.cuda()
    input_ids, position_ids, old_logp, ref_logp, advantages, mask = _batch(cfg, device)
    g, normalizer = cfg.grpo, float(mask.sum()) * 1.5  # a global normalizer larger than this micro-batch

    logp, entropy = A.token_logprobs(forward_logits(model, input_ids, position_ids)[:, :-1], input_ids[:, 1:],
                                     temperature=g.temperature)
    plain = A.policy_loss(logp, old_logp, advantages, mask, clip_low=g.clip_low, clip_high=g.clip_high,
                          logratio_clamp=g.logratio_clamp, loss_cap=g.loss_cap, normalizer=normalizer,
                          ref_logp=ref_logp, kl_coef=g.kl_coef, kl_estimator=g.kl_estimator, entropy=entropy,
                          entropy_coef=g.entropy_coef)
    plain.loss.backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    with hidden_states_instead_of_logits(model) as captured:
        hidden = forward_logits(model, input_ids, position_ids)
    fused = fused_policy_loss(hidden, captured.weight, input_ids, old_logp, advantages, mask, g=g,
                              normalizer=normalizer, ref_logp=ref_logp)
    fused.loss.backward()
    fused_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert fused.num_tokens == plain.num_tokens
    fused_loss, plain_loss = float(fused.loss.detach()), float(plain.loss.detach())
    assert abs(fused_loss - plain_loss) <= tol * max(1.0, abs(plain_loss))
    assert fused.metrics.keys() == plain.metrics.keys()
    for k in plain.metrics:
        assert abs(fused.metrics[k] - plain.metrics[k]) <= tol * max(1.0, abs(plain.metrics[k])), k
    assert fused_grads.keys() == plain_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        err = float((fused_grads[name] - grad).abs().max()) / max(float(grad.abs().max()), 1e-12)
        assert err <= tol, f"{name}: relative gradient error {err:.2e}"


def test_fused_path_matches_unfused_loss_metrics_and_gradients_on_cpu():
    torch.set_num_threads(1)
    cfg = load_config("tiny", overrides=["grpo.kl_coef=0.05", "grpo.entropy_coef=0.01", "grpo.temperature=0.9"])
    _compare(cfg, "cpu", tol=1e-5)


def test_parallel_step_with_the_fused_loss_matches_unfused():
    """The trainer's step (``parallel_step.train_minibatch``) with ``fused=True`` takes the hidden-state path
    through Megatron's schedule and ends with the same metrics and weights as the logits path."""
    import dataclasses

    from cookbook.grpo.parallel_step import batch_from_rollout, forward_logprobs, train_minibatch

    torch.set_num_threads(1)
    cfg = load_config("tiny", overrides=["grpo.kl_coef=0.05", "grpo.micro_batch_size=2"])
    init_parallel(cfg)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, cfg.model.vocab_size, (n,), generator=gen).tolist() for n in (5, 7, 4, 6)]
    responses = [torch.randint(2, cfg.model.vocab_size, (n,), generator=gen).tolist() for n in (6, 3, 8, 5)]
    results = {}
    for fused in (False, True):
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batch = batch_from_rollout(prompts, responses, [0.5, -1.0, 1.5, -0.2], pad_id=0)
        old = forward_logprobs(model, batch.input_ids, batch.position_ids, micro_batch_size=2)
        batch = dataclasses.replace(batch, old_logp=old, ref_logp=old - 0.05)
        metrics = train_minibatch(model, opt, batch, cfg.grpo, fused=fused)
        results[fused] = (metrics, forward_logprobs(model, batch.input_ids, batch.position_ids, micro_batch_size=2))
    (plain, plain_after), (fused, fused_after) = results[False], results[True]
    assert plain.keys() == fused.keys()
    for key in plain:
        assert abs(plain[key] - fused[key]) <= 1e-5 * max(1.0, abs(plain[key])), key
    assert float((plain_after - fused_after).abs().max()) < 1e-5


def test_output_layer_is_restored_after_the_capture():
    torch.set_num_threads(1)
    cfg = load_config("tiny")
    init_parallel(cfg)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.model.vocab_size, (1, 5))
    with hidden_states_instead_of_logits(model) as captured:
        hidden = forward_logits(model, ids)
    assert hidden.shape == (1, 5, cfg.model.hidden_size) and captured.weight is model.output_layer.weight
    assert forward_logits(model, ids).shape == (1, 5, cfg.model.vocab_size)


def test_switch_is_off_without_cuda_and_refuses_what_the_kernel_cannot_do(monkeypatch):
    cfg = load_config("tiny", overrides=["grpo.use_fused_kernels=true"])
    if not torch.cuda.is_available():
        assert not fused_loss_enabled(cfg)
    monkeypatch.setattr("cookbook.megatron.model.use_cuda", lambda cfg: True)
    assert fused_loss_enabled(cfg)
    assert not fused_loss_enabled(load_config("tiny", overrides=["grpo.use_fused_kernels=false"]))
    with pytest.raises(ConfigError, match="token_mean"):
        fused_loss_enabled(load_config("tiny", overrides=["grpo.use_fused_kernels=true",
                                                          "grpo.loss_aggregation=seq_mean"]))
    # tensor parallelism: the vocabulary-parallel kernel (tests/kernels/test_grpo_loss_tp.py)
    assert fused_loss_enabled(load_config("tiny", overrides=["grpo.use_fused_kernels=true", "parallel.tensor=2",
                                                             "parallel.sequence_parallel=true"]))


@pytest.mark.gpu
def test_fused_kernel_in_the_model_matches_unfused_on_gpu():
    cfg = load_config("tiny", overrides=["grpo.kl_coef=0.05", "grpo.entropy_coef=0.01", "parallel.gpus_per_node=1",
                                         "grpo.use_fused_kernels=true"])
    assert fused_loss_enabled(cfg)
    _compare(cfg, "cuda", tol=2e-4)  # fp32 model; the kernel's tf32-free GEMMs and fp32 reductions
