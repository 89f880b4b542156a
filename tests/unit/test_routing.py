"""Routing statistics and routing replay on one trainer rank (``cookbook.megatron.routing``): the routers' own
top-k as captured equals Megatron's routing map, padded and packed micro-batches see the same routing, the
statistics count exactly the (token, layer) pairs that differ, replay routes with the given experts and gates them
like the router's own choice; and the rollout side's pieces: vLLM's CPU build still cannot return routed experts
(the `routed` fix in ``cookbook.rollout.compat`` stays needed), the request ids, the trainer layout.
(Layouts of two processes: tests/integration/test_routing_replay.py.)"""
import dataclasses

import numpy as np
import pytest
import torch

from cookbook.config import ConfigError, load_config
from cookbook.grpo.packing import PackingSpec
from cookbook.grpo.parallel_step import batch_from_rollout, forward_logprobs, train_minibatch
from cookbook.megatron import routing as R

LAYERS = [1, 2]  # the tiny model's MoE layers (layer 0 is dense)


@pytest.fixture(scope="module")
def setup():
    from cookbook.megatron.model import build_model, init_parallel

    torch.set_num_threads(1)
    cfg = load_config("tiny", overrides=["grpo.micro_batch_size=2"])
    init_parallel(cfg)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a spread-out expert bias, as in the real checkpoints, so routing bugs show
        for name, buf in model.named_buffers():
            if name.endswith("router.expert_bias"):
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    R.attach(model, LAYERS)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, cfg.model.vocab_size, (n,), generator=gen).tolist() for n in (5, 7, 4, 6)]
    responses = [torch.randint(2, cfg.model.vocab_size, (n,), generator=gen).tolist() for n in (6, 3, 8, 5)]
    batch = batch_from_rollout(prompts, responses, [0.5, -1.0, 1.5, -0.2], pad_id=0)
    batch = dataclasses.replace(batch, row_index=torch.arange(len(batch)))
    return cfg, model, batch


def run(model, batch, micro=2, **pass_kwargs):
    R.start_pass(model, capture=True, **pass_kwargs)
    logp = forward_logprobs(model, batch, micro_batch_size=micro)
    result = R.end_pass(model)
    return logp, result, R.captured_routing(result, len(batch), batch.mask.shape[1], len(LAYERS), 2)


def forwarded(batch) -> torch.Tensor:
    """[B, L - 1] True at the positions a rollout forwards (every token but the last of each sample)."""
    width = batch.mask.shape[1]
    return torch.arange(width)[None] < (batch.lengths - 1)[:, None]


def test_captured_routing_is_megatrons_routing_map(setup):
    from megatron.core.transformer.moe.router import TopKRouter

    cfg, model, batch = setup
    _, _, own = run(model, batch)
    maps = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: maps.__setitem__(mod.layer_number - 1, o[1]))
             for m in model.modules() if isinstance(m, TopKRouter)]
    try:
        with torch.no_grad():
            model(batch.input_ids, batch.position_ids, None)  # one plain forward: [S, B] tokens, s * B + b
    finally:
        for h in hooks:
            h.remove()
    B, L = batch.input_ids.shape
    valid = forwarded(batch)
    for slot, layer in enumerate(LAYERS):
        chosen = maps[layer].view(L, B, -1).transpose(0, 1)[:, :L - 1]  # [B, L - 1, experts] bool
        mine = torch.zeros_like(chosen)
        mine.scatter_(-1, own[:, :, slot].clamp(min=0).long(), True)
        assert bool((mine == chosen)[valid].all()), layer
    assert bool((own[valid] >= 0).all())


def test_packed_rows_route_like_padded_rows(setup):
    cfg, model, batch = setup
    logp, _, own = run(model, batch)
    packed = dataclasses.replace(batch, packing=PackingSpec(max_tokens=24))
    logp_packed, _, own_packed = run(model, packed)
    valid, mask = forwarded(batch), batch.mask.bool()  # packed log-probs exist at the scored positions only
    assert float((logp - logp_packed)[mask].abs().max()) < 1e-5
    assert torch.equal(own[valid], own_packed[valid])


