"""The trainer's step (``cookbook.grpo.parallel_step``) on one rank is the GRPO update written out: full logits,
``algorithm.policy_loss`` with KL and TIS weights, torch's global-norm clipping, AdamW, the router-bias update.
(Every other layout is compared with this one rank in tests/integration/test_parallel_layouts.py.)"""
import dataclasses

import pytest
import torch

from cookbook.config import load_config
from cookbook.grpo import algorithm as A
from cookbook.grpo.parallel_step import batch_from_rollout, forward_logprobs, train_minibatch
from cookbook.megatron.model import build_model, forward_logits, init_parallel, update_router_expert_bias


@pytest.mark.parametrize("micro_batch_size", [4, 2])
def test_one_rank_step_is_the_grpo_update_written_out(micro_batch_size):
    torch.set_num_threads(1)
    cfg = load_config("tiny", overrides=["grpo.kl_coef=0.05", "grpo.entropy_coef=0.01", "grpo.temperature=0.9",
                                         "moe.router_enable_expert_bias=true", "moe.router_bias_update_rate=0.01",
                                         f"grpo.micro_batch_size={micro_batch_size}", "grpo.lr=1e-3"])
    g = cfg.grpo
    init_parallel(cfg)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(2, cfg.model.vocab_size, (n,), generator=gen).tolist() for n in (5, 7, 4, 6)]
    responses = [torch.randint(2, cfg.model.vocab_size, (n,), generator=gen).tolist() for n in (6, 3, 8, 5)]
    batch = batch_from_rollout(prompts, responses, [0.5, -1.0, 1.5, -0.2], pad_id=0)

    stepped, written = build_model(cfg), build_model(cfg)  # the same seed: the same initial weights
    old = forward_logprobs(stepped, batch.input_ids, batch.position_ids, micro_batch_size=micro_batch_size,
                           temperature=g.temperature)
    ref = old + 0.1 * torch.randn(old.shape, generator=gen)
    is_weights = A.tis_weights(old, old + 0.05 * torch.randn(old.shape, generator=gen), batch.mask, cap=2.0)
    metrics = train_minibatch(stepped, torch.optim.AdamW(stepped.parameters(), lr=g.lr),
                              dataclasses.replace(batch, old_logp=old, ref_logp=ref, is_weights=is_weights), g)

    logp, entropy = A.token_logprobs(forward_logits(written, batch.input_ids, batch.position_ids)[:, :-1],
                                     batch.input_ids[:, 1:], temperature=g.temperature)
    assert float((logp.detach() - old).abs().max()) < 1e-5
    out = A.policy_loss(logp, old, batch.advantages, batch.mask, normalizer=float(batch.mask.sum()), ref_logp=ref,
                        is_weights=is_weights, entropy=entropy, **A.loss_settings(g))
    out.loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(written.parameters(), g.grad_clip))
    torch.optim.AdamW(written.parameters(), lr=g.lr).step()
    assert update_router_expert_bias(written)

    assert abs(metrics["loss"] - float(out.loss)) < 1e-6 and metrics["num_tokens"] == out.num_tokens
    assert abs(metrics["grad_norm"] - norm) < 1e-5 * norm
    for key in ("pg_loss", "kl", "entropy", "is_weight_mean", "clip_frac_low"):
        assert abs(metrics[key] - out.metrics[key]) < 1e-6, key
    # Adam turns a rounding-level gradient difference (micro-batches add up in another order) into an update
    # difference of up to lr for elements whose gradient is near zero: measured 1.4e-5 at lr 1e-3
    for (name, a), (_, b) in zip(stepped.state_dict().items(), written.state_dict().items()):
        if torch.is_tensor(a) and a.is_floating_point():
            assert float((a - b).abs().max()) < 0.1 * g.lr, name
    bias = [t for n, t in stepped.state_dict().items() if n.endswith("router.expert_bias")]
    assert bias and all(float(t.abs().max()) > 0 for t in bias)  # the bias moved
