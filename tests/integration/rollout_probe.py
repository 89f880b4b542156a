"""Run in a fresh process (vLLM fixes are process-global): build the engine from an HF dir, compare
prompt log-probs with HF transformers before and after a weight push; print JSON.

``COOKBOOK_PROBE_FAKE_AMX=1`` makes torch report AMX tiles, as on most cloud Xeons, so that a machine
without AMX shows which attention backend the engine would select on one."""
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file

from cookbook.config import load_config
from cookbook.rollout.engine import RolloutWorker


def hf_logprobs(model, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(x).logits.float(), -1)
    return lp[0, :-1].gather(-1, x[0, 1:, None])[:, 0]


def layer_buckets(weights: dict, n: int) -> list[dict]:
    """Split HF weights into ``n`` buckets of whole layers (the embedding with the first, the head with the last)."""
    def layer(name):
        return int(name.split(".")[2]) if name.startswith("model.layers.") else (-1 if "embed" in name else 10**6)

    order = sorted({layer(k) for k in weights})
    groups = [order[i::n] for i in range(n)]
    return [{k: v for k, v in weights.items() if layer(k) in g} for g in groups]


def main(hf_dir: str, perturbed_dir: str) -> None:
    if os.environ.get("COOKBOOK_PROBE_FAKE_AMX") == "1":
        torch.cpu._is_amx_tile_supported = lambda: True
    from cookbook.rollout.backends import vllm_default_on_this_cpu

    worker = RolloutWorker(hf_dir, load_config(os.environ.get("COOKBOOK_PROBE_PRESET", "tiny")))
    prompt = worker.encode([{"role": "user", "content": "What is 3 + 4? Let's think step by step."}])
    # the third sequence runs past 64 positions, the YaRN preset's original context (tiny-deepseek-v3)
    batch = [prompt + [300, 301, 302, 17, 25, 40, 41], prompt[:9], (prompt * 4)[:100]]
    result = {**worker.ready(), "vllm_default": vllm_default_on_this_cpu()}
    base = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    perturbed = load_file(f"{perturbed_dir}/model.safetensors")
    for label, d in (("before", hf_dir), ("after", perturbed_dir)):
        if label == "after":  # in three buckets of whole layers, as the trainer group sends them
            result["sync"] = worker.update_weights(layer_buckets(perturbed, 3))
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        got = worker.prompt_logprobs(batch)
        result[label] = max(float((torch.tensor(g) - hf_logprobs(hf, ids)).abs().max()) for g, ids in zip(got, batch))
        # decode runs MLA's absorbed W_UK_T / W_UV (prefill does not): they must follow the new kv_b_proj
        sample = worker.generate([prompt], n=1, temperature=0.0, max_tokens=8, seed=0)[0]
        ids = prompt + sample.response_ids
        result[f"decode_{label}"] = float((torch.tensor(sample.logprobs) - hf_logprobs(hf, ids)[len(prompt) - 1:]
                                           ).abs().max())
        result[f"decode_{label}_vs_base"] = float((torch.tensor(sample.logprobs) - hf_logprobs(base, ids)[
            len(prompt) - 1:]).abs().max())
    missing = "model.layers.1.self_attn.o_proj.weight"
    try:
        worker.update_weights({k: v for k, v in perturbed.items() if k != missing})
        result["incomplete_sync"] = "accepted"
    except Exception as e:  # noqa: BLE001 - the probe reports what happened
        result["incomplete_sync"] = str(e)
    worker.shutdown()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
