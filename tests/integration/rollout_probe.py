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


def main(hf_dir: str, perturbed_dir: str) -> None:
    if os.environ.get("COOKBOOK_PROBE_FAKE_AMX") == "1":
        torch.cpu._is_amx_tile_supported = lambda: True
    from cookbook.rollout.backends import vllm_default_on_this_cpu

    worker = RolloutWorker(hf_dir, load_config("tiny"))
    prompt = worker.encode([{"role": "user", "content": "What is 3 + 4? Let's think step by step."}])
    batch = [prompt + [300, 301, 302, 17, 25, 40, 41], prompt[:9]]
    result = {**worker.ready(), "vllm_default": vllm_default_on_this_cpu()}
    for label, d in (("before", hf_dir), ("after", perturbed_dir)):
        if label == "after":
            result["sync"] = worker.update_weights(load_file(f"{perturbed_dir}/model.safetensors"))
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        got = worker.prompt_logprobs(batch)
        result[label] = max(float((torch.tensor(g) - hf_logprobs(hf, ids)).abs().max()) for g, ids in zip(got, batch))
    worker.shutdown()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