def test_statistics_count_the_pairs_that_differ(setup):
    cfg, model, batch = setup
    _, _, own = run(model, batch)
    mask = batch.mask.bool()
    same = dataclasses.replace(batch, routing=own.clone())
    _, result, _ = run(model, same)
    m = R.step_metrics(result, layers=LAYERS)
    assert m["routing/rollout_vs_trainer"] == 0.0 and m["routing/rollout_vs_trainer_any_layer"] == 0.0
    # change the rollout's choice at 3 scored (token, layer) pairs (two in one token) and one unscored position
    wrong = own.clone()
    rows, cols = torch.nonzero(mask, as_tuple=True)
    picks = [(int(rows[0]), int(cols[0]), 0), (int(rows[0]), int(cols[0]), 1), (int(rows[7]), int(cols[7]), 1)]
    for b, t, slot in picks:
        wrong[b, t, slot, 0] = next(e for e in range(8) if e not in wrong[b, t, slot].tolist())
    wrong[0, 0, 0, 0] = next(e for e in range(8) if e not in wrong[0, 0, 0].tolist())  # a prompt position
    _, result, _ = run(model, dataclasses.replace(batch, routing=wrong))
    m = R.step_metrics(result, layers=LAYERS)
    scored = int(mask.sum())
    assert m["routing/rollout_vs_trainer"] == pytest.approx(3 / (2 * scored))
    assert m["routing/rollout_vs_trainer_any_layer"] == pytest.approx(2 / scored)
    assert m["routing/rollout_vs_trainer_layer1"] == pytest.approx(1 / scored)
    assert m["routing/rollout_vs_trainer_layer2"] == pytest.approx(2 / scored)
    assert "routing/rollout_vs_trainer_unreplayed" not in m  # only under replay


def random_routing(batch, seed: int) -> torch.Tensor:
    """A valid rollout routing (2 distinct experts of 8 per position and layer) at every forwarded position."""
    gen = torch.Generator().manual_seed(seed)
    B, width = batch.mask.shape
    ids = torch.rand(B, width, len(LAYERS), 8, generator=gen).argsort(-1)[..., :2].to(torch.int16)
    return torch.where(forwarded(batch)[:, :, None, None], ids, torch.full_like(ids, R.NO_EXPERT))


def test_replay_routes_with_the_rollouts_experts_padded_and_packed(setup):
    cfg, model, batch = setup
    target = random_routing(batch, 0)
    plain, _, own = run(model, batch)
    replayed_batch = dataclasses.replace(batch, routing=target)
    tracker = R.tracker_of(model)
    tracker.replay = True
    try:
        logp, result, used = run(model, replayed_batch)
        logp_packed, _, used_packed = run(model, dataclasses.replace(replayed_batch, packing=PackingSpec(24)))
        # replaying the router's own choice changes nothing: the gates are the router's own
        logp_own, _, _ = run(model, dataclasses.replace(batch, routing=own))
    finally:
        tracker.replay = False
    valid = forwarded(batch)
    assert torch.equal(used[valid], target[valid]) and torch.equal(used_packed[valid], target[valid])
    m = R.step_metrics(result, layers=LAYERS)
    assert m["routing/rollout_vs_trainer"] == 0.0  # by construction, checked on the experts the routers used
    assert m["routing/rollout_vs_trainer_unreplayed"] > 0.5  # random experts: the router would mostly differ
    assert float((logp - plain).abs().max()) > 1e-2
    mask = batch.mask.bool()
    assert float((logp - logp_packed)[mask].abs().max()) < 1e-5
    assert float((logp_own - plain).abs().max()) == 0.0


