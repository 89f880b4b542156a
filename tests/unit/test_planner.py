"""The fit planner (``cookbook.plan``): parameter counts and shards against built models, the activation formula
against the tensors the model saves for its backward, the trainer state against a real trainer rank, the
tutorial layouts' verdicts, the search, the errors, and ``cookbook plan``."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cookbook.config import ConfigError, load_config
from cookbook.plan import activations as act
from cookbook.plan import fit_summary, fit_table, plans, smallest_fits
from cookbook.plan.memory import GIB, GPUS, trainer_state, vllm_stages
from cookbook.plan.params import part_of, rollout_weight_bytes, stage_counts, total_counts

ROOT = Path(__file__).parents[2]
GPU80, GPU141 = GPUS


def _built(cfg):
    from cookbook.megatron.model import build_model, init_parallel

    torch.set_num_threads(1)
    init_parallel(cfg)
    return build_model(cfg)


# -- parameters --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [[], ["model.q_lora_rank=96", "model.num_shared_experts=2"]])
def test_parameter_counts_are_the_built_models(overrides):
    """Every part of the model, counted from the name table, equals what ``build_model`` allocates (one rank)."""
    cfg = load_config("tiny", overrides)
    model = _built(cfg)
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts[part_of(name)] = parts.get(part_of(name), 0) + p.numel()
    expected = total_counts(cfg.model)
    assert parts == expected.parts
    assert sum(b.numel() for n, b in model.named_buffers() if n.endswith("expert_bias")) == expected.buffers
    assert stage_counts(cfg, 0).parts == expected.parts


def test_published_model_sizes():
    assert total_counts(load_config("moonlight-16b-a3b").model).params == 15_960_108_544  # "16B"
    assert round(total_counts(load_config("deepseek-v3-671b").model).params / 1e9) == 671  # without MTP
    # BENCHMARKS.md "First GPU run": 1.61 GB of bf16 HF weights synced to vLLM for moonlight-1gpu
    assert round(rollout_weight_bytes(load_config("moonlight-1gpu").model, 1) / 1e9, 2) == 1.61


def test_shard_arithmetic_of_the_moonlight_layout():
    """TP2 PP2 (14/13) EP2 ETP2: stage 0 holds the embedding, one dense and 13 MoE layers; routed experts are 32
    per rank, each half an FFN; attention, dense MLP, shared experts and the vocabulary split over TP."""
    cfg = load_config("moonlight-16b-a3b")
    m = cfg.model
    first, last = stage_counts(cfg, 0), stage_counts(cfg, 1)
    expert = 3 * m.hidden_size * m.moe_ffn_hidden_size
    assert first.parts["routed experts"] == last.parts["routed experts"] == 13 * 32 * expert // 2
    assert first.parts["embedding"] == m.vocab_size * m.hidden_size // 2 and "embedding" not in last.parts
    assert last.parts["output layer and final norm"] == m.vocab_size * m.hidden_size // 2 + m.hidden_size
    assert first.parts["dense MLP"] == 3 * m.ffn_hidden_size * m.hidden_size // 2
    assert first.parts["router"] == 13 * m.num_experts * m.hidden_size  # replicated
    whole = total_counts(m)
    # a stage's EP x ETP = 4 ranks hold its experts once; its 2 TP ranks the rest, norms and router replicated
    experts = first.parts["routed experts"] + last.parts["routed experts"]
    assert 4 * experts == whole.parts["routed experts"]
    replicated = whole.parts["router"] + (2 * m.hidden_size + m.kv_lora_rank) * m.num_layers + m.hidden_size
    assert 2 * (first.params + last.params - experts) - (whole.params - whole.parts["routed experts"]) == replicated


@pytest.mark.parametrize("world, overrides", [
    (2, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert_tensor=2"]),
    pytest.param(4, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.pipeline=2",
                     "parallel.first_pipeline_stage_layers=2", "parallel.expert=2"], marks=pytest.mark.slow),
])
def test_every_rank_holds_what_the_planner_counts(world, overrides):
    """Built under TP / ETP / EP / PP on gloo processes, each rank's parameters by part equal its stage's count."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import run_probe

    ranks = run_probe(ROOT / "tests/integration/shard_probe.py", *overrides, world=world)
    cfg = load_config("tiny", overrides)
    for held in ranks:
        expected = stage_counts(cfg, held["stage"])
        assert held["parts"] == expected.parts and held["buffers"] == expected.buffers


