"""The MLA + MoE GPTModel built from the preset: structure, the project's core attention, and the MoE
router knobs taking effect (expert-bias updates on/off, aux loss in the gradient)."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cookbook.config import ConfigError, load_config
from cookbook.megatron.attention import MLACoreAttention
from cookbook.megatron.model import (build_model, forward_logits, init_parallel, moe_aux_loss, transformer_config,
                                     update_router_expert_bias)


def _model(*overrides):
    torch.set_num_threads(1)
    cfg = load_config("tiny", overrides=list(overrides))
    init_parallel(cfg)
    return cfg, build_model(cfg)


def test_structure_follows_the_preset():
    cfg, model = _model()
    layers = model.decoder.layers
    assert len(layers) == cfg.model.num_layers
    assert not hasattr(layers[0].mlp, "router") and hasattr(layers[1].mlp, "router")  # first layer dense
    assert all(isinstance(layer.self_attention.core_attention, MLACoreAttention) for layer in layers)
    att = layers[0].self_attention.core_attention
    assert (att.k_channels, att.v_channels) == (32 + 64, 32)
    assert math.isclose(att.softmax_scale, (32 + 64) ** -0.5)  # plain rope: no YaRN mscale
    c = model.config
    assert (c.moe_router_score_function, c.moe_router_topk_scaling_factor, c.qk_layernorm) == ("sigmoid", 1.0, True)
    assert layers[1].mlp.router.expert_bias.shape == (cfg.model.num_experts,)
    logits = forward_logits(model, torch.randint(0, 512, (2, 9)))
    assert logits.shape == (2, 9, cfg.model.vocab_size)


def test_alltoall_dispatcher_refused_on_cpu():
    cfg = load_config("tiny", overrides=["moe.token_dispatcher_type=alltoall"])
    with pytest.raises(ConfigError, match="allgather"):
        transformer_config(cfg)


def _reference_attention(q, k, v, scale):
    s = q.shape[0]
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * scale
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v).reshape(s, q.shape[1], -1)


def test_core_attention_matches_reference_with_mla_head_sizes():
    cfg = SimpleNamespace(context_parallel_size=1, attention_dropout=0.0)
    att = MLACoreAttention.__new__(MLACoreAttention)
    torch.nn.Module.__init__(att)
    att.__dict__.update(softmax_scale=0.3, dropout_p=0.0, fused_kernel=None, config=cfg)
    q, k, v = torch.randn(7, 2, 3, 12), torch.randn(7, 2, 3, 12), torch.randn(7, 2, 3, 8)  # dk != dv
    out = att(q, k, v, None)
    assert out.shape == (7, 2, 24) and torch.allclose(out, _reference_attention(q, k, v, 0.3), atol=1e-5)
    # packed: two sequences (4 + 3 tokens) attend only within themselves
    qt, kt, vt = (x[:, 0] for x in (q, k, v))
    packed = att(qt, kt, vt, None, packed_seq_params=SimpleNamespace(cu_seqlens_q=torch.tensor([0, 4, 7])))
    first = _reference_attention(q[:4, :1], k[:4, :1], v[:4, :1], 0.3)[:, 0]
    second = _reference_attention(q[4:, :1], k[4:, :1], v[4:, :1], 0.3)[:, 0]
    assert torch.allclose(packed, torch.cat([first, second]), atol=1e-5)
    # padding mask (True = masked) on top of the causal mask: masked keys get no weight
    mask = torch.zeros(2, 1, 7, 7, dtype=torch.bool)
    mask[..., 5:] = True
    masked = att(q, k, v, mask)
    assert torch.allclose(masked[:5], _reference_attention(q[:5], k[:5], v[:5], 0.3), atol=1e-5)


def _train_step(model, ids):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    forward_logits(model, ids).float().logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("enabled", [True, False])
def test_expert_bias_updates_only_when_enabled(enabled):
    overrides = ["moe.router_enable_expert_bias=true", "moe.router_bias_update_rate=1e-3"] if enabled else []
    _, model = _model(*overrides)
    bias = model.decoder.layers[1].mlp.router.expert_bias
    before = bias.clone()
    _train_step(model, torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0)))
    assert update_router_expert_bias(model) is enabled
    change = (bias - before).abs()
    if enabled:
        assert torch.allclose(change[change > 0], torch.full_like(change[change > 0], 1e-3)) and change.sum() > 0
        assert model.decoder.layers[1].mlp.router.local_tokens_per_expert.sum() == 0  # counters reset
    else:
        assert torch.equal(bias, before)


def test_aux_loss_enters_the_gradient():
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = {}
    for coeff, kind in ((0.0, "none"), (0.5, "seq_aux_loss")):
        _, model = _model(f"moe.router_load_balancing_type={kind}", f"moe.aux_loss_coeff={coeff}")
        moe_aux_loss()  # clear
        forward_logits(model, ids).float().logsumexp(-1).mean().backward()
        grads[kind] = model.decoder.layers[1].mlp.router.weight.grad.clone()
        losses = moe_aux_loss()
        if coeff:
            assert losses.get("seq_load_balancing_loss", 0) > 0, losses
    assert not torch.allclose(grads["none"], grads["seq_aux_loss"])


def _routing(model, ids):
    """The top-k expert map of every MoE router for one forward pass: {layer: bool [tokens, experts]}."""
    maps, hooks = {}, []
    for i, layer in enumerate(model.decoder.layers):
        if hasattr(layer.mlp, "router"):
            hooks.append(layer.mlp.router.register_forward_hook(
                lambda mod, inp, out, i=i: maps.__setitem__(i, out[1].clone())))
    with torch.no_grad():
        forward_logits(model, ids)
    for h in hooks:
        h.remove()
    return maps


def test_trainer_without_the_expert_bias_routes_on_the_scores_alone(tmp_path):
    """moe.trainer_expert_bias=false (the stability study's case g): the routers have no bias, a checkpoint's bias
    is left unread, and the experts chosen are those of the bias-free scores."""
    from megatron.core import dist_checkpointing

    from cookbook.convert.hf_to_mcore import load_megatron_checkpoint

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    _, with_bias = _model()
    router = with_bias.decoder.layers[1].mlp.router
    free = _routing(with_bias, ids)  # the checkpoint's bias is 0 here: the scores alone decide
    router.expert_bias.copy_(torch.tensor([10.0] + [0.0] * 7))  # a bias that forces expert 0 into every top-k
    forced = _routing(with_bias, ids)
    assert forced[1][:, 0].all() and not free[1][:, 0].all()
    dist_checkpointing.save(with_bias.sharded_state_dict(), str(tmp_path))

    _, without = _model("moe.trainer_expert_bias=false", "parallel.sync_expert_bias=false")
    assert all(layer.mlp.router.expert_bias is None for layer in without.decoder.layers[1:])
    assert not without.config.moe_router_enable_expert_bias
    load_megatron_checkpoint(without, tmp_path)  # the saved bias is there, and left unread
    assert torch.equal(without.decoder.layers[1].mlp.router.weight, router.weight)
    routed = _routing(without, ids)
    assert all(torch.equal(routed[i], free[i]) for i in free)
    assert update_router_expert_bias(without) is False


@pytest.mark.parametrize("sync_bias", [True, False])
def test_weight_sync_leaves_the_expert_bias_out_when_told(sync_bias):
    """parallel.sync_expert_bias=false (the stability study's case h): the buckets the rollout engine gets carry
    every weight but the routers' expert bias, which the engine keeps as it loaded it."""
    from cookbook.grpo.trainer import kept_by_rollout, rollout_tensors
    from cookbook.megatron.parallel import iter_hf_buckets

    overrides = [] if sync_bias else ["parallel.sync_expert_bias=false", "moe.router_enable_expert_bias=true",
                                      "moe.router_bias_update_rate=1e-2"]
    cfg, model = _model(*overrides)
    sent = {}
    for bucket in iter_hf_buckets(model, 1 << 20):
        sent.update(rollout_tensors(bucket, cfg))
    biases = sorted(n for n in sent if n.endswith("e_score_correction_bias"))
    assert any(n.endswith("mlp.gate.weight") for n in sent) and "lm_head.weight" in sent
    if sync_bias:
        assert biases == [f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in (1, 2)]
        assert all(sent[n].dtype == torch.float32 for n in biases) and kept_by_rollout(cfg) == ()
    else:
        assert biases == [] and kept_by_rollout(cfg) == ("e_score_correction_bias",)