def test_replay_gates_are_the_routers_scores_normalised_over_the_replayed_experts(setup):
    """One router called directly: Megatron's sigmoid + expert-bias gates with the replayed experts in place of
    its top-k."""
    from megatron.core.transformer.moe.router import TopKRouter

    cfg, model, batch = setup
    router = next(m for m in model.modules() if isinstance(m, TopKRouter))
    tracker = R.tracker_of(model)
    x = torch.randn(6, 1, cfg.model.hidden_size, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([[0, 1], [2, 7], [5, 3], [4, 6], [1, 2], [7, 0]], dtype=torch.int16)
    full = torch.full((6, len(LAYERS), 2), R.NO_EXPERT, dtype=torch.int16)
    full[:, LAYERS.index(router.layer_number - 1)] = target
    tracker.replay, tracker.current = True, R._Microbatch(0, 6, torch.ones(6, dtype=torch.bool), full,
                                                          torch.ones(6, dtype=torch.bool), None, {})
    try:
        with torch.no_grad():
            probs, routing_map = router(x)
    finally:
        tracker.replay, tracker.current = False, None
    scores = torch.sigmoid(torch.nn.functional.linear(x.view(6, -1), router.weight))
    gathered = scores.gather(1, target.long())
    gates = gathered / gathered.sum(-1, keepdim=True) * (router.config.moe_router_topk_scaling_factor or 1.0)
    expected = torch.zeros(6, 8).scatter(1, target.long(), gates)
    assert torch.equal(routing_map, expected > 0)
    assert float((probs - expected).abs().max()) < 1e-6


def test_policy_change_compares_two_passes(setup):
    cfg, model, batch = setup
    _, before, _ = run(model, batch, keep=True)
    _, same, _ = run(model, batch, compare=before)
    assert R.step_metrics(same, layers=LAYERS)["routing/policy_change"] == 0.0
    router = next(p for n, p in model.named_parameters() if n.endswith("router.weight"))
    saved = router.detach().clone()
    with torch.no_grad():
        router.add_(torch.randn(router.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    try:
        _, after, _ = run(model, batch, compare=before)
    finally:
        with torch.no_grad():
            router.copy_(saved)
    m = R.step_metrics(after, layers=LAYERS)
    assert 0 < m["routing/policy_change"] <= m["routing/policy_change_any_layer"]
    assert m["routing/policy_change_layer1"] > 0 and m["routing/policy_change_layer2"] == pytest.approx(
        2 * m["routing/policy_change"] - m["routing/policy_change_layer1"])


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_training_under_replay_with_and_without_full_recompute(setup, recompute):
    """A training step under replay is the same with full activation recompute (each layer's forward runs again
    in the backward pass and must route the same micro-batch the same way)."""
    from cookbook.megatron.model import build_model

    cfg, model, batch = setup
    results = {}
    for mode in ("none", recompute):
        c = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, recompute=mode))
        m = build_model(c)
        m.load_state_dict(model.state_dict())
        R.attach(m, LAYERS, replay=True)
        b = dataclasses.replace(batch, routing=random_routing(batch, 1))
        old = forward_logprobs(m, b, micro_batch_size=2)
        out = train_minibatch(m, torch.optim.SGD(m.parameters(), lr=0.1), dataclasses.replace(b, old_logp=old),
                              c.grpo)
        results[mode] = (out["loss"], out["grad_norm"], forward_logprobs(m, b, micro_batch_size=2))
    (la, ga, pa), (lb, gb, pb) = results["none"], results[recompute]
    assert abs(la - lb) < 1e-6 and abs(ga - gb) < 1e-5 * ga and float((pa - pb).abs().max()) < 1e-5


def test_rollout_routing_lands_in_the_trainer_layout_and_packs():
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    batch = batch_from_rollout(prompts, responses, [0.0, 0.0], pad_id=0)
    arrays = [np.arange(4 * 2 * 2, dtype=np.uint8).reshape(4, 2, 2), None]
    routing = R.rollout_routing(arrays, batch.mask.shape[1], 2, 2)
    assert routing.shape == (2, 4, 2, 2) and routing.dtype == torch.int16
    assert torch.equal(routing[0], torch.from_numpy(arrays[0].astype(np.int16)))
    assert bool((routing[1] == R.NO_EXPERT).all())
    assert R.rollout_routing([None, None], 4, 2, 2) is None
    with pytest.raises(ValueError, match="sample 0"):
        R.rollout_routing([np.zeros((4, 3, 2), np.uint8), None], 4, 2, 2)

    from cookbook.grpo.packing import build_microbatch, PackedLayout

    layout = PackedLayout.build(batch.lengths.tolist(), PackingSpec(max_tokens=16), dp=1, tensor=1, context=1,
                                rows_per_micro=1)
    (rows,) = layout.microbatch_rows(0)
    pm = build_microbatch(rows, batch.input_ids, 0)
    packed = R.pack_routing(pm, routing)
    valid = pm.source >= 0
    assert torch.equal(packed[0, valid], routing.reshape(-1, 2, 2)[pm.source[valid]])
    assert bool((packed[0, ~valid] == R.NO_EXPERT).all())


def test_request_ids_of_vllm_samples():
    from cookbook.rollout.compat import request_key

    assert request_key("12-1a2b3c4d") == ("12", 0)
    assert request_key("3_12-1a2b3c4d") == ("12", 3)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from helpers import make_random_tiny_hf

    return make_random_tiny_hf(tmp_path_factory.mktemp("hf"))


def test_vllm_cpu_still_cannot_return_routed_experts(tiny_hf):
    """The `routed` fix stays needed while vLLM's CPU build refuses its own routed-experts output: it needs the V2
    model runner (Triton, absent on CPU) and prefix caching (off for MLA on CPU). When this fails, try
    ``enable_return_routed_experts`` on CPU and drop ``compat.RoutedExpertsCapture`` if it works."""
    import os

    from vllm.engine.arg_utils import EngineArgs

    from cookbook.rollout import compat

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    assert compat.needed("routed")
    args = EngineArgs(model=str(tiny_hf), dtype="float32", enforce_eager=True, enable_return_routed_experts=True,
                      enable_prefix_caching=True, max_model_len=256, attention_backend="CPU_MLA")
    with pytest.raises(Exception, match="Model Runner V2|requires Triton|prefix caching"):
        args.create_engine_config()


class FakeLLM:
    """vLLM's ``LLM`` as ``RolloutWorker`` uses it, recording the engine arguments (the GPU build is not here)."""

    built: list = []
    refuse_routing = False

    def __init__(self, **kwargs):
        import transformers

        FakeLLM.built.append(kwargs)
        if self.refuse_routing and kwargs.get("enable_return_routed_experts"):
            raise ValueError("AuxOutput Connector requires Model Runner V2")
        self.kwargs, self.resets = kwargs, 0
        hf_config = transformers.AutoConfig.from_pretrained(kwargs["model"])
        self.llm_engine = type("Engine", (), {"model_config": type("Model", (), {"hf_config": hf_config})})()

    def collective_rpc(self, method, args=()):
        return {"cookbook_attention_backends": [[{"backend": self.kwargs["attention_backend"], "prefill": "-"}]],
                "cookbook_capture_routing": [[1, 2]], "cookbook_finish_update": [None],
                "cookbook_take_routing": [{"0-1a2b3c4d": np.ones((4, 2, 2), np.uint8)}]}[method]

    def generate(self, prompts, params, use_tqdm=False):
        from types import SimpleNamespace as NS

        ids = prompts[0]["prompt_token_ids"]
        routed = np.arange((len(ids) + 1) * 3 * 2).reshape(-1, 3, 2) % 8  # every decoder layer, as vLLM returns
        done = NS(index=0, token_ids=[7, 8], logprobs=[{7: NS(logprob=-0.5)}, {8: NS(logprob=-0.25)}], text="ab",
                  finish_reason="stop", routed_experts=routed if self.kwargs.get("enable_return_routed_experts")
                  else None)
        return [NS(request_id="0", outputs=[done])]

    def reset_prefix_cache(self):
        self.resets += 1


@pytest.mark.parametrize("case", ["cpu", "gpu", "gpu_vllm_without_the_option", "gpu_vllm_refuses_it"])
def test_rollout_engine_arguments_and_where_its_routing_comes_from(tiny_hf, monkeypatch, case):
    """The engine arguments: on CPU exactly those from before the routing statistics (prefix caching off, vLLM's
    routed-experts option not passed: the `routed` fix captures them); on GPU vLLM's option with the prefix caching
    it requires (reset after each weight update), only where this vLLM has the option and accepts it, else no
    routing (no routing/* metrics) and ``moe.routing_replay=r3`` refused at start, naming the key."""
    import vllm
    import vllm.engine.arg_utils

    from cookbook.rollout import backends, compat, engine

    cpu = case == "cpu"
    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setattr(FakeLLM, "built", [])
    monkeypatch.setattr(FakeLLM, "refuse_routing", case == "gpu_vllm_refuses_it")
    monkeypatch.setattr(compat, "apply_before_engine", lambda: [])
    monkeypatch.setattr(backends, "on_gpu", lambda cfg: not cpu)
    if case == "gpu_vllm_without_the_option":
        monkeypatch.setattr(vllm.engine.arg_utils, "EngineArgs", dataclasses.make_dataclass("EngineArgs", ["model"]))
    if not cpu:
        monkeypatch.setattr(compat, "needed", lambda fix: False)
    cfg = load_config("tiny")
    worker = engine.RolloutWorker(str(tiny_hf), cfg)
    samples = worker.generate([[3, 4, 5]], n=1, temperature=1.0, routed_experts=True)
    worker.finish_weight_update()
    base = dict(model=str(tiny_hf), dtype="float32" if cpu else "bfloat16",
                attention_backend=backends.attention_backend(cfg), max_model_len=cfg.grpo.max_prompt_length
                + cfg.grpo.max_response_length, seed=cfg.seed, enforce_eager=True, tensor_parallel_size=1,
                worker_extension_cls="cookbook.rollout.worker_ext.WeightSyncExtension", max_num_seqs=256)
    if not cpu:
        base.update(gpu_memory_utilization=cfg.parallel.rollout_gpu_memory_utilization,
                    enable_sleep_mode=cfg.parallel.colocate)
    routed = dict(base, enable_prefix_caching=True, enable_return_routed_experts=True)
    plain = dict(base, enable_prefix_caching=False)
    built = {"cpu": [plain], "gpu": [routed], "gpu_vllm_without_the_option": [plain],
             "gpu_vllm_refuses_it": [routed, plain]}[case]
    assert FakeLLM.built == built
    assert worker.ready()["routing"] == {"cpu": "capture", "gpu": "vllm"}.get(case)
    assert worker.llm.resets == (case == "gpu")  # the prefix cache is forgotten after a weight update
    if case in ("cpu", "gpu"):  # vLLM's own output: [positions, every decoder layer, top_k], the MoE layers kept
        assert samples[0].routed_experts.shape == (4, 2, 2) and samples[0].routed_experts.dtype == np.uint8
    else:
        assert samples[0].routed_experts is None
        r3 = load_config("tiny", overrides=["moe.routing_replay=r3"])
        with pytest.raises(ValueError, match="moe.routing_replay=r3"):
            engine.RolloutWorker(str(tiny_hf), r3)


def test_config_validates_routing_replay():
    cfg = load_config("tiny", overrides=["moe.routing_replay=r3"])
    assert cfg.moe.routing_replay == "r3"
    with pytest.raises(ConfigError, match="moe.routing_replay"):
        load_config("tiny", overrides=["moe.routing_replay=r2"])


def test_replay_refuses_a_batch_without_the_rollouts_routing():
    batch = batch_from_rollout([[5, 6, 7]], [[8, 9]], [1.0], pad_id=0)
    assert R.with_rollout_routing(batch, [None], LAYERS, 2) is batch  # statistics: simply none this step
    with pytest.raises(ValueError, match="moe.routing_replay=r3"):
        R.with_rollout_routing(batch, [None], LAYERS, 2, replay=True)