def test_a_weight_the_layout_cannot_split_is_a_config_error():
    cfg = load_config("tiny", ["parallel.expert_tensor=5"])  # the experts' FFN of 96 columns
    with pytest.raises(ConfigError, match=r"parallel.expert_tensor=5 does not divide .*\(96\)"):
        plans(cfg)


# -- activations ---------------------------------------------------------------------------------------------------
def _saved_bytes_by_layer(model, ids: torch.Tensor) -> dict[int, dict[str, int]]:
    """Bytes each decoder layer's modules save for the backward of a training forward (each storage once,
    parameters left out), split into the core attention and the rest; what the decoder block itself saves (the
    layer inputs under full recompute) goes under layer -1."""
    stack: list[str] = []
    hooks = []
    for name, mod in model.named_modules():
        hooks.append(mod.register_forward_pre_hook(lambda mod, i, name=name: stack.append(name)))
        hooks.append(mod.register_forward_hook(lambda mod, i, o: stack.pop() and None))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    out: dict[int, dict[str, int]] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        where = stack[-1] if stack else ""
        if ptr not in seen and ptr not in params and where.startswith("decoder") and "final_layernorm" not in where:
            seen.add(ptr)  # full recompute: the block's checkpoint keeps the layer inputs (layer -1 here)
            layer = int(where.split(".")[2]) if where.startswith("decoder.layers.") else -1
            key = "core attention" if "core_attention" in where else "rest"
            out.setdefault(layer, {}).setdefault(key, 0)
            out[layer][key] += t.untyped_storage().nbytes()
        return t

    from cookbook.megatron.model import forward_logits

    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward_logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return out


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activation_formula_is_what_the_model_saves(recompute):
    """Each layer's saved bytes outside the core attention equal the planner's (plus, on CPU, the normalized copy
    torch's unfused RMSNorm keeps: one per norm); selective keeps the core attention's q, k, v only; full keeps
    each layer's input only. (SDPA's CPU math path keeps its score matrix: the core attention on GPU is not
    checked here.)"""
    cfg = load_config("tiny", [f"parallel.recompute={recompute}"])
    model = _built(cfg)
    batch, length = 2, 64
    saved = _saved_bytes_by_layer(model, torch.randint(0, cfg.model.vocab_size, (batch, length)))
    mb = act.MicroBatch(tokens=batch * length, count=1, positions=length)
    m, a = cfg.model, 4
    if recompute == "full":
        inputs = sum(sum(act.layer_bytes(cfg, mb, i >= m.first_k_dense_replace).values()) for i in range(m.num_layers))
        assert set(saved) == {-1} and saved[-1]["rest"] == pytest.approx(inputs, rel=1e-4)
        return
    for layer in range(m.num_layers):
        moe = layer >= m.first_k_dense_replace
        expected = act.layer_bytes(cfg, mb, moe)
        cpu_norm_copies = mb.tokens * a * (2 * m.hidden_size + m.kv_lora_rank)
        rest = sum(v for k, v in expected.items() if k != "core attention") + cpu_norm_copies
        assert saved[layer]["rest"] + (saved[layer].get("core attention", 0) if recompute == "selective" else 0) \
            == pytest.approx(rest + (expected["core attention"] if recompute == "selective" else 0), rel=1e-4)


