"""The GRPO engine on one GPU (run on the GPU machine: ``python3 -m pytest -m gpu tests/gpu``): vLLM (bf16,
FLASH_ATTN_MLA) colocated with the trainer group. After a weight sync the rollout's log-probs follow the trainer's
new weights; sleep frees GPU memory and wake restores identical outputs; the fused-loss path runs inside the loop
(test_gpu_loop.py; this module runs first, so that a time limit cuts the slower loop runs, not these).

Tolerance: the rollout runs in bf16 and the tiny trainer in fp32, so their log-probs differ by bf16 rounding (the
mean |diff| of vLLM against HF in bf16 was 0.01 on a DeepSeek-V3-shaped model, platform-facts.md); a sync that
left the engine on the old weights shows differences of the size of the update, here made large on purpose.
"""
import json

import pytest
import torch

from gpu_common import PROMPTS, gpu_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


def _batch(rollout, seed):
    import ray

    samples = ray.get(rollout.generate.remote(PROMPTS, n=4, temperature=1.0, max_tokens=16, seed=seed))
    return ray.put({"prompt_ids": [s.prompt_ids for s in samples], "response_ids": [s.response_ids for s in samples],
                    "rollout_logp": [s.logprobs for s in samples],
                    "advantages": [float((i % 3) - 1) for i in range(len(samples))]})


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    from cookbook.grpo.workers import start_workers

    cfg = gpu_config(tmp_path_factory.mktemp("gpu"), "grpo.lr=0.01", "grpo.num_minibatches=1")
    w = start_workers(cfg)
    yield cfg, w
    w.shutdown()


def test_after_a_sync_the_rollout_follows_the_trainer(workers):
    cfg, w = workers
    first = w.trainer.call("train_step", _batch(w.rollout, 1), 1)  # rollout and trainer start equal
    stale = w.trainer.call("train_step", _batch(w.rollout, 2), 2)  # no sync: vLLM still has the initial weights
    sync = w.trainer.call("sync_weights", w.rollout, 1 << 20)
    synced = w.trainer.call("train_step", _batch(w.rollout, 3), 3)
    print(json.dumps({"first": first, "stale": stale, "synced": synced, "sync": sync}, indent=1))
    assert sync["buckets"] >= 2 and sync["bytes"] > 1e6
    assert first["mismatch/abs_diff_mean"] < 0.05  # bf16 rollout vs fp32 trainer
    assert stale["mismatch/abs_diff_mean"] > 5 * first["mismatch/abs_diff_mean"]  # lr 0.01 moved the weights
    assert synced["mismatch/abs_diff_mean"] < 2 * first["mismatch/abs_diff_mean"] + 1e-3


def test_sleep_frees_memory_and_wake_restores_identical_outputs(workers):
    import ray

    _, w = workers
    before = ray.get(w.rollout.generate.remote(PROMPTS, n=1, temperature=0.0, max_tokens=16, seed=0))
    used = ray.get(w.rollout.device_memory_gib.remote())
    ray.get(w.rollout.sleep.remote())
    asleep = ray.get(w.rollout.device_memory_gib.remote())
    ray.get(w.rollout.wake_up.remote(None))
    after = ray.get(w.rollout.generate.remote(PROMPTS, n=1, temperature=0.0, max_tokens=16, seed=0))
    print(f"device memory: {used:.2f} GiB awake, {asleep:.2f} GiB asleep")
    assert asleep < used - 1.0  # the KV cache (0.3 of the GPU) was released
    assert [s.response_ids for s in after] == [s.response_ids for s in before]
    for a, b in zip(after, before):  # approx compares flat sequences only
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
