"""The trainer's optimizer (cookbook/grpo/optimizer.py): fp32 master weights for bf16 parameters."""
import torch

from cookbook.config import load_config
from cookbook.grpo.optimizer import MasterWeightAdamW, make_optimizer


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(64, 32, generator=gen) * 0.02).to(dtype)),
            torch.nn.Parameter((torch.randn(32, generator=gen) * 0.02).to(dtype))]


def _train(params, opt, steps=10, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            # the same gradient values for every parameter dtype
            p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16).to(p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_fp32_parameters_take_torch_adamws_step_bit_for_bit():
    g = load_config("tiny").grpo
    a, b = _params(torch.float32), _params(torch.float32)
    _train(a, make_optimizer(a, g, master_weights=True))
    _train(b, torch.optim.AdamW(b, lr=g.lr, betas=(g.adam_beta1, g.adam_beta2), weight_decay=g.weight_decay))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bf16_parameters_follow_an_fp32_adamw_and_keep_small_updates():
    """At the recipes' lr the bf16 weights are the fp32 AdamW trajectory rounded, where plain bf16 AdamW loses
    most updates to rounding."""
    g = load_config("moonlight-16b-a3b").grpo  # lr 2e-6
    bf16, fp32, plain = _params(torch.bfloat16), _params(torch.float32), _params(torch.bfloat16)
    start = [p.detach().clone() for p in bf16]
    opt = make_optimizer(bf16, g, master_weights=True)
    _train(bf16, opt)
    reference = torch.optim.AdamW(fp32, lr=g.lr, betas=(g.adam_beta1, g.adam_beta2), weight_decay=g.weight_decay)
    for p, s in zip(fp32, start):
        p.data.copy_(s.float())
    _train(fp32, reference)
    assert all(p.dtype == torch.bfloat16 for p in bf16)
    assert all(torch.equal(p, r.to(torch.bfloat16)) for p, r in zip(bf16, fp32))
    for p, r in zip(bf16, fp32):
        state = opt.state[p]
        assert state["master"].dtype == torch.float32 and torch.equal(state["master"], r.detach())
        assert state["exp_avg"].dtype == torch.float32
    _train(plain, make_optimizer(plain, g, master_weights=False))
    moved_master = sum(int((p.float() != s.float()).sum()) for p, s in zip(bf16, start))
    moved_plain = sum(int((p.float() != s.float()).sum()) for p, s in zip(plain, start))
    assert moved_plain < 0.5 * moved_master, (moved_plain, moved_master)


def test_checkpoint_loads_allocate_fp32_state_for_bf16_parameters():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    assert MasterWeightAdamW.state_dtype(p) == torch.float32


def test_a_loaded_state_keeps_its_fp32_master_weights_and_moments():
    """torch's load_state_dict casts state to the parameter dtype; the master weights must not be rounded."""
    g = load_config("moonlight-16b-a3b").grpo
    a, b = _params(torch.bfloat16), _params(torch.bfloat16, seed=5)
    opt = make_optimizer(a, g, master_weights=True)
    _train(a, opt, steps=3)
    other = make_optimizer(b, g, master_weights=True)
    other.load_state_dict(opt.state_dict())
    for p, q in zip(a, b):
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert other.state[q][key].dtype == torch.float32 and torch.equal(other.state[q][key], opt.state[p][key])