def test_logprob_peak_is_a_plus_20_bytes_per_logit():
    """``vocab_parallel_logprobs`` forward and backward at their peak, measured with torch's MemTracker: the
    logits plus five fp32 copies, as ``activations.logits_bytes`` counts them."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from cookbook.megatron.parallel import vocab_parallel_logprobs

    from cookbook.megatron.model import init_parallel

    cfg = load_config("tiny", ["model.params_dtype=bfloat16"])
    init_parallel(cfg)
    tokens, vocab = 512, 2048
    cfg.model.vocab_size = vocab
    logits = torch.randn(1, tokens, vocab, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (1, tokens))
    tracker = MemTracker()
    tracker.track_external(logits)
    with tracker:
        logp, entropy = vocab_parallel_logprobs(logits, targets)
        (logp.sum() + entropy.sum()).backward()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    predicted = act.logits_bytes(cfg, act.MicroBatch(tokens, 1, tokens))
    assert peak == pytest.approx(predicted, rel=0.01)


def test_microbatch_tokens_and_counts():
    cfg = load_config("moonlight-1gpu", ["grpo.prompts_per_step=8", "grpo.samples_per_prompt=8"])
    assert act.microbatch(cfg) == act.MicroBatch(4096, 8, 4096)  # worst case: full rows of 8 samples of 256 + 256
    assert act.microbatch(cfg, 384) == act.MicroBatch(3840, 7, 3840)  # 10 samples of 384 per row, 7 rows
    cp = load_config("moonlight-16b-a3b")
    assert act.microbatch(cp).tokens == 2048  # a 4096-token row over CP2
    padded = load_config("moonlight-1gpu", ["grpo.prompts_per_step=8", "grpo.samples_per_prompt=8",
                                            "grpo.sequence_packing=false", "grpo.micro_batch_size=4"])
    assert act.microbatch(padded, 384) == act.MicroBatch(4 * 384, 16, 384)  # 64 samples, 4 per micro-batch


# -- the trainer rank ----------------------------------------------------------------------------------------------
def test_trainer_state_is_what_a_trainer_rank_holds(monkeypatch):
    """A real ``TrainerRank`` after one GRPO step holds exactly the planner's state: policy, frozen reference,
    gradients and torch AdamW's two moments in the parameter dtype (fp32 here: 20 bytes per parameter; the bf16
    master-weight state is checked in tests/unit/test_optimizer.py)."""
    from cookbook.grpo.trainer import TrainerRank

    cfg = load_config("tiny", ["grpo.prompts_per_step=2", "grpo.samples_per_prompt=2", "grpo.micro_batch_size=4"])
    monkeypatch.setattr("cookbook.convert.hf_to_mcore.load_megatron_checkpoint", lambda target, path: None)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "0")
    torch.set_num_threads(1)
    rank = TrainerRank(cfg, 0, 1)
    rank.setup("127.0.0.1", 0, "unused", pad_id=0)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 500, (6,), generator=gen).tolist() for _ in range(4)]
    responses = [torch.randint(1, 500, (5,), generator=gen).tolist() for _ in range(4)]
    rank.train_step({"prompt_ids": prompts, "response_ids": responses, "advantages": [1.0, -1.0, 0.5, -0.5],
                     "rollout_logp": [[-1.0] * 5 for _ in range(4)]}, step=1)

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    bias = [b for n, b in rank.model.named_buffers() if n.endswith("expert_bias")]
    moments = [v for s in rank.optimizer.state.values() for k, v in s.items() if k != "step"]
    held = {"policy weights": nbytes(rank.model.parameters()) + nbytes(bias),
            "reference model": nbytes(rank.ref_model.parameters()) + nbytes(bias),
            "gradients": nbytes(p.grad for p in rank.model.parameters() if p.grad is not None),
            "AdamW moments (torch, param dtype)": nbytes(moments)}
    assert held == trainer_state(cfg, 0)


# -- verdicts ------------------------------------------------------------------------------------------------------
def test_tutorial_deepseek_layout_does_not_fit_with_this_code():
    """TP4 PP16 EP2 ETP4 on 128 GPUs: vLLM (TP32, 0.6 of each GPU) shares the GPUs of stages 0-3, and stages 1-3
    each keep 4 MoE layers' trainer state on those GPUs while vLLM is awake. With fp32 master weights (18 bytes per
    parameter, nothing sharded over data parallel) even training alone does not fit; without them (10 bytes) it does,
    and only the colocation does not."""
    cfg = load_config("deepseek-v3-671b")
    assert vllm_stages(cfg) == {0, 1, 2, 3}
    for master, state_gib in ((True, (98, 99)), (False, (54, 56))):
        cfg = load_config("deepseek-v3-671b", [f"grpo.master_weights={str(master).lower()}"])
        for plan in plans(cfg).values():
            assert not plan.fits
            assert plan.tightest.name == "GPU, rollout phase" and plan.tightest.where == "pipeline stage 1 (with vLLM)"
            training = next(r for r in plan.resources if r.name == "GPU, training phase")
            assert training.fits == (not master)
        state = sum(trainer_state(cfg, 1).values())
        assert state_gib[0] * GIB < state < state_gib[1] * GIB  # 5.88B parameters on a 4-MoE-layer stage


def test_tutorial_moonlight_layout_needs_a_smaller_vllm_share():
    """TP2 PP2 CP2 EP2 ETP2 on 8 GPUs: with fp32 master weights the trainer's state and allocator cache leave too
    little for vLLM's 0.75 of the GPU on either size, and the verdict names the share that fits; without master
    weights it fits 141 GB GPUs, narrowly."""
    cfg = load_config("moonlight-16b-a3b")
    found = plans(cfg)
    assert not found[GPU80.name].fits and not found[GPU141.name].fits
    assert found[GPU80.name].tightest.name == "GPU, rollout phase"
    text = fit_summary(cfg, search_layouts=False)
    assert "80 GB GPUs: does NOT fit" in text and "141 GB GPUs: does NOT fit" in text
    assert "fix: parallel.rollout_gpu_memory_utilization=0.75 -> " in text
    found = plans(load_config("moonlight-16b-a3b", ["grpo.master_weights=false"]))
    assert not found[GPU80.name].fits and found[GPU141.name].fits
    assert found[GPU141.name].tightest.headroom < 0.05  # it fits, narrowly


def test_the_search_finds_layouts_config_validation_accepts():
    cfg = load_config("moonlight-16b-a3b")
    fits = smallest_fits(cfg, GPU141)
    assert fits and all(f.plan.fits and f.cfg.world_size == 16 for f in fits)  # fp32 master weights: 2 nodes
    for f in fits:
        load_config("moonlight-16b-a3b", [f"parallel.{k}={getattr(f.cfg.parallel, k)}" for k in
                                          ("num_nodes", "gpus_per_node", "tensor", "pipeline", "context", "expert",
                                           "expert_tensor", "rollout_tensor", "sequence_parallel")]
                    + [f"parallel.{k}={getattr(f.cfg.parallel, k)}".replace("None", "null")
                       for k in ("first_pipeline_stage_layers", "last_pipeline_stage_layers")])
    assert {f.cfg.world_size for f in smallest_fits(load_config("moonlight-1gpu"), GPU141)} == {1}  # the H200 run


def test_fit_table_has_each_resource_with_its_total_and_capacity():
    table = fit_table(load_config("moonlight-1gpu"))
    assert list(table.columns) == [GPU80.name, GPU141.name]
    total = table.loc[("GPU, rollout phase", "= total")]
    assert total[GPU80.name] < total[GPU141.name]  # vLLM takes a share of each GPU
    assert table.loc[("GPU, training phase", "of capacity"), GPU141.name] == pytest.approx(143771 / 1024, abs=0.01)
    assert table.loc[("GPU, training phase", "log-probs (logits)"), GPU80.name] > 10  # moonlight's 163840 vocabulary


# -- errors and the command ----------------------------------------------------------------------------------------
def test_a_gpu_count_the_layout_cannot_use_names_the_node_counts_that_work():
    with pytest.raises(ConfigError, match=r"= 64 does not divide the 136 processes .* parallel.num_nodes to a "
                                          r"multiple of 16 \(128 GPUs\)"):
        load_config("deepseek-v3-671b", ["parallel.num_nodes=17"])
    with pytest.raises(ConfigError, match=r"parallel.expert x expert_tensor x pipeline = 16 x 4 x 16 = 1024"):
        load_config("deepseek-v3-671b", ["parallel.expert=16", "parallel.num_nodes=24"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cookbook.cli", "plan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cookbook_plan_prints_the_verdict_and_stops_on_a_bad_layout():
    out = _cli("--preset", "moonlight-16b-a3b", "--no-search")
    assert out.returncode == 1, out.stderr  # does not fit on 80 GB
    assert "TP2 PP2 (14/13) CP2 EP2 ETP2, vLLM TP2 on 8 GPUs" in out.stdout
    assert "141 GB GPUs: does NOT fit" in out.stdout  # fp32 master weights
    bad = _cli("--preset", "deepseek-v3-671b", "parallel.num_nodes=17", "--no-search")
    assert bad.returncode == 2 and "parallel.num_nodes to a multiple of 16" in bad.stderr and not bad.stdout


def test_planner_check_compares_predictions_with_measurements(tmp_path):
    """``benchmarks/planner_check.py`` on a measurement file: one row per quantity, the verdict on the peaks."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import planner_check

    predicted = planner_check.predict("moonlight-1gpu", planner_check.CONFIGS["base"])
    measured = {"base": {"preset": "moonlight-1gpu", "overrides": planner_check.CONFIGS["base"], "master_weights": True,
                         "params": predicted["params"], "after_setup_gib": predicted["after_setup_gib"],
                         "step2_peak_gib": predicted["step2_peak_gib"] * 1.2}}
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(measured))
    rows, ok = planner_check.compare(measured, 0.15)
    assert not ok and {r["quantity"] for r in rows} == {"params", "after_setup_gib", "step2_peak_gib"}
    assert next(r for r in rows if r["quantity"] == "params")["error"] == 0
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/planner_check.py"), str(path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and "| base | step2_peak_gib |" in out.stdout and "-16.7%" in out.stdout
